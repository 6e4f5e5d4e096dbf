//! Operator commands over the brokers and the Delta tables: `possync status`, `possync book`,
//! `possync fills`, `possync rebuild`, `possync migrate`.
//!
//! They sit beside `run`, over the same lower layers (`materialize`'s tables, offsets and upsert
//! folds, `kafka`), and never write a live table's rows: `status`, `book` and `fills` only read,
//! `rebuild` writes fresh tables under another base URI, `migrate` changes only the layout of
//! existing tables, one commit per step. Opening a table that does not exist is an error
//! here (the materializer's `Table::open` would create it, which a read-only command must not).

pub mod bench;
pub mod book;
pub mod fills;
pub mod migrate;
pub mod rebuild;
pub mod status;

use deltalake::arrow::array::{Array, AsArray, RecordBatch};
use deltalake::arrow::datatypes::{Float64Type, Int32Type, Int64Type, TimestampMicrosecondType};

use crate::materialize::tables::{Table, TableError};
use crate::materialize::TableKind;

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

pub use crate::materialize::tables::exists;

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
