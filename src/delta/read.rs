//! Reading a table back: its files, their rows as the table's schema (partition columns
//! restored, deletion vectors applied), a few columns or all of them.

use std::collections::HashMap;
use std::sync::Arc;

use deltalake::arrow::array::{ArrayRef, Date32Array, RecordBatch};
use deltalake::arrow::datatypes::{DataType, SchemaRef};
use deltalake::kernel::Add;
use deltalake::logstore::object_store::ObjectStoreExt;
use deltalake::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use deltalake::parquet::arrow::ProjectionMask;

use super::dv;
use super::{remove_of, Spec, Table, TableError};
use deltalake::DeltaTableError;

/// A data file of a snapshot.
#[derive(Debug, Clone)]
pub struct FileRef {
    /// The remove action that drops it (dataChange = true; flip it for compaction).
    pub remove: deltalake::kernel::Remove,
    /// Object store path.
    pub path: deltalake::Path,
    /// Size in bytes.
    pub size: i64,
    /// Partition values.
    pub partition_values: HashMap<String, Option<String>>,
    /// Its add action as of the snapshot (with its deletion vector, if any).
    pub add: Add,
}

impl FileRef {
    /// The file's value of the partition column `column`; `None` when it has none.
    pub fn partition_value(&self, column: &str) -> Option<&str> {
        self.partition_values.get(column)?.as_deref()
    }
}

impl<K: Spec> Table<K> {
    /// The files of the current snapshot: (path, size, partition values).
    ///
    /// # Errors
    /// When no snapshot is loaded.
    pub fn files(&self) -> Result<Vec<FileRef>, TableError> {
        let snap = self.delta.snapshot().map_err(self.err())?;
        Ok(snap
            .log_data()
            .iter()
            .map(|f| FileRef {
                remove: f.remove_action(true),
                path: f.object_store_path(),
                size: f.size(),
                partition_values: f.partition_values_map(),
                // The Add (with its deletion vector) is what the upsert core keeps per file.
                #[allow(deprecated)]
                add: f.add_action(),
            })
            .collect())
    }

    /// The [`FileRef`] of an add action of this table.
    pub fn file_ref(&self, add: &Add) -> FileRef {
        FileRef {
            remove: remove_of(add, true),
            path: deltalake::Path::parse(&add.path).unwrap_or_else(|_| deltalake::Path::from(add.path.as_str())),
            size: add.size,
            partition_values: add.partition_values.clone(),
            add: add.clone(),
        }
    }

    /// Every physical row of one file (deleted rows included), as one batch of the table's
    /// schema.
    ///
    /// # Errors
    /// Storage and parquet errors.
    pub async fn read_physical(&self, f: &FileRef) -> Result<RecordBatch, TableError> {
        let batches = self.read_file(f).await?;
        let schema = self.kind.schema();
        deltalake::arrow::compute::concat_batches(&schema, &batches).map_err(|source| TableError::Arrow {
            table: self.kind.name(),
            source,
        })
    }

    /// Every physical row of one file (deleted rows included), `columns` only (no partition
    /// column among them), as one batch of those columns in the file's order.
    ///
    /// # Errors
    /// Storage and parquet errors.
    pub async fn read_physical_columns(&self, f: &FileRef, columns: &[&str]) -> Result<RecordBatch, TableError> {
        let batches = self.read_parquet(f, Some(columns)).await?;
        let arrow = |source| TableError::Arrow {
            table: self.kind.name(),
            source,
        };
        let schema = match batches.first() {
            Some(b) => b.schema(),
            None => {
                let all = self.kind.schema();
                let at = columns.iter().filter_map(|c| all.index_of(c).ok()).collect::<Vec<_>>();
                Arc::new(all.project(&at).map_err(arrow)?)
            }
        };
        deltalake::arrow::compute::concat_batches(&schema, &batches).map_err(arrow)
    }

    /// Reads files back as batches of the table's schema (partition columns restored).
    ///
    /// # Errors
    /// Storage and parquet errors.
    pub async fn read(&self, files: &[FileRef]) -> Result<Vec<RecordBatch>, TableError> {
        let mut out = Vec::new();
        for f in files {
            let batches = self.read_file(f).await?;
            self.live_rows(f, batches, &mut out).await?;
        }
        Ok(out)
    }

    /// The live rows of the whole table, `columns` only (in the file's column order): what a
    /// reader of a few columns needs (`possync status` at every probe), a fraction of the work
    /// of [`Table::read_all`]. A partition column among them means whole rows are read.
    ///
    /// # Errors
    /// Storage and parquet errors.
    pub async fn read_columns(&self, columns: &[&str]) -> Result<Vec<RecordBatch>, TableError> {
        let partitions = self.kind.partition_columns();
        if columns.iter().any(|c| partitions.iter().any(|p| p == c)) {
            return self.read_all().await;
        }
        let mut out = Vec::new();
        for f in self.files()? {
            let batches = self.read_parquet(&f, Some(columns)).await?;
            self.live_rows(&f, batches, &mut out).await?;
        }
        Ok(out)
    }

    /// Appends to `out` the rows of `batches` (the physical rows of `f`, in order) that its
    /// deletion vector does not mark: the rows that are part of the table.
    async fn live_rows(
        &self,
        f: &FileRef,
        batches: Vec<RecordBatch>,
        out: &mut Vec<RecordBatch>,
    ) -> Result<(), TableError> {
        let Some(d) = &f.add.deletion_vector else {
            out.extend(batches);
            return Ok(());
        };
        let deleted = dv::read(self.delta.object_store().as_ref(), d)
            .await
            .map_err(|e| self.err()(DeltaTableError::Generic(e.to_string())))?;
        let mut first = 0u64;
        for b in batches {
            let n = b.num_rows() as u64;
            let keep: Vec<u32> = (0..n)
                .filter(|r| !deleted.contains(first + r))
                .map(|r| r as u32)
                .collect();
            first += n;
            let kept =
                deltalake::arrow::compute::take_record_batch(&b, &deltalake::arrow::array::UInt32Array::from(keep))
                    .map_err(|source| TableError::Arrow {
                        table: self.kind.name(),
                        source,
                    })?;
            out.push(kept);
        }
        Ok(())
    }

    /// The physical rows of one file, in order, in batches (partition columns restored).
    async fn read_file(&self, f: &FileRef) -> Result<Vec<RecordBatch>, TableError> {
        let schema = self.kind.schema();
        let mut out = Vec::new();
        for b in self.read_parquet(f, None).await? {
            out.push(self.restore_partitions(&schema, b, &f.partition_values)?);
        }
        Ok(out)
    }

    /// The physical rows of one file as stored (no partition columns), every column or only
    /// `columns`.
    async fn read_parquet(&self, f: &FileRef, columns: Option<&[&str]>) -> Result<Vec<RecordBatch>, TableError> {
        // Files read back are small (upsert tables, compaction inputs): read whole.
        let bytes = self
            .delta
            .object_store()
            .get(&f.path)
            .await
            .map_err(|e| self.err()(e.into()))?
            .bytes()
            .await
            .map_err(|e| self.err()(e.into()))?;
        let mut builder = ParquetRecordBatchReaderBuilder::try_new(bytes).map_err(|e| self.err()(e.into()))?;
        if let Some(columns) = columns {
            let mask = ProjectionMask::columns(builder.parquet_schema(), columns.iter().copied());
            builder = builder.with_projection(mask);
        }
        let reader = builder.build().map_err(|e| self.err()(e.into()))?;
        reader.collect::<Result<_, _>>().map_err(|source| TableError::Arrow {
            table: self.kind.name(),
            source,
        })
    }

    /// Reads the whole current table.
    ///
    /// # Errors
    /// Storage and parquet errors.
    pub async fn read_all(&self) -> Result<Vec<RecordBatch>, TableError> {
        let files = self.files()?;
        self.read(&files).await
    }

    fn restore_partitions(
        &self,
        schema: &SchemaRef,
        b: RecordBatch,
        values: &HashMap<String, Option<String>>,
    ) -> Result<RecordBatch, TableError> {
        let n = b.num_rows();
        let mut cols: Vec<ArrayRef> = Vec::with_capacity(schema.fields().len());
        for f in schema.fields() {
            if let Ok(i) = b.schema().index_of(f.name()) {
                cols.push(b.column(i).clone());
            } else {
                let v = values.get(f.name()).cloned().flatten();
                if matches!(f.data_type(), DataType::Utf8) {
                    cols.push(Arc::new(deltalake::arrow::array::StringArray::from(vec![v; n])));
                    continue;
                }
                let day = v
                    .as_deref()
                    .and_then(|s| chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d").ok())
                    .map(|d| (d - chrono::NaiveDate::default()).num_days() as i32);
                cols.push(Arc::new(Date32Array::from(vec![day; n])));
            }
        }
        RecordBatch::try_new(schema.clone(), cols).map_err(|source| TableError::Arrow {
            table: self.kind.name(),
            source,
        })
    }
}
