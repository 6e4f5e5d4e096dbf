//! Ingest against the simulator and the embedded broker: routing follows the registry, live
//! updates flow on the right route, PnL ticks reach the active route, every event decodes.

use std::collections::BTreeSet;

use crate::ingest_support::*;
use anyhow::ensure;
use possync::events::{Route, Source};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routing_follows_the_registry() -> anyhow::Result<()> {
    let env = env(quiet_sim(), 1, 2).await?;
    let truth = env.sim.truth();
    ensure!(truth.positions.len() >= 10, "the test world needs positions");
    // s1 covers one contract in every account; s2 one contract in one account only.
    let c1 = truth.positions[0].contract.con_id;
    let p2 = truth
        .positions
        .iter()
        .find(|p| p.contract.con_id != c1)
        .expect("a second contract");
    let (a2, c2) = (p2.account.clone(), p2.contract.con_id);
    possync::registry::activate(&env.kafka, "s1", None, i64::from(c1), 1, "test").await?;
    possync::registry::activate(&env.kafka, "s2", Some(&a2), i64::from(c2), 2, "test").await?;
    let expected: BTreeSet<(String, i64)> = truth
        .positions
        .iter()
        .filter(|p| p.contract.con_id == c1 || (p.account == a2 && p.contract.con_id == c2))
        .map(|p| (p.account.clone(), i64::from(p.contract.con_id)))
        .collect();

    let collector = Collector::start(&env.kafka, &env.shutdown).await?;
    let ingest = env.start_ingest(env.ingest_config(11, 10)).await?;
    let latest = wait_in_sync(&env.sim, &collector, &ingest.session).await?;
    for (key, e) in &latest {
        let want = if expected.contains(key) {
            Route::Active
        } else {
            Route::Queued
        };
        ensure!(e.route == want, "{key:?} routed {:?}, expected {want:?}", e.route);
        ensure!(e.source == Source::Snapshot, "initial events are SNAPSHOTs: {e:?}");
        if e.con_id == i64::from(c1) {
            ensure!(
                e.strategies.contains(&"s1".to_string()),
                "strategies of {key:?}: {:?}",
                e.strategies
            );
        }
    }
    ensure!(latest
        .get(&(a2.clone(), i64::from(c2)))
        .is_some_and(|e| e.strategies == vec!["s2".to_string()]));

    // PnL ticks reach the active route, and only there.
    wait_for("PnL events for every active position", DEADLINE, || async {
        let pnl: BTreeSet<(String, i64)> = collector
            .session(&ingest.session)
            .into_iter()
            .filter(|s| s.event.source == Source::Pnl && s.event.daily_pnl.is_some())
            .map(|s| (s.event.account, s.event.con_id))
            .collect();
        (pnl == expected).then_some(())
    })
    .await?;
    ensure!(collector
        .session(&ingest.session)
        .iter()
        .all(|s| s.event.source != Source::Pnl || s.event.route == Route::Active));

    // Live updates: an uncovered position changes, a covered one changes, a new one opens, one closes.
    let uncovered = truth
        .positions
        .iter()
        .find(|p| !expected.contains(&(p.account.clone(), i64::from(p.contract.con_id))))
        .unwrap();
    let covered = truth.positions.iter().find(|p| p.contract.con_id == c1).unwrap();
    let closing = truth
        .positions
        .iter()
        .rev()
        .find(|p| {
            !expected.contains(&(p.account.clone(), i64::from(p.contract.con_id)))
                && p.contract.con_id != uncovered.contract.con_id
        })
        .unwrap();
    let fresh = env
        .sim
        .contracts()
        .into_iter()
        .find(|c| c.con_id != c1 && c.con_id != c2 && truth.position(&uncovered.account, c.con_id).is_none())
        .unwrap();
    let u = env.sim.apply_fill(&uncovered.account, uncovered.contract.con_id, 1.0)?;
    let v = env.sim.apply_fill(&covered.account, covered.contract.con_id, 2.0)?;
    let f = env.sim.apply_fill(&uncovered.account, fresh.con_id, 3.0)?;
    env.sim
        .set_position(&closing.account, closing.contract.con_id, 0.0, 0.0)?;
    for (account, con_id, qty, route) in [
        (&u.account, u.contract.con_id, u.quantity, Route::Queued),
        (&v.account, v.contract.con_id, v.quantity, Route::Active),
        (&f.account, f.contract.con_id, f.quantity, Route::Queued),
        (&closing.account, closing.contract.con_id, 0.0, Route::Queued),
    ] {
        wait_for("a STREAM event for a live change", DEADLINE, || async {
            collector
                .about(account, con_id)
                .into_iter()
                .any(|s| s.event.source == Source::Stream && s.event.position == qty && s.event.route == route)
                .then_some(())
        })
        .await?;
    }
    wait_in_sync(&env.sim, &collector, &ingest.session).await?;
    let n = collector.settled_integrity(&ingest.session).await?;
    ensure!(n > latest.len(), "expected snapshots, PnL and stream events, got {n}");
    ingest.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_commands_and_bootstrap_file() -> anyhow::Result<()> {
    let env = env(quiet_sim(), 1, 1).await?;
    let dir = tempfile::tempdir()?;
    let json = dir.path().join("registry.json");
    std::fs::write(
        &json,
        r#"[{"strategy": "wheel", "con_id": 1, "priority": 3}, {"strategy": "hedge", "account": "DU0000001", "con_id": 2}]"#,
    )?;
    let lines = dir.path().join("registry.txt");
    std::fs::write(&lines, "# demo\nwheel * 1 3\nspread DU0000002 3 1\n")?;
    let timeout = std::time::Duration::from_secs(30);
    ensure!(possync::registry::seed_from_file(&env.kafka, &json, "test", timeout).await? == 2);
    ensure!(
        possync::registry::seed_from_file(&env.kafka, &lines, "test", timeout).await? == 1,
        "present entries are not re-written"
    );
    ensure!(possync::registry::seed_from_file(&env.kafka, &json, "test", timeout).await? == 0);
    let entries = possync::registry::list(&env.kafka, timeout).await?;
    let keys: Vec<(String, Option<String>, i64, i32)> = entries
        .iter()
        .map(|e| (e.strategy.clone(), e.account.clone(), e.con_id, e.priority))
        .collect();
    ensure!(
        keys == vec![
            ("hedge".into(), Some("DU0000001".into()), 2, 0),
            ("spread".into(), Some("DU0000002".into()), 3, 1),
            ("wheel".into(), None, 1, 3)
        ],
        "{keys:?}"
    );
    possync::registry::deactivate(&env.kafka, "wheel", Some("*"), 1, "test").await?;
    possync::registry::activate(&env.kafka, "hedge", Some("DU0000001"), 2, 9, "test").await?;
    let entries = possync::registry::list(&env.kafka, timeout).await?;
    ensure!(entries.len() == 2 && entries[0].priority == 9, "{entries:?}");
    // Issue 20 #12: seeding again (every lease term does) neither re-activates what the
    // operator deactivated nor undoes a priority the operator set.
    ensure!(
        possync::registry::seed_from_file(&env.kafka, &json, "test", timeout).await? == 0,
        "the bootstrap file must not undo the operator's decisions"
    );
    let again = possync::registry::list(&env.kafka, timeout).await?;
    ensure!(again.len() == 2 && again[0].priority == 9, "{again:?}");
    ensure!(!again.iter().any(|e| e.strategy == "wheel"), "{again:?}");
    // Re-activated by the operator, it is the registry's again.
    possync::registry::activate(&env.kafka, "wheel", Some("*"), 1, 3, "test").await?;
    ensure!(possync::registry::list(&env.kafka, timeout).await?.len() == 3);
    Ok(())
}
