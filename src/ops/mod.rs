//! Operator commands over the brokers and the Delta tables: `possync status`, `possync book`,
//! `possync fills`, `possync rebuild`, `possync migrate`.
//!
//! They sit beside `run`, over the same lower layers (`materialize`'s tables, offsets and upsert
//! folds, `kafka`), and never write a live table's rows: `status`, `book` and `fills` only read,
//! `rebuild` writes fresh tables under another base URI, `migrate` changes only the layout of
//! existing tables, one commit per step. Opening a table that does not exist is an error
//! here (the materializer's `Table::open` would create it, which a read-only command must not).

pub mod book;
pub mod fills;
pub mod migrate;
pub mod rebuild;
pub mod status;

use std::path::Path;

use deltalake::arrow::array::{Array, AsArray, RecordBatch};
use deltalake::arrow::datatypes::{Float64Type, Int32Type, Int64Type, TimestampMicrosecondType};
use deltalake::DeltaTableBuilder;

use crate::materialize::tables::{Table, TableError};
use crate::materialize::TableKind;

/// Whether `base` is a local path (or `file://` URL) rather than object storage.
fn is_local(base: &str) -> bool {
    !base.contains("://") || base.starts_with("file://")
}

/// Opens an existing table under `base`; `Ok(None)` when there is none (nothing is created).
///
/// # Errors
/// Storage errors; [`TableError::SchemaChanged`] when the table has another schema.
pub async fn open_existing(base: &str, kind: TableKind) -> Result<Option<Table>, TableError> {
    if !exists(base, kind.name()).await? {
        return Ok(None);
    }
    Table::open(base, kind).await.map(Some)
}

/// Whether a Delta table named `name` exists under `base` (no directory is created).
///
/// # Errors
/// Storage errors for remote locations.
pub async fn exists(base: &str, name: &str) -> Result<bool, TableError> {
    if is_local(base) {
        let root = base.strip_prefix("file://").unwrap_or(base);
        return Ok(Path::new(root).join(name).join("_delta_log").is_dir());
    }
    let uri = format!("{}/{name}", base.trim_end_matches('/'));
    let location = |source| TableError::Location {
        uri: uri.clone(),
        source,
    };
    let url = deltalake::ensure_table_uri(&uri).map_err(location)?;
    let table = DeltaTableBuilder::from_url(url)
        .map_err(location)?
        .build()
        .map_err(location)?;
    table
        .verify_deltatable_existence()
        .await
        .map_err(|source| TableError::Delta { table: "?", source })
}

/// Microseconds since the epoch as RFC 3339 (UTC, microsecond precision).
pub fn rfc3339_micros(us: i64) -> String {
    chrono::DateTime::from_timestamp_micros(us)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true))
        .unwrap_or_else(|| us.to_string())
}

/// Typed column access for reading rows back (schema mismatches are bugs: they panic with the
/// column's name, the tables were checked against this build's schema when opened).
pub(crate) struct Row<'a>(pub &'a RecordBatch);

impl<'a> Row<'a> {
    fn col(&self, n: &str) -> &'a dyn Array {
        self.0
            .column_by_name(n)
            .unwrap_or_else(|| panic!("column {n} (schema checked at open)"))
            .as_ref()
    }
    /// The string at row `i` of column `n`, borrowed (no allocation per row).
    pub fn str_ref(&self, n: &str, i: usize) -> Option<&'a str> {
        let a = self.col(n).as_string::<i32>();
        a.is_valid(i).then(|| a.value(i))
    }
    pub fn str(&self, n: &str, i: usize) -> Option<String> {
        let a = self.col(n).as_string::<i32>();
        a.is_valid(i).then(|| a.value(i).to_string())
    }
    pub fn i64(&self, n: &str, i: usize) -> Option<i64> {
        let a = self.col(n).as_primitive::<Int64Type>();
        a.is_valid(i).then(|| a.value(i))
    }
    pub fn i32(&self, n: &str, i: usize) -> Option<i32> {
        let a = self.col(n).as_primitive::<Int32Type>();
        a.is_valid(i).then(|| a.value(i))
    }
    pub fn f64(&self, n: &str, i: usize) -> Option<f64> {
        let a = self.col(n).as_primitive::<Float64Type>();
        a.is_valid(i).then(|| a.value(i))
    }
    pub fn ts(&self, n: &str, i: usize) -> Option<i64> {
        let a = self.col(n).as_primitive::<TimestampMicrosecondType>();
        a.is_valid(i).then(|| a.value(i))
    }
    pub fn strs(&self, n: &str, i: usize) -> Vec<String> {
        let a = self.col(n).as_list::<i32>();
        if !a.is_valid(i) {
            return vec![];
        }
        let v = a.value(i);
        let s = v.as_string::<i32>();
        (0..s.len())
            .filter(|k| s.is_valid(*k))
            .map(|k| s.value(k).to_string())
            .collect()
    }
}
