//! Reconciliation after a (re)connect or a resync, as a pure function.
//!
//! `before` is what ingest last published; `after` is IB's fresh position list (everything up
//! to PositionEnd). The result is the smallest set of events that makes the published state
//! equal IB's again:
//! - open in `after` and new, changed, or marked dirty (an event about it was not
//!   acknowledged) → a SNAPSHOT event;
//! - zero in `after` but open (or dirty) before → a SNAPSHOT event carrying the close;
//! - open (or dirty) in `before` and absent from `after` → a RECONCILE event with quantity 0;
//! - unchanged → nothing.

use crate::book::{Book, Held, PosKey};

/// One event reconciliation calls for.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// IB lists the position with figures ingest has not published: publish them (SNAPSHOT).
    Snapshot(PosKey, Held),
    /// The position vanished while ingest was not looking: publish its close (RECONCILE).
    Close(PosKey, Held),
}

/// The events that bring `before` to `after`, in key order.
pub fn reconcile(before: &Book, after: &Book) -> Vec<Change> {
    let mut changes = Vec::new();
    for (key, now) in after {
        let was = before.get(key);
        let publish = match was {
            None => now.is_open(),
            Some(was) => was.dirty || !was.same_figures(now),
        };
        if publish {
            changes.push(Change::Snapshot(key.clone(), now.clone()));
        }
    }
    for (key, was) in before {
        if !after.contains_key(key) && (was.is_open() || was.dirty) {
            let mut closed = was.clone();
            closed.position = 0.0;
            closed.pnl = None;
            closed.dirty = false;
            changes.push(Change::Close(key.clone(), closed));
        }
    }
    changes.sort_by(|a, b| key_of(a).cmp(key_of(b)));
    changes
}

fn key_of(c: &Change) -> &PosKey {
    match c {
        Change::Snapshot(k, _) | Change::Close(k, _) => k,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::book::ContractInfo;

    fn held(position: f64, avg: f64) -> Held {
        Held {
            contract: ContractInfo::default(),
            position,
            avg_cost: avg,
            pnl: None,
            dirty: false,
        }
    }

    fn book(items: &[(i64, f64, f64)]) -> Book {
        items
            .iter()
            .map(|(c, p, a)| (PosKey::new("A", *c), held(*p, *a)))
            .collect()
    }

    #[test]
    fn unchanged_produces_nothing() {
        let b = book(&[(1, 2.0, 10.0), (2, -1.0, 5.0)]);
        assert!(reconcile(&b, &b.clone()).is_empty());
        assert!(reconcile(&Book::new(), &Book::new()).is_empty());
    }

    #[test]
    fn vanished_positions_close_and_changed_or_new_ones_snapshot() {
        let before = book(&[(1, 2.0, 10.0), (2, -1.0, 5.0), (3, 4.0, 1.0)]);
        let after = book(&[(1, 2.0, 10.0), (2, -3.0, 5.0), (4, 1.0, 1.0), (5, 0.0, 0.0)]);
        let changes = reconcile(&before, &after);
        assert_eq!(changes.len(), 3, "{changes:?}");
        assert!(matches!(&changes[0], Change::Snapshot(k, h) if k.con_id == 2 && h.position == -3.0));
        assert!(matches!(&changes[1], Change::Close(k, h) if k.con_id == 3 && h.position == 0.0));
        assert!(matches!(&changes[2], Change::Snapshot(k, h) if k.con_id == 4 && h.position == 1.0));
    }

    #[test]
    fn zero_in_the_list_closes_an_open_position() {
        let before = book(&[(1, 2.0, 10.0)]);
        let after = book(&[(1, 0.0, 0.0)]);
        assert!(
            matches!(&reconcile(&before, &after)[..], [Change::Snapshot(k, h)] if k.con_id == 1 && h.position == 0.0)
        );
    }

    #[test]
    fn dirty_entries_are_republished_even_when_unchanged() {
        let mut before = book(&[(1, 2.0, 10.0), (2, 0.0, 0.0)]);
        before.values_mut().for_each(|h| h.dirty = true);
        let after = book(&[(1, 2.0, 10.0)]);
        let changes = reconcile(&before, &after);
        assert!(
            matches!(&changes[..], [Change::Snapshot(a, _), Change::Close(b, _)] if a.con_id == 1 && b.con_id == 2)
        );
    }
}
