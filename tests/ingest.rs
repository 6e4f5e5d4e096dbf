//! The ingest side against the IB simulator and the embedded broker: routing, executions, faults, fencing, liveness, slots, snapshots, the queue worker and replay faults.
//!
//! One test binary: each file under `tests/ingest/` is a module (they were separate binaries;
//! every binary links deltalake and rdkafka, about 30 s each on the CI machine).

mod common;
mod ingest_support;

#[path = "ingest/basic.rs"]
mod basic;
#[path = "ingest/executions.rs"]
mod executions;
#[path = "ingest/faults.rs"]
mod faults;
#[path = "ingest/fencing.rs"]
mod fencing;
#[path = "ingest/liveness.rs"]
mod liveness;
#[path = "ingest/queue_worker.rs"]
mod queue_worker;
#[path = "ingest/reconcile.rs"]
mod reconcile;
#[path = "ingest/replay_faults.rs"]
mod replay_faults;
#[path = "ingest/slots.rs"]
mod slots;
#[path = "ingest/snapshot.rs"]
mod snapshot;
