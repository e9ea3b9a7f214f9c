//! The chunk cache: an LRU of rebuilt chunks bounded by `--cache-mb`, plus a pool
//! of spare chunk buffers so a miss reuses an evicted buffer instead of allocating.
//!
//! The lock only guards the LRU's bookkeeping; chunks are `Arc`s, so a reader copies
//! out of a chunk after dropping the lock, and no I/O ever happens under it.

use std::num::NonZeroUsize;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use lru::LruCache;

/// One rebuilt chunk of guest memory.
#[derive(Debug)]
pub struct Chunk {
    /// The chunk's bytes (`chunk_bytes` long, shorter only at the end of memory).
    pub data: Box<[u8]>,
    /// Filled by the prefetcher and not yet read by a demand read.
    pub prefetched: AtomicBool,
}

/// LRU of chunks keyed by chunk index.
#[derive(Debug)]
pub struct ChunkCache {
    lru: Mutex<LruCache<u64, Arc<Chunk>>>,
    pool: Mutex<Vec<Box<[u8]>>>,
    chunk_bytes: usize,
    capacity: usize,
}

impl ChunkCache {
    /// A cache holding at most `capacity_bytes / chunk_bytes` chunks (at least one).
    pub fn new(capacity_bytes: u64, chunk_bytes: usize) -> Self {
        let capacity = ((capacity_bytes / chunk_bytes as u64) as usize).max(1);
        ChunkCache {
            lru: Mutex::new(LruCache::new(
                NonZeroUsize::new(capacity).unwrap_or(NonZeroUsize::MIN),
            )),
            pool: Mutex::new(Vec::new()),
            chunk_bytes,
            capacity,
        }
    }

    /// The chunk `idx` if cached, marking it most recently used.
    pub fn get(&self, idx: u64) -> Option<Arc<Chunk>> {
        lock(&self.lru).get(&idx).cloned()
    }

    /// Whether `idx` is cached, without touching its recency.
    pub fn contains(&self, idx: u64) -> bool {
        lock(&self.lru).contains(&idx)
    }

    /// A zero-length-agnostic buffer of `chunk_bytes` to rebuild a chunk into:
    /// a recycled one if any is spare.
    pub fn take_buffer(&self) -> Box<[u8]> {
        match lock(&self.pool).pop() {
            Some(buf) => buf,
            None => vec![0u8; self.chunk_bytes].into_boxed_slice(),
        }
    }

    /// Give back a buffer that was not inserted (e.g. its rebuild failed).
    pub fn give_back(&self, buf: Box<[u8]>) {
        let mut pool = lock(&self.pool);
        if pool.len() < 64 {
            pool.push(buf);
        }
    }

    /// Insert a rebuilt chunk; an evicted chunk's buffer goes back to the pool once
    /// no reader holds it any more.
    pub fn insert(&self, idx: u64, data: Box<[u8]>, prefetched: bool) -> Arc<Chunk> {
        let chunk = Arc::new(Chunk {
            data,
            prefetched: AtomicBool::new(prefetched),
        });
        let evicted = lock(&self.lru).push(idx, chunk.clone());
        if let Some(old) = evicted.and_then(|(_, old)| Arc::try_unwrap(old).ok()) {
            self.give_back(old.data);
        }
        chunk
    }

    /// Chunks currently cached.
    pub fn len(&self) -> usize {
        lock(&self.lru).len()
    }

    /// Whether the cache is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Maximum number of chunks.
    pub fn capacity(&self) -> usize {
        self.capacity
    }
}

/// Lock a mutex, ignoring poisoning: the guarded data stays consistent because no
/// critical section here can panic half-way through an update.
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_least_recently_used_and_recycles_its_buffer() {
        let cache = ChunkCache::new(2 * 4096, 4096);
        cache.insert(1, cache.take_buffer(), false);
        cache.insert(2, cache.take_buffer(), false);
        assert!(cache.get(1).is_some()); // 1 is now most recent
        cache.insert(3, cache.take_buffer(), false);
        assert!(cache.contains(1));
        assert!(!cache.contains(2));
        assert!(cache.contains(3));
        assert_eq!(lock(&cache.pool).len(), 1, "evicted buffer is pooled");
    }

    #[test]
    fn held_chunk_is_not_recycled_on_eviction() {
        let cache = ChunkCache::new(4096, 4096);
        let held = cache.insert(1, vec![7u8; 4096].into_boxed_slice(), false);
        cache.insert(2, cache.take_buffer(), false);
        assert_eq!(held.data[0], 7);
        assert!(lock(&cache.pool).is_empty());
    }
}
