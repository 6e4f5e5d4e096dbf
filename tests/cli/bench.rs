//! `possync bench ingest` and `bench reconcile` at a small size: every phase runs, the
//! executions phases count every fill, live and from the day's list after a disconnect, and
//! the reconciliation runs over the whole book and every fill. The figures themselves are not
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

#[test]
fn bench_reconcile_runs_over_the_book_and_every_fill() -> anyhow::Result<()> {
    let mut cmd = Command::new(BIN);
    cmd.args([
        "bench",
        "reconcile",
        "--keys",
        "2000",
        "--executions",
        "300",
        "--runs",
        "3",
    ])
    .env("POSSYNC_LOG", "warn");
    let out = run_ok(&mut cmd)?;
    // 300 synthetic fills over 20 accounts: 300 distinct keys, none of them in the book.
    for line in [
        "open positions, 300 lines (keys moved today)",
        "the day's starting snapshot",
        "a run (book",
    ] {
        ensure!(out.contains(line), "no {line:?} in the report:\n{out}");
    }
    Ok(())
}
