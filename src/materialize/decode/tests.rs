use super::tests_support::sample;
use super::*;
use crate::events::{RegistryAction, RegistryEvent};
use crate::schema;
use deltalake::arrow::array::{Array, AsArray, RecordBatch};
use deltalake::arrow::datatypes::{Float64Type, Int64Type};

fn position_layout() -> Arc<Layout> {
    let plan = RecordPlan::from_schema(schema::position_event(), schema::POSITION_EVENT_SCHEMA_ID).unwrap();
    Arc::new(Layout::new(plan, Some("ingest_time")))
}

#[test]
fn decodes_what_apache_avro_encodes() {
    let layout = position_layout();
    let mut rows = ArrowRows::new(layout.clone(), 4);
    let mut scratch = Scratch::default();
    let events: Vec<_> = (0..5).map(sample).collect();
    for (k, e) in events.iter().enumerate() {
        let bytes = e.encode().unwrap();
        let payload = layout.plan.decode(&bytes, &mut scratch).unwrap();
        let d = Decoded {
            plan: &layout.plan,
            payload,
            scratch: &scratch,
        };
        rows.append(&d, 100 + k as i64, Some(5));
    }
    let b = rows.finish("ns", "t", 3).unwrap();
    assert_eq!(b.num_rows(), 5);
    let col = |n: &str| b.column(b.schema().index_of(n).unwrap()).clone();
    assert_eq!(col("con_id").as_primitive::<Int64Type>().value(4), 1004);
    assert_eq!(col("position").as_primitive::<Float64Type>().value(2), -5.0);
    assert!(col("expiry").is_null(1));
    assert_eq!(col("expiry").as_string::<i32>().value(0), "20261218");
    assert_eq!(col("route").as_string::<i32>().value(0), "QUEUED");
    assert_eq!(col("source").as_string::<i32>().value(0), "POLL");
    let st = col("strategies");
    let st = st.as_list::<i32>();
    assert_eq!(st.value(2).len(), 2);
    assert_eq!(st.value(2).as_string::<i32>().value(1), "st1");
    assert_eq!(col("kafka_offset").as_primitive::<Int64Type>().value(4), 104);
    assert_eq!(col("kafka_topic").as_string::<i32>().value(4), "t");
    assert_eq!(
        col(EVENT_DATE)
            .as_primitive::<deltalake::arrow::datatypes::Date32Type>()
            .value(0),
        20417
    );
}

#[test]
fn rejects_garbage_without_appending() {
    let layout = position_layout();
    let mut scratch = Scratch::default();
    let good = sample(1).encode().unwrap();
    assert!(layout.plan.decode(b"", &mut scratch).is_err());
    assert!(layout.plan.decode(b"{\"a\":1}", &mut scratch).is_err());
    for cut in [6, 20, good.len() - 1] {
        assert!(layout.plan.decode(&good[..cut], &mut scratch).is_err(), "cut at {cut}");
    }
    let mut long = good.clone();
    long.push(0);
    assert!(matches!(
        layout.plan.decode(&long, &mut scratch),
        Err(DecodeError::Trailing(1))
    ));
    let reg = RegistryEvent {
        event_id: "r".into(),
        strategy: "s".into(),
        account: None,
        con_id: 1,
        action: RegistryAction::Activate,
        priority: 1,
        time: 1,
        actor: "a".into(),
    };
    assert!(matches!(
        layout.plan.decode(&reg.encode().unwrap(), &mut scratch),
        Err(DecodeError::Frame(_))
    ));
    // random bytes with a valid header never panic
    let mut x: u64 = 0x9e3779b97f4a7c15;
    for _ in 0..2000 {
        let mut v = vec![0u8, 0, 0, 0, 1];
        for _ in 0..(x % 300) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            v.push(x as u8);
        }
        let _ = layout.plan.decode(&v, &mut scratch);
    }
}

#[test]
fn registry_plan_handles_nullable_account() {
    let plan = RecordPlan::from_schema(schema::registry_event(), schema::REGISTRY_EVENT_SCHEMA_ID).unwrap();
    let mut scratch = Scratch::default();
    let e = RegistryEvent {
        event_id: "r".into(),
        strategy: "wheel".into(),
        account: None,
        con_id: 9,
        action: RegistryAction::Deactivate,
        priority: -3,
        time: 77,
        actor: "me".into(),
    };
    let bytes = e.encode().unwrap();
    let payload = plan.decode(&bytes, &mut scratch).unwrap();
    let d = Decoded {
        plan: &plan,
        payload,
        scratch: &scratch,
    };
    assert_eq!(d.str(plan.index("account").unwrap()), None);
    assert_eq!(d.str(plan.index("action").unwrap()), Some("DEACTIVATE"));
    assert_eq!(d.long(plan.index("priority").unwrap()), Some(-3));
}

/// Version "2" of `PositionEvent` as a later release might publish it: a field added with
/// default null, an enum with its symbols in another order and one more symbol.
fn v2_text() -> String {
    let v2 = schema::POSITION_EVENT_AVSC
        .replacen(
            r#"{"name": "con_id", "type": "long", "doc": "IB contract id"},"#,
            r#"{"name": "con_id", "type": "long", "doc": "IB contract id"},
    {"name": "venue", "type": ["null", "string"], "default": null},"#,
            1,
        )
        .replacen(
            r#"["STREAM", "SNAPSHOT", "POLL", "PNL", "RECONCILE"]"#,
            r#"["POLL", "STREAM", "SNAPSHOT", "PNL", "RECONCILE", "EXPIRY"]"#,
            1,
        );
    assert!(
        v2.contains("venue") && v2.contains("EXPIRY"),
        "the schema text changed: fix the test"
    );
    v2
}

/// `e` encoded with the v2 schema (venue set) and framed with `id`.
fn encode_v2(e: &crate::events::PositionEvent, v2: &Schema, id: u32, venue: Option<&str>) -> Vec<u8> {
    use apache_avro::types::Value;
    let Value::Record(mut fields) = apache_avro::to_value(e).unwrap() else {
        unreachable!()
    };
    let at = fields.iter().position(|(n, _)| n == "con_id").unwrap() + 1;
    let venue = match venue {
        Some(v) => Value::Union(1, Box::new(Value::String(v.into()))),
        None => Value::Union(0, Box::new(Value::Null)),
    };
    fields.insert(at, ("venue".into(), venue));
    let value = Value::Record(fields).resolve(v2).unwrap();
    let mut out = vec![0];
    out.extend_from_slice(&id.to_be_bytes());
    out.extend(apache_avro::to_avro_datum(v2, value).unwrap());
    out
}

fn rows_of(layout: &Arc<Layout>, values: &[Vec<u8>]) -> Result<RecordBatch, DecodeError> {
    let mut rows = ArrowRows::new(layout.clone(), 4);
    let mut scratch = Scratch::default();
    for (k, v) in values.iter().enumerate() {
        let payload = layout.plan.decode(v, &mut scratch)?;
        let d = Decoded {
            plan: &layout.plan,
            payload,
            scratch: &scratch,
        };
        rows.append(&d, k as i64, Some(5));
    }
    Ok(rows.finish("ns", "t", 0).unwrap())
}

#[test]
fn values_of_a_newer_writer_schema_read_as_this_build_would_write_them() {
    let v2 = Schema::parse_str(&v2_text()).unwrap();
    crate::schema::learn(9001, &v2_text()).unwrap();
    let layout = position_layout();
    let events: Vec<_> = (0..6).map(sample).collect();
    let mut events_v1 = Vec::new();
    let mut events_v2 = Vec::new();
    for (k, e) in events.iter().enumerate() {
        events_v1.push(e.encode().unwrap());
        events_v2.push(encode_v2(e, &v2, 9001, (k % 2 == 0).then_some("XNYS")));
    }
    let a = rows_of(&layout, &events_v1).unwrap();
    let b = rows_of(&layout, &events_v2).unwrap();
    assert_eq!(a, b, "a v2 value must give the row its v1 twin gives");
    // apache_avro's resolution (events.rs) agrees.
    for (e, v) in events.iter().zip(&events_v2) {
        assert_eq!(&crate::events::PositionEvent::decode(v).unwrap(), e);
    }
    // A symbol this build lacks is an invalid event, not a wrong row.
    let mut expiry = encode_v2(&events[0], &v2, 9001, None);
    let source = apache_avro::to_avro_datum(&v2, {
        let apache_avro::types::Value::Record(f) = apache_avro::from_avro_datum(&v2, &mut &expiry[5..], None).unwrap()
        else {
            unreachable!()
        };
        let f = f
            .into_iter()
            .map(|(n, v)| {
                if n == "source" {
                    (n, apache_avro::types::Value::Enum(5, "EXPIRY".into()))
                } else {
                    (n, v)
                }
            })
            .collect();
        apache_avro::types::Value::Record(f)
    })
    .unwrap();
    expiry.truncate(5);
    expiry.extend(source);
    let err = rows_of(&layout, &[expiry]).unwrap_err();
    assert!(err.to_string().contains("source"), "{err}");
}

#[test]
fn values_of_an_older_writer_schema_read_with_the_added_field_null() {
    let v2 = Schema::parse_str(&v2_text()).unwrap();
    // This build as the newer reader: v2 is its schema (id 9002), v1 values carry id 1.
    let reader = Arc::new(Layout::new(
        RecordPlan::from_schema(&v2, 9002).unwrap(),
        Some("ingest_time"),
    ));
    let events: Vec<_> = (0..4).map(sample).collect();
    let old: Vec<_> = events.iter().map(|e| e.encode().unwrap()).collect();
    let new: Vec<_> = events.iter().map(|e| encode_v2(e, &v2, 9002, None)).collect();
    let a = rows_of(&reader, &old).unwrap();
    assert_eq!(a, rows_of(&reader, &new).unwrap());
    assert_eq!(a.column_by_name("venue").unwrap().null_count(), 4);
    assert_eq!(a.column_by_name("source").unwrap().as_string::<i32>().value(0), "POLL");
}

#[test]
fn an_incompatible_or_unknown_writer_schema_is_a_clear_dead_letter() {
    let retyped = schema::POSITION_EVENT_AVSC.replacen(
        r#""name": "con_id", "type": "long""#,
        r#""name": "con_id", "type": "string""#,
        1,
    );
    crate::schema::learn(9003, &retyped).unwrap();
    let layout = position_layout();
    let mut v = sample(1).encode().unwrap();
    v[1..5].copy_from_slice(&9003u32.to_be_bytes());
    let err = rows_of(&layout, &[v.clone()]).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, DecodeError::Unreadable { id: 9003, .. }), "{msg}");
    assert!(msg.contains("con_id") && msg.contains("PositionEvent"), "{msg}");
    v[1..5].copy_from_slice(&9004u32.to_be_bytes());
    let err = rows_of(&layout, &[v]).unwrap_err();
    assert!(
        matches!(err, DecodeError::Frame(EventError::UnknownSchemaId { found: 9004, .. })),
        "{err}"
    );
}
