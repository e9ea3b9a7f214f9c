//! The working-set sidecar (`VM.ckpt.ws`): the order in which a restore first read
//! each chunk on demand, replayed first by the next mount (REAP; VMware's
//! working-set restore).
//!
//! ```text
//! offset  size  field
//! 0       8     magic "CKPTWS\0\x01"
//! 8       4     version (u32 LE) = 1
//! 12      4     reserved, 0
//! 16      8     guest size in bytes (u64 LE); a sidecar for another size is ignored
//! 24      8     entry count N (u64 LE)
//! 32      12*N  entries in first-touch order: first page (u64 LE), page count (u32 LE)
//! 32+12N  4     CRC32 (IEEE, crc32fast) of bytes [0, 32+12N)
//! ```
//!
//! Entries are page runs, not chunk numbers, so a sidecar stays valid when the
//! chunk size changes. A sidecar that fails any check is a warning, never fatal.

use std::fs;
use std::io::{self, Write};
use std::path::Path;

/// File magic.
pub const MAGIC: [u8; 8] = *b"CKPTWS\0\x01";
/// Current version.
pub const VERSION: u32 = 1;
const VERSION_OFFSET: usize = MAGIC.len();
const RESERVED_OFFSET: usize = VERSION_OFFSET + size_of::<u32>();
const GUEST_SIZE_OFFSET: usize = RESERVED_OFFSET + size_of::<u32>();
const COUNT_OFFSET: usize = GUEST_SIZE_OFFSET + size_of::<u64>();
/// Size of the fixed header.
pub const HEADER_LEN: usize = COUNT_OFFSET + size_of::<u64>();
/// Size of one entry.
pub const ENTRY_LEN: usize = size_of::<u64>() + size_of::<u32>();
const CRC_LEN: usize = size_of::<u32>();
/// Refuse sidecars larger than this (16 Mi entries, a 64 GiB guest at 4 KiB runs).
const MAX_ENTRIES: u64 = 1 << 24;

/// One run of pages, first touched together.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Run {
    /// First guest page.
    pub first_page: u64,
    /// Number of pages.
    pub pages: u32,
}

/// Why a sidecar was ignored.
#[derive(Debug, thiserror::Error)]
pub enum WorkingSetError {
    /// Reading or writing the file failed.
    #[error("accessing working-set file")]
    Io(#[source] io::Error),
    /// Shorter than a header plus checksum, or its length disagrees with the count.
    #[error("working-set file has a bad length ({len} bytes)")]
    Length {
        /// File length.
        len: usize,
    },
    /// Wrong magic.
    #[error("not a working-set file (bad magic)")]
    Magic,
    /// Unknown version.
    #[error("unsupported working-set version {0}")]
    Version(u32),
    /// Checksum mismatch.
    #[error("working-set checksum mismatch (expected {expected:#010x}, got {actual:#010x})")]
    Checksum {
        /// Stored CRC.
        expected: u32,
        /// Computed CRC.
        actual: u32,
    },
    /// Recorded for a guest of another size.
    #[error("working set is for a {recorded}-byte guest, this checkpoint has {actual} bytes")]
    GuestSize {
        /// Size in the file.
        recorded: u64,
        /// Size of the checkpoint.
        actual: u64,
    },
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().expect("8 bytes"))
}

/// Serialize `runs` for a guest of `guest_size` bytes.
pub fn encode(guest_size: u64, runs: &[Run]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + runs.len() * ENTRY_LEN + CRC_LEN);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&guest_size.to_le_bytes());
    out.extend_from_slice(&(runs.len() as u64).to_le_bytes());
    for r in runs {
        out.extend_from_slice(&r.first_page.to_le_bytes());
        out.extend_from_slice(&r.pages.to_le_bytes());
    }
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// Parse and validate a sidecar: length, magic, version, checksum, guest size.
pub fn decode(bytes: &[u8], guest_size: u64) -> Result<Vec<Run>, WorkingSetError> {
    let len = bytes.len();
    if len < HEADER_LEN + CRC_LEN {
        return Err(WorkingSetError::Length { len });
    }
    if bytes[..MAGIC.len()] != MAGIC {
        return Err(WorkingSetError::Magic);
    }
    let version = u32_at(bytes, VERSION_OFFSET);
    if version != VERSION {
        return Err(WorkingSetError::Version(version));
    }
    let count = u64_at(bytes, COUNT_OFFSET);
    if count > MAX_ENTRIES || HEADER_LEN + count as usize * ENTRY_LEN + CRC_LEN != len {
        return Err(WorkingSetError::Length { len });
    }
    let body = &bytes[..len - CRC_LEN];
    let expected = u32_at(bytes, len - CRC_LEN);
    let actual = crc32fast::hash(body);
    if expected != actual {
        return Err(WorkingSetError::Checksum { expected, actual });
    }
    let recorded = u64_at(bytes, GUEST_SIZE_OFFSET);
    if recorded != guest_size {
        return Err(WorkingSetError::GuestSize {
            recorded,
            actual: guest_size,
        });
    }
    Ok(body[HEADER_LEN..]
        .chunks_exact(ENTRY_LEN)
        .map(|e| Run {
            first_page: u64_at(e, 0),
            pages: u32_at(e, 8),
        })
        .collect())
}

/// Read and validate the sidecar at `path`.
pub fn load(path: &Path, guest_size: u64) -> Result<Vec<Run>, WorkingSetError> {
    let bytes = fs::read(path).map_err(WorkingSetError::Io)?;
    decode(&bytes, guest_size)
}

/// Write the sidecar atomically (temp file in the same directory, then rename).
pub fn save(path: &Path, guest_size: u64, runs: &[Run]) -> Result<(), WorkingSetError> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = Path::new(&tmp);
    let write = || -> io::Result<()> {
        let mut f = fs::File::create(tmp)?;
        f.write_all(&encode(guest_size, runs))?;
        f.sync_all()?;
        fs::rename(tmp, path)
    };
    write().map_err(|e| {
        let _ = fs::remove_file(tmp);
        WorkingSetError::Io(e)
    })
}

/// Turn runs into chunk indices (deduplicated, first occurrence wins, in order).
pub fn runs_to_chunks(runs: &[Run], chunk_pages: u64, chunk_count: u64) -> Vec<u64> {
    let mut seen = vec![false; chunk_count as usize];
    let mut out = Vec::new();
    for r in runs {
        let end = r.first_page.saturating_add(u64::from(r.pages.max(1)));
        let (first, last) = (r.first_page / chunk_pages, (end - 1) / chunk_pages);
        for c in first..=last.min(chunk_count.saturating_sub(1)) {
            if !std::mem::replace(&mut seen[c as usize], true) {
                out.push(c);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const GUEST: u64 = 1 << 20;

    #[test]
    fn golden_bytes_of_one_entry() {
        let bytes = encode(
            GUEST,
            &[Run {
                first_page: 3,
                pages: 16,
            }],
        );
        let mut want = Vec::new();
        want.extend_from_slice(b"CKPTWS\0\x01"); // magic
        want.extend_from_slice(&[1, 0, 0, 0]); // version 1
        want.extend_from_slice(&[0, 0, 0, 0]); // reserved
        want.extend_from_slice(&[0, 0, 0x10, 0, 0, 0, 0, 0]); // guest size 1 MiB
        want.extend_from_slice(&[1, 0, 0, 0, 0, 0, 0, 0]); // one entry
        want.extend_from_slice(&[3, 0, 0, 0, 0, 0, 0, 0]); // first page 3
        want.extend_from_slice(&[16, 0, 0, 0]); // 16 pages
        let crc = crc32fast::hash(&want);
        want.extend_from_slice(&crc.to_le_bytes()); // checksum
        assert_eq!(bytes, want);
    }

    #[test]
    fn save_then_load_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm.ckpt.ws");
        let runs = vec![
            Run {
                first_page: 64,
                pages: 64,
            },
            Run {
                first_page: 0,
                pages: 64,
            },
        ];
        save(&path, GUEST, &runs).unwrap();
        assert_eq!(load(&path, GUEST).unwrap(), runs);
    }

    #[test]
    fn corrupt_sidecars_are_rejected_with_their_reason() {
        let good = encode(
            GUEST,
            &[Run {
                first_page: 1,
                pages: 1,
            }],
        );
        assert!(matches!(
            decode(&good[..10], GUEST),
            Err(WorkingSetError::Length { .. })
        ));
        let mut bad = good.clone();
        bad[0] = b'X';
        assert!(matches!(decode(&bad, GUEST), Err(WorkingSetError::Magic)));
        let mut bad = good.clone();
        bad[VERSION_OFFSET] = 9;
        assert!(matches!(
            decode(&bad, GUEST),
            Err(WorkingSetError::Version(9))
        ));
        let mut bad = good.clone();
        bad[HEADER_LEN] ^= 1;
        assert!(matches!(
            decode(&bad, GUEST),
            Err(WorkingSetError::Checksum { .. })
        ));
        assert!(matches!(
            decode(&good, GUEST * 2),
            Err(WorkingSetError::GuestSize { .. })
        ));
        let mut bad = good.clone();
        bad.push(0);
        assert!(matches!(
            decode(&bad, GUEST),
            Err(WorkingSetError::Length { .. })
        ));
    }

    #[test]
    fn runs_map_to_unique_chunks_in_order() {
        let runs = [
            Run {
                first_page: 130,
                pages: 1,
            },
            Run {
                first_page: 0,
                pages: 70,
            },
            Run {
                first_page: 128,
                pages: 128,
            },
        ];
        assert_eq!(runs_to_chunks(&runs, 64, 4), vec![2, 0, 1, 3]);
        // Runs past the end of a shrunk guest are clipped.
        assert_eq!(
            runs_to_chunks(
                &[Run {
                    first_page: 1000,
                    pages: 1
                }],
                64,
                4
            ),
            Vec::<u64>::new()
        );
    }
}
