//! Publishing position events to Kafka with bounded memory.
//!
//! Modelled on vector's Kafka sink: the producer is idempotent with `acks=all`; at most
//! `max_in_flight` events are sent but unacknowledged at once (a semaphore permit travels with
//! each one until its delivery report arrives); when none is free, [`Publisher::publish`]
//! waits, so the caller stops reading IB — backpressure instead of an unbounded buffer. A full
//! librdkafka queue is retried after a short pause, never dropped. Every event gets the next
//! sequence number of this publisher's session, so a consumer can spot gaps. A delivery that
//! fails for good (after librdkafka's own retries, `message.timeout.ms`) is reported on
//! [`Publisher::failures`] so the owner can republish that position's current state.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::error::{KafkaError as RdKafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use tokio::sync::{mpsc, Semaphore};

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

/// A session's producer: sequence numbers, bounded in-flight, delivery tracking.
pub struct Publisher {
    producer: FutureProducer,
    topics: Topics,
    permits: Arc<Semaphore>,
    max_in_flight: usize,
    session_id: String,
    next_sequence: i64,
    failures_tx: mpsc::Sender<Failure>,
    failures_rx: mpsc::Receiver<Failure>,
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
        let (failures_tx, failures_rx) = mpsc::channel(max_in_flight);
        Ok(Self {
            producer,
            topics: kafka.topics.clone(),
            permits: Arc::new(Semaphore::new(max_in_flight)),
            max_in_flight,
            session_id: crate::events::new_id(),
            next_sequence: 1,
            failures_tx,
            failures_rx,
            latency: record_latency.then(|| Arc::new(Mutex::new(Vec::new()))),
        })
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

    /// Deliveries that failed for good; the owner should republish those positions.
    pub fn failures(&mut self) -> &mut mpsc::Receiver<Failure> {
        &mut self.failures_rx
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
    /// [`PublishError::Encode`] or [`PublishError::Send`]; the sequence number is consumed
    /// only when the event was queued.
    pub async fn publish(&mut self, mut event: PositionEvent, observed: Option<Instant>) -> Result<i64, PublishError> {
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .expect("publisher semaphore is never closed");
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
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(100));
                }
                Err((e, _)) => return Err(PublishError::Send(e)),
            }
        };
        self.next_sequence += 1;
        let failures = self.failures_tx.clone();
        let latency = self.latency.clone().filter(|_| route == Route::Active);
        tokio::spawn(async move {
            let result = match delivery.await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err((e, _))) => Err(e),
                Err(_) => Err(RdKafkaError::Canceled),
            };
            match result {
                Ok(()) => {
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
                    let key = PosKey::new(event.account.clone(), event.con_id);
                    tracing::warn!(%key, sequence, %error, "Kafka did not acknowledge an event; its position will be republished");
                    let _ = failures
                        .send(Failure {
                            key,
                            sequence,
                            error,
                            event,
                        })
                        .await;
                }
            }
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

    /// Flushes librdkafka's own queue (blocking); for shutdown after [`Publisher::flush`].
    pub fn close(&self, timeout: Duration) {
        let _ = self.producer.flush(timeout);
    }
}
