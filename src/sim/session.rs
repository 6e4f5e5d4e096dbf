//! One client connection: the handshake, `StartApi`, then the request loop that
//! answers positions, positions-multi, PnL-single, executions, current-time and
//! managed-accounts requests, forwards position changes, executions and
//! notices, ticks PnL streams, and enforces the pacing limit and the stream cap.
//!
//! Requests the simulator does not implement are answered with error 321
//! ("Error validating request") naming the message id, on the request's id
//! when its tag 1 holds one, else on -1. A frame that cannot be read (bad
//! length, undecodable protobuf for an implemented request, no `StartApi`)
//! closes this connection only.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use prost::Message;
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::TcpStream;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::{broadcast, mpsc};
use tokio::time::{timeout, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::executions;
use super::frames::{
    error_frame, notice_text, position_frame, position_multi_frame, CLIENT_ID_IN_USE, MAX_TICKERS, PACING,
    RESTORED_DATA_LOST, VALIDATION,
};
use super::proto;
use super::state::{lock, Shared};
use super::truth::TruthExecution;
use super::wire::{self, incoming, outgoing, Frame, WireError};
use super::world::PositionChange;

/// How long a client may take to finish the handshake and send `StartApi`.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Frames buffered between the socket reader and the session loop.
const INBOUND_CAPACITY: usize = 1024;

/// Why a session ended abnormally.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The bytes were not the TWS protocol.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// Writing to the client failed.
    #[error("socket error: {0}")]
    Io(#[from] std::io::Error),
    /// A protobuf payload did not decode.
    #[error("malformed protobuf payload for message {id}: {source}")]
    Decode {
        /// Message id.
        id: i32,
        /// Decoder error.
        source: prost::DecodeError,
    },
    /// The first frame after the handshake was not `StartApi`.
    #[error("expected StartApi (71) after the handshake, got message {0}")]
    ExpectedStartApi(i32),
    /// The client took too long to handshake.
    #[error("handshake not finished within {HANDSHAKE_TIMEOUT:?}")]
    HandshakeTimeout,
    /// The session fell too far behind the world's position changes.
    #[error("session fell {0} position changes behind; disconnecting so the client resyncs")]
    Lagged(u64),
    /// The session fell too far behind the day's executions.
    #[error("session fell {0} executions behind; disconnecting so the client asks reqExecutions")]
    ExecutionsLagged(u64),
}

/// Serves one accepted connection until it closes, fails or `kill` fires; from `freeze` on,
/// it answers nothing (see [`Shared::freeze_connections`]).
pub async fn serve(
    shared: Arc<Shared>,
    socket: TcpStream,
    peer: SocketAddr,
    kill: CancellationToken,
    freeze: CancellationToken,
) {
    match start(shared, socket, &kill, &freeze).await {
        Ok(()) => debug!(%peer, "connection closed"),
        Err(e) => info!(%peer, error = %e, "connection closed"),
    }
}

async fn start(
    shared: Arc<Shared>,
    socket: TcpStream,
    kill: &CancellationToken,
    freeze: &CancellationToken,
) -> Result<(), SessionError> {
    socket.set_nodelay(true)?;
    let (mut reader, mut writer) = socket.into_split();
    let handshake = async {
        let version = wire::read_handshake(&mut reader).await?;
        writer
            .write_all(&wire::handshake_reply(version, chrono::Utc::now()))
            .await?;
        let frame = wire::read_frame(&mut reader).await?;
        Ok::<_, SessionError>(frame)
    };
    let frame = tokio::select! {
        _ = kill.cancelled() => return Ok(()),
        frame = timeout(HANDSHAKE_TIMEOUT, handshake) => frame.map_err(|_| SessionError::HandshakeTimeout)??,
    };
    if frame.id != outgoing::START_API || !frame.protobuf {
        return Err(SessionError::ExpectedStartApi(frame.id));
    }
    let start = decode::<proto::StartApiRequest>(&frame)?;
    let client_id = start.client_id.unwrap_or(0);
    if !lock(&shared.clients).claim(client_id) {
        info!(client_id, "refusing duplicate client id (326)");
        let text = "Unable to connect as the client id is already in use. Retry with a unique client id.";
        writer.write_all(&error_frame(-1, CLIENT_ID_IN_USE, text)).await?;
        writer.shutdown().await?;
        return Ok(());
    }
    // StartApi counts toward the client's message rate like any other message.
    lock(&shared.clients).record_message(client_id, Instant::now(), 0);
    let (events, execs) = {
        let world = lock(&shared.world);
        (world.subscribe(), world.execs().subscribe())
    };
    let notices = shared.notices.subscribe();
    let (tx, inbound) = mpsc::channel(INBOUND_CAPACITY);
    let reader_task = tokio::spawn(async move {
        loop {
            let frame = wire::read_frame(&mut reader).await;
            let failed = frame.is_err();
            if tx.send(frame).await.is_err() || failed {
                break;
            }
        }
    });
    let mut session = Session {
        shared: shared.clone(),
        client_id,
        out: writer,
        positions_from: None,
        multi: BTreeMap::new(),
        pnl: BTreeMap::new(),
        next_order_id: 1,
    };
    info!(client_id, "client connected");
    let streams = Streams {
        inbound,
        events,
        execs,
        notices,
    };
    let result = session.run(streams, kill, freeze).await;
    reader_task.abort();
    lock(&shared.clients).release(client_id);
    info!(client_id, "client disconnected");
    result
}

/// A frozen connection: reads (and ignores) the client's frames until it closes the socket
/// or `kill` fires; writes nothing.
async fn frozen(
    inbound: &mut mpsc::Receiver<Result<Frame, WireError>>,
    kill: &CancellationToken,
) -> Result<(), SessionError> {
    loop {
        tokio::select! {
            _ = kill.cancelled() => return Ok(()),
            frame = inbound.recv() => match frame {
                Some(Ok(_)) => {}
                Some(Err(_)) | None => return Ok(()),
            },
        }
    }
}

/// A positions-multi subscription: account filter and the world sequence its
/// snapshot was taken at.
#[derive(Debug)]
struct MultiSub {
    account: Option<String>,
    from_seq: u64,
}

/// A PnL-single stream.
#[derive(Debug)]
struct PnlSub {
    account: String,
    con_id: i32,
}

/// What a session listens to besides its socket writes.
struct Streams {
    inbound: mpsc::Receiver<Result<Frame, WireError>>,
    events: broadcast::Receiver<PositionChange>,
    execs: broadcast::Receiver<Arc<TruthExecution>>,
    notices: broadcast::Receiver<i32>,
}

struct Session {
    shared: Arc<Shared>,
    client_id: i32,
    out: OwnedWriteHalf,
    /// `Some(seq)` while `reqPositions` is active: changes after `seq` are sent.
    positions_from: Option<u64>,
    multi: BTreeMap<i32, MultiSub>,
    pnl: BTreeMap<i32, PnlSub>,
    next_order_id: i32,
}

impl Session {
    async fn run(
        &mut self,
        streams: Streams,
        kill: &CancellationToken,
        freeze: &CancellationToken,
    ) -> Result<(), SessionError> {
        let Streams {
            mut inbound,
            mut events,
            mut execs,
            mut notices,
        } = streams;
        self.send_hello().await?;
        let period = self.shared.config.pnl_tick.max(Duration::from_millis(10));
        let mut pnl_tick = tokio::time::interval(period);
        pnl_tick.set_missed_tick_behavior(MissedTickBehavior::Skip);
        loop {
            tokio::select! {
                biased;
                _ = kill.cancelled() => return Ok(()),
                _ = freeze.cancelled() => {
                    info!(client_id = self.client_id, "connection frozen: nothing answered or sent until the client closes it");
                    return frozen(&mut inbound, kill).await;
                }
                frame = inbound.recv() => match frame {
                    Some(Ok(frame)) => {
                        let idle = self.pnl.is_empty();
                        self.handle(frame).await?;
                        if idle && !self.pnl.is_empty() {
                            // The first stream just sent its first tick: the next is one period away.
                            pnl_tick.reset();
                        }
                    }
                    Some(Err(WireError::Io(e))) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
                    Some(Err(e)) => return Err(e.into()),
                    None => return Ok(()),
                },
                change = events.recv() => match change {
                    Ok(change) => self.on_change(&change).await?,
                    Err(RecvError::Lagged(n)) => return Err(SessionError::Lagged(n)),
                    Err(RecvError::Closed) => return Ok(()),
                },
                execution = execs.recv() => match execution {
                    Ok(execution) => self.on_execution(&execution).await?,
                    Err(RecvError::Lagged(n)) => return Err(SessionError::ExecutionsLagged(n)),
                    Err(RecvError::Closed) => return Ok(()),
                },
                code = notices.recv() => match code {
                    Ok(code) => self.on_notice(code).await?,
                    Err(RecvError::Lagged(n)) => warn!(client_id = self.client_id, "missed {n} notices"),
                    Err(RecvError::Closed) => return Ok(()),
                },
                _ = pnl_tick.tick(), if !self.pnl.is_empty() => self.send_pnl_ticks(None).await?,
            }
        }
    }

    /// What TWS sends after `StartApi`: next order id, accounts, farm status.
    async fn send_hello(&mut self) -> Result<(), SessionError> {
        let mut out = wire::encode(
            incoming::NEXT_VALID_ID,
            &proto::NextValidId {
                order_id: Some(self.next_order_id),
            },
        );
        out.extend(self.managed_accounts());
        for (code, text) in [
            (2104, "Market data farm connection is OK:usfarm"),
            (2106, "HMDS data farm connection is OK:ushmds"),
            (2158, "Sec-def data farm connection is OK:secdefnj"),
        ] {
            out.extend(error_frame(-1, code, text));
        }
        self.out.write_all(&out).await?;
        Ok(())
    }

    fn managed_accounts(&self) -> Vec<u8> {
        let accounts = lock(&self.shared.world).accounts().join(",");
        wire::encode(
            incoming::MANAGED_ACCOUNTS,
            &proto::ManagedAccounts {
                accounts_list: Some(accounts),
            },
        )
    }

    async fn handle(&mut self, frame: Frame) -> Result<(), SessionError> {
        let limit = self.shared.config.pacing_limit;
        let allowed = lock(&self.shared.clients).record_message(self.client_id, Instant::now(), limit);
        if !allowed && !outgoing::is_cancel(frame.id) {
            let id = request_id(&frame);
            debug!(client_id = self.client_id, message = frame.id, "pacing violation (100)");
            let text = format!(
                "Max rate of messages per second has been exceeded:max={limit} rec={}",
                limit + 1
            );
            return self.send(error_frame(id, PACING, &text)).await;
        }
        if !frame.protobuf {
            let text = format!(
                "Error validating request.-'text-framed message {} is not supported; use ibapi 5.x (protobuf)'",
                frame.id
            );
            return self.send(error_frame(-1, VALIDATION, &text)).await;
        }
        match frame.id {
            outgoing::START_API | outgoing::REQUEST_MARKET_DATA_TYPE | outgoing::CHANGE_SERVER_LOG => Ok(()),
            outgoing::REQUEST_IDS => {
                let next = proto::NextValidId {
                    order_id: Some(self.next_order_id),
                };
                self.send(wire::encode(incoming::NEXT_VALID_ID, &next)).await
            }
            outgoing::REQUEST_MANAGED_ACCOUNTS => self.send(self.managed_accounts()).await,
            outgoing::REQUEST_CURRENT_TIME => {
                let now = proto::CurrentTime {
                    current_time: Some(chrono::Utc::now().timestamp()),
                };
                self.send(wire::encode(incoming::CURRENT_TIME, &now)).await
            }
            outgoing::REQUEST_CURRENT_TIME_IN_MILLIS => {
                let now = proto::CurrentTimeInMillis {
                    current_time_in_millis: Some(chrono::Utc::now().timestamp_millis()),
                };
                self.send(wire::encode(incoming::CURRENT_TIME_IN_MILLIS, &now)).await
            }
            outgoing::REQUEST_POSITIONS => self.request_positions().await,
            outgoing::REQUEST_EXECUTIONS => {
                let request: proto::ExecutionRequest = decode(&frame)?;
                let master = self.shared.config.master_client_id;
                let answer =
                    executions::answer(lock(&self.shared.world).execs().day(), self.client_id, master, request);
                self.send(answer).await
            }
            outgoing::CANCEL_POSITIONS => {
                self.positions_from = None;
                Ok(())
            }
            outgoing::REQUEST_POSITIONS_MULTI => self.request_positions_multi(decode(&frame)?).await,
            outgoing::CANCEL_POSITIONS_MULTI => {
                let cancel: proto::CancelById = decode(&frame)?;
                self.multi.remove(&cancel.req_id.unwrap_or(-1));
                Ok(())
            }
            outgoing::REQUEST_PNL_SINGLE => self.request_pnl_single(decode(&frame)?).await,
            outgoing::CANCEL_PNL_SINGLE => {
                let cancel: proto::CancelById = decode(&frame)?;
                if self.pnl.remove(&cancel.req_id.unwrap_or(-1)).is_some() {
                    lock(&self.shared.clients).release_streams(self.client_id, 1);
                }
                Ok(())
            }
            other => {
                let id = request_id(&frame);
                let text = format!("Error validating request.-'possync sim does not implement message id {other}'");
                self.send(error_frame(id, VALIDATION, &text)).await
            }
        }
    }

    async fn request_positions(&mut self) -> Result<(), SessionError> {
        let (seq, positions) = {
            let world = lock(&self.shared.world);
            (world.seq(), world.positions(None))
        };
        let mut out = Vec::new();
        for p in &positions {
            out.extend(position_frame(&p.account, &p.contract, p.quantity, p.avg_cost));
        }
        out.extend(wire::encode(incoming::POSITION_END, &proto::PositionEnd {}));
        self.positions_from = Some(seq);
        self.send(out).await
    }

    async fn request_positions_multi(&mut self, request: proto::PositionsMultiRequest) -> Result<(), SessionError> {
        let req_id = request.req_id.unwrap_or(-1);
        let account = request.account.filter(|a| !a.is_empty() && a != "All");
        let snapshot = {
            let world = lock(&self.shared.world);
            match account.as_deref() {
                Some(a) if !world.has_account(a) => None,
                filter => Some((world.seq(), world.positions(filter))),
            }
        };
        let Some((seq, positions)) = snapshot else {
            let text = format!(
                "Error validating request.-'unknown account {}'",
                account.unwrap_or_default()
            );
            return self.send(error_frame(req_id, VALIDATION, &text)).await;
        };
        let mut out = Vec::new();
        for p in &positions {
            out.extend(position_multi_frame(
                req_id,
                &p.account,
                &p.contract,
                p.quantity,
                p.avg_cost,
            ));
        }
        out.extend(wire::encode(
            incoming::POSITION_MULTI_END,
            &proto::PositionMultiEnd { req_id: Some(req_id) },
        ));
        self.multi.insert(req_id, MultiSub { account, from_seq: seq });
        self.send(out).await
    }

    async fn request_pnl_single(&mut self, request: proto::PnLSingleRequest) -> Result<(), SessionError> {
        let req_id = request.req_id.unwrap_or(-1);
        let account = request.account.unwrap_or_default();
        let con_id = request.con_id.unwrap_or(0);
        if !lock(&self.shared.world).has_account(&account) {
            let text = format!("Error validating request.-'unknown account {account:?}'");
            return self.send(error_frame(req_id, VALIDATION, &text)).await;
        }
        if !self.pnl.contains_key(&req_id) {
            let cap = self.shared.config.max_streams;
            if !lock(&self.shared.clients).acquire_stream(self.client_id, cap) {
                debug!(client_id = self.client_id, req_id, "stream cap reached (101)");
                return self
                    .send(error_frame(
                        req_id,
                        MAX_TICKERS,
                        "Max number of tickers has been reached",
                    ))
                    .await;
            }
        }
        self.pnl.insert(req_id, PnlSub { account, con_id });
        self.send_pnl_ticks(Some(req_id)).await
    }

    /// Sends a PnL tick for every stream, or only for `only`.
    async fn send_pnl_ticks(&mut self, only: Option<i32>) -> Result<(), SessionError> {
        let mut out = Vec::new();
        {
            let world = lock(&self.shared.world);
            for (&req_id, sub) in self.pnl.iter().filter(|(id, _)| only.is_none_or(|o| o == **id)) {
                let f = world.pnl(&sub.account, sub.con_id);
                let tick = proto::PnLSingle {
                    req_id: Some(req_id),
                    position: Some(wire::decimal(f.position)),
                    daily_pn_l: Some(f.daily),
                    unrealized_pn_l: Some(f.unrealized),
                    realized_pn_l: Some(f.realized),
                    value: Some(f.value),
                };
                out.extend(wire::encode(incoming::PNL_SINGLE, &tick));
            }
        }
        self.send(out).await
    }

    async fn on_change(&mut self, change: &PositionChange) -> Result<(), SessionError> {
        let mut out = Vec::new();
        if self.positions_from.is_some_and(|from| change.seq > from) {
            out.extend(position_frame(
                &change.account,
                &change.contract,
                change.quantity,
                change.avg_cost,
            ));
        }
        for (&req_id, sub) in &self.multi {
            if change.seq > sub.from_seq && sub.account.as_deref().is_none_or(|a| a == change.account) {
                out.extend(position_multi_frame(
                    req_id,
                    &change.account,
                    &change.contract,
                    change.quantity,
                    change.avg_cost,
                ));
            }
        }
        self.send(out).await
    }

    /// A new execution: sent live (request id -1) when this client placed its
    /// order or is the master client id.
    async fn on_execution(&mut self, execution: &TruthExecution) -> Result<(), SessionError> {
        let master = self.shared.config.master_client_id;
        let Some(frames) = executions::live_frames(execution, self.client_id, master) else {
            return Ok(());
        };
        self.send(frames).await?;
        lock(&self.shared.world)
            .execs_mut()
            .mark_delivered(&execution.exec_id, self.client_id);
        Ok(())
    }

    async fn on_notice(&mut self, code: i32) -> Result<(), SessionError> {
        if code == RESTORED_DATA_LOST && !self.pnl.is_empty() {
            // Data lost: the real-time streams are gone and must be re-requested.
            let count = std::mem::take(&mut self.pnl).len();
            lock(&self.shared.clients).release_streams(self.client_id, count);
        }
        self.send(error_frame(-1, code, notice_text(code))).await
    }

    async fn send(&mut self, bytes: Vec<u8>) -> Result<(), SessionError> {
        if !bytes.is_empty() {
            self.out.write_all(&bytes).await?;
        }
        Ok(())
    }
}

fn decode<M: Message + Default>(frame: &Frame) -> Result<M, SessionError> {
    M::decode(frame.payload.as_slice()).map_err(|source| SessionError::Decode { id: frame.id, source })
}

/// The request id in tag 1 of a protobuf request, or -1.
fn request_id(frame: &Frame) -> i32 {
    if !frame.protobuf {
        return -1;
    }
    proto::IdEnvelope::decode(frame.payload.as_slice())
        .ok()
        .and_then(|e| e.id)
        .unwrap_or(-1)
}
