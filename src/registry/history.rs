//! `possync registry history`: who activated or deactivated what, and when, read from the
//! append-only `registry_events` Delta table that `possync materialize` writes.
//!
//! The registry topic is compacted (only the last word per entry survives) and
//! `strategy_registry` is an upsert table, so neither can answer "who changed this, when".
//! `registry_events` holds every registry event materialize consumed, once each (deduplicated
//! by Kafka coordinates); events compaction removed before materialize first read the topic
//! are not in it.

use deltalake::arrow::array::{Array, AsArray, RecordBatch};
use deltalake::arrow::datatypes::{Int32Type, Int64Type, TimestampMicrosecondType};

use super::RegistryError;
use crate::materialize::tables::{read_table, table_url, TableKind};

/// One row of `registry_events`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct HistoryRow {
    /// Event time (UTC µs since the epoch), as the writer stamped it.
    pub time: i64,
    /// `ACTIVATE` or `DEACTIVATE`.
    pub action: String,
    /// Strategy name.
    pub strategy: String,
    /// Account; `None` = every account.
    pub account: Option<String>,
    /// IB contract id.
    pub con_id: i64,
    /// Slot priority (0 on deactivations).
    pub priority: i32,
    /// Who made the change.
    pub actor: String,
    /// Event id (UUID).
    pub event_id: String,
    /// Kafka topic the event was read from.
    pub kafka_topic: String,
    /// Kafka partition.
    pub kafka_partition: i32,
    /// Kafka offset.
    pub kafka_offset: i64,
}

/// Which history rows to show (`None` = any).
#[derive(Debug, Clone, Default)]
pub struct HistoryFilter {
    /// Only this strategy.
    pub strategy: Option<String>,
    /// Only entries of this account; `*` = only entries covering every account.
    pub account: Option<String>,
    /// Only this contract.
    pub con_id: Option<i64>,
}

impl HistoryFilter {
    fn keeps(&self, r: &HistoryRow) -> bool {
        let account_ok = match self.account.as_deref().map(str::trim) {
            None => true,
            Some("*") | Some("") => r.account.is_none(),
            Some(a) => r.account.as_deref() == Some(a),
        };
        account_ok
            && self.strategy.as_ref().is_none_or(|s| *s == r.strategy)
            && self.con_id.is_none_or(|c| c == r.con_id)
    }
}

/// Every registry event of `registry_events` under `table_uri` that `filter` keeps, oldest
/// first (by event time, then event id: the order the registry itself applies them in).
///
/// # Errors
/// [`RegistryError::NoHistory`] when the table does not exist (materialize never ran there);
/// [`RegistryError::Table`] for storage errors.
pub async fn history(table_uri: &str, filter: &HistoryFilter) -> Result<Vec<HistoryRow>, RegistryError> {
    let kind = TableKind::RegistryEvents;
    let table = |e: crate::materialize::tables::TableError| RegistryError::Table(Box::new(e));
    // Never create the table here: a mistyped URI must be an error, not an empty history.
    let missing = || RegistryError::NoHistory(format!("{}/{}", table_uri.trim_end_matches('/'), kind.name()));
    if !table_uri.contains("://") {
        let log = std::path::Path::new(table_uri).join(kind.name()).join("_delta_log");
        if !log.is_dir() {
            return Err(missing());
        }
    } else {
        let url = table_url(table_uri, kind).map_err(table)?;
        let exists = deltalake::DeltaTableBuilder::from_url(url)
            .and_then(|b| b.build())
            .map_err(|source| {
                table(crate::materialize::tables::TableError::Delta {
                    table: kind.name(),
                    source,
                })
            })?
            .verify_deltatable_existence()
            .await
            .map_err(|source| {
                table(crate::materialize::tables::TableError::Delta {
                    table: kind.name(),
                    source,
                })
            })?;
        if !exists {
            return Err(missing());
        }
    }
    let batches = read_table(table_uri, kind).await.map_err(table)?;
    let mut rows = Vec::new();
    for b in &batches {
        rows.extend(rows_of(b).map_err(|e| {
            table(crate::materialize::tables::TableError::Arrow {
                table: kind.name(),
                source: e,
            })
        })?);
    }
    rows.retain(|r| filter.keeps(r));
    rows.sort_by(|a, b| (a.time, &a.event_id).cmp(&(b.time, &b.event_id)));
    Ok(rows)
}

fn rows_of(b: &RecordBatch) -> Result<Vec<HistoryRow>, deltalake::arrow::error::ArrowError> {
    let col = |name: &str| {
        b.column_by_name(name)
            .ok_or_else(|| deltalake::arrow::error::ArrowError::SchemaError(format!("missing column {name}")))
    };
    let strategy = col("strategy")?.as_string::<i32>();
    let account = col("account")?.as_string::<i32>();
    let con_id = col("con_id")?.as_primitive::<Int64Type>();
    let action = col("action")?.as_string::<i32>();
    let priority = col("priority")?.as_primitive::<Int32Type>();
    let time = col("time")?.as_primitive::<TimestampMicrosecondType>();
    let actor = col("actor")?.as_string::<i32>();
    let event_id = col("event_id")?.as_string::<i32>();
    let topic = col("kafka_topic")?.as_string::<i32>();
    let partition = col("kafka_partition")?.as_primitive::<Int32Type>();
    let offset = col("kafka_offset")?.as_primitive::<Int64Type>();
    Ok((0..b.num_rows())
        .map(|i| HistoryRow {
            time: time.value(i),
            action: action.value(i).to_string(),
            strategy: strategy.value(i).to_string(),
            account: account.is_valid(i).then(|| account.value(i).to_string()),
            con_id: con_id.value(i),
            priority: priority.value(i),
            actor: actor.value(i).to_string(),
            event_id: event_id.value(i).to_string(),
            kafka_topic: topic.value(i).to_string(),
            kafka_partition: partition.value(i),
            kafka_offset: offset.value(i),
        })
        .collect())
}

/// `time` as `YYYY-MM-DDTHH:MM:SS.ffffffZ`.
pub fn format_time(micros: i64) -> String {
    chrono::DateTime::from_timestamp_micros(micros)
        .map(|t| t.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string())
        .unwrap_or_else(|| micros.to_string())
}

/// Prints `rows` as JSON lines (`time` as RFC 3339 UTC) or as a table.
pub fn print(rows: &[HistoryRow], json: bool) {
    if json {
        for r in rows {
            let mut v = serde_json::to_value(r).unwrap_or_default();
            v["time"] = serde_json::Value::String(format_time(r.time));
            println!("{v}");
        }
        return;
    }
    println!(
        "{:<27} {:<10} {:<20} {:<12} {:>12} {:>8}  actor",
        "time (UTC)", "action", "strategy", "account", "conId", "priority"
    );
    for r in rows {
        println!(
            "{:<27} {:<10} {:<20} {:<12} {:>12} {:>8}  {}",
            format_time(r.time),
            r.action,
            r.strategy,
            r.account.as_deref().unwrap_or("*"),
            r.con_id,
            r.priority,
            r.actor
        );
    }
    println!("{} events", rows.len());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(strategy: &str, account: Option<&str>, con_id: i64) -> HistoryRow {
        HistoryRow {
            time: 0,
            action: "ACTIVATE".into(),
            strategy: strategy.into(),
            account: account.map(str::to_string),
            con_id,
            priority: 0,
            actor: "t".into(),
            event_id: "e".into(),
            kafka_topic: "r".into(),
            kafka_partition: 0,
            kafka_offset: 0,
        }
    }

    #[test]
    fn filters_by_strategy_account_and_con_id() {
        let all = HistoryFilter::default();
        assert!(all.keeps(&row("w", None, 1)));
        let f = HistoryFilter {
            strategy: Some("w".into()),
            account: Some("DU1".into()),
            con_id: Some(1),
        };
        assert!(f.keeps(&row("w", Some("DU1"), 1)));
        assert!(!f.keeps(&row("w", None, 1)));
        assert!(!f.keeps(&row("h", Some("DU1"), 1)));
        assert!(!f.keeps(&row("w", Some("DU1"), 2)));
        let every = HistoryFilter {
            account: Some("*".into()),
            ..HistoryFilter::default()
        };
        assert!(every.keeps(&row("w", None, 1)));
        assert!(!every.keeps(&row("w", Some("DU1"), 1)));
    }

    #[test]
    fn times_print_as_utc() {
        assert_eq!(format_time(1_500_000), "1970-01-01T00:00:01.500000Z");
    }
}
