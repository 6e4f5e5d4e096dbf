//! A local spill file: per-key values kept on disk instead of in memory, read back only for the
//! keys a flush changes.
//!
//! The file is append-only: a new version of a value is a new record, the old one becomes
//! garbage. A [`SpillRef`] (8 bytes: offset and length) is all the memory a value costs. When
//! more than half the file is garbage, [`Spill::rewrite`] copies the live records into a fresh
//! file in one sequential pass, so the file stays under twice its live size and each record is
//! copied O(1) times on average: the cost follows the changes.
//!
//! Reads of many records are sorted by offset and coalesced into ranges ([`GAP`] apart at most),
//! so a flush that touches most keys reads the file sequentially in large pieces, and one that
//! touches a few keys reads just those records.
//!
//! The file is a cache, never a source of truth: it is unlinked as soon as it is created (the
//! open descriptor keeps it), so it disappears with the process, crash included, and a restart
//! rebuilds it from the Delta table. It is read through `pread` (not mapped), so its pages are
//! the kernel's page cache, which the kernel may drop under pressure, and not the process's
//! resident memory.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Records closer than this are read with one `pread`.
pub const GAP: u64 = 64 << 10;

/// One `pread` reads at most this much (bounds the buffer).
pub const MAX_RANGE: u64 = 8 << 20;

/// A rewrite is not considered below this file size.
const MIN_REWRITE: u64 = 16 << 20;

const LEN_BITS: u32 = 24;

/// Where a record is: its offset (40 bits) and length (24 bits) in one word.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpillRef(u64);

impl SpillRef {
    fn new(offset: u64, len: usize) -> Result<SpillRef, SpillError> {
        if len >= 1 << LEN_BITS {
            return Err(SpillError::TooLarge(len));
        }
        if offset >= 1 << (64 - LEN_BITS) {
            return Err(SpillError::TooLarge(offset as usize));
        }
        Ok(SpillRef((offset << LEN_BITS) | len as u64))
    }

    /// Byte offset of the record.
    pub fn offset(self) -> u64 {
        self.0 >> LEN_BITS
    }

    /// Length of the record in bytes.
    pub fn len(self) -> usize {
        (self.0 & ((1 << LEN_BITS) - 1)) as usize
    }

    /// An empty record (never written by [`Spill::append`]).
    pub fn is_empty(self) -> bool {
        self.len() == 0
    }

    /// No record: a value not read yet (see [`super::Hot::unloaded`]).
    pub const NONE: SpillRef = SpillRef(0);
}

/// Spill file failures.
#[derive(Debug, thiserror::Error)]
pub enum SpillError {
    /// The file cannot be created, written or read.
    #[error("spill file in {dir}: {source}; check --state-dir (free space, permissions)")]
    Io {
        dir: String,
        #[source]
        source: std::io::Error,
    },
    /// A record does not decode: the file was changed under us, or a bug.
    #[error("spill file in {dir}: record at byte {offset} does not decode; restart the materializer (the file is rebuilt from the table)")]
    Corrupt { dir: String, offset: u64 },
    /// A record or the file outgrew what a [`SpillRef`] addresses.
    #[error("spill record or file too large ({0} bytes)")]
    TooLarge(usize),
    /// A value was asked for before it was read from the table: a bug.
    #[error("the value of account {account} conId {con_id} was used before it was read from the table (a bug); restart the materializer")]
    NotLoaded { account: String, con_id: i64 },
}

/// A value stored in a spill file.
pub trait Codec: Sized {
    /// Appends the value's bytes to `out`.
    fn encode(&self, out: &mut Vec<u8>);
    /// The value of `b` (exactly what `encode` wrote); `None` when it does not decode.
    fn decode(b: &[u8]) -> Option<Self>;
}

/// Reads a record's fields front to back; every read is `None` past the end.
pub struct Reader<'a>(pub &'a [u8]);

impl<'a> Reader<'a> {
    /// The next `N` bytes.
    pub fn take<const N: usize>(&mut self) -> Option<[u8; N]> {
        let (head, rest) = self.0.split_first_chunk::<N>()?;
        self.0 = rest;
        Some(*head)
    }

    /// The next `n` bytes.
    pub fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        let head = self.0.get(..n)?;
        self.0 = &self.0[n..];
        Some(head)
    }

    /// A little-endian i64.
    pub fn i64(&mut self) -> Option<i64> {
        self.take::<8>().map(i64::from_le_bytes)
    }

    /// A flag byte: 0 or 1 (anything else is not a flag).
    pub fn flag(&mut self) -> Option<bool> {
        match self.take::<1>()? {
            [0] => Some(false),
            [1] => Some(true),
            _ => None,
        }
    }

    /// A little-endian u32.
    pub fn u32(&mut self) -> Option<u32> {
        self.take::<4>().map(u32::from_le_bytes)
    }

    /// A little-endian f64.
    pub fn f64(&mut self) -> Option<f64> {
        self.take::<8>().map(f64::from_le_bytes)
    }

    /// Whether every byte was read.
    pub fn done(&self) -> bool {
        self.0.is_empty()
    }
}

/// An append-only file of records (see the module docs).
pub struct Spill {
    file: File,
    dir: PathBuf,
    end: u64,
    /// A rewrite is considered once `end` passes this.
    next_check: u64,
    buf: Vec<u8>,
}

impl std::fmt::Debug for Spill {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spill")
            .field("dir", &self.dir)
            .field("end", &self.end)
            .finish()
    }
}

fn unlinked_file(dir: &Path) -> std::io::Result<File> {
    static N: AtomicU64 = AtomicU64::new(0);
    for _ in 0..100 {
        let name = format!(
            ".possync-spill-{}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed),
            crate::events::now_micros()
        );
        let path = dir.join(name);
        match File::options().read(true).write(true).create_new(true).open(&path) {
            Ok(f) => {
                std::fs::remove_file(&path)?;
                return Ok(f);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(std::io::Error::other("no free spill file name"))
}

impl Spill {
    /// A new, empty spill file in `dir` (already unlinked: nothing is left behind).
    ///
    /// # Errors
    /// [`SpillError::Io`] when `dir` cannot be created or written.
    pub fn create(dir: &Path) -> Result<Spill, SpillError> {
        let file = std::fs::create_dir_all(dir)
            .and_then(|()| unlinked_file(dir))
            .map_err(|source| SpillError::Io {
                dir: dir.display().to_string(),
                source,
            })?;
        Ok(Spill {
            file,
            dir: dir.to_path_buf(),
            end: 0,
            next_check: MIN_REWRITE,
            buf: Vec::new(),
        })
    }

    fn io(&self) -> impl Fn(std::io::Error) -> SpillError + '_ {
        |source| SpillError::Io {
            dir: self.dir.display().to_string(),
            source,
        }
    }

    /// Bytes written (live records and garbage).
    pub fn size(&self) -> u64 {
        self.end
    }

    /// Appends one record per value (one write); their refs, in order.
    ///
    /// # Errors
    /// Write failures; a record over 16 MiB.
    pub fn append<'a, T: Codec + 'a>(
        &mut self,
        values: impl IntoIterator<Item = &'a T>,
    ) -> Result<Vec<SpillRef>, SpillError> {
        let mut buf = std::mem::take(&mut self.buf);
        buf.clear();
        let mut refs = Vec::new();
        for v in values {
            let at = buf.len();
            v.encode(&mut buf);
            // A zero-length record would read back as "empty": pad it.
            if buf.len() == at {
                buf.push(0);
            }
            refs.push(SpillRef::new(self.end + at as u64, buf.len() - at)?);
        }
        let r = self.file.write_all_at(&buf, self.end).map_err(self.io());
        self.end += buf.len() as u64;
        if buf.capacity() <= MAX_RANGE as usize {
            self.buf = buf;
        }
        r?;
        Ok(refs)
    }

    /// Calls `f(i, record)` for every `refs[i]`, in file order, reading coalesced ranges.
    fn scan(
        &self,
        refs: &[SpillRef],
        mut f: impl FnMut(usize, &[u8]) -> Result<(), SpillError>,
    ) -> Result<(), SpillError> {
        let mut order: Vec<usize> = (0..refs.len()).collect();
        order.sort_unstable_by_key(|&i| refs[i].offset());
        let mut buf = Vec::new();
        let mut i = 0;
        while i < order.len() {
            let start = refs[order[i]].offset();
            let mut end = start + refs[order[i]].len() as u64;
            let mut j = i + 1;
            while j < order.len() {
                let r = refs[order[j]];
                let next_end = end.max(r.offset() + r.len() as u64);
                if r.offset() > end + GAP || next_end - start > MAX_RANGE {
                    break;
                }
                end = next_end;
                j += 1;
            }
            buf.resize((end - start) as usize, 0);
            self.file.read_exact_at(&mut buf, start).map_err(self.io())?;
            for &k in &order[i..j] {
                let r = refs[k];
                let at = (r.offset() - start) as usize;
                f(k, &buf[at..at + r.len()])?;
            }
            i = j;
        }
        Ok(())
    }

    /// The values of `refs`, in the same order.
    ///
    /// # Errors
    /// Read failures; a record that does not decode.
    pub fn read<T: Codec>(&self, refs: &[SpillRef]) -> Result<Vec<T>, SpillError> {
        let mut out: Vec<Option<T>> = std::iter::repeat_with(|| None).take(refs.len()).collect();
        self.scan(refs, |i, b| {
            out[i] = Some(T::decode(b).ok_or_else(|| SpillError::Corrupt {
                dir: self.dir.display().to_string(),
                offset: refs[i].offset(),
            })?);
            Ok(())
        })?;
        Ok(out.into_iter().map(|v| v.expect("every ref was read")).collect())
    }

    /// Whether the file may be mostly garbage: then count the live bytes and call
    /// [`Spill::rewrite`] when they are under half. Cheap; checked after each flush.
    pub fn check_due(&self) -> bool {
        self.end > self.next_check
    }

    /// After [`Spill::check_due`]: `live` bytes are in use. Rewrites (copying the records of
    /// `refs`, updated in place) when more than half the file is garbage; otherwise waits until
    /// the file doubles again.
    ///
    /// # Errors
    /// Read and write failures (the old file stays in use).
    pub fn collect<'a>(&mut self, live: u64, refs: impl Iterator<Item = &'a mut SpillRef>) -> Result<bool, SpillError> {
        if live * 2 >= self.end {
            self.next_check = (self.end * 2).max(MIN_REWRITE);
            return Ok(false);
        }
        self.rewrite(refs)?;
        Ok(true)
    }

    /// Copies the records of `refs` into a fresh file (file order, one sequential pass) and
    /// points `refs` at the copies.
    ///
    /// # Errors
    /// Read and write failures (the old file stays in use).
    pub fn rewrite<'a>(&mut self, refs: impl Iterator<Item = &'a mut SpillRef>) -> Result<(), SpillError> {
        let mut refs: Vec<&mut SpillRef> = refs.collect();
        let old: Vec<SpillRef> = refs.iter().map(|r| **r).collect();
        let file = unlinked_file(&self.dir).map_err(self.io())?;
        let mut fresh = vec![SpillRef(0); old.len()];
        let (mut out, mut end) = (Vec::new(), 0u64);
        self.scan(&old, |i, b| {
            fresh[i] = SpillRef::new(end + out.len() as u64, b.len())?;
            out.extend_from_slice(b);
            if out.len() as u64 >= MAX_RANGE {
                file.write_all_at(&out, end).map_err(self.io())?;
                end += out.len() as u64;
                out.clear();
            }
            Ok(())
        })?;
        file.write_all_at(&out, end).map_err(self.io())?;
        end += out.len() as u64;
        for (r, f) in refs.iter_mut().zip(fresh) {
            **r = f;
        }
        self.file = file;
        self.end = end;
        self.next_check = (end * 2).max(MIN_REWRITE);
        Ok(())
    }

    /// Makes the next [`Spill::check_due`] true (tests: files far below the minimum size).
    #[cfg(test)]
    pub(crate) fn force_check(&mut self) {
        self.next_check = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl Codec for String {
        fn encode(&self, out: &mut Vec<u8>) {
            out.extend_from_slice(self.as_bytes());
        }
        fn decode(b: &[u8]) -> Option<Self> {
            String::from_utf8(b.to_vec()).ok()
        }
    }

    #[test]
    fn records_read_back_in_any_order_and_survive_rewrites() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spill::create(dir.path()).unwrap();
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            0,
            "the file is unlinked"
        );
        let vals: Vec<String> = (0..5000)
            .map(|i| format!("value-{i}-{}", "x".repeat(i % 300)))
            .collect();
        let mut refs = s.append(&vals).unwrap();
        // Overwrite every other value: the old records become garbage.
        for i in (0..vals.len()).step_by(2) {
            refs[i] = s.append([&format!("new-{i}")]).unwrap()[0];
        }
        let want: Vec<String> = (0..vals.len())
            .map(|i| {
                if i % 2 == 0 {
                    format!("new-{i}")
                } else {
                    vals[i].clone()
                }
            })
            .collect();
        let picks = [4999usize, 0, 17, 2500, 3, 4998, 17];
        let some: Vec<SpillRef> = picks.iter().map(|&i| refs[i]).collect();
        let got: Vec<String> = s.read(&some).unwrap();
        assert_eq!(got, picks.iter().map(|&i| want[i].clone()).collect::<Vec<_>>());
        assert_eq!(s.read::<String>(&refs).unwrap(), want);
        // Half the live records go: the rewrite keeps exactly the rest.
        let before = s.size();
        let mut kept: Vec<SpillRef> = refs.iter().copied().step_by(3).collect();
        let live: u64 = kept.iter().map(|r| r.len() as u64).sum();
        s.force_check();
        assert!(s.check_due());
        assert!(s.collect(live, kept.iter_mut()).unwrap(), "mostly garbage: rewritten");
        assert_eq!(s.size(), live);
        assert!(s.size() < before / 2);
        let want_kept: Vec<String> = want.iter().step_by(3).cloned().collect();
        assert_eq!(s.read::<String>(&kept).unwrap(), want_kept);
        assert!(!s.check_due(), "the next check waits for the file to double");
        assert!(!s.collect(live, kept.iter_mut()).unwrap(), "no garbage: kept");
    }

    #[test]
    fn errors_name_the_directory() {
        // A directory that cannot be created (its parent is a file), even by root.
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a-file");
        std::fs::write(&file, b"x").unwrap();
        let bad = file.join("possync-state");
        let e = Spill::create(&bad).unwrap_err();
        assert!(e.to_string().contains(&bad.display().to_string()), "{e}");
        assert!(e.to_string().contains("--state-dir"), "{e}");
        let mut s = Spill::create(dir.path()).unwrap();
        #[derive(Debug)]
        struct Bad;
        impl Codec for Bad {
            fn encode(&self, out: &mut Vec<u8>) {
                out.push(1);
            }
            fn decode(_: &[u8]) -> Option<Self> {
                None
            }
        }
        let r = s.append([&Bad]).unwrap();
        let e = s.read::<Bad>(&r).unwrap_err();
        assert!(matches!(e, SpillError::Corrupt { offset: 0, .. }), "{e}");
    }
}
