//! Smoke tests of the real Apache Kafka cluster (`scripts/kafka.sh`, `common::kafka_cluster`):
//! an idempotent `acks=all` producer rides out a SIGKILLed partition leader and its restart with
//! nothing lost or doubled, and the SASL listener lets SCRAM-SHA-512 in with the right password
//! only.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, ensure};
use common::kafka_cluster::{KafkaCluster, KafkaOpts};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::producer::{BaseProducer, DeliveryResult, FutureProducer, FutureRecord, Producer, ProducerContext};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};

/// Messages by Kafka coordinates: (partition, offset) → payload.
type Log = BTreeMap<(i32, i64), String>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_sigkill_and_restart_lose_nothing() -> anyhow::Result<()> {
    const TOPIC: &str = "smoke";
    const PARTITIONS: i32 = 3;
    let t0 = Instant::now();
    let cluster = KafkaCluster::start(3, KafkaOpts::default()).await?;
    let started = t0.elapsed();
    create_topic(cluster.client_config(), TOPIC, PARTITIONS, 3).await?;
    cluster.wait_topic(TOPIC, true).await?;

    let producer: FutureProducer = cluster
        .client_config()
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .set("message.timeout.ms", "60000")
        .create()?;
    let mut acked = Log::new();
    acked.extend(produce(&producer, TOPIC, PARTITIONS, 0..300).await?);

    // SIGKILL the leader of partition 0 while a paced stream is in flight.
    let leader = cluster.leader_of(TOPIC, 0).await?;
    let stream = tokio::spawn({
        let producer = producer.clone();
        async move { produce(&producer, TOPIC, PARTITIONS, 300..900).await }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let t = Instant::now();
    cluster.kill(leader).await?;
    let killed = t.elapsed();
    merge(&mut acked, stream.await??)?;
    let rode_out = t.elapsed();
    let new_leader = cluster.leader_of(TOPIC, 0).await?;
    ensure!(new_leader != leader, "partition 0 still led by killed node {leader}");

    // The survivors keep taking writes (2 of 3 in sync = min.insync.replicas).
    merge(&mut acked, produce(&producer, TOPIC, PARTITIONS, 900..1200).await?)?;

    let t = Instant::now();
    cluster.restart(leader).await?;
    let restarted = t.elapsed();
    cluster.wait_topic(TOPIC, true).await?;
    let in_sync = t.elapsed();
    merge(&mut acked, produce(&producer, TOPIC, PARTITIONS, 1200..1500).await?)?;
    ensure!(acked.len() == 1500, "{} of 1500 messages acknowledged", acked.len());

    let consumed = consume_all(cluster.client_config(), TOPIC, PARTITIONS, acked.len()).await?;
    ensure!(
        consumed.len() == acked.len(),
        "consumed {} messages, produced {}",
        consumed.len(),
        acked.len()
    );
    if let Some((at, want)) = acked.iter().find(|(at, want)| consumed.get(at) != Some(want)) {
        return Err(anyhow!("at {at:?}: produced {want:?}, consumed {:?}", consumed.get(at)));
    }
    eprintln!(
        "3 nodes up in {started:.1?}; kill of node {leader} took {killed:.1?}, stream acked \
         {rode_out:.1?} after the kill (new leader {new_leader}); restart {restarted:.1?}, \
         full ISR after {in_sync:.1?}; total {:.1?}",
        t0.elapsed()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sasl_scram_listener_checks_the_password() -> anyhow::Result<()> {
    const TOPIC: &str = "sasl-smoke";
    let opts = KafkaOpts {
        sasl: true,
        sasl_user: "possync-test".into(),
        sasl_password: "not-the-default-secret".into(),
    };
    let cluster = KafkaCluster::start(1, opts.clone()).await?;
    let sasl = cluster.sasl_client_config(&opts.sasl_user, &opts.sasl_password);
    create_topic(sasl.clone(), TOPIC, 2, 1).await?;

    let mut producer_config = sasl.clone();
    let producer: FutureProducer = producer_config
        .set("enable.idempotence", "true")
        .set("message.timeout.ms", "20000")
        .create()?;
    let acked = produce(&producer, TOPIC, 2, 0..20).await?;
    let consumed = consume_all(sasl, TOPIC, 2, acked.len()).await?;
    ensure!(consumed == acked, "consumed {consumed:?}, produced {acked:?}");

    // A wrong password gets an authentication error, not a connection.
    let errors = Errors::default();
    let intruder: BaseProducer<Errors> = cluster
        .sasl_client_config(&opts.sasl_user, "wrong-password")
        .create_with_context(errors.clone())?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while !errors.authentication() && Instant::now() < deadline {
        intruder.poll(Duration::from_millis(100));
    }
    ensure!(
        errors.authentication(),
        "no authentication error with a wrong password; errors: {:?}",
        errors.seen.lock().unwrap()
    );
    ensure!(
        intruder
            .client()
            .fetch_metadata(Some(TOPIC), Duration::from_secs(2))
            .is_err(),
        "a wrong password still reads metadata"
    );
    Ok(())
}

/// Client errors as librdkafka reports them, and whether one was an authentication failure.
#[derive(Clone, Default)]
struct Errors {
    seen: Arc<Mutex<Vec<String>>>,
    auth: Arc<AtomicBool>,
}

impl Errors {
    fn authentication(&self) -> bool {
        self.auth.load(Ordering::SeqCst)
    }
}

impl ClientContext for Errors {
    fn error(&self, error: KafkaError, reason: &str) {
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::Authentication) {
            self.auth.store(true, Ordering::SeqCst);
        }
        self.seen.lock().unwrap().push(format!("{error}: {reason}"));
    }
}

impl ProducerContext for Errors {
    type DeliveryOpaque = ();
    fn delivery(&self, _: &DeliveryResult<'_>, _: ()) {}
}

async fn create_topic(config: ClientConfig, topic: &str, partitions: i32, replication: i32) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> = config.create()?;
    let new = NewTopic::new(topic, partitions, TopicReplication::Fixed(replication))
        .set("min.insync.replicas", if replication >= 3 { "2" } else { "1" });
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(20)));
    for result in admin.create_topics([&new], &opts).await? {
        result.map_err(|(t, e)| anyhow!("creating {t}: {e}"))?;
    }
    Ok(())
}

/// Sends messages `ids` round-robin over the partitions, about one per millisecond, and returns
/// where each was acknowledged. Any delivery failure is an error.
async fn produce(
    producer: &FutureProducer,
    topic: &str,
    partitions: i32,
    ids: std::ops::Range<usize>,
) -> anyhow::Result<Log> {
    let mut pending = Vec::with_capacity(ids.len());
    for i in ids {
        let payload = format!("m-{i}");
        let key = i.to_string();
        let record = FutureRecord::to(topic)
            .partition(i as i32 % partitions)
            .key(&key)
            .payload(&payload);
        let delivery = producer
            .send_result(record)
            .map_err(|(e, _)| anyhow!("enqueue m-{i}: {e}"))?;
        pending.push((payload, delivery));
        if i % 10 == 9 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let mut log = Log::new();
    for (payload, delivery) in pending {
        let d = delivery
            .await?
            .map_err(|(e, _)| anyhow!("delivery of {payload}: {e}"))?;
        ensure!(
            log.insert((d.partition, d.offset), payload.clone()).is_none(),
            "two messages acknowledged at {}/{}",
            d.partition,
            d.offset
        );
    }
    Ok(log)
}

fn merge(into: &mut Log, more: Log) -> anyhow::Result<()> {
    for (at, payload) in more {
        if let Some(before) = into.insert(at, payload.clone()) {
            return Err(anyhow!("{payload} and {before} both acknowledged at {at:?}"));
        }
    }
    Ok(())
}

/// Reads every partition from the beginning until `expected` messages arrived (at most 30 s),
/// then checks that the high watermarks hold no more than that.
async fn consume_all(mut config: ClientConfig, topic: &str, partitions: i32, expected: usize) -> anyhow::Result<Log> {
    let topic = topic.to_string();
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = config
            .set("group.id", "smoke-reader")
            .set("enable.auto.commit", "false")
            .create()?;
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            tpl.add_partition_offset(&topic, p, Offset::Beginning)?;
        }
        consumer.assign(&tpl)?;
        let mut log = Log::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        while log.len() < expected && Instant::now() < deadline {
            let Some(msg) = consumer.poll(Duration::from_millis(200)) else {
                continue;
            };
            let msg = msg?;
            let payload = String::from_utf8_lossy(msg.payload().unwrap_or_default()).into_owned();
            if let Some(before) = log.insert((msg.partition(), msg.offset()), payload.clone()) {
                return Err(anyhow!("{payload} read where {before} was, twice"));
            }
        }
        let mut in_log = 0;
        for p in 0..partitions {
            let (low, high) = consumer.fetch_watermarks(&topic, p, Duration::from_secs(10))?;
            in_log += high - low;
        }
        ensure!(
            in_log as usize == log.len(),
            "topic holds {in_log} messages, read {}",
            log.len()
        );
        Ok(log)
    })
    .await?
}
