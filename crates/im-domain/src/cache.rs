//! Bounded in-memory caches: a full cache evicts the entries least worth keeping (S3-FIFO, from
//! `quick_cache`) instead of emptying itself, so recently used entries keep being served.
//!
//! Keys are hashed with `quick_cache`'s seeded foldhash (its `custom-hasher` feature), not SipHash:
//! the verified-token cache hashes a whole bearer token on every request. Keys are only what the
//! service made or verified (ids of stored resources and events, verified tokens), so no client
//! can fill a cache with colliding keys.

/// A concurrent cache holding at most a fixed number of entries; values are cloned out.
pub type BoundedCache<K, V> = quick_cache::sync::Cache<K, V>;

/// A cache of at most `capacity` entries.
#[must_use]
pub fn bounded<K, V>(capacity: usize) -> BoundedCache<K, V>
where
    K: Eq + std::hash::Hash,
    V: Clone,
{
    BoundedCache::new(capacity)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_cache_keeps_serving_recent_entries() {
        let cache = bounded::<u32, u32>(100);
        for i in 0..=100 {
            cache.insert(i, i * 2);
        }
        // One more than the capacity does not empty it: the newest entry and most others remain.
        // (The cache is sharded by a random hash: a shard that got more than its share of the
        // keys evicts a few more, so "most" is not a fixed number; 89 of 100 was seen.)
        assert_eq!(cache.get(&100), Some(200));
        assert!(cache.len() >= 50, "a full cache was emptied: {} entries left", cache.len());
        assert!(cache.len() <= 100);
    }

    #[test]
    fn entries_read_often_survive_a_stream_of_new_ones() {
        let cache = bounded::<u32, u32>(100);
        cache.insert(0, 7);
        for i in 1..10_000 {
            assert_eq!(cache.get(&0), Some(7), "the hot entry was evicted after {i} inserts");
            cache.insert(i, i);
        }
        assert!(cache.len() <= 100);
    }
}
