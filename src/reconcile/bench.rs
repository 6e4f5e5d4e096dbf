//! `possync bench reconcile`: what one reconciliation run costs at desk size.
//!
//! Without `--table-uri`, in a temporary directory:
//! 1. builds a desk with `possync bench materialize`: `--keys` positions in
//!    `positions_current`, then a day of `--executions` fills in `executions`;
//! 2. reads the book and writes the day's starting snapshot (the whole book to
//!    `position_snapshots`), timed as the service's first run of a day: its snapshot is dated
//!    before the build, so every fill counts;
//! 3. times `--runs` more runs as the service makes them every `--every`: the book, the day's
//!    fills, the lines of the keys the fills moved written to the `reconciliation` table (the
//!    synthetic fills' contracts are not in the book: every one of those keys drifts).
//!
//! With `--table-uri` (tables `possync materialize` wrote), it times the runs on those (the
//! first writes the day's starting snapshot when there is none).
//! Prints wall time and this process's CPU of the first run and of the later ones.

use std::fmt;
use std::time::{Duration, Instant};

use super::{ReconcileConfig, ReconcileError, Reconciler};
use crate::events::now_micros;
use crate::materialize::bench::{process_cpu_seconds, process_mem_mib, BenchMaterializeArgs};

/// Flags of `possync bench reconcile`.
#[derive(clap::Args, Debug, Clone)]
pub struct BenchReconcileArgs {
    /// Tables to reconcile (written by `possync materialize`); default: a desk built first by
    /// `bench materialize` in a temporary directory.
    #[arg(long, env = "POSSYNC_BENCH_RECONCILE_TABLE_URI")]
    pub table_uri: Option<String>,
    /// Positions of the desk built (without --table-uri).
    #[arg(long, default_value_t = 100_000, env = "POSSYNC_BENCH_RECONCILE_KEYS")]
    pub keys: u64,
    /// The day's fills of the desk built (without --table-uri).
    #[arg(long, default_value_t = 10_000, env = "POSSYNC_BENCH_RECONCILE_EXECUTIONS")]
    pub executions: u64,
    /// Reconciliation runs timed (the first takes the day's starting snapshot).
    #[arg(long, default_value_t = 5, env = "POSSYNC_BENCH_RECONCILE_RUNS")]
    pub runs: u32,
}

/// The figures.
#[derive(Debug, Clone, Default)]
pub struct BenchReport {
    /// Open positions in the book read.
    pub positions: usize,
    /// Lines of the last run (keys that moved today).
    pub lines: usize,
    /// The first run (with the day's starting snapshot): wall and CPU seconds.
    pub first_s: f64,
    pub first_cpu_s: f64,
    /// The later runs: median and slowest wall seconds, mean CPU seconds.
    pub run_p50_s: f64,
    pub run_max_s: f64,
    pub run_cpu_s: f64,
    /// This process's peak RSS after the runs, MiB (the desk's build included when it ran here).
    pub rss_peak_mib: f64,
}

impl fmt::Display for BenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "bench reconcile: {} open positions, {} lines (keys moved today)",
            self.positions, self.lines
        )?;
        writeln!(
            f,
            "  the day's starting snapshot (written by the first run of a day): {:.2} s, {:.2} CPU-s",
            self.first_s, self.first_cpu_s
        )?;
        writeln!(
            f,
            "  a run (book + the day's fills -> reconciliation table): p50 {:.2} s, max {:.2} s, {:.2} CPU-s",
            self.run_p50_s, self.run_max_s, self.run_cpu_s
        )?;
        write!(f, "  peak RSS of this process: {:.0} MiB", self.rss_peak_mib)
    }
}

/// Runs the benchmark.
///
/// # Errors
/// The desk could not be built (the materialize benchmark's error, as text), or a run failed.
pub async fn run(args: BenchReconcileArgs) -> Result<BenchReport, ReconcileError> {
    let runs = args.runs.max(2);
    let Some(table_uri) = &args.table_uri else {
        let tmp = std::env::temp_dir().join(format!("possync-bench-reconcile-{}", crate::events::new_id()));
        let result = on_a_built_desk(&args, &tmp.to_string_lossy(), runs).await;
        let _ = std::fs::remove_dir_all(&tmp);
        return result;
    };
    let mut service = service(table_uri);
    measure(&mut service, table_uri, None, runs).await
}

/// The desk, built by one `bench materialize` run: the book, then the day's fills. Its day's
/// starting snapshot is taken (and timed) as of before the build, so that every fill counts
/// and the runs have a line per key a fill moved to compute and write.
async fn on_a_built_desk(args: &BenchReconcileArgs, uri: &str, runs: u32) -> Result<BenchReport, ReconcileError> {
    let before = now_micros();
    eprintln!(
        "building a desk of {} positions and {} fills with bench materialize ...",
        args.keys, args.executions
    );
    crate::materialize::bench::run(BenchMaterializeArgs {
        events: args.keys.max(200_000),
        partitions: 3,
        keys: args.keys,
        rate: 1_000,
        latency_phase: Duration::from_secs(2),
        flush_latency: Duration::from_secs(1),
        table_uri: Some(uri.to_string()),
        executions: args.executions,
        members: 1,
        status_runs: 0,
        status_bin: vec![],
    })
    .await
    .map_err(|e| ReconcileError::Bench(e.to_string()))?;
    let pid = std::process::id();
    let (t0, cpu0) = (Instant::now(), process_cpu_seconds(pid).unwrap_or_default());
    let book = super::read::book_now(uri).await?;
    let n = super::write::snapshot(uri, &book, before, true).await?;
    let first = (
        t0.elapsed().as_secs_f64(),
        process_cpu_seconds(pid).unwrap_or_default() - cpu0,
        0,
    );
    eprintln!("the day's starting snapshot: {n} positions in {:.2} s", first.0);
    let mut service = service(uri);
    measure(&mut service, uri, Some(first), runs - 1).await
}

fn service(table_uri: &str) -> Reconciler {
    Reconciler::new(ReconcileConfig {
        table_uri: table_uri.to_string(),
        // No periodic snapshot within the runs: the day's first is the one measured.
        snapshot_every: Duration::from_secs(24 * 3600),
        ..ReconcileConfig::default()
    })
}

/// One run: (wall seconds, this process's CPU seconds, lines).
async fn timed(service: &mut Reconciler, n: u32) -> Result<(f64, f64, usize), ReconcileError> {
    let pid = std::process::id();
    let (t0, cpu0) = (Instant::now(), process_cpu_seconds(pid).unwrap_or_default());
    let r = service.run_once(now_micros()).await?;
    let wall = t0.elapsed().as_secs_f64();
    let cpu = process_cpu_seconds(pid).unwrap_or_default() - cpu0;
    eprintln!("run {n}: {wall:.2} s, {cpu:.2} CPU-s, {} lines", r.lines.len());
    Ok((wall, cpu, r.lines.len()))
}

/// Times `runs` more runs (after `first`, when the caller timed the day's first run).
async fn measure(
    service: &mut Reconciler,
    table_uri: &str,
    first: Option<(f64, f64, usize)>,
    runs: u32,
) -> Result<BenchReport, ReconcileError> {
    let mut report = BenchReport::default();
    let first = match first {
        Some(f) => f,
        None => timed(service, 1).await?,
    };
    (report.first_s, report.first_cpu_s) = (first.0, first.1);
    let (mut walls, mut cpu) = (Vec::new(), 0.0);
    for n in 0..runs.max(1) {
        let (wall, c, lines) = timed(service, n + 2).await?;
        walls.push(wall);
        cpu += c;
        report.lines = lines;
    }
    report.positions = super::read::book_now(table_uri).await?.rows.len();
    walls.sort_by(f64::total_cmp);
    report.run_p50_s = walls[walls.len() / 2];
    report.run_max_s = walls[walls.len() - 1];
    report.run_cpu_s = cpu / walls.len() as f64;
    report.rss_peak_mib = process_mem_mib(std::process::id(), "VmHWM:").unwrap_or_default();
    Ok(report)
}
