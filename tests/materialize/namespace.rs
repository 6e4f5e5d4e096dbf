//! The offset namespace (issue 10 #5): a materializer under another namespace than the one the
//! tables were written under is refused at start-up (it would re-read every partition from
//! offset 0 and append everything again); allowed explicitly, its rows stay apart by their
//! `kafka_namespace`, so (namespace, topic, partition, offset) stays unique.

use std::time::Duration;

use crate::materialize_support::*;
use anyhow::ensure;
use possync::materialize::{self, MaterializeConfig, MaterializeError, TableKind};
use tokio_util::sync::CancellationToken;

async fn materialize_until_caught_up(env: &Env, cfg: MaterializeConfig) -> anyhow::Result<()> {
    let ns = cfg.offsets_namespace.clone().expect("the test names its namespaces");
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(materialize::run(cfg, env.kafka.clone(), shutdown.clone()));
    let caught_up = materialize::wait_caught_up(&env.base, &ns, &env.kafka, Duration::from_secs(60)).await;
    shutdown.cancel();
    task.await??;
    Ok(caught_up?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_namespace_is_refused_and_an_allowed_one_keeps_coordinates_unique() -> anyhow::Result<()> {
    let env = Env::start(2)?;
    let mut gen = Gen::new(5, &env.kafka.topics, 20);
    let mut out: Vec<_> = (0..300).map(|_| gen.position()).collect();
    out.extend((0..10).map(|_| gen.registry()));
    out.extend((0..3).map(|i| gen.poison(i)));
    let produced = produce(&env.producer()?, out).await?;
    let config = |ns: &str, allow: bool| MaterializeConfig {
        offsets_namespace: Some(ns.to_string()),
        allow_namespace_change: allow,
        ..env.config(&format!("g-{ns}-{allow}"))
    };

    materialize_until_caught_up(&env, config("cluster-a", false)).await?;
    check_exact(&env.base, &produced).await?;
    let kinds = [
        TableKind::PositionEvents,
        TableKind::RegistryEvents,
        TableKind::DeadLetters,
    ];
    let mut first = Vec::new();
    for kind in kinds {
        first.push(namespaced_coordinates(&env.base, kind).await?);
    }

    // Same topics, another namespace (a changed cluster id or --offsets-namespace): refused
    // before anything is consumed, with the fix in the message.
    let refused = tokio::time::timeout(
        Duration::from_secs(60),
        materialize::run(config("cluster-b", false), env.kafka.clone(), CancellationToken::new()),
    )
    .await
    .map_err(|_| anyhow::anyhow!("a materializer under another namespace was not refused at start-up"))?;
    let err = match refused {
        Err(e @ MaterializeError::NamespaceChanged { .. }) => e.to_string(),
        other => anyhow::bail!("want a namespace error, got {other:?}"),
    };
    for hint in ["--offsets-namespace cluster-a", "--allow-namespace-change"] {
        ensure!(err.contains(hint), "{err:?} does not name {hint}");
    }
    check_exact(&env.base, &produced).await?;

    // Allowed (a genuinely new cluster whose offsets start at 0 again): the topics are read
    // again under the new namespace, and every row stays unique by its coordinates.
    materialize_until_caught_up(&env, config("cluster-b", true)).await?;
    for (kind, before) in kinds.into_iter().zip(first) {
        let rows = namespaced_coordinates(&env.base, kind).await?;
        let mut unique = rows.clone();
        unique.dedup();
        ensure!(unique == rows, "{}: coordinates repeat", kind.name());
        let (a, b): (Vec<_>, Vec<_>) = rows.into_iter().partition(|r| r.0 == "cluster-a");
        ensure!(a == before, "{}: the first namespace's rows changed", kind.name());
        let strip =
            |v: &[(String, String, i32, i64)]| -> Vec<_> { v.iter().map(|(_, t, p, o)| (t.clone(), *p, *o)).collect() };
        ensure!(
            b.iter().all(|r| r.0 == "cluster-b") && strip(&b) == strip(&a),
            "{}: the new namespace holds other offsets than the first",
            kind.name()
        );
    }
    // The new namespace is recorded: a restart under it needs no flag.
    materialize_until_caught_up(&env, config("cluster-b", false)).await?;
    Ok(())
}
