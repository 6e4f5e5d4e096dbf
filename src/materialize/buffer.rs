//! Per-partition buffers: decoded rows and dead letters waiting for the next flush.
//!
//! A flush happens when the buffered messages (all partitions together) reach a count or a
//! byte size, or when the oldest has waited the flush latency, whichever comes first. Each
//! buffer remembers the offset range it covers (dead letters included: they count as
//! consumed), which becomes the txn version of its partition. Revoked partitions' buffers are
//! simply dropped: nothing of them is committed, so their next owner starts where Delta says.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use deltalake::arrow::array::RecordBatch;
use deltalake::arrow::error::ArrowError;

use super::checks::{check_time, key_matches};
use super::deadletter::DeadLetter;
use super::decode::{ArrowRows, DecodeError, Decoded, Layout, Scratch};
use super::tables::{position_events_layout, registry_layout};

/// What a topic carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// `positions.active`: `PositionEvent`s with route ACTIVE.
    Active,
    /// `positions.queued`: `PositionEvent`s with route QUEUED.
    Queued,
    /// `registry`: `RegistryEvent`s.
    Registry,
    /// `executions`: `ExecutionEvent`s.
    Executions,
}

impl Role {
    fn layout(self) -> &'static Arc<Layout> {
        match self {
            Role::Active | Role::Queued => position_events_layout(),
            Role::Registry => registry_layout(),
            Role::Executions => super::executions::layout(),
        }
    }
}

/// Buffered messages of one partition.
pub struct PartitionBuffer {
    /// Topic name.
    pub topic: Arc<str>,
    /// Partition.
    pub partition: i32,
    /// What the topic carries.
    pub role: Role,
    rows: ArrowRows,
    dead: Vec<DeadLetter>,
    first_offset: Option<i64>,
    last_offset: i64,
}

/// The frozen content of one partition buffer, ready to commit.
pub struct FrozenPartition {
    /// Topic name.
    pub topic: Arc<str>,
    /// Partition.
    pub partition: i32,
    /// What the topic carries.
    pub role: Role,
    /// Decoded rows in offset order.
    pub rows: RecordBatch,
    /// Dead letters in offset order.
    pub dead: Vec<DeadLetter>,
    /// First offset covered.
    pub first_offset: i64,
    /// Last offset covered (the txn version to store).
    pub last_offset: i64,
}

/// The buffers of every assigned partition.
pub struct Buffers {
    /// Offset namespace written into every row's `kafka_namespace`.
    namespace: Arc<str>,
    parts: HashMap<(Role, i32), PartitionBuffer>,
    scratch: Scratch,
    messages: usize,
    bytes: usize,
    oldest: Option<Instant>,
}

/// One consumed message, borrowed from the consumer.
pub struct Incoming<'a> {
    pub role: Role,
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
    /// Message timestamp in µs.
    pub timestamp: Option<i64>,
    pub key: Option<&'a [u8]>,
    pub value: Option<&'a [u8]>,
}

impl Buffers {
    /// Empty buffers for messages of the offset namespace `namespace`.
    pub fn new(namespace: &str) -> Self {
        Self {
            namespace: namespace.into(),
            parts: HashMap::new(),
            scratch: Scratch::default(),
            messages: 0,
            bytes: 0,
            oldest: None,
        }
    }

    /// Messages buffered.
    pub fn messages(&self) -> usize {
        self.messages
    }

    /// Bytes buffered (message keys + values).
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// When the buffers must be flushed at the latest.
    pub fn deadline(&self, latency: Duration) -> Option<Instant> {
        self.oldest.map(|t| t + latency)
    }

    /// Decodes and buffers one message; an undecodable or invalid one becomes a dead letter.
    /// Returns the dead-letter reason, if any.
    pub fn push(&mut self, m: &Incoming<'_>) -> Option<String> {
        let layout = m.role.layout();
        let buf = self
            .parts
            .entry((m.role, m.partition))
            .or_insert_with(|| PartitionBuffer {
                topic: m.topic.into(),
                partition: m.partition,
                role: m.role,
                rows: ArrowRows::new(layout.clone(), 1024),
                dead: Vec::new(),
                first_offset: None,
                last_offset: -1,
            });
        let size = m.value.map_or(0, <[u8]>::len) + m.key.map_or(0, <[u8]>::len);
        self.messages += 1;
        self.bytes += size;
        self.oldest.get_or_insert_with(Instant::now);
        buf.first_offset.get_or_insert(m.offset);
        buf.last_offset = m.offset;
        let result = match m.value {
            None => Err(DecodeError::NoValue),
            Some(v) => layout.plan.decode(v, &mut self.scratch).and_then(|payload| {
                let d = Decoded {
                    plan: &layout.plan,
                    payload,
                    scratch: &self.scratch,
                };
                validate(m, &d).map_err(DecodeError::Invalid)?;
                Ok(payload)
            }),
        };
        match result {
            Ok(payload) => {
                let d = Decoded {
                    plan: &layout.plan,
                    payload,
                    scratch: &self.scratch,
                };
                buf.rows.append(&d, m.offset, m.timestamp);
                None
            }
            Err(e) => {
                let error = e.to_string();
                buf.dead.push(DeadLetter {
                    topic: buf.topic.clone(),
                    partition: m.partition,
                    offset: m.offset,
                    timestamp: m.timestamp,
                    key: m.key.map(<[u8]>::to_vec),
                    value: m.value.map(<[u8]>::to_vec),
                    error: error.clone(),
                });
                Some(error)
            }
        }
    }

    /// Drops what is buffered for a partition (it was revoked).
    pub fn drop_partition(&mut self, role: Role, partition: i32) {
        if let Some(mut b) = self.parts.remove(&(role, partition)) {
            let n = b.rows.len() + b.dead.len();
            self.messages = self.messages.saturating_sub(n);
            // Byte accounting is approximate after a drop; it resets at the next flush.
            let _ = b.rows.finish("", "", 0);
        }
        if self.parts.values().all(|b| b.first_offset.is_none()) {
            self.messages = 0;
            self.bytes = 0;
            self.oldest = None;
        }
    }

    /// Takes everything buffered, leaving empty buffers.
    ///
    /// # Errors
    /// Arrow errors (a bug).
    pub fn freeze(&mut self) -> Result<Vec<FrozenPartition>, ArrowError> {
        let mut out = Vec::new();
        for b in self.parts.values_mut() {
            let Some(first_offset) = b.first_offset.take() else {
                continue;
            };
            out.push(FrozenPartition {
                topic: b.topic.clone(),
                partition: b.partition,
                role: b.role,
                rows: b.rows.finish(&self.namespace, &b.topic, b.partition)?,
                dead: std::mem::take(&mut b.dead),
                first_offset,
                last_offset: b.last_offset,
            });
        }
        out.sort_by(|a, b| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)));
        self.messages = 0;
        self.bytes = 0;
        self.oldest = None;
        Ok(out)
    }
}

/// Field indices the contract checks use, resolved once per plan.
struct Fields {
    route: usize,
    account: usize,
    con_id: usize,
    event_id: usize,
    position: usize,
    avg_cost: usize,
    strategy: usize,
    registry_con_id: usize,
    times: [(&'static str, usize); 2],
    registry_time: usize,
}

fn fields() -> &'static Fields {
    static F: std::sync::OnceLock<Fields> = std::sync::OnceLock::new();
    F.get_or_init(|| {
        let p = &position_events_layout().plan;
        let r = &registry_layout().plan;
        let i = |plan: &super::decode::RecordPlan, n: &str| plan.index(n).unwrap_or_else(|| panic!("schema has {n}"));
        Fields {
            route: i(p, "route"),
            account: i(p, "account"),
            con_id: i(p, "con_id"),
            event_id: i(p, "event_id"),
            position: i(p, "position"),
            avg_cost: i(p, "avg_cost"),
            strategy: i(r, "strategy"),
            registry_con_id: i(r, "con_id"),
            times: [("ib_time", i(p, "ib_time")), ("ingest_time", i(p, "ingest_time"))],
            registry_time: i(r, "time"),
        }
    })
}

/// Contract rules beyond the schema; a breach sends the message to the dead letters.
fn validate(m: &Incoming<'_>, d: &Decoded<'_>) -> Result<(), String> {
    let f = fields();
    match m.role {
        Role::Active | Role::Queued => {
            let want = if m.role == Role::Active { "ACTIVE" } else { "QUEUED" };
            let route = d.str(f.route).unwrap_or_default();
            if route != want {
                return Err(format!("route {route} on the {want} topic {}", m.topic));
            }
            let (account, con_id) = (
                d.str(f.account).unwrap_or_default(),
                d.long(f.con_id).unwrap_or_default(),
            );
            if account.is_empty() || con_id <= 0 {
                return Err(format!("bad key fields account={account:?} con_id={con_id}"));
            }
            if d.str(f.event_id).unwrap_or_default().is_empty() {
                return Err("empty event_id".into());
            }
            for (n, i) in [("position", f.position), ("avg_cost", f.avg_cost)] {
                if !d.double(i).unwrap_or(f64::NAN).is_finite() {
                    return Err(format!("{n} is not a finite number"));
                }
            }
            // Out of range, `event_date` cannot be built and readers cannot read the row.
            for (n, i) in f.times {
                check_time(n, d.long(i))?;
            }
            if let Some(key) = m.key {
                if !key_matches(key, account, con_id) {
                    return Err(format!(
                        "key {:?} is not {account}:{con_id}",
                        String::from_utf8_lossy(key)
                    ));
                }
            }
        }
        Role::Registry => {
            let (strategy, con_id) = (
                d.str(f.strategy).unwrap_or_default(),
                d.long(f.registry_con_id).unwrap_or_default(),
            );
            if strategy.is_empty() || con_id <= 0 {
                return Err(format!("bad key fields strategy={strategy:?} con_id={con_id}"));
            }
            check_time("time", d.long(f.registry_time))?;
        }
        Role::Executions => super::executions::validate(m.key, d)?,
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::Route;
    use crate::materialize::checks::{MAX_TIMESTAMP_MICROS, MIN_TIMESTAMP_MICROS};

    fn msg<'a>(role: Role, offset: i64, key: &'a [u8], value: &'a [u8]) -> Incoming<'a> {
        Incoming {
            role,
            topic: "t",
            partition: 0,
            offset,
            timestamp: None,
            key: Some(key),
            value: Some(value),
        }
    }

    #[test]
    fn poison_becomes_dead_letter_and_offsets_cover_it() {
        let mut b = Buffers::new("ns");
        let mut e = crate::materialize::decode::tests_support::sample(1);
        e.route = Route::Queued;
        let good = e.encode().unwrap();
        let key = e.key();
        assert!(b.push(&msg(Role::Queued, 10, key.as_bytes(), &good)).is_none());
        assert!(b.push(&msg(Role::Queued, 11, key.as_bytes(), b"garbage")).is_some());
        assert!(b
            .push(&msg(Role::Active, 12, key.as_bytes(), &good))
            .unwrap()
            .contains("route QUEUED"));
        assert!(b
            .push(&msg(Role::Queued, 13, b"DU1:999", &good))
            .unwrap()
            .contains("key"));
        let frozen = b.freeze().unwrap();
        let q = frozen.iter().find(|f| f.role == Role::Queued).unwrap();
        assert_eq!(
            (q.first_offset, q.last_offset, q.rows.num_rows(), q.dead.len()),
            (10, 13, 1, 2)
        );
        assert_eq!(b.messages(), 0);
    }

    #[test]
    fn out_of_range_timestamps_become_dead_letters() {
        let mut b = Buffers::new("ns");
        for (i, (ib, ingest)) in [
            (0, i64::MAX),
            (0, MAX_TIMESTAMP_MICROS + 1),
            (i64::MIN, 0),
            (MIN_TIMESTAMP_MICROS - 1, 0),
        ]
        .into_iter()
        .enumerate()
        {
            let mut e = crate::materialize::decode::tests_support::sample(1);
            e.route = Route::Queued;
            (e.ib_time, e.ingest_time) = (ib, ingest);
            let v = e.encode().unwrap();
            let error = b.push(&msg(Role::Queued, i as i64, e.key().as_bytes(), &v));
            assert!(error.as_deref().is_some_and(|m| m.contains("outside")), "{error:?}");
        }
        let mut e = crate::materialize::decode::tests_support::sample(1);
        e.route = Route::Queued;
        (e.ib_time, e.ingest_time) = (MIN_TIMESTAMP_MICROS, MAX_TIMESTAMP_MICROS);
        let v = e.encode().unwrap();
        assert_eq!(b.push(&msg(Role::Queued, 9, e.key().as_bytes(), &v)), None);
        // The rows that stay build their partition values without panicking.
        let frozen = b.freeze().unwrap();
        assert_eq!((frozen[0].rows.num_rows(), frozen[0].dead.len()), (1, 4));
    }
}
