//! State shared by the server's tasks: the world, the client registry (client
//! ids, stream counts, message rates) and the fault controls.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use super::config::SimConfig;
use super::truth::{ClientTruth, Truth};
use super::world::World;

/// Most receive timestamps remembered per client for the rate window.
const WINDOW_CAP: usize = 100_000;

/// Locks `mutex`, recovering from poisoning: every critical section here
/// leaves the data whole.
pub fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Everything the server's tasks share.
#[derive(Debug)]
pub struct Shared {
    /// The configuration the simulator started with.
    pub config: SimConfig,
    /// The world.
    pub world: Mutex<World>,
    /// Client ids, streams and rates.
    pub clients: Mutex<Clients>,
    /// Notice codes to send to every connected client.
    pub notices: broadcast::Sender<i32>,
    /// Cancelled to drop every current connection; replaced afterwards.
    generation: Mutex<CancellationToken>,
    /// Cancelled to freeze every current connection; replaced afterwards.
    freezes: Mutex<CancellationToken>,
    /// Cancelled when the simulator stops.
    pub shutdown: CancellationToken,
}

impl Shared {
    /// Shared state around `world`.
    pub fn new(config: SimConfig, world: World, shutdown: CancellationToken) -> Self {
        let (notices, _) = broadcast::channel(64);
        Self {
            config,
            world: Mutex::new(world),
            clients: Mutex::new(Clients::default()),
            notices,
            generation: Mutex::new(shutdown.child_token()),
            freezes: Mutex::new(CancellationToken::new()),
            shutdown,
        }
    }

    /// The token a new connection ends on: cancelled by the next drop or restart.
    pub fn connection_token(&self) -> CancellationToken {
        lock(&self.generation).clone()
    }

    /// Drops every connection open now.
    pub fn drop_connections(&self) {
        let mut generation = lock(&self.generation);
        generation.cancel();
        *generation = self.shutdown.child_token();
    }

    /// The token a new connection freezes on: cancelled by the next freeze.
    pub fn freeze_token(&self) -> CancellationToken {
        lock(&self.freezes).clone()
    }

    /// Freezes every connection open now: each stops answering and sending (requests are read
    /// and ignored) while its socket stays open, until the client closes it or the simulator
    /// drops it. New connections are served as usual.
    pub fn freeze_connections(&self) {
        let mut freezes = lock(&self.freezes);
        freezes.cancel();
        *freezes = CancellationToken::new();
    }

    /// The current ground truth.
    pub fn truth(&self) -> Truth {
        let (world_seq, positions, executions) = {
            let world = lock(&self.world);
            (world.seq(), world.positions(None), world.execs().day().to_vec())
        };
        let clients = lock(&self.clients);
        Truth {
            world_seq,
            positions,
            clients: clients.snapshot(Instant::now()),
            streams_total: clients.streams_total,
            max_streams_total: clients.max_streams_total,
            executions,
        }
    }
}

/// Per-client-id bookkeeping.
#[derive(Debug, Default)]
struct ClientStats {
    connected: bool,
    connections: u64,
    streams: usize,
    max_streams: usize,
    window: VecDeque<Instant>,
    msgs_total: u64,
    pacing_violations: u64,
    stream_cap_rejections: u64,
}

/// The client registry.
#[derive(Debug, Default)]
pub struct Clients {
    by_id: BTreeMap<i32, ClientStats>,
    streams_total: usize,
    max_streams_total: usize,
}

impl Clients {
    /// Marks `client_id` connected; `false` if it already is (error 326).
    pub fn claim(&mut self, client_id: i32) -> bool {
        let stats = self.by_id.entry(client_id).or_default();
        if stats.connected {
            return false;
        }
        stats.connected = true;
        stats.connections += 1;
        stats.window.clear();
        true
    }

    /// Marks `client_id` disconnected and frees its streams.
    pub fn release(&mut self, client_id: i32) {
        if let Some(stats) = self.by_id.get_mut(&client_id) {
            self.streams_total -= stats.streams;
            stats.streams = 0;
            stats.connected = false;
        }
    }

    /// Counts a message from `client_id` received at `now`; `false` when it
    /// exceeds `limit` messages in the last second (0 = no limit).
    pub fn record_message(&mut self, client_id: i32, now: Instant, limit: u32) -> bool {
        let stats = self.by_id.entry(client_id).or_default();
        stats.msgs_total += 1;
        prune(&mut stats.window, now);
        if stats.window.len() >= WINDOW_CAP {
            stats.window.pop_front();
        }
        stats.window.push_back(now);
        let allowed = limit == 0 || stats.window.len() <= limit as usize;
        if !allowed {
            stats.pacing_violations += 1;
        }
        allowed
    }

    /// Takes one real-time stream for `client_id`; `false` when `cap` streams
    /// are already open across all clients (error 101).
    pub fn acquire_stream(&mut self, client_id: i32, cap: usize) -> bool {
        let stats = self.by_id.entry(client_id).or_default();
        if self.streams_total >= cap {
            stats.stream_cap_rejections += 1;
            return false;
        }
        stats.streams += 1;
        stats.max_streams = stats.max_streams.max(stats.streams);
        self.streams_total += 1;
        self.max_streams_total = self.max_streams_total.max(self.streams_total);
        true
    }

    /// Gives back `count` streams of `client_id`.
    pub fn release_streams(&mut self, client_id: i32, count: usize) {
        if let Some(stats) = self.by_id.get_mut(&client_id) {
            let count = count.min(stats.streams);
            stats.streams -= count;
            self.streams_total -= count;
        }
    }

    fn snapshot(&self, now: Instant) -> Vec<ClientTruth> {
        self.by_id
            .iter()
            .map(|(&client_id, s)| ClientTruth {
                client_id,
                connected: s.connected,
                connections: s.connections,
                streams: s.streams,
                max_streams: s.max_streams,
                msgs_last_second: s
                    .window
                    .iter()
                    .filter(|&&t| now.duration_since(t) < Duration::from_secs(1))
                    .count(),
                msgs_total: s.msgs_total,
                pacing_violations: s.pacing_violations,
                stream_cap_rejections: s.stream_cap_rejections,
            })
            .collect()
    }
}

/// Forgets timestamps older than one second.
fn prune(window: &mut VecDeque<Instant>, now: Instant) {
    while window
        .front()
        .is_some_and(|&t| now.duration_since(t) >= Duration::from_secs(1))
    {
        window.pop_front();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pacing_window_counts_one_second() {
        let mut clients = Clients::default();
        assert!(clients.claim(1));
        assert!(!clients.claim(1));
        let t0 = Instant::now();
        assert!((0..3).all(|_| clients.record_message(1, t0, 3)));
        assert!(!clients.record_message(1, t0, 3));
        assert!(clients.record_message(1, t0 + Duration::from_millis(1500), 3));
    }

    #[test]
    fn stream_cap_is_global() {
        let mut clients = Clients::default();
        assert!(clients.acquire_stream(1, 2));
        assert!(clients.acquire_stream(2, 2));
        assert!(!clients.acquire_stream(1, 2));
        clients.release(2);
        assert!(clients.acquire_stream(1, 2));
        assert_eq!((clients.streams_total, clients.max_streams_total), (2, 2));
    }
}
