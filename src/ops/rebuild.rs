//! `possync rebuild`: recreates the upsert tables from the audit log into fresh tables.
//!
//! `positions_current` and `position_queue` are folded from `position_events` with the
//! materializer's own merge rules ([`CurrentFold`], [`upsert::fold_queue_into`]), file by
//! file from one snapshot of the log, so the result is what the live tables hold once they have
//! materialized the same offsets. This is what event sourcing pays for once Kafka's retention
//! has dropped the topics' history.
//!
//! `strategy_registry` is folded from the registry's audit log, `registry_events`, with the
//! materializer's own rule ([`upsert::fold_registry_into`]), so it equals the live table at the same
//! offsets. Entries of the live table that the audit log cannot explain (written by an older
//! possync, before `registry_events` existed) are counted in the report, not copied. Tables
//! without `registry_events` get the live registry copied as it is, and the report says so.
//!
//! The target (`--to`) must not hold any of the three tables: rebuild only creates, it never
//! overwrites, and it never writes under the source. With `--offsets-namespace NS` each rebuilt
//! table also carries the Kafka offsets it reflects (the source `position_events`' txn versions
//! for every position topic-partition found in the log, `registry_events`' for every registry
//! partition found in it, or `strategy_registry`'s for registry partitions 0..64 when there is
//! no `registry_events`), so a materializer started with that namespace on the rebuilt tables
//! continues where the source stopped instead of replaying the topics from offset 0.

use std::collections::BTreeSet;

use deltalake::arrow::array::{AsArray, RecordBatch};
use deltalake::arrow::datatypes::Int32Type;
use deltalake::kernel::Action;
use serde::Serialize;

use super::{exists, open_existing};
use crate::kafka::Topics;
use crate::materialize::namespace_guard;
use crate::materialize::offsets::app_id;
use crate::materialize::tables::{rewrite_operation, Table, TableError};
use crate::materialize::upsert::{self, CurrentFold, QueueState};
use crate::materialize::TableKind;

/// Registry partitions probed for stored offsets (the log does not list its app ids).
const REGISTRY_PARTITIONS_PROBED: i32 = 64;

/// Errors of `possync rebuild`.
#[derive(Debug, thiserror::Error)]
pub enum RebuildError {
    /// A table could not be read or written.
    #[error(transparent)]
    Table(#[from] TableError),
    /// The source has no audit log.
    #[error("no position_events table under {0}; check --from / POSSYNC_TABLE_URI")]
    NoAuditLog(String),
    /// Source and target are the same place.
    #[error("--to is the source ({0}); rebuild writes fresh tables elsewhere and never touches the live ones")]
    SameLocation(String),
    /// The target already holds a table.
    #[error("{table} already exists under {to}; rebuild only creates fresh tables: remove it or pick an empty --to")]
    TargetExists { table: &'static str, to: String },
    /// The log's rows did not fit the schema (a bug).
    #[error("folding position_events: {0}")]
    Arrow(#[from] deltalake::arrow::error::ArrowError),
}

/// Flags of `possync rebuild`.
#[derive(clap::Args, Debug, Clone)]
pub struct RebuildArgs {
    /// Base URI of the live tables to rebuild from (only read).
    #[arg(long = "from", env = "POSSYNC_TABLE_URI", default_value = crate::materialize::config::DEFAULT_TABLE_URI)]
    pub from: String,
    /// Base URI to create the rebuilt tables under (must not hold them yet).
    #[arg(long, env = "POSSYNC_REBUILD_TO")]
    pub to: String,
    /// Carry the Kafka offsets of this namespace (the materializer's `--offsets-namespace`, or
    /// the Kafka cluster id) into the rebuilt tables; without it they carry none.
    #[arg(long, env = "POSSYNC_OFFSETS_NAMESPACE")]
    pub offsets_namespace: Option<String>,
    /// Topic prefix (names the registry topic whose offsets are carried).
    #[arg(long, env = "POSSYNC_TOPIC_PREFIX", default_value = "possync.")]
    pub topic_prefix: String,
}

/// Plain settings of `possync rebuild`.
#[derive(Debug, Clone)]
pub struct RebuildConfig {
    /// Source base URI.
    pub from: String,
    /// Target base URI.
    pub to: String,
    /// See [`RebuildArgs::offsets_namespace`].
    pub offsets_namespace: Option<String>,
    /// Topic names (the registry topic's offsets are carried).
    pub topics: Topics,
}

impl From<&RebuildArgs> for RebuildConfig {
    fn from(a: &RebuildArgs) -> Self {
        Self {
            from: a.from.clone(),
            to: a.to.clone(),
            offsets_namespace: a.offsets_namespace.clone(),
            topics: Topics::new(&a.topic_prefix),
        }
    }
}

/// What a rebuild did.
#[derive(Debug, Clone, Serialize)]
pub struct RebuildReport {
    /// Version of `position_events` folded.
    pub events_version: i64,
    /// Events folded.
    pub events: u64,
    /// Rows written per table.
    pub positions_current: usize,
    pub position_queue: usize,
    pub strategy_registry: usize,
    /// Where the registry came from.
    pub registry_source: String,
    /// Kafka offsets (txn actions) carried: position topic-partitions (into `positions_current`
    /// and `position_queue`) and registry partitions (into `strategy_registry`).
    pub position_offsets: usize,
    pub registry_offsets: usize,
}

impl std::fmt::Display for RebuildReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "folded {} events of position_events@v{}",
            self.events, self.events_version
        )?;
        writeln!(f, "positions_current : {} rows", self.positions_current)?;
        writeln!(f, "position_queue    : {} rows", self.position_queue)?;
        writeln!(
            f,
            "strategy_registry : {} rows ({})",
            self.strategy_registry, self.registry_source
        )?;
        write!(
            f,
            "kafka offsets     : {}",
            if self.position_offsets + self.registry_offsets > 0 {
                format!(
                    "carried for {} position and {} registry partitions",
                    self.position_offsets, self.registry_offsets
                )
            } else {
                "none carried (pass --offsets-namespace to let a materializer continue on these tables)".into()
            }
        )
    }
}

/// Rebuilds the three upsert tables under `cfg.to`.
///
/// # Errors
/// [`RebuildError`]: no audit log, target not fresh, storage errors.
pub async fn run(cfg: &RebuildConfig) -> Result<RebuildReport, RebuildError> {
    if cfg.from.trim_end_matches('/') == cfg.to.trim_end_matches('/') {
        return Err(RebuildError::SameLocation(cfg.to.clone()));
    }
    let targets = [
        TableKind::PositionsCurrent,
        TableKind::PositionQueue,
        TableKind::StrategyRegistry,
    ];
    for kind in targets {
        if exists(&cfg.to, kind.name()).await? {
            return Err(RebuildError::TargetExists {
                table: kind.name(),
                to: cfg.to.clone(),
            });
        }
    }
    let mut events = open_existing(&cfg.from, TableKind::PositionEvents)
        .await?
        .ok_or_else(|| RebuildError::NoAuditLog(cfg.from.clone()))?;

    // Fold the log, one file at a time, from one snapshot, in place (no copy of the state per
    // file: a year of daily files costs what one file of the same events costs).
    let mut current = CurrentFold::default();
    let mut queue = QueueState::new();
    let mut seen: BTreeSet<(String, i32)> = BTreeSet::new();
    let mut folded = 0u64;
    for f in events.files()? {
        let rows = events.read(std::slice::from_ref(&f)).await?;
        for b in &rows {
            folded += b.num_rows() as u64;
            collect_partitions(b, &mut seen);
        }
        current.add(&rows)?;
        upsert::fold_queue_into(&mut queue, &rows)?;
    }
    let current = current.finish()?;

    // The registry: folded from its audit log, registry_events, when there is one.
    let mut registry_table = open_existing(&cfg.from, TableKind::StrategyRegistry).await?;
    let registry_log = open_existing(&cfg.from, TableKind::RegistryEvents).await?;
    let mut registry_seen: BTreeSet<(String, i32)> = BTreeSet::new();
    let (registry, registry_source) = match &registry_log {
        Some(log) => {
            let mut state = upsert::RegistryState::new();
            let mut n = 0u64;
            for f in log.files()? {
                let rows = log.read(std::slice::from_ref(&f)).await?;
                for b in &rows {
                    n += b.num_rows() as u64;
                    collect_partitions(b, &mut registry_seen);
                }
                upsert::fold_registry_into(&mut state, &rows)?;
            }
            let mut source = format!("folded from {n} registry_events@v{}", log.version());
            // Entries of the live table the audit log cannot explain: written before
            // registry_events existed (an older possync). Reported, never copied.
            if let Some(t) = &registry_table {
                let live = upsert::registry_from_batches(&t.read_all().await?)?;
                let missing = live.keys().filter(|k| !state.contains_key(*k)).count();
                if missing > 0 {
                    source.push_str(&format!(
                        "; {missing} entries of the live strategy_registry predate registry_events and are not in the rebuild: re-seed them with possync registry activate"
                    ));
                }
            }
            (state, source)
        }
        None => match &registry_table {
            Some(t) => (
                upsert::registry_from_batches(&t.read_all().await?)?,
                "copied from strategy_registry as-is: there is no registry_events audit table (written by possync materialize since it records registry history)".to_string(),
            ),
            None => (
                upsert::RegistryState::new(),
                "empty: the source has neither strategy_registry nor registry_events".to_string(),
            ),
        },
    };

    // Offsets the rebuilt tables reflect.
    let mut position_txns = Vec::new();
    let mut registry_txns = Vec::new();
    if let Some(ns) = &cfg.offsets_namespace {
        for (topic, p) in &seen {
            let id = app_id(ns, topic, *p);
            if let Some(v) = events.txn_version(&id).await? {
                position_txns.push((id, v));
            }
        }
        match (registry_log, registry_table.as_mut()) {
            // The offsets the fold reflects: registry_events' own.
            (Some(mut log), _) => {
                for (topic, p) in &registry_seen {
                    let id = app_id(ns, topic, *p);
                    if let Some(v) = log.txn_version(&id).await? {
                        registry_txns.push((id, v));
                    }
                }
            }
            (None, Some(t)) => {
                for p in 0..REGISTRY_PARTITIONS_PROBED {
                    let id = app_id(ns, &cfg.topics.registry, p);
                    if let Some(v) = t.txn_version(&id).await? {
                        registry_txns.push((id, v));
                    }
                }
            }
            (None, None) => {}
        }
    }

    let queue_batch = upsert::queue_batch(&queue)?;
    let registry_batch = upsert::registry_batch(&registry)?;
    let ns = cfg.offsets_namespace.as_deref();
    write(
        &cfg.to,
        TableKind::PositionsCurrent,
        current.batch(),
        &position_txns,
        ns,
    )
    .await?;
    write(&cfg.to, TableKind::PositionQueue, &queue_batch, &position_txns, ns).await?;
    write(
        &cfg.to,
        TableKind::StrategyRegistry,
        &registry_batch,
        &registry_txns,
        ns,
    )
    .await?;
    Ok(RebuildReport {
        events_version: events.version(),
        events: folded,
        positions_current: current.len(),
        position_queue: queue.len(),
        strategy_registry: registry.len(),
        registry_source,
        position_offsets: position_txns.len(),
        registry_offsets: registry_txns.len(),
    })
}

fn collect_partitions(b: &RecordBatch, seen: &mut BTreeSet<(String, i32)>) {
    let (Some(t), Some(p)) = (b.column_by_name("kafka_topic"), b.column_by_name("kafka_partition")) else {
        return;
    };
    let (t, p) = (t.as_string::<i32>(), p.as_primitive::<Int32Type>());
    for i in 0..b.num_rows() {
        if !seen.contains(&(t.value(i).to_string(), p.value(i))) {
            seen.insert((t.value(i).to_string(), p.value(i)));
        }
    }
}

/// Creates `kind` under `base` with `batch` as its one file, in one commit with `txns`; with a
/// namespace, the table records it (so a materializer under another one is refused).
async fn write(
    base: &str,
    kind: TableKind,
    batch: &RecordBatch,
    txns: &[(String, i64)],
    namespace: Option<&str>,
) -> Result<(), TableError> {
    let mut t = Table::open(base, kind).await?;
    let adds = t.write_files(std::slice::from_ref(batch)).await?;
    if !adds.is_empty() || !txns.is_empty() {
        let actions = adds.into_iter().map(Action::Add).collect();
        // The summary `possync status` reads (the upsert tables').
        let mut counts = upsert::summary::Counts::default();
        upsert::summary::count(kind, batch, &mut counts).map_err(|source| TableError::Arrow {
            table: kind.name(),
            source,
        })?;
        let info = upsert::summary::info(kind, &counts);
        t.commit_with(actions, txns, rewrite_operation(), 0, info).await?;
    }
    if let Some(ns) = namespace {
        namespace_guard::record(&mut t, ns).await?;
    }
    Ok(())
}
