//! Facts of the `ibapi` client that ingest and the queue worker share: how big a connection's
//! per-request buffers must be, what a lag notice says, and the heartbeat that proves a
//! connection answers.
//!
//! ibapi buffers each subscription or request in a lossy ring (a tokio broadcast channel) of
//! the client's `channel_capacity`: when its reader falls behind, the oldest frames are
//! evicted and the reader gets a notice with code [`ibapi::SUBSCRIPTION_LAG_CODE`] naming the
//! count. A position list arrives in one burst, so a ring smaller than the list can lose part
//! of it whenever the reader is slower than the socket.

use std::time::Duration;

use ibapi::Client;

/// The smallest ring ibapi is given.
pub const MIN_BUFFER: usize = 64;

/// The ring for lists of up to `expected` frames: the list plus a quarter (changes that arrive
/// while it is read) plus a little, and at least `floor`.
pub fn buffer_for(floor: usize, expected: usize) -> usize {
    floor
        .max(MIN_BUFFER)
        .max(expected.saturating_add(expected / 4).saturating_add(MIN_BUFFER))
}

/// The lost-frame count of ibapi's lag notice ("subscription fell behind; N frames dropped").
pub fn dropped_frames(message: &str) -> usize {
    message
        .split_whitespace()
        .find_map(|w| w.parse::<usize>().ok())
        .unwrap_or(0)
}

/// Whether `e` means the connection itself is gone (dropped, shut down, or refused), as
/// opposed to one request refused or misunderstood on a live connection.
pub fn connection_gone(e: &ibapi::Error) -> bool {
    e.is_connection_lost() || matches!(e, ibapi::Error::Shutdown | ibapi::Error::ConnectionFailed)
}

/// Why a heartbeat failed.
#[derive(Debug, thiserror::Error)]
pub enum HeartbeatError {
    /// No answer within the bound: the gateway is silent although the socket may be open.
    #[error("IB did not answer a heartbeat (reqCurrentTime) within {0:?}")]
    Silent(Duration),
    /// The connection is gone.
    #[error("heartbeat: {0}")]
    Lost(ibapi::Error),
}

/// Asks IB for its time (`reqCurrentTime`, one message): proof that the connection answers.
/// An answer that does not parse still proves it alive.
///
/// # Errors
/// [`HeartbeatError`].
pub async fn heartbeat(client: &Client, timeout: Duration) -> Result<(), HeartbeatError> {
    match tokio::time::timeout(timeout, client.server_time()).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) if connection_gone(&e) => Err(HeartbeatError::Lost(e)),
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "IB heartbeat answer not understood (the connection answers)");
            Ok(())
        }
        Err(_) => Err(HeartbeatError::Silent(timeout)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_hold_the_expected_list() {
        assert_eq!(buffer_for(16_384, 0), 16_384);
        assert_eq!(buffer_for(0, 0), MIN_BUFFER);
        let b = buffer_for(16_384, 100_000);
        assert!((125_000..126_000).contains(&b), "{b}");
        assert_eq!(buffer_for(64, 40), 40 + 10 + 64);
    }

    #[test]
    fn lag_notices_name_the_dropped_frames() {
        assert_eq!(
            dropped_frames("subscription fell behind; 2345 frames dropped (consumer lagged broadcast channel)"),
            2345
        );
        assert_eq!(dropped_frames("no number"), 0);
    }
}
