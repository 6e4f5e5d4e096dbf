//! `possync bench rebuild`: `possync rebuild` and `possync book --as-of` over an audit log of
//! `--keys` keys and `--events` events, written as 1 file and as `--files` files (a year of
//! daily files: one per day, one `event_date` partition each), each run a child process timed
//! by GNU time (wall, CPU, peak RSS). The fold must cost about the same whatever the number of
//! files: the figures of the many-file log over those of the one-file log are printed.

use std::fmt::Write as _;
use std::path::PathBuf;

use crate::events::{new_id, Route};
use crate::materialize::bench::{synthetic_event, time_command, Timed};
use crate::materialize::buffer::{Buffers, Incoming, Role};
use crate::materialize::tables::{append_operation, Table, TableKind};
use crate::materialize::MaterializeError;
use deltalake::arrow::array::RecordBatch;

/// Flags of `possync bench rebuild`.
#[derive(clap::Args, Debug, Clone)]
pub struct BenchRebuildArgs {
    /// Distinct (account, con_id) keys.
    #[arg(long, default_value_t = 1_000_000, env = "POSSYNC_BENCH_REBUILD_KEYS")]
    pub keys: u64,
    /// Events in the log (every key at least once when >= keys).
    #[arg(long, default_value_t = 1_000_000, env = "POSSYNC_BENCH_REBUILD_EVENTS")]
    pub events: u64,
    /// Files (days) of the log, comma-separated: each count is a log of its own.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "1,365",
        env = "POSSYNC_BENCH_REBUILD_FILES"
    )]
    pub files: Vec<u64>,
    /// The possync binaries timed (comma-separated; default: this one), e.g. an older build to
    /// compare with.
    #[arg(long, value_delimiter = ',', env = "POSSYNC_BENCH_REBUILD_BIN")]
    pub bin: Vec<PathBuf>,
    /// Where to put the logs (default: a fresh temporary directory, removed at the end).
    #[arg(long, env = "POSSYNC_BENCH_REBUILD_DIR")]
    pub dir: Option<PathBuf>,
}

/// µs of 2025-01-01T00:00:00Z: the first day of the log.
const DAY0: i64 = 1_735_689_600_000_000;
const DAY: i64 = 86_400_000_000;

/// Events `from..to` of a synthetic log over `keys` keys (event `i` on key `i % keys`, even
/// ones on the ACTIVE route) as `position_events` rows, decoded as the materializer decodes
/// them; `time(i)` is event `i`'s ingest time.
///
/// # Errors
/// A synthetic event the decoder refuses (a bug).
pub(crate) fn log_rows(
    keys: u64,
    from: u64,
    to: u64,
    session: &str,
    time: impl Fn(u64) -> i64,
) -> Result<Vec<RecordBatch>, MaterializeError> {
    let mut buffers = Buffers::new("bench");
    for i in from..to {
        let route = if i % 2 == 0 { Route::Active } else { Route::Queued };
        let mut e = synthetic_event(i, i % keys.max(1), route, session);
        e.ingest_time = time(i);
        e.ib_time = e.ingest_time - 1_000;
        let value = e.encode().map_err(|e| MaterializeError::Task(e.to_string()))?;
        let (role, topic) = match route {
            Route::Active => (Role::Active, "bench.active"),
            _ => (Role::Queued, "bench.queued"),
        };
        let key = e.key();
        let dead = buffers.push(&Incoming {
            role,
            topic,
            partition: 0,
            // Offsets only need to grow per topic-partition.
            offset: i as i64,
            timestamp: Some(e.ingest_time),
            key: Some(key.as_bytes()),
            value: Some(&value),
        });
        if let Some(why) = dead {
            return Err(MaterializeError::Task(format!("synthetic event refused: {why}")));
        }
    }
    Ok(buffers
        .freeze()
        .map_err(|e| MaterializeError::Task(e.to_string()))?
        .into_iter()
        .map(|p| p.rows)
        .collect())
}

/// Writes a `position_events` log of `events` events over `keys` keys as `files` commits of
/// one file each, day `d` holding the `d`-th slice of the events (ingest times on that day).
async fn write_log(base: &str, keys: u64, events: u64, files: u64) -> Result<(), MaterializeError> {
    let mut t = Table::open(base, TableKind::PositionEvents).await?;
    let session = new_id();
    for d in 0..files {
        let (from, to) = (events * d / files, events * (d + 1) / files);
        // Later events are newer; each day's events lie on that day.
        let rows = log_rows(keys, from, to, &session, |i| DAY0 + d as i64 * DAY + (i - from) as i64)?;
        let adds = t.write_files(&rows).await?;
        let actions = adds.into_iter().map(deltalake::kernel::Action::Add).collect();
        t.commit(actions, &[], append_operation(TableKind::PositionEvents), 100)
            .await?;
    }
    Ok(())
}

fn show(t: &Timed) -> String {
    format!(
        "wall {:.2} s, CPU {:.2} s, peak RSS {:.0} MiB",
        t.wall_p50_s, t.cpu_p50_s, t.rss_max_mib
    )
}

/// Runs the benchmark; returns its figures (markdown).
///
/// # Errors
/// Table errors; a run that fails.
pub async fn run(args: BenchRebuildArgs) -> Result<String, MaterializeError> {
    let own = std::env::current_exe().map_err(|e| MaterializeError::Task(format!("own executable: {e}")))?;
    let bins = if args.bin.is_empty() {
        vec![own]
    } else {
        args.bin.clone()
    };
    let root = args
        .dir
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join(format!("possync-bench-rebuild-{}", new_id())));
    let mut out = format!(
        "| log ({} events, {} keys) | binary | rebuild | book --as-of |\n|---|---|---|---|\n",
        args.events, args.keys
    );
    // (binary, files) -> (rebuild, book)
    let mut figures: Vec<(usize, u64, Timed, Timed)> = Vec::new();
    for &files in &args.files {
        let base = root.join(format!("log-{files}"));
        let base = base.to_string_lossy().into_owned();
        eprintln!(
            "writing {} events over {} keys as {files} file(s) ...",
            args.events, args.keys
        );
        write_log(&base, args.keys, args.events, files.max(1)).await?;
        let as_of = crate::ops::rfc3339_micros(DAY0 + files.max(1) as i64 * DAY);
        for (b, bin) in bins.iter().enumerate() {
            let to = root.join(format!("rebuilt-{files}-{b}")).to_string_lossy().into_owned();
            let rebuild = ["rebuild", "--from", base.as_str(), "--to", to.as_str()];
            let rebuilt = time_command(bin, &rebuild, 1)
                .map_err(MaterializeError::Task)?
                .ok_or_else(|| MaterializeError::Task(format!("{} rebuild refused", bin.display())))?;
            // The fold covers every key; an account no key has keeps the printout empty.
            let book = [
                "book",
                "--json",
                "--table-uri",
                base.as_str(),
                "--as-of",
                as_of.as_str(),
                "--account",
                "none",
            ];
            let booked = time_command(bin, &book, 1)
                .map_err(MaterializeError::Task)?
                .ok_or_else(|| MaterializeError::Task(format!("{} book refused", bin.display())))?;
            eprintln!(
                "{} files, {}: rebuild {}; book --as-of {}",
                files,
                bin.display(),
                show(&rebuilt),
                show(&booked)
            );
            let _ = writeln!(
                out,
                "| {files} file(s) | {} | {} | {} |",
                bin.display(),
                show(&rebuilt),
                show(&booked)
            );
            figures.push((b, files, rebuilt, booked));
        }
    }
    // Each binary's many-file figures over its one-file figures.
    if let Some(&one) = args.files.iter().min() {
        for (b, bin) in bins.iter().enumerate() {
            let base = figures.iter().find(|f| f.0 == b && f.1 == one);
            for f in figures.iter().filter(|f| f.0 == b && f.1 != one) {
                let Some(base) = base else { continue };
                let _ = writeln!(
                    out,
                    "\n{}: {} files over {one}: rebuild {:.2}x wall, {:.2}x RSS; book --as-of {:.2}x wall, {:.2}x RSS",
                    bin.display(),
                    f.1,
                    f.2.wall_p50_s / base.2.wall_p50_s.max(1e-9),
                    f.2.rss_max_mib / base.2.rss_max_mib.max(1e-9),
                    f.3.wall_p50_s / base.3.wall_p50_s.max(1e-9),
                    f.3.rss_max_mib / base.3.rss_max_mib.max(1e-9),
                );
            }
        }
    }
    if args.dir.is_none() {
        let _ = std::fs::remove_dir_all(&root);
    }
    Ok(out)
}
