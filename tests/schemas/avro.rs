//! The `.avsc` files in `schemas/` and the code agree: bytes possync encodes decode with an
//! independent Avro implementation (Python fastavro) reading only the schema files.

use std::io::Write;
use std::process::{Command, Stdio};

use possync::events::{new_id, now_micros, PositionEvent, RegistryAction, RegistryEvent, Route, Source};

fn decode_with_fastavro(schema: &str, frames: &[Vec<u8>]) -> anyhow::Result<Vec<serde_json::Value>> {
    let root = env!("CARGO_MANIFEST_DIR");
    let mut child = Command::new("python3")
        .arg(format!("{root}/tests/py/avro_decode.py"))
        .arg(format!("{root}/schemas/{schema}"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let mut stdin = child.stdin.take().expect("piped stdin");
    for f in frames {
        let hex: String = f.iter().map(|b| format!("{b:02x}")).collect();
        writeln!(stdin, "{hex}")?;
    }
    drop(stdin);
    let out = child.wait_with_output()?;
    anyhow::ensure!(out.status.success(), "fastavro decoder failed: {:?}", out.status);
    Ok(String::from_utf8(out.stdout)?
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?)
}

#[test]
fn position_events_decode_with_the_schema_file() -> anyhow::Result<()> {
    let e = PositionEvent {
        event_id: new_id(),
        session_id: new_id(),
        sequence: 42,
        account: "DU0000002".into(),
        con_id: 700_001,
        symbol: "QQQ".into(),
        sec_type: "OPT".into(),
        expiry: Some("20270115".into()),
        strike: Some(512.5),
        right: Some("P".into()),
        multiplier: Some("100".into()),
        exchange: "SMART".into(),
        currency: "USD".into(),
        local_symbol: "QQQ   270115P00512500".into(),
        trading_class: "QQQ".into(),
        position: 0.25,
        avg_cost: 98765.4321,
        daily_pnl: None,
        unrealized_pnl: Some(-12.5),
        realized_pnl: None,
        market_value: Some(1.0e6),
        route: Route::Queued,
        source: Source::Reconcile,
        strategies: vec![],
        ib_time: 1_764_000_000_123_456,
        ingest_time: now_micros(),
    };
    let stock = PositionEvent {
        expiry: None,
        strike: None,
        right: None,
        multiplier: None,
        sec_type: "STK".into(),
        ..e.clone()
    };
    let got = decode_with_fastavro("position_event.avsc", &[e.encode()?, stock.encode()?])?;
    assert_eq!(got.len(), 2);
    let g = &got[0];
    assert_eq!(g["_schema_id"], 1);
    assert_eq!(g["event_id"], e.event_id.as_str());
    assert_eq!(g["sequence"], 42);
    assert_eq!(g["con_id"], 700_001);
    assert_eq!(g["strike"], 512.5);
    assert_eq!(g["right"], "P");
    assert_eq!(g["position"], 0.25);
    assert_eq!(g["avg_cost"], 98765.4321);
    assert_eq!(g["unrealized_pnl"], -12.5);
    assert!(g["daily_pnl"].is_null());
    assert_eq!(g["route"], "QUEUED");
    assert_eq!(g["source"], "RECONCILE");
    assert_eq!(g["local_symbol"], "QQQ   270115P00512500");
    // fastavro renders timestamp-micros as a UTC datetime: the logical type is in the file.
    assert_eq!(g["ib_time"], "2025-11-24 16:00:00.123456+00:00");
    assert!(got[1]["expiry"].is_null() && got[1]["strike"].is_null());
    assert_eq!(got[1]["sec_type"], "STK");
    Ok(())
}

#[test]
fn registry_events_decode_with_the_schema_file() -> anyhow::Result<()> {
    let e = RegistryEvent {
        event_id: new_id(),
        strategy: "iron-condor".into(),
        account: Some("DU0000001".into()),
        con_id: 9,
        action: RegistryAction::Activate,
        priority: -3,
        time: 1_764_000_000_000_000,
        actor: "ops@desk".into(),
    };
    let got = decode_with_fastavro("registry_event.avsc", &[e.encode()?])?;
    assert_eq!(got[0]["_schema_id"], 2);
    assert_eq!(got[0]["strategy"], "iron-condor");
    assert_eq!(got[0]["account"], "DU0000001");
    assert_eq!(got[0]["action"], "ACTIVATE");
    assert_eq!(got[0]["priority"], -3);
    Ok(())
}
