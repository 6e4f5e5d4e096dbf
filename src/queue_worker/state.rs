//! The position queue, event-sourced from `positions.queued`, as a pure state machine.
//!
//! In log order: an enqueue event (ingest's STREAM / SNAPSHOT / RECONCILE) makes the item
//! pending (keeping the time it first became pending, so the oldest goes first); a close
//! (quantity 0) needs no refresh; a POLL event (the worker's own refresh) makes it refreshed.
//! An item taken for a poll is *in flight* until its POLL event is read back; it is never
//! taken again meanwhile (unless the poll is abandoned or its POLL event never shows up within
//! the in-flight timeout). An enqueue that arrives while the item is in flight marks the poll
//! stale: its result must not be published, as it may be older than the enqueued change.
//!
//! The worker also reads `positions.active`: an item whose newest ACTIVE-route event is newer
//! than its newest queued one is *active* (a strategy holds it and ingest streams it), exactly
//! as `position_queue`'s status says, and is not polled; an active-route event during its poll
//! makes the poll stale. A newer enqueue (ingest moved it back to the queue) makes it pending
//! again.
//!
//! Events count in `ingest_time` order, as in the materialized tables: a POLL event carries
//! a time on *ingest's* clock no later than when its poll was requested (see
//! `super::poll_event`), so a POLL read after a change that was observed later
//! (its publish raced ingest's) refreshes nothing and the item stays pending; an enqueue older
//! than the item's newest event changes nothing either.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::book::PosKey;
use crate::events::{PositionEvent, Route, Source};

/// Where an item stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Changed since its last refresh: waits for a poll.
    Pending,
    /// Refreshed by a poll since its last change.
    Refreshed,
    /// Closed (quantity 0): nothing to refresh.
    Closed,
}

/// One queued position.
#[derive(Debug, Clone)]
pub struct Item {
    /// The latest event about it (contract fields, last known figures).
    pub last: PositionEvent,
    /// Its status.
    pub status: Status,
    /// When it became pending (µs since the epoch, the enqueue event's ingest time).
    pub enqueued_at: i64,
    /// When this worker took it for a poll, if it is in flight.
    pub in_flight_since: Option<Instant>,
    /// An enqueue arrived while it was in flight: the poll's result is stale.
    pub stale_poll: bool,
    /// POLL events seen for it.
    pub refresh_count: u64,
}

/// The queue.
#[derive(Debug, Default)]
pub struct QueueState {
    items: HashMap<PosKey, Item>,
    /// Newest ACTIVE-route event per key (µs), for keys seen on the active route.
    active_at: HashMap<PosKey, i64>,
    /// The newest `ingest_time` of an ingest event read (any key, either topic): a reading of
    /// ingest's clock that is never ahead of now (see [`QueueState::ingest_clock`]).
    ingest_clock: i64,
}

impl QueueState {
    /// An empty queue.
    pub fn new() -> Self {
        Self::default()
    }

    /// Puts `item` in as it stands (start-up from a snapshot, [`super::start`]).
    pub fn restore(&mut self, key: PosKey, item: Item) {
        self.items.insert(key, item);
    }

    /// Records that `key`'s newest ACTIVE-route event is at `t` (start-up from a snapshot).
    pub fn restore_active(&mut self, key: PosKey, t: i64) {
        let at = self.active_at.entry(key).or_insert(t);
        *at = (*at).max(t);
    }

    /// Whether `key` is on the active route now: its newest ACTIVE-route event is newer than
    /// its newest queued one (`position_queue`'s status `active`).
    pub fn is_active(&self, key: &PosKey) -> bool {
        self.active_at
            .get(key)
            .is_some_and(|&a| self.items.get(key).is_none_or(|it| a > it.last.ingest_time))
    }

    /// Every item.
    pub fn items(&self) -> impl Iterator<Item = (&PosKey, &Item)> {
        self.items.iter()
    }

    /// The newest `ingest_time` ingest has stamped on an event this worker read. Ingest stamped
    /// it before the worker read it, so on ingest's clock it is not later than now, whatever
    /// this host's clock says: POLL events are stamped from it (see `super::poll_event`).
    pub fn ingest_clock(&self) -> i64 {
        self.ingest_clock
    }

    /// Applies one event of `positions.queued` or `positions.active`.
    pub fn apply(&mut self, e: PositionEvent) {
        if e.source != Source::Poll {
            self.ingest_clock = self.ingest_clock.max(e.ingest_time);
        }
        let key = PosKey::new(e.account.clone(), e.con_id);
        if e.route == Route::Active {
            let t = e.ingest_time;
            if let Some(item) = self.items.get_mut(&key) {
                if item.in_flight_since.is_some() && t > item.last.ingest_time {
                    item.stale_poll = true;
                }
            }
            self.restore_active(key, t);
            return;
        }
        match e.source {
            Source::Pnl => {}
            Source::Poll => {
                if let Some(item) = self
                    .items
                    .get_mut(&key)
                    .filter(|it| e.ingest_time < it.last.ingest_time)
                {
                    // Asked before the newest known change: it ends the poll but refreshes
                    // nothing (the table orders it before that change too).
                    item.refresh_count += 1;
                    item.in_flight_since = None;
                    item.stale_poll = false;
                    return;
                }
                let item = self.items.entry(key).or_insert_with(|| Item {
                    last: e.clone(),
                    status: Status::Refreshed,
                    enqueued_at: e.ingest_time,
                    in_flight_since: None,
                    stale_poll: false,
                    refresh_count: 0,
                });
                item.refresh_count += 1;
                item.status = if e.position == 0.0 {
                    Status::Closed
                } else {
                    Status::Refreshed
                };
                item.in_flight_since = None;
                item.stale_poll = false;
                item.last = e;
            }
            Source::Stream | Source::Snapshot | Source::Reconcile => {
                let closed = e.position == 0.0;
                match self.items.get_mut(&key) {
                    Some(item) => {
                        if item.in_flight_since.is_some() {
                            item.stale_poll = true;
                        }
                        if e.ingest_time < item.last.ingest_time {
                            // Older than what the item already reflects (a poll asked after
                            // this change was observed already contains it).
                            return;
                        }
                        if closed {
                            item.status = Status::Closed;
                        } else if item.status != Status::Pending {
                            item.status = Status::Pending;
                            item.enqueued_at = e.ingest_time;
                        }
                        item.last = e;
                    }
                    None => {
                        let status = if closed { Status::Closed } else { Status::Pending };
                        let enqueued_at = e.ingest_time;
                        self.items.insert(
                            key,
                            Item {
                                last: e,
                                status,
                                enqueued_at,
                                in_flight_since: None,
                                stale_poll: false,
                                refresh_count: 0,
                            },
                        );
                    }
                }
            }
        }
    }

    /// Forgets what no poll will need: closed items and ACTIVE-route marks of keys without an
    /// item, whose newest event is older than `cutoff` (µs, on ingest's clock). Returns how
    /// many entries went. Without it both maps keep every key ever seen (issue 20 #13).
    ///
    /// Safe for what is published: a later event of a forgotten key makes a new item (pending
    /// if open), whose poll publishes IB's answer, never a guess from the forgotten state; an
    /// item in flight is never forgotten.
    pub fn forget_before(&mut self, cutoff: i64) -> usize {
        let before = self.items.len() + self.active_at.len();
        self.items.retain(|_, it| {
            !(it.status == Status::Closed && it.in_flight_since.is_none() && it.last.ingest_time < cutoff)
        });
        let items = &self.items;
        self.active_at.retain(|k, at| *at >= cutoff || items.contains_key(k));
        before - self.items.len() - self.active_at.len()
    }

    /// Entries held (items and ACTIVE-route marks): what [`QueueState::forget_before`] bounds.
    pub fn held(&self) -> usize {
        self.items.len() + self.active_at.len()
    }

    /// Takes a *sweep*: the accounts whose oldest eligible pending item is oldest, at most
    /// `max_accounts` of them, and every eligible pending item of those accounts (one
    /// positions-multi poll answers for all of an account's items). Eligible = pending and
    /// not in flight (an item in flight for longer than `in_flight_timeout` counts as not in
    /// flight). The items come oldest first and are marked in flight.
    pub fn take_sweep(
        &mut self,
        max_accounts: usize,
        now: Instant,
        in_flight_timeout: Duration,
    ) -> Vec<(PosKey, Item)> {
        // Eligible items oldest first: an account's first appearance is its oldest item, so
        // the first `max_accounts` accounts met are the sweep's.
        let mut eligible: Vec<(i64, &PosKey)> = self
            .items
            .iter()
            .filter(|(k, it)| Self::eligible(it, now, in_flight_timeout) && !self.is_active(k))
            .map(|(k, it)| (it.enqueued_at, k))
            .collect();
        eligible.sort();
        let mut chosen: std::collections::HashSet<&str> = std::collections::HashSet::new();
        for (_, k) in &eligible {
            if !chosen.contains(k.account.as_str()) {
                if chosen.len() == max_accounts {
                    break;
                }
                chosen.insert(k.account.as_str());
            }
        }
        let keys: Vec<PosKey> = eligible
            .iter()
            .filter(|(_, k)| chosen.contains(k.account.as_str()))
            .map(|(_, k)| (*k).clone())
            .collect();
        self.mark_in_flight(keys, now)
    }

    fn eligible(it: &Item, now: Instant, in_flight_timeout: Duration) -> bool {
        it.status == Status::Pending
            && it
                .in_flight_since
                .is_none_or(|t| now.duration_since(t) >= in_flight_timeout)
    }

    fn mark_in_flight(&mut self, keys: Vec<PosKey>, now: Instant) -> Vec<(PosKey, Item)> {
        keys.into_iter()
            .map(|k| {
                let item = self.items.get_mut(&k).expect("taken from the map");
                item.in_flight_since = Some(now);
                item.stale_poll = false;
                (k, item.clone())
            })
            .collect()
    }

    /// Whether a poll result for `key` may be published (in flight, no newer enqueue, not
    /// active).
    pub fn may_publish(&self, key: &PosKey) -> bool {
        self.items
            .get(key)
            .is_some_and(|it| it.in_flight_since.is_some() && !it.stale_poll && it.status == Status::Pending)
            && !self.is_active(key)
    }

    /// Abandons the poll of `key` (failed, stale, or its event was lost): eligible again.
    pub fn release(&mut self, key: &PosKey) {
        if let Some(it) = self.items.get_mut(key) {
            it.in_flight_since = None;
            it.stale_poll = false;
        }
    }

    /// Items of the account with the most (every status): a bound on its poll answer's size
    /// as far as the queue knows. Walks every item: for connects, not per message.
    pub fn largest_account(&self) -> usize {
        let mut per: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
        for k in self.items.keys() {
            *per.entry(k.account.as_str()).or_default() += 1;
        }
        per.into_values().max().unwrap_or(0)
    }

    /// Pending items (in flight or not; active ones are not pending).
    pub fn pending(&self) -> usize {
        self.items
            .iter()
            .filter(|(k, it)| it.status == Status::Pending && !self.is_active(k))
            .count()
    }

    /// Items in flight.
    pub fn in_flight(&self) -> usize {
        self.items.values().filter(|it| it.in_flight_since.is_some()).count()
    }

    /// The item of `key`.
    pub fn get(&self, key: &PosKey) -> Option<&Item> {
        self.items.get(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::Route;

    fn ev(con: i64, source: Source, position: f64, t: i64) -> PositionEvent {
        PositionEvent {
            event_id: String::new(),
            session_id: String::new(),
            sequence: 0,
            account: "A".into(),
            con_id: con,
            symbol: "X".into(),
            sec_type: "STK".into(),
            expiry: None,
            strike: None,
            right: None,
            multiplier: None,
            exchange: String::new(),
            currency: "USD".into(),
            local_symbol: String::new(),
            trading_class: String::new(),
            position,
            avg_cost: 1.0,
            daily_pnl: None,
            unrealized_pnl: None,
            realized_pnl: None,
            market_value: None,
            route: Route::Queued,
            source,
            strategies: vec![],
            ib_time: t,
            ingest_time: t,
        }
    }

    const T: Duration = Duration::from_secs(60);

    #[test]
    fn closed_items_and_old_active_marks_are_forgotten() {
        let mut q = QueueState::new();
        // 1000 positions opened and closed (a day of expiring options), one open, one active.
        for con in 0..1000 {
            q.apply(ev(con, Source::Stream, 1.0, 10));
            q.apply(ev(con, Source::Stream, 0.0, 20));
        }
        q.apply(ev(5000, Source::Stream, 3.0, 30));
        let mut active = ev(6000, Source::Stream, 2.0, 40);
        active.route = Route::Active;
        q.apply(active);
        assert_eq!(q.held(), 1002, "nothing is forgotten on its own");
        // Before the cutoff only: nothing newer goes.
        assert_eq!(q.forget_before(20), 0);
        assert_eq!(q.forget_before(50), 1001, "closed items and the old active mark");
        assert_eq!(q.held(), 1);
        assert_eq!(q.pending(), 1, "the open item stays");
        // A later event of a forgotten key makes a new item.
        q.apply(ev(7, Source::Stream, 4.0, 60));
        assert_eq!(q.pending(), 2);
    }

    #[test]
    fn oldest_first_sweeps_never_retake_in_flight_items() {
        let mut q = QueueState::new();
        for (con, t) in [(1, 30), (2, 10), (3, 20), (4, 40)] {
            q.apply(ev(con, Source::Snapshot, 1.0, t));
        }
        q.apply(ev(2, Source::Stream, 2.0, 50)); // still pending since 10
        let now = Instant::now();
        let b: Vec<i64> = q.take_sweep(1, now, T).into_iter().map(|(k, _)| k.con_id).collect();
        assert_eq!(b, vec![2, 3, 1, 4]);
        assert!(
            q.take_sweep(5, now, T).is_empty(),
            "in-flight items are not taken again"
        );
        assert_eq!((q.pending(), q.in_flight()), (4, 4));
        q.apply(ev(2, Source::Poll, 2.0, 60));
        assert_eq!(q.get(&PosKey::new("A", 2)).unwrap().status, Status::Refreshed);
        assert_eq!((q.pending(), q.in_flight()), (3, 3));
        // An in-flight item becomes eligible again after the timeout.
        assert_eq!(q.take_sweep(5, now + T, T).len(), 3);
    }

    #[test]
    fn a_poll_asked_before_a_change_but_read_after_it_refreshes_nothing() {
        let mut q = QueueState::new();
        let k = PosKey::new("A", 1);
        q.apply(ev(1, Source::Snapshot, 1.0, 10));
        assert_eq!(q.take_sweep(5, Instant::now(), T).len(), 1);
        // Ingest saw a fill at 30; the poll, asked at 20 (before it), is read back after it.
        q.apply(ev(1, Source::Stream, 2.0, 30));
        q.apply(ev(1, Source::Poll, 1.0, 20));
        let it = q.get(&k).unwrap();
        assert_eq!(
            (it.status, it.last.position, it.refresh_count),
            (Status::Pending, 2.0, 1)
        );
        assert_eq!(q.in_flight(), 0, "the poll is over: the item can be taken again");
        assert_eq!(q.take_sweep(5, Instant::now(), T).len(), 1);
        // A poll asked after a change contains it: the older enqueue read later changes nothing.
        q.apply(ev(1, Source::Poll, 2.0, 50));
        q.apply(ev(1, Source::Stream, 2.0, 40));
        assert_eq!(q.get(&k).unwrap().status, Status::Refreshed);
    }

    #[test]
    fn a_sweep_takes_every_pending_item_of_the_accounts_with_the_oldest_items() {
        let mut q = QueueState::new();
        let mut at = |account: &str, con: i64, t: i64, position: f64| {
            let mut e = ev(con, Source::Snapshot, position, t);
            e.account = account.into();
            q.apply(e);
        };
        at("B", 1, 5, 1.0); // B's oldest: 5
        at("A", 2, 10, 1.0); // A's oldest: 10
        at("C", 3, 20, 1.0);
        at("A", 4, 90, 1.0); // newer than C's, still swept with A
        at("B", 5, 95, 0.0); // closed: no refresh due
        let now = Instant::now();
        let s: Vec<(String, i64)> = q
            .take_sweep(2, now, T)
            .into_iter()
            .map(|(k, _)| (k.account, k.con_id))
            .collect();
        assert_eq!(s, vec![("B".into(), 1), ("A".into(), 2), ("A".into(), 4)]);
        let s: Vec<i64> = q.take_sweep(2, now, T).into_iter().map(|(k, _)| k.con_id).collect();
        assert_eq!(s, vec![3], "in-flight items are not taken again");
        assert!(q.take_sweep(2, now, T).is_empty());
    }

    /// A pending item a strategy takes over (ingest moves it to the active route) is not polled
    /// while it is active, in whatever order the two topics are read; a poll in flight when it
    /// becomes active is not published; moved back to the queue, it is pending again.
    #[test]
    fn active_items_are_not_polled() {
        let active = |con: i64, t: i64| {
            let mut e = ev(con, Source::Pnl, 1.0, t);
            e.route = Route::Active;
            e
        };
        let mut q = QueueState::new();
        q.apply(ev(1, Source::Snapshot, 1.0, 10));
        q.apply(ev(2, Source::Snapshot, 1.0, 10));
        q.apply(active(1, 20));
        // Key 3: the active topic is read first, its older enqueue after.
        q.apply(active(3, 20));
        q.apply(ev(3, Source::Snapshot, 1.0, 15));
        // Key 4: active once, enqueued again since.
        q.apply(active(4, 5));
        q.apply(ev(4, Source::Stream, 1.0, 12));
        assert!(q.is_active(&PosKey::new("A", 1)) && q.is_active(&PosKey::new("A", 3)));
        assert_eq!(q.pending(), 2, "active items are not pending");
        let now = Instant::now();
        let taken: Vec<i64> = q.take_sweep(5, now, T).into_iter().map(|(k, _)| k.con_id).collect();
        assert_eq!(taken, vec![2, 4]);
        // Key 2 is taken over while its poll is in flight: the result is dropped.
        q.apply(active(2, 30));
        assert!(!q.may_publish(&PosKey::new("A", 2)));
        assert!(q.may_publish(&PosKey::new("A", 4)));
        q.release(&PosKey::new("A", 2));
        assert!(q.take_sweep(5, now, T).is_empty(), "key 2 is active now");
        // Back to the queue (ingest's enqueue is newer than the last active event): pending.
        q.apply(ev(1, Source::Snapshot, 3.0, 40));
        let taken: Vec<i64> = q.take_sweep(5, now, T).into_iter().map(|(k, _)| k.con_id).collect();
        assert_eq!(taken, vec![1]);
        // Restored from a snapshot: the same.
        let mut r = QueueState::new();
        r.apply(ev(9, Source::Snapshot, 1.0, 10));
        r.restore_active(PosKey::new("A", 9), 11);
        assert!(r.take_sweep(5, now, T).is_empty());
        assert_eq!(r.pending(), 0);
    }

    #[test]
    fn enqueue_during_a_poll_makes_it_stale_and_closes_need_no_refresh() {
        let mut q = QueueState::new();
        q.apply(ev(1, Source::Snapshot, 1.0, 1));
        q.apply(ev(2, Source::Snapshot, 0.0, 1));
        let now = Instant::now();
        assert_eq!(q.take_sweep(5, now, T).len(), 1, "closed items are not polled");
        let k = PosKey::new("A", 1);
        assert!(q.may_publish(&k));
        q.apply(ev(1, Source::Stream, 5.0, 2));
        assert!(!q.may_publish(&k), "a newer change makes the poll stale");
        q.release(&k);
        let b = q.take_sweep(5, now, T);
        assert_eq!(b.len(), 1);
        assert_eq!(b[0].1.last.position, 5.0);
        q.apply(ev(1, Source::Reconcile, 0.0, 3));
        assert_eq!(q.get(&k).unwrap().status, Status::Closed);
        assert!(!q.may_publish(&k));
        assert_eq!(q.pending(), 0);
    }
}
