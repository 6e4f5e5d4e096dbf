//! `possync bench startup`: start-up time of ingest and the queue worker with weeks of topic
//! history, from the snapshot (`--table-uri`) and by full replay, on a real Kafka cluster.
//!
//! 1. Creates the four topics under a fresh prefix (RF 1) and produces N events spread over
//!    `--days` of `ingest_time` (keys: `--contracts` over `--accounts`, one route per contract,
//!    a tenth active), from two encoding threads.
//! 2. Runs `possync materialize` as a child process until it has committed all of them.
//! 3. Produces a tail of `--tail` events the tables do not hold (a materializer a little
//!    behind, as in production).
//! 4. Times [`Ingest::start`] (registry, last published state, producer: everything before it
//!    connects to IB) and [`queue_worker::start::load`] (the queue state), each from the
//!    snapshot and by full replay, and prints the figures.
//! 5. Deletes its topics and tables (unless `--keep`).

use std::io::Write as _;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::ClientContext;
use tokio_util::sync::CancellationToken;

use crate::events::{new_id, now_micros, PositionEvent, Route, Source};
use crate::ingest::{Ingest, IngestConfig};
use crate::kafka::{KafkaArgs, KafkaConfig, KafkaError, Topics};
use crate::queue_worker;
use crate::snapshot::SnapshotConfig;

/// Flags of `possync bench startup`.
#[derive(clap::Args, Debug, Clone)]
pub struct BenchStartupArgs {
    /// Brokers of a real cluster (`scripts/kafka.sh start 1`, then `scripts/kafka.sh
    /// bootstrap`); the topics are created under `<topic-prefix>startup-bench-<id>.`.
    #[command(flatten)]
    pub kafka: KafkaArgs,
    /// Events of history to produce (both position topics).
    #[arg(long, env = "POSSYNC_BENCH_EVENTS", default_value_t = 10_000_000)]
    pub events: u64,
    /// Distinct contracts (keys are contract × its one account).
    #[arg(long, env = "POSSYNC_BENCH_CONTRACTS", default_value_t = 100_000)]
    pub contracts: u64,
    /// Accounts the contracts are spread over.
    #[arg(long, env = "POSSYNC_BENCH_ACCOUNTS", default_value_t = 20)]
    pub accounts: u64,
    /// Days of history the events' `ingest_time` spans.
    #[arg(long, env = "POSSYNC_BENCH_DAYS", default_value_t = 30)]
    pub days: u64,
    /// Partitions of each topic.
    #[arg(long, env = "POSSYNC_BENCH_PARTITIONS", default_value_t = 6)]
    pub partitions: i32,
    /// Events produced after the materializer stopped (the tail a start-up must read).
    #[arg(long, env = "POSSYNC_BENCH_TAIL", default_value_t = 20_000)]
    pub tail: u64,
    /// Where to put the tables (default: a fresh directory under the temp dir).
    #[arg(long, env = "POSSYNC_BENCH_TABLE_URI")]
    pub table_uri: Option<String>,
    /// How long a full replay may take before it counts as failed.
    #[arg(long, env = "POSSYNC_BENCH_REPLAY_TIMEOUT", value_parser = humantime::parse_duration, default_value = "30m")]
    pub replay_timeout: Duration,
    /// Keep the topics and tables afterwards.
    #[arg(long, env = "POSSYNC_BENCH_KEEP")]
    pub keep: bool,
}

/// Errors of the benchmark.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error(transparent)]
    Kafka(#[from] KafkaError),
    #[error(transparent)]
    Topics(#[from] crate::topics::TopicsError),
    #[error(transparent)]
    Ingest(Box<crate::ingest::IngestError>),
    #[error(transparent)]
    Queue(Box<queue_worker::QueueWorkerError>),
    #[error(transparent)]
    Materialize(Box<crate::materialize::MaterializeError>),
    #[error("{0}")]
    Failed(String),
}

impl From<crate::ingest::IngestError> for BenchError {
    fn from(e: crate::ingest::IngestError) -> Self {
        Self::Ingest(Box::new(e))
    }
}

impl From<queue_worker::QueueWorkerError> for BenchError {
    fn from(e: queue_worker::QueueWorkerError) -> Self {
        Self::Queue(Box::new(e))
    }
}

impl From<crate::materialize::MaterializeError> for BenchError {
    fn from(e: crate::materialize::MaterializeError) -> Self {
        Self::Materialize(Box::new(e))
    }
}

/// One start-up measured.
#[derive(Debug, Clone, Default)]
pub struct Startup {
    pub seconds: f64,
    /// Open positions (ingest) or pending items (queue worker) found.
    pub state: usize,
}

/// The figures.
#[derive(Debug, Clone, Default)]
pub struct BenchReport {
    pub events: u64,
    pub tail: u64,
    pub bytes: u64,
    pub produce_s: f64,
    pub materialize_s: f64,
    pub ingest_snapshot: Startup,
    pub ingest_replay: Startup,
    pub queue_snapshot: Startup,
    pub queue_replay: Startup,
}

impl std::fmt::Display for BenchReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "start-up benchmark: {} events of history ({:.0} MB of values) + a tail of {} not materialized",
            self.events,
            self.bytes as f64 / 1e6,
            self.tail
        )?;
        writeln!(
            f,
            "  produced in {:.1} s, materialized in {:.1} s",
            self.produce_s, self.materialize_s
        )?;
        let line = |f: &mut std::fmt::Formatter<'_>, what: &str, s: &Startup, r: &Startup, unit: &str| {
            writeln!(
                f,
                "  {what:<13} from the snapshot {:>7.2} s ({} {unit}) | full replay {:>7.2} s ({} {unit}) | {:.0}x",
                s.seconds,
                s.state,
                r.seconds,
                r.state,
                r.seconds / s.seconds.max(1e-9)
            )
        };
        line(f, "ingest", &self.ingest_snapshot, &self.ingest_replay, "open")?;
        line(f, "queue-worker", &self.queue_snapshot, &self.queue_replay, "pending")
    }
}

struct Deliveries(Arc<AtomicU64>);

impl ClientContext for Deliveries {}

impl ProducerContext for Deliveries {
    type DeliveryOpaque = ();
    fn delivery(&self, r: &DeliveryResult<'_>, _: ()) {
        if r.is_err() {
            self.0.fetch_add(1, Relaxed);
        }
    }
}

/// Event `i` of `total`: contract `i % contracts`, times spread evenly over `span_us` ending now.
fn event(args: &BenchStartupArgs, i: u64, total: u64, t0: i64, span_us: i64) -> PositionEvent {
    let k = (i.wrapping_mul(2_654_435_761)) % args.contracts.max(1);
    let route = if k.is_multiple_of(10) {
        Route::Active
    } else {
        Route::Queued
    };
    let mut e = crate::materialize::bench::synthetic_event(i, k, route, "startup-bench");
    e.account = format!("DU{:07}", k % args.accounts.max(1));
    e.con_id = 1_000_000 + k as i64;
    e.source = match (route, i % 4) {
        (Route::Active, 0) => Source::Stream,
        (Route::Active, _) => Source::Pnl,
        (Route::Queued, 0 | 1) => Source::Stream,
        (Route::Queued, _) => Source::Poll,
    };
    e.ingest_time = t0 + (span_us as f64 * i as f64 / total as f64) as i64;
    e.ib_time = e.ingest_time;
    e
}

/// Produces events `from..to` from two threads; returns the bytes of values.
fn produce(
    args: &BenchStartupArgs,
    kafka: &KafkaConfig,
    from: u64,
    to: u64,
    total: u64,
    t0: i64,
) -> Result<u64, BenchError> {
    let failed = Arc::new(AtomicU64::new(0));
    let mut cfg = kafka.producer();
    cfg.set("linger.ms", "20").set("batch.num.messages", "10000");
    let producer: ThreadedProducer<Deliveries> = cfg
        .create_with_context(Deliveries(failed.clone()))
        .map_err(KafkaError::client("create producer"))?;
    let span = (args.days * 86_400) as i64 * 1_000_000;
    let bytes = AtomicU64::new(0);
    std::thread::scope(|s| {
        for t in 0..2u64 {
            let (producer, bytes) = (&producer, &bytes);
            s.spawn(move || {
                let mut i = from + t;
                while i < to {
                    let e = event(args, i, total, t0, span);
                    let topic = if e.route == Route::Active {
                        &kafka.topics.active
                    } else {
                        &kafka.topics.queued
                    };
                    let (key, value) = (e.key(), e.encode().expect("synthetic events encode"));
                    bytes.fetch_add(value.len() as u64, Relaxed);
                    let mut record = BaseRecord::to(topic).key(&key).payload(&value);
                    loop {
                        match producer.send(record) {
                            Ok(()) => break,
                            Err((_, r)) => {
                                record = r;
                                std::thread::sleep(Duration::from_millis(2));
                            }
                        }
                    }
                    if (i - from) % 1_000_000 < 2 && i > from + 1 {
                        eprintln!("  produced {} events", i - from);
                    }
                    i += 2;
                }
            });
        }
    });
    producer
        .flush(Duration::from_secs(300))
        .map_err(KafkaError::client("flush producer"))?;
    match failed.load(Relaxed) {
        0 => Ok(bytes.load(Relaxed)),
        n => Err(BenchError::Failed(format!("{n} events were not acknowledged"))),
    }
}

/// Runs `possync materialize` until the tables hold every offset produced so far.
async fn materialize(
    args: &BenchStartupArgs,
    kafka: &KafkaConfig,
    table_uri: &str,
    dir: &std::path::Path,
) -> Result<(), BenchError> {
    let exe = std::env::current_exe().map_err(|e| BenchError::Failed(format!("own executable: {e}")))?;
    let log = std::fs::File::create(dir.join("materialize.log")).map_err(|e| BenchError::Failed(e.to_string()))?;
    let mut child = Command::new(exe)
        .args(["materialize", "--brokers", &kafka.brokers, "--topic-prefix"])
        .arg(kafka.topics.prefix())
        .args(["--table-uri", table_uri, "--group"])
        .arg(format!("{}materialize", kafka.topics.prefix()))
        .env("POSSYNC_LOG", "warn")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .map_err(|e| BenchError::Failed(format!("spawn materialize: {e}")))?;
    let ns = crate::materialize::namespace(kafka, None).await?;
    let total = args.events;
    let started = Instant::now();
    let result = loop {
        tokio::time::sleep(Duration::from_secs(5)).await;
        if let Ok(Some(status)) = child.try_wait() {
            break Err(BenchError::Failed(format!(
                "materialize exited with {status}; see {}",
                dir.join("materialize.log").display()
            )));
        }
        match crate::materialize::lag(table_uri, &ns, kafka).await {
            Ok((0, _)) => break Ok(()),
            Ok((behind, _)) => eprintln!(
                "  materialized {} of {total} events ({:.0} s)",
                total.saturating_sub(behind as u64),
                started.elapsed().as_secs_f64()
            ),
            Err(e) => eprintln!("  (tables not readable yet: {e})"),
        }
        if started.elapsed() > Duration::from_secs(7200) {
            break Err(BenchError::Failed("materialize did not catch up within 2 h".into()));
        }
    };
    // SAFETY: plain kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let _ = child.kill();
    let _ = child.wait();
    result
}

/// Runs the benchmark.
///
/// # Errors
/// Kafka, table or process errors.
pub async fn run(args: BenchStartupArgs) -> Result<BenchReport, BenchError> {
    let mut kafka = KafkaConfig::from_args(&args.kafka)?;
    let id = new_id()[..8].to_string();
    kafka.topics = Topics::new(&format!("{}startup-bench-{id}.", args.kafka.topic_prefix));
    let dir = std::env::temp_dir().join(format!("possync-startup-bench-{id}"));
    std::fs::create_dir_all(&dir).map_err(|e| BenchError::Failed(e.to_string()))?;
    let table_uri = args
        .table_uri
        .clone()
        .unwrap_or_else(|| dir.join("tables").to_string_lossy().into_owned());
    let layout = crate::topics::Layout {
        partitions: args.partitions,
        replication: 1,
        min_insync: 1,
    };
    crate::topics::create(&kafka, &layout, Duration::from_secs(30)).await?;
    eprintln!(
        "topics {}* created; producing {} events ...",
        kafka.topics.prefix(),
        args.events
    );
    let result = measure(&args, &kafka, &table_uri, &dir).await;
    if !args.keep {
        let admin: AdminClient<DefaultClientContext> = kafka
            .admin()
            .create()
            .map_err(KafkaError::client("create admin client"))?;
        let _ = admin.delete_topics(&kafka.topics.every(), &AdminOptions::new()).await;
        let _ = std::fs::remove_dir_all(&dir);
        if args.table_uri.is_some() {
            let _ = std::fs::remove_dir_all(&table_uri);
        }
    } else {
        eprintln!("kept topics {}* and tables {table_uri}", kafka.topics.prefix());
    }
    result
}

async fn measure(
    args: &BenchStartupArgs,
    kafka: &KafkaConfig,
    table_uri: &str,
    dir: &std::path::Path,
) -> Result<BenchReport, BenchError> {
    let total = args.events + args.tail;
    let t0 = now_micros() - (args.days * 86_400) as i64 * 1_000_000;
    let mut report = BenchReport {
        events: args.events,
        tail: args.tail,
        ..Default::default()
    };
    let started = Instant::now();
    let (a, k) = (args.clone(), kafka.clone());
    report.bytes = tokio::task::spawn_blocking(move || produce(&a, &k, 0, a.events, total, t0))
        .await
        .map_err(|e| BenchError::Failed(e.to_string()))??;
    report.produce_s = started.elapsed().as_secs_f64();
    eprintln!("produced in {:.1} s; materializing ...", report.produce_s);
    let started = Instant::now();
    materialize(args, kafka, table_uri, dir).await?;
    report.materialize_s = started.elapsed().as_secs_f64();
    eprintln!("materialized in {:.1} s; producing the tail ...", report.materialize_s);
    let (a, k) = (args.clone(), kafka.clone());
    report.bytes += tokio::task::spawn_blocking(move || produce(&a, &k, a.events, total, total, t0))
        .await
        .map_err(|e| BenchError::Failed(e.to_string()))??;
    let _ = std::io::stderr().flush();

    let snapshot = SnapshotConfig {
        table_uri: table_uri.to_string(),
        namespace: None,
    };
    for snap in [Some(snapshot), None] {
        let how = if snap.is_some() {
            "from the snapshot"
        } else {
            "by full replay"
        };
        eprintln!("timing ingest start-up {how} ...");
        let stop = CancellationToken::new();
        let cfg = IngestConfig {
            kafka_timeout: args.replay_timeout,
            snapshot: snap.clone(),
            ..IngestConfig::default()
        };
        let t = Instant::now();
        let ingest = Ingest::start(cfg, kafka.clone(), stop.clone()).await?;
        let ingest_s = Startup {
            seconds: t.elapsed().as_secs_f64(),
            state: ingest.resumed().0,
        };
        drop(ingest);
        eprintln!("timing queue-worker start-up {how} ...");
        let t = Instant::now();
        let queue = queue_worker::start::load(kafka, args.replay_timeout, snap.as_ref(), &stop)
            .await?
            .ok_or_else(|| BenchError::Failed("stopped".into()))?;
        let queue_s = Startup {
            seconds: t.elapsed().as_secs_f64(),
            state: queue.queue.pending(),
        };
        stop.cancel();
        if snap.is_some() {
            (report.ingest_snapshot, report.queue_snapshot) = (ingest_s, queue_s);
        } else {
            (report.ingest_replay, report.queue_replay) = (ingest_s, queue_s);
        }
    }
    Ok(report)
}
