//! Dumps Kafka topics to JSON lines and loads such a dump into another cluster with every record
//! at its original offset: the topics half of a release fixture (`tests/fixtures/releases/`).
//!
//! Format, one JSON object per line, in (topic, partition, offset) order:
//! - a topic line `{"topic":T,"partitions":N}` before the records of topic T (so an empty
//!   topic, such as the never-written lease topic, and partitions without records survive);
//! - a record line `{"topic","partition","offset","timestamp","key","value","headers"}`:
//!   `timestamp` is the CreateTime in ms, `key` and `value` lowercase hex or null,
//!   `headers` a list of `[name, hex or null]`.
//!
//! Invariant of [`load`]: each record lands at its dumped offset in its dumped partition with
//! the same key, value, headers and timestamp, or the load fails. The tables of a release store
//! Kafka offsets (and the materializer checks the timestamp at its stored offset), so nothing
//! less will do; it needs a dense log (no gaps from compaction or transaction markers) and
//! empty target partitions.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufWriter, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientConfig, Offset, Timestamp, TopicPartitionList};
use serde::{Deserialize, Serialize};

const TIMEOUT: Duration = Duration::from_secs(30);

/// A record line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub timestamp: i64,
    pub key: Option<String>,
    pub value: Option<String>,
    pub headers: Vec<(String, Option<String>)>,
}

/// A topic line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicLine {
    pub topic: String,
    pub partitions: i32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum Line {
    Record(Record),
    Topic(TopicLine),
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 15)] as char);
    }
    s
}

/// The bytes of a hex string.
pub fn unhex(s: &str) -> anyhow::Result<Vec<u8>> {
    ensure!(s.len().is_multiple_of(2), "odd-length hex string");
    let digit = |c: u8| -> anyhow::Result<u8> {
        Ok(match c {
            b'0'..=b'9' => c - b'0',
            b'a'..=b'f' => c - b'a' + 10,
            b'A'..=b'F' => c - b'A' + 10,
            _ => bail!("not a hex digit: {:?}", c as char),
        })
    };
    s.as_bytes()
        .chunks(2)
        .map(|p| Ok(digit(p[0])? << 4 | digit(p[1])?))
        .collect()
}

fn consumer(bootstrap: &str) -> anyhow::Result<BaseConsumer> {
    Ok(ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "possync-topic-dump")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "true")
        .set("isolation.level", "read_committed")
        .set("allow.auto.create.topics", "false")
        .create()?)
}

/// Partition counts of every topic of the cluster.
fn topic_partitions(c: &BaseConsumer) -> anyhow::Result<BTreeMap<String, i32>> {
    let md = c.fetch_metadata(None, TIMEOUT).context("fetch metadata")?;
    Ok(md
        .topics()
        .iter()
        .filter(|t| t.error().is_none())
        .map(|t| (t.name().to_string(), t.partitions().len() as i32))
        .collect())
}

/// Writes `topics` to `out` (see the module docs): every record from each partition's low
/// watermark to its high watermark. Returns the number of records.
///
/// # Errors
/// A missing topic, a record with a LogAppendTime or no timestamp (it could not be reproduced),
/// a partition not read to its end within 60 s, I/O.
pub async fn dump(bootstrap: &str, topics: &[String], out: &Path) -> anyhow::Result<usize> {
    let (bootstrap, topics, out) = (bootstrap.to_string(), topics.to_vec(), out.to_path_buf());
    tokio::task::spawn_blocking(move || dump_blocking(&bootstrap, &topics, &out)).await?
}

fn dump_blocking(bootstrap: &str, topics: &[String], out: &Path) -> anyhow::Result<usize> {
    let c = consumer(bootstrap)?;
    let known = topic_partitions(&c)?;
    let mut topics = topics.to_vec();
    topics.sort();
    topics.dedup();
    let mut w = BufWriter::new(std::fs::File::create(out).with_context(|| format!("create {}", out.display()))?);
    let mut count = 0;
    for topic in &topics {
        let partitions = *known
            .get(topic)
            .with_context(|| format!("topic {topic} does not exist on {bootstrap}"))?;
        serde_json::to_writer(
            &mut w,
            &TopicLine {
                topic: topic.clone(),
                partitions,
            },
        )?;
        w.write_all(b"\n")?;
        for partition in 0..partitions {
            for r in read_partition(&c, topic, partition)? {
                serde_json::to_writer(&mut w, &r)?;
                w.write_all(b"\n")?;
                count += 1;
            }
        }
    }
    w.flush()?;
    Ok(count)
}

fn read_partition(c: &BaseConsumer, topic: &str, partition: i32) -> anyhow::Result<Vec<Record>> {
    let (low, high) = c
        .fetch_watermarks(topic, partition, TIMEOUT)
        .with_context(|| format!("watermarks of {topic}/{partition}"))?;
    let mut out = Vec::new();
    if high <= low {
        return Ok(out);
    }
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, Offset::Offset(low))?;
    c.assign(&tpl)?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        ensure!(
            Instant::now() < deadline,
            "{topic}/{partition}: not read to its high watermark {high} within 60 s (at {:?})",
            out.last().map(|r: &Record| r.offset)
        );
        match c.poll(Duration::from_millis(200)) {
            None => continue,
            Some(Err(rdkafka::error::KafkaError::PartitionEOF(p))) if p == partition => break,
            Some(Err(e)) => bail!("reading {topic}/{partition}: {e}"),
            Some(Ok(m)) => {
                let timestamp = match m.timestamp() {
                    Timestamp::CreateTime(ms) => ms,
                    other => bail!(
                        "{topic}/{partition}@{}: timestamp {other:?} is not a CreateTime",
                        m.offset()
                    ),
                };
                let headers = m
                    .headers()
                    .map(|hs| hs.iter().map(|h| (h.key.to_string(), h.value.map(hex))).collect())
                    .unwrap_or_default();
                out.push(Record {
                    topic: topic.to_string(),
                    partition,
                    offset: m.offset(),
                    timestamp,
                    key: m.key().map(hex),
                    value: m.payload().map(hex),
                    headers,
                });
                if m.offset() >= high - 1 {
                    break;
                }
            }
        }
    }
    c.unassign()?;
    Ok(out)
}

/// Reads a dump: topic partition counts (a topic line's, else the greatest dumped partition
/// + 1) and the records, with `rename` applied to every topic name.
pub fn read(dump: &Path, rename: impl Fn(&str) -> String) -> anyhow::Result<(BTreeMap<String, i32>, Vec<Record>)> {
    let file = std::fs::File::open(dump).with_context(|| format!("open {}", dump.display()))?;
    let (mut partitions, mut records) = (BTreeMap::new(), Vec::new());
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<Line>(&line).with_context(|| format!("{}:{}", dump.display(), i + 1))? {
            Line::Topic(t) => {
                partitions.insert(rename(&t.topic), t.partitions);
            }
            Line::Record(mut r) => {
                r.topic = rename(&r.topic);
                let n = partitions.entry(r.topic.clone()).or_insert(0);
                *n = (*n).max(r.partition + 1);
                records.push(r);
            }
        }
    }
    Ok((partitions, records))
}

/// Produces every record of `dump` (topics renamed by `rename`) to the same partition at the
/// same offset, with the same key, value, headers and timestamp. Missing topics are created
/// with the dumped partition count, the broker's replication factor, `cleanup.policy=compact`
/// for a name ending in `registry` (possync's registry topic) and `delete` with infinite
/// retention otherwise (the dumped timestamps age, and a broker would delete old records at
/// once). Existing topics must have the same partition count and end where the dump starts
/// (normally: be empty). Returns the number of records.
///
/// # Errors
/// Any mismatch above, a record landing at another offset or partition, a failed delivery.
pub async fn load(bootstrap: &str, dump: &Path, rename: impl Fn(&str) -> String) -> anyhow::Result<usize> {
    let (partitions, records) = read(dump, rename)?;
    let b = bootstrap.to_string();
    let want = partitions.clone();
    let first: BTreeMap<(String, i32), i64> = records.iter().fold(BTreeMap::new(), |mut m, r| {
        m.entry((r.topic.clone(), r.partition)).or_insert(r.offset);
        m
    });
    let missing = tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<(String, i32)>> {
        let c = consumer(&b)?;
        let known = topic_partitions(&c)?;
        let mut missing = Vec::new();
        for (topic, n) in &want {
            match known.get(topic) {
                None => missing.push((topic.clone(), *n)),
                Some(have) if have != n => {
                    bail!("topic {topic} exists with {have} partitions, the dump has {n}")
                }
                Some(_) => {
                    for p in 0..*n {
                        let start = first.get(&(topic.clone(), p)).copied().unwrap_or(0);
                        let (_, high) = c.fetch_watermarks(topic, p, TIMEOUT)?;
                        ensure!(
                            high == start,
                            "{topic}/{p} ends at offset {high}, but the dump starts it at {start}: load into empty topics"
                        );
                    }
                }
            }
        }
        Ok(missing)
    })
    .await??;
    create_topics(bootstrap, &missing).await?;

    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .set("message.timeout.ms", "60000")
        .create()?;
    // Bounded batches of in-flight sends: idempotence keeps each partition's order.
    let mut done = 0;
    for chunk in records.chunks(1000) {
        let mut pending = Vec::with_capacity(chunk.len());
        for r in chunk {
            let key = r.key.as_deref().map(unhex).transpose()?;
            let value = r.value.as_deref().map(unhex).transpose()?;
            let mut headers = OwnedHeaders::new_with_capacity(r.headers.len());
            let header_values: Vec<Option<Vec<u8>>> = r
                .headers
                .iter()
                .map(|(_, v)| v.as_deref().map(unhex).transpose())
                .collect::<anyhow::Result<_>>()?;
            for ((name, _), v) in r.headers.iter().zip(&header_values) {
                headers = headers.insert(Header {
                    key: name,
                    value: v.as_deref(),
                });
            }
            let mut rec: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&r.topic)
                .partition(r.partition)
                .timestamp(r.timestamp)
                .headers(headers);
            if let Some(k) = &key {
                rec = rec.key(k.as_slice());
            }
            if let Some(v) = &value {
                rec = rec.payload(v.as_slice());
            }
            let fut = producer
                .send_result(rec)
                .map_err(|(e, _)| anyhow::anyhow!("enqueue {}/{}@{}: {e}", r.topic, r.partition, r.offset))?;
            pending.push((r, fut));
        }
        for (r, fut) in pending {
            let d = fut
                .await
                .context("producer dropped a delivery")?
                .map_err(|(e, _)| anyhow::anyhow!("deliver {}/{}@{}: {e}", r.topic, r.partition, r.offset))?;
            ensure!(
                d.partition == r.partition && d.offset == r.offset,
                "{}: record dumped at {}@{} landed at {}@{}; offsets are not reproduced (target not empty, or a gap in the dumped log)",
                r.topic,
                r.partition,
                r.offset,
                d.partition,
                d.offset
            );
            done += 1;
        }
    }
    Ok(done)
}

async fn create_topics(bootstrap: &str, topics: &[(String, i32)]) -> anyhow::Result<()> {
    if topics.is_empty() {
        return Ok(());
    }
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new().set("bootstrap.servers", bootstrap).create()?;
    let new: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|(name, n)| {
            let t = NewTopic::new(name, *n, TopicReplication::Fixed(-1));
            if name.ends_with("registry") {
                t.set("cleanup.policy", "compact")
            } else {
                t.set("cleanup.policy", "delete").set("retention.ms", "-1")
            }
        })
        .collect();
    let opts = AdminOptions::new()
        .operation_timeout(Some(TIMEOUT))
        .request_timeout(Some(TIMEOUT));
    for r in admin.create_topics(new.iter(), &opts).await.context("create topics")? {
        match r {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => bail!("create topic {topic}: {code}"),
        }
    }
    // Wait until every partition has a leader.
    let b = bootstrap.to_string();
    let topics = topics.to_vec();
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        let c = consumer(&b)?;
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let md = c.fetch_metadata(None, TIMEOUT)?;
            let ready = topics.iter().all(|(name, n)| {
                md.topics().iter().any(|t| {
                    t.name() == name
                        && t.error().is_none()
                        && t.partitions().len() as i32 == *n
                        && t.partitions().iter().all(|p| p.leader() >= 0 && p.error().is_none())
                })
            });
            if ready {
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "created topics have no leaders after {TIMEOUT:?}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    })
    .await?
}
