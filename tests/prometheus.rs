//! Issue 25: the operator's rules and dashboard under ops/, checked with Prometheus itself.
//!
//! - `promtool check rules` / `check config` and `promtool test rules` (the unit tests of every
//!   alert) pass, and every alert has a unit test and says what to do;
//! - every expression of the rules and of the Grafana dashboard parses (each dashboard
//!   expression becomes a recording rule of a generated file that `promtool check rules`
//!   reads) and names only series possync exports (src/metrics.rs, rendered here) or the
//!   recording rules define;
//! - a real `prometheus` scrapes a running pipeline (the real `possync ingest`, `queue-worker`
//!   and `materialize` on the embedded broker and the IB simulator of this test process) every
//!   second with the rules loaded, and `PossyncIBDisconnected` fires when the simulated gateway
//!   goes away and resolves when it is back. The test's copy of the rules shortens that alert's
//!   `for:` from 1m to 5s; nothing else is changed.
//!
//! Debian's `prometheus` package brings `prometheus` and `promtool` (scripts/test.sh installs
//! it); without them these tests fail, saying so.

mod common;

use std::collections::BTreeSet;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, ensure, Context};
use common::process::{Reap, BIN};
use possync::kafka::{EmbeddedBroker, Topics};
use possync::metrics::{IbClient, Metrics, PartitionLag};
use possync::sim::SimConfig;
use serde_json::Value;
use tokio::time::Instant;

/// Generous bound for what takes seconds on an idle machine (tests share 2 cores with builds).
const DEADLINE: Duration = Duration::from_secs(60);
/// Start-up of the three processes (lease join, registry replay, first IB connection).
const START_DEADLINE: Duration = Duration::from_secs(120);

fn ops(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("ops").join(rel)
}

/// Fails with the fix when a Prometheus tool is missing (never skips).
fn require(tool: &str) -> anyhow::Result<()> {
    match Command::new(tool).arg("--version").output() {
        Ok(_) => Ok(()),
        Err(e) => bail!(
            "`{tool}` is not installed ({e}): install Debian's `prometheus` package (apt-get install prometheus; scripts/test.sh does it)"
        ),
    }
}

/// Runs a promtool command; its output, or an error with it.
fn promtool(args: &[&str], cwd: &Path) -> anyhow::Result<String> {
    require("promtool")?;
    let out = Command::new("promtool").args(args).current_dir(cwd).output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(out.status.success(), "promtool {args:?} failed:\n{text}");
    Ok(text)
}

/// Values of `key:` lines of a YAML file (the rules keep each on one line).
fn yaml_values(text: &str, key: &str) -> Vec<String> {
    let prefix = format!("{key}:");
    text.lines()
        .filter_map(|l| {
            let l = l.trim_start().trim_start_matches("- ");
            l.strip_prefix(&prefix).map(|v| v.trim().to_string())
        })
        .collect()
}

fn rules_text() -> anyhow::Result<String> {
    std::fs::read_to_string(ops("prometheus/rules.yml")).context("ops/prometheus/rules.yml")
}

fn unit_test_files() -> anyhow::Result<Vec<String>> {
    let mut files: Vec<String> = std::fs::read_dir(ops("prometheus/tests"))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yml"))
        .map(|n| format!("tests/{n}"))
        .collect();
    files.sort();
    Ok(files)
}

#[test]
fn rules_pass_promtool_check_and_their_unit_tests() -> anyhow::Result<()> {
    let dir = ops("prometheus");
    let checked = promtool(&["check", "rules", "rules.yml"], &dir)?;
    assert!(checked.contains("SUCCESS"), "{checked}");
    promtool(&["check", "config", "prometheus.yml"], &dir)?;
    let files = unit_test_files()?;
    ensure!(!files.is_empty(), "no promtool unit tests under ops/prometheus/tests");
    let mut args = vec!["test", "rules"];
    args.extend(files.iter().map(String::as_str));
    let tested = promtool(&args, &dir)?;
    assert_eq!(tested.matches("SUCCESS").count(), files.len(), "{tested}");

    // Every alert has a unit test that expects it to fire, and says what it is and what to do.
    let rules = rules_text()?;
    let alerts = yaml_values(&rules, "alert");
    assert!(alerts.len() >= 12, "alerts: {alerts:?}");
    let mut tests = String::new();
    for f in &files {
        tests += &std::fs::read_to_string(dir.join(f))?;
    }
    for a in &alerts {
        let named = format!("alertname: {a}\n");
        let firing = tests
            .split("- eval_time:")
            .filter(|case| case.contains(&named))
            .any(|case| case.contains("exp_labels"));
        let quiet = tests
            .split("- eval_time:")
            .filter(|case| case.contains(&named))
            .any(|case| case.contains("exp_alerts: []"));
        assert!(
            firing && quiet,
            "alert {a} needs a unit test where it fires and one where it stays quiet"
        );
    }
    let blocks: Vec<&str> = rules.split("- alert:").skip(1).collect();
    assert_eq!(blocks.len(), alerts.len());
    for b in blocks {
        assert!(
            b.contains("summary:") && b.contains("description:"),
            "alert without summary/description: {b}"
        );
    }
    Ok(())
}

/// The series a possync process can export: every family of the rendering, with every
/// optional one switched on.
fn exported_series() -> BTreeSet<String> {
    let m = Metrics::new();
    m.kafka_reachable.store(1, std::sync::atomic::Ordering::Relaxed);
    m.ingest_lease_held.store(1, std::sync::atomic::Ordering::Relaxed);
    let _ingest = m.ib_client_running(IbClient::Ingest);
    let _worker = m.ib_client_running(IbClient::QueueWorker);
    m.set_partitions(vec![PartitionLag {
        topic: "possync.positions.active".into(),
        partition: 0,
        lag_events: 0,
        oldest_waiting_ms: None,
        last_commit_ms: 0,
    }]);
    let mut names = BTreeSet::new();
    for line in m.render().lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            let (Some(name), Some(kind)) = (parts.next(), parts.next()) else {
                continue;
            };
            if kind == "histogram" {
                for suffix in ["_bucket", "_sum", "_count"] {
                    names.insert(format!("{name}{suffix}"));
                }
            } else {
                names.insert(name.to_string());
            }
        }
    }
    names
}

const AGGREGATIONS: &[&str] = &[
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
];
const LABEL_LISTS: &[&str] = &["by", "without", "on", "ignoring", "group_left", "group_right"];
const KEYWORDS: &[&str] = &["bool", "and", "or", "unless", "offset"];

/// The series (metric names) a PromQL expression selects: identifiers outside label matchers,
/// ranges and strings that are no function, aggregation, keyword or grouping label.
fn series_names(expr: &str) -> Vec<String> {
    let b: Vec<char> = expr.chars().collect();
    let skip_to = |i: usize, close: char| b[i..].iter().position(|c| *c == close).map_or(b.len(), |p| i + p + 1);
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c == '"' || c == '\'' || c == '`' {
            i = skip_to(i + 1, c);
        } else if c == '{' {
            i = skip_to(i, '}');
        } else if c == '[' {
            i = skip_to(i, ']');
        } else if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == '_' || b[i] == ':') {
                i += 1;
            }
            let ident: String = b[start..i].iter().collect();
            let next = b[i..].iter().find(|c| !c.is_whitespace()).copied();
            if LABEL_LISTS.contains(&ident.as_str()) {
                if next == Some('(') {
                    let open = i + b[i..].iter().position(|c| *c == '(').unwrap_or(0);
                    i = skip_to(open, ')');
                }
            } else if KEYWORDS.contains(&ident.as_str()) || AGGREGATIONS.contains(&ident.as_str()) || next == Some('(')
            {
                // An operator or a function call.
            } else {
                out.push(ident);
            }
        } else if c.is_ascii_digit() || c == '.' {
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == '.') {
                i += 1;
            }
        } else {
            i += 1;
        }
    }
    out
}

#[test]
fn the_series_scanner_finds_metric_names_only() {
    assert_eq!(
        series_names(r#"histogram_quantile(0.99, sum by (job, le) (rate(a_bucket{le="+Inf"}[5m])))"#),
        ["a_bucket"]
    );
    assert_eq!(
        series_names("x > 0 and on (job, instance) increase(y[15m]) == 0 or z:rec >= 1e3"),
        ["x", "y", "z:rec"]
    );
}

/// Every expression of the dashboard (panels and annotations), with Grafana's `$job` set.
fn dashboard_exprs() -> anyhow::Result<Vec<(String, String)>> {
    let text = std::fs::read_to_string(ops("grafana/possync.json")).context("ops/grafana/possync.json")?;
    let dash: Value = serde_json::from_str(&text).context("the dashboard is not JSON")?;
    let mut out = Vec::new();
    fn walk(v: &Value, title: &str, out: &mut Vec<(String, String)>) {
        match v {
            Value::Object(o) => {
                let title = o.get("title").and_then(Value::as_str).unwrap_or(title);
                if let Some(Value::String(e)) = o.get("expr") {
                    out.push((title.to_string(), e.replace("$job", "possync")));
                }
                for (k, v) in o {
                    if k != "templating" {
                        walk(v, title, out);
                    }
                }
            }
            Value::Array(a) => a.iter().for_each(|v| walk(v, title, out)),
            _ => {}
        }
    }
    walk(&dash, "", &mut out);
    Ok(out)
}

#[test]
fn dashboard_and_rules_parse_and_name_only_series_possync_exports() -> anyhow::Result<()> {
    let rules = rules_text()?;
    let recorded: BTreeSet<String> = yaml_values(&rules, "record").into_iter().collect();
    let exported = exported_series();
    for must in [
        "possync_ib_client_connected",
        "possync_slot_waiting_positions",
        "possync_queue_refresh_lag_seconds_bucket",
        "possync_materialize_lag_events",
        "possync_materialize_lag_seconds",
        "possync_materialize_commit_age_seconds",
        "possync_kafka_reachable",
        "possync_ingest_lease_held",
    ] {
        assert!(exported.contains(must), "{must} is not exported: {exported:?}");
    }
    // Prometheus' own series: a target's `up`, and `ALERTS` for the dashboard's annotations.
    let known = |n: &str| exported.contains(n) || recorded.contains(n) || n == "up" || n == "ALERTS";

    let mut exprs: Vec<(String, String)> = yaml_values(&rules, "expr")
        .into_iter()
        .map(|e| ("rules.yml".to_string(), e))
        .collect();
    for (_, e) in &exprs {
        assert!(
            !e.starts_with('|') && !e.starts_with('>'),
            "keep rule expressions on one line: {e}"
        );
    }
    let dashboard = dashboard_exprs()?;
    assert!(dashboard.len() >= 15, "{dashboard:?}");
    // The dashboard shows what the issue lists.
    let all: String = dashboard.iter().map(|(_, e)| e.as_str()).collect::<Vec<_>>().join("\n");
    for shown in [
        "possync:published:rate1m",
        "possync_slots_in_use",
        "possync_queue_depth",
        "possync:queue_refresh_lag_seconds:p99_5m",
        "possync:materialize_lag_events:sum",
        "possync:materialize_lag_seconds:max",
        "possync_last_commit_age_seconds",
        "possync:dead_letters:increase10m",
        "possync_ib_client_connected",
    ] {
        assert!(all.contains(shown), "the dashboard does not show {shown}");
    }
    exprs.extend(dashboard.iter().cloned());
    let mut problems = Vec::new();
    for (whose, e) in &exprs {
        let names = series_names(e);
        if names.is_empty() {
            problems.push(format!("{whose}: no series in {e}"));
        }
        for n in names.iter().filter(|n| !known(n)) {
            problems.push(format!(
                "{whose}: {n} is neither exported by possync nor recorded ({e})"
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));

    // Every dashboard expression parses: as a recording rule of a generated file (JSON is YAML).
    let rules = serde_json::json!({
        "groups": [{
            "name": "dashboard",
            "rules": dashboard.iter().enumerate().map(|(i, (_, e))| serde_json::json!({
                "record": format!("dashboard:expr_{i}"),
                "expr": e,
            })).collect::<Vec<_>>(),
        }]
    });
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("dashboard.yml"), serde_json::to_string_pretty(&rules)?)?;
    let out = promtool(&["check", "rules", "dashboard.yml"], dir.path())?;
    assert!(
        out.contains(&format!("SUCCESS: {} rules found", dashboard.len())),
        "{out}"
    );
    Ok(())
}

fn free_addr() -> anyhow::Result<SocketAddr> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// A `possync` child process with its log file.
fn spawn(args: &[&str], log: &Path) -> anyhow::Result<Reap> {
    let child = Command::new(BIN)
        .args(args)
        .env("POSSYNC_LOG", "warn,possync=info")
        .env_remove("POSSYNC_KAFKA_CONFIG")
        .env_remove("POSSYNC_LEASE_GROUP")
        .env_remove("POSSYNC_NO_LEASE")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log)?)
        .spawn()
        .with_context(|| format!("spawn possync {args:?}"))?;
    Ok(Reap(child))
}

/// Prometheus' HTTP API.
struct Prom {
    base: String,
    http: reqwest::Client,
}

impl Prom {
    async fn get(&self, path: &str) -> anyhow::Result<Value> {
        let body = self
            .http
            .get(format!("{}{path}", self.base))
            .send()
            .await?
            .text()
            .await?;
        let v: Value = serde_json::from_str(&body).with_context(|| format!("{path}: {body}"))?;
        ensure!(v["status"] == "success", "{path}: {body}");
        Ok(v["data"].clone())
    }

    /// An instant query: (labels, value) per series.
    async fn query(&self, q: &str) -> anyhow::Result<Vec<(Value, f64)>> {
        let data = self.get(&format!("/api/v1/query?query={}", urlencode(q))).await?;
        Ok(data["result"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .map(|r| {
                let v = r["value"][1].as_str().and_then(|s| s.parse().ok()).unwrap_or(f64::NAN);
                (r["metric"].clone(), v)
            })
            .collect())
    }

    /// The active alerts (pending and firing): (name, state, labels).
    async fn alerts(&self) -> anyhow::Result<Vec<(String, String, Value)>> {
        let data = self.get("/api/v1/alerts").await?;
        Ok(data["alerts"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .map(|a| {
                let name = a["labels"]["alertname"].as_str().unwrap_or_default().to_string();
                let state = a["state"].as_str().unwrap_or_default().to_string();
                (name, state, a["labels"].clone())
            })
            .collect())
    }

    /// `possync:ib_client_connected:max` per client.
    async fn ib_connected(&self) -> anyhow::Result<Vec<(String, f64)>> {
        let mut v: Vec<(String, f64)> = self
            .query("possync:ib_client_connected:max")
            .await?
            .into_iter()
            .map(|(l, v)| (l["client"].as_str().unwrap_or_default().to_string(), v))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(v)
    }
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Polls `check` until it returns `Some`, at most `within`; the last state in the error.
async fn wait_until<T, F, Fut>(what: &str, within: Duration, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Result<T, String>>>,
{
    let end = Instant::now() + within;
    loop {
        let last = match check().await {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(state)) => state,
            Err(e) => format!("{e:#}"),
        };
        if Instant::now() > end {
            bail!("timed out after {within:?} waiting for {what}; last: {last}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The logs of the processes, for a failure message.
fn logs(dir: &Path) -> String {
    ["ingest", "queue-worker", "materialize", "prometheus"]
        .iter()
        .map(|n| {
            let text = std::fs::read_to_string(dir.join(format!("{n}.log"))).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(15).collect();
            format!(
                "--- {n}.log (last lines)\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The rules with `PossyncIBDisconnected`'s `for: 1m` shortened to 5s.
fn rules_for_the_test() -> anyhow::Result<String> {
    let rules = rules_text()?;
    let at = rules
        .find("- alert: PossyncIBDisconnected")
        .context("no PossyncIBDisconnected")?;
    let rel = rules[at..]
        .find("for: 1m")
        .context("PossyncIBDisconnected has no `for: 1m`")?;
    ensure!(
        !rules[at + 1..at + rel].contains("- alert:"),
        "the `for: 1m` found belongs to another alert"
    );
    let mut out = rules.clone();
    out.replace_range(at + rel..at + rel + "for: 1m".len(), "for: 5s");
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ib_disconnect_alert_fires_on_a_real_prometheus_and_resolves() -> anyhow::Result<()> {
    require("prometheus")?;
    let _ = tracing_subscriber::fmt()
        .with_env_filter(std::env::var("POSSYNC_TEST_LOG").unwrap_or_else(|_| "warn".into()))
        .with_test_writer()
        .try_init();
    let dir = tempfile::Builder::new()
        .prefix("prometheus-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))?;
    let d = dir.path();

    // The embedded default: an embedded broker and the IB simulator, both served from here.
    let broker = EmbeddedBroker::start(1)?;
    broker.create_topics(&Topics::new("possync."), 2)?;
    let sim_cfg = SimConfig {
        listen: free_addr()?,
        ..SimConfig::for_tests()
    };
    let mut sim = possync::sim::start(sim_cfg.clone()).await?;
    let (ib_host, ib_port) = (sim.addr().ip().to_string(), sim.addr().port().to_string());
    let bootstrap = broker.bootstrap().to_string();

    let (m_ingest, m_worker, m_mat) = (free_addr()?, free_addr()?, free_addr()?);
    let tables = d.join("tables");
    let ib = ["--ib-host", ib_host.as_str(), "--ib-port", ib_port.as_str()];
    let ingest_metrics = m_ingest.to_string();
    let mut args = vec!["ingest", "--brokers", bootstrap.as_str(), "--client-id", "101"];
    args.extend(ib);
    args.extend(["--metrics-addr", ingest_metrics.as_str()]);
    // Quick reconnects; never give the lease up for want of IB (no standby here).
    args.extend([
        "--reconnect-initial",
        "200ms",
        "--reconnect-max",
        "1s",
        "--ib-unreachable-release",
        "0s",
    ]);
    let _ingest = spawn(&args, &d.join("ingest.log"))?;
    let worker_metrics = m_worker.to_string();
    let mut args = vec!["queue-worker", "--brokers", bootstrap.as_str(), "--client-id", "102"];
    args.extend(ib);
    args.extend(["--metrics-addr", worker_metrics.as_str(), "--tick", "1s"]);
    let _worker = spawn(&args, &d.join("queue-worker.log"))?;
    let mat_metrics = m_mat.to_string();
    let tables_arg = tables.to_string_lossy().into_owned();
    let args = [
        "materialize",
        "--brokers",
        bootstrap.as_str(),
        "--table-uri",
        tables_arg.as_str(),
        "--flush-latency",
        "300ms",
        "--metrics-addr",
        mat_metrics.as_str(),
    ];
    let _materialize = spawn(&args, &d.join("materialize.log"))?;

    // A real Prometheus: 1 s scrapes and rule evaluations, the rules of ops/ (one `for:` shorter).
    std::fs::write(d.join("rules.yml"), rules_for_the_test()?)?;
    let config = format!(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\nrule_files:\n  - rules.yml\nscrape_configs:\n  - job_name: possync\n    static_configs:\n      - targets: ['{m_ingest}', '{m_worker}', '{m_mat}']\n"
    );
    std::fs::write(d.join("prometheus.yml"), config)?;
    let web = free_addr()?;
    let prometheus = Command::new("prometheus")
        .arg(format!("--config.file={}", d.join("prometheus.yml").display()))
        .arg(format!("--storage.tsdb.path={}", d.join("tsdb").display()))
        .arg(format!("--web.listen-address={web}"))
        .arg("--log.level=warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(d.join("prometheus.log"))?)
        .spawn()
        .context("start prometheus")?;
    let _prometheus = Reap(prometheus);
    let prom = Prom {
        base: format!("http://{web}"),
        http: reqwest::Client::builder().timeout(Duration::from_secs(5)).build()?,
    };

    let run = async {
        // 1. Healthy: the three targets are up, both IB clients connected, the new series served
        //    by the processes that own them, and no alert fires.
        wait_until(
            "every target up and both IB clients connected, no alert firing",
            START_DEADLINE,
            || async {
                let up = prom.query(r#"up{job="possync"}"#).await?;
                let ib = prom.ib_connected().await?;
                let alerts = prom.alerts().await?;
                let healthy = up.len() == 3
                    && up.iter().all(|(_, v)| *v == 1.0)
                    && ib == [("ingest".to_string(), 1.0), ("queue-worker".to_string(), 1.0)]
                    && alerts.is_empty();
                Ok(if healthy {
                    Ok(())
                } else {
                    Err(format!("up {up:?}, ib {ib:?}, alerts {alerts:?}"))
                })
            },
        )
        .await?;
        for (q, want) in [
            // Only the ingest takes part in the lease, and it holds it.
            ("possync:ingest_lease_holders:sum", 1.0),
            // The three standalone processes probe Kafka.
            ("count(possync_kafka_reachable == 1)", 3.0),
            // Materialize owns every input partition (two each of four topics: the positions,
            // the registry, the executions).
            ("count(possync_materialize_commit_age_seconds)", 8.0),
            // The simulator's book went through Kafka into the tables.
            ("count(sum(possync_materialized_total) > 0)", 1.0),
            // Once the quiet book is in the tables nothing is behind: transaction markers do not
            // count as lag.
            ("possync:materialize_lag_events:sum", 0.0),
            ("possync:materialize_lag_seconds:max", 0.0),
            // The queue worker has loaded the queue and refreshed it. Otherwise the gateway's
            // shutdown below can find items queued and none ever refreshed, which is
            // PossyncQueueStalled (pending) by its own rule: a race of this test on a busy
            // machine, not of the alerts.
            ("count(possync_queue_refreshed_total > 0)", 1.0),
        ] {
            wait_until(q, DEADLINE, || async {
                let got = prom.query(q).await?;
                Ok(if got.len() == 1 && got[0].1 == want {
                    Ok(())
                } else {
                    Err(format!("{got:?}, want {want}"))
                })
            })
            .await?;
        }

        // 2. The gateway goes away: every connection closed and the port shut. The alert goes
        //    pending, then fires, for both clients.
        sim.shutdown().await?;
        let seen_pending = std::sync::Mutex::new(BTreeSet::new());
        wait_until(
            "PossyncIBDisconnected firing for ingest and queue-worker",
            DEADLINE,
            || {
                let (prom, seen_pending) = (&prom, &seen_pending);
                async move {
                    let alerts = prom.alerts().await?;
                    let mut firing = BTreeSet::new();
                    for (name, state, labels) in &alerts {
                        // Only IB's alerts have a reason to go off while the gateway is away.
                        ensure!(
                            name.starts_with("PossyncIB"),
                            "unexpected alert {name} ({state}): {labels}"
                        );
                        if name != "PossyncIBDisconnected" {
                            continue;
                        }
                        ensure!(labels["severity"] == "critical", "{labels}");
                        let client = labels["client"].as_str().unwrap_or_default().to_string();
                        match state.as_str() {
                            "pending" => {
                                seen_pending.lock().unwrap().insert(client);
                            }
                            "firing" => {
                                firing.insert(client);
                            }
                            other => bail!("alert state {other}"),
                        }
                    }
                    Ok(
                        if firing == BTreeSet::from(["ingest".to_string(), "queue-worker".to_string()]) {
                            Ok(())
                        } else {
                            Err(format!("alerts {alerts:?}"))
                        },
                    )
                }
            },
        )
        .await?;
        eprintln!(
            "PossyncIBDisconnected fired for both clients (seen pending first: {:?})",
            seen_pending.lock().unwrap()
        );
        let ib = prom.ib_connected().await?;
        assert_eq!(
            ib,
            [("ingest".to_string(), 0.0), ("queue-worker".to_string(), 0.0)],
            "the alert fires on disconnected clients"
        );

        // 3. The gateway is back on the same port: both clients reconnect and the alert resolves.
        sim = possync::sim::start(sim_cfg.clone()).await?;
        wait_until(
            "PossyncIBDisconnected resolved, both IB clients connected",
            DEADLINE,
            || async {
                let alerts = prom.alerts().await?;
                let ib = prom.ib_connected().await?;
                let resolved = !alerts.iter().any(|(n, _, _)| n == "PossyncIBDisconnected")
                    && ib == [("ingest".to_string(), 1.0), ("queue-worker".to_string(), 1.0)];
                Ok(if resolved {
                    Ok(())
                } else {
                    Err(format!("ib {ib:?}, alerts {alerts:?}"))
                })
            },
        )
        .await?;
        anyhow::Ok(())
    };
    let result = run.await;
    let _ = sim.shutdown().await;
    result.map_err(|e| anyhow::anyhow!("{e:#}\n{}", logs(d)))
}
