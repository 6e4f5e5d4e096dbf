//! The TWS socket framing: the `API\0` handshake, length-prefixed frames and
//! message ids, as `ibapi` 5.5 speaks them (`src/connection/common.rs`,
//! `src/transport/async/io.rs`, `src/messages.rs`).
//!
//! Every frame after the handshake is `[u32 BE length][u32 BE message id][payload]`.
//! A message id above [`PROTOBUF_OFFSET`] means the payload is protobuf for
//! message `id - 200`; otherwise it is NUL-separated text (which `ibapi` 5.x no
//! longer sends for anything the simulator implements).

use tokio::io::{AsyncRead, AsyncReadExt};

/// Offset added to a message id when its payload is protobuf.
pub const PROTOBUF_OFFSET: i32 = 200;
/// Largest frame body accepted, as in IB's own clients (`0x00FF_FFFF`).
pub const MAX_FRAME_LEN: usize = 0x00FF_FFFF;
/// Smallest frame body: the 4-byte message id.
pub const MIN_FRAME_LEN: usize = 4;
/// Lowest server version `ibapi` 5.x accepts (protobuf everywhere).
pub const MIN_SERVER_VERSION: i32 = 213;
/// Highest server version the simulator claims.
pub const MAX_SERVER_VERSION: i32 = 226;

/// Message ids the client sends (`OutgoingMessages` in `ibapi`).
pub mod outgoing {
    /// `ChangeServerLog`.
    pub const CHANGE_SERVER_LOG: i32 = 14;
    /// `RequestExecutions`.
    pub const REQUEST_EXECUTIONS: i32 = 7;
    /// `RequestIds`.
    pub const REQUEST_IDS: i32 = 8;
    /// `RequestManagedAccounts`.
    pub const REQUEST_MANAGED_ACCOUNTS: i32 = 17;
    /// `RequestCurrentTime`.
    pub const REQUEST_CURRENT_TIME: i32 = 49;
    /// `RequestMarketDataType`.
    pub const REQUEST_MARKET_DATA_TYPE: i32 = 59;
    /// `RequestPositions`.
    pub const REQUEST_POSITIONS: i32 = 61;
    /// `CancelPositions`.
    pub const CANCEL_POSITIONS: i32 = 64;
    /// `StartApi`.
    pub const START_API: i32 = 71;
    /// `RequestPositionsMulti`.
    pub const REQUEST_POSITIONS_MULTI: i32 = 74;
    /// `CancelPositionsMulti`.
    pub const CANCEL_POSITIONS_MULTI: i32 = 75;
    /// `RequestPnLSingle`.
    pub const REQUEST_PNL_SINGLE: i32 = 94;
    /// `CancelPnLSingle`.
    pub const CANCEL_PNL_SINGLE: i32 = 95;
    /// `RequestCurrentTimeInMillis`.
    pub const REQUEST_CURRENT_TIME_IN_MILLIS: i32 = 105;

    /// Whether `id` stops something (IB's `Cancel*` family and friends), so the
    /// pacing limit lets it through.
    pub fn is_cancel(id: i32) -> bool {
        matches!(
            id,
            2 | 4
                | 11
                | 13
                | 23
                | 25
                | 51
                | 53
                | 56
                | 57
                | 58
                | 63
                | 64
                | 70
                | 75
                | 77
                | 89
                | 90
                | 93
                | 95
                | 98
                | 101
                | 103
                | 106
                | 107
        )
    }
}

/// Message ids the server sends (`IncomingMessages` in `ibapi`).
pub mod incoming {
    /// `Error` (errors and notices).
    pub const ERROR: i32 = 4;
    /// `NextValidId`.
    pub const NEXT_VALID_ID: i32 = 9;
    /// `ExecutionDetails` (`execDetails`).
    pub const EXECUTION_DATA: i32 = 11;
    /// `ManagedAccounts`.
    pub const MANAGED_ACCOUNTS: i32 = 15;
    /// `CurrentTime`.
    pub const CURRENT_TIME: i32 = 49;
    /// `Position`.
    pub const POSITION: i32 = 61;
    /// `PositionEnd`.
    pub const POSITION_END: i32 = 62;
    /// `PositionMulti`.
    pub const POSITION_MULTI: i32 = 71;
    /// `PositionMultiEnd`.
    pub const POSITION_MULTI_END: i32 = 72;
    /// `ExecutionDetailsEnd`.
    pub const EXECUTION_DATA_END: i32 = 55;
    /// `CommissionAndFeesReport` (`commissionReport`).
    pub const COMMISSION_REPORT: i32 = 59;
    /// `PnLSingle`.
    pub const PNL_SINGLE: i32 = 95;
    /// `CurrentTimeInMillis`.
    pub const CURRENT_TIME_IN_MILLIS: i32 = 109;
}

/// Why a connection's bytes could not be read as the TWS protocol.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The socket failed or closed.
    #[error("socket error: {0}")]
    Io(#[from] std::io::Error),
    /// The connection did not open with `API\0`.
    #[error("handshake did not start with API\\0 (got {0:?}); is this a TWS API client?")]
    BadMagic([u8; 4]),
    /// The version range was not `v<min>..<max>`.
    #[error("unreadable handshake version range {0:?}; expected v<min>..<max>")]
    BadVersion(String),
    /// The client's versions and ours do not overlap.
    #[error("client supports server versions {min}..{max}, the simulator {MIN_SERVER_VERSION}..{MAX_SERVER_VERSION}; use ibapi 5.x")]
    NoCommonVersion {
        /// Client's minimum.
        min: i32,
        /// Client's maximum.
        max: i32,
    },
    /// A length prefix outside `MIN_FRAME_LEN..=MAX_FRAME_LEN`.
    #[error("frame length {0} outside {MIN_FRAME_LEN}..={MAX_FRAME_LEN}; the stream is desynchronized")]
    BadLength(usize),
}

/// One frame read from a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// The message id with the protobuf offset removed.
    pub id: i32,
    /// Whether the payload is protobuf (`true`) or NUL-separated text.
    pub protobuf: bool,
    /// The payload after the message id.
    pub payload: Vec<u8>,
}

/// Reads the client's handshake and picks the server version to answer with.
///
/// # Errors
/// [`WireError`] when the bytes are not a TWS API handshake or share no version.
pub async fn read_handshake<R: AsyncRead + Unpin>(reader: &mut R) -> Result<i32, WireError> {
    let mut magic = [0u8; 4];
    reader.read_exact(&mut magic).await?;
    if &magic != b"API\0" {
        return Err(WireError::BadMagic(magic));
    }
    let len = reader.read_u32().await? as usize;
    if len == 0 || len > 64 {
        return Err(WireError::BadLength(len));
    }
    let mut text = vec![0u8; len];
    reader.read_exact(&mut text).await?;
    let text = String::from_utf8_lossy(&text).into_owned();
    let (min, max) = parse_version_range(&text)?;
    if max < MIN_SERVER_VERSION || min > MAX_SERVER_VERSION {
        return Err(WireError::NoCommonVersion { min, max });
    }
    Ok(max.min(MAX_SERVER_VERSION))
}

/// Parses `v213..226` (or a single `v213`).
fn parse_version_range(text: &str) -> Result<(i32, i32), WireError> {
    let bad = || WireError::BadVersion(text.to_string());
    let body = text.trim_end_matches('\0').strip_prefix('v').ok_or_else(bad)?;
    let (min, max) = body.split_once("..").unwrap_or((body, body));
    let min = min.trim().parse().map_err(|_| bad())?;
    let max = max.trim().parse().map_err(|_| bad())?;
    Ok((min, max))
}

/// The handshake answer: a frame holding `<version>\0<yyyymmdd hh:mm:ss TZ>\0`.
pub fn handshake_reply(version: i32, now: chrono::DateTime<chrono::Utc>) -> Vec<u8> {
    let text = format!("{version}\0{} UTC\0", now.format("%Y%m%d %H:%M:%S"));
    length_prefixed(text.as_bytes())
}

/// Reads one frame.
///
/// # Errors
/// [`WireError::BadLength`] for a length prefix no TWS frame can have,
/// [`WireError::Io`] when the socket fails or closes.
pub async fn read_frame<R: AsyncRead + Unpin>(reader: &mut R) -> Result<Frame, WireError> {
    let len = reader.read_u32().await? as usize;
    if !(MIN_FRAME_LEN..=MAX_FRAME_LEN).contains(&len) {
        return Err(WireError::BadLength(len));
    }
    let mut body = vec![0u8; len];
    reader.read_exact(&mut body).await?;
    let raw_id = i32::from_be_bytes([body[0], body[1], body[2], body[3]]);
    body.drain(..4);
    let protobuf = raw_id > PROTOBUF_OFFSET;
    let id = if protobuf { raw_id - PROTOBUF_OFFSET } else { raw_id };
    Ok(Frame {
        id,
        protobuf,
        payload: body,
    })
}

/// Encodes a protobuf message as a complete frame for message `id`.
pub fn encode<M: prost::Message>(id: i32, message: &M) -> Vec<u8> {
    let body_len = 4 + message.encoded_len();
    let mut out = Vec::with_capacity(4 + body_len);
    out.extend_from_slice(&(body_len as u32).to_be_bytes());
    out.extend_from_slice(&(id + PROTOBUF_OFFSET).to_be_bytes());
    message.encode_raw(&mut out);
    out
}

/// Prefixes `data` with its 4-byte big-endian length.
pub fn length_prefixed(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + data.len());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
    out
}

/// Formats a quantity the way IB sends decimals: `"3"`, `"2.5"`, `"-10"`.
pub fn decimal(value: f64) -> String {
    if value == 0.0 {
        // Also turns -0.0 into "0".
        return "0".to_string();
    }
    format!("{value}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_version_ranges() -> Result<(), WireError> {
        assert_eq!(parse_version_range("v213..226")?, (213, 226));
        assert_eq!(parse_version_range("v100")?, (100, 100));
        assert!(parse_version_range("213..226").is_err());
        Ok(())
    }

    #[tokio::test]
    async fn frame_round_trip() -> Result<(), WireError> {
        let frame = encode(
            incoming::NEXT_VALID_ID,
            &super::super::proto::NextValidId { order_id: Some(7) },
        );
        let read = read_frame(&mut frame.as_slice()).await?;
        assert_eq!(read.id, incoming::NEXT_VALID_ID);
        assert!(read.protobuf);
        Ok(())
    }

    #[tokio::test]
    async fn rejects_short_frames() {
        let bytes = [0u8, 0, 0, 2, 1, 2];
        assert!(matches!(
            read_frame(&mut bytes.as_slice()).await,
            Err(WireError::BadLength(2))
        ));
    }

    #[test]
    fn decimals_look_like_ib() {
        assert_eq!(decimal(3.0), "3");
        assert_eq!(decimal(-2.5), "-2.5");
        assert_eq!(decimal(-0.0), "0");
    }
}
