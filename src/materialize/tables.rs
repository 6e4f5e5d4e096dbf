//! possync's tables on the Delta layer: [`Table`] is a [`crate::delta::Table`] of a
//! [`TableKind`] of the catalogue ([`super::catalog`]). The names the rest of materialize (and
//! the operator commands) use for the tables, in one place.

use deltalake::arrow::array::RecordBatch;

pub use super::catalog::{
    position_events_layout, positions_current_layout, registry_layout, TableKind, DEFAULT_TXN_RETENTION,
    TXN_RETENTION_PROPERTY,
};
pub use crate::delta::table::table_url;
pub use crate::delta::{
    append_operation, exists, path_of, rebased, remove_of, rewrite_operation, FileRef, TableError, APPEND_RETRIES,
};

/// One of possync's tables, open.
pub type Table = crate::delta::Table<TableKind>;

/// Reads a whole table under `base` (for tests, the bench and tools).
///
/// # Errors
/// Storage and parquet errors; [`TableError::SchemaChanged`].
pub async fn read_table(base: &str, kind: TableKind) -> Result<Vec<RecordBatch>, TableError> {
    Table::open(base, kind).await?.read_all().await
}

#[cfg(test)]
mod tests;
