//! Executions in ingest: what the session loop does with IB's execution and commission reports.
//!
//! Every connection opens `order_update_stream` (live executions, those of other clients' orders
//! too when ingest's client id is TWS's master API client id) and then asks for the day's
//! executions (`reqExecutions`, no filter), so a fill made while ingest was disconnected is
//! published at the next connect. Both feed one [`Join`] that lives as long as the lease term:
//! it joins each commission to its execution, holds an execution up to `--commission-wait` for
//! its commission, and publishes each exec id once. At start, [`published_since`] reads the
//! exec ids already on the executions topic (after the transactional producer fenced every
//! predecessor, so what it reads is final), so a restart publishes only what is new.
//!
//! Executions go through the ingest's transactional producer ([`Publisher::publish_execution`]);
//! one that is not delivered comes back by exec id, is forgotten by the join, and the day's
//! executions are requested again. They use no streaming slot.
//!
//! [`Publisher::publish_execution`]: super::Publisher::publish_execution

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Message, Offset, TopicPartitionList};

use super::IngestError;
use crate::executions::join::Join;
use crate::executions::ExecutionEvent;
use crate::kafka::{KafkaConfig, KafkaError};
use crate::registry::{RegistryError, TopicReplay};

/// How long published exec ids are remembered, by execution time: IB reports the current
/// trading day's executions, whose end is not midnight UTC; three days cover any zone and a
/// weekend's Friday.
pub const REMEMBER: Duration = Duration::from_secs(3 * 86_400);

/// The executions side of an ingest term.
pub(crate) struct Fills {
    pub(super) join: Join,
    /// How long an execution waits for its commission before it is published without one.
    pub(super) wait: Duration,
    /// Ask IB for the day's executions again (a delivery failed).
    pub(crate) request_wanted: bool,
    /// A time IB sent was not in UTC (warned once).
    pub(super) warned_zone: bool,
    /// When published ids older than [`REMEMBER`] were last forgotten.
    pub(super) last_forget: Instant,
    /// Frames the day's executions list is expected to hold (an execution and its commission
    /// report per fill): what the topic held at start, or what the last list or an
    /// overflowing one showed. The IB buffer of each connection is sized to fit it too.
    expected_frames: usize,
    /// Frames of the day's list received so far on this connection.
    list_frames: usize,
    /// Live frames (and frames a live overflow dropped) since the last list ended: the next
    /// list holds them too.
    live_frames: usize,
}

impl Fills {
    /// `join` knows what is already on the topic.
    pub(crate) fn new(join: Join, wait: Duration) -> Self {
        // What the topic held at start (a few days of fills: more than today's list).
        let expected_frames = 2 * join.sent();
        Self {
            join,
            wait,
            request_wanted: false,
            warned_zone: false,
            last_forget: Instant::now(),
            expected_frames,
            list_frames: 0,
            live_frames: 0,
        }
    }

    /// Frames the next day's executions list is expected to hold: the last list's and every
    /// live frame since.
    pub(crate) fn expected_frames(&self) -> usize {
        self.expected_frames + self.live_frames
    }

    /// A live frame (an execution or a commission report) arrived.
    pub(crate) fn live_frame(&mut self) {
        self.live_frames += 1;
    }

    /// The day's executions were requested: a new list begins.
    pub(crate) fn list_started(&mut self) {
        self.list_frames = 0;
    }

    /// A frame of the day's list arrived.
    pub(crate) fn list_frame(&mut self) {
        self.list_frames += 1;
    }

    /// The day's list ended: the next one is at least as long.
    pub(crate) fn list_ended(&mut self) {
        self.expected_frames = self.expected_frames.max(self.list_frames);
        self.list_frames = 0;
        self.live_frames = 0;
    }

    /// The day's list overflowed the buffer after `dropped` frames were lost: the next
    /// connection's buffer holds twice what was seen.
    pub(crate) fn list_overflowed(&mut self, dropped: usize) {
        self.expected_frames = self.expected_frames.max((self.list_frames + dropped) * 2);
        self.list_frames = 0;
    }

    /// Live executions overflowed the buffer after `dropped` frames were lost: the next list
    /// holds those too.
    pub(crate) fn live_overflowed(&mut self, dropped: usize) {
        self.live_frames += dropped;
    }

    /// How often the session loop calls `Engine::publish_due_executions`.
    pub(crate) fn tick(&self) -> Duration {
        (self.wait / 2).clamp(Duration::from_millis(10), Duration::from_secs(1))
    }
}

/// Exec ids (with whether their commission was joined, and their execution time) of the
/// executions on `kafka.topics.executions` written since `since_micros`: the records from
/// that time on (Kafka's time index), a few days of fills at most, never the whole history.
///
/// # Errors
/// [`IngestError::Registry`] when the topic is missing (run `possync topics create`) or cannot
/// be read within `timeout`.
pub async fn published_since(
    kafka: &KafkaConfig,
    since_micros: i64,
    timeout: Duration,
) -> Result<Vec<(String, bool, i64)>, IngestError> {
    let topic = kafka.topics.executions.clone();
    let from = {
        let (kafka, topic) = (kafka.clone(), topic.clone());
        tokio::task::spawn_blocking(move || offsets_at(&kafka, &topic, since_micros / 1000, timeout))
            .await
            .map_err(|e| RegistryError::Invalid(format!("offsets lookup task failed: {e}")))??
    };
    let mut replay = TopicReplay::start_from(kafka, &topic, timeout, from).await?;
    let deadline = tokio::time::Instant::now() + timeout.max(Duration::from_secs(30));
    let mut out = Vec::new();
    while !replay.caught_up() {
        let next = tokio::time::timeout_at(deadline, replay.next_in_backlog()).await;
        let Ok(next) = next else {
            return Err(RegistryError::CatchUpTimeout {
                topic: topic.clone(),
                timeout,
            }
            .into());
        };
        let Some(m) = next? else { continue };
        match m.payload().map(ExecutionEvent::decode) {
            Some(Ok(e)) if e.exec_time >= since_micros => out.push((e.exec_id, e.commission.is_some(), e.exec_time)),
            Some(Ok(_)) => {}
            Some(Err(err)) => {
                tracing::warn!(topic = %topic, partition = m.partition(), offset = m.offset(), error = %err, "undecodable record on the executions topic; skipped")
            }
            None => {}
        }
    }
    Ok(out)
}

/// The first offset of each partition of `topic` at or after `since_ms` (0 when the broker says
/// nothing is that recent: see below).
fn offsets_at(
    kafka: &KafkaConfig,
    topic: &str,
    since_ms: i64,
    timeout: Duration,
) -> Result<HashMap<i32, i64>, RegistryError> {
    let consumer: BaseConsumer = kafka
        .consumer(&format!("possync-exec-offsets-{}", crate::events::new_id()))
        .create()
        .map_err(KafkaError::client("create consumer"))?;
    let partitions = crate::registry::reader::partitions(&consumer, topic, timeout)?;
    let mut tpl = TopicPartitionList::new();
    for p in &partitions {
        tpl.add_partition_offset(topic, *p, Offset::Offset(since_ms))
            .map_err(KafkaError::client("build offsets request"))?;
    }
    let found = consumer
        .offsets_for_times(tpl, timeout)
        .map_err(KafkaError::client(format!("look up offsets by time in {topic}")))?;
    let mut out = HashMap::new();
    for e in found.elements() {
        // `End`: nothing that recent, or a broker without a time index (the embedded
        // MockCluster answers `End` to every lookup): the partition is read from its start,
        // once, and the fold keeps only recent executions. Real Kafka answers from its time
        // index, so a restart reads a few days of fills, not the history.
        let offset = match e.offset() {
            Offset::Offset(n) => n,
            _ => 0,
        };
        out.insert(e.partition(), offset);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The next day's list holds the last list, every live frame since and every frame a live
    /// overflow dropped: the buffer of the connection after an overflow fits it at once.
    #[test]
    fn the_next_list_is_expected_to_hold_the_last_one_and_every_live_frame_since() {
        let mut f = Fills::new(Join::default(), Duration::from_secs(10));
        assert_eq!(f.expected_frames(), 0);
        f.list_started();
        (0..100).for_each(|_| f.list_frame());
        f.list_ended();
        assert_eq!(f.expected_frames(), 100);
        (0..40).for_each(|_| f.live_frame());
        assert_eq!(f.expected_frames(), 140);
        f.live_overflowed(500);
        assert_eq!(
            f.expected_frames(),
            640,
            "what the overflow dropped is in the next list"
        );
        f.list_started();
        (0..640).for_each(|_| f.list_frame());
        f.list_ended();
        assert_eq!(
            f.expected_frames(),
            640,
            "the live frames are in the list now: not counted twice"
        );
        f.list_started();
        (0..10).for_each(|_| f.list_frame());
        f.list_overflowed(1_000);
        assert_eq!(f.expected_frames(), 2_020, "twice what the overflowing list showed");
    }
}
