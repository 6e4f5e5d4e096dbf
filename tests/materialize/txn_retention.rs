//! Txn retention (issue 10 #9): every txn action carries `lastUpdated`, and a partition that
//! gets no messages is re-stamped, so its stored offset outlives the tables'
//! `delta.setTransactionRetentionDuration` for as long as a member owns it.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::materialize_support::*;
use anyhow::ensure;
use possync::materialize::offsets::{app_id, tables_of};
use possync::materialize::tables::{Table, TXN_RETENTION_PROPERTY};
use possync::materialize::{self, MaterializeConfig, TableKind};
use tokio_util::sync::CancellationToken;

/// Gives every table a retention of `retention` (what an operator could set).
async fn set_retention(base: &str, retention: &str) -> anyhow::Result<()> {
    for kind in TableKind::ALL {
        let mut t = Table::open(base, kind).await?;
        t.set_property(TXN_RETENTION_PROPERTY, retention).await?;
    }
    Ok(())
}

/// The newest `lastUpdated` of each app id in a table's JSON commits.
fn last_updated(base: &str, kind: TableKind) -> anyhow::Result<BTreeMap<String, Option<i64>>> {
    let log = std::path::Path::new(base).join(kind.name()).join("_delta_log");
    let mut commits: Vec<_> = std::fs::read_dir(log)?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    commits.retain(|p| p.extension().is_some_and(|x| x == "json"));
    commits.sort();
    let mut out = BTreeMap::new();
    for c in commits {
        for line in std::fs::read_to_string(c)?.lines() {
            let v: serde_json::Value = serde_json::from_str(line)?;
            if let Some(txn) = v.get("txn") {
                let id = txn["appId"].as_str().unwrap_or_default().to_string();
                out.insert(id, txn.get("lastUpdated").and_then(serde_json::Value::as_i64));
            }
        }
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_partitions_are_restamped_and_outlive_the_txn_retention() -> anyhow::Result<()> {
    let env = Env::start(2)?;
    let retention = Duration::from_secs(4);
    set_retention(&env.base, "interval 4 seconds").await?;
    let mut gen = Gen::new(9, &env.kafka.topics, 40);
    let mut out: Vec<_> = (0..200).map(|_| gen.position()).collect();
    out.extend((0..20).map(|_| gen.registry()));
    let produced = produce(&env.producer()?, out).await?;
    let ns = env.namespace().await?;

    let cfg = MaterializeConfig {
        txn_restamp_every: Duration::from_millis(400),
        ..env.config("g-retention")
    };
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(materialize::run(cfg, env.kafka.clone(), shutdown.clone()));
    materialize::wait_caught_up(&env.base, &ns, &env.kafka, Duration::from_secs(60)).await?;
    check_exact(&env.base, &produced).await?;

    // Every partition the producer wrote to, and every table it feeds.
    let mut expected: Vec<(TableKind, String)> = Vec::new();
    let mut partitions: Vec<(String, i32)> = produced.iter().map(|p| (p.topic.clone(), p.partition)).collect();
    partitions.sort();
    partitions.dedup();
    for (topic, p) in &partitions {
        for kind in tables_of(&env.kafka.topics, topic) {
            expected.push((*kind, app_id(&ns, topic, *p)));
        }
    }
    let stamps = |kinds: &[(TableKind, String)]| -> anyhow::Result<Vec<Option<i64>>> {
        let mut logs = BTreeMap::new();
        kinds
            .iter()
            .map(|(kind, id)| {
                if !logs.contains_key(kind) {
                    logs.insert(*kind, last_updated(&env.base, *kind)?);
                }
                Ok(logs[kind].get(id).copied().flatten())
            })
            .collect()
    };
    let first = stamps(&expected)?;
    ensure!(
        first.iter().all(Option::is_some),
        "a txn action without lastUpdated: {first:?}"
    );

    // No new messages for longer than the retention.
    tokio::time::sleep(retention + Duration::from_secs(2)).await;

    // Each idle partition's txn action was written again, and a fresh reader (a restarted
    // member, `possync status`) still finds every stored offset.
    let later = stamps(&expected)?;
    for (((kind, id), a), b) in expected.iter().zip(&first).zip(&later) {
        ensure!(
            b > a,
            "{} {id}: lastUpdated did not advance ({a:?} → {b:?})",
            kind.name()
        );
    }
    for (kind, id) in &expected {
        let mut t = Table::open(&env.base, *kind).await?;
        ensure!(
            t.txn_version(id).await?.is_some(),
            "{}: the stored offset of idle {id} expired",
            kind.name()
        );
    }
    materialize::wait_caught_up(&env.base, &ns, &env.kafka, Duration::from_secs(5)).await?;
    shutdown.cancel();
    task.await??;
    check_exact(&env.base, &produced).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restamp_period_longer_than_half_the_retention_is_refused() -> anyhow::Result<()> {
    let env = Env::start(1)?;
    set_retention(&env.base, "interval 1 hours").await?;
    let cfg = MaterializeConfig {
        txn_restamp_every: Duration::from_secs(3600),
        ..env.config("g-too-rare")
    };
    let err = materialize::run(cfg, env.kafka.clone(), CancellationToken::new())
        .await
        .expect_err("a restamp period of the whole retention must be refused");
    ensure!(
        err.to_string().contains("lower --txn-restamp-every"),
        "unexpected error: {err}"
    );
    Ok(())
}
