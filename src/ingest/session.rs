//! The IB side of ingest: connecting with backoff, and one connected session's event loop.
//!
//! `ibapi`'s own auto-reconnect is switched off (`max_reconnect_attempts(0)`): when the socket
//! drops, the client fails every subscription with `ConnectionReset` and shuts down, and this
//! module reconnects with its own backoff (so 326 "client id in use" while IB still holds the
//! dead session, and a gateway refusing connections during its nightly restart, are simply
//! retried), then resubscribes positions and PnL streams and reconciles after PositionEnd.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use ibapi::accounts::PositionUpdate;
use ibapi::subscriptions::{NoticeStream, SubscriptionItem};
use ibapi::{Client, RateLimiter};
use tokio::sync::mpsc;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use super::backoff::Backoff;
use super::book::{Book, Held, PosKey};
use super::engine::Engine;
use super::{IngestConfig, IngestError};
use crate::events::RegistryEvent;

/// Why a session ended.
pub(crate) enum SessionEnd {
    /// Shutdown was requested.
    Shutdown,
    /// The connection is gone; reconnect.
    Disconnected(String),
}

/// The smallest per-subscription IB buffer: a position list arrives in one burst.
const MIN_IB_BUFFER: usize = 64;

/// Connects to IB, retrying with `backoff` (kept across sessions) until it works or `shutdown`.
pub(crate) async fn connect(
    cfg: &IngestConfig,
    limiter: &RateLimiter,
    backoff: &mut Backoff,
    shutdown: &CancellationToken,
) -> Option<(Arc<Client>, NoticeStream)> {
    let address = cfg.ib_address();
    let mut attempt = 1u64;
    loop {
        let delay = backoff.next_delay();
        let connecting = Client::builder()
            .address(address.clone())
            .client_id(cfg.client_id)
            .max_reconnect_attempts(0)
            .channel_capacity(cfg.ib_buffer.max(MIN_IB_BUFFER))
            .rate_limiter(limiter.clone())
            .connect_with_notice_stream();
        let outcome = tokio::select! {
            _ = shutdown.cancelled() => return None,
            r = tokio::time::timeout(Duration::from_secs(15), connecting) => r,
        };
        match outcome {
            Ok(Ok((client, notices))) => {
                tracing::info!(%address, client_id = cfg.client_id, server_version = client.server_version(), accounts = ?client.handshake_managed_accounts(), "connected to IB");
                return Some((Arc::new(client), notices));
            }
            Ok(Err(ibapi::Error::ClientIdInUse { .. })) => {
                tracing::warn!(%address, client_id = cfg.client_id, attempt, retry_in = ?delay, "IB says client id in use (326); if the old session is still closing this clears by itself, otherwise give ingest another --client-id");
            }
            Ok(Err(e)) => {
                tracing::warn!(%address, attempt, retry_in = ?delay, error = %e, "cannot connect to IB; retrying")
            }
            Err(_) => tracing::warn!(%address, attempt, retry_in = ?delay, "IB handshake timed out; retrying"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return None,
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
    client: &Arc<Client>,
    mut notices: NoticeStream,
    registry: &mut mpsc::Receiver<RegistryEvent>,
    shutdown: &CancellationToken,
) -> Result<SessionEnd, IngestError> {
    let mut positions = match client.positions().await {
        Ok(p) => p,
        Err(e) => {
            return Ok(SessionEnd::Disconnected(format!(
                "positions request failed: {}",
                describe(&e)
            )))
        }
    };
    // Some(book) while the position list is being received (until PositionEnd).
    let mut snapshot: Option<Book> = Some(Book::new());
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
        }
        let retry_refused = engine.next_refused_retry();
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => return Ok(SessionEnd::Shutdown),
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
                            engine.sync(client, book).await?;
                        }
                    }
                    Some(Ok(SubscriptionItem::Notice(n))) if n.code == ibapi::SUBSCRIPTION_LAG_CODE => {
                        // Frames were dropped (possibly a PositionEnd): only a fresh connection
                        // gives a list that is known to be whole.
                        tracing::warn!(message = %n.message, "position updates overflowed the IB buffer while Kafka was slow; reconnecting to reconcile (raise --ib-buffer to avoid)");
                        engine.reconnect_wanted = Some("IB buffer overflow".into());
                    }
                    Some(Ok(SubscriptionItem::Notice(n))) => tracing::info!(code = n.code, message = %n.message, "positions notice"),
                    Some(Err(e)) => return Ok(SessionEnd::Disconnected(format!("positions stream: {}", describe(&e)))),
                    None => return Ok(SessionEnd::Disconnected("positions stream ended".into())),
                }
            }
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
