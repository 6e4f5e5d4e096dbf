//! When the retention delete of closed rows is safe (issue 20 #3).
//!
//! `positions_current` and `position_queue` keep a closed position (quantity 0) for
//! `--closed-retention`, then delete its row. Once the row is gone nothing remembers the key's
//! newest order, so an older event of that key that is still on its way (the other position
//! topic catching up after a restart, a partition of a stopped member) would open the
//! position again, for good. The delete therefore waits until the table holds every committed
//! message of both position topics whose Kafka timestamp is before the cutoff plus
//! [`MARGIN`]: an event older than a close before the cutoff can then no longer arrive (its
//! timestamp is at most the margin past its order stamp, `ingest_time`, taken on the same
//! host).
//!
//! Per partition: `offsetsForTimes` gives the first offset at or after that time; when the
//! table's stored offset is past it the partition is done. Otherwise (an idle partition whose
//! log ends in transaction markers, or a partition really behind) the first committed message
//! after the stored offset is fetched: none, or one at or after the time, is done too.

use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};

use super::offsets::app_id;
use super::tables::Table;
use super::MaterializeError;
use crate::kafka::{KafkaConfig, KafkaError};

/// How far past the cutoff every partition must be materialized.
pub const MARGIN: Duration = Duration::from_secs(3600);

/// How long one broker request of the check may take.
const TIMEOUT: Duration = Duration::from_secs(10);

/// The Kafka side of the check, for one materializer.
#[derive(Clone)]
pub struct ExpiryGuard {
    kafka: KafkaConfig,
}

impl ExpiryGuard {
    /// A guard over the position topics of `kafka`.
    pub fn new(kafka: &KafkaConfig) -> Self {
        Self { kafka: kafka.clone() }
    }

    /// Why rows closed before `cutoff` (µs) cannot leave `t` yet, or `None` when they can.
    ///
    /// # Errors
    /// Table errors reading stored offsets. Kafka trouble is a reason to wait, not an error.
    pub async fn blocker(
        &self,
        t: &mut Table,
        namespace: &str,
        cutoff: i64,
    ) -> Result<Option<String>, MaterializeError> {
        let until_ms = (cutoff + MARGIN.as_micros() as i64) / 1000;
        let topics = [self.kafka.topics.active.clone(), self.kafka.topics.queued.clone()];
        let kafka = self.kafka.clone();
        let firsts = tokio::task::spawn_blocking(move || offsets_for_time(&kafka, &topics, until_ms))
            .await
            .map_err(|e| MaterializeError::Task(e.to_string()))?;
        let firsts = match firsts {
            Ok(f) => f,
            Err(e) => return Ok(Some(format!("Kafka did not answer offsetsForTimes: {e}"))),
        };
        let mut unsure = Vec::new();
        for (topic, partition, first) in firsts {
            let stored = t
                .txn_version(&app_id(namespace, &topic, partition))
                .await?
                .unwrap_or(-1);
            if first.is_none_or(|f| stored + 1 < f) {
                unsure.push((topic, partition, stored + 1));
            }
        }
        if unsure.is_empty() {
            return Ok(None);
        }
        let kafka = self.kafka.clone();
        let at = unsure.clone();
        let probed = tokio::task::spawn_blocking(move || crate::kafka::first_committed(&kafka, &at))
            .await
            .map_err(|e| MaterializeError::Task(e.to_string()))?;
        let probed = match probed {
            Ok(p) => p,
            Err(e) => return Ok(Some(format!("Kafka did not answer a fetch: {e}"))),
        };
        for (topic, partition, next) in unsure {
            match probed.get(&(topic.clone(), partition)) {
                Some(None) => {}
                Some(Some(ts)) if *ts >= until_ms => {}
                Some(Some(ts)) => {
                    return Ok(Some(format!(
                        "{topic}/{partition} holds unmaterialized events from {} on (offset {next})",
                        chrono::DateTime::from_timestamp_millis(*ts).map_or_else(|| ts.to_string(), |d| d.to_rfc3339())
                    )))
                }
                None => {
                    return Ok(Some(format!(
                        "{topic}/{partition}: no answer to a fetch at offset {next}"
                    )))
                }
            }
        }
        Ok(None)
    }
}

/// Per partition of `topics`: the first offset whose timestamp is at or after `ms` (`None`:
/// every message is older; then the high watermark decides, through the probe). Blocking.
fn offsets_for_time(
    kafka: &KafkaConfig,
    topics: &[String],
    ms: i64,
) -> Result<Vec<(String, i32, Option<i64>)>, KafkaError> {
    let c: BaseConsumer = kafka
        .admin()
        .create()
        .map_err(KafkaError::client("create offsets client"))?;
    let names: Vec<&str> = topics.iter().map(String::as_str).collect();
    let mut tpl = TopicPartitionList::new();
    for (topic, partition) in super::offsets::partitions_of(&c, &names, TIMEOUT)? {
        tpl.add_partition_offset(&topic, partition, Offset::Offset(ms))
            .map_err(KafkaError::client("build a partition list"))?;
    }
    let found = c
        .offsets_for_times(tpl, TIMEOUT)
        .map_err(KafkaError::client("offsetsForTimes"))?;
    Ok(found
        .elements()
        .iter()
        .map(|e| {
            let first = match e.offset() {
                Offset::Offset(o) => Some(o),
                _ => None,
            };
            (e.topic().to_string(), e.partition(), first)
        })
        .collect())
}
