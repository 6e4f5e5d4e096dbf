//! Publishing executions through the same (transactional) producer as the positions: a second
//! producer with the ingest transactional id would fence the first.
//!
//! An execution takes a permit like a position event (the in-flight bound covers both) and is
//! numbered in a sequence of its own (so the position topics' sequences stay gapless). One
//! that is not delivered (a failed delivery, an aborted transaction) is reported by exec id
//! through [`Publisher::failed_executions`]: the owner forgets it in its join and asks IB for
//! the day's executions again, which brings it back.

use std::sync::atomic::Ordering::Relaxed;

use super::{Pending, PublishError, Publisher};
use crate::executions::ExecutionEvent;
use crate::metrics;

impl Publisher {
    /// Stamps session and sequence on `event` and sends it to the executions topic; returns its
    /// sequence number once librdkafka has queued it. Waits like [`Publisher::publish`].
    ///
    /// # Errors
    /// As [`Publisher::publish`].
    pub async fn publish_execution(&mut self, mut event: ExecutionEvent) -> Result<i64, PublishError> {
        let (txn, permit) = self.admit().await?;
        let sequence = self.next_exec_sequence;
        event.session_id.clone_from(&self.session_id);
        event.sequence = sequence;
        let payload = event.encode()?;
        let key = event.key();
        let exec_id = event.exec_id.clone();
        let pending = || Pending::Execution {
            exec_id: exec_id.clone(),
        };
        let topic = self.topics.executions.clone();
        let delivery = self.send(txn.as_deref(), &topic, &key, &payload, pending).await?;
        self.next_exec_sequence += 1;
        self.stats.sent.fetch_add(1, Relaxed);
        let failed = self.failed.clone();
        let transactional = txn.is_some();
        super::track_delivery(
            delivery,
            permit,
            self.stats.clone(),
            move || {
                if !transactional {
                    metrics::global().published_executions.fetch_add(1, Relaxed);
                }
            },
            move |error| {
                tracing::warn!(%exec_id, sequence, %error, "Kafka did not acknowledge an execution; it will be requested from IB again");
                failed.push_execution(exec_id);
            },
        );
        Ok(sequence)
    }

    /// Waits until executions failed to be delivered, then takes their exec ids. Cancel-safe.
    pub fn failed_executions(&self) -> impl std::future::Future<Output = Vec<String>> + Send + 'static {
        let failed = self.failed.clone();
        async move {
            loop {
                let notified = failed.executions_notify.notified();
                let taken = failed.take_executions();
                if !taken.is_empty() {
                    return taken;
                }
                notified.await;
            }
        }
    }
}
