//! End to end: `possync run` (simulator + embedded broker + ingest + queue worker +
//! materialize) for a short while, then the tables are read back by independent readers and
//! compared: DuckDB's delta extension against the simulator's own ground truth, and Spark
//! (PySpark + delta-spark) against DuckDB. Both tests share one pipeline run.

mod materialize_support;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use materialize_support::{dead_letter_rows, produce, Env, Gen};
use possync::materialize::{self, MaterializeConfig};
use possync::run::{run, RunConfig, RunReport};
use tokio_util::sync::CancellationToken;

/// The tables of one pipeline run, shared by the tests of this file.
struct Pipeline {
    dir: PathBuf,
    report: RunReport,
    /// (topic, partition, offset) of the poison messages, which must be the dead letters.
    poison: Vec<(String, i32, i64)>,
}

/// How many tests use [`pipeline`]; the last one to finish deletes the tables.
const USERS: usize = 2;
static FINISHED: AtomicUsize = AtomicUsize::new(0);

/// Counts a test as finished with the shared tables (also when it panics).
struct Release;

impl Drop for Release {
    fn drop(&mut self) {
        if FINISHED.fetch_add(1, Ordering::SeqCst) + 1 == USERS {
            if let Some(Ok(p)) = PIPELINE.get() {
                let _ = std::fs::remove_dir_all(&p.dir);
            }
        }
    }
}

static PIPELINE: OnceLock<Result<Pipeline, String>> = OnceLock::new();

/// Runs the pipeline once per test process (the first caller runs it, the others wait).
fn pipeline() -> &'static Pipeline {
    let p = PIPELINE.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(4)
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        rt.block_on(run_pipeline()).map_err(|e| format!("{e:#}"))
    });
    match p {
        Ok(p) => p,
        Err(e) => panic!("the shared pipeline run failed: {e}"),
    }
}

async fn run_pipeline() -> anyhow::Result<Pipeline> {
    // Under the target directory rather than /tmp: a filtered run (one test) leaves it behind.
    let dir = tempfile::Builder::new()
        .prefix("run_e2e-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))?
        .keep();
    let cfg = RunConfig {
        data_dir: dir.clone(),
        duration: Some(Duration::from_secs(25)),
        sim_listen: "127.0.0.1:0".parse()?,
        fill_rate: 3.0,
        queue_tick: Duration::from_millis(700),
        queue_batch: 5,
        flush_latency: Duration::from_millis(500),
        progress_every: Duration::from_secs(5),
        ..RunConfig::default()
    };
    let report = run(cfg, CancellationToken::new()).await?;
    anyhow::ensure!(report.caught_up, "materializer must catch up with everything published");

    // `possync run` gets only well-formed input, so `dead_letters` would stay empty. A second
    // writer on another embedded broker (its own topics and offsets namespace) materializes
    // one poison message of each kind into the same tables: garbage bytes, a registry event on
    // a position topic, a route on the wrong topic, and a tombstone (no value).
    let env = Env::start(1)?;
    let mut gen = Gen::new(11, &env.kafka.topics, 8);
    let produced = produce(&env.producer()?, (0..4).map(|i| gen.poison(i)).collect()).await?;
    let mut poison: Vec<_> = produced
        .iter()
        .map(|p| (p.topic.clone(), p.partition, p.offset))
        .collect();
    poison.sort();
    let mcfg = MaterializeConfig {
        table_uri: report.table_uri.clone(),
        // Another cluster than the run's: a deliberate namespace change.
        allow_namespace_change: true,
        ..env.config("run-e2e-poison")
    };
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(materialize::run(mcfg, env.kafka.clone(), shutdown.clone()));
    let ns = env.namespace().await?;
    materialize::wait_caught_up(&report.table_uri, &ns, &env.kafka, Duration::from_secs(60)).await?;
    shutdown.cancel();
    task.await??;
    anyhow::ensure!(
        dead_letter_rows(&report.table_uri).await? == poison,
        "dead_letters must hold exactly the poison"
    );
    Ok(Pipeline { dir, report, poison })
}

#[test]
fn run_leaves_tables_equal_to_the_simulators_truth() -> anyhow::Result<()> {
    let _release = Release;
    let report = &pipeline().report;
    let out = Command::new("python3")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/py/check_run.py"))
        .arg(&report.table_uri)
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "DuckDB reader failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: serde_json::Value = serde_json::from_slice(&out.stdout)?;

    // Events exist for both routes.
    let routes = &got["routes"];
    assert!(routes["ACTIVE"].as_i64().unwrap_or(0) > 0, "no ACTIVE events: {got}");
    assert!(routes["QUEUED"].as_i64().unwrap_or(0) > 0, "no QUEUED events: {got}");

    // ACTIVE events only for contracts the registry made active.
    let covered = |account: &str, con_id: i64| {
        report
            .seeded
            .iter()
            .any(|e| e.con_id == con_id && e.account.as_deref().is_none_or(|a| a == account))
    };
    let active_keys = got["active_keys"].as_array().expect("active_keys");
    assert!(!active_keys.is_empty());
    for k in active_keys {
        let (account, con_id) = (k[0].as_str().unwrap(), k[1].as_i64().unwrap());
        assert!(
            covered(account, con_id),
            "ACTIVE event for {account}:{con_id}, which no registry entry covers"
        );
    }

    // positions_current equals the simulator's ground truth.
    let truth: BTreeSet<(String, i64, String, String)> = report
        .truth
        .positions
        .iter()
        .map(|p| {
            (
                p.account.clone(),
                i64::from(p.contract.con_id),
                format!("{:.6}", p.quantity),
                format!("{:.4}", p.avg_cost),
            )
        })
        .collect();
    let table: BTreeSet<(String, i64, String, String)> = got["open_positions"]
        .as_array()
        .expect("open_positions")
        .iter()
        .map(|r| {
            (
                r[0].as_str().unwrap().to_string(),
                r[1].as_i64().unwrap(),
                format!("{:.6}", r[2].as_f64().unwrap()),
                format!("{:.4}", r[3].as_f64().unwrap()),
            )
        })
        .collect();
    assert!(!truth.is_empty());
    assert_eq!(
        table, truth,
        "positions_current (open rows) must equal the simulator's truth"
    );

    // The queue shows items moving from pending to refreshed.
    assert!(
        got["queue_status"]["refreshed"].as_i64().unwrap_or(0) > 0,
        "nothing refreshed: {got}"
    );
    assert!(
        got["refreshed_after_pending"].as_i64().unwrap_or(0) > 0,
        "no enqueue→refresh sequence: {got}"
    );

    // Every simulated fill is one row of executions, with its commission (issue 21).
    let want: Vec<(String, String, i64, String, String, String, String)> = report
        .truth
        .executions
        .iter()
        .map(|e| {
            (
                e.exec_id.clone(),
                e.account.clone(),
                i64::from(e.contract.con_id),
                e.side.clone(),
                format!("{:.4}", e.shares),
                format!("{:.4}", e.price),
                format!("{:.4}", e.commission.commission),
            )
        })
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let rows: Vec<(String, String, i64, String, String, String, String)> = got["executions"]
        .as_array()
        .expect("executions")
        .iter()
        .map(|r| {
            (
                r[0].as_str().unwrap().to_string(),
                r[1].as_str().unwrap().to_string(),
                r[2].as_i64().unwrap(),
                r[3].as_str().unwrap().to_string(),
                format!("{:.4}", r[4].as_f64().unwrap()),
                format!("{:.4}", r[5].as_f64().unwrap()),
                format!("{:.4}", r[6].as_f64().unwrap_or(f64::NAN)),
            )
        })
        .collect();
    assert!(want.len() > 3, "the run made fills: {}", want.len());
    assert_eq!(
        rows, want,
        "executions must hold every simulated fill exactly once, with its commission"
    );

    // The reconciliation service ran (issue 21): the day's starting snapshot holds open
    // positions, and the last run reconciled the keys the fills moved. Only fills changed the
    // book, so most of them agree; none can have drifted (that takes --drift-after, 5 min).
    let kinds = &got["snapshots"];
    assert!(
        kinds["day_start"].as_i64().unwrap_or(0) > 0,
        "no day_start snapshot: {got}"
    );
    assert!(
        got["day_start_open"].as_array().is_some_and(|r| !r.is_empty()),
        "the day_start snapshot holds the open book: {got}"
    );
    let statuses = &got["reconciliation"];
    assert!(
        statuses["agrees"].as_i64().unwrap_or(0) > 0,
        "no key agrees: {statuses}"
    );
    assert!(
        statuses["drifted"].is_null(),
        "a drift in a run with fills only: {statuses}"
    );

    // The registry table holds what the demo seeded.
    assert_eq!(
        got["registry_active"].as_array().map(Vec::len),
        Some(report.seeded.len())
    );
    Ok(())
}

/// The Spark type each DuckDB type must read as (Delta's own types underneath: string, long,
/// integer, double, boolean, date, timestamp = UTC-adjusted, binary, array<string>).
fn spark_type_for(duckdb: &str) -> Option<&'static str> {
    Some(match duckdb {
        "VARCHAR" => "string",
        "BIGINT" => "bigint",
        "INTEGER" => "int",
        "DOUBLE" => "double",
        "BOOLEAN" => "boolean",
        "DATE" => "date",
        "TIMESTAMP WITH TIME ZONE" => "timestamp",
        "BLOB" => "binary",
        "VARCHAR[]" => "array<string>",
        // position_queue.partition_counts
        r#"STRUCT("partition" INTEGER, queued_events BIGINT, refresh_count BIGINT)[]"# => {
            "array<struct<partition:int,queued_events:bigint,refresh_count:bigint>>"
        }
        _ => return None,
    })
}

/// Runs a command with a deadline (killed after it); stdout and stderr go to files.
fn run_with_deadline(cmd: &mut Command, within: Duration) -> anyhow::Result<(bool, String, String)> {
    let logs = tempfile::tempdir()?;
    let (out, err) = (logs.path().join("stdout"), logs.path().join("stderr"));
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out)?)
        .stderr(std::fs::File::create(&err)?)
        .spawn()?;
    let deadline = Instant::now() + within;
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            anyhow::bail!(
                "{cmd:?} did not finish within {within:?}; stderr: {}",
                std::fs::read_to_string(&err).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    Ok((
        status.success(),
        std::fs::read_to_string(out)?,
        std::fs::read_to_string(err)?,
    ))
}

#[test]
fn spark_reads_every_table_like_duckdb() -> anyhow::Result<()> {
    let _release = Release;
    let p = pipeline();
    let started = Instant::now();
    let (ok, stdout, stderr) = run_with_deadline(
        Command::new("python3")
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/py/spark_read.py"))
            .arg(&p.report.table_uri),
        Duration::from_secs(600),
    )?;
    anyhow::ensure!(ok, "spark_read.py failed: {stderr}");
    let last = stdout.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or_default();
    let got: serde_json::Value = serde_json::from_str(last)?;
    eprintln!(
        "spark_read.py took {:.1}s: {} / {}",
        started.elapsed().as_secs_f64(),
        got["versions"],
        got["seconds"]
    );

    let tables = [
        "position_events",
        "positions_current",
        "position_queue",
        "strategy_registry",
        "dead_letters",
        "executions",
        "position_snapshots",
        "reconciliation",
    ];
    let mut null_cells = 0;
    for name in tables {
        let t = &got["tables"][name];
        assert!(t.is_object(), "{name}: not read: {got}");
        // Row counts: equal, and the pipeline wrote something.
        let rows = t["spark_rows"].as_u64().expect("spark_rows");
        assert_eq!(Some(rows), t["duckdb_rows"].as_u64(), "{name}: row counts differ");
        assert!(rows > 0, "{name}: empty");
        // Column names and order equal; each type is the Spark type of the DuckDB type.
        assert_eq!(t["same_column_order"], true, "{name}: columns differ: {}", t["columns"]);
        for c in t["columns"].as_array().expect("columns") {
            let (col, duck, spark) = (&c[0], c[1].as_str(), c[2].as_str());
            let want = duck.and_then(spark_type_for);
            assert!(
                want.is_some() && want == spark,
                "{name}.{col}: DuckDB {duck:?} read by Spark as {spark:?} (expected {want:?})"
            );
        }
        // The first rows by key (all of them, here: the tables are small) equal value by value.
        let sampled = rows.min(1000);
        assert_eq!(t["sample_rows"]["spark"].as_u64(), Some(sampled), "{name}: {t}");
        assert_eq!(t["sample_rows"]["duckdb"].as_u64(), Some(sampled), "{name}: {t}");
        assert_eq!(
            t["sample_mismatch_count"].as_u64(),
            Some(0),
            "{name}: Spark and DuckDB disagree: {}",
            t["sample_mismatches"]
        );
        assert!(t["sample_cells"].as_u64().unwrap_or(0) > 0, "{name}: nothing compared");
        null_cells += t["sample_null_cells"].as_u64().unwrap_or(0);
    }
    assert!(null_cells > 0, "nulls must be among the compared values: {got}");
    // Every poison message is a dead letter, to Spark too (the tombstone's value is null).
    assert_eq!(
        got["tables"]["dead_letters"]["spark_rows"].as_u64(),
        Some(p.poison.len() as u64)
    );
    assert!(got["tables"]["dead_letters"]["sample_null_cells"].as_u64().unwrap_or(0) > 0);
    Ok(())
}
