//! `position_queue` as a [`Spilled`] table: its rows ([`QueueRow`], about 145 bytes in memory,
//! needed only when the key changes) live in the spill file; a flush reads the rows of the
//! keys its events touch, applies the events ([`QueueRow::apply`]), and writes the rows that
//! changed. The row semantics are in [`super::queue`].

use std::collections::HashMap;

use deltalake::arrow::array::{AsArray, RecordBatch};
use deltalake::arrow::datatypes::TimestampMicrosecondType;
use deltalake::arrow::error::ArrowError;

use super::core::{Changes, Key};
use super::queue::{each_event, rows_batch, OptTime, PartitionCounts, QueueRow, QueuedPart};
use super::spill::{Codec, Reader};
use super::spilled::{Hot, SpillValue, Spilled};
use super::{EventOrder, Sym};
use crate::materialize::tables::{Table, TableError};

/// The live `position_queue` of a materializer.
pub type Queue = Spilled<QueueRow>;

impl SpillValue for QueueRow {
    fn closed_since(&self) -> Option<i64> {
        (self.status() == "closed").then(|| self.updated_at())
    }

    fn classes(batch: &RecordBatch) -> Result<Vec<u8>, ArrowError> {
        super::summary::classes(crate::materialize::tables::TableKind::PositionQueue, batch)
    }

    const LIGHT: &'static [&'static str] = &["status", "updated_at"];

    fn closed_times(batch: &RecordBatch) -> Result<Vec<Option<i64>>, ArrowError> {
        let status = super::col(batch, "status")?.as_string::<i32>();
        let updated = super::col(batch, "updated_at")?.as_primitive::<TimestampMicrosecondType>();
        Ok((0..batch.num_rows())
            .map(|i| (status.value(i) == "closed").then(|| updated.value(i)))
            .collect())
    }
}

/// Tests keep whole rows in the core: their class is their status's.
impl super::core::Classed for QueueRow {
    fn class(&self) -> u8 {
        super::summary::queue_class(Some(self.status()))
    }
}

fn arrow_err(source: ArrowError) -> TableError {
    TableError::Arrow {
        table: "position_queue",
        source,
    }
}

/// The changes position event rows (`position_events` layout) make: the new row of every key
/// whose row they change, as one batch of the `position_queue` schema (keys in the order they
/// first appear), and each such key's new [`Hot`] value (same order; the rows are already in
/// the spill file). `None` when no row changes. Values `state` has not read yet are read from
/// `t`.
///
/// # Errors
/// Arrow errors (schema mismatch: a bug), storage and spill errors.
pub async fn changes(state: &mut Queue, t: &Table, events: &[RecordBatch]) -> Result<Option<Changes<Hot>>, TableError> {
    let mut slot: HashMap<Key, u32, foldhash::fast::RandomState> = HashMap::default();
    let (mut keys, mut of_event) = (Vec::<Key>::new(), Vec::<u32>::new());
    each_event(events, |(acct, con), _| {
        let key = (Sym::new(acct), con);
        let i = *slot.entry(key).or_insert_with(|| {
            keys.push(key);
            (keys.len() - 1) as u32
        });
        of_event.push(i);
    })
    .map_err(arrow_err)?;
    let old = state.values(t, &keys).await?;
    let mut new: Vec<QueueRow> = old.iter().map(|o| o.clone().unwrap_or_default()).collect();
    let mut n = 0;
    each_event(events, |_, e| {
        new[of_event[n] as usize].apply(e);
        n += 1;
    })
    .map_err(arrow_err)?;
    let changed: Vec<usize> = (0..keys.len()).filter(|&i| old[i].as_ref() != Some(&new[i])).collect();
    if changed.is_empty() {
        return Ok(None);
    }
    let batch = rows_batch(
        changed.len(),
        changed.iter().map(|&i| ((keys[i].0.as_str(), keys[i].1), &new[i])),
    )
    .map_err(arrow_err)?;
    let rows: Vec<QueueRow> = changed.iter().map(|&i| std::mem::take(&mut new[i])).collect();
    let hot = state.append(&rows, &batch)?;
    Ok(Some((batch, changed.iter().map(|&i| keys[i]).zip(hot).collect())))
}

// The record: flags (1 = has a queued part), `last_active_at`; with a queued part:
// `enqueued_at`, `last_refreshed_at`, `last` ([`EventOrder::encode`]), source symbol, position,
// avg cost, the partition count and per partition (partition, queued events, POLL events).
// Little-endian; symbols are this process's numbers (the file lives and dies with it).

impl Codec for QueueRow {
    fn encode(&self, out: &mut Vec<u8>) {
        out.push(u8::from(self.queued.is_some()));
        out.extend_from_slice(&self.last_active_at.raw().to_le_bytes());
        let Some(q) = self.queued.as_ref() else { return };
        out.extend_from_slice(&q.enqueued_at.raw().to_le_bytes());
        out.extend_from_slice(&q.last_refreshed_at.raw().to_le_bytes());
        q.last.encode(out);
        out.extend_from_slice(&q.last_source.id().to_le_bytes());
        out.extend_from_slice(&q.position.to_le_bytes());
        out.extend_from_slice(&q.avg_cost.to_le_bytes());
        let counts: Vec<_> = q.counts.iter().collect();
        out.extend_from_slice(&(counts.len() as u32).to_le_bytes());
        for (p, (e, r)) in counts {
            out.extend_from_slice(&p.to_le_bytes());
            out.extend_from_slice(&e.to_le_bytes());
            out.extend_from_slice(&r.to_le_bytes());
        }
    }

    fn decode(b: &[u8]) -> Option<Self> {
        let mut r = Reader(b);
        let queued = r.flag()?;
        let last_active_at = OptTime::from_raw(r.i64()?);
        if !queued {
            return r.done().then_some(QueueRow {
                queued: None,
                last_active_at,
            });
        }
        let enqueued_at = OptTime::from_raw(r.i64()?);
        let last_refreshed_at = OptTime::from_raw(r.i64()?);
        let last = EventOrder::decode(&mut r)?;
        let last_source = Sym::from_id(r.u32()?)?;
        let (position, avg_cost) = (r.f64()?, r.f64()?);
        let mut counts = PartitionCounts::new();
        for _ in 0..r.u32()? {
            let p = i32::from_le_bytes(r.take::<4>()?);
            *counts.entry(p) = (r.i64()?, r.i64()?);
        }
        r.done().then_some(QueueRow {
            queued: Some(QueuedPart {
                enqueued_at,
                last_refreshed_at,
                counts,
                last,
                last_source,
                position,
                avg_cost,
            }),
            last_active_at,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::materialize::upsert::queue::QueueInput;

    fn input<'a>(t: i64, partition: i32, source: &'a str, id: &'a str, active: bool) -> QueueInput<'a> {
        QueueInput {
            active_route: active,
            partition,
            source,
            order: (t, "session-1", t * 10, id),
            position: t as f64 / 3.0,
            avg_cost: -1.5,
        }
    }

    #[test]
    fn rows_round_trip_through_the_codec() {
        let uuid = "0a1b2c3d-4e5f-6789-abcd-ef0123456789";
        let mut rows = vec![QueueRow::default()];
        let mut r = QueueRow::default();
        r.apply(&input(5, 0, "PNL", "x", true));
        rows.push(r.clone());
        r.apply(&input(7, 3, "SNAPSHOT", uuid, false));
        rows.push(r.clone());
        r.apply(&input(9, 1, "POLL", "not-a-uuid", false));
        r.apply(&input(8, 3, "STREAM", "e", false));
        rows.push(r.clone());
        for row in &rows {
            let mut b = Vec::new();
            row.encode(&mut b);
            assert_eq!(QueueRow::decode(&b).as_ref(), Some(row));
            for cut in 0..b.len() {
                assert_eq!(QueueRow::decode(&b[..cut]), None, "a truncated record is refused");
            }
            b.push(0);
            assert_eq!(QueueRow::decode(&b), None, "trailing bytes are refused");
        }
    }
}
