//! Start-up from a snapshot: the Delta tables `possync materialize` writes, plus the Kafka
//! offsets stored in their txn actions, so ingest and the queue worker read only the tail of
//! their topics instead of replaying them whole.
//!
//! A table at one loaded version is a fold of a *prefix* of each partition: exactly the
//! offsets up to the txn version of that partition's app id
//! ([`crate::materialize::offsets::app_id`], under the materializer's offset namespace). So
//! the state at start-up is the table's rows, then every message from txn version + 1 to the
//! end of the log, folded with the same newest-wins order the table uses. This equals a full
//! replay while the topics still hold everything, and stays correct when they do not:
//!
//! - a partition the table never saw (another namespace, a new partition) is read from its
//!   beginning, on top of the rows;
//! - a partition whose log starts above txn version + 1 (retention deleted messages no table
//!   holds) is read from its start, with a warning: what the deleted messages said is lost,
//!   the state is what the table holds;
//! - no table yet (before the materializer's first start) means the old full replay.
//!
//! Files: [`rows`] (table rows back to events and queue items). `possync bench startup`
//! measures it ([`crate::scale::startup`]).

pub mod rows;

use std::collections::HashMap;
use std::time::Duration;

use deltalake::arrow::array::RecordBatch;
use rdkafka::consumer::BaseConsumer;

use crate::kafka::{KafkaConfig, KafkaError};
use crate::materialize::offsets::{self, app_id};
use crate::materialize::tables::TableError;
use crate::materialize::{namespace_guard, TableKind};
use crate::registry::TopicReplay;

/// Flags of the processes that can start from the tables (ingest, queue worker).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct SnapshotArgs {
    /// Base URI of the Delta tables `possync materialize` writes (its --table-uri). When set,
    /// start-up reads the state from them and only the tail of the topics after the offsets
    /// they hold, instead of replaying whole topics (slow with weeks of history, wrong once
    /// retention has deleted some). Unset: replay the topics from their beginning.
    #[arg(long = "table-uri", env = "POSSYNC_TABLE_URI")]
    pub table_uri: Option<String>,
    /// The materializer's offset namespace (its --offsets-namespace); default: the Kafka
    /// cluster id, as materialize uses.
    #[arg(long, env = "POSSYNC_OFFSETS_NAMESPACE")]
    pub offsets_namespace: Option<String>,
}

/// Where the snapshot is.
#[derive(Debug, Clone, PartialEq)]
pub struct SnapshotConfig {
    /// Base URI of the tables.
    pub table_uri: String,
    /// The materializer's offset namespace; `None` = the Kafka cluster id.
    pub namespace: Option<String>,
}

impl SnapshotArgs {
    /// The snapshot to start from, if a table URI is set.
    pub fn config(&self) -> Option<SnapshotConfig> {
        self.table_uri.as_ref().map(|uri| SnapshotConfig {
            table_uri: uri.clone(),
            namespace: self.offsets_namespace.clone(),
        })
    }
}

/// Errors of reading a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The table could not be read.
    #[error("reading the start-up snapshot from {uri}: {source}; check --table-uri / POSSYNC_TABLE_URI, or unset it to replay the topics instead")]
    Table {
        uri: String,
        #[source]
        source: TableError,
    },
    /// The namespace (cluster id) or the partitions could not be fetched.
    #[error("start-up snapshot: {0}; is Kafka reachable (--brokers)?")]
    Kafka(#[from] KafkaError),
    /// A row this build cannot read.
    #[error(transparent)]
    Row(#[from] rows::RowError),
    /// A blocking task failed.
    #[error("start-up snapshot: task failed: {0}")]
    Task(String),
}

/// One table as of one loaded version, and the offsets it holds.
#[derive(Debug)]
pub struct TableSnapshot {
    /// Which table.
    pub kind: TableKind,
    /// The version read (`None`: no table there yet).
    pub version: Option<i64>,
    /// The offset namespace used.
    pub namespace: String,
    /// Its rows.
    pub batches: Vec<RecordBatch>,
    /// Per topic, partition → next offset to read (txn version + 1); partitions the table has
    /// no offset for are absent (read from their beginning).
    pub next: HashMap<String, HashMap<i32, i64>>,
}

impl TableSnapshot {
    /// Rows read.
    pub fn rows(&self) -> usize {
        self.batches.iter().map(RecordBatch::num_rows).sum()
    }

    /// Where the tail of `topic` starts.
    pub fn tail_of(&self, topic: &str) -> HashMap<i32, i64> {
        self.next.get(topic).cloned().unwrap_or_default()
    }
}

/// Reads `kind` under the configured URI at its newest version, with the next offset of each
/// partition of `topics` as of that same version. A missing table is an empty snapshot.
///
/// # Errors
/// [`SnapshotError`]: storage, Kafka metadata.
pub async fn read(
    cfg: &SnapshotConfig,
    kafka: &KafkaConfig,
    kind: TableKind,
    topics: &[&str],
    timeout: Duration,
) -> Result<TableSnapshot, SnapshotError> {
    let namespace = offsets::namespace(kafka, cfg.namespace.as_deref()).await?;
    let table_err = |source| SnapshotError::Table {
        uri: cfg.table_uri.clone(),
        source,
    };
    let mut snap = TableSnapshot {
        kind,
        version: None,
        namespace: namespace.clone(),
        batches: vec![],
        next: HashMap::new(),
    };
    let Some(mut t) = crate::ops::open_existing(&cfg.table_uri, kind)
        .await
        .map_err(table_err)?
    else {
        tracing::info!(table = kind.name(), uri = %cfg.table_uri, "no table to start from yet (materialize creates it): reading the topics from their beginning");
        return Ok(snap);
    };
    if let Some(recorded) = namespace_guard::recorded(&t).map_err(table_err)? {
        if recorded != namespace {
            tracing::info!(table = kind.name(), %recorded, %namespace, "the table was last written under another offset namespace: its rows are the starting state and partitions it has no offsets for are read from their beginning (pass the materializer's --offsets-namespace if this is unexpected)");
        }
    }
    let k = kafka.clone();
    let names: Vec<String> = topics.iter().map(|s| s.to_string()).collect();
    let partitions = if names.is_empty() {
        vec![]
    } else {
        partitions(k, names, timeout).await?
    };
    for (topic, p) in partitions {
        if let Some(v) = t.txn_version(&app_id(&namespace, &topic, p)).await.map_err(table_err)? {
            snap.next.entry(topic).or_default().insert(p, v + 1);
        }
    }
    snap.version = Some(t.version());
    snap.batches = t.read_all().await.map_err(table_err)?;
    Ok(snap)
}

/// The partitions of `topics`, from cluster metadata.
async fn partitions(
    k: KafkaConfig,
    names: Vec<String>,
    timeout: Duration,
) -> Result<Vec<(String, i32)>, SnapshotError> {
    tokio::task::spawn_blocking(move || -> Result<Vec<(String, i32)>, KafkaError> {
        let c: BaseConsumer = k
            .consumer("possync-snapshot-probe")
            .create()
            .map_err(KafkaError::client("create metadata client"))?;
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        offsets::partitions_of(&c, &refs, timeout)
    })
    .await
    .map_err(|e| SnapshotError::Task(e.to_string()))?
    .map_err(SnapshotError::from)
}

/// A stretch of a partition that was deleted before anyone read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gap {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// The offsets lost.
    pub offsets: std::ops::Range<i64>,
}

/// Logs (and returns) what a replay starting at `replay`'s offsets cannot see: offsets
/// deleted by retention before `table` (or, without one, anybody) held them.
pub fn report_gaps(replay: &TopicReplay, table: Option<TableKind>) -> Vec<Gap> {
    let topic = replay.topic();
    let mut gaps = Vec::new();
    for s in replay.starts() {
        if s.beyond_end() {
            tracing::warn!(topic, partition = s.partition, table_next = s.wanted, log_end = s.high, "the table holds offsets beyond the end of this partition (was the topic recreated?); reading the whole partition on top of the table's rows");
        }
        let Some(lost) = s.dropped() else { continue };
        match table {
            Some(kind) => tracing::warn!(
                topic,
                partition = s.partition,
                lost_from = lost.start,
                lost_to = lost.end,
                table = kind.name(),
                "offsets {}..{} of {topic}/{} were deleted by retention before {} held them: the events among them are lost (some of these offsets may be transaction commit markers, which hold no event); the state is what the table holds plus the rest of the log (keep the topics' retention longer than any materializer outage)",
                lost.start,
                lost.end,
                s.partition,
                kind.name()
            ),
            None => tracing::warn!(
                topic,
                partition = s.partition,
                lost_from = lost.start,
                lost_to = lost.end,
                "offsets {}..{} of {topic}/{} were deleted by retention: the replay misses what only they held; start with --table-uri (the materializer's tables) to begin from its snapshot",
                lost.start,
                lost.end,
                s.partition
            ),
        }
        gaps.push(Gap {
            topic: topic.to_string(),
            partition: s.partition,
            offsets: lost,
        });
    }
    gaps
}
