//! The executions phases of `possync bench ingest` (issue 21): a desk's day of fills (default
//! 10k over the bench's accounts), each an execution with its commission report and a position
//! change, through ingest to the executions topic.
//!
//! - **Live**: the fills are made while ingest is connected (it is the simulator's master API
//!   client, so it gets every fill live), closed loop like the throughput phase (at most
//!   `--window` fills ahead of the committed executions, so no buffer overflows), timed until
//!   every execution and every position event is committed; with the whole process's CPU.
//! - **Catch-up**: a new trading day, then the gateway restarts (every connection dropped, the
//!   port refusing connections) and the same number of fills is made meanwhile, so only the
//!   day's list (`reqExecutions` at the next connect) brings them; timed from the port
//!   accepting again, and from ingest's request of the day's list, until every one is
//!   committed. The reconnect resyncs the book too, so that time includes the resync.
//!
//! Executions count when their transaction commits (`possync_executions_published_total`):
//! what a `read_committed` consumer can see, like the position events of the other phases.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use super::{cpu_seconds, published, wait_count, BenchError};
use crate::metrics;
use crate::sim::{SimError, SimHandle};

/// What the executions phases measured.
#[derive(Debug, Clone, Default)]
pub struct ExecFigures {
    /// Fills made in each phase (each one execution with its commission report).
    pub fills: u64,
    /// Live: executions committed on the executions topic.
    pub executions: u64,
    /// Live: position events committed in the same window (each fill changes a position).
    pub position_events: u64,
    /// Live: first fill → the last execution and position event committed, seconds.
    pub secs: f64,
    /// Live: CPU of the whole process (simulator and broker included) over that window.
    pub cpu_secs: f64,
    /// Catch-up: executions committed from the day's list.
    pub missed: u64,
    /// Catch-up: how long the fills took to make while the port refused connections.
    pub fill_secs: f64,
    /// Catch-up: the port accepting again → every missed execution committed, seconds.
    pub catchup_secs: f64,
    /// Catch-up: ingest's request of the day's executions → every one committed, seconds.
    pub catchup_from_request_secs: f64,
    /// Catch-up: reconnects it took.
    pub catchup_reconnects: u64,
}

impl ExecFigures {
    /// Live executions per second, first fill to committed.
    pub fn per_s(&self) -> f64 {
        self.executions as f64 / self.secs.max(1e-9)
    }

    /// Position events per second in the live phase.
    pub fn events_per_s(&self) -> f64 {
        self.position_events as f64 / self.secs.max(1e-9)
    }

    /// CPU-seconds of the whole process per 1,000 live executions (each with its position
    /// event).
    pub fn cpu_per_1k(&self) -> f64 {
        self.cpu_secs * 1e3 / (self.executions.max(1) as f64)
    }
}

fn executions() -> u64 {
    metrics::global().published_executions.load(Relaxed)
}

fn execution_requests() -> u64 {
    metrics::global().execution_requests.load(Relaxed)
}

/// Fill `k` of a phase: round-robin over `targets` (account, conId, sign of the position),
/// away from zero in even rounds and back in odd ones, so no position ever closes.
fn fill(sim: &SimHandle, targets: &[(String, i32, f64)], k: u64) -> Result<(), SimError> {
    let i = (k % targets.len() as u64) as usize;
    let round = k / targets.len() as u64;
    let (account, con_id, sign) = &targets[i];
    let delta = if round.is_multiple_of(2) { *sign } else { -*sign };
    sim.fill(account, *con_id, delta, false)?;
    Ok(())
}

/// Runs both phases: `n` fills live, then `n` made while ingest is disconnected. `targets`
/// are open positions; `reconnects` is ingest's reconnect count.
///
/// # Errors
/// A simulator error, or [`BenchError::Stalled`] when the executions stop coming.
pub(super) async fn run(
    sim: &SimHandle,
    targets: &[(String, i32, f64)],
    n: u64,
    window: u64,
    reconnects: &AtomicU64,
) -> Result<ExecFigures, BenchError> {
    let mut figures = ExecFigures {
        fills: n,
        ..Default::default()
    };
    if n == 0 || targets.is_empty() {
        return Ok(figures);
    }
    // Live, closed loop on the committed executions.
    eprintln!("making {n} fills (executions) live ...");
    let (e0, p0) = (executions(), published());
    let cpu0 = cpu_seconds();
    let t0 = Instant::now();
    let mut made = 0u64;
    while made < n {
        if e0 + made > executions() + window {
            tokio::time::sleep(Duration::from_micros(200)).await;
            continue;
        }
        fill(sim, targets, made)?;
        made += 1;
        if made.is_multiple_of(256) {
            tokio::task::yield_now().await;
        }
    }
    let stall = Duration::from_secs(60);
    wait_count(executions, e0, n, stall, "executions committed").await?;
    wait_count(published, p0, n, stall, "position events committed").await?;
    figures.secs = t0.elapsed().as_secs_f64();
    figures.cpu_secs = cpu_seconds() - cpu0;
    figures.executions = executions() - e0;
    figures.position_events = published() - p0;

    // Catch-up: a day's fills made while ingest is disconnected; the day's list brings them.
    // The new trading day leaves only these in the list.
    eprintln!("restarting the gateway and making {n} fills while it refuses connections ...");
    sim.new_trading_day();
    let (e1, q1, c1) = (executions(), execution_requests(), reconnects.load(Relaxed));
    // Long enough to make the fills (a few µs each) before ingest can reconnect.
    let refuse_for = Duration::from_secs(1) + Duration::from_micros(100) * u32::try_from(n).unwrap_or(u32::MAX);
    sim.restart(refuse_for).await?;
    let closed = Instant::now();
    for k in 0..n {
        // Continues the live phase's rounds: the positions keep alternating.
        fill(sim, targets, n + k)?;
        if k.is_multiple_of(1024) {
            tokio::task::yield_now().await;
        }
    }
    figures.fill_secs = closed.elapsed().as_secs_f64();
    if closed.elapsed() >= refuse_for {
        eprintln!(
            "warning: making the fills took {:.2} s, longer than the port refused connections ({refuse_for:?}); some went live",
            figures.fill_secs
        );
    }
    let open = closed + refuse_for;
    tokio::time::sleep_until(open.into()).await;
    wait_count(
        execution_requests,
        q1,
        1,
        Duration::from_secs(120),
        "requests of the day's executions",
    )
    .await?;
    let requested = Instant::now();
    // The day's list is two frames a fill (execution, commission report); a list longer than
    // ingest's IB buffer makes it reconnect with a larger one and ask again.
    let what = "missed executions committed";
    wait_count(executions, e1, n, stall, what).await?;
    figures.catchup_secs = open.elapsed().as_secs_f64();
    figures.catchup_from_request_secs = requested.elapsed().as_secs_f64();
    figures.missed = executions() - e1;
    figures.catchup_reconnects = reconnects.load(Relaxed) - c1;
    Ok(figures)
}
