//! Alive but wrong (issue 18): a gateway whose connection goes silent without closing, and a
//! gateway that drops sessions over and over. Ingest notices the first within its stated bound
//! (`--ib-heartbeat` + `--ib-timeout`, 5 s + 10 s at default flags) and reconnects; it comes back
//! from each drop of the second within about `--reconnect-initial` instead of ever more slowly.
//! Both end with the published state equal to the simulator's truth.

use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use crate::ingest_support::*;
use anyhow::ensure;

/// Applies one fill to each of the first `n` positions.
fn fill_some(env: &Env, n: usize, qty: f64) -> anyhow::Result<()> {
    let truth = env.sim.truth();
    for p in truth.positions.iter().take(n) {
        env.sim.apply_fill(&p.account, p.contract.con_id, qty)?;
    }
    Ok(())
}

/// The connection freezes (open socket, nothing answered). Ingest must notice through its
/// heartbeat (default flags: every 5 s, 10 s to answer), drop it, connect again and reconcile
/// the changes made while it was blind. Before issue 18 it stayed blind for good with
/// `ib_connected` at 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_connection_is_noticed_and_nothing_is_lost() -> anyhow::Result<()> {
    let env = env(quiet_sim(), 1, 2).await?;
    let collector = Collector::start(&env.kafka, &env.shutdown).await?;
    let cfg = env.ingest_config(61, 4);
    let bound = cfg.ib_heartbeat + cfg.ib_timeout;
    assert_eq!(bound, Duration::from_secs(15), "the default bound this test states");
    let ingest = env.start_ingest(cfg).await?;
    wait_in_sync(&env.sim, &collector, &ingest.session).await?;

    let reconnects = ingest.stats.reconnects.clone();
    let before = reconnects.load(Relaxed);
    let frozen_at = Instant::now();
    env.sim.freeze_connections();
    // Changes ingest cannot see on the frozen connection.
    fill_some(&env, 5, 3.0)?;
    let last = env.sim.truth().positions.last().cloned().expect("a position");
    env.sim.set_position(&last.account, last.contract.con_id, 0.0, 0.0)?;

    wait_for(
        "ingest to give the frozen connection up and reconnect",
        DEADLINE,
        || async { (reconnects.load(Relaxed) > before).then_some(()) },
    )
    .await?;
    let noticed = frozen_at.elapsed();
    eprintln!(
        "frozen connection replaced after {:.1} s (bound {bound:?} + reconnect)",
        noticed.as_secs_f64()
    );
    // The bound plus the reconnect delay and generous slack for a loaded 2-core machine: the
    // point is "noticed", where the earlier build never noticed at all.
    ensure!(
        noticed < bound + Duration::from_secs(15),
        "the frozen connection was noticed only after {noticed:?}"
    );
    let latest = wait_in_sync(&env.sim, &collector, &ingest.session).await?;
    ensure!(
        latest
            .get(&(last.account.clone(), i64::from(last.contract.con_id)))
            .is_some_and(|e| e.position == 0.0),
        "the close made while the connection was frozen is published"
    );
    collector.settled_integrity(&ingest.session).await?;
    ingest.stop().await?;
    Ok(())
}

/// A flapping gateway: sessions dropped every 2 s and a restart (port refused for 1 s) every
/// third drop, with fills throughout. Every connect succeeds, so the reconnect delay must not
/// grow across these sessions (the earlier policy went 0.7 → 3.8 → 12.6 → 25.6 s and left
/// ingest disconnected most of the time); at the end the published state equals the truth.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flapping_gateway_keeps_the_published_state_exact() -> anyhow::Result<()> {
    let env = env(quiet_sim(), 1, 2).await?;
    let collector = Collector::start(&env.kafka, &env.shutdown).await?;
    let mut cfg = env.ingest_config(62, 4);
    // The shipped reconnect policy, not the quick one of the other tests.
    let defaults = possync::ingest::IngestConfig::default();
    cfg.reconnect_initial = defaults.reconnect_initial;
    cfg.reconnect_max = defaults.reconnect_max;
    let ingest = env.start_ingest(cfg).await?;
    wait_in_sync(&env.sim, &collector, &ingest.session).await?;

    let reconnects = ingest.stats.reconnects.clone();
    let before = reconnects.load(Relaxed);
    let mut plain = Vec::new();
    for round in 1..=9u64 {
        fill_some(&env, 3, if round % 2 == 0 { 1.0 } else { -1.0 })?;
        let t0 = Instant::now();
        let restart = round % 3 == 0;
        if restart {
            env.sim.restart(Duration::from_secs(1)).await?;
        } else {
            env.sim.drop_connections();
        }
        fill_some(&env, 2, 2.0)?;
        wait_for(&format!("ingest to reconnect after drop {round}"), DEADLINE, || async {
            (reconnects.load(Relaxed) >= before + round).then_some(())
        })
        .await?;
        let back = t0.elapsed();
        eprintln!(
            "drop {round} ({}): back after {:.2} s",
            if restart { "restart, port refused 1 s" } else { "plain" },
            back.as_secs_f64()
        );
        if !restart {
            plain.push(back);
        }
        // The session runs a while (synced) before the next drop.
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
    // The shipped policy starts at 500 ms: each plain drop is back within about that. The old
    // one doubled per dropped session (0.5, 1, 2, 4, 8, 16 s ...), past this bound by the
    // fifth drop. The bound leaves a loaded 2-core machine ample slack.
    let worst = plain.iter().max().copied().unwrap_or_default();
    ensure!(
        worst < Duration::from_secs(8),
        "a dropped session that had synced was reconnected only after {worst:?}: {plain:?}"
    );
    wait_in_sync(&env.sim, &collector, &ingest.session).await?;
    collector.settled_integrity(&ingest.session).await?;
    ingest.stop().await?;
    Ok(())
}
