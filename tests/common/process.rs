//! Driving the real `possync` binary from tests: a guard that reaps a child if the test fails,
//! signals, and waiting for exit with a deadline.

#![allow(dead_code)]

use std::process::{Child, ExitStatus};
use std::time::{Duration, Instant};

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_possync");

/// What a finished `possync` command printed.
pub struct Ran {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
}

impl Ran {
    /// stdout then stderr.
    pub fn all(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

/// Runs `cmd` to its end as a user would see it: no backtrace on an error exit (a CI shell
/// may set `RUST_BACKTRACE`).
pub fn run(cmd: &mut std::process::Command) -> anyhow::Result<Ran> {
    let out = cmd
        .env("RUST_BACKTRACE", "0")
        .env("RUST_LIB_BACKTRACE", "0")
        .output()
        .map_err(|e| anyhow::anyhow!("run {cmd:?}: {e}"))?;
    Ok(Ran {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

/// Runs `cmd`; its stdout, or an error with everything it printed when it failed.
pub fn run_ok(cmd: &mut std::process::Command) -> anyhow::Result<String> {
    let ran = run(cmd)?;
    anyhow::ensure!(ran.ok, "{cmd:?} failed: {}", ran.all());
    Ok(ran.stdout)
}

/// Kills the child if the test fails before it stopped it.
pub struct Reap(pub Child);

impl Drop for Reap {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Sends `signal` (`INT`, `TERM`, …) to the child.
pub fn signal(child: &Child, signal: &str) -> anyhow::Result<()> {
    let status = std::process::Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(child.id().to_string())
        .status()?;
    anyhow::ensure!(status.success(), "kill -{signal} failed");
    Ok(())
}

/// Waits for the child to exit, at most `within`.
pub fn wait_exit(child: &mut Child, within: Duration) -> anyhow::Result<ExitStatus> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(s) = child.try_wait()? {
            return Ok(s);
        }
        anyhow::ensure!(Instant::now() < deadline, "process did not exit within {within:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}
