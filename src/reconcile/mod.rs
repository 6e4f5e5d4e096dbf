//! `possync reconcile`: positions reconciled against fills (issue 21).
//!
//! Does the book IB reports agree with the fills that made it? For every (account, conId) that
//! moved today: the position in the day's starting snapshot, plus the day's fills, against the
//! position now, with a status ([`model`] has the rules: `agrees`, `explained` by an expiry or
//! an assignment, `pending`, `drifted`).
//!
//! - `possync reconcile` reads the tables and prints the lines (a table, or `--json`); it
//!   writes nothing and needs the day's starting snapshot, which the service takes.
//! - `possync reconcile --watch` is the service (`possync run` runs one in-process): every
//!   `--every` it reads `positions_current` and the day's fills, writes the `reconciliation`
//!   table (the last run's lines) and the gauges `possync_reconciliation_drifted` /
//!   `_pending`, and logs a warning when keys drift. It appends `position_snapshots`: the
//!   day's starting snapshot at its first run of each UTC day, then one every
//!   `--snapshot-every`. `possync status` reports drifted keys from the `reconciliation` table.
//!
//! One service per table location: two would write the same snapshots twice (a reader of the
//! day's start takes the first) and race on the `reconciliation` table (the loser of a
//! conflict writes again at its next run).
//!
//! Costs per run: one read of `positions_current` (the whole book, about 0.2 s at 100k
//! positions), the day's `executions` partition, and a rewrite of the lines of the keys that
//! moved (the day's changes, not the book). A snapshot appends the whole open book (about
//! 2 MB of parquet at 100k positions).

pub mod bench;
pub mod model;
pub mod read;
pub mod write;

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use chrono::{Datelike, NaiveDate};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use self::model::{Inputs, Key, Line, Status};
use self::read::Start;
use crate::events::now_micros;
use crate::materialize::tables::TableError;
use crate::materialize::TableArgs;
use crate::metrics;
use crate::ops::rfc3339_micros;

/// Errors of `possync reconcile`.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// A table could not be read or written.
    #[error("{0}; check --table-uri / POSSYNC_TABLE_URI")]
    Table(#[from] TableError),
    /// A table it reads is not there.
    #[error("no {table} table under {base}; check --table-uri (`possync materialize` creates it)")]
    Missing { table: &'static str, base: String },
    /// No starting snapshot today.
    #[error("no position snapshot of {0} yet: the reconciliation starts from the day's first snapshot, which `possync reconcile --watch` (or `possync run`) takes at its first run of the day")]
    NoSnapshot(NaiveDate),
    /// `possync bench reconcile` could not build its desk.
    #[error("building the benchmark's desk failed: {0}")]
    Bench(String),
}

/// Flags of `possync reconcile`.
#[derive(clap::Args, Debug, Clone)]
pub struct ReconcileArgs {
    #[command(flatten)]
    pub tables: TableArgs,
    /// Run as the service: snapshot, reconcile and write the `reconciliation` table every
    /// `--every` until SIGINT/SIGTERM.
    #[arg(long, env = "POSSYNC_RECONCILE_WATCH")]
    pub watch: bool,
    /// How often the service reconciles.
    #[arg(long, env = "POSSYNC_RECONCILE_EVERY", default_value = "1m", value_parser = humantime::parse_duration)]
    pub every: Duration,
    /// How often the service appends a snapshot of the open book to `position_snapshots`
    /// (besides the day's first).
    #[arg(long, env = "POSSYNC_SNAPSHOT_EVERY", default_value = "15m", value_parser = humantime::parse_duration)]
    pub snapshot_every: Duration,
    /// How long a difference may stay unexplained (`pending`: positions lag fills) before it
    /// is `drifted`, counted in `possync_reconciliation_drifted` and reported by `status`.
    #[arg(long, env = "POSSYNC_DRIFT_AFTER", default_value = "5m", value_parser = humantime::parse_duration)]
    pub drift_after: Duration,
    /// Only the lines that are `pending` or `drifted`.
    #[arg(long, env = "POSSYNC_RECONCILE_PROBLEMS")]
    pub problems: bool,
    /// Print JSON instead of a table.
    #[arg(long, env = "POSSYNC_RECONCILE_JSON")]
    pub json: bool,
    #[command(flatten)]
    pub metrics: crate::metrics::MetricsArgs,
}

/// Plain settings of `possync reconcile`.
#[derive(Debug, Clone)]
pub struct ReconcileConfig {
    /// Base URI of the tables.
    pub table_uri: String,
    /// How often the service runs.
    pub every: Duration,
    /// How often the service snapshots the book (besides the day's first).
    pub snapshot_every: Duration,
    /// Unexplained for this long: drifted.
    pub drift_after: Duration,
}

impl Default for ReconcileConfig {
    fn default() -> Self {
        Self {
            table_uri: crate::materialize::config::DEFAULT_TABLE_URI.to_string(),
            every: Duration::from_secs(60),
            snapshot_every: Duration::from_secs(15 * 60),
            drift_after: Duration::from_secs(5 * 60),
        }
    }
}

impl From<&ReconcileArgs> for ReconcileConfig {
    fn from(a: &ReconcileArgs) -> Self {
        Self {
            table_uri: a.tables.table_uri.clone(),
            every: a.every,
            snapshot_every: a.snapshot_every,
            drift_after: a.drift_after,
        }
    }
}

/// One reconciliation.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Report {
    /// The UTC day.
    pub day: NaiveDate,
    /// When the starting snapshot was taken (RFC 3339).
    pub start: String,
    /// The `positions_current` version read.
    pub book_version: i64,
    /// When it ran (RFC 3339).
    pub at: String,
    /// Lines per status.
    pub counts: BTreeMap<String, usize>,
    /// The keys that moved, by (account, conId).
    pub lines: Vec<Line>,
}

impl Report {
    /// How many lines have `status`.
    pub fn count(&self, status: Status) -> usize {
        self.counts.get(status.as_str()).copied().unwrap_or(0)
    }
}

fn day_of(us: i64) -> NaiveDate {
    chrono::DateTime::from_timestamp_micros(us)
        .map(|t| t.date_naive())
        .unwrap_or_default()
}

/// `d` as the number `YYYYMMDD` (how IB writes expiries).
fn yyyymmdd(d: NaiveDate) -> u32 {
    d.year() as u32 * 10_000 + d.month() * 100 + d.day()
}

/// Reconciles `book` against `start` and `fills` on `day` at `at` (µs).
fn lines(
    day: NaiveDate,
    start: &Start,
    fills: &[model::Fill],
    book: &read::Book,
    unexplained_since: &HashMap<Key, i64>,
    at: i64,
    drift_after: Duration,
) -> Vec<Line> {
    model::reconcile(&Inputs {
        start: &start.rows,
        start_time: start.time,
        fills,
        now: &book.rows,
        unexplained_since,
        day: yyyymmdd(day),
        at,
        drift_after: drift_after.as_micros() as i64,
    })
}

fn report(day: NaiveDate, start: &Start, book_version: i64, at: i64, lines: Vec<Line>) -> Report {
    let mut counts = BTreeMap::new();
    for s in [Status::Agrees, Status::Explained, Status::Pending, Status::Drifted] {
        counts.insert(s.as_str().to_string(), lines.iter().filter(|l| l.status == s).count());
    }
    Report {
        day,
        start: rfc3339_micros(start.time),
        book_version,
        at: rfc3339_micros(at),
        counts,
        lines,
    }
}

/// Reconciles from the tables as they are now, without writing: `possync reconcile`.
///
/// # Errors
/// [`ReconcileError::NoSnapshot`] before the service took the day's first snapshot; missing
/// tables; storage errors.
pub async fn check(cfg: &ReconcileConfig) -> Result<Report, ReconcileError> {
    let at = now_micros();
    let day = day_of(at);
    let base = &cfg.table_uri;
    let start = read::day_start(base, day)
        .await?
        .ok_or(ReconcileError::NoSnapshot(day))?;
    let book = read::book_now(base).await?;
    let fills = read::fills_since(base, day).await?;
    let unexplained = read::unexplained_since(base, day).await?;
    let lines = lines(day, &start, &fills, &book, &unexplained, at, cfg.drift_after);
    Ok(report(day, &start, book.version, at, lines))
}

/// The service's state between runs.
pub struct Reconciler {
    cfg: ReconcileConfig,
    start: Option<Start>,
    last_snapshot: Option<i64>,
    unexplained: HashMap<Key, i64>,
    drifted: usize,
}

impl Reconciler {
    pub fn new(cfg: ReconcileConfig) -> Self {
        Self {
            cfg,
            start: None,
            last_snapshot: None,
            unexplained: HashMap::new(),
            drifted: 0,
        }
    }

    /// One run at `at` (µs): snapshot when due, reconcile, write the `reconciliation` table,
    /// set the gauges.
    ///
    /// # Errors
    /// Missing `positions_current`; storage errors (the next run tries again).
    pub async fn run_once(&mut self, at: i64) -> Result<Report, ReconcileError> {
        let base = self.cfg.table_uri.clone();
        let day = day_of(at);
        let book = read::book_now(&base).await?;
        if self.start.as_ref().map(|s| s.day) != Some(day) {
            let start = match read::day_start(&base, day).await? {
                Some(s) => s,
                None => {
                    let n = write::snapshot(&base, &book, at, true).await?;
                    tracing::info!(%day, positions = n, book_version = book.version, "took the day's starting snapshot of the book");
                    self.last_snapshot = Some(at);
                    Start {
                        day,
                        time: at,
                        rows: book.rows.clone(),
                    }
                }
            };
            self.unexplained = read::unexplained_since(&base, day).await?;
            self.start = Some(start);
        }
        let every = self.cfg.snapshot_every.as_micros() as i64;
        if self.last_snapshot.is_none_or(|t| at - t >= every) {
            let n = write::snapshot(&base, &book, at, false).await?;
            tracing::debug!(positions = n, book_version = book.version, "snapshot of the book");
            self.last_snapshot = Some(at);
        }
        let start = self.start.as_ref().expect("set above");
        let fills = read::fills_since(&base, day).await?;
        let lines = lines(day, start, &fills, &book, &self.unexplained, at, self.cfg.drift_after);
        write::reconciliation(&base, day, at, &lines).await?;
        self.unexplained = lines
            .iter()
            .filter_map(|l| l.drifted_since.map(|s| ((l.account.clone(), l.con_id), s)))
            .collect();
        let r = report(day, start, book.version, at, lines);
        let m = metrics::global();
        m.reconcile_runs.fetch_add(1, Relaxed);
        m.reconciliation_drifted.store(r.count(Status::Drifted) as i64, Relaxed);
        m.reconciliation_pending.store(r.count(Status::Pending) as i64, Relaxed);
        let drifted = r.count(Status::Drifted);
        if drifted > 0 && drifted != self.drifted {
            let some: Vec<String> = r
                .lines
                .iter()
                .filter(|l| l.status == Status::Drifted)
                .take(5)
                .map(|l| {
                    format!(
                        "{}:{} ({}) diff {}",
                        l.account, l.con_id, l.contract.local_symbol, l.diff
                    )
                })
                .collect();
            tracing::warn!(drifted, examples = ?some, drift_after = ?self.cfg.drift_after, "positions differ from the day's start plus its fills with no explanation; `possync reconcile --problems` lists them");
        } else if drifted == 0 && self.drifted > 0 {
            tracing::info!("no position drifts from its fills any more");
        }
        self.drifted = drifted;
        Ok(r)
    }
}

/// The service: [`Reconciler::run_once`] every `--every` until `shutdown`. A failed run is
/// logged and tried again at the next.
///
/// # Errors
/// None today (failures are retried); the signature leaves room for a fatal one.
pub async fn watch(cfg: ReconcileConfig, shutdown: CancellationToken) -> Result<(), ReconcileError> {
    let every = cfg.every.max(Duration::from_millis(10));
    let mut r = Reconciler::new(cfg);
    tracing::info!(every = ?every, "reconciling positions against fills");
    loop {
        match r.run_once(now_micros()).await {
            Ok(report) => tracing::debug!(counts = ?report.counts, "reconciled"),
            Err(ReconcileError::Missing { table, .. }) => {
                tracing::debug!(table, "nothing to reconcile yet (no {table} table)")
            }
            Err(e) => tracing::warn!(error = %e, "reconciliation failed; trying again at the next run"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(every) => {}
        }
    }
}

/// The report as a table for a terminal.
pub fn render_text(r: &Report, problems_only: bool) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "reconciliation of {} (start {}, positions_current@v{}, at {}): {} agree, {} explained, {} pending, {} drifted",
        r.day,
        r.start,
        r.book_version,
        r.at,
        r.count(Status::Agrees),
        r.count(Status::Explained),
        r.count(Status::Pending),
        r.count(Status::Drifted)
    );
    let _ = writeln!(
        s,
        "{:<12} {:>10} {:<24} {:>10} {:>10} {:>6} {:>10} {:>10} {:<10} {:<10} since",
        "account", "con_id", "contract", "start", "filled", "fills", "now", "diff", "status", "reason"
    );
    for l in r
        .lines
        .iter()
        .filter(|l| !problems_only || matches!(l.status, Status::Pending | Status::Drifted))
    {
        let _ = writeln!(
            s,
            "{:<12} {:>10} {:<24} {:>10} {:>10} {:>6} {:>10} {:>10} {:<10} {:<10} {}",
            l.account,
            l.con_id,
            l.contract.local_symbol,
            l.start,
            l.filled,
            l.fills,
            l.now,
            l.diff,
            l.status.as_str(),
            l.reason.as_deref().unwrap_or("-"),
            l.drifted_since.map(rfc3339_micros).unwrap_or_else(|| "-".into())
        );
    }
    s
}
