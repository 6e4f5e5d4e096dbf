//! Shared helpers of the ingest and queue-worker tests: an embedded broker with per-test
//! topics, the simulator, a background collector of every position event, and deadline waits.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context};
use possync::events::{PositionEvent, Route, Source};
use possync::ingest::{IngestConfig, IngestStats};
use possync::kafka::{EmbeddedBroker, KafkaConfig, Topics};
use possync::registry::TopicReplay;
use possync::sim::{SimConfig, SimHandle, TruthPosition};
use rdkafka::Message;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Generous bound for anything that should happen within a few seconds on an idle machine
/// (tests share 2 cores with builds).
pub const DEADLINE: Duration = Duration::from_secs(60);

/// Broker + simulator + topics for one test.
pub struct Env {
    pub broker: EmbeddedBroker,
    pub kafka: KafkaConfig,
    pub sim: SimHandle,
    pub shutdown: CancellationToken,
}

/// A quiet simulated world (no random fills, frozen prices, PnL ticks every 200 ms).
pub fn quiet_sim() -> SimConfig {
    SimConfig {
        price_tick: Duration::from_millis(100),
        pnl_tick: Duration::from_millis(200),
        ..SimConfig::for_tests()
    }
}

/// Starts an embedded broker with `brokers` brokers, the possync topics under a unique prefix
/// (`partitions` each), and the simulator.
pub async fn env(sim: SimConfig, brokers: i32, partitions: i32) -> anyhow::Result<Env> {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(std::env::var("POSSYNC_TEST_LOG").unwrap_or_else(|_| "warn".into()))
        .with_test_writer()
        .try_init();
    let broker = EmbeddedBroker::start(brokers)?;
    let mut kafka = KafkaConfig::new(broker.bootstrap());
    kafka.topics = Topics::new(&format!("t{}.", possync::events::new_id().replace('-', "")));
    broker.create_topics(&kafka.topics, partitions)?;
    let sim = possync::sim::start(sim).await?;
    Ok(Env {
        broker,
        kafka,
        sim,
        shutdown: CancellationToken::new(),
    })
}

impl Env {
    /// An ingest configuration pointed at the simulator, with quick reconnects.
    pub fn ingest_config(&self, client_id: i32, budget: usize) -> IngestConfig {
        IngestConfig {
            ib_host: self.sim.addr().ip().to_string(),
            ib_port: self.sim.addr().port(),
            client_id,
            slot_budget: budget,
            reconnect_initial: Duration::from_millis(200),
            reconnect_max: Duration::from_secs(2),
            ..IngestConfig::default()
        }
    }

    /// Starts ingest in the background until `stop` (or the env's shutdown) is cancelled.
    pub async fn start_ingest(&self, cfg: IngestConfig) -> anyhow::Result<Running> {
        let stop = self.shutdown.child_token();
        let ingest = possync::ingest::Ingest::start(cfg, self.kafka.clone(), stop.clone()).await?;
        let session = ingest.session_id().to_string();
        let stats = ingest.stats();
        let task = tokio::spawn(async move { ingest.run().await.map_err(anyhow::Error::from) });
        Ok(Running {
            task,
            session,
            stop,
            stats,
        })
    }
}

/// A background ingest.
pub struct Running {
    pub task: JoinHandle<anyhow::Result<()>>,
    pub session: String,
    pub stop: CancellationToken,
    /// This ingest's own counts (the process-wide metrics mix concurrent tests).
    pub stats: IngestStats,
}

impl Running {
    /// Stops it and returns its result.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.stop.cancel();
        tokio::time::timeout(Duration::from_secs(60), self.task)
            .await
            .context("task did not stop within 60 s")??
    }
}

/// One consumed position event.
#[derive(Debug, Clone)]
pub struct Seen {
    pub topic_route: Route,
    pub event: PositionEvent,
    pub at: Instant,
    /// Its Kafka coordinates.
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

/// Every event on both position topics, decoded, in arrival order (per partition order kept).
#[derive(Clone, Default)]
pub struct Collector {
    pub events: Arc<Mutex<Vec<Seen>>>,
    pub undecodable: Arc<Mutex<Vec<String>>>,
}

impl Collector {
    /// Starts consuming both position topics from the beginning.
    pub async fn start(kafka: &KafkaConfig, shutdown: &CancellationToken) -> anyhow::Result<Self> {
        let c = Collector::default();
        for (topic, route) in [
            (kafka.topics.active.clone(), Route::Active),
            (kafka.topics.queued.clone(), Route::Queued),
        ] {
            let mut replay = TopicReplay::start(kafka, &topic, Duration::from_secs(30)).await?;
            let c = c.clone();
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                loop {
                    let m = tokio::select! {
                        _ = shutdown.cancelled() => return,
                        m = replay.next() => m,
                    };
                    let Ok(m) = m else { continue };
                    match m.payload().map(PositionEvent::decode) {
                        Some(Ok(event)) => c.events.lock().unwrap().push(Seen {
                            topic_route: route,
                            event,
                            at: Instant::now(),
                            topic: m.topic().to_string(),
                            partition: m.partition(),
                            offset: m.offset(),
                        }),
                        Some(Err(e)) => c.undecodable.lock().unwrap().push(e.to_string()),
                        None => c.undecodable.lock().unwrap().push("null payload".into()),
                    }
                }
            });
        }
        Ok(c)
    }

    /// A copy of everything seen so far.
    pub fn all(&self) -> Vec<Seen> {
        self.events.lock().unwrap().clone()
    }

    /// Events of one session.
    pub fn session(&self, session: &str) -> Vec<Seen> {
        self.all()
            .into_iter()
            .filter(|s| s.event.session_id == session)
            .collect()
    }

    /// Events about (account, conId).
    pub fn about(&self, account: &str, con_id: i32) -> Vec<Seen> {
        self.all()
            .into_iter()
            .filter(|s| s.event.account == account && s.event.con_id == i64::from(con_id))
            .collect()
    }

    /// The latest non-PNL event per key, by sequence within `session`.
    pub fn latest(&self, session: &str) -> BTreeMap<(String, i64), PositionEvent> {
        let mut evs: Vec<PositionEvent> = self.session(session).into_iter().map(|s| s.event).collect();
        evs.sort_by_key(|e| e.sequence);
        let mut out = BTreeMap::new();
        for e in evs {
            out.insert((e.account.clone(), e.con_id), e);
        }
        out
    }

    /// Fails when any message did not decode, or a session's sequence numbers have a gap or
    /// duplicate, or an event sits on the wrong topic for its route.
    /// [`Collector::check_integrity`] once the collector has caught up: its consumers read the
    /// two topics independently, and since ingest publishes in transactions (issue 19) events of
    /// both topics become visible together at a commit, so one topic's may still be on their
    /// way when the other's are seen. A gap that lasts 15 s is real.
    pub async fn settled_integrity(&self, session: &str) -> anyhow::Result<usize> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            match self.check_integrity(session) {
                Ok(n) => return Ok(n),
                Err(e) if Instant::now() >= deadline => return Err(e),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    pub fn check_integrity(&self, session: &str) -> anyhow::Result<usize> {
        let bad = self.undecodable.lock().unwrap().clone();
        if !bad.is_empty() {
            bail!("undecodable messages: {bad:?}");
        }
        let seen = self.session(session);
        for s in &seen {
            if s.topic_route != s.event.route {
                bail!(
                    "event with route {:?} on the {:?} topic: {:?}",
                    s.event.route,
                    s.topic_route,
                    s.event
                );
            }
        }
        let mut seqs: Vec<i64> = seen.iter().map(|s| s.event.sequence).collect();
        seqs.sort_unstable();
        seqs.dedup();
        let n = seqs.len();
        if n > 0 && (seqs[0] != 1 || seqs[n - 1] != n as i64) {
            let missing: Vec<i64> = (1..=seqs[n - 1])
                .filter(|s| seqs.binary_search(s).is_err())
                .take(20)
                .collect();
            bail!(
                "sequence gaps in session {session}: {n} distinct numbers up to {}, missing {missing:?}",
                seqs[n - 1]
            );
        }
        Ok(n)
    }
}

/// Polls `cond` until it returns `Some` or the deadline passes.
pub async fn wait_for<T, F, Fut>(what: &str, deadline: Duration, mut cond: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let end = Instant::now() + deadline;
    loop {
        if let Some(v) = cond().await {
            return Ok(v);
        }
        if Instant::now() >= end {
            bail!("timed out after {deadline:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Whether `e` reports `p`'s quantity and average cost.
pub fn matches_truth(e: &PositionEvent, p: &TruthPosition) -> bool {
    e.position == p.quantity && (e.avg_cost - p.avg_cost).abs() < 1e-6
}

/// Waits until every open position of the simulator has a non-PNL event in `session` whose
/// latest figures match the truth; returns the latest event per key.
pub async fn wait_in_sync(
    sim: &SimHandle,
    c: &Collector,
    session: &str,
) -> anyhow::Result<BTreeMap<(String, i64), PositionEvent>> {
    wait_for("published state to match the simulator", DEADLINE, || async {
        let truth = sim.truth();
        let mut latest: BTreeMap<(String, i64), PositionEvent> = BTreeMap::new();
        let mut evs: Vec<PositionEvent> = c
            .session(session)
            .into_iter()
            .map(|s| s.event)
            .filter(|e| e.source != Source::Pnl)
            .collect();
        evs.sort_by_key(|e| e.sequence);
        for e in evs {
            latest.insert((e.account.clone(), e.con_id), e);
        }
        let open: Vec<_> = latest.values().filter(|e| e.position != 0.0).collect();
        let ok = open.len() == truth.positions.len()
            && truth.positions.iter().all(|p| {
                latest
                    .get(&(p.account.clone(), i64::from(p.contract.con_id)))
                    .is_some_and(|e| matches_truth(e, p))
            });
        ok.then_some(latest)
    })
    .await
    .context("ingest never caught up with the simulator")
}

/// Activates `p` for strategy "s" on its own account (actor "test").
pub async fn activate(kafka: &possync::kafka::KafkaConfig, p: &TruthPosition, priority: i32) -> anyhow::Result<()> {
    possync::registry::activate(
        kafka,
        "s",
        Some(&p.account),
        i64::from(p.contract.con_id),
        priority,
        "test",
    )
    .await?;
    Ok(())
}
