//! The whole pipeline as separate processes on a real Apache Kafka cluster: the IB simulator
//! (served by the test process over TCP, so the test can pace fills and read the truth),
//! `possync ingest`, `possync queue-worker` and several `possync materialize` members in one
//! consumer group. Every scenario ends with [`Pipeline::finish`], the exactness check.

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use possync::events::{PositionEvent, RegistryEvent};
use possync::executions::ExecutionEvent;
use possync::kafka::{KafkaConfig, Topics};
use possync::sim::{SimConfig, SimHandle};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;

use crate::common::kafka_cluster::{KafkaCluster, KafkaOpts};
use crate::common::process::{run_ok, signal, wait_exit, Reap, BIN};
use crate::materialize_support::{check_exact, Payload, Produced};

/// The client id of ingest 0 (the standby's is 13): TWS's master API client id of the
/// default simulated world, so it receives every fill.
pub const INGEST_CLIENT_ID: i32 = 11;

/// Options of one scenario.
#[derive(Debug, Clone)]
pub struct Options {
    /// Kafka nodes (combined broker + controller).
    pub nodes: usize,
    /// Materialize members in the group.
    pub members: usize,
    /// `message.timeout.ms` of the producers (ingest, queue worker).
    pub message_timeout: Duration,
    /// Extra flags of ingest.
    pub ingest_args: Vec<String>,
    /// Extra flags of the queue worker.
    pub queue_args: Vec<String>,
    /// Extra `-K` settings of the materializers (e.g. the assignor).
    pub materialize_k: Vec<String>,
    /// Random fills per second driven into the simulator while the stream runs.
    pub fill_rate: f64,
    /// Start ingest, the queue worker and the materializers in [`Pipeline::start`] (a scenario
    /// that prepares the topics first starts them itself).
    pub processes: bool,
    /// Talk to the cluster's SASL/SCRAM listener, credentials through `-K`.
    pub sasl: bool,
    /// The simulated world (`None`: 4 accounts, 60 positions).
    pub sim: Option<SimConfig>,
    /// Every how many positions one is held by a strategy (registry entry).
    pub active_every: usize,
    /// Run ingest and the queue worker at their default flags (no quicker reconnects or ticks).
    pub default_flags: bool,
    /// Run a second ingest (`--client-id 13`, log `ingest-2`) as a lease standby; both ingests
    /// then serve `/metrics` (see [`Pipeline::lease_held`]).
    pub standby_ingest: bool,
    /// Every IB fault of the simulator on, among the random fills (see [`Pipeline::start_fills`]):
    /// commission reports before their executions, corrections, a fill while the gateway is down
    /// every 100 fills, an expiry (of an option whose day has come: the world is built 70 days
    /// ago) or assignment every 20 fills. The reconciliation must then explain what no fill did.
    pub ib_faults: bool,
    /// The members' `--maintain-every` (default: the flag's, 1 h); when set, every member also
    /// serves `/metrics` (see [`Pipeline::maintenance`]).
    pub maintain_every: Option<Duration>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            nodes: 3,
            members: 3,
            message_timeout: Duration::from_secs(60),
            materialize_k: Vec::new(),
            ingest_args: Vec::new(),
            queue_args: Vec::new(),
            fill_rate: 20.0,
            processes: true,
            sasl: false,
            sim: None,
            active_every: 4,
            default_flags: false,
            standby_ingest: false,
            ib_faults: false,
            maintain_every: None,
        }
    }
}

/// One running pipeline.
pub struct Pipeline {
    pub opts: Options,
    pub cluster: KafkaCluster,
    pub kafka: KafkaConfig,
    pub sim: Arc<SimHandle>,
    pub dir: tempfile::TempDir,
    /// Delta tables base.
    pub base: String,
    pub ingest: Option<Reap>,
    /// The second ingest (lease standby), with [`Options::standby_ingest`].
    pub ingest2: Option<Reap>,
    pub queue: Option<Reap>,
    pub members: Vec<Option<Reap>>,
    fills: Option<(CancellationToken, tokio::task::JoinHandle<()>)>,
    /// The reconciliation of positions against fills, started from the book before the first
    /// fill (see [`Pipeline::start_fills`]).
    reconciler: Option<possync::reconcile::Reconciler>,
    /// Where ingest serves `/metrics`, when the scenario asked for it.
    pub ingest_metrics: Option<String>,
    /// Where each member serves `/metrics`, with [`Options::maintain_every`].
    pub member_metrics: Vec<String>,
    /// Where the second ingest serves `/metrics`.
    pub ingest2_metrics: Option<String>,
    /// Fills applied so far.
    pub filled: Arc<AtomicU64>,
    /// Expiries and assignments made (with [`Options::ib_faults`]).
    pub expiries: Arc<AtomicU64>,
    spawned: u32,
}

const GROUP: &str = "faults";

/// `session.timeout.ms` of the materializers' consumer group (passed with `-K`).
pub const MEMBER_SESSION: Duration = Duration::from_secs(6);

/// A process of the pipeline, for [`Pipeline::pause`] and [`Pipeline::resume`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proc {
    /// Ingest 0 (`--client-id 11`, log `ingest`) or 1 (the standby, `--client-id 13`, log
    /// `ingest-2`).
    Ingest(usize),
    /// The queue worker.
    QueueWorker,
    /// Materialize member `m`.
    Member(usize),
}

impl Proc {
    /// Its log's name (`<name>.log` in the scenario's directory).
    pub fn name(self) -> String {
        match self {
            Proc::Ingest(0) => "ingest".into(),
            Proc::Ingest(i) => format!("ingest-{}", i + 1),
            Proc::QueueWorker => "queue-worker".into(),
            Proc::Member(m) => format!("materialize-{m}"),
        }
    }
}

impl Pipeline {
    /// Starts the cluster, creates the topics with `possync topics create` (6 partitions, RF 3,
    /// min ISR 2 on three nodes), starts the simulator, activates a few contracts, then ingest,
    /// the queue worker and the materializers.
    pub async fn start(opts: Options) -> anyhow::Result<Pipeline> {
        let dir = tempfile::tempdir()?;
        let kopts = if opts.sasl {
            KafkaOpts::sasl()
        } else {
            KafkaOpts::default()
        };
        let cluster = KafkaCluster::start(opts.nodes, kopts)
            .await
            .context("start the Kafka cluster")?;
        let mut kafka = KafkaConfig::new(if opts.sasl {
            cluster.sasl_bootstrap()
        } else {
            cluster.bootstrap()
        });
        kafka.topics = Topics::new("faults.");
        if opts.sasl {
            let o = cluster.opts();
            for (k, v) in sasl_settings(&o.sasl_user, &o.sasl_password) {
                kafka.overrides.insert(k.to_string(), v);
            }
        }
        let rf = opts.nodes.min(3).to_string();
        let isr = if opts.nodes >= 3 { "2" } else { "1" };
        run_ok(
            Command::new(BIN)
                .args([
                    "topics",
                    "create",
                    "--brokers",
                    &kafka.brokers,
                    "--topic-prefix",
                    "faults.",
                    "--partitions",
                    "6",
                    "--replication-factor",
                    &rf,
                    "--min-insync-replicas",
                    isr,
                ])
                .args(kafka_flags(&kafka)),
        )?;
        let sim = Arc::new(
            possync::sim::start(opts.sim.clone().unwrap_or_else(|| SimConfig {
                accounts: 4,
                initial_positions: 60,
                pnl_tick: Duration::from_millis(500),
                // Ingest 0 is TWS's master API client: it gets every fill as an execution.
                master_client_id: Some(INGEST_CLIENT_ID),
                ..if opts.ib_faults {
                    SimConfig {
                        today: Some(chrono::Utc::now().date_naive() - chrono::Days::new(70)),
                        commission_first_rate: 0.3,
                        correction_rate: 0.1,
                        ..SimConfig::for_tests()
                    }
                } else {
                    SimConfig::for_tests()
                }
            }))
            .await?,
        );
        // Every fourth position (by default) is held by a strategy: the active route gets
        // traffic too. One producer for all of them (a producer per entry costs seconds on a
        // real cluster).
        let every = opts.active_every.max(1);
        let entries: Vec<_> = sim
            .truth()
            .positions
            .iter()
            .enumerate()
            .filter(|(i, _)| i % every == 0)
            .map(|(i, p)| {
                possync::registry::event(
                    "faults",
                    Some(&p.account),
                    i64::from(p.contract.con_id),
                    possync::events::RegistryAction::Activate,
                    (i % 3) as i32,
                    "test",
                )
            })
            .collect();
        possync::registry::commands::publish(&kafka, &entries).await?;
        let base = dir.path().join("tables").to_string_lossy().into_owned();
        let mut p = Pipeline {
            members: (0..opts.members).map(|_| None).collect(),
            opts,
            cluster,
            kafka,
            sim,
            dir,
            base,
            ingest: None,
            ingest2: None,
            queue: None,
            fills: None,
            reconciler: None,
            ingest_metrics: None,
            ingest2_metrics: None,
            member_metrics: Vec::new(),
            filled: Arc::new(AtomicU64::new(0)),
            expiries: Arc::new(AtomicU64::new(0)),
            spawned: 0,
        };
        if p.opts.standby_ingest {
            p.ingest_metrics = Some(free_addr()?);
            p.ingest2_metrics = Some(free_addr()?);
        }
        if p.opts.maintain_every.is_some() {
            p.member_metrics = (0..p.members.len())
                .map(|_| free_addr())
                .collect::<anyhow::Result<_>>()?;
        }
        if p.opts.processes {
            p.start_ingest()?;
            if p.opts.standby_ingest {
                p.start_standby_ingest()?;
            }
            p.start_queue_worker()?;
            for m in 0..p.members.len() {
                p.start_member(m)?;
            }
        }
        Ok(p)
    }

    fn log(&self, name: &str) -> anyhow::Result<std::fs::File> {
        Ok(std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("{name}.log")))?)
    }

    /// Every process log of the scenario: (file name, text).
    pub fn logs(&self) -> anyhow::Result<Vec<(String, String)>> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(self.dir.path())? {
            let path = e?.path();
            if path.extension().is_some_and(|x| x == "log") {
                out.push((path.display().to_string(), std::fs::read_to_string(&path)?));
            }
        }
        Ok(out)
    }

    /// The tail of a process log, for failure messages.
    pub fn log_tail(&self, name: &str) -> String {
        let text = std::fs::read_to_string(self.dir.path().join(format!("{name}.log"))).unwrap_or_default();
        text[text.len().saturating_sub(3000)..].to_string()
    }

    fn command(&self, sub: &str, name: &str) -> anyhow::Result<Command> {
        let mut c = Command::new(BIN);
        c.arg(sub)
            .args(["--brokers", &self.kafka.brokers, "--topic-prefix", "faults."])
            .args(kafka_flags(&self.kafka))
            .env("POSSYNC_LOG", "warn,possync=info")
            // An error exit logs its message, not a backtrace (a CI shell may set RUST_BACKTRACE).
            .env("RUST_BACKTRACE", "0")
            .env("RUST_LIB_BACKTRACE", "0")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(self.log(name)?);
        Ok(c)
    }

    fn producer_k(&self) -> Vec<String> {
        vec![
            "-K".into(),
            format!("producer.message.timeout.ms={}", self.opts.message_timeout.as_millis()),
        ]
    }

    /// (Re)starts ingest.
    pub fn start_ingest(&mut self) -> anyhow::Result<()> {
        self.ingest = Some(self.spawn_ingest(0)?);
        Ok(())
    }

    /// (Re)starts the second ingest: same flags, `--client-id 13`, log `ingest-2`; a lease
    /// standby while the first holds the lease.
    pub fn start_standby_ingest(&mut self) -> anyhow::Result<()> {
        self.ingest2 = Some(self.spawn_ingest(1)?);
        Ok(())
    }

    /// (Re)starts ingest `i` (0 or 1).
    pub fn restart_ingest(&mut self, i: usize) -> anyhow::Result<()> {
        if i == 0 {
            self.start_ingest()
        } else {
            self.start_standby_ingest()
        }
    }

    fn spawn_ingest(&self, i: usize) -> anyhow::Result<Reap> {
        let port = self.sim.addr().port().to_string();
        let name = Proc::Ingest(i).name();
        let mut cmd = self.command("ingest", &name)?;
        if let Some(addr) = self.metrics_addr(i) {
            cmd.args(["--metrics-addr", addr]);
        }
        let client_id = if i == 0 { INGEST_CLIENT_ID } else { 13 }.to_string();
        cmd.args(["--ib-port", &port, "--client-id", &client_id]);
        if !self.opts.default_flags {
            cmd.args(["--slot-budget", "10"])
                .args(["--reconnect-initial", "200ms", "--reconnect-max", "2s"]);
        }
        let child = cmd
            .args(&self.opts.ingest_args)
            .args(self.producer_k())
            .spawn()
            .with_context(|| format!("spawn {name}"))?;
        Ok(Reap(child))
    }

    fn metrics_addr(&self, i: usize) -> Option<&String> {
        if i == 0 {
            self.ingest_metrics.as_ref()
        } else {
            self.ingest2_metrics.as_ref()
        }
    }

    fn ingest_slot(&mut self, i: usize) -> &mut Option<Reap> {
        if i == 0 {
            &mut self.ingest
        } else {
            &mut self.ingest2
        }
    }

    /// Member `m`'s `possync_maintenance_turn` (1: it runs the group's maintenance) and
    /// `possync_maintenance_passes_total`; `None` while its `/metrics` does not answer (not
    /// started, killed) or without [`Options::maintain_every`].
    pub async fn maintenance(&self, m: usize) -> Option<(i64, u64)> {
        let body = http_get(self.member_metrics.get(m)?, "/metrics").await?;
        let turn = metric(&body, "possync_maintenance_turn")? as i64;
        let passes = metric(&body, "possync_maintenance_passes_total")? as u64;
        Some((turn, passes))
    }

    /// Waits until exactly one running member holds the maintenance turn, every other running
    /// member answers with 0, and the holder has run `passes` passes since `since` (per member,
    /// from an earlier [`Pipeline::maintenance_all`]); returns the holder and every member's figures.
    pub async fn wait_maintainer(
        &self,
        since: &[Option<(i64, u64)>],
        passes: u64,
        within: Duration,
    ) -> anyhow::Result<(usize, Vec<Option<(i64, u64)>>)> {
        let deadline = Instant::now() + within;
        loop {
            let all = self.maintenance_all().await;
            let running: Vec<usize> = (0..self.members.len()).filter(|m| self.members[*m].is_some()).collect();
            let answered = running.iter().all(|m| all[*m].is_some());
            let holders: Vec<usize> = running
                .iter()
                .copied()
                .filter(|m| all[*m].is_some_and(|(t, _)| t == 1))
                .collect();
            if answered && holders.len() == 1 {
                let h = holders[0];
                let before = since.get(h).copied().flatten().map_or(0, |(_, n)| n);
                if all[h].is_some_and(|(_, n)| n >= before + passes) {
                    return Ok((h, all));
                }
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "no single maintenance turn holder with {passes} new passes within {within:?}: {all:?}"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// [`Pipeline::maintenance`] of every member (`None` for those not answering).
    pub async fn maintenance_all(&self) -> Vec<Option<(i64, u64)>> {
        let mut out = Vec::new();
        for m in 0..self.members.len() {
            out.push(if self.members[m].is_some() {
                self.maintenance(m).await
            } else {
                None
            });
        }
        out
    }

    /// `possync_ingest_lease_held` of ingest `i` (1: it holds the lease, 0: it stands by);
    /// `None` while its `/metrics` does not answer (not started, stopped, paused).
    pub async fn lease_held(&self, i: usize) -> Option<i64> {
        let body = http_get(self.metrics_addr(i)?, "/metrics").await?;
        metric(&body, "possync_ingest_lease_held").map(|v| v as i64)
    }

    /// `possync_published_total` of ingest `i` over both routes (events Kafka acknowledged
    /// since the process started); `None` while its `/metrics` does not answer.
    pub async fn ingest_published(&self, i: usize) -> Option<f64> {
        let body = http_get(self.metrics_addr(i)?, "/metrics").await?;
        metric(&body, "possync_published_total")
    }

    /// Waits until exactly one of the two ingests holds the lease and the other stands by;
    /// returns the holder (0 or 1).
    pub async fn lease_holder(&self, within: Duration) -> anyhow::Result<usize> {
        let deadline = Instant::now() + within;
        loop {
            match (self.lease_held(0).await, self.lease_held(1).await) {
                (Some(1), Some(0)) => return Ok(0),
                (Some(0), Some(1)) => return Ok(1),
                seen => ensure!(
                    Instant::now() < deadline,
                    "no single lease holder within {within:?}: lease gauges {seen:?}\n--- ingest:\n{}\n--- ingest-2:\n{}",
                    self.log_tail("ingest"),
                    self.log_tail("ingest-2")
                ),
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// While ingest `paused` is stopped (paused at `since`): waits until the other one holds
    /// the lease and has published events (its `possync_published_total` grew past
    /// `published_before`), and until `pause` has passed since `since`. Returns how long after
    /// `since` the takeover was first seen.
    pub async fn wait_takeover(
        &self,
        paused: usize,
        published_before: f64,
        since: Instant,
        pause: Duration,
        within: Duration,
    ) -> anyhow::Result<Duration> {
        let successor = 1 - paused;
        let mut took = None;
        loop {
            if took.is_none()
                && self.lease_held(successor).await == Some(1)
                && self
                    .ingest_published(successor)
                    .await
                    .is_some_and(|n| n > published_before)
            {
                took = Some(since.elapsed());
            }
            if let Some(took) = took.filter(|_| since.elapsed() >= pause) {
                return Ok(took);
            }
            ensure!(
                since.elapsed() < within,
                "{} did not take the lease over and publish within {within:?} of pausing {}\n--- {}:\n{}",
                Proc::Ingest(successor).name(),
                Proc::Ingest(paused).name(),
                Proc::Ingest(successor).name(),
                self.log_tail(&Proc::Ingest(successor).name())
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// After ingest `i` was woken: waits until it stands by (lease gauge 0). Should it have
    /// exited instead, says so and starts it again as a standby. Returns how long that took.
    pub async fn wait_standing_by(&mut self, i: usize, within: Duration) -> anyhow::Result<Duration> {
        let t0 = Instant::now();
        let name = Proc::Ingest(i).name();
        loop {
            if let Some(status) = match self.ingest_slot(i).as_mut() {
                Some(r) => r.0.try_wait()?,
                None => None,
            } {
                eprintln!(
                    "[faults] {name} exited with {status} after it was woken; starting it again as a standby\n{}",
                    self.log_tail(&name)
                );
                self.restart_ingest(i)?;
            }
            if self.lease_held(i).await == Some(0) {
                return Ok(t0.elapsed());
            }
            ensure!(
                t0.elapsed() < within,
                "{name} did not stand by within {within:?} after it was woken: lease gauge {:?}\n{}",
                self.lease_held(i).await,
                self.log_tail(&name)
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// The running child of `which`.
    fn child(&self, which: Proc) -> anyhow::Result<&Reap> {
        let child = match which {
            Proc::Ingest(0) => self.ingest.as_ref(),
            Proc::Ingest(_) => self.ingest2.as_ref(),
            Proc::QueueWorker => self.queue.as_ref(),
            Proc::Member(m) => self.members.get(m).and_then(|c| c.as_ref()),
        };
        child.with_context(|| format!("{} is not running", which.name()))
    }

    /// SIGSTOPs `which`: the whole process stalls (threads, librdkafka, sockets unread) as a
    /// frozen VM or a long GC pause would.
    pub fn pause(&self, which: Proc) -> anyhow::Result<()> {
        signal(&self.child(which)?.0, "STOP")
    }

    /// SIGCONTs `which` after [`Pipeline::pause`].
    pub fn resume(&self, which: Proc) -> anyhow::Result<()> {
        signal(&self.child(which)?.0, "CONT")
    }

    /// `session.timeout.ms` of the ingest lease group: [`KafkaConfig::consumer`]'s, with the
    /// scenario's `-K` settings (what every process of the scenario gets).
    pub fn lease_session(&self) -> anyhow::Result<Duration> {
        let ms: u64 = self
            .kafka
            .consumer("lease")
            .get("session.timeout.ms")
            .context("session.timeout.ms is not set")?
            .parse()?;
        Ok(Duration::from_millis(ms))
    }

    /// Stops the queue worker with SIGINT (it must exit 0).
    pub fn stop_queue_worker(&mut self) -> anyhow::Result<()> {
        if let Some(mut q) = self.queue.take() {
            signal(&q.0, "INT")?;
            let status = wait_exit(&mut q.0, Duration::from_secs(30))?;
            ensure!(
                status.success(),
                "queue-worker exited with {status} on SIGINT:\n{}",
                self.log_tail("queue-worker")
            );
        }
        Ok(())
    }

    /// (Re)starts the queue worker.
    pub fn start_queue_worker(&mut self) -> anyhow::Result<()> {
        let port = self.sim.addr().port().to_string();
        let mut cmd = self.command("queue-worker", "queue-worker")?;
        cmd.args(["--ib-port", &port, "--client-id", "12"]);
        if !self.opts.default_flags {
            cmd.args(["--tick", "1s"]);
        }
        let child = cmd
            .args(&self.opts.queue_args)
            .args(self.producer_k())
            .spawn()
            .context("spawn queue-worker")?;
        self.queue = Some(Reap(child));
        Ok(())
    }

    /// (Re)starts materialize member `m`.
    pub fn start_member(&mut self, m: usize) -> anyhow::Result<()> {
        self.spawned += 1;
        let mut c = self.command("materialize", &format!("materialize-{m}"))?;
        c.args(["--table-uri", &self.base, "--group", GROUP, "--flush-latency", "300ms"])
            .args(["--checkpoint-every", "20"])
            .args([
                "-K",
                &format!("consumer.session.timeout.ms={}", MEMBER_SESSION.as_millis()),
                "-K",
                "consumer.heartbeat.interval.ms=500",
            ]);
        for k in &self.opts.materialize_k {
            c.args(["-K", k]);
        }
        if let Some(every) = self.opts.maintain_every {
            c.args(["--maintain-every", &format!("{}ms", every.as_millis())])
                .args(["--metrics-addr", &self.member_metrics[m]]);
        }
        self.members[m] = Some(Reap(c.spawn().context("spawn materialize")?));
        Ok(())
    }

    /// SIGKILLs materialize member `m`.
    pub fn kill_member(&mut self, m: usize) -> anyhow::Result<()> {
        if let Some(mut r) = self.members[m].take() {
            r.0.kill()?;
            r.0.wait()?;
        }
        Ok(())
    }

    /// The partition of `topic` holding the most messages.
    pub fn busiest(&self, topic: &str) -> anyhow::Result<i32> {
        let c: BaseConsumer = self.kafka.admin().create()?;
        let md = c.fetch_metadata(Some(topic), Duration::from_secs(10))?;
        let mut best = (0, -1);
        for p in md.topics().iter().flat_map(|t| t.partitions()) {
            let (lo, hi) = c.fetch_watermarks(topic, p.id(), Duration::from_secs(10))?;
            if hi - lo > best.1 {
                best = (p.id(), hi - lo);
            }
        }
        Ok(best.0)
    }

    /// Starts random fills at the configured rate until [`Pipeline::stop_fills`].
    ///
    /// The first time, when the scenario checks fills: once `positions_current` equals the
    /// truth, the reconciliation takes the day's starting snapshot of the book, so that
    /// [`Pipeline::finish`] can check that every position moved by its fills and nothing else.
    pub async fn start_fills(&mut self) -> anyhow::Result<()> {
        if self.reconciler.is_none() && self.checks_fills() {
            self.wait_tables_equal_truth("before the fills", Duration::from_secs(300))
                .await?;
            let mut r = possync::reconcile::Reconciler::new(possync::reconcile::ReconcileConfig {
                table_uri: self.base.clone(),
                drift_after: Duration::ZERO,
                ..Default::default()
            });
            let first = r.run_once(possync::events::now_micros()).await?;
            ensure!(first.lines.is_empty(), "nothing moved yet: {:?}", first.lines);
            self.reconciler = Some(r);
            // IB stamps fills to the second: the first fill comes over a second after every
            // row the snapshot copied (see `reconcile::model`).
            tokio::time::sleep(Duration::from_millis(1100)).await;
        }
        let stop = CancellationToken::new();
        let (s, sim, filled) = (stop.clone(), self.sim.clone(), self.filled.clone());
        let (faults, expiries) = (self.opts.ib_faults, self.expiries.clone());
        let every = Duration::from_secs_f64(1.0 / self.opts.fill_rate.max(0.1));
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            let mut n = 0u64;
            loop {
                tokio::select! {
                    _ = s.cancelled() => break,
                    _ = tick.tick() => {
                        if sim.random_fill().is_some() {
                            filled.fetch_add(1, Relaxed);
                        }
                        n += 1;
                        if faults && n.is_multiple_of(20) && sim.random_expiry().is_some() {
                            expiries.fetch_add(1, Relaxed);
                        }
                        if faults && n.is_multiple_of(100) {
                            // A stock (stocks never expire) filled while the gateway refuses.
                            let stock = sim.truth().positions.into_iter().find(|p| p.contract.sec_type == "STK");
                            if let Some(p) = stock {
                                let down = sim.fill_while_disconnected(&p.account, p.contract.con_id, 10.0, Duration::from_millis(500));
                                tokio::select! {
                                    _ = s.cancelled() => break,
                                    r = down => if matches!(r, Ok(Some(_))) {
                                        filled.fetch_add(1, Relaxed);
                                    },
                                }
                            }
                        }
                    }
                }
            }
        });
        self.fills = Some((stop, task));
        Ok(())
    }

    /// Stops the fills; the simulator's book is final from here on.
    pub async fn stop_fills(&mut self) {
        if let Some((stop, task)) = self.fills.take() {
            stop.cancel();
            let _ = task.await;
        }
    }

    /// Sum of the high watermarks of both position topics: grows while events are published.
    pub fn published(&self) -> anyhow::Result<i64> {
        let c: BaseConsumer = self.kafka.admin().create()?;
        let md = c.fetch_metadata(None, Duration::from_secs(10))?;
        let mut sum = 0;
        for t in md
            .topics()
            .iter()
            .filter(|t| self.kafka.topics.positions().contains(&t.name()))
        {
            for p in t.partitions() {
                sum += c.fetch_watermarks(t.name(), p.id(), Duration::from_secs(10))?.1;
            }
        }
        Ok(sum)
    }

    /// Rows the materializers have committed to `position_events` so far.
    pub async fn materialized(&self) -> i64 {
        crate::materialize_support::event_rows(&self.base)
            .await
            .map(|r| r.len() as i64)
            .unwrap_or(0)
    }

    /// Waits until new events are both published and materialized after a fault; returns how
    /// long that took (the recovery time of the fault).
    pub async fn wait_recovered(&self, what: &str, since: Instant, within: Duration) -> anyhow::Result<Duration> {
        let (p0, m0) = (self.published_or(0), self.materialized().await);
        let deadline = Instant::now() + within;
        loop {
            if self.published_or(p0) > p0 && self.materialized().await > m0 {
                let took = since.elapsed();
                eprintln!("[faults] {what}: recovered after {:.1} s", took.as_secs_f64());
                return Ok(took);
            }
            if Instant::now() > deadline {
                let standby = if self.ingest2.is_some() {
                    format!("\ningest-2 log:\n{}", self.log_tail("ingest-2"))
                } else {
                    String::new()
                };
                bail!(
                    "{what}: no new events published and materialized within {within:?}\ningest log:\n{}{standby}\nmaterialize-0 log:\n{}",
                    self.log_tail("ingest"),
                    self.log_tail("materialize-0")
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    fn published_or(&self, fallback: i64) -> i64 {
        self.published().unwrap_or(fallback)
    }

    /// The exactness check, after the scenario's faults:
    /// 1. fills stop; the tables converge to the simulator's truth (positions_current);
    /// 2. ingest and the queue worker stop on SIGINT (exit 0), so the topics are final;
    /// 3. every materializer member is (re)started and the group catches up;
    /// 4. every message of the topics appears once in `position_events` by coordinates, the
    ///    upsert tables equal a replay of the topics, and positions_current equals the truth.
    pub async fn finish(&mut self) -> anyhow::Result<Report> {
        self.stop_fills().await;
        for m in 0..self.members.len() {
            if self.members[m].is_none() {
                self.start_member(m)?;
            }
        }
        let truth = self.truth();
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            let table = open_positions(&self.base).await.unwrap_or_default();
            if table == truth {
                break;
            }
            if Instant::now() > deadline {
                // (key, truth, table): wrong or missing in the table, then open only there.
                let diff: Vec<_> = truth
                    .iter()
                    .filter(|(k, v)| table.get(*k) != Some(v))
                    .take(5)
                    .map(|(k, v)| (k.clone(), Some(*v), table.get(k).copied()))
                    .chain(
                        table
                            .iter()
                            .filter(|(k, _)| !truth.contains_key(*k))
                            .take(5)
                            .map(|(k, v)| (k.clone(), None, Some(*v))),
                    )
                    .collect();
                let history = self.history_of(diff.iter().map(|d| d.0.clone()).collect());
                let kept = self.keep_dir();
                bail!(
                    "positions_current never reached the simulator's truth ({} vs {} open positions), e.g. (key, truth, table) {diff:?}\nwhat the topics hold for those keys:\n{history}\nlogs kept in {kept}\ningest log:\n{}",
                    table.len(),
                    truth.len(),
                    self.log_tail("ingest")
                );
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        // A restarted ingest publishes the fills it missed from the day's list (`reqExecutions`)
        // at its own pace; stop it only once they are all on the topic, or SIGINT would cut
        // that list short (the next start would publish the rest).
        if self.checks_fills() {
            let deadline = Instant::now() + Duration::from_secs(120);
            loop {
                let (want, on_topic) = self.fills_on_topic(&read_topics(&self.kafka)?);
                if want.keys().all(|id| on_topic.contains_key(id)) {
                    break;
                }
                if Instant::now() > deadline {
                    eprintln!(
                        "[faults] after 120 s, {} of {} fills on the executions topic",
                        on_topic.len(),
                        want.len()
                    );
                    break;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
        let producers: Vec<_> = [
            ("ingest", self.ingest.take()),
            ("ingest-2", self.ingest2.take()),
            ("queue-worker", self.queue.take()),
        ]
        .into_iter()
        .filter_map(|(name, child)| child.map(|c| (name, c)))
        .collect();
        for (_, child) in &producers {
            signal(&child.0, "INT")?;
        }
        for (name, mut child) in producers {
            let status = wait_exit(&mut child.0, Duration::from_secs(30))?;
            ensure!(
                status.success(),
                "{name} exited with {status} on SIGINT:\n{}",
                self.log_tail(name)
            );
        }
        let produced = read_topics(&self.kafka)?;
        let ns = possync::materialize::namespace(&self.kafka, None).await?;
        possync::materialize::wait_caught_up(&self.base, &ns, &self.kafka, Duration::from_secs(180))
            .await
            .with_context(|| format!("materializers did not catch up:\n{}", self.log_tail("materialize-0")))?;
        check_exact(&self.base, &produced).await?;
        ensure!(
            open_positions(&self.base).await? == truth,
            "positions_current moved away from the truth"
        );
        // Every fill is one execution on the topic (and so, by check_exact, one row of the
        // executions table), through kills, pauses and outages.
        if self.checks_fills() {
            let (want, on_topic) = self.fills_on_topic(&produced);
            if on_topic != want {
                let kept = self.keep_dir();
                bail!(
                    "the executions topic must hold every simulated fill once: {} fills, {} on the topic ({} distinct)\nlogs kept in {kept}",
                    want.len(),
                    on_topic.values().sum::<usize>(),
                    on_topic.len()
                );
            }
        }
        // Every position moved by its fills, or by an expiry or assignment the simulator made
        // (with `ib_faults`), and nothing else: no key unexplained.
        let (mut reconciled, mut explained) = (0, 0);
        if let Some(r) = self.reconciler.as_mut() {
            use possync::reconcile::model::Status;
            let report = r.run_once(possync::events::now_micros()).await?;
            let expected = |s: Status| s == Status::Agrees || (self.opts.ib_faults && s == Status::Explained);
            let unexplained: Vec<_> = report.lines.iter().filter(|l| !expected(l.status)).take(5).collect();
            explained = report.count(Status::Explained);
            let expiries = self.expiries.load(Relaxed);
            if !unexplained.is_empty() || (expiries > 0) != (explained > 0) {
                let kept = self.keep_dir();
                bail!(
                    "the reconciliation must find every moved position agreeing with its fills{}: {:?} ({expiries} expiries/assignments made), e.g. {unexplained:?}\nlogs and tables kept in {kept}",
                    if self.opts.ib_faults { " or explained" } else { "" },
                    report.counts
                );
            }
            reconciled = report.lines.len();
        }
        let events = produced
            .iter()
            .filter(|p| matches!(p.payload, Payload::Position(_)))
            .count();
        let executions = produced
            .iter()
            .filter(|p| matches!(p.payload, Payload::Execution(_)))
            .count();
        let report = Report {
            events,
            registry: produced.len() - events - executions,
            executions,
            reconciled,
            explained,
            fills: self.filled.load(Relaxed),
            materialize_starts: self.spawned,
            conflicts: conflicts(self.dir.path(), self.members.len()),
        };
        for m in self.members.iter().flatten() {
            signal(&m.0, "TERM")?;
        }
        for m in self.members.iter_mut().flatten() {
            wait_exit(&mut m.0, Duration::from_secs(30))?;
        }
        Ok(report)
    }

    /// For a failure message: every position event the topics hold for `keys`, in order, so
    /// the reader sees whether a lost change is missing from the topic (ingest) or only from
    /// the table (materialize).
    fn history_of(&self, keys: Vec<(String, i64)>) -> String {
        let produced = match read_topics(&self.kafka) {
            Ok(p) => p,
            Err(e) => return format!("(could not read the topics: {e:#})"),
        };
        let mut out = String::new();
        for p in &produced {
            if let Payload::Position(e) = &p.payload {
                if keys.contains(&(e.account.clone(), e.con_id)) {
                    out.push_str(&format!(
                        "  {}/{}@{}: {}:{} position {} source {:?} route {:?} session {} seq {} ib_time {} ingest_time {}\n",
                        p.topic, p.partition, p.offset, e.account, e.con_id, e.position, e.source,
                        e.route, e.session_id, e.sequence, e.ib_time, e.ingest_time
                    ));
                }
            }
        }
        out
    }

    /// Keeps the scenario's directory (logs, tables) past the test, for a post-mortem.
    /// Whether this scenario checks that every fill is on the executions topic once: not with a
    /// standby (it has another client id, not TWS's master, so fills after a takeover reach no
    /// one: see docs/executions.md), and only when ingest 0 is the simulator's master client.
    fn checks_fills(&self) -> bool {
        !self.opts.standby_ingest && self.sim.config().master_client_id == Some(INGEST_CLIENT_ID)
    }

    /// (every simulated fill's exec id, how often each exec id is on the executions topic).
    fn fills_on_topic(&self, produced: &[Produced]) -> (BTreeMap<String, usize>, BTreeMap<String, usize>) {
        let mut on_topic: BTreeMap<String, usize> = BTreeMap::new();
        for p in produced {
            if let Payload::Execution(e) = &p.payload {
                *on_topic.entry(e.exec_id.clone()).or_default() += 1;
            }
        }
        let want = self
            .sim
            .truth()
            .executions
            .iter()
            .map(|e| (e.exec_id.clone(), 1))
            .collect();
        (want, on_topic)
    }

    fn keep_dir(&self) -> String {
        let to = std::env::temp_dir().join(format!("possync-faults-{}", possync::events::new_id()));
        let _ = crate::common::fs::copy_dir(self.dir.path(), &to);
        for id in self.cluster.ids() {
            let logs = self.cluster.dir().join(format!("node-{id}/logs"));
            let _ = crate::common::fs::copy_dir(&logs, &to.join(format!("kafka-node-{id}")));
        }
        to.display().to_string()
    }

    /// Waits until `positions_current` equals the simulator's truth now (the book is quiet);
    /// returns how long that took.
    pub async fn wait_tables_equal_truth(&self, what: &str, within: Duration) -> anyhow::Result<Duration> {
        let t0 = Instant::now();
        let truth = self.truth();
        loop {
            let table = open_positions(&self.base).await.unwrap_or_default();
            if table == truth {
                eprintln!(
                    "[faults] {what}: positions_current equals the truth ({} open) after {:.1} s",
                    truth.len(),
                    t0.elapsed().as_secs_f64()
                );
                return Ok(t0.elapsed());
            }
            if t0.elapsed() > within {
                let wrong = truth.iter().filter(|(k, v)| table.get(*k) != Some(v)).count();
                let extra = table.keys().filter(|k| !truth.contains_key(*k)).count();
                bail!(
                    "{what}: positions_current ({} open) did not reach the truth ({} open) within {within:?}: {wrong} differ, {extra} not open in the truth\ningest log:\n{}\nqueue-worker log:\n{}",
                    table.len(),
                    truth.len(),
                    self.log_tail("ingest"),
                    self.log_tail("queue-worker")
                );
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// Open positions of the simulator now: (account, conId) → quantity.
    pub fn truth(&self) -> BTreeMap<(String, i64), f64> {
        self.sim
            .truth()
            .positions
            .iter()
            .map(|p| ((p.account.clone(), i64::from(p.contract.con_id)), p.quantity))
            .collect()
    }
}

/// What a scenario did, for the closing figures (printed with `{:?}`).
#[derive(Debug)]
#[allow(dead_code)] // read through Debug
pub struct Report {
    /// Position events in the topics (all of them in the tables once).
    pub events: usize,
    /// Registry (and other) messages.
    pub registry: usize,
    /// Fills driven into the simulator.
    pub fills: u64,
    /// Execution events on the executions topic (each in the table once).
    pub executions: usize,
    /// Positions that moved, each agreeing with its fills in the final reconciliation...
    pub reconciled: usize,
    /// ... or explained by an expiry or assignment (with [`Options::ib_faults`]).
    pub explained: usize,
    /// `possync materialize` processes started.
    pub materialize_starts: u32,
    /// Delta commit conflicts the materializers resolved (from their logs).
    pub conflicts: usize,
}

fn conflicts(dir: &std::path::Path, members: usize) -> usize {
    (0..members)
        .map(|m| {
            std::fs::read_to_string(dir.join(format!("materialize-{m}.log")))
                .unwrap_or_default()
                .lines()
                .filter(|l| l.contains("commit conflict"))
                .count()
        })
        .sum()
}

/// Open positions of `positions_current`: (account, conId) → quantity.
pub async fn open_positions(base: &str) -> anyhow::Result<BTreeMap<(String, i64), f64>> {
    Ok(crate::materialize_support::actual_current(base)
        .await?
        .into_iter()
        .filter(|(_, (_, q))| *q != 0.0)
        .map(|(k, (_, q))| (k, q))
        .collect())
}

/// The `-K` settings that reach a SASL/SCRAM listener.
pub fn sasl_settings(user: &str, password: &str) -> Vec<(&'static str, String)> {
    vec![
        ("security.protocol", "SASL_PLAINTEXT".into()),
        ("sasl.mechanism", "SCRAM-SHA-512".into()),
        ("sasl.username", user.into()),
        ("sasl.password", password.into()),
    ]
}

/// `-K key=value` for every passthrough setting of `kafka`.
pub fn kafka_flags(kafka: &KafkaConfig) -> Vec<String> {
    kafka
        .overrides
        .iter()
        .flat_map(|(k, v)| ["-K".to_string(), format!("{k}={v}")])
        .collect()
}

/// Every committed message of the position and registry topics, decoded, with its coordinates.
///
/// Each partition is read from its beginning to librdkafka's partition EOF, not to the high
/// watermark: with transactional producers the last offsets of a partition may be commit or
/// abort markers (control records, never delivered) and aborted messages (skipped by this
/// `read_committed` reader), so no delivered message need carry the offset before it. One
/// consumer per topic, since `KafkaError::PartitionEOF` names the partition only.
///
/// A read that fails (a metadata or watermark request that times out, a partition whose leader
/// moves: a cluster just restarted elects and re-elects leaders for a while) is tried again
/// from the start, for up to a minute.
pub fn read_topics(kafka: &KafkaConfig) -> anyhow::Result<Vec<Produced>> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match read_topics_once(kafka) {
            Ok(all) => return Ok(all),
            Err(e) if Instant::now() < deadline => {
                eprintln!("[faults] reading the topics failed, trying again: {e:#}");
                std::thread::sleep(Duration::from_secs(1));
            }
            Err(e) => return Err(e.context("reading the topics failed for a minute")),
        }
    }
}

fn read_topics_once(kafka: &KafkaConfig) -> anyhow::Result<Vec<Produced>> {
    let meta: BaseConsumer = kafka.admin().create()?;
    let md = meta.fetch_metadata(None, Duration::from_secs(10))?;
    let t = &kafka.topics;
    let mut out = Vec::new();
    for name in [
        t.active.as_str(),
        t.queued.as_str(),
        t.registry.as_str(),
        t.executions.as_str(),
    ] {
        let Some(topic) = md.topics().iter().find(|x| x.name() == name) else {
            continue;
        };
        let mut tpl = TopicPartitionList::new();
        let mut open = BTreeSet::new();
        for p in topic.partitions() {
            let (lo, hi) = meta.fetch_watermarks(name, p.id(), Duration::from_secs(10))?;
            if hi > lo {
                tpl.add_partition_offset(name, p.id(), Offset::Beginning)?;
                open.insert(p.id());
            }
        }
        if open.is_empty() {
            continue;
        }
        let c: BaseConsumer = kafka
            .consumer(&format!("reader-{}", possync::events::new_id()))
            .set("enable.partition.eof", "true")
            .set("isolation.level", "read_committed")
            .create()?;
        c.assign(&tpl)?;
        let deadline = Instant::now() + Duration::from_secs(120);
        while !open.is_empty() {
            ensure!(
                Instant::now() < deadline,
                "could not read {name} to its end: partitions {open:?} left"
            );
            let m = match c.poll(Duration::from_millis(500)) {
                None => continue,
                Some(Err(KafkaError::PartitionEOF(p))) => {
                    open.remove(&p);
                    continue;
                }
                Some(m) => m?,
            };
            let bytes = m.payload().unwrap_or_default();
            let payload = if name == t.registry {
                RegistryEvent::decode(bytes)
                    .map(Payload::Registry)
                    .unwrap_or(Payload::Poison)
            } else if name == t.executions {
                ExecutionEvent::decode(bytes)
                    .map(Payload::Execution)
                    .unwrap_or(Payload::Poison)
            } else {
                PositionEvent::decode(bytes)
                    .map(Payload::Position)
                    .unwrap_or(Payload::Poison)
            };
            out.push(Produced {
                topic: name.to_string(),
                partition: m.partition(),
                offset: m.offset(),
                payload,
            });
        }
    }
    Ok(out)
}

/// The order of ingest sessions in the topics (see [`session_order`]).
#[derive(Debug, Default)]
pub struct SessionOrder {
    /// Distinct ingest sessions with events in the topics.
    pub sessions: BTreeSet<String>,
    /// Events of ingest (every source but the queue worker's POLL).
    pub ingest_events: usize,
    /// Events of a session that come, in their partition, after an event of a later session.
    pub late: Vec<Late>,
}

/// An event of a superseded ingest session after its successor's (see [`session_order`]).
#[derive(Debug)]
#[allow(dead_code)] // read through Debug
pub struct Late {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub session: String,
    pub sequence: i64,
    pub source: possync::events::Source,
    /// The later session whose event came first in this partition.
    pub successor: String,
    /// The event's `ingest_time` minus the successor session's first `ingest_time`, in ms
    /// (> 0: made after the successor began, e.g. from IB frames read after a pause).
    pub after_successor_start_ms: i64,
}

/// Per topic-partition in offset order, the events of ingest sessions (the queue worker's POLL
/// events left out) must come session after session: once an event of a later session is in a
/// partition, no event of an earlier one follows it. Sessions are ordered by their first
/// `ingest_time` (each lease term starts a new session, seconds after the previous holder
/// stopped). A superseded ingest (paused past its lease, then woken) must not have an event
/// counted after its successor began.
pub fn session_order(produced: &[Produced]) -> SessionOrder {
    use possync::events::Source;
    let mut per_partition: BTreeMap<(&str, i32), Vec<(i64, &PositionEvent)>> = BTreeMap::new();
    let mut start: BTreeMap<&str, i64> = BTreeMap::new();
    let mut order = SessionOrder::default();
    for p in produced {
        if let Payload::Position(e) = &p.payload {
            if e.source != Source::Poll {
                per_partition
                    .entry((p.topic.as_str(), p.partition))
                    .or_default()
                    .push((p.offset, e));
                let t = start.entry(e.session_id.as_str()).or_insert(e.ingest_time);
                *t = (*t).min(e.ingest_time);
                order.ingest_events += 1;
            }
        }
    }
    order.sessions = start.keys().map(|s| s.to_string()).collect();
    // Rank of each session by its start.
    let mut by_start: Vec<(i64, &str)> = start.iter().map(|(s, t)| (*t, *s)).collect();
    by_start.sort();
    let rank: BTreeMap<&str, usize> = by_start.iter().enumerate().map(|(i, (_, s))| (*s, i)).collect();
    for ((topic, partition), mut events) in per_partition {
        events.sort_by_key(|(offset, _)| *offset);
        let mut newest: Option<(usize, &str)> = None;
        for (offset, e) in events {
            let r = rank[e.session_id.as_str()];
            match newest {
                Some((n, successor)) if r < n => order.late.push(Late {
                    topic: topic.to_string(),
                    partition,
                    offset,
                    session: e.session_id.clone(),
                    sequence: e.sequence,
                    source: e.source,
                    successor: successor.to_string(),
                    after_successor_start_ms: (e.ingest_time - start[successor]) / 1000,
                }),
                Some((n, _)) if r == n => {}
                _ => newest = Some((r, e.session_id.as_str())),
            }
        }
    }
    order
}

/// A free loopback address for a `--metrics-addr` (bound and released; a fixed port, unlike
/// `:0`, is the same after a restart).
fn free_addr() -> anyhow::Result<String> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.to_string())
}

/// One HTTP GET: the whole response, `None` while the server does not answer within a few
/// seconds (a paused process accepts the connection in the kernel but never answers).
async fn http_get(addr: &str, path: &str) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(addr))
        .await
        .ok()?
        .ok()?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(3), s.read_to_string(&mut out))
        .await
        .ok()?
        .ok()?;
    Some(out)
}

/// The value of Prometheus metric `name` in `body`, summed over its label sets.
fn metric(body: &str, name: &str) -> Option<f64> {
    let mut sum = None;
    for line in body.lines() {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        if rest.starts_with(' ') || rest.starts_with('{') {
            let v: f64 = rest.rsplit(' ').next()?.trim().parse().ok()?;
            *sum.get_or_insert(0.0) += v;
        }
    }
    sum
}

/// The queue's refresh lags, in seconds, from the topics: for each queued change (an enqueue
/// event of ingest: SNAPSHOT or STREAM on the queued route, not a close), the time until the
/// queue worker's next POLL of that position was requested. A position that moves to the
/// active route or closes needs no refresh. A change still unrefreshed in the topics counts
/// with its age at `end_micros` (the end of the observed period) when it was made more than
/// 10 s before that, and is left out otherwise (not yet due). Each lag comes with the time
/// (µs) its change was enqueued.
pub fn refresh_lags(produced: &[Produced], end_micros: i64) -> Vec<(i64, f64)> {
    use possync::events::{Route, Source};
    let mut per_key: BTreeMap<(String, i64), Vec<&PositionEvent>> = BTreeMap::new();
    for p in produced {
        if let Payload::Position(e) = &p.payload {
            if e.source != Source::Pnl {
                per_key.entry((e.account.clone(), e.con_id)).or_default().push(e);
            }
        }
    }
    let mut lags = Vec::new();
    for events in per_key.values_mut() {
        events.sort_by_key(|e| e.ingest_time);
        let mut pending: Option<i64> = None;
        for e in events.iter() {
            match (e.source, e.route) {
                (Source::Poll, _) => {
                    if let Some(t) = pending.take() {
                        lags.push((t, (e.ingest_time - t) as f64 / 1e6));
                    }
                }
                (_, Route::Active) => pending = None,
                _ if e.position == 0.0 => pending = None,
                _ => {
                    pending.get_or_insert(e.ingest_time);
                }
            }
        }
        if let Some(t) = pending.filter(|t| *t < end_micros - 10_000_000) {
            lags.push((t, (end_micros - t) as f64 / 1e6));
        }
    }
    lags
}

/// The `q` quantile (0..=1) of `v` (sorted in place).
pub fn quantile(v: &mut [f64], q: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * q).round() as usize]
}
