use super::*;
use crate::book::{ContractInfo, Pnl};
use crate::kafka::KafkaConfig;

fn engine(book: Book, active: BTreeSet<PosKey>) -> Engine {
    // The producer connects lazily; nothing here publishes.
    let publisher = Publisher::new(&KafkaConfig::new("127.0.0.1:1"), 4, false).unwrap();
    Engine::new(Registry::new(), Slots::new(2), publisher, book, active)
}

/// Issue 10 #15: PnL figures do not survive the connection whose streams produced them.
#[test]
fn pnl_is_forgotten_with_the_connection() {
    let key = PosKey::new("A", 1);
    let held = Held {
        contract: ContractInfo::default(),
        position: 2.0,
        avg_cost: 10.0,
        pnl: Some(Pnl {
            daily: Some(5.0),
            ..Pnl::default()
        }),
        dirty: false,
    };
    let mut e = engine(Book::from([(key.clone(), held)]), BTreeSet::from([key.clone()]));
    e.disconnected();
    let held = e.book.get(&key).expect("the book outlives the connection");
    assert_eq!(held.pnl, None, "stale PnL kept across a reconnect");
    let event = book::event(&key, held, Route::Active, Source::Stream, vec![], 0);
    assert_eq!(event.daily_pnl, None);
}

/// Issue 20 #14: failures reported while a position list arrives ask for a resync; the
/// sync of that list answers it (its diff republishes the dirty positions), so no second
/// full resync follows.
#[test]
fn a_sync_answers_the_resync_that_failures_asked_for() {
    let key = PosKey::new("A", 1);
    let held = Held {
        contract: ContractInfo::default(),
        position: 2.0,
        avg_cost: 10.0,
        pnl: None,
        dirty: false,
    };
    let mut e = engine(Book::from([(key.clone(), held.clone())]), BTreeSet::new());
    let event = book::event(&key, &held, Route::Queued, Source::Stream, vec![], 0);
    e.on_failures(vec![Failure {
        key: key.clone(),
        sequence: 1,
        error: rdkafka::error::KafkaError::Canceled,
        event,
    }]);
    assert!(e.resync_wanted && e.book[&key].dirty);
    e.absorb_failures();
    assert!(!e.resync_wanted, "the sync under way is the resync");
    assert!(e.book[&key].dirty, "and its diff republishes the position");
}

#[test]
fn refused_streams_are_retried_with_a_doubling_capped_delay() {
    let delays: Vec<u64> = (1..=9).map(|n| refused_retry_delay(n).as_secs()).collect();
    assert_eq!(delays, vec![1, 2, 4, 8, 16, 32, 60, 60, 60]);
    assert_eq!(refused_retry_delay(u32::MAX), REFUSED_RETRY_MAX);
}
