//! Ingest configuration: the `possync ingest` flags ([`IngestArgs`]) and the plain
//! [`IngestConfig`] that tests and `possync run` build without clap.

use std::path::PathBuf;
use std::time::Duration;

use crate::kafka::{KafkaArgs, Topics};
use crate::metrics::MetricsArgs;

/// Flags of `possync ingest`.
#[derive(clap::Args, Debug, Clone)]
pub struct IngestArgs {
    /// IB Gateway / TWS host.
    #[arg(long, env = "POSSYNC_IB_HOST", default_value = "127.0.0.1")]
    pub ib_host: String,
    /// IB Gateway / TWS API port (4002 = Gateway paper trading, 4001 live, 7497/7496 TWS).
    #[arg(long, env = "POSSYNC_IB_PORT", default_value_t = 4002)]
    pub ib_port: u16,
    /// API client id of the ingest session; must differ from every other client of the
    /// gateway (the queue worker's included), or IB refuses it with error 326.
    #[arg(long, env = "POSSYNC_IB_CLIENT_ID", default_value_t = 1)]
    pub client_id: i32,
    /// Hard cap on real-time PnL streams (streaming slots) ingest holds at once.
    #[arg(long, env = "POSSYNC_SLOT_BUDGET", default_value_t = 10)]
    pub slot_budget: usize,
    /// Registry bootstrap file (JSON array or `strategy account|* conId [priority]` lines)
    /// whose entries are activated at start when missing; unset = none.
    #[arg(long, env = "POSSYNC_REGISTRY_BOOTSTRAP")]
    pub registry_bootstrap: Option<PathBuf>,
    /// First delay before reconnecting to IB after a lost connection; doubles per failed
    /// attempt up to --reconnect-max.
    #[arg(long, env = "POSSYNC_RECONNECT_INITIAL", value_parser = humantime::parse_duration, default_value = "500ms")]
    pub reconnect_initial: Duration,
    /// Longest delay between reconnection attempts (attempts never stop). Delays are jittered
    /// (between half and all of the current step) and keep growing across sessions that drop
    /// soon after connecting.
    #[arg(long, env = "POSSYNC_RECONNECT_MAX", value_parser = humantime::parse_duration, default_value = "30s")]
    pub reconnect_max: Duration,
    /// A session that stayed connected this long resets the reconnect delay to
    /// --reconnect-initial; shorter ones keep it growing.
    #[arg(long, env = "POSSYNC_RECONNECT_HEALTHY", value_parser = humantime::parse_duration, default_value = "60s")]
    pub reconnect_healthy: Duration,
    /// Events sent to Kafka but not yet acknowledged, at most. When reached, ingest stops
    /// reading IB until acknowledgements free room (backpressure, bounded memory).
    #[arg(long, env = "POSSYNC_MAX_IN_FLIGHT", default_value_t = 10_000)]
    pub max_in_flight: usize,
    /// Least IB frames buffered per subscription (at least 64). Ingest sizes the buffer of each
    /// connection from the position list it expects (the last list, or the state resumed at
    /// start: 1.25 × its size + 1024 when that is larger), so a desk's list of 100k positions
    /// needs no tuning. If it still overflows (a first start with no state, or a book that
    /// grew), ingest reconnects at once with a buffer sized from what it saw and reconciles.
    #[arg(long, env = "POSSYNC_IB_BUFFER", default_value_t = 16_384)]
    pub ib_buffer: usize,
    /// How often ingest asks IB for its time (`reqCurrentTime`) to prove the connection alive.
    #[arg(long, env = "POSSYNC_IB_HEARTBEAT", value_parser = humantime::parse_duration, default_value = "5s")]
    pub ib_heartbeat: Duration,
    /// An IB heartbeat unanswered this long means the gateway went silent (a hung TWS, a dead
    /// NAT entry, a half-open socket): the connection is dropped and made again. So a silent
    /// gateway is noticed within --ib-heartbeat + --ib-timeout.
    #[arg(long, env = "POSSYNC_IB_TIMEOUT", value_parser = humantime::parse_duration, default_value = "10s")]
    pub ib_timeout: Duration,
    /// The position list (up to PositionEnd) must arrive within this of the request, or the
    /// connection is dropped and made again.
    #[arg(long, env = "POSSYNC_IB_SYNC_TIMEOUT", value_parser = humantime::parse_duration, default_value = "120s")]
    pub ib_sync_timeout: Duration,
    /// How long an execution waits for its commission report before it is published without
    /// one (a later commission is then only logged and counted: possync_late_commissions_total).
    #[arg(long, env = "POSSYNC_COMMISSION_WAIT", value_parser = humantime::parse_duration, default_value = "10s")]
    pub commission_wait: Duration,
    /// With the lease: a holder that has not had a working IB connection (one whose position
    /// list arrived) for this long gives the lease up, so a standby that may reach IB takes
    /// over; it rejoins the group as a standby. 0 = never.
    #[arg(long, env = "POSSYNC_IB_UNREACHABLE_RELEASE", value_parser = humantime::parse_duration, default_value = "60s")]
    pub ib_unreachable_release: Duration,
    /// Messages per second ingest may send to IB (IB allows 50 per client; error 100 beyond).
    #[arg(long, env = "POSSYNC_IB_PACING", default_value_t = 40)]
    pub ib_pacing: u32,
    /// At shutdown, how long to wait for Kafka to acknowledge the events in flight. Whatever is
    /// still unacknowledged then (Kafka down) is republished by the next start's
    /// reconciliation, so a stop never hangs on an outage.
    #[arg(long, env = "POSSYNC_SHUTDOWN_GRACE", value_parser = humantime::parse_duration, default_value = "10s")]
    pub shutdown_grace: Duration,
    /// How long to wait for Kafka while reading the registry topic and the last published
    /// state at start.
    #[arg(long, env = "POSSYNC_KAFKA_TIMEOUT", value_parser = humantime::parse_duration, default_value = "30s")]
    pub kafka_timeout: Duration,
    /// At start, read the last published state back, so the first reconciliation closes
    /// positions that vanished while ingest was down and republishes nothing unchanged. With
    /// --table-uri it comes from `positions_current` plus the topics' tail; without, from one
    /// replay of both position topics. `false` publishes everything again.
    #[arg(long, env = "POSSYNC_RESUME", default_value_t = true, action = clap::ArgAction::Set)]
    pub resume: bool,
    #[command(flatten)]
    pub snapshot: crate::snapshot::SnapshotArgs,
    /// Consumer group of the ingest lease (default `<topic-prefix>ingest-lease`). Of all
    /// ingests in the group, only the one holding the lease connects to IB and publishes; the
    /// others stand by and take over when it stops or dies (after the group's session timeout,
    /// 6 s). Ingests that must not fence each other (other topics) use other groups.
    #[arg(long, env = "POSSYNC_LEASE_GROUP")]
    pub lease_group: Option<String>,
    /// After getting the lease, wait this long before connecting to IB, so a previous holder
    /// cut off from Kafka has noticed it lost the lease (librdkafka sees its session expire up
    /// to about a heartbeat and a second after the coordinator does).
    #[arg(long, env = "POSSYNC_LEASE_TAKEOVER_DELAY", value_parser = humantime::parse_duration, default_value = "2s")]
    pub lease_takeover_delay: Duration,
    /// Run without the lease: nothing stops a second ingest from publishing the same positions
    /// twice and using twice the streaming slots. Only for clusters whose ACLs give ingest no
    /// consumer group, with a single ingest guaranteed by other means.
    #[arg(long, env = "POSSYNC_NO_LEASE")]
    pub no_lease: bool,
    /// How often the open Kafka transaction of position events is committed while it holds
    /// events. Events are visible to consumers (read_committed) once committed: this bounds the
    /// added latency. The transactional id is `<topic-prefix>ingest`: starting an ingest fences
    /// every earlier one of these topics, so a paused ingest that wakes up publishes nothing.
    #[arg(long, env = "POSSYNC_TXN_INTERVAL", value_parser = humantime::parse_duration, default_value = "100ms")]
    pub txn_interval: Duration,
    #[command(flatten)]
    pub kafka: KafkaArgs,
    #[command(flatten)]
    pub schema_registry: crate::schema_registry::SchemaRegistryArgs,
    #[command(flatten)]
    pub metrics: MetricsArgs,
}

/// Plain ingest settings; see [`IngestArgs`] for what each one means.
#[derive(Debug, Clone, PartialEq)]
pub struct IngestConfig {
    /// IB host.
    pub ib_host: String,
    /// IB API port.
    pub ib_port: u16,
    /// IB API client id.
    pub client_id: i32,
    /// Streaming-slot budget.
    pub slot_budget: usize,
    /// Registry bootstrap file.
    pub registry_bootstrap: Option<PathBuf>,
    /// First reconnect delay.
    pub reconnect_initial: Duration,
    /// Longest reconnect delay.
    pub reconnect_max: Duration,
    /// Session length that resets the reconnect delay.
    pub reconnect_healthy: Duration,
    /// Unacknowledged events at most.
    pub max_in_flight: usize,
    /// Least IB frames buffered per subscription.
    pub ib_buffer: usize,
    /// Interval of the IB heartbeat.
    pub ib_heartbeat: Duration,
    /// An overdue IB answer (heartbeat) drops the connection.
    pub ib_timeout: Duration,
    /// Bound on the arrival of the whole position list.
    pub ib_sync_timeout: Duration,
    /// How long an execution waits for its commission report.
    pub commission_wait: Duration,
    /// Give the lease up after this long without a working IB connection (zero = never).
    pub ib_unreachable_release: Duration,
    /// Messages per second to IB.
    pub ib_pacing: u32,
    /// Wait for acknowledgements at shutdown, at most.
    pub shutdown_grace: Duration,
    /// Kafka timeout for the registry replay.
    pub kafka_timeout: Duration,
    /// Resume from the last published state.
    pub resume: bool,
    /// Resume from this snapshot (`positions_current` + the topics' tail) rather than from the
    /// whole topics.
    pub snapshot: Option<crate::snapshot::SnapshotConfig>,
    /// Hold the ingest lease before connecting to IB (see [`super::lease`]); `false` only for
    /// deployments that guarantee a single ingest otherwise.
    pub lease: bool,
    /// The lease group; `None` = `<topic-prefix>ingest-lease`.
    pub lease_group: Option<String>,
    /// Wait after getting the lease, before connecting to IB.
    pub lease_takeover_delay: Duration,
    /// Record the active route's IB-to-commit latency (for `possync bench ingest`).
    pub record_latency: bool,
    /// Commit the open Kafka transaction this often while it holds events.
    pub txn_interval: Duration,
}

impl Default for IngestConfig {
    fn default() -> Self {
        Self {
            ib_host: "127.0.0.1".into(),
            ib_port: 4002,
            client_id: 1,
            slot_budget: 10,
            registry_bootstrap: None,
            reconnect_initial: Duration::from_millis(500),
            reconnect_max: Duration::from_secs(30),
            reconnect_healthy: Duration::from_secs(60),
            max_in_flight: 10_000,
            ib_buffer: 16_384,
            ib_heartbeat: Duration::from_secs(5),
            ib_timeout: Duration::from_secs(10),
            ib_sync_timeout: Duration::from_secs(120),
            commission_wait: Duration::from_secs(10),
            ib_unreachable_release: Duration::from_secs(60),
            ib_pacing: 40,
            shutdown_grace: Duration::from_secs(10),
            kafka_timeout: Duration::from_secs(30),
            resume: true,
            snapshot: None,
            lease: true,
            lease_group: None,
            lease_takeover_delay: Duration::from_secs(2),
            record_latency: false,
            txn_interval: Duration::from_millis(100),
        }
    }
}

impl IngestConfig {
    /// `host:port` of the gateway.
    pub fn ib_address(&self) -> String {
        format!("{}:{}", self.ib_host, self.ib_port)
    }

    /// The transactional id of ingest's producer: `<topic-prefix>ingest`.
    pub fn transactional_id(topics: &Topics) -> String {
        format!("{}ingest", topics.prefix())
    }

    /// The lease group to join, `None` when the lease is off.
    pub fn lease_group(&self, topics: &Topics) -> Option<String> {
        self.lease.then(|| {
            self.lease_group
                .clone()
                .unwrap_or_else(|| format!("{}ingest-lease", topics.prefix()))
        })
    }
}

impl From<&IngestArgs> for IngestConfig {
    fn from(a: &IngestArgs) -> Self {
        Self {
            ib_host: a.ib_host.clone(),
            ib_port: a.ib_port,
            client_id: a.client_id,
            slot_budget: a.slot_budget,
            registry_bootstrap: a.registry_bootstrap.clone(),
            reconnect_initial: a.reconnect_initial,
            reconnect_max: a.reconnect_max,
            reconnect_healthy: a.reconnect_healthy,
            max_in_flight: a.max_in_flight,
            ib_buffer: a.ib_buffer,
            ib_heartbeat: a.ib_heartbeat,
            ib_timeout: a.ib_timeout,
            ib_sync_timeout: a.ib_sync_timeout,
            commission_wait: a.commission_wait,
            ib_unreachable_release: a.ib_unreachable_release,
            ib_pacing: a.ib_pacing,
            shutdown_grace: a.shutdown_grace,
            kafka_timeout: a.kafka_timeout,
            resume: a.resume,
            snapshot: a.snapshot.config(),
            lease: !a.no_lease,
            lease_group: a.lease_group.clone(),
            lease_takeover_delay: a.lease_takeover_delay,
            record_latency: false,
            txn_interval: a.txn_interval,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: IngestArgs,
    }

    #[test]
    fn flag_defaults_match_config_default() {
        let cli = Cli::try_parse_from(["ingest"]).unwrap();
        assert_eq!(IngestConfig::from(&cli.args), IngestConfig::default());
    }

    #[test]
    fn lease_group_defaults_to_the_topic_prefix() {
        let topics = Topics::new("desk.");
        let cfg = IngestConfig::default();
        assert_eq!(cfg.lease_group(&topics).as_deref(), Some("desk.ingest-lease"));
        let cli = Cli::try_parse_from(["ingest", "--lease-group", "g"]).unwrap();
        assert_eq!(IngestConfig::from(&cli.args).lease_group(&topics).as_deref(), Some("g"));
        let cli = Cli::try_parse_from(["ingest", "--no-lease"]).unwrap();
        assert_eq!(IngestConfig::from(&cli.args).lease_group(&topics), None);
    }
}
