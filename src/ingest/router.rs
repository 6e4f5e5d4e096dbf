//! Routing and slot allocation, as pure functions.
//!
//! A position is *covered* when a registry entry names it. Covered, open positions compete for
//! the streaming slots: the `budget` best by (priority descending, already holding a slot
//! first, then round-robin across accounts) are **active** (routed to `positions.active`, given
//! a real-time PnL stream); the rest **overflow** (routed queued and flagged until a slot
//! frees). Everything else is **queued**. Preferring current holders among equals keeps slots
//! from churning; the round-robin (each account's first position by conId, then each account's
//! second, …) shares the slots left among equals fairly, so no account loses every tie because
//! of how its id sorts.

use std::collections::{BTreeSet, HashMap};

use crate::book::PosKey;
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
    // Each candidate's rank within its account among its equals (same priority and holding).
    candidates.sort_by(|a, b| a.key.cmp(&b.key));
    let mut taken: HashMap<(String, i32, bool), usize> = HashMap::new();
    let mut ranked: Vec<(usize, Candidate)> = candidates
        .into_iter()
        .map(|c| {
            let n = taken.entry((c.key.account.clone(), c.priority, c.holding)).or_default();
            *n += 1;
            (*n, c)
        })
        .collect();
    ranked.sort_by(|(ra, a), (rb, b)| {
        b.priority
            .cmp(&a.priority)
            .then(b.holding.cmp(&a.holding))
            .then(ra.cmp(rb))
            .then_with(|| a.key.cmp(&b.key))
    });
    let mut p = Plan::default();
    for (i, (_, c)) in ranked.into_iter().enumerate() {
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

    /// Issue 10 #16: equal-priority ties are shared across accounts, not won by the accounts
    /// that sort first.
    #[test]
    fn ties_are_shared_round_robin_across_accounts() {
        let mut candidates = Vec::new();
        for account in ["A", "B", "C", "D"] {
            for con in 1..=5 {
                candidates.push(c(account, con, 2, false));
            }
        }
        let p = plan(6, candidates.clone());
        let per_account = |p: &Plan, a: &str| p.active.iter().filter(|k| k.account == a).count();
        for a in ["A", "B", "C", "D"] {
            assert!(per_account(&p, a) >= 1, "account {a} got no slot: {:?}", p.active);
            assert!(
                per_account(&p, a) <= 2,
                "account {a} took more than its share: {:?}",
                p.active
            );
        }
        // Priority still comes first, and holders still keep their slots among equals.
        candidates.push(c("Z", 9, 3, false));
        candidates.push(c("D", 5, 2, true));
        let candidates: Vec<Candidate> = candidates
            .into_iter()
            .filter(|x| x.key != PosKey::new("D", 5) || x.holding)
            .collect();
        let p = plan(2, candidates);
        assert_eq!(
            p.active.iter().cloned().collect::<Vec<_>>(),
            vec![PosKey::new("D", 5), PosKey::new("Z", 9)]
        );
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
