//! The frames the simulator sends that are more than one message: IB's error codes, `Error`
//! frames and notices, and contracts and positions in IB's protobuf form.

use super::proto;
use super::truth::SimContract;
use super::wire::{self, incoming};

/// IB's code for "client id already in use".
pub const CLIENT_ID_IN_USE: i32 = 326;
/// IB's code for "max number of tickers reached".
pub const MAX_TICKERS: i32 = 101;
/// IB's code for "max rate of messages per second exceeded".
pub const PACING: i32 = 100;
/// IB's code for "error validating request".
pub const VALIDATION: i32 = 321;
/// IB's code for "connectivity restored, data lost".
pub const RESTORED_DATA_LOST: i32 = 1101;

/// An `Error` frame for request `id` (-1 for none).
pub fn error_frame(id: i32, code: i32, text: &str) -> Vec<u8> {
    let message = proto::ErrorMessage {
        id: Some(id),
        error_time: Some(chrono::Utc::now().timestamp_millis()),
        error_code: Some(code),
        error_msg: Some(text.to_string()),
        advanced_order_reject_json: None,
    };
    wire::encode(incoming::ERROR, &message)
}

/// IB's wording for the notices the simulator sends.
pub fn notice_text(code: i32) -> &'static str {
    match code {
        1100 => "Connectivity between IB and Trader Workstation has been lost.",
        1101 => "Connectivity between IB and Trader Workstation has been restored - data lost.",
        1102 => "Connectivity between IB and Trader Workstation has been restored - data maintained.",
        1300 => {
            "TWS socket port has been reset and this connection is being dropped. Please reconnect on the new port."
        }
        2104 => "Market data farm connection is OK:usfarm",
        2103 => "Market data farm connection is broken:usfarm",
        _ => "possync sim notice",
    }
}

/// The protobuf contract IB sends for `c`.
pub fn contract(c: &SimContract) -> proto::Contract {
    let option = c.is_option();
    let text = |s: &str| (!s.is_empty()).then(|| s.to_string());
    proto::Contract {
        con_id: Some(c.con_id),
        symbol: Some(c.symbol.clone()),
        sec_type: Some(c.sec_type.clone()),
        last_trade_date_or_contract_month: text(&c.expiry),
        strike: option.then_some(c.strike),
        right: text(&c.right),
        multiplier: option.then_some(c.multiplier),
        exchange: Some(c.exchange.clone()),
        primary_exch: text(&c.primary_exchange),
        currency: Some(c.currency.clone()),
        local_symbol: Some(c.local_symbol.clone()),
        trading_class: Some(c.trading_class.clone()),
        last_trade_date: text(&c.expiry),
    }
}

pub fn position_frame(account: &str, c: &SimContract, quantity: f64, avg_cost: f64) -> Vec<u8> {
    let message = proto::Position {
        account: Some(account.to_string()),
        contract: Some(contract(c)),
        position: Some(wire::decimal(quantity)),
        avg_cost: Some(avg_cost),
    };
    wire::encode(incoming::POSITION, &message)
}

pub fn position_multi_frame(req_id: i32, account: &str, c: &SimContract, quantity: f64, avg_cost: f64) -> Vec<u8> {
    let message = proto::PositionMulti {
        req_id: Some(req_id),
        account: Some(account.to_string()),
        contract: Some(contract(c)),
        position: Some(wire::decimal(quantity)),
        avg_cost: Some(avg_cost),
        model_code: None,
    };
    wire::encode(incoming::POSITION_MULTI, &message)
}
