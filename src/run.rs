//! `possync run`: the whole pipeline in one process on the embedded default.
//!
//! IB simulator + embedded Kafka-protocol broker (librdkafka's mock cluster, on loopback TCP) +
//! ingest + queue worker + materialize (+ the reconciliation of positions against fills),
//! writing Delta tables under `<data-dir>/tables`. It
//! seeds a demo strategy registry from the simulator's book (a few more active contracts than
//! the slot budget, so overflow shows), prints where to attach other clients, shows live
//! progress, and stops cleanly on Ctrl-C or after `--duration`.
//!
//! Shutdown order matters for exactness: the simulated fills stop first, then ingest and the
//! queue worker finish and flush their producers, then the materializer is given time to catch
//! up with everything published before it flushes, commits and stops.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio::time::{interval, sleep, timeout, Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use crate::events::{RegistryAction, RegistryEvent};
use crate::kafka::{EmbeddedBroker, KafkaConfig, KafkaError};
use crate::reconcile::model::Status;
use crate::{ingest, materialize, metrics, queue_worker, reconcile, registry, sim};

/// Prints a line to stdout; a closed stdout (a pipe whose reader left) is not worth a panic.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

/// Errors of `possync run`.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The embedded broker could not start or create topics.
    #[error(transparent)]
    Kafka(#[from] KafkaError),
    /// The simulator could not start (port taken?).
    #[error("IB simulator: {0}; pick another --sim-listen (port 0 = any free port)")]
    Sim(#[from] sim::SimError),
    /// Seeding the demo registry failed.
    #[error("seeding the demo registry: {0}")]
    Registry(#[from] registry::RegistryError),
    /// The data directory cannot be created.
    #[error("cannot create data directory {path}: {source}")]
    DataDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A pipeline task failed; the others were stopped.
    #[error("{task} failed: {message}")]
    Task { task: &'static str, message: String },
    /// The metrics endpoint could not start.
    #[error(transparent)]
    Metrics(#[from] metrics::MetricsError),
}

/// Flags of `possync run`.
#[derive(clap::Args, Debug, Clone)]
pub struct RunArgs {
    /// Data directory: Delta tables go to `<data-dir>/tables`, the simulator's ground truth to
    /// `<data-dir>/sim-truth.json`. Reusing it across runs is safe.
    #[arg(long, env = "POSSYNC_DATA_DIR", default_value = "./possync-data")]
    pub data_dir: PathBuf,
    /// Stop after this long (`30s`, `5m`, …); default: run until Ctrl-C / SIGTERM.
    #[arg(long, env = "POSSYNC_DURATION")]
    pub duration: Option<humantime::Duration>,
    /// Do not run the materializer in-process: attach a separate `possync materialize
    /// --brokers <printed address>` instead.
    #[arg(long, env = "POSSYNC_NO_MATERIALIZE")]
    pub no_materialize: bool,
    /// Where the IB simulator listens (port 0 = any free port; the chosen one is printed).
    #[arg(long, env = "POSSYNC_SIM_LISTEN", default_value = "127.0.0.1:4002")]
    pub sim_listen: SocketAddr,
    /// Seed of the simulated world (same seed, same accounts, contracts and fills).
    #[arg(long, env = "POSSYNC_SIM_SEED", default_value_t = 7)]
    pub seed: u64,
    /// Simulated fills per second (positions opened, changed and closed).
    #[arg(long, env = "POSSYNC_FILL_RATE", default_value_t = 2.0)]
    pub fill_rate: f64,
    /// Brokers in the embedded Kafka cluster.
    #[arg(long, env = "POSSYNC_EMBEDDED_BROKERS", default_value_t = 1)]
    pub embedded_brokers: i32,
    /// Partitions per topic on the embedded broker.
    #[arg(long, env = "POSSYNC_PARTITIONS", default_value_t = 4)]
    pub partitions: i32,
    /// Real-time streaming slots ingest may hold (hard budget).
    #[arg(long, env = "POSSYNC_SLOT_BUDGET", default_value_t = 10)]
    pub slot_budget: usize,
    /// Registry entries the demo seeds from the simulator's book (more than the slot budget
    /// shows overflow handling; 0 = seed nothing).
    #[arg(long, env = "POSSYNC_DEMO_ACTIVE", default_value_t = 12)]
    pub demo_active: usize,
    /// Queue-worker tick.
    #[arg(long, env = "POSSYNC_QUEUE_TICK", default_value = "5s")]
    pub queue_tick: humantime::Duration,
    /// Most accounts the queue worker polls per tick (each poll refreshes every pending item of its account).
    #[arg(long, env = "POSSYNC_QUEUE_BATCH", default_value_t = 50)]
    pub queue_batch: usize,
    /// Materializer flush latency.
    #[arg(long, env = "POSSYNC_FLUSH_LATENCY", default_value = "1s")]
    pub flush_latency: humantime::Duration,
    /// How often the progress line is printed.
    #[arg(long, env = "POSSYNC_PROGRESS_EVERY", default_value = "2s")]
    pub progress_every: humantime::Duration,
    /// Serve Prometheus metrics on this address (e.g. 127.0.0.1:9464); off by default.
    #[arg(long, env = "POSSYNC_METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,
}

/// Plain settings of `possync run` (tests build them without clap).
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// See [`RunArgs::data_dir`].
    pub data_dir: PathBuf,
    /// See [`RunArgs::duration`].
    pub duration: Option<Duration>,
    /// See [`RunArgs::no_materialize`].
    pub materialize: bool,
    /// See [`RunArgs::sim_listen`].
    pub sim_listen: SocketAddr,
    /// See [`RunArgs::seed`].
    pub seed: u64,
    /// See [`RunArgs::fill_rate`].
    pub fill_rate: f64,
    /// See [`RunArgs::embedded_brokers`].
    pub embedded_brokers: i32,
    /// See [`RunArgs::partitions`].
    pub partitions: i32,
    /// See [`RunArgs::slot_budget`].
    pub slot_budget: usize,
    /// See [`RunArgs::demo_active`].
    pub demo_active: usize,
    /// See [`RunArgs::queue_tick`].
    pub queue_tick: Duration,
    /// See [`RunArgs::queue_batch`].
    pub queue_batch: usize,
    /// See [`RunArgs::flush_latency`].
    pub flush_latency: Duration,
    /// See [`RunArgs::progress_every`].
    pub progress_every: Duration,
    /// See [`RunArgs::metrics_addr`].
    pub metrics_addr: Option<SocketAddr>,
}

impl Default for RunConfig {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("./possync-data"),
            duration: None,
            materialize: true,
            sim_listen: SocketAddr::from(([127, 0, 0, 1], 4002)),
            seed: 7,
            fill_rate: 2.0,
            embedded_brokers: 1,
            partitions: 4,
            slot_budget: 10,
            demo_active: 12,
            queue_tick: Duration::from_secs(5),
            queue_batch: 50,
            flush_latency: Duration::from_secs(1),
            progress_every: Duration::from_secs(2),
            metrics_addr: None,
        }
    }
}

impl From<RunArgs> for RunConfig {
    fn from(a: RunArgs) -> Self {
        Self {
            data_dir: a.data_dir,
            duration: a.duration.map(Into::into),
            materialize: !a.no_materialize,
            sim_listen: a.sim_listen,
            seed: a.seed,
            fill_rate: a.fill_rate,
            embedded_brokers: a.embedded_brokers.max(1),
            partitions: a.partitions.max(1),
            slot_budget: a.slot_budget,
            demo_active: a.demo_active,
            queue_tick: a.queue_tick.into(),
            queue_batch: a.queue_batch.max(1),
            flush_latency: a.flush_latency.into(),
            progress_every: a.progress_every.into(),
            metrics_addr: a.metrics_addr,
        }
    }
}

/// Client id of the embedded run's ingest; the simulator's master API client id.
pub const INGEST_CLIENT_ID: i32 = 101;
/// Client id of the embedded run's queue worker.
pub const QUEUE_WORKER_CLIENT_ID: i32 = 102;

/// What a finished run leaves behind, for the user's summary and for tests.
#[derive(Debug, Clone)]
pub struct RunReport {
    /// Where the tables are.
    pub table_uri: String,
    /// The simulator's ground truth when the pipeline stopped.
    pub truth: sim::Truth,
    /// The registry entries the demo seeded.
    pub seeded: Vec<RegistryEvent>,
    /// Whether the materializer caught up with everything published before it stopped.
    pub caught_up: bool,
}

/// Runs the embedded pipeline until `shutdown` is cancelled or the duration elapses.
///
/// # Errors
/// [`RunError`] when a component cannot start or a pipeline task fails (the others are
/// stopped cleanly first).
pub async fn run(cfg: RunConfig, shutdown: CancellationToken) -> Result<RunReport, RunError> {
    std::fs::create_dir_all(&cfg.data_dir).map_err(|source| RunError::DataDir {
        path: cfg.data_dir.clone(),
        source,
    })?;
    let table_uri = cfg.data_dir.join("tables").to_string_lossy().into_owned();
    let m = metrics::global();
    m.slot_budget.store(cfg.slot_budget as i64, Relaxed);

    let broker = EmbeddedBroker::start(cfg.embedded_brokers)?;
    let kafka = KafkaConfig::new(broker.bootstrap());
    // The mock cluster's id is derived from a heap address, so two embedded brokers (two runs in
    // one process, or by chance in two processes) can share it while both start at offset 0.
    // A fresh namespace per broker keeps the offsets stored in the Delta log apart; the
    // materializer is told the change from the previous run's namespace is meant.
    let namespace = format!("embedded-{}", crate::events::new_id());
    broker.create_topics(&kafka.topics, cfg.partitions)?;

    // Fills are driven from here (not by the simulator's own timer) so shutdown can stop them
    // first and the tables end equal to the simulator's truth.
    // Ingest is the master API client: it gets every execution live (the queue worker's
    // client sees none), and every one of the day from reqExecutions.
    let sim_cfg = sim::SimConfig {
        listen: cfg.sim_listen,
        seed: cfg.seed,
        fill_rate: 0.0,
        master_client_id: Some(INGEST_CLIENT_ID),
        truth_file: Some(cfg.data_dir.join("sim-truth.json")),
        ..sim::SimConfig::default()
    };
    // Read the previous run's book before the new simulator overwrites the file.
    let saved = load_truth(&cfg.data_dir.join("sim-truth.json"));
    let mut sim = sim::start(sim_cfg).await?;
    sim.roll_trading_day_at_midnight();
    let restored = saved.map(|t| restore_book(&sim, &t));
    let metrics_addr = match cfg.metrics_addr {
        Some(a) => Some(metrics::serve(a, shutdown.child_token()).await?),
        None => None,
    };

    say!("possync run: embedded pipeline");
    say!(
        "  kafka bootstrap : {}   (topics: {})",
        broker.bootstrap(),
        kafka.topics.all().join(", ")
    );
    say!(
        "  IB simulator    : {}   (any ibapi client can connect; client ids 1-99 are free)",
        sim.addr()
    );
    say!("  delta tables    : {table_uri}");
    if let Some(a) = metrics_addr {
        say!("  metrics         : http://{a}/metrics");
    }
    if !cfg.materialize {
        say!(
            "  materializer    : off; attach one with: possync materialize --brokers {} --table-uri {table_uri} --offsets-namespace {namespace} --allow-namespace-change",
            broker.bootstrap()
        );
    }

    if let Some(n) = restored {
        say!("  IB book         : {n} positions restored from the previous run (an IB account keeps its positions)");
    }
    let seeded = seed_registry(&kafka, &sim, cfg.demo_active).await?;
    say!(
        "  registry        : {} demo entries, slot budget {}",
        seeded.len(),
        cfg.slot_budget
    );

    let result = pipeline(&cfg, &kafka, &sim, &table_uri, &namespace, &shutdown).await;
    let truth = sim.truth();
    if let Err(e) = sim.shutdown().await {
        tracing::warn!(error = %e, "simulator shutdown");
    }
    drop(broker);
    let caught_up = result?;
    say!("possync run: stopped. {}", m.progress_line());
    Ok(RunReport {
        table_uri,
        truth,
        seeded,
        caught_up,
    })
}

/// The previous run's simulator truth file, if there is a readable one.
fn load_truth(path: &std::path::Path) -> Option<sim::Truth> {
    let text = std::fs::read_to_string(path).ok()?;
    serde_json::from_str(&text)
        .map_err(|e| tracing::warn!(path = %path.display(), error = %e, "ignoring unreadable simulator truth file"))
        .ok()
}

/// Restores the simulated account's positions from the previous run's truth, so that positions
/// (and `positions_current`) carry over between runs on the same data directory the way a real
/// IB account's do. Returns how many positions were restored.
fn restore_book(sim: &sim::SimHandle, saved: &sim::Truth) -> usize {
    for p in sim.truth().positions {
        if saved.position(&p.account, p.contract.con_id).is_none() {
            let _ = sim.set_position(&p.account, p.contract.con_id, 0.0, 0.0);
        }
    }
    let mut restored = 0;
    for p in &saved.positions {
        match sim.set_position(&p.account, p.contract.con_id, p.quantity, p.avg_cost) {
            Ok(_) => restored += 1,
            Err(e) => {
                tracing::warn!(account = %p.account, con_id = p.contract.con_id, error = %e, "cannot restore position")
            }
        }
    }
    restored
}

/// Seeds `n` registry entries from the simulator's open positions: a few strategies, mixed
/// priorities, some covering every account.
async fn seed_registry(kafka: &KafkaConfig, sim: &sim::SimHandle, n: usize) -> Result<Vec<RegistryEvent>, RunError> {
    let strategies = ["wheel", "iron-condor", "hedge"];
    let events: Vec<RegistryEvent> = sim
        .truth()
        .positions
        .iter()
        .filter(|p| p.contract.sec_type == "OPT")
        .take(n)
        .enumerate()
        .map(|(i, p)| {
            let account = (i % 4 != 3).then_some(p.account.as_str());
            registry::event(
                strategies[i % strategies.len()],
                account,
                i64::from(p.contract.con_id),
                RegistryAction::Activate,
                (i % 5) as i32,
                "possync-run-demo",
            )
        })
        .collect();
    registry::commands::publish(kafka, &events).await?;
    Ok(events)
}

/// The embedded run's reconciliation: every 10 s (a demo's changes show quickly).
fn reconcile_config(table_uri: &str) -> reconcile::ReconcileConfig {
    reconcile::ReconcileConfig {
        table_uri: table_uri.to_string(),
        every: Duration::from_secs(10),
        ..reconcile::ReconcileConfig::default()
    }
}

async fn pipeline(
    cfg: &RunConfig,
    kafka: &KafkaConfig,
    sim: &sim::SimHandle,
    table_uri: &str,
    namespace: &str,
    shutdown: &CancellationToken,
) -> Result<bool, RunError> {
    let producers = CancellationToken::new();
    let consumers = CancellationToken::new();
    let mut tasks: JoinSet<(&'static str, Result<(), String>)> = JoinSet::new();

    // Fenced by the ingest lease like a standalone ingest: the embedded broker has a group
    // coordinator, so a `possync ingest` attached to it stands by while this one runs.
    // Both start from the tables (the previous run's rows; this broker's offsets once the
    // materializer has committed some), so a position closed between two runs gets its
    // RECONCILE close although the new embedded broker starts empty.
    let snapshot = crate::snapshot::SnapshotConfig {
        table_uri: table_uri.to_string(),
        namespace: Some(namespace.to_string()),
    };
    let ingest_cfg = ingest::IngestConfig {
        ib_host: sim.addr().ip().to_string(),
        ib_port: sim.addr().port(),
        client_id: INGEST_CLIENT_ID,
        slot_budget: cfg.slot_budget,
        snapshot: Some(snapshot.clone()),
        ..ingest::IngestConfig::default()
    };
    let (k, t) = (kafka.clone(), producers.clone());
    tasks.spawn(async move { ("ingest", ingest::run(ingest_cfg, k, t).await.map_err(|e| e.to_string())) });

    let qw_cfg = queue_worker::QueueWorkerConfig {
        ib_host: sim.addr().ip().to_string(),
        ib_port: sim.addr().port(),
        client_id: QUEUE_WORKER_CLIENT_ID,
        tick: cfg.queue_tick,
        batch: cfg.queue_batch,
        snapshot: Some(snapshot),
        ..queue_worker::QueueWorkerConfig::default()
    };
    let (k, t) = (kafka.clone(), producers.clone());
    tasks.spawn(async move {
        (
            "queue-worker",
            queue_worker::run(qw_cfg, k, t).await.map_err(|e| e.to_string()),
        )
    });

    if cfg.materialize {
        let mat_cfg = materialize::MaterializeConfig {
            table_uri: table_uri.to_string(),
            flush_latency: cfg.flush_latency,
            offsets_namespace: Some(namespace.to_string()),
            // Every run's embedded broker is a new cluster whose offsets start at 0 again: its
            // fresh namespace must replace the previous run's (the rows stay apart by their
            // `kafka_namespace`).
            allow_namespace_change: true,
            // The simulator stamps real time: closed positions leave after `possync
            // materialize`'s default.
            closed_retention: Some(materialize::config::DEFAULT_CLOSED_RETENTION),
            state_dir: cfg.data_dir.join("state"),
            ..materialize::MaterializeConfig::default()
        };
        let (k, t) = (kafka.clone(), consumers.clone());
        tasks.spawn(async move {
            (
                "materialize",
                materialize::run(mat_cfg, k, t).await.map_err(|e| e.to_string()),
            )
        });
        // Positions reconciled against fills, as `possync reconcile --watch` does.
        let rec_cfg = reconcile_config(table_uri);
        let t = consumers.clone();
        tasks.spawn(async move {
            (
                "reconcile",
                reconcile::watch(rec_cfg, t).await.map_err(|e| e.to_string()),
            )
        });
    }
    // The tasks that stop with `consumers`.
    let consuming = if cfg.materialize { 2 } else { 0 };

    let m = metrics::global();
    let mut progress = interval(cfg.progress_every);
    progress.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let mut fills = interval(Duration::from_secs_f64(1.0 / cfg.fill_rate.max(0.001)));
    fills.set_missed_tick_behavior(MissedTickBehavior::Skip);
    // Fills start once ingest has reconciled its first position list with what it last
    // published (the previous run's tables): a fill before would be part of that list, not a
    // change of its own.
    let published = || m.published_active.load(Relaxed) + m.published_queued.load(Relaxed);
    let reconciled = || m.reconciliations.load(Relaxed);
    let before = reconciled();
    let mut trading = false;
    let mut ready_check = interval(Duration::from_millis(100));
    let until = cfg.duration.map(|d| Instant::now() + d);
    let mut failure: Option<RunError> = None;
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            _ = sleep_until_opt(until) => break,
            done = tasks.join_next() => {
                if let Some(done) = done {
                    failure = Some(task_failure(done));
                }
                break;
            }
            _ = ready_check.tick(), if !trading => {
                trading = reconciled() > before;
                if trading {
                    fills.reset();
                }
            }
            _ = fills.tick(), if trading && cfg.fill_rate > 0.0 => { sim.random_fill(); }
            _ = progress.tick() => say!("{}", m.progress_line()),
        }
    }

    // 1. fills already stopped (the loop is gone); let in-flight IB updates reach ingest.
    sleep(Duration::from_millis(1500)).await;
    // 2. producers finish and flush.
    producers.cancel();
    let mut caught_up = true;
    let grace = Instant::now() + Duration::from_secs(20);
    while tasks.len() > consuming {
        match timeout(grace.saturating_duration_since(Instant::now()), tasks.join_next()).await {
            Ok(Some(done)) => {
                if let (task, Err(message)) = flatten(done) {
                    if !matches!(task, "materialize" | "reconcile") && failure.is_none() {
                        failure = Some(RunError::Task { task, message });
                    }
                }
            }
            Ok(None) => break,
            Err(_) => {
                tracing::warn!("ingest / queue worker did not stop within 20 s; aborting them");
                break;
            }
        }
    }
    // 3. the materializer catches up with everything acknowledged, then flushes and stops.
    if cfg.materialize {
        let written = || m.materialized_active.load(Relaxed) + m.materialized_queued.load(Relaxed);
        let deadline = Instant::now() + Duration::from_secs(60);
        while written() < published() && Instant::now() < deadline && !tasks.is_empty() {
            sleep(Duration::from_millis(100)).await;
        }
        caught_up = written() >= published();
        if !caught_up {
            tracing::warn!(
                published = published(),
                written = written(),
                "materializer did not catch up within 60 s"
            );
        }
    }
    consumers.cancel();
    let deadline = Instant::now() + Duration::from_secs(30);
    while let Ok(Some(done)) = timeout(deadline.saturating_duration_since(Instant::now()), tasks.join_next()).await {
        if let (task, Err(message)) = flatten(done) {
            if failure.is_none() {
                failure = Some(RunError::Task { task, message });
            }
        }
    }
    tasks.abort_all();
    // A last reconciliation of the final tables (the service's runs are every 10 s).
    if cfg.materialize {
        let mut last = reconcile::Reconciler::new(reconcile_config(table_uri));
        match last.run_once(crate::events::now_micros()).await {
            Ok(r) => say!(
                "  reconciliation  : {} moved today: {} agree, {} explained, {} pending, {} drifted (possync reconcile --table-uri {table_uri})",
                r.lines.len(),
                r.count(Status::Agrees),
                r.count(Status::Explained),
                r.count(Status::Pending),
                r.count(Status::Drifted)
            ),
            Err(e) => tracing::warn!(error = %e, "the last reconciliation failed"),
        }
    }
    match failure {
        Some(e) => Err(e),
        None => Ok(caught_up),
    }
}

type Joined = Result<(&'static str, Result<(), String>), tokio::task::JoinError>;

fn flatten(done: Joined) -> (&'static str, Result<(), String>) {
    done.unwrap_or_else(|e| ("pipeline task", Err(format!("panicked or was aborted: {e}"))))
}

fn task_failure(done: Joined) -> RunError {
    match flatten(done) {
        (task, Err(message)) => RunError::Task { task, message },
        (task, Ok(())) => RunError::Task {
            task,
            message: "stopped unexpectedly".into(),
        },
    }
}

async fn sleep_until_opt(until: Option<Instant>) {
    match until {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}
