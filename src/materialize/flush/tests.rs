use super::upserts::commit_staged;
use super::*;
use crate::materialize::upsert::core::tests::staged;
use crate::materialize::upsert::core::Upsert;
use crate::materialize::upsert::queue::QueueRow;

/// Issue 20 #8: compaction after a good commit is optional work; a file it cannot read is
/// a warning, not a stopped materializer (the commit stands).
#[tokio::test]
async fn a_failed_compaction_after_a_good_commit_is_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().to_str().unwrap();
    let mut t = Table::open(base, TableKind::PositionQueue).await.unwrap();
    let mut u = Upsert::<QueueRow>::default();
    let s = staged(&t, &u, &[(0, 1), (1, 1), (2, 1), (3, 1)]).await.unwrap();
    commit_staged(&mut t, &mut u, s, &[], 100)
        .await
        .map_err(|(e, _)| e)
        .unwrap();
    // The first data file is gone (a lifecycle rule, a bad disk): compaction, which wants to
    // rewrite it once most of its rows are replaced, cannot read it.
    let files = t.files().unwrap();
    assert_eq!(files.len(), 1);
    let path = dir.path().join("position_queue").join(files[0].path.as_ref());
    std::fs::remove_file(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let before = t.version();
    let s = staged(&t, &u, &[(1, 2), (2, 2), (3, 2)]).await.unwrap();
    commit_staged(&mut t, &mut u, s, &[], 100)
        .await
        .map_err(|(e, _)| e)
        .expect("the commit stands; only the compaction is skipped");
    assert_eq!(t.version(), before + 1, "committed, not compacted");
}

/// An embedded broker with the topics of `prefix`, and fresh tables for pipelines to open.
struct Fixture {
    _broker: crate::kafka::EmbeddedBroker,
    kafka: crate::kafka::KafkaConfig,
    dir: tempfile::TempDir,
    base: String,
}

impl Fixture {
    fn new(prefix: &str) -> Fixture {
        let broker = crate::kafka::EmbeddedBroker::start(1).unwrap();
        let mut kafka = crate::kafka::KafkaConfig::new(broker.bootstrap());
        kafka.topics = Topics::new(prefix);
        broker.create_topics(&kafka.topics, 1).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("tables").to_string_lossy().into_owned();
        Fixture {
            _broker: broker,
            kafka,
            dir,
            base,
        }
    }

    /// A pipeline on the tables, its spill files in `state`.
    async fn open(&self, state: &str) -> Pipeline {
        let topics = self.kafka.topics.clone();
        let state = self.dir.path().join(state);
        Pipeline::open(&self.base, "ns".into(), topics, 10, self.kafka.producer(), &state)
            .await
            .unwrap()
    }

    /// (table, conId, position) of every row of both upsert tables, sorted.
    async fn positions(&self) -> Vec<(&'static str, i64, f64)> {
        let mut out = Vec::new();
        for kind in [TableKind::PositionsCurrent, TableKind::PositionQueue] {
            for b in super::super::read_table(&self.base, kind).await.unwrap() {
                let con = b.column_by_name("con_id").unwrap().as_primitive::<Int64Type>();
                let pos = b.column_by_name("position").unwrap();
                let pos = pos.as_primitive::<deltalake::arrow::datatypes::Float64Type>();
                out.extend((0..b.num_rows()).map(|i| (kind.name(), con.value(i), pos.value(i))));
            }
        }
        out.sort_by(|a, b| a.partial_cmp(b).unwrap());
        out
    }
}

/// Issue 20 #3: a closed row past retention stays while an older event of its key may
/// still arrive (here the active topic, not yet materialized past the cutoff), so that
/// event cannot open the position again; once every partition is past, the row goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_waits_until_no_older_event_can_arrive() {
    use crate::events::{new_id, PositionEvent, Route};
    use crate::materialize::buffer::{Buffers, Incoming};
    use crate::materialize::decode::tests_support::sample;
    use rdkafka::producer::{FutureProducer, FutureRecord};

    let fx = Fixture::new("expiry.");
    let kafka = &fx.kafka;
    let mut p = fx.open("state").await;
    p.set_closed_retention(
        Some(std::time::Duration::from_secs(7 * 86_400)),
        ExpiryGuard::new(kafka),
    );

    let day = 86_400_000_000i64;
    let now = crate::events::now_micros();
    let event = |ingest_time: i64, position: f64, route: Route| PositionEvent {
        event_id: new_id(),
        ingest_time,
        ib_time: ingest_time,
        position,
        route,
        ..sample(1)
    };
    let opened = event(now - 9 * day, 3.0, Route::Queued);
    let closed = event(now - 8 * day, 0.0, Route::Queued);
    // Older than the close, on the other topic.
    let older = event(now - 8 * day - day / 2, 5.0, Route::Active);
    let producer: FutureProducer = kafka.producer().create().unwrap();
    let mut sent = Vec::new();
    for (topic, e) in [
        (&kafka.topics.queued, &opened),
        (&kafka.topics.queued, &closed),
        (&kafka.topics.active, &older),
    ] {
        let (key, value) = (e.key(), e.encode().unwrap());
        let rec = FutureRecord::to(topic)
            .key(&key)
            .payload(&value)
            .timestamp(e.ingest_time / 1000);
        let d = producer.send(rec, std::time::Duration::from_secs(10)).await.unwrap();
        sent.push((topic.clone(), d.offset, e.ingest_time, key, value));
    }
    let frozen = |which: &str, role: Role| {
        let mut b = Buffers::new("ns");
        for (topic, offset, ts, key, value) in sent.iter().filter(|s| s.0 == which) {
            let m = Incoming {
                role,
                topic,
                partition: 0,
                offset: *offset,
                timestamp: Some(*ts),
                key: Some(key.as_bytes()),
                value: Some(value),
            };
            assert_eq!(b.push(&m), None);
        }
        b.freeze().unwrap()
    };
    let rows_of_key = || async {
        let con = sample(1).con_id;
        let rows = fx.positions().await.into_iter().filter(|r| r.1 == con);
        rows.map(|(table, _, position)| (table, position)).collect::<Vec<_>>()
    };

    // The queued topic is materialized, close included; the active one lags behind.
    p.commit(&frozen(&kafka.topics.queued, Role::Queued)).await.unwrap();
    assert_eq!(
        rows_of_key().await,
        vec![("position_queue", 0.0), ("positions_current", 0.0)],
        "the closed row stays while the active topic holds older events"
    );
    // The lagging topic arrives: its older event loses to the close, and every partition
    // is now past the cutoff, so the closed row goes.
    p.last_expiry = None;
    p.commit(&frozen(&kafka.topics.active, Role::Active)).await.unwrap();
    assert_eq!(rows_of_key().await, vec![], "expired once nothing older can arrive");
}

/// A member that starts on tables another member wrote reads their rows' keys, classes and
/// closed times only (see `Spilled::sync`); a flush reads the values of the keys it changes
/// from the table first, so an older event still loses to the row's newer one and a newer one
/// wins, in both upsert tables.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_are_read_when_a_flush_first_needs_them() {
    use crate::events::{new_id, PositionEvent, Route};
    use crate::materialize::buffer::{Buffers, Incoming};
    use crate::materialize::decode::tests_support::sample;
    use crate::materialize::upsert::Sym;
    use rdkafka::producer::{FutureProducer, FutureRecord};

    let fx = Fixture::new("lazy.");
    let kafka = &fx.kafka;
    let now = crate::events::now_micros();
    let event = |i: i64, ingest_time: i64, position: f64| PositionEvent {
        event_id: new_id(),
        ingest_time,
        ib_time: ingest_time,
        position,
        route: Route::Queued,
        ..sample(i)
    };
    let producer: FutureProducer = kafka.producer().create().unwrap();
    let topic = kafka.topics.queued.clone();
    let send = async |events: &[PositionEvent]| {
        let mut b = Buffers::new("ns");
        for e in events {
            let (key, value) = (e.key(), e.encode().unwrap());
            let rec = FutureRecord::to(&topic).key(&key).payload(&value);
            let d = producer.send(rec, std::time::Duration::from_secs(10)).await.unwrap();
            let m = Incoming {
                role: Role::Queued,
                topic: &topic,
                partition: 0,
                offset: d.offset,
                timestamp: Some(e.ingest_time / 1000),
                key: Some(key.as_bytes()),
                value: Some(&value),
            };
            assert_eq!(b.push(&m), None);
        }
        b.freeze().unwrap()
    };
    let mut first = fx.open("state-1").await;
    let written = send(&[
        event(1, now - 10_000_000, 3.0),
        event(2, now - 10_000_000, 4.0),
        event(3, now - 10_000_000, 0.0),
    ])
    .await;
    first.commit(&written).await.unwrap();

    let mut second = fx.open("state-2").await;
    let (k1, k2) = ((Sym::new("DU1"), 1001), (Sym::new("DU1"), 1002));
    for k in [&k1, &k2] {
        assert!(
            !second.current.rows.get(k).unwrap().is_loaded(),
            "read at start: keys only"
        );
        assert!(!second.queue.rows.get(k).unwrap().is_loaded());
    }
    assert_eq!(
        second.current.rows.counts(),
        first.current.rows.counts(),
        "classes without values"
    );
    assert_eq!(second.queue.rows.counts(), first.queue.rows.counts());
    let k3 = (Sym::new("DU1"), 1003);
    assert_eq!(second.current.expired(now), vec![k3], "closed times without values");
    assert_eq!(second.current.expired(now), first.current.expired(now));
    assert_eq!(second.queue.expired(now), first.queue.expired(now));
    assert!(
        second.current.get(&[k1]).is_err(),
        "a value not read yet is never taken for none"
    );
    // Key 1: an event older than its row; key 2: a newer one.
    let later = send(&[event(1, now - 20_000_000, 9.0), event(2, now, 7.0)]).await;
    second.commit(&later).await.unwrap();
    assert_eq!(
        fx.positions().await,
        vec![
            ("position_queue", 1001, 3.0),
            ("position_queue", 1002, 7.0),
            ("position_queue", 1003, 0.0),
            ("positions_current", 1001, 3.0),
            ("positions_current", 1002, 7.0),
            ("positions_current", 1003, 0.0),
        ],
        "the older event lost to the row it did not read at start, the newer one won"
    );
    for k in [&k1, &k2] {
        assert!(second.current.rows.get(k).unwrap().is_loaded(), "read once needed");
        assert!(second.queue.rows.get(k).unwrap().is_loaded());
    }
}
