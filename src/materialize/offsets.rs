//! Kafka offsets stored in Delta: txn app ids, the versions they hold, and catching up.
//!
//! Every commit carries one `txn` action per Kafka (topic, partition) it contains, with app id
//! `possync-<namespace>-<topic>-<partition>` and version = the last offset consumed from it. The
//! namespace is the Kafka cluster id: the embedded broker of `possync run` starts empty (offsets
//! from 0 again) and reports a new id, so its offsets never collide with those a previous run
//! stored in the same tables. librdkafka's mock cluster derives its id from a heap address,
//! which is unique per process in practice but not guaranteed; `--offsets-namespace` overrides
//! the id where that matters (or for a real cluster that was rebuilt under the same id). Each
//! table records the namespace it was written under and a changed one is refused at start-up
//! ([`super::namespace_guard`]). Txn actions carry `lastUpdated` and expire after the tables'
//! `delta.setTransactionRetentionDuration`; owned idle partitions are re-stamped before that
//! (`flush::Pipeline::restamp`).
//!
//! A table's [`TxnMap`](crate::delta::txn::TxnMap) is exact as of the table's loaded version: entries come from the log
//! (kernel replay, on first use of an app id), then from our own commits and from parsing the
//! commits of others when the table is reloaded. A partition's restart position is the minimum
//! over the tables fed by its topic of (version + 1); each table then drops what it already holds.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};

use super::tables::{Table, TableKind};
use super::MaterializeError;
use crate::kafka::{KafkaConfig, KafkaError, Topics};

/// The Delta txn app id of a Kafka partition.
pub fn app_id(namespace: &str, topic: &str, partition: i32) -> String {
    format!("possync-{namespace}-{topic}-{partition}")
}

/// The topics materialize reads: the two position topics, the registry and the executions.
pub fn input_topics(topics: &Topics) -> [&str; 4] {
    [&topics.active, &topics.queued, &topics.registry, &topics.executions]
}

/// The tables fed by a topic (the offsets of its partitions live in each of them).
pub fn tables_of(topics: &Topics, topic: &str) -> &'static [TableKind] {
    if topic == topics.registry {
        &[TableKind::StrategyRegistry, TableKind::RegistryEvents]
    } else if topic == topics.executions {
        &[TableKind::Executions]
    } else {
        &[
            TableKind::PositionEvents,
            TableKind::PositionsCurrent,
            TableKind::PositionQueue,
        ]
    }
}

/// Next offset to consume per (topic, partition): min over the topic's tables of version + 1
/// (0 when a table never saw the partition).
///
/// # Errors
/// Storage errors.
pub async fn restart_positions(
    tables: &mut HashMap<TableKind, Table>,
    namespace: &str,
    topics: &Topics,
    partitions: &[(String, i32)],
) -> Result<HashMap<(String, i32), i64>, MaterializeError> {
    let mut out = HashMap::new();
    for (topic, p) in partitions {
        let id = app_id(namespace, topic, *p);
        let mut next = i64::MAX;
        for kind in tables_of(topics, topic) {
            let t = tables.get_mut(kind).expect("all tables are open");
            let v = t.txn_version(&id).await?;
            next = next.min(v.map_or(0, |v| v + 1));
        }
        out.insert((topic.clone(), *p), next);
    }
    Ok(out)
}

/// The partitions of `topics` (from cluster metadata).
///
/// # Errors
/// [`KafkaError`] when metadata cannot be fetched.
pub fn partitions_of<X: ConsumerContext, C: Consumer<X>>(
    consumer: &C,
    topics: &[&str],
    timeout: Duration,
) -> Result<Vec<(String, i32)>, KafkaError> {
    let mut out = Vec::new();
    for t in topics {
        let md = consumer
            .fetch_metadata(Some(t), timeout)
            .map_err(KafkaError::client(format!("metadata of {t}")))?;
        for mt in md.topics() {
            for p in mt.partitions() {
                out.push((mt.name().to_string(), p.id()));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Offsets still to materialize: for each (topic, partition) of the input topics, the high
/// watermark minus the committed restart position (0 when only transaction markers or aborted
/// events lie between them), as (total, per-partition detail).
///
/// # Errors
/// Kafka or table errors.
pub async fn lag(
    table_uri: &str,
    namespace: &str,
    kafka: &KafkaConfig,
) -> Result<(i64, Vec<(String, i32, i64)>), MaterializeError> {
    let k = kafka.clone();
    let watermarks = tokio::task::spawn_blocking(move || -> Result<Vec<(String, i32, i64)>, KafkaError> {
        let c: BaseConsumer = k
            .consumer("possync-lag-probe")
            .create()
            .map_err(KafkaError::client("create lag probe"))?;
        // A topic that does not exist (yet) has no partitions here.
        let parts = partitions_of(&c, &input_topics(&k.topics), Duration::from_secs(10))?;
        parts
            .into_iter()
            .map(|(topic, p)| {
                let (_, high) = c
                    .fetch_watermarks(&topic, p, Duration::from_secs(10))
                    .map_err(KafkaError::client(format!("watermarks of {topic}/{p}")))?;
                Ok((topic, p, high))
            })
            .collect()
    })
    .await
    .map_err(|e| MaterializeError::Task(e.to_string()))??;
    let mut tables = HashMap::new();
    for kind in [
        TableKind::PositionEvents,
        TableKind::PositionsCurrent,
        TableKind::PositionQueue,
        TableKind::StrategyRegistry,
        TableKind::RegistryEvents,
        TableKind::Executions,
    ] {
        tables.insert(kind, Table::open(table_uri, kind).await?);
    }
    let parts: Vec<(String, i32)> = watermarks.iter().map(|(t, p, _)| (t.clone(), *p)).collect();
    let next = restart_positions(&mut tables, namespace, &kafka.topics, &parts).await?;
    // Behind the high watermark may lie only commit markers (transactions): no lag.
    let behind: Vec<(String, i32, i64)> = watermarks
        .iter()
        .filter(|(t, p, high)| *high > next[&(t.clone(), *p)])
        .map(|(t, p, _)| (t.clone(), *p, next[&(t.clone(), *p)]))
        .collect();
    let k = kafka.clone();
    let data = tokio::task::spawn_blocking(move || crate::kafka::first_committed(&k, &behind))
        .await
        .map_err(|e| MaterializeError::Task(e.to_string()))??;
    let mut total = 0;
    let mut detail = Vec::new();
    for (t, p, high) in watermarks {
        let behind = match data.get(&(t.clone(), p)) {
            Some(None) => 0,
            _ => (high - next[&(t.clone(), p)]).max(0),
        };
        total += behind;
        detail.push((t, p, behind));
    }
    Ok((total, detail))
}

/// The offset namespace of `kafka` (its cluster id), unless overridden.
///
/// # Errors
/// [`KafkaError::Unreachable`] when the cluster does not answer.
pub async fn namespace(kafka: &KafkaConfig, overridden: Option<&str>) -> Result<String, KafkaError> {
    if let Some(ns) = overridden {
        return Ok(ns.to_string());
    }
    let k = kafka.clone();
    tokio::task::spawn_blocking(move || k.cluster_id(Duration::from_secs(30)))
        .await
        .map_err(|_| KafkaError::Unreachable(kafka.brokers.clone()))?
}

/// Waits until every offset produced so far to the input topics is in the tables.
///
/// # Errors
/// [`MaterializeError::Timeout`] with the remaining lag when `timeout` passes first.
pub async fn wait_caught_up(
    table_uri: &str,
    namespace: &str,
    kafka: &KafkaConfig,
    timeout: Duration,
) -> Result<(), MaterializeError> {
    let deadline = Instant::now() + timeout;
    loop {
        let (total, detail) = lag(table_uri, namespace, kafka).await?;
        if total == 0 {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(MaterializeError::Timeout(format!(
                "still {total} offsets behind: {detail:?}"
            )));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// How long a rebalance waits for the start offsets before the materializer gives up (well
/// below librdkafka's `max.poll.interval.ms`, 5 min by default).
const START_READ_TIMEOUT: Duration = Duration::from_secs(60);

struct StartRequest {
    parts: Vec<(String, i32)>,
    reply: std::sync::mpsc::SyncSender<Result<Vec<Option<i64>>, super::consumer::StartError>>,
}

/// The restart positions of partitions, read fresh from the tables at every assignment.
///
/// The rebalance callback is synchronous and runs inside the consumer's `recv()`, so the
/// tables are read by a dedicated thread with its own small runtime (it works under any
/// caller runtime and keeps its object-store clients on one runtime); the callback waits for
/// the answer. Each request reloads the tables incrementally (new commits only), so the answer
/// includes what other members committed up to that moment.
pub struct DeltaStarts {
    tx: tokio::sync::mpsc::UnboundedSender<StartRequest>,
}

impl DeltaStarts {
    /// Starts the reader thread for the tables under `base`.
    ///
    /// # Errors
    /// [`MaterializeError::Task`] when the thread cannot be started.
    pub fn spawn(base: String, namespace: String, kafka: KafkaConfig) -> Result<Self, MaterializeError> {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<StartRequest>();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| MaterializeError::Task(format!("start-offset reader runtime: {e}")))?;
        std::thread::Builder::new()
            .name("possync-start-offsets".into())
            .spawn(move || {
                rt.block_on(async move {
                    let mut tables: Option<HashMap<TableKind, Table>> = None;
                    while let Some(req) = rx.recv().await {
                        let result = read_starts(&mut tables, &base, &namespace, &kafka, &req.parts).await;
                        if result.is_err() {
                            tables = None; // reopen on the next request
                        }
                        let _ = req.reply.send(result.map_err(|e| match e {
                            e @ MaterializeError::LogReplaced { .. } => super::consumer::StartError::Refused(e),
                            e => super::consumer::StartError::Unreadable(e.to_string()),
                        }));
                    }
                });
            })
            .map_err(|e| MaterializeError::Task(format!("start-offset reader thread: {e}")))?;
        Ok(Self { tx })
    }
}

async fn read_starts(
    tables: &mut Option<HashMap<TableKind, Table>>,
    base: &str,
    namespace: &str,
    kafka: &KafkaConfig,
    parts: &[(String, i32)],
) -> Result<Vec<Option<i64>>, MaterializeError> {
    let kinds = [
        TableKind::PositionEvents,
        TableKind::PositionsCurrent,
        TableKind::PositionQueue,
        TableKind::StrategyRegistry,
        TableKind::RegistryEvents,
        TableKind::Executions,
        TableKind::DeadLetters,
    ];
    match tables {
        Some(open) => {
            for t in open.values_mut() {
                t.refresh().await?;
            }
        }
        None => {
            let mut open = HashMap::new();
            for kind in kinds {
                open.insert(kind, Table::open(base, kind).await?);
            }
            *tables = Some(open);
        }
    }
    let open = tables.as_mut().expect("opened above");
    let next = restart_positions(open, namespace, &kafka.topics, parts).await?;
    // The log must still be the one the stored offsets point into (this thread may block).
    let stored: Vec<(String, i32, i64)> = parts
        .iter()
        .filter(|k| next[*k] > 0)
        .map(|(t, p)| (t.clone(), *p, next[&(t.clone(), *p)] - 1))
        .collect();
    super::log_check::check(open, namespace, kafka, &stored).await?;
    Ok(parts.iter().map(|k| Some(next[k])).collect())
}

impl super::consumer::StartSource for DeltaStarts {
    fn starts(&self, parts: &[(String, i32)]) -> Result<Vec<Option<i64>>, super::consumer::StartError> {
        let (reply, answer) = std::sync::mpsc::sync_channel(1);
        self.tx
            .send(StartRequest {
                parts: parts.to_vec(),
                reply,
            })
            .map_err(|_| super::consumer::StartError::Unreadable("the start-offset reader thread is gone".into()))?;
        let wait = || answer.recv_timeout(START_READ_TIMEOUT);
        // Let the runtime move other tasks off this worker while we wait (multi-thread only).
        let answer = match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
            Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(wait),
            _ => wait(),
        };
        answer.map_err(|e| {
            super::consumer::StartError::Unreadable(format!(
                "no answer from the tables within {START_READ_TIMEOUT:?} ({e})"
            ))
        })?
    }
}
