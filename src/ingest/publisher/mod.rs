//! Publishing position events to Kafka with bounded memory.
//!
//! Modelled on vector's Kafka sink: the producer is idempotent with `acks=all`; at most
//! `max_in_flight` events are sent but unacknowledged at once (a semaphore permit travels with
//! each one until its delivery report arrives); when none is free, [`Publisher::publish`]
//! waits, so the caller stops reading IB — backpressure instead of an unbounded buffer. A full
//! librdkafka queue is retried after a short pause, never dropped. Every event gets the next
//! sequence number of this publisher's session, so a consumer can spot gaps. A delivery that
//! fails for good (after librdkafka's own retries, `message.timeout.ms`) is counted
//! (`possync_delivery_failures_total`) and reported through [`Publisher::failed`] so the owner
//! can republish that position's current state.
//!
//! **Fencing** ([`Publisher::transactional`], what ingest and the queue worker use): the producer
//! is transactional with a `transactional.id` fixed per role (`<topic-prefix>ingest`,
//! `<topic-prefix>queue-worker`). Creating it (`init_transactions`) makes the broker abort the
//! previous holder's open transaction and bump the producer epoch: a predecessor that was paused
//! (SIGSTOP, a frozen VM) and wakes up has every later send and commit refused
//! (`ProducerFenced`), so nothing it publishes after its successor began counts anywhere
//! (consumers read `read_committed`, librdkafka's default). Events go into a transaction that a
//! committer task commits every `txn_interval` (100 ms by default) while events are pending;
//! an aborted transaction (a delivery failed) reports each of its positions through
//! [`Publisher::failed`] for republishing, and a fenced publisher cancels
//! [`Publisher::stopped`], refuses every later event with [`PublishError::Fenced`], and
//! counts what it was refused (`possync_producer_refused_total`). librdkafka raises other fatal
//! errors too, with no successor behind them (`INVALID_TXN_STATE` when an abort meets a
//! transaction the coordinator already ended after an outage, an authorization failure): the
//! publisher stops the same way but says [`PublishError::ProducerFailed`]
//! (`possync_producer_failed_total`), and its owner starts again with a new producer.
//!
//! Invariants that keep a Kafka outage from hanging the caller:
//! - a permit is released as soon as librdkafka reports the delivery, success or failure:
//!   the delivery task never waits for the owner, since failures go to a map keyed by position
//!   (bounded by the number of positions; a newer failure of the same position replaces the
//!   older one, as only the position's current state is republished);
//! - librdkafka reports every message within `message.timeout.ms`, so a wait for a permit is
//!   bounded by it, and every wait also ends at once when the shutdown token is cancelled
//!   ([`PublishError::Cancelled`]).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::error::{KafkaError as RdKafkaError, RDKafkaErrorCode};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::book::PosKey;
use crate::events::{EventError, PositionEvent, Route};
use crate::kafka::{KafkaConfig, KafkaError, Topics};
use crate::metrics;

mod exec;
mod txn;

use txn::{committer, end_txn, Pending, Txn};

/// Errors of the publisher.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The producer could not be created.
    #[error(transparent)]
    Kafka(#[from] KafkaError),
    /// An event does not fit the schema (a bug: please report it with the event).
    #[error("cannot encode a position event: {0}")]
    Encode(#[from] EventError),
    /// librdkafka refused a message for a reason other than a full queue.
    #[error("Kafka producer refused a message: {0}; check the broker settings and -K overrides")]
    Send(RdKafkaError),
    /// Not every event was acknowledged before the flush deadline.
    #[error("{0} events still unacknowledged after the flush timeout; is Kafka reachable?")]
    FlushTimeout(usize),
    /// Shutdown was requested while waiting for Kafka; the event was not sent.
    #[error("publishing stopped: shutdown requested")]
    Cancelled,
    /// Another process with the same transactional id started: this one must stop publishing.
    #[error("fenced: another process with transactional id {0:?} took over (a successor after a pause or a lost lease, or a second process of the same role on these topics); this one stops publishing")]
    Fenced(String),
    /// librdkafka raised a fatal error that is not a fence: this producer can publish nothing
    /// more, but no successor took over. A new producer (of the same transactional id) is needed.
    #[error("the Kafka producer of {id:?} failed for good ({reason}) with no successor behind it; a new producer must take over")]
    ProducerFailed {
        /// The transactional id.
        id: String,
        /// librdkafka's fatal error.
        reason: String,
    },
    /// A Kafka transaction could not be started or ended.
    #[error("Kafka transaction of {id:?}: {source}; is Kafka reachable, and does the cluster allow transactions (transaction.state.log.* settings, ACLs on the transactional id)?")]
    Txn {
        /// The transactional id.
        id: String,
        /// librdkafka's error.
        #[source]
        source: RdKafkaError,
    },
}

impl PublishError {
    /// Whether this is [`PublishError::Cancelled`] (a requested stop, not a failure).
    pub fn is_cancelled(&self) -> bool {
        matches!(self, PublishError::Cancelled)
    }

    /// Whether this is [`PublishError::Fenced`] (a successor took over).
    pub fn is_fenced(&self) -> bool {
        matches!(self, PublishError::Fenced(_))
    }

    /// Whether the publisher can publish nothing more ([`PublishError::Fenced`] or
    /// [`PublishError::ProducerFailed`]): its owner needs a new one, or must stand down.
    pub fn is_producer_lost(&self) -> bool {
        matches!(self, PublishError::Fenced(_) | PublishError::ProducerFailed { .. })
    }
}

/// A delivery that failed for good.
#[derive(Debug)]
pub struct Failure {
    /// The position the event was about.
    pub key: PosKey,
    /// The event's sequence number (now a gap in the session).
    pub sequence: i64,
    /// Why.
    pub error: RdKafkaError,
    /// The event that was lost.
    pub event: PositionEvent,
}

/// Latencies of the active route, IB frame to broker acknowledgement, in microseconds.
pub type LatencyLog = Arc<Mutex<Vec<u32>>>;

/// Delivery counts of one publisher (the process-wide ones are in [`crate::metrics`]).
#[derive(Debug, Default)]
pub struct PublishStats {
    /// Events handed to librdkafka.
    pub sent: AtomicU64,
    /// Events acknowledged by Kafka.
    pub delivered: AtomicU64,
    /// Events Kafka did not acknowledge for good (their positions get republished).
    pub delivery_failures: AtomicU64,
    /// Events in committed transactions (transactional publishers only): when it equals
    /// `sent`, everything sent so far is visible to `read_committed` consumers.
    pub committed: AtomicU64,
}

/// Failed deliveries not yet taken by the owner, the latest per position; and the exec ids of
/// executions not delivered (a handful a day: bounded by the day's fills).
#[derive(Default)]
struct FailedDeliveries {
    by_key: Mutex<BTreeMap<PosKey, Failure>>,
    notify: Notify,
    executions: Mutex<Vec<String>>,
    executions_notify: Notify,
}

impl FailedDeliveries {
    fn push(&self, failure: Failure) {
        let mut map = self.by_key.lock().unwrap_or_else(|p| p.into_inner());
        match map.get(&failure.key) {
            Some(old) if old.sequence > failure.sequence => {}
            _ => {
                map.insert(failure.key.clone(), failure);
            }
        }
        drop(map);
        self.notify.notify_one();
    }

    fn take(&self) -> Vec<Failure> {
        let mut map = self.by_key.lock().unwrap_or_else(|p| p.into_inner());
        std::mem::take(&mut *map).into_values().collect()
    }

    fn push_execution(&self, exec_id: String) {
        self.executions.lock().unwrap_or_else(|p| p.into_inner()).push(exec_id);
        self.executions_notify.notify_one();
    }

    fn take_executions(&self) -> Vec<String> {
        std::mem::take(&mut *self.executions.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

/// A session's producer: sequence numbers, bounded in-flight, delivery tracking.
pub struct Publisher {
    producer: FutureProducer,
    txn: Option<Arc<Txn>>,
    topics: Topics,
    permits: Arc<Semaphore>,
    max_in_flight: usize,
    session_id: String,
    next_sequence: i64,
    /// Executions are numbered apart, so the position topics' sequences stay gapless.
    next_exec_sequence: i64,
    failed: Arc<FailedDeliveries>,
    stats: Arc<PublishStats>,
    shutdown: CancellationToken,
    latency: Option<LatencyLog>,
}

const MAX_LATENCY_SAMPLES: usize = 1 << 20;

/// How long one commit or abort call may block (a thread of the blocking pool) before it is
/// retried: short, so that a stop during a Kafka outage is not held up by it.
const TXN_CALL_TIMEOUT: Duration = Duration::from_secs(5);

impl Publisher {
    /// A publisher with a fresh session id.
    ///
    /// # Errors
    /// [`PublishError::Kafka`] when librdkafka rejects the configuration.
    pub fn new(kafka: &KafkaConfig, max_in_flight: usize, record_latency: bool) -> Result<Self, PublishError> {
        Self::new_with(kafka, kafka.realtime_producer(), max_in_flight, record_latency)
    }

    fn new_with(
        kafka: &KafkaConfig,
        config: rdkafka::ClientConfig,
        max_in_flight: usize,
        record_latency: bool,
    ) -> Result<Self, PublishError> {
        let producer: FutureProducer = config.create().map_err(KafkaError::client("create producer"))?;
        let max_in_flight = max_in_flight.max(1);
        Ok(Self {
            producer,
            txn: None,
            topics: kafka.topics.clone(),
            permits: Arc::new(Semaphore::new(max_in_flight)),
            max_in_flight,
            session_id: crate::events::new_id(),
            next_sequence: 1,
            next_exec_sequence: 1,
            failed: Arc::default(),
            stats: Arc::default(),
            shutdown: CancellationToken::new(),
            latency: record_latency.then(|| Arc::new(Mutex::new(Vec::new()))),
        })
    }

    /// A transactional publisher (see the module docs): creating it fences every earlier
    /// producer of `transactional_id` and aborts its open transaction. Its committer task
    /// commits the open transaction every `interval` while events are pending.
    ///
    /// # Errors
    /// [`PublishError::Kafka`] when librdkafka rejects the configuration,
    /// [`PublishError::Txn`] when the transactions cannot be initialised within `timeout`.
    pub async fn transactional(
        kafka: &KafkaConfig,
        transactional_id: &str,
        interval: Duration,
        timeout: Duration,
        max_in_flight: usize,
        record_latency: bool,
    ) -> Result<Self, PublishError> {
        let config = kafka.transactional_producer(transactional_id);
        let expires = config
            .get("transaction.timeout.ms")
            .and_then(|ms| ms.parse().ok())
            .map_or(Duration::from_secs(60), Duration::from_millis);
        let mut publisher = Self::new_with(kafka, config, max_in_flight, record_latency)?;
        let producer = publisher.producer.clone();
        let id = transactional_id.to_string();
        let started = Instant::now();
        tokio::task::spawn_blocking(move || {
            producer.init_transactions(timeout)?;
            producer.begin_transaction()
        })
        .await
        .map_err(|_| PublishError::Txn {
            id: id.clone(),
            source: RdKafkaError::Canceled,
        })
        .and_then(|r| r.map_err(|source| PublishError::Txn { id: id.clone(), source }))?;
        tracing::info!(transactional_id = %id, took = ?started.elapsed(), "transactional producer ready (earlier producers of this id are fenced)");
        let txn = Arc::new(Txn {
            id,
            gate: tokio::sync::RwLock::new(()),
            open: Mutex::new(Vec::new()),
            stopped: CancellationToken::new(),
            stop: std::sync::OnceLock::new(),
            closed: CancellationToken::new(),
            timeout: timeout.min(TXN_CALL_TIMEOUT),
            expires,
            began: Mutex::new(Instant::now()),
            aborting: std::sync::atomic::AtomicBool::new(false),
            troubled: std::sync::atomic::AtomicBool::new(false),
            stats: publisher.stats.clone(),
        });
        publisher.txn = Some(txn.clone());
        tokio::spawn(committer(
            txn,
            publisher.producer.clone(),
            publisher.failed.clone(),
            publisher.latency.clone(),
            interval.max(Duration::from_millis(1)),
        ));
        Ok(publisher)
    }

    /// Cancelled once this (transactional) publisher stopped for good: the broker fenced it
    /// (a successor runs) or librdkafka raised another fatal error ([`Publisher::stop_error`]
    /// says which).
    pub fn stopped(&self) -> CancellationToken {
        self.txn
            .as_ref()
            .map_or_else(CancellationToken::new, |t| t.stopped.clone())
    }

    /// Why the publisher stopped for good ([`PublishError::Fenced`] or
    /// [`PublishError::ProducerFailed`]), once it did.
    pub fn stop_error(&self) -> Option<PublishError> {
        self.txn
            .as_deref()
            .filter(|t| t.stopped.is_cancelled())
            .map(Txn::refusal)
    }

    /// A fault-test knob: raises a fatal error in librdkafka, as the broker would (`fence`:
    /// the code of a fence, `_FENCED`; else `INVALID_TXN_STATE`). The next send or commit
    /// meets it and the publisher stops as it would for the real error.
    pub fn inject_fatal(&self, fence: bool, reason: &str) {
        use rdkafka::bindings::rd_kafka_resp_err_t as Code;
        let code = if fence {
            Code::RD_KAFKA_RESP_ERR__FENCED
        } else {
            Code::RD_KAFKA_RESP_ERR_INVALID_TXN_STATE
        };
        let reason = std::ffi::CString::new(reason.replace('\0', " ")).unwrap_or_default();
        // SAFETY: the client pointer is valid for the producer's life, which `self` holds;
        // librdkafka copies `reason`.
        unsafe {
            rdkafka::bindings::rd_kafka_test_fatal_error(self.producer.client().native_ptr(), code, reason.as_ptr());
        }
    }

    /// Makes every wait of [`Publisher::publish`] end with [`PublishError::Cancelled`] once
    /// `shutdown` is cancelled.
    #[must_use]
    pub fn with_shutdown(mut self, shutdown: CancellationToken) -> Self {
        self.shutdown = shutdown;
        self
    }

    /// This publisher's delivery counts.
    pub fn stats(&self) -> Arc<PublishStats> {
        self.stats.clone()
    }

    /// The topics it publishes to.
    pub fn topics(&self) -> &Topics {
        &self.topics
    }

    /// This session's id (stamped on every event).
    pub fn session_id(&self) -> &str {
        &self.session_id
    }

    /// The sequence number the next event gets.
    pub fn next_sequence(&self) -> i64 {
        self.next_sequence
    }

    /// Events sent but not acknowledged yet.
    pub fn in_flight(&self) -> usize {
        self.max_in_flight - self.permits.available_permits()
    }

    /// Waits until deliveries have failed for good, then takes them (the latest per position);
    /// the owner should republish those positions. Cancel-safe.
    pub fn failed(&self) -> impl std::future::Future<Output = Vec<Failure>> + Send + 'static {
        let failed = self.failed.clone();
        async move {
            loop {
                let notified = failed.notify.notified();
                let taken = failed.take();
                if !taken.is_empty() {
                    return taken;
                }
                notified.await;
            }
        }
    }

    /// Takes the failed deliveries reported so far, without waiting.
    pub fn take_failed(&self) -> Vec<Failure> {
        self.failed.take()
    }

    /// The latency samples recorded so far (when enabled).
    pub fn latency_log(&self) -> Option<LatencyLog> {
        self.latency.clone()
    }

    /// Stamps session and sequence on `event`, sends it to its route's topic, and returns its
    /// sequence number once librdkafka has queued it. Waits while `max_in_flight` events are
    /// unacknowledged. `observed` is when the IB frame behind it arrived (latency tracking).
    ///
    /// # Errors
    /// [`PublishError::Encode`] or [`PublishError::Send`]; [`PublishError::Cancelled`] when
    /// shutdown is requested while waiting. The sequence number is consumed only when the event
    /// was queued.
    pub async fn publish(&mut self, mut event: PositionEvent, observed: Option<Instant>) -> Result<i64, PublishError> {
        let (txn, permit) = self.admit().await?;
        let sequence = self.next_sequence;
        event.session_id.clone_from(&self.session_id);
        event.sequence = sequence;
        let payload = event.encode()?;
        let key = event.key();
        let route = event.route;
        let topic = match route {
            Route::Active => &self.topics.active,
            Route::Queued => &self.topics.queued,
        };
        let pending = || Pending::Position {
            key: PosKey::new(event.account.clone(), event.con_id),
            sequence,
            route,
            observed,
            event: Box::new(event.clone()),
        };
        let delivery = self.send(txn.as_deref(), topic, &key, &payload, pending).await?;
        self.next_sequence += 1;
        self.stats.sent.fetch_add(1, Relaxed);
        let failed = self.failed.clone();
        // With transactions an event counts (metrics, latency) when its transaction commits.
        let transactional = txn.is_some();
        let latency = self
            .latency
            .clone()
            .filter(|_| route == Route::Active && !transactional);
        track_delivery(
            delivery,
            permit,
            self.stats.clone(),
            move || {
                if !transactional {
                    count_published(route, 1);
                }
                if let (Some(log), Some(t)) = (latency, observed) {
                    record_latency(&log, t);
                }
            },
            move |error| {
                let key = PosKey::new(event.account.clone(), event.con_id);
                tracing::warn!(%key, sequence, %error, "Kafka did not acknowledge an event; its position will be republished");
                failed.push(Failure {
                    key,
                    sequence,
                    error,
                    event,
                });
            },
        );
        Ok(sequence)
    }

    /// The start of every send: refused at once when fenced, else a wait for an in-flight
    /// permit (ended by shutdown). Returns the transaction state and the permit.
    async fn admit(&self) -> Result<(Option<Arc<Txn>>, OwnedSemaphorePermit), PublishError> {
        let txn = self.txn.clone();
        if let Some(t) = txn.as_deref().filter(|t| t.stopped.is_cancelled()) {
            metrics::global().producer_refused.fetch_add(1, Relaxed);
            return Err(t.refusal());
        }
        let permit = tokio::select! {
            biased;
            _ = self.shutdown.cancelled() => return Err(PublishError::Cancelled),
            p = self.permits.clone().acquire_owned() => p.expect("publisher semaphore is never closed"),
        };
        Ok((txn, permit))
    }

    /// Sends one record (waiting out a full queue, ending a failed transaction and sending
    /// again); inside a transaction `pending` records it in the open transaction, under the
    /// gate, so a transaction never ends between a send and its record.
    async fn send(
        &self,
        txn: Option<&Txn>,
        topic: &str,
        key: &str,
        payload: &[u8],
        pending: impl Fn() -> Pending,
    ) -> Result<DeliveryFuture, PublishError> {
        let mut pause = Duration::from_millis(1);
        let mut resolves = 0u32;
        loop {
            // Sends hold the gate shared: a transaction never ends between a send and its
            // record in `open`.
            let gate = match txn {
                Some(t) => Some(tokio::select! {
                    biased;
                    _ = self.shutdown.cancelled() => return Err(PublishError::Cancelled),
                    g = t.gate.read() => g,
                }),
                None => None,
            };
            let record = FutureRecord::to(topic).key(key).payload(payload);
            match self.producer.send_result(record) {
                Ok(d) => {
                    if let Some(t) = txn {
                        let mut open = t.open.lock().unwrap_or_else(|p| p.into_inner());
                        if open.is_empty() {
                            *t.began.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
                        }
                        open.push(pending());
                    }
                    drop(gate);
                    return Ok(d);
                }
                Err((RdKafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    drop(gate);
                    tokio::select! {
                        biased;
                        _ = self.shutdown.cancelled() => return Err(PublishError::Cancelled),
                        _ = tokio::time::sleep(pause) => {}
                    }
                    pause = (pause * 2).min(Duration::from_millis(100));
                }
                Err((e, _)) => {
                    drop(gate);
                    // Refused for the transaction's state (`_STATE`: a commit or abort is due)
                    // or because the producer is fenced (`_FATAL`); anything else is final.
                    let txn_state = matches!(
                        e,
                        RdKafkaError::MessageProduction(RDKafkaErrorCode::State | RDKafkaErrorCode::Fatal)
                    );
                    let Some(t) = txn.filter(|_| txn_state) else {
                        return Err(PublishError::Send(e));
                    };
                    // The transaction is in an error state (a delivery failed, a commit timed
                    // out while Kafka is away): end it (which waits for Kafka: backpressure),
                    // then send again. A fenced or failed producer stops here (`end_txn`
                    // looks for a fatal error first).
                    resolves += 1;
                    if resolves > 1 {
                        tracing::debug!(error = %e, resolves, "send refused while the transaction recovers; retrying");
                    }
                    tokio::select! {
                        biased;
                        _ = self.shutdown.cancelled() => return Err(PublishError::Cancelled),
                        r = end_txn(t, &self.producer, &self.failed, self.latency.as_ref(), true) => r?,
                    }
                    if resolves > 1 {
                        tokio::select! {
                            biased;
                            _ = self.shutdown.cancelled() => return Err(PublishError::Cancelled),
                            _ = tokio::time::sleep(pause) => {}
                        }
                        pause = (pause * 2).min(Duration::from_secs(1));
                    }
                }
            }
        }
    }

    /// Waits until every event sent so far is acknowledged (or failed).
    ///
    /// # Errors
    /// [`PublishError::FlushTimeout`] when `timeout` passes first.
    pub async fn flush(&self, timeout: Duration) -> Result<(), PublishError> {
        let n = u32::try_from(self.max_in_flight).unwrap_or(u32::MAX);
        let deadline = tokio::time::Instant::now() + timeout;
        match tokio::time::timeout_at(deadline, self.permits.acquire_many(n)).await {
            Ok(Ok(all)) => drop(all),
            _ => return Err(PublishError::FlushTimeout(self.in_flight())),
        }
        let Some(t) = self.txn.as_deref() else {
            return Ok(());
        };
        // Commit what is open; an aborted transaction reports its events as failed, which
        // nobody republishes at shutdown: the next start reconciles them.
        let commit_all = async {
            loop {
                end_txn(t, &self.producer, &self.failed, self.latency.as_ref(), false).await?;
                // A commit Kafka has not confirmed yet put its events back: try again.
                if t.open.lock().unwrap_or_else(|p| p.into_inner()).is_empty() {
                    return Ok(());
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        };
        match tokio::time::timeout_at(deadline, commit_all).await {
            Ok(r) => r,
            Err(_) => Err(PublishError::FlushTimeout(
                t.open.lock().unwrap_or_else(|p| p.into_inner()).len(),
            )),
        }
    }

    /// Drops every event librdkafka has not sent yet and stops waiting for those on the wire
    /// (their delivery reports come back as failures, which nobody republishes); returns how
    /// many were unacknowledged. For a lost ingest lease: the new holder reconciles with IB,
    /// and anything this publisher delivered later would land after the new holder's events.
    pub fn abandon(&self) -> usize {
        if let Some(t) = &self.txn {
            // No commit after this: the open transaction is aborted by the successor's
            // init_transactions (or by the broker after `transaction.timeout.ms`).
            t.closed.cancel();
        }
        let unacknowledged = self.in_flight();
        self.producer
            .purge(rdkafka::producer::PurgeConfig::default().queue().inflight());
        unacknowledged
    }

    /// Flushes librdkafka's own queue (blocking); for shutdown after [`Publisher::flush`].
    pub fn close(&self, timeout: Duration) {
        let _ = self.producer.flush(timeout);
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        if let Some(t) = &self.txn {
            t.closed.cancel();
        }
    }
}

/// Waits for one delivery report off the caller's path: counts it, then runs `ok` or `lost`;
/// the in-flight permit is released whatever the outcome (nothing here waits for the owner).
fn track_delivery(
    delivery: DeliveryFuture,
    permit: OwnedSemaphorePermit,
    stats: Arc<PublishStats>,
    ok: impl FnOnce() + Send + 'static,
    lost: impl FnOnce(RdKafkaError) + Send + 'static,
) {
    tokio::spawn(async move {
        let result = match delivery.await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err((e, _))) => Err(e),
            Err(_) => Err(RdKafkaError::Canceled),
        };
        match result {
            Ok(()) => {
                stats.delivered.fetch_add(1, Relaxed);
                ok();
            }
            Err(error) => {
                stats.delivery_failures.fetch_add(1, Relaxed);
                metrics::global().delivery_failures.fetch_add(1, Relaxed);
                lost(error);
            }
        }
        drop(permit);
    });
}

fn count_published(route: Route, n: u64) {
    let m = metrics::global();
    match route {
        Route::Active => m.published_active.fetch_add(n, Relaxed),
        Route::Queued => m.published_queued.fetch_add(n, Relaxed),
    };
}

fn record_latency(log: &LatencyLog, since: Instant) {
    let mut log = log.lock().unwrap_or_else(|p| p.into_inner());
    if log.len() < MAX_LATENCY_SAMPLES {
        log.push(u32::try_from(since.elapsed().as_micros()).unwrap_or(u32::MAX));
    }
}
