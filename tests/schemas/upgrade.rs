//! Upgrades from earlier releases, on their fixtures (`tests/fixtures/releases/<commit>/`):
//! the release's tables and a dump of its topics, continued by this build; `possync migrate`
//! on them, cut after every step; and the dump/load tool the fixtures are made with.

use crate::common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::common::topic_dump;
use crate::materialize_support::{check_exact, produce, Gen, Payload, Produced};
use anyhow::{ensure, Context};
use possync::events::{PositionEvent, RegistryEvent};
use possync::kafka::{EmbeddedBroker, KafkaConfig, Topics};
use possync::materialize::layout;
use possync::materialize::tables::{Table, TXN_RETENTION_PROPERTY};
use possync::materialize::{self, MaterializeConfig, TableKind};
use possync::ops::book::{self, At, BookConfig};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use tokio_util::sync::CancellationToken;

/// Dumps topics for a fixture (`tests/fixtures/releases/make-fixture.sh`):
/// `POSSYNC_DUMP_BOOTSTRAP`, `POSSYNC_DUMP_TOPICS` (comma list), `POSSYNC_DUMP_OUT` (file).
#[tokio::test]
#[ignore = "a tool: dumps the topics named by POSSYNC_DUMP_*"]
async fn dump_topics() -> anyhow::Result<()> {
    let var = |k: &str| std::env::var(k).with_context(|| format!("{k} is not set"));
    let bootstrap = var("POSSYNC_DUMP_BOOTSTRAP")?;
    let topics: Vec<String> = var("POSSYNC_DUMP_TOPICS")?
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(String::from)
        .collect();
    let out = PathBuf::from(var("POSSYNC_DUMP_OUT")?);
    let n = topic_dump::dump(&bootstrap, &topics, &out).await?;
    eprintln!("dumped {n} records of {} topics to {}", topics.len(), out.display());
    Ok(())
}

/// A dump loaded into a fresh broker dumps to the same bytes: partitions, offsets, keys, values
/// (null and empty ones included), headers and timestamps are reproduced; a second load into
/// the now non-empty topics fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dump_then_load_reproduces_offsets() -> anyhow::Result<()> {
    let topics = ["t.positions", "t.registry", "t.empty"].map(String::from);
    let partitions = [2, 2, 1];
    let source = EmbeddedBroker::start(1)?;
    for (t, n) in topics.iter().zip(partitions) {
        source.create_topic(t, n)?;
    }
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", source.bootstrap())
        .set("enable.idempotence", "true")
        .create()?;
    let t0 = 1_700_000_000_000i64;
    for i in 0..40i64 {
        let topic = &topics[(i % 2) as usize];
        let key = format!("DU{}:{}", i % 3, i);
        // Empty for i = 6, 12, …; null (no payload) for i = 0, 7, 14, ….
        let value: Vec<u8> = (0..(i % 6) as u8 * 3).map(|b| b.wrapping_mul(37) ^ i as u8).collect();
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: "n",
                value: Some(&i.to_be_bytes()),
            })
            .insert(Header {
                key: "null",
                value: None::<&[u8]>,
            });
        let mut rec: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic)
            .partition((i / 2 % 2) as i32)
            .timestamp(t0 + i * 1_234)
            .headers(headers);
        if i % 5 != 0 {
            rec = rec.key(key.as_bytes());
        }
        if i % 7 != 0 {
            rec = rec.payload(value.as_slice());
        }
        producer
            .send(rec, std::time::Duration::from_secs(10))
            .await
            .map_err(|(e, _)| e)?;
    }
    let dir = tempfile::tempdir()?;
    let (first, second) = (dir.path().join("first.jsonl"), dir.path().join("second.jsonl"));
    ensure!(topic_dump::dump(source.bootstrap(), &topics, &first).await? == 40);

    let target = EmbeddedBroker::start(1)?;
    // The embedded broker has no CreateTopics API: its topics are made here.
    for (t, n) in topics.iter().zip(partitions) {
        target.create_topic(t, n)?;
    }
    ensure!(topic_dump::load(target.bootstrap(), &first, str::to_string).await? == 40);
    ensure!(topic_dump::dump(target.bootstrap(), &topics, &second).await? == 40);
    let (a, b) = (std::fs::read(&first)?, std::fs::read(&second)?);
    ensure!(
        a == b,
        "the dumps differ:\n{}\n---\n{}",
        String::from_utf8_lossy(&a),
        String::from_utf8_lossy(&b)
    );
    let text = String::from_utf8(a)?;
    ensure!(text.contains(r#""value":"""#), "no empty value in the dump");
    ensure!(text.contains(r#""value":null"#) && text.contains(r#""key":null"#));
    ensure!(text.contains(r#"{"topic":"t.empty","partitions":1}"#));

    let again = topic_dump::load(target.bootstrap(), &first, str::to_string).await;
    ensure!(again.is_err(), "a load into non-empty topics succeeded");
    Ok(())
}

/// The fixture of release cc788eb.
fn fixture() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/releases/cc788eb"))
}

/// The fixture's manifest.
fn manifest() -> anyhow::Result<serde_json::Value> {
    Ok(serde_json::from_slice(&std::fs::read(
        fixture().join("manifest.json"),
    )?)?)
}

/// Copies the fixture's tables to `to` (tests never write the checked-in copy).
fn copy_tables(to: &Path) -> anyhow::Result<()> {
    Ok(common::fs::copy_dir(&fixture().join("tables"), to)?)
}

/// The fixture's stored offsets carry the `lastUpdated` of the day it was made, and the tables
/// let txn actions expire after 30 days (`delta.setTransactionRetentionDuration`). A live
/// release re-stamps them hourly, so at an upgrade they are always fresh; the frozen fixture
/// gets that freshness by a long retention instead (one metadata commit per table), or it would
/// stop meaning anything a month after it was made.
async fn outlive_txn_retention(base: &str) -> anyhow::Result<()> {
    for kind in release_kinds() {
        let mut t = Table::open_unchecked(base, kind).await?;
        t.set_property(TXN_RETENTION_PROPERTY, "interval 36500 days").await?;
    }
    Ok(())
}

/// The tables the release wrote (later builds added others, e.g. `executions`).
fn release_kinds() -> Vec<TableKind> {
    let tables = fixture().join("tables");
    TableKind::ALL
        .into_iter()
        .filter(|k| tables.join(k.name()).join("_delta_log").is_dir())
        .collect()
}

/// Each existing table's Delta version (its newest commit file), by name.
fn versions(base: &Path) -> anyhow::Result<BTreeMap<String, i64>> {
    let mut out = BTreeMap::new();
    for kind in TableKind::ALL {
        let log = base.join(kind.name()).join("_delta_log");
        if !log.is_dir() {
            continue;
        }
        let newest = std::fs::read_dir(&log)
            .with_context(|| format!("{}", log.display()))?
            .filter_map(|e| e.ok()?.file_name().to_str()?.strip_suffix(".json")?.parse::<i64>().ok())
            .max()
            .with_context(|| format!("no commit in {}", log.display()))?;
        out.insert(kind.name().to_string(), newest);
    }
    Ok(out)
}

/// The fixture's topic messages as the materialize tests' `Produced` (decoded with this build:
/// events of release cc788eb must read as events), lease and other topics left out.
fn dumped(records: &[topic_dump::Record], topics: &Topics) -> anyhow::Result<Vec<Produced>> {
    let mut out = Vec::new();
    for r in records {
        let value = r.value.as_deref().map(topic_dump::unhex).transpose()?;
        let payload = if r.topic == topics.active || r.topic == topics.queued {
            match value.as_deref().map(PositionEvent::decode) {
                Some(Ok(e)) => Payload::Position(e),
                _ => Payload::Poison,
            }
        } else if r.topic == topics.registry {
            match value.as_deref().map(RegistryEvent::decode) {
                Some(Ok(e)) => Payload::Registry(e),
                _ => Payload::Poison,
            }
        } else {
            continue;
        };
        out.push(Produced {
            topic: r.topic.clone(),
            partition: r.partition,
            offset: r.offset,
            payload,
        });
    }
    Ok(out)
}

fn book_as_of(base: &str, micros: i64) -> BookConfig {
    BookConfig {
        table_uri: base.to_string(),
        account: None,
        at: At::AsOf(micros),
        include_closed: false,
    }
}

/// Release cc788eb's tables and topics, continued by this build: the tables take the in-place
/// layout step at start-up, the events the old release left unmaterialized and new ones made
/// by this build land exactly once beside the old rows, every upsert table equals a replay of
/// the whole history, `book --as-of` a time before the upgrade answers as it did on the old
/// tables, and DuckDB, Python deltalake and Spark read the result.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cc788eb_tables_and_topics_are_continued_exactly() -> anyhow::Result<()> {
    let m = manifest()?;
    let prefix = m["topic_prefix"].as_str().context("manifest: topic_prefix")?;
    let namespace = m["offsets_namespace"].as_str().context("manifest: offsets_namespace")?;
    let before_upgrade = m["times"]["book_as_of_us"]
        .as_i64()
        .context("manifest: times.book_as_of_us")?;
    let release_book = m["times"]["book_as_of_by_release"]["open"]
        .as_u64()
        .context("manifest: the release's book")?;
    let dir = tempfile::tempdir()?;
    let base_path = dir.path().join("tables");
    copy_tables(&base_path)?;
    let base = base_path.to_string_lossy().into_owned();
    outlive_txn_retention(&base).await?;
    let old_versions = versions(&base_path)?;
    ensure!(
        !release_kinds().contains(&TableKind::Executions),
        "the fixture has an executions table: this test no longer proves it is created on upgrade"
    );
    for kind in release_kinds() {
        let t = Table::open(&base, kind).await?;
        ensure!(
            layout::recorded(&t)? == 1,
            "{}: the old release records no layout",
            kind.name()
        );
    }
    let old_book = book::load(&book_as_of(&base, before_upgrade)).await?;
    ensure!(
        old_book.rows.len() as u64 == release_book,
        "book --as-of on the old tables: {} open positions, the release itself printed {release_book}",
        old_book.rows.len()
    );

    // The old release's topics, offsets and all, on a fresh broker.
    let broker = EmbeddedBroker::start(1)?;
    let mut kafka = KafkaConfig::new(broker.bootstrap());
    kafka.topics = Topics::new(prefix);
    let dump = fixture().join("topics.jsonl");
    let (partitions, records) = topic_dump::read(&dump, str::to_string)?;
    for (t, n) in &partitions {
        broker.create_topic(t, *n)?;
    }
    // The upgrade's `possync topics create` adds the topic the release did not have.
    if !partitions.iter().any(|(t, _)| *t == kafka.topics.executions) {
        broker.create_topic(&kafka.topics.executions, 2)?;
    }
    topic_dump::load(broker.bootstrap(), &dump, str::to_string).await?;
    let mut produced = dumped(&records, &kafka.topics)?;
    let unmaterialized = m["not_materialized_total"]
        .as_u64()
        .context("manifest: not_materialized_total")?;

    // This build's events on top: new keys, registry changes, poison.
    let producer: FutureProducer = kafka.producer().create()?;
    let mut gen = Gen::new(22, &kafka.topics, 40);
    let mut out: Vec<_> = (0..150).map(|_| gen.position()).collect();
    // After the upgrade in time too: every new event is newer than the release's last one.
    let last_old = m["times"]["max_ingest_time_position_events_us"]
        .as_i64()
        .context("manifest: times.max_ingest_time_position_events_us")?;
    let first_new = out
        .iter()
        .filter_map(|o| match &o.payload {
            Payload::Position(e) => Some(e.ingest_time),
            _ => None,
        })
        .min()
        .context("no position event generated")?;
    for o in &mut out {
        if let Payload::Position(e) = &mut o.payload {
            e.ingest_time += last_old + 1_000_000 - first_new;
            e.ib_time = e.ingest_time;
            o.value = Some(e.encode()?);
        }
    }
    out.push(gen.registry());
    out.push(gen.poison(0));
    // Executions, which the release had no table for (the upgrade creates it).
    out.extend((0..40).map(|_| gen.execution()));
    out.push(gen.execution_poison(0));
    produced.extend(produce(&producer, out).await?);

    let cfg = MaterializeConfig {
        table_uri: base.clone(),
        group: "upgrade".into(),
        flush_latency: Duration::from_millis(300),
        offsets_namespace: Some(namespace.to_string()),
        state_dir: dir.path().join("state"),
        ..MaterializeConfig::default()
    };
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(materialize::run(cfg, kafka.clone(), shutdown.clone()));
    materialize::wait_caught_up(&base, namespace, &kafka, Duration::from_secs(120)).await?;
    shutdown.cancel();
    task.await??;

    // Old rows and new ones exactly once by coordinates; every upsert table equals a replay.
    check_exact(&base, &produced).await?;
    let new_versions = versions(&base_path)?;
    for kind in TableKind::ALL {
        let t = Table::open(&base, kind).await?;
        ensure!(
            layout::recorded(&t)? == layout::CURRENT,
            "{}: not upgraded",
            kind.name()
        );
        let Some(old) = old_versions.get(kind.name()).copied() else {
            // A table the release did not have: materialize created it.
            ensure!(
                new_versions.contains_key(kind.name()),
                "{}: not created on upgrade",
                kind.name()
            );
            continue;
        };
        let new = new_versions[kind.name()];
        ensure!(
            new > old,
            "{}: no commit after the upgrade ({old} -> {new})",
            kind.name()
        );
    }
    let new_book = book::load(&book_as_of(&base, before_upgrade)).await?;
    if new_book != old_book {
        let changed: Vec<_> = new_book
            .rows
            .iter()
            .filter(|r| !old_book.rows.contains(r))
            .take(3)
            .collect();
        anyhow::bail!(
            "book --as-of before the upgrade changed: {} rows, {} before; e.g. {changed:?}",
            new_book.rows.len(),
            old_book.rows.len()
        );
    }
    eprintln!(
        "upgrade: {} messages in the old topics ({unmaterialized} not yet in the old tables), {} in all; versions {old_versions:?} -> {new_versions:?}",
        records.len(),
        produced.len()
    );

    // DuckDB and Spark read the evolved tables alike.
    let out = Command::new("python3")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/py/spark_read.py"))
        .arg(&base)
        .output()
        .context("run python3 tests/py/spark_read.py")?;
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    ensure!(out.status.success(), "spark_read.py failed: {stderr}");
    let last = stdout.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or_default();
    let got: serde_json::Value = serde_json::from_str(last)?;
    for name in [
        "position_events",
        "positions_current",
        "position_queue",
        "strategy_registry",
        "dead_letters",
        "executions",
    ] {
        let t = &got["tables"][name];
        let rows = t["spark_rows"]
            .as_u64()
            .with_context(|| format!("{name}: not read by Spark: {got}"))?;
        ensure!(
            Some(rows) == t["duckdb_rows"].as_u64(),
            "{name}: Spark and DuckDB row counts differ: {t}"
        );
        ensure!(rows > 0, "{name}: empty");
        ensure!(
            t["same_column_order"] == true,
            "{name}: columns differ: {}",
            t["columns"]
        );
    }
    Ok(())
}

/// `possync migrate` on release cc788eb's tables: the dry run lists one step per table and
/// changes nothing; a run stopped abruptly after any number of steps is finished by the next
/// run, with one commit per table in all; a last run has nothing to do.
#[test]
fn migrate_cc788eb_tables_dry_run_and_interrupted_at_every_step() -> anyhow::Result<()> {
    let migrate = |base: &Path, args: &[&str]| -> anyhow::Result<std::process::Output> {
        Ok(Command::new(env!("CARGO_BIN_EXE_possync"))
            .arg("migrate")
            .arg("--table-uri")
            .arg(base)
            .args(args)
            .output()?)
    };
    let text = |o: &std::process::Output| {
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    };
    let dir = tempfile::tempdir()?;
    let fresh = |n: usize| -> anyhow::Result<PathBuf> {
        let base = dir.path().join(format!("tables-{n}"));
        copy_tables(&base)?;
        Ok(base)
    };
    let base = fresh(0)?;
    let old = versions(&base)?;
    let dry = migrate(&base, &[])?;
    ensure!(dry.status.success(), "dry run failed: {}", text(&dry));
    let out = text(&dry);
    let steps = release_kinds().len();
    ensure!(out.contains(&format!("dry run: {steps} step(s) to apply")), "{out}");
    for kind in TableKind::ALL {
        let want = if release_kinds().contains(&kind) {
            format!("{}: layout 1 -> {}", kind.name(), layout::CURRENT)
        } else {
            format!("{}: absent (materialize creates it", kind.name())
        };
        ensure!(out.contains(&want), "{out}");
    }
    ensure!(versions(&base)? == old, "the dry run changed a table");

    for stop_after in 0..=steps {
        let base = fresh(stop_after + 1)?;
        if stop_after > 0 {
            let cut = migrate(&base, &["--apply", "--fail-after-steps", &stop_after.to_string()])?;
            ensure!(
                cut.status.code() == Some(86),
                "run cut after {stop_after}: {}",
                text(&cut)
            );
            let done: usize = versions(&base)?.iter().map(|(t, v)| (v - old[t]) as usize).sum();
            ensure!(
                done == stop_after,
                "cut after {stop_after} step(s), {done} commit(s) made"
            );
        }
        let finish = migrate(&base, &["--apply"])?;
        ensure!(
            finish.status.success(),
            "finishing after {stop_after}: {}",
            text(&finish)
        );
        ensure!(
            text(&finish).contains(&format!("every table is at layout {}", layout::CURRENT)),
            "{}",
            text(&finish)
        );
        let now = versions(&base)?;
        for (t, v) in &now {
            ensure!(
                *v == old[t] + 1,
                "{t}: {} commit(s) in all after a cut at {stop_after}",
                v - old[t]
            );
        }
        let again = migrate(&base, &[])?;
        ensure!(text(&again).contains("nothing to do"), "{}", text(&again));
        ensure!(versions(&base)? == now);
    }
    Ok(())
}
