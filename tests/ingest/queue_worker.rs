//! The queue worker drains the queue in sweeps: each tick polls at most `batch` accounts, those
//! with the oldest pending items, and refreshes every pending item of each polled account from
//! that one answer; never an item already in flight, no streaming slot, within IB's pacing;
//! changed items are refreshed again. The world has 30 accounts and a sweep polls 20 of them
//! at once: unpaced, its 2 messages per account would break IB's 50 messages per second, so
//! the pacing check can fail.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use crate::ingest_support::*;
use anyhow::{ensure, Context};
use possync::events::Source;
use possync::queue_worker::poller::{self, PollError};
use possync::queue_worker::{BatchReport, QueueWorkerConfig};
use tokio::sync::mpsc;

const WORKER: i32 = 62;
const TICK: Duration = Duration::from_millis(200);
/// Accounts polled per tick.
const BATCH: usize = 20;
const ACCOUNTS: usize = 30;

fn polls(c: &Collector) -> BTreeMap<(String, i64), Vec<possync::events::PositionEvent>> {
    let mut out: BTreeMap<(String, i64), Vec<_>> = BTreeMap::new();
    for s in c.all().into_iter().filter(|s| s.event.source == Source::Poll) {
        out.entry((s.event.account.clone(), s.event.con_id))
            .or_default()
            .push(s.event);
    }
    out
}

type Worker = tokio::task::JoinHandle<Result<(), possync::queue_worker::QueueWorkerError>>;

/// The worker's settings here: tick [`TICK`], [`BATCH`] accounts per sweep.
fn worker_config(env: &Env, client_id: i32) -> QueueWorkerConfig {
    QueueWorkerConfig {
        ib_host: env.sim.addr().ip().to_string(),
        ib_port: env.sim.addr().port(),
        client_id,
        tick: TICK,
        batch: BATCH,
        ..QueueWorkerConfig::default()
    }
}

/// Waits until every key of `keys` has a POLL event.
async fn wait_refreshed(collector: &Collector, what: &str, keys: &BTreeSet<(String, i64)>) -> anyhow::Result<()> {
    wait_for(what, DEADLINE, || async {
        let p = polls(collector);
        keys.iter().all(|k| p.contains_key(k)).then_some(())
    })
    .await
}

/// A world with ingest in sync and at least `at_least` queued positions: the environment, a
/// collector of every event, the running ingest (client id `client_id`) and the queued keys.
async fn queued_world(
    sim: possync::sim::SimConfig,
    client_id: i32,
    at_least: usize,
) -> anyhow::Result<(Env, Collector, Running, BTreeSet<(String, i64)>)> {
    let env = env(sim, 1, 2).await?;
    let collector = Collector::start(&env.kafka, &env.shutdown).await?;
    let ingest = env.start_ingest(env.ingest_config(client_id, 10)).await?;
    let latest = wait_in_sync(&env.sim, &collector, &ingest.session).await?;
    let queued: BTreeSet<(String, i64)> = latest.keys().cloned().collect();
    ensure!(
        queued.len() >= at_least,
        "the test world should queue at least {at_least} positions, got {}",
        queued.len()
    );
    Ok((env, collector, ingest, queued))
}

/// Fills one contract of each of `n` positions of `truth` from the `skip`-th on; their
/// positions after the fill.
fn fill_some(
    env: &Env,
    truth: &possync::sim::Truth,
    skip: usize,
    n: usize,
) -> anyhow::Result<Vec<possync::sim::TruthPosition>> {
    Ok(truth
        .positions
        .iter()
        .skip(skip)
        .take(n)
        .map(|p| env.sim.apply_fill(&p.account, p.contract.con_id, 1.0))
        .collect::<Result<_, _>>()?)
}

/// Starts a queue worker ([`worker_config`]) that reports its sweeps.
fn start_worker(
    env: &Env,
    client_id: i32,
) -> (Worker, tokio_util::sync::CancellationToken, mpsc::Receiver<BatchReport>) {
    let (tx, rx) = mpsc::channel::<BatchReport>(1024);
    let cfg = QueueWorkerConfig {
        batch_observer: Some(tx),
        ..worker_config(env, client_id)
    };
    let stop = env.shutdown.child_token();
    let worker = tokio::spawn(possync::queue_worker::run(cfg, env.kafka.clone(), stop.clone()));
    (worker, stop, rx)
}

/// Stops a worker from [`start_worker`] and checks it ended cleanly.
async fn stop_worker(stop: tokio_util::sync::CancellationToken, worker: Worker) -> anyhow::Result<()> {
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(60), worker)
        .await??
        .context("worker result")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_drains_at_the_configured_rate() -> anyhow::Result<()> {
    let sim = possync::sim::SimConfig {
        accounts: ACCOUNTS,
        initial_positions: 3 * ACCOUNTS,
        ..quiet_sim()
    };
    let (env, collector, ingest, queued) = queued_world(sim, 61, 20).await?;

    let (worker, stop, mut rx) = start_worker(&env, WORKER);

    // Every queued position gets exactly one POLL refresh matching the truth.
    wait_refreshed(&collector, "every queued position to be refreshed", &queued).await?;
    let mut batches = Vec::new();
    while let Ok(b) = rx.try_recv() {
        batches.push(b);
    }
    let taken: Vec<(String, i64)> = batches
        .iter()
        .flat_map(|b| b.items.iter().map(|(k, _)| (k.account.clone(), k.con_id)))
        .collect();
    let accounts = |b: &BatchReport| b.items.iter().map(|(k, _)| k.account.clone()).collect::<BTreeSet<_>>();
    ensure!(
        batches
            .iter()
            .all(|b| !b.items.is_empty() && accounts(b).len() <= BATCH),
        "accounts per sweep: {:?}",
        batches.iter().map(|b| accounts(b).len()).collect::<Vec<_>>()
    );
    ensure!(
        taken.len() == queued.len() && taken.iter().cloned().collect::<BTreeSet<_>>() == queued,
        "each item taken exactly once (never while in flight)"
    );
    // A sweep takes every item of the accounts it polls: no account appears in two sweeps.
    let mut seen = BTreeSet::new();
    for b in &batches {
        let a = accounts(b);
        ensure!(
            seen.is_disjoint(&a),
            "an account was swept twice: {:?}",
            seen.intersection(&a).collect::<Vec<_>>()
        );
        seen.extend(a);
    }
    ensure!(
        batches.len() >= ACCOUNTS.div_ceil(BATCH),
        "{} accounts need at least {} sweeps of {BATCH}",
        ACCOUNTS,
        ACCOUNTS.div_ceil(BATCH)
    );
    // Oldest first: an account is swept no later than any account whose oldest item is newer.
    let oldest = |b: &BatchReport| {
        let mut by: BTreeMap<&str, i64> = BTreeMap::new();
        for (k, t) in &b.items {
            let e = by.entry(k.account.as_str()).or_insert(*t);
            *e = (*e).min(*t);
        }
        by.into_values().collect::<Vec<_>>()
    };
    for w in batches.windows(2) {
        let (early, late) = (oldest(&w[0]), oldest(&w[1]));
        ensure!(
            early.iter().max() <= late.iter().min(),
            "sweeps not oldest first: {early:?} then {late:?}"
        );
    }
    let widest = batches.iter().map(|b| accounts(b).len()).max().unwrap_or(0);
    ensure!(
        widest >= 20,
        "a sweep must poll at least 20 accounts for the pacing check to mean anything; widest {widest}"
    );
    for w in batches.windows(2) {
        let gap = w[1].taken.duration_since(w[0].taken);
        ensure!(gap >= TICK.mul_f64(0.95), "two batches {gap:?} apart, tick {TICK:?}");
    }
    let truth = env.sim.truth();
    for (k, evs) in polls(&collector) {
        ensure!(evs.len() == 1, "{k:?} refreshed {} times", evs.len());
        let p = truth
            .position(&k.0, i32::try_from(k.1)?)
            .context("polled position exists")?;
        ensure!(
            matches_truth(&evs[0], p),
            "poll of {k:?} disagrees with the truth: {:?}",
            evs[0]
        );
        ensure!(evs[0].route == possync::events::Route::Queued && evs[0].session_id != ingest.session);
    }
    let seq: Vec<i64> = polls(&collector)
        .values()
        .flatten()
        .map(|e| e.sequence)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    ensure!(
        seq.first() == Some(&1) && seq.last() == Some(&(seq.len() as i64)),
        "the worker's sequence has no gap"
    );

    // Changed positions are enqueued again and refreshed once more; the rest stay refreshed.
    let changed = fill_some(&env, &truth, 0, 3)?;
    wait_for("the changed positions to be refreshed again", DEADLINE, || async {
        let p = polls(&collector);
        changed
            .iter()
            .all(|c| {
                p.get(&(c.account.clone(), i64::from(c.contract.con_id)))
                    .is_some_and(|v| v.len() == 2 && matches_truth(&v[1], c))
            })
            .then_some(())
    })
    .await?;
    tokio::time::sleep(TICK * 3).await; // a few more ticks: nothing else may be polled
    let p = polls(&collector);
    ensure!(
        p.values().map(Vec::len).sum::<usize>() == queued.len() + changed.len(),
        "only changed items were polled again"
    );

    let t = env.sim.truth();
    let w = t.client(WORKER).context("worker connected")?;
    ensure!(w.max_streams == 0, "polls use no streaming slot");
    ensure!(w.pacing_violations == 0, "IB pacing respected");
    collector.settled_integrity(&ingest.session).await?;
    stop_worker(stop, worker).await?;
    ingest.stop().await?;
    Ok(())
}

/// An item a strategy took over while it was pending (ingest moved it to the active route) is
/// not polled: the worker follows `positions.active` too. The worker starts after the
/// activation is published, and its start-up reads both topics to their end before its first
/// sweep, so the outcome does not depend on timing. (Before, the worker read only the queued
/// topic: the item got a POLL, which turned its `position_queue` row from `active` to
/// `refreshed`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn items_on_the_active_route_are_not_polled() -> anyhow::Result<()> {
    let env = env(quiet_sim(), 1, 2).await?;
    let collector = Collector::start(&env.kafka, &env.shutdown).await?;
    let ingest = env.start_ingest(env.ingest_config(71, 10)).await?;
    wait_in_sync(&env.sim, &collector, &ingest.session).await?;
    let truth = env.sim.truth();
    ensure!(truth.positions.len() >= 4, "the test world needs positions");
    let taken = &truth.positions[0];
    let key = (taken.account.clone(), i64::from(taken.contract.con_id));
    let on_route = |route: possync::events::Route| {
        collector
            .session(&ingest.session)
            .iter()
            .filter(|s| s.event.route == route)
            .map(|s| (s.event.account.clone(), s.event.con_id))
            .collect::<BTreeSet<_>>()
    };
    ensure!(
        on_route(possync::events::Route::Queued).contains(&key),
        "the position starts queued (pending)"
    );
    activate(&env.kafka, taken, 1).await?;
    wait_for("the position on the active route", DEADLINE, || async {
        on_route(possync::events::Route::Active).contains(&key).then_some(())
    })
    .await?;
    let others: BTreeSet<(String, i64)> = on_route(possync::events::Route::Queued)
        .into_iter()
        .filter(|k| *k != key)
        .collect();

    let (worker, stop, mut rx) = start_worker(&env, 72);
    wait_refreshed(&collector, "every other queued item refreshed", &others).await?;
    tokio::time::sleep(TICK * 3).await; // a few more sweeps
    let mut taken_items = BTreeSet::new();
    while let Ok(b) = rx.try_recv() {
        taken_items.extend(b.items.iter().map(|(k, _)| (k.account.clone(), k.con_id)));
    }
    ensure!(
        taken_items == others,
        "sweeps took {taken_items:?}, expected {others:?}"
    );
    ensure!(
        !polls(&collector).contains_key(&key),
        "the item on the active route was polled"
    );
    stop_worker(stop, worker).await?;
    ingest.stop().await?;
    Ok(())
}

/// Issue 18 #2: a poll answer that lost frames is never taken as the account's book. ibapi
/// buffers each request in a lossy ring; an answer larger than the ring can lose frames when
/// the worker reads slower than the socket delivers, and the worker used to turn every contract
/// missing from such an answer into a close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poll_is_whole_or_fails_never_partial() -> anyhow::Result<()> {
    // Positions of the one account: far more than the small ring below.
    const POSITIONS: usize = 20_000;
    let sim = possync::sim::start(possync::sim::SimConfig {
        accounts: 1,
        initial_positions: POSITIONS,
        // 200 options per expiry: twice the positions.
        expiries: POSITIONS / 100 + 1,
        strikes: 20,
        price_tick: Duration::ZERO,
        ..possync::sim::SimConfig::for_tests()
    })
    .await?;
    let n = sim.truth().positions.len();
    assert_eq!(n, POSITIONS);
    let account = sim.accounts()[0].clone();
    let addr = sim.addr().to_string();
    let limiter = ibapi::RateLimiter::per_second(40);

    // A ring of 64 frames for an answer of 20,000: whichever of ibapi's reader and the poll
    // is faster on this machine, each poll is either the whole book or an error. No outcome
    // of that race makes the test fail; only a partial book taken as whole does.
    let small = poller::connect(&addr, 71, 64, &limiter, Duration::from_secs(10)).await?;
    let mut lagged = 0;
    for _ in 0..3 {
        match poller::poll_account(&small, &account, Duration::from_secs(60)).await {
            Ok(poll) => assert_eq!(poll.positions.len(), n, "a poll answer taken as whole lacks positions"),
            Err(PollError::Lagged { seen, dropped }) => {
                assert!(dropped > 0 && seen >= dropped, "lag of {dropped} frames of {seen}");
                assert!(PollError::Lagged { seen, dropped }.needs_reconnect());
                lagged += 1;
            }
            Err(e) => anyhow::bail!("poll failed otherwise: {e}"),
        }
    }
    eprintln!("{lagged} of 3 polls through a 64-frame ring lost frames and failed");
    small.disconnect().await;

    // A ring sized for the account (what the worker connects with) holds the whole answer.
    let buffer = possync::ib::buffer_for(poller::MIN_BUFFER, n);
    let sized = poller::connect(&addr, 72, buffer, &limiter, Duration::from_secs(10)).await?;
    for _ in 0..2 {
        let poll = poller::poll_account(&sized, &account, Duration::from_secs(60)).await?;
        assert_eq!(poll.positions.len(), n);
    }
    Ok(())
}

/// A fatal producer error that is not a fence (`INVALID_TXN_STATE`, met once on real Kafka when
/// an abort after a whole-cluster outage found the transaction already ended) used to be taken
/// for a fence: the worker logged "fenced" and exited 1 with no successor running. Now the
/// worker starts again in-process with a new producer and reloads the queue, and only a fence
/// stops it. The fatal errors are librdkafka's own (`rd_kafka_test_fatal_error`) on the real
/// producer; the worker meets them on its next send, as it would the broker's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_producer_is_replaced_and_only_a_fence_stops_the_worker() -> anyhow::Result<()> {
    let (env, collector, ingest, queued) = queued_world(quiet_sim(), 81, 6).await?;

    let (fault, faults) = tokio::sync::watch::channel(None);
    let cfg = QueueWorkerConfig {
        inject_fatal: Some(faults),
        ..worker_config(&env, 82)
    };
    let stop = env.shutdown.child_token();
    let mut worker = tokio::spawn(possync::queue_worker::run(cfg, env.kafka.clone(), stop.clone()));
    wait_refreshed(&collector, "every queued position to be refreshed", &queued).await?;
    let first: BTreeSet<String> = polls(&collector)
        .values()
        .flatten()
        .map(|e| e.session_id.clone())
        .collect();
    ensure!(first.len() == 1, "one worker session so far: {first:?}");

    // A fatal error that is not a fence, then a change to poll: the next send meets it.
    let failed_before = possync::metrics::global()
        .producer_failed
        .load(std::sync::atomic::Ordering::Relaxed);
    fault.send(Some(false))?;
    let truth = env.sim.truth();
    let changed = fill_some(&env, &truth, 0, 3)?;
    let refreshed = wait_for(
        "the changed positions refreshed by a new producer",
        DEADLINE,
        || async {
            let p = polls(&collector);
            changed
                .iter()
                .map(|c| {
                    p.get(&(c.account.clone(), i64::from(c.contract.con_id)))
                        .and_then(|v| v.last())
                        .filter(|e| matches_truth(e, c) && !first.contains(&e.session_id))
                        .cloned()
                })
                .collect::<Option<Vec<_>>>()
        },
    )
    .await?;
    ensure!(
        !worker.is_finished(),
        "the worker stopped after a fatal error that is not a fence"
    );
    let failed = possync::metrics::global()
        .producer_failed
        .load(std::sync::atomic::Ordering::Relaxed)
        - failed_before;
    ensure!(failed >= 1, "possync_producer_failed_total did not count the failure");
    eprintln!(
        "after the failure, {} changed positions were refreshed by session {}",
        refreshed.len(),
        refreshed[0].session_id
    );

    // A fence stops the worker with an error that says so.
    fault.send(Some(true))?;
    fill_some(&env, &truth, 3, 3)?;
    let ended = tokio::time::timeout(DEADLINE, &mut worker)
        .await
        .context("the fenced worker did not stop")??;
    match ended {
        Err(possync::queue_worker::QueueWorkerError::Publish(e)) if e.is_fenced() => {}
        other => anyhow::bail!("a fenced worker must stop with the fence, got {other:?}"),
    }
    stop.cancel();
    ingest.stop().await?;
    Ok(())
}
