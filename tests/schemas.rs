//! The event contracts: the Avro schemas, their evolution, the schema registry and upgrades from an earlier release.
//!
//! One test binary: each file under `tests/schemas/` is a module (they were separate binaries;
//! every binary links deltalake and rdkafka, about 30 s each on the CI machine).

mod common;
mod materialize_support;

#[path = "schemas/avro.rs"]
mod avro;
#[path = "schemas/evolution.rs"]
mod evolution;
#[path = "schemas/registry.rs"]
mod registry;
#[path = "schemas/upgrade.rs"]
mod upgrade;
