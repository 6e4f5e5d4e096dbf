//! The copy-on-write core shared by `positions_current` and `position_queue`: one live row per
//! key, spread over files, where a commit costs what it changes, not the table.
//!
//! A commit writes the changed keys' new rows as **one new file** and marks their old rows
//! deleted with **deletion vectors** on the files that held them (remove + re-add of those
//! files with a new vector; a file with no live row left is just removed). Nothing else is
//! read or written, so a flush costs O(changed keys + files touched), never O(table).
//! [`Upsert::compaction`] keeps the file count bounded: when there are more than
//! [`MAX_FILES`] files it rewrites the live rows of the smallest ones (and of any file that is
//! mostly deleted) into one, as an `OPTIMIZE` commit (`dataChange = false`). Each row is
//! rewritten O(log n) times over its life, so compaction is amortized O(changes) too.
//!
//! In memory, per key: where its live row is ([`Loc`]) and the table's own value `V` (for the
//! materializer's tables a [`super::Hot`]: where the merge value is in the spill file), in one
//! dense vector of entries indexed by a hash table of 4-byte slots (a `HashMap` of the entries
//! themselves would keep up to twice their size in empty buckets). Per file: its add action,
//! its deleted rows and its row count. A vector written by another member is mapped back to
//! keys through the entries' locations. [`Upsert::sync`] brings all of it up to a newer
//! snapshot by reading only what changed: new files, and new vectors of known files.
//!
//! Invariant (kept because every commit is made against the latest snapshot, `max_retries =
//! 0`, and after a conflict either re-planned or, when [`Upsert::still_applies`], committed
//! unchanged): a key has at most one live row in the table.

use std::collections::{HashMap, HashSet};

use deltalake::arrow::array::{AsArray, RecordBatch, UInt32Array};
use deltalake::arrow::compute::take_record_batch;
use deltalake::arrow::datatypes::Int64Type;
use deltalake::arrow::error::ArrowError;
use deltalake::kernel::{Action, Add};
use roaring::RoaringTreemap;

use super::summary::Counts;
use super::{col, Sym};
use crate::delta::dv;
use crate::materialize::tables::{path_of, remove_of, Table, TableError};

mod index;

pub use index::Classed;
use index::{class_of, Entry, Index};

/// Key of an upsert row: (account, con_id).
pub type Key = (Sym, i64);

/// More files than this triggers a compaction.
pub const MAX_FILES: usize = 24;

/// Size ratio between compaction tiers (a power of two).
pub const FANOUT: u64 = 4;

/// Live rows one compaction rewrites at most, so a flush's cost stays bounded at any table size.
pub const COMPACT_BUDGET: u64 = 200_000;

/// What a flush changes in one upsert table: the new rows (table schema, one per key) and each
/// key's new value, in the same order.
pub type Changes<V> = (RecordBatch, Vec<(Key, V)>);

/// Where a live row is: file id and physical row index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Loc {
    pub file: u32,
    pub row: u32,
}

struct LiveFile {
    add: Add,
    deleted: RoaringTreemap,
    /// Physical rows.
    rows: u32,
}

impl LiveFile {
    fn live(&self) -> u64 {
        u64::from(self.rows) - self.deleted.len()
    }
}

/// How a table turns its rows into the per-key value it keeps in memory.
pub trait RowValue: Sized + Clone {
    /// The value of every row of `batch` (the table's schema).
    ///
    /// # Errors
    /// Arrow errors (schema mismatch: a bug).
    fn of_rows(batch: &RecordBatch) -> Result<Vec<Self>, ArrowError>;
}

/// What [`Upsert::sync`] found changed in the table.
#[derive(Debug, Default)]
pub struct Synced {
    /// Keys whose live row was deleted or replaced by someone else.
    pub gone: usize,
    /// Live rows read from files this process did not know.
    pub added: usize,
}

/// A planned commit: its actions, and what to remember once it is committed.
pub struct Staged<V> {
    /// The actions to commit.
    pub actions: Vec<Action>,
    new_file: Option<(Add, Vec<(Key, V)>)>,
    deleted: Vec<Key>,
    touched: Vec<(u32, RoaringTreemap, Option<Add>)>,
    compacted: Vec<u32>,
    /// What the plan was made on: each key's location (`None`: not in the table) and each
    /// touched file's deletion vector. [`Upsert::still_applies`] compares them after a reload.
    prior: Vec<(Key, Option<Loc>)>,
    seen: Vec<(u32, Option<deltalake::kernel::DeletionVectorDescriptor>)>,
}

impl<V> Staged<V> {
    /// Rows of the new file (0: none).
    pub fn new_rows(&self) -> usize {
        self.new_file.as_ref().map_or(0, |(_, c)| c.len())
    }

    /// Whether the commit changes data at all.
    pub fn is_empty(&self) -> bool {
        self.actions.is_empty()
    }

    /// The files staging wrote (the new data file, the deletion-vector file): what
    /// [`Table::discard`] deletes when the commit loses its race.
    pub fn written(&self) -> Vec<deltalake::Path> {
        let mut out: Vec<deltalake::Path> = self.new_file.iter().map(|(a, _)| path_of(a)).collect();
        for (_, _, re_add) in &self.touched {
            let dv = re_add.as_ref().and_then(|a| a.deletion_vector.as_ref());
            if let Some(p) = dv.and_then(dv::file_path) {
                if !out.contains(&p) {
                    out.push(p);
                }
            }
        }
        out
    }
}

/// One upsert table's live rows: files, deletion vectors and the per-key index.
pub struct Upsert<V> {
    files: HashMap<u32, LiveFile>,
    ids: HashMap<String, u32>,
    next: u32,
    index: Index<V>,
}

impl<V> Default for Upsert<V> {
    fn default() -> Self {
        Self {
            files: HashMap::new(),
            ids: HashMap::new(),
            next: 0,
            index: Index::default(),
        }
    }
}

/// The file's statistics with `tightBounds: false`: once rows are deleted, min/max are bounds.
fn loosen(stats: &Option<String>) -> Option<String> {
    let s = stats.as_ref()?;
    match serde_json::from_str::<serde_json::Value>(s) {
        Ok(serde_json::Value::Object(mut m)) => {
            m.insert("tightBounds".into(), serde_json::Value::Bool(false));
            Some(serde_json::Value::Object(m).to_string())
        }
        _ => Some(s.clone()),
    }
}

/// The key of every row of `batch` (any batch with `account` and `con_id`), in order.
pub(super) fn keys_of(batch: &RecordBatch) -> Result<Vec<Key>, ArrowError> {
    let account = col(batch, "account")?.as_string::<i32>();
    let con = col(batch, "con_id")?.as_primitive::<Int64Type>();
    let mut last: Option<(&str, Sym)> = None;
    Ok((0..batch.num_rows())
        .map(|i| {
            let a = account.value(i);
            let sym = match last {
                Some((s, sym)) if s == a => sym,
                _ => Sym::new(a),
            };
            last = Some((a, sym));
            (sym, con.value(i))
        })
        .collect())
}

/// Writes `batch` as exactly one data file (the row positions of the file are its keys').
async fn write_one(t: &Table, batch: RecordBatch) -> Result<Add, TableError> {
    let mut adds = t.write_files(&[batch]).await?;
    if adds.len() != 1 {
        return Err(TableError::Delta {
            table: t.kind.name(),
            source: deltalake::DeltaTableError::Generic(format!(
                "expected one data file per upsert commit, the writer made {}",
                adds.len()
            )),
        });
    }
    Ok(adds.pop().expect("one add"))
}

fn arrow(t: &Table) -> impl Fn(ArrowError) -> TableError {
    let table = t.kind.name();
    move |source| TableError::Arrow { table, source }
}

fn dv_err(t: &Table) -> impl Fn(dv::DvError) -> TableError {
    let table = t.kind.name();
    move |e| TableError::Delta {
        table,
        source: deltalake::DeltaTableError::Generic(e.to_string()),
    }
}

impl<V: RowValue + Classed> Upsert<V> {
    /// Brings the state up to the table's loaded snapshot, reading only new files and new
    /// deletion vectors (values by [`RowValue::of_rows`]).
    ///
    /// # Errors
    /// Storage, parquet and deletion-vector errors.
    pub async fn sync(&mut self, t: &Table) -> Result<Synced, TableError> {
        self.sync_with(t, None, |b| V::of_rows(b).map_err(arrow(t))).await
    }
}

impl<V: Clone + Classed> Upsert<V> {
    /// Live keys per class (see [`super::summary`]).
    pub fn counts(&self) -> Counts {
        self.index.counts
    }

    /// Live keys per class once `s` is committed: what the table's summary is after that
    /// commit, when this state is the snapshot it is committed against.
    pub fn counts_after(&self, s: &Staged<V>) -> Counts {
        let mut counts = self.index.counts;
        let mut gone: HashSet<Key> = HashSet::new();
        for k in &s.deleted {
            if let Some(e) = self.index.get(k) {
                if gone.insert(*k) {
                    counts[class_of(&e.value)] -= 1;
                }
            }
        }
        for (k, v) in s.new_file.iter().flat_map(|(_, c)| c) {
            if let Some(e) = self.index.get(k).filter(|_| !gone.contains(k)) {
                counts[class_of(&e.value)] -= 1;
            }
            counts[class_of(v)] += 1;
        }
        counts
    }

    /// Number of live keys.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// No live key.
    pub fn is_empty(&self) -> bool {
        self.index.len() == 0
    }

    /// Number of live files.
    pub fn files(&self) -> usize {
        self.files.len()
    }

    /// The value of a key.
    pub fn get(&self, key: &Key) -> Option<&V> {
        self.index.get(key).map(|e| &e.value)
    }

    /// Every key and value (unordered).
    pub fn iter(&self) -> impl Iterator<Item = (&Key, &V)> {
        self.index.entries.iter().map(|e| (&e.key, &e.value))
    }

    /// Forgets the keys whose live row is in `files` (file id → its rows; `None`: any row of
    /// the file); returns how many. One pass over the entries: only after another member's
    /// commit.
    fn forget_rows(&mut self, files: &HashMap<u32, Option<RoaringTreemap>>) -> usize {
        if files.is_empty() {
            return 0;
        }
        let gone: Vec<Key> = self
            .index
            .entries
            .iter()
            .filter(|e| {
                files
                    .get(&e.loc.file)
                    .is_some_and(|rows| rows.as_ref().is_none_or(|r| r.contains(u64::from(e.loc.row))))
            })
            .map(|e| e.key)
            .collect();
        for k in &gone {
            self.index.remove(k);
        }
        gone.len()
    }

    /// Every value, mutable (their keys and locations stay; a change must keep the value's
    /// class, which the counts hold).
    pub fn values_mut(&mut self) -> impl Iterator<Item = &mut V> {
        self.index.entries.iter_mut().map(|e| &mut e.value)
    }

    /// Where the live row of `key` is, and its value.
    pub fn live(&self, key: &Key) -> Option<(Loc, &V)> {
        self.index.get(key).map(|e| (e.loc, &e.value))
    }

    /// The add action of live file `id`.
    pub fn file(&self, id: u32) -> Option<&Add> {
        self.files.get(&id).map(|f| &f.add)
    }

    /// Calls `f` with each row of file `id` that is its key's live row (`keys`: the key of
    /// each physical row of the file) and the key's value, mutable. A change must keep the
    /// value's class, which the counts hold.
    pub fn update_rows_of(&mut self, id: u32, keys: &[Key], mut f: impl FnMut(usize, &mut V)) {
        for (row, k) in keys.iter().enumerate() {
            let Some(i) = self.index.find(k) else { continue };
            let e = &mut self.index.entries[i];
            if e.loc
                == (Loc {
                    file: id,
                    row: row as u32,
                })
            {
                f(row, &mut e.value);
            }
        }
    }

    /// Brings the state up to the table's loaded snapshot, reading only new files and new
    /// deletion vectors; `of_rows` makes the values of a file's rows, read whole or, with
    /// `columns`, only those columns besides the key (`account`, `con_id`).
    ///
    /// # Errors
    /// Storage, parquet and deletion-vector errors; those of `of_rows`.
    pub async fn sync_with(
        &mut self,
        t: &Table,
        columns: Option<&[&str]>,
        mut of_rows: impl FnMut(&RecordBatch) -> Result<Vec<V>, TableError>,
    ) -> Result<Synced, TableError> {
        let mut out = Synced::default();
        let store = t.delta.object_store();
        let mut seen = HashSet::new();
        let mut fresh = Vec::new();
        let mut forget: HashMap<u32, Option<RoaringTreemap>> = HashMap::new();
        for f in t.files()? {
            let Some(&id) = self.ids.get(&f.add.path) else {
                fresh.push(f);
                continue;
            };
            seen.insert(id);
            let known = &self.files[&id];
            if known.add.deletion_vector == f.add.deletion_vector {
                continue;
            }
            let now = match &f.add.deletion_vector {
                Some(d) => dv::read(store.as_ref(), d).await.map_err(dv_err(t))?,
                None => RoaringTreemap::new(),
            };
            let newly = &now - &known.deleted;
            if !newly.is_empty() {
                forget.insert(id, Some(newly));
            }
            let lf = self.files.get_mut(&id).expect("known file");
            lf.deleted = now;
            lf.add = f.add.clone();
        }
        let dropped: Vec<u32> = self.files.keys().filter(|id| !seen.contains(id)).copied().collect();
        for id in dropped {
            let lf = self.files.remove(&id).expect("known file");
            self.ids.remove(&lf.add.path);
            forget.insert(id, None);
        }
        // One walk over the keys for all files, however many other writers touched.
        out.gone += self.forget_rows(&forget);
        let columns: Option<Vec<&str>> = columns.map(|c| ["account", "con_id"].iter().chain(c).copied().collect());
        for f in fresh {
            let batch = match &columns {
                Some(c) => t.read_physical_columns(&f, c).await?,
                None => t.read_physical(&f).await?,
            };
            let deleted = match &f.add.deletion_vector {
                Some(d) => dv::read(store.as_ref(), d).await.map_err(dv_err(t))?,
                None => RoaringTreemap::new(),
            };
            let keys = keys_of(&batch).map_err(arrow(t))?;
            let values = of_rows(&batch)?;
            let id = self.next;
            self.next += 1;
            let rows = keys.len() as u32;
            for (row, (k, v)) in keys.into_iter().zip(values).enumerate() {
                if !deleted.contains(row as u64) {
                    let loc = Loc {
                        file: id,
                        row: row as u32,
                    };
                    self.index.insert(k, loc, v);
                    out.added += 1;
                }
            }
            self.ids.insert(f.add.path.clone(), id);
            self.files.insert(
                id,
                LiveFile {
                    add: f.add.clone(),
                    deleted,
                    rows,
                },
            );
        }
        Ok(out)
    }

    /// Plans a commit that makes `rows` (one per key of `changed`, in that order; the table's
    /// schema) the live rows of their keys and deletes the keys of `deleted`.
    ///
    /// # Errors
    /// Storage errors (the new data file and deletion vectors are written here).
    pub async fn stage(
        &self,
        t: &Table,
        rows: Option<RecordBatch>,
        changed: Vec<(Key, V)>,
        deleted: Vec<Key>,
    ) -> Result<Staged<V>, TableError> {
        let mut actions = Vec::new();
        let new_file = match rows {
            Some(b) if b.num_rows() > 0 => {
                assert_eq!(b.num_rows(), changed.len(), "one row per changed key");
                let add = write_one(t, b).await?;
                actions.push(Action::Add(add.clone()));
                Some((add, changed))
            }
            _ => None,
        };
        let superseded = new_file
            .iter()
            .flat_map(|(_, c)| c.iter().map(|(k, _)| k))
            .chain(deleted.iter());
        let mut bitmaps: HashMap<u32, RoaringTreemap> = HashMap::new();
        let mut prior = Vec::new();
        for k in superseded {
            let entry = self.index.get(k);
            prior.push((*k, entry.map(|e| e.loc)));
            if let Some(Entry { loc, .. }) = entry {
                bitmaps
                    .entry(loc.file)
                    .or_insert_with(|| self.files[&loc.file].deleted.clone())
                    .insert(u64::from(loc.row));
            }
        }
        let mut ids: Vec<u32> = bitmaps.keys().copied().collect();
        ids.sort_unstable();
        let partial: Vec<u32> = ids
            .iter()
            .copied()
            .filter(|id| bitmaps[id].len() < u64::from(self.files[id].rows))
            .collect();
        let store = t.delta.object_store();
        let vectors = dv::write(
            store.as_ref(),
            &partial.iter().map(|id| &bitmaps[id]).collect::<Vec<_>>(),
        )
        .await
        .map_err(dv_err(t))?;
        let mut vectors: HashMap<u32, _> = partial.into_iter().zip(vectors).collect();
        let mut touched = Vec::new();
        let seen = ids
            .iter()
            .map(|id| (*id, self.files[id].add.deletion_vector.clone()))
            .collect();
        for id in ids {
            let old = &self.files[&id].add;
            actions.push(Action::Remove(remove_of(old, true)));
            let bitmap = bitmaps.remove(&id).expect("bitmap of a touched file");
            let re_add = vectors.remove(&id).map(|d| Add {
                deletion_vector: Some(d),
                data_change: true,
                stats: loosen(&old.stats),
                modification_time: chrono::Utc::now().timestamp_millis(),
                ..old.clone()
            });
            if let Some(a) = &re_add {
                actions.push(Action::Add(a.clone()));
            }
            touched.push((id, bitmap, re_add));
        }
        Ok(Staged {
            actions,
            new_file,
            deleted,
            touched,
            compacted: vec![],
            prior,
            seen,
        })
    }

    /// Whether `s`, planned before this state took in other writers' commits, still applies
    /// to the state now: no key of the plan was written or deleted by them, and every file it
    /// touches has the deletion vector the plan saw (so its removes name the current file
    /// versions and its vectors extend the current ones). Then committing the same actions
    /// against the new snapshot is what planning again would commit: a rebase, not a conflict.
    /// A compaction plan never applies again (it is skipped instead).
    pub fn still_applies(&self, s: &Staged<V>) -> bool {
        s.compacted.is_empty()
            && s.prior.iter().all(|(k, loc)| self.index.get(k).map(|e| e.loc) == *loc)
            && s.seen
                .iter()
                .all(|(id, dv)| self.files.get(id).is_some_and(|lf| lf.add.deletion_vector == *dv))
    }

    /// Remembers a committed plan.
    pub fn committed(&mut self, s: Staged<V>) {
        for (id, bitmap, re_add) in s.touched {
            match re_add {
                Some(a) => {
                    let lf = self.files.get_mut(&id).expect("touched file");
                    lf.deleted = bitmap;
                    lf.add = a;
                }
                None => {
                    let lf = self.files.remove(&id).expect("touched file");
                    self.ids.remove(&lf.add.path);
                }
            }
        }
        for id in s.compacted {
            if let Some(lf) = self.files.remove(&id) {
                self.ids.remove(&lf.add.path);
            }
        }
        for k in &s.deleted {
            self.index.remove(k);
        }
        if let Some((add, changed)) = s.new_file {
            let id = self.next;
            self.next += 1;
            let rows = changed.len() as u32;
            for (row, (k, v)) in changed.into_iter().enumerate() {
                let loc = Loc {
                    file: id,
                    row: row as u32,
                };
                self.index.insert(k, loc, v);
            }
            self.ids.insert(add.path.clone(), id);
            self.files.insert(
                id,
                LiveFile {
                    add,
                    deleted: RoaringTreemap::new(),
                    rows,
                },
            );
        }
    }

    /// The files a compaction rewrites (size-tiered, at most [`COMPACT_BUDGET`] live rows):
    /// files more than half deleted, smallest first; and when there are more than
    /// [`MAX_FILES`] files, the files of the lowest size tier (live rows, powers of
    /// [`FANOUT`]) that holds [`FANOUT`] files, with the few of the tiers below it. A file is
    /// only ever merged with files of about its size, so each row is rewritten O(log n) times,
    /// and no compaction rewrites more than the budget: a big file waits until it is mostly
    /// deleted and small enough, or until enough files of its size exist.
    fn victims(&self) -> Vec<u32> {
        let mut budget = COMPACT_BUDGET;
        let mut victims = Vec::new();
        let mut mostly: Vec<(u64, u32)> = self
            .files
            .iter()
            .filter(|(_, f)| f.deleted.len() * 2 > u64::from(f.rows))
            .map(|(id, f)| (f.live(), *id))
            .collect();
        mostly.sort_unstable();
        for (live, id) in mostly {
            if live <= budget {
                budget -= live;
                victims.push(id);
            }
        }
        if self.files.len() <= MAX_FILES {
            return victims;
        }
        let tier = |live: u64| (64 - live.max(1).leading_zeros()) / FANOUT.trailing_zeros();
        let mut tiers: std::collections::BTreeMap<u32, Vec<(u64, u32)>> = std::collections::BTreeMap::new();
        for (id, f) in &self.files {
            if !victims.contains(id) {
                tiers.entry(tier(f.live())).or_default().push((f.live(), *id));
            }
        }
        let mut picked: Vec<(u64, u32)> = Vec::new();
        let mut fallback: Option<usize> = None;
        for files in tiers.into_values() {
            let total: u64 = picked.iter().chain(&files).map(|(l, _)| l).sum();
            if total > budget {
                break;
            }
            let full = files.len() >= FANOUT as usize;
            picked.extend(files);
            if full {
                victims.extend(picked.iter().map(|(_, id)| id));
                return victims;
            }
            if picked.len() >= 2 {
                fallback = Some(picked.len());
            }
        }
        // No tier holds FANOUT files within the budget: merge the smallest that fit.
        if let Some(n) = fallback {
            victims.extend(picked[..n].iter().map(|(_, id)| id));
        }
        victims
    }

    /// Plans a compaction when one is due: the live rows of the smallest files (and of files
    /// more than half deleted) rewritten as one file. `None` when the table is in shape.
    ///
    /// # Errors
    /// Storage and parquet errors.
    pub async fn compaction(&self, t: &Table) -> Result<Option<Staged<V>>, TableError> {
        let mut victims = self.victims();
        victims.sort_unstable();
        victims.dedup();
        if victims.is_empty() || (victims.len() == 1 && self.files[&victims[0]].deleted.is_empty()) {
            return Ok(None);
        }
        let mut parts = Vec::new();
        let mut changed = Vec::new();
        for id in &victims {
            let lf = &self.files[id];
            let f = t.file_ref(&lf.add);
            let batch = t.read_physical(&f).await?;
            let keys = keys_of(&batch).map_err(arrow(t))?;
            let live: Vec<u32> = (0..lf.rows).filter(|r| !lf.deleted.contains(u64::from(*r))).collect();
            for r in &live {
                let k = &keys[*r as usize];
                let v = self
                    .index
                    .get(k)
                    .filter(|e| e.loc == Loc { file: *id, row: *r })
                    .map(|e| e.value.clone());
                // A live row has its key indexed here, unless the table holds the key twice
                // (issue 20 #5: that panicked at every restart): say so.
                let v = v.ok_or_else(|| TableError::DuplicateKey {
                    table: t.kind.name(),
                    key: format!("account {} conId {}", k.0.as_str(), k.1),
                })?;
                changed.push((*k, v));
            }
            parts.push(take_record_batch(&batch, &UInt32Array::from(live)).map_err(arrow(t))?);
        }
        let mut actions: Vec<Action> = victims
            .iter()
            .map(|id| Action::Remove(remove_of(&self.files[id].add, false)))
            .collect();
        let rows: Vec<RecordBatch> = parts.into_iter().filter(|b| b.num_rows() > 0).collect();
        let new_file = if rows.is_empty() {
            None
        } else {
            let schema = rows[0].schema();
            let one = deltalake::arrow::compute::concat_batches(&schema, &rows).map_err(arrow(t))?;
            let mut add = write_one(t, one).await?;
            add.data_change = false;
            actions.push(Action::Add(add.clone()));
            Some((add, changed))
        };
        Ok(Some(Staged {
            actions,
            new_file,
            deleted: vec![],
            touched: vec![],
            compacted: victims,
            prior: vec![],
            seen: vec![],
        }))
    }
}

#[cfg(test)]
pub(crate) mod tests;
