//! Summaries of the upsert tables: their live rows counted by class, carried in the
//! `commitInfo` of every commit the materializer makes on them, so that `possync status` reads
//! one log entry instead of the whole table.
//!
//! A row's class is a function of the columns `status` reads, on the row as it is stored:
//! - `positions_current`: [`CURRENT_CLOSED`] (position 0), [`CURRENT_OPEN`] (open, newest event
//!   on another route than ACTIVE), [`CURRENT_ACTIVE_OPEN`] (open, newest event on the ACTIVE
//!   route: a slot in use);
//! - `position_queue`: by `status`, [`QUEUE_PENDING`], [`QUEUE_REFRESHED`], [`QUEUE_CLOSED`],
//!   anything else [`QUEUE_ACTIVE`].
//!
//! The materializer keeps the class of every key beside its value (two bits of
//! [`super::Hot`]) and the counts per class in its index ([`super::core::Upsert::counts`]), so a
//! commit's summary costs O(keys it changes). Each commit is made against the snapshot its state
//! was synced to (`max_retries = 0`, see [`super::core`]), so the summary it carries is the
//! table's own at that version, exactly what a scan of the table would count.

use deltalake::arrow::array::{Array, AsArray, RecordBatch, StringArray};
use deltalake::arrow::datatypes::Float64Type;
use deltalake::arrow::error::ArrowError;

use super::col;
use crate::materialize::tables::TableKind;

/// The `commitInfo` key of a summary.
pub const KEY: &str = "possyncSummary";

/// Live rows per class (index = class).
pub type Counts = [u64; 4];

/// `positions_current`: position 0.
pub const CURRENT_CLOSED: u8 = 0;
/// `positions_current`: open, newest event not on the ACTIVE route.
pub const CURRENT_OPEN: u8 = 1;
/// `positions_current`: open, newest event on the ACTIVE route.
pub const CURRENT_ACTIVE_OPEN: u8 = 2;

/// `position_queue`: status `pending`.
pub const QUEUE_PENDING: u8 = 0;
/// `position_queue`: status `refreshed`.
pub const QUEUE_REFRESHED: u8 = 1;
/// `position_queue`: status `closed`.
pub const QUEUE_CLOSED: u8 = 2;
/// `position_queue`: any other status (`active`).
pub const QUEUE_ACTIVE: u8 = 3;

/// Class of a `positions_current` row from its `route` and `position`.
pub fn current_class(route: Option<&str>, position: Option<f64>) -> u8 {
    match (position != Some(0.0), route == Some("ACTIVE")) {
        (false, _) => CURRENT_CLOSED,
        (true, false) => CURRENT_OPEN,
        (true, true) => CURRENT_ACTIVE_OPEN,
    }
}

/// Class of a `position_queue` row from its `status`.
pub fn queue_class(status: Option<&str>) -> u8 {
    match status {
        Some("pending") => QUEUE_PENDING,
        Some("refreshed") => QUEUE_REFRESHED,
        Some("closed") => QUEUE_CLOSED,
        _ => QUEUE_ACTIVE,
    }
}

fn opt_str(a: &StringArray, i: usize) -> Option<&str> {
    a.is_valid(i).then(|| a.value(i))
}

/// The class of every row of `batch` (`kind`'s schema; 0 for a table without classes).
///
/// # Errors
/// Arrow errors (a column is missing: a bug).
pub fn classes(kind: TableKind, batch: &RecordBatch) -> Result<Vec<u8>, ArrowError> {
    let n = batch.num_rows();
    Ok(match kind {
        TableKind::PositionsCurrent => {
            let route = col(batch, "route")?.as_string::<i32>();
            let position = col(batch, "position")?.as_primitive::<Float64Type>();
            (0..n)
                .map(|i| current_class(opt_str(route, i), position.is_valid(i).then(|| position.value(i))))
                .collect()
        }
        TableKind::PositionQueue => {
            let status = col(batch, "status")?.as_string::<i32>();
            (0..n).map(|i| queue_class(opt_str(status, i))).collect()
        }
        _ => vec![0; n],
    })
}

/// Adds the classes of `batch`'s rows to `counts` (the full scan `status --exact` makes).
///
/// # Errors
/// Arrow errors (a column is missing: a bug).
pub fn count(kind: TableKind, batch: &RecordBatch, counts: &mut Counts) -> Result<(), ArrowError> {
    for c in classes(kind, batch)? {
        counts[usize::from(c & 3)] += 1;
    }
    Ok(())
}

fn names(kind: TableKind) -> Option<[&'static str; 4]> {
    match kind {
        TableKind::PositionsCurrent => Some(["closed", "open", "active_open", "unused"]),
        TableKind::PositionQueue => Some(["pending", "refreshed", "closed", "active"]),
        _ => None,
    }
}

/// The summary of `counts` as `commitInfo` metadata (none for a table without one).
pub fn info(kind: TableKind, counts: &Counts) -> Vec<(String, serde_json::Value)> {
    let Some(names) = names(kind) else {
        return vec![];
    };
    let mut m = serde_json::Map::new();
    m.insert("rows".into(), counts.iter().sum::<u64>().into());
    for (name, n) in names.iter().zip(counts) {
        if *name != "unused" {
            m.insert((*name).into(), (*n).into());
        }
    }
    vec![(KEY.to_string(), serde_json::Value::Object(m))]
}

/// The counts of a `commitInfo`'s summary; `None` when it carries none (or not one of `kind`).
pub fn of_info(kind: TableKind, commit_info: &serde_json::Value) -> Option<Counts> {
    let names = names(kind)?;
    let s = commit_info.get(KEY)?.as_object()?;
    let mut out = Counts::default();
    for (i, name) in names.iter().enumerate() {
        if *name != "unused" {
            out[i] = s.get(*name)?.as_u64()?;
        }
    }
    (s.get("rows")?.as_u64()? == out.iter().sum::<u64>()).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summaries_round_trip_through_commit_info() {
        for kind in [TableKind::PositionsCurrent, TableKind::PositionQueue] {
            let counts: Counts = match kind {
                TableKind::PositionsCurrent => [3, 5, 7, 0],
                _ => [1, 2, 3, 4],
            };
            let info: serde_json::Map<_, _> = info(kind, &counts).into_iter().collect();
            let info = serde_json::Value::Object(info);
            assert_eq!(of_info(kind, &info), Some(counts));
            assert_eq!(of_info(TableKind::PositionEvents, &info), None);
            assert_eq!(of_info(kind, &serde_json::json!({"operation": "VACUUM END"})), None);
        }
        assert!(info(TableKind::PositionEvents, &[1, 0, 0, 0]).is_empty());
        assert_eq!(current_class(Some("ACTIVE"), None), CURRENT_ACTIVE_OPEN);
        assert_eq!(current_class(Some("ACTIVE"), Some(-0.0)), CURRENT_CLOSED);
        assert_eq!(current_class(Some("QUEUED"), Some(2.0)), CURRENT_OPEN);
        assert_eq!(queue_class(None), QUEUE_ACTIVE);
    }
}
