//! Ground truth the simulator exposes: its contracts, positions, PnL, the day's
//! executions, streams and clients, as Rust values ([`Truth`]) and as a JSON
//! file kept current.

use std::path::Path;

use serde::{Deserialize, Serialize};

/// One contract of the simulated world, with every field IB sends for it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SimContract {
    /// IB contract id.
    pub con_id: i32,
    /// Underlying symbol.
    pub symbol: String,
    /// `STK` or `OPT`.
    pub sec_type: String,
    /// Expiry `YYYYMMDD` for options, empty for stocks.
    pub expiry: String,
    /// Strike for options, 0 for stocks.
    pub strike: f64,
    /// `C` or `P` for options, empty for stocks.
    pub right: String,
    /// 100 for options, 1 for stocks. On the wire stocks carry no multiplier,
    /// so `ibapi` shows `""` for them and `"100"` for options.
    pub multiplier: f64,
    /// Always `SMART`.
    pub exchange: String,
    /// Primary listing exchange of stocks; empty for options.
    pub primary_exchange: String,
    /// Always `USD`.
    pub currency: String,
    /// OCC symbol for options (`AAPL  260116C00150000`), the symbol for stocks.
    pub local_symbol: String,
    /// Trading class (the symbol).
    pub trading_class: String,
}

impl SimContract {
    /// Whether this is an option.
    pub fn is_option(&self) -> bool {
        self.sec_type == "OPT"
    }

    /// Whether this is an option whose expiry day (`YYYYMMDD`) is `today` or earlier: it no
    /// longer trades in the simulator, and IB may expire it.
    pub fn expired_by(&self, today: &str) -> bool {
        self.is_option() && self.expiry.as_str() <= today
    }

    /// The multiplier as `ibapi` renders it in `Contract::multiplier`.
    pub fn multiplier_text(&self) -> String {
        if self.is_option() {
            format!("{}", self.multiplier)
        } else {
            String::new()
        }
    }
}

/// One open position and its PnL figures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TruthPosition {
    /// Account holding it.
    pub account: String,
    /// The contract.
    pub contract: SimContract,
    /// Quantity; never 0 in [`Truth::positions`] (closed positions are absent).
    pub quantity: f64,
    /// Average cost per unit, multiplier included (IB's `avgCost`).
    pub avg_cost: f64,
    /// Current price of one unit (per share / per option, multiplier excluded).
    pub market_price: f64,
    /// `quantity * market_price * multiplier`.
    pub market_value: f64,
    /// `market_value - quantity * avg_cost`.
    pub unrealized_pnl: f64,
    /// PnL realized by reducing fills since the simulator started.
    pub realized_pnl: f64,
    /// PnL since the simulator started (market moves plus trading).
    pub daily_pnl: f64,
}

/// What the simulator knows about one client id, connected or not.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClientTruth {
    /// The client id.
    pub client_id: i32,
    /// Whether a session with this id is connected now.
    pub connected: bool,
    /// Sessions opened with this id so far.
    pub connections: u64,
    /// Real-time streams open now.
    pub streams: usize,
    /// Most real-time streams this id ever had open at once.
    pub max_streams: usize,
    /// Messages received in the last second.
    pub msgs_last_second: usize,
    /// Messages received in total.
    pub msgs_total: u64,
    /// Requests refused with error 100 (pacing).
    pub pacing_violations: u64,
    /// Requests refused with error 101 (stream cap).
    pub stream_cap_rejections: u64,
}

/// A snapshot of the simulator's ground truth.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Truth {
    /// Bumped on every position change; equal values mean equal positions.
    pub world_seq: u64,
    /// Open positions, sorted by (account, conId).
    pub positions: Vec<TruthPosition>,
    /// Every client id seen, sorted by id.
    pub clients: Vec<ClientTruth>,
    /// Real-time streams open now across all clients.
    pub streams_total: usize,
    /// Most real-time streams ever open at once across all clients.
    pub max_streams_total: usize,
    /// The trading day's executions in the order they happened, every version
    /// of a corrected one included (the correction after the execution it
    /// corrects). Emptied by [`SimHandle::new_trading_day`](super::SimHandle::new_trading_day).
    #[serde(default)]
    pub executions: Vec<TruthExecution>,
}

/// The commission report of one execution.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TruthCommission {
    /// The execution it belongs to.
    pub exec_id: String,
    /// Commissions and fees, positive (a cost).
    pub commission: f64,
    /// Currency of the commission (`USD`).
    pub currency: String,
    /// Realized PnL of the execution, commission deducted; `None` when it closed
    /// nothing (TWS sends `f64::MAX`, which `ibapi` turns into `None`).
    pub realized_pnl: Option<f64>,
}

/// One execution (one version of it, when corrected) as TWS reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TruthExecution {
    /// IB-style id `pppppppp.ssssssss.01.vv`; `vv` (`01`, `02`, ...) is the correction suffix.
    pub exec_id: String,
    /// The id of the version this one corrects, if it is a correction.
    pub corrects: Option<String>,
    /// Order id: 0, as for orders not placed through the API (entered in TWS).
    pub order_id: i32,
    /// TWS order id; shared by an execution and its corrections.
    pub perm_id: i64,
    /// Client id the order belongs to: the master client id, or 0 without one.
    pub client_id: i32,
    /// Account.
    pub account: String,
    /// The contract.
    pub contract: SimContract,
    /// `BOT` or `SLD`.
    pub side: String,
    /// Quantity, unsigned (shares or option contracts).
    pub shares: f64,
    /// Price per unit, multiplier and commission excluded.
    pub price: f64,
    /// Cumulative quantity of the order (each simulated fill is its own order: `shares`).
    pub cum_qty: f64,
    /// Average price of the order (`price`).
    pub avg_price: f64,
    /// Execution time as sent: `yyyymmdd hh:mm:ss UTC`.
    pub time: String,
    /// Milliseconds since the Unix epoch of `time` (for filters).
    pub time_ms: i64,
    /// Exchange the execution took place on.
    pub exchange: String,
    /// Its commission report.
    pub commission: TruthCommission,
    /// Whether the live commission report was sent before the execution (fault).
    pub commission_first: bool,
    /// Client ids it was delivered to live (`execDetails` with request id -1).
    pub delivered_to: Vec<i32>,
}

impl TruthExecution {
    /// The quantity signed as a position change: `+shares` bought, `-shares` sold.
    pub fn signed_shares(&self) -> f64 {
        if self.side == "SLD" {
            -self.shares
        } else {
            self.shares
        }
    }

    /// The id without its correction suffix: equal for an execution and its corrections.
    pub fn base_id(&self) -> &str {
        base_exec_id(&self.exec_id)
    }
}

/// `exec_id` without the correction suffix (the part after the last period).
pub fn base_exec_id(exec_id: &str) -> &str {
    exec_id.rsplit_once('.').map_or(exec_id, |(base, _)| base)
}

impl Truth {
    /// The open position of `account` in `con_id`, if any.
    pub fn position(&self, account: &str, con_id: i32) -> Option<&TruthPosition> {
        self.positions
            .iter()
            .find(|p| p.account == account && p.contract.con_id == con_id)
    }

    /// What is known about `client_id`, if it ever connected.
    pub fn client(&self, client_id: i32) -> Option<&ClientTruth> {
        self.clients.iter().find(|c| c.client_id == client_id)
    }

    /// The execution (version) with `exec_id`, if it happened today.
    pub fn execution(&self, exec_id: &str) -> Option<&TruthExecution> {
        self.executions.iter().find(|e| e.exec_id == exec_id)
    }

    /// The day's executions as they stand after corrections: the last version of
    /// each, in the order the executions first happened.
    pub fn effective_executions(&self) -> Vec<&TruthExecution> {
        let mut index = std::collections::HashMap::new();
        let mut out: Vec<&TruthExecution> = Vec::new();
        for e in &self.executions {
            match index.get(e.base_id()) {
                Some(&i) => out[i] = e,
                None => {
                    index.insert(e.base_id(), out.len());
                    out.push(e);
                }
            }
        }
        out
    }

    /// Client ids connected now.
    pub fn connected_clients(&self) -> Vec<i32> {
        self.clients
            .iter()
            .filter(|c| c.connected)
            .map(|c| c.client_id)
            .collect()
    }
}

/// Writes `truth` to `path` atomically: a sibling temp file, then a rename.
///
/// # Errors
/// The I/O error of the write or the rename.
pub async fn write_truth_file(path: &Path, truth: &Truth) -> std::io::Result<()> {
    let json = serde_json::to_vec_pretty(truth).map_err(std::io::Error::other)?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    tokio::fs::write(&tmp, json).await?;
    tokio::fs::rename(&tmp, path).await
}
