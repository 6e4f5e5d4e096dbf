//! Is the log Kafka serves still the log the tables were written from? (issue 20 #1)
//!
//! Offsets are stored per (namespace, topic, partition). A topic deleted and recreated under
//! the same name (or a log truncated by an unclean leader election) starts again at offset 0
//! in the same cluster, so the stored offsets point into a different log: the materializer
//! would wait for offsets that never come, or skip the new log's first offsets for good.
//!
//! At every assignment, before a partition starts, the message the tables hold last (stored
//! offset `v`) is compared with what the log holds at `v`:
//! - the log ends at or before `v` (high watermark ≤ `v`): replaced;
//! - the first committed message at or after `v` is not at `v` (a marker, an aborted event or
//!   nothing is there now) on a topic that is not compacted: replaced;
//! - the message at `v` has another broker timestamp than the row the tables hold for `v`
//!   (`kafka_timestamp` of `position_events`, `registry_events` or `dead_letters`): replaced;
//! - `v` is gone by retention, compacted away, or no row or answer is found (Kafka unreachable
//!   for the check, 10 s in all): nothing to compare (logged), the partition starts as
//!   before.
//!
//! A replaced log stops the member before it takes a message ([`MaterializeError::LogReplaced`]);
//! nothing is written and no offset is skipped.

use std::collections::HashMap;

use deltalake::arrow::array::{Array, AsArray, RecordBatch};
use deltalake::arrow::datatypes::{Int32Type, Int64Type, TimestampMicrosecondType};

use super::tables::{Table, TableKind};
use super::MaterializeError;
use crate::kafka::{KafkaConfig, LogAt, Topics};

/// What the tables hold at one stored offset.
#[derive(Debug, Clone, PartialEq)]
enum Held {
    /// A row at the offset, with its broker timestamp (µs; `None` when recorded as unknown).
    Row(Option<i64>),
    /// No row found (nothing to compare).
    Unknown,
}

/// Checks each (topic, partition, last offset the tables hold) against the log (blocking calls
/// to Kafka; run it on a thread that may block).
///
/// # Errors
/// [`MaterializeError::LogReplaced`] naming the partition and what differs; table and Kafka
/// errors.
pub async fn check(
    tables: &HashMap<TableKind, Table>,
    namespace: &str,
    kafka: &KafkaConfig,
    stored: &[(String, i32, i64)],
) -> Result<(), MaterializeError> {
    if stored.is_empty() {
        return Ok(());
    }
    // Only evidence stops a member: a log that cannot be read now (an outage, a leader moving)
    // is not checked, and the partition starts as before.
    let log = match crate::kafka::log_at(kafka, stored) {
        Ok(log) => log,
        Err(e) => {
            tracing::warn!(error = %e, "log check skipped: Kafka did not answer");
            return Ok(());
        }
    };
    for (topic, partition, last) in stored {
        let Some(at) = log.get(&(topic.clone(), *partition)) else {
            continue;
        };
        let held = if needs_row(at, *last) {
            held_at(tables, &kafka.topics, namespace, topic, *partition, *last).await?
        } else {
            Held::Unknown
        };
        if let Some(why) = verdict(&kafka.topics, topic, *last, at, &held) {
            return Err(MaterializeError::LogReplaced {
                topic: topic.clone(),
                partition: *partition,
                last: *last,
                why,
            });
        }
    }
    Ok(())
}

/// Whether the verdict needs the row the tables hold (a message at `last` to compare with).
fn needs_row(at: &LogAt, last: i64) -> bool {
    matches!(at.first, Some(Some((offset, _))) if offset == last)
}

/// Why the log is not the one the tables were written from (`None`: nothing says so).
fn verdict(topics: &Topics, topic: &str, last: i64, at: &LogAt, held: &Held) -> Option<String> {
    if at.high <= last {
        return Some(format!(
            "the log ends before offset {last} (high watermark {})",
            at.high
        ));
    }
    let compacted = topic == topics.registry;
    match (&at.first, held) {
        (Some(Some((offset, _))), _) if *offset != last && !compacted => Some(format!(
            "offset {last} holds no event in the log now (the first committed one is at {offset})"
        )),
        (Some(None), _) if !compacted => Some(format!("offset {last} holds no committed event in the log now")),
        (Some(Some((offset, ts_ms))), Held::Row(row_us)) if *offset == last => {
            let log_us = ts_ms
                .and_then(|ms| ms.checked_mul(1000))
                .filter(|us| super::checks::timestamp_in_range(*us));
            (log_us != *row_us).then(|| {
                format!(
                    "the message at offset {last} has another timestamp ({}) than the one the tables hold ({})",
                    shown(log_us),
                    shown(*row_us)
                )
            })
        }
        _ => {
            tracing::debug!(topic, last, ?at, ?held, "log check: nothing to compare");
            None
        }
    }
}

fn shown(us: Option<i64>) -> String {
    us.and_then(chrono::DateTime::from_timestamp_micros)
        .map_or_else(|| "none".to_string(), |t| t.to_rfc3339())
}

/// The row the tables hold at (namespace, topic, partition, offset): the audit table of the
/// topic, then `dead_letters`. Files are chosen by their statistics, newest first.
async fn held_at(
    tables: &HashMap<TableKind, Table>,
    topics: &Topics,
    namespace: &str,
    topic: &str,
    partition: i32,
    offset: i64,
) -> Result<Held, MaterializeError> {
    let audit = if topic == topics.registry {
        TableKind::RegistryEvents
    } else if topic == topics.executions {
        TableKind::Executions
    } else {
        TableKind::PositionEvents
    };
    for kind in [audit, TableKind::DeadLetters] {
        let Some(t) = tables.get(&kind) else { continue };
        let mut files: Vec<_> = t
            .files()?
            .into_iter()
            .filter(|f| may_hold(f.add.stats.as_deref(), partition, offset))
            .collect();
        files.sort_by_key(|f| std::cmp::Reverse(f.add.modification_time));
        for f in files {
            for b in t.read(std::slice::from_ref(&f)).await? {
                if let Some(ts) = find(&b, namespace, topic, partition, offset) {
                    return Ok(Held::Row(ts));
                }
            }
        }
    }
    Ok(Held::Unknown)
}

/// Whether a file's statistics allow a row at (partition, offset) (no statistics: maybe).
fn may_hold(stats: Option<&str>, partition: i32, offset: i64) -> bool {
    let Some(v) = stats.and_then(|s| serde_json::from_str::<serde_json::Value>(s).ok()) else {
        return true;
    };
    let within = |col: &str, x: i64| {
        let min = v["minValues"][col].as_i64();
        let max = v["maxValues"][col].as_i64();
        min.is_none_or(|m| m <= x) && max.is_none_or(|m| x <= m)
    };
    within("kafka_partition", i64::from(partition)) && within("kafka_offset", offset)
}

/// The `kafka_timestamp` of the row at the coordinates, if the batch holds it.
fn find(b: &RecordBatch, namespace: &str, topic: &str, partition: i32, offset: i64) -> Option<Option<i64>> {
    let ns = b.column_by_name("kafka_namespace")?.as_string_opt::<i32>()?;
    let tp = b.column_by_name("kafka_topic")?.as_string_opt::<i32>()?;
    let pa = b.column_by_name("kafka_partition")?.as_primitive_opt::<Int32Type>()?;
    let of = b.column_by_name("kafka_offset")?.as_primitive_opt::<Int64Type>()?;
    let ts = b
        .column_by_name("kafka_timestamp")?
        .as_primitive_opt::<TimestampMicrosecondType>()?;
    (0..b.num_rows())
        .find(|&i| {
            of.value(i) == offset && pa.value(i) == partition && tp.value(i) == topic && ns.value(i) == namespace
        })
        .map(|i| (!ts.is_null(i)).then(|| ts.value(i)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(high: i64, first: Option<Option<(i64, Option<i64>)>>) -> LogAt {
        LogAt { low: 0, high, first }
    }

    #[test]
    fn a_log_that_is_the_same_passes() {
        let t = Topics::new("x.");
        let ts = 1_700_000_000_000i64;
        let held = Held::Row(Some(ts * 1000));
        assert_eq!(
            verdict(&t, &t.active, 9, &at(20, Some(Some((9, Some(ts))))), &held),
            None
        );
        // Retention took it, or the fetch gave no answer: nothing to compare.
        assert_eq!(verdict(&t, &t.active, 9, &at(20, None), &Held::Unknown), None);
        // Compaction removed it from the registry topic.
        assert_eq!(
            verdict(&t, &t.registry, 9, &at(20, Some(Some((12, None)))), &Held::Unknown),
            None
        );
    }

    #[test]
    fn a_replaced_log_is_named() {
        let t = Topics::new("x.");
        let ts = 1_700_000_000_000i64;
        let held = Held::Row(Some(ts * 1000));
        let shorter = verdict(&t, &t.active, 9, &at(5, None), &held).unwrap();
        assert!(shorter.contains("ends before offset 9"), "{shorter}");
        let other = verdict(&t, &t.queued, 9, &at(20, Some(Some((9, Some(ts + 1))))), &held).unwrap();
        assert!(other.contains("another timestamp"), "{other}");
        let marker = verdict(&t, &t.active, 9, &at(20, Some(Some((10, Some(ts))))), &Held::Unknown).unwrap();
        assert!(marker.contains("holds no event"), "{marker}");
        let open = verdict(&t, &t.active, 9, &at(20, Some(None)), &Held::Unknown).unwrap();
        assert!(open.contains("no committed event"), "{open}");
    }

    #[test]
    fn statistics_choose_the_files() {
        let s = r#"{"numRecords":3,"minValues":{"kafka_partition":1,"kafka_offset":10},"maxValues":{"kafka_partition":2,"kafka_offset":30}}"#;
        assert!(may_hold(Some(s), 1, 10));
        assert!(may_hold(Some(s), 2, 30));
        assert!(!may_hold(Some(s), 3, 20));
        assert!(!may_hold(Some(s), 1, 31));
        assert!(may_hold(None, 7, 7));
        assert!(may_hold(Some(r#"{"numRecords":3}"#), 7, 7));
    }
}
