//! Positions reconciled against fills, end to end: the simulator (fills with the commission
//! first and a correction, an option expiry, an assignment, a position changed with no
//! execution) → ingest → the embedded broker → materialize → Delta tables → the reconciliation
//! service and `possync reconcile`. Nothing wrong: every key that moved agrees or is
//! explained; the change without an execution is the one drift.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::time::Duration;

use anyhow::{ensure, Context};
use possync::events::now_micros;
use possync::materialize::{self, MaterializeConfig};
use possync::reconcile::model::Status;
use possync::reconcile::{read, ReconcileConfig, Reconciler, Report};
use possync::sim::{SimConfig, SimHandle, TruthPosition};
use tokio_util::sync::CancellationToken;

use crate::ingest_support::{env, quiet_sim, wait_for, Env, Running, DEADLINE};

const CLIENT: i32 = 7;
const BIN: &str = env!("CARGO_BIN_EXE_possync");

type Book = BTreeMap<(String, i64), f64>;

fn truth_book(sim: &SimHandle) -> Book {
    sim.truth()
        .positions
        .iter()
        .map(|p| ((p.account.clone(), i64::from(p.contract.con_id)), p.quantity))
        .collect()
}

/// Waits until `positions_current` holds the simulator's book and the `executions` table every
/// simulated execution.
async fn wait_tables(sim: &SimHandle, base: &str, what: &str) -> anyhow::Result<()> {
    let want = truth_book(sim);
    let fills: BTreeSet<String> = sim.truth().executions.iter().map(|e| e.exec_id.clone()).collect();
    wait_for(what, DEADLINE, || async {
        let book = read::book_now(base).await.ok()?;
        let got: Book = book.rows.iter().map(|(k, h)| (k.clone(), h.position)).collect();
        let on_table: BTreeSet<String> = possync::ops::fills::load(&possync::ops::fills::FillsConfig {
            table_uri: base.to_string(),
            ..Default::default()
        })
        .await
        .map(|f| f.rows.into_iter().map(|r| r.exec_id).collect())
        .unwrap_or_default();
        (got == want && on_table == fills).then_some(())
    })
    .await
}

fn line<'a>(r: &'a Report, p: &TruthPosition) -> Option<&'a possync::reconcile::model::Line> {
    r.lines
        .iter()
        .find(|l| l.account == p.account && l.con_id == i64::from(p.contract.con_id))
}

/// The simulator, ingest (the master client), the embedded broker and a materializer writing
/// the tables under `base`, started and caught up with the first book.
struct Desk {
    env: Env,
    _dir: tempfile::TempDir,
    base: String,
    ingest: Running,
    stop: CancellationToken,
    mat: tokio::task::JoinHandle<Result<(), materialize::MaterializeError>>,
}

impl Desk {
    async fn start(sim: SimConfig) -> anyhow::Result<Self> {
        let env = env(sim, 1, 1).await?;
        let dir = tempfile::tempdir()?;
        let base = dir.path().join("tables").to_string_lossy().into_owned();
        let ingest = env.start_ingest(env.ingest_config(CLIENT, 4)).await?;
        let stop = CancellationToken::new();
        let mat = tokio::spawn(materialize::run(
            MaterializeConfig {
                table_uri: base.clone(),
                group: format!("{}reconcile-test", env.kafka.topics.prefix()),
                flush_latency: Duration::from_millis(200),
                state_dir: dir.path().join("state"),
                ..MaterializeConfig::default()
            },
            env.kafka.clone(),
            stop.clone(),
        ));
        wait_tables(&env.sim, &base, "the first book in positions_current").await?;
        Ok(Self {
            env,
            _dir: dir,
            base,
            ingest,
            stop,
            mat,
        })
    }

    async fn stop(self) -> anyhow::Result<()> {
        self.ingest.stop().await?;
        self.stop.cancel();
        self.mat.await??;
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fills_expiries_and_assignments_agree_and_a_change_without_a_fill_drifts() -> anyhow::Result<()> {
    // The world's date 70 days ago: its first expiries are past, as on an expiry day.
    let today = chrono::Utc::now().date_naive();
    let sim = SimConfig {
        master_client_id: Some(CLIENT),
        today: Some(today - chrono::Days::new(70)),
        initial_positions: 60,
        ..quiet_sim()
    };
    let desk = Desk::start(sim).await?;
    let (env, base) = (&desk.env, desk.base.clone());

    // The day's starting snapshot: nothing moved since.
    let cfg = ReconcileConfig {
        table_uri: base.clone(),
        drift_after: Duration::ZERO,
        // A periodic snapshot at every run (two runs: two files for `maintain` to compact).
        snapshot_every: Duration::ZERO,
        ..ReconcileConfig::default()
    };
    let mut service = Reconciler::new(cfg.clone());
    let first = service.run_once(now_micros()).await?;
    ensure!(first.lines.is_empty(), "nothing moved yet: {:?}", first.lines);
    let start = read::day_start(&base, today)
        .await?
        .context("the day's starting snapshot")?;
    ensure!(
        start.rows.len() == truth_book(&env.sim).len(),
        "the snapshot holds the open book"
    );

    // IB stamps executions to the second: a fill counts when its time is after the time of the
    // row the snapshot copied (see `reconcile::model`), so the day's fills start over a second
    // after the last row was written.
    tokio::time::sleep(Duration::from_millis(1100)).await;

    // What happens during the day.
    let held = env.sim.truth().positions;
    let options: Vec<&TruthPosition> = held.iter().filter(|p| p.contract.sec_type == "OPT").collect();
    let today_text = today.format("%Y%m%d").to_string();
    let expired = options
        .iter()
        .find(|p| p.contract.expiry <= today_text)
        .context("an option that expires by today")?;
    env.sim.expire(&expired.account, expired.contract.con_id)?;
    // An assignment: the first option whose underlying stock the simulator lists, in an
    // account whose stock position nothing else touches.
    let mut assigned = None;
    for o in options.iter().filter(|o| o.contract.con_id != expired.contract.con_id) {
        if let Ok(stock) = env.sim.assign(&o.account, o.contract.con_id) {
            assigned = Some((*o, stock));
            break;
        }
    }
    let (assigned, assigned_stock) = assigned.context("an option the simulator can assign")?;
    let touched = |p: &TruthPosition| {
        (p.account == assigned.account && p.contract.symbol == assigned.contract.symbol)
            || (p.account == expired.account && p.contract.con_id == expired.contract.con_id)
    };
    let free: Vec<&TruthPosition> = held
        .iter()
        .filter(|p| !touched(p) && p.contract.con_id != assigned_stock.contract.con_id)
        .collect();
    ensure!(free.len() >= 3, "three positions nothing else touches");
    let (bought, sold, drifted) = (free[0], free[1], free[2]);
    env.sim.fill(&bought.account, bought.contract.con_id, 5.0, true)?;
    let fill = env
        .sim
        .fill(&sold.account, sold.contract.con_id, -3.0, false)?
        .context("a fill")?;
    env.sim.correct_execution(&fill.exec_id, Some(4.0), None)?;
    // A change with no execution: IB's book and the fills disagree.
    env.sim.set_position(
        &drifted.account,
        drifted.contract.con_id,
        drifted.quantity + 7.0,
        drifted.avg_cost,
    )?;
    wait_tables(&env.sim, &base, "the day's changes in the tables").await?;

    let r = service.run_once(now_micros()).await?;
    let status = |p: &TruthPosition| line(&r, p).map(|l| (l.status, l.reason.clone(), l.diff));
    ensure!(
        status(bought) == Some((Status::Agrees, None, 0.0)),
        "bought: {:?}",
        line(&r, bought)
    );
    ensure!(
        status(sold) == Some((Status::Agrees, None, 0.0))
            && line(&r, sold).is_some_and(|l| l.filled == -4.0 && l.fills == 1),
        "sold and corrected to 4: {:?}",
        line(&r, sold)
    );
    ensure!(
        status(expired) == Some((Status::Explained, Some("expiry".into()), -expired.quantity)),
        "expired: {:?}",
        line(&r, expired)
    );
    ensure!(
        line(&r, assigned).is_some_and(|l| l.status == Status::Explained && l.reason.as_deref() == Some("assignment")),
        "assigned option: {:?}",
        line(&r, assigned)
    );
    ensure!(
        line(&r, &assigned_stock)
            .is_some_and(|l| l.status == Status::Explained && l.reason.as_deref() == Some("assignment")),
        "the assigned option's stock: {:?}",
        line(&r, &assigned_stock)
    );
    ensure!(
        status(drifted) == Some((Status::Drifted, None, 7.0)),
        "drifted: {:?}",
        line(&r, drifted)
    );
    ensure!(
        r.count(Status::Drifted) == 1 && r.count(Status::Pending) == 0,
        "one drift and nothing else unexplained: {:?}",
        r.lines
    );

    // `possync status` reports the drift from the table the service wrote.
    let status = possync::ops::status::check(
        &possync::ops::status::StatusConfig {
            table_uri: base.clone(),
            ..Default::default()
        },
        &env.kafka,
    )
    .await?;
    let rec = status.reconciliation.context("status reads the reconciliation table")?;
    ensure!(
        rec.drifted == 1 && rec.examples.len() == 1 && rec.examples[0].contains(&drifted.account),
        "status: {rec:?}"
    );
    ensure!(
        status
            .problems
            .iter()
            .any(|p| p.contains("possync reconcile --problems")),
        "a drift makes status unhealthy: {:?}",
        status.problems
    );

    // The table holds the run; `possync reconcile` prints it from the tables (a longer
    // --drift-after: the drift is pending again, since its first sighting is kept).
    let table = read::unexplained_since(&base, today).await?;
    ensure!(table.len() == 1, "the reconciliation table holds the drift: {table:?}");
    let out = tokio::task::spawn_blocking({
        let base = base.clone();
        move || {
            Command::new(BIN)
                .args(["reconcile", "--json", "--drift-after", "1h", "--table-uri", &base])
                .env("POSSYNC_LOG", "warn")
                .output()
        }
    })
    .await??;
    ensure!(
        out.status.success(),
        "possync reconcile: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed: Report = serde_json::from_slice(&out.stdout)?;
    ensure!(
        printed.count(Status::Pending) == 1 && printed.count(Status::Drifted) == 0,
        "with --drift-after 1h the drift is pending: {:?}",
        printed.counts
    );
    let text = Command::new(BIN)
        .args(["reconcile", "--problems", "--table-uri", &base])
        .env("POSSYNC_LOG", "warn")
        .output()?;
    let text = String::from_utf8(text.stdout)?;
    ensure!(
        text.lines().filter(|l| l.contains(" pending ")).count() == 1 && text.contains(&drifted.account),
        "--problems lists the one key:\n{text}"
    );

    // `possync maintain` compacts the periodic snapshots; the day's start stays as it was.
    let maintained = materialize::maintain::run(&materialize::MaintainConfig {
        table_uri: base.clone(),
        ..Default::default()
    })
    .await?;
    let snapshots = maintained
        .get("position_snapshots")
        .context("maintain covers position_snapshots")?;
    ensure!(
        snapshots.files_compacted == 2 && snapshots.files_written == 1,
        "{snapshots:?}"
    );
    let again = read::day_start(&base, today)
        .await?
        .context("the day's start after maintain")?;
    ensure!(
        again.time == start.time && again.rows == start.rows,
        "maintain changed the day's start"
    );

    desk.stop().await
}

/// A random trading day with every IB fault of the simulator on at once, driven by count (not
/// by time): commission reports before their executions, corrections, fills while the gateway
/// is down (a restart refusing connections), expiries of options whose day has come and early
/// assignments, all among ordinary fills. The `executions` table ends with every execution once,
/// each with its commission, and the reconciliation with every moved position agreeing or
/// explained: nothing pending, nothing drifted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_random_day_with_every_ib_fault_reconciles_with_no_drift() -> anyhow::Result<()> {
    let today = chrono::Utc::now().date_naive();
    let sim = SimConfig {
        master_client_id: Some(CLIENT),
        today: Some(today - chrono::Days::new(70)),
        initial_positions: 60,
        commission_first_rate: 0.3,
        correction_rate: 0.1,
        ..quiet_sim()
    };
    let desk = Desk::start(sim).await?;
    let (env, base) = (&desk.env, desk.base.clone());
    let mut service = Reconciler::new(ReconcileConfig {
        table_uri: base.clone(),
        drift_after: Duration::ZERO,
        ..ReconcileConfig::default()
    });
    let first = service.run_once(now_micros()).await?;
    ensure!(first.lines.is_empty(), "nothing moved yet: {:?}", first.lines);
    // Fills start over a second after the rows the day's start copied (see the test above).
    tokio::time::sleep(Duration::from_millis(1100)).await;

    let (mut expiries, mut while_down) = (0, 0);
    for i in 1..=240u32 {
        env.sim.random_fill();
        if i.is_multiple_of(20) && env.sim.random_expiry().is_some() {
            expiries += 1;
        }
        if i.is_multiple_of(60) {
            // A stock (stocks never expire) filled while ingest cannot connect.
            let stock = env
                .sim
                .truth()
                .positions
                .into_iter()
                .find(|p| p.contract.sec_type == "STK")
                .context("a stock position")?;
            env.sim
                .fill_while_disconnected(&stock.account, stock.contract.con_id, 10.0, Duration::from_millis(300))
                .await?;
            while_down += 1;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let truth = env.sim.truth();
    let corrections = truth.executions.iter().filter(|e| e.corrects.is_some()).count();
    let first_commissions = truth.executions.iter().filter(|e| e.commission_first).count();
    ensure!(
        expiries > 0 && while_down == 4 && corrections > 0 && first_commissions > 0,
        "every fault happened: {expiries} expiries/assignments, {while_down} fills while down, {corrections} corrections, {first_commissions} commissions first"
    );
    wait_tables(&env.sim, &base, "the day in the tables").await?;

    // Every execution once, with its commission.
    let fills = possync::ops::fills::load(&possync::ops::fills::FillsConfig {
        table_uri: base.clone(),
        ..Default::default()
    })
    .await?;
    let on_table: BTreeMap<String, Option<f64>> =
        fills.rows.iter().map(|r| (r.exec_id.clone(), r.commission)).collect();
    ensure!(on_table.len() == fills.rows.len(), "an execution twice in the table");
    for e in &truth.executions {
        ensure!(
            on_table.get(&e.exec_id) == Some(&Some(e.commission.commission)),
            "{}: commission {} in the simulator, {:?} in the table",
            e.exec_id,
            e.commission.commission,
            on_table.get(&e.exec_id)
        );
    }
    ensure!(
        on_table.len() == truth.executions.len(),
        "an execution the simulator never made"
    );

    let r = service.run_once(now_micros()).await?;
    ensure!(
        r.count(Status::Drifted) == 0 && r.count(Status::Pending) == 0,
        "nothing unexplained: {:?}, e.g. {:?}",
        r.counts,
        r.lines
            .iter()
            .filter(|l| matches!(l.status, Status::Drifted | Status::Pending))
            .take(5)
            .collect::<Vec<_>>()
    );
    ensure!(
        r.count(Status::Explained) > 0 && r.count(Status::Agrees) > 0,
        "expiries or assignments explained, fills agreeing: {:?}",
        r.counts
    );
    eprintln!(
        "[faults day] {} executions ({corrections} corrections, {first_commissions} commissions first), {expiries} expiries/assignments, {while_down} fills while down: {:?}",
        truth.executions.len(),
        r.counts
    );
    desk.stop().await
}
