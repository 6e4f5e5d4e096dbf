//! Replaying a topic from the beginning to its end, then following it live.
//!
//! Used for every event-sourced state possync keeps in memory: the registry (ingest, `registry
//! list`) and the position queue (queue worker). The reader assigns every partition itself (no
//! consumer-group membership, no offset commits: each reader rebuilds its state from offset 0,
//! or from the offsets of a snapshot, see [`TopicReplay::start_from`]), records the high
//! watermarks at start, and reports when it has read up to them.

use std::collections::HashMap;
use std::time::Duration;

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{Registry, RegistryError};
use crate::events::RegistryEvent;
use crate::kafka::{EofQuiet, KafkaConfig, KafkaError};

/// The partition ids of `topic`.
///
/// # Errors
/// [`RegistryError::NoSuchTopic`] when the broker does not know it, [`RegistryError::Kafka`]
/// when no broker answers within `timeout`.
pub fn partitions<C: rdkafka::consumer::ConsumerContext>(
    consumer: &impl Consumer<C>,
    topic: &str,
    timeout: Duration,
) -> Result<Vec<i32>, RegistryError> {
    let metadata = consumer
        .fetch_metadata(Some(topic), timeout)
        .map_err(KafkaError::client(format!("fetch metadata of {topic}")))?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .filter(|t| t.name() == topic && t.error().is_none())
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    if partitions.is_empty() {
        return Err(RegistryError::NoSuchTopic(topic.to_string()));
    }
    Ok(partitions)
}

/// A replay of one topic: every partition from its beginning (or a given offset), with
/// catch-up tracking.
pub struct TopicReplay {
    consumer: StreamConsumer<EofQuiet>,
    topic: String,
    /// Partition → high watermark at start, for partitions not yet read up to it.
    pending: HashMap<i32, i64>,
    /// Where each partition was found and started at.
    starts: Vec<PartitionStart>,
}

/// One partition of a replay at its start: the log's bounds and the first offset read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionStart {
    /// Partition id.
    pub partition: i32,
    /// The offset asked for (0 for a replay from the beginning).
    pub wanted: i64,
    /// Earliest offset the broker still holds (the low watermark).
    pub low: i64,
    /// Offset of the next message to be written (the high watermark) at start.
    pub high: i64,
}

impl PartitionStart {
    /// The first offset read: `wanted` when the log holds it, else the log's start (history
    /// dropped by retention, or a `wanted` beyond the log's end: the topic was recreated).
    pub fn first(&self) -> i64 {
        if self.wanted >= self.low && self.wanted <= self.high {
            self.wanted
        } else {
            self.low
        }
    }

    /// Offsets `wanted..low` were deleted from the log before this reader got to them.
    pub fn dropped(&self) -> Option<std::ops::Range<i64>> {
        (self.wanted < self.low).then_some(self.wanted..self.low)
    }

    /// `wanted` lies beyond the log's end (the topic was recreated or truncated).
    pub fn beyond_end(&self) -> bool {
        self.wanted > self.high
    }

    /// Messages to read to catch up.
    pub fn backlog(&self) -> i64 {
        (self.high - self.first()).max(0)
    }
}

impl TopicReplay {
    /// Assigns every partition of `topic` at its beginning and notes where "now" ends.
    ///
    /// # Errors
    /// [`RegistryError::NoSuchTopic`] when the topic is missing, [`RegistryError::Kafka`] when
    /// the broker cannot be reached within `timeout`.
    pub async fn start(kafka: &KafkaConfig, topic: &str, timeout: Duration) -> Result<Self, RegistryError> {
        Self::start_from(kafka, topic, timeout, HashMap::new()).await
    }

    /// Like [`TopicReplay::start`], but each partition in `from` starts at the given offset
    /// (the rest at their beginning): the tail after a snapshot. A partition whose log no
    /// longer holds that offset starts at its beginning; [`TopicReplay::starts`] tells.
    ///
    /// # Errors
    /// As [`TopicReplay::start`].
    pub async fn start_from(
        kafka: &KafkaConfig,
        topic: &str,
        timeout: Duration,
        from: HashMap<i32, i64>,
    ) -> Result<Self, RegistryError> {
        let kafka = kafka.clone();
        let topic = topic.to_string();
        tokio::task::spawn_blocking(move || Self::start_blocking(&kafka, &topic, timeout, &from))
            .await
            .map_err(|e| RegistryError::Invalid(format!("replay setup task failed: {e}")))?
    }

    fn start_blocking(
        kafka: &KafkaConfig,
        topic: &str,
        timeout: Duration,
        from: &HashMap<i32, i64>,
    ) -> Result<Self, RegistryError> {
        let group = format!("possync-replay-{}", crate::events::new_id());
        // Partition EOF tells the end of the backlog: with transactions the last offsets of a
        // partition can be commit markers, which are never delivered as messages.
        let consumer: StreamConsumer<EofQuiet> = kafka
            .consumer(&group)
            .set("enable.partition.eof", "true")
            .create_with_context(EofQuiet)
            .map_err(KafkaError::client("create replay consumer"))?;
        let partitions = partitions(&consumer, topic, timeout)?;
        let mut assignment = TopicPartitionList::new();
        let mut pending = HashMap::new();
        let mut starts = Vec::new();
        for p in partitions {
            let (low, high) = watermarks(&consumer, topic, p, timeout)
                .map_err(KafkaError::client(format!("fetch watermarks of {topic}/{p}")))?;
            let start = PartitionStart {
                partition: p,
                wanted: from.get(&p).copied().unwrap_or(0),
                low,
                high,
            };
            if start.backlog() > 0 {
                pending.insert(p, high);
            }
            // The log's start when `wanted` is not in it: Beginning follows later deletions too.
            let offset = if start.first() == start.wanted && start.wanted > low {
                Offset::Offset(start.wanted)
            } else {
                Offset::Beginning
            };
            assignment
                .add_partition_offset(topic, p, offset)
                .map_err(KafkaError::client("build assignment"))?;
            starts.push(start);
        }
        consumer
            .assign(&assignment)
            .map_err(KafkaError::client(format!("assign {topic}")))?;
        Ok(Self {
            consumer,
            topic: topic.to_string(),
            pending,
            starts,
        })
    }

    /// Each partition's bounds and first offset at start.
    pub fn starts(&self) -> &[PartitionStart] {
        &self.starts
    }

    /// Messages to read to catch up, as of the start (all partitions).
    pub fn backlog(&self) -> i64 {
        self.starts.iter().map(PartitionStart::backlog).sum()
    }

    /// Whether every message that existed at [`TopicReplay::start`] has been read.
    pub fn caught_up(&self) -> bool {
        self.pending.is_empty()
    }

    /// The topic replayed.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The next message, in partition order.
    ///
    /// # Errors
    /// [`RegistryError::Kafka`] when the consumer reports an error (for example an offset out
    /// of range: messages were evicted before this reader saw them).
    pub async fn next(&mut self) -> Result<OwnedMessage, RegistryError> {
        loop {
            if let Some(m) = self.recv_one().await? {
                return Ok(m);
            }
        }
    }

    /// The next message of the backlog (what existed at the start), or `None` once all of it
    /// was read ([`TopicReplay::caught_up`]); a partition whose backlog ends in commit markers
    /// or an aborted transaction is caught up at its end (partition EOF), with no message.
    ///
    /// # Errors
    /// As [`TopicReplay::next`].
    pub async fn next_in_backlog(&mut self) -> Result<Option<OwnedMessage>, RegistryError> {
        loop {
            if self.caught_up() {
                return Ok(None);
            }
            if let Some(m) = self.recv_one().await? {
                return Ok(Some(m));
            }
        }
    }

    /// One message, or `None` for a partition EOF (which may end that partition's backlog).
    async fn recv_one(&mut self) -> Result<Option<OwnedMessage>, RegistryError> {
        match self.consumer.recv().await {
            Ok(m) => {
                let message = m.detach();
                if let Some(high) = self.pending.get(&message.partition()) {
                    if message.offset() + 1 >= *high {
                        self.pending.remove(&message.partition());
                    }
                }
                // A writer schema this process has not seen (another release's producer):
                // learned from the schema registry before anyone decodes the value.
                crate::schema_registry::learn_writer_of(message.payload()).await?;
                Ok(Some(message))
            }
            Err(rdkafka::error::KafkaError::PartitionEOF(p)) => {
                self.reached_end(p);
                Ok(None)
            }
            Err(e) if is_retriable(&e) => {
                // librdkafka reconnects by itself; the caller's deadline bounds the wait
                // (issue 20 #6: a broker restart during start-up was fatal).
                tracing::debug!(topic = %self.topic, error = %e, "consumer error while reading; librdkafka retries");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                Ok(None)
            }
            Err(e) => Err(KafkaError::Client {
                context: format!("read {}", self.topic),
                source: e,
            }
            .into()),
        }
    }

    /// At a partition's end: its backlog is read when the position (past commit markers and
    /// aborted batches) has reached the high watermark of the start.
    fn reached_end(&mut self, partition: i32) {
        let Some(high) = self.pending.get(&partition).copied() else {
            return;
        };
        let position = self.consumer.position().ok().and_then(|tpl| {
            tpl.find_partition(&self.topic, partition)
                .and_then(|e| match e.offset() {
                    Offset::Offset(o) => Some(o),
                    _ => None,
                })
        });
        if position.is_some_and(|o| o >= high) {
            self.pending.remove(&partition);
        }
    }

    /// Like [`TopicReplay::next`], but returns `Ok(None)` once caught up and nothing arrives
    /// for `idle` (used to notice the end of a replay whose last messages were evicted).
    ///
    /// # Errors
    /// As [`TopicReplay::next`].
    pub async fn next_within(&mut self, idle: Duration) -> Result<Option<OwnedMessage>, RegistryError> {
        match tokio::time::timeout(idle, self.next()).await {
            Ok(m) => m.map(Some),
            Err(_) => Ok(None),
        }
    }
}

/// Decodes a registry message; `None` (with a warning) for tombstones and undecodable values.
pub fn decode_registry(message: &OwnedMessage) -> Option<RegistryEvent> {
    let payload = message.payload()?;
    match RegistryEvent::decode(payload) {
        Ok(e) => Some(e),
        Err(e) => {
            tracing::warn!(partition = message.partition(), offset = message.offset(), error = %e, "skipping undecodable registry event");
            None
        }
    }
}

/// Consumer errors that librdkafka recovers from by itself (connection lost, every broker
/// down, a request timed out, a leader moving): a reader waits them out within its caller's
/// deadline. Any other error (an offset out of range, an unknown topic, authorization) is the
/// caller's to report.
pub fn is_retriable(e: &rdkafka::error::KafkaError) -> bool {
    use rdkafka::error::RDKafkaErrorCode as C;
    matches!(
        e.rdkafka_error_code(),
        Some(
            C::BrokerTransportFailure
                | C::AllBrokersDown
                | C::OperationTimedOut
                | C::RequestTimedOut
                | C::NetworkException
                | C::LeaderNotAvailable
                | C::NotLeaderForPartition
                | C::BrokerNotAvailable
                | C::Resolve
        )
    )
}

/// Reads the registry topic to its end and returns the folded registry.
///
/// # Errors
/// [`RegistryError::CatchUpTimeout`] when the end is not reached within `timeout`; the errors
/// of [`TopicReplay::start`].
pub async fn load(kafka: &KafkaConfig, timeout: Duration) -> Result<Registry, RegistryError> {
    let mut replay = TopicReplay::start(kafka, &kafka.topics.registry, timeout).await?;
    let mut registry = Registry::new();
    catch_up(&mut replay, &mut registry, timeout).await?;
    Ok(registry)
}

async fn catch_up(replay: &mut TopicReplay, registry: &mut Registry, timeout: Duration) -> Result<(), RegistryError> {
    let deadline = tokio::time::Instant::now() + timeout;
    while !replay.caught_up() {
        match tokio::time::timeout_at(deadline, replay.next_in_backlog()).await {
            Ok(m) => {
                let Some(m) = m? else { break };
                if let Some(e) = decode_registry(&m) {
                    registry.apply(&e);
                }
            }
            Err(_) => {
                return Err(RegistryError::CatchUpTimeout {
                    topic: replay.topic().to_string(),
                    timeout,
                })
            }
        }
    }
    Ok(())
}

/// Reads the registry to its end, then keeps following it: returns the registry as of now and
/// a channel of every later event, fed until `shutdown` or until the receiver is dropped.
///
/// # Errors
/// As [`load`].
pub async fn follow(
    kafka: &KafkaConfig,
    timeout: Duration,
    shutdown: CancellationToken,
) -> Result<(Registry, mpsc::Receiver<RegistryEvent>), RegistryError> {
    let mut replay = TopicReplay::start(kafka, &kafka.topics.registry, timeout).await?;
    let mut registry = Registry::new();
    catch_up(&mut replay, &mut registry, timeout).await?;
    let (tx, rx) = mpsc::channel(1024);
    tokio::spawn(async move {
        loop {
            let message = tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tx.closed() => return,
                m = replay.next() => m,
            };
            match message {
                Ok(m) => {
                    if let Some(e) = decode_registry(&m) {
                        if tx.send(e).await.is_err() {
                            return;
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "registry follower: read error; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    });
    Ok((registry, rx))
}

/// A partition's watermarks, retrying while its leadership settles (a topic just created, a
/// leader moving: `NotLeaderForPartition`, `LeaderNotAvailable`) until `timeout`.
fn watermarks(
    consumer: &StreamConsumer<EofQuiet>,
    topic: &str,
    p: i32,
    timeout: Duration,
) -> Result<(i64, i64), rdkafka::error::KafkaError> {
    use rdkafka::types::RDKafkaErrorCode as C;
    let deadline = std::time::Instant::now() + timeout;
    loop {
        match consumer.fetch_watermarks(topic, p, timeout) {
            Err(e)
                if std::time::Instant::now() < deadline
                    && matches!(
                        e.rdkafka_error_code(),
                        Some(C::NotLeaderForPartition | C::LeaderNotAvailable | C::UnknownTopicOrPartition)
                    ) =>
            {
                std::thread::sleep(Duration::from_millis(200));
            }
            r => return r,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_trouble_is_waited_out_and_loss_is_not() {
        use rdkafka::error::{KafkaError as K, RDKafkaErrorCode as C};
        assert!(is_retriable(&K::MessageConsumption(C::BrokerTransportFailure)));
        assert!(is_retriable(&K::MessageConsumption(C::AllBrokersDown)));
        assert!(is_retriable(&K::MessageConsumption(C::NotLeaderForPartition)));
        assert!(!is_retriable(&K::MessageConsumption(C::OffsetOutOfRange)));
        assert!(!is_retriable(&K::MessageConsumption(C::AutoOffsetReset)));
        assert!(!is_retriable(&K::MessageConsumption(C::TopicAuthorizationFailed)));
        assert!(!is_retriable(&K::PartitionEOF(0)));
    }
}
