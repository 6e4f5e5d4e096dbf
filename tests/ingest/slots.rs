//! Streaming slots: the budget is never exceeded (the simulator's own count of concurrent
//! streams proves it), overflow goes by priority, and live activation / deactivation move
//! slots at once.

use std::sync::atomic::Ordering::Relaxed;

use crate::ingest_support::*;
use anyhow::ensure;
use possync::events::{Route, Source};
use possync::sim::{SimHandle, TruthPosition};

const CLIENT: i32 = 21;
const BUDGET: usize = 3;

/// The latest route published for a position (any source but PNL).
fn route_of(c: &Collector, session: &str, p: &TruthPosition) -> Option<Route> {
    let mut evs: Vec<_> = c
        .session(session)
        .into_iter()
        .filter(|s| {
            s.event.account == p.account
                && s.event.con_id == i64::from(p.contract.con_id)
                && s.event.source != Source::Pnl
        })
        .map(|s| s.event)
        .collect();
    evs.sort_by_key(|e| e.sequence);
    evs.last().map(|e| e.route)
}

async fn wait_routes(c: &Collector, session: &str, want: &[(&TruthPosition, Route)]) -> anyhow::Result<()> {
    wait_for("routes to settle", DEADLINE, || async {
        want.iter()
            .all(|(p, r)| route_of(c, session, p) == Some(*r))
            .then_some(())
    })
    .await
}

async fn wait_streams(sim: &SimHandle, n: usize) -> anyhow::Result<()> {
    wait_for(&format!("{n} streams at the simulator"), DEADLINE, || async {
        (sim.truth().client(CLIENT).map(|c| c.streams) == Some(n)).then_some(())
    })
    .await
}

fn assert_budget(sim: &SimHandle) -> anyhow::Result<()> {
    let t = sim.truth();
    let c = t.client(CLIENT).expect("ingest connected");
    ensure!(
        c.max_streams <= BUDGET,
        "the simulator saw {} concurrent streams, budget {BUDGET}",
        c.max_streams
    );
    ensure!(
        t.max_streams_total <= BUDGET,
        "the simulator saw {} streams in total",
        t.max_streams_total
    );
    ensure!(
        c.stream_cap_rejections == 0 && c.pacing_violations == 0,
        "IB limits hit: {c:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn budget_overflow_activation_and_deactivation() -> anyhow::Result<()> {
    let env = env(quiet_sim(), 1, 2).await?;
    let truth = env.sim.truth();
    let p: Vec<TruthPosition> = truth.positions.iter().take(6).cloned().collect();
    ensure!(p.len() == 6);
    // Five covered positions with priorities 5..1 compete for three slots.
    for (i, pos) in p.iter().take(5).enumerate() {
        activate(&env.kafka, pos, 5 - i as i32).await?;
    }
    let overflow_before = possync::metrics::global().slot_overflow.load(Relaxed);
    let collector = Collector::start(&env.kafka, &env.shutdown).await?;
    let ingest = env.start_ingest(env.ingest_config(CLIENT, BUDGET)).await?;
    wait_in_sync(&env.sim, &collector, &ingest.session).await?;
    use Route::{Active, Queued};
    wait_routes(
        &collector,
        &ingest.session,
        &[
            (&p[0], Active),
            (&p[1], Active),
            (&p[2], Active),
            (&p[3], Queued),
            (&p[4], Queued),
            (&p[5], Queued),
        ],
    )
    .await?;
    wait_streams(&env.sim, BUDGET).await?;
    ensure!(
        possync::metrics::global().slot_overflow.load(Relaxed) >= overflow_before + 2,
        "overflow is counted"
    );
    assert_budget(&env.sim)?;

    // Deactivating the best frees its slot for the best waiting one (priority 2).
    possync::registry::deactivate(
        &env.kafka,
        "s",
        Some(&p[0].account),
        i64::from(p[0].contract.con_id),
        "test",
    )
    .await?;
    wait_routes(
        &collector,
        &ingest.session,
        &[
            (&p[0], Queued),
            (&p[1], Active),
            (&p[2], Active),
            (&p[3], Active),
            (&p[4], Queued),
        ],
    )
    .await?;
    wait_streams(&env.sim, BUDGET).await?;
    assert_budget(&env.sim)?;

    // A live activation with a higher priority preempts the lowest holder (priority 2).
    possync::registry::activate(&env.kafka, "t", None, i64::from(p[5].contract.con_id), 10, "test").await?;
    let covered_by_t: Vec<&TruthPosition> = truth
        .positions
        .iter()
        .filter(|q| q.contract.con_id == p[5].contract.con_id)
        .collect();
    ensure!(
        covered_by_t.len() == 1,
        "pick a contract held in one account only (world changed?)"
    );
    wait_routes(
        &collector,
        &ingest.session,
        &[
            (&p[5], Active),
            (&p[1], Active),
            (&p[2], Active),
            (&p[3], Queued),
            (&p[4], Queued),
        ],
    )
    .await?;
    wait_streams(&env.sim, BUDGET).await?;
    assert_budget(&env.sim)?;

    // The moved positions announced themselves on their new route with a SNAPSHOT.
    for (pos, route) in [(&p[0], Queued), (&p[3], Active), (&p[3], Queued), (&p[5], Active)] {
        ensure!(
            collector
                .about(&pos.account, pos.contract.con_id)
                .iter()
                .any(|s| s.event.source == Source::Snapshot && s.event.route == route),
            "no {route:?} snapshot for {}:{}",
            pos.account,
            pos.contract.con_id
        );
    }

    // Deactivating everything frees every slot.
    for pos in p.iter().take(5) {
        possync::registry::deactivate(
            &env.kafka,
            "s",
            Some(&pos.account),
            i64::from(pos.contract.con_id),
            "test",
        )
        .await?;
    }
    possync::registry::deactivate(&env.kafka, "t", None, i64::from(p[5].contract.con_id), "test").await?;
    wait_streams(&env.sim, 0).await?;
    wait_routes(
        &collector,
        &ingest.session,
        &p.iter().map(|q| (q, Queued)).collect::<Vec<_>>(),
    )
    .await?;
    assert_budget(&env.sim)?;
    collector.settled_integrity(&ingest.session).await?;
    ingest.stop().await?;
    Ok(())
}

/// Issue 10 #13: a PnL stream IB refused (error 101: IB's own line limit, here 1 line for an
/// ingest budget of 2) is offered again with backoff, so the position gets its stream as soon
/// as IB has room, without waiting for the next resync.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_stream_is_retried_once_ib_has_room() -> anyhow::Result<()> {
    const C: i32 = 22;
    let sim = possync::sim::SimConfig {
        max_streams: 1,
        ..quiet_sim()
    };
    let env = env(sim, 1, 2).await?;
    let truth = env.sim.truth();
    let both = [truth.positions[0].clone(), truth.positions[1].clone()];
    for p in &both {
        activate(&env.kafka, p, 1).await?;
    }
    let collector = Collector::start(&env.kafka, &env.shutdown).await?;
    let ingest = env.start_ingest(env.ingest_config(C, 2)).await?;
    wait_in_sync(&env.sim, &collector, &ingest.session).await?;

    let has_pnl = |p: &TruthPosition, after: i64| {
        collector.session(&ingest.session).iter().any(|s| {
            s.event.source == Source::Pnl
                && s.event.sequence > after
                && s.event.account == p.account
                && s.event.con_id == i64::from(p.contract.con_id)
        })
    };
    // One stream is granted, the other refused with 101.
    let holder = wait_for("one stream granted and one refused", DEADLINE, || async {
        let truth = env.sim.truth();
        let c = truth.client(C)?;
        let holders: Vec<&TruthPosition> = both.iter().filter(|p| has_pnl(p, 0)).collect();
        (c.stream_cap_rejections >= 1 && c.streams == 1 && holders.len() == 1).then(|| holders[0].clone())
    })
    .await?;
    let refused = both.iter().find(|p| **p != holder).expect("two positions").clone();
    let mark = collector
        .session(&ingest.session)
        .iter()
        .map(|s| s.event.sequence)
        .max()
        .unwrap_or(0);

    // The holder's strategy lets it go: IB has a free line again.
    possync::registry::deactivate(
        &env.kafka,
        "s",
        Some(&holder.account),
        i64::from(holder.contract.con_id),
        "test",
    )
    .await?;
    wait_for("the refused position to get its stream", DEADLINE, || async {
        has_pnl(&refused, mark).then_some(())
    })
    .await?;
    ensure!(
        env.sim.truth().max_streams_total <= 1,
        "IB's line limit held: {:?}",
        env.sim.truth().client(C)
    );
    ensure!(possync::metrics::global()
        .render()
        .contains("possync_pnl_refused_total"));
    collector.settled_integrity(&ingest.session).await?;
    ingest.stop().await?;
    Ok(())
}
