//! `possync topics create | check` through rdkafka's admin API on a real broker, and the
//! start-up check of the processes: a missing topic or an uncompacted registry topic stops them
//! with one line that names the fix.

use std::process::Command;

use anyhow::{bail, ensure};
use rdkafka::admin::{AdminClient, AdminOptions, AlterConfig, ResourceSpecifier};
use rdkafka::client::DefaultClientContext;

use crate::common::kafka_cluster::{KafkaCluster, KafkaOpts};
use crate::common::process::{run, BIN};

fn possync(args: &[&str]) -> anyhow::Result<(bool, String)> {
    let ran = run(Command::new(BIN).args(args).env("POSSYNC_LOG", "warn"))?;
    Ok((ran.ok, ran.all()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_check_and_start_up_checks() -> anyhow::Result<()> {
    let _one = crate::SERIAL.lock().await;
    let cluster = KafkaCluster::start(1, KafkaOpts::default()).await?;
    let brokers = cluster.bootstrap().to_string();
    let layout = [
        "--replication-factor",
        "1",
        "--min-insync-replicas",
        "1",
        "--partitions",
        "3",
    ];
    let with = |sub: &[&'static str], prefix: &'static str| -> Vec<String> {
        let mut v: Vec<String> = sub.iter().map(|s| s.to_string()).collect();
        v.extend([
            "--brokers".into(),
            brokers.clone(),
            "--topic-prefix".into(),
            prefix.into(),
        ]);
        v
    };
    let run = |args: Vec<String>, extra: &[&str]| {
        let mut all: Vec<&str> = args.iter().map(String::as_str).collect();
        all.extend_from_slice(extra);
        possync(&all)
    };

    // A process started before the topics exist stops at once, naming the command.
    let (ok, out) = run(with(&["queue-worker"], "t1."), &["--kafka-timeout", "10s"])?;
    ensure!(
        !ok && out.contains("possync topics create"),
        "queue-worker on missing topics:\n{out}"
    );

    let (ok, out) = run(with(&["topics", "create"], "t1."), &layout)?;
    ensure!(ok, "topics create failed:\n{out}");
    ensure!(
        out.matches("created t1.").count() == 6,
        "expected six topics (four data, executions, one lease) created:\n{out}"
    );
    let (ok, out) = run(with(&["topics", "check"], "t1."), &layout)?;
    ensure!(ok && out.contains("topics ok"), "check after create:\n{out}");
    // Creating again is a no-op that still checks.
    let (ok, out) = run(with(&["topics", "create"], "t1."), &layout)?;
    ensure!(ok && !out.contains("created"), "second create:\n{out}");

    // Drift: other partition count expected, and the registry no longer compacted.
    let (ok, out) = run(
        with(&["topics", "check"], "t1."),
        &[
            "--replication-factor",
            "1",
            "--min-insync-replicas",
            "1",
            "--partitions",
            "6",
        ],
    )?;
    ensure!(
        !ok && out.matches("partitions is 3, expected 6").count() == 5,
        "partition drift:\n{out}"
    );
    let admin: AdminClient<DefaultClientContext> = possync::kafka::KafkaConfig::new(&brokers).admin().create()?;
    let cfg = AlterConfig::new(ResourceSpecifier::Topic("t1.registry")).set("cleanup.policy", "delete");
    for r in admin.alter_configs([&cfg], &AdminOptions::new()).await? {
        if let Err((_, code)) = r {
            bail!("alter t1.registry: {code:?}");
        }
    }
    let (ok, out) = run(with(&["topics", "check"], "t1."), &layout)?;
    ensure!(
        !ok && out.contains("t1.registry: cleanup.policy is delete, expected compact"),
        "compaction drift:\n{out}"
    );
    let (ok, out) = run(
        with(&["materialize"], "t1."),
        &["--table-uri", "/nonexistent/never-written"],
    )?;
    ensure!(
        !ok && out.contains("must be compacted") && out.lines().filter(|l| l.contains("Error")).count() <= 1,
        "materialize on an uncompacted registry:\n{out}"
    );
    Ok(())
}
