//! A real Apache Kafka cluster for integration tests: 1 or 3 combined broker/controller KRaft
//! nodes on loopback, driven through `scripts/kafka.sh` in a temp dir of its own.
//!
//! Invariants: node ids are `1..=nodes`; every node keeps its ports, config and data dir for the
//! cluster's life, so [`KafkaCluster::restart`] brings back the same broker. Dropping the
//! cluster SIGKILLs every node, and the script's watchdog does the same if the test process dies
//! without unwinding, so no JVM outlives its test. A failing test prints the tail of each node's
//! log (stderr of a passing test is swallowed by the harness).

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context};
use possync::kafka::KafkaConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::ClientConfig;

/// The script the cluster is driven with.
pub const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/kafka.sh");

/// How a cluster is started.
#[derive(Debug, Clone)]
pub struct KafkaOpts {
    /// Adds a `SASL_PLAINTEXT` listener (SCRAM-SHA-512) beside the plaintext one.
    pub sasl: bool,
    /// The SCRAM user created at format time.
    pub sasl_user: String,
    /// Its password.
    pub sasl_password: String,
}

impl Default for KafkaOpts {
    fn default() -> Self {
        Self {
            sasl: false,
            sasl_user: "possync".into(),
            sasl_password: "possync-secret".into(),
        }
    }
}

impl KafkaOpts {
    /// With the SASL listener, default user and password.
    pub fn sasl() -> Self {
        Self {
            sasl: true,
            ..Self::default()
        }
    }
}

/// A running cluster; see the module docs.
pub struct KafkaCluster {
    script: Script,
    dir: tempfile::TempDir,
    nodes: usize,
    opts: KafkaOpts,
    bootstrap: String,
    sasl_bootstrap: Option<String>,
}

/// What a blocking script call needs (cheap to move into `spawn_blocking`).
#[derive(Clone)]
struct Script {
    dir: PathBuf,
    opts: KafkaOpts,
}

impl Script {
    fn run(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = Command::new("bash")
            .arg(SCRIPT)
            .args(args)
            .env("POSSYNC_KAFKA_DIR", &self.dir)
            .env("POSSYNC_KAFKA_OWNER_PID", std::process::id().to_string())
            .env("POSSYNC_KAFKA_SASL_USER", &self.opts.sasl_user)
            .env("POSSYNC_KAFKA_SASL_PASSWORD", &self.opts.sasl_password)
            .output()
            .with_context(|| format!("running {SCRIPT}"))?;
        if !out.status.success() {
            bail!(
                "kafka.sh {} failed ({}):\n{}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    async fn run_async(&self, args: &[&str]) -> anyhow::Result<String> {
        let script = self.clone();
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        tokio::task::spawn_blocking(move || script.run(&args.iter().map(String::as_str).collect::<Vec<_>>())).await?
    }
}

impl KafkaCluster {
    /// Formats and starts `nodes` (1 or 3) nodes and waits until every one is a live broker
    /// that answers requests. The first call on a machine downloads the jars (cached).
    ///
    /// # Errors
    /// Java or Maven missing, a node that exits or is not ready in time (the error carries the
    /// tail of its log).
    pub async fn start(nodes: usize, opts: KafkaOpts) -> anyhow::Result<Self> {
        anyhow::ensure!(nodes == 1 || nodes == 3, "a cluster has 1 or 3 nodes, not {nodes}");
        let dir = tempfile::Builder::new().prefix("possync-kafka-").tempdir()?;
        let script = Script {
            dir: dir.path().to_path_buf(),
            opts: opts.clone(),
        };
        let n = nodes.to_string();
        let mut args = vec!["start", n.as_str()];
        if opts.sasl {
            args.push("--sasl");
        }
        let mut cluster = Self {
            script,
            dir,
            nodes,
            opts,
            bootstrap: String::new(),
            sasl_bootstrap: None,
        };
        // From here on, Drop cleans up whatever the script started, even if it failed.
        cluster.script.run_async(&args).await?;
        cluster.bootstrap = cluster.script.run(&["bootstrap"])?;
        if cluster.opts.sasl {
            cluster.sasl_bootstrap = Some(cluster.script.run(&["bootstrap", "--sasl"])?);
        }
        Ok(cluster)
    }

    /// Node count.
    pub fn nodes(&self) -> usize {
        self.nodes
    }

    /// Node ids, `1..=nodes`.
    pub fn ids(&self) -> impl Iterator<Item = i32> {
        1..=self.nodes as i32
    }

    /// The start options (SASL user and password).
    pub fn opts(&self) -> &KafkaOpts {
        &self.opts
    }

    /// Plaintext bootstrap servers of every node, e.g. `127.0.0.1:21011,127.0.0.1:24530,…`.
    pub fn bootstrap(&self) -> &str {
        &self.bootstrap
    }

    /// Bootstrap servers of the SASL_PLAINTEXT listeners.
    ///
    /// # Panics
    /// If the cluster was started without SASL.
    pub fn sasl_bootstrap(&self) -> &str {
        self.sasl_bootstrap
            .as_deref()
            .expect("cluster started without KafkaOpts::sasl")
    }

    /// possync's Kafka settings for this cluster (plaintext, default topic prefix).
    pub fn kafka_config(&self) -> KafkaConfig {
        KafkaConfig::new(self.bootstrap.clone())
    }

    /// A bare rdkafka config with the plaintext bootstrap servers.
    pub fn client_config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.bootstrap);
        c
    }

    /// An rdkafka config for the SASL listener with SCRAM-SHA-512 as `user` / `password`.
    pub fn sasl_client_config(&self, user: &str, password: &str) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", self.sasl_bootstrap())
            .set("security.protocol", "SASL_PLAINTEXT")
            .set("sasl.mechanism", "SCRAM-SHA-512")
            .set("sasl.username", user)
            .set("sasl.password", password);
        c
    }

    /// SIGKILLs node `id` (its leaderships move once the controller fences it, ≈ 6 s).
    pub async fn kill(&self, id: i32) -> anyhow::Result<()> {
        self.script.run_async(&["kill", &id.to_string()]).await.map(drop)
    }

    /// Stops node `id` gracefully (SIGTERM: controlled shutdown moves its leaderships first),
    /// for rolling restarts.
    pub async fn stop_node(&self, id: i32) -> anyhow::Result<()> {
        self.script.run_async(&["stop-node", &id.to_string()]).await.map(drop)
    }

    /// Starts the killed or stopped node `id` again with its config and data, and waits until
    /// it is a live broker again that answers requests.
    pub async fn restart(&self, id: i32) -> anyhow::Result<()> {
        self.script.run_async(&["restart", &id.to_string()]).await.map(drop)
    }

    /// Whole-cluster outage: SIGKILLs every node at once.
    pub async fn stop_all(&self) -> anyhow::Result<()> {
        self.script.run_async(&["kill", "all"]).await.map(drop)
    }

    /// Ends a whole-cluster outage: starts every node again and waits until all are back.
    pub async fn start_all(&self) -> anyhow::Result<()> {
        self.script.run_async(&["restart", "all"]).await.map(drop)
    }

    /// Waits until every partition of `topic` has a leader and, with `full_isr`, every replica
    /// is in sync again (e.g. after a restart).
    pub async fn wait_topic(&self, topic: &str, full_isr: bool) -> anyhow::Result<()> {
        let mut args = vec!["wait-topic", topic];
        if full_isr {
            args.push("--full-isr");
        }
        self.script.run_async(&args).await.map(drop)
    }

    /// The node that leads `partition` of `topic`, as the cluster's metadata says now.
    ///
    /// # Errors
    /// No metadata within 10 s, an unknown topic or partition, or no leader at the moment.
    pub async fn leader_of(&self, topic: &str, partition: i32) -> anyhow::Result<i32> {
        let config = self.client_config();
        let topic = topic.to_string();
        tokio::task::spawn_blocking(move || {
            let client: BaseConsumer = config.create()?;
            let md = client.fetch_metadata(Some(&topic), Duration::from_secs(10))?;
            let t = md
                .topics()
                .iter()
                .find(|t| t.name() == topic)
                .with_context(|| format!("no metadata for {topic}"))?;
            if let Some(e) = t.error() {
                bail!("metadata of {topic}: {e:?}");
            }
            let p = t
                .partitions()
                .iter()
                .find(|p| p.id() == partition)
                .with_context(|| format!("{topic} has no partition {partition}"))?;
            anyhow::ensure!(p.leader() >= 0, "{topic}-{partition} has no leader now");
            Ok(p.leader())
        })
        .await?
    }

    /// The last `lines` lines of node `id`'s `server.log`, for failure messages.
    pub fn node_log(&self, id: i32, lines: usize) -> String {
        let path = self.node_dir(id).join("logs/server.log");
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                let all: Vec<&str> = text.lines().collect();
                all[all.len().saturating_sub(lines)..].join("\n")
            }
            Err(e) => format!("({}: {e})", path.display()),
        }
    }

    /// The state directory (`node-ID/{data,logs,server.properties,pid}`).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn node_dir(&self, id: i32) -> PathBuf {
        self.dir.path().join(format!("node-{id}"))
    }

    /// SIGKILLs every node without the script, then waits (≤ 5 s) until they are gone.
    fn kill_everything(&self) {
        let pids: Vec<libc::pid_t> = (1..=self.nodes)
            .filter_map(|id| std::fs::read_to_string(self.node_dir(id as i32).join("pid")).ok())
            .filter_map(|s| s.trim().parse().ok())
            .collect();
        for &pid in &pids {
            // SAFETY: kill(2) has no memory effects; a stale pid is at worst ESRCH.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        // SAFETY: signal 0 only checks that the process exists.
        while pids.iter().any(|&p| unsafe { libc::kill(p, 0) } == 0) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for KafkaCluster {
    /// Stops every node; after a panic, prints the tail of each node's log too. (A test that
    /// fails by returning an error prints nothing here, so that its error comes first in the
    /// output: `Pipeline` keeps the logs, the nodes' too, in the directory the error names.)
    fn drop(&mut self) {
        self.kill_everything();
        if std::thread::panicking() {
            for id in self.ids() {
                eprintln!("--- kafka node {id}: tail of server.log ---\n{}", self.node_log(id, 15));
            }
        }
    }
}
