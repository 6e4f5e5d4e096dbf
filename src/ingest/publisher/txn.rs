//! The publisher's Kafka transaction: the events of the open transaction, the committer task
//! that ends it every `--txn-interval`, and what happens when ending fails (retry, abort and
//! republish, or fenced by a newer ingest).

use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::error::KafkaError as RdKafkaError;
use rdkafka::producer::{FutureProducer, Producer};
use tokio_util::sync::CancellationToken;

use super::{count_published, record_latency, FailedDeliveries, Failure, LatencyLog, PublishError, PublishStats};
use crate::book::PosKey;
use crate::events::{PositionEvent, Route};
use crate::metrics;

/// An event of the open transaction (kept until it commits, to be republished if it aborts).
pub(super) enum Pending {
    /// A position event: its position is republished if the transaction aborts.
    Position {
        key: PosKey,
        sequence: i64,
        route: Route,
        observed: Option<Instant>,
        event: Box<PositionEvent>,
    },
    /// An execution: reported through [`Publisher::failed_executions`] if it aborts.
    Execution { exec_id: String },
}

impl Pending {
    /// The route of a position event on the active route, with when its IB frame arrived.
    pub(super) fn active(&self) -> Option<Option<Instant>> {
        match self {
            Pending::Position {
                route: Route::Active,
                observed,
                ..
            } => Some(*observed),
            _ => None,
        }
    }

    pub(super) fn is_position(&self) -> bool {
        matches!(self, Pending::Position { .. })
    }
}

/// The transaction state shared by the publisher and its committer task.
pub(super) struct Txn {
    pub(super) id: String,
    /// Sends hold it shared; ending a transaction holds it exclusively.
    pub(super) gate: tokio::sync::RwLock<()>,
    /// Events sent in the open transaction.
    pub(super) open: Mutex<Vec<Pending>>,
    /// Cancelled once the broker fenced this producer.
    pub(super) fenced: CancellationToken,
    /// Cancelled when the publisher is dropped or abandoned: the committer stops.
    pub(super) closed: CancellationToken,
    /// How long one commit or abort may take.
    pub(super) timeout: Duration,
    /// An abort is under way (it timed out while Kafka was away): resume it, do not commit.
    pub(super) aborting: std::sync::atomic::AtomicBool,
    /// A commit or abort has been failing since the last success (warn once per episode).
    pub(super) troubled: std::sync::atomic::AtomicBool,
    /// The publisher's counts (`committed` is counted here).
    pub(super) stats: Arc<PublishStats>,
}

impl Txn {
    pub(super) fn take_open(&self) -> Vec<Pending> {
        std::mem::take(&mut *self.open.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Says that ending the transaction did not work yet: a warning the first time, then debug.
    pub(super) fn trouble(&self, error: &RdKafkaError, events: usize, what: &str) {
        if self.troubled.swap(true, Relaxed) {
            tracing::debug!(error = %error, events, "{what}");
        } else {
            tracing::warn!(error = %error, events, "{what}");
        }
    }

    pub(super) fn trouble_over(&self) {
        if self.troubled.swap(false, Relaxed) {
            tracing::info!(transactional_id = %self.id, "Kafka transactions work again");
        }
    }

    /// Puts events of a commit to retry back in front of those sent since.
    pub(super) fn restore(&self, mut events: Vec<Pending>) {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        events.append(&mut open);
        *open = events;
    }
}

/// Commits the open transaction every `interval` while it holds events, until the publisher
/// is dropped or abandoned, or the broker fences it.
pub(super) async fn committer(
    txn: Arc<Txn>,
    producer: FutureProducer,
    failed: Arc<FailedDeliveries>,
    latency: Option<LatencyLog>,
    interval: Duration,
) {
    loop {
        tokio::select! {
            biased;
            _ = txn.closed.cancelled() => return,
            _ = txn.fenced.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
        let ended = tokio::select! {
            biased;
            _ = txn.closed.cancelled() => return,
            r = end_txn(&txn, &producer, &failed, latency.as_ref(), false) => r,
        };
        match ended {
            Ok(()) => {}
            Err(PublishError::Fenced(_)) => return,
            Err(e) => tracing::warn!(error = %e, "could not end a Kafka transaction; retrying"),
        }
    }
}

/// The fatal error of `producer`, if librdkafka raised one (fenced, or unusable).
fn fatal(producer: &FutureProducer) -> Option<String> {
    producer
        .client()
        .fatal_error()
        .map(|(code, why)| format!("{code:?}: {why}"))
}

/// Ends the open transaction: commits it (when it holds events, or `force`); on an abortable
/// error aborts it and reports each of its events through `failed` (their positions get
/// republished); then begins the next one. While Kafka is away a commit or an abort does not
/// complete: the events stay for the next attempt (an abort under way is resumed, never
/// followed by a commit). Fencing cancels `txn.fenced` and returns [`PublishError::Fenced`].
pub(super) async fn end_txn(
    txn: &Txn,
    producer: &FutureProducer,
    failed: &FailedDeliveries,
    latency: Option<&LatencyLog>,
    force: bool,
) -> Result<(), PublishError> {
    if txn.fenced.is_cancelled() {
        return Err(PublishError::Fenced(txn.id.clone()));
    }
    let _exclusive = txn.gate.write().await;
    let events = txn.take_open();
    let aborting = txn.aborting.load(Relaxed);
    if events.is_empty() && !force && !aborting {
        return Ok(());
    }
    let timeout = txn.timeout;
    let mut error = RdKafkaError::Canceled;
    if !aborting {
        let p = producer.clone();
        let committed = tokio::task::spawn_blocking(move || p.commit_transaction(timeout))
            .await
            .unwrap_or(Err(RdKafkaError::Canceled));
        let e = match committed {
            Ok(()) => {
                txn.trouble_over();
                metrics::global().txn_committed.fetch_add(1, Relaxed);
                txn.stats.committed.fetch_add(events.len() as u64, Relaxed);
                let active = events.iter().filter(|e| e.active().is_some()).count() as u64;
                let positions = events.iter().filter(|e| e.is_position()).count() as u64;
                count_published(Route::Active, active);
                count_published(Route::Queued, positions - active);
                metrics::global()
                    .published_executions
                    .fetch_add(events.len() as u64 - positions, Relaxed);
                if let Some(log) = latency {
                    for t in events.iter().filter_map(Pending::active).flatten() {
                        record_latency(log, t);
                    }
                }
                return begin(txn, producer, Vec::new()).map(|_| ());
            }
            Err(e) => e,
        };
        let (is_fatal, retriable) = match &e {
            RdKafkaError::Transaction(t) => (t.is_fatal(), t.is_retriable()),
            // rdkafka flushes before it commits: messages still waiting for the broker.
            RdKafkaError::Flush(_) => (false, true),
            _ => (false, false),
        };
        if is_fatal || fatal(producer).is_some() {
            return Err(fence(txn, producer, events.len(), &e));
        }
        if retriable {
            txn.trouble(
                &e,
                events.len(),
                "Kafka transaction commit not confirmed yet; retrying (is Kafka reachable?)",
            );
            txn.restore(events);
            return Ok(());
        }
        tracing::warn!(error = %e, events = events.len(), "Kafka transaction commit failed (a delivery failed or timed out); aborting it");
        txn.aborting.store(true, Relaxed);
        error = e;
    }
    let p = producer.clone();
    let aborted = tokio::task::spawn_blocking(move || p.abort_transaction(timeout))
        .await
        .unwrap_or(Err(RdKafkaError::Canceled));
    match aborted {
        Ok(()) => {
            txn.aborting.store(false, Relaxed);
            txn.trouble_over();
            metrics::global().txn_aborted.fetch_add(1, Relaxed);
            tracing::warn!(
                events = events.len(),
                "Kafka transaction aborted; its positions will be republished"
            );
            begin(txn, producer, events).map(|events| report_failed(failed, events, &error))
        }
        Err(e) if fatal(producer).is_some() => Err(fence(txn, producer, events.len(), &e)),
        Err(e) => {
            // Kafka away: the abort is resumed on the next attempt.
            txn.trouble(
                &e,
                events.len(),
                "could not abort a Kafka transaction yet; retrying (is Kafka reachable?)",
            );
            txn.restore(events);
            Ok(())
        }
    }
}

/// Begins the next transaction; `events` (of an aborted one) come back to be reported.
fn begin(txn: &Txn, producer: &FutureProducer, events: Vec<Pending>) -> Result<Vec<Pending>, PublishError> {
    match producer.begin_transaction() {
        Ok(()) => Ok(events),
        Err(e) if fatal(producer).is_some() => Err(fence(txn, producer, events.len(), &e)),
        Err(source) => Err(PublishError::Txn {
            id: txn.id.clone(),
            source,
        }),
    }
}

fn report_failed(failed: &FailedDeliveries, events: Vec<Pending>, error: &RdKafkaError) {
    for e in events {
        match e {
            Pending::Position {
                key, sequence, event, ..
            } => failed.push(Failure {
                key,
                sequence,
                error: error.clone(),
                event: *event,
            }),
            Pending::Execution { exec_id } => failed.push_execution(exec_id),
        }
    }
}

/// Marks the publisher fenced (once) and says so.
fn fence(txn: &Txn, producer: &FutureProducer, refused: usize, error: &RdKafkaError) -> PublishError {
    if !txn.fenced.is_cancelled() {
        let m = metrics::global();
        m.producer_fenced.fetch_add(1, Relaxed);
        m.producer_refused.fetch_add(refused as u64, Relaxed);
        let why = fatal(producer).unwrap_or_else(|| error.to_string());
        tracing::warn!(transactional_id = %txn.id, refused, reason = %why, "fenced: a newer producer of this transactional id took over; stopped publishing (the refused events count nowhere)");
        txn.fenced.cancel();
    }
    PublishError::Fenced(txn.id.clone())
}
