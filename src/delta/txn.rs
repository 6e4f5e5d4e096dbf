//! The txn actions of a table (Delta's `SetTransaction`: app id -> version), exact as of a
//! table version: what a writer stores beside its data to make a commit idempotent.

use std::collections::HashMap;

use deltalake::{DeltaResult, DeltaTable};

/// Txn versions of one table, exact as of a table version.
#[derive(Debug, Default)]
pub struct TxnMap {
    as_of: i64,
    known: HashMap<String, Option<i64>>,
}

#[derive(serde::Deserialize)]
struct LogLine {
    txn: Option<TxnLine>,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct TxnLine {
    app_id: String,
    version: i64,
}

impl TxnMap {
    /// An empty map as of table version `as_of`.
    pub fn new(as_of: i64) -> Self {
        Self {
            as_of,
            known: HashMap::new(),
        }
    }

    /// The version of `app_id` (`None` = never written), replaying the log on first use.
    ///
    /// # Errors
    /// Storage errors.
    pub async fn get(&mut self, delta: &DeltaTable, app_id: &str) -> DeltaResult<Option<i64>> {
        if let Some(v) = self.known.get(app_id) {
            return Ok(*v);
        }
        let v = delta
            .snapshot()?
            .transaction_version(delta.log_store().as_ref(), app_id)
            .await?;
        self.known.insert(app_id.to_string(), v);
        Ok(v)
    }

    /// Applies the txn actions of commits `as_of+1 ..= to` (made by others).
    ///
    /// # Errors
    /// Storage errors.
    pub async fn advance(&mut self, delta: &DeltaTable, to: i64) -> DeltaResult<()> {
        let store = delta.log_store();
        for v in (self.as_of + 1)..=to {
            let Some(bytes) = store.read_commit_entry(v as u64).await? else {
                // Log cleaned up under us: forget everything; entries reload from the snapshot.
                self.known.clear();
                break;
            };
            for line in bytes.split(|b| *b == b'\n') {
                if !line.windows(6).any(|w| w == b"\"txn\":") {
                    continue;
                }
                if let Ok(LogLine { txn: Some(t) }) = serde_json::from_slice::<LogLine>(line) {
                    self.known.insert(t.app_id, Some(t.version));
                }
            }
        }
        self.as_of = to;
        Ok(())
    }

    /// Records our own commit `version` (made against `as_of`).
    pub fn committed(&mut self, version: i64, txns: &[(String, i64)]) {
        debug_assert_eq!(version, self.as_of + 1, "commits are made against the loaded snapshot");
        for (id, v) in txns {
            self.known.insert(id.clone(), Some(*v));
        }
        self.as_of = version;
    }
}
