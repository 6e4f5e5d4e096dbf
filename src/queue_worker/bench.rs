//! `possync bench queue`: how stale the queue gets at desk size.
//!
//! In this process: an embedded broker, the IB simulator with N positions over A accounts and
//! an empty strategy registry (so every position is queued), ingest, the queue worker and the
//! materializer (tables in a temporary directory). Random fills run at a steady rate. Every
//! 250 ms the benchmark reads `position_queue` from Delta; an item enqueued at `enqueued_at`
//! counts as refreshed when the table first shows it `refreshed` (or `closed`) with
//! `last_refreshed_at >= enqueued_at`; its staleness is that observation time minus
//! `enqueued_at` (so it includes the materializer's flush, and up to 250 ms of sampling).
//!
//! The first sweep after start-up refreshes the whole book (every item is pending once): its
//! staleness is reported apart from the steady state. An item re-enqueued before its refresh
//! became visible is measured from its newest enqueue (the table keeps only that), which
//! under-counts slightly at high fill rates.
//!
//! Reported: staleness p50 / p99 / max (start-up sweep, steady state), items refreshed, the
//! worker's IB messages per second and pacing errors (IB error 100) of every client.

use std::collections::HashSet;
use std::fmt;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use deltalake::arrow::array::{Array, AsArray};
use deltalake::arrow::datatypes::{Int64Type, TimestampMicrosecondType};
use tokio_util::sync::CancellationToken;

use crate::events::now_micros;
use crate::kafka::{EmbeddedBroker, KafkaConfig, KafkaError};
use crate::materialize::{read_table, TableKind};
use crate::sim::{SimConfig, SimError};
use crate::{ingest, materialize, metrics, queue_worker};

/// Flags of `possync bench queue`.
#[derive(clap::Args, Debug, Clone)]
pub struct BenchQueueArgs {
    /// Open positions (all queued), spread over the accounts.
    #[arg(long, default_value_t = 10_000, env = "POSSYNC_BENCH_QUEUE_CONTRACTS")]
    pub contracts: usize,
    /// IB accounts.
    #[arg(long, default_value_t = 20, env = "POSSYNC_BENCH_QUEUE_ACCOUNTS")]
    pub accounts: usize,
    /// Random fills per second during the steady phase.
    #[arg(long, default_value_t = 20.0, env = "POSSYNC_BENCH_QUEUE_FILL_RATE")]
    pub fill_rate: f64,
    /// Length of the steady phase (after the start-up sweep is visible).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration, env = "POSSYNC_BENCH_QUEUE_DURATION")]
    pub duration: Duration,
    /// Queue worker tick.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration, env = "POSSYNC_BENCH_QUEUE_TICK")]
    pub tick: Duration,
    /// Accounts polled per tick.
    #[arg(long, default_value_t = 50, env = "POSSYNC_BENCH_QUEUE_BATCH")]
    pub batch: usize,
    /// Materializer flush latency.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration, env = "POSSYNC_BENCH_QUEUE_FLUSH_LATENCY")]
    pub flush_latency: Duration,
    /// Partitions per topic of the embedded broker.
    #[arg(long, default_value_t = 6, env = "POSSYNC_BENCH_QUEUE_PARTITIONS")]
    pub partitions: i32,
}

/// Errors of the benchmark.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error(transparent)]
    Kafka(#[from] KafkaError),
    #[error("simulator: {0}")]
    Sim(#[from] SimError),
    #[error("reading position_queue: {0}")]
    Table(String),
    #[error("benchmark stalled: {0}")]
    Stalled(String),
    #[error("{0} failed: {1}")]
    Task(&'static str, String),
}

/// Staleness figures of one phase, in milliseconds.
#[derive(Debug, Clone, Default)]
pub struct Staleness {
    pub items: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Staleness {
    fn of(mut ms: Vec<f64>) -> Self {
        ms.sort_by(f64::total_cmp);
        let at = |p: f64| {
            ms.get(((ms.len() as f64 - 1.0) * p).round() as usize)
                .copied()
                .unwrap_or(0.0)
        };
        Self {
            items: ms.len(),
            p50_ms: at(0.5),
            p99_ms: at(0.99),
            max_ms: ms.last().copied().unwrap_or(0.0),
        }
    }
}

impl fmt::Display for Staleness {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} items, p50 {:.2} s, p99 {:.2} s, max {:.2} s",
            self.items,
            self.p50_ms / 1e3,
            self.p99_ms / 1e3,
            self.max_ms / 1e3
        )
    }
}

/// The figures.
#[derive(Debug, Clone, Default)]
pub struct BenchQueueReport {
    pub contracts: usize,
    pub accounts: usize,
    pub tick: Duration,
    pub startup: Staleness,
    pub steady: Staleness,
    pub fills: u64,
    pub worker_msgs_per_s: f64,
    pub pacing_errors: u64,
    pub seconds: f64,
}

impl fmt::Display for BenchQueueReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "bench queue: {} queued contracts over {} accounts, tick {:?}, {:.0} s",
            self.contracts, self.accounts, self.tick, self.seconds
        )?;
        writeln!(
            f,
            "  start-up sweep staleness (enqueue -> POLL visible in Delta): {}",
            self.startup
        )?;
        writeln!(
            f,
            "  steady staleness ({} fills):                              {}",
            self.fills, self.steady
        )?;
        write!(
            f,
            "  queue worker IB messages: {:.1}/s; IB pacing errors (error 100), all clients: {}",
            self.worker_msgs_per_s, self.pacing_errors
        )
    }
}

const WORKER: i32 = 102;
const INGEST: i32 = 101;

/// Runs the benchmark.
///
/// # Errors
/// [`BenchError`] when a component fails or nothing is refreshed for a minute.
pub async fn run(args: BenchQueueArgs) -> Result<BenchQueueReport, BenchError> {
    let dir = std::env::temp_dir().join(format!("possync-bench-queue-{}", crate::events::new_id()));
    let tables = dir.join("tables").to_string_lossy().into_owned();
    let broker = EmbeddedBroker::start(1)?;
    let kafka = KafkaConfig::new(broker.bootstrap());
    broker.create_topics(&kafka.topics, args.partitions)?;
    // Enough option contracts for every account to hold its share without repeats.
    let per_account = args.contracts.div_ceil(args.accounts.max(1));
    let strikes = (per_account / (5 * 2 * 6) + 10).max(10);
    let mut sim = crate::sim::start(SimConfig {
        listen: ([127, 0, 0, 1], 0).into(),
        accounts: args.accounts.max(1),
        initial_positions: args.contracts,
        expiries: 6,
        strikes,
        fill_rate: 0.0,
        ..SimConfig::default()
    })
    .await?;
    let contracts = sim.truth().positions.len();
    eprintln!(
        "bench queue: simulator holds {contracts} positions over {} accounts; starting ingest, queue worker, materialize",
        args.accounts
    );

    let stop = CancellationToken::new();
    let mut tasks = tokio::task::JoinSet::new();
    let ingest_cfg = ingest::IngestConfig {
        ib_host: sim.addr().ip().to_string(),
        ib_port: sim.addr().port(),
        client_id: INGEST,
        ..ingest::IngestConfig::default()
    };
    let (k, t) = (kafka.clone(), stop.clone());
    tasks.spawn(async move { ("ingest", ingest::run(ingest_cfg, k, t).await.map_err(|e| e.to_string())) });
    let qw_cfg = queue_worker::QueueWorkerConfig {
        ib_host: sim.addr().ip().to_string(),
        ib_port: sim.addr().port(),
        client_id: WORKER,
        tick: args.tick,
        batch: args.batch,
        ..queue_worker::QueueWorkerConfig::default()
    };
    let (k, t) = (kafka.clone(), stop.clone());
    tasks.spawn(async move {
        (
            "queue-worker",
            queue_worker::run(qw_cfg, k, t).await.map_err(|e| e.to_string()),
        )
    });
    let mat_cfg = materialize::MaterializeConfig {
        table_uri: tables.clone(),
        flush_latency: args.flush_latency,
        offsets_namespace: Some(format!("bench-{}", crate::events::new_id())),
        ..materialize::MaterializeConfig::default()
    };
    let (k, t) = (kafka.clone(), stop.clone());
    tasks.spawn(async move {
        (
            "materialize",
            materialize::run(mat_cfg, k, t).await.map_err(|e| e.to_string()),
        )
    });

    let started = Instant::now();
    let result = measure(&args, &sim, &tables, contracts, &mut tasks).await;
    let worker_msgs = sim.truth().client(WORKER).map_or(0, |c| c.msgs_total);
    let pacing_errors = sim.truth().clients.iter().map(|c| c.pacing_violations).sum();
    stop.cancel();
    while tasks.join_next().await.is_some() {}
    let _ = sim.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
    let (startup, steady, fills) = result?;
    let seconds = started.elapsed().as_secs_f64();
    Ok(BenchQueueReport {
        contracts,
        accounts: args.accounts,
        tick: args.tick,
        startup,
        steady,
        fills,
        worker_msgs_per_s: worker_msgs as f64 / seconds,
        pacing_errors,
        seconds,
    })
}

type Tasks = tokio::task::JoinSet<(&'static str, Result<(), String>)>;

/// Samples `position_queue` until the start-up sweep is visible, then through the steady phase
/// with fills.
async fn measure(
    args: &BenchQueueArgs,
    sim: &crate::sim::SimHandle,
    tables: &str,
    contracts: usize,
    tasks: &mut Tasks,
) -> Result<(Staleness, Staleness, u64), BenchError> {
    let mut seen: HashSet<(String, i64, i64)> = HashSet::new();
    let (mut startup, mut steady) = (Vec::new(), Vec::new());
    let mut sample = tokio::time::interval(Duration::from_millis(250));
    let mut fill = tokio::time::interval(Duration::from_secs_f64(1.0 / args.fill_rate.max(0.01)));
    let (mut fills, mut steady_until) = (0u64, None::<Instant>);
    let mut progress = (0usize, Instant::now());
    loop {
        tokio::select! {
            done = tasks.join_next() => {
                if let Some(Ok((name, Err(e)))) = done {
                    return Err(BenchError::Task(name, e));
                }
                return Err(BenchError::Stalled("a pipeline task stopped early".into()));
            }
            _ = fill.tick(), if steady_until.is_some() && args.fill_rate > 0.0 => {
                if sim.random_fill().is_some() {
                    fills += 1;
                }
            }
            _ = sample.tick() => {
                let now = now_micros();
                let refreshed = refreshed_items(tables).await?;
                for (key, enqueued_at) in refreshed {
                    if seen.insert((key.0, key.1, enqueued_at)) {
                        let ms = (now - enqueued_at) as f64 / 1e3;
                        if steady_until.is_some() { steady.push(ms) } else { startup.push(ms) }
                    }
                }
                if steady_until.is_none() && startup.len() >= contracts {
                    eprintln!("bench queue: start-up sweep visible for all {contracts} items; steady phase for {:?}", args.duration);
                    steady_until = Some(Instant::now() + args.duration);
                }
                if steady_until.is_some_and(|t| Instant::now() >= t) {
                    return Ok((Staleness::of(startup), Staleness::of(steady), fills));
                }
                let n = startup.len() + steady.len();
                if n != progress.0 {
                    progress = (n, Instant::now());
                } else if progress.1.elapsed() > Duration::from_secs(60) {
                    return Err(BenchError::Stalled(format!(
                        "{} of {contracts} start-up items refreshed, nothing new for 60 s (published {})",
                        startup.len(),
                        metrics::global().published_queued.load(Relaxed)
                    )));
                }
            }
        }
    }
}

/// `((account, con_id), enqueued_at)` of every item the table shows refreshed (or closed by a
/// poll) since its last enqueue.
async fn refreshed_items(tables: &str) -> Result<Vec<((String, i64), i64)>, BenchError> {
    let batches = read_table(tables, TableKind::PositionQueue)
        .await
        .map_err(|e| BenchError::Table(e.to_string()))?;
    let mut out = Vec::new();
    for b in &batches {
        let col = |n: &str| {
            b.column_by_name(n)
                .ok_or_else(|| BenchError::Table(format!("no column {n}")))
        };
        let account = col("account")?.as_string::<i32>();
        let con_id = col("con_id")?.as_primitive::<Int64Type>();
        let status = col("status")?.as_string::<i32>();
        let enq = col("enqueued_at")?.as_primitive::<TimestampMicrosecondType>();
        let refreshed = col("last_refreshed_at")?.as_primitive::<TimestampMicrosecondType>();
        for i in 0..b.num_rows() {
            let polled = matches!(status.value(i), "refreshed" | "closed") && !refreshed.is_null(i) && !enq.is_null(i);
            if polled && refreshed.value(i) >= enq.value(i) {
                out.push(((account.value(i).to_string(), con_id.value(i)), enq.value(i)));
            }
        }
    }
    Ok(out)
}
