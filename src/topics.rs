//! The possync topics on a real cluster: `possync topics create | check`, and the start-up
//! check every Kafka process runs before it does anything else.
//!
//! The layout is fixed by the design: four data topics and the executions topic under one prefix, the registry topic
//! compacted (it is the registry's source of truth, and compaction keeps the latest word per
//! entry), the others deleted by retention; plus the ingest lease's topic, one partition and
//! never written (see [`crate::ingest::lease`]). Replication and `min.insync.replicas` are the
//! operator's choice (defaults: RF 3, min ISR 2, the setting that survives one lost broker
//! without losing an acknowledged write).
//!
//! Invariant: a process never starts against a missing topic, a registry topic that is not
//! compacted or a lease topic with more than one partition; the error names the fix
//! (`possync topics create` / `check`). Clusters that do not
//! answer `DescribeConfigs` (librdkafka's embedded mock broker, which `possync run` uses) skip
//! the config checks, since no answer is not a wrong answer.

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::types::RDKafkaErrorCode;

use crate::kafka::{KafkaArgs, KafkaConfig, KafkaError};

/// Errors of topic administration.
#[derive(Debug, thiserror::Error)]
pub enum TopicsError {
    /// Kafka refused or failed something.
    #[error(transparent)]
    Kafka(#[from] KafkaError),
    /// A topic a process needs does not exist.
    #[error("topic {topic:?} does not exist on {brokers}; create the possync topics with `possync topics create --brokers {brokers} --topic-prefix {prefix}`")]
    Missing {
        topic: String,
        brokers: String,
        prefix: String,
    },
    /// The registry topic would lose entries to retention.
    #[error("topic {topic:?} has cleanup.policy={policy}, but the registry topic must be compacted (cleanup.policy=compact) or registry entries expire; fix it with `kafka-configs.sh --alter --entity-type topics --entity-name {topic} --add-config cleanup.policy=compact`, then `possync topics check`")]
    NotCompacted { topic: String, policy: String },
    /// The lease topic has more than one partition: a newcomer could take the lease.
    #[error("the ingest lease topic {topic:?} has {partitions} partitions, but it must have exactly 1 (with more, a standby joining can take the lease from a live holder); delete it and run `possync topics create` (it holds no data)")]
    LeasePartitions { topic: String, partitions: i32 },
    /// `possync topics check` found differences.
    #[error("{0} topic setting(s) differ from the expected layout (listed above); fix them or recreate the topics")]
    Drift(usize),
    /// Bad arguments.
    #[error("{0}")]
    Invalid(String),
}

/// The layout `possync topics create` makes and `check` compares against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// Partitions of every topic.
    pub partitions: i32,
    /// Replication factor of every topic.
    pub replication: i32,
    /// `min.insync.replicas` of every topic.
    pub min_insync: i32,
}

impl Default for Layout {
    fn default() -> Self {
        Self {
            partitions: 6,
            replication: 3,
            min_insync: 2,
        }
    }
}

/// One expected topic: name, partitions and the configs that must hold.
#[derive(Debug, Clone)]
pub struct Spec {
    /// Topic name.
    pub name: String,
    /// Partitions (the layout's, or 1 for the lease topic).
    pub partitions: i32,
    /// Topic-level configs that must have these values.
    pub configs: BTreeMap<&'static str, String>,
}

impl Layout {
    /// The six topics of `kafka.topics` with their expected partitions and configs.
    pub fn specs(&self, kafka: &KafkaConfig) -> Vec<Spec> {
        let t = &kafka.topics;
        t.every()
            .iter()
            .map(|name| {
                let mut configs = BTreeMap::new();
                let policy = if *name == t.registry { "compact" } else { "delete" };
                configs.insert("cleanup.policy", policy.to_string());
                configs.insert("min.insync.replicas", self.min_insync.to_string());
                Spec {
                    name: name.to_string(),
                    partitions: t.partitions_of(name, self.partitions),
                    configs,
                }
            })
            .collect()
    }

    fn validate(&self) -> Result<(), TopicsError> {
        if self.partitions < 1 || self.replication < 1 || self.min_insync < 1 {
            return Err(TopicsError::Invalid(
                "--partitions, --replication-factor and --min-insync-replicas must be at least 1".into(),
            ));
        }
        if self.min_insync > self.replication {
            return Err(TopicsError::Invalid(format!(
                "--min-insync-replicas {} exceeds --replication-factor {}: no write could ever be acknowledged",
                self.min_insync, self.replication
            )));
        }
        Ok(())
    }
}

/// One difference between the cluster and the expected layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Drift {
    /// The topic.
    pub topic: String,
    /// What differs (`missing`, `partitions`, `replication`, a config name).
    pub what: String,
    /// Expected value.
    pub expected: String,
    /// Value found.
    pub found: String,
}

impl std::fmt::Display for Drift {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: {} is {}, expected {}",
            self.topic, self.what, self.found, self.expected
        )
    }
}

fn admin(kafka: &KafkaConfig) -> Result<AdminClient<DefaultClientContext>, KafkaError> {
    kafka
        .admin()
        .create()
        .map_err(KafkaError::client("create admin client"))
}

/// Creates the topics of `layout` that do not exist yet; existing ones are left alone (use
/// [`check`] to see whether they match). Returns the names created.
///
/// # Errors
/// [`TopicsError::Kafka`] when the cluster refuses a creation (for example a replication factor
/// above the number of brokers: the error says so).
pub async fn create(kafka: &KafkaConfig, layout: &Layout, timeout: Duration) -> Result<Vec<String>, TopicsError> {
    layout.validate()?;
    let admin = admin(kafka)?;
    let specs = layout.specs(kafka);
    let new: Vec<NewTopic<'_>> = specs
        .iter()
        .map(|s| {
            s.configs.iter().fold(
                NewTopic::new(&s.name, s.partitions, TopicReplication::Fixed(layout.replication)),
                |t, (k, v)| t.set(k, v),
            )
        })
        .collect();
    let opts = AdminOptions::new()
        .operation_timeout(Some(timeout))
        .request_timeout(Some(timeout));
    let results = admin
        .create_topics(new.iter(), &opts)
        .await
        .map_err(KafkaError::client("create topics"))?;
    let mut created = Vec::new();
    for r in results {
        match r {
            Ok(topic) => created.push(topic),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => {
                return Err(KafkaError::Client {
                    context: format!("create topic {topic}"),
                    source: rdkafka::error::KafkaError::AdminOp(code),
                }
                .into())
            }
        }
    }
    Ok(created)
}

/// What the cluster holds of one topic.
#[derive(Debug, Clone, Default)]
struct Found {
    partitions: i32,
    /// Smallest replica count over the partitions.
    replication: i32,
}

fn describe(kafka: &KafkaConfig, names: &[&str], timeout: Duration) -> Result<BTreeMap<String, Found>, KafkaError> {
    let client: BaseConsumer = kafka
        .admin()
        .create()
        .map_err(KafkaError::client("create metadata client"))?;
    let md = client
        .fetch_metadata(None, timeout)
        .map_err(|_| KafkaError::Unreachable(kafka.brokers.clone()))?;
    Ok(md
        .topics()
        .iter()
        .filter(|t| names.contains(&t.name()) && t.error().is_none() && !t.partitions().is_empty())
        .map(|t| {
            let found = Found {
                partitions: t.partitions().len() as i32,
                replication: t
                    .partitions()
                    .iter()
                    .map(|p| p.replicas().len() as i32)
                    .min()
                    .unwrap_or(0),
            };
            (t.name().to_string(), found)
        })
        .collect())
}

/// How librdkafka's mock cluster names itself (`mockCluster<hex>`).
const MOCK_CLUSTER_ID: &str = "mockCluster";

/// The topic configs the cluster reports, or `None` when it does not answer `DescribeConfigs`
/// (librdkafka's mock cluster).
async fn configs(
    kafka: &KafkaConfig,
    names: &[&str],
    timeout: Duration,
) -> Option<BTreeMap<String, BTreeMap<String, String>>> {
    // The mock cluster never answers DescribeConfigs (the request would wait out `timeout`);
    // its cluster id gives it away.
    let k = kafka.clone();
    let id = tokio::task::spawn_blocking(move || k.cluster_id(timeout))
        .await
        .ok()?
        .ok()?;
    if id.starts_with(MOCK_CLUSTER_ID) {
        return None;
    }
    let admin = admin(kafka).ok()?;
    let specs: Vec<_> = names.iter().map(|n| ResourceSpecifier::Topic(n)).collect();
    let opts = AdminOptions::new().request_timeout(Some(timeout));
    let results = match admin.describe_configs(specs.iter(), &opts).await {
        Ok(r) => r,
        Err(e) => {
            tracing::debug!(error = %e, "the cluster does not describe topic configs; skipping config checks");
            return None;
        }
    };
    let mut out = BTreeMap::new();
    for (name, r) in names.iter().zip(results) {
        let r = r.ok()?;
        let entries = r.entries.into_iter().filter_map(|e| Some((e.name, e.value?))).collect();
        out.insert(name.to_string(), entries);
    }
    Some(out)
}

/// Compares the cluster's topics with `layout`; an empty result means no drift.
///
/// # Errors
/// [`KafkaError::Unreachable`] when the cluster does not answer.
pub async fn check(kafka: &KafkaConfig, layout: &Layout, timeout: Duration) -> Result<Vec<Drift>, TopicsError> {
    let specs = layout.specs(kafka);
    let names: Vec<&str> = specs.iter().map(|s| s.name.as_str()).collect();
    let (k, n) = (kafka.clone(), names.iter().map(|s| s.to_string()).collect::<Vec<_>>());
    let found = tokio::task::spawn_blocking(move || {
        let n: Vec<&str> = n.iter().map(String::as_str).collect();
        describe(&k, &n, timeout)
    })
    .await
    .map_err(|_| KafkaError::EmbeddedGone)??;
    let present: Vec<&str> = names.iter().copied().filter(|n| found.contains_key(*n)).collect();
    let configs = configs(kafka, &present, timeout).await;
    let mut drift = Vec::new();
    let mut differ = |topic: &str, what: &str, expected: String, found: String| {
        if expected != found {
            drift.push(Drift {
                topic: topic.to_string(),
                what: what.to_string(),
                expected,
                found,
            });
        }
    };
    for spec in &specs {
        let Some(f) = found.get(&spec.name) else {
            differ(&spec.name, "presence", "present".into(), "missing".into());
            continue;
        };
        differ(
            &spec.name,
            "partitions",
            spec.partitions.to_string(),
            f.partitions.to_string(),
        );
        differ(
            &spec.name,
            "replication factor",
            layout.replication.to_string(),
            f.replication.to_string(),
        );
        if let Some(cfg) = configs.as_ref().and_then(|c| c.get(&spec.name)) {
            for (key, want) in &spec.configs {
                let have = cfg.get(*key).cloned().unwrap_or_else(|| "unset".into());
                differ(&spec.name, key, want.clone(), have);
            }
        }
    }
    Ok(drift)
}

/// Which process is starting: each needs its own topics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Process {
    /// Publishes both position topics and the executions topic, follows the registry; with
    /// `lease`, joins the lease group on the lease topic.
    Ingest { lease: bool },
    /// Replays and publishes the queued topic.
    QueueWorker,
    /// Reads every topic, writes dead letters.
    Materialize,
}

/// The start-up check: every topic `process` uses exists, and the registry topic (when it is one
/// of them) is compacted.
///
/// # Errors
/// [`TopicsError::Missing`] or [`TopicsError::NotCompacted`], each naming the fix;
/// [`KafkaError::Unreachable`] when no broker answers within `timeout`.
pub async fn require(kafka: &KafkaConfig, process: Process, timeout: Duration) -> Result<(), TopicsError> {
    let t = &kafka.topics;
    let needed: Vec<String> = match process {
        Process::Ingest { lease } => {
            let mut t = vec![
                t.active.clone(),
                t.queued.clone(),
                t.registry.clone(),
                t.executions.clone(),
            ];
            if lease {
                t.push(kafka.topics.lease.clone());
            }
            t
        }
        Process::QueueWorker => vec![t.queued.clone()],
        // The data topics and the executions topic (tables of an older release upgrade with a
        // `possync topics create`, which adds it).
        Process::Materialize => t
            .all()
            .iter()
            .chain([&t.executions.as_str()])
            .map(|s| s.to_string())
            .collect(),
    };
    let (k, n) = (kafka.clone(), needed.clone());
    let found = tokio::task::spawn_blocking(move || {
        let n: Vec<&str> = n.iter().map(String::as_str).collect();
        describe(&k, &n, timeout)
    })
    .await
    .map_err(|_| KafkaError::EmbeddedGone)??;
    if let Some(missing) = needed.iter().find(|n| !found.contains_key(*n)) {
        return Err(TopicsError::Missing {
            topic: missing.clone(),
            brokers: kafka.brokers.clone(),
            prefix: t.prefix(),
        });
    }
    if let Some(f) = found.get(&t.lease).filter(|f| f.partitions != 1) {
        return Err(TopicsError::LeasePartitions {
            topic: t.lease.clone(),
            partitions: f.partitions,
        });
    }
    if needed.contains(&t.registry) {
        if let Some(cfg) = configs(kafka, &[&t.registry], timeout).await {
            let policy = cfg
                .get(&t.registry)
                .and_then(|c| c.get("cleanup.policy"))
                .cloned()
                .unwrap_or_else(|| "delete".into());
            if !policy.split(',').any(|p| p.trim() == "compact") {
                return Err(TopicsError::NotCompacted {
                    topic: t.registry.clone(),
                    policy,
                });
            }
        }
    }
    Ok(())
}

/// `possync topics …`.
#[derive(clap::Args, Debug)]
pub struct TopicsArgs {
    #[command(subcommand)]
    pub command: TopicsCommand,
}

/// What to do with the topics.
#[derive(clap::Subcommand, Debug)]
pub enum TopicsCommand {
    /// Create the topics that are missing (the registry topic compacted, the lease topic with
    /// one partition), then check them all.
    Create(TopicsOpts),
    /// Print every difference from the expected layout; exit non-zero when there is one.
    Check(TopicsOpts),
}

/// The cluster and the layout `create` makes and `check` expects.
#[derive(clap::Args, Debug)]
pub struct TopicsOpts {
    #[command(flatten)]
    pub kafka: KafkaArgs,
    /// Partitions of every topic (more partitions: more materialize members can share the work).
    #[arg(long, env = "POSSYNC_TOPIC_PARTITIONS", default_value_t = Layout::default().partitions)]
    pub partitions: i32,
    /// Replication factor of every topic (3 survives the loss of one broker).
    #[arg(long, env = "POSSYNC_TOPIC_REPLICATION", default_value_t = Layout::default().replication)]
    pub replication_factor: i32,
    /// `min.insync.replicas` of every topic (with acks=all: how many copies an acknowledged
    /// write has at least).
    #[arg(long, env = "POSSYNC_TOPIC_MIN_INSYNC", default_value_t = Layout::default().min_insync)]
    pub min_insync_replicas: i32,
    /// How long to wait for the cluster's answers.
    #[arg(long, env = "POSSYNC_KAFKA_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub kafka_timeout: Duration,
}

/// Runs `possync topics create | check`, printing what it did and any drift.
///
/// # Errors
/// [`TopicsError::Drift`] when the topics differ from the layout, or what [`create`] /
/// [`check`] fail with.
pub async fn run(args: TopicsArgs) -> Result<(), TopicsError> {
    let (creating, opts) = match args.command {
        TopicsCommand::Create(o) => (true, o),
        TopicsCommand::Check(o) => (false, o),
    };
    let kafka = KafkaConfig::from_args(&opts.kafka)?;
    let layout = Layout {
        partitions: opts.partitions,
        replication: opts.replication_factor,
        min_insync: opts.min_insync_replicas,
    };
    if creating {
        let created = create(&kafka, &layout, opts.kafka_timeout).await?;
        for t in &created {
            println!("created {t}");
        }
    }
    let drift = check(&kafka, &layout, opts.kafka_timeout).await?;
    for d in &drift {
        println!("drift: {d}");
    }
    if drift.is_empty() {
        println!(
            "topics ok: {} with {} partitions, replication {}, min.insync.replicas {}, {} compacted; lease topic {} with 1 partition",
            kafka.topics.all().join(", "),
            layout.partitions,
            layout.replication,
            layout.min_insync,
            kafka.topics.registry,
            kafka.topics.lease
        );
        Ok(())
    } else {
        Err(TopicsError::Drift(drift.len()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_compacts_only_the_registry() {
        let kafka = KafkaConfig::new("b:1");
        let specs = Layout::default().specs(&kafka);
        assert_eq!(specs.len(), 6);
        for s in specs {
            let want = if s.name == kafka.topics.registry {
                "compact"
            } else {
                "delete"
            };
            assert_eq!(s.configs["cleanup.policy"], want, "{}", s.name);
            assert_eq!(s.configs["min.insync.replicas"], "2");
            let partitions = if s.name == kafka.topics.lease { 1 } else { 6 };
            assert_eq!(s.partitions, partitions, "{}", s.name);
        }
    }

    #[test]
    fn impossible_layouts_are_refused() {
        let bad = Layout {
            replication: 1,
            min_insync: 2,
            ..Layout::default()
        };
        assert!(matches!(bad.validate(), Err(TopicsError::Invalid(_))));
        assert!(Layout::default().validate().is_ok());
    }

    #[tokio::test]
    async fn missing_topics_name_the_command_that_creates_them() {
        let broker = crate::kafka::EmbeddedBroker::start(1).unwrap();
        let mut kafka = KafkaConfig::new(broker.bootstrap());
        kafka.topics = crate::kafka::Topics::new("req.");
        broker.create_topic(&kafka.topics.queued, 1).unwrap();
        require(&kafka, Process::QueueWorker, Duration::from_secs(10))
            .await
            .unwrap();
        let err = require(&kafka, Process::Ingest { lease: true }, Duration::from_secs(10))
            .await
            .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("req.positions.active"), "{msg}");
        assert!(msg.contains("possync topics create"), "{msg}");
        assert!(msg.contains("--topic-prefix req."), "{msg}");
        // The embedded broker does not describe topic configs: no false "not compacted".
        for t in [&kafka.topics.active, &kafka.topics.registry, &kafka.topics.deadletter] {
            broker.create_topic(t, 1).unwrap();
        }
        // Materialize reads, and ingest publishes, the executions topic too (an upgrade adds
        // it with `topics create`).
        for process in [Process::Materialize, Process::Ingest { lease: false }] {
            let msg = require(&kafka, process, Duration::from_secs(10))
                .await
                .unwrap_err()
                .to_string();
            assert!(
                msg.contains("req.executions") && msg.contains("possync topics create"),
                "{msg}"
            );
        }
        broker.create_topic(&kafka.topics.executions, 1).unwrap();
        require(&kafka, Process::Materialize, Duration::from_secs(10))
            .await
            .unwrap();
        require(&kafka, Process::Ingest { lease: false }, Duration::from_secs(10))
            .await
            .unwrap();
        // The lease topic: missing is named, more than one partition is refused.
        let err = require(&kafka, Process::Ingest { lease: true }, Duration::from_secs(10))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("req.ingest-lease"), "{err}");
        broker.create_topic(&kafka.topics.lease, 2).unwrap();
        let err = require(&kafka, Process::Ingest { lease: true }, Duration::from_secs(10))
            .await
            .unwrap_err();
        assert!(
            matches!(err, TopicsError::LeasePartitions { partitions: 2, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("exactly 1"), "{err}");
    }
}
