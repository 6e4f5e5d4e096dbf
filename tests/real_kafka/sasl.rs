//! 6. A SASL/SCRAM listener used through the `-K` passthrough: the pipeline stays exact, and the
//!    password appears in no log line, error message, `--help` output or metric.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::ensure;

use crate::common::process::BIN;
use crate::pipeline::{kafka_flags, sasl_settings, Options, Pipeline};

/// The address ingest bound for `/metrics` (it logs it; port 0 avoids picking a port that
/// another process takes first).
fn metrics_addr(p: &Pipeline) -> anyhow::Result<String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let log = std::fs::read_to_string(p.dir.path().join("ingest.log")).unwrap_or_default();
        if let Some(i) = log.find("serving Prometheus metrics at http://") {
            let rest = &log[i + "serving Prometheus metrics at http://".len()..];
            return Ok(rest.split("/metrics").next().unwrap_or_default().to_string());
        }
        ensure!(
            Instant::now() < deadline,
            "ingest never served metrics:\n{}",
            p.log_tail("ingest")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn scrape(addr: &str) -> anyhow::Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(format!("GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())?;
    let mut body = String::new();
    s.read_to_string(&mut body)?;
    Ok(body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scram_listener_through_passthrough_never_shows_the_password() -> anyhow::Result<()> {
    let _one = crate::SERIAL.lock().await;
    let mut p = Pipeline::start(Options {
        nodes: 1,
        members: 2,
        sasl: true,
        processes: false,
        ..Options::default()
    })
    .await?;
    let password = p.cluster.opts().sasl_password.clone();
    let user = p.cluster.opts().sasl_user.clone();
    p.ingest_metrics = Some("127.0.0.1:0".into());
    p.start_ingest()?;
    p.start_queue_worker()?;
    for m in 0..p.members.len() {
        p.start_member(m)?;
    }
    p.start_fills().await?;
    p.wait_recovered("SASL pipeline", Instant::now(), crate::RECOVER)
        .await?;
    let body = scrape(&metrics_addr(&p)?)?;
    ensure!(body.contains("possync_"), "no metrics served: {body}");
    ensure!(!body.contains(password.as_str()), "the password is in /metrics");
    let report = p.finish().await?;
    eprintln!("[faults] SASL/SCRAM: {report:?}");

    // A wrong password is refused with an error that names no password.
    let wrong = "wrong-pass-0123";
    let mut bad = p.kafka.clone();
    for (k, v) in sasl_settings(&user, wrong) {
        bad.overrides.insert(k.to_string(), v);
    }
    let out = Command::new(BIN)
        .args([
            "topics",
            "check",
            "--brokers",
            &bad.brokers,
            "--topic-prefix",
            "faults.",
        ])
        .args(["--kafka-timeout", "10s"])
        .args(kafka_flags(&bad))
        .env("POSSYNC_LOG", "info")
        .output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(!out.status.success(), "a wrong password was accepted:\n{text}");
    ensure!(!text.contains(wrong), "the wrong password is printed:\n{text}");

    // --help with the credentials in the environment shows no value of them.
    let env_config = kafka_flags(&p.kafka)
        .into_iter()
        .filter(|f| f != "-K")
        .collect::<Vec<_>>()
        .join("\n");
    for sub in [
        &["ingest"][..],
        &["queue-worker"],
        &["materialize"],
        &["topics", "check"],
    ] {
        let out = Command::new(BIN)
            .args(sub)
            .arg("--help")
            .env("POSSYNC_KAFKA_CONFIG", &env_config)
            .output()?;
        let help = String::from_utf8_lossy(&out.stdout);
        ensure!(
            out.status.success() && help.contains("--kafka-config"),
            "{sub:?} --help: {help}"
        );
        ensure!(!help.contains(password.as_str()), "{sub:?} --help prints the password");
    }

    // No log line of any process of the scenario carries it.
    let logs = p.logs()?;
    ensure!(
        logs.len() >= 4,
        "expected the logs of every process, found {}",
        logs.len()
    );
    for (name, text) in logs {
        ensure!(!text.contains(password.as_str()), "{name} prints the password");
    }
    Ok(())
}
