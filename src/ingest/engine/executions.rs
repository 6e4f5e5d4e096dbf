//! What the engine does with IB's execution and commission reports: joins them
//! ([`Fills`](super::super::fills::Fills)), publishes each execution once, and asks for the day's
//! executions again when Kafka did not take some.

use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use ibapi::orders::{CommissionReport, ExecutionData};

use super::Engine;
use crate::events::now_micros;
use crate::executions::ib;
use crate::executions::join::Outcome;
use crate::executions::{ExecSource, ExecutionEvent};
use crate::ingest::fills::REMEMBER;
use crate::ingest::IngestError;
use crate::metrics;

impl Engine {
    /// An execution report, live or from `reqExecutions`.
    pub(crate) async fn on_execution(&mut self, data: &ExecutionData, source: ExecSource) -> Result<(), IngestError> {
        let (event, in_utc) = ib::execution_event(data, source);
        if !in_utc && !self.fills.warned_zone {
            self.fills.warned_zone = true;
            tracing::warn!(time = %data.execution.time, exec_id = %event.exec_id, "IB sent an execution time not in UTC; exec_time holds the time of arrival instead (set TWS/IB Gateway to UTC to keep IB's)");
        }
        let outcome = self.fills.join.execution(event, Instant::now());
        self.on_outcome(outcome).await
    }

    /// A commission report.
    pub(crate) async fn on_commission(&mut self, report: &CommissionReport) -> Result<(), IngestError> {
        let outcome = self.fills.join.commission(ib::commission(report), Instant::now());
        self.on_outcome(outcome).await
    }

    async fn on_outcome(&mut self, outcome: Outcome) -> Result<(), IngestError> {
        match outcome {
            Outcome::Publish(e) => self.publish_execution(*e).await,
            Outcome::Waiting | Outcome::Duplicate => Ok(()),
            Outcome::LateCommission(c) => {
                metrics::global().late_commissions.fetch_add(1, Relaxed);
                tracing::warn!(exec_id = %c.exec_id, commission = c.commission, currency = %c.currency, realized_pnl = ?c.realized_pnl, "a commission report came after its execution was published without one (raise --commission-wait); it is not in the executions table");
                Ok(())
            }
        }
    }

    async fn publish_execution(&mut self, e: ExecutionEvent) -> Result<(), IngestError> {
        tracing::debug!(exec_id = %e.exec_id, account = %e.account, con_id = e.con_id, commission = ?e.commission, "publishing an execution");
        self.publisher.publish_execution(e).await?;
        Ok(())
    }

    /// Publishes the executions whose commission did not come within the wait; now and then
    /// forgets ids older than [`REMEMBER`].
    pub(crate) async fn publish_due_executions(&mut self) -> Result<(), IngestError> {
        let now = Instant::now();
        for e in self.fills.join.due(now, self.fills.wait) {
            metrics::global().executions_without_commission.fetch_add(1, Relaxed);
            tracing::warn!(exec_id = %e.exec_id, wait = ?self.fills.wait, "no commission report within --commission-wait; publishing the execution without one");
            self.publish_execution(e).await?;
        }
        if now.duration_since(self.fills.last_forget) >= Duration::from_secs(3600) {
            self.fills.last_forget = now;
            let cutoff = now_micros() - REMEMBER.as_micros() as i64;
            self.fills.join.forget_before(cutoff);
        }
        Ok(())
    }

    /// Executions Kafka did not take: forgotten, and requested from IB again.
    pub(crate) fn on_failed_executions(&mut self, exec_ids: Vec<String>) {
        tracing::warn!(
            count = exec_ids.len(),
            "executions were not delivered; requesting the day's executions again"
        );
        for id in &exec_ids {
            self.fills.join.failed(id);
        }
        self.fills.request_wanted = true;
    }
}
