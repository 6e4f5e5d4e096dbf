//! The reconnect backoff policy, as a pure state machine.
//!
//! Exponential with "equal jitter": each delay is drawn between half and all of a ceiling that
//! doubles per attempt up to `max`, so many clients restarting together do not reconnect in
//! lockstep. The delay grows with *failures*: a refused or timed-out connect, and a session that
//! ended before it was of any use (no complete position list received), so a gateway that
//! accepts connections and drops them at once is retried ever more slowly, like one that
//! refuses them. A session that synced (its position list arrived whole), or that stayed up
//! for `healthy_after`, resets it: a flapping gateway that drops working sessions is reconnected
//! to within `initial` each time (issue 18 #4), instead of ever more slowly.

use std::time::Duration;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// Reconnect delays for one ingest run.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    healthy_after: Duration,
    ceiling: Duration,
    rng: SmallRng,
}

impl Backoff {
    /// Starts at `initial`, doubles up to `max` (at least `initial`), resets after a session
    /// that lasted `healthy_after`. `seed` makes the jitter reproducible (tests).
    pub fn new(initial: Duration, max: Duration, healthy_after: Duration, seed: Option<u64>) -> Self {
        let initial = initial.max(Duration::from_millis(1));
        Self {
            initial,
            max: max.max(initial),
            healthy_after,
            ceiling: initial,
            rng: seed.map_or_else(SmallRng::from_entropy, SmallRng::seed_from_u64),
        }
    }

    /// The delay before the next attempt (between half and all of the ceiling); the ceiling
    /// then doubles, up to `max`.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.ceiling;
        let half = ceiling / 2;
        let jitter = self
            .rng
            .gen_range(0..=u64::try_from((ceiling - half).as_micros()).unwrap_or(u64::MAX));
        self.ceiling = (self.ceiling * 2).min(self.max);
        half + Duration::from_micros(jitter)
    }

    /// A connected session ended after `lasted`; `synced` when it received a whole position
    /// list. A synced or long session resets the ceiling; one that was of no use keeps it.
    pub fn session_ended(&mut self, lasted: Duration, synced: bool) {
        if synced || lasted >= self.healthy_after {
            self.ceiling = self.initial;
        }
    }

    /// The current ceiling (the longest next delay).
    pub fn ceiling(&self) -> Duration {
        self.ceiling
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn backoff() -> Backoff {
        Backoff::new(100 * MS, 3200 * MS, Duration::from_secs(60), Some(7))
    }

    #[test]
    fn delays_double_with_jitter_up_to_the_max() {
        let mut b = backoff();
        let mut ceiling = 100 * MS;
        let mut delays = Vec::new();
        for _ in 0..10 {
            let d = b.next_delay();
            assert!(
                d >= ceiling / 2 && d <= ceiling,
                "{d:?} outside [{:?}, {ceiling:?}]",
                ceiling / 2
            );
            delays.push(d);
            ceiling = (ceiling * 2).min(3200 * MS);
        }
        assert_eq!(b.ceiling(), 3200 * MS);
        assert!(delays.windows(2).any(|w| w[0] != w[1] / 2), "jittered: {delays:?}");
        let mut other = Backoff::new(100 * MS, 3200 * MS, Duration::from_secs(60), Some(8));
        let others: Vec<Duration> = (0..10).map(|_| other.next_delay()).collect();
        assert_ne!(delays, others, "two clients do not retry in lockstep");
    }

    /// Issue 10 #14: a gateway that accepts and then drops every connection is retried ever
    /// more slowly: the ceiling survives short sessions (the old loop restarted at
    /// `--reconnect-initial` after each one), and only a healthy session resets it.
    #[test]
    fn backoff_is_kept_across_short_sessions_and_reset_by_a_healthy_one() {
        let mut b = backoff();
        let mut delays = Vec::new();
        for _ in 0..6 {
            delays.push(b.next_delay()); // the attempt connects ...
            b.session_ended(Duration::from_secs(1), false); // ... the gateway drops it before its list
        }
        assert!(
            delays[5] >= 1600 * MS,
            "still hammering after 6 dropped sessions: {delays:?}"
        );
        assert_eq!(b.ceiling(), 3200 * MS);
        b.session_ended(Duration::from_secs(61), false);
        assert_eq!(b.ceiling(), 100 * MS, "a healthy session resets the backoff");
        assert!(b.next_delay() <= 100 * MS);
    }

    /// Issue 18 #4: a flapping gateway (every connect works, every session synced, then
    /// dropped) is reconnected to within `initial` each time; the earlier policy grew the delay
    /// with each dropped session (0.7 → 3.8 → 12.6 → 25.6 s) and left ingest disconnected.
    #[test]
    fn sessions_that_synced_reset_the_backoff() {
        let mut b = backoff();
        for _ in 0..10 {
            let d = b.next_delay();
            assert!(d <= 100 * MS, "a dropped synced session waits {d:?}");
            b.session_ended(Duration::from_secs(2), true);
        }
        // Failed connects in between still grow it.
        let grown: Vec<Duration> = (0..5).map(|_| b.next_delay()).collect();
        assert!(grown[4] >= 800 * MS, "{grown:?}");
        b.session_ended(Duration::from_millis(10), true);
        assert_eq!(b.ceiling(), 100 * MS);
    }
}
