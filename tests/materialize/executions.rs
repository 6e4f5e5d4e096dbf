//! The `executions` table against the embedded broker: every ExecutionEvent once by Kafka
//! coordinates and equal to what was produced field by field (a correction `.02` of an `.01`,
//! fills without a commission), across a stop and a restart, a replay of the whole topic by a
//! new group, and poison on the executions topic; DuckDB and Python deltalake read it.

use std::time::Duration;

use crate::materialize_support::*;
use anyhow::ensure;
use possync::materialize::{self, TableKind};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::TopicPartitionList;
use tokio_util::sync::CancellationToken;

async fn version(base: &str) -> anyhow::Result<Option<u64>> {
    let url = materialize::tables::table_url(base, TableKind::Executions)?;
    Ok(deltalake::open_table(url).await?.version())
}

/// Runs a materializer until the tables hold everything produced so far, then stops it.
async fn materialize_all(env: &Env, cfg: materialize::MaterializeConfig) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(materialize::run(cfg, env.kafka.clone(), shutdown.clone()));
    let ns = env.namespace().await?;
    let caught_up = materialize::wait_caught_up(&env.base, &ns, &env.kafka, Duration::from_secs(60)).await;
    shutdown.cancel();
    task.await??;
    Ok(caught_up?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn executions_once_by_coordinates_across_restart_and_replay() -> anyhow::Result<()> {
    let env = Env::start(2)?;
    let producer = env.producer()?;
    let topics = env.kafka.topics.clone();
    let mut gen = Gen::new(21, &topics, 30);

    // A fill, its correction, and a fill without a commission, on one contract.
    let t0 = 1_767_258_000_000_000; // 2026-01-01T09:00:00Z
    let first = execution("DU1", 265_598, "0000e0d5.6553a2b1.01", t0);
    let corrected = correction(&first, 2, 5.0, 1.30, t0 + 60_000_000);
    let mut bare = execution("DU1", 265_598, "0000e0d5.6553a2b2.01", t0 + 120_000_000);
    bare.commission = None;
    bare.commission_currency = None;
    bare.realized_pnl = Some(-12.5);
    let mut out = vec![
        execution_out(&topics, first.clone()),
        execution_out(&topics, corrected.clone()),
        execution_out(&topics, bare.clone()),
    ];
    for i in 0..300 {
        out.push(gen.execution());
        if i % 3 == 0 {
            out.push(gen.position());
        }
        if i % 75 == 5 {
            out.push(gen.execution_poison(i / 75));
        }
    }
    let mut produced = produce(&producer, out).await?;
    let corrections = produced
        .iter()
        .filter(|p| matches!(&p.payload, Payload::Execution(e) if e.revision > 1))
        .count();
    ensure!(corrections > 20, "only {corrections} corrections generated");

    materialize_all(&env, env.config("x")).await?;
    check_exact(&env.base, &produced).await?;
    let rows = execution_rows(&env.base).await?;
    for e in [&first, &corrected, &bare] {
        ensure!(
            rows.iter().filter(|(_, r)| r == e).count() == 1,
            "{} not in executions exactly once",
            e.exec_id
        );
    }

    // Stopped: more executions and poison arrive; the restarted member resumes exactly.
    let mut out: Vec<_> = (0..100).map(|_| gen.execution()).collect();
    out.extend((0..4).map(|i| gen.execution_poison(i)));
    produced.extend(produce(&producer, out).await?);
    materialize_all(&env, env.config("x")).await?;
    check_exact(&env.base, &produced).await?;

    // Redelivery: a new group reads the executions topic again from offset 0. Nothing changes.
    let before = version(&env.base).await?;
    let replay = materialize::MaterializeConfig {
        replay_from_beginning: true,
        ..env.config("x-replay")
    };
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(materialize::run(replay, env.kafka.clone(), shutdown.clone()));
    let probe: BaseConsumer = env.kafka.consumer("x-replay").create()?;
    let parts: Vec<i32> = (0..2).collect();
    let executions = topics.executions.clone();
    wait_for(
        "the replay to read the executions topic to its end",
        Duration::from_secs(60),
        || {
            let mut tpl = TopicPartitionList::new();
            for p in &parts {
                tpl.add_partition(&executions, *p);
            }
            let ok = probe.committed_offsets(tpl, Duration::from_secs(5)).map(|c| {
                parts.iter().all(|p| {
                    let (_, high) = probe
                        .fetch_watermarks(&executions, *p, Duration::from_secs(5))
                        .unwrap_or((0, i64::MAX));
                    let off = c.find_partition(&executions, *p).map(|e| e.offset());
                    high == 0 || off == Some(rdkafka::Offset::Offset(high))
                })
            });
            async move { Ok(ok.unwrap_or(false)) }
        },
    )
    .await?;
    shutdown.cancel();
    task.await??;
    ensure!(
        version(&env.base).await? == before,
        "the replay committed to executions"
    );
    check_exact(&env.base, &produced).await?;

    // DuckDB and Python deltalake read the table; DuckDB's realized cost of the latest
    // revisions (the README's query) equals the one computed here.
    let json = python_readers(&env.base)?;
    let t = &json["executions"];
    let want = expected_execution_rows(&produced);
    let n = want.len() as u64;
    ensure!(
        t["duckdb_rows"] == n && t["deltalake_rows"] == n && t["duckdb_distinct_coordinates"] == n,
        "executions read by DuckDB / deltalake: {t} (want {n} rows)"
    );
    ensure!(
        (t["min_reader_version"].as_u64(), t["min_writer_version"].as_u64()) == (Some(1), Some(2)),
        "protocol: {t}"
    );
    ensure!(t["partition_columns"] == serde_json::json!(["event_date"]), "{t}");
    ensure!(t["duckdb_sides"] == serde_json::json!(["BOT", "SLD"]), "{t}");
    ensure!(t["duckdb_null_commissions"].as_u64().unwrap_or(0) > 0, "{t}");
    for ty in t["timestamp_types"].as_array().expect("list") {
        ensure!(
            ty.as_str().is_some_and(|s| s.contains("UTC")),
            "timestamp without UTC: {ty}"
        );
    }
    let mut latest = std::collections::BTreeMap::new();
    for (_, e) in &want {
        let slot = latest.entry((e.account.clone(), e.exec_stem.clone())).or_insert(e);
        if e.revision > slot.revision {
            *slot = e;
        }
    }
    let cost: f64 = latest
        .values()
        .map(|e| e.side.sign() * e.shares * e.price * 100.0 + e.commission.unwrap_or(0.0))
        .sum();
    let duck = t["duckdb_realized_cost"].as_f64().unwrap_or(f64::NAN);
    ensure!(
        (duck - cost).abs() < 1e-6 * cost.abs().max(1.0),
        "DuckDB realized cost {duck}, want {cost}"
    );
    Ok(())
}

/// A deployment whose topics predate executions (no `<prefix>executions` yet): the library's
/// materializer, which does not run `possync materialize`'s topic check, materializes the other
/// topics exactly and creates an empty `executions` table; `wait_caught_up` does not trip over
/// the missing topic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_executions_topic_does_not_stop_the_positions() -> anyhow::Result<()> {
    use possync::kafka::{EmbeddedBroker, KafkaConfig, Topics};
    let broker = EmbeddedBroker::start(1)?;
    let mut kafka = KafkaConfig::new(broker.bootstrap());
    kafka.topics = Topics::new(&format!("nx{}.", &possync::events::new_id()[..8]));
    for t in kafka.topics.all() {
        broker.create_topic(t, 2)?;
    }
    let dir = tempfile::tempdir()?;
    let base = dir.path().join("tables").to_string_lossy().into_owned();
    let env = Env {
        broker,
        kafka,
        dir,
        base,
    };
    let producer = env.producer()?;
    let mut gen = Gen::new(4, &env.kafka.topics, 20);
    let mut out: Vec<_> = (0..200).map(|_| gen.position()).collect();
    out.push(gen.registry());
    let produced = produce(&producer, out).await?;
    materialize_all(&env, env.config("nx")).await?;
    check_exact(&env.base, &produced).await?;
    ensure!(
        execution_rows(&env.base).await?.is_empty(),
        "rows in executions without a topic"
    );
    ensure!(version(&env.base).await?.is_some(), "no executions table created");
    Ok(())
}
