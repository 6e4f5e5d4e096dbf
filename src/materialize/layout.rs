//! Table layout versions: which layout each table was written in, and the steps that bring an
//! older one up to date.
//!
//! Every table records its layout in the table property [`LAYOUT_PROPERTY`] (every Delta
//! reader shows it: `SHOW TBLPROPERTIES`, `DeltaTable.metadata().configuration`). A table
//! without it was written by release cc788eb or an earlier build with deletion vectors: layout 1.
//!
//! | layout | what changed                                        | how an older table gets it |
//! |--------|-----------------------------------------------------|----------------------------|
//! | 1      | (release cc788eb: no property)                      | —                          |
//! | 2      | the layout version is recorded                      | in place                   |
//!
//! A later layout adds a [`Step`]. One Delta allows on a live table (a property, a new nullable
//! column, a protocol feature) is *in place*: the materializer takes it at start-up
//! ([`upgrade_in_place`]), before it reads anything. Any other (a new partitioning, a retyped
//! column) is a *rewrite*: the tables then refuse to open ([`TableError::NeedsMigration`])
//! until `possync migrate` ([`crate::ops::migrate`]) has run. Each step is one Delta commit that
//! also sets the property to the step's layout, so a migration stopped at any point is finished
//! by running it again, and a step is never applied twice.
//!
//! A table whose layout is newer than this build knows is refused by every command
//! ([`TableError::NewerLayout`]): an older build never writes a layout it does not know. (Builds
//! before layout 2 do not check; what they write is layout 1, which layout 2 reads unchanged.)

use std::collections::HashMap;

use crate::delta::{Spec, Table, TableError};

/// The table property holding a table's layout version.
pub const LAYOUT_PROPERTY: &str = "possync.layoutVersion";

/// The layout this build writes.
pub const CURRENT: u32 = 2;

/// [`CURRENT`] as the property's text (tables are created with it).
pub const CURRENT_TEXT: &str = "2";

/// Layout of a table that records none.
pub const UNRECORDED: u32 = 1;

/// Commit attempts of one step before giving up (each follows a concurrent commit).
const ATTEMPTS: usize = 20;

/// How a step is applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum How {
    /// A metadata commit on the live table: the materializer takes it at start-up.
    InPlace,
    /// Only `possync migrate` applies it.
    Rewrite,
}

/// One change of layout, from `to - 1` to `to`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Step {
    /// The layout the table has after the step.
    pub to: u32,
    /// What the step does, as `migrate` prints it.
    pub what: &'static str,
    /// In place or rewrite.
    pub how: How,
}

/// Every step, in order (the `to` of the n-th is n + 2).
pub const STEPS: &[Step] = &[Step {
    to: 2,
    what: "record the layout version in the table property possync.layoutVersion",
    how: How::InPlace,
}];

/// The layout `t` records as of its loaded snapshot.
///
/// # Errors
/// When no snapshot is loaded, or the property is not a number ([`TableError::BadLayout`]).
pub fn recorded<K: Spec>(t: &Table<K>) -> Result<u32, TableError> {
    match t.property(LAYOUT_PROPERTY)? {
        None => Ok(UNRECORDED),
        Some(v) => v.trim().parse().map_err(|_| TableError::BadLayout {
            table: t.kind.name(),
            found: v,
        }),
    }
}

/// The steps `t` lacks, in order.
///
/// # Errors
/// [`TableError::NewerLayout`] when the table's layout is newer than [`CURRENT`]; what
/// [`recorded`] returns.
pub fn pending<K: Spec>(t: &Table<K>, uri: &str) -> Result<Vec<Step>, TableError> {
    pending_in(t, uri, STEPS)
}

fn pending_in<K: Spec>(t: &Table<K>, uri: &str, steps: &[Step]) -> Result<Vec<Step>, TableError> {
    let found = recorded(t)?;
    if found > CURRENT {
        return Err(TableError::NewerLayout {
            table: t.kind.name(),
            uri: uri.to_string(),
            found,
            known: CURRENT,
        });
    }
    Ok(steps.iter().filter(|s| s.to > found).copied().collect())
}

/// What [`Table::open`] checks: a newer layout, or a step only `possync migrate` can apply, is
/// refused.
///
/// # Errors
/// [`TableError::NewerLayout`], [`TableError::NeedsMigration`].
pub fn check_open<K: Spec>(t: &Table<K>, uri: &str) -> Result<(), TableError> {
    check_open_in(t, uri, STEPS)
}

fn check_open_in<K: Spec>(t: &Table<K>, uri: &str, steps: &[Step]) -> Result<(), TableError> {
    if let Some(step) = pending_in(t, uri, steps)?.into_iter().find(|s| s.how == How::Rewrite) {
        return Err(TableError::NeedsMigration {
            table: t.kind.name(),
            uri: uri.to_string(),
            found: recorded(t)?,
            step: step.what,
        });
    }
    Ok(())
}

/// Applies `step` to `t` in one commit (the step's changes plus the property), unless the table
/// already has it (a concurrent materializer or an earlier run applied it). Returns whether this
/// call committed.
///
/// # Errors
/// [`TableError::Contention`] after [`ATTEMPTS`] lost races; storage errors.
pub async fn apply<K: Spec>(t: &mut Table<K>, step: Step) -> Result<bool, TableError> {
    for _ in 0..ATTEMPTS {
        if recorded(t)? >= step.to {
            return Ok(false);
        }
        match commit_step(t, step).await {
            Ok(()) => return Ok(true),
            Err(TableError::Conflict(_)) => {
                t.refresh().await?;
            }
            Err(e) => return Err(e),
        }
    }
    Err(TableError::Contention {
        table: t.kind.name(),
        attempts: ATTEMPTS,
    })
}

async fn commit_step<K: Spec>(t: &mut Table<K>, step: Step) -> Result<(), TableError> {
    // Every step so far is a property change; a rewrite step adds its remove and add actions
    // (and a changed schema) to this same commit.
    t.set_property(LAYOUT_PROPERTY, &step.to.to_string()).await?;
    tracing::info!(
        table = t.kind.name(),
        layout = step.to,
        step = step.what,
        "table layout upgraded"
    );
    Ok(())
}

/// Brings every table of `tables` to [`CURRENT`] with its in-place steps (the materializer
/// calls it at start-up, before it reads a message). A table that needs a rewrite never gets
/// here: [`Table::open`] refused it.
///
/// # Errors
/// What [`apply`] returns.
pub async fn upgrade_in_place<K: Spec + Ord + std::hash::Hash>(
    tables: &mut HashMap<K, Table<K>>,
    uri: &str,
) -> Result<(), TableError> {
    let mut kinds: Vec<K> = tables.keys().copied().collect();
    kinds.sort();
    for kind in kinds {
        let Some(t) = tables.get_mut(&kind) else {
            continue;
        };
        for step in pending(t, uri)? {
            debug_assert_eq!(step.how, How::InPlace, "Table::open refuses rewrite steps");
            apply(t, step).await?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::materialize::tables::{Table, TableKind};
    use deltalake::kernel::{Action, MetadataExt};
    use deltalake::protocol::DeltaOperation;

    /// Sets (or, with `None`, removes) the layout property in a metadata commit: what an older
    /// build's table (no property) or a newer build's looks like.
    async fn set_layout(t: &mut Table, value: Option<&str>) {
        let Some(v) = value else {
            let metadata = t.delta.snapshot().unwrap().metadata().clone();
            let metadata = metadata.remove_config_key(LAYOUT_PROPERTY).unwrap();
            let operation = DeltaOperation::SetTableProperties {
                properties: HashMap::new(),
            };
            t.commit(vec![Action::Metadata(metadata)], &[], operation, 0)
                .await
                .unwrap();
            return;
        };
        t.set_property(LAYOUT_PROPERTY, v).await.unwrap();
    }

    #[tokio::test]
    async fn new_tables_record_the_current_layout() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().to_str().unwrap();
        for kind in TableKind::ALL {
            let t = Table::open(base, kind).await.unwrap();
            assert_eq!(recorded(&t).unwrap(), CURRENT, "{kind:?}");
            assert!(pending(&t, base).unwrap().is_empty());
        }
    }

    #[tokio::test]
    async fn an_unrecorded_table_is_layout_1_and_is_upgraded_in_place_once() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().to_str().unwrap();
        let mut tables = HashMap::new();
        for kind in TableKind::ALL {
            let mut t = Table::open(base, kind).await.unwrap();
            set_layout(&mut t, None).await;
            // A fresh process sees layout 1 and opens it: the step is in place.
            let t = Table::open(base, kind).await.unwrap();
            assert_eq!(recorded(&t).unwrap(), UNRECORDED);
            assert_eq!(pending(&t, base).unwrap(), STEPS.to_vec());
            tables.insert(kind, t);
        }
        upgrade_in_place(&mut tables, base).await.unwrap();
        let versions: Vec<i64> = TableKind::ALL.iter().map(|k| tables[k].version()).collect();
        for kind in TableKind::ALL {
            let t = Table::open(base, kind).await.unwrap();
            assert_eq!(recorded(&t).unwrap(), CURRENT, "{kind:?}");
        }
        // Again: nothing is committed.
        upgrade_in_place(&mut tables, base).await.unwrap();
        let again: Vec<i64> = TableKind::ALL.iter().map(|k| tables[k].version()).collect();
        assert_eq!(versions, again);
    }

    #[tokio::test]
    async fn a_newer_or_unreadable_layout_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().to_str().unwrap();
        let mut t = Table::open(base, TableKind::PositionsCurrent).await.unwrap();
        set_layout(&mut t, Some("3")).await;
        let err = Table::open(base, TableKind::PositionsCurrent).await.err().unwrap();
        let msg = err.to_string();
        assert!(
            matches!(
                err,
                TableError::NewerLayout {
                    found: 3,
                    known: CURRENT,
                    ..
                }
            ),
            "{msg}"
        );
        for hint in ["positions_current", "layout 3", "newer possync", "up to 2", "Upgrading"] {
            assert!(msg.contains(hint), "{msg} lacks {hint}");
        }
        let mut t = Table::open_unchecked(base, TableKind::PositionsCurrent).await.unwrap();
        set_layout(&mut t, Some("two")).await;
        let err = Table::open(base, TableKind::PositionsCurrent).await.err().unwrap();
        assert!(matches!(err, TableError::BadLayout { .. }), "{err}");
    }

    #[tokio::test]
    async fn a_rewrite_step_refuses_the_open_and_names_migrate() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().to_str().unwrap();
        let t = Table::open(base, TableKind::PositionEvents).await.unwrap();
        let later = [
            STEPS[0],
            Step {
                to: CURRENT + 1,
                what: "a partitioning that needs the files rewritten",
                how: How::Rewrite,
            },
        ];
        let err = check_open_in(&t, base, &later).unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(err, TableError::NeedsMigration { found: CURRENT, .. }),
            "{msg}"
        );
        for hint in [
            "position_events",
            "needs a migration",
            "possync migrate --table-uri",
            "--apply",
        ] {
            assert!(msg.contains(hint), "{msg} lacks {hint}");
        }
        // In-place steps alone never refuse.
        check_open_in(&t, base, &later[..1]).unwrap();
    }

    #[test]
    fn the_steps_lead_to_the_current_layout() {
        assert_eq!(CURRENT.to_string(), CURRENT_TEXT);
        for (i, s) in STEPS.iter().enumerate() {
            assert_eq!(s.to as usize, i + 2, "step {i} must lead to layout {}", i + 2);
        }
        assert_eq!(STEPS.last().map(|s| s.to), Some(CURRENT));
    }
}
