//! The accept loop (with the restart fault: stop listening, refuse connections
//! for a while, listen again on the same address) and the background tasks:
//! random fills, price ticks, scheduled drops and restarts, fills while down,
//! option expiries and assignments, the truth file.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tokio::time::MissedTickBehavior;
use tracing::{info, warn};

use super::error::SimError;
use super::session;
use super::state::{lock, Shared};
use super::truth::write_truth_file;

/// How often the truth file is refreshed (only rewritten when it changed).
const TRUTH_FILE_PERIOD: Duration = Duration::from_millis(250);
/// How often [`spawn_day_roll`]'s task looks at the date.
const DAY_ROLL_CHECK: Duration = Duration::from_secs(10);
/// Attempts to listen again after a simulated restart, 100 ms apart.
const REBIND_ATTEMPTS: u32 = 50;

/// A request to simulate a gateway restart.
#[derive(Debug)]
pub struct RestartRequest {
    /// How long connections are refused.
    pub refuse_for: Duration,
    /// Answered once the listener is closed and every connection dropped.
    pub done: Option<oneshot::Sender<()>>,
}

/// Binds `addr` with `SO_REUSEADDR`, so a restart can listen on it again.
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

async fn rebind(addr: SocketAddr) -> Result<TcpListener, SimError> {
    let mut attempt = 0;
    loop {
        match bind(addr) {
            Ok(listener) => return Ok(listener),
            Err(source) if attempt + 1 >= REBIND_ATTEMPTS => return Err(SimError::Rebind { addr, source }),
            Err(_) => {
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Accepts connections on `listener` (bound to `addr`) until shutdown, serving
/// each in its own task, and carries out restart requests.
///
/// # Errors
/// [`SimError::Rebind`] when the address cannot be bound again after a restart.
pub async fn accept_loop(
    shared: Arc<Shared>,
    listener: TcpListener,
    addr: SocketAddr,
    mut restarts: mpsc::Receiver<RestartRequest>,
) -> Result<(), SimError> {
    let mut sessions = JoinSet::new();
    let mut listener = listener;
    loop {
        let restart = tokio::select! {
            biased;
            _ = shared.shutdown.cancelled() => break,
            Some(request) = restarts.recv() => request,
            Some(_) = sessions.join_next(), if !sessions.is_empty() => continue,
            accepted = listener.accept() => {
                match accepted {
                    Ok((socket, peer)) => {
                        let token = shared.connection_token();
                        let freeze = shared.freeze_token();
                        sessions.spawn(session::serve(shared.clone(), socket, peer, token, freeze));
                    }
                    Err(e) => {
                        // Out of file descriptors and the like: back off briefly.
                        warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
                continue;
            }
        };
        drop(listener);
        shared.drop_connections();
        info!(refuse_for = ?restart.refuse_for, "simulated gateway restart: connections dropped and refused");
        if let Some(done) = restart.done {
            let _ = done.send(());
        }
        tokio::select! {
            _ = shared.shutdown.cancelled() => break,
            _ = tokio::time::sleep(restart.refuse_for) => {}
        }
        listener = rebind(addr).await?;
        info!(%addr, "simulated gateway restart finished: accepting connections again");
    }
    shared.drop_connections();
    while sessions.join_next().await.is_some() {}
    Ok(())
}

/// Starts the background tasks `shared.config` asks for.
pub fn spawn_background(shared: &Arc<Shared>, restarts: &mpsc::Sender<RestartRequest>, tasks: &mut JoinSet<()>) {
    let config = &shared.config;
    if config.fill_rate > 0.0 && config.fill_rate.is_finite() {
        let period = Duration::from_secs_f64(1.0 / config.fill_rate);
        tasks.spawn(every(shared.clone(), period, |shared| {
            lock(&shared.world).random_fill();
        }));
    }
    if !config.price_tick.is_zero() {
        tasks.spawn(every(shared.clone(), config.price_tick, |shared| {
            lock(&shared.world).step_prices()
        }));
    }
    if let Some(period) = config.drop_every.filter(|p| !p.is_zero()) {
        tasks.spawn(every(shared.clone(), period, |shared| {
            info!("scheduled connection drop");
            shared.drop_connections();
        }));
    }
    if let Some(period) = config.freeze_every.filter(|p| !p.is_zero()) {
        tasks.spawn(every(shared.clone(), period, |shared| {
            info!("scheduled connection freeze");
            shared.freeze_connections();
        }));
    }
    if let Some(period) = config.restart_every.filter(|p| !p.is_zero()) {
        let restarts = restarts.clone();
        let refuse_for = config.restart_refuse_for;
        tasks.spawn(every(shared.clone(), period, move |_| {
            let request = RestartRequest { refuse_for, done: None };
            if restarts.try_send(request).is_err() {
                warn!("scheduled restart skipped: another restart is pending");
            }
        }));
    }
    if let Some(period) = config.fill_while_down_every.filter(|p| !p.is_zero()) {
        tasks.spawn(fill_while_down(shared.clone(), restarts.clone(), period));
    }
    if let Some(period) = config.expire_assign_every.filter(|p| !p.is_zero()) {
        tasks.spawn(every(shared.clone(), period, |shared| {
            if let Some(change) = lock(&shared.world).random_expiry() {
                info!(account = %change.account, con_id = change.contract.con_id, "scheduled option expiry/assignment (no execution)");
            }
        }));
    }
    if let Some(path) = config.truth_file.clone() {
        tasks.spawn(keep_truth_file(shared.clone(), path));
    }
}

/// Every `period`: a restart refusing connections for `restart_refuse_for`, and
/// one random fill while the port is closed.
async fn fill_while_down(shared: Arc<Shared>, restarts: mpsc::Sender<RestartRequest>, period: Duration) {
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let (done, finished) = oneshot::channel();
        let request = RestartRequest {
            refuse_for: shared.config.restart_refuse_for,
            done: Some(done),
        };
        if restarts.try_send(request).is_err() {
            warn!("scheduled fill while down skipped: another restart is pending");
            continue;
        }
        if finished.await.is_ok() {
            lock(&shared.world).random_fill();
            info!("scheduled fill while every connection is down");
        }
    }
}

/// A new trading day: the day's executions are forgotten (positions stay), as at a gateway's
/// daily reset.
pub fn new_trading_day(shared: &Shared) {
    info!("new trading day: executions cleared");
    lock(&shared.world).execs_mut().new_trading_day();
}

/// From now until shutdown, starts a new trading day whenever the UTC date changes.
pub fn spawn_day_roll(shared: &Arc<Shared>) {
    let mut day = chrono::Utc::now().date_naive();
    tokio::spawn(every(shared.clone(), DAY_ROLL_CHECK, move |shared| {
        let today = chrono::Utc::now().date_naive();
        if today != day {
            day = today;
            new_trading_day(shared);
        }
    }));
}

/// Runs `job` every `period` (first run after one period) until shutdown.
async fn every(shared: Arc<Shared>, period: Duration, mut job: impl FnMut(&Shared) + Send + 'static) {
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            _ = ticks.tick() => job(&shared),
        }
    }
}

/// Rewrites the truth file whenever the truth changed, until shutdown.
async fn keep_truth_file(shared: Arc<Shared>, path: PathBuf) {
    let mut last = None;
    let mut ticks = tokio::time::interval(TRUTH_FILE_PERIOD);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let truth = shared.truth();
        if last.as_ref() == Some(&truth) {
            continue;
        }
        match write_truth_file(&path, &truth).await {
            Ok(()) => last = Some(truth),
            Err(e) => warn!(path = %path.display(), error = %e, "cannot write the truth file"),
        }
    }
}
