//! The materializer against the embedded broker: exactness, crashes, dead letters, executions, groups, lost partitions, maintenance, the namespace guard, reassignment and txn retention.
//!
//! One test binary: each file under `tests/materialize/` is a module (they were separate binaries;
//! every binary links deltalake and rdkafka, about 30 s each on the CI machine).

mod materialize_support;

#[path = "materialize/basic.rs"]
mod basic;
#[path = "materialize/crash.rs"]
mod crash;
#[path = "materialize/deadletter.rs"]
mod deadletter;
#[path = "materialize/executions.rs"]
mod executions;
#[path = "materialize/group.rs"]
mod group;
#[path = "materialize/lost.rs"]
mod lost;
#[path = "materialize/maintain.rs"]
mod maintain;
#[path = "materialize/namespace.rs"]
mod namespace;
#[path = "materialize/reassign.rs"]
mod reassign;
#[path = "materialize/txn_retention.rs"]
mod txn_retention;
