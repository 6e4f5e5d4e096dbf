//! What a reconciliation reads from the Delta tables: the book now (`positions_current`), the
//! day's starting snapshot (`position_snapshots`, its `day_start` partition only), the fills
//! (`executions`, the `event_date` partitions from the day on), and the last reconciliation.

use std::collections::HashMap;

use chrono::NaiveDate;
use deltalake::arrow::array::{Array, AsArray};

use super::model::{Contract, Fill, Held, Key};
use super::ReconcileError;
use crate::materialize::decode::EVENT_DATE;
use crate::materialize::reconciled::{DAY_START, SNAPSHOT_DATE, SNAPSHOT_KIND};
use crate::materialize::tables::FileRef;
use crate::materialize::TableKind;
use crate::ops::{open_existing, Row};

/// A book: every open position with the row it came from.
#[derive(Debug, Clone, Default)]
pub struct Book {
    /// The table version read.
    pub version: i64,
    pub rows: HashMap<Key, Held>,
}

/// The day's starting snapshot.
#[derive(Debug, Clone)]
pub struct Start {
    pub day: NaiveDate,
    /// When it was taken (µs).
    pub time: i64,
    pub rows: HashMap<Key, Held>,
}

fn date_text(d: NaiveDate) -> String {
    d.format("%Y-%m-%d").to_string()
}

fn contract(r: &Row<'_>, i: usize, multiplier: Option<f64>) -> Contract {
    Contract {
        symbol: r.str("symbol", i).unwrap_or_default(),
        sec_type: r.str("sec_type", i).unwrap_or_default(),
        local_symbol: r.str("local_symbol", i).unwrap_or_default(),
        expiry: r.str("expiry", i).filter(|e| !e.is_empty()),
        right: r.str("right", i).filter(|e| !e.is_empty()),
        multiplier,
    }
}

/// IB's multiplier is text (`"100"`); empty or unparsable is none.
fn multiplier_text(r: &Row<'_>, i: usize) -> Option<f64> {
    r.str_ref("multiplier", i).and_then(|m| m.trim().parse().ok())
}

/// The open positions of `positions_current`.
///
/// # Errors
/// [`ReconcileError::Missing`] when the table is not there; storage errors.
pub async fn book_now(base: &str) -> Result<Book, ReconcileError> {
    let t = open_existing(base, TableKind::PositionsCurrent)
        .await?
        .ok_or_else(|| ReconcileError::Missing {
            table: TableKind::PositionsCurrent.name(),
            base: base.to_string(),
        })?;
    let mut rows = HashMap::new();
    for b in t.read_all().await? {
        let r = Row(&b);
        for i in 0..b.num_rows() {
            let position = r.f64("position", i).unwrap_or_default();
            if position == 0.0 {
                continue;
            }
            let key = (
                r.str("account", i).unwrap_or_default(),
                r.i64("con_id", i).unwrap_or_default(),
            );
            let held = Held {
                position,
                avg_cost: r.f64("avg_cost", i).unwrap_or_default(),
                as_of: r.ts("ingest_time", i).unwrap_or_default(),
                contract: contract(&r, i, multiplier_text(&r, i)),
            };
            rows.insert(key, held);
        }
    }
    Ok(Book {
        version: t.version(),
        rows,
    })
}

/// The `day_start` snapshot of `day`, if one was taken (only that partition is read).
///
/// # Errors
/// Storage errors.
pub async fn day_start(base: &str, day: NaiveDate) -> Result<Option<Start>, ReconcileError> {
    let Some(t) = open_existing(base, TableKind::PositionSnapshots).await? else {
        return Ok(None);
    };
    let files = partition(t.files()?, day);
    if files.is_empty() {
        return Ok(None);
    }
    // Two writers racing at midnight could both have written one: the first counts.
    let mut time = i64::MAX;
    let batches = t.read(&files).await?;
    for b in &batches {
        let r = Row(b);
        for i in 0..b.num_rows() {
            time = time.min(r.ts("snapshot_time", i).unwrap_or(i64::MAX));
        }
    }
    let mut rows = HashMap::new();
    for b in &batches {
        let r = Row(b);
        for i in 0..b.num_rows() {
            if r.ts("snapshot_time", i) != Some(time) {
                continue;
            }
            let key = (
                r.str("account", i).unwrap_or_default(),
                r.i64("con_id", i).unwrap_or_default(),
            );
            rows.insert(
                key,
                Held {
                    position: r.f64("position", i).unwrap_or_default(),
                    avg_cost: r.f64("avg_cost", i).unwrap_or_default(),
                    as_of: r.ts("as_of", i).unwrap_or_default(),
                    contract: contract(&r, i, r.f64("multiplier", i)),
                },
            );
        }
    }
    Ok(Some(Start { day, time, rows }))
}

/// The files of `day`'s `day_start` partition.
fn partition(files: Vec<FileRef>, day: NaiveDate) -> Vec<FileRef> {
    let day = date_text(day);
    files
        .into_iter()
        .filter(|f| {
            f.partition_value(SNAPSHOT_DATE) == Some(day.as_str())
                && f.partition_value(SNAPSHOT_KIND) == Some(DAY_START)
        })
        .collect()
}

/// Every fill of `day` and later (every revision), from the `executions` table; none when
/// there is no table yet.
///
/// # Errors
/// Storage errors.
pub async fn fills_since(base: &str, day: NaiveDate) -> Result<Vec<Fill>, ReconcileError> {
    let Some(t) = open_existing(base, TableKind::Executions).await? else {
        return Ok(vec![]);
    };
    let day = date_text(day);
    let files: Vec<_> = t
        .files()?
        .into_iter()
        .filter(|f| f.partition_value(EVENT_DATE).is_none_or(|d| d >= day.as_str()))
        .collect();
    let mut out = Vec::new();
    for b in t.read(&files).await? {
        let r = Row(&b);
        for i in 0..b.num_rows() {
            let shares = r.f64("shares", i).unwrap_or_default();
            let sign = if r.str_ref("side", i) == Some("SLD") { -1.0 } else { 1.0 };
            out.push(Fill {
                account: r.str("account", i).unwrap_or_default(),
                con_id: r.i64("con_id", i).unwrap_or_default(),
                exec_stem: r.str("exec_stem", i).unwrap_or_default(),
                revision: r.i32("revision", i).unwrap_or_default(),
                exec_time: r.ts("exec_time", i).unwrap_or_default(),
                shares: sign * shares,
                contract: contract(&r, i, multiplier_text(&r, i)),
            });
        }
    }
    Ok(out)
}

/// Since when each key of the last reconciliation of `day` was unexplained (`pending` or
/// `drifted`); empty when there is none.
///
/// # Errors
/// Storage errors.
pub async fn unexplained_since(base: &str, day: NaiveDate) -> Result<HashMap<Key, i64>, ReconcileError> {
    let Some(t) = open_existing(base, TableKind::Reconciliation).await? else {
        return Ok(HashMap::new());
    };
    let day = day_number(day);
    let mut out = HashMap::new();
    for b in t.read_all().await? {
        let dates = b
            .column_by_name("trade_date")
            .map(|c| c.as_primitive::<deltalake::arrow::datatypes::Date32Type>().clone());
        let r = Row(&b);
        for i in 0..b.num_rows() {
            let same_day = dates.as_ref().is_some_and(|d| d.is_valid(i) && d.value(i) == day);
            if let (true, Some(since)) = (same_day, r.ts("drifted_since", i)) {
                out.insert(
                    (
                        r.str("account", i).unwrap_or_default(),
                        r.i64("con_id", i).unwrap_or_default(),
                    ),
                    since,
                );
            }
        }
    }
    Ok(out)
}

/// Days since the epoch (Arrow's `Date32`).
pub fn day_number(d: NaiveDate) -> i32 {
    (d - NaiveDate::from_ymd_opt(1970, 1, 1).expect("the epoch")).num_days() as i32
}
