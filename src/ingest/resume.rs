//! Resuming after an ingest restart: the last published state, read back from the position
//! topics, becomes the "before" of the first reconciliation.
//!
//! Without it, a position that closed while ingest was down would stay open downstream forever
//! (IB simply omits it), and every unchanged position would be published again. The topics
//! are replayed from the beginning and folded to the latest event per (account, conId) by
//! ingest time (then sequence); POLL and PNL events count, as they report IB's figures too.
//! Errors of this fold only ever cause redundant events (an evicted latest event makes a
//! position look changed or open), never a missed one.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use rdkafka::Message;

use super::book::{Book, ContractInfo, Held, PosKey};
use crate::events::{PositionEvent, Route};
use crate::kafka::KafkaConfig;
use crate::registry::{RegistryError, TopicReplay};

/// The last published state: open positions and those whose last route was ACTIVE.
pub struct Resumed {
    /// Open positions as last published.
    pub book: Book,
    /// Positions whose latest event was on the active route.
    pub active: BTreeSet<PosKey>,
    /// Events read.
    pub events: u64,
}

/// Replays both position topics to their end and folds them.
///
/// # Errors
/// [`RegistryError::CatchUpTimeout`] when a topic cannot be read to its end within `timeout`.
pub async fn load(kafka: &KafkaConfig, timeout: Duration) -> Result<Resumed, RegistryError> {
    let mut latest: BTreeMap<PosKey, PositionEvent> = BTreeMap::new();
    let mut events = 0u64;
    for topic in kafka.topics.positions() {
        let mut replay = TopicReplay::start(kafka, topic, timeout).await?;
        let deadline = tokio::time::Instant::now() + timeout;
        while !replay.caught_up() {
            let m = tokio::time::timeout_at(deadline, replay.next()).await.map_err(|_| {
                RegistryError::CatchUpTimeout {
                    topic: topic.to_string(),
                    timeout,
                }
            })??;
            let Some(Ok(e)) = m.payload().map(PositionEvent::decode) else {
                continue;
            };
            events += 1;
            let key = PosKey::new(e.account.clone(), e.con_id);
            let newer = latest
                .get(&key)
                .is_none_or(|old| (e.ingest_time, e.sequence) >= (old.ingest_time, old.sequence));
            if newer {
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
    Ok(Resumed { book, active, events })
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
