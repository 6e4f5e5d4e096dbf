//! Undecodable or invalid messages: to the dead-letter topic and the `dead_letters` table.
//!
//! A dead letter keeps the original key and bytes; the topic copy carries the reason and the
//! source coordinates as headers (`possync.error`, `possync.topic`, `possync.partition`,
//! `possync.offset`). Dead letters count as consumed: the pipeline goes on. The table is
//! exactly-once like the others (txn actions); the topic copy is at-least-once (a crash between
//! producing and committing the table produces it again on restart).

use std::sync::Arc;
use std::time::Duration;

use deltalake::arrow::array::{
    ArrayRef, BinaryBuilder, Int32Builder, Int64Builder, RecordBatch, StringBuilder, TimestampMicrosecondBuilder,
};
use deltalake::arrow::error::ArrowError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

use super::decode::UTC;
use super::tables::TableKind;
use crate::kafka::KafkaError;

/// One dead letter.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    /// Source topic.
    pub topic: Arc<str>,
    /// Source partition.
    pub partition: i32,
    /// Source offset.
    pub offset: i64,
    /// Source message timestamp (µs), when it had one.
    pub timestamp: Option<i64>,
    /// Original key.
    pub key: Option<Vec<u8>>,
    /// Original value.
    pub value: Option<Vec<u8>>,
    /// Why it was rejected.
    pub error: String,
}

/// Dead letters as a batch of the `dead_letters` schema.
///
/// # Errors
/// Arrow errors (a bug).
pub fn batch(letters: &[&DeadLetter], now_micros: i64) -> Result<RecordBatch, ArrowError> {
    let (mut topic, mut partition, mut offset) = (StringBuilder::new(), Int32Builder::new(), Int64Builder::new());
    let mut ts = TimestampMicrosecondBuilder::new().with_timezone(UTC);
    let (mut key, mut value, mut error) = (BinaryBuilder::new(), BinaryBuilder::new(), StringBuilder::new());
    let mut at = TimestampMicrosecondBuilder::new().with_timezone(UTC);
    for d in letters {
        topic.append_value(&*d.topic);
        partition.append_value(d.partition);
        offset.append_value(d.offset);
        ts.append_option(d.timestamp);
        key.append_option(d.key.as_deref());
        value.append_option(d.value.as_deref());
        error.append_value(&d.error);
        at.append_value(now_micros);
    }
    let cols: Vec<ArrayRef> = vec![
        Arc::new(topic.finish()),
        Arc::new(partition.finish()),
        Arc::new(offset.finish()),
        Arc::new(ts.finish()),
        Arc::new(key.finish()),
        Arc::new(value.finish()),
        Arc::new(error.finish()),
        Arc::new(at.finish()),
    ];
    RecordBatch::try_new(TableKind::DeadLetters.schema(), cols)
}

/// Produces dead letters to `topic` and waits for every acknowledgement.
///
/// # Errors
/// [`KafkaError::Client`] when a message is not acknowledged.
pub async fn produce(producer: &FutureProducer, topic: &str, letters: &[&DeadLetter]) -> Result<(), KafkaError> {
    let mut pending = Vec::with_capacity(letters.len());
    for d in letters {
        let partition = d.partition.to_string();
        let offset = d.offset.to_string();
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: "possync.error",
                value: Some(d.error.as_bytes()),
            })
            .insert(Header {
                key: "possync.topic",
                value: Some(d.topic.as_bytes()),
            })
            .insert(Header {
                key: "possync.partition",
                value: Some(partition.as_bytes()),
            })
            .insert(Header {
                key: "possync.offset",
                value: Some(offset.as_bytes()),
            });
        let mut rec: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic).headers(headers);
        if let Some(k) = &d.key {
            rec = rec.key(k.as_slice());
        }
        if let Some(v) = &d.value {
            rec = rec.payload(v.as_slice());
        }
        pending.push(producer.send(rec, Duration::from_secs(30)));
    }
    for r in futures::future::join_all(pending).await {
        r.map_err(|(e, _)| KafkaError::Client {
            context: format!("produce dead letter to {topic}"),
            source: e,
        })?;
    }
    Ok(())
}
