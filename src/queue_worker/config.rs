//! Flags and settings of `possync queue-worker`.

use std::time::Duration;

use tokio::sync::mpsc;

use super::BatchReport;
use crate::kafka::KafkaArgs;
use crate::metrics;

/// Flags of `possync queue-worker`.
#[derive(clap::Args, Debug, Clone)]
pub struct QueueWorkerArgs {
    /// IB Gateway / TWS host.
    #[arg(long, env = "POSSYNC_IB_HOST", default_value = "127.0.0.1")]
    pub ib_host: String,
    /// IB Gateway / TWS API port.
    #[arg(long, env = "POSSYNC_IB_PORT", default_value_t = 4002)]
    pub ib_port: u16,
    /// API client id of the worker; must differ from ingest's and every other client's.
    #[arg(long, env = "POSSYNC_QUEUE_CLIENT_ID", default_value_t = 2)]
    pub client_id: i32,
    /// How often a batch of pending items is refreshed.
    #[arg(long, env = "POSSYNC_QUEUE_TICK", value_parser = humantime::parse_duration, default_value = "5s")]
    pub tick: Duration,
    /// Most accounts polled per tick, those with the oldest pending items. Each poll (one
    /// positions-multi request, 2 IB messages) refreshes every pending item of its account.
    #[arg(long, env = "POSSYNC_QUEUE_BATCH", default_value_t = 50)]
    pub batch: usize,
    /// Messages per second the worker may send to IB (IB allows 50 per client).
    #[arg(long, env = "POSSYNC_QUEUE_IB_PACING", default_value_t = 40)]
    pub ib_pacing: u32,
    /// How long one account's poll may take before it is abandoned (its items stay pending);
    /// an overdue answer also means a silent gateway: the connection is made again.
    #[arg(long, env = "POSSYNC_QUEUE_POLL_TIMEOUT", value_parser = humantime::parse_duration, default_value = "10s")]
    pub poll_timeout: Duration,
    /// While no poll is due, ask IB for its time this often to prove the connection alive.
    #[arg(long, env = "POSSYNC_IB_HEARTBEAT", value_parser = humantime::parse_duration, default_value = "5s")]
    pub ib_heartbeat: Duration,
    /// A heartbeat unanswered this long means the gateway went silent: reconnect.
    #[arg(long, env = "POSSYNC_IB_TIMEOUT", value_parser = humantime::parse_duration, default_value = "10s")]
    pub ib_timeout: Duration,
    /// An item whose POLL event has not come back from Kafka within this is polled again.
    #[arg(long, env = "POSSYNC_QUEUE_IN_FLIGHT_TIMEOUT", value_parser = humantime::parse_duration, default_value = "60s")]
    pub in_flight_timeout: Duration,
    /// How long to wait for Kafka while reading the queue topic (or its tail) at start.
    #[arg(long, env = "POSSYNC_KAFKA_TIMEOUT", value_parser = humantime::parse_duration, default_value = "30s")]
    pub kafka_timeout: Duration,
    /// Closed items (and active-route marks of keys without an item) are forgotten this long
    /// after their newest event, so memory follows the open book, not every contract ever held
    /// (a later event of such a key starts it again; `0s` = never).
    #[arg(long, env = "POSSYNC_FORGET_CLOSED_AFTER", value_parser = humantime::parse_duration, default_value = "1h")]
    pub forget_closed_after: Duration,
    /// How often the open Kafka transaction of POLL events is committed while it holds events.
    /// The transactional id is `<topic-prefix>queue-worker`: starting a worker fences every
    /// earlier one of these topics (a paused one that wakes up publishes nothing more).
    #[arg(long, env = "POSSYNC_TXN_INTERVAL", value_parser = humantime::parse_duration, default_value = "100ms")]
    pub txn_interval: Duration,
    /// Shift this process's clock (`2s`, `-2s`): a fault-test knob for a host whose clock is
    /// off. The order of events does not depend on it (POLL events are stamped on ingest's
    /// clock); only the `ib_time` of POLL events moves.
    #[arg(long, env = "POSSYNC_CLOCK_SKEW", value_parser = crate::events::parse_signed_micros, allow_hyphen_values = true, hide = true)]
    pub clock_skew: Option<i64>,
    #[command(flatten)]
    pub snapshot: crate::snapshot::SnapshotArgs,
    #[command(flatten)]
    pub kafka: KafkaArgs,
    #[command(flatten)]
    pub schema_registry: crate::schema_registry::SchemaRegistryArgs,
    #[command(flatten)]
    pub metrics: metrics::MetricsArgs,
}

/// Plain queue-worker settings; see [`QueueWorkerArgs`].
#[derive(Debug, Clone)]
pub struct QueueWorkerConfig {
    pub ib_host: String,
    pub ib_port: u16,
    pub client_id: i32,
    pub tick: Duration,
    pub batch: usize,
    pub ib_pacing: u32,
    pub poll_timeout: Duration,
    pub ib_heartbeat: Duration,
    pub ib_timeout: Duration,
    pub in_flight_timeout: Duration,
    pub kafka_timeout: Duration,
    /// Commit the open Kafka transaction this often while it holds events.
    pub txn_interval: Duration,
    /// Forget closed items this long after their newest event (`ZERO` = never).
    pub forget_closed_after: Duration,
    /// Shift of this process's clock, µs (fault tests; see [`QueueWorkerArgs::clock_skew`]).
    pub clock_skew_micros: i64,
    /// Start from this snapshot (`position_queue` + the topic's tail), not the whole topic.
    pub snapshot: Option<crate::snapshot::SnapshotConfig>,
    /// Receives a report of every batch taken (dropped when the receiver is full).
    pub batch_observer: Option<mpsc::Sender<BatchReport>>,
    /// A fault-test knob: each value sent makes the worker's producer meet a fatal error, the
    /// code of a fence (`Some(true)`) or another one (`Some(false)`); see
    /// [`Publisher::inject_fatal`].
    pub inject_fatal: Option<tokio::sync::watch::Receiver<Option<bool>>>,
}

impl Default for QueueWorkerConfig {
    fn default() -> Self {
        Self {
            ib_host: "127.0.0.1".into(),
            ib_port: 4002,
            client_id: 2,
            tick: Duration::from_secs(5),
            batch: 50,
            ib_pacing: 40,
            poll_timeout: Duration::from_secs(10),
            ib_heartbeat: Duration::from_secs(5),
            ib_timeout: Duration::from_secs(10),
            in_flight_timeout: Duration::from_secs(60),
            kafka_timeout: Duration::from_secs(30),
            txn_interval: Duration::from_millis(100),
            forget_closed_after: Duration::from_secs(3600),
            clock_skew_micros: 0,
            snapshot: None,
            batch_observer: None,
            inject_fatal: None,
        }
    }
}

impl From<&QueueWorkerArgs> for QueueWorkerConfig {
    fn from(a: &QueueWorkerArgs) -> Self {
        Self {
            ib_host: a.ib_host.clone(),
            ib_port: a.ib_port,
            client_id: a.client_id,
            tick: a.tick,
            batch: a.batch,
            ib_pacing: a.ib_pacing,
            poll_timeout: a.poll_timeout,
            ib_heartbeat: a.ib_heartbeat,
            ib_timeout: a.ib_timeout,
            in_flight_timeout: a.in_flight_timeout,
            kafka_timeout: a.kafka_timeout,
            txn_interval: a.txn_interval,
            forget_closed_after: a.forget_closed_after,
            clock_skew_micros: a.clock_skew.unwrap_or(0),
            snapshot: a.snapshot.config(),
            batch_observer: None,
            inject_fatal: None,
        }
    }
}
