//! `possync migrate`: brings the tables under a base URI to this build's layout
//! ([`crate::materialize::layout`]).
//!
//! A dry run by default: it prints each table's layout and the steps it lacks, and changes
//! nothing. With `--apply` it applies them in order, one Delta commit per step that also
//! records the new layout, then opens every table as the materializer would to check the
//! result. A run stopped at any point (a kill, a storage error) is finished by running it
//! again: applied steps are skipped because the table records them, and a commit either
//! happened whole or not at all. Tables that do not exist are left alone (materialize creates
//! them at the current layout).
//!
//! In-place steps are also taken by the materializer at start-up, so an operator usually never
//! needs this command; a step that rewrites a table needs it, and the materializers stopped
//! while it runs.

use crate::materialize::config::TableArgs;
use crate::materialize::layout::{self, How, Step};
use crate::materialize::tables::{Table, TableError};
use crate::materialize::TableKind;

/// `possync migrate` flags.
#[derive(clap::Args, Debug)]
pub struct MigrateArgs {
    #[command(flatten)]
    pub tables: TableArgs,
    /// Apply the steps. Without it the command is a dry run: it prints what it would do and
    /// changes nothing.
    #[arg(long, env = "POSSYNC_MIGRATE_APPLY")]
    pub apply: bool,
    /// Fault injection for the interrupted-migration tests: exit abruptly (status 86, nothing
    /// cleaned up) after this many step commits.
    #[arg(long, env = "POSSYNC_MIGRATE_FAIL_AFTER_STEPS", hide = true)]
    pub fail_after_steps: Option<usize>,
}

/// Why a migration stopped.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// Reading or committing a table failed; applied steps stay applied.
    #[error("{0}; steps applied so far stay applied: run `possync migrate --apply` again to finish")]
    Table(#[from] TableError),
}

/// One table's state and what was done to it.
#[derive(Debug, Clone, PartialEq)]
pub struct TableReport {
    /// Which table.
    pub kind: TableKind,
    /// Its layout before the run (`None`: the table does not exist).
    pub before: Option<u32>,
    /// The steps it lacked, and whether this run committed each one (`false` in a dry run, or
    /// when a concurrent materializer applied it first).
    pub steps: Vec<(Step, bool)>,
}

/// What `migrate` found and did.
#[derive(Debug, Clone, PartialEq)]
pub struct MigrateReport {
    /// Whether the steps were applied (`--apply`).
    pub applied: bool,
    /// Per table, in [`TableKind::ALL`] order.
    pub tables: Vec<TableReport>,
}

impl MigrateReport {
    /// Steps still to do after this run (all of them in a dry run).
    pub fn outstanding(&self) -> usize {
        if self.applied {
            0
        } else {
            self.tables.iter().map(|t| t.steps.len()).sum()
        }
    }
}

impl std::fmt::Display for MigrateReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for t in &self.tables {
            match t.before {
                None => writeln!(
                    f,
                    "{}: absent (materialize creates it at layout {})",
                    t.kind.name(),
                    layout::CURRENT
                )?,
                Some(v) if t.steps.is_empty() => writeln!(f, "{}: layout {v}, current", t.kind.name())?,
                Some(v) => {
                    writeln!(f, "{}: layout {v} -> {}", t.kind.name(), layout::CURRENT)?;
                    for (s, done) in &t.steps {
                        let how = match s.how {
                            How::InPlace => "in place",
                            How::Rewrite => "rewrite",
                        };
                        let state = match (self.applied, done) {
                            (false, _) => "to do",
                            (true, true) => "done",
                            (true, false) => "done (by another writer)",
                        };
                        writeln!(f, "  step {} ({how}): {} [{state}]", s.to, s.what)?;
                    }
                }
            }
        }
        let n = self.outstanding();
        if self.applied {
            write!(f, "every table is at layout {}", layout::CURRENT)
        } else if n == 0 {
            write!(f, "nothing to do: every table is at layout {}", layout::CURRENT)
        } else {
            write!(
                f,
                "dry run: {n} step(s) to apply; nothing was changed. Run again with --apply"
            )
        }
    }
}

/// Plain settings of a migration.
#[derive(Debug, Clone)]
pub struct MigrateConfig {
    /// Base URI of the tables.
    pub table_uri: String,
    /// Apply (else dry run).
    pub apply: bool,
    /// See [`MigrateArgs::fail_after_steps`].
    pub fail_after_steps: Option<usize>,
}

impl From<&MigrateArgs> for MigrateConfig {
    fn from(a: &MigrateArgs) -> Self {
        Self {
            table_uri: a.tables.table_uri.clone(),
            apply: a.apply,
            fail_after_steps: a.fail_after_steps,
        }
    }
}

/// Plans (and with `apply`, performs) the migration of every table under the base URI; progress
/// goes to the log, one line per step.
///
/// # Errors
/// [`MigrateError`]; a table with a newer layout is refused before anything is changed.
pub async fn run(cfg: &MigrateConfig) -> Result<MigrateReport, MigrateError> {
    let base = cfg.table_uri.as_str();
    let mut open = Vec::new();
    // Look at every table first: a newer layout anywhere stops the run before any change.
    for kind in TableKind::ALL {
        if !super::exists(base, kind.name()).await? {
            open.push((kind, None));
            continue;
        }
        let t = Table::open_unchecked(base, kind).await?;
        let uri = crate::materialize::tables::table_url(base, kind)?;
        let steps = layout::pending(&t, uri.as_str())?;
        open.push((kind, Some((layout::recorded(&t)?, steps, t))));
    }
    let mut committed = 0usize;
    let mut tables = Vec::new();
    for (kind, found) in open {
        let Some((before, steps, mut t)) = found else {
            tables.push(TableReport {
                kind,
                before: None,
                steps: Vec::new(),
            });
            continue;
        };
        let mut done = Vec::new();
        for step in steps {
            if !cfg.apply {
                done.push((step, false));
                continue;
            }
            let mine = layout::apply(&mut t, step).await?;
            tracing::info!(
                table = kind.name(),
                layout = step.to,
                step = step.what,
                committed = mine,
                "migration step done"
            );
            done.push((step, mine));
            if mine {
                committed += 1;
                if cfg.fail_after_steps == Some(committed) {
                    eprintln!("possync migrate: stopping abruptly after {committed} step(s) (--fail-after-steps)");
                    std::process::exit(86);
                }
            }
        }
        tables.push(TableReport {
            kind,
            before: Some(before),
            steps: done,
        });
    }
    if cfg.apply {
        // The result must open as the materializer opens it (layout, schema, features).
        for t in &tables {
            if t.before.is_some() {
                Table::open(base, t.kind).await?;
            }
        }
    }
    Ok(MigrateReport {
        applied: cfg.apply,
        tables,
    })
}
