//! An upsert table whose per-key values live in a [`Spill`] file: the shared part of
//! `positions_current` ([`super::current`]) and `position_queue` ([`super::queue_table`]).
//!
//! In memory, per key, the copy-on-write core keeps the key, the live row's location and a
//! [`Hot`] value: where the key's value is in the spill file (8 bytes) and, for a closed row,
//! since when (for the retention delete, which so never reads the file), with the row's class
//! of the table's summary ([`super::summary`]) in the two low bits of the same 8 bytes. A flush reads
//! the values of the keys it changes ([`Spilled::get`], coalesced reads), decides, and appends
//! the new values ([`Spilled::append`]); a flush that changes k keys reads and writes O(k)
//! records. The tables differ only in their value and in how events change it.

use std::marker::PhantomData;
use std::path::Path;

use deltalake::arrow::array::RecordBatch;
use deltalake::arrow::error::ArrowError;

use super::core::{Classed, Key, RowValue, Synced, Upsert};
use super::spill::{Codec, Spill, SpillError, SpillRef};
use crate::materialize::tables::{Table, TableError};

/// A value of a spilled table: made from the table's rows ([`RowValue`]), stored in the spill
/// file ([`Codec`]).
pub trait SpillValue: RowValue + Codec {
    /// Since when (µs) the row is closed and may leave the table after the retention; `None`
    /// when it is open.
    fn closed_since(&self) -> Option<i64>;

    /// The summary class of every row of `batch` (the table's schema, see
    /// [`super::summary::classes`]).
    ///
    /// # Errors
    /// Arrow errors (schema mismatch: a bug).
    fn classes(batch: &RecordBatch) -> Result<Vec<u8>, ArrowError>;

    /// The columns (besides `account` and `con_id`) [`SpillValue::classes`] and
    /// [`SpillValue::closed_times`] read: what a row must show without its value being read.
    const LIGHT: &'static [&'static str];

    /// [`SpillValue::closed_since`] of every row of `batch`, which holds the
    /// [`SpillValue::LIGHT`] columns (at least): what the row's value would give.
    ///
    /// # Errors
    /// Arrow errors (schema mismatch: a bug).
    fn closed_times(batch: &RecordBatch) -> Result<Vec<Option<i64>>, ArrowError>;
}

/// What stays in memory per key.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Hot {
    /// The value, in the spill file.
    pub value: SpillRef,
    /// [`SpillValue::closed_since`] (`OPEN` when open) shifted left by two bits, and the row's
    /// summary class in those two bits.
    tag: i64,
}

/// `closed_since` of an open row: later than any cutoff.
const OPEN: i64 = i64::MAX >> 2;

impl Hot {
    fn new(value: SpillRef, closed_since: Option<i64>, class: u8) -> Hot {
        // µs since the epoch fit in 61 bits for ±36,000 years.
        let t = closed_since.map_or(OPEN, |t| t.clamp(-OPEN, OPEN - 1));
        Hot {
            value,
            tag: (t << 2) | i64::from(class & 3),
        }
    }

    /// A value not read yet: the row is in the table (where the core's location says), its
    /// class and closed time are known, its value is read when a flush first needs it
    /// ([`Spilled::load`]).
    pub fn unloaded(closed_since: Option<i64>, class: u8) -> Hot {
        Hot::new(SpillRef::NONE, closed_since, class)
    }

    /// Whether the value is in the spill file (see [`Hot::unloaded`]).
    pub fn is_loaded(&self) -> bool {
        !self.value.is_empty()
    }

    /// See [`SpillValue::closed_since`]; a time after any cutoff when open.
    pub fn closed_since(&self) -> i64 {
        self.tag >> 2
    }
}

impl Classed for Hot {
    fn class(&self) -> u8 {
        (self.tag & 3) as u8
    }
}

/// The live rows of an upsert table, values in a spill file.
pub struct Spilled<T> {
    /// The table's files and per-key places.
    pub rows: Upsert<Hot>,
    spill: Spill,
    table: &'static str,
    _value: PhantomData<fn() -> T>,
}

impl<T: SpillValue> Spilled<T> {
    /// An empty state of `table` whose spill file is in `dir`.
    ///
    /// # Errors
    /// The spill file cannot be created there.
    pub fn new(table: &'static str, dir: &Path) -> Result<Self, TableError> {
        Ok(Self {
            rows: Upsert::default(),
            spill: Spill::create(dir).map_err(|source| TableError::Spill {
                table,
                source: source.into(),
            })?,
            table,
            _value: PhantomData,
        })
    }

    fn err(&self) -> impl Fn(SpillError) -> TableError {
        let table = self.table;
        move |source| TableError::Spill {
            table,
            source: source.into(),
        }
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// No key.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Brings the state up to the table's loaded snapshot (see [`Upsert::sync_with`]). Files
    /// it did not know are read in their key and [`SpillValue::LIGHT`] columns only: their
    /// values stay in the table until a flush needs them ([`Spilled::load`]). Most of them are
    /// other members' rows, of keys this member never writes, so a group of N members reads
    /// the others' rows at a fraction of what decoding them whole cost.
    ///
    /// # Errors
    /// Storage, parquet, deletion-vector and spill errors.
    pub async fn sync(&mut self, t: &Table) -> Result<Synced, TableError> {
        let table = self.table;
        self.rows
            .sync_with(t, Some(T::LIGHT), |b| {
                let arrow = |source| TableError::Arrow { table, source };
                let closed = T::closed_times(b).map_err(arrow)?;
                let classes = T::classes(b).map_err(arrow)?;
                Ok(closed
                    .into_iter()
                    .zip(classes)
                    .map(|(c, class)| Hot::unloaded(c, class))
                    .collect())
            })
            .await
    }

    /// Reads from the table the values of `keys` not read yet (see [`Hot::unloaded`]): each
    /// file that holds one is read once, and every value of it not read yet is kept (they
    /// are likely the next ones asked for: a partition that moved here, a restart), so a file
    /// is read whole at most once over its life. Keys not in the table are skipped.
    ///
    /// # Errors
    /// Storage, parquet and spill errors.
    pub async fn load(&mut self, t: &Table, keys: &[Key]) -> Result<(), TableError> {
        let mut files: Vec<u32> = keys
            .iter()
            .filter_map(|k| self.rows.live(k))
            .filter(|(_, h)| !h.is_loaded())
            .map(|(loc, _)| loc.file)
            .collect();
        files.sort_unstable();
        files.dedup();
        let table = self.table;
        let arrow = |source| TableError::Arrow { table, source };
        for id in files {
            let Some(add) = self.rows.file(id) else { continue };
            let batch = t.read_physical(&t.file_ref(add)).await?;
            let keys = super::core::keys_of(&batch).map_err(arrow)?;
            let values = T::of_rows(&batch).map_err(arrow)?;
            let mut rows = Vec::new();
            self.rows.update_rows_of(id, &keys, |row, h| {
                if !h.is_loaded() {
                    rows.push(row);
                }
            });
            let picked: Vec<T> = rows.iter().map(|&r| values[r].clone()).collect();
            let refs = self.spill.append(&picked).map_err(self.err())?;
            let mut next = rows.iter().zip(refs).peekable();
            self.rows.update_rows_of(id, &keys, |row, h| {
                if next.peek().is_some_and(|(r, _)| **r == row) {
                    let (_, value) = next.next().expect("peeked");
                    h.value = value;
                }
            });
        }
        Ok(())
    }

    /// The values of `keys` (`None` for a key not in the table), in that order, reading from
    /// `t` those not read yet ([`Spilled::load`]).
    ///
    /// # Errors
    /// Storage, parquet and spill errors.
    pub async fn values(&mut self, t: &Table, keys: &[Key]) -> Result<Vec<Option<T>>, TableError> {
        self.load(t, keys).await?;
        self.get(keys)
    }

    /// The values of `keys` (`None` for a key not in the table), in that order. Each value
    /// must have been read ([`Spilled::load`]).
    ///
    /// # Errors
    /// Spill read errors; a value not read yet (a bug).
    pub fn get(&self, keys: &[Key]) -> Result<Vec<Option<T>>, TableError> {
        let mut out: Vec<Option<T>> = std::iter::repeat_with(|| None).take(keys.len()).collect();
        let (mut at, mut refs) = (Vec::new(), Vec::new());
        for (i, k) in keys.iter().enumerate() {
            if let Some(h) = self.rows.get(k) {
                if !h.is_loaded() {
                    return Err(self.err()(SpillError::NotLoaded {
                        account: k.0.as_str().to_string(),
                        con_id: k.1,
                    }));
                }
                at.push(i);
                refs.push(h.value);
            }
        }
        for (i, v) in at.into_iter().zip(self.spill.read::<T>(&refs).map_err(self.err())?) {
            out[i] = Some(v);
        }
        Ok(out)
    }

    /// Every key and value (unordered; reads the values not read yet from `t`, then the
    /// whole spill file).
    ///
    /// # Errors
    /// Storage, parquet and spill errors.
    pub async fn all(&mut self, t: &Table) -> Result<Vec<(Key, T)>, TableError> {
        let keys: Vec<Key> = self.rows.iter().map(|(k, _)| *k).collect();
        let values = self.values(t, &keys).await?;
        Ok(keys
            .into_iter()
            .zip(values)
            .filter_map(|(k, v)| Some((k, v?)))
            .collect())
    }

    /// Writes `values`, the values of the rows of `rows` (same order), to the spill file; their
    /// [`Hot`] values, in order (for [`Upsert::stage`]).
    ///
    /// # Errors
    /// Spill write errors; Arrow errors (schema mismatch: a bug).
    pub fn append(&mut self, values: &[T], rows: &RecordBatch) -> Result<Vec<Hot>, TableError> {
        let table = self.table;
        let classes = T::classes(rows).map_err(|source| TableError::Arrow { table, source })?;
        hot(&mut self.spill, values, &classes).map_err(self.err())
    }

    /// Keys closed since before `cutoff` (µs): the retention delete. Reads no value.
    pub fn expired(&self, cutoff: i64) -> Vec<Key> {
        self.rows
            .iter()
            .filter(|(_, h)| h.closed_since() < cutoff)
            .map(|(k, _)| *k)
            .collect()
    }

    /// Rewrites the spill file when more than half of it is garbage (cheap when it is not).
    /// Call between commits only: a staged plan holds places in the current file.
    ///
    /// # Errors
    /// Spill read and write errors (the old file stays in use).
    pub fn collect_garbage(&mut self) -> Result<(), TableError> {
        if !self.spill.check_due() {
            return Ok(());
        }
        let live: u64 = self.rows.iter().map(|(_, h)| h.value.len() as u64).sum();
        let (before, started) = (self.spill.size(), std::time::Instant::now());
        let rewritten = self
            .spill
            .collect(
                live,
                self.rows.values_mut().filter(|h| h.is_loaded()).map(|h| &mut h.value),
            )
            .map_err(self.err())?;
        if rewritten {
            tracing::debug!(
                table = self.table,
                before,
                after = self.spill.size(),
                ms = started.elapsed().as_millis() as u64,
                "spill file rewritten"
            );
        }
        Ok(())
    }
}

fn hot<T: SpillValue>(spill: &mut Spill, values: &[T], classes: &[u8]) -> Result<Vec<Hot>, SpillError> {
    assert_eq!(values.len(), classes.len(), "one class per value");
    let refs = spill.append(values)?;
    Ok(refs
        .into_iter()
        .zip(values)
        .zip(classes)
        .map(|((value, v), c)| Hot::new(value, v.closed_since(), *c))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::materialize::tables::TableKind;
    use crate::materialize::upsert::queue::{queue_batch, queue_from_batches, QueueInput, QueueRow, QueueState};
    use crate::materialize::upsert::Sym;
    use deltalake::protocol::DeltaOperation;

    fn row(t: i64, position: f64) -> QueueRow {
        let mut r = QueueRow::default();
        r.apply(&QueueInput {
            active_route: false,
            partition: 0,
            source: "STREAM",
            order: (t, "s", t, "0a1b2c3d-4e5f-6789-abcd-ef0123456789"),
            position,
            avg_cost: 1.0,
        });
        r
    }

    async fn put(t: &mut Table, q: &mut Spilled<QueueRow>, m: &QueueState) {
        let batch = queue_batch(m).unwrap();
        let rows: Vec<QueueRow> = m.values().cloned().collect();
        let hot = q.append(&rows, &batch).unwrap();
        let changed = m.keys().map(|(a, c)| (Sym::new(a), *c)).zip(hot).collect();
        let staged = q.rows.stage(t, Some(batch), changed, vec![]).await.unwrap();
        let op = DeltaOperation::Update { predicate: None };
        t.commit(staged.actions.clone(), &[], op, 0).await.unwrap();
        q.rows.committed(staged);
    }

    fn sorted(mut v: Vec<(Key, QueueRow)>) -> Vec<((String, i64), QueueRow)> {
        v.sort_by_key(|(k, _)| (k.0.to_string(), k.1));
        v.into_iter().map(|(k, r)| ((k.0.to_string(), k.1), r)).collect()
    }

    /// Values rewritten many times: the spill file's garbage collection keeps exactly the live
    /// values, which equal the table's rows and what a fresh reader of the table builds; the
    /// retention delete finds closed rows without reading the file.
    #[tokio::test]
    async fn garbage_collection_keeps_the_live_values() {
        let (tables, state) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let mut t = Table::open(tables.path().to_str().unwrap(), TableKind::PositionQueue)
            .await
            .unwrap();
        let mut q = Spilled::<QueueRow>::new("position_queue", state.path()).unwrap();
        for round in 0..6i64 {
            let m: QueueState = (0..3000i64)
                .filter(|k| round == 0 || k % 3 != 0)
                .map(|k| {
                    let position = if k % 5 == 0 { 0.0 } else { (k + round) as f64 };
                    (("DU1".to_string(), k), row(100 * round + k, position))
                })
                .collect();
            put(&mut t, &mut q, &m).await;
        }
        let before = q.spill.size();
        q.spill.force_check();
        q.collect_garbage().unwrap();
        assert!(q.spill.size() * 2 < before, "rewritten: {before} -> {}", q.spill.size());
        let table = queue_from_batches(&t.read_all().await.unwrap()).unwrap();
        let table: Vec<((String, i64), QueueRow)> = table.into_iter().collect();
        assert_eq!(table.len(), 3000);
        assert_eq!(sorted(q.all(&t).await.unwrap()), table, "the state is the table");
        let mut fresh = Spilled::<QueueRow>::new("position_queue", state.path()).unwrap();
        fresh.sync(&t).await.unwrap();
        // Read without values: the same classes and closed times as the writer's values give.
        assert!(fresh.rows.iter().all(|(_, h)| !h.is_loaded()));
        assert_eq!(fresh.rows.counts(), q.rows.counts());
        let closed = |s: &Spilled<QueueRow>| {
            let mut k: Vec<i64> = s.expired(1_000).into_iter().map(|k| k.1).collect();
            k.sort_unstable();
            k
        };
        assert_eq!(closed(&fresh), closed(&q));
        assert_eq!(
            sorted(fresh.all(&t).await.unwrap()),
            table,
            "a fresh reader builds the same state"
        );
        // Closed rows: k % 5 == 0, last written at t = k (k % 3 == 0: round 0 only) or 500 + k.
        let mut expired: Vec<i64> = q.expired(1_000).into_iter().map(|k| k.1).collect();
        expired.sort_unstable();
        let last_t = |k: i64| if k % 3 == 0 { k } else { 500 + k };
        let want: Vec<i64> = (0..3000).filter(|&k| k % 5 == 0 && last_t(k) < 1_000).collect();
        assert_eq!(expired, want);
        // After the rewrite, new versions still land and read back.
        let m: QueueState = [(("DU1".to_string(), 7), row(10_000, 3.0))].into();
        put(&mut t, &mut q, &m).await;
        let got = q.get(&[(Sym::new("DU1"), 7), (Sym::new("DU1"), 99_999)]).unwrap();
        assert_eq!(got, vec![Some(row(10_000, 3.0)), None]);
    }
}
