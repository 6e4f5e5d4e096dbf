//! The contract catalogue and the toy pricer: stock and option contracts with
//! the fields IB sends (OCC local symbols, third-Friday expiries, strike
//! ladders), and option prices derived from the underlying's price.

use chrono::{Datelike, NaiveDate, Weekday};

use super::truth::SimContract;

/// Option multiplier.
const OPTION_MULTIPLIER: f64 = 100.0;
/// Implied volatility used by the toy option pricer.
const VOLATILITY: f64 = 0.3;

/// A toy option price: intrinsic value plus a bell-shaped time value.
pub fn option_price(spot: f64, strike: f64, call: bool, years: f64) -> f64 {
    let sd = VOLATILITY * years.max(1.0 / 365.0).sqrt();
    let intrinsic = if call { spot - strike } else { strike - spot }.max(0.0);
    let moneyness = (spot / strike).ln();
    let time_value = 0.4 * spot * sd * (-(moneyness * moneyness) / (2.0 * sd * sd)).exp();
    round2(intrinsic + time_value).max(0.01)
}

/// Distance between strikes for an underlying priced `spot`.
pub fn strike_step(spot: f64) -> f64 {
    if spot < 25.0 {
        1.0
    } else if spot < 200.0 {
        5.0
    } else {
        10.0
    }
}

/// The stock contract of `symbol`.
pub fn stock(con_id: i32, symbol: &str) -> SimContract {
    let primary = match symbol {
        "SPY" | "QQQ" | "IWM" | "DIA" => "ARCA",
        "IBM" | "JPM" | "KO" | "XOM" => "NYSE",
        _ => "NASDAQ",
    };
    SimContract {
        con_id,
        symbol: symbol.to_string(),
        sec_type: "STK".to_string(),
        expiry: String::new(),
        strike: 0.0,
        right: String::new(),
        multiplier: 1.0,
        exchange: "SMART".to_string(),
        primary_exchange: primary.to_string(),
        currency: "USD".to_string(),
        local_symbol: symbol.to_string(),
        trading_class: symbol.to_string(),
    }
}

/// The option contract on `symbol` with the given terms.
pub fn option(con_id: i32, symbol: &str, expiry: NaiveDate, strike: f64, right: &str) -> SimContract {
    SimContract {
        con_id,
        symbol: symbol.to_string(),
        sec_type: "OPT".to_string(),
        expiry: expiry.format("%Y%m%d").to_string(),
        strike,
        right: right.to_string(),
        multiplier: OPTION_MULTIPLIER,
        exchange: "SMART".to_string(),
        primary_exchange: String::new(),
        currency: "USD".to_string(),
        local_symbol: occ_symbol(symbol, expiry, right, strike),
        trading_class: symbol.to_string(),
    }
}

/// The OCC option symbol: root padded to 6, `YYMMDD`, right, strike × 1000 in 8 digits.
pub fn occ_symbol(symbol: &str, expiry: NaiveDate, right: &str, strike: f64) -> String {
    format!(
        "{symbol:<6}{}{right}{:08}",
        expiry.format("%y%m%d"),
        (strike * 1000.0).round() as i64
    )
}

/// The first `count` monthly expiries (third Fridays) strictly after `today`.
pub fn third_fridays_after(today: NaiveDate, count: usize) -> Vec<NaiveDate> {
    let mut out = Vec::with_capacity(count);
    let (mut year, mut month) = (today.year(), today.month());
    while out.len() < count {
        if let Some(date) = NaiveDate::from_weekday_of_month_opt(year, month, Weekday::Fri, 3) {
            if date > today {
                out.push(date);
            }
        }
        if month == 12 {
            year += 1;
            month = 1;
        } else {
            month += 1;
        }
    }
    out
}

/// Rounds to cents.
pub fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn date(y: i32, m: u32, d: u32) -> Result<NaiveDate, String> {
        NaiveDate::from_ymd_opt(y, m, d).ok_or_else(|| format!("bad date {y}-{m}-{d}"))
    }

    #[test]
    fn occ_symbols_are_padded() -> Result<(), String> {
        let expiry = date(2026, 1, 16)?;
        assert_eq!(occ_symbol("AAPL", expiry, "C", 150.0), "AAPL  260116C00150000");
        assert_eq!(occ_symbol("SPY", expiry, "P", 452.5), "SPY   260116P00452500");
        Ok(())
    }

    #[test]
    fn third_fridays() -> Result<(), String> {
        let dates = third_fridays_after(date(2026, 1, 5)?, 2);
        let text: Vec<String> = dates.iter().map(|d| d.to_string()).collect();
        assert_eq!(text, ["2026-01-16", "2026-02-20"]);
        Ok(())
    }

    #[test]
    fn options_are_worth_at_least_intrinsic() {
        assert!(option_price(120.0, 100.0, true, 0.25) >= 20.0);
        assert!(option_price(120.0, 100.0, false, 0.25) < option_price(100.0, 100.0, false, 0.25));
    }
}
