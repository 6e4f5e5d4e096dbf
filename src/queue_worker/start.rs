//! The queue worker's start-up: its queue state, then the replays that keep following
//! `positions.queued` and `positions.active` (an item on the active route is not polled, see
//! [`super::state`]).
//!
//! With a snapshot ([`crate::snapshot`]) the state comes from `position_queue` (its
//! queued-route part: the newest queued event's source, order and figures, the POLL count) with
//! the contract fields of `positions_current`, and only the tail of the topic after the offsets
//! `position_queue` holds is read (of both topics: the table's commits hold offsets of both);
//! without, the topics are replayed whole. Either way the same
//! fold ([`QueueState::apply`]) continues from there, so both give the same items, statuses
//! and figures. One difference: `enqueued_at` of a pending item restored from the table is its
//! *newest* enqueue (the table keeps no older one), where a replay keeps the first since the
//! last refresh; it only orders sweeps.

use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::state::{Item, QueueState, Status};
use super::QueueWorkerError;
use crate::book::{self, ContractInfo, Held};
use crate::events::{PositionEvent, Route, Source};
use crate::kafka::KafkaConfig;
use crate::materialize::TableKind;
use crate::registry::{RegistryError, TopicReplay};
use crate::snapshot::rows::{self, QueuedRow};
use crate::snapshot::{self, Gap, SnapshotConfig, SnapshotError};

/// The state at start-up and the replay positioned after it.
pub struct Started {
    /// The queue.
    pub queue: QueueState,
    /// Follows the queued topic from where the start-up read stopped.
    pub replay: TopicReplay,
    /// Follows the active topic from where the start-up read stopped.
    pub active: TopicReplay,
    /// Events read from Kafka.
    pub events: u64,
    /// Rows read from `position_queue`, and its version (`None`: no snapshot used).
    pub table: Option<(usize, Option<i64>)>,
    /// Offsets deleted by retention before anything held them.
    pub gaps: Vec<Gap>,
    /// How long it took.
    pub took: Duration,
}

/// Reads the queue state (from `snapshot` and the topic's tail, or the whole topic) up to the
/// end of the topic as of now. `Ok(None)` when `shutdown` came first.
///
/// # Errors
/// [`QueueWorkerError::Replay`] when the topic cannot be read to its end within `timeout`;
/// [`QueueWorkerError::Snapshot`] when the tables cannot be read.
pub async fn load(
    kafka: &KafkaConfig,
    timeout: Duration,
    snapshot: Option<&SnapshotConfig>,
    shutdown: &CancellationToken,
) -> Result<Option<Started>, QueueWorkerError> {
    let started = Instant::now();
    let topic = kafka.topics.queued.clone();
    let active_topic = kafka.topics.active.clone();
    let mut queue = QueueState::new();
    let (mut from, mut from_active) = Default::default();
    let mut table = None;
    if let Some(cfg) = snapshot {
        let q = snapshot::read(cfg, kafka, TableKind::PositionQueue, &[&topic, &active_topic], timeout).await?;
        if q.version.is_some() {
            // Contract fields: the queue table has none; the newest event of the key has them.
            let current = snapshot::read(cfg, kafka, TableKind::PositionsCurrent, &[], timeout).await?;
            let current = rows::by_key(rows::position_events(&current.batches).map_err(SnapshotError::from)?);
            for row in rows::queued_rows(&q.batches).map_err(SnapshotError::from)? {
                let item = restore(&row, current.get(&row.key));
                queue.restore(row.key, item);
            }
            for (key, t) in rows::active_rows(&q.batches) {
                queue.restore_active(key, t);
            }
        }
        from = q.tail_of(&topic);
        from_active = q.tail_of(&active_topic);
        table = Some((q.rows(), q.version));
    }
    let mut replay = TopicReplay::start_from(kafka, &topic, timeout, from).await?;
    let mut active = TopicReplay::start_from(kafka, &active_topic, timeout, from_active).await?;
    let mut gaps = snapshot::report_gaps(&replay, table.map(|_| TableKind::PositionQueue));
    gaps.extend(snapshot::report_gaps(&active, table.map(|_| TableKind::PositionQueue)));
    let deadline = tokio::time::Instant::now() + timeout;
    let mut events = 0;
    // The state does not depend on the order of the two topics (see `state`): one, then the other.
    for (name, r) in [(&topic, &mut replay), (&active_topic, &mut active)] {
        while !r.caught_up() {
            let m = tokio::select! {
                _ = shutdown.cancelled() => return Ok(None),
                m = tokio::time::timeout_at(deadline, r.next_in_backlog()) => m.map_err(|_| RegistryError::CatchUpTimeout {
                    topic: name.clone(),
                    timeout,
                })??,
            };
            let Some(m) = m else { break };
            events += 1;
            super::apply(&mut queue, &m);
        }
    }
    Ok(Some(Started {
        queue,
        replay,
        active,
        events,
        table,
        gaps,
        took: started.elapsed(),
    }))
}

/// The item a `position_queue` row stands for, with `current`'s contract fields.
fn restore(row: &QueuedRow, current: Option<&PositionEvent>) -> Item {
    let mut last = match current {
        Some(e) => e.clone(),
        None => {
            tracing::debug!(key = %row.key, "queue item without a positions_current row: no contract fields until its next event");
            let held = Held {
                contract: ContractInfo::default(),
                position: 0.0,
                avg_cost: 0.0,
                pnl: None,
                dirty: false,
            };
            book::event(
                &row.key,
                &held,
                Route::Queued,
                row.last_source,
                vec![],
                row.last_event_at,
            )
        }
    };
    last.event_id.clone_from(&row.last_event_id);
    last.session_id.clone_from(&row.last_session_id);
    last.sequence = row.last_sequence;
    last.position = row.position;
    last.avg_cost = row.avg_cost;
    last.route = Route::Queued;
    last.source = row.last_source;
    last.ingest_time = row.last_event_at;
    if current.is_none_or(|c| c.event_id != row.last_event_id) {
        last.ib_time = row.last_event_at;
    }
    last.daily_pnl = None;
    last.unrealized_pnl = None;
    last.realized_pnl = None;
    last.market_value = None;
    let status = if row.position == 0.0 {
        Status::Closed
    } else if row.last_source == Source::Poll {
        Status::Refreshed
    } else {
        Status::Pending
    };
    Item {
        last,
        status,
        enqueued_at: row.enqueued_at.unwrap_or(row.last_event_at),
        in_flight_since: None,
        stale_poll: false,
        refresh_count: u64::try_from(row.refresh_count).unwrap_or_default(),
    }
}
