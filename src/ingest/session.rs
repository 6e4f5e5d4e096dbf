//! The IB side of ingest: connecting with backoff, and one connected session's event loop.
//!
//! `ibapi`'s own auto-reconnect is switched off (`max_reconnect_attempts(0)`): when the socket
//! drops, the client fails every subscription with `ConnectionReset` and shuts down, and this
//! module reconnects with its own backoff (so 326 "client id in use" while IB still holds the
//! dead session, and a gateway refusing connections during its nightly restart, are simply
//! retried), then resubscribes positions and PnL streams and reconciles after PositionEnd.
//!
//! **Sizing.** ibapi buffers each subscription in a lossy ring that evicts the oldest frames
//! when ingest falls behind, and the position list arrives in one burst. Each connection's ring
//! is sized from the list ingest expects ([`buffer_for`]: the last list, or the resumed book),
//! so a desk's 100k positions fit at default flags; a list that still overflows (first start
//! with no state, a book that grew) ends the session with the size it saw, and the next one,
//! made at once, fits it. The day's executions list (two frames a fill) is sized and handled
//! the same way ([`super::fills::Fills::expected_frames`]).
//!
//! **Liveness.** A socket can stay open while nothing comes through it (a hung TWS, a dead NAT
//! entry). A heartbeat (`reqCurrentTime` every `--ib-heartbeat`) unanswered within
//! `--ib-timeout`, or a position list not ended within `--ib-sync-timeout`, ends the session
//! as silent ([`SessionEnd::Silent`]): `ib_connected` falls to 0 (so `/readyz` says so), the
//! connection is dropped and made again.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use ibapi::accounts::PositionUpdate;
use ibapi::orders::{ExecutionData, ExecutionFilter, Executions, OrderUpdate};
use ibapi::subscriptions::{NoticeStream, Subscription, SubscriptionItem};
use ibapi::{Client, RateLimiter};
use tokio::sync::mpsc;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use super::backoff::Backoff;
use super::engine::Engine;
use super::{IngestConfig, IngestError};
use crate::book::{Book, Held, PosKey};
use crate::events::RegistryEvent;
use crate::executions::ExecSource;

/// Why a session ended.
pub(crate) enum SessionEnd {
    /// Shutdown was requested.
    Shutdown,
    /// The connection is gone; reconnect.
    Disconnected(String),
    /// The socket is open but IB stopped answering; reconnect.
    Silent(String),
    /// Frames overflowed the buffer of this connection: during the position list (reconnect
    /// at once, with a buffer sized from what was seen), or live while Kafka held ingest up.
    Overflow {
        /// Whether the position list was being received.
        during_list: bool,
    },
}

/// Ends the heartbeat task with the session.
struct AbortOnDrop(tokio::task::JoinHandle<String>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Asks IB for its time every `every`; returns why once an answer is overdue or fails.
async fn heartbeat(client: Arc<Client>, every: Duration, timeout: Duration) -> String {
    let mut tick = tokio::time::interval(every.max(Duration::from_millis(10)));
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        if let Err(e) = crate::ib::heartbeat(&client, timeout).await {
            return e.to_string();
        }
    }
}

/// What [`connect`] ended with.
pub(crate) enum Connected {
    /// A connection, and its notice stream.
    Yes(Arc<Client>, NoticeStream),
    /// Shutdown was requested.
    Shutdown,
    /// `give_up_at` passed.
    GaveUp,
}

/// Connects to IB with `buffer` frames per subscription, retrying with `backoff` (kept across
/// sessions) until it works, `shutdown`, or a failed attempt after `give_up_at`.
pub(crate) async fn connect(
    cfg: &IngestConfig,
    buffer: usize,
    limiter: &RateLimiter,
    backoff: &mut Backoff,
    give_up_at: Option<Instant>,
    shutdown: &CancellationToken,
) -> Connected {
    let address = cfg.ib_address();
    let mut attempt = 1u64;
    loop {
        let delay = backoff.next_delay();
        let connecting = Client::builder()
            .address(address.clone())
            .client_id(cfg.client_id)
            .max_reconnect_attempts(0)
            .channel_capacity(buffer)
            .rate_limiter(limiter.clone())
            .connect_with_notice_stream();
        let outcome = tokio::select! {
            _ = shutdown.cancelled() => return Connected::Shutdown,
            r = tokio::time::timeout(Duration::from_secs(15), connecting) => r,
        };
        match outcome {
            Ok(Ok((client, notices))) => {
                tracing::info!(%address, client_id = cfg.client_id, server_version = client.server_version(), accounts = ?client.handshake_managed_accounts(), buffer, "connected to IB");
                return Connected::Yes(Arc::new(client), notices);
            }
            Ok(Err(ibapi::Error::ClientIdInUse { .. })) => {
                tracing::warn!(%address, client_id = cfg.client_id, attempt, retry_in = ?delay, "IB says client id in use (326); if the old session is still closing this clears by itself, otherwise give ingest another --client-id");
            }
            Ok(Err(e)) => {
                tracing::warn!(%address, attempt, retry_in = ?delay, error = %e, "cannot connect to IB; retrying")
            }
            Err(_) => tracing::warn!(%address, attempt, retry_in = ?delay, "IB handshake timed out; retrying"),
        }
        if give_up_at.is_some_and(|t| Instant::now() >= t) {
            return Connected::GaveUp;
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Connected::Shutdown,
            _ = tokio::time::sleep(delay) => {}
        }
        attempt += 1;
    }
}

fn describe(e: &ibapi::Error) -> String {
    e.to_string()
}

/// Runs one connected session until the connection drops or shutdown.
pub(crate) async fn run_session(
    engine: &mut Engine,
    cfg: &IngestConfig,
    client: &Arc<Client>,
    mut notices: NoticeStream,
    registry: &mut mpsc::Receiver<RegistryEvent>,
    shutdown: &CancellationToken,
) -> Result<SessionEnd, IngestError> {
    let mut beat = AbortOnDrop(tokio::spawn(heartbeat(
        client.clone(),
        cfg.ib_heartbeat,
        cfg.ib_timeout,
    )));
    let mut positions = match client.positions().await {
        Ok(p) => p,
        Err(e) => {
            return Ok(SessionEnd::Disconnected(format!(
                "positions request failed: {}",
                describe(&e)
            )))
        }
    };
    // Executions: live ones first (other clients' too when ingest's client id is TWS's master
    // API client id), then the day's list, which brings back fills made while disconnected.
    let mut live_fills = match client.order_update_stream().await {
        Ok(s) => s,
        Err(e) => {
            return Ok(SessionEnd::Disconnected(format!(
                "order updates request failed: {}",
                describe(&e)
            )))
        }
    };
    engine.fills.list_started();
    let mut day_fills = match request_executions(client).await {
        Ok(s) => Some(s),
        Err(why) => return Ok(SessionEnd::Disconnected(why)),
    };
    engine.fills.request_wanted = false;
    let mut fills_tick = tokio::time::interval(engine.fills.tick());
    fills_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    // Some(book) while the position list is being received (until PositionEnd), and by when
    // it must have ended.
    let mut snapshot: Option<Book> = Some(Book::new());
    let mut list_deadline = Instant::now() + cfg.ib_sync_timeout;
    let mut stats = tokio::time::interval(Duration::from_secs(30));
    stats.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let mut registry_open = true;
    loop {
        if let Some(why) = engine.reconnect_wanted.take() {
            return Ok(SessionEnd::Disconnected(why));
        }
        if engine.resync_wanted && snapshot.is_none() {
            // IB re-sends the whole list (then PositionEnd) to the open positions stream; the
            // extra handle is dropped at once (the shared stream stays subscribed).
            engine.resync_wanted = false;
            tracing::info!("re-requesting the position list to reconcile");
            match client.positions().await {
                Ok(extra) => drop(extra),
                Err(e) => {
                    return Ok(SessionEnd::Disconnected(format!(
                        "positions re-request failed: {}",
                        describe(&e)
                    )))
                }
            }
            snapshot = Some(Book::new());
            list_deadline = Instant::now() + cfg.ib_sync_timeout;
        }
        if engine.fills.request_wanted && day_fills.is_none() {
            engine.fills.request_wanted = false;
            engine.fills.list_started();
            match request_executions(client).await {
                Ok(s) => day_fills = Some(s),
                Err(why) => return Ok(SessionEnd::Disconnected(why)),
            }
        }
        let retry_refused = engine.next_refused_retry();
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => return Ok(SessionEnd::Shutdown),
            why = &mut beat.0 => return Ok(SessionEnd::Silent(why.unwrap_or_else(|e| format!("heartbeat task: {e}")))),
            _ = tokio::time::sleep_until(list_deadline.into()), if snapshot.is_some() => {
                let got = snapshot.as_ref().map_or(0, Book::len);
                return Ok(SessionEnd::Silent(format!("the position list did not end within {:?} ({got} positions received)", cfg.ib_sync_timeout)));
            }
            failed = engine.publisher.failed() => engine.on_failures(failed),
            event = engine.slots.recv() => engine.on_slot_event(client, event).await?,
            event = registry.recv(), if registry_open => match event {
                Some(event) => engine.on_registry(Some(client), event).await?,
                None => {
                    tracing::warn!("registry follower stopped; routing keeps the registry as last seen");
                    registry_open = false;
                }
            },
            item = positions.next() => {
                let observed = Instant::now();
                match item {
                    Some(Ok(SubscriptionItem::Data(PositionUpdate::Position(p)))) => match snapshot.as_mut() {
                        Some(book) => {
                            let key = PosKey::new(p.account.clone(), i64::from(p.contract.contract_id));
                            book.insert(key, Held::from_ib(&p.contract, p.position, p.average_cost));
                        }
                        None => engine.on_stream(client, p, observed).await?,
                    },
                    Some(Ok(SubscriptionItem::Data(PositionUpdate::PositionEnd))) => {
                        if let Some(book) = snapshot.take() {
                            engine.expect_list(book.len());
                            engine.sync(client, book).await?;
                        }
                    }
                    Some(Ok(SubscriptionItem::Notice(n))) if n.code == ibapi::SUBSCRIPTION_LAG_CODE => {
                        // Frames were dropped (possibly a PositionEnd): only a fresh connection
                        // gives a list that is known to be whole. The next one's buffer holds
                        // at least what this one saw.
                        if let Some(list) = &snapshot {
                            // The list is at least what arrived and was dropped; allow for twice.
                            let seen = list.len() + crate::ib::dropped_frames(&n.message);
                            engine.expect_list(engine.expected_list().max(seen * 2));
                        }
                        tracing::warn!(message = %n.message, during_list = snapshot.is_some(), next_buffer = crate::ib::buffer_for(cfg.ib_buffer, engine.buffer_frames()), "position updates overflowed the IB buffer; reconnecting at once with a larger buffer to reconcile");
                        return Ok(SessionEnd::Overflow { during_list: snapshot.is_some() });
                    }
                    Some(Ok(SubscriptionItem::Notice(n))) => tracing::info!(code = n.code, message = %n.message, "positions notice"),
                    Some(Err(e)) => return Ok(SessionEnd::Disconnected(format!("positions stream: {}", describe(&e)))),
                    None => return Ok(SessionEnd::Disconnected("positions stream ended".into())),
                }
            }
            failed = engine.publisher.failed_executions() => engine.on_failed_executions(failed),
            update = live_fills.next() => match update {
                Some(Ok(SubscriptionItem::Data(OrderUpdate::ExecutionData(d)))) => {
                    engine.fills.live_frame();
                    engine.on_execution(&d, source_of(&d)).await?
                }
                Some(Ok(SubscriptionItem::Data(OrderUpdate::CommissionReport(c)))) => {
                    engine.fills.live_frame();
                    engine.on_commission(&c).await?
                }
                Some(Ok(SubscriptionItem::Notice(n))) if n.code == ibapi::SUBSCRIPTION_LAG_CODE => {
                    // Live executions were dropped (ingest fell behind): the day's list after
                    // a reconnect brings them; its buffer fits every frame seen live and lost.
                    engine.fills.live_overflowed(crate::ib::dropped_frames(&n.message));
                    tracing::warn!(message = %n.message, "live executions overflowed the IB buffer; reconnecting to request the day's executions again");
                    return Ok(SessionEnd::Overflow { during_list: false });
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return Ok(SessionEnd::Disconnected(format!("order updates: {}", describe(&e)))),
                None => return Ok(SessionEnd::Disconnected("order updates ended".into())),
            },
            item = next_or_pending(&mut day_fills) => match item {
                Some(Ok(SubscriptionItem::Data(Executions::ExecutionData(d)))) => {
                    engine.fills.list_frame();
                    engine.on_execution(&d, source_of(&d)).await?
                }
                Some(Ok(SubscriptionItem::Data(Executions::CommissionReport(c)))) => {
                    engine.fills.list_frame();
                    engine.on_commission(&c).await?
                }
                Some(Ok(SubscriptionItem::Notice(n))) if n.code == ibapi::SUBSCRIPTION_LAG_CODE => {
                    // Executions of the day's list were dropped: only a new request with a
                    // buffer that fits brings them, so reconnect at once with a larger one.
                    engine.fills.list_overflowed(crate::ib::dropped_frames(&n.message));
                    let next_buffer = crate::ib::buffer_for(cfg.ib_buffer, engine.buffer_frames());
                    tracing::warn!(message = %n.message, next_buffer, "the day's executions overflowed the IB buffer; reconnecting at once with a larger buffer to request them again");
                    return Ok(SessionEnd::Overflow { during_list: true });
                }
                Some(Ok(SubscriptionItem::Notice(n))) => tracing::info!(code = n.code, message = %n.message, "executions notice"),
                Some(Err(e)) if crate::ib::connection_gone(&e) => return Ok(SessionEnd::Disconnected(format!("executions: {}", describe(&e)))),
                Some(Err(e)) => {
                    // Not asked again at once (IB would likely refuse again): live executions
                    // still come, and the next connect or lost delivery asks again.
                    tracing::warn!(error = %e, "IB refused the day's executions request; asking again at the next connect");
                    day_fills = None;
                }
                // execDetailsEnd: the day's list is in.
                None => {
                    engine.fills.list_ended();
                    day_fills = None;
                }
            },
            _ = fills_tick.tick() => engine.publish_due_executions().await?,
            notice = notices.next() => match notice {
                Some(n) => on_notice(engine, &n),
                None => return Ok(SessionEnd::Disconnected("IB client shut down".into())),
            },
            _ = tokio::time::sleep_until(retry_refused.unwrap_or_else(Instant::now).into()), if retry_refused.is_some() => {
                engine.retry_refused(client).await?;
            }
            _ = stats.tick() => engine.log_stats(),
        }
    }
}

/// Live (`execDetails` with request id -1) or an answer to `reqExecutions`: ibapi copies
/// an answer to the order update stream too, so the stream it came by does not tell.
fn source_of(d: &ExecutionData) -> ExecSource {
    if d.request_id == -1 {
        ExecSource::Live
    } else {
        ExecSource::Requested
    }
}

/// Asks IB for the day's executions (all clients' the connection may see).
async fn request_executions(client: &Client) -> Result<Subscription<Executions>, String> {
    crate::metrics::global()
        .execution_requests
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    client
        .executions(ExecutionFilter::default())
        .await
        .map_err(|e| format!("executions request failed: {}", describe(&e)))
}

/// The next item of the day's executions request, or never when there is none.
async fn next_or_pending(
    s: &mut Option<Subscription<Executions>>,
) -> Option<Result<SubscriptionItem<Executions>, ibapi::Error>> {
    match s {
        Some(s) => s.next().await,
        None => std::future::pending().await,
    }
}

fn on_notice(engine: &mut Engine, n: &ibapi::Notice) {
    match n.code {
        1100 => {
            tracing::warn!(code = n.code, message = %n.message, "IB lost connectivity to its servers; positions may be stale until 1101/1102")
        }
        1101 => {
            tracing::warn!(code = n.code, message = %n.message, "IB connectivity restored, market data lost: reconnecting to resubscribe and reconcile");
            engine.reconnect_wanted = Some("IB lost market data (1101)".into());
        }
        1102 => {
            tracing::info!(code = n.code, message = %n.message, "IB connectivity restored, data kept: reconciling positions");
            engine.resync_wanted = true;
        }
        ibapi::NOTICE_STREAM_LAG_CODE => {
            tracing::warn!(message = %n.message, "missed IB notices; reconnecting to reconcile");
            engine.reconnect_wanted = Some("missed IB notices".into());
        }
        code if (2100..=2199).contains(&code) => tracing::debug!(code, message = %n.message, "IB notice"),
        code => tracing::warn!(code, message = %n.message, "IB notice"),
    }
}
