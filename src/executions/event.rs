//! [`ExecutionEvent`]: one fill with its commission, the value of the `executions` topic
//! (`schemas/execution_event.avsc`, fixed schema id 3).

use serde::{Deserialize, Serialize};

use crate::events::{self, EventError};
use crate::schema;

/// Bought or sold (IB's `BOT` / `SLD`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Side {
    Bot,
    Sld,
}

impl Side {
    /// +1 for a buy, -1 for a sale: `shares * sign` is the fill's change of position.
    pub fn sign(self) -> f64 {
        match self {
            Side::Bot => 1.0,
            Side::Sld => -1.0,
        }
    }
}

/// How ingest came to know an execution.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum ExecSource {
    /// Pushed by IB as it happened (`execDetails` without a request).
    Live,
    /// From `reqExecutions` after a (re)connect: a fill missed while disconnected, or one
    /// already seen live (then not published again).
    Requested,
}

/// One execution of an order with its commission report; the value of `<prefix>executions`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExecutionEvent {
    pub event_id: String,
    pub session_id: String,
    pub sequence: i64,
    pub account: String,
    pub con_id: i64,
    pub symbol: String,
    pub sec_type: String,
    pub expiry: Option<String>,
    pub strike: Option<f64>,
    pub right: Option<String>,
    pub multiplier: Option<String>,
    pub currency: String,
    pub local_symbol: String,
    pub exec_id: String,
    pub exec_stem: String,
    pub revision: i32,
    pub order_id: i64,
    pub perm_id: i64,
    pub client_id: i32,
    pub side: Side,
    pub shares: f64,
    pub price: f64,
    pub cum_qty: f64,
    pub avg_price: f64,
    pub exec_exchange: String,
    /// Microseconds since the Unix epoch (UTC).
    pub exec_time: i64,
    pub commission: Option<f64>,
    pub commission_currency: Option<String>,
    pub realized_pnl: Option<f64>,
    pub source: ExecSource,
    /// Microseconds since the Unix epoch (UTC).
    pub ib_time: i64,
    /// Microseconds since the Unix epoch (UTC).
    pub ingest_time: i64,
}

impl ExecutionEvent {
    /// Kafka key: `account:conId`, as the positions (a contract's fills stay in order).
    pub fn key(&self) -> String {
        events::position_key(&self.account, self.con_id)
    }

    /// Avro + Confluent framing.
    pub fn encode(&self) -> Result<Vec<u8>, EventError> {
        events::encode(
            self,
            schema::execution_event(),
            schema::ids().execution_event,
            "ExecutionEvent",
        )
    }

    /// Inverse of [`ExecutionEvent::encode`].
    pub fn decode(bytes: &[u8]) -> Result<Self, EventError> {
        events::decode(
            bytes,
            schema::execution_event(),
            schema::ids().execution_event,
            "ExecutionEvent",
        )
    }
}

/// An IB execution id split into its stem and correction revision: `0000e0d5.6553a2b1.01.02`
/// is revision 2 (a correction) of stem `0000e0d5.6553a2b1.01`. An id without a numeric last
/// part is its own stem, revision 1.
pub fn split_exec_id(exec_id: &str) -> (&str, i32) {
    match exec_id.rsplit_once('.') {
        Some((stem, rev)) if !stem.is_empty() && !rev.is_empty() && rev.bytes().all(|b| b.is_ascii_digit()) => {
            (stem, rev.parse().unwrap_or(i32::MAX))
        }
        _ => (exec_id, 1),
    }
}

/// IB's "not applicable" realized PnL of a commission report (`f64::MAX`, 1.79e308) is no value.
pub fn realized_pnl(v: f64) -> Option<f64> {
    (v.is_finite() && v.abs() < 1e300).then_some(v)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn sample() -> ExecutionEvent {
        ExecutionEvent {
            event_id: events::new_id(),
            session_id: events::new_id(),
            sequence: 3,
            account: "DU0000001".into(),
            con_id: 123456,
            symbol: "SPY".into(),
            sec_type: "OPT".into(),
            expiry: Some("20261218".into()),
            strike: Some(600.0),
            right: Some("C".into()),
            multiplier: Some("100".into()),
            currency: "USD".into(),
            local_symbol: "SPY   261218C00600000".into(),
            exec_id: "0000e0d5.6553a2b1.01.02".into(),
            exec_stem: "0000e0d5.6553a2b1.01".into(),
            revision: 2,
            order_id: 17,
            perm_id: 99_000_017,
            client_id: 0,
            side: Side::Sld,
            shares: 3.0,
            price: 1.25,
            cum_qty: 3.0,
            avg_price: 1.25,
            exec_exchange: "CBOE".into(),
            exec_time: 1_765_000_000_000_000,
            commission: Some(1.95),
            commission_currency: Some("USD".into()),
            realized_pnl: None,
            source: ExecSource::Requested,
            ib_time: 1_765_000_000_100_000,
            ingest_time: 1_765_000_000_200_000,
        }
    }

    #[test]
    fn round_trips_through_avro_with_confluent_framing() {
        let e = sample();
        let bytes = e.encode().expect("encodes");
        assert_eq!(bytes[0], 0);
        assert_eq!(
            u32::from_be_bytes(bytes[1..5].try_into().unwrap()),
            schema::ids().execution_event
        );
        assert_eq!(ExecutionEvent::decode(&bytes).expect("decodes"), e);
        let mut none = sample();
        none.commission = None;
        none.commission_currency = None;
        assert_eq!(ExecutionEvent::decode(&none.encode().unwrap()).unwrap(), none);
        assert!(
            ExecutionEvent::decode(&bytes[..bytes.len() - 1]).is_err(),
            "a truncated value is an error"
        );
    }

    #[test]
    fn exec_ids_split_into_stem_and_revision() {
        assert_eq!(split_exec_id("0000e0d5.6553a2b1.01.01"), ("0000e0d5.6553a2b1.01", 1));
        assert_eq!(split_exec_id("0000e0d5.6553a2b1.01.02"), ("0000e0d5.6553a2b1.01", 2));
        assert_eq!(split_exec_id("odd"), ("odd", 1));
        assert_eq!(split_exec_id("a.b"), ("a.b", 1));
        assert_eq!(split_exec_id(".3"), (".3", 1));
        assert_eq!(realized_pnl(f64::MAX), None);
        assert_eq!(realized_pnl(12.5), Some(12.5));
        assert_eq!(Side::Sld.sign() * 3.0, -3.0);
    }
}
