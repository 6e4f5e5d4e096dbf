//! Topic replays at start-up (registry, ingest's resume, the queue worker's start) wait out a
//! broker that goes away and comes back within their deadline, instead of failing at the first
//! transport error (issue 20 #6).

use std::time::Duration;

use anyhow::ensure;
use possync::kafka::{EmbeddedBroker, KafkaConfig, Topics};
use possync::registry::TopicReplay;
use rdkafka::producer::{FutureProducer, FutureRecord};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_waits_out_a_broker_restart() -> anyhow::Result<()> {
    let broker = EmbeddedBroker::start(1)?;
    let mut kafka = KafkaConfig::new(broker.bootstrap());
    kafka.topics = Topics::new(&format!("t{}.", &possync::events::new_id()[..8]));
    let topic = kafka.topics.registry.clone();
    broker.create_topic(&topic, 1)?;
    let producer: FutureProducer = kafka.producer().create()?;
    for i in 0..100 {
        let key = format!("k{i}");
        producer
            .send(FutureRecord::to(&topic).key(&key).payload("v"), Duration::from_secs(10))
            .await
            .map_err(|(e, _)| e)?;
    }
    // Every answer of the broker comes 3 s late, so the replay's first fetch is still out when
    // the broker goes down: the consumer sees the connection fail before any message.
    broker.broker_round_trip(1, Duration::from_secs(3))?;
    let mut replay = TopicReplay::start(&kafka, &topic, Duration::from_secs(30)).await?;
    broker.broker_down(1)?;
    let restart = {
        let broker = &broker;
        async move {
            tokio::time::sleep(Duration::from_secs(2)).await;
            broker.broker_round_trip(1, Duration::ZERO)?;
            broker.broker_up(1)
        }
    };
    let read = async {
        let mut n = 0;
        while let Some(_m) = replay.next_in_backlog().await? {
            n += 1;
        }
        anyhow::Ok(n)
    };
    let (read, restarted) =
        tokio::time::timeout(Duration::from_secs(60), async { tokio::join!(read, restart) }).await?;
    restarted?;
    let n = read?;
    ensure!(n == 100, "read {n} of 100 messages");
    Ok(())
}
