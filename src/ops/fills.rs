//! `possync fills`: the executions (fills with their commissions) from the `executions` Delta
//! table that `possync materialize` writes, oldest first, newest last.
//!
//! Filters: `--account`, `--con-id`, `--symbol` (the underlying `symbol` or the contract's
//! `local_symbol`, exact), `--date YYYY-MM-DD` (the UTC date of `exec_time`, the table's
//! `event_date` partition: only that partition's files are read). Without filters every fill
//! of the table is printed. A corrected execution shows every revision; the older ones are
//! marked `superseded` (a higher `revision` of the same `exec_stem` is in the table).

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use super::{open_existing, rfc3339_micros, Row};
use crate::materialize::decode::EVENT_DATE;
use crate::materialize::tables::TableError;
use crate::materialize::{TableArgs, TableKind};

/// Errors of `possync fills`.
#[derive(Debug, thiserror::Error)]
pub enum FillsError {
    /// The table could not be read.
    #[error("{0}; check --table-uri / POSSYNC_TABLE_URI")]
    Table(#[from] TableError),
    /// The table is not there.
    #[error("no executions table under {0}; check --table-uri (`possync materialize` creates it at start-up)")]
    Missing(String),
}

/// Flags of `possync fills`.
#[derive(clap::Args, Debug, Clone)]
pub struct FillsArgs {
    #[command(flatten)]
    pub tables: TableArgs,
    /// Only this account.
    #[arg(long, env = "POSSYNC_FILLS_ACCOUNT")]
    pub account: Option<String>,
    /// Only this contract (IB conId).
    #[arg(long, env = "POSSYNC_FILLS_CON_ID")]
    pub con_id: Option<i64>,
    /// Only this symbol: the underlying (`SPY`) or the contract's local symbol.
    #[arg(long, env = "POSSYNC_FILLS_SYMBOL")]
    pub symbol: Option<String>,
    /// Only fills of this UTC date (YYYY-MM-DD, the date of exec_time). Default: every date.
    #[arg(long, env = "POSSYNC_FILLS_DATE")]
    pub date: Option<chrono::NaiveDate>,
    /// Print JSON instead of a table.
    #[arg(long, env = "POSSYNC_FILLS_JSON")]
    pub json: bool,
}

/// Plain settings of `possync fills`.
#[derive(Debug, Clone, Default)]
pub struct FillsConfig {
    /// Base URI of the tables.
    pub table_uri: String,
    /// Only this account.
    pub account: Option<String>,
    /// Only this contract.
    pub con_id: Option<i64>,
    /// Only this symbol or local symbol.
    pub symbol: Option<String>,
    /// Only this UTC date of `exec_time`.
    pub date: Option<chrono::NaiveDate>,
}

impl From<&FillsArgs> for FillsConfig {
    fn from(a: &FillsArgs) -> Self {
        Self {
            table_uri: a.tables.table_uri.clone(),
            account: a.account.clone(),
            con_id: a.con_id,
            symbol: a.symbol.clone(),
            date: a.date,
        }
    }
}

/// One fill.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FillRow {
    pub exec_id: String,
    pub exec_stem: String,
    pub revision: i32,
    /// `exec_time` (RFC 3339, UTC).
    pub time: String,
    pub account: String,
    pub con_id: i64,
    pub symbol: String,
    pub local_symbol: String,
    /// `BOT` or `SLD`.
    pub side: String,
    pub shares: f64,
    pub price: f64,
    pub commission: Option<f64>,
    pub commission_currency: Option<String>,
    pub realized_pnl: Option<f64>,
    /// `LIVE` or `REQUESTED`.
    pub source: String,
    /// A higher revision of the same stem is in the table (this one was corrected).
    pub superseded: bool,
    #[serde(skip)]
    exec_time: i64,
}

/// The fills that were asked for.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Fills {
    /// e.g. `executions@v12`.
    pub source: String,
    /// Oldest first (by `exec_time`, then exec id).
    pub rows: Vec<FillRow>,
}

/// Reads the fills.
///
/// # Errors
/// [`FillsError::Missing`] when there is no `executions` table; storage errors.
pub async fn load(cfg: &FillsConfig) -> Result<Fills, FillsError> {
    let base = &cfg.table_uri;
    let t = open_existing(base, TableKind::Executions)
        .await?
        .ok_or_else(|| FillsError::Missing(base.clone()))?;
    let day = cfg.date.map(|d| d.format("%Y-%m-%d").to_string());
    let files: Vec<_> = t
        .files()?
        .into_iter()
        .filter(|f| match &day {
            // Keep files without the partition value (none are written without it).
            Some(day) => f.partition_value(EVENT_DATE).is_none_or(|d| d == day),
            None => true,
        })
        .collect();
    let mut rows = Vec::new();
    for b in t.read(&files).await? {
        let r = Row(&b);
        for i in 0..b.num_rows() {
            let exec_time = r.ts("exec_time", i).unwrap_or_default();
            let row = FillRow {
                exec_id: r.str("exec_id", i).unwrap_or_default(),
                exec_stem: r.str("exec_stem", i).unwrap_or_default(),
                revision: r.i32("revision", i).unwrap_or_default(),
                time: rfc3339_micros(exec_time),
                account: r.str("account", i).unwrap_or_default(),
                con_id: r.i64("con_id", i).unwrap_or_default(),
                symbol: r.str("symbol", i).unwrap_or_default(),
                local_symbol: r.str("local_symbol", i).unwrap_or_default(),
                side: r.str("side", i).unwrap_or_default(),
                shares: r.f64("shares", i).unwrap_or_default(),
                price: r.f64("price", i).unwrap_or_default(),
                commission: r.f64("commission", i),
                commission_currency: r.str("commission_currency", i),
                realized_pnl: r.f64("realized_pnl", i),
                source: r.str("source", i).unwrap_or_default(),
                superseded: false,
                exec_time,
            };
            if cfg.keeps(&row) {
                rows.push(row);
            }
        }
    }
    mark_superseded(&mut rows);
    rows.sort_by(|a, b| (a.exec_time, &a.exec_id).cmp(&(b.exec_time, &b.exec_id)));
    Ok(Fills {
        source: format!("executions@v{}", t.version()),
        rows,
    })
}

impl FillsConfig {
    fn keeps(&self, r: &FillRow) -> bool {
        let day = chrono::DateTime::from_timestamp_micros(r.exec_time).map(|t| t.date_naive());
        self.account.as_ref().is_none_or(|a| *a == r.account)
            && self.con_id.is_none_or(|c| c == r.con_id)
            && self
                .symbol
                .as_ref()
                .is_none_or(|s| *s == r.symbol || *s == r.local_symbol)
            && self.date.is_none_or(|d| Some(d) == day)
    }
}

/// Marks the rows of which a higher revision of the same stem (same account) is among `rows`.
fn mark_superseded(rows: &mut [FillRow]) {
    let mut latest: HashMap<(&str, &str), i32> = HashMap::new();
    for r in rows.iter() {
        let e = latest.entry((&r.account, &r.exec_stem)).or_insert(r.revision);
        *e = (*e).max(r.revision);
    }
    let latest: HashMap<(String, String), i32> = latest
        .into_iter()
        .map(|((a, s), v)| ((a.to_string(), s.to_string()), v))
        .collect();
    for r in rows.iter_mut() {
        r.superseded = latest
            .get(&(r.account.clone(), r.exec_stem.clone()))
            .is_some_and(|v| *v > r.revision);
    }
}

/// The fills as a text table.
pub fn render_text(fills: &Fills) -> String {
    use std::fmt::Write as _;
    let mut o = String::new();
    let _ = writeln!(o, "fills from {} ({} executions)", fills.source, fills.rows.len());
    let w = |f: fn(&FillRow) -> usize, min: usize| fills.rows.iter().map(f).max().unwrap_or(min).max(min);
    let (id, sym) = (w(|r| r.exec_id.len(), 7), w(|r| r.local_symbol.len(), 6));
    let _ = writeln!(
        o,
        "{:<id$} {:>3} {:<27} {:<10} {:<8} {:<sym$} {:<4} {:>10} {:>12} {:>10} {:>12} {:<9} note",
        "exec_id",
        "rev",
        "time",
        "account",
        "symbol",
        "local_symbol",
        "side",
        "shares",
        "price",
        "commission",
        "realized",
        "source",
    );
    let num = |v: Option<f64>| v.map_or_else(|| "-".into(), |v| format!("{v:.2}"));
    for r in &fills.rows {
        let _ = writeln!(
            o,
            "{:<id$} {:>3} {:<27} {:<10} {:<8} {:<sym$} {:<4} {:>10} {:>12.4} {:>10} {:>12} {:<9} {}",
            r.exec_id,
            r.revision,
            r.time,
            r.account,
            r.symbol,
            r.local_symbol,
            r.side,
            r.shares,
            r.price,
            num(r.commission),
            num(r.realized_pnl),
            r.source,
            if r.superseded { "superseded" } else { "" }
        );
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(stem: &str, revision: i32, account: &str) -> FillRow {
        FillRow {
            exec_id: format!("{stem}.{revision:02}"),
            exec_stem: stem.into(),
            revision,
            time: String::new(),
            account: account.into(),
            con_id: 1,
            symbol: "SPY".into(),
            local_symbol: "SPY  C".into(),
            side: "BOT".into(),
            shares: 1.0,
            price: 2.0,
            commission: None,
            commission_currency: None,
            realized_pnl: None,
            source: "LIVE".into(),
            superseded: false,
            exec_time: 1_765_000_000_000_000,
        }
    }

    #[test]
    fn older_revisions_are_superseded_and_filters_apply() {
        let mut rows = vec![row("a.1", 1, "DU1"), row("a.1", 2, "DU1"), row("b.1", 1, "DU1")];
        mark_superseded(&mut rows);
        assert_eq!(
            rows.iter().map(|r| r.superseded).collect::<Vec<_>>(),
            [true, false, false]
        );
        let cfg = FillsConfig {
            symbol: Some("SPY  C".into()),
            date: chrono::NaiveDate::from_ymd_opt(2025, 12, 6),
            ..FillsConfig::default()
        };
        assert!(cfg.keeps(&rows[0]));
        let other_day = FillsConfig {
            date: chrono::NaiveDate::from_ymd_opt(2025, 12, 7),
            ..FillsConfig::default()
        };
        assert!(!other_day.keeps(&rows[0]));
        let text = render_text(&Fills {
            source: "executions@v1".into(),
            rows,
        });
        assert!(text.contains("a.1.01") && text.contains("superseded"), "{text}");
    }
}
