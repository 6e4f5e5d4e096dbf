//! From `ibapi`'s execution and commission reports to [`ExecutionEvent`] and [`Commission`].

use chrono::NaiveDateTime;
use ibapi::orders::{CommissionReport, ExecutionData, ExecutionSide};

use super::event::{realized_pnl, split_exec_id, ExecSource, ExecutionEvent, Side};
use super::join::Commission;
use crate::book::ContractInfo;
use crate::events::now_micros;

/// The event of one `execDetails` report (no commission yet: the join adds it). `exec_time` is
/// IB's execution time when it is given in UTC (`yyyymmdd hh:mm:ss`, optionally followed by
/// `UTC`/`GMT`, as the simulator and a TWS set to UTC send it); another zone is not converted
/// (chrono-tz is not a dependency): the time of arrival stands in, and the second value is
/// `false` so the caller can warn once.
pub fn execution_event(data: &ExecutionData, source: ExecSource) -> (ExecutionEvent, bool) {
    let now = now_micros();
    let x = &data.execution;
    let c = ContractInfo::from(&data.contract);
    let (stem, revision) = split_exec_id(&x.execution_id);
    let parsed = parse_exec_time(&x.time);
    let event = ExecutionEvent {
        event_id: crate::events::new_id(),
        session_id: String::new(),
        sequence: 0,
        account: x.account_number.clone(),
        con_id: i64::from(data.contract.contract_id),
        symbol: c.symbol,
        sec_type: c.sec_type,
        expiry: c.expiry,
        strike: c.strike,
        right: c.right,
        multiplier: c.multiplier,
        currency: c.currency,
        local_symbol: c.local_symbol,
        exec_id: x.execution_id.clone(),
        exec_stem: stem.to_string(),
        revision,
        order_id: i64::from(x.order_id),
        perm_id: x.perm_id,
        client_id: x.client_id,
        side: match x.side {
            ExecutionSide::Bought => Side::Bot,
            ExecutionSide::Sold => Side::Sld,
        },
        shares: x.shares,
        price: x.price,
        cum_qty: x.cumulative_quantity,
        avg_price: x.average_price,
        exec_exchange: x.exchange.clone(),
        exec_time: parsed.unwrap_or(now),
        commission: None,
        commission_currency: None,
        realized_pnl: None,
        source,
        ib_time: now,
        ingest_time: now,
    };
    (event, parsed.is_some())
}

/// The join's view of a `commissionReport`.
pub fn commission(c: &CommissionReport) -> Commission {
    Commission {
        exec_id: c.execution_id.clone(),
        commission: c.commission,
        currency: c.currency.clone(),
        realized_pnl: c.realized_pnl.and_then(realized_pnl),
    }
}

/// Microseconds since the epoch of a TWS execution time in UTC: `yyyymmdd hh:mm:ss`,
/// `yyyymmdd-hh:mm:ss`, either optionally followed by ` UTC` or ` GMT`. `None` otherwise.
pub fn parse_exec_time(text: &str) -> Option<i64> {
    let text = text.trim();
    let bare = text
        .strip_suffix(" UTC")
        .or_else(|| text.strip_suffix(" GMT"))
        .unwrap_or(text)
        .trim();
    ["%Y%m%d %H:%M:%S", "%Y%m%d-%H:%M:%S", "%Y%m%d  %H:%M:%S"]
        .iter()
        .find_map(|f| NaiveDateTime::parse_from_str(bare, f).ok())
        .map(|t| t.and_utc().timestamp_micros())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_execution_times_parse_and_other_zones_do_not() {
        let want = chrono::NaiveDate::from_ymd_opt(2026, 12, 7)
            .unwrap()
            .and_hms_opt(14, 30, 5)
            .unwrap()
            .and_utc()
            .timestamp_micros();
        assert_eq!(parse_exec_time("20261207 14:30:05 UTC"), Some(want));
        assert_eq!(parse_exec_time("20261207 14:30:05"), Some(want));
        assert_eq!(parse_exec_time("20261207-14:30:05"), Some(want));
        assert_eq!(parse_exec_time("20261207 14:30:05 GMT"), Some(want));
        assert_eq!(parse_exec_time("20261207 09:30:05 US/Eastern"), None);
        assert_eq!(parse_exec_time(""), None);
    }

    #[test]
    fn an_ib_execution_becomes_an_event_with_its_revision() {
        let mut data = ExecutionData::default();
        data.contract.contract_id = 42;
        data.contract.local_symbol = "SPY   261218C00600000".into();
        data.execution.execution_id = "0000e0d5.6553a2b1.01.02".into();
        data.execution.account_number = "DU1".into();
        data.execution.side = ExecutionSide::Sold;
        data.execution.shares = 3.0;
        data.execution.price = 1.5;
        data.execution.time = "20261207 14:30:05 UTC".into();
        let (e, parsed) = execution_event(&data, ExecSource::Live);
        assert!(parsed);
        assert_eq!((e.con_id, e.account.as_str(), e.side), (42, "DU1", Side::Sld));
        assert_eq!((e.exec_stem.as_str(), e.revision), ("0000e0d5.6553a2b1.01", 2));
        assert_eq!(e.key(), "DU1:42");
        assert_eq!(e.commission, None);
        let c = commission(&CommissionReport {
            execution_id: e.exec_id.clone(),
            commission: 1.1,
            currency: "USD".into(),
            realized_pnl: Some(f64::MAX),
            ..CommissionReport::default()
        });
        assert_eq!(c.realized_pnl, None, "IB's 'not applicable' is no value");
    }
}
