//! `possync bench ingest` at a small size: every phase runs and the executions phases count
//! every fill, live and from the day's list after a disconnect. The figures themselves are not
//! checked (timing is the benchmark's business, not a test's).

use std::process::Command;

use anyhow::ensure;

use crate::common::process::{run_ok, BIN};

#[test]
fn bench_ingest_counts_every_execution() -> anyhow::Result<()> {
    let mut cmd = Command::new(BIN);
    cmd.args([
        "bench",
        "ingest",
        "--positions",
        "300",
        "--accounts",
        "3",
        "--fills",
        "1000",
        "--latency-for",
        "1s",
        "--executions",
        "400",
        "--brokers",
        "1",
    ])
    .env_remove("POSSYNC_BENCH_KAFKA_CONFIG")
    .env("POSSYNC_LOG", "warn");
    let out = run_ok(&mut cmd)?;
    for line in [
        "throughput: 1000 changes",
        "executions live: 400 fills over 3 accounts -> 400 executions (with commission) and ",
        "executions caught up: 400 fills made while the gateway refused connections",
        "all 400 on the topic",
    ] {
        ensure!(out.contains(line), "no {line:?} in the report:\n{out}");
    }
    Ok(())
}
