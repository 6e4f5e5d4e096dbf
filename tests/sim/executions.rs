//! Executions (issue 21, simulator part) through the real `ibapi` 5.5 client:
//! `reqExecutions` with filters, live `execDetails` to the master client id,
//! the commission-first and correction faults, a fill while disconnected, and
//! option expiry / assignment with no execution.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{anyhow, bail, ensure, Context};
use futures::StreamExt;
use ibapi::accounts::PositionUpdate;
use ibapi::orders::{CommissionReport, ExecutionData, ExecutionFilter, ExecutionFilterSide, Executions, OrderUpdate};
use ibapi::subscriptions::{Subscription, SubscriptionItem};
use ibapi::Client;
use possync::sim::{start, SimConfig, SimHandle, TruthExecution};
use tokio::time::Instant;

use super::{
    assert_contract, code, connect, connect_with_notices, next_data, next_error, notice_with_code, position_list,
    quiet, wait_for_truth, TestResult, RECONNECT_DEADLINE,
};

/// The master API client id of these tests' simulators.
const MASTER: i32 = 7;
/// Upper bound for reading one `reqExecutions` answer.
const ANSWER_DEADLINE: Duration = Duration::from_secs(30);

fn with_master() -> SimConfig {
    SimConfig {
        master_client_id: Some(MASTER),
        ..quiet()
    }
}

/// One `reqExecutions` answer: the executions in order and the commission
/// reports by exec id.
struct Answer {
    executions: Vec<ExecutionData>,
    commissions: BTreeMap<String, CommissionReport>,
}

impl Answer {
    fn ids(&self) -> Vec<String> {
        self.executions
            .iter()
            .map(|e| e.execution.execution_id.clone())
            .collect()
    }
}

/// Sends `reqExecutions` with `filter` and reads the answer up to `execDetailsEnd`.
async fn executions(client: &Client, filter: ExecutionFilter) -> anyhow::Result<Answer> {
    let mut subscription = client.executions(filter).await?;
    let deadline = Instant::now() + ANSWER_DEADLINE;
    let mut answer = Answer {
        executions: Vec::new(),
        commissions: BTreeMap::new(),
    };
    loop {
        let item = tokio::time::timeout_at(deadline, subscription.next())
            .await
            .context("no execDetailsEnd before the deadline")?;
        match item {
            None => return Ok(answer),
            Some(Ok(SubscriptionItem::Data(Executions::ExecutionData(e)))) => answer.executions.push(e),
            Some(Ok(SubscriptionItem::Data(Executions::CommissionReport(c)))) => {
                answer.commissions.insert(c.execution_id.clone(), c);
            }
            Some(Ok(SubscriptionItem::Notice(_))) => {}
            Some(Err(e)) => return Err(e.into()),
        }
    }
}

/// Asserts an `ibapi` execution (and its commission report) carries every field of the truth's.
fn assert_execution(got: &ExecutionData, commission: Option<&CommissionReport>, want: &TruthExecution) -> TestResult {
    let e = &got.execution;
    ensure!(
        e.execution_id == want.exec_id,
        "exec id {} != {}",
        e.execution_id,
        want.exec_id
    );
    assert_eq!(
        (e.order_id, e.client_id, e.perm_id),
        (want.order_id, want.client_id, want.perm_id)
    );
    assert_eq!(
        (e.account_number.as_str(), e.side.as_str(), e.shares, e.price),
        (want.account.as_str(), want.side.as_str(), want.shares, want.price)
    );
    assert_eq!((e.cumulative_quantity, e.average_price), (want.cum_qty, want.avg_price));
    assert_eq!(
        (e.time.as_str(), e.exchange.as_str()),
        (want.time.as_str(), want.exchange.as_str())
    );
    let mut contract = want.contract.clone();
    contract.exchange = want.exchange.clone();
    assert_contract(&got.contract, &contract)?;
    let c = commission.with_context(|| format!("no commission report for {}", want.exec_id))?;
    assert_eq!(
        (
            c.execution_id.as_str(),
            c.commission,
            c.currency.as_str(),
            c.realized_pnl
        ),
        (
            want.commission.exec_id.as_str(),
            want.commission.commission,
            want.commission.currency.as_str(),
            want.commission.realized_pnl
        )
    );
    Ok(())
}

/// Asserts `answer` holds exactly `want` (in order), each with its commission report.
fn assert_answer(answer: &Answer, want: &[&TruthExecution]) -> TestResult {
    let want_ids: Vec<&str> = want.iter().map(|e| e.exec_id.as_str()).collect();
    ensure!(answer.ids() == want_ids, "got {:?}, want {want_ids:?}", answer.ids());
    ensure!(
        answer.commissions.len() == want.len(),
        "{} commission reports for {} executions",
        answer.commissions.len(),
        want.len()
    );
    for (got, want) in answer.executions.iter().zip(want) {
        assert_execution(got, answer.commissions.get(&want.exec_id), want)?;
        ensure!(got.request_id != -1, "reqExecutions answers carry the request id");
    }
    Ok(())
}

/// The next execution or commission report of an order update stream.
async fn next_update(updates: &mut Subscription<OrderUpdate>) -> anyhow::Result<OrderUpdate> {
    next_data(updates).await
}

/// Some fills over accounts, contracts and both sides; returns nothing, the truth has them.
fn trade(sim: &SimHandle) -> TestResult {
    let truth = sim.truth();
    let held: Vec<_> = truth.positions.iter().take(4).collect();
    ensure!(held.len() == 4, "the world holds positions");
    for (i, p) in held.iter().enumerate() {
        let delta = if i % 2 == 0 { 2.0 } else { -1.0 };
        sim.apply_fill(&p.account, p.contract.con_id, delta)?;
    }
    // Closing a position realizes PnL: its commission report carries it.
    let p = held[0];
    sim.apply_fill(&p.account, p.contract.con_id, -(p.quantity + 2.0))?;
    Ok(())
}

#[tokio::test]
async fn req_executions_returns_the_days_executions_with_commissions() -> TestResult {
    let sim = start(with_master()).await?;
    let client = connect(&sim, MASTER).await?;
    ensure!(executions(&client, ExecutionFilter::default())
        .await?
        .executions
        .is_empty());

    trade(&sim)?;
    let truth = sim.truth();
    ensure!(truth.executions.len() == 5, "{} executions", truth.executions.len());
    let all: Vec<&TruthExecution> = truth.executions.iter().collect();
    let answer = executions(&client, ExecutionFilter::default()).await?;
    assert_answer(&answer, &all)?;
    ensure!(
        all.iter().any(|e| e.commission.realized_pnl.is_some()),
        "the closing fill realized PnL"
    );
    ensure!(all.iter().all(|e| e.client_id == MASTER && e.exec_id.ends_with(".01")));

    // Filters: account, side, both, symbol and sec type.
    let account = all[1].account.clone();
    let by_account = ExecutionFilter {
        account_code: account.clone(),
        ..ExecutionFilter::default()
    };
    let want: Vec<_> = all.iter().copied().filter(|e| e.account == account).collect();
    assert_answer(&executions(&client, by_account).await?, &want)?;
    let sells = ExecutionFilter {
        side: Some(ExecutionFilterSide::Sell),
        ..ExecutionFilter::default()
    };
    let want: Vec<_> = all.iter().copied().filter(|e| e.side == "SLD").collect();
    ensure!(!want.is_empty() && want.len() < all.len());
    assert_answer(&executions(&client, sells).await?, &want)?;
    let buys_of_account = ExecutionFilter {
        account_code: account.clone(),
        side: Some(ExecutionFilterSide::Buy),
        ..ExecutionFilter::default()
    };
    let want: Vec<_> = all
        .iter()
        .copied()
        .filter(|e| e.account == account && e.side == "BOT")
        .collect();
    assert_answer(&executions(&client, buys_of_account).await?, &want)?;
    let contract = &all[2].contract;
    let by_contract = ExecutionFilter {
        symbol: contract.symbol.clone(),
        security_type: contract.sec_type.clone(),
        ..ExecutionFilter::default()
    };
    let want: Vec<_> = all
        .iter()
        .copied()
        .filter(|e| e.contract.symbol == contract.symbol && e.contract.sec_type == contract.sec_type)
        .collect();
    assert_answer(&executions(&client, by_contract).await?, &want)?;

    // A filter the simulator cannot read is an error to the client, not a crash.
    let bad = ExecutionFilter {
        time: "yesterday".to_string(),
        ..ExecutionFilter::default()
    };
    let mut refused = client.executions(bad).await?;
    let error = next_error(&mut refused).await?;
    assert_eq!(code(&error), Some(321), "an unreadable time is refused: {error}");

    // Another client id sees none of the master's orders' executions.
    let other = connect(&sim, 8).await?;
    ensure!(executions(&other, ExecutionFilter::default())
        .await?
        .executions
        .is_empty());

    // Yesterday's executions are gone; positions stay.
    let positions = sim.truth().positions;
    sim.new_trading_day();
    ensure!(sim.truth().executions.is_empty());
    ensure!(executions(&client, ExecutionFilter::default())
        .await?
        .executions
        .is_empty());
    assert_eq!(sim.truth().positions, positions);
    Ok(())
}

#[tokio::test]
async fn live_executions_reach_the_master_and_not_other_clients() -> TestResult {
    let sim = start(with_master()).await?;
    let master = connect(&sim, MASTER).await?;
    let other = connect(&sim, 8).await?;
    let mut master_updates = master.order_update_stream().await?;
    let mut other_updates = other.order_update_stream().await?;

    let held = sim.truth().positions[0].clone();
    let e = sim
        .fill(&held.account, held.contract.con_id, -1.0, false)?
        .context("a fill makes an execution")?;
    let OrderUpdate::ExecutionData(got) = next_update(&mut master_updates).await? else {
        bail!("expected the execution first");
    };
    assert_eq!(got.request_id, -1, "live executions carry request id -1");
    let OrderUpdate::CommissionReport(commission) = next_update(&mut master_updates).await? else {
        bail!("expected the commission report after the execution");
    };
    assert_execution(&got, Some(&commission), &e)?;

    let truth = wait_for_truth(&sim, "delivery recorded", |t| {
        t.execution(&e.exec_id).is_some_and(|x| !x.delivered_to.is_empty())
    })
    .await?;
    assert_eq!(
        truth.execution(&e.exec_id).map(|x| x.delivered_to.clone()),
        Some(vec![MASTER])
    );
    // Nothing reaches client 8 (its session skips executions it may not see). A quiet window
    // is a negative check: it can only pass wrongly on a slow machine, never fail wrongly.
    let quiet_for = Duration::from_millis(500);
    match tokio::time::timeout(quiet_for, other_updates.next()).await {
        Err(_) => {}
        Ok(item) => bail!("client 8 got {item:?}"),
    }
    ensure!(executions(&other, ExecutionFilter::default())
        .await?
        .executions
        .is_empty());
    Ok(())
}

#[tokio::test]
async fn commission_first_and_corrections_are_seen_by_the_client() -> TestResult {
    let sim = start(with_master()).await?;
    let client = connect(&sim, MASTER).await?;
    let mut updates = client.order_update_stream().await?;
    let mut positions = client.positions().await?;
    position_list(&mut positions).await?;

    // Commission report before its execution.
    let held = sim.truth().positions[0].clone();
    let (account, con_id) = (held.account.clone(), held.contract.con_id);
    let first = sim.fill(&account, con_id, 5.0, true)?.context("an execution")?;
    ensure!(first.commission_first);
    let OrderUpdate::CommissionReport(report) = next_update(&mut updates).await? else {
        bail!("expected the commission report before its execution");
    };
    let OrderUpdate::ExecutionData(got) = next_update(&mut updates).await? else {
        bail!("expected the execution after its commission report");
    };
    assert_eq!(report.execution_id, got.execution.execution_id);
    assert_execution(&got, Some(&report), &first)?;
    let PositionUpdate::Position(p) = next_data(&mut positions).await? else {
        bail!("expected a position update");
    };
    assert_eq!(p.position, held.quantity + 5.0);

    // A correction of the quantity: same execution, suffix .02, the position follows.
    let fixed = sim.correct_execution(&first.exec_id, Some(3.0), None)?;
    ensure!(fixed.exec_id.ends_with(".01.02"), "{}", fixed.exec_id);
    let OrderUpdate::ExecutionData(got) = next_update(&mut updates).await? else {
        bail!("expected the corrected execution");
    };
    let OrderUpdate::CommissionReport(report) = next_update(&mut updates).await? else {
        bail!("expected the corrected execution's commission report");
    };
    assert_execution(&got, Some(&report), &fixed)?;
    let (old, new) = (&first.exec_id, &got.execution.execution_id);
    assert_eq!(old.rsplit_once('.').map(|x| x.0), new.rsplit_once('.').map(|x| x.0));
    assert_eq!((got.execution.perm_id, got.execution.shares), (first.perm_id, 3.0));
    let PositionUpdate::Position(p) = next_data(&mut positions).await? else {
        bail!("expected a position update");
    };
    assert_eq!(p.position, held.quantity + 3.0);
    assert_eq!(
        sim.truth().position(&account, con_id).map(|p| p.quantity),
        Some(held.quantity + 3.0)
    );

    // A correction of the price changes no position.
    let repriced = sim.correct_execution(&fixed.exec_id, None, Some(first.price + 0.5))?;
    ensure!(repriced.exec_id.ends_with(".01.03"), "{}", repriced.exec_id);
    let OrderUpdate::ExecutionData(got) = next_update(&mut updates).await? else {
        bail!("expected the repriced execution");
    };
    assert_eq!((got.execution.shares, got.execution.price), (3.0, first.price + 0.5));

    // reqExecutions returns every version, each with its commission report.
    let truth = sim.truth();
    let all: Vec<&TruthExecution> = truth.executions.iter().collect();
    ensure!(all.len() == 3);
    assert_answer(&executions(&client, ExecutionFilter::default()).await?, &all)?;
    let effective = truth.effective_executions();
    assert_eq!(effective.len(), 1);
    assert_eq!(effective[0].exec_id, repriced.exec_id);
    assert_eq!(
        truth.position(&account, con_id).map(|p| p.quantity),
        Some(held.quantity + effective[0].signed_shares())
    );
    Ok(())
}

#[tokio::test]
async fn a_fill_while_disconnected_is_returned_after_reconnecting() -> TestResult {
    let sim = start(with_master()).await?;
    let (client, mut notices) = connect_with_notices(&sim, MASTER).await?;
    let held = sim.truth().positions[0].clone();
    let e = sim
        .fill_while_disconnected(&held.account, held.contract.con_id, 4.0, Duration::from_secs(1))
        .await?
        .context("an execution")?;
    ensure!(e.delivered_to.is_empty(), "nobody was connected");

    notice_with_code(&mut notices, ibapi::TRANSPORT_RECONNECT_CODE, RECONNECT_DEADLINE).await?;
    wait_for_truth(&sim, "the master back", |t| {
        t.client(MASTER).is_some_and(|c| c.connected && c.connections == 2)
    })
    .await?;
    let truth = sim.truth();
    let got = executions(&client, ExecutionFilter::default()).await?;
    assert_answer(&got, &[truth.execution(&e.exec_id).context("in the truth")?])?;
    assert_eq!(
        truth.execution(&e.exec_id).map(|x| x.delivered_to.clone()),
        Some(vec![]),
        "never delivered live"
    );
    Ok(())
}

#[tokio::test]
async fn expiry_and_assignment_change_positions_with_no_execution() -> TestResult {
    let sim = start(with_master()).await?;
    let client = connect(&sim, MASTER).await?;
    let mut updates = client.order_update_stream().await?;
    let contracts = sim.contracts();
    let call = contracts
        .iter()
        .find(|c| c.is_option() && c.right == "C")
        .context("a call")?;
    let put = contracts
        .iter()
        .find(|c| c.is_option() && c.right == "P" && c.symbol == call.symbol)
        .context("a put")?;
    let stock = contracts
        .iter()
        .find(|c| c.sec_type == "STK" && c.symbol == call.symbol)
        .context("the underlying stock")?;
    let account = "DU0000002";
    sim.set_position(account, call.con_id, -2.0, 350.0)?;
    sim.set_position(account, put.con_id, 1.0, 120.0)?;
    sim.set_position(account, stock.con_id, 50.0, 100.0)?;
    let mut positions = client.positions().await?;
    let list = position_list(&mut positions).await?;
    assert_eq!(
        list.get(&(account.to_string(), call.con_id)).map(|p| p.position),
        Some(-2.0)
    );

    // Assignment of the short call: the option closes, 200 shares are delivered.
    let stock_after = sim.assign(account, call.con_id)?;
    assert_eq!(stock_after.quantity, -150.0);
    let mut seen = BTreeMap::new();
    while seen.len() < 2 {
        let PositionUpdate::Position(p) = next_data(&mut positions).await? else {
            bail!("expected a position update");
        };
        seen.insert(p.contract.contract_id, p.position);
    }
    assert_eq!(seen.get(&call.con_id), Some(&0.0));
    assert_eq!(seen.get(&stock.con_id), Some(&-150.0));

    // Expiry of the long put: it goes to 0.
    let expired = sim.expire(account, put.con_id)?;
    assert_eq!(expired.quantity, 0.0);
    let PositionUpdate::Position(p) = next_data(&mut positions).await? else {
        bail!("expected a position update");
    };
    assert_eq!((p.contract.contract_id, p.position), (put.con_id, 0.0));
    let truth = sim.truth();
    ensure!(truth.position(account, call.con_id).is_none() && truth.position(account, put.con_id).is_none());
    assert_eq!(truth.position(account, stock.con_id).map(|p| p.quantity), Some(-150.0));

    // No execution anywhere: not in the truth, not from reqExecutions, not live.
    ensure!(truth.executions.is_empty());
    ensure!(executions(&client, ExecutionFilter::default())
        .await?
        .executions
        .is_empty());
    // The live order stream is ordered: a fill after them is the first thing it yields.
    let e = sim
        .fill(account, stock.con_id, 150.0, false)?
        .ok_or_else(|| anyhow!("an execution"))?;
    let OrderUpdate::ExecutionData(got) = next_update(&mut updates).await? else {
        bail!("expected the fill's execution, nothing before it");
    };
    assert_eq!(got.execution.execution_id, e.exec_id);
    Ok(())
}

#[tokio::test]
async fn fault_rates_correct_fills_send_commissions_first_and_expire_options() -> TestResult {
    let sim = start(SimConfig {
        commission_first_rate: 1.0,
        correction_rate: 1.0,
        ..with_master()
    })
    .await?;
    let client = connect(&sim, MASTER).await?;
    let mut updates = client.order_update_stream().await?;
    let held = sim.truth().positions[0].clone();
    sim.apply_fill(&held.account, held.contract.con_id, 2.0)?;
    let truth = sim.truth();
    let [first, fixed] = truth.executions.as_slice() else {
        bail!("a fill and its correction, got {:?}", truth.executions);
    };
    assert_eq!(fixed.corrects.as_deref(), Some(first.exec_id.as_str()));
    ensure!(first.commission_first);
    let mut order = Vec::new();
    while order.len() < 4 {
        order.push(match next_update(&mut updates).await? {
            OrderUpdate::ExecutionData(e) => format!("exec {}", e.execution.execution_id),
            OrderUpdate::CommissionReport(c) => format!("commission {}", c.execution_id),
            other => bail!("unexpected {other:?}"),
        });
    }
    let want = [
        format!("commission {}", first.exec_id),
        format!("exec {}", first.exec_id),
        format!("exec {}", fixed.exec_id),
        format!("commission {}", fixed.exec_id),
    ];
    assert_eq!(order, want);
    assert_eq!(
        truth.position(&held.account, held.contract.con_id).map(|p| p.quantity),
        Some(held.quantity + fixed.signed_shares())
    );

    // Scheduled expiries and assignments close option positions with no execution.
    let sim = start(SimConfig {
        expire_assign_every: Some(Duration::from_millis(20)),
        ..with_master()
    })
    .await?;
    let options = |t: &possync::sim::Truth| t.positions.iter().filter(|p| p.contract.is_option()).count();
    let before = options(&sim.truth());
    ensure!(before > 3, "the world holds options");
    let truth = wait_for_truth(&sim, "three options expired or assigned", |t| options(t) + 3 <= before).await?;
    ensure!(truth.executions.is_empty(), "expiry and assignment make no execution");
    Ok(())
}
