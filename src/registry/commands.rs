//! Writing and reading the registry: `possync registry activate|deactivate|list|seed|history`, the
//! same operations as library functions, and the optional bootstrap file.
//!
//! Bootstrap file: either a JSON array
//! `[{"strategy": "wheel", "account": null, "con_id": 265598, "priority": 5}]`
//! (`account` and `priority` optional) or lines `strategy account|* conId [priority]`, with
//! `#` comments and blank lines ignored.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Subcommand};
use rdkafka::producer::{FutureProducer, FutureRecord};

use super::{reader, Entry, RegistryError};
use crate::events::{RegistryAction, RegistryEvent};
use crate::kafka::{KafkaArgs, KafkaConfig, KafkaError};

/// `possync registry …`: write or read the strategy registry.
#[derive(Args, Debug, Clone)]
pub struct RegistryArgs {
    #[command(subcommand)]
    pub command: RegistryCommand,
}

/// The registry operations.
#[derive(Subcommand, Debug, Clone)]
pub enum RegistryCommand {
    /// A strategy starts holding a contract: ingest streams it in real time (within the slot budget).
    Activate(ActivateArgs),
    /// A strategy stops holding a contract: ingest frees its streaming slot at once.
    Deactivate(EntryArgs),
    /// Print the current registry (the topic replayed to its end).
    List(ListArgs),
    /// Activate every entry of a bootstrap file that is not already active with that priority.
    Seed(SeedArgs),
    /// Print every activation and deactivation, oldest first, from the `registry_events` Delta
    /// table (`possync materialize` writes it; the compacted topic forgets old events).
    History(HistoryArgs),
}

/// `history` flags.
#[derive(Args, Debug, Clone)]
pub struct HistoryArgs {
    /// Only this strategy.
    #[arg(long, env = "POSSYNC_HISTORY_STRATEGY")]
    pub strategy: Option<String>,
    /// Only entries of this account (`*` = only entries covering every account).
    #[arg(long, env = "POSSYNC_HISTORY_ACCOUNT")]
    pub account: Option<String>,
    /// Only this IB contract id (conId).
    #[arg(long, env = "POSSYNC_HISTORY_CON_ID")]
    pub con_id: Option<i64>,
    /// Print JSON lines instead of a table.
    #[arg(long, default_value_t = false, env = "POSSYNC_HISTORY_JSON")]
    pub json: bool,
    #[command(flatten)]
    pub tables: crate::materialize::TableArgs,
}

/// Which registry entry.
#[derive(Args, Debug, Clone)]
pub struct EntryArgs {
    /// Strategy name.
    #[arg(long, env = "POSSYNC_REGISTRY_STRATEGY")]
    pub strategy: String,
    /// IB contract id (conId).
    #[arg(long, env = "POSSYNC_REGISTRY_CON_ID")]
    pub con_id: i64,
    /// Account the entry is limited to; omit (or `*`) to cover every account.
    #[arg(long, env = "POSSYNC_REGISTRY_ACCOUNT")]
    pub account: Option<String>,
    /// Who makes the change (recorded in the event).
    #[arg(long, env = "POSSYNC_REGISTRY_ACTOR", default_value = "cli")]
    pub actor: String,
    #[command(flatten)]
    pub kafka: KafkaArgs,
    #[command(flatten)]
    pub schema_registry: crate::schema_registry::SchemaRegistryArgs,
}

/// `activate` flags.
#[derive(Args, Debug, Clone)]
pub struct ActivateArgs {
    #[command(flatten)]
    pub entry: EntryArgs,
    /// Priority for a streaming slot: with more active positions than slots, higher wins.
    #[arg(long, env = "POSSYNC_REGISTRY_PRIORITY", default_value_t = 0)]
    pub priority: i32,
}

/// `list` flags.
#[derive(Args, Debug, Clone)]
pub struct ListArgs {
    /// Print JSON lines instead of a table.
    #[arg(long, env = "POSSYNC_REGISTRY_JSON", default_value_t = false)]
    pub json: bool,
    /// How long to wait for the broker while reading the registry topic to its end.
    #[arg(long, env = "POSSYNC_REGISTRY_TIMEOUT", value_parser = humantime::parse_duration, default_value = "30s")]
    pub timeout: Duration,
    #[command(flatten)]
    pub kafka: KafkaArgs,
    #[command(flatten)]
    pub schema_registry: crate::schema_registry::SchemaRegistryArgs,
}

/// `seed` flags.
#[derive(Args, Debug, Clone)]
pub struct SeedArgs {
    /// Bootstrap file (JSON array or `strategy account|* conId [priority]` lines).
    #[arg(long, env = "POSSYNC_REGISTRY_FILE")]
    pub file: PathBuf,
    /// Who makes the change (recorded in the events).
    #[arg(long, env = "POSSYNC_REGISTRY_ACTOR", default_value = "bootstrap")]
    pub actor: String,
    #[command(flatten)]
    pub kafka: KafkaArgs,
    #[command(flatten)]
    pub schema_registry: crate::schema_registry::SchemaRegistryArgs,
}

/// One line of a bootstrap file.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
pub struct BootstrapEntry {
    /// Strategy name.
    pub strategy: String,
    /// Account; `None` (or `"*"`) = every account.
    #[serde(default)]
    pub account: Option<String>,
    /// IB contract id.
    pub con_id: i64,
    /// Slot priority.
    #[serde(default)]
    pub priority: i32,
}

fn normalize_account(account: Option<&str>) -> Option<&str> {
    account.map(str::trim).filter(|a| !a.is_empty() && *a != "*")
}

/// Publishes `events` to the registry topic and waits for every acknowledgement.
///
/// # Errors
/// [`RegistryError::Delivery`] when the broker does not acknowledge one.
pub async fn publish(kafka: &KafkaConfig, events: &[RegistryEvent]) -> Result<(), RegistryError> {
    if events.is_empty() {
        return Ok(());
    }
    let producer: FutureProducer = kafka
        .producer()
        .create()
        .map_err(KafkaError::client("create registry producer"))?;
    let encoded = events
        .iter()
        .map(|e| Ok((e.key(), e.encode()?)))
        .collect::<Result<Vec<_>, RegistryError>>()?;
    let mut pending = Vec::with_capacity(events.len());
    for (key, value) in &encoded {
        let record = FutureRecord::to(&kafka.topics.registry).key(key).payload(value);
        pending.push(producer.send(record, Duration::from_secs(30)));
    }
    for result in futures::future::join_all(pending).await {
        result.map_err(|(e, _)| RegistryError::Delivery(e))?;
    }
    Ok(())
}

/// Activates `con_id` for `strategy` (in `account`, or every account when `None`).
///
/// # Errors
/// As [`publish`].
pub async fn activate(
    kafka: &KafkaConfig,
    strategy: &str,
    account: Option<&str>,
    con_id: i64,
    priority: i32,
    actor: &str,
) -> Result<RegistryEvent, RegistryError> {
    let e = super::event(
        strategy,
        normalize_account(account),
        con_id,
        RegistryAction::Activate,
        priority,
        actor,
    );
    publish(kafka, std::slice::from_ref(&e)).await?;
    Ok(e)
}

/// Deactivates the entry (`strategy`, `account`, `con_id`).
///
/// # Errors
/// As [`publish`].
pub async fn deactivate(
    kafka: &KafkaConfig,
    strategy: &str,
    account: Option<&str>,
    con_id: i64,
    actor: &str,
) -> Result<RegistryEvent, RegistryError> {
    let e = super::event(
        strategy,
        normalize_account(account),
        con_id,
        RegistryAction::Deactivate,
        0,
        actor,
    );
    publish(kafka, std::slice::from_ref(&e)).await?;
    Ok(e)
}

/// The current registry entries (the topic read to its end).
///
/// # Errors
/// As [`reader::load`].
pub async fn list(kafka: &KafkaConfig, timeout: Duration) -> Result<Vec<Entry>, RegistryError> {
    Ok(reader::load(kafka, timeout).await?.entries())
}

/// Parses a bootstrap file's text (JSON array or simple lines).
///
/// # Errors
/// [`RegistryError::BootstrapSyntax`] naming the line or JSON position.
pub fn parse_bootstrap(path: &Path, text: &str) -> Result<Vec<BootstrapEntry>, RegistryError> {
    let syntax = |location: String, message: String| RegistryError::BootstrapSyntax {
        path: path.to_path_buf(),
        location,
        message,
    };
    if text.trim_start().starts_with('[') {
        let mut entries: Vec<BootstrapEntry> = serde_json::from_str(text)
            .map_err(|e| syntax(format!("line {} column {}", e.line(), e.column()), e.to_string()))?;
        for e in &mut entries {
            e.account = normalize_account(e.account.as_deref()).map(str::to_string);
        }
        return Ok(entries);
    }
    let mut entries = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let fields: Vec<&str> = line.split_whitespace().collect();
        let location = format!("line {}", n + 1);
        if !(3..=4).contains(&fields.len()) {
            return Err(syntax(
                location,
                format!("expected 3 or 4 fields, found {}", fields.len()),
            ));
        }
        let con_id = fields[2]
            .parse()
            .map_err(|e| syntax(location.clone(), format!("conId {:?}: {e}", fields[2])))?;
        let priority = match fields.get(3) {
            Some(p) => p
                .parse()
                .map_err(|e| syntax(location.clone(), format!("priority {p:?}: {e}")))?,
            None => 0,
        };
        entries.push(BootstrapEntry {
            strategy: fields[0].to_string(),
            account: normalize_account(Some(fields[1])).map(str::to_string),
            con_id,
            priority,
        });
    }
    Ok(entries)
}

/// Seeds the registry from a bootstrap file: activates every entry the registry has no record
/// of. An entry that is active (at any priority) or that an operator deactivated is left as it
/// is: the file seeds, the registry commands decide. Returns how many events were written (0
/// when all were known, so seeding at every start is harmless).
///
/// # Errors
/// [`RegistryError::BootstrapIo`] / [`RegistryError::BootstrapSyntax`] for the file, and the
/// errors of [`reader::load`] and [`publish`].
pub async fn seed_from_file(
    kafka: &KafkaConfig,
    path: &Path,
    actor: &str,
    timeout: Duration,
) -> Result<usize, RegistryError> {
    let text = tokio::fs::read_to_string(path)
        .await
        .map_err(|source| RegistryError::BootstrapIo {
            path: path.to_path_buf(),
            source,
        })?;
    let wanted = parse_bootstrap(path, &text)?;
    let current = reader::load(kafka, timeout).await?;
    let events: Vec<RegistryEvent> = wanted
        .iter()
        .filter(|w| {
            // Only entries the registry never decided on: one an operator deactivated or
            // re-prioritised stays as the operator left it (issue 20 #12: every lease term
            // re-activated a deactivated entry).
            let known = current.knows(&w.strategy, w.account.as_deref(), w.con_id);
            if known {
                tracing::debug!(strategy = %w.strategy, account = ?w.account, con_id = w.con_id, "bootstrap entry already decided in the registry (active or deactivated); left as it is");
            }
            !known
        })
        .map(|w| {
            super::event(
                &w.strategy,
                w.account.as_deref(),
                w.con_id,
                RegistryAction::Activate,
                w.priority,
                actor,
            )
        })
        .collect();
    publish(kafka, &events).await?;
    Ok(events.len())
}

/// Runs a `possync registry` subcommand, printing its result to stdout.
///
/// # Errors
/// The operation's error, or [`RegistryError::Kafka`] for bad `-K` settings.
pub async fn run(args: RegistryArgs) -> Result<(), RegistryError> {
    match args.command {
        RegistryCommand::Activate(a) => {
            let e = &a.entry;
            let kafka = KafkaConfig::from_args(&e.kafka)?;
            let ev = activate(
                &kafka,
                &e.strategy,
                e.account.as_deref(),
                e.con_id,
                a.priority,
                &e.actor,
            )
            .await?;
            println!("activated {} (priority {})", ev.key(), ev.priority);
        }
        RegistryCommand::Deactivate(e) => {
            let kafka = KafkaConfig::from_args(&e.kafka)?;
            let ev = deactivate(&kafka, &e.strategy, e.account.as_deref(), e.con_id, &e.actor).await?;
            println!("deactivated {}", ev.key());
        }
        RegistryCommand::List(l) => {
            let kafka = KafkaConfig::from_args(&l.kafka)?;
            let entries = list(&kafka, l.timeout).await?;
            if l.json {
                for e in &entries {
                    println!("{}", serde_json::to_string(e).unwrap_or_default());
                }
            } else {
                println!(
                    "{:<20} {:<12} {:>12} {:>8}  {:<26} actor",
                    "strategy", "account", "conId", "priority", "since (UTC)"
                );
                for e in &entries {
                    let since = chrono::DateTime::from_timestamp_micros(e.since)
                        .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
                        .unwrap_or_default();
                    println!(
                        "{:<20} {:<12} {:>12} {:>8}  {:<26} {}",
                        e.strategy,
                        e.account.as_deref().unwrap_or("*"),
                        e.con_id,
                        e.priority,
                        since,
                        e.actor
                    );
                }
                println!("{} entries", entries.len());
            }
        }
        RegistryCommand::History(h) => {
            let filter = super::history::HistoryFilter {
                strategy: h.strategy,
                account: h.account,
                con_id: h.con_id,
            };
            let rows = super::history::history(&h.tables.table_uri, &filter).await?;
            super::history::print(&rows, h.json);
        }
        RegistryCommand::Seed(s) => {
            let kafka = KafkaConfig::from_args(&s.kafka)?;
            let n = seed_from_file(&kafka, &s.file, &s.actor, Duration::from_secs(30)).await?;
            println!("seeded {n} registry entries from {}", s.file.display());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_json_and_lines() {
        let p = Path::new("x");
        let json = r#"[{"strategy":"w","con_id":5},{"strategy":"h","account":"DU1","con_id":6,"priority":3},{"strategy":"s","account":"*","con_id":7}]"#;
        let e = parse_bootstrap(p, json).unwrap();
        assert_eq!(e.len(), 3);
        assert_eq!(
            e[0],
            BootstrapEntry {
                strategy: "w".into(),
                account: None,
                con_id: 5,
                priority: 0
            }
        );
        assert_eq!(e[1].account.as_deref(), Some("DU1"));
        assert_eq!(e[2].account, None);
        let lines = "# demo\nwheel * 5 2\n\nhedge DU1 6   # inline\n";
        let e = parse_bootstrap(p, lines).unwrap();
        assert_eq!(
            e,
            vec![
                BootstrapEntry {
                    strategy: "wheel".into(),
                    account: None,
                    con_id: 5,
                    priority: 2
                },
                BootstrapEntry {
                    strategy: "hedge".into(),
                    account: Some("DU1".into()),
                    con_id: 6,
                    priority: 0
                },
            ]
        );
        assert!(matches!(
            parse_bootstrap(p, "wheel 5"),
            Err(RegistryError::BootstrapSyntax { .. })
        ));
        assert!(matches!(
            parse_bootstrap(p, "wheel * x"),
            Err(RegistryError::BootstrapSyntax { .. })
        ));
        assert!(matches!(
            parse_bootstrap(p, "[{\"strategy\": 1}]"),
            Err(RegistryError::BootstrapSyntax { .. })
        ));
    }
}
