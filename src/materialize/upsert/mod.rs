//! The upsert tables: `positions_current` ([`current`]), `position_queue` ([`queue`] for the
//! row semantics, [`queue_table`] for the table), `strategy_registry` (here).
//!
//! The two big ones share one copy-on-write core ([`core`]: a commit writes one file of the
//! changed keys' rows and deletion vectors for their old rows) and keep their per-key merge
//! values in a local spill file ([`spilled`] over [`spill`]), so memory holds ~40 bytes per key
//! and table. `strategy_registry` is small and rewritten whole. Every state here is a *join
//! semilattice*: merging is commutative, associative and idempotent, so when another member
//! committed first the materializer reads what it added, re-plans its own (still unwritten)
//! events, and retries; replaying events changes nothing. [`CurrentState`] is the whole-table
//! fold that `possync rebuild` and the tests use.
//!
//! Ordering: an event is newer than another by `(ingest_time, session_id, sequence, event_id)`;
//! registry events by `(time, event_id)`. An older event never overwrites a newer one.

pub mod core;
pub mod current;
pub mod queue;
pub mod queue_table;
pub mod spill;
pub mod spilled;
pub mod summary;
pub mod sym;

pub use current::{Current, CurrentMeta};
pub use queue::{
    fold_queue, fold_queue_into, join_queue, queue_batch, queue_from_batches, OptTime, QueueInput, QueueRow,
    QueueState, QueuedPart,
};
pub use queue_table::Queue;
pub use spilled::{Hot, SpillValue, Spilled};

use std::collections::BTreeMap;
use std::sync::Arc;

use deltalake::arrow::array::{
    Array, ArrayRef, AsArray, BooleanBuilder, Int32Builder, Int64Builder, RecordBatch, StringBuilder,
    TimestampMicrosecondBuilder,
};
use deltalake::arrow::compute::interleave;
use deltalake::arrow::datatypes::{Int32Type, Int64Type, SchemaRef, TimestampMicrosecondType};
use deltalake::arrow::error::ArrowError;

pub use sym::{EventId, Sym};

use super::decode::UTC;
use super::tables::{positions_current_layout, TableKind};

/// Newest-wins order of position events.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct EventOrder {
    pub ingest_time: i64,
    /// Kept as its UUID bytes, not interned: sessions are unbounded over a process's life
    /// (every ingest and queue-worker start makes one), accounts and sources are not.
    pub session_id: EventId,
    pub sequence: i64,
    pub event_id: EventId,
}

impl EventOrder {
    /// The order of an event's `(ingest_time, session_id, sequence, event_id)`.
    pub fn of(o: (i64, &str, i64, &str)) -> EventOrder {
        EventOrder {
            ingest_time: o.0,
            session_id: EventId::new(o.1),
            sequence: o.2,
            event_id: EventId::new(o.3),
        }
    }

    /// Appends the order to a spill record: ingest time, session id, sequence, event id; each
    /// id as 0 and its 16 UUID bytes, or 1, a u32 length and the string.
    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.ingest_time.to_le_bytes());
        encode_id(&self.session_id, out);
        out.extend_from_slice(&self.sequence.to_le_bytes());
        encode_id(&self.event_id, out);
    }

    /// The order [`EventOrder::encode`] wrote; `None` when the bytes are not one.
    pub(crate) fn decode(r: &mut spill::Reader<'_>) -> Option<EventOrder> {
        Some(EventOrder {
            ingest_time: r.i64()?,
            session_id: decode_id(r)?,
            sequence: r.i64()?,
            event_id: decode_id(r)?,
        })
    }

    /// Orders `a` against this order, exactly as the tuples of strings order.
    pub fn cmp_tuple(&self, a: (i64, &str, i64, &str)) -> std::cmp::Ordering {
        self.ingest_time
            .cmp(&a.0)
            .then_with(|| self.session_id.cmp_str(a.1))
            .then_with(|| self.sequence.cmp(&a.2))
            .then_with(|| self.event_id.cmp_str(a.3))
    }
}

fn encode_id(id: &EventId, out: &mut Vec<u8>) {
    match id {
        EventId::Uuid(b) => {
            out.push(0);
            out.extend_from_slice(b);
        }
        EventId::Other(s) => {
            out.push(1);
            out.extend_from_slice(&(s.len() as u32).to_le_bytes());
            out.extend_from_slice(s.as_bytes());
        }
    }
}

fn decode_id(r: &mut spill::Reader<'_>) -> Option<EventId> {
    match r.take::<1>()? {
        [0] => Some(EventId::Uuid(r.take::<16>()?)),
        [1] => {
            let n = r.u32()? as usize;
            Some(EventId::Other(std::str::from_utf8(r.bytes(n)?).ok()?.into()))
        }
        _ => None,
    }
}

/// Column accessors over a batch of position rows (`position_events` / `positions_current`).
pub(crate) struct Cols<'a> {
    account: &'a deltalake::arrow::array::StringArray,
    con_id: &'a deltalake::arrow::array::Int64Array,
    ingest_time: &'a deltalake::arrow::array::TimestampMicrosecondArray,
    session_id: &'a deltalake::arrow::array::StringArray,
    sequence: &'a deltalake::arrow::array::Int64Array,
    event_id: &'a deltalake::arrow::array::StringArray,
}

pub(crate) fn col<'a>(b: &'a RecordBatch, name: &str) -> Result<&'a ArrayRef, ArrowError> {
    b.column_by_name(name)
        .ok_or_else(|| ArrowError::SchemaError(format!("missing column {name}")))
}

impl<'a> Cols<'a> {
    pub(crate) fn of(b: &'a RecordBatch) -> Result<Self, ArrowError> {
        Ok(Self {
            account: col(b, "account")?.as_string::<i32>(),
            con_id: col(b, "con_id")?.as_primitive::<Int64Type>(),
            ingest_time: col(b, "ingest_time")?.as_primitive::<TimestampMicrosecondType>(),
            session_id: col(b, "session_id")?.as_string::<i32>(),
            sequence: col(b, "sequence")?.as_primitive::<Int64Type>(),
            event_id: col(b, "event_id")?.as_string::<i32>(),
        })
    }

    pub(crate) fn len(&self) -> usize {
        self.account.len()
    }

    pub(crate) fn key(&self, i: usize) -> (&'a str, i64) {
        (self.account.value(i), self.con_id.value(i))
    }

    pub(crate) fn order(&self, i: usize) -> (i64, &'a str, i64, &'a str) {
        (
            self.ingest_time.value(i),
            self.session_id.value(i),
            self.sequence.value(i),
            self.event_id.value(i),
        )
    }

    fn owned_order(&self, i: usize) -> EventOrder {
        EventOrder::of(self.order(i))
    }
}

/// The non-empty `rows` (`position_events` or `positions_current` layout) projected to the
/// `positions_current` columns (drops `event_date`).
pub(crate) fn as_current(rows: &[RecordBatch]) -> Result<Vec<RecordBatch>, ArrowError> {
    let schema = positions_current_layout().schema.clone();
    rows.iter()
        .filter(|b| b.num_rows() > 0)
        .map(|b| {
            let idx: Result<Vec<usize>, _> = schema.fields().iter().map(|f| b.schema().index_of(f.name())).collect();
            let p = b.project(&idx?)?;
            RecordBatch::try_new(schema.clone(), p.columns().to_vec())
        })
        .collect()
}

/// Key → (batch, row) of its newest row.
pub(crate) type NewestPerKey<'a> =
    std::collections::HashMap<(&'a str, i64), (usize, usize), foldhash::fast::RandomState>;

/// The newest row of each key among `cols`: key → (batch, row). Keys are borrowed.
pub(crate) fn newest_per_key<'a>(cols: &[Cols<'a>]) -> NewestPerKey<'a> {
    let mut best = NewestPerKey::default();
    for (bi, c) in cols.iter().enumerate() {
        for i in 0..c.len() {
            let e = best.entry(c.key(i)).or_insert((bi, i));
            if c.order(i) > cols[e.0].order(e.1) {
                *e = (bi, i);
            }
        }
    }
    best
}

pub(crate) fn newer(a: (i64, &str, i64, &str), b: &EventOrder) -> bool {
    b.cmp_tuple(a) == std::cmp::Ordering::Less
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
    /// `None` when no row is newer than what the state holds. Copies the state: to fold many
    /// batches (a log file by file) use one [`CurrentFold`].
    ///
    /// # Errors
    /// Arrow errors (schema mismatch: a bug).
    pub fn merge(&self, rows: &[RecordBatch]) -> Result<Option<CurrentState>, ArrowError> {
        let mut fold = CurrentFold::from(self.clone());
        if !fold.add(rows)? {
            return Ok(None);
        }
        fold.finish().map(Some)
    }
}

/// `positions_current` folded in place from any number of event batches (a log file by file,
/// as `possync rebuild` and `book --as-of` read it), with [`CurrentState::merge`]'s rules.
///
/// Per key, the newest row so far is a reference into the batches added (a batch with no
/// newer row is not kept); when more rows are kept than twice the keys (plus a floor), the
/// live ones are taken into one batch and the rest dropped. So memory stays within about twice
/// the folded state's (plus one file), and time is O(rows read) plus O(keys) per such
/// compaction, each after at least `keys` more rows: not O(keys) per batch, which copying the
/// state per file cost (O(files x keys)). One batch added is taken once, as a merge does.
#[derive(Debug, Clone, Default)]
pub struct CurrentFold {
    /// The kept batches (`positions_current` schema).
    sources: Vec<RecordBatch>,
    /// Key -> (order of its newest event, its row in `sources`, [`encode_src`]).
    index: BTreeMap<(String, i64), (EventOrder, usize)>,
    /// Rows in `sources`.
    kept: usize,
}

/// Rows a fold keeps at least before it compacts (small logs never compact).
const FOLD_FLOOR: usize = 1 << 16;

impl From<CurrentState> for CurrentFold {
    fn from(s: CurrentState) -> Self {
        let kept = s.batch.num_rows();
        Self {
            index: s
                .index
                .into_iter()
                .map(|(k, (o, row))| (k, (o, encode_src(0, row))))
                .collect(),
            sources: vec![s.batch],
            kept,
        }
    }
}

impl CurrentFold {
    /// Number of keys so far.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// No key so far.
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// Folds event rows (`position_events` or `positions_current` layout) in; returns whether
    /// a row was newer than what the fold held for its key.
    ///
    /// # Errors
    /// Arrow errors (schema mismatch: a bug).
    pub fn add(&mut self, rows: &[RecordBatch]) -> Result<bool, ArrowError> {
        let inputs = as_current(rows)?;
        let first = self.sources.len();
        let mut changed = false;
        {
            let cols: Vec<Cols<'_>> = inputs.iter().map(Cols::of).collect::<Result<_, _>>()?;
            for ((acct, con), (bi, i)) in newest_per_key(&cols) {
                let c = &cols[bi];
                let at = encode_src(first + bi, i);
                match self.index.get_mut(&(acct.to_string(), con)) {
                    Some(cur) if !newer(c.order(i), &cur.0) => continue,
                    Some(cur) => *cur = (c.owned_order(i), at),
                    None => {
                        self.index.insert((acct.to_string(), con), (c.owned_order(i), at));
                    }
                }
                changed = true;
            }
        }
        if !changed {
            return Ok(false);
        }
        self.kept += inputs.iter().map(RecordBatch::num_rows).sum::<usize>();
        self.sources.extend(inputs);
        if self.kept > 2 * self.index.len() + FOLD_FLOOR {
            self.compact()?;
        }
        Ok(true)
    }

    /// The live rows taken into one batch, in key order; the others dropped.
    fn compact(&mut self) -> Result<(), ArrowError> {
        if self.index.is_empty() {
            self.sources.clear();
            self.kept = 0;
            return Ok(());
        }
        let picks: Vec<(usize, usize)> = self.index.values().map(|(_, s)| decode_src(*s)).collect();
        let batch = take_rows(&self.sources.iter().collect::<Vec<_>>(), &picks)?;
        for (row, (_, s)) in self.index.values_mut().enumerate() {
            *s = encode_src(0, row);
        }
        self.kept = batch.num_rows();
        self.sources = vec![batch];
        Ok(())
    }

    /// The folded state.
    ///
    /// # Errors
    /// Arrow errors (a bug).
    pub fn finish(mut self) -> Result<CurrentState, ArrowError> {
        if self.index.is_empty() {
            return Ok(CurrentState::default());
        }
        let in_place = self.sources.len() == 1
            && self.kept == self.index.len()
            && self
                .index
                .values()
                .enumerate()
                .all(|(row, (_, s))| *s == encode_src(0, row));
        if !in_place {
            self.compact()?;
        }
        let batch = self
            .sources
            .pop()
            .unwrap_or_else(|| RecordBatch::new_empty(CurrentState::schema()));
        let index = self
            .index
            .into_iter()
            .map(|(k, (o, s))| (k, (o, decode_src(s).1)))
            .collect();
        Ok(CurrentState { batch, index })
    }
}

/// The rows `picks` ((batch, row)) of `sources`, as one batch of their schema.
fn take_rows(sources: &[&RecordBatch], picks: &[(usize, usize)]) -> Result<RecordBatch, ArrowError> {
    let schema = CurrentState::schema();
    let columns = (0..schema.fields().len())
        .map(|c| {
            let arrays: Vec<&dyn Array> = sources.iter().map(|b| b.column(c).as_ref()).collect();
            interleave(&arrays, picks)
        })
        .collect::<Result<Vec<_>, _>>()?;
    RecordBatch::try_new(schema, columns)
}

// Row references pack (source batch, row) into one usize for the index.
fn encode_src(batch: usize, row: usize) -> usize {
    (batch << 40) | row
}

fn decode_src(s: usize) -> (usize, usize) {
    (s >> 40, s & ((1 << 40) - 1))
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

/// Folds registry event rows (registry layout) into a copy of the state (`None` = unchanged):
/// the live materializer keeps its state until the commit lands.
///
/// # Errors
/// Arrow errors (schema mismatch: a bug).
pub fn fold_registry(state: &RegistryState, rows: &[RecordBatch]) -> Result<Option<RegistryState>, ArrowError> {
    let mut next = state.clone();
    Ok(fold_registry_into(&mut next, rows)?.then_some(next))
}

/// [`fold_registry`] in place (`rebuild` folds file after file: no copy per file); whether
/// anything changed.
///
/// # Errors
/// Arrow errors (schema mismatch: a bug).
pub fn fold_registry_into(next: &mut RegistryState, rows: &[RecordBatch]) -> Result<bool, ArrowError> {
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
            changed |= upsert_registry(next, key, row);
        }
    }
    Ok(changed)
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

    /// Issue 20 #13: session ids are not interned (they grow with every start), and an order
    /// still compares and round-trips through a spill record as the strings do.
    #[test]
    fn session_ids_are_not_interned() {
        let sessions = [
            crate::events::new_id(),
            format!("not-a-uuid-{}", crate::events::new_id()),
        ];
        let mut orders = Vec::new();
        for s in &sessions {
            let o = EventOrder::of((7, s, 3, "evt-1"));
            assert!(Sym::existing(s).is_none(), "session {s} was interned");
            assert_eq!(o.cmp_tuple((7, s, 3, "evt-1")), std::cmp::Ordering::Equal);
            let mut b = Vec::new();
            o.encode(&mut b);
            assert_eq!(EventOrder::decode(&mut spill::Reader(&b)), Some(o.clone()));
            orders.push(o);
        }
        // Ordered as the strings are.
        assert_eq!(orders[0].cmp(&orders[1]), sessions[0].cmp(&sessions[1]), "{sessions:?}");
    }

    /// `rebuild` and `book --as-of` fold a log file by file in place ([`CurrentFold`],
    /// [`fold_queue_into`]): the result is exactly the merge of all the rows at once, events
    /// out of order across files, over enough files that the fold compacts what it keeps.
    #[test]
    fn a_fold_file_by_file_is_the_merge_of_all_rows_at_once() {
        let (keys, files, per_file) = (300u64, 400u64, 300u64);
        let session = crate::events::new_id();
        // Ingest times rising with jitter over ~700 events (a multiplicative hash): a file
        // holds events older than some of the previous files'.
        let time = |i: u64| 1_764_111_111_000_000 + 1_000 * i as i64 - ((i * 2_654_435_761) % 700_001) as i64;
        let logs: Vec<Vec<RecordBatch>> = (0..files)
            .map(|f| crate::ops::bench::log_rows(keys, f * per_file, (f + 1) * per_file, &session, time).unwrap())
            .collect();
        let all: Vec<RecordBatch> = logs.iter().flatten().cloned().collect();
        let want = CurrentState::default().merge(&all).unwrap().unwrap();
        assert_eq!(want.len(), keys as usize);
        let mut fold = CurrentFold::default();
        let mut compactions = 0;
        for rows in &logs {
            let before = fold.sources.len();
            fold.add(rows).unwrap();
            compactions += usize::from(fold.sources.len() < before);
        }
        assert!(
            compactions > 0,
            "the fold compacted what it kept ({} rows kept, {} sources)",
            fold.kept,
            fold.sources.len()
        );
        assert!(fold.kept <= 2 * keys as usize + FOLD_FLOOR + (per_file as usize));
        let got = fold.finish().unwrap();
        assert_eq!(got.batch(), want.batch());
        assert_eq!(got.index, want.index);
        // Merging one file at a time (what rebuild did) agrees too.
        let mut one_by_one = CurrentState::default();
        for rows in &logs {
            if let Some(next) = one_by_one.merge(rows).unwrap() {
                one_by_one = next;
            }
        }
        assert_eq!(one_by_one.batch(), want.batch());
        // The queue: folded in place file by file = folded all at once.
        let mut queue = QueueState::new();
        for rows in &logs {
            fold_queue_into(&mut queue, rows).unwrap();
        }
        assert_eq!(queue, fold_queue(&QueueState::new(), &all).unwrap().unwrap());
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
