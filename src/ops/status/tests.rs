use super::log::{log_entry, scan, summary_of};
use super::*;
use crate::materialize::tables::append_operation;
use crate::materialize::upsert::summary::Counts;
use crate::materialize::upsert::{queue_batch, QueueInput, QueueRow, QueueState};
use deltalake::kernel::Action;
use deltalake::protocol::DeltaOperation;

fn rows(n: i64) -> QueueState {
    (0..n)
        .map(|k| {
            let mut r = QueueRow::default();
            r.apply(&QueueInput {
                active_route: false,
                partition: 0,
                source: if k % 2 == 0 { "POLL" } else { "STREAM" },
                order: (k, "s", k, "e"),
                position: (k % 3) as f64,
                avg_cost: 1.0,
            });
            (("A".to_string(), k), r)
        })
        .collect()
}

async fn add(t: &mut Table, m: &QueueState, info: bool) -> Counts {
    let batch = queue_batch(m).unwrap();
    let mut c = Counts::default();
    summary::count(t.kind, &batch, &mut c).unwrap();
    let actions = t
        .write_files(&[batch])
        .await
        .unwrap()
        .into_iter()
        .map(Action::Add)
        .collect();
    let info = if info { summary::info(t.kind, &c) } else { vec![] };
    let op = DeltaOperation::Update { predicate: None };
    t.commit_with(actions, &[], op, 0, info).await.unwrap();
    c
}

/// The summary is found on the newest entry, behind entries that change no rows, and not
/// behind a data commit without one (then `status` scans).
#[tokio::test]
async fn the_summary_is_walked_back_to_over_commits_without_data_only() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().to_str().unwrap();
    let mut t = Table::open(base, TableKind::PositionQueue).await.unwrap();
    let c = add(&mut t, &rows(12), true).await;
    assert_eq!(c, [4, 4, 4, 0], "pending, refreshed, closed, active");
    assert_eq!(scan(&t).await.unwrap(), c);
    let v = t.version();
    assert_eq!(summary_of(&t, None).await.unwrap(), Some((v, c)));
    // Txn re-stamps (no data): walked over.
    for i in 0..3 {
        let txns = [("app".to_string(), i)];
        t.commit(vec![], &txns, append_operation(t.kind), 0).await.unwrap();
    }
    assert_eq!(summary_of(&t, None).await.unwrap(), Some((v, c)));
    let newest = log_entry(&t, t.version()).await.unwrap();
    assert!(newest.as_ref().is_some_and(|e| !e.data_change && e.timestamp.is_some()));
    assert_eq!(summary_of(&t, newest).await.unwrap(), Some((v, c)));
    // More than SUMMARY_WALK of them: the caller scans.
    for i in 0..SUMMARY_WALK as i64 {
        let txns = [("app".to_string(), 10 + i)];
        t.commit(vec![], &txns, append_operation(t.kind), 0).await.unwrap();
    }
    assert_eq!(summary_of(&t, None).await.unwrap(), None);
    // A data commit with none: the caller scans, even with summaries further back.
    let mut t = Table::open(&format!("{base}/b"), TableKind::PositionQueue)
        .await
        .unwrap();
    add(&mut t, &rows(5), true).await;
    add(&mut t, &rows(3), false).await;
    assert_eq!(summary_of(&t, None).await.unwrap(), None);
}
