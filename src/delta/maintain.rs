//! Maintenance of one table: checkpoints (written by [`super::Table::commit`] every N commits),
//! compaction of small files, vacuum, and the listing of orphan files.
//!
//! Safe while writers run: compaction reads small files itself and commits remove + add with
//! `dataChange = false` (an `OPTIMIZE` commit) through delta-rs' conflict checker, which lets it
//! pass concurrent appends; a writer that meets a concurrent commit reloads and retries. Vacuum
//! deletes only files unreferenced for longer than the retention (the table's
//! `delta.deletedFileRetentionDuration`), including orphans of crashed writers, never a file a
//! running writer is about to commit.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use deltalake::kernel::transaction::{CommitBuilder, CommitProperties};
use deltalake::kernel::Action;
use deltalake::operations::vacuum::VacuumMode;
use deltalake::protocol::DeltaOperation;
use deltalake::table::config::TablePropertiesExt as _;
use deltalake::Path;
use futures::StreamExt;

use super::{FileRef, Spec, Table, TableError};

/// Writes a checkpoint at the table's version and drops log files past their retention.
///
/// # Errors
/// Storage errors.
pub async fn checkpoint<K: Spec>(t: &Table<K>) -> Result<(), TableError> {
    let table = t.kind.name();
    let err = move |source| TableError::Delta { table, source };
    deltalake::checkpoints::create_checkpoint(&t.delta, None)
        .await
        .map_err(err)?;
    deltalake::checkpoints::cleanup_metadata(&t.delta, None)
        .await
        .map_err(err)?;
    tracing::debug!(table, version = t.version(), "checkpoint written");
    Ok(())
}

/// Vacuums one table (full mode: tombstones past the retention and unreferenced files older
/// than it) and returns how many files it deleted.
///
/// delta-rs protects the data files of recent tombstones but not their deletion vectors: a
/// remove action is the only place that names the vector a superseded file version pointed to
/// (the file itself is re-added with a new one). On the tables with deletion vectors the
/// vacuum is therefore planned first, and the vectors that a remove within the retention names
/// are kept, so every version within the retention stays readable (time travel,
/// `book --version`, a reader mid-query).
///
/// # Errors
/// Storage errors.
pub async fn vacuum<K: Spec>(t: &Table<K>, retention: Option<Duration>) -> Result<usize, TableError> {
    let table = t.kind.name();
    let err = move |source| TableError::Delta { table, source };
    let mut v = t.delta.clone().vacuum().with_mode(VacuumMode::Full);
    let retention = match retention {
        Some(r) => {
            let r = chrono::Duration::from_std(r).unwrap_or(chrono::Duration::MAX);
            v = v.with_retention_period(r).with_enforce_retention_duration(false);
            r
        }
        None => {
            let snap = t.delta.snapshot().map_err(err)?;
            chrono::Duration::from_std(snap.snapshot().table_properties().deleted_file_retention_duration())
                .unwrap_or(chrono::Duration::MAX)
        }
    };
    if !t.kind.deletion_vectors() {
        let (_, metrics) = v.await.map_err(err)?;
        return Ok(metrics.files_deleted.len());
    }
    let (_, plan) = v.with_dry_run(true).await.map_err(err)?;
    let vectors = plan.files_deleted.iter().filter(|p| is_deletion_vector(p)).count();
    let keep = if vectors == 0 {
        HashSet::new()
    } else {
        let cutoff = chrono::Utc::now()
            .timestamp_millis()
            .saturating_sub(retention.num_milliseconds());
        vectors_removed_since(t, cutoff).await?
    };
    let doomed: Vec<Path> = plan
        .files_deleted
        .iter()
        .filter(|p| !keep.contains(p.as_str()))
        .map(|p| Path::parse(p).unwrap_or_else(|_| Path::from(p.as_str())))
        .collect();
    let kept = plan.files_deleted.len() - doomed.len();
    if kept > 0 {
        tracing::debug!(
            table,
            kept,
            "vacuum kept deletion vectors of versions within the retention"
        );
    }
    let store = t.delta.log_store().object_store(None);
    let n = doomed.len();
    let mut deleted = store.delete_stream(futures::stream::iter(doomed.into_iter().map(Ok)).boxed());
    while let Some(r) = deleted.next().await {
        match r {
            Ok(_) | Err(deltalake::logstore::object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(err(e.into())),
        }
    }
    Ok(n)
}

/// Files under the table root (outside `_delta_log`) that no add or remove action of the
/// table's log names, with their deletion vectors: what a writer left behind and only vacuum
/// would delete. A run without crashes must leave none (the bench counts them, the group
/// tests check them). Reads every commit still in the log: for tests and benchmarks, not for a
/// table with a long history.
///
/// # Errors
/// Storage errors.
pub async fn orphans<K: Spec>(t: &Table<K>) -> Result<Vec<String>, TableError> {
    #[derive(serde::Deserialize)]
    struct Line {
        add: Option<deltalake::kernel::Add>,
        remove: Option<deltalake::kernel::Remove>,
    }
    let table = t.kind.name();
    let err = move |source| TableError::Delta { table, source };
    let mut named = HashSet::new();
    let mut name = |path: &str, dv: Option<&deltalake::kernel::DeletionVectorDescriptor>| {
        named.insert(Path::parse(path).unwrap_or_else(|_| Path::from(path)).to_string());
        if let Some(p) = dv.and_then(super::dv::file_path) {
            named.insert(p.to_string());
        }
    };
    let log = t.delta.log_store();
    for v in 0..=t.version() {
        let Some(bytes) = log.read_commit_entry(v as u64).await.map_err(err)? else {
            continue;
        };
        for line in bytes.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            let Ok(l) = serde_json::from_slice::<Line>(line) else {
                continue;
            };
            if let Some(a) = &l.add {
                name(&a.path, a.deletion_vector.as_ref());
            }
            if let Some(r) = &l.remove {
                name(&r.path, r.deletion_vector.as_ref());
            }
        }
    }
    let store = t.delta.object_store();
    let mut listing = store.list(None);
    let mut out = Vec::new();
    while let Some(meta) = listing.next().await {
        let path = meta.map_err(|e| err(e.into()))?.location.to_string();
        if !path.starts_with("_delta_log/") && !named.contains(&path) {
            out.push(path);
        }
    }
    out.sort();
    Ok(out)
}

fn is_deletion_vector(path: &str) -> bool {
    path.rsplit('/')
        .next()
        .is_some_and(|name| name.starts_with("deletion_vector_") && name.ends_with(".bin"))
}

/// The deletion-vector files (paths relative to the table root) named by remove actions whose
/// deletion time is at or after `cutoff_ms`: the vectors of file versions that a version within
/// the retention still reads. Walks the log back from the newest commit until a commit older
/// than the cutoff.
async fn vectors_removed_since<K: Spec>(t: &Table<K>, cutoff_ms: i64) -> Result<HashSet<String>, TableError> {
    #[derive(serde::Deserialize)]
    struct Line {
        remove: Option<deltalake::kernel::Remove>,
        #[serde(rename = "commitInfo")]
        commit_info: Option<serde_json::Value>,
    }
    let table = t.kind.name();
    let store = t.delta.log_store();
    let mut keep = HashSet::new();
    for v in (0..=t.version()).rev() {
        let Some(bytes) = store
            .read_commit_entry(v as u64)
            .await
            .map_err(|source| TableError::Delta { table, source })?
        else {
            break; // older commits are cleaned up; their removes are past any retention
        };
        let mut older = false;
        for line in bytes.split(|b| *b == b'\n') {
            let Ok(l) = serde_json::from_slice::<Line>(line) else {
                continue;
            };
            if let Some(ts) = l
                .commit_info
                .as_ref()
                .and_then(|c| c.get("timestamp"))
                .and_then(|t| t.as_i64())
            {
                older = ts < cutoff_ms;
            }
            let Some(r) = l.remove else { continue };
            if r.deletion_timestamp.unwrap_or(i64::MAX) < cutoff_ms {
                continue;
            }
            if let Some(d) = &r.deletion_vector {
                if let Some(p) = super::dv::file_path(d) {
                    keep.insert(p.to_string());
                }
            }
        }
        if older {
            break;
        }
    }
    Ok(keep)
}

/// Rewrites the small files of each partition into files of about `target` bytes.
/// Returns (files removed, files written).
pub async fn compact<K: Spec>(t: &mut Table<K>, below: u64, target: u64) -> Result<(usize, usize), TableError> {
    let mut groups: BTreeMap<Vec<(String, Option<String>)>, Vec<FileRef>> = BTreeMap::new();
    for f in t.files()? {
        if (f.size as u64) < below {
            let mut key: Vec<_> = f.partition_values.clone().into_iter().collect();
            key.sort();
            groups.entry(key).or_default().push(f);
        }
    }
    let (mut removed, mut written) = (0, 0);
    for (_, files) in groups {
        // Bins of about `target` bytes (input sizes are compressed, like the output).
        let mut bins: Vec<Vec<FileRef>> = vec![vec![]];
        let mut size = 0u64;
        for f in files {
            if size + f.size as u64 > target && !bins.last().expect("one bin").is_empty() {
                bins.push(vec![]);
                size = 0;
            }
            size += f.size as u64;
            bins.last_mut().expect("one bin").push(f);
        }
        for bin in bins.into_iter().filter(|b| b.len() > 1) {
            let batches = t.read(&bin).await?;
            let adds = t.write_files(&batches).await?;
            let n_adds = adds.len();
            let mut actions: Vec<Action> = bin
                .iter()
                .map(|f| {
                    let mut r = f.remove.clone();
                    r.data_change = false;
                    Action::Remove(r)
                })
                .collect();
            actions.extend(adds.into_iter().map(|mut a| {
                a.data_change = false;
                Action::Add(a)
            }));
            let op = DeltaOperation::Optimize {
                predicate: None,
                target_size: target as i64,
            };
            let snapshot = t.delta.snapshot().map_err(|source| TableError::Delta {
                table: t.kind.name(),
                source,
            })?;
            let result = CommitBuilder::from(
                CommitProperties::default()
                    .with_max_retries(50)
                    .with_create_checkpoint(false),
            )
            .with_actions(actions)
            .build(Some(snapshot), t.delta.log_store(), op)
            .await;
            match result {
                Ok(_) => {
                    removed += bin.len();
                    written += n_adds;
                }
                Err(e) => tracing::warn!(table = t.kind.name(), error = %e, "compaction commit lost a race; skipped"),
            }
            t.refresh().await?;
        }
    }
    Ok((removed, written))
}
