use super::*;

fn ev(t: i64, seq: i64, source: &'static str, active: bool) -> QueueInput<'static> {
    QueueInput {
        active_route: active,
        partition: 0,
        source,
        order: (t, "s", seq, "e"),
        position: t as f64,
        avg_cost: 1.0,
    }
}

#[test]
fn queue_status_follows_newest_event_and_counts_polls() {
    let mut r = QueueRow::default();
    r.apply(&ev(10, 1, "SNAPSHOT", false));
    assert_eq!(r.status(), "pending");
    r.apply(&ev(20, 2, "POLL", false));
    assert_eq!(r.status(), "refreshed");
    // an older enqueue arriving late does not overwrite the newer poll
    r.apply(&ev(15, 3, "STREAM", false));
    assert_eq!(r.status(), "refreshed");
    let q = r.queued.as_ref().unwrap();
    assert_eq!(
        (
            q.refresh_count(),
            q.queued_events(),
            q.enqueued_at.get(),
            q.last_refreshed_at.get()
        ),
        (1, 3, Some(15), Some(20))
    );
    r.apply(&ev(30, 4, "PNL", true));
    assert_eq!(r.status(), "active");
    r.apply(&ev(40, 5, "STREAM", false));
    assert_eq!(r.status(), "pending");
    // A close leaves the work list: the worker never polls it (issue 10 #11).
    r.apply(&QueueInput {
        position: 0.0,
        ..ev(50, 6, "STREAM", false)
    });
    assert_eq!(r.status(), "closed");
    r.apply(&ev(60, 7, "POLL", false));
    assert_eq!(r.status(), "refreshed", "reopened and refreshed");
}

/// A `QueueRow` is in memory only for the keys one flush touches (the rows of every key
/// live in the spill file, with a 16-byte [`crate::materialize::upsert::spilled::Hot`] per key), so
/// its size bounds the memory per change, not per key. 160 bytes: the session id is
/// kept as its UUID bytes since issue 20 #13 (it was an interned symbol that never left).
#[test]
fn queue_rows_stay_compact() {
    assert_eq!(std::mem::size_of::<PartitionCounts>(), 32);
    assert_eq!(std::mem::size_of::<OptTime>(), 8);
    assert!(
        std::mem::size_of::<QueueRow>() <= 160,
        "{}",
        std::mem::size_of::<QueueRow>()
    );
    let mut c = PartitionCounts::new();
    *c.entry(2) = (1, 1);
    *c.entry(0) = (5, 0);
    *c.entry(2) = (3, 2);
    let mut one = PartitionCounts::new();
    *one.entry(0) = (5, 0);
    assert_ne!(c, one);
    assert_eq!(c.iter().collect::<Vec<_>>(), [(&0, &(5, 0)), (&2, &(3, 2))]);
    assert_eq!(OptTime::of(None).max_with(7).get(), Some(7));
    assert!(OptTime::of(None) < OptTime::of(Some(i64::MIN + 1)));
}

#[test]
fn queue_join_is_a_semilattice() {
    let mut a = QueueRow::default();
    a.apply(&ev(10, 1, "SNAPSHOT", false));
    let mut b = a.clone();
    b.apply(&ev(20, 2, "POLL", false));
    let mut c = QueueRow::default();
    c.apply(&ev(25, 9, "PNL", true));
    // A version that saw the key in another partition (added partitions).
    let mut d = a.clone();
    d.apply(&QueueInput {
        partition: 3,
        ..ev(30, 10, "STREAM", false)
    });
    let rows = [&a, &b, &c, &d];
    for x in rows {
        assert_eq!(x.join(x), *x);
        for y in rows {
            assert_eq!(x.join(y), y.join(x));
            for z in rows {
                assert_eq!(x.join(y).join(z), x.join(&y.join(z)));
            }
        }
    }
    assert_eq!(a.join(&b), b);
    let st: QueueState = [(("A".to_string(), 1), a.join(&b).join(&c).join(&d))]
        .into_iter()
        .collect();
    let back = queue_from_batches(&[queue_batch(&st).unwrap()]).unwrap();
    assert_eq!(back, st);
}

/// Issue 10 #6: the queued topic gets more partitions, so a key's new events land in
/// another partition than its old ones. Member Y (old partition) and member X (new
/// partition) both start from the committed row and fold their own events; whichever
/// commits second merges the other's row. Nothing of either history may be lost.
#[test]
fn a_key_moved_to_an_added_partition_keeps_both_histories() {
    let at = |t: i64, partition: i32, source: &'static str| QueueInput {
        active_route: false,
        partition,
        source,
        order: (t, "s", t, "e"),
        position: t as f64,
        avg_cost: 1.0,
    };
    let mut committed = QueueRow::default();
    for t in 1..=5 {
        committed.apply(&at(t, 0, "STREAM"));
    }
    let mut y = committed.clone();
    for t in 6..=8 {
        y.apply(&at(t, 0, "POLL"));
    }
    let mut x = committed.clone();
    for t in 100..=101 {
        x.apply(&at(t, 3, "POLL"));
    }
    for j in [y.join(&x), x.join(&y)] {
        let q = j.queued.as_ref().unwrap();
        assert_eq!(q.last.ingest_time, 101, "the newest event was dropped");
        assert_eq!(
            (q.queued_events(), q.refresh_count()),
            (10, 5),
            "an event counted twice or not at all"
        );
        assert_eq!((q.enqueued_at.get(), q.last_refreshed_at.get()), (Some(5), Some(101)));
        assert_eq!(j.status(), "refreshed");
    }
}
