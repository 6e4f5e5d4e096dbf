//! `--schema-registry-url` against a real Confluent-compatible registry: Apicurio Registry,
//! built from Maven Central and started by `scripts/schema-registry.sh`. `possync registry
//! activate`, `possync ingest` (against the IB simulator) and `possync materialize` all run as
//! the binary with the flag; the frames on every topic carry the registry's ids (not the fixed
//! 1 and 2: decoys registered first move them), the registry returns `schemas/*.avsc` for those
//! ids, and the tables hold exactly what the topics hold, with no dead letter. Then a later
//! release's schema version is registered and its values read by the running materializer
//! (writer schema fetched by id, resolved to this build's), and a subject whose compatibility
//! level refuses possync's schema stops a process at start with one line.
//!
//! Nothing is skipped: when the registry cannot be built or started, the test fails saying why.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, ensure, Context};
use possync::events::{PositionEvent, RegistryEvent};
use possync::kafka::{EmbeddedBroker, KafkaConfig, Topics};
use possync::schema::{self, SchemaIds};
use possync::schema_registry::{SchemaRegistry, SchemaRegistryArgs};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Message, Offset, TopicPartitionList};

use crate::common::process::{signal, wait_exit, Reap, BIN};
use crate::materialize_support;
use crate::materialize_support::{check_exact, dead_letter_rows, wait_for, Payload, Produced};

/// The registry of this test, stopped when dropped (and by the script's watchdog if the test
/// process dies first).
struct Registry {
    state: tempfile::TempDir,
    url: String,
}

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/schema-registry.sh")
}

impl Registry {
    fn start() -> anyhow::Result<Registry> {
        let state = tempfile::tempdir()?;
        let run = |cmd: &str| -> anyhow::Result<String> {
            let out = Command::new(script())
                .arg(cmd)
                .env("POSSYNC_SCHEMA_REGISTRY_DIR", state.path())
                .env("POSSYNC_SCHEMA_REGISTRY_OWNER_PID", std::process::id().to_string())
                .stderr(Stdio::inherit())
                .output()
                .with_context(|| format!("running scripts/schema-registry.sh {cmd}"))?;
            ensure!(
                out.status.success(),
                "scripts/schema-registry.sh {cmd} failed ({}); the schema registry test cannot run without it",
                out.status
            );
            Ok(String::from_utf8(out.stdout)?.trim().to_string())
        };
        run("start")?;
        let url = run("url")?;
        Ok(Registry { state, url })
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = Command::new(script())
            .arg("stop")
            .env("POSSYNC_SCHEMA_REGISTRY_DIR", self.state.path())
            .status();
    }
}

/// A message read back: topic, partition, offset, value.
type Read = (String, i32, i64, Vec<u8>);

/// Every committed message of `topics`, each partition from its beginning to librdkafka's
/// partition EOF (not the high watermark: a transactional producer's last offsets may be commit
/// markers, never delivered). One consumer per topic: `PartitionEOF` names the partition only.
fn read_all(kafka: &KafkaConfig, topics: &[&str]) -> anyhow::Result<Vec<Read>> {
    let mut out = Vec::new();
    for t in topics {
        let consumer: BaseConsumer = kafka
            .consumer("schema-registry-test-reader")
            .set("enable.partition.eof", "true")
            .set("isolation.level", "read_committed")
            .create()?;
        let md = consumer.fetch_metadata(Some(t), Duration::from_secs(10))?;
        let mut tpl = TopicPartitionList::new();
        let mut open = std::collections::BTreeSet::new();
        for p in md.topics()[0].partitions() {
            let (lo, hi) = consumer.fetch_watermarks(t, p.id(), Duration::from_secs(10))?;
            if hi > lo {
                tpl.add_partition_offset(t, p.id(), Offset::Beginning)?;
                open.insert(p.id());
            }
        }
        if open.is_empty() {
            continue;
        }
        consumer.assign(&tpl)?;
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while !open.is_empty() {
            ensure!(
                std::time::Instant::now() < deadline,
                "could not read {t} to its end: partitions {open:?} left"
            );
            let m = match consumer.poll(Duration::from_millis(500)) {
                None => continue,
                Some(Err(rdkafka::error::KafkaError::PartitionEOF(p))) => {
                    open.remove(&p);
                    continue;
                }
                Some(m) => m?,
            };
            let v = m.payload().context("message without value")?.to_vec();
            out.push((m.topic().to_string(), m.partition(), m.offset(), v));
        }
    }
    Ok(out)
}

/// Canonical form of an Avro schema text, to compare what the registry returns with the file.
fn canonical(avsc: &str) -> anyhow::Result<String> {
    Ok(apache_avro::Schema::parse_str(avsc)?.canonical_form())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_and_materialize_frame_with_the_registry_ids() -> anyhow::Result<()> {
    let registry = Registry::start()?;
    let client = SchemaRegistry::new(&registry.url, Duration::from_secs(10))?;
    // Decoys first, so that the registry's ids cannot be the fixed 1 and 2 by chance.
    for i in 0..3 {
        let decoy = format!(r#"{{"type":"record","name":"Decoy{i}","fields":[{{"name":"x","type":"long"}}]}}"#);
        client.register(&format!("decoy{i}-value"), &decoy).await?;
    }

    let broker = EmbeddedBroker::start(1)?;
    let mut kafka = KafkaConfig::new(broker.bootstrap());
    let prefix = format!("sr{}.", &possync::events::new_id()[..8]);
    kafka.topics = Topics::new(&prefix);
    broker.create_topics(&kafka.topics, 2)?;
    let sim = possync::sim::start(possync::sim::SimConfig::for_tests()).await?;
    let dir = tempfile::tempdir()?;
    let base = dir.path().join("tables").to_string_lossy().into_owned();
    let common_args = [
        "--brokers",
        &kafka.brokers,
        "--topic-prefix",
        &prefix,
        "--schema-registry-url",
        &registry.url,
    ];

    // A registry event through the CLI: one contract of the simulator becomes active.
    let truth = sim.truth();
    let first = truth.positions.first().context("the simulator has no position")?;
    let con_id = first.contract.con_id.to_string();
    let out = Command::new(BIN)
        .args(["registry", "activate", "--strategy", "wheel", "--con-id", &con_id])
        .args(common_args)
        .env("POSSYNC_LOG", "warn")
        .output()?;
    ensure!(
        out.status.success(),
        "registry activate failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let ingest = Command::new(BIN)
        .args(["ingest", "--ib-host", "127.0.0.1", "--ib-port"])
        .arg(sim.addr().port().to_string())
        .args(common_args)
        .env("POSSYNC_LOG", "warn")
        .spawn()?;
    let mut ingest = Reap(ingest);
    let mat = Command::new(BIN)
        .args(["materialize", "--flush-latency", "300ms", "--table-uri", &base])
        .args(common_args)
        .env("POSSYNC_LOG", "warn")
        .spawn()?;
    let mut mat = Reap(mat);

    // Until positions_current shows every open position of the simulator.
    let want: std::collections::BTreeSet<(String, i64)> = truth
        .positions
        .iter()
        .map(|p| (p.account.clone(), i64::from(p.contract.con_id)))
        .collect();
    let b = base.clone();
    wait_for(
        "positions_current to hold the simulator's positions",
        Duration::from_secs(120),
        || {
            let (b, want) = (b.clone(), want.clone());
            async move {
                let have: std::collections::BTreeSet<(String, i64)> = materialize_support::actual_current(&b)
                    .await
                    .map(|m| m.into_keys().collect())
                    .unwrap_or_default();
                Ok(want.is_subset(&have))
            }
        },
    )
    .await?;
    // Let the active route's PnL ticks through too, then stop ingest first, materialize last.
    tokio::time::sleep(Duration::from_secs(2)).await;
    signal(&ingest.0, "INT")?;
    ensure!(
        wait_exit(&mut ingest.0, Duration::from_secs(60))?.success(),
        "ingest must exit 0"
    );

    // The ids this process would get are the registry's (registering again is idempotent).
    let args = SchemaRegistryArgs {
        schema_registry_url: Some(registry.url.clone()),
        schema_registry_timeout: Duration::from_secs(10),
        ..Default::default()
    };
    let ids = possync::schema_registry::apply(&args, &kafka.topics).await?;
    ensure!(schema::ids() == ids);
    ensure!(
        ids.position_event != SchemaIds::FIXED.position_event && ids.registry_event != SchemaIds::FIXED.registry_event,
        "the decoys should have moved the ids off the fixed ones: {ids:?}"
    );
    for (id, avsc) in [
        (ids.position_event, schema::POSITION_EVENT_AVSC),
        (ids.registry_event, schema::REGISTRY_EVENT_AVSC),
    ] {
        let held = client.schema(id).await?;
        ensure!(
            canonical(&held)? == canonical(avsc)?,
            "the registry holds another schema under id {id}: {held}"
        );
    }

    let topics = &kafka.topics;
    let mut produced = Vec::new();
    let messages = read_all(&kafka, &[&topics.active, &topics.queued, &topics.registry])?;
    let (mut positions, mut registrations) = (0, 0);
    for (topic, partition, offset, value) in messages {
        let (id, _) = possync::events::split_confluent(&value)?;
        let payload = if topic == topics.registry {
            ensure!(
                id == ids.registry_event,
                "{topic}/{partition}@{offset}: schema id {id}, want {ids:?}"
            );
            registrations += 1;
            Payload::Registry(RegistryEvent::decode(&value)?)
        } else {
            ensure!(
                id == ids.position_event,
                "{topic}/{partition}@{offset}: schema id {id}, want {ids:?}"
            );
            positions += 1;
            Payload::Position(PositionEvent::decode(&value)?)
        };
        produced.push(Produced {
            topic,
            partition,
            offset,
            payload,
        });
    }
    eprintln!("registry ids {ids:?}: {positions} position and {registrations} registry events framed with them");
    ensure!(
        registrations == 1 && positions >= want.len(),
        "{registrations} registry and {positions} position events"
    );

    // Everything on the topics is in the tables, exactly, and nothing was dead-lettered.
    let b = base.clone();
    let p = produced.clone();
    wait_for("the tables to hold every message", Duration::from_secs(60), || {
        let (b, p) = (b.clone(), p.clone());
        async move { Ok(check_exact(&b, &p).await.is_ok()) }
    })
    .await?;
    check_exact(&base, &produced).await?;
    let dead = dead_letter_rows(&base).await?;
    if !dead.is_empty() {
        bail!("dead letters: {dead:?}");
    }

    // A later release's producer: PositionEvent v2 (a field added with default null) registered
    // under the position subjects, values framed with its new id. The running materializer
    // fetches that writer schema from the registry and reads them whole, beside the v1 ones.
    let v2 = schema::POSITION_EVENT_AVSC.replacen(
        r#"{"name": "con_id", "type": "long", "doc": "IB contract id"},"#,
        r#"{"name": "con_id", "type": "long", "doc": "IB contract id"},
    {"name": "venue", "type": ["null", "string"], "default": null},"#,
        1,
    );
    ensure!(v2.contains("venue"), "the schema text changed: fix the test");
    let v2_id = client
        .register(&possync::schema_registry::value_subject(&topics.active), &v2)
        .await?;
    ensure!(
        client
            .register(&possync::schema_registry::value_subject(&topics.queued), &v2)
            .await?
            == v2_id,
        "v2 got two ids"
    );
    ensure!(v2_id != ids.position_event, "v2 must get its own id");
    let v2_schema = apache_avro::Schema::parse_str(&v2)?;
    let producer: rdkafka::producer::FutureProducer = kafka.producer().create()?;
    let mut later = Vec::new();
    for (k, p) in produced
        .iter()
        .filter_map(|p| match &p.payload {
            Payload::Position(e) => Some(e),
            _ => None,
        })
        .take(20)
        .enumerate()
    {
        let mut e = p.clone();
        e.event_id = possync::events::new_id();
        e.sequence += 1_000_000;
        e.ingest_time += 1;
        e.position += 1.0;
        let apache_avro::types::Value::Record(mut fields) = apache_avro::to_value(&e)? else {
            bail!("an event is a record");
        };
        let at = fields.iter().position(|(n, _)| n == "con_id").context("con_id")? + 1;
        let venue = apache_avro::types::Value::String(format!("X{k}"));
        fields.insert(
            at,
            ("venue".into(), apache_avro::types::Value::Union(1, Box::new(venue))),
        );
        let value = apache_avro::types::Value::Record(fields).resolve(&v2_schema)?;
        let mut framed = vec![0];
        framed.extend_from_slice(&v2_id.to_be_bytes());
        framed.extend(apache_avro::to_avro_datum(&v2_schema, value)?);
        let topic = if e.route == possync::events::Route::Active {
            &topics.active
        } else {
            &topics.queued
        };
        later.push(materialize_support::Outgoing {
            topic: topic.clone(),
            key: Some(e.key().into_bytes()),
            value: Some(framed),
            payload: Payload::Position(e),
        });
    }
    produced.extend(materialize_support::produce(&producer, later).await?);
    let b = base.clone();
    let p = produced.clone();
    wait_for("the tables to hold the v2 events", Duration::from_secs(60), || {
        let (b, p) = (b.clone(), p.clone());
        async move { Ok(check_exact(&b, &p).await.is_ok()) }
    })
    .await?;
    check_exact(&base, &produced).await?;
    ensure!(
        dead_letter_rows(&base).await?.is_empty(),
        "v2 events were dead-lettered"
    );

    signal(&mat.0, "INT")?;
    ensure!(
        wait_exit(&mut mat.0, Duration::from_secs(60))?.success(),
        "materialize must exit 0"
    );
    drop(sim);
    drop(broker);

    // A subject whose compatibility level refuses possync's schema: the process stops at start
    // with one line naming the subject and what to check.
    let http = reqwest::Client::new();
    let subject = "inc.positions.active-value";
    let retyped = schema::POSITION_EVENT_AVSC.replacen(
        r#""name": "con_id", "type": "long""#,
        r#""name": "con_id", "type": "string""#,
        1,
    );
    ensure!(
        retyped != schema::POSITION_EVENT_AVSC,
        "the schema's con_id field is spelt otherwise"
    );
    client.register(subject, &retyped).await?;
    let config = http
        .put(format!("{}/config/{subject}", registry.url))
        .header("Content-Type", "application/vnd.schemaregistry.v1+json")
        .body(r#"{"compatibility":"BACKWARD"}"#)
        .send()
        .await?;
    ensure!(
        config.status().is_success(),
        "setting the subject's compatibility: {}",
        config.status()
    );
    let out = Command::new(BIN)
        .args(["registry", "list", "--brokers", "127.0.0.1:1", "--topic-prefix", "inc."])
        .args(["--schema-registry-url", &registry.url])
        .env("POSSYNC_LOG", "warn")
        .output()?;
    ensure!(!out.status.success(), "an incompatible subject was accepted");
    let err = String::from_utf8_lossy(&out.stderr);
    let line = err.lines().find(|l| l.contains("incompatible")).unwrap_or_default();
    ensure!(
        line.contains(subject) && line.contains("compatibility level") && line.contains("--topic-prefix"),
        "stderr: {err}"
    );
    Ok(())
}

/// Without the flag nothing changes, and an unreachable registry stops a subcommand with one
/// line naming the flag.
#[test]
fn unreachable_registry_is_one_line_naming_the_flag() -> anyhow::Result<()> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let out = Command::new(BIN)
        .args(["registry", "list", "--brokers", "127.0.0.1:1", "--schema-registry-url"])
        .arg(format!("http://127.0.0.1:{port}"))
        .env("POSSYNC_LOG", "warn")
        .output()?;
    ensure!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        err.contains("is unreachable") && err.contains("--schema-registry-url"),
        "stderr: {err}"
    );
    Ok(())
}
