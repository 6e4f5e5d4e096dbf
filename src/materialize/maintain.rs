//! Table maintenance: checkpoints (from the materializer, every N commits) and
//! `possync maintain` (compact small files of the append-only tables, vacuum, checkpoint),
//! which the materializer also runs itself every `--maintain-every` ([`every`]).
//!
//! Safe while materialize runs: compaction reads small files itself and commits remove + add
//! with `dataChange = false` (an `OPTIMIZE` commit) through delta-rs' conflict checker, which
//! lets it pass concurrent appends; the materializer sees a concurrent commit, reloads and
//! retries. The upsert tables are one file each (rewritten on every commit) and only need
//! vacuum. Vacuum deletes only files unreferenced for longer than the retention (the tables set
//! `delta.deletedFileRetentionDuration`: 1 day for append-only tables, 1 hour for upserts),
//! including orphans of crashed writers, never a file a running writer is about to commit.

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::time::{interval_at, Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use super::config::MaintainConfig;
use super::tables::{Table, TableError, TableKind};
use crate::delta::maintain::{checkpoint, compact, vacuum};

/// What `maintain` did to one table.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct MaintainReport {
    /// Small files replaced by compaction.
    pub files_compacted: usize,
    /// Files written by compaction.
    pub files_written: usize,
    /// Files deleted by vacuum.
    pub files_vacuumed: usize,
}

/// Compacts and vacuums every table under `cfg.table_uri` (`position_snapshots` and
/// `reconciliation` too when `possync reconcile --watch` made them).
///
/// # Errors
/// Table errors; a compaction that loses a race with another compaction is skipped, not an error.
pub async fn run(cfg: &MaintainConfig) -> Result<BTreeMap<&'static str, MaintainReport>, TableError> {
    let mut out = BTreeMap::new();
    // The reconcile tables when the service made them (maintain never creates them).
    let mut kinds = TableKind::ALL.to_vec();
    for kind in TableKind::RECONCILE {
        if super::tables::exists(&cfg.table_uri, kind.name()).await? {
            kinds.push(kind);
        }
    }
    for kind in kinds {
        let mut t = Table::open(&cfg.table_uri, kind).await?;
        let mut report = MaintainReport::default();
        if cfg.compact && kind.append_only() {
            let (removed, written) = compact(&mut t, cfg.compact_below, cfg.compact_target).await?;
            report.files_compacted = removed;
            report.files_written = written;
        }
        if cfg.vacuum {
            t.refresh().await?;
            report.files_vacuumed = vacuum(&t, cfg.vacuum_retention).await?;
        }
        // A checkpoint at the end keeps the next load of the table short.
        t.refresh().await?;
        if t.version() > 0 {
            checkpoint(&t).await?;
        }
        tracing::info!(table = kind.name(), ?report, "maintained");
        out.insert(kind.name(), report);
    }
    Ok(out)
}

/// Runs [`run`] every `period` (first pass one period from now) when `my_turn()` says so,
/// until `shutdown` is cancelled; `done` is called after each good pass.
///
/// Of a consumer group, one member holds the turn: the one Kafka's group assignment gave
/// partition 0 of the active topic. No protocol of our own elects it, and when that member
/// dies or leaves, the rebalance hands the partition, and so the turn, to another one (its
/// next tick runs the pass). Two members can only overlap for the length of a rebalance,
/// and overlapping passes are safe (see the module doc), only wasted.
///
/// The materializer spawns this beside its consume loop: maintenance commits race with flush
/// commits exactly as an external `possync maintain` does (flushes reload and retry, compaction
/// goes through the conflict checker). A failed pass is logged and the next one retries; it
/// never stops materialization. A pass cut short by `shutdown` leaves at most unreferenced
/// files, which a later vacuum removes.
pub async fn every(
    cfg: MaintainConfig,
    period: Duration,
    shutdown: CancellationToken,
    my_turn: impl Fn() -> bool + Send + 'static,
    done: impl Fn() + Send + 'static,
) {
    let mut tick = interval_at(Instant::now() + period, period);
    // A pass longer than the period delays the next one rather than starting a burst.
    tick.set_missed_tick_behavior(MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        if !my_turn() {
            tracing::debug!("scheduled maintenance skipped: another member of the group holds the turn");
            continue;
        }
        let started = std::time::Instant::now();
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => return,
            result = run(&cfg) => match result {
                Ok(report) => {
                    done();
                    tracing::info!(
                        took_ms = started.elapsed().as_millis() as u64,
                        compacted = report.values().map(|r| r.files_compacted).sum::<usize>(),
                        vacuumed = report.values().map(|r| r.files_vacuumed).sum::<usize>(),
                        "scheduled maintenance done"
                    )
                }
                Err(e) => tracing::warn!(
                    error = %e,
                    next_in_s = period.as_secs(),
                    "scheduled maintenance failed; the next pass retries"
                ),
            }
        }
    }
}
