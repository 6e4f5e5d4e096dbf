//! Telemetry in one place: process-wide counters and gauges, a Prometheus text endpoint, and
//! the one-line progress summary that `possync run` prints. The HTTP endpoint (`/metrics`,
//! `/healthz`, `/readyz`) is [`http`].
//!
//! Every notable event is one method call here (it bumps the counter; the caller logs with
//! fixed fields), so the progress line, `/metrics` and the tests all read the same numbers.

mod http;

pub use http::{serve, serve_with, KafkaProbe, MetricsArgs, MetricsError, Readiness};

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::{Mutex, OnceLock};

/// All counters and gauges of one process.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Position events acknowledged by Kafka on the active route.
    pub published_active: AtomicU64,
    /// Position events acknowledged by Kafka on the queued route.
    pub published_queued: AtomicU64,
    /// Position events Kafka did not acknowledge for good (`message.timeout.ms`); their
    /// positions are republished once Kafka is back.
    pub delivery_failures: AtomicU64,
    /// Executions acknowledged by Kafka (topic `executions`).
    pub published_executions: AtomicU64,
    /// Executions published without their commission (it did not come within
    /// `--commission-wait`).
    pub executions_without_commission: AtomicU64,
    /// Commission reports that came after their execution was published without one (sent to
    /// the dead-letter topic).
    pub late_commissions: AtomicU64,
    /// Times ingest asked IB for the day's executions (every connect, and after a lost one).
    pub execution_requests: AtomicU64,
    /// Reconciliations of positions against fills (`possync reconcile --watch`).
    pub reconcile_runs: AtomicU64,
    /// Keys whose position has differed from start + fills, unexplained, for `--drift-after`.
    pub reconciliation_drifted: AtomicI64,
    /// Keys unexplained for less than `--drift-after` (positions lag fills).
    pub reconciliation_pending: AtomicI64,
    /// Positions that should be active but got no slot (budget exhausted).
    pub slot_overflow: AtomicU64,
    /// PnL streams IB refused (error 101); retried with backoff.
    pub pnl_refused: AtomicU64,
    /// Real-time streams (slots) held now.
    pub slots_in_use: AtomicI64,
    /// Slot budget.
    pub slot_budget: AtomicI64,
    /// Reconnects to IB.
    pub ib_reconnects: AtomicU64,
    /// RECONCILE events emitted after reconnects.
    pub reconcile_closes: AtomicU64,
    /// Reconciliations of ingest's book with IB's full position list (after each PositionEnd).
    pub reconciliations: AtomicU64,
    /// Pending items in the position queue (queue worker's view).
    pub queue_depth: AtomicI64,
    /// Items refreshed by the queue worker.
    pub queue_refreshed: AtomicU64,
    /// Events written to `position_events` from the active topic.
    pub materialized_active: AtomicU64,
    /// Events written to `position_events` from the queued topic.
    pub materialized_queued: AtomicU64,
    /// Messages sent to dead letters.
    pub dead_letters: AtomicU64,
    /// Dead letters the dead-letter topic never took (they are in the `dead_letters` table).
    pub dead_letter_topic_failures: AtomicU64,
    /// Delta commits made by materialize.
    pub delta_commits: AtomicU64,
    /// Delta commits that met a concurrent writer's commit (resolved by reload and retry).
    pub commit_conflicts: AtomicU64,
    /// Appends that landed after concurrent commits of other writers, through delta-rs'
    /// conflict checker (no reload, no re-plan).
    pub commit_rebases: AtomicU64,
    /// Checkpoints (or log cleanups) that failed after a good commit; each is retried.
    pub checkpoint_failures: AtomicU64,
    /// Closed rows deleted from the upsert tables past `--closed-retention`.
    pub closed_expired: AtomicU64,
    /// Retention deletes put off because a position partition was not materialized past the
    /// cutoff yet (an older event could still arrive).
    pub closed_expiry_deferred: AtomicU64,
    /// 1 while an IB connection is up (ingest, queue worker), else 0.
    pub ib_connected: AtomicI64,
    /// IB connections given up because the gateway went silent: a heartbeat, a position list
    /// or a poll answer did not arrive within its bound although the socket stayed open.
    pub ib_silent: AtomicU64,
    /// Times this process's transactional producer was fenced: another process with the same
    /// transactional id (a successor) started, so this one stopped publishing.
    pub producer_fenced: AtomicU64,
    /// Times this process's transactional producer failed for good with a fatal error that is
    /// not a fence (no successor): its owner starts again with a new producer.
    pub producer_failed: AtomicU64,
    /// Events a fenced producer tried to publish (its aborted transaction and later sends):
    /// refused by the broker, they count nowhere.
    pub producer_refused: AtomicU64,
    /// Kafka transactions committed / aborted (an aborted one's positions are republished).
    pub txn_committed: AtomicU64,
    /// See [`Metrics::txn_committed`].
    pub txn_aborted: AtomicU64,
    /// 1 while this ingest holds the ingest lease (it alone connects to IB and publishes);
    /// 0 while it stands by.
    pub ingest_lease_held: AtomicI64,
    /// Times this ingest lost the lease while holding it (it then stopped publishing).
    pub ingest_lease_lost: AtomicU64,
    /// 1 when the last Kafka probe of the health endpoint got an answer, else 0.
    pub kafka_reachable: AtomicI64,
    /// Wall-clock time (ms since the epoch) of the last Delta commit; 0 = none yet.
    pub last_commit_ms: AtomicI64,
    /// Messages materialize holds that are not committed yet.
    pub buffered: AtomicI64,
    /// 1 while this materializer holds its group's maintenance turn (partition 0 of the
    /// active topic), else 0.
    pub maintenance_turn: AtomicI64,
    /// Scheduled maintenance passes this materializer ran (with the turn).
    pub maintenance_passes: AtomicU64,
    /// Latest version of `position_events`.
    pub table_version_events: AtomicI64,
    /// Latest version of `positions_current`.
    pub table_version_current: AtomicI64,
    /// Latest version of `position_queue`.
    pub table_version_queue: AtomicI64,
    /// The ingest IB client of this process: -1 = none runs here, 0 = down, 1 = connected
    /// (see [`IbClient`]).
    pub ib_client_ingest: AtomicI64,
    /// The queue worker's IB client, as [`Metrics::ib_client_ingest`].
    pub ib_client_queue_worker: AtomicI64,
    /// Active positions without a streaming slot now (routed queued until one frees).
    pub slot_waiting: AtomicI64,
    /// Time from a queue item's enqueue (its enqueue event's ingest time) to its POLL.
    pub queue_refresh_lag: LagHistogram,
    /// Per-partition figures of the materializer, replaced whole at each update.
    pub partitions: Mutex<Vec<PartitionLag>>,
}

/// An IB client a process may run; each has its own `possync_ib_client_connected` series.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IbClient {
    /// Ingest's client (positions and PnL streams).
    Ingest,
    /// The queue worker's client (position polls).
    QueueWorker,
}

impl IbClient {
    /// The `client` label.
    pub fn label(self) -> &'static str {
        match self {
            IbClient::Ingest => "ingest",
            IbClient::QueueWorker => "queue-worker",
        }
    }
}

/// While alive, `client` runs in this process: its `possync_ib_client_connected` series is
/// served (0 until connected); dropped, the series leaves `/metrics`.
#[must_use = "the client counts as running while this lives"]
#[derive(Debug)]
pub struct IbClientRunning<'a> {
    metrics: &'a Metrics,
    client: IbClient,
}

impl Drop for IbClientRunning<'_> {
    fn drop(&mut self) {
        self.metrics.ib_client(self.client).store(-1, Relaxed);
    }
}

/// Upper bounds (seconds) of [`LagHistogram`]'s buckets; 10 s is the queue refresh alert's.
pub const LAG_BUCKETS: [f64; 12] = [0.5, 1.0, 2.5, 5.0, 7.5, 10.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0];

/// A Prometheus histogram of durations over [`LAG_BUCKETS`].
#[derive(Debug, Default)]
pub struct LagHistogram {
    /// Observations per bucket (not cumulative); the last one is `+Inf`.
    counts: [AtomicU64; LAG_BUCKETS.len() + 1],
    /// Sum of the observations in µs.
    sum_micros: AtomicU64,
}

impl LagHistogram {
    /// Records one duration (negative ones, from clock skew, count as 0).
    pub fn observe_micros(&self, micros: i64) {
        let micros = micros.max(0) as u64;
        let secs = micros as f64 / 1e6;
        let i = LAG_BUCKETS.iter().position(|b| secs <= *b).unwrap_or(LAG_BUCKETS.len());
        self.counts[i].fetch_add(1, Relaxed);
        self.sum_micros.fetch_add(micros, Relaxed);
    }

    /// Appends the `_bucket` (cumulative), `_sum` and `_count` lines of `name`.
    fn render(&self, s: &mut String, name: &str, help: &str) {
        let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut total = 0;
        for (i, c) in self.counts.iter().enumerate() {
            total += c.load(Relaxed);
            let le = LAG_BUCKETS.get(i).map_or("+Inf".to_string(), f64::to_string);
            let _ = writeln!(s, "{name}_bucket{{le=\"{le}\"}} {total}");
        }
        let sum = self.sum_micros.load(Relaxed) as f64 / 1e6;
        let _ = writeln!(s, "{name}_sum {sum}\n{name}_count {total}");
    }
}

/// One input partition a materializer owns, as `/metrics` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionLag {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// Events in Kafka not in the tables yet: not fetched (the high watermark Kafka last
    /// reported minus the consumer's position) plus taken and not committed.
    pub lag_events: i64,
    /// Broker timestamp (ms since the epoch) of the oldest message taken and not committed
    /// yet; `None` when none waits.
    pub oldest_waiting_ms: Option<i64>,
    /// Wall-clock time (ms since the epoch) of the last Delta commit that held this
    /// partition's messages, or of its assignment before the first.
    pub last_commit_ms: i64,
}

/// The process-wide metrics.
pub fn global() -> &'static Metrics {
    static M: OnceLock<Metrics> = OnceLock::new();
    M.get_or_init(Metrics::new)
}

impl Metrics {
    /// Metrics of a process that has done nothing yet: table versions unknown (-1); Kafka not
    /// probed, no ingest lease taken part in and no IB client running (their series are left
    /// out of `/metrics` until a process sets them).
    pub fn new() -> Self {
        let m = Metrics::default();
        for v in [
            &m.table_version_events,
            &m.table_version_current,
            &m.table_version_queue,
            &m.kafka_reachable,
            &m.ingest_lease_held,
            &m.ib_client_ingest,
            &m.ib_client_queue_worker,
        ] {
            v.store(-1, Relaxed);
        }
        m
    }

    fn ib_client(&self, client: IbClient) -> &AtomicI64 {
        match client {
            IbClient::Ingest => &self.ib_client_ingest,
            IbClient::QueueWorker => &self.ib_client_queue_worker,
        }
    }

    /// `client` runs in this process from now on, not connected yet, until the guard drops.
    pub fn ib_client_running(&self, client: IbClient) -> IbClientRunning<'_> {
        self.ib_client(client).store(0, Relaxed);
        IbClientRunning { metrics: self, client }
    }

    /// `client`'s IB connection went up or down; also sets the process-wide `ib_connected`.
    pub fn ib_state(&self, client: IbClient, up: bool) {
        self.ib_connected.store(i64::from(up), Relaxed);
        let c = self.ib_client(client);
        // A client that stopped (its guard dropped) stays out of `/metrics`.
        let _ = c.fetch_update(Relaxed, Relaxed, |v| (v >= 0).then_some(i64::from(up)));
    }

    /// Replaces the materializer's per-partition figures.
    pub fn set_partitions(&self, rows: Vec<PartitionLag>) {
        *self
            .partitions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = rows;
    }

    /// Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let c = |s: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(
                s,
                "# HELP possync_{name} {help}\n# TYPE possync_{name} counter\npossync_{name} {v}"
            );
        };
        let g = |s: &mut String, name: &str, help: &str, v: i64| {
            let _ = writeln!(
                s,
                "# HELP possync_{name} {help}\n# TYPE possync_{name} gauge\npossync_{name} {v}"
            );
        };
        let _ = writeln!(s, "# HELP possync_published_total Position events acknowledged by Kafka, per route\n# TYPE possync_published_total counter");
        let _ = writeln!(
            s,
            "possync_published_total{{route=\"active\"}} {}",
            self.published_active.load(Relaxed)
        );
        let _ = writeln!(
            s,
            "possync_published_total{{route=\"queued\"}} {}",
            self.published_queued.load(Relaxed)
        );
        let _ = writeln!(s, "# HELP possync_materialized_total Events written to position_events, per route\n# TYPE possync_materialized_total counter");
        let _ = writeln!(
            s,
            "possync_materialized_total{{route=\"active\"}} {}",
            self.materialized_active.load(Relaxed)
        );
        let _ = writeln!(
            s,
            "possync_materialized_total{{route=\"queued\"}} {}",
            self.materialized_queued.load(Relaxed)
        );
        c(
            &mut s,
            "delivery_failures_total",
            "Position events Kafka did not acknowledge for good (republished later)",
            self.delivery_failures.load(Relaxed),
        );
        c(
            &mut s,
            "executions_published_total",
            "Executions acknowledged by Kafka (topic executions)",
            self.published_executions.load(Relaxed),
        );
        c(
            &mut s,
            "executions_without_commission_total",
            "Executions published without their commission report (it did not come within --commission-wait)",
            self.executions_without_commission.load(Relaxed),
        );
        c(
            &mut s,
            "late_commissions_total",
            "Commission reports that came after their execution was published without one (dead-lettered)",
            self.late_commissions.load(Relaxed),
        );
        c(
            &mut s,
            "execution_requests_total",
            "Requests of the day's executions (every IB connect, and after a lost delivery)",
            self.execution_requests.load(Relaxed),
        );
        c(
            &mut s,
            "reconcile_runs_total",
            "Reconciliations of positions against fills (possync reconcile --watch)",
            self.reconcile_runs.load(Relaxed),
        );
        g(
            &mut s,
            "maintenance_turn",
            "1 while this materializer runs its group's scheduled maintenance (it holds partition 0 of the active topic)",
            self.maintenance_turn.load(Relaxed),
        );
        c(
            &mut s,
            "maintenance_passes_total",
            "Scheduled maintenance passes (checkpoint, compaction, vacuum of every table) this materializer ran while it held the turn",
            self.maintenance_passes.load(Relaxed),
        );
        g(
            &mut s,
            "reconciliation_drifted",
            "Positions that differ from the day's start plus its fills, unexplained for --drift-after or longer",
            self.reconciliation_drifted.load(Relaxed),
        );
        g(
            &mut s,
            "reconciliation_pending",
            "Positions that differ from the day's start plus its fills, unexplained for less than --drift-after",
            self.reconciliation_pending.load(Relaxed),
        );
        c(
            &mut s,
            "slot_overflow_total",
            "Active positions routed queued for lack of a slot",
            self.slot_overflow.load(Relaxed),
        );
        c(
            &mut s,
            "pnl_refused_total",
            "PnL streams IB refused (retried with backoff)",
            self.pnl_refused.load(Relaxed),
        );
        g(
            &mut s,
            "slots_in_use",
            "Real-time streams held",
            self.slots_in_use.load(Relaxed),
        );
        g(
            &mut s,
            "slot_budget",
            "Real-time stream budget",
            self.slot_budget.load(Relaxed),
        );
        c(
            &mut s,
            "ib_reconnects_total",
            "Reconnects to IB",
            self.ib_reconnects.load(Relaxed),
        );
        c(
            &mut s,
            "reconcile_closes_total",
            "RECONCILE events after reconnects",
            self.reconcile_closes.load(Relaxed),
        );
        c(
            &mut s,
            "reconciliations_total",
            "Reconciliations of ingest's book with IB's full position list",
            self.reconciliations.load(Relaxed),
        );
        g(
            &mut s,
            "queue_depth",
            "Pending items in the position queue",
            self.queue_depth.load(Relaxed),
        );
        c(
            &mut s,
            "queue_refreshed_total",
            "Queue items refreshed by polls",
            self.queue_refreshed.load(Relaxed),
        );
        c(
            &mut s,
            "dead_letters_total",
            "Messages sent to dead letters",
            self.dead_letters.load(Relaxed),
        );
        c(
            &mut s,
            "dead_letter_topic_failures_total",
            "Dead letters not copied to the dead-letter topic after bounded retries (they are in the dead_letters table)",
            self.dead_letter_topic_failures.load(Relaxed),
        );
        c(
            &mut s,
            "delta_commits_total",
            "Delta commits",
            self.delta_commits.load(Relaxed),
        );
        c(
            &mut s,
            "commit_conflicts_total",
            "Delta commits that met another writer's commit (reloaded and retried)",
            self.commit_conflicts.load(Relaxed),
        );
        c(
            &mut s,
            "commit_rebases_total",
            "Appends that landed after other writers' commits through delta-rs' conflict checker (no reload)",
            self.commit_rebases.load(Relaxed),
        );
        c(
            &mut s,
            "closed_rows_expired_total",
            "Closed rows deleted from positions_current / position_queue past --closed-retention",
            self.closed_expired.load(Relaxed),
        );
        c(
            &mut s,
            "closed_expiry_deferred_total",
            "Retention deletes of closed rows put off until every position partition is materialized past the cutoff",
            self.closed_expiry_deferred.load(Relaxed),
        );
        c(
            &mut s,
            "checkpoint_failures_total",
            "Delta checkpoints that failed after a good commit (retried after the next commit)",
            self.checkpoint_failures.load(Relaxed),
        );
        g(
            &mut s,
            "ib_connected",
            "1 while the IB connection is up",
            self.ib_connected.load(Relaxed),
        );
        c(
            &mut s,
            "ib_silent_total",
            "IB connections given up because the gateway stopped answering (heartbeat, position list or poll answer overdue) while the socket stayed open",
            self.ib_silent.load(Relaxed),
        );
        c(
            &mut s,
            "producer_fenced_total",
            "Times this process's transactional producer was fenced by a successor with the same transactional id (it stopped publishing)",
            self.producer_fenced.load(Relaxed),
        );
        c(
            &mut s,
            "producer_failed_total",
            "Times this process's transactional producer failed for good with a fatal error that is not a fence (no successor); a new producer took over",
            self.producer_failed.load(Relaxed),
        );
        c(
            &mut s,
            "producer_refused_total",
            "Events a fenced producer tried to publish (aborted or refused by the broker; they count nowhere)",
            self.producer_refused.load(Relaxed),
        );
        c(
            &mut s,
            "txn_committed_total",
            "Kafka transactions of position events committed",
            self.txn_committed.load(Relaxed),
        );
        c(
            &mut s,
            "txn_aborted_total",
            "Kafka transactions of position events aborted (their positions are republished)",
            self.txn_aborted.load(Relaxed),
        );
        // Only an ingest that takes part in the lease has this series (not --no-lease, not the
        // other processes), so "held by nobody" is the sum over the ingests being 0.
        let lease = self.ingest_lease_held.load(Relaxed);
        if lease >= 0 {
            g(
                &mut s,
                "ingest_lease_held",
                "1 while this ingest holds the ingest lease (publishes), 0 while it stands by",
                lease,
            );
        }
        c(
            &mut s,
            "ingest_lease_lost_total",
            "Times this ingest lost the ingest lease while holding it (it stopped publishing)",
            self.ingest_lease_lost.load(Relaxed),
        );
        // Only a process that probes Kafka (the standalone ones) knows; unprobed is no series.
        let kafka = self.kafka_reachable.load(Relaxed);
        if kafka >= 0 {
            g(
                &mut s,
                "kafka_reachable",
                "1 when the last Kafka probe (every 5 s) was answered",
                kafka,
            );
        }
        g(
            &mut s,
            "last_commit_age_seconds",
            "Seconds since the last Delta commit (-1: none yet)",
            self.last_commit_age().map_or(-1, |d| d.as_secs() as i64),
        );
        g(
            &mut s,
            "buffered_messages",
            "Messages waiting for the next Delta commit",
            self.buffered.load(Relaxed),
        );
        let _ = writeln!(
            s,
            "# HELP possync_table_version Latest Delta version per table\n# TYPE possync_table_version gauge"
        );
        for (t, v) in [
            ("position_events", &self.table_version_events),
            ("positions_current", &self.table_version_current),
            ("position_queue", &self.table_version_queue),
        ] {
            let _ = writeln!(s, "possync_table_version{{table=\"{t}\"}} {}", v.load(Relaxed));
        }
        let clients: Vec<(IbClient, i64)> = [IbClient::Ingest, IbClient::QueueWorker]
            .into_iter()
            .map(|c| (c, self.ib_client(c).load(Relaxed)))
            .filter(|(_, v)| *v >= 0)
            .collect();
        if !clients.is_empty() {
            let _ = writeln!(s, "# HELP possync_ib_client_connected 1 while this IB client (ingest, queue-worker) is connected, 0 while it is not (a standby ingest: 0); no series for clients the process does not run\n# TYPE possync_ib_client_connected gauge");
            for (c, v) in clients {
                let _ = writeln!(s, "possync_ib_client_connected{{client=\"{}\"}} {v}", c.label());
            }
        }
        g(
            &mut s,
            "slot_waiting_positions",
            "Active positions without a streaming slot now (routed queued until a slot frees)",
            self.slot_waiting.load(Relaxed),
        );
        self.queue_refresh_lag.render(
            &mut s,
            "possync_queue_refresh_lag_seconds",
            "Time from a queue item's enqueue to its refresh (the POLL event published)",
        );
        self.render_partitions(&mut s, chrono::Utc::now().timestamp_millis());
        s
    }

    /// The materializer's per-partition series, ages as of `now_ms`.
    fn render_partitions(&self, s: &mut String, now_ms: i64) {
        let rows = self
            .partitions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if rows.is_empty() {
            return;
        }
        type Figure = fn(&PartitionLag, i64) -> f64;
        let families: [(&str, &str, Figure); 3] = [
            (
                "materialize_lag_events",
                "Events of this partition in Kafka and not in the Delta tables yet (fetched or not)",
                |r, _| r.lag_events.max(0) as f64,
            ),
            (
                "materialize_lag_seconds",
                "Age (broker timestamp) of this partition's oldest message taken and not committed to Delta; 0 when none waits",
                |r, now| r.oldest_waiting_ms.map_or(0, |t| now - t).max(0) as f64 / 1000.0,
            ),
            (
                "materialize_commit_age_seconds",
                "Seconds since the last Delta commit that held this partition's messages (or since its assignment)",
                |r, now| (now - r.last_commit_ms).max(0) as f64 / 1000.0,
            ),
        ];
        for (name, help, figure) in families {
            let _ = writeln!(s, "# HELP possync_{name} {help}\n# TYPE possync_{name} gauge");
            for r in rows.iter() {
                let topic = r.topic.replace('\\', "\\\\").replace('"', "\\\"");
                let _ = writeln!(
                    s,
                    "possync_{name}{{topic=\"{topic}\",partition=\"{}\"}} {}",
                    r.partition,
                    figure(r, now_ms)
                );
            }
        }
    }

    /// Records a Delta commit made now.
    pub fn committed_now(&self) {
        self.last_commit_ms
            .store(chrono::Utc::now().timestamp_millis(), Relaxed);
    }

    /// Time since the last Delta commit, `None` before the first.
    pub fn last_commit_age(&self) -> Option<std::time::Duration> {
        let at = self.last_commit_ms.load(Relaxed);
        (at > 0).then(|| {
            let ms = (chrono::Utc::now().timestamp_millis() - at).max(0);
            std::time::Duration::from_millis(ms as u64)
        })
    }

    /// Why the process is not ready, per `r`; empty when it is.
    pub fn not_ready(&self, r: &Readiness) -> Vec<String> {
        let mut why = Vec::new();
        if let Some(group) = &r.lease {
            if self.ingest_lease_held.load(Relaxed) != 1 {
                // A standby is not connected to IB on purpose: say why, not that IB is down.
                why.push(format!("standby: another ingest holds the lease (group {group})"));
                return why;
            }
        }
        if r.ib && self.ib_connected.load(Relaxed) != 1 {
            why.push("IB is not connected".to_string());
        }
        if r.kafka_probe.is_some() && self.kafka_reachable.load(Relaxed) != 1 {
            why.push("Kafka does not answer".to_string());
        }
        if let Some(max) = r.max_commit_age {
            // Only data waiting makes an old commit a problem: a quiet market commits nothing.
            let waiting = self.buffered.load(Relaxed) > 0;
            if waiting && self.last_commit_age().is_none_or(|age| age > max) {
                why.push(format!("messages wait and the last Delta commit is older than {max:?}"));
            }
        }
        why
    }

    /// One human line: what `possync run` prints every few seconds.
    pub fn progress_line(&self) -> String {
        format!(
            "published active={} queued={} | materialized active={} queued={} | slots {}/{} (overflow {}) | queue depth {} refreshed {} | versions events={} current={} queue={} | dead letters {}",
            self.published_active.load(Relaxed),
            self.published_queued.load(Relaxed),
            self.materialized_active.load(Relaxed),
            self.materialized_queued.load(Relaxed),
            self.slots_in_use.load(Relaxed),
            self.slot_budget.load(Relaxed),
            self.slot_overflow.load(Relaxed),
            self.queue_depth.load(Relaxed),
            self.queue_refreshed.load(Relaxed),
            self.table_version_events.load(Relaxed),
            self.table_version_current.load(Relaxed),
            self.table_version_queue.load(Relaxed),
            self.dead_letters.load(Relaxed),
        )
    }
}

#[cfg(test)]
mod tests;
