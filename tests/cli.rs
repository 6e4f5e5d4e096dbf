//! The binary as a user runs it: the command-line surface, metrics, `possync run` (end to end and restarted) and the operator commands.
//!
//! One test binary: each file under `tests/cli/` is a module (they were separate binaries;
//! every binary links deltalake and rdkafka, about 30 s each on the CI machine).

mod common;
mod materialize_support;

#[path = "cli/metrics.rs"]
mod metrics;
#[path = "cli/ops.rs"]
mod ops;
#[path = "cli/run.rs"]
mod run;
#[path = "cli/run_e2e.rs"]
mod run_e2e;
#[path = "cli/run_restart.rs"]
mod run_restart;
#[path = "cli/surface.rs"]
mod surface;
