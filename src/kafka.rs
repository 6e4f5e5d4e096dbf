//! Kafka plumbing shared by every process: broker flags, topic names, producer and consumer
//! settings (with a librdkafka passthrough), topic creation, and the embedded broker.
//!
//! The embedded broker is librdkafka's mock cluster, reached over TCP like any broker, so
//! tests and `possync run` exercise the same client code as production.

mod embedded;

pub use embedded::EmbeddedBroker;

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};

/// Errors of the Kafka plumbing.
#[derive(Debug, thiserror::Error)]
pub enum KafkaError {
    /// A `-K key=value` passthrough is malformed. Its text is not kept: it may hold a secret.
    #[error("librdkafka setting #{position} (of -K / POSSYNC_KAFKA_CONFIG, {chars} characters, not shown as it may hold a secret) is not of the form key=value; give each setting its own -K, or one per line in POSSYNC_KAFKA_CONFIG")]
    BadSetting {
        /// 1-based position among the settings.
        position: usize,
        /// Its length.
        chars: usize,
    },
    /// A `-K` passthrough tries to change a setting possync relies on.
    #[error("librdkafka setting {key:?} is set by possync ({why}); use the dedicated flag or remove -K {key}=…")]
    ReservedSetting { key: String, why: &'static str },
    /// librdkafka refused something.
    #[error("kafka: {context}: {source}")]
    Client {
        context: String,
        #[source]
        source: rdkafka::error::KafkaError,
    },
    /// The embedded broker thread is gone.
    #[error("the embedded Kafka broker has stopped")]
    EmbeddedGone,
    /// The cluster did not answer.
    #[error("no answer from Kafka at {0} within the timeout; is the broker up and the address right?")]
    Unreachable(String),
}

impl KafkaError {
    /// Wraps a librdkafka error with what was being done (a setting's value [`scrub`]bed).
    pub fn client(context: impl Into<String>) -> impl FnOnce(rdkafka::error::KafkaError) -> KafkaError {
        let context = context.into();
        move |source| KafkaError::Client {
            context,
            source: scrub(source),
        }
    }
}

/// A librdkafka error fit to print: a refused setting's value is replaced by [`REDACTED`] when
/// its key names a secret or is unknown to librdkafka (`sasl.jaas.config` is Java's, and a
/// typo such as `sasl.pasword` may hold a password); rdkafka prints the value otherwise
/// (issue 20 #10).
pub fn scrub(e: rdkafka::error::KafkaError) -> rdkafka::error::KafkaError {
    use rdkafka::error::KafkaError as E;
    use rdkafka::types::RDKafkaConfRes;
    match e {
        E::ClientConfig(code, desc, key, value)
            if !value.is_empty() && (code == RDKafkaConfRes::RD_KAFKA_CONF_UNKNOWN || is_secret_key(&key)) =>
        {
            E::ClientConfig(code, desc.replace(&value, REDACTED), key, REDACTED.to_string())
        }
        other => other,
    }
}

/// Broker and topic flags shared by every subcommand that talks to Kafka.
#[derive(clap::Args, Clone)]
pub struct KafkaArgs {
    /// Kafka bootstrap servers (comma-separated host:port).
    #[arg(long, env = "POSSYNC_BROKERS", default_value = "127.0.0.1:9092")]
    pub brokers: String,
    /// Prefix of every topic possync uses (`<prefix>positions.active`, …).
    #[arg(long, env = "POSSYNC_TOPIC_PREFIX", default_value = "possync.")]
    pub topic_prefix: String,
    /// Extra librdkafka setting, `key=value`; repeatable. Each -K is one setting taken whole,
    /// commas included (a SASL password may contain any character but a newline). In the
    /// environment variable (used when no -K is given): one setting per line. Prefix the key
    /// with `producer.` or `consumer.` to apply it to one kind of client only. Settings that
    /// possync relies on (idempotence, acks, auto-commit, group id, bootstrap) are refused.
    /// Values of keys naming a password or secret are never printed.
    #[arg(
        short = 'K',
        long = "kafka-config",
        env = "POSSYNC_KAFKA_CONFIG",
        value_delimiter = '\n'
    )]
    pub kafka_config: Vec<String>,
}

impl std::fmt::Debug for KafkaArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let settings: Vec<String> = self
            .kafka_config
            .iter()
            .map(|kv| match kv.split_once('=') {
                Some((k, v)) => format!("{k}={}", redacted(k, v)),
                None => REDACTED.to_string(),
            })
            .collect();
        f.debug_struct("KafkaArgs")
            .field("brokers", &self.brokers)
            .field("topic_prefix", &self.topic_prefix)
            .field("kafka_config", &settings)
            .finish()
    }
}

/// Clients the readiness probes of this process have made (see [`KafkaConfig::probe`]).
pub static PROBE_CLIENTS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// What is shown instead of a secret.
pub const REDACTED: &str = "[redacted]";

/// Whether a librdkafka setting holds a secret (its value is never printed).
pub fn is_secret_key(key: &str) -> bool {
    let k = key.trim().to_ascii_lowercase();
    [
        "password",
        "secret",
        "sasl.jaas.config",
        "sasl.oauthbearer.config",
        "ssl.key.pem",
        "ssl_key",
    ]
    .iter()
    .any(|s| k.contains(s))
}

/// `value`, or [`REDACTED`] when `key` holds a secret: the form to log or debug-print.
pub fn redacted<'a>(key: &str, value: &'a str) -> &'a str {
    if is_secret_key(key) {
        REDACTED
    } else {
        value
    }
}

/// Plain Kafka settings, built from [`KafkaArgs`] or directly by tests. Its `Debug` redacts
/// secret values.
#[derive(Clone)]
pub struct KafkaConfig {
    /// Bootstrap servers.
    pub brokers: String,
    /// Topic names.
    pub topics: Topics,
    /// librdkafka passthrough settings (already validated).
    pub overrides: BTreeMap<String, String>,
}

impl std::fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let overrides: BTreeMap<&str, &str> = self
            .overrides
            .iter()
            .map(|(k, v)| (k.as_str(), redacted(k, v)))
            .collect();
        f.debug_struct("KafkaConfig")
            .field("brokers", &self.brokers)
            .field("topics", &self.topics)
            .field("overrides", &overrides)
            .finish()
    }
}

impl KafkaConfig {
    /// A config for `brokers` with the default topic prefix and no overrides.
    pub fn new(brokers: impl Into<String>) -> Self {
        Self {
            brokers: brokers.into(),
            topics: Topics::new("possync."),
            overrides: BTreeMap::new(),
        }
    }

    /// Validates the passthrough settings.
    ///
    /// # Errors
    /// [`KafkaError::BadSetting`] or [`KafkaError::ReservedSetting`].
    pub fn from_args(args: &KafkaArgs) -> Result<Self, KafkaError> {
        let mut overrides = BTreeMap::new();
        for (i, kv) in args
            .kafka_config
            .iter()
            .enumerate()
            .filter(|(_, s)| !s.trim().is_empty())
        {
            let (k, v) = kv.split_once('=').ok_or_else(|| KafkaError::BadSetting {
                position: i + 1,
                chars: kv.chars().count(),
            })?;
            let k = k.trim();
            let bare = k
                .strip_prefix("producer.")
                .or_else(|| k.strip_prefix("consumer."))
                .unwrap_or(k);
            if let Some(why) = reserved(bare) {
                return Err(KafkaError::ReservedSetting {
                    key: k.to_string(),
                    why,
                });
            }
            overrides.insert(k.to_string(), v.trim().to_string());
        }
        Ok(Self {
            brokers: args.brokers.clone(),
            topics: Topics::new(&args.topic_prefix),
            overrides,
        })
    }

    fn base(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers);
        c
    }

    /// The passthrough settings that apply to `role`, prefix stripped: plain keys apply to
    /// every client, `producer.<key>` only to producers, `consumer.<key>` only to consumers
    /// (so librdkafka does not warn about settings the other side ignores).
    fn overrides_for(&self, role: Role) -> impl Iterator<Item = (&str, &str)> {
        self.overrides.iter().filter_map(move |(k, v)| match role_of(k) {
            (Some(r), _) if r != role => None,
            (_, key) => Some((key, v.as_str())),
        })
    }

    fn with_overrides(&self, mut c: ClientConfig, role: Role) -> ClientConfig {
        for (k, v) in self.overrides_for(role) {
            c.set(k, v);
        }
        c
    }

    /// Whether `-K` sets `key` for `role` (plainly or with the role prefix).
    pub fn overrides_setting(&self, role: Role, key: &str) -> bool {
        self.overrides_for(role).any(|(k, _)| k == key)
    }

    /// Producer settings: idempotent, `acks=all`, bounded local queue (backpressure instead
    /// of unbounded memory while the broker is slow or down), infinite delivery timeout is NOT
    /// used: a message not acknowledged within `message.timeout.ms` fails loudly.
    pub fn producer(&self) -> ClientConfig {
        self.producer_with_linger(5)
    }

    /// [`KafkaConfig::producer`] without batching delay, for ingest: the active route is the
    /// real-time one, and IB paces a client at 50 messages/s, so lingering buys throughput
    /// nobody needs at the price of latency (measured: p99 IB frame → ack ≈ 1 ms instead of
    /// ≈ 7 ms). `-K linger.ms=…` still overrides it.
    pub fn realtime_producer(&self) -> ClientConfig {
        self.producer_with_linger(0)
    }

    /// [`KafkaConfig::realtime_producer`], transactional with `transactional_id` (fencing of
    /// a predecessor with the same id, see `ingest::publisher`). `message.timeout.ms` defaults
    /// to 60 s here (a transaction may not outlive `transaction.timeout.ms`, which is the
    /// larger of 60 s and `message.timeout.ms`): that bounds how long read_committed consumers
    /// wait behind the open transaction of a producer that froze with no successor.
    pub fn transactional_producer(&self, transactional_id: &str) -> ClientConfig {
        let mut c = self.realtime_producer();
        let message_timeout = if self.overrides_setting(Role::Producer, "message.timeout.ms") {
            c.get("message.timeout.ms")
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(60_000)
        } else {
            60_000
        };
        let txn_timeout = if self.overrides_setting(Role::Producer, "transaction.timeout.ms") {
            c.get("transaction.timeout.ms")
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(60_000)
        } else {
            message_timeout.max(60_000)
        };
        c.set("transactional.id", transactional_id)
            .set("message.timeout.ms", message_timeout.min(txn_timeout).to_string())
            .set("transaction.timeout.ms", txn_timeout.to_string());
        c
    }

    fn producer_with_linger(&self, linger_ms: u32) -> ClientConfig {
        let mut c = self.base();
        c.set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", linger_ms.to_string())
            .set("queue.buffering.max.messages", "100000")
            .set("queue.buffering.max.kbytes", "65536")
            .set("message.timeout.ms", "300000");
        self.with_overrides(c, Role::Producer)
    }

    /// Consumer settings: manual offsets (auto-commit off), earliest reset, short session so a
    /// crashed member's partitions move quickly.
    pub fn consumer(&self, group: &str) -> ClientConfig {
        let mut c = self.base();
        c.set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("session.timeout.ms", "6000")
            .set("heartbeat.interval.ms", "1000")
            .set("enable.partition.eof", "false")
            .set("isolation.level", "read_committed");
        self.with_overrides(c, Role::Consumer)
    }

    /// Asks the cluster for its id (stable for a real cluster, new for each embedded broker).
    ///
    /// # Errors
    /// [`KafkaError::Unreachable`] when no broker answers within `timeout`.
    pub fn cluster_id(&self, timeout: Duration) -> Result<String, KafkaError> {
        let consumer: BaseConsumer = self
            .admin()
            .create()
            .map_err(KafkaError::client("create metadata client"))?;
        consumer
            .client()
            .fetch_cluster_id(timeout)
            .ok_or_else(|| KafkaError::Unreachable(self.brokers.clone()))
    }

    /// A blocking "does the cluster answer?" check for `/readyz` (a metadata request, 3 s).
    /// One client serves every call (issue 20 #15: a new client every 5 s cost a connection
    /// to each broker and a thread set each time); it is made at the first call.
    pub fn probe(&self) -> crate::metrics::KafkaProbe {
        let kafka = self.clone();
        let client: std::sync::Mutex<Option<BaseConsumer>> = std::sync::Mutex::new(None);
        std::sync::Arc::new(move || {
            let mut slot = client.lock().unwrap_or_else(|p| p.into_inner());
            if slot.is_none() {
                match kafka.admin().create::<BaseConsumer>() {
                    Ok(c) => {
                        PROBE_CLIENTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        *slot = Some(c);
                    }
                    Err(_) => return false,
                }
            }
            slot.as_ref()
                .and_then(|c| c.client().fetch_cluster_id(Duration::from_secs(3)))
                .is_some()
        })
    }

    /// Settings of admin and metadata-only clients (topic administration, cluster id): plain
    /// `-K` keys apply, so security settings such as SASL reach them too.
    pub fn admin(&self) -> ClientConfig {
        self.with_overrides(self.base(), Role::Admin)
    }
}

/// Context of consumers that read to a partition's end: a partition EOF is how they find it,
/// not an error worth a log line (rdkafka logs every consumer error it passes on).
pub struct EofQuiet;

impl rdkafka::ClientContext for EofQuiet {
    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        use rdkafka::error::{KafkaError as E, RDKafkaErrorCode};
        if !matches!(error, E::PartitionEOF(_) | E::Global(RDKafkaErrorCode::PartitionEOF)) {
            tracing::error!(target: "rdkafka::client", "librdkafka: {error}: {reason}");
        }
    }
}

impl rdkafka::consumer::ConsumerContext for EofQuiet {}

/// A consumer that reports partition ends quietly ([`EofQuiet`]), for the probes that read a
/// few messages at given offsets (`group` is never joined: they assign).
fn eof_probe(kafka: &KafkaConfig, group: &str) -> Result<BaseConsumer<EofQuiet>, KafkaError> {
    kafka
        .consumer(group)
        .set("enable.partition.eof", "true")
        .create_with_context(EofQuiet)
        .map_err(KafkaError::client(format!("create probe consumer {group}")))
}

/// Broker timestamps (ms) of the first *committed* message at or after each (topic, partition,
/// offset) (blocking). `None` when the partition ends before one: what lies between the offset
/// and the high watermark is only transaction markers or aborted events, so a reader at that
/// offset is caught up although the high watermark is ahead of it. A partition whose message
/// cannot be fetched within 10 s is left out.
///
/// # Errors
/// [`KafkaError::Client`] when the probe consumer cannot be created or assigned.
pub fn first_committed(
    kafka: &KafkaConfig,
    at: &[(String, i32, i64)],
) -> Result<BTreeMap<(String, i32), Option<i64>>, KafkaError> {
    use rdkafka::message::Message;
    use rdkafka::{Offset, TopicPartitionList};
    let c = eof_probe(kafka, "possync-committed-probe")?;
    let mut out = BTreeMap::new();
    for (topic, partition, offset) in at {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, *partition, Offset::Offset(*offset))
            .map_err(KafkaError::client(format!("assign {topic}/{partition}")))?;
        c.assign(&tpl)
            .map_err(KafkaError::client(format!("assign {topic}/{partition}")))?;
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::time::Instant::now() < deadline {
            match c.poll(Duration::from_millis(200)) {
                Some(Ok(m)) if m.topic() == topic && m.partition() == *partition && m.offset() >= *offset => {
                    if let Some(ts) = m.timestamp().to_millis() {
                        out.insert((topic.clone(), *partition), Some(ts));
                    }
                    break;
                }
                Some(Err(rdkafka::error::KafkaError::PartitionEOF(p))) if p == *partition => {
                    out.insert((topic.clone(), *partition), None);
                    break;
                }
                Some(Err(e)) => tracing::debug!(error = %e, %topic, partition, "committed-data probe fetch"),
                _ => {}
            }
        }
    }
    Ok(out)
}

/// What a partition's log holds at an offset (see [`log_at`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogAt {
    /// First offset the broker still has.
    pub low: i64,
    /// Next offset the broker will assign.
    pub high: i64,
    /// The first committed message at or after the offset: `Some(Some((offset, timestamp_ms)))`;
    /// `Some(None)` when only markers or aborted events follow it; `None` when the offset is
    /// outside the log or the fetch gave no answer in time.
    pub first: Option<Option<(i64, Option<i64>)>>,
}

/// How long [`log_at`] may take in all.
pub const LOG_PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// The watermarks of each (topic, partition) and the first committed message at or after its
/// offset (blocking; the partitions of a topic are fetched together), within
/// [`LOG_PROBE_TIMEOUT`] in all: a partition not answered by then is left out.
///
/// # Errors
/// [`KafkaError::Client`] when the probe consumer cannot be created or assigned.
pub fn log_at(kafka: &KafkaConfig, at: &[(String, i32, i64)]) -> Result<BTreeMap<(String, i32), LogAt>, KafkaError> {
    use rdkafka::message::Message;
    use rdkafka::{Offset, TopicPartitionList};
    let mut out = BTreeMap::new();
    if at.is_empty() {
        return Ok(out);
    }
    let c = eof_probe(kafka, "possync-log-probe")?;
    let mut by_topic: BTreeMap<&str, Vec<(i32, i64)>> = BTreeMap::new();
    // One deadline for the whole probe: it runs inside a rebalance, and a killed leader would
    // otherwise cost a full timeout per partition.
    let deadline = std::time::Instant::now() + LOG_PROBE_TIMEOUT;
    let left = || deadline.saturating_duration_since(std::time::Instant::now());
    for (topic, partition, offset) in at {
        // A partition whose watermarks cannot be read in time (leader moving) is left out.
        if left().is_zero() {
            break;
        }
        let Ok((low, high)) = c.fetch_watermarks(topic, *partition, left()) else {
            continue;
        };
        out.insert((topic.clone(), *partition), LogAt { low, high, first: None });
        if (low..high).contains(offset) {
            by_topic.entry(topic).or_default().push((*partition, *offset));
        }
    }
    // One topic at a time, each with a client of its own: a partition EOF names the partition
    // only, and no event of an earlier assignment may be taken for this one.
    for (topic, parts) in by_topic {
        let c = eof_probe(kafka, "possync-log-probe")?;
        let mut tpl = TopicPartitionList::new();
        for (partition, offset) in &parts {
            tpl.add_partition_offset(topic, *partition, Offset::Offset(*offset))
                .map_err(KafkaError::client(format!("assign {topic}/{partition}")))?;
        }
        c.assign(&tpl)
            .map_err(KafkaError::client(format!("assign the log probe to {topic}")))?;
        let mut open = parts.len();
        while open > 0 && !left().is_zero() {
            let (partition, found) = match c.poll(Duration::from_millis(200)) {
                Some(Ok(m)) if m.topic() == topic => (m.partition(), Some((m.offset(), m.timestamp().to_millis()))),
                Some(Err(rdkafka::error::KafkaError::PartitionEOF(p))) => (p, None),
                Some(Err(e)) => {
                    tracing::debug!(error = %e, topic, "log probe fetch");
                    continue;
                }
                _ => continue,
            };
            if let Some(v) = out.get_mut(&(topic.to_string(), partition)) {
                if v.first.is_none() {
                    v.first = Some(found);
                    open -= 1;
                }
            }
        }
    }
    Ok(out)
}

/// Which kind of client a setting is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Producers (ingest, queue worker, registry, dead letters).
    Producer,
    /// Consumers (materialize, registry and queue readers).
    Consumer,
    /// The admin client that creates topics (plain keys only).
    Admin,
}

fn role_of(key: &str) -> (Option<Role>, &str) {
    if let Some(k) = key.strip_prefix("producer.") {
        (Some(Role::Producer), k)
    } else if let Some(k) = key.strip_prefix("consumer.") {
        (Some(Role::Consumer), k)
    } else {
        (None, key)
    }
}

fn reserved(key: &str) -> Option<&'static str> {
    match key {
        "bootstrap.servers" | "metadata.broker.list" => Some("use --brokers"),
        "enable.idempotence" | "acks" | "request.required.acks" => Some("producers are idempotent with acks=all"),
        "enable.auto.commit" | "enable.auto.offset.store" => Some("offsets live in the Delta commit"),
        "group.id" => Some("use the subcommand's --group flag"),
        "transactional.id" => Some("ingest and the queue worker use <topic-prefix>ingest and <topic-prefix>queue-worker, to fence their predecessors"),
        "isolation.level" => Some("consumers read committed data only: events of a fenced producer must count nowhere"),
        _ => None,
    }
}

/// The topic names, from a prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    /// Real-time route: `PositionEvent`s with route ACTIVE.
    pub active: String,
    /// Queued route: enqueue and refresh `PositionEvent`s.
    pub queued: String,
    /// Compacted `RegistryEvent`s.
    pub registry: String,
    /// Undecodable or invalid input, original bytes plus error headers.
    pub deadletter: String,
    /// `ExecutionEvent`s: every fill with its commission, keyed like the positions.
    pub executions: String,
    /// The ingest lease's topic: exactly one partition, never written. Its own topic because
    /// the lease is "partition 0 is assigned to me", and only a one-partition topic keeps that
    /// partition with a live holder when members join (with more partitions the sticky
    /// assignor rebalances some of them, partition 0 included, to a newcomer).
    pub lease: String,
}

impl Topics {
    /// `<prefix>positions.active`, `<prefix>positions.queued`, `<prefix>registry`,
    /// `<prefix>deadletter`, and the lease topic `<prefix>ingest-lease`.
    pub fn new(prefix: &str) -> Self {
        Self {
            active: format!("{prefix}positions.active"),
            queued: format!("{prefix}positions.queued"),
            registry: format!("{prefix}registry"),
            deadletter: format!("{prefix}deadletter"),
            executions: format!("{prefix}executions"),
            lease: format!("{prefix}ingest-lease"),
        }
    }

    /// The two position topics.
    pub fn positions(&self) -> [&str; 2] {
        [&self.active, &self.queued]
    }

    /// The prefix these names were made from.
    pub fn prefix(&self) -> String {
        self.registry.trim_end_matches("registry").to_string()
    }

    /// The four data topics.
    pub fn all(&self) -> [&str; 4] {
        [&self.active, &self.queued, &self.registry, &self.deadletter]
    }

    /// The four data topics, the executions topic and the lease topic: what `possync topics
    /// create` makes.
    pub fn every(&self) -> [&str; 6] {
        [
            &self.active,
            &self.queued,
            &self.registry,
            &self.deadletter,
            &self.executions,
            &self.lease,
        ]
    }

    /// Partitions topic `name` gets when created with `data` partitions per data topic: the
    /// lease topic always exactly one (see [`Topics::lease`]).
    pub fn partitions_of(&self, name: &str, data: i32) -> i32 {
        if name == self.lease {
            1
        } else {
            data
        }
    }
}

#[cfg(test)]
mod tests;
