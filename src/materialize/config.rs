//! Flags of `possync materialize` / `possync maintain` and the plain config structs they become.
//!
//! Tests build [`MaterializeConfig`] directly (it has a `Default`); the binary builds it from
//! [`MaterializeArgs`] so that every knob has a flag and a `POSSYNC_…` environment variable.

use std::time::Duration;

use crate::kafka::KafkaArgs;
use crate::metrics::MetricsArgs;

/// Default location of the Delta tables (one directory per table below it).
pub const DEFAULT_TABLE_URI: &str = "./possync-data/tables";
/// Default consumer group of the materializer.
pub const DEFAULT_GROUP: &str = "possync-materialize";
/// Default `--flush-events` (see there).
pub const DEFAULT_FLUSH_EVENTS: usize = 50_000;

/// Flags of `possync materialize`.
#[derive(clap::Args, Debug, Clone)]
pub struct MaterializeArgs {
    #[command(flatten)]
    pub kafka: KafkaArgs,
    #[command(flatten)]
    pub schema_registry: crate::schema_registry::SchemaRegistryArgs,
    #[command(flatten)]
    pub tables: TableArgs,
    #[command(flatten)]
    pub metrics: MetricsArgs,
    /// Kafka consumer group; members of one group share the partitions and stay exact.
    #[arg(long, env = "POSSYNC_MATERIALIZE_GROUP", default_value = DEFAULT_GROUP)]
    pub group: String,
    /// Longest time an event waits in memory before it is committed to Delta (idle topics
    /// still flush): the floor of produce-to-visible latency.
    #[arg(long, env = "POSSYNC_FLUSH_LATENCY", default_value = "1s", value_parser = humantime::parse_duration)]
    pub flush_latency: Duration,
    /// Flush as soon as this many messages are buffered (all partitions together). Bounds the
    /// memory of a catch-up flush: at 1M keys, 50,000 instead of 200,000 lowered the peak RSS
    /// from 656 to 474 MiB and raised catch-up from 90k to 107k events per CPU-second.
    #[arg(long, env = "POSSYNC_FLUSH_EVENTS", default_value_t = DEFAULT_FLUSH_EVENTS)]
    pub flush_events: usize,
    /// Flush as soon as this many message bytes are buffered (all partitions together).
    #[arg(long, env = "POSSYNC_FLUSH_BYTES", default_value_t = 64 << 20)]
    pub flush_bytes: usize,
    /// Write a Delta checkpoint every N commits of a table (keeps table loading fast).
    #[arg(long, env = "POSSYNC_CHECKPOINT_EVERY", default_value_t = 100)]
    pub checkpoint_every: u64,
    /// Name of the offset namespace in the Delta txn app ids, instead of the Kafka cluster id.
    /// Only needed when a cluster's id is not stable or not unique (see the module docs).
    #[arg(long, env = "POSSYNC_OFFSETS_NAMESPACE")]
    pub offsets_namespace: Option<String>,
    /// Start although the tables were written under another offset namespace (another Kafka
    /// cluster id or `--offsets-namespace`), and record this one. Only for a genuinely new
    /// cluster: its partitions start at their first offset, and the rows stay apart by their
    /// `kafka_namespace`. Without it such a start is refused.
    #[arg(long, env = "POSSYNC_ALLOW_NAMESPACE_CHANGE")]
    pub allow_namespace_change: bool,
    /// Re-read the topics from the start of their logs instead of the offsets stored in Delta
    /// (an audit: each table still drops what it already holds, so nothing changes).
    #[arg(long, env = "POSSYNC_REPLAY_FROM_BEGINNING")]
    pub replay_from_beginning: bool,
    /// Re-stamp the Delta txn action (stored offset) of every owned partition not written for
    /// this long, even when it gets no messages, so that no live partition's offset reaches the
    /// tables' `delta.setTransactionRetentionDuration` (30 days) and expires. Must be at most
    /// half of that retention.
    #[arg(long, env = "POSSYNC_TXN_RESTAMP_EVERY", default_value = "1h", value_parser = humantime::parse_duration)]
    pub txn_restamp_every: Duration,
    /// Run table maintenance (compaction, vacuum with each table's retention, checkpoint: what
    /// `possync maintain` does with its defaults) this often inside the materializer, first one
    /// interval after start. Every flush adds a small file, so without it `position_events`
    /// grows by a file per flush forever and so does every snapshot that lists them. Of a
    /// consumer group, only the member holding partition 0 of the active topic runs it (another
    /// takes over when it leaves). `0s` = off (e.g. when an external `possync maintain` is
    /// scheduled instead).
    #[arg(long, env = "POSSYNC_MAINTAIN_EVERY", default_value = "1h", value_parser = humantime::parse_duration)]
    pub maintain_every: Duration,
    /// Closed positions (position 0) whose last event is older than this leave
    /// `positions_current` and `position_queue` (a Delta delete by deletion vectors; checked at
    /// most once a minute). `position_events` keeps everything. `0s` = keep them forever.
    #[arg(long, env = "POSSYNC_CLOSED_RETENTION", default_value = "7days", value_parser = humantime::parse_duration)]
    pub closed_retention: Duration,
    /// Directory of the local spill file that holds the `position_queue` rows (about 100 bytes
    /// per key, up to twice that with garbage; the materializer keeps only their places in
    /// memory). The file is a cache: it is unlinked at once, leaves nothing behind, and is
    /// rebuilt from the table at start. Default: `$XDG_STATE_HOME/possync`, else
    /// `$HOME/.local/state/possync`, else `./possync-state` (created if missing). Not the
    /// temporary directory: that is memory (tmpfs) on some systems. `possync run` uses
    /// `<data-dir>/state`.
    #[arg(long, env = "POSSYNC_STATE_DIR")]
    pub state_dir: Option<std::path::PathBuf>,
}

/// The default directory of the spill file (see [`MaterializeArgs::state_dir`]): on disk, in
/// the user's state directory, never the temporary directory (tmpfs on some systems: the
/// spill file would take memory it exists to save; issue 20 #17).
pub fn default_state_dir() -> std::path::PathBuf {
    state_dir_from(std::env::var_os("XDG_STATE_HOME"), std::env::var_os("HOME"))
}

fn state_dir_from(xdg_state_home: Option<std::ffi::OsString>, home: Option<std::ffi::OsString>) -> std::path::PathBuf {
    let nonempty = |v: Option<std::ffi::OsString>| v.filter(|v| !v.is_empty()).map(std::path::PathBuf::from);
    // XDG: a relative XDG_STATE_HOME is invalid and ignored.
    if let Some(x) = nonempty(xdg_state_home).filter(|p| p.is_absolute()) {
        return x.join("possync");
    }
    if let Some(h) = nonempty(home) {
        return h.join(".local").join("state").join("possync");
    }
    std::path::PathBuf::from("possync-state")
}

/// `--closed-retention`'s default: closed positions leave the upsert tables after a week.
pub const DEFAULT_CLOSED_RETENTION: Duration = Duration::from_secs(7 * 86_400);

/// Where the tables live; shared by `materialize`, `maintain` and `bench`.
#[derive(clap::Args, Debug, Clone)]
pub struct TableArgs {
    /// Base URI of the Delta tables: a local path or `s3://bucket/prefix` (S3 needs the `s3`
    /// build feature; credentials come from the usual `AWS_*` environment variables).
    #[arg(long = "table-uri", env = "POSSYNC_TABLE_URI", default_value = DEFAULT_TABLE_URI)]
    pub table_uri: String,
    /// How long the start-up check of an `s3://` location may take (bucket exists, answers,
    /// takes the credentials) before the command stops with an error naming the setting.
    #[arg(long, env = "POSSYNC_STORAGE_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub storage_timeout: Duration,
}

impl TableArgs {
    /// Checks the location once, within `--storage-timeout` (see [`crate::delta::storage::probe`]).
    ///
    /// # Errors
    /// A [`crate::delta::storage::StorageError`] naming the setting to change.
    pub async fn probe(
        &self,
        access: crate::delta::storage::Access,
    ) -> Result<(), crate::delta::storage::StorageError> {
        crate::delta::storage::probe(&self.table_uri, self.storage_timeout, access).await
    }
}

/// Plain settings of the materializer.
#[derive(Debug, Clone)]
pub struct MaterializeConfig {
    /// Base URI of the tables (see [`TableArgs::table_uri`]).
    pub table_uri: String,
    /// Kafka consumer group.
    pub group: String,
    /// Flush at the latest this long after the oldest buffered message arrived.
    pub flush_latency: Duration,
    /// Flush when this many messages are buffered.
    pub flush_events: usize,
    /// Flush when this many bytes are buffered.
    pub flush_bytes: usize,
    /// Checkpoint each table every N of its commits (0 = never).
    pub checkpoint_every: u64,
    /// Overrides the Kafka cluster id in txn app ids (see [`crate::materialize`] docs).
    pub offsets_namespace: Option<String>,
    /// Start although the tables record another offset namespace (see
    /// [`MaterializeArgs::allow_namespace_change`]).
    pub allow_namespace_change: bool,
    /// Start every partition at its log start (tables still drop what they hold).
    pub replay_from_beginning: bool,
    /// Re-stamp owned partitions' txn actions older than this (see
    /// [`MaterializeArgs::txn_restamp_every`]).
    pub txn_restamp_every: Duration,
    /// Run [`MaintainConfig::default`] maintenance on the tables this often while materializing
    /// (`None` = never; see [`MaterializeArgs::maintain_every`]).
    pub maintain_every: Option<Duration>,
    /// Delete closed rows of the upsert tables older than this (`None` = never; see
    /// [`MaterializeArgs::closed_retention`]).
    pub closed_retention: Option<Duration>,
    /// Directory of the spill file (see [`MaterializeArgs::state_dir`]).
    pub state_dir: std::path::PathBuf,
}

impl Default for MaterializeConfig {
    fn default() -> Self {
        Self {
            table_uri: DEFAULT_TABLE_URI.to_string(),
            group: DEFAULT_GROUP.to_string(),
            flush_latency: Duration::from_secs(1),
            flush_events: DEFAULT_FLUSH_EVENTS,
            flush_bytes: 64 << 20,
            checkpoint_every: 100,
            offsets_namespace: None,
            allow_namespace_change: false,
            replay_from_beginning: false,
            txn_restamp_every: Duration::from_secs(3600),
            maintain_every: Some(Duration::from_secs(3600)),
            // The library default keeps closed rows (tests replay synthetic, months-old event
            // times); `possync materialize` and `possync run` pass the 7-day flag default.
            closed_retention: None,
            state_dir: default_state_dir(),
        }
    }
}

impl From<&MaterializeArgs> for MaterializeConfig {
    fn from(a: &MaterializeArgs) -> Self {
        Self {
            table_uri: a.tables.table_uri.clone(),
            group: a.group.clone(),
            flush_latency: a.flush_latency,
            flush_events: a.flush_events.max(1),
            flush_bytes: a.flush_bytes.max(1),
            checkpoint_every: a.checkpoint_every,
            offsets_namespace: a.offsets_namespace.clone(),
            allow_namespace_change: a.allow_namespace_change,
            replay_from_beginning: a.replay_from_beginning,
            txn_restamp_every: a.txn_restamp_every.max(Duration::from_millis(100)),
            maintain_every: (!a.maintain_every.is_zero()).then_some(a.maintain_every),
            closed_retention: (!a.closed_retention.is_zero()).then_some(a.closed_retention),
            state_dir: a.state_dir.clone().unwrap_or_else(default_state_dir),
        }
    }
}

/// Flags of `possync maintain`.
#[derive(clap::Args, Debug, Clone)]
pub struct MaintainArgs {
    #[command(flatten)]
    pub tables: TableArgs,
    /// Files smaller than this are compacted together (append-only tables).
    #[arg(long, env = "POSSYNC_COMPACT_BELOW", default_value_t = 16 << 20)]
    pub compact_below: u64,
    /// Target size of a compacted file.
    #[arg(long, env = "POSSYNC_COMPACT_TARGET", default_value_t = 128 << 20)]
    pub compact_target: u64,
    /// Delete unreferenced files older than this (default: each table's
    /// `delta.deletedFileRetentionDuration`). Shorter than a reader's query may break it.
    #[arg(long, env = "POSSYNC_VACUUM_RETENTION", value_parser = humantime::parse_duration)]
    pub vacuum_retention: Option<Duration>,
    /// Skip compaction.
    #[arg(long, env = "POSSYNC_MAINTAIN_NO_COMPACT")]
    pub no_compact: bool,
    /// Skip vacuum.
    #[arg(long, env = "POSSYNC_MAINTAIN_NO_VACUUM")]
    pub no_vacuum: bool,
}

/// Plain settings of `possync maintain`.
#[derive(Debug, Clone)]
pub struct MaintainConfig {
    /// Base URI of the tables.
    pub table_uri: String,
    /// Compact files below this size.
    pub compact_below: u64,
    /// Target size of a compacted file.
    pub compact_target: u64,
    /// Vacuum retention override.
    pub vacuum_retention: Option<Duration>,
    /// Run compaction.
    pub compact: bool,
    /// Run vacuum.
    pub vacuum: bool,
}

impl Default for MaintainConfig {
    fn default() -> Self {
        Self {
            table_uri: DEFAULT_TABLE_URI.to_string(),
            compact_below: 16 << 20,
            compact_target: 128 << 20,
            vacuum_retention: None,
            compact: true,
            vacuum: true,
        }
    }
}

impl From<&MaintainArgs> for MaintainConfig {
    fn from(a: &MaintainArgs) -> Self {
        Self {
            table_uri: a.tables.table_uri.clone(),
            compact_below: a.compact_below,
            compact_target: a.compact_target.max(1 << 20),
            vacuum_retention: a.vacuum_retention,
            compact: !a.no_compact,
            vacuum: !a.no_vacuum,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: MaterializeArgs,
    }

    fn maintain_every(flags: &[&str]) -> Option<Duration> {
        let cli = Cli::try_parse_from(std::iter::once("possync").chain(flags.iter().copied())).unwrap();
        MaterializeConfig::from(&cli.args).maintain_every
    }

    /// Issue 20 #17: the spill file's default directory is the user's state directory, never
    /// the temporary directory (tmpfs on some systems).
    #[test]
    fn the_spill_file_defaults_to_the_state_directory() {
        use std::ffi::OsString;
        use std::path::PathBuf;
        let os = |s: &str| Some(OsString::from(s));
        assert_eq!(
            state_dir_from(os("/var/lib/x"), os("/home/u")),
            PathBuf::from("/var/lib/x/possync")
        );
        assert_eq!(
            state_dir_from(None, os("/home/u")),
            PathBuf::from("/home/u/.local/state/possync")
        );
        assert_eq!(
            state_dir_from(os("relative"), os("/home/u")),
            PathBuf::from("/home/u/.local/state/possync")
        );
        assert_eq!(state_dir_from(os(""), None), PathBuf::from("possync-state"));
        let cli = Cli::try_parse_from(["possync"]).unwrap();
        let dir = MaterializeConfig::from(&cli.args).state_dir;
        assert_ne!(dir, std::env::temp_dir());
        assert_eq!(dir, default_state_dir());
        let cli = Cli::try_parse_from(["possync", "--state-dir", "/srv/s"]).unwrap();
        assert_eq!(MaterializeConfig::from(&cli.args).state_dir, PathBuf::from("/srv/s"));
    }

    #[test]
    fn maintain_every_defaults_to_an_hour_and_zero_turns_it_off() {
        assert_eq!(maintain_every(&[]), Some(Duration::from_secs(3600)));
        assert_eq!(
            maintain_every(&["--maintain-every", "10m"]),
            Some(Duration::from_secs(600))
        );
        assert_eq!(maintain_every(&["--maintain-every", "0s"]), None);
        assert_eq!(
            MaterializeConfig::default().maintain_every,
            Some(Duration::from_secs(3600))
        );
    }
}
