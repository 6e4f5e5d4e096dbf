//! `possync book`: the book (open positions) from the Delta tables, now or in the past.
//!
//! - no flag: `positions_current` as of its newest version;
//! - `--version V`: Delta time travel, `positions_current` as of its version `V`: exactly what
//!   the table held then, i.e. what had been *materialized* by that commit;
//! - `--as-of TIME` (RFC 3339): a fold of the audit log `position_events` over the events with
//!   `ingest_time <= TIME`, newest per (account, con_id) by the upsert's own order
//!   (`ingest_time, session_id, sequence, event_id`, [`CurrentFold`]). This is the
//!   book as ingest saw IB at TIME, including events that were materialized later; Delta time
//!   travel by timestamp would instead give what the table held at TIME, missing whatever was
//!   still in Kafka or in the materializer's buffer (up to the flush latency, or more if it
//!   lagged). Only the `event_date` partitions up to TIME's date are read.
//!
//! Closed positions (quantity 0) are left out unless `--include-closed`.

use deltalake::arrow::array::{BooleanArray, RecordBatch};
use deltalake::arrow::compute::filter_record_batch;
use serde::{Deserialize, Serialize};

use super::{open_existing, rfc3339_micros, Row};
use crate::materialize::tables::TableError;
use crate::materialize::upsert::CurrentFold;
use crate::materialize::{TableArgs, TableKind};

/// Errors of `possync book`.
#[derive(Debug, thiserror::Error)]
pub enum BookError {
    /// A table could not be read.
    #[error("{0}; check --table-uri / POSSYNC_TABLE_URI")]
    Table(#[from] TableError),
    /// The table is not there.
    #[error("no {table} table under {base}; check --table-uri (materialize creates the tables)")]
    Missing { table: &'static str, base: String },
    /// `--version` beyond the table's history.
    #[error("positions_current has no version {asked} (newest is {newest}); pick one of 0..={newest}")]
    NoSuchVersion { asked: i64, newest: i64 },
    /// `--version` older than what the log still holds.
    #[error("positions_current version {version} cannot be loaded ({source}); its log may have been cleaned up, try a newer version or --as-of")]
    TimeTravel {
        version: i64,
        #[source]
        source: deltalake::DeltaTableError,
    },
    /// The folded rows did not fit the schema (a bug).
    #[error("folding position_events: {0}")]
    Arrow(#[from] deltalake::arrow::error::ArrowError),
}

/// Flags of `possync book`.
#[derive(clap::Args, Debug, Clone)]
pub struct BookArgs {
    #[command(flatten)]
    pub tables: TableArgs,
    /// Only this account.
    #[arg(long, env = "POSSYNC_BOOK_ACCOUNT")]
    pub account: Option<String>,
    /// The book as of this time (RFC 3339, e.g. `2026-11-30T14:30:00Z`): a fold of
    /// `position_events` up to it.
    #[arg(long, env = "POSSYNC_BOOK_AS_OF", conflicts_with = "version")]
    pub as_of: Option<chrono::DateTime<chrono::FixedOffset>>,
    /// The book as `positions_current` held it at this Delta version (time travel).
    #[arg(long, env = "POSSYNC_BOOK_VERSION")]
    pub version: Option<i64>,
    /// Show closed positions (quantity 0) too.
    #[arg(long, env = "POSSYNC_BOOK_INCLUDE_CLOSED")]
    pub include_closed: bool,
    /// Print JSON instead of a table.
    #[arg(long, env = "POSSYNC_BOOK_JSON")]
    pub json: bool,
}

/// Which book.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum At {
    /// `positions_current` now.
    Current,
    /// `positions_current` at a Delta version.
    Version(i64),
    /// Fold of `position_events` up to a time (µs since the epoch).
    AsOf(i64),
}

/// Plain settings of `possync book`.
#[derive(Debug, Clone)]
pub struct BookConfig {
    /// Base URI of the tables.
    pub table_uri: String,
    /// Only this account.
    pub account: Option<String>,
    /// Which book.
    pub at: At,
    /// Keep quantity-0 rows.
    pub include_closed: bool,
}

impl From<&BookArgs> for BookConfig {
    fn from(a: &BookArgs) -> Self {
        let at = match (a.version, a.as_of) {
            (Some(v), _) => At::Version(v),
            (None, Some(t)) => At::AsOf(t.timestamp_micros()),
            (None, None) => At::Current,
        };
        Self {
            table_uri: a.tables.table_uri.clone(),
            account: a.account.clone(),
            at,
            include_closed: a.include_closed,
        }
    }
}

/// One position of the book.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BookRow {
    pub account: String,
    pub con_id: i64,
    pub local_symbol: String,
    pub sec_type: String,
    pub position: f64,
    pub avg_cost: f64,
    pub market_value: Option<f64>,
    pub unrealized_pnl: Option<f64>,
    pub route: String,
    pub source: String,
    pub strategies: Vec<String>,
    /// `ingest_time` of the event the row comes from (RFC 3339).
    pub updated_at: String,
    /// The event it comes from.
    pub event_id: String,
}

/// A book and where it came from.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Book {
    /// e.g. `positions_current@v12` or `position_events<=2026-…`.
    pub source: String,
    /// The `positions_current` version read (`None` for `--as-of`).
    pub version: Option<i64>,
    /// Sorted by (account, con_id).
    pub rows: Vec<BookRow>,
}

/// Reads the book.
///
/// # Errors
/// [`BookError`]: missing tables, unknown versions, storage errors.
pub async fn load(cfg: &BookConfig) -> Result<Book, BookError> {
    let base = &cfg.table_uri;
    let missing = |kind: TableKind| BookError::Missing {
        table: kind.name(),
        base: base.clone(),
    };
    let (source, version, batches) = match cfg.at {
        At::Current => {
            let t = open_existing(base, TableKind::PositionsCurrent)
                .await?
                .ok_or_else(|| missing(TableKind::PositionsCurrent))?;
            (
                format!("positions_current@v{}", t.version()),
                Some(t.version()),
                t.read_all().await?,
            )
        }
        At::Version(v) => {
            let mut t = open_existing(base, TableKind::PositionsCurrent)
                .await?
                .ok_or_else(|| missing(TableKind::PositionsCurrent))?;
            let newest = t.version();
            if v < 0 || v > newest {
                return Err(BookError::NoSuchVersion { asked: v, newest });
            }
            t.delta
                .load_version(v as u64)
                .await
                .map_err(|source| BookError::TimeTravel { version: v, source })?;
            (format!("positions_current@v{v}"), Some(v), t.read_all().await?)
        }
        At::AsOf(us) => {
            let t = open_existing(base, TableKind::PositionEvents)
                .await?
                .ok_or_else(|| missing(TableKind::PositionEvents))?;
            let day = chrono::DateTime::from_timestamp_micros(us)
                .map(|d| d.date_naive().format("%Y-%m-%d").to_string())
                .unwrap_or_default();
            let files: Vec<_> = t
                .files()?
                .into_iter()
                .filter(|f| {
                    // ISO dates compare as strings; keep files without the partition value.
                    f.partition_value("event_date").is_none_or(|d| d <= day.as_str())
                })
                .collect();
            // One fold in place: no copy of the book per file.
            let mut fold = CurrentFold::default();
            for f in files {
                let rows = t.read(std::slice::from_ref(&f)).await?;
                let kept: Vec<RecordBatch> = rows.iter().map(|b| up_to(b, us)).collect::<Result<_, _>>()?;
                fold.add(&kept)?;
            }
            let state = fold.finish()?;
            (
                format!("position_events with ingest_time <= {}", rfc3339_micros(us)),
                None,
                vec![state.batch().clone()],
            )
        }
    };
    let mut rows = Vec::new();
    for b in &batches {
        let r = Row(b);
        for i in 0..b.num_rows() {
            let row = BookRow {
                account: r.str("account", i).unwrap_or_default(),
                con_id: r.i64("con_id", i).unwrap_or_default(),
                local_symbol: r.str("local_symbol", i).unwrap_or_default(),
                sec_type: r.str("sec_type", i).unwrap_or_default(),
                position: r.f64("position", i).unwrap_or_default(),
                avg_cost: r.f64("avg_cost", i).unwrap_or_default(),
                market_value: r.f64("market_value", i),
                unrealized_pnl: r.f64("unrealized_pnl", i),
                route: r.str("route", i).unwrap_or_default(),
                source: r.str("source", i).unwrap_or_default(),
                strategies: r.strs("strategies", i),
                updated_at: r.ts("ingest_time", i).map(rfc3339_micros).unwrap_or_default(),
                event_id: r.str("event_id", i).unwrap_or_default(),
            };
            let wanted = cfg.account.as_ref().is_none_or(|a| *a == row.account);
            if wanted && (cfg.include_closed || row.position != 0.0) {
                rows.push(row);
            }
        }
    }
    rows.sort_by(|a, b| (&a.account, a.con_id).cmp(&(&b.account, b.con_id)));
    Ok(Book { source, version, rows })
}

/// The rows of `b` with `ingest_time <= us`.
fn up_to(b: &RecordBatch, us: i64) -> Result<RecordBatch, deltalake::arrow::error::ArrowError> {
    let r = Row(b);
    let keep: BooleanArray = (0..b.num_rows())
        .map(|i| Some(r.ts("ingest_time", i).is_some_and(|t| t <= us)))
        .collect();
    filter_record_batch(b, &keep)
}

/// The book as a text table.
pub fn render_text(book: &Book) -> String {
    use std::fmt::Write as _;
    let mut o = String::new();
    let _ = writeln!(o, "book from {} ({} positions)", book.source, book.rows.len());
    let sym = book.rows.iter().map(|r| r.local_symbol.len()).max().unwrap_or(6).max(6);
    let _ = writeln!(
        o,
        "{:<10} {:>9} {:<sym$} {:>10} {:>12} {:>12} {:>12} {:<6} {:<8} {:<16} updated_at",
        "account", "con_id", "symbol", "position", "avg_cost", "mkt_value", "unrl_pnl", "route", "source", "strategies",
    );
    let num = |v: Option<f64>| v.map_or_else(|| "-".into(), |v| format!("{v:.2}"));
    for r in &book.rows {
        let _ = writeln!(
            o,
            "{:<10} {:>9} {:<sym$} {:>10} {:>12.2} {:>12} {:>12} {:<6} {:<8} {:<16} {}",
            r.account,
            r.con_id,
            r.local_symbol,
            r.position,
            r.avg_cost,
            num(r.market_value),
            num(r.unrealized_pnl),
            r.route,
            r.source,
            r.strategies.join(","),
            r.updated_at
        );
    }
    o
}
