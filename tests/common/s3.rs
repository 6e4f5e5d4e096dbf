//! A local S3 server for tests: moto's server mode (`tests/py/s3_server.py`) on a free loopback
//! port, stopped when the handle drops (and by the server itself when its stdin closes, should
//! the test process die).

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::Duration;

use anyhow::Context;

/// How to start the server.
#[derive(Debug, Clone, Default)]
pub struct S3Options {
    /// Buckets created before the server is handed out.
    pub buckets: Vec<String>,
    /// IAM checks on: only the server's own key pair is accepted.
    pub auth: bool,
    /// With `auth`: the key may only read and list.
    pub read_only: bool,
    /// A store without conditional writes: `If-None-Match` is dropped from every request.
    pub ignore_if_none_match: bool,
    /// Moto as shipped: conditional PUTs not serialized (see `tests/py/s3_server.py`).
    pub unserialized: bool,
    /// Interpreter thread switch interval of the server (widens moto's race window).
    pub switch_interval: Option<f64>,
}

/// A running moto S3 server.
pub struct S3Server {
    child: Child,
    _stdin: ChildStdin,
    pub endpoint: String,
    pub region: String,
    pub access_key_id: String,
    pub secret_access_key: String,
}

impl S3Server {
    /// Starts a server and waits (up to 60 s) until it serves, its buckets created.
    pub fn start(opts: &S3Options) -> anyhow::Result<S3Server> {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/py/s3_server.py");
        let mut cmd = Command::new("python3");
        cmd.arg(script);
        for b in &opts.buckets {
            cmd.args(["--bucket", b]);
        }
        if opts.auth {
            cmd.arg("--auth");
        }
        if opts.read_only {
            cmd.arg("--read-only");
        }
        if opts.ignore_if_none_match {
            cmd.arg("--ignore-if-none-match");
        }
        if opts.unserialized {
            cmd.arg("--unserialized");
        }
        if let Some(s) = opts.switch_interval {
            cmd.args(["--switch-interval", &s.to_string()]);
        }
        // The server must not sign its own setup requests with the test's AWS settings.
        for k in [
            "AWS_ENDPOINT_URL",
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_PROFILE",
        ] {
            cmd.env_remove(k);
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("start python3 tests/py/s3_server.py (moto[server] from tests/py/requirements.txt)")?;
        let stdin = child.stdin.take().expect("piped stdin");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(line) if !line.trim().is_empty() => line,
            other => {
                let _ = child.kill();
                let _ = child.wait();
                anyhow::bail!("s3_server.py did not start (got {other:?}); see its stderr above");
            }
        };
        let v: serde_json::Value =
            serde_json::from_str(&line).with_context(|| format!("s3_server.py said {line:?}"))?;
        let field = |k: &str| v[k].as_str().map(str::to_string).context(k.to_string());
        Ok(S3Server {
            endpoint: field("endpoint")?,
            region: field("region")?,
            access_key_id: field("access_key_id")?,
            secret_access_key: field("secret_access_key")?,
            child,
            _stdin: stdin,
        })
    }

    /// The `AWS_*` settings a client of this server needs.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT_URL", self.endpoint.clone()),
            ("AWS_REGION", self.region.clone()),
            ("AWS_ACCESS_KEY_ID", self.access_key_id.clone()),
            ("AWS_SECRET_ACCESS_KEY", self.secret_access_key.clone()),
            ("AWS_ALLOW_HTTP", "true".into()),
        ]
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A bucket name no other test uses.
pub fn unique_bucket(what: &str) -> String {
    format!("possync-{what}-{}", &uuid::Uuid::new_v4().simple().to_string()[..10])
}
