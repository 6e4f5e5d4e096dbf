//! `positions_current` as a [`Spilled`] table: per key, the newest event's order (and whether
//! it closed the position), kept in the spill file; the row itself lives only in the table.

use deltalake::arrow::array::{Array, AsArray, RecordBatch};
use deltalake::arrow::compute::interleave;
use deltalake::arrow::datatypes::{Float64Type, TimestampMicrosecondType};
use deltalake::arrow::error::ArrowError;

use super::core::{Changes, Key, RowValue};
use super::spill::{Codec, Reader};
use super::spilled::{Hot, SpillValue, Spilled};
use super::{as_current, col, newer, newest_per_key, Cols, EventOrder, Sym};
use crate::materialize::tables::{positions_current_layout, Table, TableError};

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

impl SpillValue for CurrentMeta {
    fn closed_since(&self) -> Option<i64> {
        self.closed.then_some(self.order.ingest_time)
    }

    fn classes(batch: &RecordBatch) -> Result<Vec<u8>, ArrowError> {
        super::summary::classes(crate::materialize::tables::TableKind::PositionsCurrent, batch)
    }

    const LIGHT: &'static [&'static str] = &["route", "position", "ingest_time"];

    fn closed_times(batch: &RecordBatch) -> Result<Vec<Option<i64>>, ArrowError> {
        let position = col(batch, "position")?.as_primitive::<Float64Type>();
        let time = col(batch, "ingest_time")?.as_primitive::<TimestampMicrosecondType>();
        Ok((0..batch.num_rows())
            .map(|i| (position.value(i) == 0.0).then(|| time.value(i)))
            .collect())
    }
}

// The record: 1 when closed (else 0), then the order ([`EventOrder::encode`]).
impl Codec for CurrentMeta {
    fn encode(&self, out: &mut Vec<u8>) {
        out.push(u8::from(self.closed));
        self.order.encode(out);
    }

    fn decode(b: &[u8]) -> Option<Self> {
        let mut r = Reader(b);
        let closed = r.flag()?;
        let order = EventOrder::decode(&mut r)?;
        r.done().then_some(CurrentMeta { order, closed })
    }
}

/// The live `positions_current` of a materializer.
pub type Current = Spilled<CurrentMeta>;

fn arrow_err(source: ArrowError) -> TableError {
    TableError::Arrow {
        table: "positions_current",
        source,
    }
}

/// The changes `rows` (`position_events` or `positions_current` layout) make: the newest row of
/// each key that is newer than what `state` holds, as one batch of the `positions_current`
/// schema, and each such key's new [`Hot`] value (same order; already in the spill file).
/// `None` when nothing is newer. Values `state` has not read yet are read from `t`.
///
/// # Errors
/// Arrow errors (schema mismatch: a bug), storage and spill errors.
pub async fn changes(state: &mut Current, t: &Table, rows: &[RecordBatch]) -> Result<Option<Changes<Hot>>, TableError> {
    let schema = positions_current_layout().schema.clone();
    let inputs = as_current(rows).map_err(arrow_err)?;
    let cols: Vec<Cols<'_>> = inputs
        .iter()
        .map(Cols::of)
        .collect::<Result<_, _>>()
        .map_err(arrow_err)?;
    let best: Vec<(Key, (usize, usize))> = newest_per_key(&cols)
        .into_iter()
        .map(|((acct, con), at)| ((Sym::new(acct), con), at))
        .collect();
    let keys: Vec<Key> = best.iter().map(|(k, _)| *k).collect();
    let old = state.values(t, &keys).await?;
    let mut picks: Vec<(usize, usize)> = Vec::new();
    let mut changed = Vec::new();
    for ((key, (bi, i)), old) in best.into_iter().zip(old) {
        if old.is_some_and(|m| !newer(cols[bi].order(i), &m.order)) {
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
        .collect::<Result<Vec<_>, _>>()
        .map_err(arrow_err)?;
    let batch = RecordBatch::try_new(schema, columns).map_err(arrow_err)?;
    let metas = CurrentMeta::of_rows(&batch).map_err(arrow_err)?;
    let hot = state.append(&metas, &batch)?;
    Ok(Some((batch, changed.into_iter().zip(hot).collect())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metas_round_trip_through_the_codec() {
        for (closed, id) in [(false, "0a1b2c3d-4e5f-6789-abcd-ef0123456789"), (true, "evt-7")] {
            let m = CurrentMeta {
                order: EventOrder::of((17, "session-9", 4, id)),
                closed,
            };
            let mut b = Vec::new();
            m.encode(&mut b);
            assert_eq!(CurrentMeta::decode(&b), Some(m.clone()));
            for cut in 0..b.len() {
                assert_eq!(CurrentMeta::decode(&b[..cut]), None, "a truncated record is refused");
            }
            b.push(0);
            assert_eq!(CurrentMeta::decode(&b), None, "trailing bytes are refused");
        }
    }
}
