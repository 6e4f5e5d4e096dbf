//! `possync bench materialize`: throughput, CPU efficiency and latency of the materializer.
//!
//! 1. Starts an embedded broker in this process and pre-fills `positions.active` and
//!    `positions.queued` with N synthetic events (partitions sized under the mock cluster's
//!    ~5 MiB per partition).
//! 2. Spawns `--members` `possync materialize` processes in one consumer group (so their CPU
//!    time is their own, read from `/proc/<pid>/stat` and summed) and polls the Delta txn versions until it has caught up. Reported:
//!    events/s, events per CPU-second and MB/s from its partition assignment to caught up
//!    (every event is processed in that window), plus totals including process start-up and
//!    the consumer group join (about 3 s of waiting on the embedded broker).
//! 3. Produces at a steady rate for a few seconds and measures produce → visible latency:
//!    an event is visible at the timestamp of the first `position_events` commit whose txn
//!    version for its partition reaches its offset.

pub mod exec;
mod process;

use process::group_mem_mib;
pub use process::{group_cpu_seconds, member_cpu_seconds, process_cpu_seconds, process_mem_mib, time_command, Timed};

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::producer::{FutureProducer, FutureRecord};

use super::offsets::app_id;
use super::tables::{Table, TableKind};
use super::MaterializeError;
use crate::events::{new_id, now_micros, PositionEvent, Route, Source};
use crate::kafka::{EmbeddedBroker, KafkaConfig, KafkaError};

/// Flags of `possync bench materialize`.
#[derive(clap::Args, Debug, Clone)]
pub struct BenchMaterializeArgs {
    /// Events to pre-fill (split over the active and queued topics).
    #[arg(long, default_value_t = 200_000, env = "POSSYNC_BENCH_MATERIALIZE_EVENTS")]
    pub events: u64,
    /// Minimum partitions per topic (raised to keep each under ~4 MiB).
    #[arg(long, default_value_t = 3, env = "POSSYNC_BENCH_MATERIALIZE_PARTITIONS")]
    pub partitions: i32,
    /// Distinct (account, con_id) keys.
    #[arg(long, default_value_t = 5_000, env = "POSSYNC_BENCH_MATERIALIZE_KEYS")]
    pub keys: u64,
    /// Events per second during the latency phase.
    #[arg(long, default_value_t = 5_000, env = "POSSYNC_BENCH_MATERIALIZE_RATE")]
    pub rate: u64,
    /// Length of the latency phase.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration, env = "POSSYNC_BENCH_MATERIALIZE_LATENCY_PHASE")]
    pub latency_phase: Duration,
    /// Flush latency of the materializer under test.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration, env = "POSSYNC_BENCH_MATERIALIZE_FLUSH_LATENCY")]
    pub flush_latency: Duration,
    /// Where to put the tables (default: a fresh temporary directory).
    #[arg(long, env = "POSSYNC_BENCH_MATERIALIZE_TABLE_URI")]
    pub table_uri: Option<String>,
    /// Executions produced at once after the positions' phases (a desk's day: 10k fills over
    /// 20 accounts); 0 skips the executions phase.
    #[arg(long, default_value_t = 10_000, env = "POSSYNC_BENCH_MATERIALIZE_EXECUTIONS")]
    pub executions: u64,
    /// Materializers in the consumer group (each a process of its own). CPU and memory are
    /// the group's sums; conflicts are counted per Delta commit of the group.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=16), env = "POSSYNC_BENCH_MATERIALIZE_MEMBERS")]
    pub members: u32,
    /// Runs of `possync status` (and of `possync status --exact`) over the final tables, each
    /// timed with its peak RSS; 0 skips them.
    #[arg(long, default_value_t = 0, env = "POSSYNC_BENCH_MATERIALIZE_STATUS_RUNS")]
    pub status_runs: u32,
    /// The possync binaries whose `status` is timed (comma-separated; default: this one), e.g.
    /// an older build to compare with (`--exact` runs are skipped for a build without it).
    #[arg(long, value_delimiter = ',', env = "POSSYNC_BENCH_MATERIALIZE_STATUS_BIN")]
    pub status_bin: Vec<std::path::PathBuf>,
}

/// The figures.
#[derive(Debug, Clone, Default)]
pub struct BenchReport {
    pub events: u64,
    pub bytes: u64,
    pub steady_events_per_s: f64,
    pub steady_events_per_cpu_s: f64,
    pub steady_mb_per_s: f64,
    pub total_s: f64,
    pub total_cpu_s: f64,
    pub latency_events: usize,
    pub latency_p50_ms: f64,
    pub latency_p99_ms: f64,
    pub latency_max_ms: f64,
    /// Produce → visible in `position_queue`, the last upsert commit of a flush (so also in
    /// `positions_current`).
    pub upsert_p50_ms: f64,
    pub upsert_p99_ms: f64,
    /// Live keys in `positions_current` at the end.
    pub keys: u64,
    /// Materializer CPU per flush during the latency phase (seconds), and flushes counted.
    pub cpu_per_flush_s: f64,
    pub flushes: usize,
    /// Events per CPU-second during the latency phase (steady `--rate`).
    pub phase_events_per_cpu_s: f64,
    /// Materializer resident memory: peak (VmHWM) and at the end (VmRSS), MiB.
    pub rss_peak_mib: f64,
    pub rss_end_mib: f64,
    /// The executions phase (`--executions`).
    pub executions: Option<exec::ExecPhase>,
    /// Materializers in the group (`--members`).
    pub members: u32,
    /// CPU of the catch-up (assigned -> caught up): the busiest member's and the group's (s).
    /// With a core per member (and the broker on cores of its own), the catch-up's wall time
    /// is about the busiest member's CPU: what a 2-core machine can show of how a group scales.
    pub catchup_busiest_cpu_s: f64,
    pub catchup_cpu_s: f64,
    /// Delta commits of the group and the conflicts among them (a conflict is a commit
    /// attempt re-planned after another writer's commit), in the catch-up and after it.
    pub catchup_commits: u64,
    pub catchup_conflicts: u64,
    pub steady_commits: u64,
    pub steady_conflicts: u64,
    /// Files under the tables that their logs do not name, after the members stopped.
    pub orphans: usize,
    /// `possync status` over the final tables (`--status-runs`): the default path, then
    /// `--exact`.
    pub status: Vec<StatusFigure>,
}

/// Timings of one way of running `possync status` over the final tables.
#[derive(Debug, Clone, Default)]
pub struct StatusFigure {
    /// The command line after the broker and table flags.
    pub flags: String,
    pub runs: u32,
    /// Wall time per run: median and max (s).
    pub wall_p50_s: f64,
    pub wall_max_s: f64,
    /// CPU (user + system) per run, median (s).
    pub cpu_p50_s: f64,
    /// Peak RSS over the runs (MiB).
    pub rss_max_mib: f64,
    /// What it reported: slots in use, queue depth, and where the counts came from.
    pub answer: String,
}

impl BenchReport {
    fn per_commit(conflicts: u64, commits: u64) -> f64 {
        conflicts as f64 / commits.max(1) as f64
    }
}

impl std::fmt::Display for BenchReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "materialize benchmark: {} events, {:.1} MB of Kafka values",
            self.events,
            self.bytes as f64 / 1e6
        )?;
        writeln!(
            f,
            "  assigned -> caught up: {:.0} events/s, {:.0} events per CPU-second, {:.1} MB/s",
            self.steady_events_per_s, self.steady_events_per_cpu_s, self.steady_mb_per_s
        )?;
        writeln!(
            f,
            "  catch-up CPU: busiest member {:.2} s of the group's {:.2} s ({:.0}%); with a core per member the catch-up would take about {:.1} s",
            self.catchup_busiest_cpu_s,
            self.catchup_cpu_s,
            100.0 * self.catchup_busiest_cpu_s / self.catchup_cpu_s.max(1e-9),
            self.catchup_busiest_cpu_s
        )?;
        writeln!(
            f,
            "  overall: {:.1} s wall, {:.2} CPU-s (incl. start-up and group join): {:.0} events per CPU-second",
            self.total_s,
            self.total_cpu_s,
            self.events as f64 / self.total_cpu_s.max(1e-9)
        )?;
        writeln!(
            f,
            "  latency produce -> visible in position_events ({} events): p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
            self.latency_events, self.latency_p50_ms, self.latency_p99_ms, self.latency_max_ms
        )?;
        writeln!(
            f,
            "  latency produce -> visible in positions_current and position_queue: p50 {:.0} ms, p99 {:.0} ms",
            self.upsert_p50_ms, self.upsert_p99_ms
        )?;
        writeln!(
            f,
            "  steady phase: {} keys in positions_current, {} flushes, {:.1} ms CPU per flush, {:.0} events per CPU-second",
            self.keys,
            self.flushes,
            self.cpu_per_flush_s * 1000.0,
            self.phase_events_per_cpu_s
        )?;
        writeln!(
            f,
            "  group of {} member(s): conflicts per commit {:.3} in the catch-up ({} of {} commits), {:.3} after it ({} of {}); {} orphan file(s) left",
            self.members,
            Self::per_commit(self.catchup_conflicts, self.catchup_commits),
            self.catchup_conflicts,
            self.catchup_commits,
            Self::per_commit(self.steady_conflicts, self.steady_commits),
            self.steady_conflicts,
            self.steady_commits,
            self.orphans
        )?;
        write!(
            f,
            "  materialize RSS (sum over members): peak {:.0} MiB, at the end {:.0} MiB",
            self.rss_peak_mib, self.rss_end_mib
        )?;
        for s in &self.status {
            write!(
                f,
                "\n  possync status{} over {} keys ({} runs): wall p50 {:.3} s, max {:.3} s; CPU p50 {:.3} s; peak RSS {:.0} MiB; {}",
                s.flags, self.keys, s.runs, s.wall_p50_s, s.wall_max_s, s.cpu_p50_s, s.rss_max_mib, s.answer
            )?;
        }
        if let Some(x) = &self.executions {
            write!(
                f,
                "\n  executions: {} at once ({:.1} MB) -> all in the executions table in {:.1} s: {:.0} executions/s, {:.0} per CPU-second (positions above: {:.0} events per CPU-second)",
                x.executions,
                x.bytes as f64 / 1e6,
                x.wall_s,
                x.per_s(),
                x.per_cpu_s(),
                self.steady_events_per_cpu_s
            )?;
        }
        Ok(())
    }
}

fn quantile(sorted: &[f64], x: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * x) as usize]
}

/// A synthetic event for key `k` of `keys` (`i` makes it unique).
pub fn synthetic_event(i: u64, k: u64, route: Route, session: &str) -> PositionEvent {
    let now = now_micros();
    PositionEvent {
        event_id: new_id(),
        session_id: session.to_string(),
        sequence: i as i64 + 1,
        account: format!("DU{:07}", k % 7),
        con_id: 100_000 + k as i64,
        symbol: ["SPY", "QQQ", "IWM", "AAPL"][(k % 4) as usize].to_string(),
        sec_type: "OPT".into(),
        expiry: Some("20261218".into()),
        strike: Some(400.0 + (k % 50) as f64 * 5.0),
        right: Some(if k.is_multiple_of(2) { "C" } else { "P" }.into()),
        multiplier: Some("100".into()),
        exchange: "SMART".into(),
        currency: "USD".into(),
        local_symbol: format!("SPY   261218C{:08}", 400_000 + k),
        trading_class: "SPY".into(),
        position: (i % 11) as f64 - 5.0,
        avg_cost: 1234.5 + k as f64,
        daily_pnl: (route == Route::Active).then_some(12.5),
        unrealized_pnl: (route == Route::Active).then_some(-3.25),
        realized_pnl: None,
        market_value: (route == Route::Active).then_some(1000.0),
        route,
        source: match (route, i % 3) {
            (Route::Active, 0) => Source::Stream,
            (Route::Active, _) => Source::Pnl,
            (Route::Queued, 0) => Source::Snapshot,
            (Route::Queued, _) => Source::Poll,
        },
        strategies: if route == Route::Active {
            vec!["wheel".into()]
        } else {
            vec![]
        },
        ib_time: now - 1_000,
        ingest_time: now,
    }
}

/// Sum over the tables under `uri` of their versions (0 for a table not there yet): the
/// commits made so far after each table's creation.
async fn commits_so_far(uri: &str) -> Result<u64, MaterializeError> {
    let mut n = 0;
    for kind in TableKind::ALL {
        if super::tables::exists(uri, kind.name()).await? {
            n += Table::open(uri, kind).await?.version().max(0) as u64;
        }
    }
    Ok(n)
}

struct Child2(Child);

impl Drop for Child2 {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs the benchmark.
///
/// # Errors
/// Kafka, table or process errors.
pub async fn run(args: BenchMaterializeArgs) -> Result<BenchReport, MaterializeError> {
    let tmp = std::env::temp_dir().join(format!("possync-bench-{}", new_id()));
    let table_uri = args
        .table_uri
        .clone()
        .unwrap_or_else(|| tmp.to_string_lossy().into_owned());
    let broker = EmbeddedBroker::start(1)?;
    let kafka = KafkaConfig::new(broker.bootstrap());
    let sample = synthetic_event(0, 0, Route::Active, "s")
        .encode()
        .map_err(|e| MaterializeError::Task(e.to_string()))?;
    let per_topic_bytes = args.events / 2 * (sample.len() as u64 + 80);
    let partitions = args.partitions.max((per_topic_bytes / (4 << 20)) as i32 + 1);
    broker.create_topics(&kafka.topics, partitions)?;
    let producer: FutureProducer = kafka
        .producer()
        .create()
        .map_err(KafkaError::client("create producer"))?;
    let session = new_id();

    eprintln!(
        "pre-filling {} events over 2 x {partitions} partitions ...",
        args.events
    );
    let mut bytes = 0u64;
    let mut pending = Vec::new();
    for i in 0..args.events {
        let route = if i % 2 == 0 { Route::Active } else { Route::Queued };
        let topic = if route == Route::Active {
            &kafka.topics.active
        } else {
            &kafka.topics.queued
        };
        let e = synthetic_event(i, i % args.keys.max(1), route, &session);
        let v = e.encode().map_err(|e| MaterializeError::Task(e.to_string()))?;
        bytes += v.len() as u64;
        pending.push(send(&producer, topic, e.key(), v));
        if pending.len() >= 20_000 {
            for r in futures::future::join_all(pending.drain(..)).await {
                r?;
            }
        }
    }
    for r in futures::future::join_all(pending).await {
        r?;
    }

    let exe = std::env::current_exe().map_err(|e| MaterializeError::Task(format!("own executable: {e}")))?;
    let commits0 = commits_so_far(&table_uri).await?;
    let started = Instant::now();
    // Conflicts are counted from the members' logs (the flush module logs each at info).
    let log = format!(
        "{},possync::materialize::flush=info",
        std::env::var("POSSYNC_BENCH_LOG").unwrap_or_else(|_| "warn,possync::materialize::consumer=info".into())
    );
    let mut children = Vec::new();
    for _ in 0..args.members {
        let child = Command::new(&exe)
            .args([
                "materialize",
                "--brokers",
                broker.bootstrap(),
                "--table-uri",
                &table_uri,
                "--group",
                "bench",
            ])
            .arg("--flush-latency")
            .arg(humantime::format_duration(args.flush_latency).to_string())
            .env("POSSYNC_LOG", &log)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| MaterializeError::Task(format!("spawn materialize: {e}")))?;
        children.push(Child2(child));
    }
    let pids: Vec<u32> = children.iter().map(|c| c.0.id()).collect();
    let conflicts = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    // A member logs its partition assignment: the first one starts the measured phase (the
    // consumer group join before it is the broker's, not the materializer's, time).
    let (assigned_tx, assigned_rx) = std::sync::mpsc::channel::<(Instant, Vec<f64>)>();
    for (i, child) in children.iter_mut().enumerate() {
        let stderr = child.0.stderr.take().expect("piped stderr");
        let (assigned_tx, pids, conflicts) = (assigned_tx.clone(), pids.clone(), conflicts.clone());
        let who = if args.members > 1 {
            format!("materialize {i}")
        } else {
            "materialize".into()
        };
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("partitions assigned") {
                    let _ = assigned_tx.send((Instant::now(), member_cpu_seconds(&pids)));
                } else if line.contains("commit conflict") {
                    conflicts.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                } else if !line.contains("CONFWARN") {
                    eprintln!("{who}: {line}");
                }
            }
        });
    }
    let conflicts_now = || conflicts.load(std::sync::atomic::Ordering::Relaxed);
    let ns = super::offsets::namespace(&kafka, None).await?;
    let parts: Vec<(String, i32)> = [&kafka.topics.active, &kafka.topics.queued]
        .iter()
        .flat_map(|t| (0..partitions).map(|p| (t.to_string(), p)))
        .collect();
    let mut events_table = loop {
        match Table::open(&table_uri, TableKind::PositionEvents).await {
            Ok(t) => break t,
            Err(_) if started.elapsed() < Duration::from_secs(60) => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(e) => return Err(e.into()),
        }
    };
    // Caught up when the last table of a flush (`position_queue`) holds every event: the
    // upsert commits of the last catch-up flush belong to the catch-up, not the steady phase.
    let mut queue_table = Table::open(&table_uri, TableKind::PositionQueue).await?;
    let deadline = Instant::now() + Duration::from_secs(600);
    let (done_at, done_cpu) = loop {
        let committed = committed_events(&mut queue_table, &parts, &ns).await?;
        if committed >= args.events {
            break (Instant::now(), member_cpu_seconds(&pids));
        }
        if Instant::now() > deadline {
            return Err(MaterializeError::Timeout(format!(
                "materialized {committed} of {} events",
                args.events
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let (t0, cpus0) = assigned_rx.try_recv().unwrap_or((started, vec![0.0; pids.len()]));
    let busiest = done_cpu
        .iter()
        .zip(&cpus0)
        .map(|(now, then)| now - then)
        .fold(0.0, f64::max);
    let (cpu0, done_cpu) = (cpus0.iter().sum::<f64>(), done_cpu.iter().sum::<f64>());
    let steady_s = (done_at - t0).as_secs_f64().max(1e-9);
    let n = args.events as f64;
    let mut report = BenchReport {
        events: args.events,
        bytes,
        steady_events_per_s: n / steady_s,
        steady_events_per_cpu_s: n / (done_cpu - cpu0).max(1e-9),
        steady_mb_per_s: bytes as f64 / 1e6 / steady_s,
        total_s: (done_at - started).as_secs_f64(),
        total_cpu_s: done_cpu,
        members: args.members,
        catchup_busiest_cpu_s: busiest,
        catchup_cpu_s: done_cpu - cpu0,
        catchup_commits: commits_so_far(&table_uri).await? - commits0,
        catchup_conflicts: conflicts_now(),
        ..Default::default()
    };

    // Latency phase.
    events_table.refresh().await?;
    let first_version = events_table.version() + 1;
    let first_queue_version = queue_table.version() + 1;
    let phase_cpu0 = group_cpu_seconds(&pids);
    let n = args.rate * args.latency_phase.as_secs().max(1);
    let interval = Duration::from_secs_f64(1.0 / args.rate.max(1) as f64);
    let mut sent: Vec<(String, i32, i64, i64)> = Vec::with_capacity(n as usize);
    let phase_start = tokio::time::Instant::now();
    let mut acks = Vec::new();
    for i in 0..n {
        tokio::time::sleep_until(phase_start + interval.mul_f64(i as f64)).await;
        let route = if i % 2 == 0 { Route::Active } else { Route::Queued };
        let topic = if route == Route::Active {
            kafka.topics.active.clone()
        } else {
            kafka.topics.queued.clone()
        };
        let e = synthetic_event(args.events + i, i % args.keys.max(1), route, &session);
        let at = e.ingest_time;
        let v = e.encode().map_err(|e| MaterializeError::Task(e.to_string()))?;
        let p = producer.clone();
        let key = e.key();
        acks.push(tokio::spawn(async move {
            let r = p
                .send(FutureRecord::to(&topic).key(&key).payload(&v), Duration::from_secs(30))
                .await;
            r.map(|d| (topic, d.partition, d.offset, at))
                .map_err(|(e, _)| e.to_string())
        }));
    }
    for a in acks {
        let r = a.await.map_err(|e| MaterializeError::Task(e.to_string()))?;
        sent.push(r.map_err(MaterializeError::Task)?);
    }
    let total = args.events + n;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let committed = committed_events(&mut queue_table, &parts, &ns).await?;
        if committed >= total || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let phase_cpu = group_cpu_seconds(&pids) - phase_cpu0;
    events_table.refresh().await?;
    let latencies = |visible: &[(i64, HashMap<String, i64>)]| {
        let mut lat: Vec<f64> = sent
            .iter()
            .filter_map(|(t, p, off, at)| {
                let id = app_id(&ns, t, *p);
                visible
                    .iter()
                    .find(|(_, txns)| txns.get(&id).is_some_and(|v| v >= off))
                    .map(|(ts, _)| (*ts * 1000 - at) as f64 / 1000.0)
            })
            .collect();
        lat.sort_by(f64::total_cmp);
        lat
    };
    let lat = latencies(&commit_times(&events_table, first_version, &ns).await?);
    if !lat.is_empty() {
        report.latency_events = lat.len();
        report.latency_p50_ms = quantile(&lat, 0.5);
        report.latency_p99_ms = quantile(&lat, 0.99);
        report.latency_max_ms = quantile(&lat, 1.0);
    }
    let queue_commits = commit_times(&queue_table, first_queue_version, &ns).await?;
    let lat = latencies(&queue_commits);
    if !lat.is_empty() {
        report.upsert_p50_ms = quantile(&lat, 0.5);
        report.upsert_p99_ms = quantile(&lat, 0.99);
    }
    report.flushes = queue_commits.iter().filter(|(_, txns)| !txns.is_empty()).count();
    report.cpu_per_flush_s = phase_cpu / report.flushes.max(1) as f64;
    report.phase_events_per_cpu_s = n as f64 / phase_cpu.max(1e-9);
    report.steady_commits = commits_so_far(&table_uri).await? - commits0 - report.catchup_commits;
    report.steady_conflicts = conflicts_now() - report.catchup_conflicts;
    report.rss_peak_mib = group_mem_mib(&pids, "VmHWM:");
    report.rss_end_mib = group_mem_mib(&pids, "VmRSS:");
    let current = Table::open(&table_uri, TableKind::PositionsCurrent).await?;
    report.keys = current.read_all().await?.iter().map(|b| b.num_rows() as u64).sum();
    if args.executions > 0 {
        eprintln!("executions phase: {} fills at once ...", args.executions);
        report.executions = Some(
            exec::run(
                &kafka,
                &producer,
                kafka.topics.partitions_of(&kafka.topics.executions, partitions),
                &table_uri,
                &ns,
                &pids,
                args.executions,
                args.keys,
            )
            .await?,
        );
    }
    // Graceful stop (each member commits what it buffered), then the files nobody names.
    for mut c in children {
        // SAFETY: plain kill(2) on our own child.
        unsafe { libc::kill(c.0.id() as i32, libc::SIGTERM) };
        let _ = c.0.wait();
    }
    for kind in TableKind::ALL {
        let t = Table::open(&table_uri, kind).await?;
        report.orphans += crate::delta::maintain::orphans(&t).await?.len();
    }
    if args.status_runs > 0 {
        let bins = if args.status_bin.is_empty() {
            vec![exe]
        } else {
            args.status_bin.clone()
        };
        for (bin, flags) in bins.iter().flat_map(|b| [(b, &[][..]), (b, &["--exact"][..])]) {
            let base = [
                "status",
                "--json",
                "--brokers",
                broker.bootstrap(),
                "--table-uri",
                table_uri.as_str(),
            ];
            let argv: Vec<&str> = base.iter().chain(flags).copied().collect();
            if let Some(fig) = time_status(bin, &argv, args.status_runs)? {
                eprintln!("{} status {}: {fig:?}", bin.display(), flags.join(" "));
                let flags: String = flags.iter().map(|f| format!(" {f}")).collect();
                let flags = match bins.len() {
                    1 => flags,
                    _ => format!("{flags} ({})", bin.display()),
                };
                report.status.push(StatusFigure { flags, ..fig });
            }
        }
    }
    if args.table_uri.is_none() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    Ok(report)
}

/// Events of `parts` that `t` holds as of a fresh snapshot: per partition its stored txn
/// version + 1 (offsets start at 0 and every offset is an event).
async fn committed_events(t: &mut Table, parts: &[(String, i32)], ns: &str) -> Result<u64, MaterializeError> {
    t.refresh().await?;
    let mut committed = 0u64;
    for (topic, p) in parts {
        committed += t.txn_version(&app_id(ns, topic, *p)).await?.map_or(0, |v| v as u64 + 1);
    }
    Ok(committed)
}

/// `possync status` timed by [`time_command`], with what it answered.
fn time_status(bin: &std::path::Path, argv: &[&str], runs: u32) -> Result<Option<StatusFigure>, MaterializeError> {
    let Some(t) = time_command(bin, argv, runs).map_err(MaterializeError::Task)? else {
        return Ok(None);
    };
    let v: serde_json::Value = serde_json::from_str(&t.stdout)
        .map_err(|e| MaterializeError::Task(format!("possync status printed {:?} ({e})", t.stdout)))?;
    Ok(Some(StatusFigure {
        flags: String::new(),
        runs,
        wall_p50_s: t.wall_p50_s,
        wall_max_s: t.wall_max_s,
        cpu_p50_s: t.cpu_p50_s,
        rss_max_mib: t.rss_max_mib,
        answer: format!(
            "slots in use {}, queue {}, counted from {}",
            v["slots"]["active_open_positions"], v["queue"], v["counted_from"]
        ),
    }))
}

pub(super) async fn send(p: &FutureProducer, topic: &str, key: String, value: Vec<u8>) -> Result<(), MaterializeError> {
    p.send(
        FutureRecord::to(topic).key(&key).payload(&value),
        Duration::from_secs(60),
    )
    .await
    .map(|_| ())
    .map_err(|(e, _)| {
        KafkaError::Client {
            context: format!("produce to {topic}"),
            source: e,
        }
        .into()
    })
}

/// (commit timestamp ms, txn versions) of every commit from `from` on, in order.
async fn commit_times(t: &Table, from: i64, _ns: &str) -> Result<Vec<(i64, HashMap<String, i64>)>, MaterializeError> {
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Line {
        commit_info: Option<serde_json::Value>,
        txn: Option<Txn>,
    }
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Txn {
        app_id: String,
        version: i64,
    }
    let store = t.delta.log_store();
    let mut out = Vec::new();
    for v in from..=t.version() {
        let Some(bytes) =
            store
                .read_commit_entry(v as u64)
                .await
                .map_err(|source| super::tables::TableError::Delta {
                    table: t.kind.name(),
                    source,
                })?
        else {
            continue;
        };
        let mut ts = 0;
        let mut txns = HashMap::new();
        for line in bytes.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            if let Ok(l) = serde_json::from_slice::<Line>(line) {
                if let Some(ci) = l.commit_info {
                    ts = ci
                        .get("timestamp")
                        .and_then(serde_json::Value::as_i64)
                        .unwrap_or_default();
                }
                if let Some(x) = l.txn {
                    txns.insert(x.app_id, x.version);
                }
            }
        }
        out.push((ts, txns));
    }
    Ok(out)
}
