//! The key index of an upsert table: per key its live row's location and its value, in dense
//! entries with a hash table of their indexes, and the live keys per summary class.

use std::hash::BuildHasher;

use super::{Key, Loc};
use crate::materialize::upsert::summary::Counts;

pub(super) struct Entry<V> {
    pub(super) key: Key,
    pub(super) loc: Loc,
    pub(super) value: V,
}

/// The class of a value: which of the table's summary counts its row is in (0..4, see
/// [`super::summary`]).
pub trait Classed {
    /// The class (only the low two bits count).
    fn class(&self) -> u8;
}

/// Per key (location, value): dense entries plus a hash table of their indexes, and the live
/// keys per class.
pub(super) struct Index<V> {
    pub(super) entries: Vec<Entry<V>>,
    slots: hashbrown::HashTable<u32>,
    /// foldhash, not SipHash: the keys come from our own topics, and at 1M new keys a
    /// catch-up spent about 7% of its CPU re-hashing the slots as they grew.
    hasher: foldhash::fast::RandomState,
    /// Entries per class, kept by every insert and remove.
    pub(super) counts: Counts,
}

impl<V> Default for Index<V> {
    fn default() -> Self {
        Self {
            entries: Vec::new(),
            slots: hashbrown::HashTable::new(),
            hasher: foldhash::fast::RandomState::default(),
            counts: Counts::default(),
        }
    }
}

pub(super) fn class_of<V: Classed>(v: &V) -> usize {
    usize::from(v.class() & 3)
}

impl<V: Classed> Index<V> {
    pub(super) fn len(&self) -> usize {
        self.entries.len()
    }

    pub(super) fn find(&self, key: &Key) -> Option<usize> {
        let h = self.hasher.hash_one(key);
        self.slots
            .find(h, |&i| self.entries[i as usize].key == *key)
            .map(|&i| i as usize)
    }

    pub(super) fn get(&self, key: &Key) -> Option<&Entry<V>> {
        self.find(key).map(|i| &self.entries[i])
    }

    pub(super) fn insert(&mut self, key: Key, loc: Loc, value: V) {
        let h = self.hasher.hash_one(key);
        let (entries, hasher) = (&mut self.entries, &self.hasher);
        let slot = self.slots.entry(
            h,
            |&i| entries[i as usize].key == key,
            |&j| hasher.hash_one(entries[j as usize].key),
        );
        match slot {
            hashbrown::hash_table::Entry::Occupied(o) => {
                let e = &mut entries[*o.get() as usize];
                self.counts[class_of(&e.value)] -= 1;
                self.counts[class_of(&value)] += 1;
                e.loc = loc;
                e.value = value;
            }
            hashbrown::hash_table::Entry::Vacant(v) => {
                self.counts[class_of(&value)] += 1;
                v.insert(u32::try_from(entries.len()).expect("fewer than 2^32 keys"));
                entries.push(Entry { key, loc, value });
            }
        }
    }

    pub(super) fn remove(&mut self, key: &Key) -> bool {
        let h = self.hasher.hash_one(key);
        let entries = &self.entries;
        let Ok(slot) = self.slots.find_entry(h, |&i| entries[i as usize].key == *key) else {
            return false;
        };
        let (i, _) = slot.remove();
        let i = i as usize;
        self.counts[class_of(&self.entries[i].value)] -= 1;
        let last = self.entries.len() - 1;
        if i != last {
            // The last entry moves into the hole: repoint its slot.
            let moved = self.entries[last].key;
            let h = self.hasher.hash_one(moved);
            let slot = self
                .slots
                .find_mut(h, |&j| j as usize == last)
                .expect("every entry has a slot");
            *slot = i as u32;
        }
        self.entries.swap_remove(i);
        true
    }
}
