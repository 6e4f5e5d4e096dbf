//! Offsets lost before materialize read them (the embedded broker keeps ~5 MiB per partition)
//! stop the materializer with a loud error instead of a silent skip.

use std::time::Duration;

use crate::materialize_support::*;
use anyhow::ensure;
use possync::materialize::{self, MaterializeError};
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evicted_offsets_are_a_loud_error() -> anyhow::Result<()> {
    let env = Env::start(1)?;
    let producer = env.producer()?;
    let mut gen = Gen::new(9, &env.kafka.topics, 50);
    let first = produce(&producer, (0..200).map(|_| gen.position()).collect()).await?;

    let shutdown = CancellationToken::new();
    let task = tokio::spawn(materialize::run(
        env.config("lost"),
        env.kafka.clone(),
        shutdown.clone(),
    ));
    let ns = env.namespace().await?;
    materialize::wait_caught_up(&env.base, &ns, &env.kafka, Duration::from_secs(60)).await?;
    shutdown.cancel();
    task.await??;
    check_exact(&env.base, &first).await?;

    // While nobody consumes, ~12 MiB land on the single partition of each position topic and
    // the broker drops the oldest, including the offsets materialize would resume from.
    let pad = "x".repeat(2_000);
    for _ in 0..30 {
        let batch: Vec<_> = (0..200)
            .map(|_| {
                let mut o = gen.position();
                if let Payload::Position(e) = &mut o.payload {
                    e.local_symbol = pad.clone();
                    o.value = Some(e.encode().expect("encodes"));
                }
                o
            })
            .collect();
        produce(&producer, batch).await?;
    }
    let admin: rdkafka::consumer::BaseConsumer = env.kafka.consumer("probe").create()?;
    let (low, _) =
        rdkafka::consumer::Consumer::fetch_watermarks(&admin, &env.kafka.topics.active, 0, Duration::from_secs(5))?;
    ensure!(
        low > 0,
        "the broker kept everything (log start {low}); produce more to evict"
    );

    let shutdown = CancellationToken::new();
    let result = tokio::time::timeout(
        Duration::from_secs(60),
        materialize::run(env.config("lost"), env.kafka.clone(), shutdown),
    )
    .await?;
    match result {
        Err(MaterializeError::OutOfRange(_) | MaterializeError::OffsetOutOfRange { .. }) => Ok(()),
        other => anyhow::bail!("expected a lost-offsets error, got {other:?}"),
    }
}

/// Issue 20 #1: the same topic names served by a new log (a topic deleted and recreated, or a
/// log truncated) with the offset namespace unchanged. Here the new log is a second embedded
/// broker under the same `--offsets-namespace`, which is what a recreated topic looks like to
/// the tables. Shorter than the stored offsets, the materializer used to wait or say "events
/// were lost"; longer, it skipped the new log's first offsets for good. It must stop before it
/// writes anything, naming what happened, and `status` must be unhealthy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recreated_topic_stops_the_materializer_before_it_writes() -> anyhow::Result<()> {
    use possync::kafka::{EmbeddedBroker, KafkaConfig};
    let env = Env::start(1)?;
    let ns = "recreated-test".to_string();
    let cfg = || materialize::MaterializeConfig {
        offsets_namespace: Some(ns.clone()),
        ..env.config("recreated")
    };
    let producer = env.producer()?;
    let mut gen = Gen::new(21, &env.kafka.topics, 30);
    let first = produce(&producer, (0..80).map(|_| gen.position()).collect()).await?;
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(materialize::run(cfg(), env.kafka.clone(), shutdown.clone()));
    materialize::wait_caught_up(&env.base, &ns, &env.kafka, Duration::from_secs(60)).await?;
    shutdown.cancel();
    task.await??;
    check_exact(&env.base, &first).await?;
    let rows = event_rows(&env.base).await?;

    for (events, what) in [(10, "ends before offset"), (400, "another timestamp")] {
        // The same topic names on a new log, `events` messages long in all.
        let broker = EmbeddedBroker::start(1)?;
        let mut kafka = KafkaConfig::new(broker.bootstrap());
        kafka.topics = env.kafka.topics.clone();
        broker.create_topics(&kafka.topics, 1)?;
        let p: rdkafka::producer::FutureProducer = kafka.producer().create()?;
        let mut gen = Gen::new(events as u64, &kafka.topics, 30);
        produce(&p, (0..events).map(|_| gen.position()).collect()).await?;
        let run = materialize::run(cfg(), kafka.clone(), CancellationToken::new());
        let result = tokio::time::timeout(Duration::from_secs(90), run).await;
        let err = match result {
            Err(_) => anyhow::bail!("{events}-event log: the materializer kept running"),
            Ok(Ok(())) => anyhow::bail!("{events}-event log: the materializer stopped without an error"),
            Ok(Err(e)) => e,
        };
        ensure!(
            matches!(err, MaterializeError::LogReplaced { .. }),
            "{events}-event log: {err}"
        );
        let text = err.to_string();
        ensure!(
            text.contains(what) && text.contains("recreated") && text.contains("--table-uri"),
            "{events}-event log: {text}"
        );
        ensure!(
            event_rows(&env.base).await? == rows,
            "{events}-event log: rows were written before the stop"
        );
        if events == 10 {
            let status = possync::ops::status::check(
                &possync::ops::status::StatusConfig {
                    table_uri: env.base.clone(),
                    offsets_namespace: Some(ns.clone()),
                    ..Default::default()
                },
                &kafka,
            )
            .await?;
            ensure!(
                !status.healthy && status.problems.iter().any(|p| p.contains("recreated")),
                "status of tables ahead of the log: {:?}",
                status.problems
            );
        }
    }
    Ok(())
}
