//! End to end: `possync run` (simulator + embedded broker + ingest + queue worker +
//! materialize) for a short while, then the tables are read back by an independent reader,
//! DuckDB's delta extension, and compared with the simulator's own ground truth.

use std::collections::BTreeSet;
use std::process::Command;
use std::time::Duration;

use possync::run::{run, RunConfig};
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn run_leaves_tables_equal_to_the_simulators_truth() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let cfg = RunConfig {
        data_dir: dir.path().to_path_buf(),
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
    assert!(report.caught_up, "materializer must catch up with everything published");

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

    // The registry table holds what the demo seeded.
    assert_eq!(
        got["registry_active"].as_array().map(Vec::len),
        Some(report.seeded.len())
    );
    Ok(())
}
