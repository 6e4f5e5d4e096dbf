//! Ground truth the simulator exposes: its contracts, positions, PnL, streams
//! and clients, as Rust values ([`Truth`]) and as a JSON file kept current.

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
