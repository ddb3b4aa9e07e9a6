//! A cache of metadata clusters whose dirty entries are pinned: clean entries live in an LRU bounded
//! by count and may be dropped at any time (the file holds the same bytes), dirty ones stay until
//! their owner stores them and says so. It knows nothing about files: loading and storing are
//! passed in.

use std::collections::BTreeMap;
use std::num::NonZeroUsize;

use lru::LruCache;

use crate::error::Result;

/// Clean entries in an LRU of at most `capacity`, dirty ones apart and never evicted.
///
/// Invariant: a key is in `clean` or in `dirty`, never both; an entry only leaves `dirty` through
/// `store_dirty` (after its write-back succeeded) or `forget_dirty` (the caller throws the
/// in-memory state away). So an eviction can never lose a change, and it never writes: what is
/// stored, and when, stays the business of whoever owns the write ordering (the commit pipeline).
#[derive(Debug)]
pub(super) struct PinnedLru<V> {
    clean: LruCache<u64, V>,
    dirty: BTreeMap<u64, V>,
}

impl<V> PinnedLru<V> {
    /// At most `capacity` clean entries (at least one).
    pub fn new(capacity: usize) -> Self {
        PinnedLru {
            clean: LruCache::new(NonZeroUsize::new(capacity).unwrap_or(NonZeroUsize::MIN)),
            dirty: BTreeMap::new(),
        }
    }

    /// Change how many clean entries are kept (the least recently used go first).
    pub fn set_capacity(&mut self, capacity: usize) {
        self.clean
            .resize(NonZeroUsize::new(capacity).unwrap_or(NonZeroUsize::MIN));
    }

    #[cfg(test)]
    pub fn capacity(&self) -> usize {
        self.clean.cap().get()
    }

    /// Entries held now: (clean, dirty).
    pub fn len(&self) -> (usize, usize) {
        (self.clean.len(), self.dirty.len())
    }

    /// The entry for `key` if it is in memory (a clean one becomes the most recently used).
    pub fn get(&mut self, key: u64) -> Option<&V> {
        if self.dirty.contains_key(&key) {
            return self.dirty.get(&key);
        }
        self.clean.get(&key)
    }

    /// The entry for `key`, loaded with `load` (as a clean entry) when it is not in memory.
    pub fn get_or_load(&mut self, key: u64, load: impl FnOnce() -> Result<V>) -> Result<&V> {
        if let Some(v) = self.dirty.get(&key) {
            return Ok(v);
        }
        self.clean.try_get_or_insert(key, load)
    }

    /// The entry for `key` to change: it becomes dirty (pinned), loaded with `load` if needed.
    pub fn get_mut_dirty(&mut self, key: u64, load: impl FnOnce() -> Result<V>) -> Result<&mut V> {
        let entry = match self.dirty.entry(key) {
            std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::btree_map::Entry::Vacant(e) => match self.clean.pop(&key) {
                Some(v) => e.insert(v),
                None => e.insert(load()?),
            },
        };
        Ok(entry)
    }

    /// Make `value` the dirty entry for `key`, replacing whatever was held.
    pub fn insert_dirty(&mut self, key: u64, value: V) {
        self.clean.pop(&key);
        self.dirty.insert(key, value);
    }

    /// Write every dirty entry with `store`, in key order; each one stored becomes clean (and so
    /// may be evicted from now on). On an error the entries not stored stay dirty.
    pub fn store_dirty(&mut self, mut store: impl FnMut(u64, &V) -> Result<()>) -> Result<()> {
        while let Some((&key, value)) = self.dirty.first_key_value() {
            store(key, value)?;
            if let Some((key, value)) = self.dirty.pop_first() {
                self.clean.push(key, value);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loaded(v: u32) -> impl FnOnce() -> Result<u32> {
        move || Ok(v)
    }

    #[test]
    fn evicts_the_least_recently_used_clean_entry() {
        let mut c = PinnedLru::new(2);
        c.get_or_load(1, loaded(10)).unwrap();
        c.get_or_load(2, loaded(20)).unwrap();
        c.get(1);
        c.get_or_load(3, loaded(30)).unwrap();
        assert_eq!(c.get(2), None, "2 was the least recently used");
        assert_eq!(c.get(1), Some(&10));
        assert_eq!(c.get(3), Some(&30));
    }

    #[test]
    fn never_evicts_a_dirty_entry_until_it_is_stored() {
        let mut c = PinnedLru::new(1);
        *c.get_mut_dirty(1, loaded(10)).unwrap() += 1;
        c.insert_dirty(2, 20);
        for k in 3..10 {
            c.get_or_load(k, loaded(k as u32)).unwrap();
        }
        assert_eq!(c.len(), (1, 2));
        assert_eq!(c.get(1), Some(&11));
        assert_eq!(c.get(2), Some(&20));
        let mut stored = Vec::new();
        c.store_dirty(|k, &v| {
            stored.push((k, v));
            Ok(())
        })
        .unwrap();
        assert_eq!(stored, vec![(1, 11), (2, 20)]);
        assert_eq!(
            c.len(),
            (1, 0),
            "stored entries are clean and bounded again"
        );
    }

    #[test]
    fn a_failed_store_keeps_the_entries_not_yet_stored_dirty() {
        let mut c = PinnedLru::new(4);
        for k in 1..=3 {
            c.insert_dirty(k, k as u32);
        }
        let err = c.store_dirty(|k, _| {
            if k == 2 {
                Err(crate::Error::new(
                    "img",
                    std::io::Error::from_raw_os_error(libc::EIO),
                ))
            } else {
                Ok(())
            }
        });
        assert!(err.is_err());
        assert_eq!(c.len(), (1, 2), "1 stored; 2 and 3 still dirty");
    }

    #[test]
    fn a_clean_entry_made_dirty_is_not_loaded_again() {
        let mut c = PinnedLru::new(2);
        c.get_or_load(1, loaded(10)).unwrap();
        let v = c.get_mut_dirty(1, || panic!("in memory already")).unwrap();
        assert_eq!(*v, 10);
        assert_eq!(c.len(), (0, 1));
    }

    #[test]
    fn shrinking_drops_clean_entries_only() {
        let mut c = PinnedLru::new(4);
        for k in 1..=4 {
            c.get_or_load(k, loaded(k as u32)).unwrap();
        }
        c.insert_dirty(9, 9);
        c.set_capacity(1);
        assert_eq!(c.len(), (1, 1));
        assert_eq!(c.capacity(), 1);
        assert_eq!(c.get(4), Some(&4), "the most recently used stays");
    }
}
