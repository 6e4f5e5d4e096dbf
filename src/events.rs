//! The events possync publishes, their Kafka keys, and their Avro / Confluent wire encoding.
//!
//! Values are Avro binary in the Confluent wire format: magic byte `0`, a 4-byte big-endian
//! schema id ([`crate::schema::ids`]: fixed, or a schema registry's), then the Avro payload. Ordinary Kafka tooling decodes them
//! with the `.avsc` files in `schemas/`.

use apache_avro::{from_avro_datum, from_value, to_avro_datum, to_value, Schema};
use serde::{Deserialize, Serialize};

use crate::schema;

/// Errors while encoding or decoding an event.
#[derive(Debug, thiserror::Error)]
pub enum EventError {
    /// The payload is not in the Confluent wire format (magic byte 0 + 4-byte schema id).
    #[error("not a Confluent-framed Avro value ({0}); was it produced by possync or a Confluent serializer?")]
    NotConfluent(&'static str),
    /// The frame names a schema id this build does not know.
    #[error(
        "unknown schema id {found} (expected {expected}); is the producer newer than this consumer, or do they \
         disagree on --schema-registry-url?"
    )]
    UnknownSchemaId { found: u32, expected: u32 },
    /// The Avro payload does not match the schema.
    #[error("Avro payload does not match schema {schema}: {source}")]
    Avro {
        schema: &'static str,
        #[source]
        source: Box<apache_avro::Error>,
    },
    /// Bytes remained after the Avro record ended.
    #[error("{0} trailing bytes after the Avro record")]
    Trailing(usize),
}

/// Which path a position takes through possync.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Route {
    /// A running strategy holds it: streamed in real time, may use a streaming slot.
    Active,
    /// Nobody holds it actively: queued and refreshed by snapshot polls, no slot.
    Queued,
}

/// What produced a [`PositionEvent`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Source {
    /// A live update of the positions subscription.
    Stream,
    /// Part of the initial position list after a (re)connect.
    Snapshot,
    /// A queue-worker refresh (snapshot poll, no slot).
    Poll,
    /// A real-time PnL tick of an active position.
    Pnl,
    /// Synthetic close of a position that vanished while disconnected.
    Reconcile,
}

/// One change of one position; the value of `positions.active` and `positions.queued`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PositionEvent {
    pub event_id: String,
    pub session_id: String,
    pub sequence: i64,
    pub account: String,
    pub con_id: i64,
    pub symbol: String,
    pub sec_type: String,
    pub expiry: Option<String>,
    pub strike: Option<f64>,
    pub right: Option<String>,
    pub multiplier: Option<String>,
    pub exchange: String,
    pub currency: String,
    pub local_symbol: String,
    pub trading_class: String,
    pub position: f64,
    pub avg_cost: f64,
    pub daily_pnl: Option<f64>,
    pub unrealized_pnl: Option<f64>,
    pub realized_pnl: Option<f64>,
    pub market_value: Option<f64>,
    pub route: Route,
    pub source: Source,
    pub strategies: Vec<String>,
    /// Microseconds since the Unix epoch (UTC).
    pub ib_time: i64,
    /// Microseconds since the Unix epoch (UTC).
    pub ingest_time: i64,
}

impl PositionEvent {
    /// Kafka key: `account:conId` (same key, same partition, per-contract order).
    pub fn key(&self) -> String {
        position_key(&self.account, self.con_id)
    }

    /// Avro + Confluent framing.
    pub fn encode(&self) -> Result<Vec<u8>, EventError> {
        encode(
            self,
            schema::position_event(),
            schema::ids().position_event,
            "PositionEvent",
        )
    }

    /// Inverse of [`PositionEvent::encode`].
    pub fn decode(bytes: &[u8]) -> Result<Self, EventError> {
        decode(
            bytes,
            schema::position_event(),
            schema::ids().position_event,
            "PositionEvent",
        )
    }
}

/// What a registry event does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum RegistryAction {
    Activate,
    Deactivate,
}

/// A strategy starts or stops holding a contract; the value of the compacted registry topic.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RegistryEvent {
    pub event_id: String,
    pub strategy: String,
    /// `None` = every account.
    pub account: Option<String>,
    pub con_id: i64,
    pub action: RegistryAction,
    pub priority: i32,
    /// Microseconds since the Unix epoch (UTC).
    pub time: i64,
    pub actor: String,
}

impl RegistryEvent {
    /// Kafka key: `strategy:account:conId`, account `*` when it covers every account.
    pub fn key(&self) -> String {
        format!(
            "{}:{}:{}",
            self.strategy,
            self.account.as_deref().unwrap_or("*"),
            self.con_id
        )
    }

    /// Avro + Confluent framing.
    pub fn encode(&self) -> Result<Vec<u8>, EventError> {
        encode(
            self,
            schema::registry_event(),
            schema::ids().registry_event,
            "RegistryEvent",
        )
    }

    /// Inverse of [`RegistryEvent::encode`].
    pub fn decode(bytes: &[u8]) -> Result<Self, EventError> {
        decode(
            bytes,
            schema::registry_event(),
            schema::ids().registry_event,
            "RegistryEvent",
        )
    }
}

/// Kafka key of a position: `account:conId`.
pub fn position_key(account: &str, con_id: i64) -> String {
    format!("{account}:{con_id}")
}

/// Microseconds since the Unix epoch, now (UTC), never less than an earlier call's result plus
/// one in this process: when the wall clock steps back (NTP, a VM resumed), the times this
/// process stamps (`ingest_time`, a poll's request time) keep increasing, so its own events
/// keep their newest-wins order.
pub fn now_micros() -> i64 {
    let skew = CLOCK_SKEW.load(std::sync::atomic::Ordering::Relaxed);
    monotonic_after(chrono::Utc::now().timestamp_micros().saturating_add(skew), &LAST_STAMP)
}

/// Shifts this process's clock ([`now_micros`]) by `micros`: for fault tests of a host whose
/// clock is off (`possync queue-worker --clock-skew`).
pub fn set_clock_skew(micros: i64) {
    CLOCK_SKEW.store(micros, std::sync::atomic::Ordering::Relaxed);
}

static CLOCK_SKEW: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(0);

/// A signed duration: `2s`, `+2s`, `-1500ms` (humantime units), in microseconds.
///
/// # Errors
/// The humantime parse error, as text.
pub fn parse_signed_micros(s: &str) -> Result<i64, String> {
    let s = s.trim();
    let (sign, rest) = match s.strip_prefix('-') {
        Some(r) => (-1, r),
        None => (1, s.strip_prefix('+').unwrap_or(s)),
    };
    let d = humantime::parse_duration(rest).map_err(|e| e.to_string())?;
    Ok(sign * i64::try_from(d.as_micros()).map_err(|e| e.to_string())?)
}

static LAST_STAMP: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(i64::MIN);

/// `wall`, or one more than the last value handed out by `last` when `wall` is not later.
fn monotonic_after(wall: i64, last: &std::sync::atomic::AtomicI64) -> i64 {
    use std::sync::atomic::Ordering::AcqRel;
    let mut prev = last.load(std::sync::atomic::Ordering::Acquire);
    loop {
        let next = wall.max(prev.saturating_add(1));
        match last.compare_exchange_weak(prev, next, AcqRel, std::sync::atomic::Ordering::Acquire) {
            Ok(_) => return next,
            Err(p) => prev = p,
        }
    }
}

/// A fresh UUID v4 as text.
pub fn new_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// Splits a Confluent frame into (schema id, Avro payload).
pub fn split_confluent(bytes: &[u8]) -> Result<(u32, &[u8]), EventError> {
    match bytes {
        [] => Err(EventError::NotConfluent("empty value")),
        [m, ..] if *m != 0 => Err(EventError::NotConfluent("magic byte is not 0")),
        [_, a, b, c, d, rest @ ..] => Ok((u32::from_be_bytes([*a, *b, *c, *d]), rest)),
        _ => Err(EventError::NotConfluent("shorter than the 5-byte header")),
    }
}

fn avro_err(schema: &'static str) -> impl FnOnce(apache_avro::Error) -> EventError {
    move |e| EventError::Avro {
        schema,
        source: Box::new(e),
    }
}

pub(crate) fn encode<T: Serialize>(v: &T, schema: &Schema, id: u32, name: &'static str) -> Result<Vec<u8>, EventError> {
    let value = to_value(v)
        .map_err(avro_err(name))?
        .resolve(schema)
        .map_err(avro_err(name))?;
    let payload = to_avro_datum(schema, value).map_err(avro_err(name))?;
    let mut out = Vec::with_capacity(payload.len() + 5);
    out.push(0);
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(&payload);
    Ok(out)
}

pub(crate) fn decode<T: for<'de> Deserialize<'de>>(
    bytes: &[u8],
    schema: &Schema,
    id: u32,
    name: &'static str,
) -> Result<T, EventError> {
    let (found, mut payload) = split_confluent(bytes)?;
    let value = if found == id {
        from_avro_datum(schema, &mut payload, None).map_err(avro_err(name))?
    } else {
        // Another version of the record: decoded by its writer schema, resolved to ours.
        let writer = schema::writer(found)
            .filter(|w| w.record.name() == name)
            .ok_or(EventError::UnknownSchemaId { found, expected: id })?;
        from_avro_datum(&writer.schema, &mut payload, Some(schema)).map_err(avro_err(name))?
    };
    if !payload.is_empty() {
        return Err(EventError::Trailing(payload.len()));
    }
    from_value(&value).map_err(avro_err(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample() -> PositionEvent {
        PositionEvent {
            event_id: new_id(),
            session_id: new_id(),
            sequence: 7,
            account: "DU0000001".into(),
            con_id: 123456,
            symbol: "SPY".into(),
            sec_type: "OPT".into(),
            expiry: Some("20261218".into()),
            strike: Some(600.0),
            right: Some("C".into()),
            multiplier: Some("100".into()),
            exchange: "SMART".into(),
            currency: "USD".into(),
            local_symbol: "SPY   261218C00600000".into(),
            trading_class: "SPY".into(),
            position: -3.5,
            avg_cost: 1234.56,
            daily_pnl: Some(1.5),
            unrealized_pnl: None,
            realized_pnl: Some(-2.0),
            market_value: None,
            route: Route::Active,
            source: Source::Pnl,
            strategies: vec!["wheel".into(), "hedge".into()],
            ib_time: 1_764_111_111_000_001,
            ingest_time: 1_764_111_111_000_002,
        }
    }

    #[test]
    fn position_event_round_trips() {
        let e = sample();
        let bytes = e.encode().unwrap();
        assert_eq!(&bytes[..5], &[0, 0, 0, 0, 1]);
        assert_eq!(PositionEvent::decode(&bytes).unwrap(), e);
    }

    #[test]
    fn registry_event_round_trips() {
        let e = RegistryEvent {
            event_id: new_id(),
            strategy: "wheel".into(),
            account: None,
            con_id: 42,
            action: RegistryAction::Deactivate,
            priority: 5,
            time: now_micros(),
            actor: "test".into(),
        };
        assert_eq!(e.key(), "wheel:*:42");
        let bytes = e.encode().unwrap();
        assert_eq!(RegistryEvent::decode(&bytes).unwrap(), e);
        assert!(matches!(
            PositionEvent::decode(&bytes),
            Err(EventError::UnknownSchemaId { found: 2, expected: 1 })
        ));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(matches!(PositionEvent::decode(b""), Err(EventError::NotConfluent(_))));
        assert!(matches!(
            PositionEvent::decode(b"{\"json\":1}"),
            Err(EventError::NotConfluent(_))
        ));
        assert!(PositionEvent::decode(&[0, 0, 0, 0, 1, 0xff, 0xff]).is_err());
        let mut ok = sample().encode().unwrap();
        ok.push(0);
        assert!(matches!(PositionEvent::decode(&ok), Err(EventError::Trailing(1))));
    }

    #[test]
    fn stamps_keep_increasing_when_the_wall_clock_steps_back() {
        let last = std::sync::atomic::AtomicI64::new(i64::MIN);
        assert_eq!(super::monotonic_after(1_000, &last), 1_000);
        assert_eq!(super::monotonic_after(2_000, &last), 2_000);
        // The clock stepped back by 1.5 ms: still later than everything handed out.
        assert_eq!(super::monotonic_after(500, &last), 2_001);
        assert_eq!(super::monotonic_after(501, &last), 2_002);
        assert_eq!(super::monotonic_after(5_000, &last), 5_000);
        let a = super::now_micros();
        assert!(super::now_micros() > a);
    }
}
