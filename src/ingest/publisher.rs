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
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;

use super::book::PosKey;
use crate::events::{EventError, PositionEvent, Route};
use crate::kafka::{KafkaConfig, KafkaError, Topics};
use crate::metrics;

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
}

impl PublishError {
    /// Whether this is [`PublishError::Cancelled`] (a requested stop, not a failure).
    pub fn is_cancelled(&self) -> bool {
        matches!(self, PublishError::Cancelled)
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
}

/// Failed deliveries not yet taken by the owner, the latest per position.
#[derive(Default)]
struct FailedDeliveries {
    by_key: Mutex<BTreeMap<PosKey, Failure>>,
    notify: Notify,
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
}

/// A session's producer: sequence numbers, bounded in-flight, delivery tracking.
pub struct Publisher {
    producer: FutureProducer,
    topics: Topics,
    permits: Arc<Semaphore>,
    max_in_flight: usize,
    session_id: String,
    next_sequence: i64,
    failed: Arc<FailedDeliveries>,
    stats: Arc<PublishStats>,
    shutdown: CancellationToken,
    latency: Option<LatencyLog>,
}

const MAX_LATENCY_SAMPLES: usize = 1 << 20;

impl Publisher {
    /// A publisher with a fresh session id.
    ///
    /// # Errors
    /// [`PublishError::Kafka`] when librdkafka rejects the configuration.
    pub fn new(kafka: &KafkaConfig, max_in_flight: usize, record_latency: bool) -> Result<Self, PublishError> {
        let producer: FutureProducer = kafka
            .realtime_producer()
            .create()
            .map_err(KafkaError::client("create producer"))?;
        let max_in_flight = max_in_flight.max(1);
        Ok(Self {
            producer,
            topics: kafka.topics.clone(),
            permits: Arc::new(Semaphore::new(max_in_flight)),
            max_in_flight,
            session_id: crate::events::new_id(),
            next_sequence: 1,
            failed: Arc::default(),
            stats: Arc::default(),
            shutdown: CancellationToken::new(),
            latency: record_latency.then(|| Arc::new(Mutex::new(Vec::new()))),
        })
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
        let permit = tokio::select! {
            biased;
            _ = self.shutdown.cancelled() => return Err(PublishError::Cancelled),
            p = self.permits.clone().acquire_owned() => p.expect("publisher semaphore is never closed"),
        };
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
        let mut pause = Duration::from_millis(1);
        let delivery = loop {
            let record = FutureRecord::to(topic).key(&key).payload(&payload);
            match self.producer.send_result(record) {
                Ok(d) => break d,
                Err((RdKafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    tokio::select! {
                        biased;
                        _ = self.shutdown.cancelled() => return Err(PublishError::Cancelled),
                        _ = tokio::time::sleep(pause) => {}
                    }
                    pause = (pause * 2).min(Duration::from_millis(100));
                }
                Err((e, _)) => return Err(PublishError::Send(e)),
            }
        };
        self.next_sequence += 1;
        self.stats.sent.fetch_add(1, Relaxed);
        let failed = self.failed.clone();
        let stats = self.stats.clone();
        let latency = self.latency.clone().filter(|_| route == Route::Active);
        tokio::spawn(async move {
            let result = match delivery.await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err((e, _))) => Err(e),
                Err(_) => Err(RdKafkaError::Canceled),
            };
            match result {
                Ok(()) => {
                    stats.delivered.fetch_add(1, Relaxed);
                    let m = metrics::global();
                    match route {
                        Route::Active => m.published_active.fetch_add(1, Relaxed),
                        Route::Queued => m.published_queued.fetch_add(1, Relaxed),
                    };
                    if let (Some(log), Some(t)) = (latency, observed) {
                        let mut log = log.lock().unwrap_or_else(|p| p.into_inner());
                        if log.len() < MAX_LATENCY_SAMPLES {
                            log.push(u32::try_from(t.elapsed().as_micros()).unwrap_or(u32::MAX));
                        }
                    }
                }
                Err(error) => {
                    stats.delivery_failures.fetch_add(1, Relaxed);
                    metrics::global().delivery_failures.fetch_add(1, Relaxed);
                    let key = PosKey::new(event.account.clone(), event.con_id);
                    tracing::warn!(%key, sequence, %error, "Kafka did not acknowledge an event; its position will be republished");
                    failed.push(Failure {
                        key,
                        sequence,
                        error,
                        event,
                    });
                }
            }
            // Released whatever the outcome: nothing here waits for the owner.
            drop(permit);
        });
        Ok(sequence)
    }

    /// Waits until every event sent so far is acknowledged (or failed).
    ///
    /// # Errors
    /// [`PublishError::FlushTimeout`] when `timeout` passes first.
    pub async fn flush(&self, timeout: Duration) -> Result<(), PublishError> {
        let n = u32::try_from(self.max_in_flight).unwrap_or(u32::MAX);
        match tokio::time::timeout(timeout, self.permits.acquire_many(n)).await {
            Ok(Ok(all)) => {
                drop(all);
                Ok(())
            }
            _ => Err(PublishError::FlushTimeout(self.in_flight())),
        }
    }

    /// Drops every event librdkafka has not sent yet and stops waiting for those on the wire
    /// (their delivery reports come back as failures, which nobody republishes); returns how
    /// many were unacknowledged. For a lost ingest lease: the new holder reconciles with IB,
    /// and anything this publisher delivered later would land after the new holder's events.
    pub fn abandon(&self) -> usize {
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
