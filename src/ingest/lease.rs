//! The ingest lease: at most one `possync ingest` publishes (and holds IB streaming slots) at a
//! time, through Kafka's own group coordinator.
//!
//! Every ingest joins the consumer group `--lease-group` (default `<topic-prefix>ingest-lease`)
//! subscribed to the lease topic `<topic-prefix>ingest-lease`, which has exactly one partition
//! and is never written (`possync topics create` makes it). **The member assigned its partition
//! 0 holds the lease.** The group uses the `cooperative-sticky` assignor whatever `-K` says, and
//! with a single partition that assignor never moves it away from a live holder when a
//! newcomer joins (an eager assignor would revoke everything on every join, and a range
//! assignor could hand partition 0 to the newcomer). The lease once used the six-partition
//! registry topic: there a newcomer made the sticky assignor rebalance three of the holder's
//! six partitions to it, sometimes partition 0, and the holder lost the lease to a standby. The partitions are paused as soon as they are assigned
//! and offsets are never committed: the group exists only for its membership.
//!
//! The consumer lives on its own thread and is polled every [`POLL_EVERY`], so rebalances
//! (including librdkafka's own "session timed out: assignment lost") are seen within that
//! interval; the thread publishes "held or not" through a [`tokio::sync::watch`] channel.
//! Dropping the consumer at [`Lease::release`] leaves the group, so a graceful stop hands the
//! lease over at once; a SIGKILLed holder's lease moves after `session.timeout.ms` (6 s, `-K
//! consumer.session.timeout.ms=…`).
//!
//! The lease decides *who should* publish; the broker enforces it (issue 19). Ingest's producer
//! is transactional with the id `<topic-prefix>ingest`: a new holder's `init_transactions`
//! aborts the previous holder's open transaction and bumps the producer epoch, so whatever a
//! paused holder sends or commits when it wakes up is refused (`ProducerFenced`) and counts
//! nowhere (consumers read committed data only). A fenced holder ends its term, leaves the group
//! and joins again as a standby after the session timeout + 4 s (so it never competes for the
//! lease with its successor as a newcomer). What the lease alone left open, and how it is closed:
//! - librdkafka notices a lost session from its *own* clock, about a heartbeat round trip plus
//!   its 1 s group timer after the coordinator expired it. A new holder still waits
//!   `--lease-takeover-delay` (2 s) before it connects to IB (one IB connection at a time);
//!   events the old holder sends meanwhile are refused once the new one's producer starts.
//! - A holder whose whole process stalls (SIGSTOP, swapped out) longer than the session timeout
//!   publishes, when it resumes, what its threads had prepared: refused by the broker.
//! - Messages already on the wire when the lease is lost: in a transaction the new holder's
//!   start aborted.

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::client::ClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use tokio::sync::{oneshot, watch};

use crate::kafka::KafkaConfig;

/// How often the lease thread polls the group (and so how fast a lost lease is noticed).
pub const POLL_EVERY: Duration = Duration::from_millis(100);

/// Errors of the lease.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// librdkafka refused the lease consumer's settings.
    #[error("cannot create the ingest lease consumer (group {group}): {source}; check --brokers and the -K consumer settings")]
    Create {
        group: String,
        #[source]
        source: Box<rdkafka::error::KafkaError>,
    },
    /// The subscription was refused.
    #[error("cannot join the ingest lease group {group} on topic {topic}: {source}; create the topics with `possync topics create`, or (if the cluster's ACLs forbid consumer groups for ingest) grant it Read on the group")]
    Subscribe {
        group: String,
        topic: String,
        #[source]
        source: Box<rdkafka::error::KafkaError>,
    },
    /// The lease thread could not be started.
    #[error("cannot start the ingest lease thread: {0}")]
    Thread(#[source] std::io::Error),
}

/// Where this process stands in the lease group, as last seen by the lease thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseState {
    /// Joining the group: no assignment seen yet (the first rebalance takes a few seconds).
    Joining,
    /// In the group without partition 0: another ingest holds the lease.
    Standby,
    /// Partition 0 is assigned to this process: it holds the lease.
    Held,
}

/// The lease state, for watchers on other tasks.
pub type LeaseWatch = watch::Receiver<LeaseState>;

/// A member still without any assignment after this long counts as standing by (more members
/// than partitions, or a group that cannot form while Kafka is away).
const JOIN_GRACE: Duration = Duration::from_secs(20);

/// Membership of the lease group; see the module doc.
pub struct Lease {
    group: String,
    held: LeaseWatch,
    stop: Arc<AtomicBool>,
    done: oneshot::Receiver<()>,
}

/// Pauses every partition as soon as it is assigned (the lease consumer fetches nothing), and
/// notes that the group has answered.
#[derive(Default)]
struct PauseOnAssign {
    assigned_once: AtomicBool,
}

impl ClientContext for PauseOnAssign {}

impl ConsumerContext for PauseOnAssign {
    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                self.assigned_once.store(true, Relaxed);
                if let Err(e) = consumer.pause(tpl) {
                    // Harmless: any message fetched is dropped unread and never committed.
                    tracing::debug!(error = %e, "could not pause the lease partitions");
                }
            }
            Rebalance::Revoke(_) => {}
            Rebalance::Error(e) => tracing::warn!(error = %e, "ingest lease group rebalance error"),
        }
    }
}

impl Lease {
    /// Joins `group` (subscribed to the lease topic) on a dedicated thread. The lease is
    /// not held yet: watch [`Lease::changed`].
    ///
    /// # Errors
    /// [`LeaseError`] when the consumer cannot be created or subscribed.
    pub fn join(kafka: &KafkaConfig, group: &str) -> Result<Self, LeaseError> {
        let mut config = kafka.consumer(group);
        // Set after the -K overrides on purpose: only a sticky, cooperative assignor keeps
        // partition 0 with a live holder while members come and go.
        config
            .set("partition.assignment.strategy", "cooperative-sticky")
            .set("auto.offset.reset", "latest");
        let consumer: BaseConsumer<PauseOnAssign> =
            config
                .create_with_context(PauseOnAssign::default())
                .map_err(|source| LeaseError::Create {
                    group: group.to_string(),
                    source: Box::new(crate::kafka::scrub(source)),
                })?;
        let topic = kafka.topics.lease.clone();
        consumer.subscribe(&[&topic]).map_err(|source| LeaseError::Subscribe {
            group: group.to_string(),
            topic: topic.clone(),
            source: Box::new(source),
        })?;
        let (tx, held) = watch::channel(LeaseState::Joining);
        let stop = Arc::new(AtomicBool::new(false));
        let (done_tx, done) = oneshot::channel();
        let thread_stop = stop.clone();
        let thread_group = group.to_string();
        std::thread::Builder::new()
            .name("ingest-lease".into())
            .spawn(move || {
                hold(&consumer, &topic, &thread_group, &tx, &thread_stop);
                // Fenced first, then leave: nobody may believe it holds the lease while the
                // group hands it over.
                tx.send_replace(LeaseState::Standby);
                drop(consumer);
                let _ = done_tx.send(());
            })
            .map_err(LeaseError::Thread)?;
        Ok(Self {
            group: group.to_string(),
            held,
            stop,
            done,
        })
    }

    /// The group's name.
    pub fn group(&self) -> &str {
        &self.group
    }

    /// A receiver of the "held" state, for watchers on other tasks.
    pub fn watch(&self) -> LeaseWatch {
        self.held.clone()
    }

    /// The state now.
    pub fn state(&self) -> LeaseState {
        *self.held.borrow()
    }

    /// Waits until the state changes from `from`, and returns the new one. Cancel-safe. Never
    /// completes if the lease thread is gone (it only stops at [`Lease::release`]).
    pub async fn changed(&mut self, from: LeaseState) -> LeaseState {
        wait_until(&mut self.held, |s| s != from).await
    }

    /// Leaves the group (after the caller stopped publishing), waiting at most `timeout` for
    /// librdkafka to close the consumer; a consumer that cannot reach Kafka is left to close in
    /// the background.
    pub async fn release(self, timeout: Duration) {
        self.stop.store(true, Relaxed);
        if tokio::time::timeout(timeout, self.done).await.is_err() {
            tracing::warn!(group = %self.group, ?timeout, "the ingest lease consumer did not close in time (is Kafka reachable?); the group expires this member after its session timeout");
        }
    }
}

/// Completes with the state once `rx` shows one that satisfies `cond` (at once if it already
/// does). The lease fails closed: if the lease thread is gone without saying so (it panicked),
/// the lease counts as not held, so this completes with `Standby` when that satisfies `cond`
/// (a holder's watcher stops the term) and never otherwise (a standby stays one).
pub async fn wait_until(rx: &mut LeaseWatch, cond: impl Fn(LeaseState) -> bool) -> LeaseState {
    let seen = rx.wait_for(|s| cond(*s)).await.map(|s| *s);
    match seen {
        Ok(s) => s,
        Err(_) if cond(LeaseState::Standby) => {
            tracing::error!("the ingest lease thread is gone: counting the lease as lost");
            LeaseState::Standby
        }
        Err(_) => std::future::pending().await,
    }
}

/// The lease thread: polls the group until `stop`, publishing whether partition 0 is assigned.
fn hold(
    consumer: &BaseConsumer<PauseOnAssign>,
    topic: &str,
    group: &str,
    tx: &watch::Sender<LeaseState>,
    stop: &AtomicBool,
) {
    let started = std::time::Instant::now();
    let mut last_error: Option<String> = None;
    while !stop.load(Relaxed) {
        match consumer.poll(POLL_EVERY) {
            // Paused partitions fetch nothing; anything fetched before the pause is dropped.
            None | Some(Ok(_)) => {}
            Some(Err(e)) => {
                let text = e.to_string();
                if last_error.as_deref() != Some(text.as_str()) {
                    tracing::debug!(%group, error = %text, "ingest lease consumer error (librdkafka retries)");
                    last_error = Some(text);
                }
            }
        }
        let assignment = consumer.assignment().ok();
        let state = if assignment
            .as_ref()
            .is_some_and(|tpl| tpl.find_partition(topic, 0).is_some())
        {
            LeaseState::Held
        } else if assignment.is_some_and(|tpl| tpl.count() > 0)
            || consumer.context().assigned_once.load(Relaxed)
            || started.elapsed() > JOIN_GRACE
        {
            LeaseState::Standby
        } else {
            LeaseState::Joining
        };
        tx.send_if_modified(|was| {
            let changed = *was != state;
            *was = state;
            changed
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 20 #9: a lease thread that ends without saying Standby (a panic) must not leave
    /// its holder believing it holds the lease (before: the watcher waited forever).
    #[tokio::test]
    async fn the_lease_fails_closed_when_its_thread_is_gone() {
        let (tx, mut rx) = watch::channel(LeaseState::Held);
        drop(tx);
        let state = tokio::time::timeout(Duration::from_secs(5), wait_until(&mut rx, |s| s != LeaseState::Held))
            .await
            .expect("a holder's watcher sees the lease lost");
        assert_eq!(state, LeaseState::Standby);

        // A standby waiting for the lease keeps waiting: a dead thread never grants it.
        let (tx, mut rx) = watch::channel(LeaseState::Standby);
        drop(tx);
        let waited = tokio::time::timeout(
            Duration::from_millis(200),
            wait_until(&mut rx, |s| s == LeaseState::Held),
        )
        .await;
        assert!(waited.is_err(), "a dead lease thread granted the lease: {waited:?}");
    }
}
