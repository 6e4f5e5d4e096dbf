//! The `executions` table: every `ExecutionEvent` of the executions topic, once per Kafka
//! coordinates (issue 21).
//!
//! Append-only like `position_events`: the event's fields as they are (timestamps as
//! `Timestamp(µs, "UTC")`, `side` and `source` as their symbols), the Kafka coordinates
//! (`kafka_namespace`, `kafka_topic`, `kafka_partition`, `kafka_offset`, `kafka_timestamp`)
//! and `event_date`, the UTC date of `exec_time`, which partitions the table. Its txn actions
//! hold the executions topic's offsets, exactly as `position_events` holds the position topics'
//! ([`super::offsets`]), so a redelivered message never doubles a row. A correction (`.02` of an
//! `.01`) is its own row: the latest `revision` of an `exec_stem` is the execution as it stands.
//!
//! A value that does not decode, or breaks [`validate`]'s rules, is a dead letter like any
//! undecodable position message.

use std::sync::{Arc, OnceLock};

use super::decode::{Decoded, Layout, RecordPlan};
use crate::schema;

/// Decoding layout of `ExecutionEvent` rows: the schema of `executions` (with `event_date` from
/// `exec_time`).
pub fn layout() -> &'static Arc<Layout> {
    static L: OnceLock<Arc<Layout>> = OnceLock::new();
    L.get_or_init(|| {
        let plan = RecordPlan::from_schema(schema::execution_event(), schema::ids().execution_event)
            .expect("schemas/execution_event.avsc is a flat record");
        Arc::new(Layout::new(plan, Some(DATE_FROM)))
    })
}

/// The field `event_date` is derived from.
pub const DATE_FROM: &str = "exec_time";

/// Table properties of `executions` (those of `position_events`).
pub fn configuration() -> Vec<(&'static str, &'static str)> {
    vec![
        ("delta.appendOnly", "true"),
        ("delta.deletedFileRetentionDuration", "interval 1 days"),
    ]
}

/// Field indices the checks use, resolved once.
struct Fields {
    event_id: usize,
    account: usize,
    con_id: usize,
    exec_id: usize,
    numbers: [(&'static str, usize); 2],
    times: [(&'static str, usize); 3],
}

fn fields() -> &'static Fields {
    static F: OnceLock<Fields> = OnceLock::new();
    F.get_or_init(|| {
        let p = &layout().plan;
        let i = |n: &str| p.index(n).unwrap_or_else(|| panic!("execution_event.avsc has {n}"));
        Fields {
            event_id: i("event_id"),
            account: i("account"),
            con_id: i("con_id"),
            exec_id: i("exec_id"),
            numbers: [("shares", i("shares")), ("price", i("price"))],
            times: [
                ("exec_time", i("exec_time")),
                ("ib_time", i("ib_time")),
                ("ingest_time", i("ingest_time")),
            ],
        }
    })
}

/// Contract rules beyond the schema (a breach sends the message to the dead letters): the key
/// fields are set and match the Kafka key (`account:conId`), the exec id is there, shares and
/// price are numbers, and every timestamp lies in the range readers handle (`event_date`
/// comes from `exec_time`).
///
/// # Errors
/// The reason, as it lands in `dead_letters.error`.
pub fn validate(key: Option<&[u8]>, d: &Decoded<'_>) -> Result<(), String> {
    let f = fields();
    let (account, con_id) = (
        d.str(f.account).unwrap_or_default(),
        d.long(f.con_id).unwrap_or_default(),
    );
    if account.is_empty() || con_id <= 0 {
        return Err(format!("bad key fields account={account:?} con_id={con_id}"));
    }
    if d.str(f.event_id).unwrap_or_default().is_empty() {
        return Err("empty event_id".into());
    }
    if d.str(f.exec_id).unwrap_or_default().is_empty() {
        return Err("empty exec_id".into());
    }
    for (n, i) in f.numbers {
        if !d.double(i).unwrap_or(f64::NAN).is_finite() {
            return Err(format!("{n} is not a finite number"));
        }
    }
    for (n, i) in f.times {
        super::checks::check_time(n, d.long(i))?;
    }
    if let Some(key) = key {
        if !super::checks::key_matches(key, account, con_id) {
            return Err(format!(
                "key {:?} is not {account}:{con_id}",
                String::from_utf8_lossy(key)
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::materialize::buffer::{Buffers, Incoming, Role};
    use crate::materialize::decode::EVENT_DATE;
    use deltalake::arrow::array::{Array, AsArray};
    use deltalake::arrow::datatypes::{Date32Type, Float64Type, Int32Type};

    fn push(b: &mut Buffers, offset: i64, key: &[u8], value: Option<&[u8]>) -> Option<String> {
        b.push(&Incoming {
            role: Role::Executions,
            topic: "x.executions",
            partition: 1,
            offset,
            timestamp: Some(5),
            key: Some(key),
            value,
        })
    }

    #[test]
    fn rows_carry_every_field_and_poison_is_a_dead_letter() {
        let mut b = Buffers::new("ns");
        let e = crate::executions::event::tests::sample();
        let mut none = e.clone();
        none.commission = None;
        none.commission_currency = None;
        let key = e.key();
        assert_eq!(push(&mut b, 0, key.as_bytes(), Some(&e.encode().unwrap())), None);
        assert_eq!(push(&mut b, 1, key.as_bytes(), Some(&none.encode().unwrap())), None);
        let mut bad = e.clone();
        bad.exec_time = i64::MAX;
        let rejected: Vec<Option<String>> = vec![
            push(&mut b, 2, key.as_bytes(), Some(b"garbage")),
            push(&mut b, 3, key.as_bytes(), None),
            push(&mut b, 4, b"DU9:1", Some(&e.encode().unwrap())),
            push(&mut b, 5, key.as_bytes(), Some(&bad.encode().unwrap())),
            // A position event on the executions topic: another schema id.
            push(
                &mut b,
                6,
                key.as_bytes(),
                Some(&crate::materialize::decode::tests_support::sample(1).encode().unwrap()),
            ),
        ];
        assert!(rejected.iter().all(Option::is_some), "{rejected:?}");
        assert!(rejected[2].as_deref().unwrap().contains("key"));
        assert!(rejected[3].as_deref().unwrap().contains("exec_time"));
        let frozen = b.freeze().unwrap();
        assert_eq!(frozen.len(), 1);
        let f = &frozen[0];
        assert_eq!(
            (f.first_offset, f.last_offset, f.rows.num_rows(), f.dead.len()),
            (0, 6, 2, 5)
        );
        let rows = &f.rows;
        assert_eq!(rows.schema(), crate::materialize::TableKind::Executions.schema());
        let col = |n: &str| rows.column_by_name(n).unwrap_or_else(|| panic!("{n}")).clone();
        assert_eq!(col("exec_id").as_string::<i32>().value(0), e.exec_id);
        assert_eq!(col("side").as_string::<i32>().value(0), "SLD");
        assert_eq!(col("source").as_string::<i32>().value(0), "REQUESTED");
        assert_eq!(col("revision").as_primitive::<Int32Type>().value(0), 2);
        assert_eq!(col("commission").as_primitive::<Float64Type>().value(0), 1.95);
        assert!(col("commission").is_null(1) && col("commission_currency").is_null(1));
        assert!(col("realized_pnl").is_null(0));
        assert_eq!(col("kafka_topic").as_string::<i32>().value(1), "x.executions");
        assert_eq!(
            col(EVENT_DATE).as_primitive::<Date32Type>().value(0),
            crate::materialize::decode::epoch_day(e.exec_time)
        );
    }
}
