//! `position_queue`: the queue state per (account, con_id), a join semilattice.
//!
//! Semantics (one row per (account, con_id) ever seen on either route):
//! - QUEUED-route events with source STREAM / SNAPSHOT / RECONCILE *enqueue*: `enqueued_at` is
//!   the newest of them; POLL events *refresh*: `refresh_count` counts them and
//!   `last_refreshed_at` is the newest. `last_*`, `position`, `avg_cost` come from the newest
//!   QUEUED-route event.
//! - ACTIVE-route events do not delete the row: they set `last_active_at` (newest). Deleting
//!   would need tombstones to stay order-independent; a status is simpler to query.
//! - `status` = `active` when the newest ACTIVE-route event is newer than the newest QUEUED-route
//!   event, else `closed` when the newest queued event has position 0 (the queue worker never
//!   polls a closed item), else `refreshed` when it is a POLL, else `pending`. So `pending` is
//!   exactly the worker's work list.
//!
//! Merging two versions of a row (another member's commit, a reload) orders by the events
//! themselves: the `last_*` part comes from the newer last event, every timestamp is a max.
//! The counts are kept per Kafka partition of the queued topic (`partition_counts`): every
//! version of a row counts, for each partition, the key's events in a *prefix* of that
//! partition's log (each table holds a prefix per partition, exactly once), so the join takes
//! the larger count per partition and the totals are sums over partitions. No assumption that a
//! key stays in one partition: adding partitions to the queued topic moves keys, and the
//! history of each partition survives the merge (a grow-only counter with one slot per
//! partition).

use std::collections::BTreeMap;
use std::sync::Arc;

use deltalake::arrow::array::{
    Array, ArrayRef, AsArray, Float64Builder, Int32Builder, Int64Builder, ListBuilder, RecordBatch, StringBuilder,
    StructBuilder, TimestampMicrosecondBuilder,
};
use deltalake::arrow::datatypes::{DataType, Float64Type, Int32Type, Int64Type, TimestampMicrosecondType};
use deltalake::arrow::error::ArrowError;

use super::core::RowValue;
use super::{col, newer, Cols, EventOrder, Sym};
use crate::materialize::catalog::{queue_count_fields, queue_schema};
use crate::materialize::decode::{list_element, UTC};

/// One partition's counts: (partition, (queued events, POLL events)).
type Count = (i32, (i64, i64));

/// Per queued-topic partition: (queued events, POLL events) of the key in that partition,
/// sorted by partition. A key usually has one partition, kept inline (32 bytes, no
/// allocation); keys seen in several partitions (partitions were added) keep a boxed slice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionCounts(Slots);

/// Normalized: exactly one partition is always `One`, so equal counts compare equal.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Slots {
    One([Count; 1]),
    /// None, or two or more.
    Many(Box<[Count]>),
}

impl Default for PartitionCounts {
    fn default() -> Self {
        Self(Slots::Many(Box::default()))
    }
}

impl PartitionCounts {
    /// No partition.
    pub fn new() -> Self {
        Self::default()
    }

    fn as_slice(&self) -> &[Count] {
        match &self.0 {
            Slots::One(one) => one,
            Slots::Many(many) => many,
        }
    }

    fn as_mut_slice(&mut self) -> &mut [Count] {
        match &mut self.0 {
            Slots::One(one) => one,
            Slots::Many(many) => many,
        }
    }

    /// Whether no partition has a count.
    pub fn is_empty(&self) -> bool {
        self.as_slice().is_empty()
    }

    /// The counts of `partition`, inserted as (0, 0) when missing.
    pub fn entry(&mut self, partition: i32) -> &mut (i64, i64) {
        let i = match self.as_slice().binary_search_by_key(&partition, |(p, _)| *p) {
            Ok(i) => i,
            Err(i) => {
                let mut v = self.as_slice().to_vec();
                v.insert(i, (partition, (0, 0)));
                self.0 = match v.as_slice() {
                    [one] => Slots::One([*one]),
                    _ => Slots::Many(v.into_boxed_slice()),
                };
                i
            }
        };
        &mut self.as_mut_slice()[i].1
    }

    /// (partition, counts), by partition.
    pub fn iter(&self) -> impl Iterator<Item = (&i32, &(i64, i64))> {
        self.into_iter()
    }

    /// The counts, by partition.
    pub fn values(&self) -> impl Iterator<Item = &(i64, i64)> {
        self.as_slice().iter().map(|(_, c)| c)
    }
}

impl<'a> IntoIterator for &'a PartitionCounts {
    type Item = (&'a i32, &'a (i64, i64));
    type IntoIter = std::iter::Map<std::slice::Iter<'a, Count>, fn(&'a Count) -> (&'a i32, &'a (i64, i64))>;

    fn into_iter(self) -> Self::IntoIter {
        self.as_slice().iter().map(|(p, c)| (p, c))
    }
}

/// An optional µs timestamp in 8 bytes (an `Option<i64>` takes 16): `i64::MIN`, an instant no
/// event has, is "none". It orders like the `Option` (none first), so a max is a max.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct OptTime(i64);

impl Default for OptTime {
    fn default() -> Self {
        OptTime(i64::MIN)
    }
}

impl OptTime {
    /// The time, if any.
    pub fn get(self) -> Option<i64> {
        (self.0 != i64::MIN).then_some(self.0)
    }

    /// `t` as an `OptTime`.
    pub fn of(t: Option<i64>) -> OptTime {
        t.map_or_else(OptTime::default, OptTime)
    }

    /// The stored word (`i64::MIN` for none).
    pub(super) fn raw(self) -> i64 {
        self.0
    }

    /// The `OptTime` of a stored word.
    pub(super) fn from_raw(w: i64) -> OptTime {
        OptTime(w)
    }

    /// The later of this and `t`.
    fn max_with(self, t: i64) -> OptTime {
        OptTime(self.0.max(t))
    }
}

/// The queued-route part of a `position_queue` row.
#[derive(Debug, Clone, PartialEq)]
pub struct QueuedPart {
    pub enqueued_at: OptTime,
    pub last_refreshed_at: OptTime,
    /// Counts per partition of the queued topic (see the module docs).
    pub counts: PartitionCounts,
    pub last: EventOrder,
    pub last_source: Sym,
    pub position: f64,
    pub avg_cost: f64,
}

impl QueuedPart {
    /// Number of QUEUED-route events (all partitions).
    pub fn queued_events(&self) -> i64 {
        self.counts.values().map(|c| c.0).sum()
    }

    /// Number of POLL events (all partitions).
    pub fn refresh_count(&self) -> i64 {
        self.counts.values().map(|c| c.1).sum()
    }

    /// Semilattice join: newest last event, max timestamps, max count per partition.
    fn join(&self, other: &QueuedPart) -> QueuedPart {
        let newest = if other.last > self.last { other } else { self };
        let mut counts = self.counts.clone();
        for (p, (e, r)) in &other.counts {
            let c = counts.entry(*p);
            *c = (c.0.max(*e), c.1.max(*r));
        }
        QueuedPart {
            enqueued_at: self.enqueued_at.max(other.enqueued_at),
            last_refreshed_at: self.last_refreshed_at.max(other.last_refreshed_at),
            counts,
            last: newest.last.clone(),
            last_source: newest.last_source,
            position: newest.position,
            avg_cost: newest.avg_cost,
        }
    }
}

/// One `position_queue` row (without its key).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct QueueRow {
    pub queued: Option<QueuedPart>,
    pub last_active_at: OptTime,
}

impl QueueRow {
    /// `pending`, `refreshed`, `closed` or `active` (see the module docs).
    pub fn status(&self) -> &'static str {
        match (&self.queued, self.last_active_at.get()) {
            (None, _) => "active",
            (Some(q), Some(a)) if a > q.last.ingest_time => "active",
            (Some(q), _) if q.position == 0.0 => "closed",
            (Some(q), _) if q.last_source.as_str() == "POLL" => "refreshed",
            _ => "pending",
        }
    }

    /// When the row last changed (its newest event, µs).
    pub fn updated_at(&self) -> i64 {
        let q = self.queued.as_ref().map(|q| q.last.ingest_time);
        q.max(self.last_active_at.get()).unwrap_or_default()
    }

    /// Semilattice join of two versions of the same key.
    pub fn join(&self, other: &QueueRow) -> QueueRow {
        let queued = match (&self.queued, &other.queued) {
            (Some(a), Some(b)) => Some(a.join(b)),
            (a, b) => a.clone().or_else(|| b.clone()),
        };
        QueueRow {
            queued,
            last_active_at: self.last_active_at.max(other.last_active_at),
        }
    }
}

/// One position event, as the queue fold needs it.
pub struct QueueInput<'a> {
    pub active_route: bool,
    /// Kafka partition the event came from (its topic is the route's).
    pub partition: i32,
    pub source: &'a str,
    pub order: (i64, &'a str, i64, &'a str),
    pub position: f64,
    pub avg_cost: f64,
}

impl QueueRow {
    /// Applies one event.
    pub fn apply(&mut self, e: &QueueInput<'_>) {
        let t = e.order.0;
        if e.active_route {
            self.last_active_at = self.last_active_at.max_with(t);
            return;
        }
        let owned = || EventOrder::of(e.order);
        let fresh = self.queued.is_none();
        let q = self.queued.get_or_insert_with(|| QueuedPart {
            enqueued_at: OptTime::default(),
            last_refreshed_at: OptTime::default(),
            counts: PartitionCounts::new(),
            last: owned(),
            last_source: Sym::new(e.source),
            position: e.position,
            avg_cost: e.avg_cost,
        });
        let c = q.counts.entry(e.partition);
        c.0 += 1;
        if e.source == "POLL" {
            c.1 += 1;
            q.last_refreshed_at = q.last_refreshed_at.max_with(t);
        } else {
            q.enqueued_at = q.enqueued_at.max_with(t);
        }
        if fresh || newer(e.order, &q.last) {
            q.last = owned();
            q.last_source = Sym::new(e.source);
            q.position = e.position;
            q.avg_cost = e.avg_cost;
        }
    }
}

/// Key of a [`QueueState`] row: (account, con_id).
pub type StateKey = (String, i64);

/// `position_queue` state.
pub type QueueState = BTreeMap<StateKey, QueueRow>;

/// Calls `f` with the key and queue input of every position event row (`position_events`
/// layout: the rows carry `kafka_partition`), in order.
pub(super) fn each_event(
    rows: &[RecordBatch],
    mut f: impl FnMut((&str, i64), &QueueInput<'_>),
) -> Result<(), ArrowError> {
    for b in rows.iter().filter(|b| b.num_rows() > 0) {
        let c = Cols::of(b)?;
        let route = col(b, "route")?.as_string::<i32>();
        let source = col(b, "source")?.as_string::<i32>();
        let position = col(b, "position")?.as_primitive::<Float64Type>();
        let avg_cost = col(b, "avg_cost")?.as_primitive::<Float64Type>();
        let partition = col(b, "kafka_partition")?.as_primitive::<Int32Type>();
        for i in 0..b.num_rows() {
            f(
                c.key(i),
                &QueueInput {
                    active_route: route.value(i) == "ACTIVE",
                    partition: partition.value(i),
                    source: source.value(i),
                    order: c.order(i),
                    position: position.value(i),
                    avg_cost: avg_cost.value(i),
                },
            );
        }
    }
    Ok(())
}

/// Folds position event rows (`position_events` layout: they carry `kafka_partition`) into a
/// copy of the touched queue rows; returns the new state (`None` when nothing changed).
///
/// # Errors
/// Arrow errors (schema mismatch: a bug).
pub fn fold_queue(state: &QueueState, rows: &[RecordBatch]) -> Result<Option<QueueState>, ArrowError> {
    let mut next = state.clone();
    let changed = fold_queue_into(&mut next, rows)?;
    Ok(changed.then_some(next))
}

/// Folds position event rows (`position_events` layout) into `state` in place (no copy of
/// the state: a log folded file by file costs its rows, not files x keys); returns whether a
/// row changed.
///
/// # Errors
/// Arrow errors (schema mismatch: a bug).
pub fn fold_queue_into(state: &mut QueueState, rows: &[RecordBatch]) -> Result<bool, ArrowError> {
    let mut changed = false;
    each_event(rows, |(acct, con), e| {
        let row = state.entry((acct.to_string(), con)).or_default();
        let before = row.clone();
        row.apply(e);
        changed |= *row != before;
    })?;
    Ok(changed)
}

/// Joins rows read from the table into `state`; returns whether anything changed.
pub fn join_queue(state: &mut QueueState, other: QueueState) -> bool {
    let mut changed = false;
    for (k, r) in other {
        let e = state.entry(k).or_default();
        let j = e.join(&r);
        changed |= j != *e;
        *e = j;
    }
    changed
}

/// The queue state as a batch of the `position_queue` schema.
///
/// # Errors
/// Arrow errors (a bug).
pub fn queue_batch(state: &QueueState) -> Result<RecordBatch, ArrowError> {
    rows_batch(state.len(), state.iter().map(|((a, c), r)| ((a.as_str(), *c), r)))
}

/// Rows (key, row) as a batch of the `position_queue` schema.
pub(super) fn rows_batch<'a>(
    n: usize,
    rows: impl Iterator<Item = ((&'a str, i64), &'a QueueRow)>,
) -> Result<RecordBatch, ArrowError> {
    let ts = || TimestampMicrosecondBuilder::with_capacity(n).with_timezone(UTC);
    let (mut account, mut con_id, mut status) = (StringBuilder::new(), Int64Builder::new(), StringBuilder::new());
    let (mut enq, mut refreshed, mut count, mut events) = (ts(), ts(), Int64Builder::new(), Int64Builder::new());
    let item = list_element(DataType::Struct(queue_count_fields()));
    let mut per_partition = ListBuilder::new(StructBuilder::from_fields(queue_count_fields(), n)).with_field(item);
    let (mut ev_id, mut src, mut ev_at, mut sess, mut seq) = (
        StringBuilder::new(),
        StringBuilder::new(),
        ts(),
        StringBuilder::new(),
        Int64Builder::new(),
    );
    let (mut pos, mut cost, mut active, mut updated) = (Float64Builder::new(), Float64Builder::new(), ts(), ts());
    for ((a, c), r) in rows {
        account.append_value(a);
        con_id.append_value(c);
        status.append_value(r.status());
        let q = r.queued.as_ref();
        enq.append_option(q.and_then(|q| q.enqueued_at.get()));
        refreshed.append_option(q.and_then(|q| q.last_refreshed_at.get()));
        count.append_value(q.map_or(0, QueuedPart::refresh_count));
        events.append_value(q.map_or(0, QueuedPart::queued_events));
        for (p, (e, rc)) in q.map(|q| &q.counts).into_iter().flatten() {
            let s = per_partition.values();
            append_field::<Int32Builder>(s, 0).append_value(*p);
            append_field::<Int64Builder>(s, 1).append_value(*e);
            append_field::<Int64Builder>(s, 2).append_value(*rc);
            s.append(true);
        }
        per_partition.append(true);
        match q {
            Some(q) => q.last.event_id.with_str(|s| ev_id.append_value(s)),
            None => ev_id.append_null(),
        }
        src.append_option(q.map(|q| q.last_source.as_str()));
        ev_at.append_option(q.map(|q| q.last.ingest_time));
        match q {
            Some(q) => q.last.session_id.with_str(|s| sess.append_value(s)),
            None => sess.append_null(),
        }
        seq.append_option(q.map(|q| q.last.sequence));
        pos.append_option(q.map(|q| q.position));
        cost.append_option(q.map(|q| q.avg_cost));
        active.append_option(r.last_active_at.get());
        updated.append_value(r.updated_at());
    }
    let cols: Vec<ArrayRef> = vec![
        Arc::new(account.finish()),
        Arc::new(con_id.finish()),
        Arc::new(status.finish()),
        Arc::new(enq.finish()),
        Arc::new(refreshed.finish()),
        Arc::new(count.finish()),
        Arc::new(events.finish()),
        Arc::new(per_partition.finish()),
        Arc::new(ev_id.finish()),
        Arc::new(src.finish()),
        Arc::new(ev_at.finish()),
        Arc::new(sess.finish()),
        Arc::new(seq.finish()),
        Arc::new(pos.finish()),
        Arc::new(cost.finish()),
        Arc::new(active.finish()),
        Arc::new(updated.finish()),
    ];
    RecordBatch::try_new(queue_schema(), cols)
}

fn append_field<T: deltalake::arrow::array::ArrayBuilder>(s: &mut StructBuilder, i: usize) -> &mut T {
    s.field_builder::<T>(i)
        .expect("the struct's field builders follow queue_count_fields()")
}

/// Reads `position_queue` rows back into state.
///
/// # Errors
/// Arrow errors (schema mismatch).
pub fn queue_from_batches(batches: &[RecordBatch]) -> Result<QueueState, ArrowError> {
    let mut out = QueueState::new();
    for b in batches {
        for (key, row) in queue_rows(b)? {
            let e = out.entry(key).or_default();
            *e = e.join(&row);
        }
    }
    Ok(out)
}

impl RowValue for QueueRow {
    fn of_rows(batch: &RecordBatch) -> Result<Vec<Self>, ArrowError> {
        Ok(queue_rows(batch)?.into_iter().map(|(_, r)| r).collect())
    }
}

/// Every row of one `position_queue` batch, in order.
fn queue_rows(b: &RecordBatch) -> Result<Vec<(StateKey, QueueRow)>, ArrowError> {
    let mut out = Vec::with_capacity(b.num_rows());
    {
        let s = |n| col(b, n).map(|c| c.as_string::<i32>());
        let l = |n| col(b, n).map(|c| c.as_primitive::<Int64Type>());
        let t = |n| col(b, n).map(|c| c.as_primitive::<TimestampMicrosecondType>());
        let f = |n| col(b, n).map(|c| c.as_primitive::<Float64Type>());
        let (account, con_id) = (s("account")?, l("con_id")?);
        let per_partition = col(b, "partition_counts")?.as_list::<i32>();
        let (enq, refreshed, ev_at, active) = (
            t("enqueued_at")?,
            t("last_refreshed_at")?,
            t("last_event_at")?,
            t("last_active_at")?,
        );
        let (ev_id, src, sess, seq) = (
            s("last_event_id")?,
            s("last_source")?,
            s("last_session_id")?,
            l("last_sequence")?,
        );
        let (pos, cost) = (f("position")?, f("avg_cost")?);
        let opt = |a: &dyn Array, i: usize| a.is_valid(i);
        for i in 0..b.num_rows() {
            let mut counts = PartitionCounts::new();
            let items = per_partition.value(i);
            let items = items.as_struct();
            let (p, e, r) = (
                items.column(0).as_primitive::<Int32Type>(),
                items.column(1).as_primitive::<Int64Type>(),
                items.column(2).as_primitive::<Int64Type>(),
            );
            for k in 0..items.len() {
                let c = counts.entry(p.value(k));
                *c = (c.0.max(e.value(k)), c.1.max(r.value(k)));
            }
            let queued = (!counts.is_empty() && opt(ev_at, i)).then(|| QueuedPart {
                enqueued_at: OptTime::of(opt(enq, i).then(|| enq.value(i))),
                last_refreshed_at: OptTime::of(opt(refreshed, i).then(|| refreshed.value(i))),
                counts,
                last: EventOrder::of((ev_at.value(i), sess.value(i), seq.value(i), ev_id.value(i))),
                last_source: Sym::new(src.value(i)),
                position: pos.value(i),
                avg_cost: cost.value(i),
            });
            let row = QueueRow {
                queued,
                last_active_at: OptTime::of(opt(active, i).then(|| active.value(i))),
            };
            out.push(((account.value(i).to_string(), con_id.value(i)), row));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
