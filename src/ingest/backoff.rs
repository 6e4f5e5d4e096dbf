//! The reconnect backoff policy, as a pure state machine.
//!
//! Exponential with "equal jitter": each delay is drawn between half and all of a ceiling that
//! doubles per attempt up to `max`, so many clients restarting together do not reconnect in
//! lockstep. The ceiling is kept across sessions: a gateway that accepts connections and drops
//! them at once is retried ever more slowly, like one that refuses them. Only a session that
//! stayed up for `healthy_after` resets it.

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

    /// A connected session ended after `lasted`: only a healthy one resets the ceiling.
    pub fn session_ended(&mut self, lasted: Duration) {
        if lasted >= self.healthy_after {
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
            b.session_ended(Duration::from_secs(1)); // ... and the gateway drops it at once
        }
        assert!(
            delays[5] >= 1600 * MS,
            "still hammering after 6 dropped sessions: {delays:?}"
        );
        assert_eq!(b.ceiling(), 3200 * MS);
        b.session_ended(Duration::from_secs(61));
        assert_eq!(b.ceiling(), 100 * MS, "a healthy session resets the backoff");
        assert!(b.next_delay() <= 100 * MS);
    }
}
