//! Start-up from the Delta snapshot (`--table-uri`): ingest's last published state and the
//! queue worker's queue read from `positions_current` / `position_queue` plus the topics' tail
//! after the offsets the tables hold.
//!
//! 1. On the embedded broker: the state from the snapshot equals a full replay of the topics,
//!    for ingest (book, active routes) and for the queue worker (items, statuses, figures).
//! 2. On a real Kafka cluster (`scripts/kafka.sh`): with every record of the position topics
//!    deleted (as retention would), a position that closed while ingest was down still gets its
//!    RECONCILE close, a close that was lost with the deleted records is republished, the lost
//!    offsets are reported, and nothing unchanged is published again.

#[allow(dead_code)]
use crate::common;
use crate::ingest_support;

use std::collections::BTreeMap;
use std::time::Duration;

use crate::ingest_support::*;
use anyhow::{ensure, Context};
use possync::events::{Route, Source};
use possync::ingest::resume;
use possync::ingest::IngestConfig;
use possync::kafka::KafkaConfig;
use possync::materialize::{self, MaterializeConfig};
use possync::queue_worker::{self, QueueWorkerConfig};
use possync::sim::SimHandle;
use possync::snapshot::SnapshotConfig;
use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;

const T: Duration = Duration::from_secs(30);

/// Runs the materializer until it holds every offset produced so far, then stops it.
async fn materialize_all(kafka: &KafkaConfig, table_uri: &str) -> anyhow::Result<()> {
    let stop = CancellationToken::new();
    let cfg = MaterializeConfig {
        table_uri: table_uri.to_string(),
        group: format!("{}snapshot-test", kafka.topics.prefix()),
        flush_latency: Duration::from_millis(200),
        ..MaterializeConfig::default()
    };
    let task = tokio::spawn(materialize::run(cfg, kafka.clone(), stop.clone()));
    let ns = materialize::namespace(kafka, None).await?;
    materialize::wait_caught_up(table_uri, &ns, kafka, DEADLINE).await?;
    stop.cancel();
    task.await??;
    Ok(())
}

fn queue_worker_config(sim: &SimHandle, client_id: i32) -> QueueWorkerConfig {
    QueueWorkerConfig {
        ib_host: sim.addr().ip().to_string(),
        ib_port: sim.addr().port(),
        client_id,
        tick: Duration::from_millis(300),
        ..QueueWorkerConfig::default()
    }
}

/// What the queue worker knows of each item (the restored `enqueued_at` differs by design).
/// Per item: status, position, avg cost, newest event's time and id, POLL count, and whether it
/// is on the active route (not polled).
type QueueView = BTreeMap<(String, i64), (String, f64, f64, i64, String, u64, bool)>;

async fn queue_view(kafka: &KafkaConfig, snapshot: Option<&SnapshotConfig>) -> anyhow::Result<(QueueView, u64)> {
    let s = queue_worker::start::load(kafka, T, snapshot, &CancellationToken::new())
        .await?
        .context("not stopped")?;
    let view = s
        .queue
        .items()
        .map(|(k, it)| {
            (
                (k.account.clone(), k.con_id),
                (
                    format!("{:?}", it.status),
                    it.last.position,
                    it.last.avg_cost,
                    it.last.ingest_time,
                    it.last.event_id.clone(),
                    it.refresh_count,
                    s.queue.is_active(k),
                ),
            )
        })
        .collect();
    Ok((view, s.events))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_from_the_snapshot_equals_a_full_replay() -> anyhow::Result<()> {
    let env = env(quiet_sim(), 1, 2).await?;
    let dir = tempfile::tempdir()?;
    let table_uri = dir.path().to_string_lossy().into_owned();
    let truth = env.sim.truth();
    ensure!(truth.positions.len() >= 8, "the test world needs positions");
    activate(&env.kafka, &truth.positions[0], 1).await?;
    activate(&env.kafka, &truth.positions[3], 1).await?;
    let collector = Collector::start(&env.kafka, &env.shutdown).await?;
    let ingest = env.start_ingest(env.ingest_config(81, 10)).await?;
    wait_in_sync(&env.sim, &collector, &ingest.session).await?;
    let worker_stop = env.shutdown.child_token();
    let worker = tokio::spawn(queue_worker::run(
        queue_worker_config(&env.sim, 82),
        env.kafka.clone(),
        worker_stop.clone(),
    ));
    let polls = || {
        collector
            .all()
            .iter()
            .filter(|s| s.event.source == Source::Poll)
            .count()
    };
    wait_for("POLL events", DEADLINE, || async { (polls() > 3).then_some(()) }).await?;

    // The tables hold everything so far; the changes below are the tail.
    materialize_all(&env.kafka, &table_uri).await?;
    let filled = &truth.positions[2];
    let fill_at = possync::events::now_micros();
    let fill = env
        .sim
        .apply_fill(&truth.positions[2].account, truth.positions[2].contract.con_id, 2.0)?;
    let closed = &truth.positions[1];
    env.sim
        .set_position(&closed.account, closed.contract.con_id, 0.0, 0.0)?;
    // positions[5] is activated below, once its POLL is in (as a desk's strategy does with a
    // position that has been queued a while), so that its queue item exists in both replays
    // and is on the active route in both (`is_active`).
    // A POLL of `p` asked at or after `since` (µs) has been published.
    let polled_since = |p: &possync::sim::TruthPosition, since: i64| {
        collector.all().iter().any(|s| {
            s.event.source == Source::Poll
                && s.event.account == p.account
                && s.event.con_id == i64::from(p.contract.con_id)
                && s.event.ingest_time >= since
        })
    };
    let polled = &truth.positions[5];
    wait_for("the POLL of the position to activate", DEADLINE, || async {
        polled_since(polled, 0).then_some(())
    })
    .await?;
    activate(&env.kafka, &truth.positions[5], 2).await?;
    wait_in_sync(&env.sim, &collector, &ingest.session).await?;
    // The activation is in the tail once ingest has published positions[5] on the active
    // route (the book above matches without it: activating changes no quantity).
    wait_for("positions[5] on the active route", DEADLINE, || async {
        collector
            .session(&ingest.session)
            .iter()
            .any(|s| {
                s.event.route == Route::Active
                    && s.event.account == polled.account
                    && s.event.con_id == i64::from(polled.contract.con_id)
            })
            .then_some(())
    })
    .await?;
    // The filled (queued) position is polled again: a POLL asked after the fill. Waiting for
    // that one event, not for "more POLLs than a moment ago", cannot miss a POLL that came
    // before the count was taken.
    wait_for("the POLL of the filled position", DEADLINE, || async {
        polled_since(filled, fill_at).then_some(())
    })
    .await?;
    ensure!(fill.quantity != truth.positions[2].quantity);
    worker_stop.cancel();
    worker.await??;
    ingest.stop().await?;

    let snapshot = SnapshotConfig {
        table_uri: table_uri.clone(),
        namespace: None,
    };
    let full = resume::load(&env.kafka, T, None).await?;
    let snap = resume::load(&env.kafka, T, Some(&snapshot)).await?;
    ensure!(
        snap.table.is_some_and(|(rows, v)| rows > 0 && v.is_some()),
        "the table was read"
    );
    ensure!(
        snap.events > 0 && snap.events < full.events,
        "only the tail is read: {} of {} events",
        snap.events,
        full.events
    );
    ensure!(
        snap.book == full.book,
        "books differ:\n{:?}\n{:?}",
        snap.book,
        full.book
    );
    ensure!(snap.active == full.active, "active routes differ");
    ensure!(
        full.active.len() == 3,
        "three active positions (0, 3 and 5): {:?}",
        full.active
    );
    ensure!(
        full.book.len() == env.sim.truth().positions.len(),
        "the book holds every open position: {} of {}",
        full.book.len(),
        env.sim.truth().positions.len()
    );
    ensure!(snap.gaps.is_empty() && full.gaps.is_empty());

    let (full_q, full_events) = queue_view(&env.kafka, None).await?;
    let (snap_q, snap_events) = queue_view(&env.kafka, Some(&snapshot)).await?;
    ensure!(snap_events > 0 && snap_events < full_events);
    ensure!(
        snap_q == full_q,
        "queues differ:\nsnapshot {snap_q:#?}\nreplay {full_q:#?}"
    );
    ensure!(full_q.values().any(|v| v.0 == "Refreshed") && full_q.values().any(|v| v.0 == "Closed"));
    let key5 = (polled.account.clone(), i64::from(polled.contract.con_id));
    ensure!(
        full_q.get(&key5).is_some_and(|v| v.6),
        "positions[5] is active in the queue worker's state: {:?}",
        full_q.get(&key5)
    );
    Ok(())
}

/// Deletes every record of the position topics (what retention does to old segments).
async fn delete_all_records(kafka: &KafkaConfig) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> = kafka.admin().create()?;
    let probe: BaseConsumer = kafka.consumer("snapshot-test-probe").create()?;
    let mut tpl = TopicPartitionList::new();
    for topic in kafka.topics.positions() {
        let md = probe.fetch_metadata(Some(topic), T)?;
        for p in md.topics()[0].partitions() {
            tpl.add_partition_offset(topic, p.id(), Offset::End)?;
        }
    }
    let done = admin.delete_records(&tpl, &AdminOptions::new()).await?;
    for e in done.elements() {
        e.error()?;
        let (low, high) = probe.fetch_watermarks(e.topic(), e.partition(), T)?;
        ensure!(low == high, "{}/{} still holds {low}..{high}", e.topic(), e.partition());
    }
    Ok(())
}

/// Starts ingest (unfenced) in the background, as `Env::start_ingest` does on the embedded broker.
async fn start_ingest(kafka: &KafkaConfig, cfg: IngestConfig, stop: CancellationToken) -> anyhow::Result<Running> {
    let ingest = possync::ingest::Ingest::start(cfg, kafka.clone(), stop.clone()).await?;
    let session = ingest.session_id().to_string();
    let stats = ingest.stats();
    let task = tokio::spawn(async move { ingest.run().await.map_err(anyhow::Error::from) });
    Ok(Running {
        task,
        session,
        stop,
        stats,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_position_whose_history_left_retention_still_gets_its_reconcile_close() -> anyhow::Result<()> {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(std::env::var("POSSYNC_TEST_LOG").unwrap_or_else(|_| "warn".into()))
        .with_test_writer()
        .try_init();
    let cluster = common::kafka_cluster::KafkaCluster::start(1, Default::default()).await?;
    let kafka = cluster.kafka_config();
    let layout = possync::topics::Layout {
        partitions: 2,
        replication: 1,
        min_insync: 1,
    };
    possync::topics::create(&kafka, &layout, T).await?;
    let mut sim = possync::sim::start(quiet_sim()).await?;
    let dir = tempfile::tempdir()?;
    let snapshot = SnapshotConfig {
        table_uri: dir.path().to_string_lossy().into_owned(),
        namespace: None,
    };
    let shutdown = CancellationToken::new();
    let cfg = IngestConfig {
        ib_host: sim.addr().ip().to_string(),
        ib_port: sim.addr().port(),
        client_id: 91,
        reconnect_initial: Duration::from_millis(200),
        reconnect_max: Duration::from_secs(2),
        snapshot: Some(snapshot.clone()),
        ..IngestConfig::default()
    };
    let truth = sim.truth();
    let (x, y) = (truth.positions[0].clone(), truth.positions[1].clone());
    let key = |p: &possync::sim::TruthPosition| (p.account.clone(), i64::from(p.contract.con_id));

    // First run: no table yet (full replay of empty topics), everything published, materialized.
    let collector = Collector::start(&kafka, &shutdown).await?;
    let first = start_ingest(&kafka, cfg.clone(), shutdown.child_token()).await?;
    wait_in_sync(&sim, &collector, &first.session).await?;
    materialize_all(&kafka, &snapshot.table_uri).await?;
    // Y closes while ingest runs: its STREAM close reaches Kafka but never the tables.
    sim.set_position(&y.account, y.contract.con_id, 0.0, 0.0)?;
    wait_in_sync(&sim, &collector, &first.session).await?;
    first.stop().await?;

    // Ingest is down: X closes, and retention deletes every record of the position topics.
    sim.set_position(&x.account, x.contract.con_id, 0.0, 0.0)?;
    delete_all_records(&kafka).await?;

    // A full replay knows nothing any more (and says so); the snapshot still knows X and Y.
    let replayed = resume::load(&kafka, T, None).await?;
    ensure!(replayed.book.is_empty() && replayed.events == 0);
    ensure!(
        !replayed.gaps.is_empty() && replayed.gaps.iter().all(|g| g.offsets.start == 0),
        "{:?}",
        replayed.gaps
    );
    let resumed = resume::load(&kafka, T, Some(&snapshot)).await?;
    ensure!(resumed.events == 0);
    ensure!(
        resumed.book.len() == truth.positions.len(),
        "the table holds the whole book"
    );
    let y_key = possync::book::PosKey::new(y.account.clone(), i64::from(y.contract.con_id));
    ensure!(resumed.book.contains_key(&y_key), "Y's close was never materialized");
    // Exactly Y's lost close among the events is reported. (Ingest publishes in transactions,
    // issue 19: a transaction's commit marker takes an offset too, so a reported range may also
    // hold markers, and a partition whose only unmaterialized offsets were markers is reported
    // as well; no other *event* may fall in a reported range.)
    let first_events = collector.all();
    let in_gap = |s: &ingest_support::Seen| {
        resumed
            .gaps
            .iter()
            .any(|g| g.topic == s.topic && g.partition == s.partition && g.offsets.contains(&s.offset))
    };
    let lost: Vec<_> = first_events.iter().filter(|s| in_gap(s)).map(|s| &s.event).collect();
    ensure!(
        lost.len() == 1
            && (lost[0].account.clone(), lost[0].con_id) == key(&y)
            && lost[0].position == 0.0
            && resumed.gaps.iter().all(|g| g.offsets.start > 0),
        "exactly Y's lost close is reported: {:?}, events in them: {lost:#?}",
        resumed.gaps
    );

    // Second run from the snapshot: X gets its RECONCILE close, Y its close again, and nothing
    // else is published.
    let collector = Collector::start(&kafka, &shutdown).await?;
    let second = start_ingest(&kafka, cfg, shutdown.child_token()).await?;
    wait_for("the restarted ingest to reconcile", DEADLINE, || async {
        (collector.session(&second.session).len() >= 2).then_some(())
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let evs: Vec<_> = collector
        .session(&second.session)
        .into_iter()
        .map(|s| s.event)
        .collect();
    ensure!(evs.len() == 2, "only the two closes are published: {evs:#?}");
    for p in [&x, &y] {
        ensure!(
            evs.iter()
                .any(|e| (e.account.clone(), e.con_id) == key(p) && e.source == Source::Reconcile && e.position == 0.0),
            "no RECONCILE close for {:?}: {evs:#?}",
            key(p)
        );
    }
    collector.settled_integrity(&second.session).await?;
    second.stop().await?;
    shutdown.cancel();
    sim.shutdown().await?;
    Ok(())
}
