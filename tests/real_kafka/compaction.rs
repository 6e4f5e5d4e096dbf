//! 5. The broker really compacts the registry topic; ingest and materialize then replay the
//!    compacted topic and end with the same registry as the whole history gives.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure};
use possync::events::RegistryAction;
use rdkafka::admin::{AdminClient, AdminOptions, AlterConfig, ResourceSpecifier};
use rdkafka::client::DefaultClientContext;
use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::materialize_support::{expected_registry, Payload, Produced};
use crate::pipeline::{read_topics, Options, Pipeline};

/// Makes the registry topic roll a segment every second and clean at once.
async fn compact_quickly(p: &Pipeline) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> = p.kafka.admin().create()?;
    let topic = p.kafka.topics.registry.as_str();
    let cfg = AlterConfig::new(ResourceSpecifier::Topic(topic))
        .set("cleanup.policy", "compact")
        .set("min.insync.replicas", "1")
        .set("segment.ms", "1000")
        .set("min.cleanable.dirty.ratio", "0.01")
        .set("delete.retention.ms", "1000");
    for r in admin.alter_configs([&cfg], &AdminOptions::new()).await? {
        if let Err((_, code)) = r {
            bail!("alter the configs of {topic}: {code:?}");
        }
    }
    Ok(())
}

fn registry_part(all: &[Produced], topic: &str) -> Vec<Produced> {
    all.iter().filter(|m| m.topic == topic).cloned().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compacted_registry_replays_to_the_same_registry() -> anyhow::Result<()> {
    let _one = crate::SERIAL.lock().await;
    let mut p = Pipeline::start(Options {
        nodes: 1,
        members: 2,
        processes: false,
        ..Options::default()
    })
    .await?;
    compact_quickly(&p).await?;

    // Churn over 30 entries in rounds more than a segment apart: closed segments fill with
    // superseded records that the cleaner may drop.
    let mut history = registry_part(&read_topics(&p.kafka)?, &p.kafka.topics.registry);
    let producer: FutureProducer = p.kafka.producer().create()?;
    let contracts: Vec<_> = p.sim.truth().positions.into_iter().take(30).collect();
    let rounds = 12;
    for round in 0..rounds {
        for (i, c) in contracts.iter().enumerate() {
            let last = round + 1 == rounds;
            let off = if last { i % 2 == 1 } else { (round + i) % 3 == 0 };
            let action = if off {
                RegistryAction::Deactivate
            } else {
                RegistryAction::Activate
            };
            let e = possync::registry::event(
                "churn",
                Some(&c.account),
                i64::from(c.contract.con_id),
                action,
                (round % 4) as i32,
                "compaction-test",
            );
            let (key, value) = (e.key(), e.encode()?);
            let delivery = producer
                .send(
                    FutureRecord::to(&p.kafka.topics.registry).key(&key).payload(&value),
                    Duration::from_secs(30),
                )
                .await
                .map_err(|(e, _)| e)?;
            history.push(Produced {
                topic: p.kafka.topics.registry.clone(),
                partition: delivery.partition,
                offset: delivery.offset,
                payload: Payload::Registry(e),
            });
        }
        tokio::time::sleep(Duration::from_millis(1_200)).await;
    }
    // Wait for the cleaner: fewer records readable than were written.
    let t0 = Instant::now();
    let compacted = loop {
        let now = registry_part(&read_topics(&p.kafka)?, &p.kafka.topics.registry);
        if now.len() < history.len() {
            break now;
        }
        if t0.elapsed() > Duration::from_secs(150) {
            bail!(
                "the broker never compacted {} ({} records)",
                p.kafka.topics.registry,
                now.len()
            );
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    };
    eprintln!(
        "[faults] compaction: {} registry records written, {} left after {:.1} s",
        history.len(),
        compacted.len(),
        t0.elapsed().as_secs_f64()
    );
    let want = expected_registry(&history);
    ensure!(
        expected_registry(&compacted) == want,
        "compaction changed the registry's replay"
    );

    // ingest and `possync registry list` replay the compacted topic.
    let listed: BTreeSet<_> = possync::registry::list(&p.kafka, Duration::from_secs(30))
        .await?
        .into_iter()
        .map(|e| (e.strategy, e.account, e.con_id, e.priority))
        .collect();
    let active: BTreeSet<_> = want
        .iter()
        .filter(|(_, v)| v.0)
        .map(|((s, a, c), v)| (s.clone(), a.clone(), *c, v.1))
        .collect();
    ensure!(
        listed == active,
        "registry list after compaction: {listed:?}\nwant {active:?}"
    );
    p.start_ingest()?;
    p.start_queue_worker()?;
    for m in 0..p.members.len() {
        p.start_member(m)?;
    }
    p.start_fills().await?;
    p.wait_recovered("start after compaction", Instant::now(), crate::RECOVER)
        .await?;
    let report = p.finish().await?;

    // Ingest routed by the replayed registry: every ACTIVE event is for a covered contract.
    let covered: BTreeSet<(String, i64)> = active
        .iter()
        .filter_map(|(_, a, c, _)| a.clone().map(|a| (a, *c)))
        .collect();
    let all = read_topics(&p.kafka)?;
    let mut active_events = 0;
    for m in all.iter().filter(|m| m.topic == p.kafka.topics.active) {
        if let Payload::Position(e) = &m.payload {
            active_events += 1;
            ensure!(
                covered.contains(&(e.account.clone(), e.con_id)),
                "ACTIVE event for an uncovered contract {}:{}",
                e.account,
                e.con_id
            );
        }
    }
    ensure!(active_events > 0, "no contract was streamed on the active route");
    eprintln!("[faults] compaction replay: {report:?}, {active_events} active events");
    Ok(())
}
