//! The disk table and the parent table: what a checkpoint needs besides itself.
//!
//! ```text
//!  disk table:   u32 count, then per disk:
//!                  u32 path_len, path bytes, u32 format (0 raw, 1 qcow2),
//!                  u64 size (of the disk as the guest sees it), u64 fingerprint
//!  parent table: u32 count, then per parent:
//!                  u32 path_len, path bytes, u64 file size,
//!                  u64 identity (xxh3 of its header), u64 fingerprint (sampled file content)
//! ```

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use super::entry::{MAX_DISKS, MAX_PARENTS};
use super::{FormatError, get_u32, get_u64};

/// Longest path a table entry holds (Linux's PATH_MAX).
pub const MAX_PATH_LEN: usize = 4096;

/// Container format of a disk image.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    /// A raw image: byte `i` of the file is byte `i` of the disk.
    Raw,
    /// A qcow2 image, read through its cluster mapping (and backing chain).
    Qcow2,
}

impl DiskFormat {
    fn code(self) -> u32 {
        match self {
            DiskFormat::Raw => 0,
            DiskFormat::Qcow2 => 1,
        }
    }

    fn from_code(c: u32) -> Option<Self> {
        match c {
            0 => Some(DiskFormat::Raw),
            1 => Some(DiskFormat::Qcow2),
            _ => None,
        }
    }

    /// Lower-case name ("raw", "qcow2").
    pub fn name(self) -> &'static str {
        match self {
            DiskFormat::Raw => "raw",
            DiskFormat::Qcow2 => "qcow2",
        }
    }
}

/// One backing disk image as recorded in the disk table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskRecord {
    /// Absolute path of the image at checkpoint time.
    pub path: PathBuf,
    /// Its container format.
    pub format: DiskFormat,
    /// Size of the disk in bytes (a qcow2 image's virtual size).
    pub size: u64,
    /// Sampled content fingerprint (see [`crate::disk::DiskImage::fingerprint`]).
    pub fingerprint: u64,
}

/// One parent checkpoint as recorded in the parent table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParentRecord {
    /// Absolute path of the parent at checkpoint time.
    pub path: PathBuf,
    /// Its file size in bytes.
    pub size: u64,
    /// Its identity ([`crate::Checkpoint::identity`]: covers its header and
    /// through it the CRCs of its tables, every page's CRC and its state).
    pub identity: u64,
    /// Sampled content fingerprint of the parent file (covers its blobs).
    pub fingerprint: u64,
}

fn put_path(out: &mut Vec<u8>, p: &std::path::Path) {
    let b = p.as_os_str().as_bytes();
    out.extend_from_slice(&(b.len() as u32).to_le_bytes());
    out.extend_from_slice(b);
}

/// Serialize the disk table.
pub fn encode_disks(disks: &[DiskRecord]) -> Vec<u8> {
    let mut out = (disks.len() as u32).to_le_bytes().to_vec();
    for d in disks {
        put_path(&mut out, &d.path);
        out.extend_from_slice(&d.format.code().to_le_bytes());
        out.extend_from_slice(&d.size.to_le_bytes());
        out.extend_from_slice(&d.fingerprint.to_le_bytes());
    }
    out
}

/// Serialize the parent table.
pub fn encode_parents(parents: &[ParentRecord]) -> Vec<u8> {
    let mut out = (parents.len() as u32).to_le_bytes().to_vec();
    for p in parents {
        put_path(&mut out, &p.path);
        out.extend_from_slice(&p.size.to_le_bytes());
        out.extend_from_slice(&p.identity.to_le_bytes());
        out.extend_from_slice(&p.fingerprint.to_le_bytes());
    }
    out
}

/// A cursor over a table's bytes; every read is bounds-checked.
struct Reader<'a> {
    b: &'a [u8],
    at: usize,
    err: fn(&'static str) -> FormatError,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], FormatError> {
        let s = self
            .at
            .checked_add(n)
            .and_then(|end| self.b.get(self.at..end))
            .ok_or((self.err)("entry runs past the end of the table"))?;
        self.at += n;
        Ok(s)
    }

    fn u32(&mut self) -> Result<u32, FormatError> {
        Ok(get_u32(self.take(4)?, 0))
    }

    fn u64(&mut self) -> Result<u64, FormatError> {
        Ok(get_u64(self.take(8)?, 0))
    }

    fn path(&mut self) -> Result<PathBuf, FormatError> {
        let n = self.u32()? as usize;
        if n == 0 || n > MAX_PATH_LEN {
            return Err((self.err)("path is empty or longer than 4096 bytes"));
        }
        let bytes = self.take(n)?;
        if bytes.contains(&0) {
            return Err((self.err)("path contains a NUL byte"));
        }
        Ok(OsStr::from_bytes(bytes).into())
    }

    /// The entry count, bounded by `max` and by what the table's bytes can hold.
    fn count(&mut self, max: usize, min_entry: usize) -> Result<usize, FormatError> {
        let n = self.u32()? as usize;
        if n > max || n.saturating_mul(min_entry) > self.b.len() - self.at {
            return Err((self.err)("more entries than the table can hold"));
        }
        Ok(n)
    }

    fn finish(&self) -> Result<(), FormatError> {
        if self.at != self.b.len() {
            return Err((self.err)("trailing bytes after the last entry"));
        }
        Ok(())
    }
}

/// Parse the disk table.
pub fn decode_disks(b: &[u8]) -> Result<Vec<DiskRecord>, FormatError> {
    let mut r = Reader {
        b,
        at: 0,
        err: FormatError::BadDiskTable,
    };
    let count = r.count(MAX_DISKS, 4 + 1 + 4 + 8 + 8)?;
    let mut disks = Vec::with_capacity(count);
    for _ in 0..count {
        let path = r.path()?;
        let format = DiskFormat::from_code(r.u32()?)
            .ok_or(FormatError::BadDiskTable("unknown disk format"))?;
        disks.push(DiskRecord {
            path,
            format,
            size: r.u64()?,
            fingerprint: r.u64()?,
        });
    }
    r.finish()?;
    Ok(disks)
}

/// Parse the parent table.
pub fn decode_parents(b: &[u8]) -> Result<Vec<ParentRecord>, FormatError> {
    let mut r = Reader {
        b,
        at: 0,
        err: FormatError::BadParentTable,
    };
    let count = r.count(MAX_PARENTS, 4 + 1 + 8 + 8 + 8)?;
    let mut parents = Vec::with_capacity(count);
    for _ in 0..count {
        parents.push(ParentRecord {
            path: r.path()?,
            size: r.u64()?,
            identity: r.u64()?,
            fingerprint: r.u64()?,
        });
    }
    r.finish()?;
    Ok(parents)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn disks() -> Vec<DiskRecord> {
        vec![
            DiskRecord {
                path: "/a/b.img".into(),
                format: DiskFormat::Raw,
                size: 1 << 30,
                fingerprint: 42,
            },
            DiskRecord {
                path: "/c.qcow2".into(),
                format: DiskFormat::Qcow2,
                size: 4096,
                fingerprint: 7,
            },
        ]
    }

    #[test]
    fn disk_table_golden_bytes() {
        let b = encode_disks(&disks()[1..]);
        let mut want = vec![1, 0, 0, 0]; // count
        want.extend([8, 0, 0, 0]); // path length
        want.extend(b"/c.qcow2"); // path
        want.extend([1, 0, 0, 0]); // format 1 = qcow2
        want.extend([0, 0x10, 0, 0, 0, 0, 0, 0]); // size 4096
        want.extend([7, 0, 0, 0, 0, 0, 0, 0]); // fingerprint
        assert_eq!(b, want);
    }

    #[test]
    fn parent_table_golden_bytes() {
        let p = ParentRecord {
            path: "/p.ckpt".into(),
            size: 8192,
            identity: 0x0102_0304_0506_0708,
            fingerprint: 9,
        };
        let mut want = vec![1, 0, 0, 0]; // count
        want.extend([7, 0, 0, 0]); // path length
        want.extend(b"/p.ckpt"); // path
        want.extend([0, 0x20, 0, 0, 0, 0, 0, 0]); // file size 8192
        want.extend([8, 7, 6, 5, 4, 3, 2, 1]); // identity
        want.extend([9, 0, 0, 0, 0, 0, 0, 0]); // fingerprint
        assert_eq!(encode_parents(std::slice::from_ref(&p)), want);
        assert_eq!(decode_parents(&want), Ok(vec![p]));
    }

    #[test]
    fn tables_round_trip_and_reject_truncation() {
        let b = encode_disks(&disks());
        assert_eq!(decode_disks(&b), Ok(disks()));
        assert!(decode_disks(&b[..b.len() - 1]).is_err());
        assert!(decode_disks(&[]).is_err());
        let mut extra = b.clone();
        extra.push(0);
        assert_eq!(
            decode_disks(&extra),
            Err(FormatError::BadDiskTable(
                "trailing bytes after the last entry"
            ))
        );
        assert_eq!(decode_parents(&encode_parents(&[])), Ok(vec![]));
    }

    #[test]
    fn huge_counts_are_refused_without_allocating() {
        let b = u32::MAX.to_le_bytes();
        assert!(decode_disks(&b).is_err());
        let mut b = 1000u32.to_le_bytes().to_vec();
        b.extend([0u8; 64]);
        assert_eq!(
            decode_parents(&b),
            Err(FormatError::BadParentTable(
                "more entries than the table can hold"
            ))
        );
    }

    proptest! {
        #[test]
        fn decoding_any_bytes_never_panics(b in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode_disks(&b);
            let _ = decode_parents(&b);
        }
    }
}
