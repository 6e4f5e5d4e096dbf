//! `possync bench ingest`: throughput and latency of ingest, simulator → Kafka acknowledgement.
//!
//! Everything runs in this process: the simulator (its world sized by the flags), the
//! embedded broker, and ingest. Phase 1 drives `--fills` position changes through the
//! simulator as fast as ingest absorbs them (closed loop: at most `--window` changes ahead of
//! the acknowledged events, so the simulator's and ibapi's buffers never overflow) and reports
//! acknowledged events per second and per CPU-second. Phase 2 changes the active contracts at
//! `--latency-rate` per second for `--latency-for` and reports the active route's latency from
//! the IB frame (the moment `ibapi` hands the update to ingest) to the broker's acknowledgement.
//! Phase 3 drops the IB connection and times the resync of the book. Then (unless
//! `--executions 0`) the executions phases of [`exec`]: a desk's day of fills live,
//! and as many made while ingest is disconnected, which the day's list brings at the next
//! connect.
//!
//! Ingest is the simulator's master API client, so it gets every fill as an execution. Phases
//! 1 and 2 therefore change positions without a fill (`set_position`, as an expiry or a
//! transfer would): they measure position events alone, and the executions phases what a fill
//! (an execution and a position change) costs beside them.

pub mod exec;

use std::fmt;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::{Ingest, IngestConfig, IngestError};
use crate::kafka::{EmbeddedBroker, KafkaConfig, KafkaError};
use crate::metrics;
use crate::sim::{SimConfig, SimError};

/// Flags of `possync bench ingest`.
#[derive(clap::Args, Debug, Clone)]
pub struct BenchIngestArgs {
    /// Positions in the simulated world at start (spread over the accounts): a desk's book.
    #[arg(long, env = "POSSYNC_BENCH_POSITIONS", default_value_t = 100_000)]
    pub positions: usize,
    /// Simulated accounts.
    #[arg(long, env = "POSSYNC_BENCH_ACCOUNTS", default_value_t = 20)]
    pub accounts: usize,
    /// Position changes driven through ingest in the throughput phase.
    #[arg(long, env = "POSSYNC_BENCH_FILLS", default_value_t = 50_000)]
    pub fills: u64,
    /// Most changes made ahead of Kafka's acknowledgements in the throughput phase.
    #[arg(long, env = "POSSYNC_BENCH_WINDOW", default_value_t = 4_000)]
    pub window: u64,
    /// Contracts activated in the registry (they hold PnL streams; phase 2 changes them).
    #[arg(long, env = "POSSYNC_BENCH_ACTIVE", default_value_t = 10)]
    pub active: usize,
    /// Fills (each an execution with its commission report, and a position change) in each
    /// executions phase: live, then made while ingest is disconnected. 0 skips both.
    #[arg(long, env = "POSSYNC_BENCH_EXECUTIONS", default_value_t = 10_000)]
    pub executions: u64,
    /// Changes per second of active positions in the latency phase.
    #[arg(long, env = "POSSYNC_BENCH_LATENCY_RATE", default_value_t = 200)]
    pub latency_rate: u32,
    /// Length of the latency phase.
    #[arg(long, env = "POSSYNC_BENCH_LATENCY_FOR", value_parser = humantime::parse_duration, default_value = "10s")]
    pub latency_for: Duration,
    /// Brokers of the embedded cluster.
    #[arg(long, env = "POSSYNC_BENCH_BROKERS", default_value_t = 3)]
    pub brokers: i32,
    /// Partitions per topic.
    #[arg(long, env = "POSSYNC_BENCH_PARTITIONS", default_value_t = 6)]
    pub partitions: i32,
    /// Extra librdkafka producer setting, `key=value` (e.g. `-K linger.ms=0`); repeatable, each
    /// taken whole (env: one per line).
    #[arg(
        short = 'K',
        long = "kafka-config",
        env = "POSSYNC_BENCH_KAFKA_CONFIG",
        value_delimiter = '\n'
    )]
    pub kafka_config: Vec<String>,
}

/// Errors of the benchmark.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error(transparent)]
    Kafka(#[from] KafkaError),
    #[error("simulator: {0}")]
    Sim(#[from] SimError),
    #[error(transparent)]
    Ingest(#[from] IngestError),
    #[error("registry: {0}")]
    Registry(#[from] crate::registry::RegistryError),
    #[error("benchmark stalled: {0}")]
    Stalled(String),
}

/// The figures.
#[derive(Debug, Clone, Default)]
pub struct BenchIngestReport {
    pub positions: usize,
    pub accounts: usize,
    pub snapshot_events: u64,
    pub snapshot_secs: f64,
    /// CPU of the whole process during the first sync (simulator and broker included).
    pub snapshot_cpu_secs: f64,
    /// Reconnects during the first sync (an overflowing list costs one).
    pub snapshot_reconnects: u64,
    /// Peak resident memory of the whole process (simulator, broker, ingest), MiB.
    pub rss_peak_mib: f64,
    /// A resync after a dropped connection: time to the reconciled book, and the reconnects
    /// it took (1 when the list fit the buffer sized from the book).
    pub resync_secs: f64,
    pub resync_reconnects: u64,
    pub fills: u64,
    pub events: u64,
    pub secs: f64,
    pub cpu_secs: f64,
    pub latency_samples: usize,
    pub p50_us: u32,
    pub p90_us: u32,
    pub p99_us: u32,
    pub max_us: u32,
    /// The executions phases (`fills` 0 when skipped).
    pub exec: exec::ExecFigures,
}

impl fmt::Display for BenchIngestReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "possync bench ingest (simulator -> ingest -> embedded Kafka, acks=all, transactional)"
        )?;
        writeln!(
            f,
            "  initial sync of {} positions over {} accounts: {} events in {:.2} s, {:.2} CPU-s ({:.1} µs CPU per position, whole process), {} reconnects",
            self.positions,
            self.accounts,
            self.snapshot_events,
            self.snapshot_secs,
            self.snapshot_cpu_secs,
            self.snapshot_cpu_secs * 1e6 / (self.snapshot_events.max(1) as f64),
            self.snapshot_reconnects
        )?;
        writeln!(
            f,
            "  throughput: {} changes -> {} acknowledged events in {:.2} s = {:.0} events/s, {:.0} events per CPU-second ({:.2} CPU-s, whole process incl. simulator and broker)",
            self.fills,
            self.events,
            self.secs,
            self.events as f64 / self.secs.max(1e-9),
            self.events as f64 / self.cpu_secs.max(1e-9),
            self.cpu_secs
        )?;
        writeln!(
            f,
            "  per-frame cost at {} positions: {:.1} µs CPU per change (whole process); RSS peak {:.0} MiB",
            self.positions,
            self.cpu_secs * 1e6 / (self.events.max(1) as f64),
            self.rss_peak_mib
        )?;
        writeln!(
            f,
            "  resync after a dropped connection: {} positions reconciled in {:.2} s with {} reconnect(s)",
            self.positions, self.resync_secs, self.resync_reconnects
        )?;
        write!(
            f,
            "  active route latency, IB frame -> transaction committed ({} samples): p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            self.latency_samples,
            f64::from(self.p50_us) / 1e3,
            f64::from(self.p90_us) / 1e3,
            f64::from(self.p99_us) / 1e3,
            f64::from(self.max_us) / 1e3
        )?;
        let e = &self.exec;
        if e.fills == 0 {
            return write!(f, "\n  executions: skipped (--executions 0)");
        }
        write!(
            f,
            "\n  executions live: {} fills over {} accounts -> {} executions (with commission) and {} position events committed in {:.2} s = {:.0} executions/s, {:.0} position events/s; {:.2} CPU-s = {:.1} ms CPU per 1k executions with their position changes (whole process), vs {:.1} ms per 1k position changes alone (throughput phase)",
            e.fills,
            self.accounts,
            e.executions,
            e.position_events,
            e.secs,
            e.per_s(),
            e.events_per_s(),
            e.cpu_secs,
            e.cpu_per_1k() * 1e3,
            self.cpu_secs * 1e6 / (self.events.max(1) as f64),
        )?;
        write!(
            f,
            "\n  executions caught up: {} fills made while the gateway refused connections ({:.2} s to make), all {} on the topic {:.2} s after it accepted again ({:.2} s after ingest asked for the day's executions; the book resynced meanwhile), {} reconnect(s)",
            e.fills,
            e.fill_secs,
            e.missed,
            e.catchup_secs,
            e.catchup_from_request_secs,
            e.catchup_reconnects
        )
    }
}

pub(super) fn published() -> u64 {
    let m = metrics::global();
    m.published_active.load(Relaxed) + m.published_queued.load(Relaxed)
}

pub(super) fn cpu_seconds() -> f64 {
    // utime + stime, fields 14 and 15 of /proc/self/stat, in clock ticks (100 Hz on Linux).
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let tick = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (tick(11) + tick(12)) / 100.0
}

async fn wait_published(target: u64, stall: Duration) -> Result<(), BenchError> {
    wait_count(published, 0, target, stall, "events acknowledged").await
}

/// Waits until `count()` has grown by `n` from `from`; [`BenchError::Stalled`] when it does not
/// move for `stall`.
pub(super) async fn wait_count(
    count: impl Fn() -> u64,
    from: u64,
    n: u64,
    stall: Duration,
    what: &str,
) -> Result<(), BenchError> {
    let mut last = (count(), Instant::now());
    while count() < from + n {
        tokio::time::sleep(Duration::from_millis(2)).await;
        let now = count();
        if now != last.0 {
            last = (now, Instant::now());
        } else if last.1.elapsed() > stall {
            return Err(BenchError::Stalled(format!(
                "{} of {n} {what}, no progress for {stall:?}",
                now.saturating_sub(from)
            )));
        }
    }
    Ok(())
}

/// Ingest's IB client id, the simulator's master API client id.
const CLIENT_ID: i32 = 90;

/// The open positions phases 1 and 2 change, each between its quantity at start and one more
/// away from zero (`set_position`: no fill, so no execution; never closed).
struct Toggles {
    /// (account, conId, quantity at start, average cost).
    positions: Vec<(String, i32, f64, f64)>,
    /// Whether each is one away from its quantity at start now.
    moved: Vec<bool>,
}

impl Toggles {
    fn new(truth: &crate::sim::Truth) -> Self {
        let positions: Vec<_> = truth
            .positions
            .iter()
            .map(|p| (p.account.clone(), p.contract.con_id, p.quantity, p.avg_cost))
            .collect();
        let moved = vec![false; positions.len()];
        Self { positions, moved }
    }

    /// Changes position `i` (one event).
    fn change(&mut self, sim: &crate::sim::SimHandle, i: usize) -> Result<(), SimError> {
        let (account, con_id, quantity, avg_cost) = &self.positions[i];
        let moved = !self.moved[i];
        self.moved[i] = moved;
        let to = if moved { quantity + quantity.signum() } else { *quantity };
        sim.set_position(account, *con_id, to, *avg_cost)?;
        Ok(())
    }
}

fn percentile(sorted: &[u32], p: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Runs the benchmark and returns its figures.
///
/// # Errors
/// [`BenchError`] when a component fails to start or the pipeline stalls.
pub async fn run(args: BenchIngestArgs) -> Result<BenchIngestReport, BenchError> {
    // Twice the contracts of each account's share of the positions (5 underlyings, 20 strikes,
    // calls and puts: 200 options per expiry), so the random world holds them all.
    let per_account = args.positions.div_ceil(args.accounts.max(1));
    let sim = crate::sim::start(SimConfig {
        accounts: args.accounts.max(1),
        strikes: 20,
        expiries: (per_account / 100 + 1).max(3),
        initial_positions: args.positions,
        fill_rate: 0.0,
        max_streams: 1000,
        pacing_limit: 50,
        // Ingest gets every fill live and in the day's list.
        master_client_id: Some(CLIENT_ID),
        ..SimConfig::for_tests()
    })
    .await?;
    let broker = EmbeddedBroker::start(args.brokers.max(1))?;
    let kafka = KafkaConfig::from_args(&crate::kafka::KafkaArgs {
        brokers: broker.bootstrap().to_string(),
        topic_prefix: "possync.".into(),
        kafka_config: args.kafka_config.clone(),
    })?;
    broker.create_topics(&kafka.topics, args.partitions.max(1))?;
    let truth = sim.truth();
    let mut toggles = Toggles::new(&truth);
    let active = args.active.min(truth.positions.len());
    for p in truth.positions.iter().take(active) {
        let (account, con_id) = (&p.account, p.contract.con_id);
        crate::registry::activate(&kafka, "bench", Some(account), i64::from(con_id), 1, "bench").await?;
    }
    let cfg = IngestConfig {
        ib_host: sim.addr().ip().to_string(),
        ib_port: sim.addr().port(),
        client_id: CLIENT_ID,
        slot_budget: args.active.max(1),
        record_latency: true,
        ..IngestConfig::default()
    };
    let shutdown = CancellationToken::new();
    let base = published();
    eprintln!(
        "syncing {} positions over {} accounts ...",
        truth.positions.len(),
        args.accounts
    );
    let t0 = Instant::now();
    let cpu0 = cpu_seconds();
    let ingest = Ingest::start(cfg, kafka.clone(), shutdown.clone()).await?;
    let latency = ingest.latency_log();
    let stats = ingest.stats();
    let task = tokio::spawn(ingest.run());
    wait_published(base + truth.positions.len() as u64, Duration::from_secs(60)).await?;
    let mut report = BenchIngestReport {
        positions: truth.positions.len(),
        accounts: args.accounts,
        snapshot_events: published() - base,
        snapshot_secs: t0.elapsed().as_secs_f64(),
        snapshot_cpu_secs: cpu_seconds() - cpu0,
        snapshot_reconnects: stats.reconnects.load(Relaxed),
        fills: args.fills,
        ..Default::default()
    };
    eprintln!("snapshot published; driving {} changes ...", args.fills);

    // Phase 1: throughput, closed loop.
    let start_events = published();
    let start_cpu = cpu_seconds();
    // Round-robin over the open positions, moving each away from zero and back (never
    // closing it), so every change is one event and the simulator's cost stays constant.
    let t1 = Instant::now();
    let mut made = 0u64;
    while made < args.fills && !toggles.positions.is_empty() {
        if start_events + made > published() + args.window {
            tokio::time::sleep(Duration::from_micros(200)).await;
            continue;
        }
        toggles.change(&sim, (made as usize) % toggles.positions.len())?;
        made += 1;
        if made.is_multiple_of(256) {
            tokio::task::yield_now().await;
        }
    }
    wait_published(start_events + made, Duration::from_secs(60)).await?;
    report.secs = t1.elapsed().as_secs_f64();
    report.cpu_secs = cpu_seconds() - start_cpu;
    report.events = published() - start_events;

    // Phase 2: latency of the active route at a moderate rate.
    if let Some(log) = &latency {
        log.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }
    eprintln!(
        "measuring active-route latency at {}/s for {:?} ...",
        args.latency_rate, args.latency_for
    );
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(args.latency_rate.max(1))));
    let end = Instant::now() + args.latency_for;
    let mut i = 0usize;
    while Instant::now() < end && active > 0 {
        tick.tick().await;
        toggles.change(&sim, i % active)?;
        i += 1;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut samples = latency
        .map(|l| l.lock().unwrap_or_else(|p| p.into_inner()).clone())
        .unwrap_or_default();
    samples.sort_unstable();
    report.latency_samples = samples.len();
    report.p50_us = percentile(&samples, 0.50);
    report.p90_us = percentile(&samples, 0.90);
    report.p99_us = percentile(&samples, 0.99);
    report.max_us = samples.last().copied().unwrap_or(0);

    // Phase 3: a resync of the whole book (the gateway drops the connection): the new
    // connection's buffer is sized from the book, so the list fits at once.
    eprintln!(
        "dropping the IB connection: resync of {} positions ...",
        truth.positions.len()
    );
    let reconciled = || metrics::global().reconciliations.load(Relaxed);
    let (r0, c0) = (reconciled(), stats.reconnects.load(Relaxed));
    let t3 = Instant::now();
    sim.drop_connections();
    while reconciled() == r0 {
        if t3.elapsed() > Duration::from_secs(120) {
            return Err(BenchError::Stalled(
                "no resync within 120 s of the dropped connection".into(),
            ));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    report.resync_secs = t3.elapsed().as_secs_f64();
    report.resync_reconnects = stats.reconnects.load(Relaxed) - c0;

    // Phases 4 and 5: executions, live and caught up from the day's list.
    let targets: Vec<(String, i32, f64)> = toggles
        .positions
        .iter()
        .map(|(account, con_id, quantity, _)| (account.clone(), *con_id, quantity.signum()))
        .collect();
    report.exec = exec::run(&sim, &targets, args.executions, args.window, &stats.reconnects).await?;
    report.rss_peak_mib = crate::materialize::bench::process_mem_mib(std::process::id(), "VmHWM:").unwrap_or_default();
    shutdown.cancel();
    match task.await {
        Ok(r) => r?,
        Err(e) => return Err(BenchError::Stalled(format!("ingest task: {e}"))),
    }
    Ok(report)
}
