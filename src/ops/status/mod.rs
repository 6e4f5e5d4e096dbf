//! `possync status`: is the pipeline keeping up? Reads the brokers and the tables, prints a
//! report (text or `--json`), and says unhealthy with a non-zero exit.
//!
//! Per input topic-partition: the high watermark, the Delta txn version (the last offset the
//! tables hold: the minimum over the tables the topic feeds, as the materializer's restart
//! position uses it), the lag in events (high watermark − txn version − 1) and in seconds (age
//! of the oldest message not yet materialized: the broker timestamp of the message at txn
//! version + 1, read with one fetch; 0 when nothing is behind).
//!
//! From the tables: *slots in use* is the number of open positions (`position <> 0`) whose
//! newest event in `positions_current` came on the ACTIVE route, i.e. the contracts ingest
//! streams in real time (ingest routes a covered contract without a slot to the queued route,
//! so this never counts overflow). With `--ingest-metrics URL` the report also shows ingest's
//! own gauges (`possync_slots_in_use`, `possync_slot_budget`, `possync_slot_overflow_total`).
//! *Queue depth* is the `position_queue` rows with status `pending` (changed since their last
//! refresh). *Dead letters* is the row count of `dead_letters` (from the Delta file
//! statistics). *Last commit* is the commit timestamp of each table's newest version.
//!
//! Cost: the slot and queue counts come from the summary the materializer writes into the
//! `commitInfo` of each of its commits on the upsert tables ([`summary`]): one read of the
//! newest log entry of each, whatever the number of keys; commits that change no rows
//! (vacuum, `txn` re-stamps, a layout migration) are walked back over, up to
//! [`SUMMARY_WALK`] entries. A table whose newest data commit carries no summary (written by an
//! older possync, or another writer) is scanned, as `--exact` always does. The last commit
//! times are read from the newest log entries, never from a listing of the log.
//!
//! Unhealthy (exit 1) when: a partition's lag exceeds `--max-lag-seconds`; the total lag
//! exceeds `--max-lag-events`; offsets the tables still need are gone from the broker (loss); the tables hold offsets
//! past the end of the log (the topic was recreated or truncated);
//! a table is missing; `position_events`' last commit is older than `--max-commit-age` (off by
//! default: a quiet market commits nothing); the queue depth or dead letters exceed their
//! maximum; ingest's metrics were asked for but cannot be read, or report more slots than the
//! budget. A status that cannot be determined (broker unreachable) is an error, also exit 1.

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use serde::Serialize;

mod log;
mod render;

pub use render::render_text;

pub use log::upsert_counts;
use log::{counted, log_entry, row_count, LogEntry};

use super::{open_existing, rfc3339_micros};
use crate::kafka::{KafkaArgs, KafkaConfig, KafkaError};
use crate::materialize::offsets::{app_id, partitions_of, tables_of};
use crate::materialize::tables::{Table, TableError};
use crate::materialize::upsert::summary;
use crate::materialize::{TableArgs, TableKind};

/// Log entries walked back from the newest to find an upsert table's summary before scanning it.
pub const SUMMARY_WALK: usize = 32;

/// Errors of `possync status` (a status that cannot be determined).
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    /// Kafka could not be asked (unreachable, bad settings).
    #[error("{0}; check --brokers / POSSYNC_BROKERS")]
    Kafka(#[from] KafkaError),
    /// A table could not be read.
    #[error("{0}; check --table-uri / POSSYNC_TABLE_URI")]
    Table(#[from] TableError),
    /// A background probe failed.
    #[error("status probe failed: {0}")]
    Task(String),
}

/// Flags of `possync status`.
#[derive(clap::Args, Debug, Clone)]
pub struct StatusArgs {
    #[command(flatten)]
    pub kafka: KafkaArgs,
    #[command(flatten)]
    pub tables: TableArgs,
    /// Offset namespace of the txn app ids (what the materializer was given); default: the
    /// Kafka cluster id, as the materializer uses it.
    #[arg(long, env = "POSSYNC_OFFSETS_NAMESPACE")]
    pub offsets_namespace: Option<String>,
    /// Ingest's metrics endpoint (e.g. `http://127.0.0.1:9464/metrics`): adds its exact slot
    /// gauges to the report.
    #[arg(long, env = "POSSYNC_STATUS_INGEST_METRICS")]
    pub ingest_metrics: Option<url::Url>,
    /// Unhealthy when the oldest unmaterialized message of a partition is older than this
    /// many seconds.
    #[arg(long, env = "POSSYNC_STATUS_MAX_LAG_SECONDS", default_value_t = 60.0)]
    pub max_lag_seconds: f64,
    /// Unhealthy when more than this many events (all partitions) are not materialized yet;
    /// default: no limit on the count (the age above is what matters).
    #[arg(long, env = "POSSYNC_STATUS_MAX_LAG_EVENTS")]
    pub max_lag_events: Option<i64>,
    /// Unhealthy when `position_events`' last commit is older than this (`10m`, `1h`); off by
    /// default, since a quiet market commits nothing.
    #[arg(long, env = "POSSYNC_STATUS_MAX_COMMIT_AGE", value_parser = humantime::parse_duration)]
    pub max_commit_age: Option<Duration>,
    /// Unhealthy when more queue items than this are pending.
    #[arg(long, env = "POSSYNC_STATUS_MAX_QUEUE_DEPTH")]
    pub max_queue_depth: Option<u64>,
    /// Unhealthy when `dead_letters` holds more rows than this.
    #[arg(long, env = "POSSYNC_STATUS_MAX_DEAD_LETTERS")]
    pub max_dead_letters: Option<u64>,
    /// Print the report as JSON (one object) instead of text.
    #[arg(long, env = "POSSYNC_STATUS_JSON")]
    pub json: bool,
    /// Count the slots in use and the queue by scanning `positions_current` and
    /// `position_queue` (O(keys)) instead of reading the summary of their newest commit.
    #[arg(long, env = "POSSYNC_STATUS_EXACT")]
    pub exact: bool,
}

/// Plain settings of `possync status` (tests build them without clap).
#[derive(Debug, Clone)]
pub struct StatusConfig {
    /// Base URI of the tables.
    pub table_uri: String,
    /// See [`StatusArgs::offsets_namespace`].
    pub offsets_namespace: Option<String>,
    /// See [`StatusArgs::ingest_metrics`].
    pub ingest_metrics: Option<url::Url>,
    /// See [`StatusArgs::max_lag_seconds`].
    pub max_lag_seconds: f64,
    /// See [`StatusArgs::max_lag_events`].
    pub max_lag_events: Option<i64>,
    /// See [`StatusArgs::max_commit_age`].
    pub max_commit_age: Option<Duration>,
    /// See [`StatusArgs::max_queue_depth`].
    pub max_queue_depth: Option<u64>,
    /// See [`StatusArgs::max_dead_letters`].
    pub max_dead_letters: Option<u64>,
    /// See [`StatusArgs::exact`].
    pub exact: bool,
}

impl Default for StatusConfig {
    fn default() -> Self {
        Self {
            table_uri: crate::materialize::config::DEFAULT_TABLE_URI.to_string(),
            offsets_namespace: None,
            ingest_metrics: None,
            max_lag_seconds: 60.0,
            max_lag_events: None,
            max_commit_age: None,
            max_queue_depth: None,
            max_dead_letters: None,
            exact: false,
        }
    }
}

impl From<&StatusArgs> for StatusConfig {
    fn from(a: &StatusArgs) -> Self {
        Self {
            table_uri: a.tables.table_uri.clone(),
            offsets_namespace: a.offsets_namespace.clone(),
            ingest_metrics: a.ingest_metrics.clone(),
            max_lag_seconds: a.max_lag_seconds,
            max_lag_events: a.max_lag_events,
            max_commit_age: a.max_commit_age,
            max_queue_depth: a.max_queue_depth,
            max_dead_letters: a.max_dead_letters,
            exact: a.exact,
        }
    }
}

/// One input topic-partition.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct PartitionStatus {
    pub topic: String,
    pub partition: i32,
    /// First offset the broker still has.
    pub log_start: i64,
    /// Next offset the broker will assign.
    pub high_watermark: i64,
    /// Last offset the tables hold (min over the tables the topic feeds); `None` = none yet.
    pub txn_version: Option<i64>,
    /// Per table: last offset it holds.
    pub table_versions: BTreeMap<String, Option<i64>>,
    /// Offsets not materialized yet.
    pub lag_events: i64,
    /// Age of the oldest unmaterialized message (0 when none; `None` = could not be read).
    pub lag_seconds: Option<f64>,
    /// Offsets the tables still need that the broker no longer has (lost).
    pub lost_events: i64,
}

/// One table.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct TableStatus {
    pub table: String,
    /// Newest version (`None` = the table does not exist).
    pub version: Option<i64>,
    /// Commit timestamp of that version (RFC 3339).
    pub last_commit: Option<String>,
    /// Seconds since that commit.
    pub commit_age_seconds: Option<f64>,
}

/// Slot usage.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct Slots {
    /// Open positions whose newest event came on the ACTIVE route (from `positions_current`).
    pub active_open_positions: u64,
    /// Ingest's `possync_slots_in_use` (with `--ingest-metrics`).
    pub ingest_in_use: Option<i64>,
    /// Ingest's `possync_slot_budget`.
    pub ingest_budget: Option<i64>,
    /// Ingest's `possync_slot_overflow_total`.
    pub ingest_overflow_total: Option<i64>,
}

/// Queue rows by status.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Default)]
pub struct Queue {
    /// Rows with status `pending`: the queue depth.
    pub depth: u64,
    pub refreshed: u64,
    /// Closed positions the worker no longer polls.
    #[serde(default)]
    pub closed: u64,
    pub active: u64,
}

/// The `reconciliation` table as the service last wrote it.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Default)]
pub struct Reconciliation {
    /// When it was written (RFC 3339); `None` when it holds no line.
    pub reconciled_at: Option<String>,
    /// Keys unexplained for the service's `--drift-after` or longer.
    pub drifted: u64,
    /// Keys unexplained for less.
    pub pending: u64,
    /// Since when the oldest drift (RFC 3339).
    pub oldest_drift: Option<String>,
    /// A few drifted keys: `account:con_id local_symbol diff`.
    pub examples: Vec<String>,
}

/// Reads the `reconciliation` table; `None` when there is none.
async fn reconciliation(base: &str) -> Result<Option<Reconciliation>, StatusError> {
    let Some(t) = super::open_existing(base, TableKind::Reconciliation).await? else {
        return Ok(None);
    };
    let batches = t.read_all().await?;
    let mut r = Reconciliation::default();
    let mut at = None;
    let mut oldest: Option<i64> = None;
    for b in &batches {
        let row = super::Row(b);
        for i in 0..b.num_rows() {
            at = at.max(row.ts("reconciled_at", i));
            // The statuses of `reconcile::model::Status`.
            match row.str_ref("status", i) {
                Some("drifted") => {
                    r.drifted += 1;
                    let since = row.ts("drifted_since", i);
                    oldest = match (oldest, since) {
                        (Some(a), Some(b)) => Some(a.min(b)),
                        (a, b) => a.or(b),
                    };
                    if r.examples.len() < 5 {
                        r.examples.push(format!(
                            "{}:{} {} diff {}",
                            row.str_ref("account", i).unwrap_or_default(),
                            row.i64("con_id", i).unwrap_or_default(),
                            row.str_ref("local_symbol", i).unwrap_or_default(),
                            row.f64("diff", i).unwrap_or_default()
                        ));
                    }
                }
                Some("pending") => r.pending += 1,
                _ => {}
            }
        }
    }
    r.reconciled_at = at.map(super::rfc3339_micros);
    r.oldest_drift = oldest.map(super::rfc3339_micros);
    Ok(Some(r))
}

/// The whole report.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct Status {
    /// When it was taken (RFC 3339).
    pub checked_at: String,
    pub table_uri: String,
    /// Offset namespace of the txn app ids.
    pub namespace: String,
    pub partitions: Vec<PartitionStatus>,
    /// Sum over the partitions.
    pub lag_events: i64,
    /// Largest over the partitions.
    pub lag_seconds: Option<f64>,
    pub slots: Slots,
    pub queue: Queue,
    pub dead_letters: u64,
    pub tables: Vec<TableStatus>,
    /// The last reconciliation of positions against fills (`None`: no `reconciliation`
    /// table, no service has run).
    #[serde(default)]
    pub reconciliation: Option<Reconciliation>,
    /// Where the slot and queue counts come from, per table: `summary@vN` (the summary a
    /// commit carries, N its version) or `scan@vN`.
    #[serde(default)]
    pub counted_from: BTreeMap<String, String>,
    /// Why it is unhealthy (empty = healthy).
    pub problems: Vec<String>,
    pub healthy: bool,
}

struct Watermark {
    topic: String,
    partition: i32,
    low: i64,
    high: i64,
}

/// Takes the status of the pipeline.
///
/// # Errors
/// [`StatusError`] when the brokers or the tables cannot be read at all.
pub async fn check(cfg: &StatusConfig, kafka: &KafkaConfig) -> Result<Status, StatusError> {
    let namespace = crate::materialize::namespace(kafka, cfg.offsets_namespace.as_deref()).await?;
    let k = kafka.clone();
    let marks = tokio::task::spawn_blocking(move || watermarks(&k))
        .await
        .map_err(|e| StatusError::Task(e.to_string()))??;
    let mut problems = Vec::new();

    let mut tables: BTreeMap<TableKind, Table> = BTreeMap::new();
    for kind in TableKind::ALL {
        match open_existing(&cfg.table_uri, kind).await? {
            Some(t) => {
                tables.insert(kind, t);
            }
            None => problems.push(format!(
                "table {} does not exist under {} (has materialize ever run there?)",
                kind.name(),
                cfg.table_uri
            )),
        }
    }

    // The materializer refuses to start on tables of another namespace; so does this report.
    if let Some(t) = tables.get(&TableKind::PositionEvents) {
        if let Some(recorded) = crate::materialize::namespace_guard::recorded(t)?.filter(|r| *r != namespace) {
            problems.push(format!(
                "the tables were last written under offsets namespace {recorded}, this report uses {namespace}: pass --offsets-namespace {recorded} (a materializer with {namespace} would refuse to start)"
            ));
        }
    }

    // Per partition: what the tables hold, and what is behind.
    let mut partitions = Vec::new();
    for m in &marks {
        let id = app_id(&namespace, &m.topic, m.partition);
        let mut table_versions = BTreeMap::new();
        let mut held: Option<Option<i64>> = None;
        for kind in tables_of(&kafka.topics, &m.topic) {
            let v = match tables.get_mut(kind) {
                Some(t) => t.txn_version(&id).await?,
                None => None,
            };
            table_versions.insert(kind.name().to_string(), v);
            held = Some(match held {
                None => v,
                Some(h) => h.min(v),
            });
        }
        let txn_version = held.flatten();
        let next = txn_version.map_or(0, |v| v + 1);
        let lag_events = (m.high - next).max(0);
        let lost_events = if lag_events > 0 { (m.low - next).max(0) } else { 0 };
        if next > m.high {
            problems.push(format!(
                "{}/{}: the tables hold offsets up to {} but the log ends at {}: the topic was deleted and recreated, or its log truncated; materialize stops on it (see `possync materialize`'s error)",
                m.topic,
                m.partition,
                next - 1,
                m.high - 1
            ));
        }
        if lost_events > 0 {
            problems.push(format!(
                "{}/{}: offsets {next}..{} are gone from the broker before materialize read them ({lost_events} events lost)",
                m.topic, m.partition, m.low
            ));
        }
        partitions.push(PartitionStatus {
            topic: m.topic.clone(),
            partition: m.partition,
            log_start: m.low,
            high_watermark: m.high,
            txn_version,
            table_versions,
            lag_events,
            lag_seconds: (lag_events == 0).then_some(0.0),
            lost_events,
        });
    }

    // Age of the oldest unmaterialized message, one fetch per lagging partition.
    let behind: Vec<(String, i32, i64)> = partitions
        .iter()
        .filter(|p| p.lag_events > 0)
        .map(|p| {
            (
                p.topic.clone(),
                p.partition,
                p.txn_version.map_or(0, |v| v + 1).max(p.log_start),
            )
        })
        .collect();
    if !behind.is_empty() {
        let k = kafka.clone();
        let stamps = tokio::task::spawn_blocking(move || crate::kafka::first_committed(&k, &behind))
            .await
            .map_err(|e| StatusError::Task(e.to_string()))??;
        let now = chrono::Utc::now().timestamp_millis();
        for p in partitions.iter_mut() {
            match stamps.get(&(p.topic.clone(), p.partition)) {
                Some(Some(ts)) => p.lag_seconds = Some((now - ts).max(0) as f64 / 1000.0),
                // Only commit markers (or aborted events) lie behind: nothing to materialize.
                Some(None) => {
                    p.lag_events = 0;
                    p.lag_seconds = Some(0.0);
                }
                None => {}
            }
        }
    }
    let lag_events = partitions.iter().map(|p| p.lag_events).sum();
    let lag_seconds = partitions
        .iter()
        .map(|p| p.lag_seconds)
        .try_fold(0.0f64, |acc, s| s.map(|s| acc.max(s)));
    for p in &partitions {
        match p.lag_seconds {
            Some(s) if s > cfg.max_lag_seconds => problems.push(format!(
                "{}/{}: oldest unmaterialized event is {s:.1}s old (limit {}s; {} events behind)",
                p.topic, p.partition, cfg.max_lag_seconds, p.lag_events
            )),
            None => problems.push(format!(
                "{}/{}: {} events behind, and the oldest of them could not be read",
                p.topic, p.partition, p.lag_events
            )),
            _ => {}
        }
    }
    if let Some(max) = cfg.max_lag_events {
        if lag_events > max {
            problems.push(format!("{lag_events} events not materialized (limit {max})"));
        }
    }

    // From the tables: the newest log entry of each (its commit time; for the upsert tables,
    // their summary).
    let mut newest: BTreeMap<TableKind, LogEntry> = BTreeMap::new();
    for (kind, t) in &tables {
        if let Some(e) = log_entry(t, t.version()).await? {
            newest.insert(*kind, e);
        }
    }
    let mut counted_from = BTreeMap::new();
    let counts = |kind: TableKind| {
        let t = tables.get(&kind);
        let newest = newest.get(&kind).cloned();
        async move {
            match t {
                Some(t) => counted(t, cfg.exact, newest).await.map(Some),
                None => Ok::<_, StatusError>(None),
            }
        }
    };
    let mut slots = Slots {
        active_open_positions: 0,
        ingest_in_use: None,
        ingest_budget: None,
        ingest_overflow_total: None,
    };
    if let Some((c, from)) = counts(TableKind::PositionsCurrent).await? {
        slots.active_open_positions = c[usize::from(summary::CURRENT_ACTIVE_OPEN)];
        counted_from.insert(TableKind::PositionsCurrent.name().to_string(), from);
    }
    let mut queue = Queue::default();
    if let Some((c, from)) = counts(TableKind::PositionQueue).await? {
        queue = Queue {
            depth: c[usize::from(summary::QUEUE_PENDING)],
            refreshed: c[usize::from(summary::QUEUE_REFRESHED)],
            closed: c[usize::from(summary::QUEUE_CLOSED)],
            active: c[usize::from(summary::QUEUE_ACTIVE)],
        };
        counted_from.insert(TableKind::PositionQueue.name().to_string(), from);
    }
    if let Some(max) = cfg.max_queue_depth {
        if queue.depth > max {
            problems.push(format!("queue depth {} (limit {max})", queue.depth));
        }
    }
    let dead_letters = match tables.get(&TableKind::DeadLetters) {
        Some(t) => row_count(t).await?,
        None => 0,
    };
    if let Some(max) = cfg.max_dead_letters {
        if dead_letters > max {
            problems.push(format!("{dead_letters} dead letters (limit {max})"));
        }
    }
    let reconciliation = reconciliation(&cfg.table_uri).await?;
    if let Some(r) = reconciliation.as_ref().filter(|r| r.drifted > 0) {
        problems.push(format!(
            "{} positions differ from the day's start plus its fills with no explanation (the oldest since {}), e.g. {}; `possync reconcile --problems` lists them",
            r.drifted,
            r.oldest_drift.as_deref().unwrap_or("?"),
            r.examples.join(", ")
        ));
    }
    let now = chrono::Utc::now();
    let mut table_status = Vec::new();
    for kind in TableKind::ALL {
        let mut s = TableStatus {
            table: kind.name().to_string(),
            version: None,
            last_commit: None,
            commit_age_seconds: None,
        };
        if let Some(t) = tables.get(&kind) {
            s.version = Some(t.version());
            if let Some(ms) = newest.get(&kind).and_then(|e| e.timestamp) {
                s.last_commit = Some(rfc3339_micros(ms * 1000));
                let age = (now.timestamp_millis() - ms).max(0) as f64 / 1000.0;
                s.commit_age_seconds = Some(age);
                if let (TableKind::PositionEvents, Some(max)) = (kind, cfg.max_commit_age) {
                    if age > max.as_secs_f64() {
                        problems.push(format!(
                            "position_events last committed {age:.0}s ago (limit {})",
                            humantime::format_duration(max)
                        ));
                    }
                }
            }
        }
        table_status.push(s);
    }

    if let Some(url) = &cfg.ingest_metrics {
        match scrape(url).await {
            Ok(m) => {
                slots.ingest_in_use = m.get("possync_slots_in_use").copied();
                slots.ingest_budget = m.get("possync_slot_budget").copied();
                slots.ingest_overflow_total = m.get("possync_slot_overflow_total").copied();
                if let (Some(u), Some(b)) = (slots.ingest_in_use, slots.ingest_budget) {
                    if u > b {
                        problems.push(format!("ingest holds {u} slots, over its budget of {b}"));
                    }
                }
            }
            Err(e) => problems.push(format!("ingest metrics at {url}: {e}")),
        }
    }

    Ok(Status {
        checked_at: now.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        table_uri: cfg.table_uri.clone(),
        namespace,
        partitions,
        lag_events,
        lag_seconds,
        slots,
        queue,
        dead_letters,
        tables: table_status,
        reconciliation,
        counted_from,
        healthy: problems.is_empty(),
        problems,
    })
}

fn watermarks(kafka: &KafkaConfig) -> Result<Vec<Watermark>, KafkaError> {
    let c: BaseConsumer = kafka
        .consumer("possync-status-probe")
        .create()
        .map_err(KafkaError::client("create status probe"))?;
    let t = &kafka.topics;
    let parts = partitions_of(
        &c,
        &crate::materialize::offsets::input_topics(t),
        Duration::from_secs(10),
    )?;
    parts
        .into_iter()
        .map(|(topic, partition)| {
            let (low, high) = c
                .fetch_watermarks(&topic, partition, Duration::from_secs(10))
                .map_err(KafkaError::client(format!("watermarks of {topic}/{partition}")))?;
            Ok(Watermark {
                topic,
                partition,
                low,
                high,
            })
        })
        .collect()
}

/// One `GET` of a Prometheus text endpoint: unlabelled samples by name.
async fn scrape(url: &url::Url) -> Result<BTreeMap<String, i64>, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    if url.scheme() != "http" {
        return Err("only http:// metrics endpoints are supported".into());
    }
    let host = url.host_str().ok_or("no host in the URL")?;
    let port = url.port_or_known_default().unwrap_or(80);
    let io = async {
        let mut s = tokio::net::TcpStream::connect((host, port)).await?;
        let req = format!(
            "GET {} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n",
            url.path()
        );
        s.write_all(req.as_bytes()).await?;
        let mut body = String::new();
        s.read_to_string(&mut body).await?;
        std::io::Result::Ok(body)
    };
    let text = tokio::time::timeout(Duration::from_secs(5), io)
        .await
        .map_err(|_| "no answer within 5 s".to_string())?
        .map_err(|e| e.to_string())?;
    let (head, body) = text.split_once("\r\n\r\n").ok_or("not an HTTP response")?;
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        return Err(format!("answered {}", head.lines().next().unwrap_or("")));
    }
    Ok(body
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (name, v) = l.split_once(' ')?;
            let v: f64 = v.trim().parse().ok()?;
            (!name.contains('{')).then(|| (name.to_string(), v as i64))
        })
        .collect())
}

#[cfg(test)]
mod tests;
