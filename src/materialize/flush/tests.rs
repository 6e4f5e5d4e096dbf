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

/// Issue 20 #3: a closed row past retention stays while an older event of its key may
/// still arrive (here the active topic, not yet materialized past the cutoff), so that
/// event cannot open the position again; once every partition is past, the row goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_waits_until_no_older_event_can_arrive() {
    use crate::events::{new_id, PositionEvent, Route};
    use crate::materialize::buffer::{Buffers, Incoming};
    use crate::materialize::decode::tests_support::sample;
    use rdkafka::producer::{FutureProducer, FutureRecord};

    let broker = crate::kafka::EmbeddedBroker::start(1).unwrap();
    let mut kafka = crate::kafka::KafkaConfig::new(broker.bootstrap());
    kafka.topics = Topics::new("expiry.");
    broker.create_topics(&kafka.topics, 1).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("tables").to_string_lossy().into_owned();
    let mut p = Pipeline::open(
        &base,
        "ns".into(),
        kafka.topics.clone(),
        10,
        kafka.producer(),
        &dir.path().join("state"),
    )
    .await
    .unwrap();
    p.set_closed_retention(
        Some(std::time::Duration::from_secs(7 * 86_400)),
        ExpiryGuard::new(&kafka),
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
    let rows_of_key = |base: String| async move {
        let mut positions = Vec::new();
        for kind in [TableKind::PositionsCurrent, TableKind::PositionQueue] {
            for b in super::super::read_table(&base, kind).await.unwrap() {
                let con = b.column_by_name("con_id").unwrap().as_primitive::<Int64Type>();
                let pos = b.column_by_name("position").unwrap();
                let pos = pos.as_primitive::<deltalake::arrow::datatypes::Float64Type>();
                for i in 0..b.num_rows() {
                    if con.value(i) == sample(1).con_id {
                        positions.push((kind.name(), pos.value(i)));
                    }
                }
            }
        }
        positions
    };

    // The queued topic is materialized, close included; the active one lags behind.
    p.commit(&frozen(&kafka.topics.queued, Role::Queued)).await.unwrap();
    assert_eq!(
        rows_of_key(base.clone()).await,
        vec![("positions_current", 0.0), ("position_queue", 0.0)],
        "the closed row stays while the active topic holds older events"
    );
    // The lagging topic arrives: its older event loses to the close, and every partition
    // is now past the cutoff, so the closed row goes.
    p.last_expiry = None;
    p.commit(&frozen(&kafka.topics.active, Role::Active)).await.unwrap();
    assert_eq!(
        rows_of_key(base.clone()).await,
        vec![],
        "expired once nothing older can arrive"
    );
}
