//! Issue 10 #17: a second `possync ingest` (another IB client id, same brokers and topics) is
//! fenced by the ingest lease. Real `possync ingest` processes run against the simulator and
//! the embedded broker served by this test process: only one of them connects to IB, holds
//! PnL streams and publishes; the other stands by (log line, `possync_ingest_lease_held 0`,
//! 503 `/readyz`), takes over when the holder is SIGKILLed (the book converges to the
//! simulator's truth), and a standby stops promptly with exit 0 on SIGINT.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::common::process::{signal, wait_exit, Reap, BIN};
use crate::ingest_support::*;
use anyhow::{bail, ensure, Context};
use possync::events::{PositionEvent, Source};
use possync::sim::Truth;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

/// A `possync ingest` child process.
struct IngestProc {
    child: Reap,
    client_id: i32,
    metrics: SocketAddr,
    log: PathBuf,
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn spawn_ingest(env: &Env, client_id: i32, dir: &Path) -> anyhow::Result<IngestProc> {
    spawn_ingest_via(env, client_id, dir, env.sim.addr().port(), &[])
}

/// [`spawn_ingest`] with IB at `ib_port` (the simulator's, or a proxy's) and `extra` flags.
fn spawn_ingest_via(env: &Env, client_id: i32, dir: &Path, ib_port: u16, extra: &[&str]) -> anyhow::Result<IngestProc> {
    let metrics: SocketAddr = ([127, 0, 0, 1], free_port()?).into();
    let log = dir.join(format!("ingest-{client_id}.log"));
    let child = Command::new(BIN)
        .arg("ingest")
        .args(["--brokers", &env.kafka.brokers])
        .args(["--topic-prefix", &env.kafka.topics.prefix()])
        .args(["--ib-host", &env.sim.addr().ip().to_string()])
        .args(["--ib-port", &ib_port.to_string()])
        .args(["--client-id", &client_id.to_string()])
        .args(["--metrics-addr", &metrics.to_string()])
        .args(["--reconnect-initial", "200ms", "--reconnect-max", "2s"])
        .args(extra)
        .env("POSSYNC_LOG", "warn,possync=info")
        .env_remove("POSSYNC_KAFKA_CONFIG")
        .env_remove("POSSYNC_LEASE_GROUP")
        .env_remove("POSSYNC_NO_LEASE")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()?;
    Ok(IngestProc {
        child: Reap(child),
        client_id,
        metrics,
        log,
    })
}

impl IngestProc {
    /// One HTTP GET on the metrics endpoint: the whole response, `None` while it does not answer.
    async fn get(&self, path: &str) -> Option<String> {
        let mut s = tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(self.metrics))
            .await
            .ok()?
            .ok()?;
        s.write_all(format!("GET {path} HTTP/1.1\r\nConnection: close\r\n\r\n").as_bytes())
            .await
            .ok()?;
        let mut out = String::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut out))
            .await
            .ok()?
            .ok()?;
        Some(out)
    }

    /// `possync_ingest_lease_held`, `None` while the endpoint does not answer.
    async fn lease_held(&self) -> Option<i64> {
        let body = self.get("/metrics").await?;
        body.lines()
            .find_map(|l| l.strip_prefix("possync_ingest_lease_held "))
            .and_then(|v| v.trim().parse().ok())
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn says_standing_by(&self) -> bool {
        self.log_text().contains("another ingest holds the lease (group") && self.log_text().contains("standing by")
    }

    /// What the simulator knows about this client id (`None`: it never connected).
    fn at_ib<'a>(&self, truth: &'a Truth) -> Option<&'a possync::sim::ClientTruth> {
        truth.clients.iter().find(|c| c.client_id == self.client_id)
    }
}

fn sessions(c: &Collector) -> BTreeSet<String> {
    c.all().into_iter().map(|s| s.event.session_id).collect()
}

/// The published book across every session: the newest non-PNL event per position, ordered as
/// `positions_current` orders them (ingest time, then session and sequence).
fn published_book(c: &Collector) -> BTreeMap<(String, i64), PositionEvent> {
    let mut evs: Vec<PositionEvent> = c
        .all()
        .into_iter()
        .map(|s| s.event)
        .filter(|e| e.source != Source::Pnl)
        .collect();
    evs.sort_by(|a, b| (a.ingest_time, &a.session_id, a.sequence).cmp(&(b.ingest_time, &b.session_id, b.sequence)));
    let mut book = BTreeMap::new();
    for e in evs {
        book.insert((e.account.clone(), e.con_id), e);
    }
    book
}

/// Whether the published book equals the simulator's open positions.
fn book_matches(c: &Collector, truth: &Truth) -> bool {
    let book = published_book(c);
    let open = book.values().filter(|e| e.position != 0.0).count();
    open == truth.positions.len()
        && truth.positions.iter().all(|p| {
            book.get(&(p.account.clone(), i64::from(p.contract.con_id)))
                .is_some_and(|e| matches_truth(e, p))
        })
}

/// Fails at once when two ingests are seen working at the same time.
fn ensure_fenced(c: &Collector, truth: &Truth, procs: &[&IngestProc]) -> anyhow::Result<()> {
    let connected: Vec<i32> = procs
        .iter()
        .filter(|p| p.at_ib(truth).is_some_and(|t| t.connected))
        .map(|p| p.client_id)
        .collect();
    ensure!(
        connected.len() <= 1,
        "two ingests are connected to IB at once (client ids {connected:?}): the second one is not fenced"
    );
    ensure!(
        truth.max_streams_total <= ACTIVE,
        "{} PnL streams were open at once for {ACTIVE} active positions: two ingests held slots",
        truth.max_streams_total
    );
    let live = sessions(c);
    ensure!(
        live.len() <= 1,
        "events of {} ingest sessions at once: {live:?}",
        live.len()
    );
    Ok(())
}

/// Active positions (one PnL stream each) in the registry.
const ACTIVE: usize = 2;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_ingest_stands_by_and_takes_over_when_the_holder_dies() -> anyhow::Result<()> {
    let env = env(quiet_sim(), 1, 6).await?;
    let truth = env.sim.truth();
    ensure!(truth.positions.len() >= 5, "the test world needs positions");
    for p in &truth.positions[..ACTIVE] {
        activate(&env.kafka, p, 1).await?;
    }
    let collector = Collector::start(&env.kafka, &env.shutdown).await?;
    let dir = tempfile::tempdir()?;
    let a = spawn_ingest(&env, 201, dir.path())?;
    let b = spawn_ingest(&env, 202, dir.path())?;

    // 1. One ingest holds the lease and publishes the book; the other stands by: it says so,
    //    reports it, never connects to IB and publishes nothing.
    let (holder, standby) = {
        let end = Instant::now() + DEADLINE;
        loop {
            let truth = env.sim.truth();
            ensure_fenced(&collector, &truth, &[&a, &b])?;
            let (la, lb) = (a.lease_held().await, b.lease_held().await);
            let settled = book_matches(&collector, &truth)
                && truth.streams_total == ACTIVE
                && matches!((la, lb), (Some(1), Some(0)) | (Some(0), Some(1)));
            if settled {
                break if la == Some(1) { (a, b) } else { (b, a) };
            }
            if Instant::now() > end {
                bail!(
                    "no single holder publishing the book within {DEADLINE:?}: lease gauges {la:?}/{lb:?}, sessions {:?}, clients {:?}\n--- 201:\n{}\n--- 202:\n{}",
                    sessions(&collector),
                    truth.clients,
                    a.log_text(),
                    b.log_text()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let first_session = sessions(&collector)
        .into_iter()
        .next()
        .context("the holder published")?;
    wait_for("the standby's log line", DEADLINE, || async {
        standby.says_standing_by().then_some(())
    })
    .await
    .with_context(|| standby.log_text())?;
    let readyz = standby.get("/readyz").await.unwrap_or_default();
    ensure!(
        readyz.starts_with("HTTP/1.1 503") && readyz.contains("standby: another ingest holds the lease"),
        "a standby's /readyz: {readyz}"
    );
    let truth = env.sim.truth();
    ensure!(
        standby.at_ib(&truth).is_none(),
        "the standby connected to IB: {:?}",
        standby.at_ib(&truth)
    );
    ensure!(
        holder.at_ib(&truth).is_some_and(|c| c.connected && c.streams == ACTIVE),
        "the holder holds the PnL streams: {:?}",
        truth.clients
    );

    // Live changes keep coming from the holder alone.
    let changed = env
        .sim
        .apply_fill(&truth.positions[2].account, truth.positions[2].contract.con_id, 1.0)?;
    wait_for("the holder to publish a fill", DEADLINE, || async {
        book_matches(&collector, &env.sim.truth()).then_some(())
    })
    .await?;
    ensure!(published_book(&collector)
        .get(&(changed.account.clone(), i64::from(changed.contract.con_id)))
        .is_some_and(|e| e.session_id == first_session));
    ensure_fenced(&collector, &env.sim.truth(), &[&holder, &standby])?;

    // 2. SIGKILL the holder, change the book while nobody holds the lease: the standby takes
    //    over (after the group's 6 s session timeout) and the book converges to the truth.
    let mut holder = holder;
    signal(&holder.child.0, "KILL")?;
    let killed = Instant::now();
    wait_exit(&mut holder.child.0, Duration::from_secs(30))?;
    let truth = env.sim.truth();
    let closing = truth.positions[3].clone();
    env.sim
        .set_position(&closing.account, closing.contract.con_id, 0.0, 0.0)?;
    env.sim
        .apply_fill(&truth.positions[4].account, truth.positions[4].contract.con_id, -1.0)?;
    let second_session = wait_for("the standby to take over and publish", DEADLINE, || async {
        sessions(&collector).into_iter().find(|s| *s != first_session)
    })
    .await
    .with_context(|| standby.log_text())?;
    let first_event = collector
        .session(&second_session)
        .iter()
        .map(|s| s.at)
        .min()
        .context("events of the new holder")?;
    wait_for("the book to converge after the takeover", DEADLINE, || async {
        let truth = env.sim.truth();
        (book_matches(&collector, &truth) && truth.streams_total == ACTIVE).then_some(())
    })
    .await
    .with_context(|| standby.log_text())?;
    let converged = Instant::now();
    let new_holder = standby;
    ensure!(
        new_holder.lease_held().await == Some(1),
        "the new holder reports the lease"
    );
    let truth = env.sim.truth();
    ensure!(
        truth.max_streams_total <= ACTIVE,
        "at most {ACTIVE} streams ever: {truth:?}"
    );
    ensure!(
        new_holder
            .at_ib(&truth)
            .is_some_and(|c| c.connected && c.streams == ACTIVE),
        "the new holder holds the PnL streams: {:?}",
        truth.clients
    );
    ensure!(
        sessions(&collector).len() == 2,
        "exactly two sessions (the dead holder's and the new one): {:?}",
        sessions(&collector)
    );
    ensure!(
        collector
            .all()
            .iter()
            .filter(|s| s.at > first_event)
            .all(|s| s.event.session_id == second_session),
        "after the takeover only the new holder publishes"
    );
    eprintln!(
        "fencing: takeover after SIGKILL of the holder: first event {:.1} s, book converged {:.1} s after the kill",
        (first_event - killed).as_secs_f64(),
        (converged - killed).as_secs_f64()
    );

    // 3. A third ingest stands by while the new holder works, and SIGINT stops it promptly.
    let mut third = spawn_ingest(&env, 203, dir.path())?;
    wait_for("the third ingest to stand by", DEADLINE, || async {
        (third.lease_held().await == Some(0) && third.says_standing_by()).then_some(())
    })
    .await
    .with_context(|| {
        format!(
            "--- 203 (the third):\n{}\n--- {} (the holder):\n{}",
            third.log_text(),
            new_holder.client_id,
            new_holder.log_text()
        )
    })?;
    ensure!(third.at_ib(&env.sim.truth()).is_none(), "a standby connected to IB");
    signal(&third.child.0, "INT")?;
    let asked = Instant::now();
    let status = wait_exit(&mut third.child.0, Duration::from_secs(30))?;
    ensure!(
        status.success(),
        "a standby exits 0 on SIGINT: {status}\n{}",
        third.log_text()
    );
    let stop_time = asked.elapsed();
    ensure!(
        stop_time < Duration::from_secs(15),
        "a standby took {stop_time:?} to stop"
    );
    eprintln!(
        "fencing: a standby stopped {:.2} s after SIGINT",
        stop_time.as_secs_f64()
    );
    ensure!(sessions(&collector).len() == 2, "the third ingest published nothing");

    // The holder stops cleanly too, with every event of its session in order.
    let mut new_holder = new_holder;
    signal(&new_holder.child.0, "INT")?;
    let status = wait_exit(&mut new_holder.child.0, Duration::from_secs(60))?;
    ensure!(status.success(), "the holder exits 0 on SIGINT: {status}");
    collector.settled_integrity(&second_session).await?;
    env.shutdown.cancel();
    Ok(())
}

/// A holder cut off from Kafka longer than the group's session timeout has lost the lease: it
/// must stop publishing and drop its IB connection (and with it its PnL streams), then take the
/// lease back, reconnect and reconcile once Kafka returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_cut_off_from_kafka_drops_ib_until_it_holds_the_lease_again() -> anyhow::Result<()> {
    const CLIENT: i32 = 301;
    let env = env(quiet_sim(), 1, 6).await?;
    let truth = env.sim.truth();
    let p = &truth.positions[0];
    activate(&env.kafka, p, 1).await?;
    let collector = Collector::start(&env.kafka, &env.shutdown).await?;
    let stop = env.shutdown.child_token();
    let ingest = tokio::spawn(possync::ingest::run(
        env.ingest_config(CLIENT, 10),
        env.kafka.clone(),
        stop.clone(),
    ));
    let at_ib = |t: &Truth| t.clients.iter().find(|c| c.client_id == CLIENT).cloned();
    wait_for("the holder to publish the book", DEADLINE, || async {
        let t = env.sim.truth();
        (book_matches(&collector, &t) && at_ib(&t).is_some_and(|c| c.connected && c.streams == 1)).then_some(())
    })
    .await?;

    env.broker.broker_down(1)?;
    let cut = Instant::now();
    wait_for("the holder to drop IB after losing the lease", DEADLINE, || async {
        at_ib(&env.sim.truth())
            .is_some_and(|c| !c.connected && c.streams == 0)
            .then_some(())
    })
    .await?;
    let dropped = cut.elapsed();
    // While nobody holds the lease, the book moves on.
    let changed = env
        .sim
        .apply_fill(&truth.positions[1].account, truth.positions[1].contract.con_id, 2.0)?;
    env.broker.broker_up(1)?;
    wait_for("the holder to take the lease back and reconcile", DEADLINE, || async {
        let t = env.sim.truth();
        (book_matches(&collector, &t) && at_ib(&t).is_some_and(|c| c.connected && c.connections == 2 && c.streams == 1))
            .then_some(())
    })
    .await?;
    eprintln!(
        "fencing: IB dropped {:.1} s after Kafka went away; lease back and book reconciled {:.1} s after",
        dropped.as_secs_f64(),
        cut.elapsed().as_secs_f64()
    );
    ensure!(published_book(&collector)
        .get(&(changed.account.clone(), i64::from(changed.contract.con_id)))
        .is_some_and(|e| e.position == changed.quantity));
    ensure!(
        sessions(&collector).len() == 2,
        "a new session after the lease came back"
    );
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(60), ingest).await???;
    env.shutdown.cancel();
    Ok(())
}

/// A TCP proxy to the simulator that can be cut: its connections dropped and its port closed
/// (one ingest's path to IB broken while another's works).
struct Proxy {
    port: u16,
    cut: tokio_util::sync::CancellationToken,
}

impl Proxy {
    async fn start(target: SocketAddr) -> anyhow::Result<Proxy> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let cut = tokio_util::sync::CancellationToken::new();
        let stop = cut.clone();
        tokio::spawn(async move {
            loop {
                let (mut inbound, _) = tokio::select! {
                    _ = stop.cancelled() => break,
                    accepted = listener.accept() => match accepted {
                        Ok(a) => a,
                        Err(_) => continue,
                    },
                };
                let stop = stop.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = stop.cancelled() => {}
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                    }
                });
            }
            // The listener drops here: the port refuses connections.
        });
        Ok(Proxy { port, cut })
    }
}

/// Issue 18 #3: a holder that cannot reach IB (its path to the gateway broken, Kafka fine)
/// gives the lease up after `--ib-unreachable-release`, so a standby that reaches IB takes over
/// and the published book follows IB again. Before, the holder kept the lease while blind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_that_cannot_reach_ib_hands_the_lease_to_a_standby() -> anyhow::Result<()> {
    let env = env(quiet_sim(), 1, 6).await?;
    let collector = Collector::start(&env.kafka, &env.shutdown).await?;
    let dir = tempfile::tempdir()?;
    let proxy = Proxy::start(env.sim.addr()).await?;
    let release = ["--ib-unreachable-release", "4s"];
    let a = spawn_ingest_via(&env, 211, dir.path(), proxy.port, &release)?;
    wait_for(
        "the first ingest to hold the lease and publish the book",
        DEADLINE,
        || async { (a.lease_held().await == Some(1) && book_matches(&collector, &env.sim.truth())).then_some(()) },
    )
    .await
    .with_context(|| a.log_text())?;
    let b = spawn_ingest_via(&env, 212, dir.path(), env.sim.addr().port(), &release)?;
    wait_for("the second ingest to stand by", DEADLINE, || async {
        (b.says_standing_by() && b.lease_held().await == Some(0)).then_some(())
    })
    .await
    .with_context(|| b.log_text())?;

    // The holder's path to IB breaks; IB's book changes meanwhile.
    proxy.cut.cancel();
    let truth = env.sim.truth();
    let p = &truth.positions[1];
    env.sim.apply_fill(&p.account, p.contract.con_id, 4.0)?;
    wait_for(
        "the standby to take over and publish IB's book",
        Duration::from_secs(90),
        || async { (b.lease_held().await == Some(1) && book_matches(&collector, &env.sim.truth())).then_some(()) },
    )
    .await
    .with_context(|| format!("--- 211:\n{}\n--- 212:\n{}", a.log_text(), b.log_text()))?;
    ensure!(
        a.log_text().contains("gave the ingest lease up"),
        "the blind holder says why it gave the lease up:\n{}",
        a.log_text()
    );
    let held_a = a.lease_held().await;
    ensure!(
        held_a == Some(0),
        "the blind ingest stands by again: lease gauge {held_a:?}"
    );
    for ing in [a, b] {
        signal(&ing.child.0, "INT")?;
        let mut child = ing.child;
        let status = wait_exit(&mut child.0, Duration::from_secs(30))?;
        ensure!(status.success(), "ingest {} exited with {status}", ing.client_id);
    }
    Ok(())
}
