//! Per-partition lag of a materializer, as `/metrics` shows it
//! ([`crate::metrics::PartitionLag`]): per owned partition, the messages taken and not
//! committed to Delta yet (and the broker timestamp of the oldest of them) and when the
//! partition was last committed. The run loop adds what it knows of Kafka (high watermark and
//! consumer position) when it exports the figures, every second.

use std::collections::HashMap;

use super::buffer::Role;
use crate::metrics::PartitionLag;

/// Messages of one owned partition that wait for a Delta commit.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Waiting {
    topic: String,
    messages: i64,
    oldest_ms: Option<i64>,
    last_commit_ms: i64,
}

/// What waits for a Delta commit, per owned partition.
#[derive(Debug, Default)]
pub struct LagWatch {
    parts: HashMap<(Role, i32), Waiting>,
}

impl LagWatch {
    /// The partition is owned from now on (`now_ms`): nothing of it waits, and its commit age
    /// counts from now.
    pub fn assigned(&mut self, topic: &str, role: Role, partition: i32, now_ms: i64) {
        let w = Waiting {
            topic: topic.to_string(),
            messages: 0,
            oldest_ms: None,
            last_commit_ms: now_ms,
        };
        self.parts.insert((role, partition), w);
    }

    /// The partition is not owned any more (its buffer was dropped).
    pub fn revoked(&mut self, role: Role, partition: i32) {
        self.parts.remove(&(role, partition));
    }

    /// A message was taken into the buffers; `timestamp_ms` is its broker timestamp (`now_ms`
    /// when it has none).
    pub fn taken(&mut self, role: Role, partition: i32, timestamp_ms: Option<i64>, now_ms: i64) {
        if let Some(w) = self.parts.get_mut(&(role, partition)) {
            w.messages += 1;
            let ts = timestamp_ms.unwrap_or(now_ms);
            w.oldest_ms = Some(w.oldest_ms.map_or(ts, |o| o.min(ts)));
        }
    }

    /// Everything of the partition taken so far is in the tables (committed at `now_ms`).
    pub fn committed(&mut self, role: Role, partition: i32, now_ms: i64) {
        if let Some(w) = self.parts.get_mut(&(role, partition)) {
            w.messages = 0;
            w.oldest_ms = None;
            w.last_commit_ms = now_ms;
        }
    }

    /// Every owned partition's figures, sorted; `unfetched(topic, role, partition)` is how many
    /// events Kafka holds past the consumer's position (`None`: not known yet).
    pub fn rows(&self, unfetched: impl Fn(&str, Role, i32) -> Option<i64>) -> Vec<PartitionLag> {
        let mut rows: Vec<PartitionLag> = self
            .parts
            .iter()
            .map(|((role, partition), w)| PartitionLag {
                topic: w.topic.clone(),
                partition: *partition,
                lag_events: unfetched(&w.topic, *role, *partition).unwrap_or(0).max(0) + w.messages,
                oldest_waiting_ms: w.oldest_ms,
                last_commit_ms: w.last_commit_ms,
            })
            .collect();
        rows.sort_by(|a, b| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)));
        rows
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waiting_messages_count_until_their_commit() {
        let mut w = LagWatch::default();
        w.assigned("p.active", Role::Active, 0, 1_000);
        w.assigned("p.queued", Role::Queued, 1, 1_000);
        // A message of a partition not owned (revoked meanwhile) counts nowhere.
        w.taken(Role::Registry, 0, Some(5), 1_100);
        w.taken(Role::Active, 0, Some(900), 1_100);
        w.taken(Role::Active, 0, Some(800), 1_200);
        w.taken(Role::Active, 0, None, 1_300);
        let rows = w.rows(|t, r, p| (t == "p.active" && r == Role::Active && p == 0).then_some(7));
        assert_eq!(
            rows,
            vec![
                PartitionLag {
                    topic: "p.active".into(),
                    partition: 0,
                    lag_events: 10,
                    oldest_waiting_ms: Some(800),
                    last_commit_ms: 1_000,
                },
                PartitionLag {
                    topic: "p.queued".into(),
                    partition: 1,
                    lag_events: 0,
                    oldest_waiting_ms: None,
                    last_commit_ms: 1_000,
                },
            ]
        );
        w.committed(Role::Active, 0, 2_000);
        let rows = w.rows(|_, _, _| None);
        assert_eq!(
            (rows[0].lag_events, rows[0].oldest_waiting_ms, rows[0].last_commit_ms),
            (0, None, 2_000)
        );
        w.revoked(Role::Queued, 1);
        assert_eq!(w.rows(|_, _, _| Some(-3)).len(), 1, "a revoked partition leaves");
        assert_eq!(w.rows(|_, _, _| Some(-3))[0].lag_events, 0, "never below 0");
    }
}
