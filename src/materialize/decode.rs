//! Avro binary straight into Arrow builders: the materializer's hot path.
//!
//! A [`RecordPlan`] is derived once from the parsed `.avsc` (flat records: primitives,
//! `["null", T]` unions, enums, arrays of strings, `timestamp-micros`). [`RecordPlan::decode`]
//! walks one Confluent-framed value into a reusable [`Scratch`] (numbers, and byte spans into
//! the payload for strings), so a malformed or invalid value is rejected before anything is
//! appended; [`ArrowRows::append`] then copies the scratch into the column builders. No
//! `apache_avro::Value`, no JSON, no per-field allocation.

use std::sync::Arc;

use apache_avro::Schema;
use deltalake::arrow::datatypes::{DataType, Field, TimeUnit};

use crate::events::{split_confluent, EventError};

mod arrow;
pub use arrow::{epoch_day, kafka_fields, ArrowRows, Layout, EVENT_DATE, KAFKA_COLUMNS};

/// Time zone of every timestamp column (naive timestamps would force Delta reader 3 / writer 7).
pub const UTC: &str = "UTC";

/// Why a Kafka value could not be turned into a row; the text lands in the dead letters.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The Confluent frame is missing or names another schema.
    #[error(transparent)]
    Frame(#[from] EventError),
    /// The Avro payload is cut short or malformed.
    #[error("malformed Avro in field {field:?}: {what}")]
    Malformed { field: &'static str, what: &'static str },
    /// Bytes remained after the record.
    #[error("{0} trailing bytes after the Avro record")]
    Trailing(usize),
    /// The record decoded but breaks a rule of the contract (see `buffer.rs`).
    #[error("invalid event: {0}")]
    Invalid(String),
    /// A message without a value (a tombstone).
    #[error("message has no value")]
    NoValue,
    /// The frame names a known writer schema that cannot be read as this build's record.
    #[error("values of schema id {id} cannot be read as {record}: {reason}")]
    Unreadable { id: u32, record: String, reason: String },
}

/// Why a schema cannot drive the decoder.
#[derive(Debug, thiserror::Error)]
#[error("schema field {field:?} has a type the flat decoder does not support: {what}")]
pub struct UnsupportedSchema {
    field: String,
    what: String,
}

/// What one Avro field decodes as.
#[derive(Debug, Clone, PartialEq)]
pub enum FieldKind {
    Bool,
    Int,
    Long,
    Float,
    Double,
    Str,
    Bytes,
    /// `long` with logical type `timestamp-micros`: Arrow `Timestamp(µs, "UTC")`.
    TimestampMicros,
    /// Avro enum, stored as its symbol (Utf8).
    Enum(Arc<[String]>),
    /// `array<string>`.
    StrArray,
}

impl FieldKind {
    fn arrow_type(&self) -> DataType {
        match self {
            FieldKind::Bool => DataType::Boolean,
            FieldKind::Int => DataType::Int32,
            FieldKind::Long => DataType::Int64,
            FieldKind::Float => DataType::Float32,
            FieldKind::Double => DataType::Float64,
            FieldKind::Str | FieldKind::Enum(_) => DataType::Utf8,
            FieldKind::Bytes => DataType::Binary,
            FieldKind::TimestampMicros => timestamp_type(),
            FieldKind::StrArray => DataType::List(list_item()),
        }
    }
}

/// Arrow type of every timestamp column.
pub fn timestamp_type() -> DataType {
    DataType::Timestamp(TimeUnit::Microsecond, Some(UTC.into()))
}

/// Item field of string lists, named as Delta's Arrow conversion names it (`element`).
pub fn list_item() -> Arc<Field> {
    list_element(DataType::Utf8)
}

/// Item field of a list of `item` values (non-null), named as Delta names it.
pub fn list_element(item: DataType) -> Arc<Field> {
    Arc::new(Field::new("element", item, false))
}

/// One field of a flat record.
#[derive(Debug, Clone)]
pub struct FieldPlan {
    /// Field (and column) name.
    pub name: &'static str,
    /// Value type.
    pub kind: FieldKind,
    /// For `["null", T]` / `[T, "null"]` unions: the branch index of `null`.
    pub null_branch: Option<u8>,
}

/// How to decode one flat Avro record type; derived from the parsed schema.
#[derive(Debug, Clone)]
pub struct RecordPlan {
    /// Record name (for messages).
    pub name: String,
    /// Fields in schema order.
    pub fields: Vec<FieldPlan>,
    /// Confluent schema id of this (the reader's) schema.
    pub schema_id: u32,
    /// How values of other writer schemas map onto this one, by their id (built on first use).
    resolutions: Resolutions,
}

/// Per writer schema id: its resolution, or why it has none.
type Resolutions = Arc<std::sync::RwLock<std::collections::HashMap<u32, Arc<Result<Resolution, String>>>>>;

/// How a value written with another version of the record becomes a row of this one (Avro
/// schema resolution, for the flat records of possync): fields are matched by name; a field
/// the writer lacks is null (the evolution rule adds fields as `["null", T]` with default
/// null); one the reader lacks is skipped; `int` widens to `long`, `float` to `double`,
/// numbers to `double`; enum symbols are matched by name.
#[derive(Debug)]
struct Resolution {
    /// The writer's fields, in its order.
    writer: Vec<FieldPlan>,
    /// Per reader field, where its value comes from.
    from: Vec<From>,
}

#[derive(Debug)]
enum From {
    Writer(usize),
    LongAsDouble(usize),
    /// Writer symbol index → reader symbol index (`None`: a symbol this build lacks).
    Enum(usize, Vec<Option<u32>>),
    Null,
}

impl Resolution {
    fn new(reader: &RecordPlan, writer: RecordPlan) -> Result<Self, String> {
        let mut from = Vec::with_capacity(reader.fields.len());
        for rf in &reader.fields {
            let Some(j) = writer.index(rf.name) else {
                if rf.null_branch.is_none() {
                    return Err(format!(
                        "field {} is missing from the writer schema and is not nullable here",
                        rf.name
                    ));
                }
                from.push(From::Null);
                continue;
            };
            let wf = &writer.fields[j];
            if wf.null_branch.is_some() && rf.null_branch.is_none() {
                return Err(format!("field {} is nullable in the writer schema, not here", rf.name));
            }
            use FieldKind as K;
            from.push(match (&wf.kind, &rf.kind) {
                (a, b) if a == b => From::Writer(j),
                (K::Int, K::Long)
                | (K::Float, K::Double)
                | (K::Long, K::TimestampMicros)
                | (K::TimestampMicros, K::Long) => From::Writer(j),
                (K::Int | K::Long, K::Float | K::Double) => From::LongAsDouble(j),
                (K::Enum(ws), K::Enum(rs)) => From::Enum(
                    j,
                    ws.iter()
                        .map(|w| rs.iter().position(|r| r == w).map(|i| i as u32))
                        .collect(),
                ),
                (w, r) => return Err(format!("field {} is {w:?} in the writer schema, {r:?} here", rf.name)),
            });
        }
        Ok(Self {
            writer: writer.fields,
            from,
        })
    }

    /// Rearranges `scratch` (decoded with the writer's fields) into the reader's fields.
    fn apply(&self, scratch: &mut Scratch, reader: &RecordPlan) -> Result<(), DecodeError> {
        std::mem::swap(&mut scratch.vals, &mut scratch.spare);
        scratch.vals.clear();
        for (i, f) in self.from.iter().enumerate() {
            let v = match f {
                From::Writer(j) => scratch.spare[*j],
                From::Null => Val::Null,
                From::LongAsDouble(j) => match scratch.spare[*j] {
                    Val::Long(x) => Val::Double(x as f64),
                    v => v,
                },
                From::Enum(j, map) => match scratch.spare[*j] {
                    Val::Enum(k) => Val::Enum(map[k as usize].ok_or_else(|| {
                        DecodeError::Invalid(format!(
                            "{}: a symbol of the writer schema this build does not know",
                            reader.fields[i].name
                        ))
                    })?),
                    v => v,
                },
            };
            scratch.vals.push(v);
        }
        Ok(())
    }
}

fn kind_of(field: &str, s: &Schema) -> Result<FieldKind, UnsupportedSchema> {
    Ok(match s {
        Schema::Boolean => FieldKind::Bool,
        Schema::Int => FieldKind::Int,
        Schema::Long => FieldKind::Long,
        Schema::Float => FieldKind::Float,
        Schema::Double => FieldKind::Double,
        Schema::String => FieldKind::Str,
        Schema::Bytes => FieldKind::Bytes,
        Schema::TimestampMicros => FieldKind::TimestampMicros,
        Schema::Enum(e) => FieldKind::Enum(e.symbols.clone().into()),
        Schema::Array(a) if matches!(*a.items, Schema::String) => FieldKind::StrArray,
        other => {
            return Err(UnsupportedSchema {
                field: field.to_string(),
                what: format!("{other:?}"),
            })
        }
    })
}

impl RecordPlan {
    /// Derives the plan from a parsed record schema.
    ///
    /// # Errors
    /// [`UnsupportedSchema`] for nested records, maps, non-string arrays, other unions.
    pub fn from_schema(schema: &Schema, schema_id: u32) -> Result<Self, UnsupportedSchema> {
        let Schema::Record(rec) = schema else {
            return Err(UnsupportedSchema {
                field: "<root>".into(),
                what: "not a record".into(),
            });
        };
        let mut fields = Vec::with_capacity(rec.fields.len());
        for f in &rec.fields {
            // Field names live as long as the process (plans are built once, at startup).
            let name: &'static str = Box::leak(f.name.clone().into_boxed_str());
            let (kind, null_branch) = match &f.schema {
                Schema::Union(u) => {
                    let v = u.variants();
                    match v {
                        [Schema::Null, t] => (kind_of(name, t)?, Some(0)),
                        [t, Schema::Null] => (kind_of(name, t)?, Some(1)),
                        _ => {
                            return Err(UnsupportedSchema {
                                field: f.name.clone(),
                                what: "union other than [null, T]".into(),
                            })
                        }
                    }
                }
                s => (kind_of(name, s)?, None),
            };
            fields.push(FieldPlan {
                name,
                kind,
                null_branch,
            });
        }
        Ok(Self {
            name: rec.name.name.clone(),
            fields,
            schema_id,
            resolutions: Resolutions::default(),
        })
    }

    /// The resolution of writer schema `id` onto this plan (built once per id).
    fn resolution(&self, id: u32) -> Result<Arc<Result<Resolution, String>>, DecodeError> {
        if let Some(r) = self.resolutions.read().unwrap_or_else(|e| e.into_inner()).get(&id) {
            return Ok(r.clone());
        }
        let writer = crate::schema::writer(id)
            .filter(|w| w.record.name() == self.name)
            .ok_or(EventError::UnknownSchemaId {
                found: id,
                expected: self.schema_id,
            })?;
        let r = RecordPlan::from_schema(&writer.schema, id)
            .map_err(|e| e.to_string())
            .and_then(|w| Resolution::new(self, w));
        let r = Arc::new(r);
        self.resolutions
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, r.clone());
        Ok(r)
    }

    /// Index of a field by name.
    pub fn index(&self, name: &str) -> Option<usize> {
        self.fields.iter().position(|f| f.name == name)
    }

    /// Arrow fields of the record, in schema order.
    pub fn arrow_fields(&self) -> Vec<Field> {
        self.fields
            .iter()
            .map(|f| Field::new(f.name, f.kind.arrow_type(), f.null_branch.is_some()))
            .collect()
    }

    /// Decodes one Confluent-framed value into `scratch` (cleared first).
    ///
    /// # Errors
    /// [`DecodeError`] when the frame, the payload or a UTF-8 string is bad.
    ///
    /// A value of another writer schema ([`crate::schema::writer`]: an earlier version, or one
    /// a schema registry gave) is decoded by that schema and resolved to this one.
    pub fn decode<'a>(&self, value: &'a [u8], scratch: &mut Scratch) -> Result<&'a [u8], DecodeError> {
        let (id, payload) = split_confluent(value)?;
        if id == self.schema_id {
            decode_fields(&self.fields, payload, scratch)?;
            return Ok(payload);
        }
        let resolution = self.resolution(id)?;
        let r = resolution.as_ref().as_ref().map_err(|reason| DecodeError::Unreadable {
            id,
            record: self.name.clone(),
            reason: reason.clone(),
        })?;
        decode_fields(&r.writer, payload, scratch)?;
        r.apply(scratch, self)?;
        Ok(payload)
    }
}

/// Decodes one Avro record of `fields` from `payload` into `scratch` (cleared first).
fn decode_fields(fields: &[FieldPlan], payload: &[u8], scratch: &mut Scratch) -> Result<(), DecodeError> {
    scratch.vals.clear();
    scratch.items.clear();
    let mut c = Cursor { buf: payload, pos: 0 };
    for f in fields {
        let field = f.name;
        if let Some(nb) = f.null_branch {
            let branch = c.long(field)?;
            if branch == i64::from(nb) {
                scratch.vals.push(Val::Null);
                continue;
            }
            if branch != i64::from(1 - nb) {
                return Err(DecodeError::Malformed {
                    field,
                    what: "union branch out of range",
                });
            }
        }
        let v = match &f.kind {
            FieldKind::Bool => match c.byte(field)? {
                0 => Val::Bool(false),
                1 => Val::Bool(true),
                _ => {
                    return Err(DecodeError::Malformed {
                        field,
                        what: "boolean is not 0 or 1",
                    })
                }
            },
            FieldKind::Int => {
                let v = c.long(field)?;
                if i32::try_from(v).is_err() {
                    return Err(DecodeError::Malformed {
                        field,
                        what: "int out of range",
                    });
                }
                Val::Long(v)
            }
            FieldKind::Long | FieldKind::TimestampMicros => Val::Long(c.long(field)?),
            FieldKind::Float => Val::Double(f64::from(f32::from_le_bytes(c.array::<4>(field)?))),
            FieldKind::Double => Val::Double(f64::from_le_bytes(c.array::<8>(field)?)),
            FieldKind::Str => {
                let (s, e) = c.span(field)?;
                utf8(&payload[s..e], field)?;
                Val::Span(s as u32, e as u32)
            }
            FieldKind::Bytes => {
                let (s, e) = c.span(field)?;
                Val::Span(s as u32, e as u32)
            }
            FieldKind::Enum(symbols) => {
                let i = c.long(field)?;
                if i < 0 || i as usize >= symbols.len() {
                    return Err(DecodeError::Malformed {
                        field,
                        what: "enum index out of range",
                    });
                }
                Val::Enum(i as u32)
            }
            FieldKind::StrArray => {
                let first = scratch.items.len() as u32;
                loop {
                    let mut n = c.long(field)?;
                    if n == 0 {
                        break;
                    }
                    if n < 0 {
                        n = n.checked_neg().ok_or(DecodeError::Malformed {
                            field,
                            what: "bad block count",
                        })?;
                        c.long(field)?; // block size in bytes, not needed
                    }
                    if n as usize > payload.len() {
                        return Err(DecodeError::Malformed {
                            field,
                            what: "array block longer than the payload",
                        });
                    }
                    for _ in 0..n {
                        let (s, e) = c.span(field)?;
                        utf8(&payload[s..e], field)?;
                        scratch.items.push((s as u32, e as u32));
                    }
                }
                Val::List(first, scratch.items.len() as u32 - first)
            }
        };
        scratch.vals.push(v);
    }
    if c.pos != payload.len() {
        return Err(DecodeError::Trailing(payload.len() - c.pos));
    }
    Ok(())
}

fn utf8<'a>(b: &'a [u8], field: &'static str) -> Result<&'a str, DecodeError> {
    std::str::from_utf8(b).map_err(|_| DecodeError::Malformed {
        field,
        what: "string is not UTF-8",
    })
}

/// A cursor over an Avro payload.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl Cursor<'_> {
    #[inline]
    fn byte(&mut self, field: &'static str) -> Result<u8, DecodeError> {
        let b = *self.buf.get(self.pos).ok_or(DecodeError::Malformed {
            field,
            what: "payload ends early",
        })?;
        self.pos += 1;
        Ok(b)
    }

    /// Zig-zag varint (Avro `int` and `long`).
    #[inline]
    fn long(&mut self, field: &'static str) -> Result<i64, DecodeError> {
        let mut v: u64 = 0;
        let mut shift = 0;
        loop {
            let b = self.byte(field)?;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                break;
            }
            shift += 7;
            if shift > 63 {
                return Err(DecodeError::Malformed {
                    field,
                    what: "varint longer than 10 bytes",
                });
            }
        }
        Ok((v >> 1) as i64 ^ -((v & 1) as i64))
    }

    #[inline]
    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], DecodeError> {
        let end = self.pos + N;
        let s = self.buf.get(self.pos..end).ok_or(DecodeError::Malformed {
            field,
            what: "payload ends early",
        })?;
        self.pos = end;
        Ok(s.try_into().expect("slice of length N"))
    }

    /// A length-prefixed byte span: (start, end) into the payload.
    #[inline]
    fn span(&mut self, field: &'static str) -> Result<(usize, usize), DecodeError> {
        let n = self.long(field)?;
        if n < 0 || (n as usize) > self.buf.len() - self.pos {
            return Err(DecodeError::Malformed {
                field,
                what: "length out of range",
            });
        }
        let s = self.pos;
        self.pos += n as usize;
        Ok((s, self.pos))
    }
}

/// One decoded field value; strings and bytes are spans into the payload.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Val {
    Null,
    Bool(bool),
    Long(i64),
    Double(f64),
    Span(u32, u32),
    Enum(u32),
    /// (first item index, item count) into [`Scratch::items`].
    List(u32, u32),
}

/// Reusable decode output: one [`Val`] per field (no allocation per message once warm).
#[derive(Debug, Default)]
pub struct Scratch {
    vals: Vec<Val>,
    items: Vec<(u32, u32)>,
    /// The writer-order values while a resolution rearranges them.
    spare: Vec<Val>,
}

/// A decoded record: the scratch plus the payload its spans point into.
#[derive(Clone, Copy)]
pub struct Decoded<'a> {
    /// The plan it was decoded with.
    pub plan: &'a RecordPlan,
    /// The Avro payload (without the Confluent header).
    pub payload: &'a [u8],
    /// The decoded values.
    pub scratch: &'a Scratch,
}

impl<'a> Decoded<'a> {
    /// The value of field `i`.
    pub fn val(&self, i: usize) -> Val {
        self.scratch.vals[i]
    }

    /// Field `i` as text (strings and enum symbols); `None` when null.
    pub fn str(&self, i: usize) -> Option<&'a str> {
        match self.scratch.vals[i] {
            Val::Span(s, e) => std::str::from_utf8(&self.payload[s as usize..e as usize]).ok(),
            Val::Enum(k) => match &self.plan.fields[i].kind {
                FieldKind::Enum(sym) => Some(sym[k as usize].as_str()),
                _ => None,
            },
            _ => None,
        }
    }

    /// Field `i` as a long; `None` when null.
    pub fn long(&self, i: usize) -> Option<i64> {
        match self.scratch.vals[i] {
            Val::Long(v) => Some(v),
            _ => None,
        }
    }

    /// Field `i` as a double; `None` when null.
    pub fn double(&self, i: usize) -> Option<f64> {
        match self.scratch.vals[i] {
            Val::Double(v) => Some(v),
            _ => None,
        }
    }

    /// Items of a string-array field.
    pub fn items(&self, i: usize) -> impl Iterator<Item = &'a str> + 'a {
        let (first, n) = match self.scratch.vals[i] {
            Val::List(f, n) => (f as usize, n as usize),
            _ => (0, 0),
        };
        let payload = self.payload;
        self.scratch.items[first..first + n]
            .iter()
            .map(move |&(s, e)| std::str::from_utf8(&payload[s as usize..e as usize]).unwrap_or_default())
    }
}

#[cfg(test)]
pub(crate) mod tests_support {
    use crate::events::{PositionEvent, Route, Source};

    pub(crate) fn sample(i: i64) -> PositionEvent {
        PositionEvent {
            event_id: format!("e{i}"),
            session_id: "s".into(),
            sequence: i,
            account: "DU1".into(),
            con_id: 1000 + i,
            symbol: "SPY".into(),
            sec_type: "OPT".into(),
            expiry: if i % 2 == 0 { Some("20261218".into()) } else { None },
            strike: Some(600.5),
            right: Some("C".into()),
            multiplier: Some("100".into()),
            exchange: "SMART".into(),
            currency: "USD".into(),
            local_symbol: "SPY 261218C600".into(),
            trading_class: "SPY".into(),
            position: -2.5 * i as f64,
            avg_cost: 123.25,
            daily_pnl: None,
            unrealized_pnl: Some(-1.0),
            realized_pnl: None,
            market_value: Some(7.0),
            route: Route::Queued,
            source: Source::Poll,
            strategies: (0..i % 3).map(|k| format!("st{k}")).collect(),
            ib_time: 1_764_111_111_000_000 + i,
            ingest_time: 1_764_111_111_000_100 + i,
        }
    }
}

#[cfg(test)]
mod tests;
