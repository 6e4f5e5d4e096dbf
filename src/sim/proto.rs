//! Protobuf messages the simulator reads and writes, hand-written with the same
//! field tags as `ibapi` 5.5's private `src/proto/protobuf.rs` (IB's own `.proto`).
//!
//! Only the messages the simulator speaks are here. Every field is `optional`,
//! as in IB's schema, so absent and default values stay distinguishable.

/// Client → server: `StartApi` (message id 71).
#[derive(Clone, PartialEq, prost::Message)]
pub struct StartApiRequest {
    /// The client id the session claims; unique among connected clients.
    #[prost(int32, optional, tag = "1")]
    pub client_id: Option<i32>,
    /// Optional capabilities string; ignored by the simulator.
    #[prost(string, optional, tag = "2")]
    pub optional_capabilities: Option<String>,
}

/// Reads tag 1 of any message as an `int32`: the request id of most requests.
#[derive(Clone, Copy, PartialEq, prost::Message)]
pub struct IdEnvelope {
    /// The request id (or order id), when tag 1 holds one.
    #[prost(int32, optional, tag = "1")]
    pub id: Option<i32>,
}

/// Server → client: `NextValidId` (message id 9).
#[derive(Clone, Copy, PartialEq, prost::Message)]
pub struct NextValidId {
    /// The next order id the client may use.
    #[prost(int32, optional, tag = "1")]
    pub order_id: Option<i32>,
}

/// Server → client: `ManagedAccounts` (message id 15).
#[derive(Clone, PartialEq, prost::Message)]
pub struct ManagedAccounts {
    /// Comma-separated account ids.
    #[prost(string, optional, tag = "1")]
    pub accounts_list: Option<String>,
}

/// Server → client: `CurrentTime` (message id 49).
#[derive(Clone, Copy, PartialEq, prost::Message)]
pub struct CurrentTime {
    /// Seconds since the Unix epoch.
    #[prost(int64, optional, tag = "1")]
    pub current_time: Option<i64>,
}

/// Server → client: `CurrentTimeInMillis` (message id 109).
#[derive(Clone, Copy, PartialEq, prost::Message)]
pub struct CurrentTimeInMillis {
    /// Milliseconds since the Unix epoch.
    #[prost(int64, optional, tag = "1")]
    pub current_time_in_millis: Option<i64>,
}

/// Server → client: `Error` (message id 4), also used for notices.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ErrorMessage {
    /// Request or order id the error belongs to; -1 when it belongs to none.
    #[prost(int32, optional, tag = "1")]
    pub id: Option<i32>,
    /// Milliseconds since the Unix epoch.
    #[prost(int64, optional, tag = "2")]
    pub error_time: Option<i64>,
    /// IB error code (101, 100, 326, 1100, ...).
    #[prost(int32, optional, tag = "3")]
    pub error_code: Option<i32>,
    /// Human-readable text.
    #[prost(string, optional, tag = "4")]
    pub error_msg: Option<String>,
    /// Advanced order-reject JSON; never set by the simulator.
    #[prost(string, optional, tag = "5")]
    pub advanced_order_reject_json: Option<String>,
}

/// IB's `Contract` message, limited to the fields a position carries.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Contract {
    /// IB contract id.
    #[prost(int32, optional, tag = "1")]
    pub con_id: Option<i32>,
    /// Underlying symbol.
    #[prost(string, optional, tag = "2")]
    pub symbol: Option<String>,
    /// `STK` or `OPT`.
    #[prost(string, optional, tag = "3")]
    pub sec_type: Option<String>,
    /// Expiry `YYYYMMDD` for options.
    #[prost(string, optional, tag = "4")]
    pub last_trade_date_or_contract_month: Option<String>,
    /// Strike for options.
    #[prost(double, optional, tag = "5")]
    pub strike: Option<f64>,
    /// `C` or `P` for options.
    #[prost(string, optional, tag = "6")]
    pub right: Option<String>,
    /// Multiplier (100 for options); absent for stocks.
    #[prost(double, optional, tag = "7")]
    pub multiplier: Option<f64>,
    /// Destination exchange (`SMART`).
    #[prost(string, optional, tag = "8")]
    pub exchange: Option<String>,
    /// Primary listing exchange.
    #[prost(string, optional, tag = "9")]
    pub primary_exch: Option<String>,
    /// Currency (`USD`).
    #[prost(string, optional, tag = "10")]
    pub currency: Option<String>,
    /// Local symbol (OCC symbol for options).
    #[prost(string, optional, tag = "11")]
    pub local_symbol: Option<String>,
    /// Trading class.
    #[prost(string, optional, tag = "12")]
    pub trading_class: Option<String>,
    /// Last trading day `YYYYMMDD` (options only, as IB sends it).
    #[prost(string, optional, tag = "21")]
    pub last_trade_date: Option<String>,
}

/// Server → client: `Position` (message id 61).
#[derive(Clone, PartialEq, prost::Message)]
pub struct Position {
    /// Account holding the position.
    #[prost(string, optional, tag = "1")]
    pub account: Option<String>,
    /// The contract.
    #[prost(message, optional, tag = "2")]
    pub contract: Option<Contract>,
    /// Quantity as a decimal string; "0" when the position closed.
    #[prost(string, optional, tag = "3")]
    pub position: Option<String>,
    /// Average cost, multiplier included.
    #[prost(double, optional, tag = "4")]
    pub avg_cost: Option<f64>,
}

/// Server → client: `PositionEnd` (message id 62); no fields.
#[derive(Clone, Copy, PartialEq, prost::Message)]
pub struct PositionEnd {}

/// Client → server: `RequestPositionsMulti` (message id 74).
#[derive(Clone, PartialEq, prost::Message)]
pub struct PositionsMultiRequest {
    /// Request id echoed on every answer.
    #[prost(int32, optional, tag = "1")]
    pub req_id: Option<i32>,
    /// Account filter; absent, empty or `All` means every account.
    #[prost(string, optional, tag = "2")]
    pub account: Option<String>,
    /// Model code; ignored (no models in the simulator).
    #[prost(string, optional, tag = "3")]
    pub model_code: Option<String>,
}

/// Client → server: the `Cancel*` requests that name only a request id
/// (`CancelPositionsMulti` 75, `CancelPnLSingle` 95).
#[derive(Clone, Copy, PartialEq, prost::Message)]
pub struct CancelById {
    /// The request id to cancel.
    #[prost(int32, optional, tag = "1")]
    pub req_id: Option<i32>,
}

/// Server → client: `PositionMulti` (message id 71).
#[derive(Clone, PartialEq, prost::Message)]
pub struct PositionMulti {
    /// Request id of the subscription.
    #[prost(int32, optional, tag = "1")]
    pub req_id: Option<i32>,
    /// Account holding the position.
    #[prost(string, optional, tag = "2")]
    pub account: Option<String>,
    /// The contract.
    #[prost(message, optional, tag = "3")]
    pub contract: Option<Contract>,
    /// Quantity as a decimal string.
    #[prost(string, optional, tag = "4")]
    pub position: Option<String>,
    /// Average cost, multiplier included.
    #[prost(double, optional, tag = "5")]
    pub avg_cost: Option<f64>,
    /// Model code; always empty.
    #[prost(string, optional, tag = "6")]
    pub model_code: Option<String>,
}

/// Server → client: `PositionMultiEnd` (message id 72).
#[derive(Clone, Copy, PartialEq, prost::Message)]
pub struct PositionMultiEnd {
    /// Request id of the subscription.
    #[prost(int32, optional, tag = "1")]
    pub req_id: Option<i32>,
}

/// Client → server: `RequestPnLSingle` (message id 94).
#[derive(Clone, PartialEq, prost::Message)]
pub struct PnLSingleRequest {
    /// Request id echoed on every tick.
    #[prost(int32, optional, tag = "1")]
    pub req_id: Option<i32>,
    /// Account of the position.
    #[prost(string, optional, tag = "2")]
    pub account: Option<String>,
    /// Model code; ignored.
    #[prost(string, optional, tag = "3")]
    pub model_code: Option<String>,
    /// Contract id of the position.
    #[prost(int32, optional, tag = "4")]
    pub con_id: Option<i32>,
}

/// Server → client: `PnLSingle` (message id 95).
#[derive(Clone, PartialEq, prost::Message)]
pub struct PnLSingle {
    /// Request id of the subscription.
    #[prost(int32, optional, tag = "1")]
    pub req_id: Option<i32>,
    /// Quantity as a decimal string.
    #[prost(string, optional, tag = "2")]
    pub position: Option<String>,
    /// Today's PnL.
    #[prost(double, optional, tag = "3")]
    pub daily_pn_l: Option<f64>,
    /// Unrealized PnL.
    #[prost(double, optional, tag = "4")]
    pub unrealized_pn_l: Option<f64>,
    /// Realized PnL.
    #[prost(double, optional, tag = "5")]
    pub realized_pn_l: Option<f64>,
    /// Market value.
    #[prost(double, optional, tag = "6")]
    pub value: Option<f64>,
}

/// Client → server: `RequestExecutions` (message id 7).
#[derive(Clone, PartialEq, prost::Message)]
pub struct ExecutionRequest {
    /// Request id echoed on every answer and on `ExecutionDetailsEnd`.
    #[prost(int32, optional, tag = "1")]
    pub req_id: Option<i32>,
    /// Which executions to return; absent means all the client may see.
    #[prost(message, optional, tag = "2")]
    pub execution_filter: Option<ExecutionFilter>,
}

/// IB's `ExecutionFilter`: every set field must match.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ExecutionFilter {
    /// Client id the order was placed through.
    #[prost(int32, optional, tag = "1")]
    pub client_id: Option<i32>,
    /// Account.
    #[prost(string, optional, tag = "2")]
    pub acct_code: Option<String>,
    /// Executions at or after `yyyymmdd hh:mm:ss [TZ]` or `yyyymmdd-hh:mm:ss` (UTC).
    #[prost(string, optional, tag = "3")]
    pub time: Option<String>,
    /// Contract symbol.
    #[prost(string, optional, tag = "4")]
    pub symbol: Option<String>,
    /// Security type (`STK`, `OPT`).
    #[prost(string, optional, tag = "5")]
    pub sec_type: Option<String>,
    /// Exchange the execution took place on.
    #[prost(string, optional, tag = "6")]
    pub exchange: Option<String>,
    /// `BUY` or `SELL`.
    #[prost(string, optional, tag = "7")]
    pub side: Option<String>,
    /// Days back (at most 7); the simulator keeps only the current trading day.
    #[prost(int32, optional, tag = "8")]
    pub last_n_days: Option<i32>,
    /// Dates `yyyymmdd` to return executions of.
    #[prost(int32, repeated, tag = "9")]
    pub specific_dates: Vec<i32>,
}

/// IB's `Execution` message.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Execution {
    /// Order id (0 for orders not placed through the API).
    #[prost(int32, optional, tag = "1")]
    pub order_id: Option<i32>,
    /// Execution id; a correction differs only after the last period.
    #[prost(string, optional, tag = "2")]
    pub exec_id: Option<String>,
    /// Execution time `yyyymmdd hh:mm:ss TZ`.
    #[prost(string, optional, tag = "3")]
    pub time: Option<String>,
    /// Account.
    #[prost(string, optional, tag = "4")]
    pub acct_number: Option<String>,
    /// Exchange of the execution.
    #[prost(string, optional, tag = "5")]
    pub exchange: Option<String>,
    /// `BOT` or `SLD`.
    #[prost(string, optional, tag = "6")]
    pub side: Option<String>,
    /// Quantity as a decimal string (unsigned).
    #[prost(string, optional, tag = "7")]
    pub shares: Option<String>,
    /// Price per unit, commissions excluded.
    #[prost(double, optional, tag = "8")]
    pub price: Option<f64>,
    /// TWS order id.
    #[prost(int64, optional, tag = "9")]
    pub perm_id: Option<i64>,
    /// Client id that placed the order.
    #[prost(int32, optional, tag = "10")]
    pub client_id: Option<i32>,
    /// Whether IB liquidated.
    #[prost(bool, optional, tag = "11")]
    pub is_liquidation: Option<bool>,
    /// Cumulative quantity of the order as a decimal string.
    #[prost(string, optional, tag = "12")]
    pub cum_qty: Option<String>,
    /// Average price of the order.
    #[prost(double, optional, tag = "13")]
    pub avg_price: Option<f64>,
}

/// Server → client: `ExecutionDetails` (message id 11).
#[derive(Clone, PartialEq, prost::Message)]
pub struct ExecutionDetails {
    /// Request id of `reqExecutions`, or -1 for a live execution.
    #[prost(int32, optional, tag = "1")]
    pub req_id: Option<i32>,
    /// The contract.
    #[prost(message, optional, tag = "2")]
    pub contract: Option<Contract>,
    /// The execution.
    #[prost(message, optional, tag = "3")]
    pub execution: Option<Execution>,
}

/// Server → client: `ExecutionDetailsEnd` (message id 55).
#[derive(Clone, Copy, PartialEq, prost::Message)]
pub struct ExecutionDetailsEnd {
    /// Request id of `reqExecutions`.
    #[prost(int32, optional, tag = "1")]
    pub req_id: Option<i32>,
}

/// Server → client: `CommissionAndFeesReport` (message id 59).
#[derive(Clone, PartialEq, prost::Message)]
pub struct CommissionAndFeesReport {
    /// The execution it belongs to.
    #[prost(string, optional, tag = "1")]
    pub exec_id: Option<String>,
    /// Commissions and fees.
    #[prost(double, optional, tag = "2")]
    pub commission_and_fees: Option<f64>,
    /// Currency of the commission.
    #[prost(string, optional, tag = "3")]
    pub currency: Option<String>,
    /// Realized PnL of the execution; `f64::MAX` when it closed nothing (as TWS sends).
    #[prost(double, optional, tag = "4")]
    pub realized_pnl: Option<f64>,
}
