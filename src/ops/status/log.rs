//! What `status` reads of a table: the newest log entries (one `GET` each, never a listing of
//! the log), the summary an upsert commit carries, and the scan when there is none.

use super::{StatusError, SUMMARY_WALK};
use crate::materialize::tables::{Table, TableError, TableKind};
use crate::materialize::upsert::summary::{self, Counts};

/// What `status` reads from one log entry (one `GET` of `_delta_log/<version>.json`).
#[derive(Debug, Clone, Default)]
pub(super) struct LogEntry {
    /// Its `commitInfo` (`Null` when it has none).
    pub(super) commit_info: serde_json::Value,
    /// The commit time (ms).
    pub(super) timestamp: Option<i64>,
    /// Whether it adds or removes data (an add or remove with `dataChange` true).
    pub(super) data_change: bool,
}

/// The log entry of `version` of `t` (`None`: no such entry, e.g. cleaned up).
pub(super) async fn log_entry(t: &Table, version: i64) -> Result<Option<LogEntry>, TableError> {
    let Ok(v) = u64::try_from(version) else {
        return Ok(None);
    };
    let bytes = t
        .delta
        .log_store()
        .read_commit_entry(v)
        .await
        .map_err(|source| TableError::Delta {
            table: t.kind.name(),
            source,
        })?;
    let Some(bytes) = bytes else {
        return Ok(None);
    };
    let mut e = LogEntry::default();
    for line in bytes
        .split(|b| *b == b'\n')
        .filter(|l| !l.iter().all(u8::is_ascii_whitespace))
    {
        let action: serde_json::Value = serde_json::from_slice(line).map_err(|err| TableError::Delta {
            table: t.kind.name(),
            source: deltalake::DeltaTableError::Generic(format!("log entry {version}: {err}")),
        })?;
        if let Some(ci) = action.get("commitInfo") {
            e.timestamp = ci.get("timestamp").and_then(serde_json::Value::as_i64);
            e.commit_info = ci.clone();
        }
        for kind in ["add", "remove"] {
            if let Some(a) = action.get(kind) {
                // A missing dataChange counts as a change (the safe reading).
                e.data_change |= a.get("dataChange").and_then(serde_json::Value::as_bool) != Some(false);
            }
        }
    }
    Ok(Some(e))
}

/// The summary of `t`'s rows as of its loaded version, from the newest log entry that carries
/// one, walking back over entries that change no rows (at most [`SUMMARY_WALK`] entries);
/// `newest` is the entry of the loaded version when already read. `None`: no such entry
/// (a data commit without a summary comes first, or the walk ends): the caller scans.
pub(super) async fn summary_of(t: &Table, newest: Option<LogEntry>) -> Result<Option<(i64, Counts)>, TableError> {
    let mut v = t.version();
    let mut entry = newest;
    for _ in 0..SUMMARY_WALK {
        let e = match entry.take() {
            Some(e) => e,
            None => match log_entry(t, v).await? {
                Some(e) => e,
                None => return Ok(None),
            },
        };
        if let Some(c) = summary::of_info(t.kind, &e.commit_info) {
            return Ok(Some((v, c)));
        }
        if e.data_change || v == 0 {
            return Ok(None);
        }
        v -= 1;
    }
    Ok(None)
}

/// The live rows of an upsert table (`positions_current`, `position_queue`) per summary class
/// as of its loaded version, and where they came from (`summary@vN`: the summary of version N;
/// `scan@vN`): from the newest summary when one applies and `exact` is off, else by a scan.
///
/// # Errors
/// Storage errors.
pub async fn upsert_counts(t: &Table, exact: bool) -> Result<(Counts, String), StatusError> {
    counted(t, exact, None).await
}

/// [`upsert_counts`], with the newest log entry when already read.
pub(super) async fn counted(t: &Table, exact: bool, newest: Option<LogEntry>) -> Result<(Counts, String), StatusError> {
    if !exact {
        if let Some((v, c)) = summary_of(t, newest).await? {
            return Ok((c, format!("summary@v{v}")));
        }
    }
    Ok((scan(t).await?, format!("scan@v{}", t.version())))
}

/// The rows of an upsert table counted by class: the whole table read (`--exact`).
pub(super) async fn scan(t: &Table) -> Result<Counts, StatusError> {
    let columns: &[&str] = match t.kind {
        TableKind::PositionsCurrent => &["route", "position"],
        _ => &["status"],
    };
    let mut c = Counts::default();
    for b in t.read_columns(columns).await? {
        summary::count(t.kind, &b, &mut c).map_err(|source| TableError::Arrow {
            table: t.kind.name(),
            source,
        })?;
    }
    Ok(c)
}

/// Rows of a table from the Delta file statistics (reads the files only when a file has none).
pub(super) async fn row_count(t: &Table) -> Result<u64, TableError> {
    let snap = t.delta.snapshot().map_err(|source| TableError::Delta {
        table: t.kind.name(),
        source,
    })?;
    let counts: Option<Vec<usize>> = snap.log_data().iter().map(|f| f.num_records()).collect();
    match counts {
        Some(c) => Ok(c.into_iter().sum::<usize>() as u64),
        None => Ok(t.read_all().await?.iter().map(|b| b.num_rows() as u64).sum()),
    }
}
