//! The metrics endpoint: `/metrics` (Prometheus text), `/healthz` and `/readyz` ([`Readiness`]),
//! served by a small HTTP/1.0 loop on the `--metrics-addr` socket.

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::{global, Metrics};

/// Asks the cluster whether it answers (blocking; run off the async threads).
pub type KafkaProbe = std::sync::Arc<dyn Fn() -> bool + Send + Sync>;

/// What `/readyz` requires of this process.
#[derive(Clone, Default)]
pub struct Readiness {
    /// An IB connection must be up (ingest, queue worker).
    pub ib: bool,
    /// Probed every few seconds; Kafka must answer.
    pub kafka_probe: Option<KafkaProbe>,
    /// While messages wait, the last Delta commit must be younger than this (materialize).
    pub max_commit_age: Option<std::time::Duration>,
    /// The ingest lease group: this ingest must hold the lease (a standby is not ready).
    pub lease: Option<String>,
}

impl std::fmt::Debug for Readiness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Readiness")
            .field("ib", &self.ib)
            .field("kafka_probe", &self.kafka_probe.is_some())
            .field("max_commit_age", &self.max_commit_age)
            .field("lease", &self.lease)
            .finish()
    }
}

/// Errors of the metrics endpoint.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// The listen address is taken or invalid.
    #[error("cannot listen for metrics on {addr}: {source}; pick another --metrics-addr")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// The `--metrics-addr` flag shared by the standalone processes (`ingest`, `queue-worker`,
/// `materialize`), flattened into each one's args so the compose healthchecks can scrape them.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct MetricsArgs {
    /// Serve Prometheus metrics on this address, e.g. 0.0.0.0:9464; off by default.
    #[arg(long, env = "POSSYNC_METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,
    /// `/readyz` of materialize fails when messages wait and the last Delta commit is older
    /// than this.
    #[arg(long, env = "POSSYNC_READY_MAX_COMMIT_AGE", default_value = "2m", value_parser = humantime::parse_duration)]
    pub ready_max_commit_age: std::time::Duration,
}

impl MetricsArgs {
    /// Starts the endpoint (see [`serve`]) when an address is set and logs where it listens;
    /// returns the bound address, `None` when metrics are off.
    ///
    /// # Errors
    /// [`MetricsError::Bind`] when the address cannot be bound.
    pub async fn serve(
        &self,
        shutdown: CancellationToken,
        ready: Readiness,
    ) -> Result<Option<SocketAddr>, MetricsError> {
        let Some(addr) = self.metrics_addr else {
            return Ok(None);
        };
        let bound = serve_with(addr, shutdown, ready).await?;
        tracing::info!(addr = %bound, "serving Prometheus metrics at http://{bound}/metrics, /healthz and /readyz");
        Ok(Some(bound))
    }
}

/// Serves `GET /metrics` (Prometheus text) on `addr` until `shutdown`; returns the bound address.
///
/// # Errors
/// [`MetricsError::Bind`] when the address cannot be bound.
pub async fn serve(addr: SocketAddr, shutdown: CancellationToken) -> Result<SocketAddr, MetricsError> {
    serve_with(addr, shutdown, Readiness::default()).await
}

/// How often `/readyz`'s Kafka probe runs.
const PROBE_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// [`serve`], plus `GET /healthz` (200 while the process serves: liveness) and `GET /readyz`
/// (200 when `ready` holds, else 503 with the reasons, one per line).
///
/// # Errors
/// [`MetricsError::Bind`] when the address cannot be bound.
pub async fn serve_with(
    addr: SocketAddr,
    shutdown: CancellationToken,
    ready: Readiness,
) -> Result<SocketAddr, MetricsError> {
    if let Some(probe) = ready.kafka_probe.clone() {
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(PROBE_EVERY);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = every.tick() => {
                        let p = probe.clone();
                        let up = tokio::task::spawn_blocking(move || p()).await.unwrap_or(false);
                        global().kafka_reachable.store(i64::from(up), Relaxed);
                    }
                }
            }
        });
    }
    let ready = std::sync::Arc::new(ready);
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| MetricsError::Bind { addr, source })?;
    let local = listener
        .local_addr()
        .map_err(|source| MetricsError::Bind { addr, source })?;
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                accepted = listener.accept() => {
                    let Ok((mut sock, _)) = accepted else { continue };
                    let ready = ready.clone();
                    tokio::spawn(async move {
                        let request = read_request(&mut sock).await;
                        let (status, body) = respond(&request, &ready, global());
                        let resp = format!(
                            "HTTP/1.1 {status}\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                            body.len()
                        );
                        let _ = sock.write_all(resp.as_bytes()).await;
                    });
                }
            }
        }
    });
    Ok(local)
}

/// Reads a request's head: up to the blank line that ends it, 8 KiB or 5 s, whichever comes
/// first. A request may arrive in several segments; answering after the first one and closing
/// would reset the connection under a client still writing (it sees EPIPE).
async fn read_request(sock: &mut tokio::net::TcpStream) -> Vec<u8> {
    let mut head = Vec::with_capacity(256);
    let mut buf = [0u8; 1024];
    let reading = async {
        while head.len() < 8 * 1024 && !head.windows(4).any(|w| w == b"\r\n\r\n") {
            match sock.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
    };
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), reading).await;
    head
}

/// The status line and body for a request's first line.
pub(super) fn respond(request: &[u8], ready: &Readiness, m: &Metrics) -> (&'static str, String) {
    let line = String::from_utf8_lossy(request);
    let path = line.split_whitespace().nth(1).unwrap_or("/metrics");
    match path {
        "/healthz" => ("200 OK", "ok\n".into()),
        "/readyz" => {
            let why = m.not_ready(ready);
            if why.is_empty() {
                ("200 OK", "ready\n".into())
            } else {
                ("503 Service Unavailable", why.join("\n") + "\n")
            }
        }
        _ => ("200 OK", m.render()),
    }
}
