//! The Kafka side: consumer settings, the rebalance callback, and per-partition offset checks.
//!
//! On assignment the callback hands librdkafka an explicit start offset per partition: the
//! restart position from Delta (see [`super::offsets`]) kept in [`Shared::positions`], so the
//! consumer never starts from Kafka's own committed offsets. The callback runs inside
//! `recv()`, on the materializer's task, between two messages; it only records what happened
//! ([`RebalanceEvent`]) and the run loop reacts before taking the next message (revoked
//! partitions: drop their buffers; assigned: expect their start offset).
//!
//! `auto.offset.reset=error`: an offset that the broker no longer has (retention, or the
//! embedded broker's ~5 MiB per partition) is an error, never a silent jump; a gap between the
//! expected and the received offset is checked against the log start offset too.

use std::collections::HashMap;
use std::sync::Mutex;

use rdkafka::client::ClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, RebalanceProtocol};
use rdkafka::error::KafkaResult;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::types::RDKafkaRespErr;

/// What a rebalance did.
#[derive(Debug, Clone, PartialEq)]
pub enum RebalanceEvent {
    /// Partitions assigned, with the offset consumption starts at (`None`: log start).
    Assigned(Vec<(String, i32, Option<i64>)>),
    /// Partitions revoked (or lost).
    Revoked(Vec<(String, i32)>),
    /// The rebalance failed.
    Failed(String),
}

/// State shared between the run loop and the rebalance callback.
#[derive(Debug, Default)]
pub struct Shared {
    /// Restart position per (topic, partition), maintained by the run loop after every commit.
    pub positions: HashMap<(String, i32), i64>,
    /// Events not yet handled by the run loop.
    pub events: Vec<RebalanceEvent>,
}

/// The materializer's consumer context.
#[derive(Debug, Default)]
pub struct Ctx {
    /// Shared with the run loop.
    pub shared: Mutex<Shared>,
}

impl Ctx {
    fn shared(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Takes the pending rebalance events.
    pub fn take_events(&self) -> Vec<RebalanceEvent> {
        std::mem::take(&mut self.shared().events)
    }

    /// Records the restart position of a partition (after a commit or a reload).
    pub fn set_position(&self, topic: &str, partition: i32, next: i64) {
        self.shared().positions.insert((topic.to_string(), partition), next);
    }

    fn assign(&self, c: &BaseConsumer<Self>, tpl: &mut TopicPartitionList) -> KafkaResult<()> {
        let parts: Vec<(String, i32)> = tpl
            .elements()
            .iter()
            .map(|e| (e.topic().to_string(), e.partition()))
            .collect();
        let mut assigned = Vec::with_capacity(parts.len());
        {
            let shared = self.shared();
            for (t, p) in parts {
                let start = shared.positions.get(&(t.clone(), p)).copied();
                let offset = match start {
                    Some(n) if n > 0 => Offset::Offset(n),
                    _ => Offset::Beginning,
                };
                tpl.set_partition_offset(&t, p, offset)?;
                assigned.push((t, p, start.filter(|n| *n > 0)));
            }
        }
        tracing::info!(partitions = ?assigned, "partitions assigned; starting at the offsets stored in Delta");
        self.shared().events.push(RebalanceEvent::Assigned(assigned));
        match c.rebalance_protocol() {
            RebalanceProtocol::Cooperative => c.incremental_assign(tpl),
            _ => c.assign(tpl),
        }
    }

    fn revoke(&self, c: &BaseConsumer<Self>, tpl: &TopicPartitionList) -> KafkaResult<()> {
        let parts: Vec<(String, i32)> = tpl
            .elements()
            .iter()
            .map(|e| (e.topic().to_string(), e.partition()))
            .collect();
        tracing::info!(partitions = ?parts, lost = c.assignment_lost(), "partitions revoked; dropping their buffers");
        self.shared().events.push(RebalanceEvent::Revoked(parts));
        match c.rebalance_protocol() {
            RebalanceProtocol::Cooperative => c.incremental_unassign(tpl),
            _ => c.unassign(),
        }
    }
}

impl ClientContext for Ctx {}

impl ConsumerContext for Ctx {
    fn rebalance(&self, c: &BaseConsumer<Self>, err: RDKafkaRespErr, tpl: &mut TopicPartitionList) {
        let result = match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => self.assign(c, tpl),
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => self.revoke(c, tpl),
            other => {
                let msg = format!("rebalance error {other:?}");
                tracing::warn!("{msg}");
                // Drop everything we hold: the assignment is unknown now.
                let _ = c.unassign();
                self.shared().events.push(RebalanceEvent::Failed(msg));
                return;
            }
        };
        if let Err(e) = result {
            tracing::warn!(error = %e, "applying the rebalance failed");
            self.shared().events.push(RebalanceEvent::Failed(e.to_string()));
        }
    }
}

/// Consumption state of one assigned partition: the next offset we accept.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Cursor {
    /// Next offset expected (`None`: whatever comes first, the partition is new to Delta).
    pub next: Option<i64>,
}

/// What to do with a message at `offset` given the cursor.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Check {
    /// In order: take it.
    Take,
    /// Already taken (redelivery after a seek): skip it.
    Skip,
    /// Offsets are missing before it: check the log start before going on.
    Gap { expected: i64 },
}

impl Cursor {
    /// Classifies an incoming offset.
    pub fn check(&self, offset: i64) -> Check {
        match self.next {
            None => Check::Take,
            Some(n) if offset == n => Check::Take,
            Some(n) if offset < n => Check::Skip,
            Some(n) => Check::Gap { expected: n },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursor_classifies_offsets() {
        let c = Cursor { next: Some(10) };
        assert_eq!(c.check(10), Check::Take);
        assert_eq!(c.check(3), Check::Skip);
        assert_eq!(c.check(12), Check::Gap { expected: 10 });
        assert_eq!(Cursor { next: None }.check(99), Check::Take);
    }
}
