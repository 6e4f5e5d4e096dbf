//! Command-line surface: one binary, one subcommand per process of the design.
//!
//! Every flag has an environment variable (`POSSYNC_…`); `possync <subcommand> --help` explains
//! each knob. This module only maps parsed flags to plain config structs and calls the
//! library; the work happens in the subcommand's own module.

use crate::delta::storage::Access;
use crate::metrics::Readiness;
use crate::topics::{require, Process};
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use tokio_util::sync::CancellationToken;

/// possync: keep Interactive Brokers positions in sync, IB → Kafka (Avro) → Delta Lake.
///
/// Active contracts (held by a running strategy, per the strategy registry) are streamed in
/// real time under a hard streaming-slot budget; everything else goes through a durable
/// position queue drained by snapshot polls that cost no IB streaming slot.
#[derive(Parser, Debug)]
#[command(name = "possync", version, about, long_about)]
pub struct Cli {
    /// Log filter (tracing `EnvFilter` syntax), e.g. `info`, `possync=debug,rdkafka=warn`.
    /// Overrides `-v`. Default: `warn,possync=info`; for `run`, `warn` (its progress goes to
    /// stdout), so a newcomer sees start, stop, progress and warnings only.
    #[arg(long, global = true, env = "POSSYNC_LOG")]
    pub log: Option<String>,
    /// More log lines on stderr: `-v` possync's INFO lines (the default of every command but
    /// `run`), `-vv` DEBUG. Ignored when `--log` is given.
    #[arg(short, long, global = true, action = clap::ArgAction::Count, env = "POSSYNC_VERBOSE")]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

/// The processes of possync.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Everything in one process on the embedded default: IB simulator + embedded Kafka broker
    /// + ingest + queue worker + materialize into local Delta tables (`./possync-data`).
    Run(crate::run::RunArgs),
    /// IB Gateway simulator speaking the TWS socket protocol (server version ≥ 213): positions,
    /// PnL, executions with commission reports, and IB's limits and faults.
    Sim(crate::sim::SimArgs),
    /// Kafka topics → Delta tables, exactly once (a consumer group; run several for more).
    Materialize(crate::materialize::MaterializeArgs),
    /// Compact small files of the append-only tables and vacuum all tables (safe while
    /// materialize runs).
    Maintain(crate::materialize::MaintainArgs),
    /// IB positions → routed Avro events on Kafka (active: real time within the slot budget;
    /// queued: enqueue events for the queue worker).
    Ingest(crate::ingest::IngestArgs),
    /// Drain the position queue: every tick, refresh the oldest pending items with snapshot
    /// polls that use no streaming slot.
    QueueWorker(crate::queue_worker::QueueWorkerArgs),
    /// Create or check the possync topics on a real Kafka cluster (partitions, replication,
    /// min.insync.replicas, the registry topic compacted).
    Topics(crate::topics::TopicsArgs),
    /// Write or read the strategy registry (which strategies hold which contracts).
    Registry(crate::registry::RegistryArgs),
    /// Is the pipeline keeping up? Lag per topic-partition (high watermark vs Delta txn
    /// version, in events and seconds), slots, queue depth, dead letters, last commits; exits
    /// non-zero when unhealthy.
    Status(crate::ops::status::StatusArgs),
    /// The book from the Delta tables: now, at a `positions_current` version, or as of a time
    /// (a fold of `position_events`).
    Book(crate::ops::book::BookArgs),
    /// The executions (fills with commissions) from the `executions` table, newest last;
    /// `--account`, `--con-id`, `--symbol`, `--date`.
    Fills(crate::ops::fills::FillsArgs),
    /// Positions reconciled against fills: per (account, conId) that moved today, the day's
    /// starting snapshot plus its fills against the position now (agrees / explained /
    /// pending / drifted). `--watch` runs the service that snapshots the book and writes the
    /// `reconciliation` table.
    Reconcile(crate::reconcile::ReconcileArgs),
    /// Recreate `positions_current`, `position_queue` and `strategy_registry` from the audit
    /// log into fresh tables under `--to` (never touches the live ones).
    Rebuild(crate::ops::rebuild::RebuildArgs),
    /// Bring the tables written by an older possync to this build's layout: a dry run that
    /// prints each step unless `--apply`; resumable (run it again after an interruption).
    Migrate(crate::ops::migrate::MigrateArgs),
    /// Benchmarks (not tests): print throughput, CPU efficiency and latency figures.
    Bench {
        #[command(subcommand)]
        which: BenchCommand,
    },
}

/// The benchmarks.
#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Materializer: events/s, events per CPU-second, MB/s, produce → visible latency.
    Materialize(crate::materialize::bench::BenchMaterializeArgs),
    /// Ingest: events/s from the simulator to Kafka acknowledgement, the active route's
    /// latency (IB frame → broker ack, p50/p99), and executions/s with their CPU (live, and
    /// from the day's list after a disconnect).
    Ingest(crate::ingest::bench::BenchIngestArgs),
    /// Queue staleness at desk size: N queued contracts over A accounts, enqueue → POLL
    /// visible in Delta, and the worker's IB message rate and pacing errors.
    Queue(crate::queue_worker::bench::BenchQueueArgs),
    /// Start-up of ingest and the queue worker with weeks of history on a real Kafka cluster:
    /// from the Delta snapshot (`--table-uri`) vs a full replay of the topics.
    Startup(crate::scale::startup::BenchStartupArgs),
    /// Desk size in one go: the materializer at 10k/100k/1M keys, the queue at 10k contracts
    /// over 20 accounts, and (with `--startup-brokers`) start-up with 10M events of history;
    /// prints one table of figures.
    Scale(crate::scale::BenchScaleArgs),
    /// Reconciliation at desk size: one run's wall time and CPU over 100k positions and a
    /// day of 10k fills (the first run, which takes the day's starting snapshot, and later ones).
    Reconcile(crate::reconcile::bench::BenchReconcileArgs),
    /// `possync rebuild` and `book --as-of` over one audit log written as 1 file and as many
    /// (a year of daily files): wall time, CPU and peak RSS of each, and their ratios.
    Rebuild(crate::ops::bench::BenchRebuildArgs),
}

/// The `--schema-registry-url` flags and the Kafka flags of a subcommand that produces or consumes
/// possync's Avro values (`run`, `sim` and the benchmarks keep the fixed schema ids).
fn schema_registry_of(
    command: &Command,
) -> Option<(&crate::schema_registry::SchemaRegistryArgs, &crate::kafka::KafkaArgs)> {
    use crate::registry::RegistryCommand as R;
    match command {
        Command::Materialize(a) => Some((&a.schema_registry, &a.kafka)),
        Command::Ingest(a) => Some((&a.schema_registry, &a.kafka)),
        Command::QueueWorker(a) => Some((&a.schema_registry, &a.kafka)),
        Command::Registry(r) => match &r.command {
            R::Activate(a) => Some((&a.entry.schema_registry, &a.entry.kafka)),
            R::Deactivate(e) => Some((&e.schema_registry, &e.kafka)),
            R::List(l) => Some((&l.schema_registry, &l.kafka)),
            R::Seed(s) => Some((&s.schema_registry, &s.kafka)),
            R::History(_) => None,
        },
        _ => None,
    }
}

/// The command line, with environment values hidden from `--help` on every subcommand (they may
/// hold secrets, such as `POSSYNC_KAFKA_CONFIG`).
pub fn command() -> clap::Command {
    fn hide_env_values(c: clap::Command) -> clap::Command {
        c.mut_args(|a| a.hide_env_values(true)).mut_subcommands(hide_env_values)
    }
    hide_env_values(Cli::command())
}

/// Parses the process arguments with [`command`]; prints help or an error and exits on failure.
pub fn parse() -> Cli {
    let matches = command().get_matches();
    Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
}

impl Cli {
    /// The log filter: `--log` if given, else the command's default raised by `-v`.
    pub fn log_filter(&self) -> String {
        if let Some(f) = &self.log {
            return f.clone();
        }
        let quiet = matches!(self.command, Command::Run(_));
        match (quiet, self.verbose) {
            (true, 0) => "warn".into(),
            (false, 0) | (true, 1) => "warn,possync=info".into(),
            (false, 1) | (true, 2) => "warn,possync=debug".into(),
            _ => "info,possync=trace".into(),
        }
    }
}

/// Sets up `tracing` to stderr with the given filter.
pub fn init_tracing(filter: &str) {
    // The Delta kernel logs every snapshot at INFO (several per second under materialize);
    // keep it at WARN unless the filter names it.
    let filter = if filter.contains("kernel") || filter.contains("deltalake") {
        filter.to_string()
    } else {
        format!("{filter},buoyant_kernel=warn,deltalake_core=warn")
    };
    let filter = filter.as_str();
    let filter = tracing_subscriber::EnvFilter::try_new(filter).unwrap_or_else(|e| {
        eprintln!("possync: bad --log filter {filter:?} ({e}); using \"info\"");
        tracing_subscriber::EnvFilter::new("info")
    });
    // Colour only on a terminal: a log file or pipe must not carry escape codes.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        // A closed stderr (a pipe whose reader left) must not turn every log call into a
        // panic (`eprintln!` of the write error), which would kill the signal handler task.
        .log_internal_errors(false)
        .with_writer(std::io::stderr)
        .init();
}

/// SIGINT and SIGTERM both cancel `shutdown`; a second signal exits at once.
/// Runs a start-up step unless a stop is requested first: `None` then (the command ends
/// cleanly; a blocking call the step made is left to end on its own).
async fn unless_stopped<T, E>(
    shutdown: &CancellationToken,
    step: impl std::future::Future<Output = Result<T, E>>,
) -> Result<Option<T>, E> {
    tokio::select! {
        biased;
        _ = shutdown.cancelled() => {
            tracing::info!("stopped during start-up");
            Ok(None)
        }
        r = step => r.map(Some),
    }
}

pub fn install_signal_handlers(shutdown: CancellationToken) {
    tokio::spawn(async move {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot install SIGTERM handler; Ctrl-C still works");
                let _ = tokio::signal::ctrl_c().await;
                shutdown.cancel();
                return;
            }
        };
        for round in 0..2 {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            if round == 0 {
                tracing::info!("shutdown requested; finishing in-flight work (signal again to exit at once)");
                shutdown.cancel();
            } else {
                tracing::warn!("second signal: exiting now");
                std::process::exit(130);
            }
        }
    });
}

/// `/readyz` of a process that holds an IB connection and publishes to Kafka.
fn ib_client(kafka: &crate::kafka::KafkaConfig) -> Readiness {
    Readiness {
        ib: true,
        kafka_probe: Some(kafka.probe()),
        ..Readiness::default()
    }
}

/// Runs the chosen subcommand until it ends or `shutdown` is cancelled.
///
/// # Errors
/// Whatever the subcommand fails with, with context for the user.
pub async fn dispatch(cli: Cli, shutdown: CancellationToken) -> anyhow::Result<()> {
    if let Some((sr, kafka)) = schema_registry_of(&cli.command) {
        let topics = crate::kafka::KafkaConfig::from_args(kafka)?.topics;
        crate::schema_registry::apply(sr, &topics).await?;
    }
    match cli.command {
        Command::Run(args) => {
            crate::run::run(args.into(), shutdown).await?;
        }
        Command::Sim(args) => crate::sim::run(args.into(), shutdown).await?,
        Command::Materialize(args) => {
            args.tables.probe(Access::Write).await?;
            let kafka = crate::kafka::KafkaConfig::from_args(&args.kafka)?;
            let needed = require(&kafka, Process::Materialize, std::time::Duration::from_secs(30));
            if unless_stopped(&shutdown, needed).await?.is_none() {
                return Ok(());
            }
            let ready = Readiness {
                kafka_probe: Some(kafka.probe()),
                max_commit_age: Some(args.metrics.ready_max_commit_age),
                ..Readiness::default()
            };
            args.metrics.serve(shutdown.child_token(), ready).await?;
            crate::materialize::run((&args).into(), kafka, shutdown).await?
        }
        Command::Maintain(args) => {
            args.tables.probe(Access::Write).await?;
            let report = crate::materialize::maintain::run(&(&args).into()).await?;
            for (table, r) in report {
                println!(
                    "{table}: compacted {} files into {}, vacuumed {}",
                    r.files_compacted, r.files_written, r.files_vacuumed
                );
            }
        }
        Command::Ingest(args) => {
            let kafka = crate::kafka::KafkaConfig::from_args(&args.kafka)?;
            let cfg: crate::ingest::IngestConfig = (&args).into();
            let lease = cfg.lease_group(&kafka.topics).is_some();
            let needed = require(&kafka, Process::Ingest { lease }, args.kafka_timeout);
            if unless_stopped(&shutdown, needed).await?.is_none() {
                return Ok(());
            }
            let ready = Readiness {
                lease: cfg.lease_group(&kafka.topics),
                ..ib_client(&kafka)
            };
            args.metrics.serve(shutdown.child_token(), ready).await?;
            crate::ingest::run(cfg, kafka, shutdown).await?
        }
        Command::QueueWorker(args) => {
            let kafka = crate::kafka::KafkaConfig::from_args(&args.kafka)?;
            let needed = require(&kafka, Process::QueueWorker, args.kafka_timeout);
            if unless_stopped(&shutdown, needed).await?.is_none() {
                return Ok(());
            }
            args.metrics.serve(shutdown.child_token(), ib_client(&kafka)).await?;
            crate::queue_worker::run((&args).into(), kafka, shutdown).await?
        }
        Command::Topics(args) => crate::topics::run(args).await?,
        Command::Registry(args) => {
            if let crate::registry::commands::RegistryCommand::History(h) = &args.command {
                h.tables.probe(Access::Read).await?;
            }
            crate::registry::commands::run(args).await?
        }
        Command::Status(args) => {
            args.tables.probe(Access::Read).await?;
            let kafka = crate::kafka::KafkaConfig::from_args(&args.kafka)?;
            let status = crate::ops::status::check(&(&args).into(), &kafka).await?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print!("{}", crate::ops::status::render_text(&status));
            }
            anyhow::ensure!(
                status.healthy,
                "pipeline unhealthy: {} problem(s), listed in the report above",
                status.problems.len()
            );
        }
        Command::Book(args) => {
            args.tables.probe(Access::Read).await?;
            let book = crate::ops::book::load(&(&args).into()).await?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&book)?);
            } else {
                print!("{}", crate::ops::book::render_text(&book));
            }
        }
        Command::Fills(args) => {
            args.tables.probe(Access::Read).await?;
            let fills = crate::ops::fills::load(&(&args).into()).await?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&fills)?);
            } else {
                print!("{}", crate::ops::fills::render_text(&fills));
            }
        }
        Command::Reconcile(args) => {
            let cfg: crate::reconcile::ReconcileConfig = (&args).into();
            if args.watch {
                args.tables.probe(Access::Write).await?;
                args.metrics.serve(shutdown.child_token(), Readiness::default()).await?;
                crate::reconcile::watch(cfg, shutdown).await?;
            } else {
                args.tables.probe(Access::Read).await?;
                let report = crate::reconcile::check(&cfg).await?;
                if args.json {
                    println!("{}", serde_json::to_string_pretty(&report)?);
                } else {
                    print!("{}", crate::reconcile::render_text(&report, args.problems));
                }
            }
        }
        Command::Rebuild(args) => {
            for (uri, access) in [(&args.from, Access::Read), (&args.to, Access::Write)] {
                let timeout = crate::delta::storage::DEFAULT_STORAGE_TIMEOUT;
                crate::delta::storage::probe(uri, timeout, access).await?;
            }
            let report = crate::ops::rebuild::run(&(&args).into()).await?;
            println!("rebuilt under {}:\n{report}", args.to);
        }
        Command::Migrate(args) => {
            args.tables
                .probe(if args.apply { Access::Write } else { Access::Read })
                .await?;
            println!("{}", crate::ops::migrate::run(&(&args).into()).await?);
        }
        Command::Bench {
            which: BenchCommand::Ingest(args),
        } => {
            println!("{}", crate::ingest::bench::run(args).await?);
        }
        Command::Bench {
            which: BenchCommand::Queue(args),
        } => {
            println!("{}", crate::queue_worker::bench::run(args).await?);
        }
        Command::Bench {
            which: BenchCommand::Startup(args),
        } => {
            println!("{}", crate::scale::startup::run(args).await?);
        }
        Command::Bench {
            which: BenchCommand::Scale(args),
        } => {
            println!("{}", crate::scale::run(args).await?);
        }
        Command::Bench {
            which: BenchCommand::Materialize(args),
        } => {
            println!("{}", crate::materialize::bench::run(args).await?);
        }
        Command::Bench {
            which: BenchCommand::Reconcile(args),
        } => {
            println!("{}", crate::reconcile::bench::run(args).await?);
        }
        Command::Bench {
            which: BenchCommand::Rebuild(args),
        } => {
            println!("{}", crate::ops::bench::run(args).await?);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Cli {
        let m = command().try_get_matches_from(args).expect("parses");
        Cli::from_arg_matches(&m).expect("maps")
    }

    /// `run` shows a newcomer start, stop, progress (stdout) and warnings only; `-v` brings
    /// back the INFO lines every other command logs by default (issue 24).
    #[test]
    fn run_is_quiet_by_default_and_v_raises_every_command() {
        assert_eq!(parse(&["possync", "run"]).log_filter(), "warn");
        assert_eq!(parse(&["possync", "run", "-v"]).log_filter(), "warn,possync=info");
        assert_eq!(parse(&["possync", "-vv", "run"]).log_filter(), "warn,possync=debug");
        assert_eq!(parse(&["possync", "status"]).log_filter(), "warn,possync=info");
        assert_eq!(parse(&["possync", "status", "-v"]).log_filter(), "warn,possync=debug");
        assert_eq!(parse(&["possync", "run", "-v", "--log", "debug"]).log_filter(), "debug");
    }

    /// Every flag of every subcommand can be set from the environment (design rule).
    #[test]
    fn every_flag_has_an_env_var() {
        fn walk(c: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for a in c.get_arguments() {
                let builtin = matches!(a.get_id().as_str(), "help" | "version");
                if !builtin && !a.is_positional() && a.get_env().is_none() {
                    missing.push(format!("{path} --{}", a.get_long().unwrap_or(a.get_id().as_str())));
                }
            }
            for s in c.get_subcommands() {
                walk(s, &format!("{path} {}", s.get_name()), missing);
            }
        }
        let mut missing = Vec::new();
        walk(&command(), "possync", &mut missing);
        assert!(missing.is_empty(), "flags without an env var: {missing:?}");
    }
}
