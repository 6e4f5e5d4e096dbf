//! The upsert tables: `positions_current`, `position_queue`, `strategy_registry`.
//!
//! Each is small (one row per key) and kept in memory; a commit rewrites it as remove-all +
//! add-one-file against the snapshot it was read from. Every state here is a *join
//! semilattice*: [`merge`](CurrentState::merge) is commutative, associative and idempotent, so
//! when another member committed first the materializer reloads the table, merges its rows in,
//! re-applies its own (still unwritten) events, and retries; replaying events changes nothing.
//!
//! Ordering: an event is newer than another by `(ingest_time, session_id, sequence, event_id)`;
//! registry events by `(time, event_id)`. An older event never overwrites a newer one.
//!
//! `position_queue` semantics (one row per (account, con_id) ever seen on either route):
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
//! - Merging two versions of a row takes the queued part with more `queued_events` (all queued
//!   events of a key come from one Kafka partition, so the longer history contains the shorter)
//!   and the newest `last_active_at`.

use std::collections::BTreeMap;
use std::sync::Arc;

use deltalake::arrow::array::{
    Array, ArrayRef, AsArray, BooleanBuilder, Float64Builder, Int32Builder, Int64Builder, RecordBatch, StringBuilder,
    TimestampMicrosecondBuilder,
};
use deltalake::arrow::compute::interleave;
use deltalake::arrow::datatypes::{Float64Type, Int32Type, Int64Type, SchemaRef, TimestampMicrosecondType};
use deltalake::arrow::error::ArrowError;

use super::decode::UTC;
use super::tables::{positions_current_layout, TableKind};

/// Newest-wins order of position events.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct EventOrder {
    pub ingest_time: i64,
    pub session_id: String,
    pub sequence: i64,
    pub event_id: String,
}

/// Column accessors over a batch of position rows (`position_events` / `positions_current`).
struct Cols<'a> {
    account: &'a deltalake::arrow::array::StringArray,
    con_id: &'a deltalake::arrow::array::Int64Array,
    ingest_time: &'a deltalake::arrow::array::TimestampMicrosecondArray,
    session_id: &'a deltalake::arrow::array::StringArray,
    sequence: &'a deltalake::arrow::array::Int64Array,
    event_id: &'a deltalake::arrow::array::StringArray,
}

fn col<'a>(b: &'a RecordBatch, name: &str) -> Result<&'a ArrayRef, ArrowError> {
    b.column_by_name(name)
        .ok_or_else(|| ArrowError::SchemaError(format!("missing column {name}")))
}

impl<'a> Cols<'a> {
    fn of(b: &'a RecordBatch) -> Result<Self, ArrowError> {
        Ok(Self {
            account: col(b, "account")?.as_string::<i32>(),
            con_id: col(b, "con_id")?.as_primitive::<Int64Type>(),
            ingest_time: col(b, "ingest_time")?.as_primitive::<TimestampMicrosecondType>(),
            session_id: col(b, "session_id")?.as_string::<i32>(),
            sequence: col(b, "sequence")?.as_primitive::<Int64Type>(),
            event_id: col(b, "event_id")?.as_string::<i32>(),
        })
    }

    fn key(&self, i: usize) -> (&'a str, i64) {
        (self.account.value(i), self.con_id.value(i))
    }

    fn order(&self, i: usize) -> (i64, &'a str, i64, &'a str) {
        (
            self.ingest_time.value(i),
            self.session_id.value(i),
            self.sequence.value(i),
            self.event_id.value(i),
        )
    }

    fn owned_order(&self, i: usize) -> EventOrder {
        let (t, s, q, e) = self.order(i);
        EventOrder {
            ingest_time: t,
            session_id: s.to_string(),
            sequence: q,
            event_id: e.to_string(),
        }
    }
}

fn newer(a: (i64, &str, i64, &str), b: &EventOrder) -> bool {
    a > (b.ingest_time, b.session_id.as_str(), b.sequence, b.event_id.as_str())
}

/// `positions_current`: the newest event per (account, con_id), as rows of one batch.
#[derive(Debug, Clone)]
pub struct CurrentState {
    batch: RecordBatch,
    index: BTreeMap<(String, i64), (EventOrder, usize)>,
}

impl Default for CurrentState {
    fn default() -> Self {
        Self {
            batch: RecordBatch::new_empty(Self::schema()),
            index: BTreeMap::new(),
        }
    }
}

impl CurrentState {
    fn schema() -> SchemaRef {
        positions_current_layout().schema.clone()
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// No keys.
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// The state as one batch (sorted by key).
    pub fn batch(&self) -> &RecordBatch {
        &self.batch
    }

    /// The state merged with event rows (`position_events` or `positions_current` layout);
    /// `None` when no row is newer than what the state holds.
    ///
    /// # Errors
    /// Arrow errors (schema mismatch: a bug).
    pub fn merge(&self, rows: &[RecordBatch]) -> Result<Option<CurrentState>, ArrowError> {
        let schema = Self::schema();
        // Project every input to the positions_current columns (drops `event_date`).
        let inputs: Vec<RecordBatch> = rows
            .iter()
            .filter(|b| b.num_rows() > 0)
            .map(|b| {
                let idx: Result<Vec<usize>, _> =
                    schema.fields().iter().map(|f| b.schema().index_of(f.name())).collect();
                let p = b.project(&idx?)?;
                RecordBatch::try_new(schema.clone(), p.columns().to_vec())
            })
            .collect::<Result<_, _>>()?;
        // Newest row per key among the inputs (borrowed keys, no allocation per row).
        let cols: Vec<Cols<'_>> = inputs.iter().map(Cols::of).collect::<Result<_, _>>()?;
        let mut best: std::collections::HashMap<(&str, i64), (usize, usize)> = std::collections::HashMap::new();
        for (bi, c) in cols.iter().enumerate() {
            for i in 0..c.account.len() {
                match best.entry(c.key(i)) {
                    std::collections::hash_map::Entry::Vacant(v) => {
                        v.insert((bi, i));
                    }
                    std::collections::hash_map::Entry::Occupied(mut o) => {
                        let (ob, oi) = *o.get();
                        if c.order(i) > cols[ob].order(oi) {
                            o.insert((bi, i));
                        }
                    }
                }
            }
        }
        let mut index = self.index.clone();
        let mut changed = false;
        for ((acct, con), (bi, i)) in best {
            let c = &cols[bi];
            match index.get_mut(&(acct.to_string(), con)) {
                Some(cur) if !newer(c.order(i), &cur.0) => {}
                Some(cur) => {
                    *cur = (c.owned_order(i), encode_src(bi + 1, i));
                    changed = true;
                }
                None => {
                    index.insert((acct.to_string(), con), (c.owned_order(i), encode_src(bi + 1, i)));
                    changed = true;
                }
            }
        }
        if !changed {
            return Ok(None);
        }
        // Source 0 = the current state batch, 1.. = inputs.
        let mut sources: Vec<&RecordBatch> = vec![&self.batch];
        sources.extend(inputs.iter());
        let picks: Vec<(usize, usize)> = index.values().map(|(_, s)| decode_src(*s)).collect();
        let columns = (0..schema.fields().len())
            .map(|c| {
                let arrays: Vec<&dyn Array> = sources.iter().map(|b| b.column(c).as_ref()).collect();
                interleave(&arrays, &picks)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let batch = RecordBatch::try_new(schema, columns)?;
        let index = index
            .into_iter()
            .enumerate()
            .map(|(row, (k, (o, _)))| (k, (o, row)))
            .collect();
        Ok(Some(CurrentState { batch, index }))
    }
}

// Row references pack (source batch, row) into one usize for the index.
fn encode_src(batch: usize, row: usize) -> usize {
    (batch << 40) | row
}

fn decode_src(s: usize) -> (usize, usize) {
    (s >> 40, s & ((1 << 40) - 1))
}

/// The queued-route part of a `position_queue` row.
#[derive(Debug, Clone, PartialEq)]
pub struct QueuedPart {
    pub enqueued_at: Option<i64>,
    pub last_refreshed_at: Option<i64>,
    pub refresh_count: i64,
    pub queued_events: i64,
    pub last: EventOrder,
    pub last_source: String,
    pub position: f64,
    pub avg_cost: f64,
}

/// One `position_queue` row (without its key).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct QueueRow {
    pub queued: Option<QueuedPart>,
    pub last_active_at: Option<i64>,
}

impl QueueRow {
    /// `pending`, `refreshed`, `closed` or `active` (see the module docs).
    pub fn status(&self) -> &'static str {
        match (&self.queued, self.last_active_at) {
            (None, _) => "active",
            (Some(q), Some(a)) if a > q.last.ingest_time => "active",
            (Some(q), _) if q.position == 0.0 => "closed",
            (Some(q), _) if q.last_source == "POLL" => "refreshed",
            _ => "pending",
        }
    }

    fn updated_at(&self) -> i64 {
        let q = self.queued.as_ref().map(|q| q.last.ingest_time);
        q.max(self.last_active_at).unwrap_or_default()
    }

    /// Semilattice join of two versions of the same key.
    pub fn join(&self, other: &QueueRow) -> QueueRow {
        let queued = match (&self.queued, &other.queued) {
            (Some(a), Some(b)) => Some(if (b.queued_events, &b.last) > (a.queued_events, &a.last) {
                b.clone()
            } else {
                a.clone()
            }),
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
    pub source: &'a str,
    pub order: (i64, &'a str, i64, &'a str),
    pub position: f64,
    pub avg_cost: f64,
}

fn max_opt(a: Option<i64>, b: i64) -> Option<i64> {
    Some(a.map_or(b, |a| a.max(b)))
}

impl QueueRow {
    /// Applies one event.
    pub fn apply(&mut self, e: &QueueInput<'_>) {
        let t = e.order.0;
        if e.active_route {
            self.last_active_at = max_opt(self.last_active_at, t);
            return;
        }
        let owned = || EventOrder {
            ingest_time: t,
            session_id: e.order.1.to_string(),
            sequence: e.order.2,
            event_id: e.order.3.to_string(),
        };
        let q = self.queued.get_or_insert_with(|| QueuedPart {
            enqueued_at: None,
            last_refreshed_at: None,
            refresh_count: 0,
            queued_events: 0,
            last: owned(),
            last_source: e.source.to_string(),
            position: e.position,
            avg_cost: e.avg_cost,
        });
        q.queued_events += 1;
        if e.source == "POLL" {
            q.refresh_count += 1;
            q.last_refreshed_at = max_opt(q.last_refreshed_at, t);
        } else {
            q.enqueued_at = max_opt(q.enqueued_at, t);
        }
        if newer(e.order, &q.last) || q.queued_events == 1 {
            q.last = owned();
            q.last_source = e.source.to_string();
            q.position = e.position;
            q.avg_cost = e.avg_cost;
        }
    }
}

/// `position_queue` state.
pub type QueueState = BTreeMap<(String, i64), QueueRow>;

/// Folds position event rows into a copy of the touched queue rows; returns the new state
/// (`None` when nothing changed).
///
/// # Errors
/// Arrow errors (schema mismatch: a bug).
pub fn fold_queue(state: &QueueState, rows: &[RecordBatch]) -> Result<Option<QueueState>, ArrowError> {
    let mut next = state.clone();
    let mut changed = false;
    for b in rows.iter().filter(|b| b.num_rows() > 0) {
        let c = Cols::of(b)?;
        let route = col(b, "route")?.as_string::<i32>();
        let source = col(b, "source")?.as_string::<i32>();
        let position = col(b, "position")?.as_primitive::<Float64Type>();
        let avg_cost = col(b, "avg_cost")?.as_primitive::<Float64Type>();
        for i in 0..b.num_rows() {
            let (acct, con) = c.key(i);
            let row = next.entry((acct.to_string(), con)).or_default();
            let before = row.clone();
            row.apply(&QueueInput {
                active_route: route.value(i) == "ACTIVE",
                source: source.value(i),
                order: c.order(i),
                position: position.value(i),
                avg_cost: avg_cost.value(i),
            });
            changed |= *row != before;
        }
    }
    Ok(changed.then_some(next))
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
    let n = state.len();
    let ts = || TimestampMicrosecondBuilder::with_capacity(n).with_timezone(UTC);
    let (mut account, mut con_id, mut status) = (StringBuilder::new(), Int64Builder::new(), StringBuilder::new());
    let (mut enq, mut refreshed, mut count, mut events) = (ts(), ts(), Int64Builder::new(), Int64Builder::new());
    let (mut ev_id, mut src, mut ev_at, mut sess, mut seq) = (
        StringBuilder::new(),
        StringBuilder::new(),
        ts(),
        StringBuilder::new(),
        Int64Builder::new(),
    );
    let (mut pos, mut cost, mut active, mut updated) = (Float64Builder::new(), Float64Builder::new(), ts(), ts());
    for ((a, c), r) in state {
        account.append_value(a);
        con_id.append_value(*c);
        status.append_value(r.status());
        let q = r.queued.as_ref();
        enq.append_option(q.and_then(|q| q.enqueued_at));
        refreshed.append_option(q.and_then(|q| q.last_refreshed_at));
        count.append_value(q.map_or(0, |q| q.refresh_count));
        events.append_value(q.map_or(0, |q| q.queued_events));
        ev_id.append_option(q.map(|q| &q.last.event_id));
        src.append_option(q.map(|q| &q.last_source));
        ev_at.append_option(q.map(|q| q.last.ingest_time));
        sess.append_option(q.map(|q| &q.last.session_id));
        seq.append_option(q.map(|q| q.last.sequence));
        pos.append_option(q.map(|q| q.position));
        cost.append_option(q.map(|q| q.avg_cost));
        active.append_option(r.last_active_at);
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
    RecordBatch::try_new(TableKind::PositionQueue.schema(), cols)
}

/// Reads `position_queue` rows back into state.
///
/// # Errors
/// Arrow errors (schema mismatch).
pub fn queue_from_batches(batches: &[RecordBatch]) -> Result<QueueState, ArrowError> {
    let mut out = QueueState::new();
    for b in batches {
        let s = |n| col(b, n).map(|c| c.as_string::<i32>());
        let l = |n| col(b, n).map(|c| c.as_primitive::<Int64Type>());
        let t = |n| col(b, n).map(|c| c.as_primitive::<TimestampMicrosecondType>());
        let f = |n| col(b, n).map(|c| c.as_primitive::<Float64Type>());
        let (account, con_id, events, count) = (s("account")?, l("con_id")?, l("queued_events")?, l("refresh_count")?);
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
            let queued = (events.value(i) > 0 && opt(ev_at, i)).then(|| QueuedPart {
                enqueued_at: opt(enq, i).then(|| enq.value(i)),
                last_refreshed_at: opt(refreshed, i).then(|| refreshed.value(i)),
                refresh_count: count.value(i),
                queued_events: events.value(i),
                last: EventOrder {
                    ingest_time: ev_at.value(i),
                    session_id: sess.value(i).to_string(),
                    sequence: seq.value(i),
                    event_id: ev_id.value(i).to_string(),
                },
                last_source: src.value(i).to_string(),
                position: pos.value(i),
                avg_cost: cost.value(i),
            });
            let row = QueueRow {
                queued,
                last_active_at: opt(active, i).then(|| active.value(i)),
            };
            let e = out.entry((account.value(i).to_string(), con_id.value(i))).or_default();
            *e = e.join(&row);
        }
    }
    Ok(out)
}

/// One `strategy_registry` row (without its key).
#[derive(Debug, Clone, PartialEq)]
pub struct RegistryRow {
    pub active: bool,
    pub priority: i32,
    pub updated_at: i64,
    pub actor: String,
    pub event_id: String,
}

impl RegistryRow {
    fn order(&self) -> (i64, &str) {
        (self.updated_at, &self.event_id)
    }
}

/// Registry key: (strategy, account or `None` = all accounts, con_id).
pub type RegistryKey = (String, Option<String>, i64);
/// `strategy_registry` state.
pub type RegistryState = BTreeMap<RegistryKey, RegistryRow>;

/// Newest-wins upsert of one row; returns whether it changed the state.
pub fn upsert_registry(state: &mut RegistryState, key: RegistryKey, row: RegistryRow) -> bool {
    match state.get(&key) {
        Some(cur) if cur.order() >= row.order() => false,
        _ => {
            state.insert(key, row);
            true
        }
    }
}

/// Folds registry event rows (registry layout) into a copy of the state (`None` = unchanged).
///
/// # Errors
/// Arrow errors (schema mismatch: a bug).
pub fn fold_registry(state: &RegistryState, rows: &[RecordBatch]) -> Result<Option<RegistryState>, ArrowError> {
    let mut next = state.clone();
    let mut changed = false;
    for b in rows.iter().filter(|b| b.num_rows() > 0) {
        let s = |n| col(b, n).map(|c| c.as_string::<i32>());
        let (strategy, account, action, actor, event_id) =
            (s("strategy")?, s("account")?, s("action")?, s("actor")?, s("event_id")?);
        let con_id = col(b, "con_id")?.as_primitive::<Int64Type>();
        let priority = col(b, "priority")?.as_primitive::<Int32Type>();
        let time = col(b, "time")?.as_primitive::<TimestampMicrosecondType>();
        for i in 0..b.num_rows() {
            let key = (
                strategy.value(i).to_string(),
                account.is_valid(i).then(|| account.value(i).to_string()),
                con_id.value(i),
            );
            let row = RegistryRow {
                active: action.value(i) == "ACTIVATE",
                priority: priority.value(i),
                updated_at: time.value(i),
                actor: actor.value(i).to_string(),
                event_id: event_id.value(i).to_string(),
            };
            changed |= upsert_registry(&mut next, key, row);
        }
    }
    Ok(changed.then_some(next))
}

/// The registry state as a batch of the `strategy_registry` schema.
///
/// # Errors
/// Arrow errors (a bug).
pub fn registry_batch(state: &RegistryState) -> Result<RecordBatch, ArrowError> {
    let (mut strategy, mut account, mut con_id) = (StringBuilder::new(), StringBuilder::new(), Int64Builder::new());
    let (mut active, mut priority) = (BooleanBuilder::new(), Int32Builder::new());
    let mut updated = TimestampMicrosecondBuilder::new().with_timezone(UTC);
    let (mut actor, mut event_id) = (StringBuilder::new(), StringBuilder::new());
    for ((s, a, c), r) in state {
        strategy.append_value(s);
        account.append_option(a.as_ref());
        con_id.append_value(*c);
        active.append_value(r.active);
        priority.append_value(r.priority);
        updated.append_value(r.updated_at);
        actor.append_value(&r.actor);
        event_id.append_value(&r.event_id);
    }
    let cols: Vec<ArrayRef> = vec![
        Arc::new(strategy.finish()),
        Arc::new(account.finish()),
        Arc::new(con_id.finish()),
        Arc::new(active.finish()),
        Arc::new(priority.finish()),
        Arc::new(updated.finish()),
        Arc::new(actor.finish()),
        Arc::new(event_id.finish()),
    ];
    RecordBatch::try_new(TableKind::StrategyRegistry.schema(), cols)
}

/// Reads `strategy_registry` rows back into state.
///
/// # Errors
/// Arrow errors (schema mismatch).
pub fn registry_from_batches(batches: &[RecordBatch]) -> Result<RegistryState, ArrowError> {
    let mut out = RegistryState::new();
    for b in batches {
        let s = |n| col(b, n).map(|c| c.as_string::<i32>());
        let (strategy, account, actor, event_id) = (s("strategy")?, s("account")?, s("actor")?, s("event_id")?);
        let con_id = col(b, "con_id")?.as_primitive::<Int64Type>();
        let active = col(b, "active")?.as_boolean();
        let priority = col(b, "priority")?.as_primitive::<Int32Type>();
        let updated = col(b, "updated_at")?.as_primitive::<TimestampMicrosecondType>();
        for i in 0..b.num_rows() {
            let key = (
                strategy.value(i).to_string(),
                account.is_valid(i).then(|| account.value(i).to_string()),
                con_id.value(i),
            );
            let row = RegistryRow {
                active: active.value(i),
                priority: priority.value(i),
                updated_at: updated.value(i),
                actor: actor.value(i).to_string(),
                event_id: event_id.value(i).to_string(),
            };
            upsert_registry(&mut out, key, row);
        }
    }
    Ok(out)
}

/// Joins registry rows read from the table into `state`; returns whether anything changed.
pub fn join_registry(state: &mut RegistryState, other: RegistryState) -> bool {
    let mut changed = false;
    for (k, r) in other {
        changed |= upsert_registry(state, k, r);
    }
    changed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(t: i64, seq: i64, source: &'static str, active: bool) -> QueueInput<'static> {
        QueueInput {
            active_route: active,
            source,
            order: (t, "s", seq, "e"),
            position: t as f64,
            avg_cost: 1.0,
        }
    }

    #[test]
    fn queue_status_follows_newest_event_and_counts_polls() {
        let mut r = QueueRow::default();
        r.apply(&ev(10, 1, "SNAPSHOT", false));
        assert_eq!(r.status(), "pending");
        r.apply(&ev(20, 2, "POLL", false));
        assert_eq!(r.status(), "refreshed");
        // an older enqueue arriving late does not overwrite the newer poll
        r.apply(&ev(15, 3, "STREAM", false));
        assert_eq!(r.status(), "refreshed");
        let q = r.queued.as_ref().unwrap();
        assert_eq!(
            (q.refresh_count, q.queued_events, q.enqueued_at, q.last_refreshed_at),
            (1, 3, Some(15), Some(20))
        );
        r.apply(&ev(30, 4, "PNL", true));
        assert_eq!(r.status(), "active");
        r.apply(&ev(40, 5, "STREAM", false));
        assert_eq!(r.status(), "pending");
        // A close leaves the work list: the worker never polls it (issue 10 #11).
        r.apply(&QueueInput {
            position: 0.0,
            ..ev(50, 6, "STREAM", false)
        });
        assert_eq!(r.status(), "closed");
        r.apply(&ev(60, 7, "POLL", false));
        assert_eq!(r.status(), "refreshed", "reopened and refreshed");
    }

    #[test]
    fn queue_join_is_a_semilattice() {
        let mut a = QueueRow::default();
        a.apply(&ev(10, 1, "SNAPSHOT", false));
        let mut b = a.clone();
        b.apply(&ev(20, 2, "POLL", false));
        let mut c = QueueRow::default();
        c.apply(&ev(25, 9, "PNL", true));
        for (x, y) in [(&a, &b), (&b, &c), (&a, &c)] {
            assert_eq!(x.join(y), y.join(x));
            assert_eq!(x.join(x), *x);
        }
        assert_eq!(a.join(&b).join(&c), a.join(&b.join(&c)));
        assert_eq!(a.join(&b), b);
        let st: QueueState = [(("A".to_string(), 1), a.join(&b).join(&c))].into_iter().collect();
        let back = queue_from_batches(&[queue_batch(&st).unwrap()]).unwrap();
        assert_eq!(back, st);
    }

    #[test]
    fn registry_newest_wins() {
        let mut s = RegistryState::new();
        let k = ("w".to_string(), None, 5);
        let row = |t, active| RegistryRow {
            active,
            priority: 1,
            updated_at: t,
            actor: "a".into(),
            event_id: format!("e{t}"),
        };
        assert!(upsert_registry(&mut s, k.clone(), row(10, true)));
        assert!(!upsert_registry(&mut s, k.clone(), row(5, false)));
        assert!(upsert_registry(&mut s, k.clone(), row(11, false)));
        let back = registry_from_batches(&[registry_batch(&s).unwrap()]).unwrap();
        assert_eq!(back, s);
    }
}
