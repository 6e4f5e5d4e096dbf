//! Tables on S3 with several writers: two `possync materialize` processes in one consumer group
//! write the six tables into a bucket of a local S3 server (moto, `tests/common/s3.rs`) while
//! events stream in; one member is SIGKILLed mid-stream and restarted. The tables stay exact by
//! Kafka coordinates (`positions_current` equal to the replay), and DuckDB (delta + httpfs) and
//! Python deltalake read the same rows from S3 (`tests/py/check_s3_tables.py`).
//!
//! Concurrent commits on S3 rely on put-if-absent (`If-None-Match: *`) of `_delta_log/N.json`:
//! moto does it, but not atomically (`tests/storage_errors.rs` shows the race), so the server
//! here serializes writes the way S3, MinIO and R2 answer them.
//!
//! The only test in this binary: it sets the `AWS_*` variables of the process (the test reads
//! the tables through them) before any thread of its own runs.

mod common;
mod materialize_support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use common::process::{signal, wait_exit, Reap, BIN};
use common::s3::{unique_bucket, S3Options, S3Server};
use materialize_support::*;
use possync::materialize;

const GROUP: &str = "s3-duo";

#[test]
fn two_members_on_s3_stay_exact_and_readers_agree() -> anyhow::Result<()> {
    let started = Instant::now();
    let bucket = unique_bucket("duo");
    let s3 = S3Server::start(&S3Options {
        buckets: vec![bucket.clone()],
        ..S3Options::default()
    })?;
    for (k, v) in s3.env() {
        std::env::set_var(k, v);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(scenario(&s3, &format!("s3://{bucket}/desk/tables")))?;
    println!("materialize_s3: {:.1}s in all", started.elapsed().as_secs_f64());
    Ok(())
}

/// One `possync materialize` member, its log in `dir`.
struct Member {
    child: Reap,
    metrics: SocketAddr,
    log: std::path::PathBuf,
}

fn spawn_member(env: &Env, s3: &S3Server, base: &str, name: &str) -> anyhow::Result<Member> {
    let prefix = env.kafka.topics.active.trim_end_matches("positions.active").to_string();
    let metrics: SocketAddr = ([127, 0, 0, 1], TcpListener::bind("127.0.0.1:0")?.local_addr()?.port()).into();
    let log = env.dir.path().join(format!("{name}.log"));
    let child = Command::new(BIN)
        .args([
            "materialize",
            "--brokers",
            env.broker.bootstrap(),
            "--topic-prefix",
            &prefix,
        ])
        .args(["--table-uri", base, "--group", GROUP, "--flush-latency", "300ms"])
        .args(["--checkpoint-every", "10", "--metrics-addr", &metrics.to_string()])
        .envs(s3.env())
        .env("POSSYNC_LOG", "warn,possync=info")
        // The events carry synthetic times months back: keep closed rows (retention is wall clock).
        .env("POSSYNC_CLOSED_RETENTION", "0s")
        .env("RUST_BACKTRACE", "0")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()
        .context("spawn possync materialize")?;
    Ok(Member {
        child: Reap(child),
        metrics,
        log,
    })
}

impl Member {
    fn tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        text[text.len().saturating_sub(3000)..].to_string()
    }

    /// `possync_commit_conflicts_total` of the running member.
    fn conflicts(&self) -> anyhow::Result<u64> {
        let mut s = TcpStream::connect_timeout(&self.metrics, Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        out.lines()
            .find_map(|l| l.strip_prefix("possync_commit_conflicts_total "))
            .and_then(|v| v.trim().parse().ok())
            .context("no possync_commit_conflicts_total in /metrics")
    }

    /// SIGINT, then exit 0 within a minute (it commits what it holds).
    fn stop(mut self) -> anyhow::Result<()> {
        signal(&self.child.0, "INT")?;
        let status = wait_exit(&mut self.child.0, Duration::from_secs(60))?;
        ensure!(status.success(), "member exited with {status}:\n{}", self.tail());
        Ok(())
    }
}

async fn scenario(s3: &S3Server, base: &str) -> anyhow::Result<()> {
    let env = Env::start(4)?;
    let producer = env.producer()?;
    let topics = env.kafka.topics.clone();

    // A steady stream for about 10 seconds, with registry events and poison.
    let stream = tokio::spawn(async move {
        let mut gen = Gen::new(31, &topics, 150);
        let mut produced = Vec::new();
        for round in 0..80 {
            let mut out: Vec<_> = (0..120).map(|_| gen.position()).collect();
            if round % 8 == 0 {
                out.push(gen.registry());
                out.push(gen.registry());
                out.push(gen.poison(round / 8));
            }
            produced.extend(produce(&producer, out).await?);
            tokio::time::sleep(Duration::from_millis(120)).await;
        }
        anyhow::Ok(produced)
    });

    let a = spawn_member(&env, s3, base, "member-a")?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let b = spawn_member(&env, s3, base, "member-b")?;
    // Both share the partitions for a while, then A dies mid-stream (nothing flushed) and
    // comes back: two members again, B holding A's partitions in between.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let killed_conflicts = a.conflicts().unwrap_or(0);
    drop(a);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let a = spawn_member(&env, s3, base, "member-a2")?;

    let produced = stream.await??;
    let ns = env.namespace().await?;
    let caught_up = materialize::wait_caught_up(base, &ns, &env.kafka, Duration::from_secs(180)).await;
    if let Err(e) = caught_up {
        anyhow::bail!(
            "not caught up: {e}\n--- member a2:\n{}\n--- member b:\n{}",
            a.tail(),
            b.tail()
        );
    }
    let conflicts = killed_conflicts + a.conflicts()? + b.conflicts()?;
    a.stop()?;
    b.stop()?;

    check_exact(base, &produced).await?;
    let mut versions = Vec::new();
    for kind in materialize::TableKind::ALL {
        let t = possync::materialize::tables::Table::open(base, kind).await?;
        versions.push(format!("{}={}", kind.name(), t.version()));
    }
    println!(
        "materialize_s3: {} messages exact on S3; commit conflicts resolved {conflicts}; versions {}",
        produced.len(),
        versions.join(" ")
    );

    // DuckDB and Python deltalake read the same rows from S3.
    let current = expected_current(&produced);
    let mut queue_status = std::collections::BTreeMap::<String, u64>::new();
    for (status, ..) in expected_queue(&produced).values() {
        *queue_status.entry(status.clone()).or_default() += 1;
    }
    let poison: Vec<_> = produced
        .iter()
        .filter(|p| matches!(p.payload, Payload::Poison))
        .map(|p| serde_json::json!([p.topic, p.partition, p.offset]))
        .collect();
    let expected = serde_json::json!({
        "rows": {
            "position_events": expected_event_rows(&produced).len(),
            "positions_current": current.len(),
            "position_queue": expected_queue(&produced).len(),
            "strategy_registry": expected_registry(&produced).len(),
            "dead_letters": poison.len(),
            "registry_events": expected_registry_event_rows(&produced).len(),
        },
        "positions_current": current
            .iter()
            .map(|((account, con_id), (event_id, position))| serde_json::json!([account, con_id, event_id, position]))
            .collect::<Vec<_>>(),
        "queue_status": queue_status,
        "dead_letters": poison,
    });
    let path = env.dir.path().join("expected.json");
    std::fs::write(&path, serde_json::to_vec(&expected)?)?;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/py/check_s3_tables.py");
    let out = Command::new("python3").arg(script).arg(base).arg(&path).output()?;
    ensure!(
        out.status.success(),
        "check_s3_tables.py: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("check_s3_tables.py: {}", String::from_utf8_lossy(&out.stdout).trim());
    Ok(())
}
