//! The on-disk cache of fetched blocks: a second mount on the same host
//! starts warm.
//!
//! A block is 256 KiB of one pack (64 stored pages, the last one of a pack
//! may be shorter), kept as one file named by the pack's content hash and the
//! block number, so it is valid for every checkpoint that uses the pack. Files
//! are written to a temporary name and renamed; a block read back is used only
//! through the page CRCs like any fetched byte, and a block that fails them is
//! dropped and fetched again. The cache is bounded: least recently used
//! blocks are removed past the limit (files already there at open count as
//! least recently used, oldest first).

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use lru::LruCache;

/// Pages in a block.
pub const BLOCK_PAGES: u32 = 64;
/// Default cache folder.
pub const DEFAULT_DIR: &str = "/var/cache/ckptfs/remote";

/// A block: pack content hash, block number inside the pack.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockKey {
    /// xxh3-128 of the pack.
    pub pack: u128,
    /// Block number (page index in the pack / [`BLOCK_PAGES`]).
    pub block: u32,
}

impl BlockKey {
    fn file_name(&self) -> String {
        format!("{:032x}-{}.blk", self.pack, self.block)
    }

    fn parse(name: &str) -> Option<BlockKey> {
        let stem = name.strip_suffix(".blk")?;
        let (h, b) = stem.split_once('-')?;
        Some(BlockKey {
            pack: u128::from_str_radix(h, 16).ok()?,
            block: b.parse().ok()?,
        })
    }
}

struct Index {
    lru: LruCache<BlockKey, u64>,
    bytes: u64,
}

/// A bounded folder of blocks.
pub struct DiskCache {
    dir: PathBuf,
    limit: u64,
    index: Mutex<Index>,
}

impl std::fmt::Debug for DiskCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskCache")
            .field("dir", &self.dir)
            .field("limit", &self.limit)
            .finish()
    }
}

impl DiskCache {
    /// Open (creating it, mode 0700: it holds guest memory) the cache in
    /// `dir`, bounded to `limit` bytes; blocks already there are kept, as far
    /// as the limit allows.
    pub fn open(dir: &Path, limit: u64) -> std::io::Result<DiskCache> {
        use std::os::unix::fs::{DirBuilderExt, MetadataExt};
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
        check_private(dir)?;
        let mut found = Vec::new();
        for e in fs::read_dir(dir)? {
            let e = e?;
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(".tmp-") {
                let _ = fs::remove_file(e.path());
                continue;
            }
            if let (Some(key), Ok(meta)) = (BlockKey::parse(&name), e.metadata()) {
                found.push((meta.mtime(), key, meta.len()));
            }
        }
        found.sort();
        let cache = DiskCache {
            dir: dir.to_owned(),
            limit,
            index: Mutex::new(Index {
                lru: LruCache::unbounded(),
                bytes: 0,
            }),
        };
        {
            let mut ix = cache.lock();
            for (_, key, len) in found {
                ix.lru.put(key, len);
                ix.bytes += len;
            }
        }
        cache.evict();
        Ok(cache)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Bytes held.
    pub fn bytes(&self) -> u64 {
        self.lock().bytes
    }

    /// Whether `key` is held (without reading it).
    pub fn contains(&self, key: &BlockKey) -> bool {
        self.lock().lru.contains(key)
    }

    /// The block's bytes, if held (and readable).
    pub fn get(&self, key: &BlockKey) -> Option<Vec<u8>> {
        self.lock().lru.get(key)?;
        match fs::read(self.dir.join(key.file_name())) {
            Ok(b) => Some(b),
            Err(_) => {
                // Removed by another mount sharing the folder: a miss.
                self.forget(key);
                None
            }
        }
    }

    /// Keep `data` as block `key` (best effort: a full disk only costs a refetch).
    pub fn put(&self, key: &BlockKey, data: &[u8]) {
        use std::os::unix::fs::OpenOptionsExt;
        let tmp = self.dir.join(format!(
            ".tmp-{}-{:?}",
            key.file_name(),
            std::thread::current().id()
        ));
        // Owner-only, and never through a planted name: O_EXCL refuses any
        // existing file or symlink there (and what is there is not ours to remove).
        let created = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp);
        let written = created.and_then(|mut f| {
            f.write_all(data)
                .and_then(|()| fs::rename(&tmp, self.dir.join(key.file_name())))
                .inspect_err(|_| {
                    let _ = fs::remove_file(&tmp);
                })
        });
        if let Err(e) = written {
            log::debug!("remote cache: cannot keep block {}: {e}", key.file_name());
            return;
        }
        {
            let mut ix = self.lock();
            if let Some(old) = ix.lru.put(*key, data.len() as u64) {
                ix.bytes -= old;
            }
            ix.bytes += data.len() as u64;
        }
        self.evict();
    }

    /// Drop block `key` (it failed its CRCs).
    pub fn remove(&self, key: &BlockKey) {
        self.forget(key);
        let _ = fs::remove_file(self.dir.join(key.file_name()));
    }

    fn forget(&self, key: &BlockKey) {
        let mut ix = self.lock();
        if let Some(len) = ix.lru.pop(key) {
            ix.bytes -= len;
        }
    }

    fn evict(&self) {
        let mut gone = Vec::new();
        {
            let mut ix = self.lock();
            while ix.bytes > self.limit {
                let Some((key, len)) = ix.lru.pop_lru() else {
                    break;
                };
                ix.bytes -= len;
                gone.push(key);
            }
        }
        for key in gone {
            let _ = fs::remove_file(self.dir.join(key.file_name()));
        }
    }
}

/// Blocks grouped by pack, for callers that fetch several.
pub fn by_pack(keys: &[BlockKey]) -> HashMap<u128, Vec<u32>> {
    let mut m: HashMap<u128, Vec<u32>> = HashMap::new();
    for k in keys {
        m.entry(k.pack).or_default().push(k.block);
    }
    for v in m.values_mut() {
        v.sort_unstable();
        v.dedup();
    }
    m
}

/// The cache holds guest memory (its blocks are created 0600): refuse a
/// folder that is a symlink, belongs to another user or that others may
/// write to (where they could swap blocks or plant names); a folder that
/// existed before is used as it is, never changed.
fn check_private(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let meta = fs::symlink_metadata(dir)?;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    let mode = meta.permissions().mode() & 0o7777;
    let problem = if !meta.is_dir() {
        "is not a directory (a symlink?)".to_string()
    } else if meta.uid() != euid {
        format!("belongs to uid {}, not to uid {euid}", meta.uid())
    } else if mode & 0o022 != 0 {
        format!("has mode {mode:04o}: other users may write to it (chmod go-w it, or use another)")
    } else {
        return Ok(());
    };
    Err(std::io::Error::new(
        std::io::ErrorKind::PermissionDenied,
        format!("cache folder {problem}"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(block: u32) -> BlockKey {
        BlockKey { pack: 0xabc, block }
    }

    #[test]
    fn blocks_survive_a_reopen_and_the_bound_evicts_the_oldest() {
        let d = tempfile::tempdir().unwrap();
        let c = DiskCache::open(d.path(), 3000).unwrap();
        c.put(&key(0), &[1u8; 1000]);
        c.put(&key(1), &[2u8; 1000]);
        c.put(&key(2), &[3u8; 1000]);
        assert!(c.get(&key(0)).is_some()); // 0 is now the most recent
        c.put(&key(3), &[4u8; 1000]);
        assert!(!c.contains(&key(1)), "least recently used is gone");
        assert_eq!(c.bytes(), 3000);
        drop(c);
        let c = DiskCache::open(d.path(), 3000).unwrap();
        assert_eq!(c.get(&key(3)).unwrap(), vec![4u8; 1000]);
        assert_eq!(c.get(&key(0)).unwrap(), vec![1u8; 1000]);
        assert!(c.get(&key(1)).is_none());
        c.remove(&key(0));
        assert!(c.get(&key(0)).is_none());
        let small = DiskCache::open(d.path(), 1000).unwrap();
        assert_eq!(small.bytes(), 1000, "reopened under a smaller bound");
    }

    #[test]
    fn a_cache_folder_others_can_write_is_refused_and_blocks_are_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let open = d.path().join("open");
        fs::create_dir(&open).unwrap();
        fs::set_permissions(&open, fs::Permissions::from_mode(0o777)).unwrap();
        let e = DiskCache::open(&open, 1000).unwrap_err();
        assert!(e.to_string().contains("mode 0777"), "{e}");
        let mode = fs::metadata(&open).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o777, "not changed");
        let readable = d.path().join("readable");
        fs::create_dir(&readable).unwrap();
        fs::set_permissions(&readable, fs::Permissions::from_mode(0o755)).unwrap();
        let c = DiskCache::open(&readable, 1 << 20).unwrap();
        // A planted link at the block's temporary name is not written through.
        let victim = d.path().join("victim");
        fs::write(&victim, b"keep").unwrap();
        let tmp = readable.join(format!(
            ".tmp-{}-{:?}",
            key(7).file_name(),
            std::thread::current().id()
        ));
        std::os::unix::fs::symlink(&victim, &tmp).unwrap();
        c.put(&key(7), &[9u8; 100]);
        assert_eq!(fs::read(&victim).unwrap(), b"keep");
        fs::remove_file(&tmp).unwrap();
        c.put(&key(7), &[9u8; 100]);
        let block = readable.join(key(7).file_name());
        let mode = fs::metadata(&block).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "a block is owner-only");
        let link = d.path().join("link");
        std::os::unix::fs::symlink(d.path().join("private"), &link).unwrap();
        fs::create_dir(d.path().join("private")).unwrap();
        fs::set_permissions(d.path().join("private"), fs::Permissions::from_mode(0o700)).unwrap();
        let e = DiskCache::open(&link, 1000).unwrap_err();
        assert!(e.to_string().contains("not a directory"), "{e}");
        let fresh = d.path().join("a/b");
        DiskCache::open(&fresh, 1000).unwrap();
        let mode = fs::metadata(&fresh).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
    }

    #[test]
    fn block_names_round_trip() {
        let k = BlockKey {
            pack: u128::MAX - 5,
            block: 17,
        };
        assert_eq!(BlockKey::parse(&k.file_name()), Some(k));
        assert_eq!(BlockKey::parse("junk"), None);
    }
}
