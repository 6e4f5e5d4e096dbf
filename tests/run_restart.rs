//! `possync run` twice on the same data directory: the embedded broker starts empty each time,
//! and no stale offset may block, skip or duplicate anything.
//!
//! Its own test binary: it counts what the process materialized with the process-wide metrics
//! (`possync::metrics::global()`), which another pipeline in the same process would move.

use std::process::Command;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use possync::run::{run, RunConfig};
use tokio_util::sync::CancellationToken;

fn table_counts(base: &str) -> anyhow::Result<serde_json::Value> {
    let out = Command::new("python3")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/py/check_run.py"))
        .arg(base)
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "reader failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(serde_json::from_slice(&out.stdout)?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn second_run_on_the_same_data_dir_appends_exactly() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let cfg = RunConfig {
        data_dir: dir.path().to_path_buf(),
        duration: Some(Duration::from_secs(8)),
        sim_listen: "127.0.0.1:0".parse()?,
        fill_rate: 4.0,
        queue_tick: Duration::from_millis(500),
        flush_latency: Duration::from_millis(300),
        progress_every: Duration::from_secs(5),
        ..RunConfig::default()
    };
    let m = possync::metrics::global();
    let written = || m.materialized_active.load(Relaxed) + m.materialized_queued.load(Relaxed);

    let first = run(cfg.clone(), CancellationToken::new()).await?;
    assert!(first.caught_up);
    let after_first = written();
    assert!(after_first > 0);
    let t1 = table_counts(&first.table_uri)?;
    assert_eq!(t1["event_rows"].as_u64(), Some(after_first));

    // Same directory, fresh embedded broker (offsets restart at 0 on a new cluster id).
    let second = run(cfg, CancellationToken::new()).await?;
    assert!(second.caught_up);
    let total = written();
    assert!(total > after_first, "the second run must materialize new events");
    let t2 = table_counts(&second.table_uri)?;
    // Nothing skipped (every event of both runs is there) and nothing doubled.
    assert_eq!(t2["event_rows"].as_u64(), Some(total));
    assert_eq!(t2["distinct_event_ids"].as_u64(), Some(total));
    // Both runs' offsets start at 0: the namespace column keeps the coordinates unique.
    assert_eq!(t2["distinct_coordinates"].as_u64(), Some(total));
    assert_eq!(t2["namespaces"].as_u64(), Some(2));
    // The book carried over (like an IB account's) and the current positions equal the truth.
    let key = |a: &str, c: i64, q: f64| format!("{a}:{c}:{q:.6}");
    let truth: std::collections::BTreeSet<String> = second
        .truth
        .positions
        .iter()
        .map(|p| key(&p.account, i64::from(p.contract.con_id), p.quantity))
        .collect();
    let table: std::collections::BTreeSet<String> = t2["open_positions"]
        .as_array()
        .expect("open_positions")
        .iter()
        .map(|r| key(r[0].as_str().unwrap(), r[1].as_i64().unwrap(), r[2].as_f64().unwrap()))
        .collect();
    assert_eq!(table, truth);
    Ok(())
}
