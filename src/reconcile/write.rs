//! Writing `position_snapshots` (an append per snapshot) and `reconciliation` (a rewrite per
//! run: the table always holds exactly the last run's lines).

use std::sync::Arc;

use chrono::NaiveDate;
use deltalake::arrow::array::{
    ArrayRef, Date32Array, Float64Array, Int32Array, Int64Array, RecordBatch, StringArray, TimestampMicrosecondArray,
};
use deltalake::kernel::Action;

use super::model::Line;
use super::read::{day_number, Book};
use super::ReconcileError;
use crate::materialize::decode::UTC;
use crate::materialize::reconciled::{DAY_START, PERIODIC};
use crate::materialize::tables::{append_operation, rewrite_operation, Table, TableError};
use crate::materialize::TableKind;

/// Write a checkpoint every this many commits (the reconcile tables get one commit a minute).
const CHECKPOINT_EVERY: u64 = 100;

fn ts(values: impl IntoIterator<Item = Option<i64>>) -> ArrayRef {
    Arc::new(TimestampMicrosecondArray::from(values.into_iter().collect::<Vec<_>>()).with_timezone(UTC))
}

fn strs<'a>(values: impl IntoIterator<Item = Option<&'a str>>) -> ArrayRef {
    Arc::new(StringArray::from(values.into_iter().collect::<Vec<_>>()))
}

fn arrow(kind: TableKind) -> impl Fn(deltalake::arrow::error::ArrowError) -> TableError {
    move |source| TableError::Arrow {
        table: kind.name(),
        source,
    }
}

/// Appends `book` as the snapshot taken at `time` (µs): `day_start` when it is the first of
/// its UTC day, `periodic` otherwise. Rows in (account, conId) order.
///
/// # Errors
/// Storage errors.
pub async fn snapshot(base: &str, book: &Book, time: i64, day_start: bool) -> Result<usize, ReconcileError> {
    let kind = TableKind::PositionSnapshots;
    let mut keys: Vec<_> = book.rows.keys().collect();
    keys.sort();
    let rows: Vec<_> = keys.iter().map(|k| (*k, &book.rows[*k])).collect();
    let n = rows.len();
    let day = chrono::DateTime::from_timestamp_micros(time)
        .map(|t| t.date_naive())
        .unwrap_or_default();
    let label = if day_start { DAY_START } else { PERIODIC };
    let columns: Vec<ArrayRef> = vec![
        ts(std::iter::repeat_n(Some(time), n)),
        Arc::new(Date32Array::from(vec![day_number(day); n])),
        strs(std::iter::repeat_n(Some(label), n)),
        strs(rows.iter().map(|(k, _)| Some(k.0.as_str()))),
        Arc::new(Int64Array::from_iter_values(rows.iter().map(|(k, _)| k.1))),
        strs(rows.iter().map(|(_, h)| Some(h.contract.symbol.as_str()))),
        strs(rows.iter().map(|(_, h)| Some(h.contract.sec_type.as_str()))),
        strs(rows.iter().map(|(_, h)| Some(h.contract.local_symbol.as_str()))),
        strs(rows.iter().map(|(_, h)| h.contract.expiry.as_deref())),
        strs(rows.iter().map(|(_, h)| h.contract.right.as_deref())),
        Arc::new(Float64Array::from_iter(rows.iter().map(|(_, h)| h.contract.multiplier))),
        Arc::new(Float64Array::from_iter_values(rows.iter().map(|(_, h)| h.position))),
        Arc::new(Float64Array::from_iter_values(rows.iter().map(|(_, h)| h.avg_cost))),
        ts(rows.iter().map(|(_, h)| Some(h.as_of))),
        Arc::new(Int64Array::from(vec![book.version; n])),
    ];
    let batch = RecordBatch::try_new(kind.schema(), columns).map_err(arrow(kind))?;
    let mut t = Table::open(base, kind).await?;
    let adds = t.write_files(&[batch]).await?;
    if !adds.is_empty() {
        let actions = adds.into_iter().map(Action::Add).collect();
        t.commit(actions, &[], append_operation(kind), CHECKPOINT_EVERY).await?;
    }
    Ok(n)
}

/// Replaces the `reconciliation` table's rows with `lines` (of `day`, computed at `at` µs).
///
/// # Errors
/// Storage errors; [`TableError::Conflict`] (in [`ReconcileError::Table`]) when another writer
/// committed meanwhile (the next run writes again).
pub async fn reconciliation(base: &str, day: NaiveDate, at: i64, lines: &[Line]) -> Result<(), ReconcileError> {
    let kind = TableKind::Reconciliation;
    let n = lines.len();
    let columns: Vec<ArrayRef> = vec![
        Arc::new(Date32Array::from(vec![day_number(day); n])),
        strs(lines.iter().map(|l| Some(l.account.as_str()))),
        Arc::new(Int64Array::from_iter_values(lines.iter().map(|l| l.con_id))),
        strs(lines.iter().map(|l| Some(l.contract.symbol.as_str()))),
        strs(lines.iter().map(|l| Some(l.contract.sec_type.as_str()))),
        strs(lines.iter().map(|l| Some(l.contract.local_symbol.as_str()))),
        strs(lines.iter().map(|l| l.contract.expiry.as_deref())),
        strs(lines.iter().map(|l| l.contract.right.as_deref())),
        Arc::new(Float64Array::from_iter(lines.iter().map(|l| l.contract.multiplier))),
        Arc::new(Float64Array::from_iter_values(lines.iter().map(|l| l.start))),
        ts(lines.iter().map(|l| Some(l.start_as_of))),
        Arc::new(Float64Array::from_iter_values(lines.iter().map(|l| l.filled))),
        Arc::new(Int32Array::from_iter_values(lines.iter().map(|l| l.fills as i32))),
        Arc::new(Float64Array::from_iter_values(lines.iter().map(|l| l.now))),
        Arc::new(Float64Array::from_iter_values(lines.iter().map(|l| l.diff))),
        strs(lines.iter().map(|l| Some(l.status.as_str()))),
        strs(lines.iter().map(|l| l.reason.as_deref())),
        ts(lines.iter().map(|l| l.drifted_since)),
        ts(std::iter::repeat_n(Some(at), n)),
    ];
    let batch = RecordBatch::try_new(kind.schema(), columns).map_err(arrow(kind))?;
    let mut t = Table::open(base, kind).await?;
    let mut actions: Vec<Action> = t.files()?.into_iter().map(|f| Action::Remove(f.remove)).collect();
    actions.extend(t.write_files(&[batch]).await?.into_iter().map(Action::Add));
    t.commit(actions, &[], rewrite_operation(), CHECKPOINT_EVERY).await?;
    Ok(())
}
