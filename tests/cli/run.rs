//! The `possync` binary as a user runs it: `possync run --no-materialize` prints the embedded
//! broker's address, a separately started `possync materialize` attaches to it and writes the
//! tables, and SIGINT stops both cleanly (exit code 0, work flushed).

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

use crate::common::process::{signal, wait_exit, Reap, BIN};
use std::sync::mpsc;
use std::time::{Duration, Instant};

fn wait_for(what: &str, within: Duration, mut cond: impl FnMut() -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    while !cond() {
        anyhow::ensure!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

#[test]
fn separate_materializer_attaches_and_sigint_stops_cleanly() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let tables = dir.path().join("tables");
    let run = Command::new(BIN)
        .args([
            "run",
            "--no-materialize",
            "--sim-listen",
            "127.0.0.1:0",
            "--fill-rate",
            "5",
            "--queue-tick",
            "1s",
        ])
        .arg("--data-dir")
        .arg(dir.path())
        .env("POSSYNC_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()?;
    let mut run = Reap(run);
    let run = &mut run.0;
    let (tx, rx) = mpsc::channel::<String>();
    let stdout = run.stdout.take().expect("piped");
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut bootstrap = None;
    let mut banner = Vec::new();
    while bootstrap.is_none() {
        let line = rx.recv_timeout(Duration::from_secs(60))?;
        if let Some(rest) = line.trim().strip_prefix("kafka bootstrap :") {
            bootstrap = rest.split_whitespace().next().map(str::to_string);
        }
        banner.push(line);
    }
    let bootstrap = bootstrap.expect("bootstrap line");
    // The banner tells how to attach a materializer, offsets namespace included.
    let mut namespace = None;
    while namespace.is_none() {
        let line = rx.recv_timeout(Duration::from_secs(60))?;
        namespace = line
            .split("--offsets-namespace ")
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .map(str::to_string);
        banner.push(line);
    }
    let namespace = namespace.expect("namespace");
    assert!(banner.iter().any(|l| l.contains("possync run")), "banner: {banner:?}");

    let mat = Command::new(BIN)
        .args([
            "materialize",
            "--brokers",
            &bootstrap,
            "--offsets-namespace",
            &namespace,
            "--flush-latency",
            "300ms",
        ])
        .arg("--table-uri")
        .arg(&tables)
        .env("POSSYNC_LOG", "warn")
        .spawn()?;
    let mut mat = Reap(mat);
    let mat = &mut mat.0;
    let log = tables.join("position_events/_delta_log");
    wait_for("position_events to get data", Duration::from_secs(90), || {
        Path::new(&log.join("00000000000000000002.json")).exists()
    })?;
    // The running `run` prints progress lines showing published events.
    let progress = loop {
        let line = rx.recv_timeout(Duration::from_secs(30))?;
        if line.starts_with("published ") {
            break line;
        }
    };
    assert!(
        progress.contains("published active=") && progress.contains("slots "),
        "progress line: {progress}"
    );

    // Stop the materializer first (the broker lives inside `run`), then `run` itself.
    signal(mat, "INT")?;
    assert!(
        wait_exit(mat, Duration::from_secs(60))?.success(),
        "possync materialize must exit 0 on SIGINT"
    );
    signal(run, "INT")?;
    assert!(
        wait_exit(run, Duration::from_secs(60))?.success(),
        "possync run must exit 0 on SIGINT"
    );
    let rest: Vec<String> = rx.try_iter().collect();
    assert!(
        rest.iter().any(|l| l.starts_with("possync run: stopped")),
        "no stop summary in {rest:?}"
    );

    let out = Command::new("python3")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/py/check_run.py"))
        .arg(&tables)
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "reader failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let rows = got["event_rows"].as_u64().unwrap_or(0);
    assert!(rows > 0, "{got}");
    assert_eq!(got["distinct_event_ids"].as_u64(), Some(rows), "no duplicates");
    assert!(got["routes"]["ACTIVE"].as_u64().unwrap_or(0) > 0 && got["routes"]["QUEUED"].as_u64().unwrap_or(0) > 0);
    Ok(())
}
