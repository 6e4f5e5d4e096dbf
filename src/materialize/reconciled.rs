//! The schemas of the two tables `possync reconcile` writes beside materialize's (issue 21):
//!
//! - `position_snapshots` (append-only, reader protocol 1, partitioned by `snapshot_date` and
//!   `snapshot_kind`): copies of the open positions of `positions_current`, one per snapshot.
//!   `snapshot_kind` is `day_start` for the first of each UTC day (the reconciliation's
//!   starting point, found from the partition alone) and `periodic` for the others.
//! - `reconciliation` (rewritten by every run, reader protocol 1): one row per (account,
//!   conId) that moved since the day's starting snapshot, with its status.
//!
//! Both are read by every Delta reader (no deletion vectors), so they are also the book for
//! readers that refuse `positions_current`'s deletion vectors.

use std::sync::Arc;

use deltalake::arrow::datatypes::{DataType, Field, Schema, SchemaRef};

use super::decode::timestamp_type;

/// The snapshot's date partition column.
pub const SNAPSHOT_DATE: &str = "snapshot_date";
/// The snapshot's kind partition column: [`DAY_START`] or [`PERIODIC`].
pub const SNAPSHOT_KIND: &str = "snapshot_kind";
/// The first snapshot of a UTC day.
pub const DAY_START: &str = "day_start";
/// Every other snapshot.
pub const PERIODIC: &str = "periodic";

/// The contract columns both tables carry (those a reader filters on and the explanations use).
fn contract_fields() -> Vec<Field> {
    vec![
        Field::new("account", DataType::Utf8, false),
        Field::new("con_id", DataType::Int64, false),
        Field::new("symbol", DataType::Utf8, false),
        Field::new("sec_type", DataType::Utf8, false),
        Field::new("local_symbol", DataType::Utf8, false),
        Field::new("expiry", DataType::Utf8, true),
        Field::new("right", DataType::Utf8, true),
        Field::new("multiplier", DataType::Float64, true),
    ]
}

/// `position_snapshots`.
pub fn snapshot_schema() -> SchemaRef {
    let mut f = vec![
        Field::new("snapshot_time", timestamp_type(), false),
        Field::new(SNAPSHOT_DATE, DataType::Date32, false),
        Field::new(SNAPSHOT_KIND, DataType::Utf8, false),
    ];
    f.extend(contract_fields());
    f.extend([
        Field::new("position", DataType::Float64, false),
        Field::new("avg_cost", DataType::Float64, false),
        // The `ingest_time` of the event the copied row comes from: what the position reflects.
        Field::new("as_of", timestamp_type(), false),
        // The `positions_current` version copied.
        Field::new("source_version", DataType::Int64, false),
    ]);
    Arc::new(Schema::new(f))
}

/// `reconciliation`.
pub fn reconciliation_schema() -> SchemaRef {
    let mut f = vec![Field::new("trade_date", DataType::Date32, false)];
    f.extend(contract_fields());
    f.extend([
        Field::new("start_position", DataType::Float64, false),
        Field::new("start_as_of", timestamp_type(), false),
        Field::new("filled", DataType::Float64, false),
        Field::new("fills", DataType::Int32, false),
        Field::new("now_position", DataType::Float64, false),
        Field::new("diff", DataType::Float64, false),
        Field::new("status", DataType::Utf8, false),
        Field::new("reason", DataType::Utf8, true),
        Field::new("drifted_since", timestamp_type(), true),
        Field::new("reconciled_at", timestamp_type(), false),
    ]);
    Arc::new(Schema::new(f))
}

/// Table properties of `position_snapshots`.
pub fn snapshot_configuration() -> Vec<(&'static str, &'static str)> {
    vec![
        ("delta.appendOnly", "true"),
        ("delta.deletedFileRetentionDuration", "interval 1 days"),
    ]
}
