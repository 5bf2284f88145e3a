//! A session's subscriptions by channel. Most sessions hold one to a few channels: a hash map
//! would allocate four buckets for the first (~700 bytes with a subscription's state), where a
//! vector sized exactly holds one entry. Past [`FEW`] channels it becomes an Fx hash map, so a
//! session with many subscriptions still finds a publication's channel without a scan.

use std::sync::Arc;

use rustc_hash::FxHashMap;

/// Channels held in the vector before it becomes a map: a scan of a few short names is no
/// slower than hashing one.
const FEW: usize = 8;

pub(crate) enum ChannelMap<V> {
    /// Sized exactly (an idle session keeps no spare room); unordered.
    Few(Vec<(Arc<str>, V)>),
    Many(FxHashMap<Arc<str>, V>),
}

impl<V> Default for ChannelMap<V> {
    fn default() -> Self {
        ChannelMap::Few(Vec::new())
    }
}

impl<V> ChannelMap<V> {
    pub(crate) fn len(&self) -> usize {
        match self {
            ChannelMap::Few(entries) => entries.len(),
            ChannelMap::Many(map) => map.len(),
        }
    }

    pub(crate) fn contains_key(&self, channel: &str) -> bool {
        self.get(channel).is_some()
    }

    pub(crate) fn get(&self, channel: &str) -> Option<&V> {
        match self {
            ChannelMap::Few(entries) => entries
                .iter()
                .find(|(c, _)| **c == *channel)
                .map(|(_, v)| v),
            ChannelMap::Many(map) => map.get(channel),
        }
    }

    pub(crate) fn get_mut(&mut self, channel: &str) -> Option<&mut V> {
        match self {
            ChannelMap::Few(entries) => entries
                .iter_mut()
                .find(|(c, _)| **c == *channel)
                .map(|(_, v)| v),
            ChannelMap::Many(map) => map.get_mut(channel),
        }
    }

    /// Adds a channel the map does not hold (the caller checked).
    pub(crate) fn insert_new(&mut self, channel: Arc<str>, value: V) {
        debug_assert!(!self.contains_key(&channel));
        match self {
            ChannelMap::Few(entries) if entries.len() < FEW => {
                // Exactly one more: `push` alone would make room for four.
                entries.reserve_exact(1);
                entries.push((channel, value));
            }
            ChannelMap::Few(entries) => {
                let mut map: FxHashMap<Arc<str>, V> = std::mem::take(entries).into_iter().collect();
                map.insert(channel, value);
                *self = ChannelMap::Many(map);
            }
            ChannelMap::Many(map) => {
                map.insert(channel, value);
            }
        }
    }

    pub(crate) fn remove(&mut self, channel: &str) -> Option<V> {
        match self {
            ChannelMap::Few(entries) => {
                let i = entries.iter().position(|(c, _)| **c == *channel)?;
                let (_, value) = entries.swap_remove(i);
                if entries.is_empty() {
                    *entries = Vec::new();
                }
                Some(value)
            }
            ChannelMap::Many(map) => map.remove(channel),
        }
    }

    pub(crate) fn keys(&self) -> Keys<'_, V> {
        match self {
            ChannelMap::Few(entries) => Keys::Few(entries.iter()),
            ChannelMap::Many(map) => Keys::Many(map.keys()),
        }
    }

    /// Every entry, in no order.
    pub(crate) fn iter(&self) -> Box<dyn Iterator<Item = (&Arc<str>, &V)> + '_> {
        match self {
            ChannelMap::Few(entries) => Box::new(entries.iter().map(|(c, v)| (c, v))),
            ChannelMap::Many(map) => Box::new(map.iter()),
        }
    }

    /// Every entry, leaving the map empty.
    pub(crate) fn take_all(&mut self) -> Vec<(Arc<str>, V)> {
        match std::mem::take(self) {
            ChannelMap::Few(entries) => entries,
            ChannelMap::Many(map) => map.into_iter().collect(),
        }
    }
}

/// The channels of a [`ChannelMap`].
pub(crate) enum Keys<'a, V> {
    Few(std::slice::Iter<'a, (Arc<str>, V)>),
    Many(std::collections::hash_map::Keys<'a, Arc<str>, V>),
}

impl<'a, V> Iterator for Keys<'a, V> {
    type Item = &'a Arc<str>;

    fn next(&mut self) -> Option<&'a Arc<str>> {
        match self {
            Keys::Few(entries) => entries.next().map(|(c, _)| c),
            Keys::Many(keys) => keys.next(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Entries are found, replaced and removed alike before and after the vector becomes a map.
    #[test]
    fn the_vector_and_the_map_hold_the_same_entries() {
        let mut map = ChannelMap::default();
        let names: Vec<Arc<str>> = (0..FEW * 2).map(|i| format!("c{i}").into()).collect();
        for (i, name) in names.iter().enumerate() {
            assert_eq!(map.get(name), None);
            map.insert_new(name.clone(), i);
            assert_eq!(map.len(), i + 1);
            assert!(matches!(map, ChannelMap::Few(_)) == (i < FEW));
            for (j, earlier) in names[..=i].iter().enumerate() {
                assert_eq!(map.get(earlier), Some(&j));
            }
        }
        *map.get_mut("c3").unwrap() = 100;
        assert_eq!(map.get("c3"), Some(&100));
        assert_eq!(map.remove("c3"), Some(100));
        assert_eq!(map.remove("c3"), None);
        assert!(!map.contains_key("c3"));
        let mut keys: Vec<&str> = map.keys().map(|k| &**k).collect();
        keys.sort_unstable();
        assert_eq!(keys.len(), FEW * 2 - 1);
        let all = map.take_all();
        assert_eq!(all.len(), FEW * 2 - 1);
        assert_eq!(map.len(), 0);
    }

    /// One channel takes one entry's room, and a vector emptied by removals holds none.
    #[test]
    fn the_vector_is_sized_exactly() {
        let mut map = ChannelMap::default();
        map.insert_new("a".into(), 1u64);
        let ChannelMap::Few(entries) = &map else {
            panic!("one channel is held in the vector")
        };
        assert_eq!(entries.capacity(), 1);
        map.remove("a");
        let ChannelMap::Few(entries) = &map else {
            panic!("still the vector")
        };
        assert_eq!(entries.capacity(), 0);
    }
}
