//! The trading day's executions: every simulated fill becomes an execution of
//! the TWS protocol with its commission report, kept until the next trading day
//! ([`ExecutionBook`]); the `reqExecutions` filter ([`Filter`]); and the frames
//! that carry executions, commission reports and `execDetailsEnd` to a client.
//!
//! Who sees what (TWS's rules, with the simulator's choices):
//! - simulated fills are orders not placed through the API; their executions
//!   belong to client id `master_client_id` when one is configured, else to
//!   client id 0 (TWS's own client), with order id 0;
//! - live `execDetails` (request id -1) and `commissionReport` go to the session
//!   of the order's client id and to the master client id's session;
//! - `reqExecutions` returns the executions of the requesting client id's
//!   orders, or every execution to the master client id.

use std::collections::HashMap;
use std::sync::Arc;

use chrono::{DateTime, NaiveDate, NaiveDateTime, NaiveTime, Utc};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::sync::broadcast;

use super::catalog::round2;
use super::config::SimConfig;
use super::error::SimError;
use super::frames::{contract, error_frame, VALIDATION};
use super::proto;
use super::truth::{base_exec_id, SimContract, TruthCommission, TruthExecution};
use super::wire::{self, incoming};

/// Capacity of the execution channel; a session that falls this far behind is
/// disconnected (its client reconnects and asks `reqExecutions`).
pub const EXEC_CAPACITY: usize = 16_384;
/// What TWS sends as the realized PnL of an execution that closed nothing.
pub const NO_REALIZED_PNL: f64 = f64::MAX;
/// Most days `last_n_days` may ask for, as in TWS.
const MAX_LAST_N_DAYS: i32 = 7;

/// A new execution to record.
#[derive(Debug, Clone)]
pub struct Fill<'a> {
    /// Account.
    pub account: &'a str,
    /// The contract.
    pub contract: &'a SimContract,
    /// Signed quantity: positive bought, negative sold.
    pub delta: f64,
    /// Price per unit.
    pub price: f64,
    /// PnL the fill realized, when it closed something.
    pub realized: Option<f64>,
    /// Send the live commission report before the execution; `None` rolls
    /// `commission_first_rate`.
    pub commission_first: Option<bool>,
}

/// The day's executions and the channel that publishes each new one.
#[derive(Debug)]
pub struct ExecutionBook {
    /// First part of every exec id: unique per simulator start.
    prefix: u32,
    /// Second part of the next exec id.
    next_seq: u32,
    /// Perm id of the next execution's order.
    next_perm: i64,
    /// Client id the simulated orders belong to.
    owner: i32,
    day: Vec<TruthExecution>,
    /// Exec id → index in `day`.
    index: HashMap<String, usize>,
    rng: SmallRng,
    commission_first_rate: f64,
    correction_rate: f64,
    events: broadcast::Sender<Arc<TruthExecution>>,
}

impl ExecutionBook {
    /// An empty book for `config`.
    ///
    /// # Errors
    /// [`SimError::InvalidConfig`] when a fault rate is outside 0..=1.
    pub fn new(config: &SimConfig) -> Result<Self, SimError> {
        for (name, rate) in [
            ("--commission-first-rate", config.commission_first_rate),
            ("--correction-rate", config.correction_rate),
        ] {
            if !(0.0..=1.0).contains(&rate) {
                return Err(SimError::InvalidConfig(format!(
                    "{name} must be between 0 and 1, got {rate}"
                )));
            }
        }
        let (events, _) = broadcast::channel(EXEC_CAPACITY);
        let millis = Utc::now().timestamp_millis();
        Ok(Self {
            prefix: (millis & 0xffff_ffff) as u32,
            next_seq: 1,
            next_perm: 1_000_000_000 + (config.seed % 1_000_000) as i64 * 1_000,
            owner: config.master_client_id.unwrap_or(0),
            day: Vec::new(),
            index: HashMap::new(),
            rng: SmallRng::seed_from_u64(config.seed.wrapping_add(3)),
            commission_first_rate: config.commission_first_rate,
            correction_rate: config.correction_rate,
            events,
        })
    }

    /// Receives every new execution (corrections included) from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<TruthExecution>> {
        self.events.subscribe()
    }

    /// The day's executions, every version, in order.
    pub fn day(&self) -> &[TruthExecution] {
        &self.day
    }

    /// Forgets the day's executions (ids keep counting up, so none repeats).
    pub fn new_trading_day(&mut self) {
        self.day.clear();
        self.index.clear();
    }

    /// Records a new execution and publishes it.
    pub fn record(&mut self, fill: &Fill<'_>) -> TruthExecution {
        let commission_first = match fill.commission_first {
            Some(first) => first,
            None => self.roll(self.commission_first_rate),
        };
        let now = Utc::now();
        let shares = fill.delta.abs();
        let exec_id = format!("{:08x}.{:08x}.01.01", self.prefix, self.next_seq);
        self.next_seq = self.next_seq.wrapping_add(1);
        let perm_id = self.next_perm;
        self.next_perm += 1;
        let commission = commission_of(fill.contract, shares);
        let execution = TruthExecution {
            exec_id: exec_id.clone(),
            corrects: None,
            order_id: 0,
            perm_id,
            client_id: self.owner,
            account: fill.account.to_string(),
            contract: fill.contract.clone(),
            side: if fill.delta < 0.0 { "SLD" } else { "BOT" }.to_string(),
            shares,
            price: fill.price,
            cum_qty: shares,
            avg_price: fill.price,
            time: format_time(now),
            time_ms: now.timestamp_millis(),
            exchange: venue(fill.contract).to_string(),
            commission: TruthCommission {
                exec_id,
                commission,
                currency: fill.contract.currency.clone(),
                realized_pnl: fill.realized.map(|r| round2(r - commission)),
            },
            commission_first,
            delivered_to: Vec::new(),
        };
        self.push(execution)
    }

    /// The latest version of the execution `exec_id` (any of its versions) names.
    ///
    /// # Errors
    /// [`SimError::UnknownExecution`] when no execution of today has that id.
    pub fn latest(&self, exec_id: &str) -> Result<&TruthExecution, SimError> {
        let base = base_exec_id(exec_id);
        self.day
            .iter()
            .rev()
            .find(|e| e.base_id() == base)
            .filter(|_| self.index.contains_key(exec_id))
            .ok_or_else(|| SimError::UnknownExecution(exec_id.to_string()))
    }

    /// Records a correction of `old` (its latest version) with new `shares` and
    /// `price`, and publishes it: the id suffix goes up by one.
    pub fn correct(&mut self, old: &TruthExecution, shares: f64, price: f64, realized: Option<f64>) -> TruthExecution {
        let suffix = old
            .exec_id
            .rsplit_once('.')
            .and_then(|(_, s)| s.parse::<u32>().ok())
            .unwrap_or(1);
        let exec_id = format!("{}.{:02}", old.base_id(), suffix + 1);
        let commission = commission_of(&old.contract, shares);
        let correction = TruthExecution {
            exec_id: exec_id.clone(),
            corrects: Some(old.exec_id.clone()),
            shares,
            price,
            cum_qty: shares,
            avg_price: price,
            commission: TruthCommission {
                exec_id,
                commission,
                currency: old.commission.currency.clone(),
                realized_pnl: realized.map(|r| round2(r - commission)),
            },
            commission_first: false,
            delivered_to: Vec::new(),
            ..old.clone()
        };
        self.push(correction)
    }

    /// Whether the fill just recorded gets a random correction (`correction_rate`),
    /// and if so its new (shares, price).
    pub fn roll_correction(&mut self, last: &TruthExecution) -> Option<(f64, f64)> {
        if !self.roll(self.correction_rate) {
            return None;
        }
        let up = self.rng.gen_bool(0.5);
        if self.rng.gen_bool(0.5) {
            let shares = if up || last.shares <= 1.0 {
                last.shares + 1.0
            } else {
                last.shares - 1.0
            };
            Some((shares, last.price))
        } else {
            let price = if up || last.price <= 0.01 {
                last.price + 0.01
            } else {
                last.price - 0.01
            };
            Some((last.shares, round2(price)))
        }
    }

    /// Notes that `client_id` received `exec_id` live.
    pub fn mark_delivered(&mut self, exec_id: &str, client_id: i32) {
        if let Some(&i) = self.index.get(exec_id) {
            let delivered = &mut self.day[i].delivered_to;
            if !delivered.contains(&client_id) {
                delivered.push(client_id);
            }
        }
    }

    fn push(&mut self, execution: TruthExecution) -> TruthExecution {
        self.index.insert(execution.exec_id.clone(), self.day.len());
        self.day.push(execution.clone());
        // No receiver is fine: nobody is connected; reqExecutions returns it later.
        let _ = self.events.send(Arc::new(execution.clone()));
        execution
    }

    fn roll(&mut self, rate: f64) -> bool {
        rate > 0.0 && self.rng.gen_bool(rate.min(1.0))
    }
}

/// Commission of `shares` of `contract`: IB's fixed rates, $0.005 a share or
/// $0.65 an option contract, at least $1.
fn commission_of(contract: &SimContract, shares: f64) -> f64 {
    let rate = if contract.is_option() { 0.65 } else { 0.005 };
    round2((rate * shares).max(1.0))
}

/// The exchange an execution of `contract` took place on.
fn venue(contract: &SimContract) -> &'static str {
    match (contract.is_option(), contract.primary_exchange.as_str()) {
        (true, _) => "CBOE",
        (false, "ARCA") => "ARCA",
        (false, "NYSE") => "NYSE",
        _ => "ISLAND",
    }
}

/// TWS's execution time format, in the simulator's time zone (UTC).
fn format_time(t: DateTime<Utc>) -> String {
    format!("{} UTC", t.format("%Y%m%d %H:%M:%S"))
}

/// Whether `client_id` may see `e`: its own orders' executions, or all for the master.
pub fn visible(e: &TruthExecution, client_id: i32, master: Option<i32>) -> bool {
    e.client_id == client_id || master == Some(client_id)
}

/// A parsed `ExecutionFilter`; unset fields match everything.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Filter {
    client_id: Option<i32>,
    account: Option<String>,
    since_ms: Option<i64>,
    symbol: Option<String>,
    sec_type: Option<String>,
    exchange: Option<String>,
    side: Option<&'static str>,
    dates: Vec<i32>,
}

impl Filter {
    /// Reads IB's filter; client id 0 means every client, as in TWS.
    ///
    /// # Errors
    /// The text of a validation error for an unreadable time, side or day count.
    pub fn parse(filter: Option<proto::ExecutionFilter>) -> Result<Self, String> {
        let Some(f) = filter else {
            return Ok(Self::default());
        };
        let text = |s: Option<String>| s.map(|s| s.trim().to_string()).filter(|s| !s.is_empty());
        let side = match text(f.side).map(|s| s.to_uppercase()).as_deref() {
            None => None,
            Some("BUY" | "BOT") => Some("BOT"),
            Some("SELL" | "SLD") => Some("SLD"),
            Some(other) => return Err(format!("invalid side {other:?}; use BUY or SELL")),
        };
        let since_ms = text(f.time).map(|t| parse_time(&t)).transpose()?;
        if let Some(n) = f.last_n_days {
            if !(0..=MAX_LAST_N_DAYS).contains(&n) {
                return Err(format!("lastNDays must be between 0 and {MAX_LAST_N_DAYS}, got {n}"));
            }
        }
        for &d in &f.specific_dates {
            if date_of(d).is_none() {
                return Err(format!("invalid specific date {d}; use yyyymmdd"));
            }
        }
        Ok(Self {
            client_id: f.client_id.filter(|&id| id != 0),
            account: text(f.acct_code),
            since_ms,
            symbol: text(f.symbol),
            sec_type: text(f.sec_type),
            exchange: text(f.exchange),
            side,
            dates: f.specific_dates,
        })
    }

    /// Whether `e` passes the filter.
    pub fn matches(&self, e: &TruthExecution) -> bool {
        let eq = |want: &Option<String>, got: &str| want.as_deref().is_none_or(|w| w.eq_ignore_ascii_case(got));
        self.client_id.is_none_or(|id| id == e.client_id)
            && eq(&self.account, &e.account)
            && self.since_ms.is_none_or(|t| e.time_ms >= t)
            && eq(&self.symbol, &e.contract.symbol)
            && eq(&self.sec_type, &e.contract.sec_type)
            && eq(&self.exchange, &e.exchange)
            && self.side.is_none_or(|s| s == e.side)
            && (self.dates.is_empty() || self.dates.contains(&day_number(e.time_ms)))
    }
}

/// `yyyymmdd` of the UTC date of `ms`.
fn day_number(ms: i64) -> i32 {
    DateTime::from_timestamp_millis(ms)
        .and_then(|t| t.format("%Y%m%d").to_string().parse().ok())
        .unwrap_or(0)
}

fn date_of(yyyymmdd: i32) -> Option<NaiveDate> {
    NaiveDate::from_ymd_opt(
        yyyymmdd / 10_000,
        (yyyymmdd / 100 % 100) as u32,
        (yyyymmdd % 100) as u32,
    )
}

/// Milliseconds since the epoch of a filter time: `yyyymmdd-hh:mm:ss` (UTC),
/// `yyyymmdd hh:mm:ss` with no zone or a UTC zone, or `yyyymmdd`.
fn parse_time(text: &str) -> Result<i64, String> {
    let bad = || {
        format!(
            "invalid time {text:?}; use \"yyyymmdd hh:mm:ss UTC\" or \"yyyymmdd-hh:mm:ss\" (the simulator runs in UTC)"
        )
    };
    let utc = |t: NaiveDateTime| t.and_utc().timestamp_millis();
    if let Ok(t) = NaiveDateTime::parse_from_str(text, "%Y%m%d-%H:%M:%S") {
        return Ok(utc(t));
    }
    let mut parts = text.split_whitespace();
    let date = parts.next().ok_or_else(bad)?;
    let date = NaiveDate::parse_from_str(date, "%Y%m%d").map_err(|_| bad())?;
    let time = match parts.next() {
        Some(t) => NaiveTime::parse_from_str(t, "%H:%M:%S").map_err(|_| bad())?,
        None => NaiveTime::MIN,
    };
    match parts.next() {
        None | Some("UTC" | "GMT" | "Etc/UTC" | "Etc/GMT" | "Z") => {}
        Some(zone) => {
            return Err(format!(
                "unsupported time zone {zone:?} in {text:?}; the simulator runs in UTC"
            ))
        }
    }
    if parts.next().is_some() {
        return Err(bad());
    }
    Ok(utc(date.and_time(time)))
}

/// The `execDetails` frame of `e` for request `req_id` (-1 when live).
pub fn execution_frame(req_id: i32, e: &TruthExecution) -> Vec<u8> {
    let mut c = contract(&e.contract);
    c.exchange = Some(e.exchange.clone());
    let message = proto::ExecutionDetails {
        req_id: Some(req_id),
        contract: Some(c),
        execution: Some(proto::Execution {
            order_id: Some(e.order_id),
            exec_id: Some(e.exec_id.clone()),
            time: Some(e.time.clone()),
            acct_number: Some(e.account.clone()),
            exchange: Some(e.exchange.clone()),
            side: Some(e.side.clone()),
            shares: Some(wire::decimal(e.shares)),
            price: Some(e.price),
            perm_id: Some(e.perm_id),
            client_id: Some(e.client_id),
            is_liquidation: Some(false),
            cum_qty: Some(wire::decimal(e.cum_qty)),
            avg_price: Some(e.avg_price),
        }),
    };
    wire::encode(incoming::EXECUTION_DATA, &message)
}

/// The `commissionReport` frame of `e`.
pub fn commission_frame(e: &TruthExecution) -> Vec<u8> {
    let c = &e.commission;
    let message = proto::CommissionAndFeesReport {
        exec_id: Some(c.exec_id.clone()),
        commission_and_fees: Some(c.commission),
        currency: Some(c.currency.clone()),
        realized_pnl: Some(c.realized_pnl.unwrap_or(NO_REALIZED_PNL)),
    };
    wire::encode(incoming::COMMISSION_REPORT, &message)
}

/// The live frames of `e` for the session of `client_id`: `None` when it may
/// not see it; the commission report first when the fault says so.
pub fn live_frames(e: &TruthExecution, client_id: i32, master: Option<i32>) -> Option<Vec<u8>> {
    if !visible(e, client_id, master) {
        return None;
    }
    let (exec, commission) = (execution_frame(-1, e), commission_frame(e));
    Some(if e.commission_first {
        [commission, exec].concat()
    } else {
        [exec, commission].concat()
    })
}

/// The whole answer to a `reqExecutions` from `client_id`: each execution it may
/// see that passes the filter, followed by its commission report, then
/// `execDetailsEnd`; or error 321 for a filter that cannot be read.
pub fn answer(
    day: &[TruthExecution],
    client_id: i32,
    master: Option<i32>,
    request: proto::ExecutionRequest,
) -> Vec<u8> {
    let req_id = request.req_id.unwrap_or(-1);
    let filter = match Filter::parse(request.execution_filter) {
        Ok(filter) => filter,
        Err(text) => return error_frame(req_id, VALIDATION, &format!("Error validating request.-'{text}'")),
    };
    let mut out = Vec::new();
    for e in day
        .iter()
        .filter(|e| visible(e, client_id, master) && filter.matches(e))
    {
        out.extend(execution_frame(req_id, e));
        out.extend(commission_frame(e));
    }
    out.extend(wire::encode(
        incoming::EXECUTION_DATA_END,
        &proto::ExecutionDetailsEnd { req_id: Some(req_id) },
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::catalog::{option, stock};

    fn book(master: Option<i32>) -> Result<ExecutionBook, SimError> {
        ExecutionBook::new(&SimConfig {
            master_client_id: master,
            ..SimConfig::for_tests()
        })
    }

    fn fill<'a>(account: &'a str, contract: &'a SimContract, delta: f64) -> Fill<'a> {
        Fill {
            account,
            contract,
            delta,
            price: 12.5,
            realized: None,
            commission_first: None,
        }
    }

    #[test]
    fn executions_look_like_ib() -> Result<(), SimError> {
        let mut book = book(Some(7))?;
        let aapl = stock(1, "AAPL");
        let e = book.record(&fill("DU0000001", &aapl, -300.0));
        assert_eq!((e.side.as_str(), e.shares, e.client_id), ("SLD", 300.0, 7));
        assert_eq!(e.exec_id.len(), "0000e0d5.6553a2b1.01.01".len());
        assert!(e.exec_id.ends_with(".01.01"), "{}", e.exec_id);
        assert_eq!((e.commission.commission, e.commission.realized_pnl), (1.5, None));
        assert_eq!(e.time.len(), "20260105 14:30:01 UTC".len());
        let fixed = book.correct(&e, 200.0, 12.5, Some(10.0));
        assert_eq!(fixed.base_id(), e.base_id());
        assert!(fixed.exec_id.ends_with(".01.02"), "{}", fixed.exec_id);
        assert_eq!(fixed.corrects.as_deref(), Some(e.exec_id.as_str()));
        assert_eq!(fixed.commission.realized_pnl, Some(9.0));
        assert_eq!(book.latest(&e.exec_id)?.exec_id, fixed.exec_id);
        book.new_trading_day();
        assert!(book.day().is_empty());
        assert!(matches!(book.latest(&e.exec_id), Err(SimError::UnknownExecution(_))));
        let next = book.record(&fill("DU0000001", &aapl, 1.0));
        assert_ne!(next.base_id(), e.base_id());
        Ok(())
    }

    #[test]
    fn filters_match_ib_fields() -> Result<(), SimError> {
        let mut book = book(None)?;
        let expiry = NaiveDate::from_ymd_opt(2026, 1, 16).ok_or(SimError::Stopped)?;
        let call = option(2, "SPY", expiry, 500.0, "C");
        let e = book.record(&fill("DU0000002", &call, 3.0));
        let parse = |f: proto::ExecutionFilter| Filter::parse(Some(f));
        let all = proto::ExecutionFilter::default();
        assert!(parse(all.clone()).is_ok_and(|f| f.matches(&e)));
        let sell = proto::ExecutionFilter {
            side: Some("SELL".into()),
            ..all.clone()
        };
        assert!(parse(sell).is_ok_and(|f| !f.matches(&e)));
        let mine = proto::ExecutionFilter {
            acct_code: Some("DU0000002".into()),
            sec_type: Some("OPT".into()),
            symbol: Some("spy".into()),
            exchange: Some("CBOE".into()),
            client_id: Some(0),
            ..all.clone()
        };
        assert!(parse(mine).is_ok_and(|f| f.matches(&e)));
        let later = proto::ExecutionFilter {
            time: Some(format_time(Utc::now() + chrono::Duration::hours(1))),
            ..all.clone()
        };
        assert!(parse(later).is_ok_and(|f| !f.matches(&e)));
        let earlier = proto::ExecutionFilter {
            time: Some("20200101-00:00:00".into()),
            specific_dates: vec![day_number(e.time_ms)],
            ..all.clone()
        };
        assert!(parse(earlier).is_ok_and(|f| f.matches(&e)));
        for bad in [
            proto::ExecutionFilter {
                side: Some("SHORT".into()),
                ..all.clone()
            },
            proto::ExecutionFilter {
                time: Some("yesterday".into()),
                ..all.clone()
            },
            proto::ExecutionFilter {
                time: Some("20260105 10:00:00 US/Eastern".into()),
                ..all.clone()
            },
            proto::ExecutionFilter {
                last_n_days: Some(30),
                ..all.clone()
            },
        ] {
            assert!(Filter::parse(Some(bad.clone())).is_err(), "{bad:?}");
        }
        Ok(())
    }

    #[test]
    fn visibility_is_own_orders_or_master() -> Result<(), SimError> {
        let mut book = book(Some(5))?;
        let aapl = stock(1, "AAPL");
        let e = book.record(&fill("DU0000001", &aapl, 1.0));
        assert!(live_frames(&e, 5, Some(5)).is_some());
        assert!(live_frames(&e, 6, Some(5)).is_none());
        let request = proto::ExecutionRequest {
            req_id: Some(9),
            execution_filter: None,
        };
        let ends_only = answer(book.day(), 6, Some(5), request.clone());
        let full = answer(book.day(), 5, Some(5), request);
        assert!(full.len() > ends_only.len());
        Ok(())
    }

    fn world() -> Result<crate::sim::world::World, SimError> {
        let day = NaiveDate::from_ymd_opt(2026, 1, 5).ok_or(SimError::Stopped)?;
        crate::sim::world::World::new_on(&SimConfig::for_tests(), day)
    }

    #[test]
    fn corrections_move_the_position_by_the_difference() -> Result<(), SimError> {
        let mut world = world()?;
        let id = world.contracts()[0].con_id;
        let before = world.position("DU0000001", id).quantity;
        let (_, e) = world.fill_exec("DU0000001", id, -10.0, None)?;
        let e = e.ok_or(SimError::Stopped)?;
        let fixed = world.correct(&e.exec_id, Some(4.0), None)?;
        assert_eq!(world.position("DU0000001", id).quantity, before - 4.0);
        let again = world.correct(&e.exec_id, None, Some(e.price + 1.0))?;
        assert!(again.exec_id.ends_with(".03"), "{}", again.exec_id);
        assert_eq!(
            (again.shares, again.corrects.as_deref()),
            (4.0, Some(fixed.exec_id.as_str()))
        );
        assert_eq!(world.position("DU0000001", id).quantity, before - 4.0);
        assert!(matches!(
            world.correct(&e.exec_id, Some(0.0), None),
            Err(SimError::InvalidCorrection { .. })
        ));
        assert_eq!(world.execs().day().len(), 3);
        Ok(())
    }

    #[test]
    fn expiry_and_assignment_make_no_execution() -> Result<(), SimError> {
        let mut world = world()?;
        let call = world
            .contracts()
            .iter()
            .find(|c| c.is_option() && c.right == "C")
            .cloned()
            .ok_or(SimError::Stopped)?;
        let put = world
            .contracts()
            .iter()
            .find(|c| c.is_option() && c.right == "P" && c.symbol == call.symbol)
            .cloned()
            .ok_or(SimError::Stopped)?;
        let stock = world
            .contracts()
            .iter()
            .find(|c| c.sec_type == "STK" && c.symbol == call.symbol)
            .map(|c| c.con_id)
            .ok_or(SimError::Stopped)?;
        let account = "DU0000003";
        world.set_position(account, call.con_id, -2.0, 100.0)?;
        world.set_position(account, put.con_id, 3.0, 100.0)?;
        world.set_position(account, stock, 0.0, 0.0)?;
        world.assign(account, call.con_id)?;
        assert_eq!(world.position(account, call.con_id).quantity, 0.0);
        assert_eq!(world.position(account, stock).quantity, -200.0);
        world.assign(account, put.con_id)?;
        assert_eq!(world.position(account, stock).quantity, -500.0);
        assert!(matches!(
            world.expire(account, put.con_id),
            Err(SimError::NoPosition { .. })
        ));
        assert!(matches!(world.expire(account, stock), Err(SimError::NotAnOption(_))));
        world.set_position(account, put.con_id, 1.0, 100.0)?;
        world.expire(account, put.con_id)?;
        assert_eq!(world.position(account, put.con_id).quantity, 0.0);
        assert!(world.execs().day().is_empty());
        Ok(())
    }

    #[test]
    fn bad_rates_are_refused() {
        let config = SimConfig {
            correction_rate: 1.5,
            ..SimConfig::for_tests()
        };
        assert!(matches!(ExecutionBook::new(&config), Err(SimError::InvalidConfig(_))));
    }
}
