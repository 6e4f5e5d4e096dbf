//! possync's table catalogue: the tables materialize writes ([`TableKind`]), each one's name,
//! schema, partition columns, protocol and properties, and the decoding layouts of the rows the
//! Kafka events become. The Delta layer ([`super::tables`]) opens, creates and commits them.

use std::sync::{Arc, OnceLock};

use deltalake::arrow::datatypes::{DataType, Field, Fields, Schema as ArrowSchema, SchemaRef};

use super::decode::{kafka_fields, list_element, timestamp_type, Layout, RecordPlan, EVENT_DATE};
use crate::schema;

/// The tables materialize writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TableKind {
    /// Append-only audit log of every position event, partitioned by `event_date`.
    PositionEvents,
    /// Latest state per (account, con_id).
    PositionsCurrent,
    /// Queue state per (account, con_id).
    PositionQueue,
    /// Current registry per (strategy, account, con_id).
    StrategyRegistry,
    /// Append-only undecodable / invalid messages.
    DeadLetters,
    /// Append-only audit trail of every registry event (the compacted topic forgets).
    RegistryEvents,
    /// Append-only executions (fills with commissions), partitioned by `event_date` (of
    /// `exec_time`); see [`super::executions`].
    Executions,
    /// Append-only copies of the open book, written by `possync reconcile` (not materialize);
    /// see [`super::reconciled`].
    PositionSnapshots,
    /// The reconciliation of positions against fills, rewritten by `possync reconcile`.
    Reconciliation,
}

impl TableKind {
    /// Every table materialize writes (the reconcile tables are [`TableKind::RECONCILE`]).
    pub const ALL: [TableKind; 7] = [
        TableKind::PositionEvents,
        TableKind::PositionsCurrent,
        TableKind::PositionQueue,
        TableKind::StrategyRegistry,
        TableKind::DeadLetters,
        TableKind::RegistryEvents,
        TableKind::Executions,
    ];

    /// The tables `possync reconcile` writes.
    pub const RECONCILE: [TableKind; 2] = [TableKind::PositionSnapshots, TableKind::Reconciliation];

    /// Directory name below the base URI.
    pub fn name(self) -> &'static str {
        match self {
            TableKind::PositionEvents => "position_events",
            TableKind::PositionsCurrent => "positions_current",
            TableKind::PositionQueue => "position_queue",
            TableKind::StrategyRegistry => "strategy_registry",
            TableKind::DeadLetters => "dead_letters",
            TableKind::RegistryEvents => "registry_events",
            TableKind::Executions => "executions",
            TableKind::PositionSnapshots => "position_snapshots",
            TableKind::Reconciliation => "reconciliation",
        }
    }

    /// Append-only tables (compacted by `maintain`; others are rewritten on every commit).
    pub fn append_only(self) -> bool {
        matches!(
            self,
            TableKind::PositionEvents
                | TableKind::DeadLetters
                | TableKind::RegistryEvents
                | TableKind::Executions
                | TableKind::PositionSnapshots
        )
    }

    /// Tables whose superseded rows are marked by deletion vectors (the upsert tables).
    pub fn deletion_vectors(self) -> bool {
        matches!(self, TableKind::PositionsCurrent | TableKind::PositionQueue)
    }

    /// Partition columns.
    pub fn partition_columns(self) -> Vec<String> {
        match self {
            TableKind::PositionEvents | TableKind::Executions => vec![EVENT_DATE.to_string()],
            TableKind::PositionSnapshots => vec![
                super::reconciled::SNAPSHOT_DATE.to_string(),
                super::reconciled::SNAPSHOT_KIND.to_string(),
            ],
            _ => vec![],
        }
    }

    /// The Arrow schema of the table.
    pub fn schema(self) -> SchemaRef {
        match self {
            TableKind::PositionEvents => position_events_layout().schema.clone(),
            TableKind::PositionsCurrent => positions_current_layout().schema.clone(),
            TableKind::PositionQueue => queue_schema(),
            TableKind::StrategyRegistry => registry_schema(),
            TableKind::DeadLetters => dead_letter_schema(),
            // The decoded registry rows as they are: event fields + Kafka coordinates.
            TableKind::RegistryEvents => registry_layout().schema.clone(),
            TableKind::Executions => super::executions::layout().schema.clone(),
            TableKind::PositionSnapshots => super::reconciled::snapshot_schema(),
            TableKind::Reconciliation => super::reconciled::reconciliation_schema(),
        }
    }

    pub(super) fn configuration(self) -> Vec<(&'static str, &'static str)> {
        let mut c = self.own_configuration();
        // Txn actions of app ids not written for this long are dropped (from checkpoints, and
        // ignored on reading): dead namespaces fade out. A live partition is re-stamped long
        // before (see `flush::Pipeline::restamp` and docs/materialize.md).
        c.push((TXN_RETENTION_PROPERTY, DEFAULT_TXN_RETENTION));
        c.push((super::layout::LAYOUT_PROPERTY, super::layout::CURRENT_TEXT));
        c
    }

    /// The protocol of tables with deletion vectors: reader 3 / writer 7 with that feature
    /// alone (delta-rs would otherwise carry writer-2 `invariants` into the feature list, which
    /// it cannot write without DataFusion). `None`: delta-rs' default (reader 1 / writer 2).
    pub(super) fn protocol(self) -> Option<deltalake::kernel::Protocol> {
        if !self.deletion_vectors() {
            return None;
        }
        let p = serde_json::json!({
            "minReaderVersion": 3,
            "minWriterVersion": 7,
            "readerFeatures": ["deletionVectors"],
            "writerFeatures": ["deletionVectors"],
        });
        Some(serde_json::from_value(p).expect("a valid protocol action"))
    }

    fn own_configuration(self) -> Vec<(&'static str, &'static str)> {
        match self {
            TableKind::PositionEvents => {
                vec![
                    ("delta.appendOnly", "true"),
                    ("delta.deletedFileRetentionDuration", "interval 1 days"),
                ]
            }
            // No statistics on the raw key / value bytes (binary columns get none anyway).
            TableKind::DeadLetters => vec![
                ("delta.appendOnly", "true"),
                ("delta.deletedFileRetentionDuration", "interval 1 days"),
                (
                    "delta.dataSkippingStatsColumns",
                    "kafka_namespace,kafka_topic,kafka_partition,kafka_offset,kafka_timestamp,error,dead_lettered_at",
                ),
            ],
            TableKind::RegistryEvents => vec![
                ("delta.appendOnly", "true"),
                ("delta.deletedFileRetentionDuration", "interval 1 days"),
            ],
            TableKind::Executions => super::executions::configuration(),
            TableKind::PositionSnapshots => super::reconciled::snapshot_configuration(),
            // Superseded rows are marked deleted by deletion vectors (see `upsert::core`).
            TableKind::PositionsCurrent | TableKind::PositionQueue => vec![
                ("delta.enableDeletionVectors", "true"),
                ("delta.deletedFileRetentionDuration", "interval 1 hours"),
            ],
            // Rewritten on every commit: keep tombstones (and checkpoints) small.
            _ => vec![("delta.deletedFileRetentionDuration", "interval 1 hours")],
        }
    }
}

/// The Delta property that bounds how long a txn action (a partition's stored offset) lives
/// without being written again.
pub const TXN_RETENTION_PROPERTY: &str = "delta.setTransactionRetentionDuration";
/// What every table is created with (see docs/materialize.md, "Txn retention").
pub const DEFAULT_TXN_RETENTION: &str = "interval 30 days";

/// Decoding layout of `PositionEvent` rows for `position_events` (with `event_date`).
pub fn position_events_layout() -> &'static Arc<Layout> {
    static L: OnceLock<Arc<Layout>> = OnceLock::new();
    L.get_or_init(|| Arc::new(Layout::new(position_plan(), Some("ingest_time"))))
}

/// Layout of `positions_current` rows (a `position_events` row without `event_date`).
pub fn positions_current_layout() -> &'static Arc<Layout> {
    static L: OnceLock<Arc<Layout>> = OnceLock::new();
    L.get_or_init(|| Arc::new(Layout::new(position_plan(), None)))
}

/// Decoding layout of `RegistryEvent` rows: the schema of `registry_events`, and folded into
/// `strategy_registry`.
pub fn registry_layout() -> &'static Arc<Layout> {
    static L: OnceLock<Arc<Layout>> = OnceLock::new();
    L.get_or_init(|| {
        let plan = RecordPlan::from_schema(schema::registry_event(), schema::ids().registry_event)
            .expect("schemas/registry_event.avsc is a flat record");
        Arc::new(Layout::new(plan, None))
    })
}

fn position_plan() -> RecordPlan {
    RecordPlan::from_schema(schema::position_event(), schema::ids().position_event)
        .expect("schemas/position_event.avsc is a flat record")
}

fn registry_schema() -> SchemaRef {
    Arc::new(ArrowSchema::new(vec![
        Field::new("strategy", DataType::Utf8, false),
        Field::new("account", DataType::Utf8, true),
        Field::new("con_id", DataType::Int64, false),
        Field::new("active", DataType::Boolean, false),
        Field::new("priority", DataType::Int32, false),
        Field::new("updated_at", timestamp_type(), false),
        Field::new("actor", DataType::Utf8, false),
        Field::new("event_id", DataType::Utf8, false),
    ]))
}

fn dead_letter_schema() -> SchemaRef {
    let mut fields: Vec<Field> = kafka_fields().into();
    fields.extend([
        Field::new("kafka_key", DataType::Binary, true),
        Field::new("value", DataType::Binary, true),
        Field::new("error", DataType::Utf8, false),
        Field::new("dead_lettered_at", timestamp_type(), false),
    ]);
    Arc::new(ArrowSchema::new(fields))
}

/// The fields of one entry of `position_queue.partition_counts`.
pub fn queue_count_fields() -> Fields {
    Fields::from(vec![
        Field::new("partition", DataType::Int32, false),
        Field::new("queued_events", DataType::Int64, false),
        Field::new("refresh_count", DataType::Int64, false),
    ])
}

fn queue_counts_type() -> DataType {
    DataType::List(list_element(DataType::Struct(queue_count_fields())))
}

/// The Arrow schema of `position_queue`.
pub fn queue_schema() -> SchemaRef {
    let ts = timestamp_type;
    Arc::new(ArrowSchema::new(vec![
        Field::new("account", DataType::Utf8, false),
        Field::new("con_id", DataType::Int64, false),
        Field::new("status", DataType::Utf8, false),
        Field::new("enqueued_at", ts(), true),
        Field::new("last_refreshed_at", ts(), true),
        Field::new("refresh_count", DataType::Int64, false),
        Field::new("queued_events", DataType::Int64, false),
        Field::new("partition_counts", queue_counts_type(), false),
        Field::new("last_event_id", DataType::Utf8, true),
        Field::new("last_source", DataType::Utf8, true),
        Field::new("last_event_at", ts(), true),
        Field::new("last_session_id", DataType::Utf8, true),
        Field::new("last_sequence", DataType::Int64, true),
        Field::new("position", DataType::Float64, true),
        Field::new("avg_cost", DataType::Float64, true),
        Field::new("last_active_at", ts(), true),
        Field::new("updated_at", ts(), false),
    ]))
}

impl crate::delta::Spec for TableKind {
    fn name(self) -> &'static str {
        TableKind::name(self)
    }
    fn schema(self) -> SchemaRef {
        TableKind::schema(self)
    }
    fn partition_columns(self) -> Vec<String> {
        TableKind::partition_columns(self)
    }
    fn configuration(self) -> Vec<(&'static str, &'static str)> {
        TableKind::configuration(self)
    }
    fn protocol(self) -> Option<deltalake::kernel::Protocol> {
        TableKind::protocol(self)
    }
    fn deletion_vectors(self) -> bool {
        TableKind::deletion_vectors(self)
    }
    /// Unique values (event ids, contract symbols, exec ids) gain nothing from a dictionary
    /// but the hashing: in a catch-up flush at 100k keys that interning took about 6% of the
    /// materializer's CPU.
    fn unique_strings(self) -> &'static [&'static str] {
        &["event_id", "local_symbol", "exec_id", "exec_stem"]
    }
    fn check_open(t: &crate::delta::Table<Self>, uri: &str) -> Result<(), crate::delta::TableError> {
        super::layout::check_open(t, uri)
    }
    /// Raises the `possync_table_version` gauge of this table (if it has one): at open, after a
    /// refresh and after each commit, so a restarted materializer reports the table's version
    /// before its first commit.
    fn loaded(self, version: i64) {
        let m = crate::metrics::global();
        let gauge = match self {
            TableKind::PositionEvents => &m.table_version_events,
            TableKind::PositionsCurrent => &m.table_version_current,
            TableKind::PositionQueue => &m.table_version_queue,
            _ => return,
        };
        gauge.fetch_max(version, std::sync::atomic::Ordering::Relaxed);
    }
}
