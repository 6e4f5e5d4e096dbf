//! The position book: what ingest last published for each (account, conId), and how an IB
//! position becomes a [`PositionEvent`].

use std::collections::BTreeMap;
use std::fmt;

use crate::events::{now_micros, PositionEvent, Route, Source};

/// Identity of a position: (account, conId), the Kafka key `account:conId`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PosKey {
    /// IB account id.
    pub account: String,
    /// IB contract id.
    pub con_id: i64,
}

impl PosKey {
    /// A key from its parts.
    pub fn new(account: impl Into<String>, con_id: i64) -> Self {
        Self {
            account: account.into(),
            con_id,
        }
    }
}

impl fmt::Display for PosKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.account, self.con_id)
    }
}

/// The contract fields an event carries.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ContractInfo {
    pub symbol: String,
    pub sec_type: String,
    pub expiry: Option<String>,
    pub strike: Option<f64>,
    pub right: Option<String>,
    pub multiplier: Option<String>,
    pub exchange: String,
    pub currency: String,
    pub local_symbol: String,
    pub trading_class: String,
}

impl From<&ibapi::contracts::Contract> for ContractInfo {
    fn from(c: &ibapi::contracts::Contract) -> Self {
        let non_empty = |s: &str| (!s.is_empty()).then(|| s.to_string());
        Self {
            symbol: c.symbol.as_str().to_string(),
            sec_type: c.security_type.as_str().to_string(),
            expiry: non_empty(&c.last_trade_date_or_contract_month),
            strike: (c.strike != 0.0).then_some(c.strike),
            right: c.right.map(|r| r.as_str().to_string()),
            multiplier: non_empty(&c.multiplier),
            exchange: c.exchange.as_str().to_string(),
            currency: c.currency.as_str().to_string(),
            local_symbol: c.local_symbol.clone(),
            trading_class: c.trading_class.clone(),
        }
    }
}

impl ContractInfo {
    /// Overwrites the contract fields of `e` with these (an empty exchange keeps `e`'s, as
    /// snapshot polls may omit it).
    pub fn write_into(self, e: &mut PositionEvent) {
        e.symbol = self.symbol;
        e.sec_type = self.sec_type;
        e.expiry = self.expiry;
        e.strike = self.strike;
        e.right = self.right;
        e.multiplier = self.multiplier;
        if !self.exchange.is_empty() {
            e.exchange = self.exchange;
        }
        e.currency = self.currency;
        e.local_symbol = self.local_symbol;
        e.trading_class = self.trading_class;
    }
}

/// Latest PnL figures of an active position; `None` where IB sent "unset" (its `Double.MAX`).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Pnl {
    pub daily: Option<f64>,
    pub unrealized: Option<f64>,
    pub realized: Option<f64>,
    pub market_value: Option<f64>,
}

impl From<&ibapi::accounts::PnLSingle> for Pnl {
    fn from(p: &ibapi::accounts::PnLSingle) -> Self {
        let set = |v: f64| (v.is_finite() && v.abs() < f64::MAX / 2.0).then_some(v);
        Self {
            daily: set(p.daily_pnl),
            unrealized: set(p.unrealized_pnl),
            realized: set(p.realized_pnl),
            market_value: set(p.value),
        }
    }
}

/// One position as ingest knows it.
#[derive(Debug, Clone, PartialEq)]
pub struct Held {
    /// Contract fields.
    pub contract: ContractInfo,
    /// Quantity (0 = closed).
    pub position: f64,
    /// Average cost, multiplier included.
    pub avg_cost: f64,
    /// Latest PnL figures while the position holds a stream.
    pub pnl: Option<Pnl>,
    /// An event about it was not acknowledged by Kafka: the next reconciliation republishes
    /// it (or its close) whatever it finds.
    pub dirty: bool,
}

impl Held {
    /// A position from an IB update.
    pub fn from_ib(contract: &ibapi::contracts::Contract, position: f64, avg_cost: f64) -> Self {
        Self {
            contract: ContractInfo::from(contract),
            position,
            avg_cost,
            pnl: None,
            dirty: false,
        }
    }

    /// Whether the position is open (non-zero quantity).
    pub fn is_open(&self) -> bool {
        self.position != 0.0
    }

    /// Whether `other` carries the same position figures (contract details aside).
    pub fn same_figures(&self, other: &Held) -> bool {
        self.position == other.position && self.avg_cost == other.avg_cost
    }
}

/// Open positions (and not-yet-republished closes) by key.
pub type Book = BTreeMap<PosKey, Held>;

/// Builds the event for `held` (session id and sequence are stamped by the publisher).
/// PnL figures travel on the active route only.
pub fn event(
    key: &PosKey,
    held: &Held,
    route: Route,
    source: Source,
    strategies: Vec<String>,
    ib_time: i64,
) -> PositionEvent {
    let pnl = if route == Route::Active { held.pnl } else { None };
    let c = &held.contract;
    PositionEvent {
        event_id: crate::events::new_id(),
        session_id: String::new(),
        sequence: 0,
        account: key.account.clone(),
        con_id: key.con_id,
        symbol: c.symbol.clone(),
        sec_type: c.sec_type.clone(),
        expiry: c.expiry.clone(),
        strike: c.strike,
        right: c.right.clone(),
        multiplier: c.multiplier.clone(),
        exchange: c.exchange.clone(),
        currency: c.currency.clone(),
        local_symbol: c.local_symbol.clone(),
        trading_class: c.trading_class.clone(),
        position: held.position,
        avg_cost: held.avg_cost,
        daily_pnl: pnl.and_then(|p| p.daily),
        unrealized_pnl: pnl.and_then(|p| p.unrealized),
        realized_pnl: pnl.and_then(|p| p.realized),
        market_value: pnl.and_then(|p| p.market_value),
        route,
        source,
        strategies,
        ib_time,
        ingest_time: now_micros(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn option_contract_maps_every_field_and_stock_leaves_option_fields_empty() {
        let c = ibapi::contracts::Contract {
            contract_id: 7,
            symbol: "SPY".into(),
            security_type: ibapi::contracts::SecurityType::Option,
            last_trade_date_or_contract_month: "20261218".into(),
            strike: 600.0,
            right: Some(ibapi::contracts::OptionRight::Call),
            multiplier: "100".into(),
            exchange: "SMART".into(),
            local_symbol: "SPY   261218C00600000".into(),
            trading_class: "SPY".into(),
            ..Default::default()
        };
        let info = ContractInfo::from(&c);
        assert_eq!(info.sec_type, "OPT");
        assert_eq!(info.right.as_deref(), Some("C"));
        assert_eq!(info.strike, Some(600.0));
        assert_eq!(info.multiplier.as_deref(), Some("100"));
        let held = Held {
            contract: info,
            position: -2.5,
            avg_cost: 123.0,
            pnl: Some(Pnl {
                daily: Some(1.0),
                ..Pnl::default()
            }),
            dirty: false,
        };
        let key = PosKey::new("DU1", 7);
        let e = event(&key, &held, Route::Queued, Source::Stream, vec![], 1);
        assert_eq!(e.key(), "DU1:7");
        assert_eq!(e.daily_pnl, None, "no PnL on the queued route");
        assert!(PositionEvent::decode(&e.encode().unwrap()).is_ok());

        let stock = ibapi::contracts::Contract {
            symbol: "IBM".into(),
            ..Default::default()
        };
        let info = ContractInfo::from(&stock);
        assert_eq!(
            (info.expiry, info.strike, info.right, info.multiplier),
            (None, None, None, None)
        );
    }
}
