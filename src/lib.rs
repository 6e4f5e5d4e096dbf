//! possync: keeps Interactive Brokers positions in sync, event-sourced.
//!
//! IB positions flow `ingest` → Kafka (Avro) → `materialize` → Delta Lake tables. Contracts a
//! running strategy holds (the *strategy registry*) are streamed in real time under a hard
//! streaming-slot budget; the rest go through a durable *position queue* drained by the
//! `queue-worker` with snapshot polls that cost no slot.
//!
//! Modules, one job each:
//! - [`cli`]: flags and subcommands (`possync --help`), signal handling.
//! - [`schema`]: the Avro schemas of `schemas/`, embedded at build time.
//! - [`schema_registry`]: `--schema-registry-url`, ids from a Confluent-compatible registry.
//! - [`book`]: the position book (position keys, contracts, held positions) and how an IB
//!   position becomes a `PositionEvent`.
//! - [`events`]: `PositionEvent` / `RegistryEvent`, keys, Confluent wire encoding.
//! - [`executions`]: `ExecutionEvent` (a fill with its commission) and the commission join.
//! - [`kafka`]: broker flags, topics, producer/consumer settings, embedded broker.
//! - [`topics`]: `possync topics create | check` and the start-up check of every Kafka process.
//! - [`metrics`]: counters, gauges, `/metrics` endpoint, progress line.
//! - [`sim`]: the IB Gateway simulator (TWS protocol, protobuf era).
//! - [`ib`]: what ingest and the queue worker share of the `ibapi` client: buffer sizing, lag
//!   notices, the heartbeat.
//! - [`registry`]: the strategy registry, event-sourced from its compacted topic.
//! - [`ingest`]: IB positions → routed events on Kafka, within the streaming-slot budget.
//! - [`queue_worker`]: drains the position queue with snapshot polls (no streaming slot).
//! - [`snapshot`]: start-up of ingest and the queue worker from the Delta tables and the tail
//!   of the topics after the offsets they hold (no whole-topic replay).
//! - [`run`]: `possync run`, the whole pipeline in one process on the embedded default.
//! - [`ops`]: operator commands over brokers and tables: `status`, `book`, `rebuild`.
//! - [`reconcile`]: positions reconciled against fills (`possync reconcile`), position
//!   snapshots.
//! - [`scale`]: `possync bench scale`, the component benchmarks at desk size in one table.
//! - [`delta`]: the Delta layer (tables, commits with txn offsets, deletion vectors,
//!   maintenance, object-store probing), knowing nothing of positions or Kafka.
//! - [`materialize`]: Kafka topics → Delta tables (events, current positions, queue, registry,
//!   registry history, dead letters), exactly once; table maintenance and the materialize benchmark.
//!
//! Layers, bottom up; a module imports only from its own layer's leaves and those below (no
//! import circle anywhere in `src/`, checked by `tests/cli/structure.rs`):
//! 1. [`metrics`], [`schema`], [`events`], [`book`], [`kafka`], [`schema_registry`], [`sim`], [`ib`];
//! 2. [`delta`];
//! 3. [`executions`];
//! 4. [`materialize`] (inside it: the catalogue, the upsert engine, then consume and flush);
//! 5. [`ops`], [`registry`];
//! 6. [`snapshot`];
//! 7. [`ingest`], then [`queue_worker`];
//! 8. [`reconcile`], [`topics`], [`run`], [`scale`], [`cli`].

pub mod book;
pub mod cli;
pub mod delta;
pub mod events;
pub mod executions;
pub mod ib;
pub mod ingest;
pub mod kafka;
pub mod materialize;
pub mod metrics;
pub mod ops;
pub mod queue_worker;
pub mod reconcile;
pub mod registry;
pub mod run;
pub mod scale;
pub mod schema;
pub mod schema_registry;
pub mod sim;
pub mod snapshot;
pub mod topics;
