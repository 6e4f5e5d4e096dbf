//! Executions (fills) and their commission reports: what made each position (issue 21).
//!
//! - [`event`]: [`ExecutionEvent`], its Kafka key and Avro / Confluent encoding, and IB's
//!   execution ids (stem and correction revision).
//! - [`join`]: joins commission reports to their executions whatever the order of arrival,
//!   and publishes each execution (or correction) once per exec id.

pub mod event;
pub mod ib;
pub mod join;

pub use event::{ExecSource, ExecutionEvent, Side};
