//! The binary's surface as a user meets it: secrets given to `-K` / `POSSYNC_KAFKA_CONFIG`
//! never reach stdout or stderr (issue 10 #18), and logs written to a pipe carry no ANSI colour
//! codes and survive the pipe's reader leaving (issue 10 #23).

use std::io::{BufRead, BufReader};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use anyhow::ensure;

use crate::common::process::{signal, wait_exit, Reap, BIN};

const SECRET: &str = "S3cr,et;Pa55";

fn run(args: &[&str], kafka_config_env: Option<&str>) -> anyhow::Result<Output> {
    let mut c = Command::new(BIN);
    c.args(args).env_remove("POSSYNC_KAFKA_CONFIG");
    if let Some(v) = kafka_config_env {
        c.env("POSSYNC_KAFKA_CONFIG", v);
    }
    Ok(c.output()?)
}

fn ensure_secret_absent(what: &str, out: &Output) -> anyhow::Result<()> {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    for fragment in ["S3cr", "et;Pa55", "Pa55"] {
        ensure!(
            !text.contains(fragment),
            "{what} printed a secret fragment {fragment:?}:\n{text}"
        );
    }
    Ok(())
}

#[test]
fn help_never_prints_env_values() -> anyhow::Result<()> {
    let env = format!("sasl.mechanism=PLAIN\nsasl.password={SECRET}");
    for args in [
        &["--help"][..],
        &["ingest", "--help"],
        &["queue-worker", "--help"],
        &["materialize", "--help"],
        &["registry", "--help"],
        &["bench", "ingest", "--help"],
    ] {
        let out = run(args, Some(&env))?;
        ensure!(out.status.success(), "{args:?} failed: {out:?}");
        ensure_secret_absent(&format!("{args:?}"), &out)?;
    }
    let out = run(&["ingest", "--help"], Some(&env))?;
    ensure!(
        String::from_utf8_lossy(&out.stdout).contains("POSSYNC_KAFKA_CONFIG"),
        "the env var is still named in --help"
    );
    Ok(())
}

#[test]
fn bad_or_comma_holding_settings_never_print_the_secret() -> anyhow::Result<()> {
    let common = [
        "ingest",
        "--brokers",
        "127.0.0.1:1",
        "--kafka-timeout",
        "1s",
        "--ib-port",
        "1",
    ];
    // A malformed setting (a password given without its key) is refused without its text.
    let mut args = common.to_vec();
    args.extend(["-K", SECRET]);
    let out = run(&args, None)?;
    ensure!(!out.status.success(), "a setting without '=' is refused");
    ensure!(String::from_utf8_lossy(&out.stderr).contains("key=value"), "{out:?}");
    ensure_secret_absent("a malformed -K", &out)?;
    // A password with commas is one setting (not split into a malformed fragment), from a flag
    // and from the environment; whatever then fails (no broker here), the secret is not shown.
    let password = format!("sasl.password={SECRET}");
    let mut args = common.to_vec();
    args.extend(["-K", &password]);
    for (args, env) in [(&args[..], None), (&common[..], Some(password.as_str()))] {
        let out = run(args, env)?;
        ensure!(
            !String::from_utf8_lossy(&out.stderr).contains("key=value"),
            "a comma split the password: {out:?}"
        );
        ensure_secret_absent("a run with a password", &out)?;
    }
    Ok(())
}

#[test]
fn logs_to_a_pipe_carry_no_colour_codes() -> anyhow::Result<()> {
    let child = Command::new(BIN)
        .args(["sim", "--listen", "127.0.0.1:0"])
        .env("POSSYNC_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut child = Reap(child);
    let stderr = child.0.stderr.take().expect("piped");
    let mut seen = String::new();
    for line in BufReader::new(stderr).lines() {
        let line = line?;
        seen.push_str(&line);
        seen.push('\n');
        if line.contains("possync sim listening") {
            break;
        }
    }
    // The reader has gone (the pipe is closed): logging must not break the SIGINT handling.
    signal(&child.0, "INT")?;
    let status = wait_exit(&mut child.0, Duration::from_secs(30))?;
    ensure!(status.success(), "SIGINT after the log reader left: {status}");
    ensure!(seen.contains("INFO"), "a log line was read: {seen:?}");
    ensure!(!seen.contains("\x1b["), "ANSI escape codes in piped logs: {seen:?}");
    Ok(())
}
