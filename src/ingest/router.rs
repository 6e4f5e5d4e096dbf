//! Routing and slot allocation, as pure functions.
//!
//! A position is *covered* when a registry entry names it. Covered, open positions compete for
//! the streaming slots: the `budget` best by (priority descending, already holding a slot
//! first, key) are **active** (routed to `positions.active`, given a real-time PnL stream); the
//! rest **overflow** (routed queued and flagged until a slot frees). Everything else is
//! **queued**. Preferring current holders among equals keeps slots from churning.

use std::collections::BTreeSet;

use super::book::PosKey;
use crate::events::Route;

/// A covered, open position competing for a slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// The position.
    pub key: PosKey,
    /// Its registry priority (the highest among covering entries).
    pub priority: i32,
    /// Whether it holds (or is acquiring) a slot now.
    pub holding: bool,
}

/// Who should hold a slot.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Positions that should hold a slot (at most the budget).
    pub active: BTreeSet<PosKey>,
    /// Covered positions left without a slot.
    pub overflow: BTreeSet<PosKey>,
}

impl Plan {
    /// The route of `key` under this plan.
    pub fn route(&self, key: &PosKey) -> Route {
        if self.active.contains(key) {
            Route::Active
        } else {
            Route::Queued
        }
    }
}

/// Allocates at most `budget` slots among `candidates`.
pub fn plan(budget: usize, mut candidates: Vec<Candidate>) -> Plan {
    candidates.sort_by(|a, b| {
        b.priority
            .cmp(&a.priority)
            .then(b.holding.cmp(&a.holding))
            .then_with(|| a.key.cmp(&b.key))
    });
    let mut p = Plan::default();
    for (i, c) in candidates.into_iter().enumerate() {
        if i < budget {
            p.active.insert(c.key);
        } else {
            p.overflow.insert(c.key);
        }
    }
    p
}

/// What changes between two plans for the slot holders.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Moves {
    /// Holders to stop (in `held` but not wanted).
    pub revoke: Vec<PosKey>,
    /// Positions to start (wanted but not held).
    pub grant: Vec<PosKey>,
}

/// The slot moves from the current holders `held` to `plan`.
pub fn moves<'a>(plan: &Plan, held: impl IntoIterator<Item = &'a PosKey>) -> Moves {
    let held: BTreeSet<&PosKey> = held.into_iter().collect();
    Moves {
        revoke: held
            .iter()
            .filter(|k| !plan.active.contains(**k))
            .map(|k| (*k).clone())
            .collect(),
        grant: plan.active.iter().filter(|k| !held.contains(k)).cloned().collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(account: &str, con: i64, priority: i32, holding: bool) -> Candidate {
        Candidate {
            key: PosKey::new(account, con),
            priority,
            holding,
        }
    }

    fn keys(s: &BTreeSet<PosKey>) -> Vec<i64> {
        s.iter().map(|k| k.con_id).collect()
    }

    #[test]
    fn budget_is_never_exceeded_and_priority_wins() {
        let p = plan(
            2,
            vec![
                c("A", 1, 0, false),
                c("A", 2, 5, false),
                c("A", 3, 1, false),
                c("A", 4, 5, false),
            ],
        );
        assert_eq!(keys(&p.active), vec![2, 4]);
        assert_eq!(keys(&p.overflow), vec![1, 3]);
        assert_eq!(p.route(&PosKey::new("A", 2)), Route::Active);
        assert_eq!(p.route(&PosKey::new("A", 1)), Route::Queued);
        let p = plan(0, vec![c("A", 1, 9, true)]);
        assert!(p.active.is_empty());
        assert_eq!(plan(10, vec![]), Plan::default());
    }

    #[test]
    fn holders_keep_their_slot_among_equals_but_yield_to_higher_priority() {
        let p = plan(1, vec![c("A", 1, 3, false), c("A", 9, 3, true)]);
        assert_eq!(keys(&p.active), vec![9], "the holder keeps it");
        let p = plan(1, vec![c("A", 1, 4, false), c("A", 9, 3, true)]);
        assert_eq!(keys(&p.active), vec![1], "higher priority preempts");
    }

    #[test]
    fn moves_revoke_then_grant() {
        let p = plan(2, vec![c("A", 1, 5, false), c("A", 2, 4, true), c("A", 3, 1, true)]);
        let held = [PosKey::new("A", 2), PosKey::new("A", 3)];
        let m = moves(&p, held.iter());
        assert_eq!(m.revoke, vec![PosKey::new("A", 3)]);
        assert_eq!(m.grant, vec![PosKey::new("A", 1)]);
        assert_eq!(moves(&p, p.active.iter()), Moves::default());
    }
}
