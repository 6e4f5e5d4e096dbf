//! Resuming after an ingest restart: the last published state becomes the "before" of the
//! first reconciliation.
//!
//! Without it, a position that closed while ingest was down would stay open downstream forever
//! (IB simply omits it), and every unchanged position would be published again. The state is
//! the latest event per (account, conId), newest by the tables' own order (`ingest_time`,
//! `session_id`, `sequence`, `event_id`); POLL and PNL events count, as they report IB's
//! figures too. It is read either from the whole position topics, or, with a snapshot
//! ([`crate::snapshot`]), from `positions_current` plus the topics' tail after the offsets
//! the table holds: the same fold, without the history. With the snapshot, a position whose
//! events have all left Kafka's retention is still known (the table keeps it), so it still
//! gets its RECONCILE close. Errors of this fold only ever cause redundant events (an evicted
//! latest event makes a position look changed or open), never a missed one.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use rdkafka::Message;

use super::IngestError;
use crate::book::{Book, ContractInfo, Held, PosKey};
use crate::events::{PositionEvent, Route};
use crate::kafka::KafkaConfig;
use crate::materialize::TableKind;
use crate::registry::{RegistryError, TopicReplay};
use crate::snapshot::{self, Gap, SnapshotConfig};

/// The last published state: open positions and those whose last route was ACTIVE.
pub struct Resumed {
    /// Open positions as last published.
    pub book: Book,
    /// Positions whose latest event was on the active route.
    pub active: BTreeSet<PosKey>,
    /// Events read from Kafka.
    pub events: u64,
    /// Rows read from `positions_current`, and its version (`None`: no snapshot used).
    pub table: Option<(usize, Option<i64>)>,
    /// Offsets deleted by retention before anything held them.
    pub gaps: Vec<Gap>,
}

/// Newest-wins order of position events (as `positions_current` orders them).
fn newer(e: &PositionEvent, old: &PositionEvent) -> bool {
    (e.ingest_time, &e.session_id, e.sequence, &e.event_id)
        >= (old.ingest_time, &old.session_id, old.sequence, &old.event_id)
}

/// Reads the last published state: from `snapshot`'s `positions_current` and the tail of both
/// position topics after it, or (without) from both topics whole.
///
/// # Errors
/// [`IngestError::Registry`] with [`RegistryError::CatchUpTimeout`] when a topic cannot be read
/// to its end within `timeout`; [`IngestError::Snapshot`] when the table cannot be read.
pub async fn load(
    kafka: &KafkaConfig,
    timeout: Duration,
    snapshot: Option<&SnapshotConfig>,
) -> Result<Resumed, IngestError> {
    let mut latest: BTreeMap<PosKey, PositionEvent> = BTreeMap::new();
    let topics = kafka.topics.positions();
    let table = match snapshot {
        Some(cfg) => Some(snapshot::read(cfg, kafka, TableKind::PositionsCurrent, &topics, timeout).await?),
        None => None,
    };
    if let Some(t) = &table {
        for e in snapshot::rows::position_events(&t.batches).map_err(snapshot::SnapshotError::from)? {
            latest.insert(PosKey::new(e.account.clone(), e.con_id), e);
        }
    }
    let mut events = 0u64;
    let mut gaps = Vec::new();
    for topic in topics {
        let from = table.as_ref().map(|t| t.tail_of(topic)).unwrap_or_default();
        let mut replay = TopicReplay::start_from(kafka, topic, timeout, from).await?;
        gaps.extend(snapshot::report_gaps(
            &replay,
            table.as_ref().map(|_| TableKind::PositionsCurrent),
        ));
        let deadline = tokio::time::Instant::now() + timeout;
        while !replay.caught_up() {
            let Some(m) = tokio::time::timeout_at(deadline, replay.next_in_backlog())
                .await
                .map_err(|_| RegistryError::CatchUpTimeout {
                    topic: topic.to_string(),
                    timeout,
                })??
            else {
                break;
            };
            let Some(Ok(e)) = m.payload().map(PositionEvent::decode) else {
                continue;
            };
            events += 1;
            let key = PosKey::new(e.account.clone(), e.con_id);
            if latest.get(&key).is_none_or(|old| newer(&e, old)) {
                latest.insert(key, e);
            }
        }
    }
    let mut book = Book::new();
    let mut active = BTreeSet::new();
    for (key, e) in latest {
        if e.position == 0.0 {
            continue;
        }
        if e.route == Route::Active {
            active.insert(key.clone());
        }
        book.insert(key, held_from_event(&e));
    }
    Ok(Resumed {
        book,
        active,
        events,
        table: table.map(|t| (t.rows(), t.version)),
        gaps,
    })
}

/// The position an event describes (PnL figures dropped: streams restart anyway).
pub fn held_from_event(e: &PositionEvent) -> Held {
    Held {
        contract: ContractInfo {
            symbol: e.symbol.clone(),
            sec_type: e.sec_type.clone(),
            expiry: e.expiry.clone(),
            strike: e.strike,
            right: e.right.clone(),
            multiplier: e.multiplier.clone(),
            exchange: e.exchange.clone(),
            currency: e.currency.clone(),
            local_symbol: e.local_symbol.clone(),
            trading_class: e.trading_class.clone(),
        },
        position: e.position,
        avg_cost: e.avg_cost,
        pnl: None,
        dirty: false,
    }
}
