//! Compact in-memory forms of the strings the upsert state keeps per key.
//!
//! - [`Sym`]: an interned string (accounts and event sources: few distinct values), 4 bytes
//!   instead of a `String` per key. Interned strings live for the whole process; their number
//!   is the number of distinct accounts and sources ever seen. Session ids are not interned:
//!   every ingest or queue-worker start makes one, so they would grow without bound (issue 20
//!   #13).
//! - [`EventId`]: an event id (or session id); a canonical (lowercase, hyphenated) UUID is kept as its 16
//!   bytes, whose order is the order of its string form; any other id is kept as a string.
//!   Comparisons are exactly those of the strings.

use std::cmp::Ordering;
use std::collections::HashMap;
use std::sync::{OnceLock, RwLock};

struct Interner {
    ids: HashMap<&'static str, u32, foldhash::fast::RandomState>,
    strs: Vec<&'static str>,
}

fn interner() -> &'static RwLock<Interner> {
    static I: OnceLock<RwLock<Interner>> = OnceLock::new();
    I.get_or_init(|| {
        RwLock::new(Interner {
            ids: HashMap::default(),
            strs: Vec::new(),
        })
    })
}

/// An interned string; ordered, compared and hashed as its string.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Sym(u32);

impl Sym {
    /// The symbol of `s` (interned on first use).
    pub fn new(s: &str) -> Sym {
        if let Some(&id) = interner().read().expect("interner lock").ids.get(s) {
            return Sym(id);
        }
        let mut w = interner().write().expect("interner lock");
        if let Some(&id) = w.ids.get(s) {
            return Sym(id);
        }
        let leaked: &'static str = Box::leak(s.to_string().into_boxed_str());
        let id = u32::try_from(w.strs.len()).expect("fewer than 2^32 distinct strings");
        w.strs.push(leaked);
        w.ids.insert(leaked, id);
        Sym(id)
    }

    /// The symbol of `s` if it is interned already (never interns).
    pub fn existing(s: &str) -> Option<Sym> {
        interner().read().expect("interner lock").ids.get(s).map(|&id| Sym(id))
    }

    /// The symbol's number in this process (stable while the process runs).
    pub(crate) fn id(self) -> u32 {
        self.0
    }

    /// The symbol numbered `id` in this process, if there is one.
    pub(crate) fn from_id(id: u32) -> Option<Sym> {
        ((id as usize) < interner().read().expect("interner lock").strs.len()).then_some(Sym(id))
    }

    /// The string.
    pub fn as_str(self) -> &'static str {
        interner().read().expect("interner lock").strs[self.0 as usize]
    }
}

impl PartialOrd for Sym {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Sym {
    fn cmp(&self, other: &Self) -> Ordering {
        if self.0 == other.0 {
            return Ordering::Equal;
        }
        self.as_str().cmp(other.as_str())
    }
}

impl std::fmt::Debug for Sym {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.as_str())
    }
}

impl std::fmt::Display for Sym {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<&str> for Sym {
    fn from(s: &str) -> Sym {
        Sym::new(s)
    }
}

/// An event id, compact when it is a canonical UUID (see the module docs).
#[derive(Clone, PartialEq, Eq, Hash)]
pub enum EventId {
    /// A canonical lowercase hyphenated UUID, as its big-endian bytes.
    Uuid([u8; 16]),
    /// Any other id.
    Other(Box<str>),
}

fn hex(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

/// The bytes of a canonical lowercase hyphenated UUID string; `None` for any other string.
fn canonical_uuid(s: &str) -> Option<[u8; 16]> {
    let b = s.as_bytes();
    if b.len() != 36 {
        return None;
    }
    let mut out = [0u8; 16];
    let mut n = 0;
    let mut i = 0;
    while i < 36 {
        if matches!(i, 8 | 13 | 18 | 23) {
            if b[i] != b'-' {
                return None;
            }
            i += 1;
            continue;
        }
        out[n] = (hex(b[i])? << 4) | hex(b[i + 1])?;
        n += 1;
        i += 2;
    }
    Some(out)
}

impl EventId {
    /// The id of `s`.
    pub fn new(s: &str) -> EventId {
        match canonical_uuid(s) {
            Some(b) => EventId::Uuid(b),
            None => EventId::Other(s.into()),
        }
    }

    /// Calls `f` with the string form (no allocation).
    pub fn with_str<R>(&self, f: impl FnOnce(&str) -> R) -> R {
        match self {
            EventId::Uuid(b) => {
                let mut buf = [0u8; 36];
                f(uuid::Uuid::from_bytes(*b).hyphenated().encode_lower(&mut buf))
            }
            EventId::Other(s) => f(s),
        }
    }

    /// Orders `s` against this id exactly as the strings order.
    pub fn cmp_str(&self, s: &str) -> Ordering {
        match (self, canonical_uuid(s)) {
            (EventId::Uuid(a), Some(b)) => a.cmp(&b),
            _ => self.with_str(|mine| mine.cmp(s)),
        }
    }
}

impl PartialOrd for EventId {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for EventId {
    fn cmp(&self, other: &Self) -> Ordering {
        match (self, other) {
            (EventId::Uuid(a), EventId::Uuid(b)) => a.cmp(b),
            (a, EventId::Other(b)) => a.cmp_str(b),
            (EventId::Other(a), b) => b.cmp_str(a).reverse(),
        }
    }
}

impl std::fmt::Debug for EventId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.with_str(|s| write!(f, "{s:?}"))
    }
}

impl std::fmt::Display for EventId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.with_str(|s| f.write_str(s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_ids_order_as_their_strings() {
        let ids = [
            "",
            "e",
            "00000000-0000-0000-0000-000000000000",
            "0a1b2c3d-4e5f-6789-abcd-ef0123456789",
            "0A1B2C3D-4E5F-6789-ABCD-EF0123456789",
            "0a1b2c3d-4e5f-6789-abcd-ef012345678",
            "0a1b2c3d-4e5f-6789-abcd-ef01234567890",
            "0a1b2c3d-4e5f-6789-abcd-ef0123456789x",
            "0a1b2c3d+4e5f-6789-abcd-ef0123456789",
            "ffffffff-ffff-ffff-ffff-ffffffffffff",
            "fa1b2c3d-4e5f-6789-abcd-ef0123456789",
            "9a1b2c3d-4e5f-6789-abcd-ef0123456789",
            "g",
        ];
        assert!(matches!(EventId::new(ids[3]), EventId::Uuid(_)));
        assert!(matches!(EventId::new(ids[4]), EventId::Other(_)));
        for a in ids {
            assert_eq!(EventId::new(a).to_string(), a);
            for b in ids {
                assert_eq!(EventId::new(a).cmp(&EventId::new(b)), a.cmp(b), "{a} vs {b}");
                assert_eq!(EventId::new(a).cmp_str(b), a.cmp(b), "{a} vs {b}");
                assert_eq!(EventId::new(a) == EventId::new(b), a == b);
            }
        }
        let u = uuid::Uuid::new_v4().to_string();
        assert!(matches!(EventId::new(&u), EventId::Uuid(_)));
    }

    #[test]
    fn symbols_order_as_their_strings() {
        let (a, b) = (Sym::new("DU2"), Sym::new("DU10"));
        assert_eq!(a.cmp(&b), "DU2".cmp("DU10"));
        assert_eq!(Sym::new("DU2"), a);
        assert_eq!(a.as_str(), "DU2");
    }
}
