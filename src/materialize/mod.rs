//! `possync materialize`: Kafka topics into Delta tables, exactly once.
//!
//! A consumer group reads `positions.active`, `positions.queued`, `registry` and `executions`,
//! decodes Avro straight into Arrow ([`decode`]), buffers per partition ([`buffer`]) and
//! flushes on count, bytes or latency (1 s by default; idle topics flush too) into seven
//! tables ([`catalog`] says what each is, [`tables`] names them on the Delta layer,
//! [`crate::delta`], which opens, commits and reads them): `position_events` (append-only, partitioned by `event_date`),
//! `registry_events` (append-only, every registry event), `executions` (append-only, every
//! fill, partitioned by the date of `exec_time`, [`executions`]), `positions_current`,
//! `position_queue`, `strategy_registry` (upserts, [`upsert`]) and `dead_letters`
//! ([`deadletter`]).
//!
//! Exactly once, the kafka-delta-ingest way: auto-commit is off; every Delta commit carries a
//! txn action per Kafka partition it contains (version = last offset) in the same commit as
//! the data ([`offsets`]); at every assignment the consumer starts each partition at its stored
//! version + 1, read fresh from the tables, or the materializer stops
//! ([`consumer`]); before every commit the rows a table already holds are dropped, and a
//! concurrent commit (another member, `possync maintain`) means reload and retry ([`flush`]).
//! Kafka's own committed offsets are written after each flush for lag monitoring only.
//! Each table records the offset namespace it was written under; a materializer under another
//! one stops at start-up unless allowed ([`namespace_guard`]). Each table records its layout
//! version; older tables take this build's in-place steps at start-up, newer ones are refused
//! ([`layout`]). Owned partitions' txn actions
//! are re-stamped every `txn_restamp_every`, so an idle partition's stored offset never expires
//! under the tables' txn retention ([`flush::Pipeline::restamp`]).
//! An offset the broker no longer has is a loud error ([`MaterializeError::OffsetOutOfRange`]),
//! never a silent skip.
//!
//! Rebalances: revoked partitions' buffers are dropped (nothing of them was committed);
//! shutdown (the token) flushes and commits what is buffered. Maintenance: a checkpoint every
//! N commits per table, and compaction + vacuum ([`maintain`]) every `maintain_every` in a task
//! beside the consume loop (or externally with `possync maintain`).
//!
//! Storage: a local directory or `s3://` (the `s3` build feature); an S3 location is probed once
//! at start-up within `--storage-timeout`, so a missing bucket, refused credentials or an
//! unreachable endpoint is a one-line error naming the setting ([`crate::delta::storage`]).
//!
//! Layers, each importing only from those below it:
//! 1. [`crate::delta`]: Delta tables, commits with txn offsets, deletion vectors, maintenance of
//!    one table, object-store probing.
//! 2. The catalogue: [`decode`] (Avro → Arrow layouts), [`checks`], [`reconciled`] and
//!    [`executions`] (row layouts), [`catalog`] (the tables and their schemas), [`layout`]
//!    (layout versions), [`tables`] (`Table` of a `TableKind`), [`namespace_guard`].
//! 3. The copy-on-write upsert engine: [`upsert`].
//! 4. Materialize: [`buffer`], [`deadletter`], [`log_check`], [`offsets`], [`consumer`],
//!    [`expiry_guard`], [`flush`], [`lag`], [`maintain`], [`bench`], and this module's loop.

pub mod bench;
pub mod buffer;
pub mod catalog;
pub mod checks;
pub mod config;
pub mod consumer;
pub mod deadletter;
pub mod decode;
pub mod executions;
pub mod expiry_guard;
pub mod flush;
pub mod lag;
pub mod layout;
pub mod log_check;
pub mod maintain;
pub mod namespace_guard;
pub mod offsets;
pub mod reconciled;
pub mod tables;
pub mod upsert;

use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;

use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::error::KafkaError as RdKafkaError;
use rdkafka::message::Message;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::types::RDKafkaErrorCode;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub use config::{MaintainArgs, MaintainConfig, MaterializeArgs, MaterializeConfig, TableArgs};
pub use offsets::{lag, namespace, wait_caught_up};
pub use tables::{read_table, TableKind};

use buffer::{Buffers, Incoming, Role};
use consumer::{Check, Ctx, Cursor, LogStart, RebalanceEvent, StartSource};
use flush::Pipeline;
use lag::LagWatch;

use crate::kafka::{KafkaConfig, KafkaError};
use crate::metrics;

/// Errors of the materializer.
#[derive(Debug, thiserror::Error)]
pub enum MaterializeError {
    /// Kafka client trouble.
    #[error(transparent)]
    Kafka(#[from] KafkaError),
    /// Delta table trouble.
    #[error(transparent)]
    Table(Box<tables::TableError>),
    /// Offsets were lost before we read them: retention (or the embedded broker's ~5 MiB per
    /// partition) removed them. The tables are consistent but miss those events.
    #[error("offsets of {topic}/{partition} from {expected} are gone (log starts at {log_start}): events were lost before materialize read them; raise retention or keep materialize running")]
    OffsetOutOfRange {
        topic: String,
        partition: i32,
        expected: i64,
        log_start: i64,
    },
    /// The log of a partition is not the one the tables were written from: the topic was
    /// deleted and recreated, or its log truncated (see [`log_check`]).
    #[error("{topic}/{partition}: the tables hold offsets up to {last}, but {why}: the topic was deleted and recreated, or its log truncated (unclean leader election). Nothing was written. Materialize the new log into new tables (another --table-uri), or under a new offset namespace (--offsets-namespace NAME with --allow-namespace-change) to keep these tables; never reuse the old offsets")]
    LogReplaced {
        topic: String,
        partition: i32,
        last: i64,
        why: String,
    },
    /// The consumer reported that its position is out of range.
    /// A value's writer schema could not be fetched from the schema registry.
    #[error("{0}; stopping before that message (nothing was written; restart once the registry answers)")]
    SchemaRegistry(#[from] crate::schema_registry::SchemaRegistryError),
    #[error("consumer position out of range ({0}): events were lost before materialize read them")]
    OutOfRange(String),
    /// Too many commit conflicts in a row.
    #[error("table {table}: {attempts} commit conflicts in a row; too many writers?")]
    Contention { table: &'static str, attempts: usize },
    /// A deadline passed.
    #[error("timed out: {0}")]
    Timeout(String),
    /// A background task failed.
    #[error("background task failed: {0}")]
    Task(String),
    /// A rebalance could not be applied exactly (start offsets unreadable, or librdkafka
    /// refused the assignment): the member stops rather than start a partition anywhere but at
    /// its Delta version + 1. Nothing uncommitted was written; a restart resumes exactly.
    #[error("rebalance failed: {0}; stopping (restart the member; the tables are consistent)")]
    Rebalance(String),
    /// The tables were written under another offset namespace (Kafka cluster id or
    /// `--offsets-namespace`): starting would re-read every partition from offset 0.
    #[error("table {table} under {uri} was written under offsets namespace {recorded:?}, this materializer's is {namespace:?} (the Kafka cluster id or --offsets-namespace), so it would append every event again; pass --offsets-namespace {recorded} if this is the same cluster, or --allow-namespace-change (POSSYNC_ALLOW_NAMESPACE_CHANGE) if the cluster is new")]
    NamespaceChanged {
        uri: String,
        table: &'static str,
        recorded: String,
        namespace: String,
    },
    /// Idle partitions would be re-stamped too rarely to outlive a table's txn retention.
    #[error("--txn-restamp-every {every:?} is more than half of table {table}'s delta.setTransactionRetentionDuration ({retention:?}): an idle partition's stored offset could expire; lower --txn-restamp-every")]
    RestampTooRare {
        table: &'static str,
        every: std::time::Duration,
        retention: std::time::Duration,
    },
    /// A message arrived for an assigned partition this member holds no start offset for.
    #[error("message of {topic}/{partition} without a known start offset; stopping (restart the member; the tables are consistent)")]
    Unpositioned { topic: String, partition: i32 },
}

impl From<tables::TableError> for MaterializeError {
    fn from(e: tables::TableError) -> Self {
        MaterializeError::Table(Box::new(e))
    }
}

/// Runs the materializer until `shutdown` is cancelled, then flushes and commits what it holds.
///
/// # Errors
/// [`MaterializeError`] on Kafka, Delta, lost offsets; the tables stay consistent (a restart
/// resumes exactly).
pub async fn run(
    cfg: MaterializeConfig,
    kafka: KafkaConfig,
    shutdown: CancellationToken,
) -> Result<(), MaterializeError> {
    run_with_progress(cfg, kafka, shutdown, watch::channel(Progress::default()).0).await
}

/// What a running materializer has done so far (see [`run_with_progress`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Progress {
    /// Messages taken from Kafka (rows and dead letters).
    pub consumed: u64,
    /// Messages buffered, not yet committed.
    pub buffered: usize,
    /// Flushes committed.
    pub flushes: u64,
    /// Partitions assigned to this member now (after the last rebalance it applied).
    pub assigned: usize,
    /// This member runs the group's scheduled maintenance: it holds partition 0 of the active
    /// topic (see [`maintain::every`]).
    pub maintainer: bool,
    /// Scheduled maintenance passes this member has run.
    pub maintained: u64,
}

/// [`run`], reporting [`Progress`] on `progress` (for `possync run` and tests: "has it seen
/// what I produced?"). For "is it in the tables?", use [`wait_caught_up`].
///
/// # Errors
/// As [`run`].
pub async fn run_with_progress(
    cfg: MaterializeConfig,
    kafka: KafkaConfig,
    shutdown: CancellationToken,
    progress: watch::Sender<Progress>,
) -> Result<(), MaterializeError> {
    let ns = namespace(&kafka, cfg.offsets_namespace.as_deref()).await?;
    tracing::info!(tables = %cfg.table_uri, group = %cfg.group, namespace = %ns, "materialize starting");
    let maintenance = cfg.maintain_every.map(|period| {
        let mcfg = MaintainConfig {
            table_uri: cfg.table_uri.clone(),
            ..MaintainConfig::default()
        };
        (mcfg, period)
    });
    let passes = progress.clone();
    let assignment = progress.subscribe();
    let mut m = Materializer::open(cfg, kafka, ns, progress).await?;
    // Maintenance lives exactly as long as this materializer: a child token stops it on
    // shutdown and also when the consume loop fails. Of a group, only the member whose turn it
    // is (Kafka's assignment decides) runs it.
    let stop = shutdown.child_token();
    let maintainer = maintenance.map(|(mcfg, period)| {
        let my_turn = move || assignment.borrow().maintainer;
        let done = move || {
            metrics::global().maintenance_passes.fetch_add(1, Relaxed);
            passes.send_modify(|p| p.maintained += 1);
        };
        tokio::spawn(maintain::every(mcfg, period, stop.clone(), my_turn, done))
    });
    let result = m.run(&shutdown).await;
    stop.cancel();
    if let Some(task) = maintainer {
        if let Err(e) = task.await {
            tracing::warn!(error = %e, "scheduled maintenance task ended abnormally");
        }
    }
    if let Err(e) = &result {
        tracing::error!(error = %e, "materialize stopped");
    }
    result
}

struct Materializer {
    cfg: MaterializeConfig,
    consumer: StreamConsumer<Ctx>,
    pipeline: Pipeline,
    buffers: Buffers,
    cursors: HashMap<(Role, i32), Cursor>,
    roles: [(String, Role); 4],
    progress: watch::Sender<Progress>,
    lag: LagWatch,
}

impl Materializer {
    async fn open(
        cfg: MaterializeConfig,
        kafka: KafkaConfig,
        ns: String,
        progress: watch::Sender<Progress>,
    ) -> Result<Self, MaterializeError> {
        let t = kafka.topics.clone();
        // The dead-letter topic copy is best effort (the table is the record): give up on a
        // send after 30 s rather than the producer default of 5 min, unless -K says otherwise.
        let mut pc = kafka.producer();
        if !kafka.overrides_setting(crate::kafka::Role::Producer, "message.timeout.ms") {
            pc.set("message.timeout.ms", "30000");
        }
        let buffers = Buffers::new(&ns);
        let mut pipeline = Pipeline::open(
            &cfg.table_uri,
            ns.clone(),
            t.clone(),
            cfg.checkpoint_every,
            pc,
            &cfg.state_dir,
        )
        .await?;
        pipeline.set_closed_retention(cfg.closed_retention, expiry_guard::ExpiryGuard::new(&kafka));
        // Before anything is consumed: a changed namespace would re-append every event.
        namespace_guard::check(&mut pipeline.tables, &cfg.table_uri, &ns, cfg.allow_namespace_change).await?;
        // Older tables take this build's in-place layout steps before anything is written.
        layout::upgrade_in_place(&mut pipeline.tables, &cfg.table_uri).await?;
        for t in pipeline.tables.values() {
            if let Some(retention) = t.txn_retention()? {
                if cfg.txn_restamp_every * 2 > retention {
                    return Err(MaterializeError::RestampTooRare {
                        table: t.kind.name(),
                        every: cfg.txn_restamp_every,
                        retention,
                    });
                }
            }
        }
        // Each assignment reads its start offsets from the tables at that moment (see `consumer`).
        let starts: Box<dyn StartSource> = if cfg.replay_from_beginning {
            Box::new(LogStart)
        } else {
            Box::new(offsets::DeltaStarts::spawn(cfg.table_uri.clone(), ns, kafka.clone())?)
        };
        let mut cc = kafka.consumer(&cfg.group);
        // Lost offsets are an error, never a silent jump (see `consumer`).
        cc.set("auto.offset.reset", "error");
        // librdkafka's default fetch wait (500 ms) would dominate the produce → visible latency.
        if !kafka.overrides_setting(crate::kafka::Role::Consumer, "fetch.wait.max.ms") {
            cc.set("fetch.wait.max.ms", "50");
        }
        // librdkafka pre-fetches up to 64 MiB by default, and keeps a ~300-byte op per message
        // on top (not counted in that limit). 8 MiB of values (~0.25 s of a catch-up) keeps the
        // consumer fed: at 1M keys the catch-up rate was the same as with 16 MiB and the RSS
        // peak ~20 MiB lower.
        if !kafka.overrides_setting(crate::kafka::Role::Consumer, "queued.max.messages.kbytes") {
            cc.set("queued.max.messages.kbytes", "8192");
        }
        // When that queue is full librdkafka waits `fetch.queue.backoff.ms` (default 1 s) before
        // it fetches the partition again: a catch-up then idles in 1 s steps. 20 ms measured
        // 1.7x the wall-clock catch-up rate at 1M keys, and a lower RSS peak.
        if !kafka.overrides_setting(crate::kafka::Role::Consumer, "fetch.queue.backoff.ms") {
            cc.set("fetch.queue.backoff.ms", "20");
        }
        let consumer: StreamConsumer<Ctx> = cc
            .create_with_context(Ctx::new(starts))
            .map_err(KafkaError::client("create consumer"))?;
        // A missing executions topic (tables of an older release, topics not yet re-created)
        // does not stop the positions: librdkafka reports it and the group assigns the rest.
        // `possync materialize` itself refuses to start without it (`topics::require`).
        consumer
            .subscribe(&offsets::input_topics(&t))
            .map_err(KafkaError::client("subscribe"))?;
        let roles = [
            (t.active.clone(), Role::Active),
            (t.queued.clone(), Role::Queued),
            (t.registry.clone(), Role::Registry),
            (t.executions.clone(), Role::Executions),
        ];
        Ok(Self {
            cfg,
            consumer,
            pipeline,
            buffers,
            cursors: HashMap::new(),
            roles,
            progress,
            lag: LagWatch::default(),
        })
    }

    async fn run(&mut self, shutdown: &CancellationToken) -> Result<(), MaterializeError> {
        let every = self.cfg.txn_restamp_every;
        let mut restamp = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        restamp.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut report = tokio::time::interval(LAG_REPORT_EVERY);
        report.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            let deadline = self
                .buffers
                .deadline(self.cfg.flush_latency)
                .map(tokio::time::Instant::from_std);
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                _ = sleep_until(deadline) => self.flush().await?,
                _ = self.consumer.context().rebalanced() => self.rebalanced()?,
                _ = restamp.tick() => self.restamp().await?,
                _ = report.tick() => self.report_lag(),
                msg = self.consumer.recv() => {
                    // Fields, not `self`: the message borrows the consumer.
                    if handle_rebalance(&self.consumer, &mut self.cursors, &mut self.buffers, &mut self.lag, &self.roles)? {
                        self.assignment_changed();
                    }
                    match msg {
                        Ok(m) => {
                            // A value of a writer schema this process has not seen: learn it
                            // from the schema registry first (no-op without one).
                            crate::schema_registry::learn_writer_of(m.payload()).await?;
                            let before = self.buffers.messages();
                            take(&self.consumer, &mut self.buffers, &mut self.cursors, &self.roles, &m)?;
                            if self.buffers.messages() > before {
                                if let Some(role) = role_of(&self.roles, m.topic()) {
                                    self.lag.taken(role, m.partition(), m.timestamp().to_millis(), now_ms());
                                }
                            }
                        }
                        Err(e) => {
                            consumer_error(e)?;
                            continue;
                        }
                    }
                    metrics::global().buffered.store(self.buffers.messages() as i64, Relaxed);
                    if self.progress.receiver_count() > 0 {
                        let buffered = self.buffers.messages();
                        self.progress.send_modify(|p| {
                            p.consumed += 1;
                            p.buffered = buffered;
                        });
                    }
                    if self.buffers.messages() >= self.cfg.flush_events || self.buffers.bytes() >= self.cfg.flush_bytes {
                        self.flush().await?;
                    }
                }
            }
        }
        tracing::info!(
            buffered = self.buffers.messages(),
            "shutdown: committing what is buffered"
        );
        let flushed = self.flush().await;
        metrics::global().set_partitions(Vec::new());
        flushed
    }

    /// Exports the owned partitions' lag ([`LagWatch`] plus the high watermark Kafka last
    /// reported and the consumer's position, both known locally without a broker round trip).
    fn report_lag(&mut self) {
        let positions = self.consumer.position().ok();
        let rows = self.lag.rows(|topic, role, partition| {
            let high = cached_high_watermark(&self.consumer, topic, partition)?;
            let fetched = positions
                .as_ref()
                .and_then(|tpl| tpl.find_partition(topic, partition))
                .and_then(|e| match e.offset() {
                    Offset::Offset(n) => Some(n),
                    _ => None,
                });
            // Before the first message the position is the start the tables gave.
            let position = fetched.or_else(|| self.cursors.get(&(role, partition)).and_then(|c| c.next))?;
            Some(high - position)
        });
        metrics::global().set_partitions(rows);
    }

    /// Applies the rebalance events recorded since the last call.
    fn rebalanced(&mut self) -> Result<(), MaterializeError> {
        if handle_rebalance(
            &self.consumer,
            &mut self.cursors,
            &mut self.buffers,
            &mut self.lag,
            &self.roles,
        )? {
            self.assignment_changed();
        }
        Ok(())
    }

    /// Publishes a new assignment: its size, and whether this member now holds the
    /// maintenance turn (partition 0 of the active topic, which the group assigns to exactly
    /// one member, and to another one when that member dies or leaves).
    fn assignment_changed(&self) {
        let assigned = self.cursors.len();
        let maintainer = self.cursors.contains_key(&(Role::Active, 0));
        self.progress.send_modify(|p| {
            p.assigned = assigned;
            p.maintainer = maintainer;
        });
        metrics::global().maintenance_turn.store(i64::from(maintainer), Relaxed);
    }

    /// Re-stamps the txn actions of the owned partitions not written for a restamp period (see
    /// [`flush::Pipeline::restamp`]): idle partitions keep their stored offsets alive.
    async fn restamp(&mut self) -> Result<(), MaterializeError> {
        self.rebalanced()?;
        let owned: Vec<(String, i32)> = self
            .cursors
            .keys()
            .filter_map(|(role, p)| {
                let topic = self.roles.iter().find(|(_, r)| r == role).map(|(t, _)| t.clone());
                topic.map(|t| (t, *p))
            })
            .collect();
        self.pipeline.restamp(&owned, self.cfg.txn_restamp_every).await?;
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), MaterializeError> {
        self.rebalanced()?;
        let parts = self.buffers.freeze().map_err(|source| tables::TableError::Arrow {
            table: "buffers",
            source,
        })?;
        if parts.is_empty() {
            return Ok(());
        }
        let started = std::time::Instant::now();
        self.pipeline.commit(&parts).await?;
        trim_heap();
        let mut tpl = TopicPartitionList::new();
        for part in &parts {
            let _ = tpl.add_partition_offset(&part.topic, part.partition, Offset::Offset(part.last_offset + 1));
        }
        // Kafka's committed offsets are for lag monitoring only; Delta is the truth.
        if let Err(e) = self.consumer.commit(&tpl, CommitMode::Async) {
            tracing::debug!(error = %e, "committing offsets to Kafka (monitoring only) failed");
        }
        metrics::global().buffered.store(0, Relaxed);
        let now = now_ms();
        for part in &parts {
            self.lag.committed(part.role, part.partition, now);
        }
        self.report_lag();
        self.progress.send_modify(|p| {
            p.buffered = 0;
            p.flushes += 1;
        });
        let rows: usize = parts.iter().map(|p| p.rows.num_rows()).sum();
        tracing::debug!(
            rows,
            partitions = parts.len(),
            took_ms = started.elapsed().as_millis() as u64,
            "flushed"
        );
        Ok(())
    }
}

/// The high watermark librdkafka last got from a fetch response of `topic`/`partition`
/// (`rd_kafka_get_watermark_offsets`: local, no broker round trip; the rdkafka crate only wraps
/// the querying variant). `None` while none is known.
fn cached_high_watermark(consumer: &StreamConsumer<Ctx>, topic: &str, partition: i32) -> Option<i64> {
    let topic = std::ffi::CString::new(topic).ok()?;
    let (mut low, mut high) = (-1i64, -1i64);
    // SAFETY: the client pointer lives as long as `consumer`; the call only reads librdkafka's
    // cached offsets of the partition into the two locals.
    let err = unsafe {
        rdkafka::bindings::rd_kafka_get_watermark_offsets(
            consumer.client().native_ptr(),
            topic.as_ptr(),
            partition,
            &mut low,
            &mut high,
        )
    };
    (err == rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR && high >= 0).then_some(high)
}

/// How often the owned partitions' lag is exported to `/metrics` (and after every commit).
const LAG_REPORT_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

fn role_of(roles: &[(String, Role); 4], topic: &str) -> Option<Role> {
    roles.iter().find(|(t, _)| t == topic).map(|(_, r)| *r)
}

fn handle_rebalance(
    consumer: &StreamConsumer<Ctx>,
    cursors: &mut HashMap<(Role, i32), Cursor>,
    buffers: &mut Buffers,
    lag: &mut LagWatch,
    roles: &[(String, Role); 4],
) -> Result<bool, MaterializeError> {
    let events = consumer.context().take_events();
    let changed = !events.is_empty();
    for ev in events {
        match ev {
            RebalanceEvent::Assigned(parts) => {
                for (t, p, start) in parts {
                    if let Some(r) = role_of(roles, &t) {
                        buffers.drop_partition(r, p);
                        cursors.insert((r, p), Cursor { next: start });
                        lag.assigned(&t, r, p, now_ms());
                    }
                }
            }
            RebalanceEvent::Revoked(parts) => {
                for (t, p) in parts {
                    if let Some(r) = role_of(roles, &t) {
                        buffers.drop_partition(r, p);
                        cursors.remove(&(r, p));
                        lag.revoked(r, p);
                    }
                }
            }
            // Nothing buffered is committed: the partitions' next owner starts from Delta.
            RebalanceEvent::Fatal(why) => return Err(MaterializeError::Rebalance(why)),
            RebalanceEvent::Stop(e) => return Err(*e),
        }
    }
    Ok(changed)
}

fn take(
    consumer: &StreamConsumer<Ctx>,
    buffers: &mut Buffers,
    cursors: &mut HashMap<(Role, i32), Cursor>,
    roles: &[(String, Role); 4],
    m: &rdkafka::message::BorrowedMessage<'_>,
) -> Result<(), MaterializeError> {
    let Some(role) = role_of(roles, m.topic()) else {
        return Ok(());
    };
    let (partition, offset) = (m.partition(), m.offset());
    let Some(cursor) = cursors.get_mut(&(role, partition)) else {
        return unpositioned(consumer, m.topic(), partition);
    };
    match cursor.check(offset) {
        Check::Take => {}
        Check::Skip => return Ok(()),
        Check::Gap { expected } => {
            // Only compaction (the registry topic) and transaction markers leave gaps inside a
            // log; records lost to retention or eviction come before the log start, and
            // fetching below it fails loudly (`auto.offset.reset=error`, see `consumer_error`).
            // So a gap needs no broker round trip: replaying a compacted topic meets thousands.
            tracing::debug!(
                topic = m.topic(),
                partition,
                expected,
                got = offset,
                "offset gap (compaction or transaction markers)"
            );
        }
    }
    if cursor.next.is_none() && offset > 0 {
        tracing::warn!(
            topic = m.topic(),
            partition,
            first = offset,
            "partition new to the tables starts at a non-zero offset"
        );
    }
    cursor.next = Some(offset + 1);
    // A producer may set any timestamp; outside the tables' range it is recorded as unknown.
    let timestamp = m
        .timestamp()
        .to_millis()
        .and_then(|ms| ms.checked_mul(1000))
        .filter(|us| checks::timestamp_in_range(*us));
    let incoming = Incoming {
        role,
        topic: m.topic(),
        partition,
        offset,
        timestamp,
        key: m.key(),
        value: m.payload(),
    };
    if let Some(error) = buffers.push(&incoming) {
        tracing::warn!(topic = m.topic(), partition, offset, %error, "dead letter");
    }
    Ok(())
}

/// A message of a partition without a cursor: a late message of a partition revoked in the
/// meantime is skipped; one of a partition still assigned means its start offset is unknown,
/// so taking it could commit a version that covers offsets never read: stop.
fn unpositioned(consumer: &StreamConsumer<Ctx>, topic: &str, partition: i32) -> Result<(), MaterializeError> {
    let assigned = consumer
        .assignment()
        .map_err(KafkaError::client("read the assignment"))?
        .find_partition(topic, partition)
        .is_some();
    if assigned {
        return Err(MaterializeError::Unpositioned {
            topic: topic.to_string(),
            partition,
        });
    }
    tracing::debug!(topic, partition, "message of a revoked partition skipped");
    Ok(())
}

fn consumer_error(e: RdKafkaError) -> Result<(), MaterializeError> {
    match e.rdkafka_error_code() {
        Some(RDKafkaErrorCode::AutoOffsetReset | RDKafkaErrorCode::OffsetOutOfRange) => {
            Err(MaterializeError::OutOfRange(e.to_string()))
        }
        _ => {
            tracing::warn!(error = %e, "consumer error (librdkafka retries)");
            Ok(())
        }
    }
}

/// Returns freed heap pages to the OS, at most every 10 s: glibc keeps what a big flush (or the
/// catch-up) freed in its arenas, so RSS would otherwise stay at its peak.
fn trim_heap() {
    static LAST: std::sync::Mutex<Option<std::time::Instant>> = std::sync::Mutex::new(None);
    let mut last = LAST.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if last.is_some_and(|t| t.elapsed() < std::time::Duration::from_secs(10)) {
        return;
    }
    *last = Some(std::time::Instant::now());
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}
