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
//! **Fencing.** Only one ingest publishes at a time: [`run`] first takes the *ingest lease*
//! ([`lease`]: the one partition of the lease topic in the consumer group `--lease-group`,
//! default `<topic-prefix>ingest-lease`, cooperative-sticky). Without it, ingest stands by:
//! no IB connection, nothing published, one log line "another ingest holds the lease (group
//! X); standing by", `possync_ingest_lease_held 0` and a 503 `/readyz` saying so. When it gets
//! the lease (the holder stopped and left the group, or died and its session expired after
//! 6 s), it waits `--lease-takeover-delay` (2 s), then starts as a fresh run: new session id,
//! registry replayed, last published state read back (`--resume`: from `positions_current` and
//! the topics' tail with `--table-uri`, else from the whole topics), IB connected and
//! reconciled. A holder that loses the lease (cut off from Kafka, or stalled, longer than the
//! session timeout) cancels its run at once: no further event is produced, the producer's
//! unsent queue is purged, its PnL streams and IB connection are dropped, and it stands by
//! again. What the lease cannot promise (a stalled process resuming, messages already on the
//! wire) is in [`lease`]'s doc. `--no-lease` runs without it. An [`Ingest`] built directly is
//! one unfenced run (benchmarks, tests of ingest alone).
//!
//! Files: [`config`] (flags), [`lease`] (the ingest lease), [`backoff`] (reconnect delays), [`router`] (pure slot
//! allocation), [`reconcile`] (pure diff), [`slots`] (PnL stream lifecycle), [`publisher`]
//! (bounded, acknowledged Kafka producer), [`fills`] (executions and commissions), `engine`
//! (the state machine), `session` (IB
//! connection and event loop), [`resume`] (state after a restart: from the snapshot of
//! [`crate::snapshot`] and the topics' tail, or the whole topics), [`bench`] (`possync bench
//! ingest`).

pub mod backoff;
pub mod bench;
pub mod config;
mod engine;
pub mod fills;
pub mod lease;
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
    /// The ingest lease group could not be joined.
    #[error(transparent)]
    Lease(#[from] lease::LeaseError),
    /// The start-up snapshot (`--table-uri`) could not be read.
    #[error(transparent)]
    Snapshot(#[from] crate::snapshot::SnapshotError),
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
    /// with `resume`, the last published state: `positions_current` and the tail of the
    /// position topics with a snapshot, else the position topics whole), and creates the
    /// producer.
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
        // Fence every earlier ingest of these topics before reading what they published: the
        // broker aborts a predecessor's open transaction, so the resume below sees its final
        // state, and nothing it sends from now on counts.
        let txn_id = IngestConfig::transactional_id(&kafka.topics);
        let publisher = tokio::select! {
            _ = shutdown.cancelled() => return Err(IngestError::Publish(PublishError::Cancelled)),
            p = Publisher::transactional(&kafka, &txn_id, cfg.txn_interval, cfg.kafka_timeout, cfg.max_in_flight, cfg.record_latency) => p?,
        }
        .with_shutdown(shutdown.clone());
        let stats = IngestStats {
            publish: publisher.stats(),
            reconnects: Arc::default(),
        };
        let (book, active) = if cfg.resume {
            let started = std::time::Instant::now();
            let r = resume::load(&kafka, cfg.kafka_timeout, cfg.snapshot.as_ref()).await?;
            let (rows, version) = r.table.unwrap_or_default();
            tracing::info!(
                events = r.events,
                table_rows = rows,
                table_version = version,
                open = r.book.len(),
                active = r.active.len(),
                took = ?started.elapsed(),
                "resumed the last published state ({})",
                if r.table.is_some() { "positions_current and the topics' tail" } else { "whole position topics" }
            );
            (r.book, r.active)
        } else {
            Default::default()
        };
        // Executions already on the topic (a few days of them, by Kafka's time index): a
        // restart publishes only what is new.
        let since = crate::events::now_micros() - fills::REMEMBER.as_micros() as i64;
        let published = tokio::select! {
            _ = shutdown.cancelled() => return Err(IngestError::Publish(PublishError::Cancelled)),
            p = fills::published_since(&kafka, since, cfg.kafka_timeout) => p?,
        };
        tracing::info!(executions = published.len(), topic = %kafka.topics.executions, "read the executions already published");
        let slots = slots::Slots::new(cfg.slot_budget);
        let mut engine = engine::Engine::new(registry, slots, publisher, book, active);
        engine.fills = fills::Fills::new(
            crate::executions::join::Join::with_published(published),
            cfg.commission_wait,
        );
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

    /// (open positions, of which last routed active) as resumed at start.
    pub fn resumed(&self) -> (usize, usize) {
        (self.engine.book.len(), self.engine.active_count())
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
    pub async fn run(self) -> Result<(), IngestError> {
        let id = IngestConfig::transactional_id(&self.engine.publisher.topics().clone());
        match self.run_term(None, None).await? {
            TermEnd::Fenced => Err(IngestError::Publish(PublishError::Fenced(id))),
            TermEnd::ProducerFailed => Err(IngestError::Publish(PublishError::ProducerFailed {
                id,
                reason: "librdkafka's fatal error, logged above".into(),
            })),
            TermEnd::Stopped | TermEnd::IbUnreachable => Ok(()),
        }
    }

    /// [`Ingest::run`]; when `lost` is cancelled (the lease is gone, and `shutdown` with it),
    /// the unacknowledged events are purged instead of flushed. With `release_after`, a run
    /// that has had no working IB connection (one whose position list arrived) for that long
    /// ends with [`TermEnd::IbUnreachable`], so the lease can go to a standby.
    async fn run_term(
        mut self,
        lost: Option<&CancellationToken>,
        release_after: Option<std::time::Duration>,
    ) -> Result<TermEnd, IngestError> {
        let limiter = RateLimiter::per_second(self.cfg.ib_pacing.max(1));
        let mut backoff = backoff::Backoff::new(
            self.cfg.reconnect_initial,
            self.cfg.reconnect_max,
            self.cfg.reconnect_healthy,
            None,
        );
        let mut first = true;
        // When ingest last had a working connection (or started).
        let mut last_working = std::time::Instant::now();
        // Events purged because the lease was lost.
        let mut purged = 0;
        // A publisher stopped for good (fenced: a successor runs; or failed) ends the term like
        // a lost lease.
        let stopped = self.engine.publisher.stopped();
        let end_on_stop = tokio::spawn({
            let (stopped, term) = (stopped.clone(), self.shutdown.clone());
            async move {
                tokio::select! {
                    _ = term.cancelled() => {}
                    _ = stopped.cancelled() => term.cancel(),
                }
            }
        });
        let result = loop {
            // Each subscription's ring holds the longer of the position list and the day's
            // executions list.
            let expected = self.engine.buffer_frames();
            let buffer = crate::ib::buffer_for(self.cfg.ib_buffer, expected);
            let give_up_at = release_after.map(|d| last_working + d);
            let (client, notices) =
                match session::connect(&self.cfg, buffer, &limiter, &mut backoff, give_up_at, &self.shutdown).await {
                    session::Connected::Yes(client, notices) => (client, notices),
                    session::Connected::Shutdown => break Ok(TermEnd::Stopped),
                    session::Connected::GaveUp => break Ok(TermEnd::IbUnreachable),
                };
            let connected = std::time::Instant::now();
            metrics::global().ib_state(metrics::IbClient::Ingest, true);
            if !first {
                metrics::global().ib_reconnects.fetch_add(1, Relaxed);
                self.stats.reconnects.fetch_add(1, Relaxed);
            }
            first = false;
            let end = session::run_session(
                &mut self.engine,
                &self.cfg,
                &client,
                notices,
                &mut self.registry_rx,
                &self.shutdown,
            )
            .await;
            if lost.is_some_and(CancellationToken::is_cancelled) || stopped.is_cancelled() {
                // The lease is gone: purge before anything else (the IB disconnect below may
                // take a while), so no event of this term leaves after it (issue 20 #9).
                purged += self.engine.publisher.abandon();
            }
            let synced = self.engine.synced;
            if synced {
                last_working = std::time::Instant::now();
            }
            self.engine.disconnected();
            metrics::global().ib_state(metrics::IbClient::Ingest, false);
            // A silent gateway may not take the close either: do not wait on it for long.
            let _ = tokio::time::timeout(std::time::Duration::from_secs(2), client.disconnect()).await;
            let list_overflow = matches!(end, Ok(session::SessionEnd::Overflow { during_list: true }));
            let (why, useful) = match end {
                Ok(session::SessionEnd::Shutdown) => break Ok(TermEnd::Stopped),
                Ok(session::SessionEnd::Disconnected(why)) => (why, synced),
                Ok(session::SessionEnd::Silent(why)) => {
                    metrics::global().ib_silent.fetch_add(1, Relaxed);
                    tracing::warn!(reason = %why, "IB went silent on an open connection (hung gateway, dead NAT entry or half-open socket): dropping it");
                    (why, synced)
                }
                // Nothing wrong with the gateway: the buffer of this connection was too small.
                Ok(session::SessionEnd::Overflow { .. }) => ("IB buffer overflow".to_string(), true),
                Err(IngestError::Publish(e)) if e.is_cancelled() => break Ok(TermEnd::Stopped),
                // A fence or failure (the publisher stopped: mapped to its term end below).
                Err(e) => break Err(e),
            };
            backoff.session_ended(connected.elapsed(), useful);
            if release_after.is_some_and(|d| last_working.elapsed() >= d) {
                tracing::warn!(reason = %why, since = ?last_working.elapsed(), "no working IB connection for too long");
                break Ok(TermEnd::IbUnreachable);
            }
            // A list that overflowed is no trouble of the gateway's: the next connection, with a
            // buffer that fits, is made at once. (A live overflow waits the reset backoff step:
            // Kafka is holding ingest up, and a new list will not be read faster.)
            let delay = if list_overflow {
                std::time::Duration::ZERO
            } else {
                backoff.next_delay()
            };
            tracing::warn!(reason = %why, retry_in = ?delay, "IB connection lost; reconnecting");
            tokio::select! {
                _ = self.shutdown.cancelled() => break Ok(TermEnd::Stopped),
                _ = tokio::time::sleep(delay) => {}
            }
        };
        end_on_stop.abort();
        let result = if stopped.is_cancelled() {
            let end = match self.engine.publisher.stop_error() {
                Some(PublishError::ProducerFailed { .. }) => TermEnd::ProducerFailed,
                _ => TermEnd::Fenced,
            };
            match result {
                Ok(_) => Ok(end),
                Err(IngestError::Publish(e)) if e.is_producer_lost() || e.is_cancelled() => Ok(end),
                other => other,
            }
        } else {
            result
        };
        if lost.is_some_and(CancellationToken::is_cancelled) || stopped.is_cancelled() {
            purged += self.engine.publisher.abandon();
            tracing::warn!(purged, "ingest lease lost or producer fenced or failed: stopped publishing; unacknowledged events purged (the next holder reconciles with IB)");
        } else if let Err(e) = self.engine.publisher.flush(self.cfg.shutdown_grace).await {
            tracing::warn!(error = %e, grace = ?self.cfg.shutdown_grace, "stopping with events Kafka has not acknowledged; the next start reconciles with IB and republishes their positions");
        }
        self.engine.log_stats();
        result
    }
}

/// How a run (a lease term) ended without an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TermEnd {
    /// Shutdown, or the lease was lost.
    Stopped,
    /// No working IB connection for `--ib-unreachable-release`: give the lease up.
    IbUnreachable,
    /// The broker fenced the producer: another ingest started with the same transactional id
    /// (a successor that took the lease while this one was paused).
    Fenced,
    /// librdkafka raised a fatal error that is not a fence (no successor): the next term
    /// starts with a new producer.
    ProducerFailed,
}

/// How long a stopping ingest waits for its lease consumer to leave the group.
const LEASE_RELEASE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Runs ingest until `shutdown`: with the lease (the default), standing by until it holds it,
/// then one run ([`Ingest::start`], [`Ingest::run`]) per lease term; without, one run.
///
/// # Errors
/// As [`Ingest::start`] and [`Ingest::run`]; [`IngestError::Lease`] when the lease group
/// cannot be joined.
pub async fn run(cfg: IngestConfig, kafka: KafkaConfig, shutdown: CancellationToken) -> Result<(), IngestError> {
    // Served while ingest runs, standing by or not (a standby shows 0: alerts take the best
    // connection over the ingests).
    let _ib = metrics::global().ib_client_running(metrics::IbClient::Ingest);
    let Some(group) = cfg.lease_group(&kafka.topics) else {
        tracing::warn!("running without the ingest lease (--no-lease): a second ingest would publish every event twice and use twice the streaming slots");
        let ingest = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return Ok(()),
            i = Ingest::start(cfg, kafka, shutdown.clone()) => i?,
        };
        return ingest.run().await;
    };
    metrics::global().ingest_lease_held.store(0, Relaxed);
    loop {
        let mut lease = lease::Lease::join(&kafka, &group)?;
        tracing::info!(%group, topic = %kafka.topics.lease, "joining the ingest lease group");
        let result = fenced(&cfg, &kafka, &mut lease, &shutdown).await;
        // Leave only after the last event was flushed (or purged): the next holder starts after.
        lease.release(LEASE_RELEASE_TIMEOUT).await;
        match result {
            Ok(TermEnd::IbUnreachable) => {
                tracing::warn!(%group, after = ?cfg.ib_unreachable_release, "cannot reach IB: gave the ingest lease up so that a standby that may reach it takes over; joining again as a standby");
            }
            // No successor: give the lease up all the same (a standby may take it), and start
            // the next term, with a new producer, as a standby would.
            Ok(TermEnd::ProducerFailed) => {
                tracing::warn!(%group, "the Kafka producer failed for good; gave the lease up and joining again (the next term starts with a new producer)");
            }
            // A successor runs (this one was paused past its session, or another ingest without
            // the lease started).
            Ok(TermEnd::Fenced) => {
                tracing::warn!(%group, "fenced by a newer ingest of these topics; gave the lease up and joining again as a standby");
            }
            Ok(TermEnd::Stopped) => return Ok(()),
            Err(e) => return Err(e),
        }
        // Rejoin only once the group has handed the partition to a waiting standby (or the
        // successor holds it), never competing for it as a newcomer: the rebalance after a leave
        // waits up to the session timeout for members to rejoin, and a member that joins within
        // it competes for the partition as a newcomer (seen on the embedded broker: the blind
        // holder got it back every time).
        let rejoin = rejoin_delay(&kafka, &group);
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(rejoin) => {}
        }
    }
}

/// After giving the lease up for want of IB: the lease group's session timeout plus this.
const UNREACHABLE_REJOIN_MARGIN: std::time::Duration = std::time::Duration::from_secs(4);

/// How long a holder that gave the lease up waits before joining again: past the rebalance
/// that hands the lease to a standby (the group's session timeout) and a margin.
fn rejoin_delay(kafka: &KafkaConfig, group: &str) -> std::time::Duration {
    let session_ms = kafka
        .consumer(group)
        .get("session.timeout.ms")
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(6_000);
    std::time::Duration::from_millis(session_ms) + UNREACHABLE_REJOIN_MARGIN
}

/// Wait before starting a lease term again after Kafka failed it.
const TERM_RETRY: std::time::Duration = std::time::Duration::from_secs(1);

/// Errors of a term's start that a Kafka outage causes (retried), as opposed to settings.
fn is_transient(e: &IngestError) -> bool {
    matches!(
        e,
        IngestError::Registry(RegistryError::Kafka(_) | RegistryError::CatchUpTimeout { .. })
            | IngestError::Snapshot(crate::snapshot::SnapshotError::Kafka(_))
            | IngestError::Publish(PublishError::Txn { .. })
    )
}

/// The lease loop: stand by, hold, run, and again after a lost lease.
async fn fenced(
    cfg: &IngestConfig,
    kafka: &KafkaConfig,
    lease: &mut lease::Lease,
    shutdown: &CancellationToken,
) -> Result<TermEnd, IngestError> {
    use lease::LeaseState;
    let m = metrics::global();
    let group = lease.group().to_string();
    let mut state = lease.state();
    loop {
        m.ingest_lease_held.store(0, Relaxed);
        // Stand by until the lease is held.
        while state != LeaseState::Held {
            if state == LeaseState::Standby {
                tracing::info!(%group, "another ingest holds the lease (group {group}); standing by");
            }
            state = tokio::select! {
                _ = shutdown.cancelled() => return Ok(TermEnd::Stopped),
                s = lease.changed(state) => s,
            };
        }
        let mut watch = lease.watch();
        if !cfg.lease_takeover_delay.is_zero() {
            tracing::info!(%group, delay = ?cfg.lease_takeover_delay, "got the ingest lease; waiting before connecting to IB, so that a previous holder cut off from Kafka has stopped");
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(TermEnd::Stopped),
                s = lease::wait_until(&mut watch, |s| s != LeaseState::Held) => {
                    state = s;
                    continue;
                }
                _ = tokio::time::sleep(cfg.lease_takeover_delay) => {}
            }
        }
        // One lease term: `term` ends the run on shutdown or when the lease is lost.
        let term = shutdown.child_token();
        let lost = CancellationToken::new();
        let watcher = tokio::spawn({
            let (term, lost) = (term.clone(), lost.clone());
            async move {
                tokio::select! {
                    _ = term.cancelled() => {}
                    _ = lease::wait_until(&mut watch, |s| s != LeaseState::Held) => {
                        lost.cancel();
                        term.cancel();
                    }
                }
            }
        });
        m.ingest_lease_held.store(1, Relaxed);
        tracing::info!(%group, "holding the ingest lease (group {group}); starting");
        let release_after = Some(cfg.ib_unreachable_release).filter(|d| !d.is_zero());
        // The start (registry replay, resume) ends at once when the term does (a stop, or the
        // lease lost meanwhile), not after its Kafka timeouts (issue 20 #7).
        let start = async {
            tokio::select! {
                biased;
                _ = term.cancelled() => Err(IngestError::Publish(PublishError::Cancelled)),
                i = Ingest::start(cfg.clone(), kafka.clone(), term.clone()) => i,
            }
        };
        let (result, started) = match start.await {
            Ok(ingest) => (ingest.run_term(Some(&lost), release_after).await, true),
            Err(e) => (Err(e), false),
        };
        term.cancel();
        let _ = watcher.await;
        m.ingest_lease_held.store(0, Relaxed);
        if shutdown.is_cancelled() {
            // A stop requested while Kafka was unreachable interrupts the term's start: that
            // is a clean stop (nothing was published in this term), not a failure.
            if let Err(e) = &result {
                tracing::info!(%group, error = %e, "stopped while the lease term was starting");
            }
            return if started { result } else { Ok(TermEnd::Stopped) };
        }
        if !lost.is_cancelled() {
            match result {
                // Kafka went away while the term was starting (registry or resume replay): the
                // lease is about to go too; stand by and start again once it is held.
                Err(e) if !started && is_transient(&e) => {
                    tracing::warn!(%group, error = %e, "could not start the lease term (is Kafka reachable?); retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => return Ok(TermEnd::Stopped),
                        _ = tokio::time::sleep(TERM_RETRY) => {}
                    }
                    state = lease.state();
                    continue;
                }
                other => return other,
            }
        }
        m.ingest_lease_lost.fetch_add(1, Relaxed);
        match result {
            Ok(_) => {
                tracing::warn!(%group, "lost the ingest lease (cut off from Kafka or stalled longer than the session timeout): stopped publishing and dropped the IB connection; another ingest may hold it now")
            }
            Err(e) => {
                tracing::warn!(%group, error = %e, "lost the ingest lease while starting (is Kafka reachable?); standing by")
            }
        }
        state = lease.state();
    }
}
