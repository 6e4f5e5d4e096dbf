//! Rows of `positions_current` and `position_queue` read back as the values ingest and the
//! queue worker keep in memory.

use std::collections::HashMap;

use deltalake::arrow::array::RecordBatch;

use crate::book::PosKey;
use crate::events::{PositionEvent, Route, Source};
use crate::ops::Row;

/// A row whose route or source this build does not know (another build wrote the table).
#[derive(Debug, thiserror::Error)]
#[error("{table}: row ({account}, {con_id}) has {column} {value:?}, unknown to this build; upgrade possync or unset --table-uri to replay the topics")]
pub struct RowError {
    pub table: &'static str,
    pub account: String,
    pub con_id: i64,
    pub column: &'static str,
    pub value: String,
}

fn parse<T: serde::de::DeserializeOwned>(v: &str) -> Option<T> {
    serde_json::from_value(serde_json::Value::String(v.to_string())).ok()
}

/// `positions_current` rows as the events they were materialized from.
///
/// # Errors
/// [`RowError`] for a route or source this build does not know.
pub fn position_events(batches: &[RecordBatch]) -> Result<Vec<PositionEvent>, RowError> {
    let mut out = Vec::new();
    for b in batches {
        let r = Row(b);
        for i in 0..b.num_rows() {
            let account = r.str("account", i).unwrap_or_default();
            let con_id = r.i64("con_id", i).unwrap_or_default();
            let bad = |column: &'static str, value: String| RowError {
                table: "positions_current",
                account: account.clone(),
                con_id,
                column,
                value,
            };
            let route = r.str("route", i).unwrap_or_default();
            let route: Route = parse(&route).ok_or_else(|| bad("route", route))?;
            let source = r.str("source", i).unwrap_or_default();
            let source: Source = parse(&source).ok_or_else(|| bad("source", source))?;
            out.push(PositionEvent {
                event_id: r.str("event_id", i).unwrap_or_default(),
                session_id: r.str("session_id", i).unwrap_or_default(),
                sequence: r.i64("sequence", i).unwrap_or_default(),
                account: account.clone(),
                con_id,
                symbol: r.str("symbol", i).unwrap_or_default(),
                sec_type: r.str("sec_type", i).unwrap_or_default(),
                expiry: r.str("expiry", i),
                strike: r.f64("strike", i),
                right: r.str("right", i),
                multiplier: r.str("multiplier", i),
                exchange: r.str("exchange", i).unwrap_or_default(),
                currency: r.str("currency", i).unwrap_or_default(),
                local_symbol: r.str("local_symbol", i).unwrap_or_default(),
                trading_class: r.str("trading_class", i).unwrap_or_default(),
                position: r.f64("position", i).unwrap_or_default(),
                avg_cost: r.f64("avg_cost", i).unwrap_or_default(),
                daily_pnl: r.f64("daily_pnl", i),
                unrealized_pnl: r.f64("unrealized_pnl", i),
                realized_pnl: r.f64("realized_pnl", i),
                market_value: r.f64("market_value", i),
                route,
                source,
                strategies: r.strs("strategies", i),
                ib_time: r.ts("ib_time", i).unwrap_or_default(),
                ingest_time: r.ts("ingest_time", i).unwrap_or_default(),
            });
        }
    }
    Ok(out)
}

/// The queued-route part of a `position_queue` row: what the queue worker's own fold of
/// `positions.queued` knows about a key.
#[derive(Debug, Clone, PartialEq)]
pub struct QueuedRow {
    pub key: PosKey,
    /// The newest QUEUED-route enqueue (STREAM / SNAPSHOT / RECONCILE), µs.
    pub enqueued_at: Option<i64>,
    /// POLL events seen.
    pub refresh_count: i64,
    /// The newest QUEUED-route event: its source, order and figures.
    pub last_source: Source,
    pub last_event_at: i64,
    pub last_session_id: String,
    pub last_sequence: i64,
    pub last_event_id: String,
    pub position: f64,
    pub avg_cost: f64,
}

/// `position_queue` rows with a queued part (rows that only ever saw the active route are
/// left out; [`active_rows`] has them).
///
/// # Errors
/// [`RowError`] for a source this build does not know.
pub fn queued_rows(batches: &[RecordBatch]) -> Result<Vec<QueuedRow>, RowError> {
    let mut out = Vec::new();
    for b in batches {
        let r = Row(b);
        for i in 0..b.num_rows() {
            let Some(source) = r.str("last_source", i) else {
                continue;
            };
            let account = r.str("account", i).unwrap_or_default();
            let con_id = r.i64("con_id", i).unwrap_or_default();
            let last_source: Source = parse(&source).ok_or_else(|| RowError {
                table: "position_queue",
                account: account.clone(),
                con_id,
                column: "last_source",
                value: source,
            })?;
            out.push(QueuedRow {
                key: PosKey::new(account, con_id),
                enqueued_at: r.ts("enqueued_at", i),
                refresh_count: r.i64("refresh_count", i).unwrap_or_default(),
                last_source,
                last_event_at: r.ts("last_event_at", i).unwrap_or_default(),
                last_session_id: r.str("last_session_id", i).unwrap_or_default(),
                last_sequence: r.i64("last_sequence", i).unwrap_or_default(),
                last_event_id: r.str("last_event_id", i).unwrap_or_default(),
                position: r.f64("position", i).unwrap_or_default(),
                avg_cost: r.f64("avg_cost", i).unwrap_or_default(),
            });
        }
    }
    Ok(out)
}

/// The newest ACTIVE-route event time (`last_active_at`, µs) of every `position_queue` row
/// that has one.
pub fn active_rows(batches: &[RecordBatch]) -> Vec<(PosKey, i64)> {
    let mut out = Vec::new();
    for b in batches {
        let r = Row(b);
        for i in 0..b.num_rows() {
            if let Some(t) = r.ts("last_active_at", i) {
                let account = r.str("account", i).unwrap_or_default();
                out.push((PosKey::new(account, r.i64("con_id", i).unwrap_or_default()), t));
            }
        }
    }
    out
}

/// Events by key.
pub fn by_key(events: Vec<PositionEvent>) -> HashMap<PosKey, PositionEvent> {
    events
        .into_iter()
        .map(|e| (PosKey::new(e.account.clone(), e.con_id), e))
        .collect()
}
