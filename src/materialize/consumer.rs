//! The Kafka side: the rebalance callback and per-partition offset checks.
//!
//! **Every assignment starts each partition at its Delta txn version + 1, read fresh from the
//! tables at that moment** ([`StartSource`]; [`super::offsets::DeltaStarts`] in production).
//! Other members of the group advance the versions of the partitions they hold, so nothing
//! cached from an earlier assignment or from this member's own flushes is used; a member that
//! gets back a partition another member advanced resumes exactly where the tables are. The
//! consumer never starts from Kafka's own committed offsets.
//!
//! The callback runs inside `recv()`, on the materializer's task, between two messages. It
//! applies the assignment (`assign` / `unassign`, or `incremental_assign` /
//! `incremental_unassign` under the cooperative protocol, e.g. `-K
//! partition.assignment.strategy=cooperative-sticky`) and records what happened
//! ([`RebalanceEvent`]); the run loop reacts before taking the next message (revoked
//! partitions: drop their buffers; assigned: expect their start offset). An assignment is
//! recorded only after librdkafka accepted it. If the start offsets cannot be read or
//! librdkafka refuses the (un)assignment, the callback records [`RebalanceEvent::Fatal`] and
//! the materializer stops loudly: a partition either starts at its Delta version + 1 or the
//! process stops. The run loop also refuses a message of an assigned partition it holds no
//! cursor for ([`super::MaterializeError::Unpositioned`]).
//!
//! `auto.offset.reset=error`: an offset that the broker no longer has (retention, or the
//! embedded broker's ~5 MiB per partition) is an error, never a silent jump; a gap between the
//! expected and the received offset is checked against the log start offset too.

use std::sync::Mutex;

use rdkafka::client::ClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, RebalanceProtocol};
use rdkafka::error::KafkaResult;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::types::RDKafkaRespErr;

/// What a rebalance did.
#[derive(Debug)]
pub enum RebalanceEvent {
    /// Partitions assigned (librdkafka accepted them), with the offset consumption starts at
    /// (`None`: log start, the partition is new to the tables or this is a replay).
    Assigned(Vec<(String, i32, Option<i64>)>),
    /// Partitions revoked (or lost).
    Revoked(Vec<(String, i32)>),
    /// The rebalance could not be applied exactly; the materializer must stop.
    Fatal(String),
    /// A start position must not be used (e.g. the log was replaced); the materializer stops
    /// with this error.
    Stop(Box<super::MaterializeError>),
}

/// Why assigned partitions cannot start.
#[derive(Debug)]
pub enum StartError {
    /// The positions could not be read (restarting the member retries).
    Unreadable(String),
    /// The positions are known but must not be used.
    Refused(super::MaterializeError),
}

impl From<String> for StartError {
    fn from(why: String) -> Self {
        StartError::Unreadable(why)
    }
}

/// Where assigned partitions start.
pub trait StartSource: Send + Sync {
    /// The next offset to consume of each partition, in order (`None`: the log start).
    ///
    /// # Errors
    /// A message saying why the positions are unknown (the materializer then stops).
    fn starts(&self, parts: &[(String, i32)]) -> Result<Vec<Option<i64>>, StartError>;
}

/// Every partition from its log start (`--replay-from-beginning`; tables still drop what
/// they hold).
#[derive(Debug, Default)]
pub struct LogStart;

impl StartSource for LogStart {
    fn starts(&self, parts: &[(String, i32)]) -> Result<Vec<Option<i64>>, StartError> {
        Ok(vec![None; parts.len()])
    }
}

/// The librdkafka calls the callback makes (a seam so the failure paths are testable).
pub trait Assignment {
    /// Whether the group uses the cooperative (incremental) rebalance protocol.
    fn cooperative(&self) -> bool;
    /// Eager: replaces the whole assignment.
    fn assign(&self, tpl: &TopicPartitionList) -> KafkaResult<()>;
    /// Eager: drops the whole assignment.
    fn unassign(&self) -> KafkaResult<()>;
    /// Cooperative: adds partitions.
    fn incremental_assign(&self, tpl: &TopicPartitionList) -> KafkaResult<()>;
    /// Cooperative: removes partitions.
    fn incremental_unassign(&self, tpl: &TopicPartitionList) -> KafkaResult<()>;
}

impl<C: ConsumerContext> Assignment for BaseConsumer<C> {
    fn cooperative(&self) -> bool {
        matches!(self.rebalance_protocol(), RebalanceProtocol::Cooperative)
    }
    fn assign(&self, tpl: &TopicPartitionList) -> KafkaResult<()> {
        Consumer::assign(self, tpl)
    }
    fn unassign(&self) -> KafkaResult<()> {
        Consumer::unassign(self)
    }
    fn incremental_assign(&self, tpl: &TopicPartitionList) -> KafkaResult<()> {
        Consumer::incremental_assign(self, tpl)
    }
    fn incremental_unassign(&self, tpl: &TopicPartitionList) -> KafkaResult<()> {
        Consumer::incremental_unassign(self, tpl)
    }
}

/// The materializer's consumer context.
pub struct Ctx {
    /// Events not yet handled by the run loop.
    events: Mutex<Vec<RebalanceEvent>>,
    /// Where assigned partitions start.
    starts: Box<dyn StartSource>,
    /// Woken when events are recorded, so the run loop applies them even while no message
    /// arrives (a fatal rebalance stops an idle member at once).
    wake: tokio::sync::Notify,
}

impl Ctx {
    /// A context whose assignments start where `starts` says.
    pub fn new(starts: Box<dyn StartSource>) -> Self {
        Self {
            events: Mutex::new(Vec::new()),
            starts,
            wake: tokio::sync::Notify::new(),
        }
    }

    fn events(&self) -> std::sync::MutexGuard<'_, Vec<RebalanceEvent>> {
        self.events.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Completes when rebalance events were recorded since the last wake-up.
    pub async fn rebalanced(&self) {
        self.wake.notified().await;
    }

    /// Takes the pending rebalance events.
    pub fn take_events(&self) -> Vec<RebalanceEvent> {
        std::mem::take(&mut *self.events())
    }

    fn on_assign(
        &self,
        c: &impl Assignment,
        tpl: &mut TopicPartitionList,
    ) -> Result<Vec<(String, i32, Option<i64>)>, RebalanceEvent> {
        let parts: Vec<(String, i32)> = tpl
            .elements()
            .iter()
            .map(|e| (e.topic().to_string(), e.partition()))
            .collect();
        let starts = self.starts.starts(&parts).map_err(|e| match e {
            StartError::Unreadable(e) => {
                RebalanceEvent::Fatal(format!("cannot read the start offsets of {parts:?} from Delta: {e}"))
            }
            StartError::Refused(e) => RebalanceEvent::Stop(Box::new(e)),
        })?;
        let fatal = RebalanceEvent::Fatal;
        if starts.len() != parts.len() {
            return Err(fatal(format!(
                "start offsets of {parts:?}: got {} values",
                starts.len()
            )));
        }
        let mut assigned = Vec::with_capacity(parts.len());
        for ((t, p), start) in parts.into_iter().zip(starts) {
            let start = start.filter(|n| *n > 0);
            let offset = start.map_or(Offset::Beginning, Offset::Offset);
            tpl.set_partition_offset(&t, p, offset)
                .map_err(|e| fatal(format!("setting the start offset of {t}/{p}: {e}")))?;
            assigned.push((t, p, start));
        }
        let applied = if c.cooperative() {
            c.incremental_assign(tpl)
        } else {
            c.assign(tpl)
        };
        applied.map_err(|e| fatal(format!("librdkafka refused the assignment {assigned:?}: {e}")))?;
        tracing::info!(partitions = ?assigned, "partitions assigned; starting at the offsets stored in Delta");
        Ok(assigned)
    }

    fn on_revoke(&self, c: &impl Assignment, tpl: &TopicPartitionList, lost: bool) -> Result<(), String> {
        let parts: Vec<(String, i32)> = tpl
            .elements()
            .iter()
            .map(|e| (e.topic().to_string(), e.partition()))
            .collect();
        tracing::info!(partitions = ?parts, lost, "partitions revoked; dropping their buffers");
        // Dropping buffers is always safe (nothing of them was committed), so record it first.
        self.events().push(RebalanceEvent::Revoked(parts.clone()));
        let applied = if c.cooperative() {
            c.incremental_unassign(tpl)
        } else {
            c.unassign()
        };
        applied.map_err(|e| format!("librdkafka refused to revoke {parts:?}: {e}"))
    }

    /// The callback's logic, over the [`Assignment`] seam.
    fn apply(&self, c: &impl Assignment, err: RDKafkaRespErr, tpl: &mut TopicPartitionList, lost: bool) {
        let result = match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => self
                .on_assign(c, tpl)
                .map(|a| self.events().push(RebalanceEvent::Assigned(a))),
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                self.on_revoke(c, tpl, lost).map_err(RebalanceEvent::Fatal)
            }
            other => Err(RebalanceEvent::Fatal(format!("unexpected rebalance event {other:?}"))),
        };
        if let Err(event) = result {
            match &event {
                RebalanceEvent::Stop(e) => tracing::error!(error = %e, "partitions refused; the materializer stops"),
                _ => tracing::error!(?event, "rebalance failed; the materializer stops"),
            }
            self.events().push(event);
        }
        self.wake.notify_one();
    }
}

impl ClientContext for Ctx {}

impl ConsumerContext for Ctx {
    fn rebalance(&self, c: &BaseConsumer<Self>, err: RDKafkaRespErr, tpl: &mut TopicPartitionList) {
        self.apply(c, err, tpl, c.assignment_lost());
    }
}

/// Consumption state of one assigned partition: the next offset we accept.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Cursor {
    /// Next offset expected (`None`: whatever comes first, the partition is new to Delta).
    pub next: Option<i64>,
}

/// What to do with a message at `offset` given the cursor.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Check {
    /// In order: take it.
    Take,
    /// Already taken (redelivery after a seek): skip it.
    Skip,
    /// Offsets are missing before it: check the log start before going on.
    Gap { expected: i64 },
}

impl Cursor {
    /// Classifies an incoming offset.
    pub fn check(&self, offset: i64) -> Check {
        match self.next {
            None => Check::Take,
            Some(n) if offset == n => Check::Take,
            Some(n) if offset < n => Check::Skip,
            Some(n) => Check::Gap { expected: n },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursor_classifies_offsets() {
        let c = Cursor { next: Some(10) };
        assert_eq!(c.check(10), Check::Take);
        assert_eq!(c.check(3), Check::Skip);
        assert_eq!(c.check(12), Check::Gap { expected: 10 });
        assert_eq!(Cursor { next: None }.check(99), Check::Take);
    }

    use rdkafka::error::KafkaError;
    use rdkafka::types::RDKafkaErrorCode;
    use std::cell::RefCell;

    /// A recorded call: its name and the (topic, partition, offset) it was given.
    type Call = (&'static str, Vec<(String, i32, Offset)>);

    /// librdkafka stand-in: records calls, fails them on demand.
    #[derive(Default)]
    struct Fake {
        cooperative: bool,
        fail: bool,
        calls: RefCell<Vec<Call>>,
    }

    impl Fake {
        fn call(&self, name: &'static str, tpl: Option<&TopicPartitionList>) -> KafkaResult<()> {
            let parts = tpl.map_or_else(Vec::new, |t| {
                t.elements()
                    .iter()
                    .map(|e| (e.topic().to_string(), e.partition(), e.offset()))
                    .collect()
            });
            self.calls.borrow_mut().push((name, parts));
            if self.fail {
                return Err(KafkaError::Rebalance(RDKafkaErrorCode::State));
            }
            Ok(())
        }
    }

    impl Assignment for Fake {
        fn cooperative(&self) -> bool {
            self.cooperative
        }
        fn assign(&self, tpl: &TopicPartitionList) -> KafkaResult<()> {
            self.call("assign", Some(tpl))
        }
        fn unassign(&self) -> KafkaResult<()> {
            self.call("unassign", None)
        }
        fn incremental_assign(&self, tpl: &TopicPartitionList) -> KafkaResult<()> {
            self.call("incremental_assign", Some(tpl))
        }
        fn incremental_unassign(&self, tpl: &TopicPartitionList) -> KafkaResult<()> {
            self.call("incremental_unassign", Some(tpl))
        }
    }

    struct Fixed(Result<Vec<Option<i64>>, String>);

    impl StartSource for Fixed {
        fn starts(&self, _: &[(String, i32)]) -> Result<Vec<Option<i64>>, StartError> {
            self.0.clone().map_err(StartError::Unreadable)
        }
    }

    fn tpl() -> TopicPartitionList {
        let mut t = TopicPartitionList::new();
        for p in 0..3 {
            t.add_partition("a", p);
        }
        t
    }

    const ASSIGN: RDKafkaRespErr = RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS;
    const REVOKE: RDKafkaRespErr = RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS;

    #[test]
    fn assignment_starts_at_the_versions_read_now() {
        for cooperative in [false, true] {
            let ctx = Ctx::new(Box::new(Fixed(Ok(vec![Some(7), Some(0), None]))));
            let fake = Fake {
                cooperative,
                ..Fake::default()
            };
            ctx.apply(&fake, ASSIGN, &mut tpl(), false);
            let want = if cooperative { "incremental_assign" } else { "assign" };
            let offsets = vec![
                ("a".to_string(), 0, Offset::Offset(7)),
                ("a".to_string(), 1, Offset::Beginning),
                ("a".to_string(), 2, Offset::Beginning),
            ];
            assert_eq!(*fake.calls.borrow(), vec![(want, offsets)]);
            let events = ctx.take_events();
            let want = vec![
                ("a".to_string(), 0, Some(7)),
                ("a".to_string(), 1, None),
                ("a".to_string(), 2, None),
            ];
            assert!(
                matches!(events.as_slice(), [RebalanceEvent::Assigned(a)] if *a == want),
                "{events:?}"
            );
        }
    }

    #[test]
    fn a_refused_assignment_is_fatal_and_never_recorded_as_assigned() {
        for cooperative in [false, true] {
            let ctx = Ctx::new(Box::new(Fixed(Ok(vec![Some(7); 3]))));
            let fake = Fake {
                cooperative,
                fail: true,
                ..Fake::default()
            };
            ctx.apply(&fake, ASSIGN, &mut tpl(), false);
            let events = ctx.take_events();
            assert!(
                matches!(events.as_slice(), [RebalanceEvent::Fatal(why)] if why.contains("refused")),
                "{events:?}"
            );
        }
    }

    #[test]
    fn unknown_start_offsets_are_fatal_and_nothing_is_assigned() {
        let ctx = Ctx::new(Box::new(Fixed(Err("table unreadable".into()))));
        let fake = Fake::default();
        ctx.apply(&fake, ASSIGN, &mut tpl(), false);
        assert!(
            fake.calls.borrow().is_empty(),
            "assigned anyway: {:?}",
            fake.calls.borrow()
        );
        let events = ctx.take_events();
        assert!(
            matches!(events.as_slice(), [RebalanceEvent::Fatal(why)] if why.contains("table unreadable")),
            "{events:?}"
        );
    }

    #[test]
    fn a_refused_revoke_is_fatal() {
        for (cooperative, call) in [(false, "unassign"), (true, "incremental_unassign")] {
            let ctx = Ctx::new(Box::new(LogStart));
            let fake = Fake {
                cooperative,
                fail: true,
                ..Fake::default()
            };
            ctx.apply(&fake, REVOKE, &mut tpl(), false);
            assert_eq!(fake.calls.borrow()[0].0, call);
            let events = ctx.take_events();
            assert!(
                matches!(events.as_slice(), [RebalanceEvent::Revoked(p), RebalanceEvent::Fatal(_)] if p.len() == 3),
                "{events:?}"
            );
        }
    }
}
