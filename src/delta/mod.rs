//! The Delta layer: Delta Lake tables as possync uses them, knowing nothing of positions or
//! Kafka. What a table is (name, schema, partitions, protocol, properties, checks at open) is
//! given by a [`Spec`]; possync's catalogue implements it (`materialize::catalog`).
//!
//! Files, top-down:
//! - [`table`]: [`Table`]: opening (created on first use), refresh and catch-up, commits with
//!   their txn offsets, retries through delta-rs' conflict checker, checkpoints after commits;
//!   [`TableError`].
//! - [`read`]: reading a table back: its files, rows with deletion vectors applied, columns.
//! - [`txn`]: the txn actions (app id → version) as of a table version.
//! - [`dv`]: deletion vectors (Delta's roaring bitmaps, inline and on disk).
//! - [`maintain`]: checkpoint, compaction, vacuum and orphan listing of one table.
//! - [`storage`]: object-store probing and its errors (S3 access, endpoints).

pub mod dv;
pub mod maintain;
pub mod read;
pub mod storage;
pub mod table;
pub mod txn;

use deltalake::arrow::datatypes::SchemaRef;

pub use read::FileRef;
pub use table::APPEND_RETRIES;
pub use table::{append_operation, exists, path_of, rebased, remove_of, rewrite_operation, Table, TableError};

/// What a table is. The Delta layer asks it for everything that names a table's content.
pub trait Spec: Copy + Eq + std::fmt::Debug + Send + Sync + 'static {
    /// The table's directory name under the base URI (and its Delta name).
    fn name(self) -> &'static str;
    /// The table's Arrow schema (partition columns included).
    fn schema(self) -> SchemaRef;
    /// Partition columns, in order.
    fn partition_columns(self) -> Vec<String>;
    /// Table properties set at creation.
    fn configuration(self) -> Vec<(&'static str, &'static str)>;
    /// The protocol to create the table with (`None`: delta-rs' default, reader 1 / writer 2).
    fn protocol(self) -> Option<deltalake::kernel::Protocol>;
    /// Whether the table must allow deletion vectors (checked at open).
    fn deletion_vectors(self) -> bool;
    /// String columns whose values (nearly) never repeat within a file: written without a
    /// dictionary.
    fn unique_strings(self) -> &'static [&'static str] {
        &[]
    }
    /// Checks at open beyond schema and deletion vectors (for example a layout version).
    ///
    /// # Errors
    /// Whatever the check refuses.
    fn check_open(t: &Table<Self>, uri: &str) -> Result<(), TableError> {
        let _ = (t, uri);
        Ok(())
    }
    /// Called with the loaded version at open, after a refresh and after each commit.
    fn loaded(self, version: i64) {
        let _ = version;
    }
}
