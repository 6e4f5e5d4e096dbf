//! Joins commission reports to their executions, whatever the order of arrival, and publishes
//! each execution id once.
//!
//! IB sends an execution (`execDetails`) and its commission report separately, usually in that
//! order but not always; a `reqExecutions` after a reconnect sends the day's executions again,
//! most of them already published. [`Join`] holds an execution until its commission arrives
//! (or [`Join::due`] gives up after `--commission-wait` and it is published without one), holds
//! an early commission until its execution arrives, and answers [`Outcome::Duplicate`] for an
//! exec id already published or in flight. A correction has an exec id of its own (same stem,
//! next revision), so it is published as its own event.
//!
//! An execution is *in flight* from [`Outcome::Publish`] until the caller says [`Join::acked`]
//! (Kafka has it) or [`Join::failed`] (it does not: a later report of the same exec id, such as
//! the next `reqExecutions`, publishes it again). Published ids are kept for a few days by
//! execution time ([`Join::forget_before`]): IB forgets the day's executions at the end of its
//! trading day, which is not midnight UTC, so a reconnect just after midnight still gets
//! yesterday's list and must find it known.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::event::ExecutionEvent;

/// A commission report (`commissionReport`), joined to its execution by exec id.
#[derive(Debug, Clone, PartialEq)]
pub struct Commission {
    pub exec_id: String,
    pub commission: f64,
    pub currency: String,
    pub realized_pnl: Option<f64>,
}

/// What to do with a report.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Publish this event (its commission joined when there is one); then call
    /// [`Join::acked`] or [`Join::failed`].
    Publish(Box<ExecutionEvent>),
    /// Held until its other half arrives.
    Waiting,
    /// Already published or in flight: nothing to do.
    Duplicate,
    /// The commission of an execution published without one (it came after
    /// `--commission-wait`): not in the table's row; the caller dead-letters it, so it is not
    /// silently lost.
    LateCommission(Commission),
}

/// Where an exec id stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sent {
    InFlight { with_commission: bool },
    Acked { with_commission: bool },
}

/// The join state of one ingest process for the current trading day.
#[derive(Debug, Default)]
pub struct Join {
    waiting: HashMap<String, (ExecutionEvent, Instant)>,
    early: HashMap<String, (Commission, Instant)>,
    /// Exec id → where it stands, and its execution time (µs since the epoch).
    sent: HashMap<String, (Sent, i64)>,
}

impl Join {
    /// A join that knows `published`: (exec id, with its commission, execution time) of the
    /// executions already on the topic, read at start.
    pub fn with_published<I: IntoIterator<Item = (String, bool, i64)>>(published: I) -> Join {
        Join {
            sent: published
                .into_iter()
                .map(|(id, with_commission, at)| (id, (Sent::Acked { with_commission }, at)))
                .collect(),
            ..Join::default()
        }
    }

    /// An execution report (live or requested); its `commission` fields are ignored.
    pub fn execution(&mut self, mut e: ExecutionEvent, now: Instant) -> Outcome {
        if self.sent.contains_key(&e.exec_id) || self.waiting.contains_key(&e.exec_id) {
            return Outcome::Duplicate;
        }
        match self.early.remove(&e.exec_id) {
            Some((c, _)) => {
                attach(&mut e, c);
                self.publish(e)
            }
            None => {
                e.commission = None;
                e.commission_currency = None;
                e.realized_pnl = None;
                self.waiting.insert(e.exec_id.clone(), (e, now));
                Outcome::Waiting
            }
        }
    }

    /// A commission report.
    pub fn commission(&mut self, c: Commission, now: Instant) -> Outcome {
        if let Some((mut e, _)) = self.waiting.remove(&c.exec_id) {
            attach(&mut e, c);
            return self.publish(e);
        }
        match self.sent.get(&c.exec_id).map(|(s, _)| s) {
            Some(Sent::InFlight { with_commission: false } | Sent::Acked { with_commission: false }) => {
                Outcome::LateCommission(c)
            }
            Some(_) => Outcome::Duplicate,
            None => {
                self.early.insert(c.exec_id.clone(), (c, now));
                Outcome::Waiting
            }
        }
    }

    /// Executions that waited `wait` or longer for their commission, to publish without one
    /// (marked in flight). Early commissions older than a day are dropped (their execution
    /// belongs to a day IB no longer reports).
    pub fn due(&mut self, now: Instant, wait: Duration) -> Vec<ExecutionEvent> {
        self.early
            .retain(|_, (_, since)| now.duration_since(*since) < Duration::from_secs(86_400));
        let late: Vec<ExecutionEvent> = self
            .waiting
            .extract_if(|_, (_, since)| now.duration_since(*since) >= wait)
            .map(|(_, (e, _))| e)
            .collect();
        for e in &late {
            self.sent.insert(
                e.exec_id.clone(),
                (Sent::InFlight { with_commission: false }, e.exec_time),
            );
        }
        late
    }

    /// Kafka acknowledged the event of `exec_id`.
    pub fn acked(&mut self, exec_id: &str) {
        if let Some((s, _)) = self.sent.get_mut(exec_id) {
            if let Sent::InFlight { with_commission } = *s {
                *s = Sent::Acked { with_commission };
            }
        }
    }

    /// The event of `exec_id` was not published (a failed or aborted produce): the next report
    /// of it publishes it again.
    pub fn failed(&mut self, exec_id: &str) {
        if matches!(self.sent.get(exec_id), Some((Sent::InFlight { .. }, _))) {
            self.sent.remove(exec_id);
        }
    }

    /// Forgets published ids of executions before `cutoff` (µs since the epoch): IB no longer
    /// reports them. Early commissions are dropped by [`Join::due`] after a day.
    pub fn forget_before(&mut self, cutoff: i64) {
        self.sent.retain(|_, (_, at)| *at >= cutoff);
    }

    /// Executions held for their commission.
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Exec ids published or in flight today.
    pub fn sent(&self) -> usize {
        self.sent.len()
    }

    fn publish(&mut self, e: ExecutionEvent) -> Outcome {
        let with_commission = e.commission.is_some();
        self.sent
            .insert(e.exec_id.clone(), (Sent::InFlight { with_commission }, e.exec_time));
        Outcome::Publish(Box::new(e))
    }
}

fn attach(e: &mut ExecutionEvent, c: Commission) {
    e.commission = Some(c.commission);
    e.commission_currency = Some(c.currency);
    e.realized_pnl = c.realized_pnl;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::executions::event::tests::sample;

    fn exec(id: &str) -> ExecutionEvent {
        let mut e = sample();
        e.exec_id = id.into();
        e.commission = None;
        e.commission_currency = None;
        e.realized_pnl = None;
        e
    }

    fn comm(id: &str, c: f64) -> Commission {
        Commission {
            exec_id: id.into(),
            commission: c,
            currency: "USD".into(),
            realized_pnl: Some(4.0),
        }
    }

    fn published(o: Outcome) -> ExecutionEvent {
        match o {
            Outcome::Publish(e) => *e,
            other => panic!("expected Publish, got {other:?}"),
        }
    }

    #[test]
    fn commission_joins_in_either_order() {
        let t = Instant::now();
        let mut j = Join::default();
        assert_eq!(j.execution(exec("a.01"), t), Outcome::Waiting);
        let e = published(j.commission(comm("a.01", 1.5), t));
        assert_eq!((e.commission, e.realized_pnl), (Some(1.5), Some(4.0)));

        assert_eq!(j.commission(comm("b.01", 2.5), t), Outcome::Waiting, "commission first");
        let e = published(j.execution(exec("b.01"), t));
        assert_eq!(e.commission, Some(2.5));
        assert_eq!(j.waiting(), 0);
    }

    #[test]
    fn each_exec_id_is_published_once_and_corrections_are_their_own() {
        let t = Instant::now();
        let mut j = Join::with_published([("old.01".to_string(), true, 0)]);
        assert_eq!(
            j.execution(exec("old.01"), t),
            Outcome::Duplicate,
            "published before a restart"
        );
        assert_eq!(j.commission(comm("old.01", 1.0), t), Outcome::Duplicate);
        assert_eq!(j.execution(exec("a.01"), t), Outcome::Waiting);
        assert_eq!(
            j.execution(exec("a.01"), t),
            Outcome::Duplicate,
            "requested again while waiting"
        );
        published(j.commission(comm("a.01", 1.0), t));
        assert_eq!(j.execution(exec("a.01"), t), Outcome::Duplicate, "in flight");
        j.acked("a.01");
        assert_eq!(j.execution(exec("a.01"), t), Outcome::Duplicate, "acked");
        assert_eq!(
            j.execution(exec("a.02"), t),
            Outcome::Waiting,
            "a correction is a new id"
        );
        assert_eq!(j.commission(comm("a.01", 1.0), t), Outcome::Duplicate);
    }

    #[test]
    fn a_failed_publish_is_published_again_by_the_next_report() {
        let t = Instant::now();
        let mut j = Join::default();
        j.execution(exec("a.01"), t);
        published(j.commission(comm("a.01", 1.0), t));
        j.failed("a.01");
        assert_eq!(j.execution(exec("a.01"), t), Outcome::Waiting);
        assert_eq!(published(j.commission(comm("a.01", 1.0), t)).commission, Some(1.0));
        j.acked("a.01");
        j.failed("a.01");
        assert_eq!(
            j.execution(exec("a.01"), t),
            Outcome::Duplicate,
            "failed after acked changes nothing"
        );
    }

    #[test]
    fn an_execution_without_commission_is_published_after_the_wait_and_its_late_commission_reported() {
        let t = Instant::now();
        let wait = Duration::from_secs(30);
        let mut j = Join::default();
        j.execution(exec("a.01"), t);
        assert!(j.due(t + Duration::from_secs(29), wait).is_empty());
        let due = j.due(t + wait, wait);
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].commission, None);
        assert_eq!(j.execution(exec("a.01"), t), Outcome::Duplicate);
        assert_eq!(
            j.commission(comm("a.01", 1.0), t),
            Outcome::LateCommission(comm("a.01", 1.0))
        );
        j.acked("a.01");
        assert_eq!(
            j.commission(comm("a.01", 1.0), t),
            Outcome::LateCommission(comm("a.01", 1.0))
        );
    }

    #[test]
    fn ids_are_forgotten_by_execution_time_only() {
        let t = Instant::now();
        let day = 86_400_000_000i64;
        let mut j = Join::with_published([("old.01".to_string(), true, day), ("new.01".to_string(), true, 3 * day)]);
        let mut e = exec("mid.01");
        e.exec_time = 2 * day;
        j.execution(e, t);
        published(j.commission(comm("mid.01", 1.0), t));
        j.forget_before(2 * day);
        assert_eq!(j.sent(), 2);
        assert_eq!(
            j.execution(exec("old.01"), t),
            Outcome::Waiting,
            "older than the cutoff"
        );
        assert_eq!(j.execution(exec("mid.01"), t), Outcome::Duplicate);
        assert_eq!(j.execution(exec("new.01"), t), Outcome::Duplicate);
    }
}
