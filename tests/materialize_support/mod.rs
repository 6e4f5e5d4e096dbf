//! Shared helpers of the materialize integration tests: an embedded broker with unique topics,
//! an event generator, producing with coordinates, reading the tables back, and independent
//! replays of what each upsert table must hold.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use deltalake::arrow::array::{Array, AsArray, RecordBatch};
use deltalake::arrow::datatypes::{Int32Type, Int64Type, TimestampMicrosecondType};
use possync::events::{new_id, PositionEvent, RegistryAction, RegistryEvent, Route, Source};
use possync::executions::{ExecSource, ExecutionEvent, Side};
use possync::kafka::{EmbeddedBroker, KafkaConfig, Topics};
use possync::materialize::{read_table, MaterializeConfig, TableKind};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use rdkafka::producer::{FutureProducer, FutureRecord};

/// A broker, topics and a table directory for one test.
pub struct Env {
    pub broker: EmbeddedBroker,
    pub kafka: KafkaConfig,
    pub dir: tempfile::TempDir,
    pub base: String,
}

impl Env {
    pub fn start(partitions: i32) -> anyhow::Result<Env> {
        let broker = EmbeddedBroker::start(1)?;
        let mut kafka = KafkaConfig::new(broker.bootstrap());
        kafka.topics = Topics::new(&format!("t{}.", &new_id()[..8]));
        broker.create_topics(&kafka.topics, partitions)?;
        let dir = tempfile::tempdir()?;
        let base = dir.path().join("tables").to_string_lossy().into_owned();
        Ok(Env {
            broker,
            kafka,
            dir,
            base,
        })
    }

    pub fn config(&self, group: &str) -> MaterializeConfig {
        MaterializeConfig {
            table_uri: self.base.clone(),
            group: group.to_string(),
            flush_latency: Duration::from_millis(300),
            checkpoint_every: 10,
            ..MaterializeConfig::default()
        }
    }

    pub fn producer(&self) -> anyhow::Result<FutureProducer> {
        Ok(self.kafka.producer().create()?)
    }

    /// The producer settings a pipeline makes its dead-letter producer from.
    pub fn producer_config(&self) -> rdkafka::ClientConfig {
        self.kafka.producer()
    }

    pub async fn namespace(&self) -> anyhow::Result<String> {
        Ok(possync::materialize::namespace(&self.kafka, None).await?)
    }
}

/// What a produced message was.
#[derive(Debug, Clone)]
#[allow(clippy::large_enum_variant)] // test data, built once per message
pub enum Payload {
    Position(PositionEvent),
    Registry(RegistryEvent),
    Execution(ExecutionEvent),
    /// Must end in the dead letters.
    Poison,
}

/// A produced message and where it landed.
#[derive(Debug, Clone)]
pub struct Produced {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub payload: Payload,
}

/// A message to produce.
pub struct Outgoing {
    pub topic: String,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub payload: Payload,
}

/// Produces messages concurrently (order per key is kept by the idempotent producer).
pub async fn produce(p: &FutureProducer, items: Vec<Outgoing>) -> anyhow::Result<Vec<Produced>> {
    let futs = items.into_iter().map(|o| async move {
        let mut rec: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&o.topic);
        if let Some(k) = &o.key {
            rec = rec.key(k.as_slice());
        }
        if let Some(v) = &o.value {
            rec = rec.payload(v.as_slice());
        }
        let d = p.send(rec, Duration::from_secs(30)).await.map_err(|(e, _)| e)?;
        anyhow::Ok(Produced {
            topic: o.topic.clone(),
            partition: d.partition,
            offset: d.offset,
            payload: o.payload,
        })
    });
    futures::future::join_all(futs).await.into_iter().collect()
}

/// Generates position and registry events with out-of-order ingest times, closes, polls.
pub struct Gen {
    rng: SmallRng,
    topics: Topics,
    sessions: [String; 2],
    seq: [i64; 2],
    clock: i64,
    keys: u64,
    /// Executions generated so far (a correction revises one of them).
    executions: Vec<ExecutionEvent>,
}

impl Gen {
    pub fn new(seed: u64, topics: &Topics, keys: u64) -> Self {
        Self {
            rng: SmallRng::seed_from_u64(seed),
            topics: topics.clone(),
            sessions: [new_id(), new_id()],
            seq: [0, 0],
            clock: 1_767_225_600_000_000, // 2026-01-01
            keys,
            executions: Vec::new(),
        }
    }

    pub fn position(&mut self) -> Outgoing {
        let k = self.rng.gen_range(0..self.keys);
        let s = self.rng.gen_range(0..2usize);
        self.seq[s] += 1;
        self.clock += 1_000;
        // Ingest times jitter around the clock: some events arrive after newer ones.
        let ingest_time = self.clock + self.rng.gen_range(-3_000..3_000) + (k as i64 % 3) * 86_400_000_000 / 2;
        let active = self.rng.gen_bool(0.5);
        let route = if active { Route::Active } else { Route::Queued };
        let source = if active {
            if self.rng.gen_bool(0.7) {
                Source::Pnl
            } else {
                Source::Stream
            }
        } else {
            [
                Source::Snapshot,
                Source::Stream,
                Source::Poll,
                Source::Poll,
                Source::Reconcile,
            ][self.rng.gen_range(0..5)]
        };
        let position = if source == Source::Reconcile {
            0.0
        } else {
            self.rng.gen_range(-3..4) as f64
        };
        let e = PositionEvent {
            event_id: new_id(),
            session_id: self.sessions[s].clone(),
            sequence: self.seq[s],
            account: format!("DU{}", k % 3),
            con_id: 500_000 + k as i64,
            symbol: "SPY".into(),
            sec_type: "OPT".into(),
            expiry: Some("20261218".into()),
            strike: Some(500.0 + k as f64),
            right: Some("C".into()),
            multiplier: Some("100".into()),
            exchange: "SMART".into(),
            currency: "USD".into(),
            local_symbol: format!("SPY 261218C{k}"),
            trading_class: "SPY".into(),
            position,
            avg_cost: 100.0 + self.rng.gen_range(0..100) as f64,
            daily_pnl: active.then_some(1.5),
            unrealized_pnl: None,
            realized_pnl: None,
            market_value: active.then_some(10.0),
            route,
            source,
            strategies: if active { vec!["wheel".into()] } else { vec![] },
            ib_time: ingest_time - 500,
            ingest_time,
        };
        let topic = if active {
            self.topics.active.clone()
        } else {
            self.topics.queued.clone()
        };
        Outgoing {
            topic,
            key: Some(e.key().into_bytes()),
            value: Some(e.encode().expect("encodes")),
            payload: Payload::Position(e),
        }
    }

    pub fn registry(&mut self) -> Outgoing {
        let k = self.rng.gen_range(0..self.keys.min(20));
        self.clock += 1_000;
        let e = RegistryEvent {
            event_id: new_id(),
            strategy: ["wheel", "hedge"][self.rng.gen_range(0..2)].into(),
            account: if k % 4 == 0 { None } else { Some(format!("DU{}", k % 3)) },
            con_id: 500_000 + k as i64,
            action: if self.rng.gen_bool(0.6) {
                RegistryAction::Activate
            } else {
                RegistryAction::Deactivate
            },
            priority: self.rng.gen_range(0..10),
            time: self.clock + self.rng.gen_range(-3_000..3_000),
            actor: "test".into(),
        };
        Outgoing {
            topic: self.topics.registry.clone(),
            key: Some(e.key().into_bytes()),
            value: Some(e.encode().expect("encodes")),
            payload: Payload::Registry(e),
        }
    }

    /// An execution on the executions topic: a new fill (one in five without a commission),
    /// or one in six times a correction (`.02`, `.03`, ...) of an earlier one. Exec times move
    /// across a few days, so `event_date` has several partitions.
    pub fn execution(&mut self) -> Outgoing {
        self.clock += 1_000;
        let n = self.executions.len();
        let e = if n > 0 && self.rng.gen_bool(1.0 / 6.0) {
            let prev = self.executions[self.rng.gen_range(0..n)].clone();
            let last = self
                .executions
                .iter()
                .filter(|e| e.exec_stem == prev.exec_stem)
                .map(|e| e.revision)
                .max()
                .unwrap_or(1);
            correction(&prev, last + 1, prev.shares + 1.0, prev.price + 0.05, self.clock)
        } else {
            let k = self.rng.gen_range(0..self.keys);
            let mut e = execution(
                &format!("DU{}", k % 3),
                500_000 + k as i64,
                &format!("0000e0d5.{:08x}.01", n),
                self.clock + (k as i64 % 3) * 86_400_000_000,
            );
            e.side = if self.rng.gen_bool(0.5) { Side::Bot } else { Side::Sld };
            e.shares = self.rng.gen_range(1..10) as f64;
            e.price = self.rng.gen_range(5..500) as f64 / 100.0;
            if self.rng.gen_bool(0.2) {
                e.commission = None;
                e.commission_currency = None;
            }
            if self.rng.gen_bool(0.3) {
                e.realized_pnl = Some(self.rng.gen_range(-500..500) as f64 / 10.0);
            }
            e
        };
        self.executions.push(e.clone());
        execution_out(&self.topics, e)
    }

    /// Poison on the executions topic: garbage, a position event (another schema), a key of
    /// another contract, an `exec_time` no reader can hold.
    pub fn execution_poison(&mut self, which: usize) -> Outgoing {
        self.clock += 1_000;
        let mut e = execution("DU1", 500_001, &format!("bad.{which}"), self.clock);
        let key = e.key().into_bytes();
        let (key, value) = match which % 4 {
            0 => (key, b"\0\0\0\0\x03garbage".to_vec()),
            1 => (key, self.position().value.expect("value")),
            2 => (b"DU1:999".to_vec(), e.encode().expect("encodes")),
            _ => {
                e.exec_time = i64::MAX;
                (key, e.encode().expect("encodes"))
            }
        };
        Outgoing {
            topic: self.topics.executions.clone(),
            key: Some(key),
            value: Some(value),
            payload: Payload::Poison,
        }
    }

    /// A mix of poison: garbage, a wrong schema id, a route on the wrong topic, a tombstone,
    /// a valid event whose `ingest_time` is `i64::MAX` (no date, no reader can hold it).
    pub fn poison(&mut self, which: usize) -> Outgoing {
        let mut good = match self.position() {
            Outgoing {
                payload: Payload::Position(e),
                ..
            } => e,
            _ => unreachable!(),
        };
        let (topic, value) = match which % 5 {
            0 => (self.topics.active.clone(), Some(b"not avro at all".to_vec())),
            1 => (self.topics.queued.clone(), Some(self.registry().value.expect("value"))),
            2 => {
                good.route = Route::Queued;
                (self.topics.active.clone(), Some(good.encode().expect("encodes")))
            }
            3 => (self.topics.registry.clone(), None),
            _ => {
                good.ingest_time = i64::MAX;
                let topic = match good.route {
                    Route::Active => self.topics.active.clone(),
                    Route::Queued => self.topics.queued.clone(),
                };
                (topic, Some(good.encode().expect("encodes")))
            }
        };
        Outgoing {
            topic,
            key: Some(good.key().into_bytes()),
            value,
            payload: Payload::Poison,
        }
    }
}

/// Polls `f` until it returns `Ok(true)` or the deadline passes.
pub async fn wait_for<F, Fut>(what: &str, timeout: Duration, mut f: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<bool>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if f().await? {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn strs<'a>(b: &'a RecordBatch, n: &str) -> &'a deltalake::arrow::array::StringArray {
    b.column_by_name(n)
        .unwrap_or_else(|| panic!("column {n}"))
        .as_string::<i32>()
}
fn longs<'a>(b: &'a RecordBatch, n: &str) -> &'a deltalake::arrow::array::Int64Array {
    b.column_by_name(n)
        .unwrap_or_else(|| panic!("column {n}"))
        .as_primitive::<Int64Type>()
}
fn times<'a>(b: &'a RecordBatch, n: &str) -> &'a deltalake::arrow::array::TimestampMicrosecondArray {
    b.column_by_name(n)
        .unwrap_or_else(|| panic!("column {n}"))
        .as_primitive::<TimestampMicrosecondType>()
}
fn opt_time(a: &deltalake::arrow::array::TimestampMicrosecondArray, i: usize) -> Option<i64> {
    a.is_valid(i).then(|| a.value(i))
}

/// (topic, partition, offset) → event_id of every `position_events` row (duplicates kept).
pub async fn event_rows(base: &str) -> anyhow::Result<Vec<((String, i32, i64), String)>> {
    let mut out = Vec::new();
    for b in read_table(base, TableKind::PositionEvents).await? {
        let (t, p, o, id) = (
            strs(&b, "kafka_topic"),
            b.column_by_name("kafka_partition").unwrap().as_primitive::<Int32Type>(),
            longs(&b, "kafka_offset"),
            strs(&b, "event_id"),
        );
        for i in 0..b.num_rows() {
            out.push((
                (t.value(i).to_string(), p.value(i), o.value(i)),
                id.value(i).to_string(),
            ));
        }
    }
    out.sort();
    Ok(out)
}

/// What `position_events` must hold.
pub fn expected_event_rows(produced: &[Produced]) -> Vec<((String, i32, i64), String)> {
    let mut v: Vec<_> = produced
        .iter()
        .filter_map(|p| match &p.payload {
            Payload::Position(e) => Some(((p.topic.clone(), p.partition, p.offset), e.event_id.clone())),
            _ => None,
        })
        .collect();
    v.sort();
    v
}

type Order = (i64, String, i64, String);
fn order(e: &PositionEvent) -> Order {
    (e.ingest_time, e.session_id.clone(), e.sequence, e.event_id.clone())
}

/// positions_current by replay: newest event per key → its event_id and position.
pub fn expected_current(produced: &[Produced]) -> BTreeMap<(String, i64), (String, f64)> {
    let mut best: BTreeMap<(String, i64), &PositionEvent> = BTreeMap::new();
    for p in produced {
        if let Payload::Position(e) = &p.payload {
            let slot = best.entry((e.account.clone(), e.con_id)).or_insert(e);
            if order(e) > order(slot) {
                *slot = e;
            }
        }
    }
    best.into_iter()
        .map(|(k, e)| (k, (e.event_id.clone(), e.position)))
        .collect()
}

pub async fn actual_current(base: &str) -> anyhow::Result<BTreeMap<(String, i64), (String, f64)>> {
    let mut out = BTreeMap::new();
    for b in read_table(base, TableKind::PositionsCurrent).await? {
        let pos = b
            .column_by_name("position")
            .unwrap()
            .as_primitive::<deltalake::arrow::datatypes::Float64Type>();
        for i in 0..b.num_rows() {
            let k = (strs(&b, "account").value(i).to_string(), longs(&b, "con_id").value(i));
            if out
                .insert(k.clone(), (strs(&b, "event_id").value(i).to_string(), pos.value(i)))
                .is_some()
            {
                bail!("positions_current holds {k:?} twice");
            }
        }
    }
    Ok(out)
}

/// One queue row as compared: status, refresh_count, queued_events, enqueued_at,
/// last_refreshed_at, last_event_id, last_active_at.
pub type QueueView = (String, i64, i64, Option<i64>, Option<i64>, Option<String>, Option<i64>);

/// position_queue by replay, written from the documented rules (independently of the crate).
pub fn expected_queue(produced: &[Produced]) -> BTreeMap<(String, i64), QueueView> {
    let mut by_key: BTreeMap<(String, i64), Vec<&PositionEvent>> = BTreeMap::new();
    for p in produced {
        if let Payload::Position(e) = &p.payload {
            by_key.entry((e.account.clone(), e.con_id)).or_default().push(e);
        }
    }
    by_key
        .into_iter()
        .map(|(k, evs)| {
            let queued: Vec<&&PositionEvent> = evs.iter().filter(|e| e.route == Route::Queued).collect();
            let active_at = evs
                .iter()
                .filter(|e| e.route == Route::Active)
                .map(|e| e.ingest_time)
                .max();
            let polls: Vec<i64> = queued
                .iter()
                .filter(|e| e.source == Source::Poll)
                .map(|e| e.ingest_time)
                .collect();
            let enq = queued
                .iter()
                .filter(|e| e.source != Source::Poll)
                .map(|e| e.ingest_time)
                .max();
            let last = queued.iter().max_by_key(|e| order(e));
            let status = match (last, active_at) {
                (None, _) => "active",
                (Some(l), Some(a)) if a > l.ingest_time => "active",
                (Some(l), _) if l.position == 0.0 => "closed",
                (Some(l), _) if l.source == Source::Poll => "refreshed",
                _ => "pending",
            };
            let view = (
                status.to_string(),
                polls.len() as i64,
                queued.len() as i64,
                enq,
                polls.iter().copied().max(),
                last.map(|e| e.event_id.clone()),
                active_at,
            );
            (k, view)
        })
        .collect()
}

pub async fn actual_queue(base: &str) -> anyhow::Result<BTreeMap<(String, i64), QueueView>> {
    let mut out = BTreeMap::new();
    for b in read_table(base, TableKind::PositionQueue).await? {
        let ev = strs(&b, "last_event_id");
        for i in 0..b.num_rows() {
            let k = (strs(&b, "account").value(i).to_string(), longs(&b, "con_id").value(i));
            let v = (
                strs(&b, "status").value(i).to_string(),
                longs(&b, "refresh_count").value(i),
                longs(&b, "queued_events").value(i),
                opt_time(times(&b, "enqueued_at"), i),
                opt_time(times(&b, "last_refreshed_at"), i),
                ev.is_valid(i).then(|| ev.value(i).to_string()),
                opt_time(times(&b, "last_active_at"), i),
            );
            if out.insert(k.clone(), v).is_some() {
                bail!("position_queue holds {k:?} twice");
            }
        }
    }
    Ok(out)
}

pub type RegistryView = (bool, i32, i64, String);

pub fn expected_registry(produced: &[Produced]) -> BTreeMap<(String, Option<String>, i64), RegistryView> {
    let mut best: BTreeMap<(String, Option<String>, i64), &RegistryEvent> = BTreeMap::new();
    for p in produced {
        if let Payload::Registry(e) = &p.payload {
            let slot = best
                .entry((e.strategy.clone(), e.account.clone(), e.con_id))
                .or_insert(e);
            if (e.time, &e.event_id) > (slot.time, &slot.event_id) {
                *slot = e;
            }
        }
    }
    best.into_iter()
        .map(|(k, e)| {
            (
                k,
                (
                    e.action == RegistryAction::Activate,
                    e.priority,
                    e.time,
                    e.event_id.clone(),
                ),
            )
        })
        .collect()
}

pub async fn actual_registry(base: &str) -> anyhow::Result<BTreeMap<(String, Option<String>, i64), RegistryView>> {
    let mut out = BTreeMap::new();
    for b in read_table(base, TableKind::StrategyRegistry).await? {
        let acct = strs(&b, "account");
        let active = b.column_by_name("active").unwrap().as_boolean();
        let prio = b.column_by_name("priority").unwrap().as_primitive::<Int32Type>();
        for i in 0..b.num_rows() {
            let k = (
                strs(&b, "strategy").value(i).to_string(),
                acct.is_valid(i).then(|| acct.value(i).to_string()),
                longs(&b, "con_id").value(i),
            );
            out.insert(
                k,
                (
                    active.value(i),
                    prio.value(i),
                    times(&b, "updated_at").value(i),
                    strs(&b, "event_id").value(i).to_string(),
                ),
            );
        }
    }
    Ok(out)
}

/// (topic, partition, offset) → event_id of every `registry_events` row (duplicates kept).
pub async fn registry_event_rows(base: &str) -> anyhow::Result<Vec<((String, i32, i64), String)>> {
    let mut out = Vec::new();
    for b in read_table(base, TableKind::RegistryEvents).await? {
        let p = b.column_by_name("kafka_partition").unwrap().as_primitive::<Int32Type>();
        for i in 0..b.num_rows() {
            out.push((
                (
                    strs(&b, "kafka_topic").value(i).to_string(),
                    p.value(i),
                    longs(&b, "kafka_offset").value(i),
                ),
                strs(&b, "event_id").value(i).to_string(),
            ));
        }
    }
    out.sort();
    Ok(out)
}

/// What `registry_events` must hold: every valid registry message, by coordinates.
pub fn expected_registry_event_rows(produced: &[Produced]) -> Vec<((String, i32, i64), String)> {
    let mut v: Vec<_> = produced
        .iter()
        .filter_map(|p| match &p.payload {
            Payload::Registry(e) => Some(((p.topic.clone(), p.partition, p.offset), e.event_id.clone())),
            _ => None,
        })
        .collect();
    v.sort();
    v
}

/// (topic, partition, offset) of every dead-letter row.
pub async fn dead_letter_rows(base: &str) -> anyhow::Result<Vec<(String, i32, i64)>> {
    let mut out = Vec::new();
    for b in read_table(base, TableKind::DeadLetters).await? {
        let p = b.column_by_name("kafka_partition").unwrap().as_primitive::<Int32Type>();
        for i in 0..b.num_rows() {
            out.push((
                strs(&b, "kafka_topic").value(i).to_string(),
                p.value(i),
                longs(&b, "kafka_offset").value(i),
            ));
        }
    }
    out.sort();
    Ok(out)
}

/// Checks every table against the produced messages: no loss, no duplicate, replays equal.
pub async fn check_exact(base: &str, produced: &[Produced]) -> anyhow::Result<()> {
    let rows = event_rows(base).await?;
    let want = expected_event_rows(produced);
    if rows != want {
        let have: std::collections::BTreeSet<_> = rows.iter().collect();
        let wanted: std::collections::BTreeSet<_> = want.iter().collect();
        let missing = wanted.difference(&have).count();
        let extra = rows.len() as i64 - have.len() as i64;
        bail!(
            "position_events: {} rows, want {}; {missing} missing, {extra} duplicated",
            rows.len(),
            want.len()
        );
    }
    let (c, wc) = (actual_current(base).await?, expected_current(produced));
    if c != wc {
        let diff: Vec<_> = wc
            .iter()
            .filter(|(k, v)| c.get(*k) != Some(v))
            .take(3)
            .map(|(k, v)| (k, v, c.get(k)))
            .collect();
        let extra = c.keys().filter(|k| !wc.contains_key(*k)).count();
        let rows: usize = read_table(base, TableKind::PositionsCurrent)
            .await?
            .iter()
            .map(|b| b.num_rows())
            .sum();
        bail!(
            "positions_current differs from the replay ({} keys, {rows} live rows, want {} keys; {extra} unexpected), e.g. {diff:?}",
            c.len(),
            wc.len()
        );
    }
    let (q, wq) = (actual_queue(base).await?, expected_queue(produced));
    if q != wq {
        let diff: Vec<_> = wq
            .iter()
            .filter(|(k, v)| q.get(*k) != Some(v))
            .take(3)
            .map(|(k, v)| (k, v, q.get(k)))
            .collect();
        bail!(
            "position_queue differs from the replay ({} vs {} rows), e.g. {diff:?}",
            q.len(),
            wq.len()
        );
    }
    check_summaries(base).await?;
    anyhow::ensure!(
        actual_registry(base).await? == expected_registry(produced),
        "strategy_registry differs from the replay"
    );
    let (r, wr) = (registry_event_rows(base).await?, expected_registry_event_rows(produced));
    if r != wr {
        let have: std::collections::BTreeSet<_> = r.iter().collect();
        let wanted: std::collections::BTreeSet<_> = wr.iter().collect();
        bail!(
            "registry_events: {} rows, want {}; {} missing, {} unexpected, {} duplicated",
            r.len(),
            wr.len(),
            wanted.difference(&have).count(),
            have.difference(&wanted).count(),
            r.len() - have.len()
        );
    }
    check_executions(base, produced).await?;
    let mut poison: Vec<_> = produced
        .iter()
        .filter(|p| matches!(p.payload, Payload::Poison))
        .map(|p| (p.topic.clone(), p.partition, p.offset))
        .collect();
    poison.sort();
    anyhow::ensure!(
        dead_letter_rows(base).await? == poison,
        "dead_letters differ from the poison produced"
    );
    Ok(())
}

/// The counts `possync status` takes from the upsert tables' newest commit summaries equal a
/// scan of the tables (`status --exact`).
pub async fn check_summaries(base: &str) -> anyhow::Result<()> {
    for kind in [TableKind::PositionsCurrent, TableKind::PositionQueue] {
        let t = possync::materialize::tables::Table::open(base, kind).await?;
        let (cheap, from) = possync::ops::status::upsert_counts(&t, false).await?;
        let (scan, _) = possync::ops::status::upsert_counts(&t, true).await?;
        anyhow::ensure!(
            cheap == scan,
            "{}: the summary ({from}) counts {cheap:?}, a scan {scan:?}",
            kind.name()
        );
    }
    Ok(())
}

/// Runs `tests/py/read_tables.py` on the tables (DuckDB delta extension + Python deltalake).
pub fn python_readers(base: &str) -> anyhow::Result<serde_json::Value> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/py/read_tables.py");
    let out = std::process::Command::new("python3")
        .arg(script)
        .arg(base)
        .output()
        .context("run python3")?;
    if !out.status.success() {
        bail!("read_tables.py failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// (kafka_namespace, topic, partition, offset) of every row of an append-only table
/// (`position_events`, `registry_events`, `dead_letters`), duplicates kept, sorted.
pub async fn namespaced_coordinates(base: &str, kind: TableKind) -> anyhow::Result<Vec<(String, String, i32, i64)>> {
    let mut out = Vec::new();
    for b in read_table(base, kind).await? {
        let (ns, t, o) = (
            strs(&b, "kafka_namespace"),
            strs(&b, "kafka_topic"),
            longs(&b, "kafka_offset"),
        );
        let p = b.column_by_name("kafka_partition").unwrap().as_primitive::<Int32Type>();
        for i in 0..b.num_rows() {
            out.push((ns.value(i).to_string(), t.value(i).to_string(), p.value(i), o.value(i)));
        }
    }
    out.sort();
    Ok(out)
}

/// A fill as ingest publishes it: revision 1 of `stem`, with a commission.
pub fn execution(account: &str, con_id: i64, stem: &str, exec_time: i64) -> ExecutionEvent {
    ExecutionEvent {
        event_id: new_id(),
        session_id: "exec-session".into(),
        sequence: exec_time % 1_000_000,
        account: account.into(),
        con_id,
        symbol: "SPY".into(),
        sec_type: "OPT".into(),
        expiry: Some("20261218".into()),
        strike: Some(600.0),
        right: Some("C".into()),
        multiplier: Some("100".into()),
        currency: "USD".into(),
        local_symbol: format!("SPY   261218C{con_id}"),
        exec_id: format!("{stem}.01"),
        exec_stem: stem.into(),
        revision: 1,
        order_id: 17,
        perm_id: 99_000_017,
        client_id: 7,
        side: Side::Bot,
        shares: 3.0,
        price: 1.25,
        cum_qty: 3.0,
        avg_price: 1.25,
        exec_exchange: "CBOE".into(),
        exec_time,
        commission: Some(1.95),
        commission_currency: Some("USD".into()),
        realized_pnl: None,
        source: ExecSource::Live,
        ib_time: exec_time + 100,
        ingest_time: exec_time + 200,
    }
}

/// Revision `revision` of `e` (IB's correction: same stem, new quantity or price).
pub fn correction(e: &ExecutionEvent, revision: i32, shares: f64, price: f64, at: i64) -> ExecutionEvent {
    ExecutionEvent {
        event_id: new_id(),
        exec_id: format!("{}.{revision:02}", e.exec_stem),
        revision,
        shares,
        price,
        cum_qty: shares,
        avg_price: price,
        source: ExecSource::Requested,
        ib_time: at,
        ingest_time: at + 100,
        ..e.clone()
    }
}

/// `e` as a message of the executions topic, keyed `account:conId`.
pub fn execution_out(topics: &Topics, e: ExecutionEvent) -> Outgoing {
    Outgoing {
        topic: topics.executions.clone(),
        key: Some(e.key().into_bytes()),
        value: Some(e.encode().expect("encodes")),
        payload: Payload::Execution(e),
    }
}

type Coordinates = (String, i32, i64);

/// Every `executions` row: its (topic, partition, offset) and the event its columns hold,
/// sorted by coordinates, duplicates kept. Checks on the way that `event_date` is the UTC date
/// of `exec_time` and `kafka_namespace` is set.
pub async fn execution_rows(base: &str) -> anyhow::Result<Vec<(Coordinates, ExecutionEvent)>> {
    let mut out = Vec::new();
    for b in read_table(base, TableKind::Executions).await? {
        let s = |n: &str, i: usize| strs(&b, n).value(i).to_string();
        let opt_s = |n: &str, i: usize| {
            let a = strs(&b, n);
            a.is_valid(i).then(|| a.value(i).to_string())
        };
        let f = |n: &str| {
            b.column_by_name(n)
                .unwrap_or_else(|| panic!("column {n}"))
                .as_primitive::<deltalake::arrow::datatypes::Float64Type>()
                .clone()
        };
        let opt_f = |n: &str, i: usize| {
            let a = f(n);
            a.is_valid(i).then(|| a.value(i))
        };
        let int = |n: &str, i: usize| b.column_by_name(n).unwrap().as_primitive::<Int32Type>().value(i);
        let dates = b
            .column_by_name("event_date")
            .context("executions has event_date")?
            .as_primitive::<deltalake::arrow::datatypes::Date32Type>();
        for i in 0..b.num_rows() {
            let e = ExecutionEvent {
                event_id: s("event_id", i),
                session_id: s("session_id", i),
                sequence: longs(&b, "sequence").value(i),
                account: s("account", i),
                con_id: longs(&b, "con_id").value(i),
                symbol: s("symbol", i),
                sec_type: s("sec_type", i),
                expiry: opt_s("expiry", i),
                strike: opt_f("strike", i),
                right: opt_s("right", i),
                multiplier: opt_s("multiplier", i),
                currency: s("currency", i),
                local_symbol: s("local_symbol", i),
                exec_id: s("exec_id", i),
                exec_stem: s("exec_stem", i),
                revision: int("revision", i),
                order_id: longs(&b, "order_id").value(i),
                perm_id: longs(&b, "perm_id").value(i),
                client_id: int("client_id", i),
                side: match s("side", i).as_str() {
                    "BOT" => Side::Bot,
                    "SLD" => Side::Sld,
                    other => bail!("side {other:?}"),
                },
                shares: f("shares").value(i),
                price: f("price").value(i),
                cum_qty: f("cum_qty").value(i),
                avg_price: f("avg_price").value(i),
                exec_exchange: s("exec_exchange", i),
                exec_time: times(&b, "exec_time").value(i),
                commission: opt_f("commission", i),
                commission_currency: opt_s("commission_currency", i),
                realized_pnl: opt_f("realized_pnl", i),
                source: match s("source", i).as_str() {
                    "LIVE" => ExecSource::Live,
                    "REQUESTED" => ExecSource::Requested,
                    other => bail!("source {other:?}"),
                },
                ib_time: times(&b, "ib_time").value(i),
                ingest_time: times(&b, "ingest_time").value(i),
            };
            anyhow::ensure!(
                i64::from(dates.value(i)) == e.exec_time.div_euclid(86_400_000_000),
                "event_date {} is not the date of exec_time {}",
                dates.value(i),
                e.exec_time
            );
            anyhow::ensure!(!s("kafka_namespace", i).is_empty(), "no kafka_namespace");
            let p = b.column_by_name("kafka_partition").unwrap().as_primitive::<Int32Type>();
            out.push(((s("kafka_topic", i), p.value(i), longs(&b, "kafka_offset").value(i)), e));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// What `executions` must hold: every valid execution message, by coordinates.
pub fn expected_execution_rows(produced: &[Produced]) -> Vec<(Coordinates, ExecutionEvent)> {
    let mut v: Vec<_> = produced
        .iter()
        .filter_map(|p| match &p.payload {
            Payload::Execution(e) => Some(((p.topic.clone(), p.partition, p.offset), e.clone())),
            _ => None,
        })
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// `executions` holds each produced execution exactly once by coordinates, equal field by field.
pub async fn check_executions(base: &str, produced: &[Produced]) -> anyhow::Result<()> {
    let (rows, want) = (execution_rows(base).await?, expected_execution_rows(produced));
    if rows == want {
        return Ok(());
    }
    let have: std::collections::BTreeSet<_> = rows.iter().map(|r| &r.0).collect();
    let wanted: std::collections::BTreeSet<_> = want.iter().map(|r| &r.0).collect();
    let differing = rows
        .iter()
        .filter_map(|(c, e)| {
            want.iter()
                .find(|w| w.0 == *c)
                .filter(|w| w.1 != *e)
                .map(|w| (c, e, &w.1))
        })
        .next();
    bail!(
        "executions: {} rows, want {}; {} missing, {} unexpected, {} duplicated; first differing row: {differing:?}",
        rows.len(),
        want.len(),
        wanted.difference(&have).count(),
        have.difference(&wanted).count(),
        rows.len() - have.len()
    )
}
