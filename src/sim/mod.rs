//! IB Gateway simulator: speaks the TWS socket protocol `ibapi` 5.x requires
//! (server version 213+, protobuf messages) so the real client can connect to
//! it, with a seeded world of accounts, option and stock positions, fills (each
//! an execution with its commission report), PnL, and IB's limits and faults.
//!
//! Use it from the command line (`possync sim`, see [`SimArgs`] for every knob)
//! or in-process: [`start`] returns a [`SimHandle`] with the bound address, the
//! ground truth and fault triggers; [`run`] serves until a cancellation token fires.
//!
//! # Protocol
//! Handshake `API\0` + `v<min>..<max>` → `<version>\0<time>\0`; `StartApi` →
//! `NextValidId`, `ManagedAccounts` (comma-separated) and farm-status notices
//! 2104/2106/2158. Then:
//!
//! | request | answer |
//! |---|---|
//! | `reqPositions` / cancel | every open position, `PositionEnd`, then each change (quantity 0 = closed); a repeated request re-sends the list |
//! | `reqPositionsMulti` / cancel | the account's (or every account's) positions, `PositionMultiEnd`, then changes |
//! | `reqPnLSingle` / cancel | a `PnLSingle` tick at once and every `pnl_tick`; one real-time stream each |
//! | `reqExecutions` (filter: client id, account, time, symbol, sec type, exchange, side, specific dates) | the trading day's executions the client may see, each `execDetails` followed by its `commissionReport`, then `execDetailsEnd`; an unreadable filter gets error 321 |
//! | (no request) | every new execution live: `execDetails` with request id -1 and its `commissionReport` |
//! | `reqCurrentTime`, `reqCurrentTimeInMillis`, `reqManagedAccts`, `reqIds` | the answer |
//! | `reqMarketDataType`, `setServerLogLevel` | accepted silently |
//! | anything else | error 321 "Error validating request" naming the message id |
//!
//! # Executions
//! Every fill ([`SimHandle::apply_fill`], [`SimHandle::fill`], [`SimHandle::random_fill`], the
//! `fill_rate` task) is an execution: exec id `pppppppp.ssssssss.01.01` (the last part is the
//! correction suffix), order id 0 and a perm id of its own (each fill is one order, as if
//! entered in TWS), the order's client id, account, contract, side `BOT`/`SLD`, shares
//! (unsigned), the contract's current price, cumulative quantity and average price (the
//! fill's), time `yyyymmdd hh:mm:ss UTC`, exchange (`ISLAND`/`ARCA`/`NYSE` for stocks, `CBOE`
//! for options), and a commission report (USD 0.005 a share or 0.65 a contract, at least 1;
//! realized PnL net of commission when the fill closed something, else `f64::MAX`).
//!
//! The simulator's fills are not placed through the API: they belong to
//! `master_client_id` (TWS's "master API client ID" setting) when set, else to client id 0.
//! Live executions go to the order's client id and to the master client id; `reqExecutions`
//! returns a client its own orders' executions, and every execution to the master. `possync
//! run` sets no master until ingest reads executions (issue 21). Only the current trading day's executions
//! are kept: [`SimHandle::new_trading_day`] forgets them (positions stay), as TWS does at its
//! daily reset (`possync sim` and `possync run` call it at midnight UTC). [`Truth::executions`] lists them, every correction included, with their
//! commission reports and the client ids each was delivered to live.
//!
//! # Limits and faults
//! - more than `max_streams` concurrent PnL streams across all clients: error 101 on the request;
//! - more than `pacing_limit` messages in one second from a client: error 100 on the request, which is dropped (cancels pass);
//! - a second connection with a connected client id: error 326, then the socket closes;
//! - [`SimHandle::drop_connections`] and `drop_every`: every connection closes;
//! - [`SimHandle::freeze_connections`] and `freeze_every`: every connection stays open but answers and sends nothing until its client closes it;
//! - [`SimHandle::restart`] and `restart_every`: every connection closes and the port refuses connections for a while;
//! - [`SimHandle::send_notice`]: 1100 / 1101 / 1102 (1101 also ends the connection's PnL streams, as data was lost);
//! - a malformed frame (bad length prefix, bad handshake, undecodable protobuf) closes that connection only;
//! - a session more than 65,536 position changes (or 16,384 executions) behind is disconnected (its client reconnects and resyncs);
//! - `commission_first_rate` and [`SimHandle::fill`] with `commission_first`: a live commission report sent before its execution (`reqExecutions` answers always send the execution first);
//! - `correction_rate` and [`SimHandle::correct_execution`]: the same execution re-sent with its id suffix one higher (`.01` -> `.02`) and a new quantity (the position changes by the difference) or price, with its own commission report;
//! - `fill_while_down_every` and [`SimHandle::fill_while_disconnected`]: every connection dropped, the port refusing connections for a while, a fill meanwhile; only a later `reqExecutions` returns it;
//! - `expire_assign_every`, [`SimHandle::random_expiry`], [`SimHandle::expire`] and [`SimHandle::assign`]: an option position expires (to 0) or is assigned (closed, the stock position changed by ±100 a contract at the strike) with no execution, as at IB; the positions streams show the changes as usual. The random ones expire only options whose expiry day has come (`SimConfig::today`, `--world-date`, builds the world on an earlier day to hold some), and random fills never trade such options.

mod catalog;
mod config;
mod error;
mod executions;
mod frames;
mod proto;
mod server;
mod session;
mod state;
mod truth;
mod wire;
mod world;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;
use tracing::info;

pub use config::{SimArgs, SimConfig};
pub use error::SimError;
pub use truth::{ClientTruth, SimContract, Truth, TruthCommission, TruthExecution, TruthPosition};

use server::RestartRequest;
use state::{lock, Shared};
use world::World;

/// Runs the simulator until `shutdown` is cancelled: the `possync sim` entry
/// point. Prints the listening address on stdout.
///
/// # Errors
/// [`SimError`] when the address cannot be bound, the configuration is
/// unusable, the truth file cannot be written, or a task fails.
pub async fn run(config: SimConfig, shutdown: CancellationToken) -> Result<(), SimError> {
    let mut handle = start(config).await?;
    println!("possync sim listening on {}", handle.addr());
    handle.roll_trading_day_at_midnight();
    tokio::select! {
        _ = shutdown.cancelled() => handle.shutdown().await,
        result = handle.server_finished() => result,
    }
}

/// Starts the simulator in the background and returns its handle.
///
/// # Errors
/// [`SimError::Bind`] when `config.listen` cannot be bound,
/// [`SimError::InvalidConfig`] for an unusable world, [`SimError::TruthFile`]
/// when the truth file cannot be written.
pub async fn start(config: SimConfig) -> Result<SimHandle, SimError> {
    let world = World::new(&config)?;
    let listener = server::bind(config.listen).map_err(|source| SimError::Bind {
        addr: config.listen,
        source,
    })?;
    let addr = listener.local_addr().map_err(|source| SimError::Bind {
        addr: config.listen,
        source,
    })?;
    let shutdown = CancellationToken::new();
    let truth_file = config.truth_file.clone();
    let shared = Arc::new(Shared::new(config, world, shutdown.clone()));
    if let Some(path) = truth_file {
        truth::write_truth_file(&path, &shared.truth())
            .await
            .map_err(|source| SimError::TruthFile { path, source })?;
    }
    let (restarts, restart_rx) = mpsc::channel(4);
    let server = tokio::spawn(server::accept_loop(shared.clone(), listener, addr, restart_rx));
    let mut tasks = JoinSet::new();
    server::spawn_background(&shared, &restarts, &mut tasks);
    info!(%addr, "possync sim listening");
    Ok(SimHandle {
        shared,
        addr,
        restarts,
        server: Some(server),
        tasks,
    })
}

/// A running simulator. Dropping it stops the simulator (tasks are aborted);
/// [`SimHandle::shutdown`] stops it gracefully.
#[derive(Debug)]
pub struct SimHandle {
    shared: Arc<Shared>,
    addr: SocketAddr,
    restarts: mpsc::Sender<RestartRequest>,
    server: Option<JoinHandle<Result<(), SimError>>>,
    tasks: JoinSet<()>,
}

impl SimHandle {
    /// The address the simulator accepts connections on (the real port when
    /// the configuration asked for port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The configuration it runs with.
    pub fn config(&self) -> &SimConfig {
        &self.shared.config
    }

    /// The current ground truth: positions, streams, clients.
    pub fn truth(&self) -> Truth {
        self.shared.truth()
    }

    /// Every contract of the world: stocks first, then option chains.
    pub fn contracts(&self) -> Vec<SimContract> {
        lock(&self.shared.world).contracts().to_vec()
    }

    /// The accounts (`DU0000001`, ...).
    pub fn accounts(&self) -> Vec<String> {
        lock(&self.shared.world).accounts().to_vec()
    }

    /// Fills `qty_delta` (signed) of `con_id` in `account` at the current price
    /// and pushes the new position to position subscribers (quantity 0 when it
    /// closed); the fill is an execution of the day (see the module docs; the
    /// fault rates apply). Returns the position after the fill.
    ///
    /// # Errors
    /// [`SimError::UnknownAccount`] / [`SimError::UnknownContract`].
    pub fn apply_fill(&self, account: &str, con_id: i32, qty_delta: f64) -> Result<TruthPosition, SimError> {
        let mut world = lock(&self.shared.world);
        world.fill(account, con_id, qty_delta)?;
        Ok(world.position(account, con_id))
    }

    /// Sets the position of `con_id` in `account` outright (quantity 0 closes
    /// it) and pushes it to position subscribers. Its daily PnL restarts at 0.
    ///
    /// # Errors
    /// [`SimError::UnknownAccount`] / [`SimError::UnknownContract`].
    pub fn set_position(
        &self,
        account: &str,
        con_id: i32,
        quantity: f64,
        avg_cost: f64,
    ) -> Result<TruthPosition, SimError> {
        let mut world = lock(&self.shared.world);
        world.set_position(account, con_id, quantity, avg_cost)?;
        Ok(world.position(account, con_id))
    }

    /// Makes one seeded random fill (an execution) now, as the fill-rate task
    /// does, and returns the changed position.
    pub fn random_fill(&self) -> Option<TruthPosition> {
        let mut world = lock(&self.shared.world);
        let change = world.random_fill()?;
        Some(world.position(&change.account, change.contract.con_id))
    }

    /// One seeded random expiry (of an option whose expiry day has come) or assignment, with
    /// no execution, as the `expire_assign_every` task does; returns the option's position
    /// after it (`None` when no option is held).
    pub fn random_expiry(&self) -> Option<TruthPosition> {
        let mut world = lock(&self.shared.world);
        let change = world.random_expiry()?;
        Some(world.position(&change.account, change.contract.con_id))
    }

    /// Fills like [`SimHandle::apply_fill`] and returns the execution it made
    /// (`None` for a zero `qty_delta`). Its live commission report is sent
    /// before the execution when `commission_first` (the fault), after it otherwise.
    ///
    /// # Errors
    /// [`SimError::UnknownAccount`] / [`SimError::UnknownContract`].
    pub fn fill(
        &self,
        account: &str,
        con_id: i32,
        qty_delta: f64,
        commission_first: bool,
    ) -> Result<Option<TruthExecution>, SimError> {
        let mut world = lock(&self.shared.world);
        Ok(world.fill_exec(account, con_id, qty_delta, Some(commission_first))?.1)
    }

    /// Corrects today's execution `exec_id` (any version of it): the same
    /// execution re-sent live with the id suffix one higher (`.01` -> `.02`) and
    /// the new `shares` (unsigned, same side) and/or `price`, with its own
    /// commission report. A new quantity changes the position by the difference.
    /// Returns the correction.
    ///
    /// # Errors
    /// [`SimError::UnknownExecution`] / [`SimError::InvalidCorrection`].
    pub fn correct_execution(
        &self,
        exec_id: &str,
        shares: Option<f64>,
        price: Option<f64>,
    ) -> Result<TruthExecution, SimError> {
        lock(&self.shared.world).correct(exec_id, shares, price)
    }

    /// An execution while the clients are disconnected: every connection is
    /// closed and the port refuses connections for `refuse_for` (as
    /// [`SimHandle::restart`]); the fill happens while it refuses, so no client
    /// gets it live and a later `reqExecutions` returns it. Returns once filled.
    ///
    /// # Errors
    /// As [`SimHandle::restart`] and [`SimHandle::fill`].
    pub async fn fill_while_disconnected(
        &self,
        account: &str,
        con_id: i32,
        qty_delta: f64,
        refuse_for: Duration,
    ) -> Result<Option<TruthExecution>, SimError> {
        lock(&self.shared.world).check(account, con_id)?;
        self.restart(refuse_for).await?;
        self.fill(account, con_id, qty_delta, false)
    }

    /// Option expiry: `account`'s option `con_id` goes to 0 with no execution
    /// (IB reports expiries as position changes only). Returns the closed position.
    ///
    /// # Errors
    /// [`SimError::UnknownAccount`] / [`SimError::UnknownContract`] /
    /// [`SimError::NotAnOption`] / [`SimError::NoPosition`].
    pub fn expire(&self, account: &str, con_id: i32) -> Result<TruthPosition, SimError> {
        let mut world = lock(&self.shared.world);
        world.expire(account, con_id)?;
        Ok(world.position(account, con_id))
    }

    /// Option assignment (or exercise): `account`'s option `con_id` closes and
    /// the underlying stock position changes by `contracts × 100` (calls; the
    /// negative for puts) at the strike, with no execution. Returns the stock
    /// position after it.
    ///
    /// # Errors
    /// As [`SimHandle::expire`].
    pub fn assign(&self, account: &str, con_id: i32) -> Result<TruthPosition, SimError> {
        let mut world = lock(&self.shared.world);
        let (_, stock) = world.assign(account, con_id)?;
        Ok(world.position(account, stock.contract.con_id))
    }

    /// Starts a new trading day: the day's executions are gone (a
    /// `reqExecutions` returns none of them, as TWS after its daily reset) and
    /// [`Truth::executions`] is emptied; positions are kept.
    pub fn new_trading_day(&self) {
        server::new_trading_day(&self.shared);
    }

    /// From now on, a new trading day ([`SimHandle::new_trading_day`]) at every midnight UTC,
    /// as a gateway's daily reset; else a long-running simulator's truth file grows with every
    /// fill. `possync sim` and `possync run` call it; in-process tests roll only when told.
    pub fn roll_trading_day_at_midnight(&self) {
        server::spawn_day_roll(&self.shared);
    }

    /// Moves every price one random-walk step now.
    pub fn step_prices(&self) {
        lock(&self.shared.world).step_prices();
    }

    /// Closes every connection open now; clients may reconnect at once.
    pub fn drop_connections(&self) {
        info!("dropping every connection");
        self.shared.drop_connections();
    }

    /// Freezes every connection open now: each stays open but answers and sends nothing (a
    /// hung gateway, a dead NAT entry) until its client closes it; new connections are served.
    pub fn freeze_connections(&self) {
        info!("freezing every connection");
        self.shared.freeze_connections();
    }

    /// Simulates a gateway restart: every connection is closed and the port
    /// refuses connections for `refuse_for`, then accepts again. Returns once
    /// the port is closed and the connections dropped.
    ///
    /// # Errors
    /// [`SimError::Stopped`] when the simulator is not running.
    pub async fn restart(&self, refuse_for: Duration) -> Result<(), SimError> {
        let (done, finished) = oneshot::channel();
        let request = RestartRequest {
            refuse_for,
            done: Some(done),
        };
        self.restarts.send(request).await.map_err(|_| SimError::Stopped)?;
        finished.await.map_err(|_| SimError::Stopped)
    }

    /// Sends an IB notice with `code` (1100 lost, 1101 restored with data
    /// lost, 1102 restored with data kept, ...) to every connected client.
    /// Returns how many connections it reached.
    pub fn send_notice(&self, code: i32) -> usize {
        info!(code, "sending notice to every client");
        self.shared.notices.send(code).unwrap_or(0)
    }

    /// Stops the simulator: closes every connection and the port, ends the
    /// background tasks, and writes the final truth file (when one is kept),
    /// so the last changes are never missing from it.
    ///
    /// # Errors
    /// The accept loop's error, or [`SimError::TruthFile`] when the final
    /// truth file cannot be written.
    pub async fn shutdown(&mut self) -> Result<(), SimError> {
        self.shared.shutdown.cancel();
        while self.tasks.join_next().await.is_some() {}
        if let Some(path) = self.shared.config.truth_file.clone() {
            let result = truth::write_truth_file(&path, &self.truth()).await;
            result.map_err(|source| SimError::TruthFile { path, source })?;
        }
        match self.server.take() {
            Some(server) => server.await?,
            None => Ok(()),
        }
    }

    /// Resolves when the accept loop ends on its own (a failed restart).
    async fn server_finished(&mut self) -> Result<(), SimError> {
        match self.server.as_mut() {
            Some(server) => {
                let result = server.await;
                self.server = None;
                result?
            }
            None => std::future::pending().await,
        }
    }
}

impl Drop for SimHandle {
    fn drop(&mut self) {
        self.shared.shutdown.cancel();
        self.tasks.abort_all();
        if let Some(server) = &self.server {
            server.abort();
        }
    }
}
