//! `--metrics-addr` on the standalone processes, as docker-compose uses it: a real
//! `possync materialize` serves `GET /metrics` while it runs and SIGTERM still stops it with
//! exit code 0.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use possync::kafka::{EmbeddedBroker, Topics};

use crate::common::process::{signal, wait_exit, Reap, BIN};

/// A port nobody listens on right now (bound, read, released).
fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// One `GET /metrics`: the whole response (status line, headers, body).
fn scrape(addr: SocketAddr) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

#[test]
fn materialize_serves_metrics_and_sigterm_stops_cleanly() -> anyhow::Result<()> {
    let broker = EmbeddedBroker::start(1)?;
    broker.create_topics(&Topics::new("possync."), 2)?;
    let dir = tempfile::tempdir()?;
    let addr: SocketAddr = ([127, 0, 0, 1], free_port()?).into();
    let child = Command::new(BIN)
        .args(["materialize", "--brokers", broker.bootstrap()])
        .arg("--table-uri")
        .arg(dir.path())
        .arg("--metrics-addr")
        .arg(addr.to_string())
        .env("POSSYNC_LOG", "warn")
        .stdin(Stdio::null())
        .spawn()?;
    let mut child = Reap(child);
    let child = &mut child.0;

    let deadline = Instant::now() + Duration::from_secs(60);
    // Materialize opens (creates) its tables before consuming; the version gauge then leaves -1.
    let events_version = "possync_table_version{table=\"position_events\"} ";
    loop {
        if let Some(status) = child.try_wait()? {
            anyhow::bail!("materialize exited early with {status}");
        }
        let last = scrape(addr);
        if let Ok(r) = &last {
            if r.starts_with("HTTP/1.1 200")
                && r.contains("possync_delta_commits_total")
                && r.contains("possync_materialized_total{route=\"active\"}")
                && r.contains(events_version)
                && !r.contains(&format!("{events_version}-1"))
            {
                break;
            }
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "no usable /metrics on {addr} within 60 s; last answer: {last:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    signal(child, "TERM")?;
    let exit = wait_exit(child, Duration::from_secs(60))?;
    assert!(exit.success(), "materialize exited with {exit} after SIGTERM");
    Ok(())
}

#[test]
fn standalone_help_documents_metrics_addr() -> anyhow::Result<()> {
    for sub in ["ingest", "queue-worker", "materialize"] {
        let Output { status, stdout, .. } = Command::new(BIN).args([sub, "--help"]).output()?;
        anyhow::ensure!(status.success(), "possync {sub} --help failed: {status}");
        let help = String::from_utf8(stdout)?;
        assert!(help.contains("--metrics-addr"), "possync {sub} --help:\n{help}");
        assert!(help.contains("POSSYNC_METRICS_ADDR"), "possync {sub} --help:\n{help}");
    }
    Ok(())
}

/// Issue 20 #7: a stop during start-up ends the process at once. Kafka here accepts
/// connections and never answers, so every process is stuck in its start-up checks (for up to
/// `--kafka-timeout`, 120 s here; materialize's is 30 s); SIGTERM must end each within 20 s,
/// with exit code 0.
#[test]
fn sigterm_during_start_up_stops_at_once() -> anyhow::Result<()> {
    let silent = TcpListener::bind("127.0.0.1:0")?;
    silent.set_nonblocking(true)?;
    let brokers = silent.local_addr()?.to_string();
    let mut held = Vec::new();
    for args in [
        &["ingest", "--kafka-timeout", "120s"][..],
        &["ingest", "--no-lease", "--kafka-timeout", "120s"],
        &["queue-worker", "--kafka-timeout", "120s"],
        &["materialize"],
    ] {
        let dir = tempfile::tempdir()?;
        let stderr_path = dir.path().join("stderr");
        let mut child = Reap(
            Command::new(BIN)
                .args(args)
                .args(["--brokers", &brokers])
                .env("POSSYNC_LOG", "info")
                .current_dir(dir.path())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&stderr_path)?)
                .spawn()?,
        );
        // In start-up once it has connected to the (silent) broker.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match silent.accept() {
                Ok((s, _)) => {
                    held.push(s);
                    break;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    anyhow::ensure!(Instant::now() < deadline, "{args:?} never connected to Kafka");
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => return Err(e.into()),
            }
        }
        signal(&child.0, "TERM")?;
        let asked = Instant::now();
        let status = wait_exit(&mut child.0, Duration::from_secs(20));
        let stderr = std::fs::read_to_string(&stderr_path)?;
        let status = status.map_err(|e| anyhow::anyhow!("{args:?}: {e}\n{stderr}"))?;
        anyhow::ensure!(status.success(), "{args:?} exited with {status}:\n{stderr}");
        println!("{args:?}: stopped {:.1}s after SIGTERM", asked.elapsed().as_secs_f64());
    }
    Ok(())
}
