//! Measuring processes for the benchmarks: CPU seconds and memory from `/proc`, and commands
//! timed under GNU time (`/usr/bin/time`).

use std::process::{Command, Stdio};
use std::time::Instant;

use super::quantile;
use crate::events::new_id;

/// A `/proc/<pid>/status` memory field (`VmHWM`, `VmRSS`) in MiB.
pub fn process_mem_mib(pid: u32, field: &str) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// CPU seconds (user + system) used so far by process `pid`.
pub fn process_cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name: state is field 3, utime 14, stime 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks / clock_ticks())
}

/// CPU seconds (user + system) used so far by the processes `pids`, summed.
pub fn group_cpu_seconds(pids: &[u32]) -> f64 {
    member_cpu_seconds(pids).iter().sum()
}

/// CPU seconds (user + system) of each process of `pids` (0 for one that is gone).
pub fn member_cpu_seconds(pids: &[u32]) -> Vec<f64> {
    pids.iter().map(|p| process_cpu_seconds(*p).unwrap_or(0.0)).collect()
}

pub(super) fn group_mem_mib(pids: &[u32], field: &str) -> f64 {
    pids.iter().filter_map(|p| process_mem_mib(*p, field)).sum()
}

/// A command timed by [`time_command`].
#[derive(Debug, Clone, Default)]
pub struct Timed {
    /// Wall time per run: median and max (s).
    pub wall_p50_s: f64,
    pub wall_max_s: f64,
    /// CPU (user + system) per run, median (s).
    pub cpu_p50_s: f64,
    /// Peak RSS over the runs (MiB).
    pub rss_max_mib: f64,
    /// What the last run printed.
    pub stdout: String,
}

/// Runs `bin argv` `runs` times (one after the other) under GNU time (`/usr/bin/time`): wall
/// time, CPU and peak RSS. (Not `wait4(2)` from here: a child's `ru_maxrss` starts at the
/// RSS of the process it was spawned from.) `None` when the binary refuses the flags (an older
/// build); an error when a run fails.
///
/// # Errors
/// The command cannot be run or fails.
pub fn time_command(bin: &std::path::Path, argv: &[&str], runs: u32) -> Result<Option<Timed>, String> {
    let (mut walls, mut cpus, mut rss) = (Vec::new(), Vec::new(), 0f64);
    let mut stdout = String::new();
    let times = std::env::temp_dir().join(format!("possync-bench-time-{}", new_id()));
    for _ in 0..runs.max(1) {
        let started = Instant::now();
        let out = Command::new("/usr/bin/time")
            .args(["-f", "%U %S %M", "-o"])
            .arg(&times)
            .arg(bin)
            .args(argv)
            .env("POSSYNC_LOG", "warn")
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("spawn /usr/bin/time {}: {e}", bin.display()))?;
        let wall = started.elapsed().as_secs_f64();
        let stderr = String::from_utf8_lossy(&out.stderr);
        if stderr.contains("unexpected argument") {
            return Ok(None);
        }
        let t = std::fs::read_to_string(&times).map_err(|e| format!("GNU time's output: {e}"))?;
        let _ = std::fs::remove_file(&times);
        let f: Vec<f64> = t
            .lines()
            .last()
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|x| x.parse().ok())
            .collect();
        let [user, sys, kib] = f[..] else {
            return Err(format!("GNU time printed {t:?}"));
        };
        walls.push(wall);
        cpus.push(user + sys);
        rss = rss.max(kib / 1024.0);
        stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        // `status` exits 1 when unhealthy and still prints its report.
        if !out.status.success() && stdout.is_empty() {
            return Err(format!("{} {} failed: {stderr}", bin.display(), argv.join(" ")));
        }
    }
    walls.sort_by(f64::total_cmp);
    cpus.sort_by(f64::total_cmp);
    Ok(Some(Timed {
        wall_p50_s: quantile(&walls, 0.5),
        wall_max_s: quantile(&walls, 1.0),
        cpu_p50_s: quantile(&cpus, 0.5),
        rss_max_mib: rss,
        stdout,
    }))
}
