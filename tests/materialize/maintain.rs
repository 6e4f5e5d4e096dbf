//! `possync maintain` while materialize runs: compaction and vacuum race with live commits,
//! checkpoints are written every N commits, and the tables stay exact and readable. The
//! materializer's own `maintain_every` schedule compacts while it materializes, just as exactly.

use std::time::Duration;

use crate::materialize_support::*;
use anyhow::ensure;
use possync::materialize::{self, maintain, MaintainConfig, TableKind};
use tokio_util::sync::CancellationToken;

/// Produces `rounds` batches of `per_round` position events (plus a registry event and a poison
/// message every tenth round), one batch every 100 ms, so maintenance races live commits.
fn paced_stream(
    env: &Env,
    seed: u64,
    rounds: usize,
    per_round: usize,
) -> anyhow::Result<tokio::task::JoinHandle<anyhow::Result<Vec<Produced>>>> {
    let producer = env.producer()?;
    let topics = env.kafka.topics.clone();
    Ok(tokio::spawn(async move {
        let mut gen = Gen::new(seed, &topics, 100);
        let mut produced = Vec::new();
        for round in 0..rounds {
            let mut out: Vec<_> = (0..per_round).map(|_| gen.position()).collect();
            if round % 10 == 0 {
                out.push(gen.registry());
                out.push(gen.poison(round));
            }
            produced.extend(produce(&producer, out).await?);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        anyhow::Ok(produced)
    }))
}

fn maintain_config(base: &str) -> MaintainConfig {
    // A short vacuum retention so that this test sees files go; still far longer than any
    // write → commit of the running materializer.
    MaintainConfig {
        table_uri: base.to_string(),
        vacuum_retention: Some(Duration::from_secs(3)),
        ..MaintainConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maintain_while_materialize_runs() -> anyhow::Result<()> {
    let env = Env::start(2)?;
    let stream = paced_stream(&env, 5, 60, 80)?;

    let cfg = materialize::MaterializeConfig {
        flush_latency: Duration::from_millis(100),
        checkpoint_every: 5,
        // The external `maintain` below is under test here, not the built-in schedule.
        maintain_every: None,
        ..env.config("m")
    };
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(materialize::run(cfg, env.kafka.clone(), shutdown.clone()));
    let mut compacted = 0;
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_secs(3)).await;
        let report = maintain::run(&maintain_config(&env.base)).await?;
        compacted += report["position_events"].files_compacted;
    }
    let produced = stream.await??;
    let ns = env.namespace().await?;
    materialize::wait_caught_up(&env.base, &ns, &env.kafka, Duration::from_secs(60)).await?;
    shutdown.cancel();
    task.await??;
    ensure!(compacted > 0, "maintain compacted nothing while materialize ran");

    tokio::time::sleep(Duration::from_secs(3)).await;
    let report = maintain::run(&maintain_config(&env.base)).await?;
    ensure!(
        report["position_events"].files_vacuumed > 0,
        "vacuum deleted nothing: {report:?}"
    );
    check_exact(&env.base, &produced).await?;

    // One file per event date is left, and each table has checkpoints.
    let t = materialize::tables::Table::open(&env.base, TableKind::PositionEvents).await?;
    let files = t.files()?;
    let dates: std::collections::BTreeSet<_> = files.iter().map(|f| format!("{:?}", f.partition_values)).collect();
    ensure!(
        files.len() == dates.len(),
        "{} files for {} dates after compaction",
        files.len(),
        dates.len()
    );
    for kind in [
        TableKind::PositionEvents,
        TableKind::PositionsCurrent,
        TableKind::PositionQueue,
    ] {
        let log = std::path::Path::new(&env.base).join(kind.name()).join("_delta_log");
        let checkpoints = std::fs::read_dir(&log)?
            .filter(|e| {
                e.as_ref()
                    .is_ok_and(|e| e.file_name().to_string_lossy().contains("checkpoint"))
            })
            .count();
        ensure!(checkpoints > 0, "{} has no checkpoint", kind.name());
    }
    let json = python_readers(&env.base)?;
    let events = produced
        .iter()
        .filter(|p| matches!(p.payload, Payload::Position(_)))
        .count() as u64;
    ensure!(
        json["position_events"]["duckdb_rows"] == events && json["position_events"]["deltalake_rows"] == events,
        "{json}"
    );
    ensure!(
        json["position_events"]["duckdb_distinct_coordinates"] == events,
        "{json}"
    );
    Ok(())
}

/// Operations of the commits in `table`'s log, by version.
fn operations(base: &str, table: TableKind) -> anyhow::Result<std::collections::BTreeMap<i64, String>> {
    let log = std::path::Path::new(base).join(table.name()).join("_delta_log");
    let mut out = std::collections::BTreeMap::new();
    for entry in std::fs::read_dir(&log)? {
        let path = entry?.path();
        let name = path.file_name().unwrap_or_default().to_string_lossy().into_owned();
        let Some(version) = name.strip_suffix(".json").and_then(|v| v.parse::<i64>().ok()) else {
            continue;
        };
        for line in std::fs::read_to_string(&path)?.lines() {
            let action: serde_json::Value = serde_json::from_str(line)?;
            if let Some(op) = action["commitInfo"]["operation"].as_str() {
                out.insert(version, op.to_string());
            }
        }
    }
    Ok(out)
}

/// Live data files and distinct partitions (event dates) of `position_events`.
async fn event_files(base: &str) -> anyhow::Result<(usize, usize)> {
    let t = materialize::tables::Table::open(base, TableKind::PositionEvents).await?;
    let files = t.files()?;
    let dates: std::collections::BTreeSet<_> = files.iter().map(|f| format!("{:?}", f.partition_values)).collect();
    Ok((files.len(), dates.len()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn materializer_maintains_on_its_own_schedule() -> anyhow::Result<()> {
    let env = Env::start(2)?;
    // 80 rounds of 100 ms: the stream spans several maintenance periods.
    let stream = paced_stream(&env, 7, 80, 50)?;

    let cfg = materialize::MaterializeConfig {
        flush_latency: Duration::from_millis(100),
        maintain_every: Some(Duration::from_secs(2)),
        ..env.config("m")
    };
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(materialize::run(cfg, env.kafka.clone(), shutdown.clone()));
    let produced = stream.await??;
    let ns = env.namespace().await?;
    materialize::wait_caught_up(&env.base, &ns, &env.kafka, Duration::from_secs(60)).await?;

    // Compaction ran between flush commits: an OPTIMIZE commit precedes some append.
    let ops = operations(&env.base, TableKind::PositionEvents)?;
    let first_optimize = ops.iter().find(|(_, op)| *op == "OPTIMIZE").map(|(v, _)| *v);
    let last_write = ops.iter().rev().find(|(_, op)| *op != "OPTIMIZE").map(|(v, _)| *v);
    ensure!(
        matches!((first_optimize, last_write), (Some(o), Some(w)) if o < w),
        "no compaction while the stream was materialized: {ops:?}"
    );

    // Once idle, the next pass leaves one file per event date.
    wait_for(
        "position_events compacted to one file per date",
        Duration::from_secs(30),
        || async {
            let (files, dates) = event_files(&env.base).await?;
            Ok(files == dates)
        },
    )
    .await?;
    ensure!(!task.is_finished(), "the materializer stopped: {:?}", task.await?);
    shutdown.cancel();
    task.await??;
    check_exact(&env.base, &produced).await?;
    let (files, _) = event_files(&env.base).await?;
    let flushes = ops.values().filter(|op| *op != "OPTIMIZE").count();
    ensure!(files < flushes, "{files} files after {flushes} appends");
    Ok(())
}

/// Every file on disk under `dir` (not the log), recursively.
fn data_files(dir: &std::path::Path) -> anyhow::Result<Vec<std::path::PathBuf>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        if p.file_name().is_some_and(|n| n == "_delta_log") {
            continue;
        }
        if p.is_dir() {
            out.extend(data_files(&p)?);
        } else {
            out.push(p);
        }
    }
    Ok(out)
}

/// Issue 20 #2: a file re-added with a new deletion vector leaves its old vector named only by
/// the remove action. Files written long ago but superseded a moment ago (here: every file's
/// modification time set two hours back, the removes are seconds old, the retention is one
/// hour) must survive a vacuum, so that every version within the retention still reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vacuum_keeps_the_deletion_vectors_of_versions_within_the_retention() -> anyhow::Result<()> {
    use possync::ops::book::{self, At, BookConfig};
    let env = Env::start(1)?;
    let producer = env.producer()?;
    let cfg = materialize::MaterializeConfig {
        maintain_every: None,
        ..env.config("m")
    };
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(materialize::run(cfg, env.kafka.clone(), shutdown.clone()));
    // Rounds of updates to the same 20 keys: each round re-adds the older files with new
    // deletion vectors.
    let mut gen = Gen::new(11, &env.kafka.topics, 20);
    for _ in 0..5 {
        produce(&producer, (0..40).map(|_| gen.position()).collect()).await?;
        let ns = env.namespace().await?;
        materialize::wait_caught_up(&env.base, &ns, &env.kafka, Duration::from_secs(60)).await?;
    }
    shutdown.cancel();
    task.await??;

    let table_dir = std::path::Path::new(&env.base).join(TableKind::PositionsCurrent.name());
    let newest = materialize::tables::Table::open(&env.base, TableKind::PositionsCurrent)
        .await?
        .version();
    let book_at = |v: i64| {
        let base = env.base.clone();
        async move {
            book::load(&BookConfig {
                table_uri: base,
                account: None,
                at: At::Version(v),
                include_closed: true,
            })
            .await
        }
    };
    let mut before = Vec::new();
    for v in 1..=newest {
        before.push(book_at(v).await?.rows);
    }
    // The case under test exists: vectors on disk that the newest version does not use.
    let vectors = |files: &[std::path::PathBuf]| {
        files
            .iter()
            .filter(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("deletion_vector_"))
            })
            .count()
    };
    let on_disk = data_files(&table_dir)?;
    let t = materialize::tables::Table::open(&env.base, TableKind::PositionsCurrent).await?;
    let in_use: std::collections::BTreeSet<_> = t
        .files()?
        .iter()
        .filter_map(|f| f.add.deletion_vector.as_ref().map(|d| d.path_or_inline_dv.clone()))
        .collect();
    ensure!(
        vectors(&on_disk) > in_use.len(),
        "no superseded deletion vector to protect: {} on disk, {} in use",
        vectors(&on_disk),
        in_use.len()
    );
    // Files written two hours ago (by their modification time), an orphan among them.
    let orphan = table_dir.join("part-00000-orphan-of-a-crashed-writer.parquet");
    std::fs::write(&orphan, b"not referenced by any version")?;
    let two_hours_ago = std::time::SystemTime::now() - Duration::from_secs(2 * 3600);
    for p in data_files(&table_dir)? {
        std::fs::File::options()
            .write(true)
            .open(&p)?
            .set_modified(two_hours_ago)?;
    }

    let report = maintain::run(&MaintainConfig {
        table_uri: env.base.clone(),
        compact: false,
        vacuum_retention: Some(Duration::from_secs(3600)),
        ..MaintainConfig::default()
    })
    .await?;
    ensure!(!orphan.exists(), "vacuum left the orphan: {report:?}");
    ensure!(report["positions_current"].files_vacuumed >= 1, "{report:?}");
    for (i, rows) in before.iter().enumerate() {
        let v = i as i64 + 1;
        let after = book_at(v)
            .await
            .map_err(|e| anyhow::anyhow!("version {v} of {newest} no longer reads after vacuum: {e}"))?;
        ensure!(&after.rows == rows, "version {v} reads differently after vacuum");
    }
    Ok(())
}
