//! `possync queue-worker`: drains the position queue with snapshot polls that cost no
//! streaming slot.
//!
//! The queue is event-sourced from `positions.queued` ([`state`]): ingest's enqueue events
//! make items pending, the worker's own POLL events make them refreshed. It also reads
//! `positions.active`: an item a strategy took over (ingest streams it on the active route) is
//! not polled until it is enqueued again. At start the worker
//! reads the queue ([`start`]): from `position_queue` and the topic's tail after the offsets it
//! holds (`--table-uri`), or by replaying the topic from the beginning; then it follows it. Every tick (5 s by default) it takes a
//! *sweep*: the `batch` (50) accounts whose oldest pending item is oldest, and every pending
//! item of those accounts that is not already in flight. It polls each of those accounts once
//! with `reqPositionsMulti` on its own client id ([`poller`]): the answer lists every position
//! of the account, so one poll refreshes all of its items, and publishes one POLL event per
//! taken item (only where a refresh is due: refreshed and closed items get none) on
//! `positions.queued`. So 10k pending items over 20 accounts take one tick, not 200. Messages
//! to IB go through a rate limiter below IB's 50/s pacing limit (2 messages per poll); one
//! sweep runs at a time and a tick that finds the previous one still running is skipped.
//!
//! Flags and settings: [`config`]. A fatal producer error that is not a fence starts a new term
//! in-process ([`run`]).

pub mod bench;
pub mod config;
pub mod poller;
pub mod start;
pub mod state;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ibapi::{Client, RateLimiter};
use rdkafka::Message;
use tokio::task::JoinHandle;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use crate::book::{ContractInfo, PosKey};
use crate::events::{PositionEvent, Route, Source};
use crate::ingest::backoff::Backoff;
use crate::ingest::{PublishError, Publisher};
use crate::kafka::KafkaConfig;
use crate::metrics;
use crate::registry::RegistryError;
use poller::{AccountPoll, PollError};
use state::{Item, QueueState};

pub use config::{QueueWorkerArgs, QueueWorkerConfig};

/// Errors that stop the queue worker.
#[derive(Debug, thiserror::Error)]
pub enum QueueWorkerError {
    /// The queue topic could not be read (is Kafka up, are the topics created?).
    #[error("reading the queue topic: {0}")]
    Replay(#[from] RegistryError),
    /// Publishing failed in a way retrying cannot fix.
    #[error("publishing: {0}")]
    Publish(#[from] PublishError),
    /// Bad Kafka settings.
    #[error(transparent)]
    Kafka(#[from] crate::kafka::KafkaError),
    /// The start-up snapshot (`--table-uri`) could not be read.
    #[error(transparent)]
    Snapshot(#[from] crate::snapshot::SnapshotError),
}

/// One batch the worker took (for observers: tests, `possync run` progress).
#[derive(Debug, Clone)]
pub struct BatchReport {
    /// The tick that took the batch (ticks are at least `tick` apart).
    pub taken: Instant,
    /// The items, oldest first, with the time each became pending (µs since the epoch).
    pub items: Vec<(PosKey, i64)>,
    /// Items still pending after taking the batch (in flight included).
    pub pending: usize,
}

/// How often closed items are looked for ([`QueueWorkerConfig::forget_closed_after`]).
const FORGET_EVERY: Duration = Duration::from_secs(60);

type BatchResult = (Vec<(PosKey, Item)>, BTreeMap<String, Result<AccountPoll, PollError>>);

/// The transactional id of the worker's producer: `<topic-prefix>queue-worker`.
pub fn transactional_id(topics: &crate::kafka::Topics) -> String {
    format!("{}queue-worker", topics.prefix())
}

/// The waits before the worker starts again with a new producer: ingest's reconnect policy
/// ([`Backoff`]), from this ceiling doubling to [`RESTART_MAX`] while restarts follow each
/// other, back to it after a term that ran [`RESTART_HEALTHY`].
const RESTART_FIRST: Duration = Duration::from_secs(1);
const RESTART_MAX: Duration = Duration::from_secs(30);
const RESTART_HEALTHY: Duration = Duration::from_secs(60);

/// Runs the queue worker until `shutdown`: one *term* (a producer, the queue loaded, polls)
/// after another. A term ends for good on shutdown, when a successor fenced its producer (a
/// second worker of these topics started), or on an error retrying cannot fix. When
/// librdkafka raised a fatal error that is not a fence (`INVALID_TXN_STATE` after an outage,
/// for one: no successor runs), the worker starts a new term in-process: a new producer, which
/// fences the failed one and has the broker abort its open transaction, and the queue loaded
/// again from what is committed, so POLL events of the lost transaction are polled again.
///
/// # Errors
/// [`QueueWorkerError::Replay`] when the queue topic cannot be read at start,
/// [`QueueWorkerError::Publish`] when the producer is fenced or fails for good otherwise.
pub async fn run(
    mut cfg: QueueWorkerConfig,
    kafka: KafkaConfig,
    shutdown: CancellationToken,
) -> Result<(), QueueWorkerError> {
    let _ib = metrics::global().ib_client_running(metrics::IbClient::QueueWorker);
    if cfg.clock_skew_micros != 0 {
        tracing::warn!(
            skew_micros = cfg.clock_skew_micros,
            "this process's clock is shifted (--clock-skew, a fault-test knob)"
        );
        crate::events::set_clock_skew(cfg.clock_skew_micros);
    }
    let mut inject = cfg.inject_fatal.take();
    let mut backoff = Backoff::new(RESTART_FIRST, RESTART_MAX, RESTART_HEALTHY, None);
    // Restarting after a failed producer: Kafka may still be coming back, so the next term's
    // start retries what an outage causes, until a term ran `RESTART_HEALTHY`.
    let mut restarting = false;
    loop {
        let began = Instant::now();
        let result = term(&cfg, &kafka, &mut inject, &shutdown).await;
        backoff.session_ended(began.elapsed(), false);
        if began.elapsed() >= RESTART_HEALTHY {
            restarting = false;
        }
        let retry = match &result {
            Err(QueueWorkerError::Publish(PublishError::ProducerFailed { .. })) => true,
            Err(QueueWorkerError::Publish(PublishError::Txn { .. }) | QueueWorkerError::Replay(_)) => restarting,
            _ => false,
        };
        let e = match result {
            Err(e) if retry => e,
            other => return other,
        };
        restarting = true;
        let delay = backoff.next_delay();
        tracing::warn!(error = %e, retry_in = ?delay, "the queue worker starts again with a new Kafka producer (no successor took over): the queue is loaded again from what is committed");
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

/// One term of the worker: its own producer (fencing every earlier one), the queue loaded,
/// then polls until shutdown or the producer stops for good.
async fn term(
    cfg: &QueueWorkerConfig,
    kafka: &KafkaConfig,
    inject: &mut Option<tokio::sync::watch::Receiver<Option<bool>>>,
    shutdown: &CancellationToken,
) -> Result<(), QueueWorkerError> {
    // First fence every earlier worker (and have the broker abort its open transaction), so
    // the replay below reads its final committed state.
    let txn_id = transactional_id(&kafka.topics);
    let mut publisher = tokio::select! {
        _ = shutdown.cancelled() => return Ok(()),
        p = Publisher::transactional(kafka, &txn_id, cfg.txn_interval, cfg.kafka_timeout, 10_000, false) => p?,
    }
    .with_shutdown(shutdown.clone());
    let stopped = publisher.stopped();
    let Some(started) = start::load(kafka, cfg.kafka_timeout, cfg.snapshot.as_ref(), shutdown).await? else {
        return Ok(());
    };
    let (rows, version) = started.table.unwrap_or_default();
    tracing::info!(
        pending = started.queue.pending(),
        events = started.events,
        table_rows = rows,
        table_version = version,
        took = ?started.took,
        "queue loaded ({})",
        if started.table.is_some() { "position_queue and the topic's tail" } else { "whole topic" }
    );
    let (mut queue, mut replay, mut active) = (started.queue, started.replay, started.active);
    metrics::global().queue_depth.store(queue.pending() as i64, Relaxed);
    let limiter = RateLimiter::per_second(cfg.ib_pacing.max(1));
    let address = format!("{}:{}", cfg.ib_host, cfg.ib_port);
    let mut client: Option<Arc<Client>> = None;
    let mut batch: Option<JoinHandle<BatchResult>> = None;
    // Ingest's clock as the worker knew it when the running batch was taken: its POLL stamps.
    let mut batch_clock = 0i64;
    // A heartbeat in flight, and when IB last answered this connection.
    let mut beat: Option<JoinHandle<Result<(), crate::ib::HeartbeatError>>> = None;
    let mut last_answer = Instant::now();
    // Frames an account's answer held when it overflowed the buffer (sizes the next one).
    let mut overflowed = 0usize;
    let mut last_forget = Instant::now();
    let mut tick = tokio::time::interval(cfg.tick.max(Duration::from_millis(1)));
    // Delay, not Skip: a late tick pushes the next one a full period out, so batches are never
    // closer together than `tick` (Skip could fire the next one right after a late one).
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let result = loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break Ok(()),
            _ = stopped.cancelled() => break Err(publisher.stop_error().unwrap_or(PublishError::Fenced(txn_id.clone())).into()),
            fault = injected(inject) => publisher.inject_fatal(fault, "injected by a fault test"),
            failed = publisher.failed() => failed.iter().for_each(|f| queue.release(&f.key)),
            done = async { batch.as_mut().expect("guarded").await }, if batch.is_some() => {
                batch = None;
                match done {
                    Ok((items, polls)) => {
                        if polls.values().any(|r| r.as_ref().is_err_and(PollError::needs_reconnect)) {
                            for e in polls.values().filter_map(|r| r.as_ref().err()) {
                                match e {
                                    PollError::Lagged { seen, .. } => overflowed = overflowed.max(seen * 2),
                                    PollError::Timeout(_) => {
                                        metrics::global().ib_silent.fetch_add(1, Relaxed);
                                    }
                                    _ => {}
                                }
                            }
                            tracing::warn!("dropping the IB connection (lost, silent, or its buffer too small for an account's answer); reconnecting at the next tick");
                            // A heartbeat still in flight is about this connection: its failure
                            // must not drop the next one.
                            if let Some(b) = beat.take() {
                                b.abort();
                            }
                            drop_client(&mut client).await;
                        } else if polls.values().any(Result::is_ok) {
                            last_answer = Instant::now();
                        }
                        match publish_batch(&mut queue, &mut publisher, items, polls, batch_clock).await {
                            Err(QueueWorkerError::Publish(e)) if e.is_cancelled() => break Ok(()),
                            Err(e) => break Err(e),
                            Ok(()) => {}
                        }
                    }
                    Err(e) => tracing::error!(error = %e, "poll task failed"),
                }
            }
            alive = async { beat.as_mut().expect("guarded").await }, if beat.is_some() => {
                beat = None;
                match alive {
                    Ok(Ok(())) => last_answer = Instant::now(),
                    Ok(Err(e)) => {
                        if matches!(e, crate::ib::HeartbeatError::Silent(_)) {
                            metrics::global().ib_silent.fetch_add(1, Relaxed);
                        }
                        tracing::warn!(error = %e, "IB connection of the queue worker does not answer; reconnecting at the next tick");
                        drop_client(&mut client).await;
                    }
                    Err(e) => tracing::error!(error = %e, "heartbeat task failed"),
                }
            }
            m = replay.next() => match m {
                Ok(m) => apply(&mut queue, &m),
                Err(e) => {
                    tracing::warn!(error = %e, "queue topic read error; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            },
            m = active.next() => match m {
                Ok(m) => apply(&mut queue, &m),
                Err(e) => {
                    tracing::warn!(error = %e, "active topic read error; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            },
            ticked = tick.tick() => {
                metrics::global().queue_depth.store(queue.pending() as i64, Relaxed);
                if last_forget.elapsed() >= FORGET_EVERY && !cfg.forget_closed_after.is_zero() {
                    last_forget = Instant::now();
                    let cutoff = queue.ingest_clock() - cfg.forget_closed_after.as_micros() as i64;
                    let n = queue.forget_before(cutoff);
                    if n > 0 {
                        tracing::debug!(forgotten = n, held = queue.held(), "closed items forgotten");
                    }
                }
                if batch.is_some() {
                    tracing::debug!("previous batch still running; tick skipped");
                    continue;
                }
                if client.as_ref().is_none_or(|c| !c.is_connected()) {
                    // A connection IB closed is down from now on, not once a new one failed.
                    metrics::global().ib_state(metrics::IbClient::QueueWorker, false);
                    // Each request's buffer holds the largest account's answer.
                    let buffer = crate::ib::buffer_for(poller::MIN_BUFFER, queue.largest_account().max(overflowed));
                    let connecting = poller::connect(&address, cfg.client_id, buffer, &limiter, Duration::from_secs(5).min(cfg.poll_timeout));
                    let connected = tokio::select! {
                        _ = shutdown.cancelled() => break Ok(()),
                        c = connecting => c,
                    };
                    match connected {
                        Ok(c) => {
                            tracing::info!(%address, client_id = cfg.client_id, buffer, "queue worker connected to IB");
                            client = Some(c);
                            last_answer = Instant::now();
                            metrics::global().ib_state(metrics::IbClient::QueueWorker, true);
                        }
                        Err(e) => {
                            tracing::warn!(%address, client_id = cfg.client_id, error = %e, "queue worker cannot reach IB; retrying next tick");
                            continue;
                        }
                    }
                }
                let items = queue.take_sweep(cfg.batch, Instant::now(), cfg.in_flight_timeout);
                metrics::global().queue_depth.store(queue.pending() as i64, Relaxed);
                if items.is_empty() {
                    // Nothing to poll: prove the connection alive now and then.
                    if beat.is_none() && last_answer.elapsed() >= cfg.ib_heartbeat {
                        let (c, timeout) = (client.clone().expect("connected above"), cfg.ib_timeout);
                        beat = Some(tokio::spawn(async move { crate::ib::heartbeat(&c, timeout).await }));
                    }
                    continue;
                }
                if let Some(observer) = &cfg.batch_observer {
                    let report = BatchReport {
                        taken: ticked.into_std(),
                        items: items.iter().map(|(k, it)| (k.clone(), it.enqueued_at)).collect(),
                        pending: queue.pending(),
                    };
                    let _ = observer.try_send(report);
                }
                let accounts: BTreeSet<String> = items.iter().map(|(k, _)| k.account.clone()).collect();
                tracing::debug!(items = items.len(), accounts = accounts.len(), "polling a batch");
                let client = client.clone().expect("connected above");
                let timeout = cfg.poll_timeout;
                batch_clock = queue.ingest_clock();
                batch = Some(tokio::spawn(async move {
                    let polls = poller::poll_accounts(client, accounts.into_iter().collect(), timeout).await;
                    (items, polls.into_iter().collect())
                }));
            }
        }
    };
    if let Some(b) = batch.take() {
        b.abort();
    }
    if let Some(b) = beat.take() {
        b.abort();
    }
    let flushed = if stopped.is_cancelled() {
        // Nothing of a stopped producer commits: drop what it still holds.
        publisher.abandon();
        Ok(())
    } else {
        publisher.flush(Duration::from_secs(30)).await
    };
    drop_client(&mut client).await;
    result?;
    flushed?;
    Ok(())
}

/// The next fault a test injects ([`QueueWorkerConfig::inject_fatal`]); pending without one.
async fn injected(inject: &mut Option<tokio::sync::watch::Receiver<Option<bool>>>) -> bool {
    if let Some(rx) = inject {
        while rx.changed().await.is_ok() {
            if let Some(fence) = *rx.borrow_and_update() {
                return fence;
            }
        }
    }
    std::future::pending().await
}

/// Drops the worker's IB connection (a silent gateway may not take the close: bounded wait).
async fn drop_client(client: &mut Option<Arc<Client>>) {
    metrics::global().ib_state(metrics::IbClient::QueueWorker, false);
    if let Some(c) = client.take() {
        let _ = tokio::time::timeout(Duration::from_secs(2), c.disconnect()).await;
    }
}

/// The POLL event of `item` from its account's `poll`: the polled figures (quantity 0 when the
/// account no longer holds the contract). `ingest_clock` is [`QueueState::ingest_clock`] when
/// the batch was taken (before the poll was requested).
///
/// Events are ordered newest-wins by `ingest_time` (see `materialize::upsert`), which ingest
/// stamps from its host's clock. The POLL's `ingest_time` is on that same clock, never on the
/// worker's (issue 19: the order must hold with the worker's clock seconds off): it is the
/// later of `item.last.ingest_time + 1` (the poll answer is at least as new as everything the
/// worker knew of the item) and `ingest_clock` (the newest stamp ingest had put on any event the
/// worker read before asking; ingest stamped it before, so it is not after the request). Every
/// change ingest observes after the request gets a later stamp and wins over the POLL, whatever
/// the order in which the two reach Kafka; a change observed before the answer that the worker
/// had not read yet may sort after the POLL, but then the poll answer already holds it. The
/// worker's own clock only fills `ib_time` (when the poll was requested, for people).
pub fn poll_event(item: &Item, poll: &AccountPoll, ingest_clock: i64) -> PositionEvent {
    let mut e = item.last.clone();
    match poll.positions.get(&e.con_id) {
        Some(p) => {
            ContractInfo::from(&p.contract).write_into(&mut e);
            e.position = p.position;
            e.avg_cost = p.average_cost;
        }
        None => e.position = 0.0,
    }
    e.event_id = crate::events::new_id();
    e.route = Route::Queued;
    e.source = Source::Poll;
    e.daily_pnl = None;
    e.unrealized_pnl = None;
    e.realized_pnl = None;
    e.market_value = None;
    e.ib_time = poll.requested_at;
    e.ingest_time = item.last.ingest_time.saturating_add(1).max(ingest_clock);
    e
}

fn apply(queue: &mut QueueState, m: &rdkafka::message::OwnedMessage) {
    match m.payload().map(PositionEvent::decode) {
        Some(Ok(e)) => queue.apply(e),
        Some(Err(e)) => {
            tracing::warn!(partition = m.partition(), offset = m.offset(), error = %e, "skipping undecodable queue event")
        }
        None => {}
    }
    // No queue-depth update here: `pending()` walks every item, once per message would make a
    // replay quadratic (the gauge is set at start-up and at every tick).
}

/// Publishes one POLL event per item whose account poll succeeded and whose result is not
/// stale; releases the others so a later tick takes them again.
async fn publish_batch(
    queue: &mut QueueState,
    publisher: &mut Publisher,
    items: Vec<(PosKey, Item)>,
    polls: BTreeMap<String, Result<AccountPoll, PollError>>,
    ingest_clock: i64,
) -> Result<(), QueueWorkerError> {
    for (account, r) in &polls {
        if let Err(e) = r {
            tracing::warn!(%account, error = %e, "positions poll failed; its items stay pending");
        }
    }
    for (key, item) in items {
        let Some(Ok(poll)) = polls.get(&key.account) else {
            queue.release(&key);
            continue;
        };
        if !queue.may_publish(&key) {
            tracing::debug!(%key, "a newer change arrived during the poll; result dropped");
            queue.release(&key);
            continue;
        }
        let e = poll_event(&item, poll, ingest_clock);
        publisher.publish(e, None).await?;
        let m = metrics::global();
        m.queue_refreshed.fetch_add(1, Relaxed);
        // Enqueued on ingest's clock, refreshed on this one: skew shows here (never below 0).
        m.queue_refresh_lag
            .observe_micros(chrono::Utc::now().timestamp_micros() - item.enqueued_at);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::events::now_micros;

    fn queued_item(q: &mut QueueState, ingest_time: i64) -> (PosKey, Item) {
        let held = crate::book::Held {
            contract: crate::book::ContractInfo::default(),
            position: -6.0,
            avg_cost: 1.0,
            pnl: None,
            dirty: false,
        };
        let key = PosKey::new("DU1", 7);
        q.apply(crate::book::event(
            &key,
            &held,
            Route::Queued,
            Source::Snapshot,
            vec![],
            ingest_time,
        ));
        q.take_sweep(1, Instant::now(), Duration::from_secs(60)).remove(0)
    }

    /// Review issue 10 #10: a poll answered before a change and published after it must not
    /// win. Before the fix the POLL event was stamped at publish time, so it sorted after the
    /// change and `positions_current` showed the polled (old) quantity.
    #[test]
    fn a_poll_sorts_before_every_change_observed_after_it_was_asked() {
        let mut q = QueueState::new();
        let (key, item) = queued_item(&mut q, now_micros());
        let clock = q.ingest_clock();
        let poll = AccountPoll {
            positions: HashMap::new(),
            requested_at: now_micros(),
            at: Instant::now(),
        };
        std::thread::sleep(Duration::from_millis(2));
        // Ingest observes a fill after the request; the worker publishes the poll after that.
        let mut change = item.last.clone();
        change.position = -5.0;
        change.ingest_time = now_micros();
        let polled = poll_event(&item, &poll, clock);
        assert_eq!(polled.source, Source::Poll);
        assert_eq!(polled.ib_time, poll.requested_at);
        assert_eq!(polled.ingest_time, item.last.ingest_time + 1);
        assert!(
            polled.ingest_time < change.ingest_time,
            "the change must sort newer than the stale poll"
        );
        q.apply(change);
        q.apply(polled);
        assert_eq!(q.get(&key).unwrap().last.position, -5.0);
        assert_eq!(q.get(&key).unwrap().status, state::Status::Pending);
    }

    /// Issue 19: the order holds with the worker's clock 2 s ahead of ingest's or 2 s behind.
    /// Before, a POLL carried the worker's request time: 2 s ahead, it beat every change ingest
    /// observed in the 2 s after the poll (the table kept the polled, old quantity, and the
    /// queue took the change for an old one: never polled again); 2 s behind, it lost to the
    /// change it had already seen, and the item stayed pending.
    #[test]
    fn the_poll_order_does_not_depend_on_the_workers_clock() {
        const T: i64 = 1_800_000_000_000_000;
        for skew in [2_000_000i64, -2_000_000] {
            let mut q = QueueState::new();
            // Ingest's clock: the item's enqueue at T; an active-route PnL of another key at T+40ms.
            let (key, item) = queued_item(&mut q, T);
            let mut pnl = item.last.clone();
            pnl.con_id = 8;
            pnl.route = Route::Active;
            pnl.source = Source::Pnl;
            pnl.ingest_time = T + 40_000;
            q.apply(pnl);
            let clock = q.ingest_clock();
            assert_eq!(clock, T + 40_000);
            // The worker asks at T+50ms on ingest's clock; its own clock says otherwise.
            let poll = AccountPoll {
                positions: HashMap::new(),
                requested_at: T + 50_000 + skew,
                at: Instant::now(),
            };
            let polled = poll_event(&item, &poll, clock);
            assert!(
                polled.ingest_time > item.last.ingest_time,
                "skew {skew}: the poll is newer than what it saw"
            );
            // A fill ingest observes 0.5 s after the request (inside the skew).
            let mut change = item.last.clone();
            change.position = -5.0;
            change.ingest_time = T + 550_000;
            assert!(
                polled.ingest_time < change.ingest_time,
                "skew {skew}: the later fill must win"
            );
            // Either arrival order: the change wins, and the item waits for the next poll.
            let mut q2 = QueueState::new();
            let _ = queued_item(&mut q2, T);
            q2.apply(change.clone());
            q2.apply(polled.clone());
            q.apply(polled.clone());
            q.apply(change.clone());
            for q in [&q, &q2] {
                assert_eq!(q.get(&key).unwrap().last.position, -5.0, "skew {skew}");
                assert_eq!(q.get(&key).unwrap().status, state::Status::Pending, "skew {skew}");
            }
            // With no later change, the poll settles the item (closed: it found no holding).
            let mut q3 = QueueState::new();
            let _ = queued_item(&mut q3, T);
            q3.apply(polled);
            assert_eq!(q3.get(&key).unwrap().status, state::Status::Closed, "skew {skew}");
            assert_eq!(q3.get(&key).unwrap().last.position, 0.0, "skew {skew}");
        }
    }
}
