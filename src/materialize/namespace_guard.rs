//! The offset namespace the tables were written under: recorded in each table, checked at
//! start-up.
//!
//! Txn app ids are `possync-<namespace>-<topic>-<partition>` ([`super::offsets`]), so a
//! materializer that starts under another namespace (another Kafka cluster id, or a changed
//! `--offsets-namespace`) finds no stored offsets, starts every partition at 0 and appends
//! again whatever the topics still hold. Each table therefore records, in its Delta metadata
//! configuration (`possync.namespace`, a table property every Delta reader shows), the
//! namespace it was last written under. A materializer whose namespace differs stops at
//! start-up with a one-line error naming both fixes, unless it is told the change is meant
//! (`--allow-namespace-change`: a genuinely new cluster, such as the fresh embedded broker of
//! every `possync run`); then the new namespace is recorded. Rows stay unique either way: every
//! row carries its `kafka_namespace`, so (namespace, topic, partition, offset) is unique.
//!
//! A table without the property (new, or created by an older build) adopts the namespace of
//! the first materializer that opens it.

use std::collections::HashMap;

use super::tables::{Table, TableError, TableKind};
use super::MaterializeError;

/// The table property holding the offset namespace a table was last written under.
pub const NAMESPACE_PROPERTY: &str = "possync.namespace";

/// Commit attempts per table before giving up (each follows a concurrent commit).
const ATTEMPTS: usize = 20;

/// The namespace `t` records, as of its loaded snapshot (`None`: none recorded yet).
///
/// # Errors
/// When no snapshot is loaded.
pub fn recorded(t: &Table) -> Result<Option<String>, TableError> {
    t.property(NAMESPACE_PROPERTY)
}

/// Checks that every table was written under `namespace` and records it where none is, or,
/// with `allow_change`, where another one is.
///
/// # Errors
/// [`MaterializeError::NamespaceChanged`] when a table records another namespace and
/// `allow_change` is off; table errors.
pub async fn check(
    tables: &mut HashMap<TableKind, Table>,
    uri: &str,
    namespace: &str,
    allow_change: bool,
) -> Result<(), MaterializeError> {
    for kind in TableKind::ALL {
        let Some(t) = tables.get_mut(&kind) else {
            continue;
        };
        check_table(t, uri, namespace, allow_change).await?;
    }
    Ok(())
}

async fn check_table(t: &mut Table, uri: &str, namespace: &str, allow_change: bool) -> Result<(), MaterializeError> {
    for _ in 0..ATTEMPTS {
        let found = recorded(t)?;
        match found.as_deref() {
            Some(ns) if ns == namespace => return Ok(()),
            Some(ns) if !allow_change => {
                return Err(MaterializeError::NamespaceChanged {
                    uri: uri.to_string(),
                    table: t.kind.name(),
                    recorded: ns.to_string(),
                    namespace: namespace.to_string(),
                })
            }
            Some(ns) => tracing::warn!(
                table = t.kind.name(),
                recorded = ns,
                namespace,
                "offset namespace changed (allowed): partitions of the new namespace start at their first offset"
            ),
            None => tracing::info!(table = t.kind.name(), namespace, "recording the offset namespace"),
        }
        match record(t, namespace).await {
            Ok(()) => return Ok(()),
            // Another member recorded (or committed) first: look again.
            Err(TableError::Conflict(_)) => {
                t.refresh().await?;
            }
            Err(e) => return Err(e.into()),
        }
    }
    Err(MaterializeError::Contention {
        table: t.kind.name(),
        attempts: ATTEMPTS,
    })
}

/// Sets [`NAMESPACE_PROPERTY`] to `namespace` in a metadata-only commit against `t`'s snapshot.
///
/// # Errors
/// [`TableError::Conflict`] when another commit came first; storage errors.
pub async fn record(t: &mut Table, namespace: &str) -> Result<(), TableError> {
    t.set_property(NAMESPACE_PROPERTY, namespace).await
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn open_all(base: &str) -> HashMap<TableKind, Table> {
        let mut out = HashMap::new();
        for kind in TableKind::ALL {
            out.insert(kind, Table::open(base, kind).await.unwrap());
        }
        out
    }

    #[tokio::test]
    async fn a_changed_namespace_is_refused_unless_allowed() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().to_str().unwrap();
        let mut tables = open_all(base).await;
        check(&mut tables, base, "cluster-a", false).await.unwrap();
        // Recorded for good: a fresh process sees it.
        let mut tables = open_all(base).await;
        for t in tables.values() {
            assert_eq!(recorded(t).unwrap().as_deref(), Some("cluster-a"), "{:?}", t.kind);
        }
        check(&mut tables, base, "cluster-a", false).await.unwrap();
        let err = check(&mut tables, base, "cluster-b", false).await.unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, MaterializeError::NamespaceChanged { .. }), "{msg}");
        for hint in [
            "cluster-a",
            "cluster-b",
            "--offsets-namespace cluster-a",
            "--allow-namespace-change",
        ] {
            assert!(msg.contains(hint), "{msg} lacks {hint}");
        }
        assert!(!msg.contains('\n'), "one line: {msg}");
        check(&mut tables, base, "cluster-b", true).await.unwrap();
        let mut tables = open_all(base).await;
        check(&mut tables, base, "cluster-b", false).await.unwrap();
    }
}
