//! A member that gets back partitions another member advanced resumes from the tables' txn
//! versions, read at that assignment: it neither re-reads what the other member committed nor
//! misses anything. Run with the default (eager) assignor and with `cooperative-sticky`.

use std::time::{Duration, Instant};

use crate::materialize_support::*;
use anyhow::{ensure, Context};
use possync::materialize::{self, Progress};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

async fn reassigned_partitions_resume_from_the_tables(strategy: Option<&str>) -> anyhow::Result<()> {
    let mut env = Env::start(4)?;
    if let Some(s) = strategy {
        env.kafka
            .overrides
            .insert("consumer.partition.assignment.strategy".into(), s.to_string());
    }
    let producer = env.producer()?;
    let mut gen = Gen::new(5, &env.kafka.topics, 200);
    let ns = env.namespace().await?;
    let caught_up = |env: &Env| {
        let (base, kafka, ns) = (env.base.clone(), env.kafka.clone(), ns.clone());
        async move { materialize::wait_caught_up(&base, &ns, &kafka, Duration::from_secs(90)).await }
    };

    let mut produced = produce(&producer, (0..400).map(|_| gen.position()).collect()).await?;
    let (tx_a, rx_a) = watch::channel(Progress::default());
    let stop_a = CancellationToken::new();
    let a = tokio::spawn(materialize::run_with_progress(
        env.config("reassign"),
        env.kafka.clone(),
        stop_a.clone(),
        tx_a,
    ));
    caught_up(&env).await?;

    // B joins; produce in waves until B has taken (and committed) part of the stream.
    let (tx_b, rx_b) = watch::channel(Progress::default());
    let stop_b = CancellationToken::new();
    let b = tokio::spawn(materialize::run_with_progress(
        env.config("reassign"),
        env.kafka.clone(),
        stop_b.clone(),
        tx_b,
    ));
    let deadline = Instant::now() + Duration::from_secs(90);
    while rx_b.borrow().flushes == 0 {
        ensure!(Instant::now() < deadline, "member B never got partitions");
        let mut wave: Vec<_> = (0..100).map(|_| gen.position()).collect();
        wave.push(gen.registry());
        produced.extend(produce(&producer, wave).await?);
        caught_up(&env).await?;
    }
    caught_up(&env).await?;

    // B leaves; A gets B's partitions back, which B advanced past anything A knows of.
    stop_b.cancel();
    b.await?.context("member B")?;
    // Four input topics (positions active and queued, registry, executions), four partitions each.
    let all = 4 * 4;
    wait_for("A to hold every partition", Duration::from_secs(60), || {
        let n = rx_a.borrow().assigned;
        async move { Ok(n == all) }
    })
    .await?;
    let before = rx_a.borrow().consumed;
    let mut tail: Vec<_> = (0..300).map(|_| gen.position()).collect();
    tail.push(gen.registry());
    let n = tail.len() as u64;
    produced.extend(produce(&producer, tail).await?);
    caught_up(&env).await?;
    let taken = rx_a.borrow().consumed - before;
    stop_a.cancel();
    a.await?.context("member A")?;
    check_exact(&env.base, &produced).await?;
    ensure!(
        taken == n,
        "after getting B's partitions back, A took {taken} messages for {n} new ones: it re-read what B had committed"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reassigned_partitions_resume_from_the_tables_eager() -> anyhow::Result<()> {
    reassigned_partitions_resume_from_the_tables(None).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reassigned_partitions_resume_from_the_tables_cooperative_sticky() -> anyhow::Result<()> {
    reassigned_partitions_resume_from_the_tables(Some("cooperative-sticky")).await
}
