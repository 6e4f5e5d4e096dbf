//! The executions phase of `possync bench materialize`: a desk's day of fills (default 10k over
//! 20 accounts) produced at once to the executions topic, timed until the `executions` table
//! holds them all, with the materializer's CPU over that window: the cost of executions beside
//! the positions' figures of the same run.

use std::time::{Duration, Instant};

use rdkafka::producer::FutureProducer;

use crate::events::{new_id, now_micros};
use crate::executions::{ExecSource, ExecutionEvent, Side};
use crate::kafka::KafkaConfig;
use crate::materialize::offsets::app_id;
use crate::materialize::tables::{Table, TableKind};
use crate::materialize::MaterializeError;

/// Accounts the synthetic fills are spread over (a desk's).
const ACCOUNTS: u64 = 20;

/// What the executions phase measured.
#[derive(Debug, Clone, Default)]
pub struct ExecPhase {
    /// Executions produced (and materialized).
    pub executions: u64,
    /// Produce start → the table holds every one, seconds.
    pub wall_s: f64,
    /// Materializer CPU over that window, seconds.
    pub cpu_s: f64,
    /// Bytes of Kafka values.
    pub bytes: u64,
}

impl ExecPhase {
    /// Executions per second, produce to visible.
    pub fn per_s(&self) -> f64 {
        self.executions as f64 / self.wall_s.max(1e-9)
    }

    /// Executions per materializer CPU-second.
    pub fn per_cpu_s(&self) -> f64 {
        self.executions as f64 / self.cpu_s.max(1e-9)
    }
}

/// Fill `i` of contract key `k`: every fifth one a correction (`.02`) of the one before.
pub fn synthetic_execution(i: u64, k: u64, session: &str) -> ExecutionEvent {
    let now = now_micros();
    let account = format!("DU{:07}", k % ACCOUNTS);
    let con_id = 1_000_000 + (k / ACCOUNTS) as i64;
    let (stem_seq, revision) = if i % 5 == 4 { (i - 1, 2) } else { (i, 1) };
    let stem = format!("0000bench.{stem_seq:08x}.01");
    ExecutionEvent {
        event_id: new_id(),
        session_id: session.to_string(),
        sequence: i as i64 + 1,
        account,
        con_id,
        symbol: "SPY".into(),
        sec_type: "OPT".into(),
        expiry: Some("20261218".into()),
        strike: Some(500.0 + (k % 50) as f64),
        right: Some(if k.is_multiple_of(2) { "C" } else { "P" }.into()),
        multiplier: Some("100".into()),
        currency: "USD".into(),
        local_symbol: format!("SPY   261218C{:08}", 500_000 + k % 50),
        exec_id: format!("{stem}.{revision:02}"),
        exec_stem: stem,
        revision,
        order_id: (i / 2) as i64,
        perm_id: 90_000_000 + (i / 2) as i64,
        client_id: 0,
        side: if i.is_multiple_of(3) { Side::Sld } else { Side::Bot },
        shares: 1.0 + (i % 10) as f64,
        price: 1.0 + (i % 100) as f64 / 100.0,
        cum_qty: 1.0 + (i % 10) as f64,
        avg_price: 1.0 + (i % 100) as f64 / 100.0,
        exec_exchange: "CBOE".into(),
        exec_time: now,
        commission: (!i.is_multiple_of(7)).then_some(0.65),
        commission_currency: (!i.is_multiple_of(7)).then(|| "USD".into()),
        realized_pnl: i.is_multiple_of(4).then_some(12.5),
        source: ExecSource::Live,
        ib_time: now,
        ingest_time: now,
    }
}

/// Produces `n` executions over `keys` contracts at once and waits until the table at
/// `table_uri` holds them all (the materializers `pids` are running).
///
/// # Errors
/// A produce error, a table error, or [`MaterializeError::Timeout`] after 10 minutes.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    kafka: &KafkaConfig,
    producer: &FutureProducer,
    partitions: i32,
    table_uri: &str,
    namespace: &str,
    pids: &[u32],
    n: u64,
    keys: u64,
) -> Result<ExecPhase, MaterializeError> {
    let topic = &kafka.topics.executions;
    let session = new_id();
    let cpu0 = super::group_cpu_seconds(pids);
    let started = Instant::now();
    let mut bytes = 0u64;
    let mut pending = Vec::new();
    for i in 0..n {
        let e = synthetic_execution(i, i % keys.max(1), &session);
        let v = e.encode().map_err(|e| MaterializeError::Task(e.to_string()))?;
        bytes += v.len() as u64;
        pending.push(super::send(producer, topic, e.key(), v));
        if pending.len() >= 20_000 {
            for r in futures::future::join_all(pending.drain(..)).await {
                r?;
            }
        }
    }
    for r in futures::future::join_all(pending).await {
        r?;
    }
    let mut table = Table::open(table_uri, TableKind::Executions).await?;
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        table.refresh().await?;
        let mut committed = 0u64;
        for p in 0..partitions {
            committed += table
                .txn_version(&app_id(namespace, topic, p))
                .await?
                .map_or(0, |v| v as u64 + 1);
        }
        if committed >= n {
            break;
        }
        if Instant::now() > deadline {
            return Err(MaterializeError::Timeout(format!(
                "materialized {committed} of {n} executions"
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(ExecPhase {
        executions: n,
        wall_s: started.elapsed().as_secs_f64(),
        cpu_s: super::group_cpu_seconds(pids) - cpu0,
        bytes,
    })
}
