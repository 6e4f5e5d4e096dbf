//! Offsets lost before materialize read them (the embedded broker keeps ~5 MiB per partition)
//! stop the materializer with a loud error instead of a silent skip.

mod materialize_support;

use std::time::Duration;

use anyhow::ensure;
use materialize_support::*;
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
