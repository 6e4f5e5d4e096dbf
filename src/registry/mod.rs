//! The strategy registry: which strategies hold which contracts, event-sourced from the
//! compacted registry topic.
//!
//! The topic is the source of truth. Every reader (ingest, `possync registry list`) replays it
//! from the beginning into a [`Registry`], then (ingest) keeps following it live, so an
//! `activate` or `deactivate` takes effect within a poll interval. Writers publish
//! [`RegistryEvent`]s keyed `strategy:account:conId`, so compaction keeps the latest word per
//! entry.
//!
//! - [`Registry`]: the folded state and the coverage query routing needs.
//! - [`reader`]: replay a topic to its end, then follow it ([`reader::TopicReplay`]).
//! - [`commands`]: `activate` / `deactivate` / `list` / `history` and the bootstrap file.
//! - [`history`]: who changed what, when, from the append-only `registry_events` Delta table.

pub mod commands;
pub mod history;
pub mod reader;

use std::collections::{BTreeMap, HashMap};

use crate::events::{RegistryAction, RegistryEvent};

pub use commands::{activate, deactivate, list, seed_from_file, BootstrapEntry, RegistryArgs, RegistryCommand};
pub use reader::{follow, PartitionStart, TopicReplay};

/// Errors of the registry.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// Kafka refused or failed something.
    #[error(transparent)]
    Kafka(#[from] crate::kafka::KafkaError),
    /// The registry topic does not exist.
    #[error("topic {0:?} does not exist; create the possync topics with `possync topics create --brokers <host:port> --topic-prefix <prefix>` (`possync run` creates them on its embedded broker)")]
    NoSuchTopic(String),
    /// The topic could not be read to its end in time.
    #[error("could not read topic {topic:?} to its end within {timeout:?}; is the broker up?")]
    CatchUpTimeout {
        topic: String,
        timeout: std::time::Duration,
    },
    /// A registry event could not be encoded.
    /// A value's writer schema could not be fetched from the schema registry.
    #[error("{0}; the registry topic cannot be read until it answers")]
    SchemaRegistry(#[from] crate::schema_registry::SchemaRegistryError),
    #[error("cannot encode a registry event: {0}")]
    Encode(#[from] crate::events::EventError),
    /// The broker did not acknowledge a registry write.
    #[error("Kafka did not acknowledge the registry event: {0}; check the broker and retry")]
    Delivery(rdkafka::error::KafkaError),
    /// The bootstrap file cannot be read.
    #[error("cannot read registry bootstrap file {path}: {source}")]
    BootstrapIo {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The bootstrap file is malformed.
    #[error("registry bootstrap file {path}, {location}: {message}; expected a JSON array of {{\"strategy\",\"account\",\"con_id\",\"priority\"}} or lines `strategy account|* conId [priority]`")]
    BootstrapSyntax {
        path: std::path::PathBuf,
        location: String,
        message: String,
    },
    /// A command-line argument is invalid.
    #[error("{0}")]
    Invalid(String),
    /// `registry history` found no `registry_events` table.
    #[error("no registry_events table at {0}; point --table-uri at the base `possync materialize` writes to (it creates the table)")]
    NoHistory(String),
    /// Reading `registry_events` failed.
    #[error(transparent)]
    Table(Box<crate::materialize::tables::TableError>),
}

/// One registry entry: `strategy` holds `con_id` in `account` (every account when `None`).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Entry {
    /// The strategy holding the contract.
    pub strategy: String,
    /// The account; `None` covers every account.
    pub account: Option<String>,
    /// IB contract id.
    pub con_id: i64,
    /// Higher wins a streaming slot when there are more active positions than slots.
    pub priority: i32,
    /// When the entry was activated (µs since the epoch, UTC).
    pub since: i64,
    /// Who activated it.
    pub actor: String,
}

/// What the registry says about one (account, conId): who holds it and how urgently.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Coverage {
    /// The highest priority among the covering entries.
    pub priority: i32,
    /// The covering strategies, sorted, without duplicates.
    pub strategies: Vec<String>,
}

/// The folded registry: the latest ACTIVATE per (strategy, account, conId) not followed by a
/// DEACTIVATE.
#[derive(Debug, Clone, Default)]
pub struct Registry {
    /// conId → (strategy, account) → entry; indexed by conId because routing asks per contract.
    by_con: HashMap<i64, BTreeMap<(String, Option<String>), Entry>>,
    /// Entries whose last event is a deactivation (an operator's decision the bootstrap file
    /// must not undo): (conId, strategy, account).
    deactivated: std::collections::HashSet<(i64, String, Option<String>)>,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Applies one event; returns whether the registry changed.
    pub fn apply(&mut self, event: &RegistryEvent) -> bool {
        let slot = (event.strategy.clone(), event.account.clone());
        let retired = (event.con_id, event.strategy.clone(), event.account.clone());
        match event.action {
            RegistryAction::Activate => {
                self.deactivated.remove(&retired);
                let entry = Entry {
                    strategy: event.strategy.clone(),
                    account: event.account.clone(),
                    con_id: event.con_id,
                    priority: event.priority,
                    since: event.time,
                    actor: event.actor.clone(),
                };
                let map = self.by_con.entry(event.con_id).or_default();
                let changed = map.get(&slot).is_none_or(|old| old.priority != entry.priority);
                map.insert(slot, entry);
                changed
            }
            RegistryAction::Deactivate => {
                self.deactivated.insert(retired);
                let Some(map) = self.by_con.get_mut(&event.con_id) else {
                    return false;
                };
                let changed = map.remove(&slot).is_some();
                if map.is_empty() {
                    self.by_con.remove(&event.con_id);
                }
                changed
            }
        }
    }

    /// Whether the registry has decided on this entry: it is active (at any priority), or its
    /// last event deactivated it.
    pub fn knows(&self, strategy: &str, account: Option<&str>, con_id: i64) -> bool {
        let account = account.map(str::to_string);
        self.by_con
            .get(&con_id)
            .is_some_and(|m| m.contains_key(&(strategy.to_string(), account.clone())))
            || self.deactivated.contains(&(con_id, strategy.to_string(), account))
    }

    /// Whether some entry covers (`account`, `con_id`), and with what priority and strategies.
    pub fn coverage(&self, account: &str, con_id: i64) -> Option<Coverage> {
        let map = self.by_con.get(&con_id)?;
        let mut priority = i32::MIN;
        let mut strategies: Vec<String> = Vec::new();
        for e in map
            .values()
            .filter(|e| e.account.as_deref().is_none_or(|a| a == account))
        {
            priority = priority.max(e.priority);
            strategies.push(e.strategy.clone());
        }
        if strategies.is_empty() {
            return None;
        }
        strategies.sort();
        strategies.dedup();
        Some(Coverage { priority, strategies })
    }

    /// Whether an entry exists for exactly this (strategy, account, conId).
    pub fn contains(&self, strategy: &str, account: Option<&str>, con_id: i64) -> bool {
        self.by_con
            .get(&con_id)
            .is_some_and(|m| m.contains_key(&(strategy.to_string(), account.map(str::to_string))))
    }

    /// Every entry, sorted by (strategy, account, conId).
    pub fn entries(&self) -> Vec<Entry> {
        let mut all: Vec<Entry> = self.by_con.values().flat_map(|m| m.values().cloned()).collect();
        all.sort_by(|a, b| (&a.strategy, &a.account, a.con_id).cmp(&(&b.strategy, &b.account, b.con_id)));
        all
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.by_con.values().map(BTreeMap::len).sum()
    }

    /// Whether the registry has no entry.
    pub fn is_empty(&self) -> bool {
        self.by_con.is_empty()
    }
}

/// Builds a registry event stamped now with a fresh id.
pub fn event(
    strategy: &str,
    account: Option<&str>,
    con_id: i64,
    action: RegistryAction,
    priority: i32,
    actor: &str,
) -> RegistryEvent {
    RegistryEvent {
        event_id: crate::events::new_id(),
        strategy: strategy.to_string(),
        account: account.map(str::to_string),
        con_id,
        action,
        priority,
        time: crate::events::now_micros(),
        actor: actor.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use RegistryAction::{Activate, Deactivate};

    #[test]
    fn coverage_follows_activate_and_deactivate() {
        let mut r = Registry::new();
        assert!(r.apply(&event("wheel", None, 7, Activate, 1, "t")));
        assert!(r.apply(&event("hedge", Some("DU1"), 7, Activate, 5, "t")));
        assert_eq!(
            r.coverage("DU1", 7),
            Some(Coverage {
                priority: 5,
                strategies: vec!["hedge".into(), "wheel".into()]
            })
        );
        assert_eq!(
            r.coverage("DU2", 7),
            Some(Coverage {
                priority: 1,
                strategies: vec!["wheel".into()]
            })
        );
        assert_eq!(r.coverage("DU2", 8), None);
        assert!(
            !r.apply(&event("wheel", None, 7, Activate, 1, "t")),
            "same priority again changes nothing"
        );
        assert!(r.apply(&event("wheel", None, 7, Deactivate, 0, "t")));
        assert_eq!(r.coverage("DU2", 7), None);
        assert!(!r.apply(&event("wheel", None, 7, Deactivate, 0, "t")));
        assert!(r.apply(&event("hedge", Some("DU1"), 7, Deactivate, 0, "t")));
        assert!(r.is_empty());
    }

    #[test]
    fn entries_are_sorted_and_counted() {
        let mut r = Registry::new();
        r.apply(&event("b", None, 2, Activate, 0, "t"));
        r.apply(&event("a", Some("X"), 3, Activate, 0, "t"));
        r.apply(&event("a", None, 9, Activate, 0, "t"));
        let keys: Vec<_> = r
            .entries()
            .into_iter()
            .map(|e| (e.strategy, e.account, e.con_id))
            .collect();
        assert_eq!(
            keys,
            vec![
                ("a".into(), None, 9),
                ("a".into(), Some("X".into()), 3),
                ("b".into(), None, 2)
            ]
        );
        assert_eq!(r.len(), 3);
        assert!(r.contains("a", Some("X"), 3));
        assert!(!r.contains("a", None, 3));
    }
}
