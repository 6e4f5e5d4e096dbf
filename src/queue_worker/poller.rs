//! Snapshot polls: `reqPositionsMulti` per account, read to its end marker, then cancelled.
//! A positions-multi request holds no streaming slot; each poll costs two messages (request
//! and cancel), paced by the client's rate limiter.
//!
//! An answer is taken as the account's book only when it is *whole*: every frame up to the end
//! marker arrived. ibapi buffers each request in a lossy ring; when the worker falls behind it
//! drops frames and says so with a lag notice, and such an answer fails the poll
//! ([`PollError::Lagged`]) instead of turning the dropped contracts into closes (issue 18 #2).
//! The worker then reconnects with a ring sized from what it saw.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use ibapi::accounts::types::AccountId;
use ibapi::accounts::{PositionMulti, PositionUpdateMulti};
use ibapi::subscriptions::SubscriptionItem;
use ibapi::{Client, RateLimiter};

/// One account's positions as a poll found them, with when it was asked and answered.
#[derive(Debug)]
pub struct AccountPoll {
    /// conId → position (absent = no position).
    pub positions: HashMap<i64, PositionMulti>,
    /// Wall clock (µs since the epoch) taken *before* the request was sent. The answer shows
    /// IB's book at some moment after this, so a POLL event is stamped with it: any change
    /// ingest observes later is ordered after the poll, and wins (a stale poll never
    /// overwrites a newer change; review issue 10 #10).
    pub requested_at: i64,
    /// When the end marker arrived.
    pub at: Instant,
}

/// Why a poll failed.
#[derive(Debug, thiserror::Error)]
pub enum PollError {
    /// The connection dropped; reconnect before the next batch.
    #[error("IB connection lost: {0}")]
    ConnectionLost(ibapi::Error),
    /// IB refused or failed the request.
    #[error("IB refused the positions poll: {0}")]
    Refused(ibapi::Error),
    /// No end marker within the poll timeout.
    #[error("no end of the position list within {0:?}")]
    Timeout(Duration),
    /// The answer lost frames (the worker fell behind ibapi's buffer): not a whole book.
    #[error(
        "the answer lost {dropped} of at least {seen} frames (buffer overflow); polled again with a larger buffer"
    )]
    Lagged {
        /// Frames that arrived plus those dropped: the answer held at least this many.
        seen: usize,
        /// Frames dropped.
        dropped: usize,
    },
}

impl PollError {
    /// Whether the connection is no longer to be trusted: lost, or silent (a poll answer
    /// overdue while the socket stays open), or its buffer too small.
    pub fn needs_reconnect(&self) -> bool {
        !matches!(self, PollError::Refused(_))
    }
}

impl From<ibapi::Error> for PollError {
    fn from(e: ibapi::Error) -> Self {
        if crate::ib::connection_gone(&e) {
            PollError::ConnectionLost(e)
        } else {
            PollError::Refused(e)
        }
    }
}

/// The smallest per-request buffer of the worker's connection, in frames.
pub const MIN_BUFFER: usize = 16_384;

/// Connects the worker's own client (no auto-reconnect: the worker reconnects at its next tick)
/// with `buffer` frames per request (see [`crate::ib::buffer_for`]).
///
/// # Errors
/// The `ibapi` connect error, or [`PollError::Timeout`].
pub async fn connect(
    address: &str,
    client_id: i32,
    buffer: usize,
    limiter: &RateLimiter,
    timeout: Duration,
) -> Result<Arc<Client>, PollError> {
    let connecting = Client::builder()
        .address(address)
        .client_id(client_id)
        .max_reconnect_attempts(0)
        .channel_capacity(buffer)
        .rate_limiter(limiter.clone())
        .connect();
    match tokio::time::timeout(timeout, connecting).await {
        Ok(Ok(c)) => Ok(Arc::new(c)),
        Ok(Err(e)) => Err(e.into()),
        Err(_) => Err(PollError::Timeout(timeout)),
    }
}

/// Polls one account: the full list up to its end marker, then cancels the request.
///
/// # Errors
/// [`PollError`].
pub async fn poll_account(client: &Client, account: &str, timeout: Duration) -> Result<AccountPoll, PollError> {
    let requested_at = crate::events::now_micros();
    let mut sub = client
        .positions_multi(Some(&AccountId(account.to_string())), None)
        .await?;
    let deadline = tokio::time::Instant::now() + timeout;
    let mut positions = HashMap::new();
    let outcome = loop {
        let item = match tokio::time::timeout_at(deadline, sub.next()).await {
            Ok(item) => item,
            Err(_) => break Err(PollError::Timeout(timeout)),
        };
        match item {
            Some(Ok(SubscriptionItem::Data(PositionUpdateMulti::Position(p)))) => {
                if p.account == account {
                    positions.insert(i64::from(p.contract.contract_id), p);
                }
            }
            Some(Ok(SubscriptionItem::Data(PositionUpdateMulti::PositionEnd))) => {
                break Ok(AccountPoll {
                    positions: std::mem::take(&mut positions),
                    requested_at,
                    at: Instant::now(),
                })
            }
            Some(Ok(SubscriptionItem::Notice(n))) if n.code == ibapi::SUBSCRIPTION_LAG_CODE => {
                let dropped = crate::ib::dropped_frames(&n.message);
                break Err(PollError::Lagged {
                    seen: positions.len() + dropped,
                    dropped,
                });
            }
            Some(Ok(SubscriptionItem::Notice(n))) => {
                tracing::debug!(account, code = n.code, message = %n.message, "positions-multi notice")
            }
            Some(Err(e)) => break Err(e.into()),
            None => break Err(PollError::ConnectionLost(ibapi::Error::ConnectionReset)),
        }
    };
    sub.cancel().await;
    outcome
}

/// Polls every account in `accounts` one after the other.
pub async fn poll_accounts(
    client: Arc<Client>,
    accounts: Vec<String>,
    timeout: Duration,
) -> HashMap<String, Result<AccountPoll, PollError>> {
    let mut out = HashMap::new();
    for account in accounts {
        let result = poll_account(&client, &account, timeout).await;
        // A lost, silent or overflowing connection: the next accounts wait for a new one.
        let lost = result.as_ref().is_err_and(PollError::needs_reconnect);
        out.insert(account, result);
        if lost {
            break;
        }
    }
    out
}
