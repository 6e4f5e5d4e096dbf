//! `possync ingest`: IB positions → routed Avro events on Kafka.
//!
//! One positions subscription covers every account. Each update is routed per (account,
//! conId) by the strategy registry ([`crate::registry`], followed live from its topic):
//! - **active** (a registry entry covers it and it won a streaming slot): published to
//!   `positions.active` at once, and a real-time PnL stream is held for it, whose ticks become
//!   PNL events on the same route;
//! - **queued** (everything else, including covered positions that found no free slot —
//!   flagged with a warning and the `slot_overflow` counter): an enqueue event on
//!   `positions.queued`, refreshed later by the queue worker.
//!
//! Reconnects (socket drop, gateway restart, 326 while the old session lingers) back off and
//! resubscribe; after the new PositionEnd the book is reconciled: positions that vanished get
//! a RECONCILE close, changed ones a SNAPSHOT, unchanged ones nothing. 1101/1102 trigger the
//! same reconciliation on the live connection.
//!
//! Files: [`config`] (flags), [`backoff`] (reconnect delays), [`book`] (position state → events), [`router`] (pure slot
//! allocation), [`reconcile`] (pure diff), [`slots`] (PnL stream lifecycle), [`publisher`]
//! (bounded, acknowledged Kafka producer), `engine` (the state machine), `session` (IB
//! connection and event loop), [`resume`] (state after a restart), [`bench`] (`possync bench ingest`).

pub mod backoff;
pub mod bench;
pub mod book;
pub mod config;
mod engine;
pub mod publisher;
pub mod reconcile;
pub mod resume;
pub mod router;
mod session;
pub mod slots;

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use ibapi::RateLimiter;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub use config::{IngestArgs, IngestConfig};
pub use publisher::{LatencyLog, PublishError, PublishStats, Publisher};

use crate::events::RegistryEvent;
use crate::kafka::KafkaConfig;
use crate::metrics;
use crate::registry::{self, RegistryError};

/// Errors that stop ingest.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// The registry could not be read or seeded.
    #[error("registry: {0}")]
    Registry(#[from] RegistryError),
    /// Publishing to Kafka failed in a way retrying cannot fix.
    #[error("publishing: {0}")]
    Publish(#[from] PublishError),
    /// Bad Kafka settings.
    #[error(transparent)]
    Kafka(#[from] crate::kafka::KafkaError),
}

/// Counts of one ingest run (the process-wide ones are in [`crate::metrics`]), so tests and
/// embedders can observe one ingest among several in a process.
#[derive(Debug, Clone)]
pub struct IngestStats {
    /// Deliveries to Kafka (acknowledged and failed).
    pub publish: Arc<PublishStats>,
    /// Reconnects to IB.
    pub reconnects: Arc<AtomicU64>,
}

/// A prepared ingest: registry loaded, producer ready, not yet connected to IB.
pub struct Ingest {
    cfg: IngestConfig,
    engine: engine::Engine,
    registry_rx: mpsc::Receiver<RegistryEvent>,
    shutdown: CancellationToken,
    stats: IngestStats,
}

impl Ingest {
    /// Seeds the registry from the bootstrap file (if any), replays the registry topic (and,
    /// with `resume`, the position topics), and creates the producer.
    ///
    /// # Errors
    /// [`IngestError::Registry`] when the registry topic cannot be read (is Kafka up, are the
    /// topics created?), [`IngestError::Publish`] when the producer cannot be created.
    pub async fn start(
        cfg: IngestConfig,
        kafka: KafkaConfig,
        shutdown: CancellationToken,
    ) -> Result<Self, IngestError> {
        // Known from the flags: export it before the (possibly slow) registry replay.
        metrics::global().slot_budget.store(cfg.slot_budget as i64, Relaxed);
        if let Some(path) = &cfg.registry_bootstrap {
            let n = registry::seed_from_file(&kafka, path, "ingest-bootstrap", cfg.kafka_timeout).await?;
            tracing::info!(file = %path.display(), seeded = n, "registry bootstrap file applied");
        }
        let (registry, registry_rx) = registry::follow(&kafka, cfg.kafka_timeout, shutdown.child_token()).await?;
        tracing::info!(entries = registry.len(), "registry loaded");
        let publisher = Publisher::new(&kafka, cfg.max_in_flight, cfg.record_latency)?.with_shutdown(shutdown.clone());
        let stats = IngestStats {
            publish: publisher.stats(),
            reconnects: Arc::default(),
        };
        let (book, active) = if cfg.resume {
            let r = resume::load(&kafka, cfg.kafka_timeout).await?;
            tracing::info!(
                events = r.events,
                open = r.book.len(),
                active = r.active.len(),
                "resumed the last published state from the position topics"
            );
            (r.book, r.active)
        } else {
            Default::default()
        };
        let slots = slots::Slots::new(cfg.slot_budget);
        let engine = engine::Engine::new(registry, slots, publisher, book, active);
        Ok(Self {
            cfg,
            engine,
            registry_rx,
            shutdown,
            stats,
        })
    }

    /// This run's counts (live while it runs).
    pub fn stats(&self) -> IngestStats {
        self.stats.clone()
    }

    /// The session id stamped on every event of this run.
    pub fn session_id(&self) -> &str {
        self.engine.publisher.session_id()
    }

    /// The active route's latency samples (when `record_latency` is set).
    pub fn latency_log(&self) -> Option<LatencyLog> {
        self.engine.publisher.latency_log()
    }

    /// Runs until `shutdown`: connect, stream, reconnect; then waits (up to
    /// `shutdown_grace`) for every event to be acknowledged. A requested stop returns `Ok` even
    /// while Kafka is down: events it did not acknowledge are not in the topics, so the next
    /// start's reconciliation (`--resume`) republishes those positions.
    ///
    /// # Errors
    /// [`IngestError::Publish`] when an event cannot be encoded or the producer refuses it.
    pub async fn run(mut self) -> Result<(), IngestError> {
        let limiter = RateLimiter::per_second(self.cfg.ib_pacing.max(1));
        let mut backoff = backoff::Backoff::new(
            self.cfg.reconnect_initial,
            self.cfg.reconnect_max,
            self.cfg.reconnect_healthy,
            None,
        );
        let mut first = true;
        let result = loop {
            let Some((client, notices)) = session::connect(&self.cfg, &limiter, &mut backoff, &self.shutdown).await
            else {
                break Ok(());
            };
            let connected = std::time::Instant::now();
            metrics::global().ib_connected.store(1, Relaxed);
            if !first {
                metrics::global().ib_reconnects.fetch_add(1, Relaxed);
                self.stats.reconnects.fetch_add(1, Relaxed);
            }
            first = false;
            let end = session::run_session(
                &mut self.engine,
                &client,
                notices,
                &mut self.registry_rx,
                &self.shutdown,
            )
            .await;
            self.engine.disconnected();
            metrics::global().ib_connected.store(0, Relaxed);
            client.disconnect().await;
            match end {
                Ok(session::SessionEnd::Shutdown) => break Ok(()),
                Ok(session::SessionEnd::Disconnected(why)) => {
                    backoff.session_ended(connected.elapsed());
                    let delay = backoff.next_delay();
                    tracing::warn!(reason = %why, retry_in = ?delay, "IB connection lost; reconnecting");
                    tokio::select! {
                        _ = self.shutdown.cancelled() => break Ok(()),
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
                Err(IngestError::Publish(e)) if e.is_cancelled() => break Ok(()),
                Err(e) => break Err(e),
            }
        };
        if let Err(e) = self.engine.publisher.flush(self.cfg.shutdown_grace).await {
            tracing::warn!(error = %e, grace = ?self.cfg.shutdown_grace, "stopping with events Kafka has not acknowledged; the next start reconciles with IB and republishes their positions");
        }
        self.engine.log_stats();
        result
    }
}

/// Runs ingest until `shutdown` (see [`Ingest::start`] and [`Ingest::run`]).
///
/// # Errors
/// As [`Ingest::start`] and [`Ingest::run`].
pub async fn run(cfg: IngestConfig, kafka: KafkaConfig, shutdown: CancellationToken) -> Result<(), IngestError> {
    Ingest::start(cfg, kafka, shutdown).await?.run().await
}
