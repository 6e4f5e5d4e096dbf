//! The commits of the upsert tables (`positions_current`, `position_queue`) and the registry:
//! a plan staged on the caught-up snapshot, committed again after a lost race when it still
//! applies (see [`Upsert::still_applies`]), and the deletes of closed positions past
//! `--closed-retention`.

use std::sync::atomic::Ordering::Relaxed;

use deltalake::arrow::array::RecordBatch;
use deltalake::kernel::Action;
use deltalake::protocol::DeltaOperation;

use super::{arrow, every_none, Pipeline};
use crate::materialize::buffer::FrozenPartition;
use crate::materialize::tables::{path_of, rewrite_operation, Table, TableError, TableKind};
use crate::materialize::upsert::core::{Changes, Classed, Key, Staged, Upsert};
use crate::materialize::upsert::{self, summary, Hot, SpillValue, Spilled};
use crate::materialize::MaterializeError;

impl Pipeline {
    pub(super) async fn commit_current(&mut self, parts: &[&FrozenPartition]) -> Result<(), MaterializeError> {
        let kind = TableKind::PositionsCurrent;
        self.commit_upsert(
            kind,
            parts,
            |p| (p.tables.get_mut(&kind).expect("every table is open"), &mut p.current),
            upsert::current::changes,
        )
        .await
    }

    pub(super) async fn commit_queue(&mut self, parts: &[&FrozenPartition]) -> Result<(), MaterializeError> {
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
        // How the table turns a flush's rows into its new rows and values
        // (`current::changes`, `queue_table::changes`).
        changes: impl AsyncFn(&mut Spilled<T>, &Table, &[RecordBatch]) -> Result<Option<Changes<Hot>>, TableError>,
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
            let (rows, changed) = changes(state, t, &batches)
                .await?
                .map_or((None, vec![]), |(b, c)| (Some(b), c));
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
    pub(super) async fn expire_closed(&mut self) -> Result<(), MaterializeError> {
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

    pub(super) async fn commit_registry(&mut self, parts: &[&FrozenPartition]) -> Result<(), MaterializeError> {
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
pub(super) async fn commit_staged<V: Clone + Classed>(
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
