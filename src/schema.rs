//! The Avro schemas of `schemas/*.avsc`, embedded at build time so code and files cannot drift.
//!
//! The `.avsc` files are the contract with every Kafka consumer; this module parses them once
//! and hands out the parsed [`apache_avro::Schema`] together with the Confluent schema id that
//! each value is framed with (see [`crate::events`]): the fixed ids below, or, when the process
//! was started with `--schema-registry-url`, the ids that registry gave (see
//! [`crate::schema_registry`] and [`use_ids`]).

use std::sync::OnceLock;

use apache_avro::Schema;

/// Text of `schemas/position_event.avsc`.
pub const POSITION_EVENT_AVSC: &str = include_str!("../schemas/position_event.avsc");
/// Text of `schemas/registry_event.avsc`.
pub const REGISTRY_EVENT_AVSC: &str = include_str!("../schemas/registry_event.avsc");

/// Confluent wire-format schema id of `PositionEvent` (no schema registry is required; the ids
/// are fixed by this project and documented in the README).
pub const POSITION_EVENT_SCHEMA_ID: u32 = 1;
/// Confluent wire-format schema id of `RegistryEvent`.
pub const REGISTRY_EVENT_SCHEMA_ID: u32 = 2;

/// The Confluent schema ids one process frames and accepts values with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchemaIds {
    /// Id of `PositionEvent` (topics `positions.active` and `positions.queued`).
    pub position_event: u32,
    /// Id of `RegistryEvent` (topic `registry`).
    pub registry_event: u32,
}

impl SchemaIds {
    /// The fixed ids, used when no schema registry is configured.
    pub const FIXED: SchemaIds = SchemaIds {
        position_event: POSITION_EVENT_SCHEMA_ID,
        registry_event: REGISTRY_EVENT_SCHEMA_ID,
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
    S.get_or_init(|| {
        Schema::parse_str(POSITION_EVENT_AVSC).expect("schemas/position_event.avsc is valid Avro (checked by tests)")
    })
}

/// The parsed `RegistryEvent` schema.
pub fn registry_event() -> &'static Schema {
    static S: OnceLock<Schema> = OnceLock::new();
    S.get_or_init(|| {
        Schema::parse_str(REGISTRY_EVENT_AVSC).expect("schemas/registry_event.avsc is valid Avro (checked by tests)")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schemas_parse_and_have_expected_names() {
        assert_eq!(position_event().name().unwrap().name, "PositionEvent");
        assert_eq!(registry_event().name().unwrap().name, "RegistryEvent");
    }
}
