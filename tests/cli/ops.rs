//! Operator commands against real parts: `possync status` (the binary, `--json` parsed) over an
//! embedded broker and a materializer that keeps up, then stops; `possync book` and
//! `possync rebuild` over the tables of a live pipeline (simulator + ingest + queue worker +
//! materialize), compared with the simulator's truth recorded at a moment and with the live
//! tables.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::time::Duration;

use crate::common::process::BIN;
use crate::materialize_support::*;
use anyhow::{ensure, Context};
use deltalake::arrow::array::RecordBatch;
use possync::events::{RegistryAction, Route};
use possync::kafka::{EmbeddedBroker, KafkaConfig};
use possync::materialize::offsets::app_id;
use possync::materialize::tables::Table;
use possync::materialize::upsert::{self, CurrentState};
use possync::materialize::{self, read_table, TableKind};
use possync::ops::book::{self, At, Book, BookConfig};
use possync::ops::status::Status;
use possync::{ingest, queue_worker, registry, sim};
use tokio_util::sync::CancellationToken;

/// Runs the binary (off the async workers) and returns (exit success, stdout, stderr).
async fn possync(args: Vec<String>) -> anyhow::Result<(bool, String, String)> {
    let out = tokio::task::spawn_blocking(move || {
        Command::new(BIN)
            .args(&args)
            .env("POSSYNC_LOG", "warn")
            .env_remove("POSSYNC_TABLE_URI")
            .env_remove("POSSYNC_BROKERS")
            .output()
    })
    .await??;
    Ok((
        out.status.success(),
        String::from_utf8(out.stdout)?,
        String::from_utf8(out.stderr)?,
    ))
}

/// `possync status --json` for `env`'s broker, topics and tables, plus `extra` flags.
async fn status(env: &Env, extra: &[&str]) -> anyhow::Result<(bool, Status)> {
    let prefix = env
        .kafka
        .topics
        .registry
        .strip_suffix("registry")
        .context("topic prefix")?;
    let mut args: Vec<String> = [
        "status",
        "--json",
        "--brokers",
        env.broker.bootstrap(),
        "--topic-prefix",
        prefix,
    ]
    .map(String::from)
    .to_vec();
    args.extend(["--table-uri".to_string(), env.base.clone()]);
    args.extend(extra.iter().map(|s| s.to_string()));
    let (ok, stdout, stderr) = possync(args).await?;
    let s: Status =
        serde_json::from_str(&stdout).with_context(|| format!("status --json printed {stdout:?}; stderr {stderr}"))?;
    ensure!(ok == s.healthy, "exit code ({ok}) disagrees with healthy={}", s.healthy);
    if !ok {
        ensure!(stderr.contains("unhealthy"), "stderr: {stderr}");
    }
    Ok((ok, s))
}

/// Next offset per (topic, partition) from what was produced.
fn high_watermarks(produced: &[Produced]) -> BTreeMap<(String, i32), i64> {
    let mut out = BTreeMap::new();
    for p in produced {
        let e = out.entry((p.topic.clone(), p.partition)).or_insert(0);
        *e = (*e).max(p.offset + 1);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_reports_lag_and_exits_nonzero_when_behind() -> anyhow::Result<()> {
    let env = Env::start(2)?;
    let producer = env.producer()?;
    let mut gen = Gen::new(11, &env.kafka.topics, 40);
    let mut out = Vec::new();
    for i in 0..400 {
        out.push(gen.position());
        if i % 40 == 0 {
            out.push(gen.registry());
        }
        if i % 150 == 3 {
            out.push(gen.poison(i / 150));
        }
    }
    let mut produced = produce(&producer, out).await?;
    let poison = produced.iter().filter(|p| matches!(p.payload, Payload::Poison)).count() as u64;

    let shutdown = CancellationToken::new();
    let task = tokio::spawn(materialize::run(env.config("g"), env.kafka.clone(), shutdown.clone()));
    let ns = env.namespace().await?;
    materialize::wait_caught_up(&env.base, &ns, &env.kafka, Duration::from_secs(60)).await?;

    // Healthy: every partition's txn version is its last offset, nothing behind.
    let (ok, s) = status(&env, &[]).await?;
    ensure!(ok && s.problems.is_empty(), "{:?}", s.problems);
    assert_eq!(s.namespace, ns);
    let highs = high_watermarks(&produced);
    assert_eq!(
        s.partitions.len(),
        4 * 2,
        "4 input topics (executions too) x 2 partitions"
    );
    for p in &s.partitions {
        let high = highs.get(&(p.topic.clone(), p.partition)).copied().unwrap_or(0);
        assert_eq!(p.high_watermark, high, "{p:?}");
        assert_eq!(p.txn_version, (high > 0).then_some(high - 1), "{p:?}");
        assert_eq!((p.lag_events, p.lag_seconds), (0, Some(0.0)), "{p:?}");
    }
    assert_eq!((s.lag_events, s.lag_seconds), (0, Some(0.0)));
    assert_eq!(s.dead_letters, poison);
    let queue = expected_queue(&produced);
    let pending = queue.values().filter(|v| v.0 == "pending").count() as u64;
    assert_eq!(s.queue.depth, pending);
    assert_eq!(
        s.queue.depth + s.queue.refreshed + s.queue.closed + s.queue.active,
        queue.len() as u64
    );
    let route: BTreeMap<String, Route> = produced
        .iter()
        .filter_map(|p| match &p.payload {
            Payload::Position(e) => Some((e.event_id.clone(), e.route)),
            _ => None,
        })
        .collect();
    let active_open = expected_current(&produced)
        .values()
        .filter(|(id, pos)| *pos != 0.0 && route[id] == Route::Active)
        .count() as u64;
    assert_eq!(s.slots.active_open_positions, active_open);
    for t in &s.tables {
        ensure!(t.version.is_some() && t.commit_age_seconds.is_some(), "{t:?}");
    }
    // The counts came from the summaries of the newest commits, and equal a scan of the
    // tables (`--exact`).
    let version = |s: &Status, table: &str| s.tables.iter().find(|t| t.table == table).and_then(|t| t.version);
    for table in ["positions_current", "position_queue"] {
        let v = version(&s, table).context("version")?;
        assert_eq!(s.counted_from.get(table), Some(&format!("summary@v{v}")), "{table}");
    }
    let (_, exact) = status(&env, &["--exact"]).await?;
    for table in ["positions_current", "position_queue"] {
        let v = version(&exact, table).context("version")?;
        assert_eq!(exact.counted_from.get(table), Some(&format!("scan@v{v}")), "{table}");
    }
    assert_eq!(
        (&exact.slots.active_open_positions, &exact.queue),
        (&s.slots.active_open_positions, &s.queue)
    );

    // The materializer stops; 50 more events arrive: lag in events is exact, in seconds > 0.
    shutdown.cancel();
    task.await??;
    let more: Vec<_> = (0..50).map(|_| gen.position()).collect();
    produced.extend(produce(&producer, more).await?);
    let (ok, s) = status(&env, &["--max-lag-events", "0"]).await?;
    ensure!(!ok, "50 events behind with --max-lag-events 0 must be unhealthy");
    assert_eq!(s.lag_events, 50);
    let highs = high_watermarks(&produced);
    for p in &s.partitions {
        assert_eq!(
            p.high_watermark,
            highs.get(&(p.topic.clone(), p.partition)).copied().unwrap_or(0)
        );
        assert_eq!(p.lag_events, p.high_watermark - p.txn_version.map_or(0, |v| v + 1));
        if p.lag_events > 0 {
            ensure!(p.lag_seconds.is_some_and(|s| s > 0.0), "{p:?}");
        }
    }
    ensure!(
        s.problems.iter().any(|p| p.contains("not materialized")),
        "{:?}",
        s.problems
    );
    // By age: the oldest unmaterialized event only gets older while nobody materializes.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let s = loop {
        let (ok, s) = status(&env, &["--max-lag-seconds", "0.5"]).await?;
        if !ok {
            break s;
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "still healthy with --max-lag-seconds 0.5 after 30 s: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    ensure!(s.lag_seconds.is_some_and(|l| l > 0.5), "{s:?}");
    ensure!(
        s.problems.iter().any(|p| p.contains("unmaterialized")),
        "{:?}",
        s.problems
    );

    // A materializer again: healthy again.
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(materialize::run(env.config("g"), env.kafka.clone(), shutdown.clone()));
    materialize::wait_caught_up(&env.base, &ns, &env.kafka, Duration::from_secs(60)).await?;
    let (ok, s) = status(&env, &["--max-lag-events", "0"]).await?;
    ensure!(ok && s.lag_events == 0, "{:?}", s.problems);
    shutdown.cancel();
    task.await??;
    Ok(())
}

/// (account, con_id, quantity, avg cost) rounded like the e2e test does.
type Key = (String, i64, String, String);

fn truth_keys(t: &sim::Truth, account: Option<&str>) -> BTreeSet<Key> {
    t.positions
        .iter()
        .filter(|p| account.is_none_or(|a| a == p.account))
        .map(|p| {
            (
                p.account.clone(),
                i64::from(p.contract.con_id),
                format!("{:.6}", p.quantity),
                format!("{:.4}", p.avg_cost),
            )
        })
        .collect()
}

fn book_keys(b: &Book) -> BTreeSet<Key> {
    b.rows
        .iter()
        .map(|r| {
            (
                r.account.clone(),
                r.con_id,
                format!("{:.6}", r.position),
                format!("{:.4}", r.avg_cost),
            )
        })
        .collect()
}

/// The same book, up to the last digit of a float parsed back from JSON.
fn assert_same(a: &Book, b: &Book) {
    let ids = |b: &Book| b.rows.iter().map(|r| r.event_id.clone()).collect::<Vec<_>>();
    assert_eq!((&a.source, a.version, ids(a)), (&b.source, b.version, ids(b)));
    assert_eq!(book_keys(a), book_keys(b));
}

fn cfg(base: &str, at: At) -> BookConfig {
    BookConfig {
        table_uri: base.to_string(),
        account: None,
        at,
        include_closed: false,
    }
}

/// Waits until `positions_current`'s open rows equal the simulator's truth; returns the truth.
async fn caught_up_with(base: &str, sim: &sim::SimHandle) -> anyhow::Result<sim::Truth> {
    wait_for(
        "positions_current = simulator truth",
        Duration::from_secs(90),
        move || async move {
            let b = book::load(&cfg(base, At::Current)).await;
            Ok(b.is_ok_and(|b| book_keys(&b) == truth_keys(&sim.truth(), None)))
        },
    )
    .await?;
    Ok(sim.truth())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn book_as_of_and_version_and_rebuild_match_truth_and_live_tables() -> anyhow::Result<()> {
    let broker = EmbeddedBroker::start(1)?;
    let kafka = KafkaConfig::new(broker.bootstrap());
    broker.create_topics(&kafka.topics, 3)?;
    let dir = tempfile::tempdir()?;
    let base = dir.path().join("tables").to_string_lossy().into_owned();
    let ns = format!("ops-{}", possync::events::new_id());
    let sim = sim::start(sim::SimConfig {
        seed: 5,
        ..sim::SimConfig::for_tests()
    })
    .await?;

    // A registry covering a few option positions, some for every account.
    let seeded: Vec<_> = sim
        .truth()
        .positions
        .iter()
        .filter(|p| p.contract.sec_type == "OPT")
        .take(6)
        .enumerate()
        .map(|(i, p)| {
            registry::event(
                ["wheel", "hedge"][i % 2],
                (i % 3 != 2).then_some(p.account.as_str()),
                i64::from(p.contract.con_id),
                RegistryAction::Activate,
                i as i32,
                "ops-test",
            )
        })
        .collect();
    registry::commands::publish(&kafka, &seeded).await?;

    let producers = CancellationToken::new();
    let consumers = CancellationToken::new();
    let addr = sim.addr();
    let ingest = tokio::spawn(ingest::run(
        ingest::IngestConfig {
            ib_host: addr.ip().to_string(),
            ib_port: addr.port(),
            client_id: 101,
            slot_budget: 4,
            ..ingest::IngestConfig::default()
        },
        kafka.clone(),
        producers.clone(),
    ));
    let worker_stop = producers.child_token();
    let worker = tokio::spawn(queue_worker::run(
        queue_worker::QueueWorkerConfig {
            ib_host: addr.ip().to_string(),
            ib_port: addr.port(),
            client_id: 102,
            tick: Duration::from_millis(400),
            batch: 10,
            ..queue_worker::QueueWorkerConfig::default()
        },
        kafka.clone(),
        worker_stop.clone(),
    ));
    let mat = tokio::spawn(materialize::run(
        materialize::MaterializeConfig {
            table_uri: base.clone(),
            flush_latency: Duration::from_millis(300),
            offsets_namespace: Some(ns.clone()),
            ..materialize::MaterializeConfig::default()
        },
        kafka.clone(),
        consumers.clone(),
    ));

    // Some trading, then the moment T1: the tables have caught up with the simulator.
    caught_up_with(&base, &sim).await?;
    for _ in 0..10 {
        sim.random_fill();
    }
    // A POLL carries the time its poll was asked and the figures IB answered a moment later: a
    // poll in flight at T1 would carry a fill made right after T1 into `--as-of T1` (seen once
    // in CI). The queue has been refreshed by now; the worker stops before T1.
    worker_stop.cancel();
    worker.await??;
    let truth1 = caught_up_with(&base, &sim).await?;
    let t1 = chrono::Utc::now();
    let mut all = cfg(&base, At::Current);
    all.include_closed = true;
    let current1 = book::load(&all).await?;
    let v1 = current1.version.context("positions_current version")?;

    // Trading goes on after T1.
    for _ in 0..15 {
        sim.random_fill();
    }
    let truth2 = caught_up_with(&base, &sim).await?;
    ensure!(
        truth_keys(&truth2, None) != truth_keys(&truth1, None),
        "the fills changed nothing"
    );

    // --as-of T1 is the simulator's truth at T1 (library and binary agree).
    let as_of = book::load(&cfg(&base, At::AsOf(t1.timestamp_micros()))).await?;
    assert_eq!(book_keys(&as_of), truth_keys(&truth1, None));
    let account = truth1.positions[0].account.clone();
    let one = book::load(&BookConfig {
        account: Some(account.clone()),
        ..cfg(&base, At::AsOf(t1.timestamp_micros()))
    })
    .await?;
    assert_eq!(book_keys(&one), truth_keys(&truth1, Some(&account)));
    let t1_text = t1.to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    let (ok, stdout, stderr) = possync(
        [
            "book",
            "--json",
            "--table-uri",
            base.as_str(),
            "--as-of",
            t1_text.as_str(),
        ]
        .map(String::from)
        .to_vec(),
    )
    .await?;
    ensure!(ok, "possync book --as-of failed: {stderr}");
    assert_same(&serde_json::from_str(&stdout)?, &as_of);

    // --version V1 is positions_current exactly as it was at T1.
    let mut at_v1 = cfg(&base, At::Version(v1));
    at_v1.include_closed = true;
    let at_v1 = book::load(&at_v1).await?;
    assert_eq!(at_v1.rows, current1.rows);
    let v1_text = v1.to_string();
    let (ok, stdout, stderr) = possync(
        [
            "book",
            "--json",
            "--include-closed",
            "--table-uri",
            base.as_str(),
            "--version",
            v1_text.as_str(),
        ]
        .map(String::from)
        .to_vec(),
    )
    .await?;
    ensure!(ok, "possync book --version failed: {stderr}");
    assert_same(&serde_json::from_str(&stdout)?, &at_v1);

    // Stop: producers first, then the materializer once it holds everything.
    producers.cancel();
    ingest.await??;
    materialize::wait_caught_up(&base, &ns, &kafka, Duration::from_secs(60)).await?;
    consumers.cancel();
    mat.await??;

    // Rebuild from the audit log (the binary), then compare with the live tables.
    let rebuilt = dir.path().join("rebuilt").to_string_lossy().into_owned();
    let rebuild_args = [
        "rebuild",
        "--from",
        base.as_str(),
        "--to",
        rebuilt.as_str(),
        "--offsets-namespace",
        ns.as_str(),
    ]
    .map(String::from);
    let (ok, stdout, stderr) = possync(rebuild_args.to_vec()).await?;
    ensure!(ok, "possync rebuild failed: {stderr}");
    println!("{stdout}");
    // The registry is folded from its audit log, registry_events, not copied.
    ensure!(
        stdout.contains("folded from") && stdout.contains("registry_events") && !stdout.contains("copied"),
        "{stdout}"
    );

    let normal = |b: Vec<RecordBatch>| -> anyhow::Result<CurrentState> {
        Ok(CurrentState::default().merge(&b)?.unwrap_or_default())
    };
    let live = normal(read_table(&base, TableKind::PositionsCurrent).await?)?;
    let again = normal(read_table(&rebuilt, TableKind::PositionsCurrent).await?)?;
    ensure!(!live.is_empty());
    assert_eq!(live.batch(), again.batch(), "positions_current");
    let queue = |b: Vec<RecordBatch>| upsert::queue_from_batches(&b);
    assert_eq!(
        queue(read_table(&base, TableKind::PositionQueue).await?)?,
        queue(read_table(&rebuilt, TableKind::PositionQueue).await?)?,
        "position_queue"
    );
    let reg = |b: Vec<RecordBatch>| upsert::registry_from_batches(&b);
    let live_reg = reg(read_table(&base, TableKind::StrategyRegistry).await?)?;
    assert_eq!(live_reg.len(), seeded.len());
    assert_eq!(
        live_reg,
        reg(read_table(&rebuilt, TableKind::StrategyRegistry).await?)?,
        "strategy_registry"
    );
    // The rebuilt tables carry the offsets they reflect.
    for (kind, topics) in [
        (TableKind::PositionsCurrent, kafka.topics.positions().to_vec()),
        (TableKind::PositionQueue, kafka.topics.positions().to_vec()),
        (TableKind::StrategyRegistry, vec![kafka.topics.registry.as_str()]),
    ] {
        let mut a = Table::open(&base, kind).await?;
        let mut b = Table::open(&rebuilt, kind).await?;
        for topic in topics {
            for p in 0..3 {
                let id = app_id(&ns, topic, p);
                assert_eq!(a.txn_version(&id).await?, b.txn_version(&id).await?, "{kind:?} {id}");
            }
        }
    }
    // It never overwrites.
    let (ok, _, stderr) = possync(rebuild_args.to_vec()).await?;
    ensure!(!ok && stderr.contains("already exists"), "second rebuild: {stderr}");
    Ok(())
}
