//! Real-time PnL streams ("streaming slots") within a hard budget.
//!
//! Each held slot is one `reqPnLSingle` stream, owned by its own task that forwards ticks to
//! the ingest loop (conflating them to the latest while the loop is busy: a PnL figure
//! supersedes the previous one). A slot counts as used from the moment its request is sent
//! until its cancel has been written to IB, so the number of streams IB sees never exceeds the
//! budget, even while one slot is handed over to another position.

use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Instant;

use futures::StreamExt;
use ibapi::accounts::types::{AccountId, ContractId};
use ibapi::subscriptions::SubscriptionItem;
use ibapi::Client;
use tokio::sync::mpsc;
use tokio::task::AbortHandle;
use tokio_util::sync::CancellationToken;

use crate::book::{Pnl, PosKey};
use crate::metrics;

/// What a stream task reports.
#[derive(Debug)]
pub enum SlotEvent {
    /// The latest PnL figures of a held position.
    Tick {
        key: PosKey,
        id: u64,
        pnl: Pnl,
        observed: Instant,
    },
    /// The stream was cancelled at IB on request; its slot is free.
    Released { key: PosKey, id: u64 },
    /// The stream ended by itself (refused, or the connection dropped); its slot is free.
    Ended {
        key: PosKey,
        id: u64,
        error: String,
        connection_lost: bool,
    },
}

impl SlotEvent {
    fn ident(&self) -> (&PosKey, u64) {
        match self {
            SlotEvent::Tick { key, id, .. } | SlotEvent::Released { key, id } | SlotEvent::Ended { key, id, .. } => {
                (key, *id)
            }
        }
    }
}

struct Slot {
    id: u64,
    stop: CancellationToken,
    task: AbortHandle,
    stopping: bool,
}

/// The streams held now, within `budget`.
pub struct Slots {
    budget: usize,
    slots: HashMap<PosKey, Slot>,
    next_id: u64,
    events_tx: mpsc::Sender<SlotEvent>,
    events_rx: mpsc::Receiver<SlotEvent>,
}

impl Slots {
    /// No slot held; at most `budget` at once.
    pub fn new(budget: usize) -> Self {
        let (events_tx, events_rx) = mpsc::channel(256);
        metrics::global().slot_budget.store(budget as i64, Relaxed);
        metrics::global().slots_in_use.store(0, Relaxed);
        Self {
            budget,
            slots: HashMap::new(),
            next_id: 1,
            events_tx,
            events_rx,
        }
    }

    /// The budget.
    pub fn budget(&self) -> usize {
        self.budget
    }

    /// Streams requested and not yet cancelled at IB (stopping ones included).
    pub fn in_use(&self) -> usize {
        self.slots.len()
    }

    /// Whether `key` holds a slot that is not being given up.
    pub fn holding(&self, key: &PosKey) -> bool {
        self.slots.get(key).is_some_and(|s| !s.stopping)
    }

    /// The positions holding a slot that is not being given up.
    pub fn holders(&self) -> impl Iterator<Item = &PosKey> {
        self.slots.iter().filter(|(_, s)| !s.stopping).map(|(k, _)| k)
    }

    /// Requests a PnL stream for `key` if a slot is free; returns whether it did.
    pub fn start(&mut self, client: &Arc<Client>, key: PosKey) -> bool {
        if self.slots.contains_key(&key) || self.in_use() >= self.budget {
            return false;
        }
        let id = self.next_id;
        self.next_id += 1;
        let stop = CancellationToken::new();
        let task = tokio::spawn(stream_task(
            client.clone(),
            key.clone(),
            id,
            stop.clone(),
            self.events_tx.clone(),
        ))
        .abort_handle();
        self.slots.insert(
            key,
            Slot {
                id,
                stop,
                task,
                stopping: false,
            },
        );
        self.gauge();
        true
    }

    /// Asks the stream of `key` to cancel; the slot frees when [`SlotEvent::Released`] arrives.
    pub fn stop(&mut self, key: &PosKey) {
        if let Some(s) = self.slots.get_mut(key) {
            s.stopping = true;
            s.stop.cancel();
        }
    }

    /// The next report of a stream task that is still current (stale ones are skipped).
    /// Bookkeeping is done here: after `Released`/`Ended` the slot is free.
    pub async fn recv(&mut self) -> SlotEvent {
        loop {
            let event = self.events_rx.recv().await.expect("Slots keeps a sender");
            let (key, id) = event.ident();
            let current = self.slots.get(key).is_some_and(|s| s.id == id);
            if !current {
                continue;
            }
            if matches!(event, SlotEvent::Released { .. } | SlotEvent::Ended { .. }) {
                let key = key.clone();
                self.slots.remove(&key);
                self.gauge();
            }
            return event;
        }
    }

    /// Forgets every stream (the connection that carried them is gone).
    pub fn reset(&mut self) {
        for (_, s) in self.slots.drain() {
            s.task.abort();
        }
        self.gauge();
    }

    fn gauge(&self) {
        metrics::global().slots_in_use.store(self.in_use() as i64, Relaxed);
    }
}

impl Drop for Slots {
    fn drop(&mut self) {
        self.reset();
    }
}

async fn stream_task(client: Arc<Client>, key: PosKey, id: u64, stop: CancellationToken, tx: mpsc::Sender<SlotEvent>) {
    let ended = |error: String, connection_lost: bool| SlotEvent::Ended {
        key: key.clone(),
        id,
        error,
        connection_lost,
    };
    let Ok(con_id) = i32::try_from(key.con_id) else {
        let _ = tx
            .send(ended(
                format!("conId {} does not fit IB's 32-bit contract id", key.con_id),
                false,
            ))
            .await;
        return;
    };
    // Not raced against `stop`: dropping a half-sent request would leave the cancel to a
    // detached task, and the slot must stay counted until the cancel is written.
    let mut sub = match client
        .pnl_single(&AccountId(key.account.clone()), ContractId(con_id), None)
        .await
    {
        Ok(s) => s,
        Err(e) => {
            let _ = tx.send(ended(e.to_string(), e.is_connection_lost())).await;
            return;
        }
    };
    let mut latest: Option<(Pnl, Instant)> = None;
    loop {
        tokio::select! {
            biased;
            _ = stop.cancelled() => {
                sub.cancel().await;
                let _ = tx.send(SlotEvent::Released { key: key.clone(), id }).await;
                return;
            }
            permit = tx.reserve(), if latest.is_some() => {
                let Ok(permit) = permit else { return };
                if let Some((pnl, observed)) = latest.take() {
                    permit.send(SlotEvent::Tick { key: key.clone(), id, pnl, observed });
                }
            }
            item = sub.next() => match item {
                Some(Ok(SubscriptionItem::Data(p))) => latest = Some((Pnl::from(&p), Instant::now())),
                Some(Ok(SubscriptionItem::Notice(n))) => tracing::debug!(key = %key, code = n.code, message = %n.message, "PnL stream notice"),
                Some(Err(e)) => {
                    let _ = tx.send(ended(e.to_string(), e.is_connection_lost())).await;
                    return;
                }
                None => {
                    let _ = tx.send(ended("the stream closed".into(), true)).await;
                    return;
                }
            },
        }
    }
}
