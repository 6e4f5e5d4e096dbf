//! Undecodable or invalid messages: to the dead-letter topic and the `dead_letters` table.
//!
//! A dead letter keeps the original key and bytes; the topic copy carries the reason and the
//! source coordinates as headers (`possync.error`, `possync.topic`, `possync.partition`,
//! `possync.offset`). Dead letters count as consumed: the pipeline goes on.
//!
//! **The `dead_letters` table is the record**, exactly-once like the others (txn actions). The
//! topic copy is a notification that never blocks a commit: letters are handed to a bounded
//! queue after their table commit ([`TopicCopy::offer`], which never waits) and a background
//! task produces them, retrying each failed send a bounded number of times. A letter the topic
//! cannot take (missing or unauthorized topic, a value over the producer's size limit, the
//! queue full) is logged and counted in `possync_dead_letter_topic_failures_total`; it stays in
//! the table. A crash after the commit and before the send loses the topic copy, not the letter.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use deltalake::arrow::array::{
    ArrayRef, BinaryBuilder, Int32Builder, Int64Builder, RecordBatch, StringArray, StringBuilder,
    TimestampMicrosecondBuilder,
};
use deltalake::arrow::error::ArrowError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseProducer, FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use tokio::sync::mpsc;

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

/// Dead letters of the offset namespace `namespace` as a batch of the `dead_letters` schema.
///
/// # Errors
/// Arrow errors (a bug).
pub fn batch(letters: &[&DeadLetter], namespace: &str, now_micros: i64) -> Result<RecordBatch, ArrowError> {
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
        Arc::new(StringArray::from_iter_values(std::iter::repeat_n(
            namespace,
            letters.len(),
        ))),
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

/// Letters waiting for the topic at most; beyond that they reach only the table.
const QUEUE_CAPACITY: usize = 10_000;
/// Sends per letter before it is given up.
const ATTEMPTS: u32 = 4;
/// Wait before the first resend (doubled each time).
const FIRST_BACKOFF: Duration = Duration::from_millis(500);

/// The background copy of committed dead letters to the dead-letter topic.
pub struct TopicCopy {
    tx: mpsc::Sender<DeadLetter>,
}

impl TopicCopy {
    /// Starts the sending task (it ends once this handle is dropped and its queue is drained).
    ///
    /// The producer is made from `config` at the first dead letter, not before: an idle
    /// rdkafka producer costs about 1% of a core (its poll thread spins through the last
    /// millisecond of every 100 ms poll, rdkafka 0.39), and most materializers never see a dead
    /// letter. `config` is checked here, so a bad `-K` setting still fails at start.
    ///
    /// # Errors
    /// [`KafkaError::Client`] when `config` does not make a producer.
    pub fn spawn(config: ClientConfig, topic: String) -> Result<Self, KafkaError> {
        drop(
            config
                .create::<BaseProducer>()
                .map_err(KafkaError::client("create dead-letter producer"))?,
        );
        let (tx, rx) = mpsc::channel(QUEUE_CAPACITY);
        tokio::spawn(send_loop(config, topic, rx));
        Ok(Self { tx })
    }

    /// Queues letters whose table commit succeeded; never waits.
    pub fn offer<'a>(&self, letters: impl IntoIterator<Item = &'a DeadLetter>) {
        for d in letters {
            if let Err(e) = self.tx.try_send(d.clone()) {
                let why = match e {
                    mpsc::error::TrySendError::Full(_) => "the dead-letter topic queue is full",
                    mpsc::error::TrySendError::Closed(_) => "the dead-letter topic sender stopped",
                };
                topic_copy_failed(d, why);
            }
        }
    }
}

/// One letter never reached the topic (it is in the `dead_letters` table).
fn topic_copy_failed(d: &DeadLetter, why: &str) {
    crate::metrics::global()
        .dead_letter_topic_failures
        .fetch_add(1, Relaxed);
    tracing::error!(
        topic = &*d.topic,
        partition = d.partition,
        offset = d.offset,
        why,
        "dead letter not copied to the dead-letter topic (it is in the dead_letters table); check the topic exists, is writable and accepts the message size"
    );
}

async fn send_loop(config: ClientConfig, topic: String, mut rx: mpsc::Receiver<DeadLetter>) {
    let mut batch = Vec::new();
    let mut made: Option<FutureProducer> = None;
    while rx.recv_many(&mut batch, 1000).await > 0 {
        let producer = match &made {
            Some(p) => p,
            None => match config.create::<FutureProducer>() {
                Ok(p) => made.insert(p),
                Err(e) => {
                    let e = crate::kafka::scrub(e);
                    for d in batch.drain(..) {
                        topic_copy_failed(&d, &format!("create dead-letter producer: {e}"));
                    }
                    continue;
                }
            },
        };
        let mut pending: Vec<DeadLetter> = std::mem::take(&mut batch);
        let mut backoff = FIRST_BACKOFF;
        for attempt in 1..=ATTEMPTS {
            let refs: Vec<&DeadLetter> = pending.iter().collect();
            let results = produce_each(producer, &topic, &refs).await;
            let failed: Vec<(DeadLetter, String)> = pending
                .into_iter()
                .zip(results)
                .filter_map(|(d, r)| r.err().map(|e| (d, e.to_string())))
                .collect();
            if failed.is_empty() {
                break;
            }
            if attempt == ATTEMPTS {
                for (d, why) in &failed {
                    topic_copy_failed(d, why);
                }
                break;
            }
            tracing::warn!(letters = failed.len(), attempt, error = %failed[0].1, "dead-letter topic send failed; retrying");
            pending = failed.into_iter().map(|(d, _)| d).collect();
            tokio::time::sleep(backoff).await;
            backoff *= 2;
        }
    }
}

/// Produces dead letters to `topic` and waits for every acknowledgement.
///
/// # Errors
/// [`KafkaError::Client`] when a message is not acknowledged.
pub async fn produce(producer: &FutureProducer, topic: &str, letters: &[&DeadLetter]) -> Result<(), KafkaError> {
    produce_each(producer, topic, letters).await.into_iter().collect()
}

/// Produces dead letters to `topic`; the outcome of each, in order.
async fn produce_each(producer: &FutureProducer, topic: &str, letters: &[&DeadLetter]) -> Vec<Result<(), KafkaError>> {
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
    futures::future::join_all(pending)
        .await
        .into_iter()
        .map(|r| {
            r.map(|_| ()).map_err(|(e, _)| KafkaError::Client {
                context: format!("produce dead letter to {topic}"),
                source: e,
            })
        })
        .collect()
}
