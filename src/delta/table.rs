//! One Delta table: opening (created on first use, with the [`Spec`]'s schema, partitions,
//! protocol and properties), schema and protocol checks, commits with their txn offsets, and
//! reading back ([`super::read`]).
//!
//! Commits never retry blindly. A commit that only appends files (and txn actions) goes through
//! delta-rs' conflict checker ([`APPEND_RETRIES`]): it lands after concurrent appends of other
//! writers, and fails when one of them wrote a txn action for one of its own app ids (a
//! partition that moved), so two writers never both append a partition's rows. Every other
//! commit is made against the snapshot it read (`max_retries = 0`). Either way a real conflict
//! comes back as [`TableError::Conflict`] so the caller can reload, drop what is already
//! written, and try again. Writers that stage a plan on the snapshot first
//! [`Table::catch_up`]: one read of the next log entry, so a plan is stale only for the time it
//! takes to stage it.

use std::collections::HashMap;

use deltalake::arrow::array::RecordBatch;
use deltalake::arrow::datatypes::{DataType, Schema as ArrowSchema};
use deltalake::kernel::engine::arrow_conversion::TryIntoKernel;
use deltalake::kernel::transaction::{CommitBuilder, CommitProperties, TransactionError};
use deltalake::kernel::{Action, Add, StructType, Transaction};
use deltalake::operations::create::CreateBuilder;
use deltalake::parquet::basic::Compression;
use deltalake::parquet::file::properties::{EnabledStatistics, WriterProperties};
use deltalake::parquet::schema::types::ColumnPath;
use deltalake::protocol::{DeltaOperation, SaveMode};
use deltalake::writer::{DeltaWriter, RecordBatchWriter};
use deltalake::{DeltaTable, DeltaTableBuilder, DeltaTableError};

use super::txn::TxnMap;
use super::Spec;

/// Retries delta-rs may make for a commit that only appends (see the module doc): each one
/// follows a concurrent commit its conflict checker let through.
pub const APPEND_RETRIES: usize = 20;

static REBASED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Appends of this process that landed after concurrent commits of other writers (delta-rs
/// checked them; no re-plan was needed).
pub fn rebased() -> u64 {
    REBASED.load(std::sync::atomic::Ordering::Relaxed)
}

/// Errors of table access.
#[derive(Debug, thiserror::Error)]
pub enum TableError {
    /// Somebody else committed since our snapshot; reload and retry.
    #[error("table {0}: a concurrent commit won; reloading")]
    Conflict(&'static str),
    /// The table on disk has another schema than this build writes.
    #[error(
        "table {table} at {uri} has schema {found}, this build writes {expected}; migrate or use another --table-uri"
    )]
    SchemaChanged {
        table: &'static str,
        uri: String,
        found: String,
        expected: String,
    },
    /// An upsert table written by a build before deletion vectors.
    #[error(
        "table {table} at {uri} was created without deletion vectors by an older possync; move it away (or use another --table-uri) and recreate it with `possync rebuild`"
    )]
    NoDeletionVectors { table: &'static str, uri: String },
    /// The table records a layout this build does not know (a newer possync wrote it).
    #[error(
        "table {table} at {uri} has layout {found}, written by a newer possync (this build knows layouts up to {known}); run the newer build, or roll the tables back as the README's \"Upgrading\" section says"
    )]
    NewerLayout {
        table: &'static str,
        uri: String,
        found: u32,
        known: u32,
    },
    /// The table's layout is older and the next step cannot be done on the live table.
    #[error(
        "table {table} at {uri} has layout {found} and needs a migration ({step}); stop the materializers, then run `possync migrate --table-uri <base>` (a dry run; add --apply to do it)"
    )]
    NeedsMigration {
        table: &'static str,
        uri: String,
        found: u32,
        step: &'static str,
    },
    /// The layout property is not a number.
    #[error(
        "table {table}: table property possync.layoutVersion is {found:?}, not a layout number; was it set by hand?"
    )]
    BadLayout { table: &'static str, found: String },
    /// Too many concurrent commits won in a row.
    #[error("table {table}: {attempts} commit attempts in a row lost to concurrent commits; try again")]
    Contention { table: &'static str, attempts: usize },
    /// An upsert table holds one key in two live rows: written by something else than possync
    /// (a Spark INSERT, a RESTORE to a version another writer made).
    #[error(
        "table {table} holds {key} in more than one live row (written outside possync: a Spark INSERT, a RESTORE?); possync cannot tell which is right: rebuild the table from the topics with `possync rebuild`"
    )]
    DuplicateKey { table: &'static str, key: String },
    /// The base URI cannot be turned into a table location.
    #[error("bad table location {uri}: {source}")]
    Location {
        uri: String,
        #[source]
        source: DeltaTableError,
    },
    /// The URI names object storage this build was compiled without.
    #[error("table location {uri} needs S3 support: rebuild with `cargo build --release --features s3` (the Docker image has it)")]
    NoS3Support { uri: String },
    /// Delta (storage, log, parquet) failed.
    #[error("table {table}: {source}")]
    Delta {
        table: &'static str,
        #[source]
        source: DeltaTableError,
    },
    /// Arrow refused a batch (a bug in this module).
    #[error("table {table}: {source}")]
    Arrow {
        table: &'static str,
        #[source]
        source: deltalake::arrow::error::ArrowError,
    },
    /// A local file a writer keeps beside the table (the spill file of an upsert's per-key
    /// values) failed.
    #[error("table {table}: {source}")]
    Spill {
        table: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// Parquet settings of every file possync writes: snappy, column-chunk statistics (what Delta's
/// file statistics are made of; no page index), and dictionary encoding only for the string
/// columns that repeat (account, symbol, route, ...). Unique values (event ids, offsets,
/// timestamps, quantities) gain nothing from a dictionary but the hashing: in a catch-up flush
/// at 100k keys that interning took about 6% of the materializer's CPU.
fn writer_properties(schema: &ArrowSchema, unique: &[&str]) -> WriterProperties {
    let mut b = WriterProperties::builder()
        .set_created_by(concat!("possync ", env!("CARGO_PKG_VERSION")).to_string())
        .set_compression(Compression::SNAPPY)
        .set_statistics_enabled(EnabledStatistics::Chunk)
        .set_dictionary_enabled(false);
    for f in schema.fields() {
        if matches!(f.data_type(), DataType::Utf8) && !unique.contains(&f.name().as_str()) {
            b = b.set_column_dictionary_enabled(ColumnPath::from(f.name().as_str()), true);
        }
    }
    b.build()
}

/// URI of one table below the base (a local directory is created if missing).
///
/// # Errors
/// [`TableError::Location`] when the URI is invalid.
pub fn table_url<K: Spec>(base: &str, kind: K) -> Result<url::Url, TableError> {
    let uri = format!("{}/{}", base.trim_end_matches('/'), kind.name());
    if cfg!(not(feature = "s3")) && (uri.starts_with("s3://") || uri.starts_with("s3a://")) {
        return Err(TableError::NoS3Support { uri });
    }
    deltalake::ensure_table_uri(&uri).map_err(|source| TableError::Location { uri, source })
}

/// One open table: the Delta handle plus the txn versions as of its snapshot.
pub struct Table<K> {
    /// Which table.
    pub kind: K,
    /// The Delta handle (snapshot loaded).
    pub delta: DeltaTable,
    /// Txn app id → version, exact as of `delta`'s version.
    pub txn: TxnMap,
    /// Commits made by this process (drives checkpoints).
    commits: u64,
    /// A checkpoint is due (its turn came, or the last attempt failed): tried after each commit
    /// until one succeeds.
    checkpoint_due: bool,
    /// When this process last wrote each txn app id (its `lastUpdated`); drives re-stamping.
    stamps: HashMap<String, std::time::Instant>,
}

impl<K: Spec> Table<K> {
    pub(super) fn err(&self) -> impl Fn(DeltaTableError) -> TableError {
        let table = self.kind.name();
        move |source| TableError::Delta { table, source }
    }

    /// Opens the table, creating it (empty, with its schema) when missing.
    ///
    /// # Errors
    /// [`TableError::SchemaChanged`] when the existing table has another schema;
    /// [`TableError::NewerLayout`] and [`TableError::NeedsMigration`] (see [`super::layout`]);
    /// storage errors.
    pub async fn open(base: &str, kind: K) -> Result<Self, TableError> {
        let t = Self::open_unchecked(base, kind).await?;
        let uri = table_url(base, kind)?;
        K::check_open(&t, uri.as_str())?;
        t.check_schema(uri.as_str())?;
        t.check_deletion_vectors(uri.as_str())?;
        Ok(t)
    }

    /// Opens (or creates) the table without checking its layout, schema or features: for
    /// `possync migrate`, which brings them up to date.
    ///
    /// # Errors
    /// Storage errors.
    pub async fn open_unchecked(base: &str, kind: K) -> Result<Self, TableError> {
        let url = table_url(base, kind)?;
        let table = kind.name();
        let err = move |source| TableError::Delta { table, source };
        let mut delta = DeltaTableBuilder::from_url(url.clone())
            .map_err(err)?
            .build()
            .map_err(err)?;
        if !delta.verify_deltatable_existence().await.map_err(err)? {
            let columns: StructType = kind.schema().as_ref().try_into_kernel().map_err(|e| err(e.into()))?;
            let created = match kind.protocol() {
                Some(protocol) => create_with(&delta, &url, kind, &columns, protocol).await,
                None => CreateBuilder::new()
                    .with_location(url.to_string())
                    .with_table_name(kind.name())
                    .with_columns(columns.fields().cloned())
                    .with_partition_columns(kind.partition_columns())
                    .with_configuration(kind.configuration().into_iter().map(|(k, v)| (k, Some(v))))
                    .with_save_mode(SaveMode::Ignore)
                    // `possync.*` properties are ours, not Delta's.
                    .with_raise_if_key_not_exists(false)
                    // Exactly one creator wins version 0; the others load its table.
                    .with_commit_properties(CommitProperties::default().with_max_retries(0))
                    .await
                    .map(drop),
            };
            match created {
                Ok(()) => tracing::info!(table, %url, "created Delta table"),
                // Another member created it at the same moment.
                Err(DeltaTableError::VersionAlreadyExists(_)) | Err(DeltaTableError::Transaction { .. }) => {}
                Err(e) => return Err(err(e)),
            }
        }
        delta.load().await.map_err(err)?;
        let t = Self {
            kind,
            txn: TxnMap::new(delta.version().map_or(-1, |v| v as i64)),
            delta,
            commits: 0,
            checkpoint_due: false,
            stamps: HashMap::new(),
        };
        t.export_version();
        Ok(t)
    }

    fn check_schema(&self, uri: &str) -> Result<(), TableError> {
        let found = self.delta.snapshot().map_err(self.err())?.snapshot().arrow_schema();
        let expected = self.kind.schema();
        let same = found.fields().len() == expected.fields().len()
            && found
                .fields()
                .iter()
                .zip(expected.fields())
                .all(|(a, b)| a.name() == b.name() && a.data_type().equals_datatype(b.data_type()));
        if same {
            return Ok(());
        }
        let show = |s: &ArrowSchema| {
            s.fields()
                .iter()
                .map(|f| format!("{}:{}", f.name(), f.data_type()))
                .collect::<Vec<_>>()
                .join(", ")
        };
        Err(TableError::SchemaChanged {
            table: self.kind.name(),
            uri: uri.to_string(),
            found: show(&found),
            expected: show(&expected),
        })
    }

    /// The upsert tables must allow deletion vectors (tables of builds before them do not).
    fn check_deletion_vectors(&self, uri: &str) -> Result<(), TableError> {
        if !self.kind.deletion_vectors() {
            return Ok(());
        }
        let snap = self.delta.snapshot().map_err(self.err())?;
        if snap.snapshot().table_properties().enable_deletion_vectors == Some(true) {
            return Ok(());
        }
        Err(TableError::NoDeletionVectors {
            table: self.kind.name(),
            uri: uri.to_string(),
        })
    }

    /// Raises the `possync_table_version` gauge of this table (if it has one) to the loaded
    /// version: at open, after a refresh and after each of our commits, so a restarted
    /// materializer reports the table's version before its first commit.
    fn export_version(&self) {
        self.kind.loaded(self.version());
    }

    /// The loaded version.
    pub fn version(&self) -> i64 {
        self.delta.version().map_or(-1, |v| v as i64)
    }

    /// Loads commits made since our snapshot (by other members or `maintain`) and updates the
    /// txn versions from them. Returns whether the table advanced.
    ///
    /// # Errors
    /// Storage errors.
    pub async fn refresh(&mut self) -> Result<bool, TableError> {
        let before = self.version();
        self.delta.update_incremental(None).await.map_err(self.err())?;
        let after = self.version();
        if after == before {
            return Ok(false);
        }
        self.txn.advance(&self.delta, after).await.map_err(self.err())?;
        self.export_version();
        Ok(true)
    }

    /// Whether a commit exists after our snapshot: one read of the next version's log entry
    /// (a listing of the log would cost what the table's history costs).
    ///
    /// # Errors
    /// Storage errors.
    pub async fn behind(&self) -> Result<bool, TableError> {
        let next = u64::try_from(self.version() + 1).unwrap_or(0);
        let entry = self
            .delta
            .log_store()
            .read_commit_entry(next)
            .await
            .map_err(self.err())?;
        Ok(entry.is_some())
    }

    /// [`Self::refresh`] when [`Self::behind`]: what a writer does before it stages a plan on
    /// the snapshot, so that the plan is stale only for the time staging takes.
    ///
    /// # Errors
    /// Storage errors.
    pub async fn catch_up(&mut self) -> Result<bool, TableError> {
        if self.behind().await? {
            self.refresh().await
        } else {
            Ok(false)
        }
    }

    /// The value of table property `key` as of the loaded snapshot (`None`: not set).
    ///
    /// # Errors
    /// When no snapshot is loaded.
    pub fn property(&self, key: &str) -> Result<Option<String>, TableError> {
        let snap = self.delta.snapshot().map_err(self.err())?;
        Ok(snap.metadata().configuration().get(key).cloned())
    }

    /// Sets table property `key` to `value` in a metadata-only commit against the loaded
    /// snapshot (every other property and the schema kept).
    ///
    /// # Errors
    /// [`TableError::Conflict`] when another commit came first; storage errors.
    pub async fn set_property(&mut self, key: &str, value: &str) -> Result<(), TableError> {
        use deltalake::kernel::MetadataExt as _;
        let err = self.err();
        let metadata = self
            .delta
            .snapshot()
            .map_err(&err)?
            .metadata()
            .clone()
            .add_config_key(key.to_string(), value.to_string())
            .map_err(|e| err(e.into()))?;
        let operation = DeltaOperation::SetTableProperties {
            properties: HashMap::from([(key.to_string(), value.to_string())]),
        };
        self.commit(vec![Action::Metadata(metadata)], &[], operation, 0).await?;
        Ok(())
    }

    /// The table's `delta.setTransactionRetentionDuration` (`None`: txn actions never expire).
    ///
    /// # Errors
    /// When no snapshot is loaded.
    pub fn txn_retention(&self) -> Result<Option<std::time::Duration>, TableError> {
        let snap = self.delta.snapshot().map_err(self.err())?;
        Ok(snap.snapshot().table_properties().set_transaction_retention_duration)
    }

    /// Whether this process wrote `app_id` less than `within` ago.
    pub fn stamped_within(&self, app_id: &str, within: std::time::Duration) -> bool {
        self.stamps.get(app_id).is_some_and(|t| t.elapsed() < within)
    }

    /// The version stored for `app_id` as of our snapshot (`None` = never written).
    ///
    /// # Errors
    /// Storage errors while replaying the log for an app id not seen yet.
    pub async fn txn_version(&mut self, app_id: &str) -> Result<Option<i64>, TableError> {
        let err = self.err();
        self.txn.get(&self.delta, app_id).await.map_err(err)
    }

    /// Writes batches as new parquet files (not yet committed) and returns their add actions.
    ///
    /// # Errors
    /// Storage or Arrow errors.
    pub async fn write_files(&self, batches: &[RecordBatch]) -> Result<Vec<Add>, TableError> {
        if batches.iter().all(|b| b.num_rows() == 0) {
            return Ok(vec![]);
        }
        let mut w = RecordBatchWriter::for_table(&self.delta)
            .map_err(self.err())?
            .with_writer_properties(writer_properties(&batches[0].schema(), self.kind.unique_strings()));
        for b in batches.iter().filter(|b| b.num_rows() > 0) {
            w.write(b.clone()).await.map_err(self.err())?;
        }
        w.flush().await.map_err(self.err())
    }

    /// Deletes files this process wrote for a commit that did not happen (`paths` relative to
    /// the table root), so that a lost race leaves no orphan behind. Best effort: a file that
    /// stays is an orphan vacuum deletes after the table's retention.
    pub async fn discard(&self, paths: Vec<deltalake::Path>) {
        use deltalake::logstore::object_store::ObjectStoreExt as _;
        let store = self.delta.object_store();
        for p in paths {
            if let Err(e) = store.delete(&p).await {
                tracing::warn!(table = self.kind.name(), path = %p, error = %e, "could not delete a file of a commit that lost its race; vacuum deletes it after the retention");
            }
        }
    }

    /// Commits `actions` plus one txn action per `(app_id, version)` against our snapshot.
    ///
    /// # Errors
    /// [`TableError::Conflict`] when someone else committed since our snapshot; storage errors.
    pub async fn commit(
        &mut self,
        actions: Vec<Action>,
        txns: &[(String, i64)],
        operation: DeltaOperation,
        checkpoint_every: u64,
    ) -> Result<i64, TableError> {
        self.commit_with(actions, txns, operation, checkpoint_every, vec![])
            .await
    }

    /// [`Self::commit`] with `info` added to the commit's `commitInfo` (for example an upsert
    /// table's summary of its rows after the commit).
    ///
    /// # Errors
    /// As [`Self::commit`].
    pub async fn commit_with(
        &mut self,
        actions: Vec<Action>,
        txns: &[(String, i64)],
        operation: DeltaOperation,
        checkpoint_every: u64,
        info: Vec<(String, serde_json::Value)>,
    ) -> Result<i64, TableError> {
        let now = chrono::Utc::now().timestamp_millis();
        let txn_actions: Vec<Transaction> = txns
            .iter()
            .map(|(id, v)| Transaction::new_with_last_update(id, *v, Some(now)))
            .collect();
        let blind = matches!(
            operation,
            DeltaOperation::Write {
                mode: SaveMode::Append,
                predicate: None,
                ..
            }
        ) && actions.iter().all(|a| matches!(a, Action::Add(_)));
        let props = CommitProperties::default()
            .with_max_retries(if blind { APPEND_RETRIES } else { 0 })
            .with_create_checkpoint(false)
            .with_cleanup_expired_logs(Some(false))
            .with_application_transactions(txn_actions)
            .with_metadata(info);
        let snapshot = self.delta.snapshot().map_err(self.err())?;
        let base = self.version();
        let result = CommitBuilder::from(props)
            .with_actions(actions)
            .build(Some(snapshot), self.delta.log_store(), operation)
            .await;
        let finalized = match result {
            Ok(f) => f,
            Err(e) if is_conflict(&e) => return Err(TableError::Conflict(self.kind.name())),
            Err(e) => return Err(self.err()(e)),
        };
        let version = finalized.version() as i64;
        let rebased = version > base + 1;
        // After a rebase the snapshot includes the commits it landed after.
        self.delta.state = Some(finalized.snapshot());
        if rebased {
            REBASED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            crate::metrics::global()
                .commit_rebases
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            self.txn.advance(&self.delta, version - 1).await.map_err(self.err())?;
        }
        self.txn.committed(version, txns);
        let stamped = std::time::Instant::now();
        for (id, _) in txns {
            self.stamps.insert(id.clone(), stamped);
        }
        self.commits += 1;
        crate::metrics::global()
            .delta_commits
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        crate::metrics::global().committed_now();
        self.export_version();
        if checkpoint_every > 0 && version > 0 && (version as u64).is_multiple_of(checkpoint_every) {
            self.checkpoint_due = true;
        }
        // The commit stands whatever happens to the checkpoint: a failure is logged, counted and
        // retried after the next commit (the log stays readable without it, only slower to load).
        if self.checkpoint_due {
            match super::maintain::checkpoint(self).await {
                Ok(()) => self.checkpoint_due = false,
                Err(e) => checkpoint_failed(self.kind.name(), version, &e),
            }
        }
        Ok(version)
    }
}

/// Commits version 0 of a table with exactly `protocol`. delta-rs' `CreateBuilder` adds the
/// `invariants` and `appendOnly` writer features to any writer-7 protocol, and without
/// DataFusion it then refuses to write the table it made (`UnsupportedTableFeatures`).
async fn create_with<K: Spec>(
    delta: &DeltaTable,
    url: &url::Url,
    kind: K,
    columns: &StructType,
    protocol: deltalake::kernel::Protocol,
) -> Result<(), DeltaTableError> {
    use deltalake::kernel::MetadataExt as _;
    // Top-level columns are declared nullable: Spark counts a NOT NULL column as the
    // `invariants` feature, which a writer-7 protocol must then list, and which delta-rs
    // cannot write without DataFusion. The writer never produces nulls where the Arrow schema
    // has none.
    let columns = StructType::try_new(
        columns
            .fields()
            .map(|f| deltalake::kernel::StructField::new(f.name(), f.data_type().clone(), true)),
    )?;
    let metadata = deltalake::kernel::new_metadata(&columns, kind.partition_columns(), kind.configuration())?
        .with_name(kind.name().to_string())?;
    let operation = DeltaOperation::Create {
        mode: SaveMode::Ignore,
        metadata: metadata.clone(),
        location: url.clone(),
        protocol: protocol.clone(),
    };
    CommitBuilder::from(CommitProperties::default().with_max_retries(0))
        .with_actions(vec![Action::Protocol(protocol), Action::Metadata(metadata)])
        .build(None, delta.log_store(), operation)
        .await?;
    Ok(())
}

/// The object-store path of `add`'s data file, relative to the table root.
pub fn path_of(add: &Add) -> deltalake::Path {
    deltalake::Path::parse(&add.path).unwrap_or_else(|_| deltalake::Path::from(add.path.as_str()))
}

/// The remove action that drops the file of `add` (with its deletion vector, if any).
pub fn remove_of(add: &Add, data_change: bool) -> deltalake::kernel::Remove {
    deltalake::kernel::Remove {
        path: add.path.clone(),
        data_change,
        deletion_timestamp: Some(chrono::Utc::now().timestamp_millis()),
        extended_file_metadata: Some(true),
        partition_values: Some(add.partition_values.clone()),
        size: Some(add.size),
        deletion_vector: add.deletion_vector.clone(),
        tags: None,
        base_row_id: None,
        default_row_commit_version: None,
    }
}

/// A checkpoint or log cleanup failed after a good commit: log it and count it; the table
/// retries after its next commit.
fn checkpoint_failed(table: &str, version: i64, e: &TableError) {
    crate::metrics::global()
        .checkpoint_failures
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    tracing::warn!(
        table,
        version,
        error = %e,
        "checkpoint failed after a successful commit; retrying after the next commit"
    );
}

fn is_conflict(e: &DeltaTableError) -> bool {
    matches!(
        e,
        DeltaTableError::VersionAlreadyExists(_)
            | DeltaTableError::Transaction {
                source: TransactionError::MaxCommitAttempts(_)
                    | TransactionError::CommitConflict(_)
                    | TransactionError::VersionAlreadyExists(_)
            }
    )
}

/// Whether `base` is a local path (or `file://` URL) rather than object storage.
fn is_local(base: &str) -> bool {
    !base.contains("://") || base.starts_with("file://")
}

/// Whether a Delta table named `name` exists under `base` (no directory is created).
///
/// # Errors
/// Storage errors for remote locations.
pub async fn exists(base: &str, name: &str) -> Result<bool, TableError> {
    if is_local(base) {
        let root = base.strip_prefix("file://").unwrap_or(base);
        return Ok(std::path::Path::new(root).join(name).join("_delta_log").is_dir());
    }
    let uri = format!("{}/{name}", base.trim_end_matches('/'));
    let location = |source| TableError::Location {
        uri: uri.clone(),
        source,
    };
    let url = deltalake::ensure_table_uri(&uri).map_err(location)?;
    let table = DeltaTableBuilder::from_url(url)
        .map_err(location)?
        .build()
        .map_err(location)?;
    table
        .verify_deltatable_existence()
        .await
        .map_err(|source| TableError::Delta { table: "?", source })
}

/// The `DeltaOperation` of an append.
pub fn append_operation<K: Spec>(kind: K) -> DeltaOperation {
    let p = kind.partition_columns();
    DeltaOperation::Write {
        mode: SaveMode::Append,
        partition_by: (!p.is_empty()).then_some(p),
        predicate: None,
    }
}

/// The `DeltaOperation` of an upsert table rewrite (remove all + add one file).
pub fn rewrite_operation() -> DeltaOperation {
    DeltaOperation::Write {
        mode: SaveMode::Overwrite,
        partition_by: None,
        predicate: None,
    }
}
