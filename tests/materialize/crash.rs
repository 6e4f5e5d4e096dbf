//! Crash exactness: the real `possync materialize` binary is SIGKILLed at random moments,
//! many times, while events stream in; afterwards `position_events` and `executions` hold
//! exactly the produced events by Kafka coordinates and every upsert table equals a replay.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::materialize_support::*;
use anyhow::Context;
use possync::materialize;
use rand::{Rng, SeedableRng};

fn spawn(env: &Env, log: &std::path::Path) -> anyhow::Result<Child> {
    let log = std::fs::OpenOptions::new().create(true).append(true).open(log)?;
    let prefix = env.kafka.topics.active.trim_end_matches("positions.active").to_string();
    Command::new(env!("CARGO_BIN_EXE_possync"))
        .args([
            "materialize",
            "--brokers",
            &env.kafka.brokers,
            "--topic-prefix",
            &prefix,
        ])
        .args([
            "--table-uri",
            &env.base,
            "--group",
            "crash",
            "--flush-latency",
            "200ms",
            "--checkpoint-every",
            "7",
        ])
        .args(["-K", "session.timeout.ms=3000", "-K", "heartbeat.interval.ms=500"])
        .env("POSSYNC_LOG", "warn,possync::materialize=info")
        // The events carry synthetic times months back: keep closed rows (retention is wall clock).
        .env("POSSYNC_CLOSED_RETENTION", "0s")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .context("spawn possync materialize")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_moments_stays_exact() -> anyhow::Result<()> {
    let env = Env::start(4)?;
    let log = env.dir.path().join("materialize.log");
    let producer = env.producer()?;
    let topics = env.kafka.topics.clone();

    // Events stream in until the kills are over (~300/s, well under the embedded broker's
    // 5 MiB per partition for the length of the test).
    let stop = tokio_util::sync::CancellationToken::new();
    let stopped = stop.clone();
    let stream = tokio::spawn(async move {
        let mut gen = Gen::new(3, &topics, 300);
        let mut produced = Vec::new();
        let mut round = 0;
        while !stopped.is_cancelled() {
            round += 1;
            let mut out: Vec<_> = (0..60).map(|_| gen.position()).collect();
            out.extend((0..6).map(|_| gen.execution()));
            if round % 5 == 0 {
                out.push(gen.registry());
            }
            if round % 25 == 3 {
                out.push(gen.poison(round / 25));
            }
            if round % 25 == 14 {
                out.push(gen.execution_poison(round / 25));
            }
            produced.extend(produce(&producer, out).await?);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        anyhow::Ok(produced)
    });

    let mut rng = rand::rngs::SmallRng::seed_from_u64(42);
    let kills = 12;
    let url = materialize::tables::table_url(&env.base, materialize::TableKind::PositionEvents)?;
    let version = || async { deltalake::open_table(url.clone()).await.ok().and_then(|t| t.version()) };
    let mut productive = 0;
    for k in 0..kills {
        let before = version().await;
        let mut child = spawn(&env, &log)?;
        // Every fourth run dies at a random moment of its start-up (group join, table load);
        // the others once they have committed, at a random moment of their work.
        if k % 4 != 3 {
            let started = std::time::Instant::now();
            while version().await <= before && started.elapsed() < Duration::from_secs(20) {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        tokio::time::sleep(Duration::from_millis(rng.gen_range(0..1_500))).await;
        child.kill()?; // SIGKILL
        child.wait()?;
        if version().await > before {
            productive += 1;
        }
    }
    stop.cancel();
    let produced = stream.await??;
    // Most kills must hit a materializer that was committing, not one still joining the group.
    anyhow::ensure!(
        productive >= kills / 2,
        "only {productive} of {kills} runs committed before being killed"
    );
    eprintln!(
        "{productive} of {kills} killed runs had committed data; {} messages produced",
        produced.len()
    );

    let mut child = spawn(&env, &log)?;
    let ns = env.namespace().await?;
    let caught_up = materialize::wait_caught_up(&env.base, &ns, &env.kafka, Duration::from_secs(120)).await;
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    child.wait()?;
    if let Err(e) = caught_up {
        let tail = std::fs::read_to_string(&log).unwrap_or_default();
        anyhow::bail!(
            "{e}\nmaterialize log tail:\n{}",
            &tail[tail.len().saturating_sub(4000)..]
        );
    }
    check_exact(&env.base, &produced).await?;
    Ok(())
}
