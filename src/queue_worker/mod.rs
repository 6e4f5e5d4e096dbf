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

pub mod bench;
pub mod poller;
pub mod start;
pub mod state;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ibapi::{Client, RateLimiter};
use rdkafka::Message;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use crate::events::{PositionEvent, Route, Source};
use crate::ingest::book::{ContractInfo, PosKey};
use crate::ingest::{PublishError, Publisher};
use crate::kafka::{KafkaArgs, KafkaConfig};
use crate::metrics;
use crate::registry::RegistryError;
use poller::{AccountPoll, PollError};
use state::{Item, QueueState};

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

/// Flags of `possync queue-worker`.
#[derive(clap::Args, Debug, Clone)]
pub struct QueueWorkerArgs {
    /// IB Gateway / TWS host.
    #[arg(long, env = "POSSYNC_IB_HOST", default_value = "127.0.0.1")]
    pub ib_host: String,
    /// IB Gateway / TWS API port.
    #[arg(long, env = "POSSYNC_IB_PORT", default_value_t = 4002)]
    pub ib_port: u16,
    /// API client id of the worker; must differ from ingest's and every other client's.
    #[arg(long, env = "POSSYNC_QUEUE_CLIENT_ID", default_value_t = 2)]
    pub client_id: i32,
    /// How often a batch of pending items is refreshed.
    #[arg(long, env = "POSSYNC_QUEUE_TICK", value_parser = humantime::parse_duration, default_value = "5s")]
    pub tick: Duration,
    /// Most accounts polled per tick, those with the oldest pending items. Each poll (one
    /// positions-multi request, 2 IB messages) refreshes every pending item of its account.
    #[arg(long, env = "POSSYNC_QUEUE_BATCH", default_value_t = 50)]
    pub batch: usize,
    /// Messages per second the worker may send to IB (IB allows 50 per client).
    #[arg(long, env = "POSSYNC_QUEUE_IB_PACING", default_value_t = 40)]
    pub ib_pacing: u32,
    /// How long one account's poll may take before it is abandoned (its items stay pending);
    /// an overdue answer also means a silent gateway: the connection is made again.
    #[arg(long, env = "POSSYNC_QUEUE_POLL_TIMEOUT", value_parser = humantime::parse_duration, default_value = "10s")]
    pub poll_timeout: Duration,
    /// While no poll is due, ask IB for its time this often to prove the connection alive.
    #[arg(long, env = "POSSYNC_IB_HEARTBEAT", value_parser = humantime::parse_duration, default_value = "5s")]
    pub ib_heartbeat: Duration,
    /// A heartbeat unanswered this long means the gateway went silent: reconnect.
    #[arg(long, env = "POSSYNC_IB_TIMEOUT", value_parser = humantime::parse_duration, default_value = "10s")]
    pub ib_timeout: Duration,
    /// An item whose POLL event has not come back from Kafka within this is polled again.
    #[arg(long, env = "POSSYNC_QUEUE_IN_FLIGHT_TIMEOUT", value_parser = humantime::parse_duration, default_value = "60s")]
    pub in_flight_timeout: Duration,
    /// How long to wait for Kafka while reading the queue topic (or its tail) at start.
    #[arg(long, env = "POSSYNC_KAFKA_TIMEOUT", value_parser = humantime::parse_duration, default_value = "30s")]
    pub kafka_timeout: Duration,
    /// How often the open Kafka transaction of POLL events is committed while it holds events.
    /// The transactional id is `<topic-prefix>queue-worker`: starting a worker fences every
    /// earlier one of these topics (a paused one that wakes up publishes nothing more).
    #[arg(long, env = "POSSYNC_TXN_INTERVAL", value_parser = humantime::parse_duration, default_value = "100ms")]
    pub txn_interval: Duration,
    #[command(flatten)]
    pub snapshot: crate::snapshot::SnapshotArgs,
    #[command(flatten)]
    pub kafka: KafkaArgs,
    #[command(flatten)]
    pub schema_registry: crate::schema_registry::SchemaRegistryArgs,
    #[command(flatten)]
    pub metrics: metrics::MetricsArgs,
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

/// Plain queue-worker settings; see [`QueueWorkerArgs`].
#[derive(Debug, Clone)]
pub struct QueueWorkerConfig {
    pub ib_host: String,
    pub ib_port: u16,
    pub client_id: i32,
    pub tick: Duration,
    pub batch: usize,
    pub ib_pacing: u32,
    pub poll_timeout: Duration,
    pub ib_heartbeat: Duration,
    pub ib_timeout: Duration,
    pub in_flight_timeout: Duration,
    pub kafka_timeout: Duration,
    /// Commit the open Kafka transaction this often while it holds events.
    pub txn_interval: Duration,
    /// Start from this snapshot (`position_queue` + the topic's tail), not the whole topic.
    pub snapshot: Option<crate::snapshot::SnapshotConfig>,
    /// Receives a report of every batch taken (dropped when the receiver is full).
    pub batch_observer: Option<mpsc::Sender<BatchReport>>,
}

impl Default for QueueWorkerConfig {
    fn default() -> Self {
        Self {
            ib_host: "127.0.0.1".into(),
            ib_port: 4002,
            client_id: 2,
            tick: Duration::from_secs(5),
            batch: 50,
            ib_pacing: 40,
            poll_timeout: Duration::from_secs(10),
            ib_heartbeat: Duration::from_secs(5),
            ib_timeout: Duration::from_secs(10),
            in_flight_timeout: Duration::from_secs(60),
            kafka_timeout: Duration::from_secs(30),
            txn_interval: Duration::from_millis(100),
            snapshot: None,
            batch_observer: None,
        }
    }
}

impl From<&QueueWorkerArgs> for QueueWorkerConfig {
    fn from(a: &QueueWorkerArgs) -> Self {
        Self {
            ib_host: a.ib_host.clone(),
            ib_port: a.ib_port,
            client_id: a.client_id,
            tick: a.tick,
            batch: a.batch,
            ib_pacing: a.ib_pacing,
            poll_timeout: a.poll_timeout,
            ib_heartbeat: a.ib_heartbeat,
            ib_timeout: a.ib_timeout,
            in_flight_timeout: a.in_flight_timeout,
            kafka_timeout: a.kafka_timeout,
            txn_interval: a.txn_interval,
            snapshot: a.snapshot.config(),
            batch_observer: None,
        }
    }
}

type BatchResult = (Vec<(PosKey, Item)>, BTreeMap<String, Result<AccountPoll, PollError>>);

/// The transactional id of the worker's producer: `<topic-prefix>queue-worker`.
pub fn transactional_id(topics: &crate::kafka::Topics) -> String {
    format!("{}queue-worker", topics.prefix())
}

/// Runs the queue worker until `shutdown`.
///
/// # Errors
/// [`QueueWorkerError::Replay`] when the queue topic cannot be read at start,
/// [`QueueWorkerError::Publish`] when the producer fails for good.
pub async fn run(
    cfg: QueueWorkerConfig,
    kafka: KafkaConfig,
    shutdown: CancellationToken,
) -> Result<(), QueueWorkerError> {
    // First fence every earlier worker (and have the broker abort its open transaction), so
    // the replay below reads its final committed state.
    let txn_id = transactional_id(&kafka.topics);
    let mut publisher = tokio::select! {
        _ = shutdown.cancelled() => return Ok(()),
        p = Publisher::transactional(&kafka, &txn_id, cfg.txn_interval, cfg.kafka_timeout, 10_000, false) => p?,
    }
    .with_shutdown(shutdown.clone());
    let fenced = publisher.fenced();
    let Some(started) = start::load(&kafka, cfg.kafka_timeout, cfg.snapshot.as_ref(), &shutdown).await? else {
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
    // A heartbeat in flight, and when IB last answered this connection.
    let mut beat: Option<JoinHandle<Result<(), crate::ib::HeartbeatError>>> = None;
    let mut last_answer = Instant::now();
    // Frames an account's answer held when it overflowed the buffer (sizes the next one).
    let mut overflowed = 0usize;
    let mut tick = tokio::time::interval(cfg.tick.max(Duration::from_millis(1)));
    // Delay, not Skip: a late tick pushes the next one a full period out, so batches are never
    // closer together than `tick` (Skip could fire the next one right after a late one).
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let result = loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break Ok(()),
            _ = fenced.cancelled() => break Err(PublishError::Fenced(txn_id.clone()).into()),
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
                        match publish_batch(&mut queue, &mut publisher, items, polls).await {
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
                if batch.is_some() {
                    tracing::debug!("previous batch still running; tick skipped");
                    continue;
                }
                if client.as_ref().is_none_or(|c| !c.is_connected()) {
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
                            metrics::global().ib_connected.store(1, Relaxed);
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
    let flushed = publisher.flush(Duration::from_secs(30)).await;
    drop_client(&mut client).await;
    result?;
    flushed?;
    Ok(())
}

/// Drops the worker's IB connection (a silent gateway may not take the close: bounded wait).
async fn drop_client(client: &mut Option<Arc<Client>>) {
    metrics::global().ib_connected.store(0, Relaxed);
    if let Some(c) = client.take() {
        let _ = tokio::time::timeout(Duration::from_secs(2), c.disconnect()).await;
    }
}

/// The POLL event of `item` from its account's `poll`: the polled figures (quantity 0 when the
/// account no longer holds the contract), stamped with the time the poll was *requested*.
///
/// Events are ordered newest-wins by `ingest_time` (see `materialize::upsert`). A poll
/// answered before a change but published after it (the worker's publish waited for Kafka, or
/// it had not read ingest's event yet) must lose to that change: stamping it with its request
/// time orders it before every change ingest observed after the request, whatever the order
/// in which the two reach Kafka.
pub fn poll_event(item: &Item, poll: &AccountPoll) -> PositionEvent {
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
    e.ingest_time = poll.requested_at;
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
        let e = poll_event(&item, poll);
        publisher.publish(e, None).await?;
        metrics::global().queue_refreshed.fetch_add(1, Relaxed);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::events::now_micros;

    /// Review issue 10 #10: a poll answered before a change and published after it must not
    /// win. Before the fix the POLL event was stamped at publish time, so it sorted after the
    /// change and `positions_current` showed the polled (old) quantity.
    #[test]
    fn a_poll_sorts_before_every_change_observed_after_it_was_asked() {
        let mut q = QueueState::new();
        let held = crate::ingest::book::Held {
            contract: crate::ingest::book::ContractInfo::default(),
            position: -6.0,
            avg_cost: 1.0,
            pnl: None,
            dirty: false,
        };
        let key = PosKey::new("DU1", 7);
        q.apply(crate::ingest::book::event(
            &key,
            &held,
            Route::Queued,
            Source::Snapshot,
            vec![],
            now_micros(),
        ));
        let (key, item) = q.take_sweep(1, Instant::now(), Duration::from_secs(60)).remove(0);
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
        let polled = poll_event(&item, &poll);
        assert_eq!(polled.source, Source::Poll);
        assert_eq!(
            (polled.ib_time, polled.ingest_time),
            (poll.requested_at, poll.requested_at)
        );
        assert!(
            polled.ingest_time < change.ingest_time,
            "the change must sort newer than the stale poll"
        );
        q.apply(change);
        q.apply(polled);
        assert_eq!(q.get(&key).unwrap().last.position, -5.0);
        assert_eq!(q.get(&key).unwrap().status, state::Status::Pending);
    }
}
