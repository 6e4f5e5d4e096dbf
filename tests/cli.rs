//! The binary as a user runs it: the command-line surface, metrics, `possync run`'s
//! flags and output, and the operator commands. (`run_e2e.rs` and `run_restart.rs` are binaries
//! of their own: `possync::run::run` reads the process-wide metrics to know it caught up.)
//!
//! One test binary: each file under `tests/cli/` is a module (they were separate binaries;
//! every binary links deltalake and rdkafka, about 30 s each on the CI machine).

mod common;
mod materialize_support;

#[path = "cli/bench.rs"]
mod bench;
#[path = "cli/fills.rs"]
mod fills;
#[path = "cli/metrics.rs"]
mod metrics;
#[path = "cli/ops.rs"]
mod ops;
#[path = "cli/run.rs"]
mod run;
#[path = "cli/structure.rs"]
mod structure;
#[path = "cli/surface.rs"]
mod surface;
