//! The dead-letter topic never holds up a commit: a dead letter the topic refuses (here a value
//! over the producer's `message.max.bytes`) is in the `dead_letters` table, counted in
//! `possync_dead_letter_topic_failures_total`, and the stream goes on.

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use crate::materialize_support::*;
use anyhow::ensure;
use possync::materialize;
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_dead_letter_send_never_blocks_commits() -> anyhow::Result<()> {
    let mut env = Env::start(3)?;
    // The test's own producer may send big messages; the materializer's producer may not.
    let producer = env.producer()?;
    env.kafka
        .overrides
        .insert("producer.message.max.bytes".into(), "1000".into());
    let mut gen = Gen::new(31, &env.kafka.topics, 50);
    let big = |topic: &str| Outgoing {
        topic: topic.to_string(),
        key: Some(b"DU1:5".to_vec()),
        value: Some(vec![7u8; 5000]),
        payload: Payload::Poison,
    };
    let failures = || possync::metrics::global().dead_letter_topic_failures.load(Relaxed);
    let before = failures();

    let mut out: Vec<_> = (0..300).map(|_| gen.position()).collect();
    out.push(big(&env.kafka.topics.active));
    out.push(big(&env.kafka.topics.queued));
    let mut produced = produce(&producer, out).await?;
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(materialize::run(env.config("dl"), env.kafka.clone(), shutdown.clone()));
    let ns = env.namespace().await?;
    materialize::wait_caught_up(&env.base, &ns, &env.kafka, Duration::from_secs(60)).await?;
    check_exact(&env.base, &produced).await?;

    // Commits keep flowing after the refused sends.
    let more: Vec<_> = (0..300).map(|_| gen.position()).collect();
    produced.extend(produce(&producer, more).await?);
    materialize::wait_caught_up(&env.base, &ns, &env.kafka, Duration::from_secs(60)).await?;
    check_exact(&env.base, &produced).await?;
    wait_for("both refused letters counted", Duration::from_secs(60), || {
        let n = failures() - before;
        async move { Ok(n >= 2) }
    })
    .await?;
    ensure!(!task.is_finished(), "the materializer stopped");
    shutdown.cancel();
    task.await??;
    Ok(())
}
