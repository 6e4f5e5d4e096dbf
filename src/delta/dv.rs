//! Delta deletion vectors: reading and writing the bitmaps of deleted rows.
//!
//! The upsert tables mark superseded rows deleted instead of rewriting their files (see
//! [`super::upsert::core`]). A deletion vector is a 64-bit roaring bitmap of row indexes in one
//! data file, stored per the Delta protocol ("Deletion Vector Format"): a file
//! `deletion_vector_<uuid>.bin` at the table root (storage type `u`, the uuid z85-encoded in
//! the log) holding a version byte `1`, then per vector: its size (u32, big-endian), the
//! portable-roaring magic (u32 little-endian), the serialized `RoaringTreemap`, and a CRC-32 of
//! magic + bitmap (big-endian). One file per commit holds every vector the commit writes.
//! DuckDB's delta extension, Python `deltalake` and Spark apply them when they read.

use deltalake::kernel::{DeletionVectorDescriptor, StorageType};
use deltalake::logstore::object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use deltalake::Path;
use roaring::RoaringTreemap;

/// The portable `RoaringBitmapArray` magic of the Delta format.
const MAGIC: u32 = 1_681_511_377;

/// Errors of deletion-vector I/O.
#[derive(Debug, thiserror::Error)]
pub enum DvError {
    /// The storage failed.
    #[error("deletion vector {path}: {source}")]
    Storage {
        path: String,
        #[source]
        source: deltalake::logstore::object_store::Error,
    },
    /// The bytes are not a deletion vector this reader understands.
    #[error(
        "deletion vector {path} is corrupt or of an unsupported kind: {why}; rebuild the table with `possync rebuild`"
    )]
    Corrupt { path: String, why: String },
}

/// CRC-32 (ISO-HDLC, as zlib) of magic + bitmap.
fn crc32(bytes: &[u8]) -> u32 {
    const CRC: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISO_HDLC);
    CRC.checksum(bytes)
}

fn corrupt(path: &str, why: impl Into<String>) -> DvError {
    DvError::Corrupt {
        path: path.to_string(),
        why: why.into(),
    }
}

/// Path (relative to the table root) of the file of a `u` descriptor.
fn relative_path(d: &DeletionVectorDescriptor) -> Result<Path, DvError> {
    let s = &d.path_or_inline_dv;
    if s.len() < 20 {
        return Err(corrupt(s, "path shorter than a z85 uuid"));
    }
    let (prefix, encoded) = s.split_at(s.len() - 20);
    let bytes = z85::decode(encoded).map_err(|e| corrupt(s, format!("bad z85 uuid: {e:?}")))?;
    let uuid = uuid::Uuid::from_slice(&bytes).map_err(|e| corrupt(s, e.to_string()))?;
    let name = format!("deletion_vector_{uuid}.bin");
    Ok(if prefix.is_empty() {
        Path::from(name)
    } else {
        Path::from(format!("{prefix}/{name}"))
    })
}

/// The file (relative to the table root) a descriptor points to: `None` for inline vectors,
/// absolute paths and descriptors that do not decode.
pub fn file_path(d: &DeletionVectorDescriptor) -> Option<Path> {
    match d.storage_type {
        StorageType::UuidRelativePath => relative_path(d).ok(),
        _ => None,
    }
}

/// Reads the bitmap a descriptor points to (`store` is rooted at the table).
///
/// # Errors
/// Storage errors; [`DvError::Corrupt`] for bad bytes or an absolute-path vector.
pub async fn read(store: &dyn ObjectStore, d: &DeletionVectorDescriptor) -> Result<RoaringTreemap, DvError> {
    let bitmap = match d.storage_type {
        StorageType::Inline => {
            let bytes = z85::decode(&d.path_or_inline_dv)
                .map_err(|e| corrupt(&d.path_or_inline_dv, format!("bad z85: {e:?}")))?;
            if bytes.len() < 4 || u32::from_le_bytes(bytes[..4].try_into().expect("4 bytes")) != MAGIC {
                return Err(corrupt("inline", "bad magic"));
            }
            RoaringTreemap::deserialize_from(&bytes[4..]).map_err(|e| corrupt("inline", e.to_string()))?
        }
        StorageType::AbsolutePath => return Err(corrupt(&d.path_or_inline_dv, "absolute-path vectors are not read")),
        StorageType::UuidRelativePath => {
            let path = relative_path(d)?;
            let shown = path.to_string();
            // A vector holds at least its 4-byte magic (issue 20 #5: a smaller size panicked).
            if d.size_in_bytes < 4 || d.offset.is_some_and(|o| o < 0) {
                return Err(corrupt(
                    &shown,
                    format!("size {} at offset {:?} in the log", d.size_in_bytes, d.offset),
                ));
            }
            let start = d.offset.unwrap_or(1) as u64;
            let size = d.size_in_bytes as u64;
            let bytes = store
                .get_range(&path, start..start + 4 + size + 4)
                .await
                .map_err(|source| DvError::Storage {
                    path: shown.clone(),
                    source,
                })?;
            if bytes.len() as u64 != 8 + size {
                return Err(corrupt(&shown, "short read"));
            }
            let stored = u32::from_be_bytes(bytes[..4].try_into().expect("4 bytes")) as u64;
            if stored != size {
                return Err(corrupt(&shown, format!("size {stored} in file, {size} in the log")));
            }
            let body = &bytes[4..4 + size as usize];
            if u32::from_le_bytes(body[..4].try_into().expect("4 bytes")) != MAGIC {
                return Err(corrupt(&shown, "bad magic"));
            }
            let crc = u32::from_be_bytes(bytes[4 + size as usize..].try_into().expect("4 bytes"));
            if crc != crc32(body) {
                return Err(corrupt(&shown, "CRC mismatch"));
            }
            RoaringTreemap::deserialize_from(&body[4..]).map_err(|e| corrupt(&shown, e.to_string()))?
        }
    };
    if bitmap.len() != d.cardinality as u64 {
        return Err(corrupt(
            &d.path_or_inline_dv,
            format!("{} rows, the log says {}", bitmap.len(), d.cardinality),
        ));
    }
    Ok(bitmap)
}

/// Writes `bitmaps` into one new deletion-vector file at the table root and returns their
/// descriptors, in order.
///
/// # Errors
/// Storage errors.
pub async fn write(
    store: &dyn ObjectStore,
    bitmaps: &[&RoaringTreemap],
) -> Result<Vec<DeletionVectorDescriptor>, DvError> {
    if bitmaps.is_empty() {
        return Ok(vec![]);
    }
    let uuid = uuid::Uuid::new_v4();
    let encoded = z85::encode(uuid.as_bytes());
    let mut buf: Vec<u8> = vec![1];
    let mut out = Vec::with_capacity(bitmaps.len());
    for b in bitmaps {
        let offset = buf.len() as i32;
        let mut body = MAGIC.to_le_bytes().to_vec();
        b.serialize_into(&mut body).expect("writing to a Vec cannot fail");
        buf.extend_from_slice(&(body.len() as u32).to_be_bytes());
        buf.extend_from_slice(&body);
        buf.extend_from_slice(&crc32(&body).to_be_bytes());
        out.push(DeletionVectorDescriptor {
            storage_type: StorageType::UuidRelativePath,
            path_or_inline_dv: encoded.clone(),
            offset: Some(offset),
            size_in_bytes: body.len() as i32,
            cardinality: b.len() as i64,
        });
    }
    let path = Path::from(format!("deletion_vector_{uuid}.bin"));
    store
        .put(&path, PutPayload::from(buf))
        .await
        .map_err(|source| DvError::Storage {
            path: path.to_string(),
            source,
        })?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use deltalake::logstore::object_store::memory::InMemory;

    #[tokio::test]
    async fn vectors_round_trip_through_one_file() {
        let store = InMemory::new();
        let a: RoaringTreemap = [0u64, 5, 7, 1 << 33].into_iter().collect();
        let b: RoaringTreemap = (100u64..5000).collect();
        let ds = write(&store, &[&a, &b]).await.unwrap();
        assert_eq!(ds.len(), 2);
        assert_eq!(ds[0].path_or_inline_dv, ds[1].path_or_inline_dv, "one file per commit");
        assert_eq!((ds[0].offset, ds[0].cardinality), (Some(1), 4));
        assert_eq!(read(&store, &ds[0]).await.unwrap(), a);
        assert_eq!(read(&store, &ds[1]).await.unwrap(), b);
        let mut bad = ds[1].clone();
        bad.cardinality += 1;
        assert!(matches!(read(&store, &bad).await, Err(DvError::Corrupt { .. })));
        // Issue 20 #5: a descriptor too small for the magic, or with a negative size or offset,
        // is a clear error, never a panic.
        for (size, offset) in [(0, Some(1)), (3, Some(1)), (-8, Some(1)), (8, Some(-5))] {
            let mut bad = ds[0].clone();
            bad.size_in_bytes = size;
            bad.offset = offset;
            assert!(
                matches!(read(&store, &bad).await, Err(DvError::Corrupt { .. })),
                "size {size} offset {offset:?}"
            );
        }
    }
}
