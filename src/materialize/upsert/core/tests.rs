use super::*;
use crate::materialize::tables::TableKind;
use crate::materialize::upsert::queue::{queue_batch, queue_from_batches, QueueInput, QueueRow, QueueState};

/// A `position_queue` value whose order and figures are `t` (shared with `flush`'s tests).
pub(crate) fn row(t: i64) -> QueueRow {
    let mut r = QueueRow::default();
    r.apply(&QueueInput {
        active_route: false,
        partition: 0,
        source: "STREAM",
        order: (t, "s", t, "e"),
        position: t as f64,
        avg_cost: 1.0,
    });
    r
}

/// Plans a commit of `rows` ((conId, value) of account "A"); shared with `flush`'s tests.
pub(crate) async fn staged(
    t: &Table,
    u: &Upsert<QueueRow>,
    rows: &[(i64, i64)],
) -> Result<Staged<QueueRow>, TableError> {
    let m: QueueState = rows.iter().map(|(k, v)| (("A".to_string(), *k), row(*v))).collect();
    let batch = queue_batch(&m).unwrap();
    let changed = m.into_iter().map(|((a, c), r)| ((Sym::new(&a), c), r)).collect();
    u.stage(t, Some(batch), changed, vec![]).await
}

async fn put(t: &mut Table, u: &mut Upsert<QueueRow>, rows: &[(i64, i64)]) -> Result<(), TableError> {
    let staged = staged(t, u, rows).await?;
    t.commit(
        staged.actions.clone(),
        &[],
        DeltaOperation::Update { predicate: None },
        0,
    )
    .await?;
    let after = u.counts_after(&staged);
    u.committed(staged);
    assert_eq!(u.counts(), after, "counts_after is what committing does");
    Ok(())
}

async fn table_state(t: &Table) -> QueueState {
    queue_from_batches(&t.read_all().await.unwrap()).unwrap()
}

/// The table's rows by summary class, read whole (what `status --exact` counts).
async fn table_counts(t: &Table) -> crate::materialize::upsert::summary::Counts {
    let mut c = Default::default();
    for b in t.read_all().await.unwrap() {
        crate::materialize::upsert::summary::count(t.kind, &b, &mut c).unwrap();
    }
    c
}

fn state_of(u: &Upsert<QueueRow>) -> QueueState {
    u.iter().map(|(k, v)| ((k.0.to_string(), k.1), v.clone())).collect()
}

use deltalake::protocol::DeltaOperation;

/// Issue 20 #5: a key in two live rows (another writer that knows nothing of the table
/// added it again: a Spark INSERT) made compaction panic at every restart; now a clear error
/// that names the key and the way out.
#[tokio::test]
async fn a_key_twice_in_the_table_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().to_str().unwrap();
    let mut ta = Table::open(base, TableKind::PositionQueue).await.unwrap();
    let mut tx = Table::open(base, TableKind::PositionQueue).await.unwrap();
    let mut a = Upsert::<QueueRow>::default();
    put(&mut ta, &mut a, &[(0, 1), (1, 1), (2, 1), (3, 1)]).await.unwrap();
    tx.refresh().await.unwrap();
    put(&mut tx, &mut Upsert::<QueueRow>::default(), &[(0, 9)])
        .await
        .unwrap();
    ta.refresh().await.unwrap();
    a.sync(&ta).await.unwrap();
    // Most of the first file is replaced: compaction wants to rewrite it, row 0 included.
    put(&mut ta, &mut a, &[(1, 2), (2, 2), (3, 2)]).await.unwrap();
    let err = a.compaction(&ta).await.err().expect("a duplicate key is reported");
    assert!(matches!(err, TableError::DuplicateKey { .. }), "{err}");
    assert!(
        err.to_string().contains("conId 0") && err.to_string().contains("possync rebuild"),
        "{err}"
    );
}

/// Issue 23: a plan made before another writer's commit still applies when that commit
/// touched none of its keys or files (the same actions commit against the new snapshot: a
/// rebase, no re-plan), and never when it wrote one of the plan's keys or files.
#[tokio::test]
async fn a_plan_survives_a_disjoint_commit_and_not_an_overlapping_one() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().to_str().unwrap();
    let mut ta = Table::open(base, TableKind::PositionQueue).await.unwrap();
    let mut tb = Table::open(base, TableKind::PositionQueue).await.unwrap();
    let (mut a, mut b) = (Upsert::<QueueRow>::default(), Upsert::<QueueRow>::default());
    // Keys 0..10 in one file, 10..20 in another.
    put(&mut ta, &mut a, &(0..10).map(|k| (k, 1)).collect::<Vec<_>>())
        .await
        .unwrap();
    put(&mut ta, &mut a, &(10..20).map(|k| (k, 1)).collect::<Vec<_>>())
        .await
        .unwrap();
    let op = || DeltaOperation::Update { predicate: None };
    async fn sync(t: &mut Table, u: &mut Upsert<QueueRow>) {
        t.refresh().await.unwrap();
        u.sync(t).await.unwrap();
    }
    sync(&mut tb, &mut b).await;

    // Disjoint: A plans keys 0..3 (first file), B commits keys 10..13 (second file).
    let plan = staged(&ta, &a, &[(0, 2), (1, 2), (2, 2)]).await.unwrap();
    put(&mut tb, &mut b, &[(10, 2), (11, 2), (12, 2)]).await.unwrap();
    let lost = ta.commit(plan.actions.clone(), &[], op(), 0).await;
    assert!(matches!(lost, Err(TableError::Conflict(_))), "B's commit came first");
    sync(&mut ta, &mut a).await;
    assert!(a.still_applies(&plan), "B touched none of the plan's keys or files");
    ta.commit(plan.actions.clone(), &[], op(), 0).await.unwrap();
    a.committed(plan);
    let want: QueueState = (0..20)
        .map(|k| {
            (
                ("A".to_string(), k),
                row(if k < 3 || (10..13).contains(&k) { 2 } else { 1 }),
            )
        })
        .collect();
    assert_eq!(table_state(&ta).await, want, "one live row per key, both writes in");
    assert_eq!(state_of(&a), want);

    // B writes a key of the plan (and so its file): the plan is stale.
    sync(&mut tb, &mut b).await;
    let plan = staged(&ta, &a, &[(5, 3)]).await.unwrap();
    put(&mut tb, &mut b, &[(5, 4)]).await.unwrap();
    sync(&mut ta, &mut a).await;
    assert!(!a.still_applies(&plan), "B wrote key 5");
    ta.discard(plan.written()).await;

    // B writes another key of a file the plan touches: its deletion vector moved on.
    let plan = staged(&ta, &a, &[(6, 3)]).await.unwrap();
    put(&mut tb, &mut b, &[(7, 4)]).await.unwrap();
    sync(&mut ta, &mut a).await;
    assert!(!a.still_applies(&plan), "B replaced the vector of key 6's file");
    ta.discard(plan.written()).await;

    // Both insert the same new key: neither's file is touched, the key is.
    let plan = staged(&ta, &a, &[(50, 3)]).await.unwrap();
    put(&mut tb, &mut b, &[(50, 4)]).await.unwrap();
    sync(&mut ta, &mut a).await;
    assert!(!a.still_applies(&plan), "B inserted key 50 first");
    ta.discard(plan.written()).await;
    let orphans = crate::delta::maintain::orphans(&ta).await.unwrap();
    assert!(orphans.is_empty(), "discarded plans leave nothing: {orphans:?}");
}

/// Two writers on one table: commits cost what they change (one new file plus deletion
/// vectors), a stale writer catches up by reading only what changed, deletes and
/// compaction keep exactly one live row per key.
#[tokio::test]
async fn two_writers_keep_one_live_row_per_key() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().to_str().unwrap();
    let mut ta = Table::open(base, TableKind::PositionQueue).await.unwrap();
    let mut tb = Table::open(base, TableKind::PositionQueue).await.unwrap();
    let (mut a, mut b) = (Upsert::<QueueRow>::default(), Upsert::<QueueRow>::default());
    put(&mut ta, &mut a, &(0..100).map(|k| (k, 1)).collect::<Vec<_>>())
        .await
        .unwrap();
    put(&mut ta, &mut a, &(0..10).map(|k| (k, 2)).collect::<Vec<_>>())
        .await
        .unwrap();
    assert_eq!(a.files(), 2);
    let want = state_of(&a);
    assert_eq!(table_state(&ta).await, want, "the table is the state");
    assert_eq!(table_state(&ta).await.len(), 100);
    // b is stale: its commit conflicts; it reloads and reads only what changed.
    let err = put(&mut tb, &mut b, &[(5, 3)]).await.unwrap_err();
    assert!(matches!(err, TableError::Conflict(_)), "{err}");
    tb.refresh().await.unwrap();
    let s = b.sync(&tb).await.unwrap();
    assert_eq!((s.gone, s.added), (0, 100), "first sync reads every live row once");
    assert_eq!(state_of(&b), want);
    put(&mut tb, &mut b, &[(5, 3), (200, 3)]).await.unwrap();
    // a catches up: key 5's row in a's second file is gone, two rows added.
    ta.refresh().await.unwrap();
    let s = a.sync(&ta).await.unwrap();
    assert_eq!((s.gone, s.added), (1, 2));
    assert_eq!(state_of(&a), state_of(&b));
    assert_eq!(table_state(&ta).await, state_of(&a));
    assert_eq!(
        a.counts(),
        table_counts(&ta).await,
        "counts follow another writer's commit"
    );
    assert_eq!(b.counts(), a.counts());
    // Deletes are deletion vectors too.
    let staged = a
        .stage(&ta, None, vec![], vec![(Sym::new("A"), 7), (Sym::new("A"), 200)])
        .await
        .unwrap();
    ta.commit(
        staged.actions.clone(),
        &[],
        DeltaOperation::Delete { predicate: None },
        0,
    )
    .await
    .unwrap();
    let after = a.counts_after(&staged);
    a.committed(staged);
    assert_eq!((a.counts(), a.counts()), (after, table_counts(&ta).await));
    assert_eq!(table_state(&ta).await.len(), 99);
    assert_eq!(table_state(&ta).await, state_of(&a));
    // A read of two columns (`possync status`) sees the live rows, deletion vectors applied.
    let pairs = |batches: Vec<RecordBatch>| {
        let mut v: Vec<(i64, String)> = Vec::new();
        for b in &batches {
            let r = crate::ops::Row(b);
            v.extend((0..b.num_rows()).map(|i| (r.i64("con_id", i).unwrap(), r.str("status", i).unwrap())));
        }
        v.sort();
        v
    };
    let few = ta.read_columns(&["con_id", "status"]).await.unwrap();
    assert_eq!(few[0].num_columns(), 2, "only the columns asked for are read");
    assert_eq!(pairs(few), pairs(ta.read_all().await.unwrap()));
    assert_eq!(pairs(ta.read_columns(&["con_id", "status"]).await.unwrap()).len(), 99);
    // Many small commits: compaction keeps the file count bounded and the rows exact.
    for i in 0..(MAX_FILES as i64 * 2) {
        // Values 0 (closed) now and then: the rows change class.
        let v = if i % 3 == 0 { 0 } else { 10 + i };
        put(&mut ta, &mut a, &[(i % 50, v), (1000 + i, 1)]).await.unwrap();
        if let Some(c) = a.compaction(&ta).await.unwrap() {
            ta.commit(c.actions.clone(), &[], DeltaOperation::Update { predicate: None }, 0)
                .await
                .unwrap();
            assert_eq!(a.counts_after(&c), a.counts(), "compaction changes no count");
            a.committed(c);
        }
        assert!(a.files() <= MAX_FILES + 1, "{} files", a.files());
    }
    assert_eq!(table_state(&ta).await, state_of(&a));
    let mut c = Upsert::<QueueRow>::default();
    ta.refresh().await.unwrap();
    c.sync(&ta).await.unwrap();
    assert_eq!(state_of(&c), state_of(&a), "a fresh reader sees the same rows");
    let counts = table_counts(&ta).await;
    assert!(counts[0] > 0 && counts[2] > 0, "pending and closed rows: {counts:?}");
    assert_eq!((a.counts(), c.counts()), (counts, counts));
}
