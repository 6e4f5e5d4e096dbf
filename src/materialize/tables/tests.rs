use super::*;

#[cfg(not(feature = "s3"))]
#[test]
fn s3_without_the_feature_is_a_clear_error() {
    let err = table_url("s3://desk-lake/possync", TableKind::PositionEvents).unwrap_err();
    assert!(matches!(err, TableError::NoS3Support { .. }));
    assert!(err.to_string().contains("--features s3"), "{err}");
}

#[tokio::test]
async fn tables_are_created_with_their_protocol_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().to_str().unwrap();
    for kind in TableKind::ALL {
        let t = Table::open(base, kind).await.unwrap();
        let snap = t.delta.snapshot().unwrap();
        let dv = matches!(kind, TableKind::PositionsCurrent | TableKind::PositionQueue);
        let p = snap.protocol();
        assert_eq!(
            (p.min_reader_version(), p.min_writer_version()),
            if dv { (3, 7) } else { (1, 2) },
            "{kind:?}"
        );
        if dv {
            let json = serde_json::to_value(p).unwrap();
            assert_eq!(
                json["readerFeatures"],
                serde_json::json!(["deletionVectors"]),
                "{kind:?}"
            );
            assert_eq!(
                json["writerFeatures"],
                serde_json::json!(["deletionVectors"]),
                "{kind:?}"
            );
        }
        assert_eq!(snap.metadata().partition_columns().to_vec(), kind.partition_columns());
        // reopen checks the schema round trip
        Table::open(base, kind).await.unwrap();
    }
}

#[tokio::test]
async fn a_failed_checkpoint_keeps_the_commit_and_is_retried() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().to_str().unwrap();
    let kind = TableKind::StrategyRegistry;
    let mut t = Table::open(base, kind).await.unwrap();
    let log = dir.path().join(kind.name()).join("_delta_log");
    let checkpoint = |v: u64| log.join(format!("{v:020}.checkpoint.parquet"));
    // A directory where the checkpoint of version 2 goes: writing it fails.
    std::fs::create_dir_all(checkpoint(2).join("blocker")).unwrap();
    let failures = || {
        crate::metrics::global()
            .checkpoint_failures
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    let before = failures();
    for v in 1..=2 {
        let version = t
            .commit(vec![], &[("app".into(), v)], rewrite_operation(), 2)
            .await
            .expect("the commit stands although its checkpoint fails");
        assert_eq!(version, v);
    }
    assert!(failures() > before, "checkpoint failure not counted");
    assert_eq!(t.txn_version("app").await.unwrap(), Some(2));
    std::fs::remove_dir_all(checkpoint(2)).unwrap();
    // Version 3 is not a checkpoint turn, but the failed one is retried.
    t.commit(vec![], &[("app".into(), 3)], rewrite_operation(), 2)
        .await
        .unwrap();
    assert!(checkpoint(3).is_file(), "checkpoint not retried");
    let reopened = Table::open(base, kind).await.unwrap();
    assert_eq!(reopened.version(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_first_opens_agree() {
    for _ in 0..10 {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().to_str().unwrap().to_string();
        let opens: Vec<_> = (0..4)
            .map(|_| {
                let base = base.clone();
                tokio::spawn(async move { Table::open(&base, TableKind::PositionEvents).await.map(|t| t.version()) })
            })
            .collect();
        for o in opens {
            assert_eq!(o.await.unwrap().unwrap(), 0);
        }
    }
}
