//! Faults: IB restarts and drops (with a position closing meanwhile), 326 while reconnecting,
//! 1101/1102 notices, a Kafka broker outage, and IB updates overflowing ingest's buffer while
//! Kafka is down. Nothing is lost, nothing unchanged is republished.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use crate::ingest_support::*;
use anyhow::{ensure, Context};
use possync::events::{PositionEvent, Route, Source};
use possync::sim::TruthPosition;

fn key(p: &TruthPosition) -> (String, i64) {
    (p.account.clone(), i64::from(p.contract.con_id))
}

fn max_seq(c: &Collector, session: &str) -> i64 {
    c.session(session).iter().map(|s| s.event.sequence).max().unwrap_or(0)
}

/// Position events (not PNL) of `session` after sequence `after`.
fn position_events_after(c: &Collector, session: &str, after: i64) -> Vec<PositionEvent> {
    let mut v: Vec<_> = c
        .session(session)
        .into_iter()
        .map(|s| s.event)
        .filter(|e| e.sequence > after && e.source != Source::Pnl)
        .collect();
    v.sort_by_key(|e| e.sequence);
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_reconciles_and_resubscribes() -> anyhow::Result<()> {
    const CLIENT: i32 = 31;
    let env = env(quiet_sim(), 1, 2).await?;
    let truth = env.sim.truth();
    let active = truth.positions[0].clone();
    let closing = truth.positions[1].clone();
    let changing = truth.positions[2].clone();
    activate(&env.kafka, &active, 1).await?;
    let collector = Collector::start(&env.kafka, &env.shutdown).await?;
    let mut cfg = env.ingest_config(CLIENT, 10);
    cfg.reconnect_initial = Duration::from_secs(1); // gives the squatter below a head start
    let ingest = env.start_ingest(cfg).await?;
    wait_in_sync(&env.sim, &collector, &ingest.session).await?;
    // This ingest's own count: the process-wide metric also counts the tests running alongside.
    let reconnects = &ingest.stats.reconnects;
    let reconnects_before = reconnects.load(Relaxed);

    // Gateway restart: connections dropped and refused for a while; meanwhile a position
    // closes and another changes.
    let mark = max_seq(&collector, &ingest.session);
    env.sim.restart(Duration::from_millis(1500)).await?;
    env.sim
        .set_position(&closing.account, closing.contract.con_id, 0.0, 0.0)?;
    let changed = env.sim.apply_fill(&changing.account, changing.contract.con_id, 1.0)?;
    wait_in_sync(&env.sim, &collector, &ingest.session).await?;
    let after = position_events_after(&collector, &ingest.session, mark);
    let reconcile: Vec<_> = after.iter().filter(|e| e.source == Source::Reconcile).collect();
    ensure!(reconcile.len() == 1, "one RECONCILE expected, got {reconcile:?}");
    ensure!((reconcile[0].account.clone(), reconcile[0].con_id) == key(&closing) && reconcile[0].position == 0.0);
    ensure!(reconcile[0].route == Route::Queued);
    let snaps: Vec<_> = after.iter().filter(|e| e.source == Source::Snapshot).collect();
    ensure!(
        snaps.len() == 1
            && (snaps[0].account.clone(), snaps[0].con_id) == key(&changed)
            && snaps[0].position == changed.quantity,
        "only the changed position is re-published: {after:?}"
    );
    ensure!(
        after.len() == 2,
        "unchanged positions produced events after the reconnect: {after:?}"
    );
    ensure!(
        reconnects.load(Relaxed) > reconnects_before,
        "the restart counted as a reconnect"
    );
    // The PnL stream is back.
    wait_for("the PnL stream to be resubscribed", DEADLINE, || async {
        let t = env.sim.truth();
        let streams = t.client(CLIENT).map(|c| (c.streams, c.connections));
        let pnl_after = position_pnl_after(&collector, &ingest.session, mark, &active);
        (matches!(streams, Some((1, n)) if n >= 2) && pnl_after).then_some(())
    })
    .await?;

    // 326: another client grabs ingest's id while ingest is reconnecting; ingest keeps retrying
    // and gets back in once the id is free.
    let mark = max_seq(&collector, &ingest.session);
    let connections_before = env.sim.truth().client(CLIENT).map_or(0, |c| c.connections);
    env.sim.drop_connections();
    let squatter = wait_for("the squatter to take the client id", DEADLINE, || async {
        ibapi::Client::builder()
            .address(env.sim.addr().to_string())
            .client_id(CLIENT)
            .max_reconnect_attempts(0)
            .connect()
            .await
            .ok()
    })
    .await?;
    let moved = env.sim.apply_fill(&changing.account, changing.contract.con_id, 1.0)?;
    tokio::time::sleep(Duration::from_millis(1500)).await; // ingest's attempts meet 326 meanwhile
    squatter.disconnect().await;
    drop(squatter);
    wait_in_sync(&env.sim, &collector, &ingest.session).await?;
    let after = position_events_after(&collector, &ingest.session, mark);
    ensure!(
        after.len() == 1 && after[0].position == moved.quantity && after[0].source == Source::Snapshot,
        "{after:?}"
    );
    ensure!(
        env.sim.truth().client(CLIENT).map_or(0, |c| c.connections) >= connections_before + 2,
        "ingest and the squatter both connected with the id"
    );

    // 1102 (data kept) and 1101 (data lost) on a live connection: reconcile, restart streams,
    // publish nothing for unchanged positions.
    wait_for("ingest back with its stream", DEADLINE, || async {
        (env.sim.truth().client(CLIENT).map(|c| c.streams) == Some(1)).then_some(())
    })
    .await?;
    let mark = max_seq(&collector, &ingest.session);
    ensure!(env.sim.send_notice(1102) >= 1);
    ensure!(env.sim.send_notice(1101) >= 1);
    let fill = env.sim.apply_fill(&active.account, active.contract.con_id, 1.0)?;
    wait_in_sync(&env.sim, &collector, &ingest.session).await?;
    wait_for("the PnL stream after 1101", DEADLINE, || async {
        (env.sim.truth().client(CLIENT).map(|c| c.streams) == Some(1)
            && position_pnl_after(
                &collector,
                &ingest.session,
                max_seq(&collector, &ingest.session) - 1,
                &active,
            ))
        .then_some(())
    })
    .await?;
    let after = position_events_after(&collector, &ingest.session, mark);
    ensure!(
        after
            .iter()
            .all(|e| (e.account.clone(), e.con_id) == key(&active) && e.position == fill.quantity),
        "unchanged positions re-published after 1101/1102: {after:?}"
    );
    ensure!(env
        .sim
        .truth()
        .client(CLIENT)
        .is_some_and(|c| c.max_streams <= 10 && c.pacing_violations == 0));

    collector.settled_integrity(&ingest.session).await?;
    ingest.stop().await?;
    Ok(())
}

fn position_pnl_after(c: &Collector, session: &str, after: i64, p: &TruthPosition) -> bool {
    c.session(session).iter().any(|s| {
        s.event.sequence > after && s.event.source == Source::Pnl && (s.event.account.clone(), s.event.con_id) == key(p)
    })
}

/// Applies `n` changes spread over the world's positions; returns every (key, quantity) made.
fn make_changes(env: &Env, n: usize) -> anyhow::Result<Vec<((String, i64), f64)>> {
    let truth = env.sim.truth();
    let mut made = Vec::new();
    for i in 0..n {
        let p = &truth.positions[i % truth.positions.len()];
        let after = env
            .sim
            .apply_fill(&p.account, p.contract.con_id, if i % 2 == 0 { 1.0 } else { 2.0 })?;
        made.push((key(p), after.quantity));
    }
    Ok(made)
}

fn all_seen(c: &Collector, session: &str, made: &[((String, i64), f64)]) -> Vec<((String, i64), f64)> {
    let seen: BTreeSet<((String, i64), u64)> = c
        .session(session)
        .into_iter()
        .map(|s| ((s.event.account, s.event.con_id), s.event.position.to_bits()))
        .collect();
    made.iter()
        .filter(|(k, q)| !seen.contains(&(k.clone(), q.to_bits())))
        .cloned()
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_outage_loses_nothing() -> anyhow::Result<()> {
    let env = env(quiet_sim(), 1, 2).await?;
    let truth = env.sim.truth();
    possync::registry::activate(
        &env.kafka,
        "s",
        None,
        i64::from(truth.positions[0].contract.con_id),
        1,
        "test",
    )
    .await?;
    let collector = Collector::start(&env.kafka, &env.shutdown).await?;
    let mut cfg = env.ingest_config(41, 10);
    cfg.max_in_flight = 8; // small, so the outage exercises backpressure
    let ingest = env.start_ingest(cfg).await?;
    wait_in_sync(&env.sim, &collector, &ingest.session).await?;

    env.broker.broker_down(1)?;
    let made = make_changes(&env, 60)?;
    tokio::time::sleep(Duration::from_secs(3)).await; // the outage lasts a while
    env.broker.broker_up(1)?;

    wait_for("every change made during the outage to appear", DEADLINE, || async {
        all_seen(&collector, &ingest.session, &made).is_empty().then_some(())
    })
    .await
    .with_context(|| format!("missing: {:?}", all_seen(&collector, &ingest.session, &made)))?;
    wait_in_sync(&env.sim, &collector, &ingest.session).await?;
    collector.settled_integrity(&ingest.session).await?;
    ingest.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buffer_overflow_during_outage_resyncs_to_the_truth() -> anyhow::Result<()> {
    let env = env(quiet_sim(), 1, 2).await?;
    let collector = Collector::start(&env.kafka, &env.shutdown).await?;
    let mut cfg = env.ingest_config(51, 10);
    cfg.max_in_flight = 2;
    cfg.ib_buffer = 64; // the minimum: holds the position list, not 300 updates while Kafka is down
    let ingest = env.start_ingest(cfg).await?;
    wait_in_sync(&env.sim, &collector, &ingest.session).await?;

    let reconnects = &ingest.stats.reconnects;
    let reconnects_before = reconnects.load(Relaxed);
    env.broker.broker_down(1)?;
    let truth = env.sim.truth();
    make_changes(&env, 300)?;
    let closed = &truth.positions[truth.positions.len() - 1];
    env.sim
        .set_position(&closed.account, closed.contract.con_id, 0.0, 0.0)?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    env.broker.broker_up(1)?;

    // Intermediate values may be collapsed by the reconnect, but the final state is IB's.
    let latest = wait_in_sync(&env.sim, &collector, &ingest.session).await?;
    ensure!(
        reconnects.load(Relaxed) > reconnects_before,
        "the overflow forced a reconnect of this ingest"
    );
    ensure!(
        latest.get(&key(closed)).is_some_and(|e| e.position == 0.0),
        "the close made during the outage is published"
    );
    collector.settled_integrity(&ingest.session).await?;
    ingest.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_resumes_from_the_topics() -> anyhow::Result<()> {
    let env = env(quiet_sim(), 1, 2).await?;
    let truth = env.sim.truth();
    let active = truth.positions[0].clone();
    activate(&env.kafka, &active, 1).await?;
    let collector = Collector::start(&env.kafka, &env.shutdown).await?;
    let first = env.start_ingest(env.ingest_config(71, 10)).await?;
    wait_in_sync(&env.sim, &collector, &first.session).await?;
    first.stop().await?;

    // While ingest is down: one position closes, one changes.
    let closing = truth.positions[1].clone();
    env.sim
        .set_position(&closing.account, closing.contract.con_id, 0.0, 0.0)?;
    let changed = env
        .sim
        .apply_fill(&truth.positions[2].account, truth.positions[2].contract.con_id, 1.0)?;

    let second = env.start_ingest(env.ingest_config(71, 10)).await?;
    wait_for("the restarted ingest to reconcile", DEADLINE, || async {
        let evs = position_events_after(&collector, &second.session, 0);
        (evs.len() >= 2).then_some(())
    })
    .await?;
    // PnL resumes on the active position; nothing else is published.
    wait_for("PnL after the restart", DEADLINE, || async {
        position_pnl_after(&collector, &second.session, 0, &active).then_some(())
    })
    .await?;
    let evs = position_events_after(&collector, &second.session, 0);
    ensure!(
        evs.len() == 2,
        "only the two changes are published after a restart: {evs:?}"
    );
    ensure!(evs
        .iter()
        .any(|e| e.source == Source::Reconcile && (e.account.clone(), e.con_id) == key(&closing) && e.position == 0.0));
    ensure!(evs.iter().any(|e| e.source == Source::Snapshot
        && (e.account.clone(), e.con_id) == key(&changed)
        && e.position == changed.quantity));
    collector.settled_integrity(&second.session).await?;
    second.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undelivered_events_are_republished() -> anyhow::Result<()> {
    let mut env = env(quiet_sim(), 1, 2).await?;
    // Deliveries fail for good after 1.5 s, well inside the outage below.
    env.kafka.overrides.insert("message.timeout.ms".into(), "1500".into());
    let collector = Collector::start(&env.kafka, &env.shutdown).await?;
    let ingest = env.start_ingest(env.ingest_config(81, 10)).await?;
    wait_in_sync(&env.sim, &collector, &ingest.session).await?;

    env.broker.broker_down(1)?;
    let made = make_changes(&env, 10)?;
    let truth = env.sim.truth();
    let closed = &truth.positions[truth.positions.len() - 1];
    env.sim
        .set_position(&closed.account, closed.contract.con_id, 0.0, 0.0)?;
    tokio::time::sleep(Duration::from_secs(4)).await;
    env.broker.broker_up(1)?;

    // The lost events leave a sequence gap (detectable), and the positions they were about are
    // republished with IB's current figures.
    let latest = wait_in_sync(&env.sim, &collector, &ingest.session).await?;
    ensure!(
        latest.get(&key(closed)).is_some_and(|e| e.position == 0.0),
        "the lost close is republished"
    );
    let ((account, con_id), _) = made.last().context("changes made")?;
    let now = env
        .sim
        .truth()
        .position(account, i32::try_from(*con_id)?)
        .map_or(0.0, |p| p.quantity);
    ensure!(latest
        .get(&(account.clone(), *con_id))
        .is_some_and(|e| e.position == now));
    ensure!(
        collector.check_integrity(&ingest.session).is_err(),
        "lost events show as a sequence gap"
    );
    ingest.stop().await?;
    Ok(())
}

/// Issue 10 #12: an outage longer than `message.timeout.ms` while a sync publishes far more than
/// 2 × `max_in_flight` events must neither hang ingest nor lose a change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_longer_than_message_timeout_neither_hangs_nor_drops() -> anyhow::Result<()> {
    const MAX_IN_FLIGHT: usize = 4;
    let mut env = env(quiet_sim(), 1, 2).await?;
    env.kafka.overrides.insert("message.timeout.ms".into(), "1000".into());
    let collector = Collector::start(&env.kafka, &env.shutdown).await?;
    let mut cfg = env.ingest_config(91, 10);
    cfg.max_in_flight = MAX_IN_FLIGHT;
    let ingest = env.start_ingest(cfg).await?;
    wait_in_sync(&env.sim, &collector, &ingest.session).await?;
    // The first sync's transaction must be committed before Kafka goes: otherwise its commit
    // waits for Kafka, sends are refused meanwhile, and nothing times out (the embedded
    // broker lets the collector see events before their commit).
    let stats = ingest.stats.publish.clone();
    wait_for("the first sync's transaction to commit", DEADLINE, || async {
        (stats.committed.load(Relaxed) >= stats.sent.load(Relaxed)).then_some(())
    })
    .await?;

    // Kafka goes down; IB restarts and 20 positions change meanwhile, so the reconnect's sync
    // publishes 20 SNAPSHOTs (5 × max_in_flight) into the outage; the first max_in_flight time
    // out for good. (With transactions, issue 19, the transaction holding them must be aborted
    // before anything more is sent, and the abort needs Kafka: the rest of the sync waits for
    // Kafka instead of timing out event after event.)
    env.broker.broker_down(1)?;
    env.sim.restart(Duration::from_millis(300)).await?;
    let made = make_changes(&env, 20)?;
    let failures = &ingest.stats.publish.delivery_failures;
    wait_for("max_in_flight deliveries to fail for good", DEADLINE, || async {
        (failures.load(Relaxed) >= MAX_IN_FLIGHT as u64).then_some(())
    })
    .await?;
    env.broker.broker_up(1)?;

    wait_for("every change made during the outage to appear", DEADLINE, || async {
        all_seen(&collector, &ingest.session, &made).is_empty().then_some(())
    })
    .await
    .with_context(|| format!("missing: {:?}", all_seen(&collector, &ingest.session, &made)))?;
    wait_in_sync(&env.sim, &collector, &ingest.session).await?;
    let metrics = possync::metrics::global().render();
    ensure!(
        metrics.contains("possync_delivery_failures_total"),
        "the failure counter is exported"
    );
    ingest.stop().await?;
    Ok(())
}

/// Issue 10 #12: a stop requested while ingest waits on a dead Kafka (every in-flight permit
/// taken, acknowledgements minutes away) returns promptly and cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_during_outage_returns_promptly() -> anyhow::Result<()> {
    const MAX_IN_FLIGHT: usize = 2;
    let env = env(quiet_sim(), 1, 2).await?;
    let collector = Collector::start(&env.kafka, &env.shutdown).await?;
    let mut cfg = env.ingest_config(92, 10);
    cfg.max_in_flight = MAX_IN_FLIGHT;
    cfg.shutdown_grace = Duration::from_secs(2);
    let ingest = env.start_ingest(cfg).await?;
    wait_in_sync(&env.sim, &collector, &ingest.session).await?;

    env.broker.broker_down(1)?;
    let sent_before = ingest.stats.publish.sent.load(Relaxed);
    make_changes(&env, 10)?;
    // message.timeout.ms is the default 5 minutes: once max_in_flight events are sent, the
    // next publish waits for a permit that no acknowledgement will free soon.
    let sent = &ingest.stats.publish.sent;
    wait_for("ingest to fill its in-flight window", DEADLINE, || async {
        (sent.load(Relaxed) >= sent_before + MAX_IN_FLIGHT as u64).then_some(())
    })
    .await?;
    tokio::time::sleep(Duration::from_millis(300)).await; // into the wait (not needed for the verdict)
    let started = std::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(20), ingest.stop())
        .await
        .context("ingest did not stop within 20 s of the request")??;
    let took = started.elapsed();
    ensure!(took < Duration::from_secs(10), "stopping took {took:?}");
    env.broker.broker_up(1)?;
    Ok(())
}
