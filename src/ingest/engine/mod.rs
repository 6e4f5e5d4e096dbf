//! The ingest state machine: the book, coverage, the slot plan, and what each input (position
//! update, reconciliation, registry change, PnL tick, failed delivery) publishes.
//!
//! Invariants:
//! - the last route published for an open position is remembered (`active_routes`); when the
//!   plan moves a position between routes, a SNAPSHOT event announces it on the new route, so
//!   a contract appears on `positions.active` the moment it is activated and returns to the
//!   queue (an enqueue event) when it is deactivated;
//! - streams are stopped before others are started, and a slot counts as used until its
//!   cancel is written ([`super::slots`]), so the budget holds at every instant.

mod executions;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ibapi::accounts::Position;
use ibapi::Client;

use super::publisher::{Failure, Publisher};
use super::reconcile::{reconcile, Change};
use super::router::{self, Candidate, Plan};
use super::slots::{SlotEvent, Slots};
use super::IngestError;
use crate::book::{self, Book, Held, PosKey};
use crate::events::{now_micros, RegistryEvent, Route, Source};
use crate::metrics;
use crate::registry::{Coverage, Registry};

/// First wait before offering a slot again to a position IB refused a stream for.
const REFUSED_RETRY_INITIAL: Duration = Duration::from_secs(1);
/// Longest such wait (it doubles per refusal in a row).
const REFUSED_RETRY_MAX: Duration = Duration::from_secs(60);

/// A position whose PnL stream IB refused.
#[derive(Debug, Clone, Copy)]
struct Refusal {
    /// Refusals in a row (reset by a tick of a stream).
    attempts: u32,
    /// Not offered a slot before this; `None` once due.
    until: Option<Instant>,
}

/// The wait after the `attempts`-th refusal in a row: 1 s, 2 s, 4 s … up to 60 s.
fn refused_retry_delay(attempts: u32) -> Duration {
    REFUSED_RETRY_INITIAL
        .saturating_mul(1 << attempts.saturating_sub(1).min(16))
        .min(REFUSED_RETRY_MAX)
}

/// Ingest's state, independent of the IB connection that feeds it.
pub(crate) struct Engine {
    pub(crate) registry: Registry,
    pub(crate) book: Book,
    /// Coverage of the open positions the registry names.
    covered: BTreeMap<PosKey, Coverage>,
    /// Every account the book has held a position of (a handful): a registry change looks its
    /// conId up in each, instead of scanning the book.
    accounts: BTreeSet<String>,
    /// Open positions whose last published route is ACTIVE.
    active_routes: BTreeSet<PosKey>,
    /// Covered positions currently flagged as overflow.
    overflow: BTreeSet<PosKey>,
    /// Positions IB refused a stream for (error 101: IB's own line limit, shared with other
    /// clients); offered a slot again after a backoff, or at the next sync.
    refused: HashMap<PosKey, Refusal>,
    plan: Plan,
    pub(crate) slots: Slots,
    pub(crate) publisher: Publisher,
    /// The book reflects IB (a PositionEnd was seen on the current connection).
    pub(crate) synced: bool,
    /// A resync (re-request the position list on this connection and reconcile) is needed.
    pub(crate) resync_wanted: bool,
    /// The session should end and reconnect (frames were lost: only a fresh connection's
    /// list is known to be whole).
    pub(crate) reconnect_wanted: Option<String>,
    /// Frames the next position list is expected to hold (sizes the connection's buffer).
    expected_list: usize,
    /// Executions: the join of executions and commissions, what is published.
    pub(crate) fills: super::fills::Fills,
}

impl Engine {
    /// `book` and `active_routes` are the state last published (empty on a first start).
    pub(crate) fn new(
        registry: Registry,
        slots: Slots,
        publisher: Publisher,
        book: Book,
        active_routes: BTreeSet<PosKey>,
    ) -> Self {
        let accounts = book.keys().map(|k| k.account.clone()).collect();
        Self {
            registry,
            book,
            covered: BTreeMap::new(),
            accounts,
            active_routes,
            overflow: BTreeSet::new(),
            refused: HashMap::new(),
            plan: Plan::default(),
            slots,
            publisher,
            synced: false,
            resync_wanted: false,
            reconnect_wanted: None,
            expected_list: 0,
            fills: super::fills::Fills::new(crate::executions::join::Join::default(), Duration::from_secs(10)),
        }
    }

    /// Frames the next position list is expected to hold: the last list's size, the resumed
    /// book's, or what an overflowing list showed.
    pub(crate) fn expected_list(&self) -> usize {
        self.expected_list.max(self.book.len())
    }

    /// Frames each connection's IB buffer must hold: the longer of the next position list and
    /// the next day's executions list.
    pub(crate) fn buffer_frames(&self) -> usize {
        self.expected_list().max(self.fills.expected_frames())
    }

    /// Sets [`Engine::expected_list`].
    pub(crate) fn expect_list(&mut self, frames: usize) {
        self.expected_list = frames;
    }

    /// Open positions whose last published route is ACTIVE.
    pub(crate) fn active_count(&self) -> usize {
        self.active_routes.len()
    }

    fn last_route(&self, key: &PosKey) -> Route {
        if self.active_routes.contains(key) {
            Route::Active
        } else {
            Route::Queued
        }
    }

    fn set_route(&mut self, key: &PosKey, route: Route) {
        match route {
            Route::Active => self.active_routes.insert(key.clone()),
            Route::Queued => self.active_routes.remove(key),
        };
    }

    /// Brings `key`'s coverage up to date; returns whether it changed (a change of the
    /// candidates of the slot plan).
    fn update_coverage(&mut self, key: &PosKey) -> bool {
        let open = self.book.get(key).is_some_and(Held::is_open);
        let now = self.registry.coverage(&key.account, key.con_id).filter(|_| open);
        if self.covered.get(key) == now.as_ref() {
            return false;
        }
        match now {
            Some(c) => self.covered.insert(key.clone(), c),
            None => self.covered.remove(key),
        };
        true
    }

    /// Remembers `account` among the book's accounts (cloned only when new).
    fn note_account(&mut self, account: &str) {
        if !self.accounts.contains(account) {
            self.accounts.insert(account.to_string());
        }
    }

    fn insert_held(&mut self, key: &PosKey, held: Held) {
        self.note_account(&key.account);
        self.book.insert(key.clone(), held);
    }

    fn rebuild_coverage(&mut self) {
        self.covered = self
            .book
            .iter()
            .filter(|(_, h)| h.is_open())
            .filter_map(|(k, _)| self.registry.coverage(&k.account, k.con_id).map(|c| (k.clone(), c)))
            .collect();
    }

    fn compute_plan(&mut self) {
        let candidates = self
            .covered
            .iter()
            .filter(|(k, _)| self.refused.get(*k).is_none_or(|r| r.until.is_none()))
            .map(|(k, c)| Candidate {
                key: k.clone(),
                priority: c.priority,
                holding: self.slots.holding(k),
            })
            .collect();
        self.plan = router::plan(self.slots.budget(), candidates);
    }

    async fn emit(
        &mut self,
        key: &PosKey,
        held: &Held,
        route: Route,
        source: Source,
        observed: Option<Instant>,
    ) -> Result<(), IngestError> {
        let strategies = self
            .registry
            .coverage(&key.account, key.con_id)
            .map(|c| c.strategies)
            .unwrap_or_default();
        // When the IB frame arrived (wall clock), or now for synthetic events.
        let ib_time = now_micros() - observed.map_or(0, |t| i64::try_from(t.elapsed().as_micros()).unwrap_or(0));
        self.publisher
            .publish(book::event(key, held, route, source, strategies, ib_time), observed)
            .await?;
        Ok(())
    }

    /// Applies the current plan: overflow flags, route transitions (except for `skip`, whose
    /// events the caller published), then slot moves (stops first, then starts while there is
    /// room).
    async fn apply_plan(&mut self, client: Option<&Arc<Client>>, skip: &HashSet<PosKey>) -> Result<(), IngestError> {
        for key in self.plan.overflow.difference(&self.overflow) {
            metrics::global().slot_overflow.fetch_add(1, Relaxed);
            tracing::warn!(%key, budget = self.slots.budget(), "active position without a streaming slot: routed queued until a slot frees");
        }
        self.overflow.clone_from(&self.plan.overflow);
        metrics::global()
            .slot_waiting
            .store(self.overflow.len() as i64, Relaxed);

        // Only a position on the plan's active list or last published active can change route
        // (the route is ACTIVE exactly on the plan's active list): at most the budget plus the
        // active routes, whatever the size of the book or of the covered set.
        let check: BTreeSet<PosKey> = self
            .plan
            .active
            .iter()
            .chain(self.active_routes.iter())
            .cloned()
            .collect();
        for key in check {
            if skip.contains(&key) {
                continue;
            }
            let Some(held) = self.book.get(&key).filter(|h| h.is_open()).cloned() else {
                self.active_routes.remove(&key);
                continue;
            };
            let route = self.plan.route(&key);
            if route != self.last_route(&key) {
                tracing::info!(%key, ?route, "position changes route");
                self.emit(&key, &held, route, Source::Snapshot, None).await?;
                self.set_route(&key, route);
            }
        }

        let moves = router::moves(&self.plan, self.slots.holders());
        for key in &moves.revoke {
            tracing::debug!(%key, "stopping PnL stream");
            self.slots.stop(key);
        }
        if let Some(client) = client.filter(|_| self.synced) {
            for key in moves.grant {
                if self.slots.in_use() >= self.slots.budget() {
                    break;
                }
                if self.slots.start(client, key.clone()) {
                    tracing::debug!(%key, in_use = self.slots.in_use(), "started PnL stream");
                }
            }
        }
        Ok(())
    }

    /// A live update of the positions subscription. Its cost does not grow with the book: the
    /// slot plan is recomputed only when the update changes the set of covered open positions
    /// (a covered position opened or closed), which is what the plan is made of.
    pub(crate) async fn on_stream(
        &mut self,
        client: &Arc<Client>,
        p: Position,
        observed: Instant,
    ) -> Result<(), IngestError> {
        let key = PosKey::new(p.account.clone(), i64::from(p.contract.contract_id));
        let mut held = Held::from_ib(&p.contract, p.position, p.average_cost);
        match self.book.get(&key) {
            None if !held.is_open() => return Ok(()),
            Some(old) if !old.dirty && old.same_figures(&held) => return Ok(()),
            Some(old) => held.pnl = old.pnl.filter(|_| held.is_open()),
            None => {}
        }
        let replan = if held.is_open() {
            self.insert_held(&key, held.clone());
            let replan = self.update_coverage(&key);
            if replan {
                self.compute_plan();
            }
            let route = self.plan.route(&key);
            self.emit(&key, &held, route, Source::Stream, Some(observed)).await?;
            self.set_route(&key, route);
            replan
        } else {
            let route = self.last_route(&key);
            self.emit(&key, &held, route, Source::Stream, Some(observed)).await?;
            self.book.remove(&key);
            self.active_routes.remove(&key);
            let replan = self.covered.remove(&key).is_some();
            if replan {
                self.compute_plan();
            }
            replan
        };
        if replan {
            self.apply_plan(Some(client), &HashSet::from([key])).await?;
        }
        Ok(())
    }

    /// IB's full position list (everything up to PositionEnd): reconcile, then re-plan.
    pub(crate) async fn sync(&mut self, client: &Arc<Client>, after: Book) -> Result<(), IngestError> {
        self.absorb_failures();
        let changes = reconcile(&self.book, &after);
        let mut book: Book = after.into_iter().filter(|(_, h)| h.is_open()).collect();
        for (k, h) in &mut book {
            h.pnl = self.book.get(k).and_then(|old| old.pnl);
        }
        for k in book.keys() {
            self.note_account(&k.account);
        }
        let before = std::mem::replace(&mut self.book, book);
        self.refused.clear();
        self.rebuild_coverage();
        self.compute_plan();
        self.synced = true;
        let (mut snapshots, mut closes) = (0usize, 0usize);
        let mut touched = HashSet::new();
        for change in changes {
            match change {
                Change::Snapshot(key, held) => {
                    let route = if held.is_open() {
                        self.plan.route(&key)
                    } else {
                        self.last_route(&key)
                    };
                    self.emit(&key, &held, route, Source::Snapshot, None).await?;
                    if held.is_open() {
                        self.set_route(&key, route);
                    } else {
                        self.active_routes.remove(&key);
                    }
                    snapshots += 1;
                    touched.insert(key);
                }
                Change::Close(key, held) => {
                    let route = self.last_route(&key);
                    self.emit(&key, &held, route, Source::Reconcile, None).await?;
                    metrics::global().reconcile_closes.fetch_add(1, Relaxed);
                    tracing::info!(%key, was = before.get(&key).map(|h| h.position), "position vanished while disconnected: RECONCILE close");
                    self.active_routes.remove(&key);
                    closes += 1;
                    touched.insert(key);
                }
            }
        }
        metrics::global().reconciliations.fetch_add(1, Relaxed);
        tracing::info!(
            open = self.book.len(),
            snapshots,
            closes,
            covered = self.covered.len(),
            "positions reconciled with IB"
        );
        self.apply_plan(Some(client), &touched).await
    }

    /// A registry change (applied at once; routes and slots follow when synced).
    pub(crate) async fn on_registry(
        &mut self,
        client: Option<&Arc<Client>>,
        event: RegistryEvent,
    ) -> Result<(), IngestError> {
        if !self.registry.apply(&event) {
            return Ok(());
        }
        tracing::info!(strategy = %event.strategy, account = ?event.account, con_id = event.con_id, action = ?event.action, priority = event.priority, "registry change");
        // The positions of this conId: one lookup per account (a handful), not a scan of the book.
        let keys: Vec<PosKey> = match &event.account {
            Some(a) => vec![PosKey::new(a.clone(), event.con_id)],
            None => self
                .accounts
                .iter()
                .map(|a| PosKey::new(a.clone(), event.con_id))
                .collect(),
        };
        let mut changed = false;
        for key in keys {
            if self.book.contains_key(&key) {
                changed |= self.update_coverage(&key);
            }
        }
        if changed && self.synced {
            self.compute_plan();
            self.apply_plan(client, &HashSet::new()).await?;
        }
        Ok(())
    }

    /// A report of a PnL stream task.
    pub(crate) async fn on_slot_event(&mut self, client: &Arc<Client>, event: SlotEvent) -> Result<(), IngestError> {
        match event {
            SlotEvent::Tick { key, pnl, observed, .. } => {
                // The stream works: a later refusal starts its backoff afresh.
                self.refused.remove(&key);
                if !self.active_routes.contains(&key) {
                    return Ok(());
                }
                let Some(held) = self.book.get_mut(&key).filter(|h| h.is_open()) else {
                    return Ok(());
                };
                if held.pnl == Some(pnl) {
                    return Ok(());
                }
                held.pnl = Some(pnl);
                let held = held.clone();
                self.emit(&key, &held, Route::Active, Source::Pnl, Some(observed))
                    .await?;
                Ok(())
            }
            SlotEvent::Released { key, .. } => {
                tracing::debug!(%key, "PnL stream cancelled; slot free");
                if let Some(h) = self.book.get_mut(&key) {
                    h.pnl = None;
                }
                self.compute_plan();
                self.apply_plan(Some(client), &HashSet::new()).await
            }
            SlotEvent::Ended {
                key,
                error,
                connection_lost,
                ..
            } => {
                if connection_lost {
                    tracing::debug!(%key, %error, "PnL stream ended with the connection");
                    return Ok(());
                }
                let refusal = self.refused.entry(key.clone()).or_insert(Refusal {
                    attempts: 0,
                    until: None,
                });
                refusal.attempts += 1;
                let retry_in = refused_retry_delay(refusal.attempts);
                refusal.until = Some(Instant::now() + retry_in);
                metrics::global().pnl_refused.fetch_add(1, Relaxed);
                tracing::warn!(%key, %error, ?retry_in, attempts = refusal.attempts, "IB refused or ended a PnL stream; the position is routed queued and offered a slot again later");
                self.compute_plan();
                self.apply_plan(Some(client), &HashSet::new()).await
            }
        }
    }

    /// When the next refused position is due to be offered a slot again.
    pub(crate) fn next_refused_retry(&self) -> Option<Instant> {
        self.refused.values().filter_map(|r| r.until).min()
    }

    /// Offers a slot again to refused positions whose backoff has passed.
    pub(crate) async fn retry_refused(&mut self, client: &Arc<Client>) -> Result<(), IngestError> {
        let now = Instant::now();
        let mut due = 0;
        for r in self.refused.values_mut() {
            if r.until.is_some_and(|t| t <= now) {
                r.until = None;
                due += 1;
            }
        }
        if due == 0 || !self.synced {
            return Ok(());
        }
        tracing::debug!(due, "offering slots again to positions IB refused a stream for");
        self.compute_plan();
        self.apply_plan(Some(client), &HashSet::new()).await
    }

    /// Before a sync's diff: failures reported while the loop was busy or disconnected mark
    /// their positions dirty, and this sync (a whole list) is the resync they asked for; a
    /// resync requested before it is answered by it too (issue 20 #14: failures taken during
    /// the list made a second full resync right after it). Failures reported after this point
    /// ask again.
    fn absorb_failures(&mut self) {
        let failed = self.publisher.take_failed();
        self.on_failures(failed);
        self.resync_wanted = false;
    }

    /// Deliveries failed for good: mark their positions dirty and resync, which republishes
    /// their current state (a lost close included).
    pub(crate) fn on_failures(&mut self, failures: Vec<Failure>) {
        if failures.is_empty() {
            return;
        }
        for failure in failures {
            match self.book.get_mut(&failure.key) {
                Some(h) => h.dirty = true,
                None => {
                    let mut held = super::resume::held_from_event(&failure.event);
                    held.position = 0.0;
                    held.dirty = true;
                    self.book.insert(failure.key, held);
                }
            }
        }
        self.resync_wanted = true;
    }

    /// The connection is gone: streams with it; the book stays as the "before" of the next sync.
    pub(crate) fn disconnected(&mut self) {
        self.slots.reset();
        // The PnL streams went with the connection: their last figures are stale from now on
        // and must not ride on the next session's events (fresh ticks bring new ones).
        for held in self.book.values_mut() {
            held.pnl = None;
        }
        self.synced = false;
        self.resync_wanted = false;
        self.reconnect_wanted = None;
    }

    /// One line of counts for the logs.
    pub(crate) fn log_stats(&self) {
        let m = metrics::global();
        tracing::info!(
            open = self.book.len(),
            covered = self.covered.len(),
            active = self.active_routes.len(),
            overflow = self.overflow.len(),
            slots_in_use = self.slots.in_use(),
            slot_budget = self.slots.budget(),
            published_active = m.published_active.load(Relaxed),
            published_queued = m.published_queued.load(Relaxed),
            in_flight = self.publisher.in_flight(),
            "ingest stats"
        );
    }
}

#[cfg(test)]
mod tests;
