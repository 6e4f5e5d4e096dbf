//! The reconciliation itself, with no I/O: a day's starting book, the day's fills and the book
//! now in; one line per (account, conId) that moved out, each with a status.
//!
//! For every key: `diff = now - start - filled`, where `filled` sums the signed shares of the
//! fills made after the moment the key's starting position reflects (its `as_of`: the
//! `ingest_time` of the `positions_current` row the snapshot copied, or the snapshot's time
//! for a key the snapshot did not hold). A fill made before that moment is already in `start`.
//! Of a corrected execution only the latest revision counts.
//!
//! A fill's moment is IB's `exec_time`: it stays right for a fill re-requested long after it
//! happened (after a disconnect), and a fill is always stamped before the position update it
//! causes. Two edges remain, both only for fills of the day made before its starting snapshot
//! or within a second of the row a snapshot copied: IB stamps to the second (a fill in the
//! same second as, but after, a row counts as before it), and a clock of IB's running ahead of
//! ingest's moves such fills after the rows that hold them. So the service takes the day's
//! starting snapshot at its first run after midnight UTC, when nothing trades; a first start
//! in the middle of a trading day may show `pending`/`drifted` keys that day.
//!
//! Statuses:
//! - `agrees`: `diff == 0`.
//! - `explained`: a position change IB makes without an execution. An option that closed
//!   (`now == 0`) with an expiry of the day or earlier: `expiry`. Options whose differences
//!   sum to what moved the same account's stock of their underlying, as an assignment or
//!   exercise gives (calls `-diff × multiplier`, puts the negative): `assignment`, on all of
//!   them. Assignment needs no close: IB assigns part of a short position early, and what is
//!   left may trade again.
//! - `pending`: unexplained, for less than the drift threshold (positions lag fills: a queued
//!   contract is refreshed by the next poll, an execution waits for its commission).
//! - `drifted`: unexplained for the drift threshold or longer.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

/// (account, conId).
pub type Key = (String, i64);

/// What identifies a contract to a reader, and what the explanations need.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Contract {
    pub symbol: String,
    pub sec_type: String,
    pub local_symbol: String,
    /// `YYYYMMDD` (IB's `lastTradeDateOrContractMonth`) for options and futures.
    pub expiry: Option<String>,
    /// `C` / `P` (or `CALL` / `PUT`).
    pub right: Option<String>,
    /// Shares per contract (100 for US equity options).
    pub multiplier: Option<f64>,
}

impl Contract {
    fn is_option(&self) -> bool {
        matches!(self.sec_type.as_str(), "OPT" | "FOP")
    }

    fn is_call(&self) -> Option<bool> {
        match self.right.as_deref()?.to_ascii_uppercase().as_str() {
            "C" | "CALL" => Some(true),
            "P" | "PUT" => Some(false),
            _ => None,
        }
    }

    /// The day (`YYYYMMDD` as a number) the option expires.
    fn expiry_day(&self) -> Option<u32> {
        let e = self.expiry.as_deref()?;
        e.get(..8)?.parse().ok()
    }
}

/// A position at a moment: a snapshot row or a `positions_current` row.
#[derive(Debug, Clone, PartialEq)]
pub struct Held {
    pub position: f64,
    /// IB's average cost (per share, times the multiplier for options).
    pub avg_cost: f64,
    /// The time of the event the row comes from (µs since the epoch).
    pub as_of: i64,
    pub contract: Contract,
}

/// One fill (the latest revision of an execution), signed: bought > 0, sold < 0.
#[derive(Debug, Clone, PartialEq)]
pub struct Fill {
    pub account: String,
    pub con_id: i64,
    pub exec_stem: String,
    pub revision: i32,
    /// µs since the epoch.
    pub exec_time: i64,
    pub shares: f64,
    pub contract: Contract,
}

/// The status of a line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Agrees,
    Explained,
    Pending,
    Drifted,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Agrees => "agrees",
            Status::Explained => "explained",
            Status::Pending => "pending",
            Status::Drifted => "drifted",
        }
    }

    pub fn parse(s: &str) -> Option<Status> {
        [Status::Agrees, Status::Explained, Status::Pending, Status::Drifted]
            .into_iter()
            .find(|x| x.as_str() == s)
    }
}

/// One key of the reconciliation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Line {
    pub account: String,
    pub con_id: i64,
    #[serde(flatten)]
    pub contract: Contract,
    /// The position at the start (of the day's first snapshot; 0 when it did not hold the key).
    pub start: f64,
    /// What `start` reflects (µs).
    pub start_as_of: i64,
    /// Signed shares of the fills after `start_as_of`.
    pub filled: f64,
    /// How many fills.
    pub fills: u32,
    /// The position now (`positions_current`; 0 when closed or absent).
    pub now: f64,
    /// `now - start - filled`.
    pub diff: f64,
    pub status: Status,
    /// `expiry` or `assignment` for `explained`.
    pub reason: Option<String>,
    /// Since when unexplained (µs), for `pending` and `drifted`.
    pub drifted_since: Option<i64>,
}

/// What one reconciliation reads.
#[derive(Debug, Clone, Copy)]
pub struct Inputs<'a> {
    /// The starting book (open positions of the snapshot).
    pub start: &'a HashMap<Key, Held>,
    /// When the snapshot was taken: the `as_of` of keys it did not hold.
    pub start_time: i64,
    /// Every fill that may count (every revision; only the latest of a stem counts).
    pub fills: &'a [Fill],
    /// The book now.
    pub now: &'a HashMap<Key, Held>,
    /// Since when each key was unexplained at the last run.
    pub unexplained_since: &'a HashMap<Key, i64>,
    /// The trading day (`YYYYMMDD` as a number): options expiring on it or before explain.
    pub day: u32,
    /// Now (µs).
    pub at: i64,
    /// How long a key may stay unexplained before it is `drifted` (µs).
    pub drift_after: i64,
}

/// Quantities closer than this are equal (positions may be fractional shares).
const EPSILON: f64 = 1e-6;

fn zero(x: f64) -> bool {
    x.abs() < EPSILON
}

/// Reconciles; the lines of keys that moved (start, fills or now), sorted by key. Keys nothing
/// happened to since the snapshot are left out: they agree trivially.
pub fn reconcile(inputs: &Inputs<'_>) -> Vec<Line> {
    // The latest revision per (account, stem).
    let mut latest: HashMap<(&str, &str), &Fill> = HashMap::new();
    for f in inputs.fills {
        let slot = latest.entry((f.account.as_str(), f.exec_stem.as_str())).or_insert(f);
        if f.revision > slot.revision {
            *slot = f;
        }
    }
    let mut lines: BTreeMap<Key, Line> = BTreeMap::new();
    let line = |lines: &mut BTreeMap<Key, Line>, key: &Key, contract: &Contract| {
        lines.entry(key.clone()).or_insert_with(|| {
            let start = inputs.start.get(key);
            Line {
                account: key.0.clone(),
                con_id: key.1,
                contract: contract.clone(),
                start: start.map_or(0.0, |h| h.position),
                start_as_of: start.map_or(inputs.start_time, |h| h.as_of),
                filled: 0.0,
                fills: 0,
                now: inputs.now.get(key).map_or(0.0, |h| h.position),
                diff: 0.0,
                status: Status::Agrees,
                reason: None,
                drifted_since: None,
            }
        });
    };
    for (key, h) in inputs.now {
        let moved = inputs.start.get(key).is_none_or(|s| !zero(s.position - h.position));
        if moved {
            line(&mut lines, key, &h.contract);
        }
    }
    for (key, h) in inputs.start {
        if !inputs.now.contains_key(key) && !zero(h.position) {
            line(&mut lines, key, &h.contract);
        }
    }
    for f in latest.values() {
        let key = (f.account.clone(), f.con_id);
        let as_of = inputs.start.get(&key).map_or(inputs.start_time, |h| h.as_of);
        if f.exec_time > as_of {
            // The contract as the book knows it, else as the fill carries it.
            let contract = inputs
                .now
                .get(&key)
                .or_else(|| inputs.start.get(&key))
                .map_or(&f.contract, |h| &h.contract);
            line(&mut lines, &key, contract);
            let l = lines.get_mut(&key).expect("just inserted");
            l.filled += f.shares;
            l.fills += 1;
        }
    }
    for l in lines.values_mut() {
        l.diff = l.now - l.start - l.filled;
        if zero(l.diff) {
            l.diff = 0.0;
        }
    }
    explain(&mut lines, inputs.day);
    for (key, l) in &mut lines {
        if l.diff == 0.0 || l.status == Status::Explained {
            continue;
        }
        let since = inputs.unexplained_since.get(key).copied().unwrap_or(inputs.at);
        l.drifted_since = Some(since);
        l.status = if inputs.at - since >= inputs.drift_after {
            Status::Drifted
        } else {
            Status::Pending
        };
    }
    lines.into_values().collect()
}

/// Marks expiries and assignments `explained`.
fn explain(lines: &mut BTreeMap<Key, Line>, day: u32) {
    // Options with a difference: expiries when they closed on or after their expiry day, and
    // candidates for an assignment either way (an early or partial assignment leaves the rest
    // of the position, and the option may trade again after it).
    let mut candidates: HashMap<(String, String), Vec<Candidate>> = HashMap::new();
    for (key, l) in lines.iter_mut() {
        if l.diff == 0.0 || !l.contract.is_option() {
            continue;
        }
        let expired = zero(l.now) && l.contract.expiry_day().is_some_and(|e| e <= day);
        if expired {
            l.status = Status::Explained;
            l.reason = Some("expiry".into());
        }
        // The stock an assignment (or exercise) of what was held moves: diff = -contracts.
        if let Some(call) = l.contract.is_call() {
            let multiplier = l.contract.multiplier.unwrap_or(100.0);
            let stock = if call { -l.diff } else { l.diff } * multiplier;
            candidates
                .entry((l.account.clone(), l.contract.symbol.clone()))
                .or_default()
                .push(Candidate {
                    key: key.clone(),
                    stock,
                    expired,
                });
        }
    }
    // Per (account, underlying) with candidates: the stock's difference (0 when it has no line:
    // assignments that net out leave the stock where it was) is what the assignments sum to.
    let stocks: HashMap<(String, String), Key> = lines
        .iter()
        .filter(|(_, l)| l.contract.sec_type == "STK")
        .map(|(k, l)| ((l.account.clone(), l.contract.symbol.clone()), k.clone()))
        .collect();
    for (group, options) in &candidates {
        let stock = stocks.get(group).filter(|k| lines[*k].diff != 0.0);
        let target = stock.map_or(0.0, |k| lines[k].diff);
        if stock.is_none() && options.iter().all(|o| o.expired) {
            continue; // nothing moved that an expiry does not already explain
        }
        let Some(used) = subset_summing_to(options, target) else {
            continue;
        };
        if stock.is_none() && used.iter().all(|k| options.iter().any(|o| &o.key == k && o.expired)) {
            continue;
        }
        for k in used.into_iter().chain(stock.cloned()) {
            let l = lines.get_mut(&k).expect("a line of the book");
            l.status = Status::Explained;
            l.reason = Some("assignment".into());
        }
    }
}

/// An option line that an assignment may explain: the stock an assignment of its difference
/// moves, and whether an expiry already explains it (an option exercised at expiry is both).
struct Candidate {
    key: Key,
    stock: f64,
    expired: bool,
}

/// The keys of a subset of `options` whose stock effects sum to `target`: of those that do, the
/// one that explains the most options no expiry explains (up to 16 options are searched
/// exhaustively; beyond, only all of them, all not expired, or one alone).
fn subset_summing_to(options: &[Candidate], target: f64) -> Option<Vec<Key>> {
    let n = options.len();
    let keys = |take: &dyn Fn(usize) -> bool| -> Vec<Key> {
        (0..n).filter(|&i| take(i)).map(|i| options[i].key.clone()).collect()
    };
    let sums_to = |take: &dyn Fn(usize) -> bool| -> bool {
        zero((0..n).filter(|&i| take(i)).map(|i| options[i].stock).sum::<f64>() - target)
    };
    if n <= 16 {
        let mut best: Option<(usize, u32)> = None;
        for mask in 1..(1u32 << n) {
            let take = |i: usize| mask & (1 << i) != 0;
            if !sums_to(&take) {
                continue;
            }
            let unexpired = (0..n).filter(|&i| take(i) && !options[i].expired).count();
            if best.is_none_or(|(score, _)| unexpired > score) {
                best = Some((unexpired, mask));
            }
        }
        return best.map(|(_, mask)| keys(&|i| mask & (1 << i) != 0));
    }
    if sums_to(&|_| true) {
        return Some(keys(&|_| true));
    }
    if sums_to(&|i| !options[i].expired) {
        return Some(keys(&|i| !options[i].expired));
    }
    options
        .iter()
        .find(|o| zero(o.stock - target))
        .map(|o| vec![o.key.clone()])
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: u32 = 20261207;
    const MIN: i64 = 60_000_000;

    fn stock(symbol: &str) -> Contract {
        Contract {
            symbol: symbol.into(),
            sec_type: "STK".into(),
            local_symbol: symbol.into(),
            ..Contract::default()
        }
    }

    fn option(symbol: &str, expiry: &str, right: &str) -> Contract {
        Contract {
            symbol: symbol.into(),
            sec_type: "OPT".into(),
            local_symbol: format!("{symbol} {expiry} {right}"),
            expiry: Some(expiry.into()),
            right: Some(right.into()),
            multiplier: Some(100.0),
        }
    }

    fn held(position: f64, as_of: i64, contract: Contract) -> Held {
        Held {
            position,
            avg_cost: 0.0,
            as_of,
            contract,
        }
    }

    fn fill(account: &str, con_id: i64, stem: &str, revision: i32, at: i64, shares: f64) -> Fill {
        Fill {
            account: account.into(),
            con_id,
            exec_stem: stem.into(),
            revision,
            exec_time: at,
            shares,
            contract: stock("X"),
        }
    }

    fn key(a: &str, c: i64) -> Key {
        (a.into(), c)
    }

    /// The inputs, owned.
    #[derive(Default)]
    struct World {
        start: HashMap<Key, Held>,
        fills: Vec<Fill>,
        now: HashMap<Key, Held>,
        unexplained_since: HashMap<Key, i64>,
    }

    fn run(w: &World) -> Vec<Line> {
        reconcile(&Inputs {
            start: &w.start,
            start_time: 10 * MIN,
            fills: &w.fills,
            now: &w.now,
            unexplained_since: &w.unexplained_since,
            day: DAY,
            at: 100 * MIN,
            drift_after: 5 * MIN,
        })
    }

    fn by_key(lines: &[Line]) -> HashMap<Key, &Line> {
        lines.iter().map(|l| (key(&l.account, l.con_id), l)).collect()
    }

    #[test]
    fn fills_explain_the_change_and_untouched_keys_are_left_out() {
        let mut i = World::default();
        i.start.insert(key("A", 1), held(10.0, 5 * MIN, stock("X")));
        i.start.insert(key("A", 2), held(3.0, 5 * MIN, stock("Y")));
        i.now.insert(key("A", 1), held(7.0, 20 * MIN, stock("X")));
        i.now.insert(key("A", 2), held(3.0, 5 * MIN, stock("Y")));
        i.now.insert(key("A", 3), held(4.0, 30 * MIN, stock("Z")));
        i.fills.push(fill("A", 1, "e1", 1, 15 * MIN, -3.0));
        i.fills.push(fill("A", 3, "e2", 1, 25 * MIN, 4.0));
        let lines = run(&i);
        assert_eq!(lines.len(), 2, "A:2 did not move: {lines:?}");
        for l in &lines {
            assert_eq!((l.status, l.diff, l.fills), (Status::Agrees, 0.0, 1), "{l:?}");
        }
        let b = by_key(&lines);
        assert_eq!((b[&key("A", 3)].start, b[&key("A", 3)].start_as_of), (0.0, 10 * MIN));
    }

    #[test]
    fn a_fill_the_snapshot_already_reflects_does_not_count_twice() {
        let mut i = World::default();
        // The snapshot copied a row written after the fill at minute 4.
        i.start.insert(key("A", 1), held(10.0, 5 * MIN, stock("X")));
        i.now.insert(key("A", 1), held(12.0, 20 * MIN, stock("X")));
        i.fills.push(fill("A", 1, "e0", 1, 4 * MIN, 5.0));
        i.fills.push(fill("A", 1, "e1", 1, 15 * MIN, 2.0));
        let l = run(&i);
        assert_eq!((l[0].filled, l[0].fills, l[0].status), (2.0, 1, Status::Agrees));
    }

    #[test]
    fn only_the_latest_revision_of_a_corrected_execution_counts() {
        let mut i = World::default();
        i.now.insert(key("A", 1), held(7.0, 20 * MIN, stock("X")));
        i.fills.push(fill("A", 1, "e1", 1, 15 * MIN, 5.0));
        i.fills.push(fill("A", 1, "e1", 2, 15 * MIN, 7.0));
        let l = run(&i);
        assert_eq!((l[0].filled, l[0].fills, l[0].status), (7.0, 1, Status::Agrees));
    }

    #[test]
    fn a_change_without_a_fill_is_pending_then_drifted() {
        let mut i = World::default();
        i.start.insert(key("A", 1), held(10.0, 5 * MIN, stock("X")));
        i.now.insert(key("A", 1), held(13.0, 20 * MIN, stock("X")));
        let l = run(&i);
        assert_eq!(
            (l[0].diff, l[0].status, l[0].drifted_since),
            (3.0, Status::Pending, Some(100 * MIN))
        );
        i.unexplained_since.insert(key("A", 1), 96 * MIN);
        assert_eq!(run(&i)[0].status, Status::Pending, "4 min < 5 min");
        i.unexplained_since.insert(key("A", 1), 95 * MIN);
        let l = run(&i);
        assert_eq!((l[0].status, l[0].drifted_since), (Status::Drifted, Some(95 * MIN)));
    }

    #[test]
    fn a_position_closed_without_a_fill_is_a_drift_unless_an_option_expired() {
        let mut i = World::default();
        i.start.insert(key("A", 1), held(10.0, 5 * MIN, stock("X")));
        i.start
            .insert(key("A", 2), held(-2.0, 5 * MIN, option("X", "20261207", "C")));
        i.start
            .insert(key("A", 3), held(4.0, 5 * MIN, option("X", "20261218", "P")));
        // A:1 and A:3 are gone from the book, A:2 closed at 0.
        i.now
            .insert(key("A", 2), held(0.0, 20 * MIN, option("X", "20261207", "C")));
        let b = run(&i);
        let b = by_key(&b);
        assert_eq!(b[&key("A", 1)].status, Status::Pending);
        assert_eq!(b[&key("A", 1)].diff, -10.0);
        assert_eq!(
            (b[&key("A", 2)].status, b[&key("A", 2)].reason.as_deref()),
            (Status::Explained, Some("expiry"))
        );
        assert_eq!(b[&key("A", 3)].status, Status::Pending, "expires later: not an expiry");
    }

    #[test]
    fn an_assignment_explains_the_option_and_the_stock() {
        let mut i = World::default();
        // Short 2 calls assigned: stock -200; long 1 put exercised: stock -100.
        i.start.insert(key("A", 1), held(500.0, 5 * MIN, stock("X")));
        i.start
            .insert(key("A", 2), held(-2.0, 5 * MIN, option("X", "20261218", "C")));
        i.start
            .insert(key("A", 3), held(1.0, 5 * MIN, option("X", "20261218", "P")));
        i.start
            .insert(key("A", 4), held(4.0, 5 * MIN, option("X", "20261218", "P")));
        i.start.insert(key("B", 1), held(100.0, 5 * MIN, stock("X")));
        i.now.insert(key("A", 1), held(200.0, 20 * MIN, stock("X")));
        i.now
            .insert(key("A", 4), held(0.0, 20 * MIN, option("X", "20261218", "P")));
        // Another account's stock moved by the same amount: not explained by A's options.
        i.now.insert(key("B", 1), held(-200.0, 20 * MIN, stock("X")));
        let b = run(&i);
        let b = by_key(&b);
        for k in [key("A", 1), key("A", 2), key("A", 3)] {
            assert_eq!(
                (b[&k].status, b[&k].reason.as_deref()),
                (Status::Explained, Some("assignment")),
                "{k:?}"
            );
        }
        assert_eq!(b[&key("A", 4)].status, Status::Pending, "its -400 fits no sum");
        assert_eq!(b[&key("B", 1)].status, Status::Pending);
    }

    #[test]
    fn an_option_assigned_in_part_or_traded_again_is_still_an_assignment() {
        let mut i = World::default();
        // A: short 3 calls, one assigned early (stock -100), 2 left open.
        i.start.insert(key("A", 1), held(300.0, 5 * MIN, stock("X")));
        i.start
            .insert(key("A", 2), held(-3.0, 5 * MIN, option("X", "20261218", "C")));
        i.now.insert(key("A", 1), held(200.0, 20 * MIN, stock("X")));
        i.now
            .insert(key("A", 2), held(-2.0, 20 * MIN, option("X", "20261218", "C")));
        // B: long 2 calls exercised (stock +200), then 1 bought again with a fill.
        i.start
            .insert(key("B", 2), held(2.0, 5 * MIN, option("X", "20261218", "C")));
        i.now.insert(key("B", 1), held(200.0, 20 * MIN, stock("X")));
        i.now
            .insert(key("B", 2), held(1.0, 20 * MIN, option("X", "20261218", "C")));
        i.fills.push(fill("B", 2, "e1", 1, 15 * MIN, 1.0));
        let b = run(&i);
        let b = by_key(&b);
        for k in [key("A", 1), key("A", 2), key("B", 1), key("B", 2)] {
            assert_eq!(
                (b[&k].status, b[&k].reason.as_deref()),
                (Status::Explained, Some("assignment")),
                "{k:?}"
            );
        }
    }

    #[test]
    fn an_assignment_is_matched_to_the_option_no_expiry_explains() {
        let mut i = World::default();
        // Long 1 call expired worthless (closed, expiry today) and long 1 call of a later expiry
        // exercised early (stock +100): both could sum to the stock's +100; the exercised one
        // must be the one that explains it.
        i.start
            .insert(key("A", 2), held(1.0, 5 * MIN, option("X", "20261207", "C")));
        i.start
            .insert(key("A", 3), held(1.0, 5 * MIN, option("X", "20261218", "C")));
        i.now
            .insert(key("A", 2), held(0.0, 20 * MIN, option("X", "20261207", "C")));
        i.now.insert(key("A", 1), held(100.0, 20 * MIN, stock("X")));
        let b = run(&i);
        let b = by_key(&b);
        assert_eq!(b[&key("A", 2)].reason.as_deref(), Some("expiry"));
        for k in [key("A", 1), key("A", 3)] {
            assert_eq!(
                (b[&k].status, b[&k].reason.as_deref()),
                (Status::Explained, Some("assignment")),
                "{k:?}"
            );
        }
    }

    /// Seen on real Kafka with every IB fault on: two options expired-and-assigned and two
    /// exercised early in one account, whose stock effects (+300, -600, -1,100, +1,400) net to
    /// nothing: the stock agrees with its fills, and the assignments still explain the options.
    #[test]
    fn assignments_that_net_out_leave_the_stock_alone_and_still_explain_the_options() {
        let mut i = World::default();
        i.start
            .insert(key("A", 2), held(-3.0, 5 * MIN, option("X", "20261120", "P")));
        i.start
            .insert(key("A", 3), held(-6.0, 5 * MIN, option("X", "20261120", "C")));
        for (k, right, filled) in [(4, "P", 11.0), (5, "C", 14.0)] {
            i.fills.push(fill("A", k, &format!("e{k}"), 1, 15 * MIN, filled));
            i.now
                .insert(key("A", k), held(0.0, 20 * MIN, option("X", "20261218", right)));
        }
        // The stock: bought with a fill, nothing else.
        i.fills.push(fill("A", 1, "e1", 1, 15 * MIN, 338.5));
        i.now.insert(key("A", 1), held(338.5, 20 * MIN, stock("X")));
        let b = run(&i);
        let b = by_key(&b);
        assert_eq!(b[&key("A", 1)].status, Status::Agrees);
        for k in [key("A", 2), key("A", 3), key("A", 4), key("A", 5)] {
            assert_eq!(b[&k].status, Status::Explained, "{k:?}: {:?}", b[&k]);
        }
        assert_eq!(b[&key("A", 4)].reason.as_deref(), Some("assignment"));
        // Alone, a closed option whose stock did not move is no assignment.
        let mut j = World::default();
        j.fills.push(fill("A", 4, "e4", 1, 15 * MIN, 11.0));
        j.now
            .insert(key("A", 4), held(0.0, 20 * MIN, option("X", "20261218", "P")));
        assert_eq!(run(&j)[0].status, Status::Pending);
    }

    #[test]
    fn statuses_round_trip_as_text() {
        for s in [Status::Agrees, Status::Explained, Status::Pending, Status::Drifted] {
            assert_eq!(Status::parse(s.as_str()), Some(s));
        }
    }
}
