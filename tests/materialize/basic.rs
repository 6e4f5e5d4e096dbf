//! Materialize end to end against the embedded broker: exactness, poison messages, graceful
//! shutdown, replay from offset 0, and the tables opened by DuckDB and Python `deltalake`.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::materialize_support::*;
use anyhow::ensure;
use possync::materialize::{self, TableKind};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::TopicPartitionList;
use tokio_util::sync::CancellationToken;

async fn versions(base: &str) -> anyhow::Result<BTreeMap<&'static str, Option<u64>>> {
    let mut out = BTreeMap::new();
    for kind in TableKind::ALL {
        let url = materialize::tables::table_url(base, kind)?;
        let t = deltalake::open_table(url).await?;
        out.insert(kind.name(), t.version());
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exact_with_poison_shutdown_replay_and_readers() -> anyhow::Result<()> {
    let env = Env::start(3)?;
    let producer = env.producer()?;
    let mut gen = Gen::new(7, &env.kafka.topics, 80);

    // A backlog with registry events and poison spread through it.
    let mut out = Vec::new();
    for i in 0..3000 {
        out.push(gen.position());
        if i % 60 == 0 {
            out.push(gen.registry());
        }
        if i % 400 == 7 {
            out.push(gen.poison(i / 400));
        }
    }
    let mut produced = produce(&producer, out).await?;

    let shutdown = CancellationToken::new();
    let task = tokio::spawn(materialize::run(env.config("g1"), env.kafka.clone(), shutdown.clone()));
    let ns = env.namespace().await?;
    materialize::wait_caught_up(&env.base, &ns, &env.kafka, Duration::from_secs(60)).await?;
    check_exact(&env.base, &produced).await?;

    // The stream goes on after poison.
    let mut out: Vec<_> = (0..500).map(|_| gen.position()).collect();
    out.push(gen.poison(0));
    out.push(gen.registry());
    produced.extend(produce(&producer, out).await?);
    materialize::wait_caught_up(&env.base, &ns, &env.kafka, Duration::from_secs(60)).await?;
    check_exact(&env.base, &produced).await?;
    shutdown.cancel();
    task.await??;

    // What is buffered at shutdown is committed: a long flush latency, then cancel as soon
    // as the materializer has consumed the tail.
    let slow = materialize::MaterializeConfig {
        flush_latency: Duration::from_secs(600),
        ..env.config("g1")
    };
    let (tx, mut rx) = tokio::sync::watch::channel(materialize::Progress::default());
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(materialize::run_with_progress(
        slow,
        env.kafka.clone(),
        shutdown.clone(),
        tx,
    ));
    let tail: Vec<_> = (0..50).map(|_| gen.position()).collect();
    produced.extend(produce(&producer, tail).await?);
    tokio::time::timeout(Duration::from_secs(60), rx.wait_for(|p| p.consumed >= 50)).await??;
    ensure!(
        rx.borrow().flushes == 0 && rx.borrow().buffered == 50,
        "tail already flushed: {:?}",
        *rx.borrow()
    );
    shutdown.cancel();
    task.await??;
    check_exact(&env.base, &produced).await?;

    // Dead letters also went to the dead-letter topic, with their reason and their source
    // coordinates in the headers: the topic holds exactly the poison's coordinates.
    let mut poison: Vec<(String, i32, i64)> = produced
        .iter()
        .filter(|p| matches!(p.payload, Payload::Poison))
        .map(|p| (p.topic.clone(), p.partition, p.offset))
        .collect();
    poison.sort();
    let dlq: BaseConsumer = env.kafka.consumer("dlq-reader").create()?;
    dlq.subscribe(&[&env.kafka.topics.deadletter])?;
    let mut seen = std::collections::BTreeSet::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while seen.len() < poison.len() && std::time::Instant::now() < deadline {
        if let Some(m) = dlq.poll(Duration::from_millis(200)) {
            let m = m?;
            let headers = m.headers().expect("dead letters carry headers");
            let header = |k: &str| {
                headers
                    .iter()
                    .find(|h| h.key == k)
                    .and_then(|h| h.value)
                    .map(|v| String::from_utf8_lossy(v).into_owned())
            };
            ensure!(header("possync.error").is_some(), "no possync.error header");
            let coordinates = (
                header("possync.topic").unwrap_or_default(),
                header("possync.partition").unwrap_or_default().parse::<i32>()?,
                header("possync.offset").unwrap_or_default().parse::<i64>()?,
            );
            seen.insert(coordinates);
        }
    }
    let seen: Vec<_> = seen.into_iter().collect();
    ensure!(
        seen == poison,
        "dead-letter topic holds {seen:?}, want the poison's coordinates {poison:?}"
    );

    // Replay from offset 0 with a new group: nothing changes.
    let before = versions(&env.base).await?;
    let replay_cfg = materialize::MaterializeConfig {
        replay_from_beginning: true,
        ..env.config("g2")
    };
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(materialize::run(replay_cfg, env.kafka.clone(), shutdown.clone()));
    let probe: BaseConsumer = env.kafka.consumer("g2").create()?;
    let parts: Vec<(String, i32)> = [
        &env.kafka.topics.active,
        &env.kafka.topics.queued,
        &env.kafka.topics.registry,
    ]
    .iter()
    .flat_map(|t| (0..3).map(|p| (t.to_string(), p)))
    .collect();
    wait_for(
        "the replay to read every partition to its end",
        Duration::from_secs(60),
        || {
            let mut tpl = TopicPartitionList::new();
            for (t, p) in &parts {
                tpl.add_partition(t, *p);
            }
            let committed = probe.committed_offsets(tpl, Duration::from_secs(5));
            let ok = committed.map(|c| {
                parts.iter().all(|(t, p)| {
                    let (_, high) = probe
                        .fetch_watermarks(t, *p, Duration::from_secs(5))
                        .unwrap_or((0, i64::MAX));
                    let off = c.find_partition(t, *p).map(|e| e.offset());
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
        versions(&env.base).await? == before,
        "replay changed a table: {before:?} → {:?}",
        versions(&env.base).await?
    );
    check_exact(&env.base, &produced).await?;

    // Every table opens in DuckDB's delta extension and in Python deltalake.
    let json = python_readers(&env.base)?;
    let events = produced
        .iter()
        .filter(|p| matches!(p.payload, Payload::Position(_)))
        .count() as u64;
    let current = expected_current(&produced);
    let open = current.values().filter(|(_, pos)| *pos != 0.0).count() as u64;
    let expect = [
        ("position_events", events),
        ("positions_current", current.len() as u64),
        ("position_queue", expected_queue(&produced).len() as u64),
        ("strategy_registry", expected_registry(&produced).len() as u64),
        (
            "dead_letters",
            produced.iter().filter(|p| matches!(p.payload, Payload::Poison)).count() as u64,
        ),
        ("registry_events", expected_registry_event_rows(&produced).len() as u64),
    ];
    for (table, rows) in expect {
        let t = &json[table];
        ensure!(
            t["duckdb_rows"] == rows && t["deltalake_rows"] == rows,
            "{table}: {t} (want {rows} rows)"
        );
        // The upsert tables carry deletion vectors (reader 3 / writer 7); the readers above
        // applied them, or the row counts would include superseded rows.
        let protocol = match table {
            "positions_current" | "position_queue" => (3, 7),
            _ => (1, 2),
        };
        ensure!(
            t["min_reader_version"] == protocol.0 && t["min_writer_version"] == protocol.1,
            "{table} protocol: {t}"
        );
        for ty in t["timestamp_types"].as_array().expect("list") {
            ensure!(
                ty.as_str().is_some_and(|s| s.contains("UTC")),
                "{table}: timestamp without UTC: {ty}"
            );
        }
    }
    ensure!(
        json["position_events"]["duckdb_distinct_coordinates"] == events,
        "duplicate coordinates: {json}"
    );
    let registry_events = expected_registry_event_rows(&produced).len() as u64;
    ensure!(registry_events > 10, "too few registry events to prove anything");
    ensure!(
        json["registry_events"]["duckdb_distinct_coordinates"] == registry_events,
        "registry_events: duplicate coordinates: {json}"
    );
    ensure!(
        json["registry_events"]["duckdb_actions"] == serde_json::json!(["ACTIVATE", "DEACTIVATE"]),
        "registry_events actions: {json}"
    );
    ensure!(
        json["position_events"]["partition_columns"][0] == "event_date",
        "not partitioned by event_date"
    );
    ensure!(
        json["position_events"]["duckdb_event_dates"].as_u64() > Some(1),
        "one event date only"
    );
    ensure!(
        json["positions_current"]["duckdb_open_positions"] == open,
        "open positions: {json}"
    );
    Ok(())
}

/// `possync registry history` (the binary) shows every activation and deactivation of an
/// entry, oldest first, although the registry's last word is all `strategy_registry` (and, after
/// compaction, the registry topic) keeps.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_history_keeps_what_compaction_forgets() -> anyhow::Result<()> {
    use possync::events::{new_id, RegistryAction, RegistryEvent};

    let env = Env::start(2)?;
    // Explicit, distinct times: "oldest first" must not depend on the clock.
    let t0 = 1_760_000_000_000_000_i64;
    let ev = |strategy: &str, account: Option<&str>, con_id, action, priority, dt: i64, actor: &str| RegistryEvent {
        event_id: new_id(),
        strategy: strategy.into(),
        account: account.map(str::to_string),
        con_id,
        action,
        priority,
        time: t0 + dt,
        actor: actor.into(),
    };
    let events = vec![
        ev("wheel", Some("DU1"), 1001, RegistryAction::Activate, 3, 0, "alice@desk"),
        ev("hedge", None, 1002, RegistryAction::Activate, 1, 500, "bootstrap"),
        ev(
            "wheel",
            Some("DU1"),
            1001,
            RegistryAction::Activate,
            7,
            1_000,
            "bob@desk",
        ),
        ev(
            "wheel",
            Some("DU1"),
            1001,
            RegistryAction::Deactivate,
            0,
            2_000,
            "carol@desk",
        ),
    ];
    // One at a time: the entry's three events land in order on its partition.
    for e in &events {
        possync::registry::commands::publish(&env.kafka, std::slice::from_ref(e)).await?;
    }

    let shutdown = CancellationToken::new();
    let task = tokio::spawn(materialize::run(
        env.config("hist"),
        env.kafka.clone(),
        shutdown.clone(),
    ));
    let ns = env.namespace().await?;
    materialize::wait_caught_up(&env.base, &ns, &env.kafka, Duration::from_secs(60)).await?;
    shutdown.cancel();
    task.await??;

    // The upsert table holds the last word only.
    let registry = actual_registry(&env.base).await?;
    let key = ("wheel".to_string(), Some("DU1".to_string()), 1001);
    ensure!(registry.len() == 2, "strategy_registry: {registry:?}");
    ensure!(!registry[&key].0, "wheel/DU1/1001 should be inactive: {registry:?}");

    let history = |args: &[&str]| -> anyhow::Result<std::process::Output> {
        Ok(std::process::Command::new(env!("CARGO_BIN_EXE_possync"))
            .args(["registry", "history"])
            .args(args)
            .env_remove("POSSYNC_TABLE_URI")
            .output()?)
    };
    let out = history(&[
        "--strategy",
        "wheel",
        "--con-id",
        "1001",
        "--json",
        "--table-uri",
        &env.base,
    ])?;
    ensure!(
        out.status.success(),
        "history failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<serde_json::Value> = String::from_utf8(out.stdout)?
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    let seen: Vec<(String, String, i64)> = lines
        .iter()
        .map(|l| {
            (
                l["actor"].as_str().unwrap_or_default().to_string(),
                l["action"].as_str().unwrap_or_default().to_string(),
                l["priority"].as_i64().unwrap_or(-1),
            )
        })
        .collect();
    let want: Vec<(String, String, i64)> = [
        ("alice@desk", "ACTIVATE", 3),
        ("bob@desk", "ACTIVATE", 7),
        ("carol@desk", "DEACTIVATE", 0),
    ]
    .iter()
    .map(|(a, b, p)| (a.to_string(), b.to_string(), *p))
    .collect();
    ensure!(seen == want, "history of wheel/DU1/1001: {seen:?}, want {want:?}");
    ensure!(
        lines.iter().all(|l| l["account"] == "DU1" && l["con_id"] == 1001),
        "{lines:?}"
    );
    ensure!(
        lines[0]["time"] == "2025-10-09T08:53:20.000000Z",
        "time is not RFC 3339 UTC: {}",
        lines[0]["time"]
    );
    let ids: Vec<&str> = lines
        .iter()
        .map(|l| l["event_id"].as_str().unwrap_or_default())
        .collect();
    let want_ids: Vec<&str> = [0, 2, 3].iter().map(|i| events[*i].event_id.as_str()).collect();
    ensure!(ids == want_ids, "event ids {ids:?}, want {want_ids:?}");

    // Unfiltered, as a table: all four events; `--account '*'` selects the every-account entry.
    let out = history(&["--table-uri", &env.base])?;
    ensure!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout)?;
    ensure!(text.contains("4 events") && text.contains("bootstrap"), "{text}");
    let out = history(&["--account", "*", "--json", "--table-uri", &env.base])?;
    let text = String::from_utf8(out.stdout)?;
    ensure!(
        text.lines().count() == 1 && text.contains("\"hedge\""),
        "--account '*': {text}"
    );

    // A base without the table is an error, and is not created.
    let nowhere = env.dir.path().join("nowhere");
    let out = history(&["--table-uri", nowhere.to_str().expect("utf-8 path")])?;
    ensure!(!out.status.success(), "history of a missing table succeeded");
    ensure!(
        String::from_utf8_lossy(&out.stderr).contains("no registry_events table"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(!nowhere.exists(), "history created {nowhere:?}");
    Ok(())
}

/// Issue 9 #2: closed positions past `--closed-retention` leave `positions_current` and
/// `position_queue` through a Delta delete (deletion vectors); the audit log keeps every
/// event; DuckDB and Python `deltalake` read the result.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_positions_past_retention_leave_the_upsert_tables() -> anyhow::Result<()> {
    let env = Env::start(2)?;
    let producer = env.producer()?;
    // Event times are 2026-01-01 and later: months older than a day of retention.
    let mut gen = Gen::new(11, &env.kafka.topics, 60);
    let produced = produce(&producer, (0..1500).map(|_| gen.position()).collect()).await?;
    let current = expected_current(&produced);
    let open: BTreeMap<_, _> = current.iter().filter(|(_, (_, pos))| *pos != 0.0).collect();
    let queue = expected_queue(&produced);
    let kept_queue: BTreeMap<_, _> = queue.iter().filter(|(_, v)| v.0 != "closed").collect();
    ensure!(
        open.len() < current.len() && kept_queue.len() < queue.len() && !open.is_empty(),
        "the data has closed and open rows: {} of {} open, {} of {} queue rows kept",
        open.len(),
        current.len(),
        kept_queue.len(),
        queue.len()
    );

    let cfg = materialize::MaterializeConfig {
        closed_retention: Some(Duration::from_secs(86_400)),
        ..env.config("retention")
    };
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(materialize::run(cfg, env.kafka.clone(), shutdown.clone()));
    wait_for(
        "closed rows to leave positions_current",
        Duration::from_secs(90),
        || async {
            let have = actual_current(&env.base).await?;
            Ok(have.len() == open.len() && have.iter().all(|(k, v)| open.get(k) == Some(&v)))
        },
    )
    .await?;
    wait_for(
        "closed rows to leave position_queue",
        Duration::from_secs(90),
        || async {
            let have = actual_queue(&env.base).await?;
            Ok(have.len() == kept_queue.len() && have.iter().all(|(k, v)| kept_queue.get(k) == Some(&v)))
        },
    )
    .await?;
    shutdown.cancel();
    task.await??;

    // The audit log keeps everything, exactly once.
    ensure!(
        event_rows(&env.base).await? == expected_event_rows(&produced),
        "position_events changed"
    );
    let json = python_readers(&env.base)?;
    for (table, rows) in [("positions_current", open.len()), ("position_queue", kept_queue.len())] {
        let t = &json[table];
        ensure!(
            t["duckdb_rows"] == rows && t["deltalake_rows"] == rows,
            "{table}: {t} (want {rows} rows)"
        );
    }
    ensure!(
        json["positions_current"]["duckdb_open_positions"] == open.len(),
        "{}",
        json["positions_current"]
    );
    Ok(())
}
