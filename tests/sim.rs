//! The IB Gateway simulator driven by the real `ibapi` 5.5 async client: every
//! message and fault of issue 3, each against a simulator started in-process on
//! an ephemeral port.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use anyhow::{anyhow, bail, ensure, Context};
use futures::StreamExt;
use ibapi::accounts::types::{AccountId, ContractId};
use ibapi::accounts::{PnLSingle, PositionUpdate, PositionUpdateMulti};
use ibapi::subscriptions::{NoticeStream, Subscription, SubscriptionItem};
use ibapi::Client;
use possync::sim::{start, SimConfig, SimHandle, Truth, TruthPosition};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{timeout, Instant};

#[path = "sim/executions.rs"]
mod executions;

type TestResult = anyhow::Result<()>;

/// Upper bound for anything that should happen promptly.
const DEADLINE: Duration = Duration::from_secs(10);
/// Upper bound for an `ibapi` reconnect (its backoff starts at 1 s, then 2 s, 3 s).
const RECONNECT_DEADLINE: Duration = Duration::from_secs(20);

/// A quiet world: no random fills, frozen prices.
fn quiet() -> SimConfig {
    SimConfig {
        price_tick: Duration::ZERO,
        ..SimConfig::for_tests()
    }
}

async fn connect(sim: &SimHandle, client_id: i32) -> anyhow::Result<Client> {
    let client = timeout(DEADLINE, Client::connect(&sim.addr().to_string(), client_id))
        .await
        .context("connect timed out")??;
    Ok(client)
}

async fn connect_with_notices(sim: &SimHandle, client_id: i32) -> anyhow::Result<(Client, NoticeStream)> {
    let connecting = Client::builder()
        .address(sim.addr().to_string())
        .client_id(client_id)
        .connect_with_notice_stream();
    Ok(timeout(DEADLINE, connecting).await.context("connect timed out")??)
}

/// The next data item of `subscription`, skipping notices.
async fn next_data<T, S>(subscription: &mut S) -> anyhow::Result<T>
where
    S: futures::Stream<Item = Result<SubscriptionItem<T>, ibapi::Error>> + Unpin,
{
    let deadline = Instant::now() + DEADLINE;
    loop {
        let item = tokio::time::timeout_at(deadline, subscription.next())
            .await
            .context("no item before the deadline")?
            .ok_or_else(|| anyhow!("subscription ended"))?;
        match item? {
            SubscriptionItem::Data(data) => return Ok(data),
            SubscriptionItem::Notice(_) => continue,
        }
    }
}

/// The next error `subscription` yields (data items are skipped).
async fn next_error<T, S>(subscription: &mut S) -> anyhow::Result<ibapi::Error>
where
    S: futures::Stream<Item = Result<SubscriptionItem<T>, ibapi::Error>> + Unpin,
{
    let deadline = Instant::now() + DEADLINE;
    loop {
        let item = tokio::time::timeout_at(deadline, subscription.next())
            .await
            .context("no error before the deadline")?
            .ok_or_else(|| anyhow!("subscription ended without an error"))?;
        if let Err(e) = item {
            return Ok(e);
        }
    }
}

/// The IB code of a TWS error, if it is one.
fn code(error: &ibapi::Error) -> Option<i32> {
    match error {
        ibapi::Error::Notice(notice) => Some(notice.code),
        _ => None,
    }
}

/// Waits up to `within` for a notice with `code` on `notices`.
async fn notice_with_code(notices: &mut NoticeStream, code: i32, within: Duration) -> TestResult {
    let deadline = Instant::now() + within;
    loop {
        let notice = tokio::time::timeout_at(deadline, notices.next())
            .await
            .with_context(|| format!("no notice {code} within {within:?}"))?
            .ok_or_else(|| anyhow!("notice stream ended"))?;
        if notice.code == code {
            return Ok(());
        }
    }
}

/// Polls `condition` on the simulator's truth until it holds or the deadline passes.
async fn wait_for_truth(
    sim: &SimHandle,
    what: &str,
    mut condition: impl FnMut(&Truth) -> bool,
) -> anyhow::Result<Truth> {
    wait_until(what, || {
        let truth = sim.truth();
        std::future::ready(condition(&truth).then_some(truth))
    })
    .await
}

/// Polls `probe` every 20 ms until it yields a value or the deadline passes.
async fn wait_until<T, F: Future<Output = Option<T>>>(what: &str, mut probe: impl FnMut() -> F) -> anyhow::Result<T> {
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Some(value) = probe().await {
            return Ok(value);
        }
        if Instant::now() >= deadline {
            bail!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Reads a positions subscription up to `PositionEnd`.
async fn position_list(
    subscription: &mut Subscription<PositionUpdate>,
) -> anyhow::Result<BTreeMap<(String, i32), ibapi::accounts::Position>> {
    let mut positions = BTreeMap::new();
    loop {
        match next_data(subscription).await? {
            PositionUpdate::Position(p) => {
                positions.insert((p.account.clone(), p.contract.contract_id), p);
            }
            PositionUpdate::PositionEnd => return Ok(positions),
        }
    }
}

/// Asserts an `ibapi` contract carries every field of the simulator's.
fn assert_contract(got: &ibapi::contracts::Contract, want: &possync::sim::SimContract) -> TestResult {
    ensure!(
        got.contract_id == want.con_id,
        "conId {} != {}",
        got.contract_id,
        want.con_id
    );
    ensure!(got.symbol.0 == want.symbol, "symbol of {}", want.con_id);
    ensure!(
        got.security_type.as_str() == want.sec_type,
        "secType of {}",
        want.con_id
    );
    ensure!(
        got.last_trade_date_or_contract_month == want.expiry,
        "expiry of {}",
        want.con_id
    );
    ensure!(got.strike == want.strike, "strike of {}", want.con_id);
    ensure!(
        got.right.map(|r| r.as_str()).unwrap_or("") == want.right,
        "right of {}",
        want.con_id
    );
    ensure!(
        got.multiplier == want.multiplier_text(),
        "multiplier {:?} of {}",
        got.multiplier,
        want.con_id
    );
    ensure!(
        got.exchange.0 == want.exchange,
        "exchange {} of {}",
        got.exchange.0,
        want.con_id
    );
    ensure!(got.currency.0 == "USD", "currency of {}", want.con_id);
    ensure!(got.local_symbol == want.local_symbol, "localSymbol of {}", want.con_id);
    ensure!(
        got.trading_class == want.trading_class,
        "tradingClass of {}",
        want.con_id
    );
    Ok(())
}

fn assert_position(got: &ibapi::accounts::Position, want: &TruthPosition) -> TestResult {
    ensure!(got.account == want.account, "account");
    ensure!(
        got.position == want.quantity,
        "quantity {} != {}",
        got.position,
        want.quantity
    );
    ensure!(
        got.average_cost == want.avg_cost,
        "avgCost {} != {}",
        got.average_cost,
        want.avg_cost
    );
    assert_contract(&got.contract, &want.contract)
}

#[tokio::test]
async fn connect_gives_accounts_next_id_and_server_time() -> TestResult {
    let sim = start(quiet()).await?;
    let client = connect(&sim, 100).await?;

    assert_eq!(client.server_version(), 226);
    let accounts = sim.accounts();
    assert_eq!(accounts, ["DU0000001", "DU0000002", "DU0000003"]);
    assert_eq!(client.handshake_managed_accounts(), accounts.as_slice());
    assert_eq!(client.next_order_id(), 1);
    assert_eq!(timeout(DEADLINE, client.managed_accounts()).await??, accounts);

    let now = chrono::Utc::now().timestamp();
    let server_time = timeout(DEADLINE, client.server_time()).await??;
    assert!(
        (server_time.unix_timestamp() - now).abs() <= 2,
        "server time {server_time} vs {now}"
    );
    let millis = timeout(DEADLINE, client.server_time_millis()).await??;
    assert!((millis.unix_timestamp() - now).abs() <= 2);
    assert!(client.connection_time().is_some(), "handshake time must parse");

    let truth = sim.truth();
    assert_eq!(truth.connected_clients(), [100]);
    Ok(())
}

#[tokio::test]
async fn many_clients_with_distinct_ids_work_at_once() -> TestResult {
    let sim = start(quiet()).await?;
    let clients = futures::future::try_join_all((1..=12).map(|id| connect(&sim, id))).await?;
    let times = futures::future::try_join_all(clients.iter().map(|c| c.server_time())).await?;
    assert_eq!(times.len(), 12);
    assert_eq!(sim.truth().connected_clients(), (1..=12).collect::<Vec<_>>());
    Ok(())
}

#[tokio::test]
async fn positions_list_matches_truth_with_contract_details() -> TestResult {
    let sim = start(quiet()).await?;
    let client = connect(&sim, 1).await?;
    let mut positions = client.positions().await?;
    let got = position_list(&mut positions).await?;

    let truth = sim.truth();
    assert_eq!(truth.positions.len(), 40);
    assert_eq!(got.len(), truth.positions.len());
    for want in &truth.positions {
        let p = got
            .get(&(want.account.clone(), want.contract.con_id))
            .with_context(|| format!("missing {} {}", want.account, want.contract.con_id))?;
        assert_position(p, want)?;
    }
    let option = truth
        .positions
        .iter()
        .find(|p| p.contract.is_option())
        .context("an option position")?;
    let p = &got[&(option.account.clone(), option.contract.con_id)];
    assert_eq!(p.contract.multiplier, "100");
    assert_eq!(
        p.contract.local_symbol.len(),
        21,
        "OCC symbol {}",
        p.contract.local_symbol
    );
    Ok(())
}

#[tokio::test]
async fn live_updates_follow_fills_and_close_with_zero() -> TestResult {
    let sim = start(quiet()).await?;
    let client = connect(&sim, 1).await?;
    let mut positions = client.positions().await?;
    position_list(&mut positions).await?;

    let held = sim.truth().positions[0].clone();
    let after = sim.apply_fill(&held.account, held.contract.con_id, 2.0)?;
    let PositionUpdate::Position(update) = next_data(&mut positions).await? else {
        bail!("expected a position update");
    };
    assert_eq!(update.position, held.quantity + 2.0);
    assert_position(&update, &after)?;
    assert_eq!(sim.truth().position(&held.account, held.contract.con_id), Some(&after));

    sim.apply_fill(&held.account, held.contract.con_id, -(held.quantity + 2.0))?;
    let PositionUpdate::Position(closed) = next_data(&mut positions).await? else {
        bail!("expected a position update");
    };
    assert_eq!(
        (closed.contract.contract_id, closed.position),
        (held.contract.con_id, 0.0)
    );
    assert_eq!(sim.truth().position(&held.account, held.contract.con_id), None);

    // A new position opens on a contract nobody holds.
    let truth = sim.truth();
    let fresh = sim
        .contracts()
        .into_iter()
        .find(|c| c.is_option() && truth.position("DU0000003", c.con_id).is_none())
        .context("an unheld option")?;
    let opened = sim.set_position("DU0000003", fresh.con_id, -3.0, 412.5)?;
    let PositionUpdate::Position(update) = next_data(&mut positions).await? else {
        bail!("expected a position update");
    };
    assert_position(&update, &opened)?;
    assert_eq!((update.position, update.average_cost), (-3.0, 412.5));

    // A second request re-sends the whole list, without the closed position.
    let mut again = client.positions().await?;
    let list = position_list(&mut again).await?;
    assert_eq!(list.len(), sim.truth().positions.len());
    assert!(!list.contains_key(&(held.account.clone(), held.contract.con_id)));
    Ok(())
}

#[tokio::test]
async fn positions_multi_lists_one_account_with_end_marker_then_updates() -> TestResult {
    let sim = start(quiet()).await?;
    let client = connect(&sim, 1).await?;
    let account = AccountId::from("DU0000002");
    let mut multi = client.positions_multi(Some(&account), None).await?;
    let mut got = Vec::new();
    while let PositionUpdateMulti::Position(p) = next_data(&mut multi).await? {
        got.push(p);
    }
    let truth = sim.truth();
    let want: Vec<&TruthPosition> = truth.positions.iter().filter(|p| p.account == "DU0000002").collect();
    assert!(!want.is_empty());
    assert_eq!(got.len(), want.len());
    for (p, w) in got.iter().zip(&want) {
        assert_eq!(p.account, "DU0000002");
        assert_eq!((p.position, p.average_cost), (w.quantity, w.avg_cost));
        assert_contract(&p.contract, &w.contract)?;
    }

    // A change in another account is not sent; one in this account is.
    let other = truth
        .positions
        .iter()
        .find(|p| p.account != "DU0000002")
        .context("another account")?;
    sim.apply_fill(&other.account, other.contract.con_id, 1.0)?;
    sim.apply_fill("DU0000002", want[0].contract.con_id, 1.0)?;
    let PositionUpdateMulti::Position(update) = next_data(&mut multi).await? else {
        bail!("expected a position update");
    };
    assert_eq!(
        (update.account.as_str(), update.contract.contract_id),
        ("DU0000002", want[0].contract.con_id)
    );
    assert_eq!(update.position, want[0].quantity + 1.0);

    let unknown = AccountId::from("U9999999");
    let mut refused = client.positions_multi(Some(&unknown), None).await?;
    assert_eq!(code(&next_error(&mut refused).await?), Some(321));
    Ok(())
}

#[tokio::test]
async fn pnl_single_ticks_with_position_and_pnl() -> TestResult {
    let sim = start(SimConfig {
        pnl_tick: Duration::from_millis(100),
        ..quiet()
    })
    .await?;
    let client = connect(&sim, 1).await?;
    let held = sim
        .truth()
        .positions
        .iter()
        .find(|p| p.contract.is_option())
        .cloned()
        .context("an option")?;
    let mut pnl = client
        .pnl_single(&AccountId(held.account.clone()), ContractId(held.contract.con_id), None)
        .await?;

    let first: PnLSingle = next_data(&mut pnl).await?;
    assert_eq!(first.position, held.quantity);
    assert!(
        (first.value - held.market_value).abs() < 1e-6,
        "{} vs {}",
        first.value,
        held.market_value
    );
    assert!((first.unrealized_pnl - (first.value - held.quantity * held.avg_cost)).abs() < 1e-6);
    assert_eq!(first.daily_pnl, 0.0, "prices are frozen since start");
    let truth = wait_for_truth(&sim, "one stream", |t| t.streams_total == 1).await?;
    assert_eq!(truth.client(1).map(|c| c.streams), Some(1));

    // Ticks keep coming about every pnl_tick, and follow price moves.
    let started = Instant::now();
    next_data(&mut pnl).await?;
    next_data(&mut pnl).await?;
    assert!(
        started.elapsed() >= Duration::from_millis(100),
        "two ticks took {:?}",
        started.elapsed()
    );
    let new_value = wait_until("a price move", || {
        sim.step_prices();
        let value = sim
            .truth()
            .position(&held.account, held.contract.con_id)
            .map(|p| p.market_value);
        std::future::ready(value.filter(|v| *v != held.market_value))
    })
    .await?;
    let tick = timeout(DEADLINE, async {
        loop {
            let tick: PnLSingle = next_data(&mut pnl).await?;
            if (tick.value - new_value).abs() < 1e-9 {
                return anyhow::Ok(tick);
            }
        }
    })
    .await??;
    assert!(
        (tick.daily_pnl - (new_value - held.market_value)).abs() < 1e-6,
        "daily {}",
        tick.daily_pnl
    );
    assert!((tick.unrealized_pnl - (new_value - held.quantity * held.avg_cost)).abs() < 1e-6);
    assert_eq!(tick.realized_pnl, 0.0);

    drop(pnl);
    wait_for_truth(&sim, "the stream released after cancel", |t| t.streams_total == 0).await?;
    assert_eq!(sim.truth().client(1).map(|c| c.max_streams), Some(1));
    Ok(())
}

#[tokio::test]
async fn stream_cap_refuses_with_101() -> TestResult {
    let sim = start(SimConfig {
        max_streams: 2,
        ..quiet()
    })
    .await?;
    let client = connect(&sim, 1).await?;
    let held = sim.truth().positions;
    let mut open = Vec::new();
    for p in &held[..2] {
        let mut s = client
            .pnl_single(&AccountId(p.account.clone()), ContractId(p.contract.con_id), None)
            .await?;
        next_data(&mut s).await?;
        open.push(s);
    }
    let p = &held[2];
    let mut third = client
        .pnl_single(&AccountId(p.account.clone()), ContractId(p.contract.con_id), None)
        .await?;
    let error = next_error(&mut third).await?;
    assert_eq!(code(&error), Some(101), "{error}");

    let truth = sim.truth();
    assert_eq!((truth.streams_total, truth.max_streams_total), (2, 2));
    let me = truth.client(1).context("client 1")?;
    assert_eq!((me.streams, me.max_streams, me.stream_cap_rejections), (2, 2, 1));

    // Freeing a slot lets a new stream in.
    drop(open.pop());
    wait_for_truth(&sim, "a free slot", |t| t.streams_total == 1).await?;
    let mut fourth = client
        .pnl_single(&AccountId(p.account.clone()), ContractId(p.contract.con_id), None)
        .await?;
    assert_eq!(next_data(&mut fourth).await?.position, p.quantity);
    Ok(())
}

#[tokio::test]
async fn pacing_over_the_limit_is_refused_with_100() -> TestResult {
    let sim = start(SimConfig {
        pacing_limit: 5,
        ..quiet()
    })
    .await?;
    let client = connect(&sim, 1).await?;
    let held = sim.truth().positions;
    let mut subscriptions = Vec::new();
    for p in held.iter().take(12) {
        subscriptions.push(
            client
                .pnl_single(&AccountId(p.account.clone()), ContractId(p.contract.con_id), None)
                .await?,
        );
    }
    let (mut accepted, mut paced) = (0, 0);
    for s in &mut subscriptions {
        let item = timeout(DEADLINE, s.next()).await?.context("subscription ended")?;
        match item {
            Ok(_) => accepted += 1,
            Err(e) if code(&e) == Some(100) => paced += 1,
            Err(e) => bail!("unexpected error {e}"),
        }
    }
    assert!(accepted >= 1 && paced >= 1, "accepted {accepted}, paced {paced}");
    let me = sim.truth().client(1).cloned().context("client 1")?;
    assert_eq!(me.pacing_violations, paced);
    assert!(me.msgs_total >= 13, "StartApi + 12 requests, got {}", me.msgs_total);
    Ok(())
}

#[tokio::test]
async fn duplicate_client_id_is_refused_with_326() -> TestResult {
    let sim = start(quiet()).await?;
    let first = connect(&sim, 7).await?;
    let second = timeout(DEADLINE, Client::connect(&sim.addr().to_string(), 7)).await?;
    match second {
        Err(ibapi::Error::ClientIdInUse { client_id }) => assert_eq!(client_id, 7),
        Err(e) => bail!("expected ClientIdInUse, got {e}"),
        Ok(_) => bail!("a second client with id 7 must be refused"),
    }
    timeout(DEADLINE, first.server_time()).await??;
    let me = sim.truth().client(7).cloned().context("client 7")?;
    assert!(me.connected);
    assert_eq!(me.connections, 1);
    Ok(())
}

#[tokio::test]
async fn dropped_connection_is_seen_and_client_reconnects() -> TestResult {
    let sim = start(quiet()).await?;
    let (client, mut notices) = connect_with_notices(&sim, 3).await?;
    let mut positions = client.positions().await?;
    position_list(&mut positions).await?;

    sim.drop_connections();
    let error = next_error(&mut positions).await?;
    assert!(
        error.is_connection_lost(),
        "positions stream ends with a connection error, got {error}"
    );
    notice_with_code(&mut notices, ibapi::TRANSPORT_RECONNECT_CODE, RECONNECT_DEADLINE).await?;
    assert!(client.is_connected());
    let truth = wait_for_truth(&sim, "client 3 back", |t| t.client(3).is_some_and(|c| c.connected)).await?;
    assert_eq!(truth.client(3).map(|c| c.connections), Some(2));

    // Subscriptions must be re-requested on the new connection.
    let mut again = client.positions().await?;
    assert_eq!(position_list(&mut again).await?.len(), truth.positions.len());
    Ok(())
}

#[tokio::test]
async fn restart_refuses_connections_then_client_reconnects() -> TestResult {
    let sim = start(quiet()).await?;
    let (client, mut notices) = connect_with_notices(&sim, 4).await?;
    let refuse_for = Duration::from_secs(2);
    let restarted = Instant::now();
    sim.restart(refuse_for).await?;

    let refused = TcpStream::connect(sim.addr()).await;
    assert!(refused.is_err(), "connections are refused during the restart");
    wait_for_truth(&sim, "no client connected", |t| t.connected_clients().is_empty()).await?;

    notice_with_code(&mut notices, ibapi::TRANSPORT_RECONNECT_CODE, RECONNECT_DEADLINE).await?;
    assert!(
        restarted.elapsed() >= refuse_for,
        "reconnected after {:?}",
        restarted.elapsed()
    );
    timeout(DEADLINE, client.server_time()).await??;
    let truth = sim.truth();
    assert_eq!(truth.connected_clients(), [4]);
    assert_eq!(truth.client(4).map(|c| c.connections), Some(2));
    Ok(())
}

#[tokio::test]
async fn connectivity_notices_reach_the_notice_stream() -> TestResult {
    let sim = start(quiet()).await?;
    let (client, mut notices) = connect_with_notices(&sim, 5).await?;
    let held = sim.truth().positions[0].clone();
    let mut pnl = client
        .pnl_single(&AccountId(held.account.clone()), ContractId(held.contract.con_id), None)
        .await?;
    next_data(&mut pnl).await?;

    assert_eq!(sim.send_notice(1100), 1);
    notice_with_code(&mut notices, 1100, DEADLINE).await?;
    sim.send_notice(1102);
    notice_with_code(&mut notices, 1102, DEADLINE).await?;
    assert_eq!(sim.truth().streams_total, 1, "1102: data maintained");

    sim.send_notice(1101);
    notice_with_code(&mut notices, 1101, DEADLINE).await?;
    wait_for_truth(&sim, "1101 ends the streams", |t| t.streams_total == 0).await?;
    assert!(client.is_connected());
    Ok(())
}

/// Opens a raw TCP connection, handshakes and starts the API as `client_id`.
async fn raw_session(sim: &SimHandle, client_id: i32) -> anyhow::Result<TcpStream> {
    let mut socket = TcpStream::connect(sim.addr()).await?;
    let version = b"v213..226";
    let mut hello = b"API\0".to_vec();
    hello.extend_from_slice(&(version.len() as u32).to_be_bytes());
    hello.extend_from_slice(version);
    socket.write_all(&hello).await?;
    let reply = read_raw_frame(&mut socket).await?;
    ensure!(
        reply.starts_with(b"226\0"),
        "handshake reply {:?}",
        String::from_utf8_lossy(&reply)
    );
    let mut start_api = vec![0x08];
    start_api.extend(varint(client_id as u64));
    socket.write_all(&raw_frame(71 + 200, &start_api)).await?;
    Ok(socket)
}

fn varint(mut value: u64) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let byte = (value & 0x7f) as u8;
        value >>= 7;
        if value == 0 {
            out.push(byte);
            return out;
        }
        out.push(byte | 0x80);
    }
}

fn raw_frame(message_id: i32, payload: &[u8]) -> Vec<u8> {
    let mut out = ((payload.len() + 4) as u32).to_be_bytes().to_vec();
    out.extend_from_slice(&message_id.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

async fn read_raw_frame(socket: &mut TcpStream) -> anyhow::Result<Vec<u8>> {
    let len = timeout(DEADLINE, socket.read_u32()).await?? as usize;
    let mut body = vec![0; len];
    timeout(DEADLINE, socket.read_exact(&mut body)).await??;
    Ok(body)
}

/// Reads frames until one with `message_id` (protobuf offset included) arrives.
async fn read_until_message(socket: &mut TcpStream, message_id: i32) -> anyhow::Result<Vec<u8>> {
    loop {
        let body = read_raw_frame(socket).await?;
        if body.len() >= 4 && i32::from_be_bytes([body[0], body[1], body[2], body[3]]) == message_id {
            return Ok(body);
        }
    }
}

/// Whether the server closes `socket` (EOF or reset) before the deadline.
async fn closed_by_server(socket: &mut TcpStream) -> anyhow::Result<bool> {
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + DEADLINE;
    loop {
        match tokio::time::timeout_at(deadline, socket.read(&mut buf)).await {
            Err(_) => return Ok(false),
            Ok(Ok(0)) | Ok(Err(_)) => return Ok(true),
            Ok(Ok(_)) => continue,
        }
    }
}

#[tokio::test]
async fn malformed_frames_close_only_their_connection() -> TestResult {
    let sim = start(quiet()).await?;
    let client = connect(&sim, 1).await?;

    // Well-formed but unimplemented requests get error 321, and the connection stays.
    let mut raw = raw_session(&sim, 55).await?;
    read_until_message(&mut raw, 15 + 200).await?;
    let mut historical = vec![0x08];
    historical.extend(varint(1_500_000_001));
    raw.write_all(&raw_frame(20 + 200, &historical)).await?;
    read_until_message(&mut raw, 4 + 200).await?;
    raw.write_all(&raw_frame(49 + 200, &[])).await?;
    read_until_message(&mut raw, 49 + 200).await?;
    let unimplemented = timeout(DEADLINE, client.family_codes()).await?;
    assert_eq!(
        unimplemented.as_ref().err().and_then(code),
        Some(321),
        "{unimplemented:?}"
    );

    // A length prefix shorter than a message id closes that connection.
    raw.write_all(&[0, 0, 0, 2, 0xff, 0xff]).await?;
    assert!(
        closed_by_server(&mut raw).await?,
        "malformed frame must close the connection"
    );
    wait_for_truth(&sim, "client 55 gone", |t| t.client(55).is_some_and(|c| !c.connected)).await?;

    // A connection that is not the TWS protocol at all is closed too.
    let mut http = TcpStream::connect(sim.addr()).await?;
    http.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await?;
    assert!(closed_by_server(&mut http).await?);

    // Undecodable protobuf for an implemented request closes its connection.
    let mut bad = raw_session(&sim, 56).await?;
    read_until_message(&mut bad, 15 + 200).await?;
    bad.write_all(&raw_frame(94 + 200, &[0x0a, 0xff, 0xff])).await?;
    assert!(closed_by_server(&mut bad).await?);

    // The ibapi client was never disturbed.
    timeout(DEADLINE, client.server_time()).await??;
    assert_eq!(sim.truth().connected_clients(), [1]);
    Ok(())
}

#[tokio::test]
async fn same_seed_gives_the_same_world() -> TestResult {
    let a = start(quiet()).await?;
    let b = start(quiet()).await?;
    assert_eq!(a.contracts(), b.contracts());
    assert_eq!(a.truth().positions, b.truth().positions);
    for _ in 0..25 {
        assert_eq!(a.random_fill(), b.random_fill());
        a.step_prices();
        b.step_prices();
    }
    assert_eq!(a.truth().positions, b.truth().positions);

    let c = start(SimConfig { seed: 9, ..quiet() }).await?;
    assert_ne!(a.truth().positions, c.truth().positions);
    let contracts = a.contracts();
    assert!(contracts
        .iter()
        .any(|c| c.is_option() && c.right == "P" && c.multiplier == 100.0));
    assert!(contracts.iter().any(|c| c.sec_type == "STK" && c.symbol == "NVDA"));
    Ok(())
}

#[tokio::test]
async fn random_fills_reach_subscribers_and_truth_file() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("truth.json");
    let sim = start(SimConfig {
        fill_rate: 20.0,
        truth_file: Some(path.clone()),
        ..SimConfig::for_tests()
    })
    .await?;
    let client = connect(&sim, 1).await?;
    let mut positions = client.positions().await?;
    position_list(&mut positions).await?;
    for _ in 0..5 {
        let PositionUpdate::Position(update) = next_data(&mut positions).await? else {
            bail!("expected a position update");
        };
        let contract = sim
            .contracts()
            .into_iter()
            .find(|c| c.con_id == update.contract.contract_id);
        assert_contract(&update.contract, &contract.context("a world contract")?)?;
    }

    // The truth file follows the world.
    let seq = sim.truth().world_seq;
    let from_file = wait_until("the truth file to catch up", || {
        let path = path.clone();
        async move {
            let text = tokio::fs::read_to_string(&path).await.ok()?;
            let truth: Truth = serde_json::from_str(&text).ok()?;
            (truth.world_seq >= seq).then_some(truth)
        }
    })
    .await?;
    assert!(from_file.positions.iter().all(|p| p.quantity != 0.0));
    assert!(from_file.client(1).is_some_and(|c| c.connected));
    Ok(())
}

/// Issue 18 #3: a frozen connection stays open (no reset, no end of stream) but answers
/// nothing; a connection made after the freeze is served; the frozen one ends when its client
/// closes it, which frees its client id.
#[tokio::test]
async fn a_frozen_connection_stays_open_and_answers_nothing() -> TestResult {
    let sim = start(quiet()).await?;
    let client = connect(&sim, 21).await?;
    possync::ib::heartbeat(&client, DEADLINE).await?;
    let mut positions = client.positions().await?;
    position_list(&mut positions).await?;

    sim.freeze_connections();
    let silent = possync::ib::heartbeat(&client, Duration::from_millis(1500)).await;
    assert!(
        matches!(silent, Err(possync::ib::HeartbeatError::Silent(_))),
        "a frozen connection must not answer: {silent:?}"
    );
    assert!(client.is_connected(), "the socket of a frozen connection stays open");
    let p = &sim.truth().positions[0];
    sim.apply_fill(&p.account, p.contract.con_id, 1.0)?;
    let update = timeout(Duration::from_millis(1500), positions.next()).await;
    assert!(update.is_err(), "a frozen connection sends nothing: {update:?}");

    let other = connect(&sim, 22).await?;
    possync::ib::heartbeat(&other, DEADLINE).await?;

    drop(positions);
    client.disconnect().await;
    wait_for_truth(&sim, "the frozen client's id freed", |t| {
        t.client(21).is_none_or(|c| !c.connected)
    })
    .await?;
    let again = connect(&sim, 21).await?;
    possync::ib::heartbeat(&again, DEADLINE).await?;
    Ok(())
}
