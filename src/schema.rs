//! The Avro schemas of `schemas/*.avsc`, embedded at build time so code and files cannot drift.
//!
//! The `.avsc` files are the contract with every Kafka consumer; this module parses them once
//! and hands out the parsed [`apache_avro::Schema`] together with the Confluent schema id that
//! each value is framed with (see [`crate::events`]): the fixed ids below, or, when the process
//! was started with `--schema-registry-url`, the ids that registry gave (see
//! [`crate::schema_registry`] and [`use_ids`]).

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, OnceLock, RwLock};

use apache_avro::Schema;

/// Text of `schemas/position_event.avsc`.
pub const POSITION_EVENT_AVSC: &str = include_str!("../schemas/position_event.avsc");
/// Text of `schemas/registry_event.avsc`.
pub const REGISTRY_EVENT_AVSC: &str = include_str!("../schemas/registry_event.avsc");
/// Text of `schemas/execution_event.avsc`.
pub const EXECUTION_EVENT_AVSC: &str = include_str!("../schemas/execution_event.avsc");

/// Confluent wire-format schema id of `PositionEvent` (no schema registry is required; the ids
/// are fixed by this project and documented in the README).
pub const POSITION_EVENT_SCHEMA_ID: u32 = 1;
/// Confluent wire-format schema id of `RegistryEvent`.
pub const REGISTRY_EVENT_SCHEMA_ID: u32 = 2;
/// Confluent wire-format schema id of `ExecutionEvent`.
pub const EXECUTION_EVENT_SCHEMA_ID: u32 = 3;

/// The Confluent schema ids one process frames and accepts values with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchemaIds {
    /// Id of `PositionEvent` (topics `positions.active` and `positions.queued`).
    pub position_event: u32,
    /// Id of `RegistryEvent` (topic `registry`).
    pub registry_event: u32,
    /// Id of `ExecutionEvent` (topic `executions`).
    pub execution_event: u32,
}

impl SchemaIds {
    /// The fixed ids, used when no schema registry is configured.
    pub const FIXED: SchemaIds = SchemaIds {
        position_event: POSITION_EVENT_SCHEMA_ID,
        registry_event: REGISTRY_EVENT_SCHEMA_ID,
        execution_event: EXECUTION_EVENT_SCHEMA_ID,
    };
}

static IDS: OnceLock<SchemaIds> = OnceLock::new();

/// The ids of this process: those given to [`use_ids`], else [`SchemaIds::FIXED`].
pub fn ids() -> SchemaIds {
    IDS.get().copied().unwrap_or(SchemaIds::FIXED)
}

/// Frames and accepts values with `ids` (a schema registry's) for the rest of the process.
/// Call it at start-up, before anything is encoded or decoded.
///
/// # Errors
/// The ids already in use, when they differ from `ids` (one process, one set of ids).
pub fn use_ids(ids: SchemaIds) -> Result<(), SchemaIds> {
    let set = *IDS.get_or_init(|| ids);
    if set == ids {
        Ok(())
    } else {
        Err(set)
    }
}

/// The parsed `PositionEvent` schema.
pub fn position_event() -> &'static Schema {
    static S: OnceLock<Schema> = OnceLock::new();
    parsed(&S, POSITION_EVENT_AVSC)
}

/// The parsed `RegistryEvent` schema.
pub fn registry_event() -> &'static Schema {
    static S: OnceLock<Schema> = OnceLock::new();
    parsed(&S, REGISTRY_EVENT_AVSC)
}

/// The parsed `ExecutionEvent` schema.
pub fn execution_event() -> &'static Schema {
    static S: OnceLock<Schema> = OnceLock::new();
    parsed(&S, EXECUTION_EVENT_AVSC)
}

/// `text` (one of the embedded `.avsc` files) parsed once into `cell`.
fn parsed(cell: &'static OnceLock<Schema>, text: &str) -> &'static Schema {
    cell.get_or_init(|| Schema::parse_str(text).expect("the embedded schemas/*.avsc are valid Avro (checked by tests)"))
}

/// Which record type a schema is a version of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Record {
    /// `possync.PositionEvent` (the position topics).
    PositionEvent,
    /// `possync.RegistryEvent` (the registry topic).
    RegistryEvent,
    /// `possync.ExecutionEvent` (the executions topic).
    ExecutionEvent,
}

impl Record {
    /// Every record.
    pub const ALL: [Record; 3] = [Record::PositionEvent, Record::RegistryEvent, Record::ExecutionEvent];

    /// The record's name in the schemas.
    pub fn name(self) -> &'static str {
        match self {
            Record::PositionEvent => "PositionEvent",
            Record::RegistryEvent => "RegistryEvent",
            Record::ExecutionEvent => "ExecutionEvent",
        }
    }

    /// This build's schema of the record (the reader schema of every decode).
    pub fn schema(self) -> &'static Schema {
        match self {
            Record::PositionEvent => position_event(),
            Record::RegistryEvent => registry_event(),
            Record::ExecutionEvent => execution_event(),
        }
    }

    /// The id this process frames the record with.
    pub fn id(self) -> u32 {
        match self {
            Record::PositionEvent => ids().position_event,
            Record::RegistryEvent => ids().registry_event,
            Record::ExecutionEvent => ids().execution_event,
        }
    }
}

/// A schema that values were written with: any version of one of the records, named by the id
/// in their Confluent frame.
#[derive(Debug)]
pub struct Writer {
    /// The id in the frames.
    pub id: u32,
    /// Which record it is a version of.
    pub record: Record,
    /// The parsed schema.
    pub schema: Schema,
}

/// Earlier versions of the schemas, read by the fixed id they were published with: when a
/// schema changes, its previous text moves here with its id and the new text takes a new fixed
/// id. Empty while no release has changed a schema (cc788eb published ids 1 and 2, as now).
const EARLIER: &[(u32, Record, &str)] = &[];

/// Writer schemas learned at run time (from a schema registry), by id.
static LEARNED: LazyLock<RwLock<HashMap<u32, Arc<Writer>>>> = LazyLock::new(Default::default);

/// Why a writer schema cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum WriterError {
    /// The text is not an Avro schema.
    #[error("schema id {id} is not a valid Avro schema: {reason}")]
    Invalid { id: u32, reason: String },
    /// A schema of another record (not one of possync's events).
    #[error("schema id {id} is a {found:?}, not a version of a possync event (PositionEvent, RegistryEvent, ExecutionEvent)")]
    Foreign { id: u32, found: String },
}

/// The writer schema of `id`, if this process knows it: this build's own schemas under the
/// ids in use, the [`EARLIER`] versions under their fixed ids, and any [`learn`]ed one.
pub fn writer(id: u32) -> Option<Arc<Writer>> {
    if let Some(w) = LEARNED.read().unwrap_or_else(|e| e.into_inner()).get(&id) {
        return Some(w.clone());
    }
    if let Some(record) = Record::ALL.into_iter().find(|r| r.id() == id) {
        return Some(Arc::new(Writer {
            id,
            record,
            schema: record.schema().clone(),
        }));
    }
    if uses_registry() {
        return None;
    }
    let (_, record, text) = EARLIER.iter().find(|(i, _, _)| *i == id)?;
    let schema = Schema::parse_str(text).expect("an earlier schema of this build is valid Avro");
    Some(Arc::new(Writer {
        id,
        record: *record,
        schema,
    }))
}

/// Whether a value framed with `id` can be decoded without asking anyone (the hot-path check
/// before [`crate::schema_registry::learn`]).
pub fn knows(id: u32) -> bool {
    Record::ALL.iter().any(|r| r.id() == id)
        || LEARNED.read().unwrap_or_else(|e| e.into_inner()).contains_key(&id)
        || (!uses_registry() && EARLIER.iter().any(|(i, _, _)| *i == id))
}

/// Records `text` as the writer schema of `id` (a schema registry's answer).
///
/// # Errors
/// [`WriterError`] when it is not Avro or not a version of one of the records.
pub fn learn(id: u32, text: &str) -> Result<Arc<Writer>, WriterError> {
    let schema = Schema::parse_str(text).map_err(|e| WriterError::Invalid {
        id,
        reason: e.to_string(),
    })?;
    let found = schema.name().map(|n| n.name.clone()).unwrap_or_default();
    let record = Record::ALL
        .into_iter()
        .find(|r| r.name() == found)
        .ok_or(WriterError::Foreign { id, found })?;
    let w = Arc::new(Writer { id, record, schema });
    LEARNED.write().unwrap_or_else(|e| e.into_inner()).insert(id, w.clone());
    Ok(w)
}

/// Ids are a schema registry's (then the fixed ids of [`EARLIER`] mean nothing).
fn uses_registry() -> bool {
    IDS.get().is_some_and(|i| *i != SchemaIds::FIXED)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schemas_parse_and_have_expected_names() {
        assert_eq!(position_event().name().unwrap().name, "PositionEvent");
        assert_eq!(registry_event().name().unwrap().name, "RegistryEvent");
        assert_eq!(execution_event().name().unwrap().name, "ExecutionEvent");
    }
}
