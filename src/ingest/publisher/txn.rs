//! The publisher's Kafka transaction: the events of the open transaction, the committer task
//! that ends it every `--txn-interval`, and what happens when ending fails (retry, abort and
//! republish, fenced by a newer ingest, or failed for good with no successor).

use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::error::{KafkaError as RdKafkaError, RDKafkaErrorCode};
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
    /// Cancelled once the producer stopped for good ([`Txn::stop`] says why).
    pub(super) stopped: CancellationToken,
    /// Why it stopped: set once, before `stopped` is cancelled.
    pub(super) stop: std::sync::OnceLock<Stop>,
    /// Cancelled when the publisher is dropped or abandoned: the committer stops.
    pub(super) closed: CancellationToken,
    /// How long one commit or abort may take.
    pub(super) timeout: Duration,
    /// The producer's `transaction.timeout.ms`: a transaction open longer may have been
    /// aborted by its coordinator, which bumps the epoch.
    pub(super) expires: Duration,
    /// When the open transaction got its first event (the coordinator's clock starts there).
    pub(super) began: Mutex<Instant>,
    /// An abort is under way (it timed out while Kafka was away): resume it, do not commit.
    pub(super) aborting: std::sync::atomic::AtomicBool,
    /// A commit or abort has been failing since the last success (warn once per episode).
    pub(super) troubled: std::sync::atomic::AtomicBool,
    /// The publisher's counts (`committed` is counted here).
    pub(super) stats: Arc<PublishStats>,
}

/// Why a transactional producer stopped for good.
#[derive(Debug, Clone)]
pub(super) enum Stop {
    /// A successor with the same transactional id took over (or the coordinator bumped the
    /// epoch, which librdkafka reports the same way).
    Fenced,
    /// Another fatal error of librdkafka: no successor; a new producer may take over.
    Failed(String),
}

impl Txn {
    /// The error for anything asked of a stopped producer.
    pub(super) fn refusal(&self) -> PublishError {
        match self.stop.get() {
            Some(Stop::Failed(reason)) => PublishError::ProducerFailed {
                id: self.id.clone(),
                reason: reason.clone(),
            },
            _ => PublishError::Fenced(self.id.clone()),
        }
    }

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
/// is dropped or abandoned, or it stops for good (fenced, or failed).
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
            _ = txn.stopped.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
        let ended = tokio::select! {
            biased;
            _ = txn.closed.cancelled() => return,
            r = end_txn(&txn, &producer, &failed, latency.as_ref(), false) => r,
        };
        match ended {
            Ok(()) => {}
            Err(e) if e.is_producer_lost() => return,
            Err(e) => tracing::warn!(error = %e, "could not end a Kafka transaction; retrying"),
        }
    }
}

/// The fatal error of `producer`, if librdkafka raised one (fenced, or unusable).
fn fatal(producer: &FutureProducer) -> Option<(RDKafkaErrorCode, String)> {
    producer.client().fatal_error()
}

/// Whether a fatal error's code is a fence: librdkafka reports `PRODUCER_FENCED` and
/// `INVALID_PRODUCER_EPOCH` as `_FENCED` (a successor's `init_transactions` bumped the epoch,
/// or the coordinator did when it aborted a transaction past `transaction.timeout.ms`).
fn is_fence(code: RDKafkaErrorCode) -> bool {
    matches!(
        code,
        RDKafkaErrorCode::Fenced | RDKafkaErrorCode::ProducerFenced | RDKafkaErrorCode::InvalidProducerEpoch
    )
}

/// Ends the open transaction: commits it (when it holds events, or `force`); on an abortable
/// error aborts it and reports each of its events through `failed` (their positions get
/// republished); then begins the next one. While Kafka is away a commit or an abort does not
/// complete: the events stay for the next attempt (an abort under way is resumed, never
/// followed by a commit). A fatal error (found first, or raised by the commit, abort or
/// begin) stops the producer for good: [`stop`].
pub(super) async fn end_txn(
    txn: &Txn,
    producer: &FutureProducer,
    failed: &FailedDeliveries,
    latency: Option<&LatencyLog>,
    force: bool,
) -> Result<(), PublishError> {
    if txn.stopped.is_cancelled() {
        return Err(txn.refusal());
    }
    let _exclusive = txn.gate.write().await;
    let events = txn.take_open();
    // A fatal error raised since (a send refused with `_FATAL`, a background request): a
    // commit would not tell, and a send would be refused again and again.
    if fatal(producer).is_some() {
        return Err(stop(txn, producer, events.len(), &RdKafkaError::Canceled));
    }
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
            return Err(stop(txn, producer, events.len(), &e));
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
        Err(e) if fatal(producer).is_some() => Err(stop(txn, producer, events.len(), &e)),
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
        Err(e) if fatal(producer).is_some() => Err(stop(txn, producer, events.len(), &e)),
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

/// Stops the publisher for good (once) and says why: fenced when librdkafka's fatal error is a
/// fence, else failed (no successor behind it: the owner may start a new producer).
fn stop(txn: &Txn, producer: &FutureProducer, refused: usize, error: &RdKafkaError) -> PublishError {
    if !txn.stopped.is_cancelled() {
        let m = metrics::global();
        m.producer_refused.fetch_add(refused as u64, Relaxed);
        let (mut fenced, mut why) = match fatal(producer) {
            Some((code, why)) => (is_fence(code), format!("{code:?}: {why}")),
            None => (error.rdkafka_error_code().is_some_and(is_fence), error.to_string()),
        };
        // A fence of a transaction open past `transaction.timeout.ms` (a Kafka outage that
        // long) is most likely the coordinator's abort, not a successor: say failed, so the
        // owner starts a new producer. Were it a successor after all (this process was paused
        // that long), the new producer fences it in turn, and one of the two stays.
        let open_for = txn.began.lock().unwrap_or_else(|p| p.into_inner()).elapsed();
        if fenced && open_for >= txn.expires {
            fenced = false;
            why = format!("{why} (the transaction was open {open_for:.0?}, past transaction.timeout.ms: the coordinator aborted it)");
        }
        let stop = if fenced {
            m.producer_fenced.fetch_add(1, Relaxed);
            tracing::warn!(transactional_id = %txn.id, refused, reason = %why, "fenced: a newer producer of this transactional id took over; stopped publishing (the refused events count nowhere)");
            Stop::Fenced
        } else {
            m.producer_failed.fetch_add(1, Relaxed);
            tracing::warn!(transactional_id = %txn.id, refused, reason = %why, "the Kafka producer failed for good (a fatal error that is not a fence); stopped publishing (the refused events count nowhere)");
            Stop::Failed(why)
        };
        let _ = txn.stop.set(stop);
        txn.stopped.cancel();
    }
    txn.refusal()
}
