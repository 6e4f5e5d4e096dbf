//! Several writers on the same tables.
//!
//! - Two materializers in one consumer group, with rebalances mid-stream (one joins, then the
//!   first one is aborted without flushing): the tables stay exact.
//! - Two writers that committed nothing yet load the tables at the same version, then both
//!   commit overlapping offset ranges: the second conflicts on each append table by
//!   construction (the first wrote txn actions of its partitions), reloads, drops what the
//!   first wrote, catches the upsert tables up before staging, and the tables stay exact with
//!   no orphan file.
//! - The same two writers on disjoint partitions (what a group's members are): no conflict at
//!   all; the appends land after the other's through delta-rs' conflict checker.
//! - Of two members, one runs the scheduled maintenance (the holder of partition 0 of the
//!   active topic); when it leaves, the other takes the turn over.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::materialize_support::*;
use possync::materialize::{self, buffer::Buffers, buffer::Incoming, buffer::Role, flush::Pipeline, TableKind};
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_members_with_rebalances_stay_exact() -> anyhow::Result<()> {
    let env = Env::start(4)?;
    let producer = env.producer()?;
    let topics = env.kafka.topics.clone();

    // A steady stream for about 9 seconds.
    let stream = tokio::spawn(async move {
        let mut gen = Gen::new(11, &topics, 150);
        let mut produced = Vec::new();
        for round in 0..90 {
            let mut out: Vec<_> = (0..150).map(|_| gen.position()).collect();
            if round % 10 == 0 {
                out.push(gen.registry());
                out.push(gen.poison(round / 10));
            }
            produced.extend(produce(&producer, out).await?);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        anyhow::Ok(produced)
    });

    let stop_a = CancellationToken::new();
    let a = tokio::spawn(materialize::run(env.config("duo"), env.kafka.clone(), stop_a.clone()));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let stop_b = CancellationToken::new();
    let b = tokio::spawn(materialize::run(env.config("duo"), env.kafka.clone(), stop_b.clone()));
    // Let both share the partitions for a while, then A dies without flushing.
    tokio::time::sleep(Duration::from_secs(5)).await;
    a.abort();
    let _ = a.await;

    let produced = stream.await??;
    let ns = env.namespace().await?;
    materialize::wait_caught_up(&env.base, &ns, &env.kafka, Duration::from_secs(90)).await?;
    stop_b.cancel();
    b.await??;
    drop(stop_a);
    check_exact(&env.base, &produced).await?;
    // Whether these two raced on a commit is luck; the conflict path is proven
    // deterministically by `two_writers_on_one_table_version_conflict_and_stay_exact`.
    Ok(())
}

/// The offset namespace of the two hand-driven writers below.
const TWO_WRITERS: &str = "two-writers";

/// Buffers the messages of `msgs` whose offset lies in `range` and freezes them for a commit.
fn frozen(
    env: &Env,
    msgs: &[(Produced, Outgoing)],
    keep: impl Fn(&Produced) -> bool,
) -> anyhow::Result<Vec<materialize::buffer::FrozenPartition>> {
    let t = &env.kafka.topics;
    let mut b = Buffers::new(TWO_WRITERS);
    for (p, o) in msgs.iter().filter(|(p, _)| keep(p)) {
        let role = if p.topic == t.active {
            Role::Active
        } else if p.topic == t.queued {
            Role::Queued
        } else {
            Role::Registry
        };
        b.push(&Incoming {
            role,
            topic: &p.topic,
            partition: p.partition,
            offset: p.offset,
            timestamp: Some(1_767_225_600_000_000),
            key: o.key.as_deref(),
            value: o.value.as_deref(),
        });
    }
    Ok(b.freeze()?)
}

/// `n` messages (positions, every 40th a registry event and a poison message) with the
/// coordinates they would get, `partitions` per topic, partitioned by key like a key hash; and
/// each partition's next offset.
#[allow(clippy::type_complexity)]
fn messages(
    t: &possync::kafka::Topics,
    seed: u64,
    n: usize,
    partitions: u32,
) -> (Vec<(Produced, Outgoing)>, BTreeMap<(String, i32), i64>) {
    let mut gen = Gen::new(seed, t, 60);
    let mut next: BTreeMap<(String, i32), i64> = BTreeMap::new();
    let mut msgs = Vec::new();
    for i in 0..n {
        let o = match i % 40 {
            0 => gen.registry(),
            17 => gen.poison(i / 40),
            _ => gen.position(),
        };
        let key = o.key.clone().unwrap_or_default();
        let partition = (key.iter().map(|b| *b as u32).sum::<u32>() % partitions) as i32;
        let slot = next.entry((o.topic.clone(), partition)).or_default();
        let offset = *slot;
        *slot += 1;
        let p = Produced {
            topic: o.topic.clone(),
            partition,
            offset,
            payload: o.payload.clone(),
        };
        msgs.push((p, o));
    }
    (msgs, next)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_writers_on_one_table_version_conflict_and_stay_exact() -> anyhow::Result<()> {
    let env = Env::start(3)?;
    let t = env.kafka.topics.clone();
    let (msgs, next) = messages(&t, 23, 900, 3);
    let end = |p: &Produced| next[&(p.topic.clone(), p.partition)];

    // Both writers load every table at the same version before either commits.
    let ns = TWO_WRITERS.to_string();
    let (base, state_dir) = (&env.base, std::env::temp_dir());
    let open = || Pipeline::open(base, ns.clone(), t.clone(), 10, env.producer_config(), &state_dir);
    let mut first = open().await?;
    let mut second = open().await?;
    // The first holds the first 60% of each partition, the second the last 70%: they overlap.
    let first_part = frozen(&env, &msgs, |p| p.offset * 10 < end(p) * 6)?;
    let second_part = frozen(&env, &msgs, |p| p.offset * 10 >= end(p) * 3)?;
    first.commit(&first_part).await?;
    anyhow::ensure!(first.conflicts() == 0, "the first writer met a conflict");
    second.commit(&second_part).await?;
    // Each of the six tables moved under the second writer's snapshot. The three append
    // tables (dead letters, events, registry events) hold txn actions of the same partitions
    // from the first writer: delta-rs refuses the append, the second reloads and drops what
    // the first wrote: one conflict each, by construction. The three tables it stages a plan
    // on (current, queue, registry) are caught up before staging: no conflict.
    anyhow::ensure!(
        second.conflicts() == 3,
        "the second writer met {} conflicts, want one per append table (3)",
        second.conflicts()
    );
    let produced: Vec<Produced> = msgs.into_iter().map(|(p, _)| p).collect();
    check_exact(&env.base, &produced).await?;
    no_orphans(&env.base).await
}

/// No table holds a file its log does not name (a lost attempt deletes what it wrote).
async fn no_orphans(base: &str) -> anyhow::Result<()> {
    for kind in TableKind::ALL {
        let t = materialize::tables::Table::open(base, kind).await?;
        let orphans = possync::delta::maintain::orphans(&t).await?;
        anyhow::ensure!(orphans.is_empty(), "{}: orphan files {orphans:?}", kind.name());
    }
    Ok(())
}

/// Members of a group own disjoint partitions. Two writers that loaded every table at the
/// same version commit one after the other, on disjoint partitions: the appends land after
/// the other's (delta-rs checks that no txn of theirs moved), the upsert tables are caught up
/// before staging, so the second meets no conflict, and the tables are exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writers_on_disjoint_partitions_meet_no_conflict() -> anyhow::Result<()> {
    let env = Env::start(2)?;
    let t = env.kafka.topics.clone();
    let (msgs, _) = messages(&t, 29, 600, 2);
    let ns = TWO_WRITERS.to_string();
    let (base, state_dir) = (&env.base, std::env::temp_dir());
    let open = || Pipeline::open(base, ns.clone(), t.clone(), 10, env.producer_config(), &state_dir);
    let mut first = open().await?;
    let mut second = open().await?;
    first.commit(&frozen(&env, &msgs, |p| p.partition == 0)?).await?;
    let rebased = materialize::tables::rebased();
    second.commit(&frozen(&env, &msgs, |p| p.partition == 1)?).await?;
    anyhow::ensure!(
        first.conflicts() + second.conflicts() == 0,
        "conflicts: first {}, second {}",
        first.conflicts(),
        second.conflicts()
    );
    // The second's appends (dead letters, events, registry events) each landed after the
    // first's commit without a reload.
    anyhow::ensure!(
        materialize::tables::rebased() >= rebased + 3,
        "the second writer's appends were not rebased"
    );
    let produced: Vec<Produced> = msgs.into_iter().map(|(p, _)| p).collect();
    check_exact(&env.base, &produced).await?;
    no_orphans(&env.base).await
}

/// One member of a group runs the scheduled maintenance: the holder of partition 0 of the
/// active topic. When it leaves, the rebalance hands the turn to the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_member_maintains_and_another_takes_over() -> anyhow::Result<()> {
    use tokio::sync::watch;
    let env = Env::start(2)?;
    let cfg = || materialize::MaterializeConfig {
        maintain_every: Some(Duration::from_millis(500)),
        ..env.config("maint")
    };
    let start = |cfg| {
        let (tx, rx) = watch::channel(materialize::Progress::default());
        let stop = CancellationToken::new();
        let task = tokio::spawn(materialize::run_with_progress(cfg, env.kafka.clone(), stop.clone(), tx));
        (task, stop, rx)
    };
    let (a, stop_a, pa) = start(cfg());
    let (b, stop_b, pb) = start(cfg());
    // Four input topics of two partitions each.
    let total = 8;
    wait_for(
        "both members assigned, one holding the turn",
        Duration::from_secs(60),
        || {
            let (x, y) = (*pa.borrow(), *pb.borrow());
            async move {
                Ok(
                    x.assigned > 0
                        && y.assigned > 0
                        && x.assigned + y.assigned == total
                        && x.maintainer != y.maintainer,
                )
            }
        },
    )
    .await?;
    let (holder, other) = if pa.borrow().maintainer { (&pa, &pb) } else { (&pb, &pa) };
    let passes_of_holder = |at_least: u64| {
        wait_for("passes by the turn holder", Duration::from_secs(60), move || {
            let n = holder.borrow().maintained;
            async move { Ok(n >= at_least) }
        })
    };
    // Two passes first: a pass the other member began before the assignment settled (when it
    // may have held partition 0 alone) has ended by then. From here on it must run none.
    // (A `watch::Ref` must not live across an await: it blocks the member's progress updates.)
    let n = holder.borrow().maintained;
    passes_of_holder(n + 2).await?;
    let others = other.borrow().maintained;
    let n = holder.borrow().maintained;
    passes_of_holder(n + 2).await?;
    anyhow::ensure!(
        other.borrow().maintained == others && !other.borrow().maintainer,
        "the member without the turn maintained too: {:?}",
        *other.borrow()
    );
    // The holder leaves; the other one gets partition 0 and runs the next passes.
    let holder_is_a = std::ptr::eq(holder, &pa);
    let (stop_holder, task_holder, stop_other, task_other) = if holder_is_a {
        (stop_a, a, stop_b, b)
    } else {
        (stop_b, b, stop_a, a)
    };
    stop_holder.cancel();
    task_holder.await??;
    wait_for(
        "the other member took the turn over and maintained",
        Duration::from_secs(60),
        || {
            let p = *other.borrow();
            async move { Ok(p.maintainer && p.assigned == total && p.maintained >= others + 2) }
        },
    )
    .await?;
    stop_other.cancel();
    task_other.await??;
    Ok(())
}
