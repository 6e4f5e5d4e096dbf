//! `positions_current` over the copy-on-write core: per key, the newest event's order (and
//! whether it closed the position); the row itself lives only in the table.

use deltalake::arrow::array::{Array, AsArray, RecordBatch};
use deltalake::arrow::compute::interleave;
use deltalake::arrow::datatypes::Float64Type;
use deltalake::arrow::error::ArrowError;

use super::core::{Changes, Key, RowValue, Upsert};
use super::{as_current, col, newer, newest_per_key, Cols, EventOrder, Sym};
use crate::materialize::tables::positions_current_layout;

/// What the materializer keeps per `positions_current` key.
#[derive(Debug, Clone, PartialEq)]
pub struct CurrentMeta {
    /// Order of the newest event.
    pub order: EventOrder,
    /// Its position is 0 (a closed position; retention may delete it).
    pub closed: bool,
}

impl RowValue for CurrentMeta {
    fn of_rows(batch: &RecordBatch) -> Result<Vec<Self>, ArrowError> {
        let c = Cols::of(batch)?;
        let position = col(batch, "position")?.as_primitive::<Float64Type>();
        Ok((0..batch.num_rows())
            .map(|i| CurrentMeta {
                order: c.owned_order(i),
                closed: position.value(i) == 0.0,
            })
            .collect())
    }
}

/// The live `positions_current` of a materializer.
pub type Current = Upsert<CurrentMeta>;

/// The changes `rows` (`position_events` or `positions_current` layout) make: the newest row of
/// each key that is newer than what `state` holds, as one batch of the `positions_current`
/// schema, and each such key's new value (same order). `None` when nothing is newer.
///
/// # Errors
/// Arrow errors (schema mismatch: a bug).
pub fn changes(state: &Current, rows: &[RecordBatch]) -> Result<Option<Changes<CurrentMeta>>, ArrowError> {
    let schema = positions_current_layout().schema.clone();
    let inputs = as_current(rows)?;
    let cols: Vec<Cols<'_>> = inputs.iter().map(Cols::of).collect::<Result<_, _>>()?;
    let best = newest_per_key(&cols);
    let mut picks: Vec<(usize, usize)> = Vec::new();
    let mut changed = Vec::new();
    for ((acct, con), (bi, i)) in best {
        let key = (Sym::new(acct), con);
        if state.get(&key).is_some_and(|m| !newer(cols[bi].order(i), &m.order)) {
            continue;
        }
        picks.push((bi, i));
        changed.push(key);
    }
    if picks.is_empty() {
        return Ok(None);
    }
    let columns = (0..schema.fields().len())
        .map(|c| {
            let arrays: Vec<&dyn Array> = inputs.iter().map(|b| b.column(c).as_ref()).collect();
            interleave(&arrays, &picks)
        })
        .collect::<Result<Vec<_>, _>>()?;
    let batch = RecordBatch::try_new(schema, columns)?;
    let metas = CurrentMeta::of_rows(&batch)?;
    Ok(Some((batch, changed.into_iter().zip(metas).collect())))
}

/// Keys closed (position 0) by an event older than `cutoff` (µs): the retention delete.
pub fn expired(state: &Current, cutoff: i64) -> Vec<Key> {
    state
        .iter()
        .filter(|(_, m)| m.closed && m.order.ingest_time < cutoff)
        .map(|(k, _)| *k)
        .collect()
}
