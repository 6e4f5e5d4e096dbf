//! One flush: the frozen buffers become Delta commits, table by table, exactly once.
//!
//! Order per flush: dead letters (table; the topic copy is queued after the commit and sent in
//! the background, see [`super::deadletter`]), `position_events`, `positions_current`,
//! `position_queue`, `registry_events`, `strategy_registry`, `executions`. Each commit holds, for every
//! Kafka partition in the flush that the table has not seen up to the flush's last offset, the
//! rows above the table's stored version and a txn action with that last offset. Dead letters go first so that
//! any offset the position tables hold has had its dead letters written (the restart position
//! ignores `dead_letters`; replayed poison is then dropped by its own txn version).
//!
//! Before staging a plan on a table's snapshot (the upsert tables, the registry), the pipeline
//! catches the table up with what other members committed (one read of the next log entry
//! when nothing was). Appends need no catch-up: delta-rs lands them after concurrent appends
//! (see [`super::tables`]). A commit conflict (another member, or `possync maintain`) reloads
//! the table, merges its rows (upsert tables), re-filters by the new txn versions and tries
//! again; the files written for the lost attempt are deleted, so no orphan stays behind.

use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;

use deltalake::arrow::array::{AsArray, RecordBatch};
use deltalake::arrow::datatypes::Int64Type;
use deltalake::kernel::Action;
use deltalake::protocol::DeltaOperation;
use rdkafka::ClientConfig;

use super::buffer::{FrozenPartition, Role};
use super::deadletter::{self, DeadLetter};
use super::expiry_guard::ExpiryGuard;
use super::offsets::{app_id, tables_of};
use super::tables::{append_operation, path_of, rewrite_operation, Table, TableError, TableKind};
use super::upsert::core::{Changes, Classed, Key, Staged, Upsert};
use super::upsert::{self, summary, Current, Hot, Queue, RegistryState, SpillValue, Spilled};
use super::MaterializeError;
use crate::kafka::Topics;

/// How an upsert table turns a flush's rows into its new rows and values (`current::changes`,
/// `queue_table::changes`).
type ChangesOf<T> = fn(&mut Spilled<T>, &[RecordBatch]) -> Result<Option<Changes<Hot>>, TableError>;

/// Attempts per table and flush before giving up (each attempt follows a concurrent commit).
const MAX_ATTEMPTS: usize = 100;

static CONFLICTS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Commit conflicts met (and resolved by reload + retry) by this process so far.
pub fn conflicts() -> u64 {
    CONFLICTS.load(Relaxed)
}

/// Open tables plus the in-memory state of the upsert tables.
pub struct Pipeline {
    /// Every table, open.
    pub tables: HashMap<TableKind, Table>,
    /// Offset namespace (cluster id) of the txn app ids.
    pub namespace: String,
    /// Topic names.
    pub topics: Topics,
    /// Checkpoint every N commits.
    pub checkpoint_every: u64,
    current: Current,
    queue: Queue,
    registry: RegistryState,
    /// Closed rows older than this leave `positions_current` and `position_queue`.
    closed_retention: Option<std::time::Duration>,
    /// Holds the retention delete back while older events may still arrive.
    expiry_guard: Option<ExpiryGuard>,
    last_expiry: Option<std::time::Instant>,
    dlq: deadletter::TopicCopy,
    conflicts: u64,
}

impl Pipeline {
    /// Opens (creating if needed) every table under `base` and loads the upsert states.
    ///
    /// # Errors
    /// Table errors.
    pub async fn open(
        base: &str,
        namespace: String,
        topics: Topics,
        checkpoint_every: u64,
        dlq: ClientConfig,
        state_dir: &std::path::Path,
    ) -> Result<Self, MaterializeError> {
        let mut tables = HashMap::new();
        for kind in TableKind::ALL {
            tables.insert(kind, Table::open(base, kind).await?);
        }
        let dead_letter_topic = topics.deadletter.clone();
        let mut p = Self {
            tables,
            namespace,
            topics,
            checkpoint_every,
            current: Current::new("positions_current", state_dir)?,
            queue: Queue::new("position_queue", state_dir)?,
            registry: RegistryState::new(),
            closed_retention: None,
            expiry_guard: None,
            last_expiry: None,
            dlq: deadletter::TopicCopy::spawn(dlq, dead_letter_topic)?,
            conflicts: 0,
        };
        for kind in [
            TableKind::PositionsCurrent,
            TableKind::PositionQueue,
            TableKind::StrategyRegistry,
        ] {
            p.absorb(kind).await?;
        }
        Ok(p)
    }

    /// Commit conflicts this pipeline met (and resolved by reload + retry).
    pub fn conflicts(&self) -> u64 {
        self.conflicts
    }

    fn table(&mut self, kind: TableKind) -> &mut Table {
        self.tables.get_mut(&kind).expect("every table is open")
    }

    /// Brings the in-memory state of an upsert table up to its loaded snapshot (reading only
    /// what changed since the state was last in sync).
    async fn absorb(&mut self, kind: TableKind) -> Result<(), MaterializeError> {
        let t = self.tables.get(&kind).expect("every table is open");
        match kind {
            TableKind::PositionsCurrent => {
                self.current.sync(t).await?;
            }
            TableKind::PositionQueue => {
                self.queue.sync(t).await?;
            }
            TableKind::StrategyRegistry => {
                let rows = t.read_all().await?;
                let other = upsert::registry_from_batches(&rows).map_err(arrow(kind))?;
                upsert::join_registry(&mut self.registry, other);
            }
            _ => {}
        }
        Ok(())
    }

    /// Deletes closed rows older than `retention` from `positions_current` and
    /// `position_queue` (checked at most once a minute, after a flush), once `guard` says no
    /// older event of theirs can still arrive.
    pub fn set_closed_retention(&mut self, retention: Option<std::time::Duration>, guard: ExpiryGuard) {
        self.closed_retention = retention;
        self.expiry_guard = Some(guard);
    }

    /// Rows of `part` the table does not hold yet, and the txn to record (`None`: all held).
    async fn unseen(
        &mut self,
        kind: TableKind,
        part: &FrozenPartition,
    ) -> Result<Option<(RecordBatch, (String, i64))>, MaterializeError> {
        let id = app_id(&self.namespace, &part.topic, part.partition);
        let stored = self.table(kind).txn_version(&id).await?.unwrap_or(-1);
        if stored >= part.last_offset {
            return Ok(None);
        }
        let offsets = part
            .rows
            .column_by_name("kafka_offset")
            .expect("kafka_offset column")
            .as_primitive::<Int64Type>();
        let start = offsets.values().partition_point(|o| *o <= stored);
        Ok(Some((
            part.rows.slice(start, part.rows.num_rows() - start),
            (id, part.last_offset),
        )))
    }

    /// Commits a flush.
    ///
    /// # Errors
    /// Table, Kafka (dead-letter topic) errors; [`MaterializeError::Contention`] after
    /// [`MAX_ATTEMPTS`] conflicts in a row.
    pub async fn commit(&mut self, parts: &[FrozenPartition]) -> Result<(), MaterializeError> {
        self.commit_dead_letters(parts).await?;
        let positions: Vec<&FrozenPartition> = parts
            .iter()
            .filter(|p| matches!(p.role, Role::Active | Role::Queued))
            .collect();
        let registry: Vec<&FrozenPartition> = parts.iter().filter(|p| p.role == Role::Registry).collect();
        let executions: Vec<&FrozenPartition> = parts.iter().filter(|p| p.role == Role::Executions).collect();
        if !positions.is_empty() {
            let t0 = std::time::Instant::now();
            self.commit_events(&positions).await?;
            let t1 = std::time::Instant::now();
            self.commit_current(&positions).await?;
            let t2 = std::time::Instant::now();
            self.commit_queue(&positions).await?;
            let t3 = std::time::Instant::now();
            self.expire_closed().await?;
            if t0.elapsed() > std::time::Duration::from_millis(500) {
                tracing::warn!(
                    events_ms = (t1 - t0).as_millis() as u64,
                    current_ms = (t2 - t1).as_millis() as u64,
                    queue_ms = (t3 - t2).as_millis() as u64,
                    expire_ms = t3.elapsed().as_millis() as u64,
                    "slow flush"
                );
            }
        }
        if !registry.is_empty() {
            self.commit_registry_events(&registry).await?;
            self.commit_registry(&registry).await?;
        }
        if !executions.is_empty() {
            // Same txn mechanism as `position_events`: a replay drops what the table holds.
            self.commit_append(TableKind::Executions, &executions).await?;
        }
        Ok(())
    }

    /// Re-stamps the txn actions of `owned` partitions that this process has not written for
    /// `older_than` (or never): a commit per table with no data, only their txn actions at the
    /// versions the table already holds, and a fresh `lastUpdated`. So an idle partition's app
    /// id never reaches the tables' `delta.setTransactionRetentionDuration` while a member owns
    /// it. The versions come from the snapshot the commit is made against, so a re-stamp can
    /// never move a partition back; a concurrent commit means reload and try again. Returns the
    /// txn actions written.
    ///
    /// # Errors
    /// Table errors; [`MaterializeError::Contention`].
    pub async fn restamp(
        &mut self,
        owned: &[(String, i32)],
        older_than: std::time::Duration,
    ) -> Result<usize, MaterializeError> {
        let mut written = 0;
        for kind in TableKind::ALL {
            let mine: Vec<&(String, i32)> = owned
                .iter()
                .filter(|(t, _)| kind == TableKind::DeadLetters || tables_of(&self.topics, t).contains(&kind))
                .collect();
            for attempt in 0.. {
                let mut txns = Vec::new();
                for (topic, p) in &mine {
                    let id = app_id(&self.namespace, topic, *p);
                    let t = self.table(kind);
                    if t.stamped_within(&id, older_than) {
                        continue;
                    }
                    if let Some(v) = t.txn_version(&id).await? {
                        txns.push((id, v));
                    }
                }
                if txns.is_empty() {
                    break;
                }
                let every = self.checkpoint_every;
                match self
                    .table(kind)
                    .commit(vec![], &txns, append_operation(kind), every)
                    .await
                {
                    Ok(_) => {
                        tracing::debug!(table = kind.name(), partitions = txns.len(), "txn actions re-stamped");
                        written += txns.len();
                        break;
                    }
                    Err(TableError::Conflict(_)) => self.retry(kind, attempt).await?,
                    Err(e) => return Err(e.into()),
                }
            }
        }
        Ok(written)
    }

    /// Loads what other writers committed since our snapshot, if anything (one read of the next
    /// log entry when nothing did), so that a plan staged next is stale only for the time it
    /// takes to stage it. Not a conflict: nothing was attempted.
    async fn catch_up(&mut self, kind: TableKind) -> Result<(), MaterializeError> {
        if self.table(kind).catch_up().await? && !kind.append_only() {
            self.absorb(kind).await?;
        }
        Ok(())
    }

    async fn retry(&mut self, kind: TableKind, attempt: usize) -> Result<(), MaterializeError> {
        self.conflicted(kind, attempt)?;
        self.reload_state(kind).await
    }

    /// Reloads the table and, for an upsert table, its rows.
    async fn reload_state(&mut self, kind: TableKind) -> Result<(), MaterializeError> {
        self.table(kind).refresh().await?;
        if !kind.append_only() {
            self.absorb(kind).await?;
        }
        Ok(())
    }

    /// Whether `parts` still hold exactly `batches` and `txns` that the table lacks: no other
    /// writer wrote one of these partitions since they were computed.
    async fn same_unseen(
        &mut self,
        kind: TableKind,
        parts: &[&FrozenPartition],
        batches: &[RecordBatch],
        txns: &[(String, i64)],
    ) -> Result<bool, MaterializeError> {
        let (now, now_txns) = self.unseen_all(kind, parts).await?;
        Ok(now_txns == txns
            && now
                .iter()
                .map(|b| b.num_rows())
                .eq(batches.iter().map(|b| b.num_rows())))
    }

    /// Counts a conflict: a plan made again because another writer's commit won.
    fn conflicted(&mut self, kind: TableKind, attempt: usize) -> Result<(), MaterializeError> {
        if attempt + 1 >= MAX_ATTEMPTS {
            return Err(MaterializeError::Contention {
                table: kind.name(),
                attempts: MAX_ATTEMPTS,
            });
        }
        CONFLICTS.fetch_add(1, Relaxed);
        crate::metrics::global().commit_conflicts.fetch_add(1, Relaxed);
        self.conflicts += 1;
        tracing::info!(table = kind.name(), attempt, "commit conflict; reloading");
        Ok(())
    }

    /// Reloads an upsert table after its commit lost a race, to see whether the plan still
    /// applies ([`super::upsert::core::Upsert::still_applies`]). Every reload follows a commit
    /// of another writer, so [`MAX_ATTEMPTS`] of them in one flush is contention.
    async fn reload(&mut self, kind: TableKind, reloads: &mut usize) -> Result<(), MaterializeError> {
        *reloads += 1;
        if *reloads >= MAX_ATTEMPTS {
            return Err(MaterializeError::Contention {
                table: kind.name(),
                attempts: MAX_ATTEMPTS,
            });
        }
        self.reload_state(kind).await
    }

    async fn commit_dead_letters(&mut self, parts: &[FrozenPartition]) -> Result<(), MaterializeError> {
        let kind = TableKind::DeadLetters;
        for attempt in 0.. {
            let mut letters: Vec<&DeadLetter> = Vec::new();
            let mut txns = Vec::new();
            for p in parts.iter().filter(|p| !p.dead.is_empty()) {
                let id = app_id(&self.namespace, &p.topic, p.partition);
                let stored = self.table(kind).txn_version(&id).await?.unwrap_or(-1);
                let fresh: Vec<&DeadLetter> = p.dead.iter().filter(|d| d.offset > stored).collect();
                if !fresh.is_empty() {
                    letters.extend(fresh);
                    txns.push((id, p.last_offset));
                }
            }
            if letters.is_empty() {
                return Ok(());
            }
            let batch =
                deadletter::batch(&letters, &self.namespace, crate::events::now_micros()).map_err(arrow(kind))?;
            let adds = self.table(kind).write_files(&[batch]).await?;
            let paths: Vec<deltalake::Path> = adds.iter().map(path_of).collect();
            let actions = adds.into_iter().map(Action::Add).collect();
            let every = self.checkpoint_every;
            match self
                .table(kind)
                .commit(actions, &txns, append_operation(kind), every)
                .await
            {
                Ok(_) => {
                    crate::metrics::global()
                        .dead_letters
                        .fetch_add(letters.len() as u64, Relaxed);
                    // The table is the record; the topic copy never holds up the flush.
                    self.dlq.offer(letters.iter().copied());
                    return Ok(());
                }
                Err(TableError::Conflict(_)) => {
                    self.table(kind).discard(paths).await;
                    self.retry(kind, attempt).await?
                }
                Err(e) => return Err(e.into()),
            }
        }
        unreachable!("the attempt loop returns")
    }

    async fn commit_events(&mut self, parts: &[&FrozenPartition]) -> Result<(), MaterializeError> {
        let (active, queued) = self.commit_append(TableKind::PositionEvents, parts).await?;
        let m = crate::metrics::global();
        m.materialized_active.fetch_add(active, Relaxed);
        m.materialized_queued.fetch_add(queued, Relaxed);
        Ok(())
    }

    /// Appends the registry rows `registry_events` does not hold yet (same txn mechanism as
    /// `position_events`: a replay drops what the table's txn versions already cover).
    async fn commit_registry_events(&mut self, parts: &[&FrozenPartition]) -> Result<(), MaterializeError> {
        self.commit_append(TableKind::RegistryEvents, parts).await.map(drop)
    }

    /// Appends to an append-only table the rows of `parts` it does not hold yet, with their txn
    /// actions; returns the rows committed from the active topic and from the others.
    async fn commit_append(
        &mut self,
        kind: TableKind,
        parts: &[&FrozenPartition],
    ) -> Result<(u64, u64), MaterializeError> {
        // Files already written for a given filtering, reused when a retry filters the same.
        let mut written: Option<(Vec<usize>, Vec<deltalake::kernel::Add>)> = None;
        for attempt in 0.. {
            let mut batches = Vec::new();
            let mut txns = Vec::new();
            let mut shape = Vec::new();
            let (mut active, mut other) = (0u64, 0u64);
            for p in parts {
                if let Some((rows, txn)) = self.unseen(kind, p).await? {
                    shape.push(rows.num_rows());
                    match p.role {
                        Role::Active => active += rows.num_rows() as u64,
                        _ => other += rows.num_rows() as u64,
                    }
                    batches.push(rows);
                    txns.push(txn);
                } else {
                    shape.push(usize::MAX);
                }
            }
            if txns.is_empty() || written.as_ref().is_some_and(|(s, _)| *s != shape) {
                // Another writer holds some of these rows now: the files written for the old
                // filtering are nobody's.
                if let Some((_, old)) = written.take() {
                    self.table(kind).discard(old.iter().map(path_of).collect()).await;
                }
            }
            if txns.is_empty() {
                return Ok((0, 0));
            }
            let adds = match &written {
                Some((_, adds)) => adds.clone(),
                None => {
                    let adds = self.table(kind).write_files(&batches).await?;
                    written = Some((shape, adds.clone()));
                    adds
                }
            };
            let actions = adds.into_iter().map(Action::Add).collect();
            let every = self.checkpoint_every;
            match self
                .table(kind)
                .commit(actions, &txns, append_operation(kind), every)
                .await
            {
                Ok(_) => return Ok((active, other)),
                Err(TableError::Conflict(_)) => {
                    if let Err(e) = self.retry(kind, attempt).await {
                        let paths = written.iter().flat_map(|(_, a)| a.iter().map(path_of)).collect();
                        self.table(kind).discard(paths).await;
                        return Err(e);
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
        unreachable!("the attempt loop returns")
    }

    /// Rows of `parts` some table does not hold yet, and the txn actions to record.
    async fn unseen_all(
        &mut self,
        kind: TableKind,
        parts: &[&FrozenPartition],
    ) -> Result<(Vec<RecordBatch>, Vec<(String, i64)>), MaterializeError> {
        let (mut batches, mut txns) = (Vec::new(), Vec::new());
        for p in parts {
            if let Some((rows, txn)) = self.unseen(kind, p).await? {
                batches.push(rows);
                txns.push(txn);
            }
        }
        Ok((batches, txns))
    }

    async fn commit_current(&mut self, parts: &[&FrozenPartition]) -> Result<(), MaterializeError> {
        let kind = TableKind::PositionsCurrent;
        self.commit_upsert(
            kind,
            parts,
            |p| (p.tables.get_mut(&kind).expect("every table is open"), &mut p.current),
            upsert::current::changes,
        )
        .await
    }

    async fn commit_queue(&mut self, parts: &[&FrozenPartition]) -> Result<(), MaterializeError> {
        let kind = TableKind::PositionQueue;
        self.commit_upsert(
            kind,
            parts,
            |p| (p.tables.get_mut(&kind).expect("every table is open"), &mut p.queue),
            upsert::queue_table::changes,
        )
        .await
    }

    /// Commits the rows of `parts` an upsert table lacks: caught up, planned (`changes` makes
    /// the new rows and values), committed; after a lost race the same plan is committed again
    /// when it still applies (a rebase), else it is discarded and planned again (a conflict).
    async fn commit_upsert<T: SpillValue>(
        &mut self,
        kind: TableKind,
        parts: &[&FrozenPartition],
        table_and_state: impl Fn(&mut Self) -> (&mut Table, &mut Spilled<T>),
        changes: ChangesOf<T>,
    ) -> Result<(), MaterializeError> {
        let every = self.checkpoint_every;
        let mut reloads = 0;
        for attempt in 0.. {
            self.catch_up(kind).await?;
            let (batches, txns) = self.unseen_all(kind, parts).await?;
            if txns.is_empty() {
                return Ok(());
            }
            let (t, state) = table_and_state(self);
            let (rows, changed) = changes(state, &batches)?.map_or((None, vec![]), |(b, c)| (Some(b), c));
            let mut staged = state.rows.stage(t, rows, changed, vec![]).await?;
            loop {
                let (t, state) = table_and_state(self);
                match commit_staged(t, &mut state.rows, staged, &txns, every).await {
                    Ok(()) => {
                        // Optional too: a failed rewrite keeps the old spill file in use.
                        if let Err(e) = state.collect_garbage() {
                            tracing::warn!(error = %e, "spill file garbage collection failed; the old file stays in use (is the --state-dir disk full?)");
                        }
                        return Ok(());
                    }
                    Err((TableError::Conflict(_), back)) => {
                        self.reload(kind, &mut reloads).await?;
                        let applies = table_and_state(self).1.rows.still_applies(&back);
                        if applies && self.same_unseen(kind, parts, &batches, &txns).await? {
                            rebased(kind);
                            staged = back;
                            continue;
                        }
                        self.table(kind).discard(back.written()).await;
                        self.conflicted(kind, attempt)?;
                        break;
                    }
                    Err((e, _)) => return Err(e.into()),
                }
            }
        }
        unreachable!("the attempt loop returns")
    }

    /// The retention delete of closed rows (at most once a minute).
    async fn expire_closed(&mut self) -> Result<(), MaterializeError> {
        let Some(retention) = self.closed_retention else {
            return Ok(());
        };
        if self
            .last_expiry
            .is_some_and(|t| t.elapsed() < std::time::Duration::from_secs(60))
        {
            return Ok(());
        }
        self.last_expiry = Some(std::time::Instant::now());
        let cutoff = crate::events::now_micros() - retention.as_micros() as i64;
        for kind in [TableKind::PositionsCurrent, TableKind::PositionQueue] {
            for attempt in 0.. {
                self.catch_up(kind).await?;
                let keys = match kind {
                    TableKind::PositionsCurrent => self.current.expired(cutoff),
                    _ => self.queue.expired(cutoff),
                };
                if keys.is_empty() {
                    break;
                }
                let n = keys.len();
                let t = self.tables.get_mut(&kind).expect("every table is open");
                let Some(guard) = &self.expiry_guard else {
                    break;
                };
                if let Some(why) = guard.blocker(t, &self.namespace, cutoff).await? {
                    crate::metrics::global().closed_expiry_deferred.fetch_add(1, Relaxed);
                    tracing::info!(
                        table = kind.name(),
                        rows = n,
                        %why,
                        "closed positions past retention kept until every position partition is materialized past the cutoff"
                    );
                    break;
                }
                let result = match kind {
                    TableKind::PositionsCurrent => delete_keys(t, &mut self.current.rows, keys).await,
                    _ => delete_keys(t, &mut self.queue.rows, keys).await,
                };
                match result {
                    Ok(()) => {
                        crate::metrics::global().closed_expired.fetch_add(n as u64, Relaxed);
                        tracing::info!(table = kind.name(), rows = n, "closed positions past retention deleted");
                        break;
                    }
                    Err(TableError::Conflict(_)) => self.retry(kind, attempt).await?,
                    Err(e) => return Err(e.into()),
                }
            }
        }
        Ok(())
    }

    async fn commit_registry(&mut self, parts: &[&FrozenPartition]) -> Result<(), MaterializeError> {
        let kind = TableKind::StrategyRegistry;
        for attempt in 0.. {
            self.catch_up(kind).await?;
            let (batches, txns) = self.unseen_all(kind, parts).await?;
            if txns.is_empty() {
                return Ok(());
            }
            // The registry is small (one row per strategy entry): rewritten whole.
            let next = upsert::fold_registry(&self.registry, &batches).map_err(arrow(kind))?;
            let mut actions = Vec::new();
            let mut paths = Vec::new();
            if let Some(n) = &next {
                let batch = upsert::registry_batch(n).map_err(arrow(kind))?;
                let t = self.table(kind);
                actions.extend(t.files()?.into_iter().map(|f| Action::Remove(f.remove)));
                let adds = t.write_files(&[batch]).await?;
                paths.extend(adds.iter().map(path_of));
                actions.extend(adds.into_iter().map(Action::Add));
            }
            let every = self.checkpoint_every;
            match self
                .table(kind)
                .commit(actions, &txns, rewrite_operation(), every)
                .await
            {
                Ok(_) => {
                    if let Some(n) = next {
                        self.registry = n;
                    }
                    return Ok(());
                }
                Err(TableError::Conflict(_)) => {
                    self.table(kind).discard(paths).await;
                    self.retry(kind, attempt).await?
                }
                Err(e) => return Err(e.into()),
            }
        }
        unreachable!("the attempt loop returns")
    }
}

/// Commits a staged upsert plan with its txn actions and the table's summary after it; on
/// success the state remembers it and, when due, a compaction follows (its own `OPTIMIZE`
/// commit, with the same summary; a lost race skips it: the next flush re-plans).
async fn commit_staged<V: Clone + Classed>(
    t: &mut Table,
    state: &mut Upsert<V>,
    staged: Staged<V>,
    txns: &[(String, i64)],
    every: u64,
) -> Result<(), (TableError, Staged<V>)> {
    let op = DeltaOperation::Update { predicate: None };
    let info = summary::info(t.kind, &state.counts_after(&staged));
    if let Err(e) = t.commit_with(staged.actions.clone(), txns, op, every, info).await {
        return Err((e, staged));
    }
    state.committed(staged);
    // The flush is done. Compaction is optional work: a failure is a warning, the next
    // commit tries again (issue 20 #8: it stopped the process after a good commit).
    let started = std::time::Instant::now();
    let compaction = match state.compaction(t).await {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(table = t.kind.name(), error = %e, "compaction could not read the files it would rewrite; skipped (the commit stands)");
            None
        }
    };
    if let Some(c) = compaction {
        let rewritten: usize = c.new_rows();
        let op = DeltaOperation::Optimize {
            predicate: None,
            target_size: 0,
        };
        let info = summary::info(t.kind, &state.counts_after(&c));
        match t.commit_with(c.actions.clone(), &[], op, every, info).await {
            Ok(_) => {
                state.committed(c);
                tracing::debug!(
                    table = t.kind.name(),
                    rows = rewritten,
                    ms = started.elapsed().as_millis() as u64,
                    files = state.files(),
                    "compacted"
                );
            }
            Err(TableError::Conflict(_)) => {
                t.discard(c.written()).await;
                tracing::debug!(table = t.kind.name(), "compaction lost a race; skipped")
            }
            Err(e) => {
                tracing::warn!(table = t.kind.name(), error = %e, "compaction commit failed; skipped (the commit stands)")
            }
        }
    }
    Ok(())
}

/// Counts a plan committed again after a reload (see [`Upsert::still_applies`]).
fn rebased(kind: TableKind) {
    tracing::debug!(table = kind.name(), "commit rebased on other writers' commits");
    crate::metrics::global().commit_rebases.fetch_add(1, Relaxed);
}

/// Deletes the live rows of `keys` (deletion vectors only; no txn: retention is not an offset).
async fn delete_keys<V: Clone + Classed>(
    t: &mut Table,
    state: &mut Upsert<V>,
    keys: Vec<Key>,
) -> Result<(), TableError> {
    let staged = state.stage(t, None, vec![], keys).await?;
    let op = DeltaOperation::Delete {
        predicate: Some("position = 0 AND closed longer than --closed-retention".into()),
    };
    let info = summary::info(t.kind, &state.counts_after(&staged));
    if let Err(e) = t.commit_with(staged.actions.clone(), &[], op, every_none(), info).await {
        if matches!(e, TableError::Conflict(_)) {
            t.discard(staged.written()).await;
        }
        return Err(e);
    }
    state.committed(staged);
    Ok(())
}

/// Checkpoints follow the data commits only.
fn every_none() -> u64 {
    0
}

fn arrow(kind: TableKind) -> impl Fn(deltalake::arrow::error::ArrowError) -> MaterializeError {
    move |source| {
        TableError::Arrow {
            table: kind.name(),
            source,
        }
        .into()
    }
}

#[cfg(test)]
mod tests;
