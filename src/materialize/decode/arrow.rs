//! The Arrow side of decoding: a table's row [`Layout`] (its record plan, Arrow schema, Kafka
//! coordinate columns and `event_date`) and [`ArrowRows`], the column builders a decoded value's
//! scratch is copied into.

use std::sync::Arc;

use deltalake::arrow::array::{
    ArrayRef, BinaryBuilder, BooleanBuilder, Date32Builder, Float32Builder, Float64Builder, Int32Array, Int32Builder,
    Int64Builder, ListBuilder, RecordBatch, StringArray, StringBuilder, TimestampMicrosecondBuilder,
};
use deltalake::arrow::datatypes::{DataType, Field, Schema as ArrowSchema, SchemaRef};
use deltalake::arrow::error::ArrowError;

use super::{list_item, timestamp_type, Decoded, FieldKind, RecordPlan, Val, UTC};

/// A column builder for one [`FieldKind`].
enum Col {
    Bool(BooleanBuilder),
    I32(Int32Builder),
    I64(Int64Builder),
    F32(Float32Builder),
    F64(Float64Builder),
    Str(StringBuilder),
    Bin(BinaryBuilder),
    Ts(TimestampMicrosecondBuilder),
    List(ListBuilder<StringBuilder>),
}

impl Col {
    fn new(kind: &FieldKind, cap: usize) -> Self {
        match kind {
            FieldKind::Bool => Col::Bool(BooleanBuilder::with_capacity(cap)),
            FieldKind::Int => Col::I32(Int32Builder::with_capacity(cap)),
            FieldKind::Long => Col::I64(Int64Builder::with_capacity(cap)),
            FieldKind::Float => Col::F32(Float32Builder::with_capacity(cap)),
            FieldKind::Double => Col::F64(Float64Builder::with_capacity(cap)),
            FieldKind::Str | FieldKind::Enum(_) => Col::Str(StringBuilder::with_capacity(cap, cap * 16)),
            FieldKind::Bytes => Col::Bin(BinaryBuilder::with_capacity(cap, cap * 16)),
            FieldKind::TimestampMicros => Col::Ts(TimestampMicrosecondBuilder::with_capacity(cap).with_timezone(UTC)),
            FieldKind::StrArray => {
                Col::List(ListBuilder::with_capacity(StringBuilder::new(), cap).with_field(list_item()))
            }
        }
    }

    fn finish(&mut self) -> ArrayRef {
        match self {
            Col::Bool(b) => Arc::new(b.finish()),
            Col::I32(b) => Arc::new(b.finish()),
            Col::I64(b) => Arc::new(b.finish()),
            Col::F32(b) => Arc::new(b.finish()),
            Col::F64(b) => Arc::new(b.finish()),
            Col::Str(b) => Arc::new(b.finish()),
            Col::Bin(b) => Arc::new(b.finish()),
            Col::Ts(b) => Arc::new(b.finish()),
            Col::List(b) => Arc::new(b.finish()),
        }
    }
}

/// The table layout rows are built for: the record's fields, then Kafka coordinates, then
/// (optionally) an `event_date` partition column derived from a timestamp field.
#[derive(Debug)]
pub struct Layout {
    /// The record plan.
    pub plan: RecordPlan,
    /// Field index of the timestamp the `event_date` column is derived from, if any.
    pub date_from: Option<usize>,
    /// The Arrow schema of the rows.
    pub schema: SchemaRef,
}

/// Names of the Kafka coordinate columns that follow the record's fields. The offset namespace
/// (the Kafka cluster id, see `offsets`) comes first: (namespace, topic, partition, offset) is
/// unique, while (topic, partition, offset) repeats across clusters, e.g. two `possync run`s.
pub const KAFKA_COLUMNS: [&str; 5] = [
    "kafka_namespace",
    "kafka_topic",
    "kafka_partition",
    "kafka_offset",
    "kafka_timestamp",
];
/// Name of the date partition column.
pub const EVENT_DATE: &str = "event_date";

impl Layout {
    /// Record fields + Kafka coordinates (+ `event_date` from field `date_from`).
    pub fn new(plan: RecordPlan, date_from: Option<&str>) -> Self {
        let date_from = date_from.map(|n| plan.index(n).expect("date source field exists in the schema"));
        let mut fields = plan.arrow_fields();
        fields.extend(kafka_fields());
        if date_from.is_some() {
            fields.push(Field::new(EVENT_DATE, DataType::Date32, false));
        }
        let schema = Arc::new(ArrowSchema::new(fields));
        Self {
            plan,
            date_from,
            schema,
        }
    }
}

/// The Kafka coordinate fields (offset namespace, topic, partition, offset, message timestamp).
pub fn kafka_fields() -> [Field; 5] {
    [
        Field::new(KAFKA_COLUMNS[0], DataType::Utf8, false),
        Field::new(KAFKA_COLUMNS[1], DataType::Utf8, false),
        Field::new(KAFKA_COLUMNS[2], DataType::Int32, false),
        Field::new(KAFKA_COLUMNS[3], DataType::Int64, false),
        Field::new(KAFKA_COLUMNS[4], timestamp_type(), true),
    ]
}

/// Days since the Unix epoch of a UTC microsecond timestamp.
pub fn epoch_day(micros: i64) -> i32 {
    micros.div_euclid(86_400_000_000) as i32
}

/// Arrow builders for the rows of one Kafka partition.
pub struct ArrowRows {
    layout: Arc<Layout>,
    cols: Vec<Col>,
    offsets: Int64Builder,
    timestamps: TimestampMicrosecondBuilder,
    dates: Date32Builder,
    len: usize,
}

impl ArrowRows {
    /// Empty builders with room for `cap` rows.
    pub fn new(layout: Arc<Layout>, cap: usize) -> Self {
        let cols = layout.plan.fields.iter().map(|f| Col::new(&f.kind, cap)).collect();
        Self {
            layout,
            cols,
            offsets: Int64Builder::with_capacity(cap),
            timestamps: TimestampMicrosecondBuilder::with_capacity(cap).with_timezone(UTC),
            dates: Date32Builder::with_capacity(cap),
            len: 0,
        }
    }

    /// Rows appended so far.
    pub fn len(&self) -> usize {
        self.len
    }

    /// No rows yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends a decoded record with its Kafka offset and message timestamp (µs).
    pub fn append(&mut self, d: &Decoded<'_>, offset: i64, timestamp: Option<i64>) {
        for (i, col) in self.cols.iter_mut().enumerate() {
            let v = d.val(i);
            match (col, v) {
                (Col::Bool(b), Val::Bool(x)) => b.append_value(x),
                (Col::I32(b), Val::Long(x)) => b.append_value(x as i32),
                (Col::I64(b), Val::Long(x)) => b.append_value(x),
                (Col::Ts(b), Val::Long(x)) => b.append_value(x),
                (Col::F32(b), Val::Double(x)) => b.append_value(x as f32),
                (Col::F64(b), Val::Double(x)) => b.append_value(x),
                (Col::Str(b), Val::Span(..) | Val::Enum(_)) => b.append_value(d.str(i).unwrap_or_default()),
                (Col::Bin(b), Val::Span(s, e)) => b.append_value(&d.payload[s as usize..e as usize]),
                (Col::List(b), Val::List(..)) => {
                    for item in d.items(i) {
                        b.values().append_value(item);
                    }
                    b.append(true);
                }
                (Col::Bool(b), _) => b.append_null(),
                (Col::I32(b), _) => b.append_null(),
                (Col::I64(b), _) => b.append_null(),
                (Col::Ts(b), _) => b.append_null(),
                (Col::F32(b), _) => b.append_null(),
                (Col::F64(b), _) => b.append_null(),
                (Col::Str(b), _) => b.append_null(),
                (Col::Bin(b), _) => b.append_null(),
                (Col::List(b), _) => b.append(false),
            }
        }
        self.offsets.append_value(offset);
        self.timestamps.append_option(timestamp);
        if let Some(i) = self.layout.date_from {
            self.dates.append_value(epoch_day(d.long(i).unwrap_or_default()));
        }
        self.len += 1;
    }

    /// Finishes the rows of `topic`/`partition` of the offset namespace `namespace` into a
    /// batch (the builders are left empty).
    ///
    /// # Errors
    /// Only if the layout and builders disagree (a bug).
    pub fn finish(&mut self, namespace: &str, topic: &str, partition: i32) -> Result<RecordBatch, ArrowError> {
        let n = self.len;
        let mut arrays: Vec<ArrayRef> = self.cols.iter_mut().map(Col::finish).collect();
        arrays.push(Arc::new(StringArray::from_iter_values(std::iter::repeat_n(
            namespace, n,
        ))));
        arrays.push(Arc::new(StringArray::from_iter_values(std::iter::repeat_n(topic, n))));
        arrays.push(Arc::new(Int32Array::from(vec![partition; n])));
        arrays.push(Arc::new(self.offsets.finish()));
        arrays.push(Arc::new(self.timestamps.finish()));
        if self.layout.date_from.is_some() {
            arrays.push(Arc::new(self.dates.finish()));
        }
        self.len = 0;
        RecordBatch::try_new(self.layout.schema.clone(), arrays)
    }
}
