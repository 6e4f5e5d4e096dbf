//! `possync bench scale`: the component benchmarks at desk size, one table of figures.
//!
//! Runs, in turn:
//! - `bench materialize` at each `--keys` size (1,000 changes per second by default): per-flush
//!   commit CPU, p99 produce → visible in the upsert tables, catch-up events per CPU-second and
//!   the materializer's peak RSS;
//! - `bench queue` with `--contracts` queued over `--accounts` (the simulator, ingest, the
//!   queue worker and the materializer): queue staleness p50/p99, the worker's IB messages per
//!   second, pacing errors, and this process's peak RSS (all four components run in it);
//! - `bench startup` when `--startup-brokers` names a real cluster (`scripts/kafka.sh start 1`):
//!   start-up of ingest and the queue worker with `--startup-events` of history, from the
//!   snapshot and by full replay.
//!
//! The queue run goes first (its RSS is this process's peak). Each run prints its own report as
//! it finishes; the summary table comes last.
//!
//! Files: [`startup`] (`possync bench startup`: start-up from the snapshot against full replay).

pub mod startup;

use std::fmt::Write as _;
use std::time::Duration;

use crate::kafka::KafkaArgs;
use crate::materialize::bench::{process_mem_mib, BenchMaterializeArgs};
use crate::queue_worker::bench::BenchQueueArgs;
use startup::BenchStartupArgs;

/// Flags of `possync bench scale`.
#[derive(clap::Args, Debug, Clone)]
pub struct BenchScaleArgs {
    /// Key counts of the materializer runs (comma-separated).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "10000,100000,1000000",
        env = "POSSYNC_BENCH_SCALE_KEYS"
    )]
    pub keys: Vec<u64>,
    /// Changes per second during the measured phase of each materializer run.
    #[arg(long, default_value_t = 1_000, env = "POSSYNC_BENCH_SCALE_RATE")]
    pub rate: u64,
    /// Length of that phase.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration, env = "POSSYNC_BENCH_SCALE_PHASE")]
    pub phase: Duration,
    /// Queued contracts of the queue run.
    #[arg(long, default_value_t = 10_000, env = "POSSYNC_BENCH_SCALE_CONTRACTS")]
    pub contracts: usize,
    /// Accounts the contracts are spread over.
    #[arg(long, default_value_t = 20, env = "POSSYNC_BENCH_SCALE_ACCOUNTS")]
    pub accounts: usize,
    /// Brokers of a real Kafka cluster for the start-up run (skipped without it).
    #[arg(long, env = "POSSYNC_BENCH_STARTUP_BROKERS")]
    pub startup_brokers: Option<String>,
    /// Events of history for the start-up run.
    #[arg(long, default_value_t = 10_000_000, env = "POSSYNC_BENCH_SCALE_STARTUP_EVENTS")]
    pub startup_events: u64,
}

/// Errors of the scale benchmark: which run failed, and why.
#[derive(Debug, thiserror::Error)]
#[error("bench scale: the {run} run failed: {message}")]
pub struct ScaleError {
    run: String,
    message: String,
}

fn failed(run: impl Into<String>) -> impl FnOnce(String) -> ScaleError {
    let run = run.into();
    move |message| ScaleError { run, message }
}

/// Runs every benchmark and returns the summary table (markdown).
///
/// # Errors
/// [`ScaleError`] naming the run that failed.
pub async fn run(args: BenchScaleArgs) -> Result<String, ScaleError> {
    let mut table = String::from("| run | figures |\n|---|---|\n");
    // The queue run first: its four components live in this process, whose peak RSS would
    // otherwise include what producing the materializer runs' events left on the heap (the
    // materializers themselves are child processes, measured on their own).
    let q = BenchQueueArgs {
        contracts: args.contracts,
        accounts: args.accounts,
        fill_rate: 20.0,
        duration: args.phase,
        tick: Duration::from_secs(5),
        batch: 50,
        flush_latency: Duration::from_secs(1),
        partitions: 6,
    };
    eprintln!(
        "== bench queue, {} contracts over {} accounts ==",
        args.contracts, args.accounts
    );
    let r = crate::queue_worker::bench::run(q)
        .await
        .map_err(|e| failed("queue")(e.to_string()))?;
    println!("{r}");
    let mut queue_row = String::new();
    let _ = writeln!(
        queue_row,
        "| queue, {} queued contracts over {} accounts | start-up sweep staleness p50 {:.1} s, p99 {:.1} s; steady p50 {:.1} s, p99 {:.1} s; worker {:.1} IB messages/s; {} pacing errors; RSS peak (sim + ingest + worker + materialize in one process) {:.0} MiB |",
        r.contracts,
        r.accounts,
        r.startup.p50_ms / 1000.0,
        r.startup.p99_ms / 1000.0,
        r.steady.p50_ms / 1000.0,
        r.steady.p99_ms / 1000.0,
        r.worker_msgs_per_s,
        r.pacing_errors,
        process_mem_mib(std::process::id(), "VmHWM:").unwrap_or_default()
    );
    for keys in &args.keys {
        let m = BenchMaterializeArgs {
            events: (*keys).max(200_000),
            partitions: 3,
            keys: *keys,
            rate: args.rate,
            latency_phase: args.phase,
            flush_latency: Duration::from_secs(1),
            table_uri: None,
            executions: 10_000,
            members: 1,
            status_runs: 0,
            status_bin: vec![],
        };
        eprintln!("== bench materialize, {keys} keys ==");
        let r = crate::materialize::bench::run(m)
            .await
            .map_err(|e| failed(format!("materialize ({keys} keys)"))(e.to_string()))?;
        println!("{r}");
        let _ = writeln!(
            table,
            "| materialize, {} keys in positions_current, {} changes/s, 1 s flush | {:.1} ms CPU per flush; produce → visible in the upsert tables p50 {:.0} ms, p99 {:.0} ms; catch-up {:.0} events per CPU-second; RSS peak {:.0} MiB |",
            r.keys, args.rate, r.cpu_per_flush_s * 1000.0, r.upsert_p50_ms, r.upsert_p99_ms, r.steady_events_per_cpu_s, r.rss_peak_mib
        );
    }
    table.push_str(&queue_row);
    match &args.startup_brokers {
        None => table.push_str(
            "| start-up with history | skipped: pass `--startup-brokers \"$(scripts/kafka.sh bootstrap)\"` (a real cluster from `scripts/kafka.sh start 1`) |\n",
        ),
        Some(brokers) => {
            #[derive(clap::Parser)]
            struct Flags {
                #[command(flatten)]
                kafka: KafkaArgs,
            }
            let flags = <Flags as clap::Parser>::try_parse_from(["possync", "--brokers", brokers])
                .map_err(|e| failed("startup")(e.to_string()))?;
            let s = BenchStartupArgs {
                kafka: flags.kafka,
                events: args.startup_events,
                contracts: 100_000,
                accounts: args.accounts as u64,
                days: 30,
                partitions: 6,
                tail: 20_000,
                table_uri: None,
                replay_timeout: Duration::from_secs(1800),
                keep: false,
            };
            eprintln!("== bench startup, {} events of history ==", args.startup_events);
            let r = crate::scale::startup::run(s)
                .await
                .map_err(|e| failed("startup")(e.to_string()))?;
            println!("{r}");
            let _ = writeln!(
                table,
                "| start-up, {} events of history | ingest {:.1} s from the snapshot ({:.1} s by full replay); queue worker {:.1} s ({:.1} s) |",
                r.events, r.ingest_snapshot.seconds, r.ingest_replay.seconds, r.queue_snapshot.seconds, r.queue_replay.seconds
            );
        }
    }
    Ok(table)
}
