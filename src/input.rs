//! Opening input files without trusting them.
//!
//! Every file ckptfs reads (memory dumps, disk images, VMM state, checkpoints
//! and their parents) is opened `O_NONBLOCK` and checked with `fstat` before a
//! byte is read: opening a FIFO for reading blocks until a writer appears, and
//! `/dev/zero` never ends, so anything but a regular file is refused by type.
//! `O_NONBLOCK` has no effect on regular files (reads of them never return
//! EAGAIN), so the descriptor is used as is afterwards.

use std::fs::{File, Metadata};
use std::io;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// What kind of file `meta` describes, in words.
pub fn kind_name(meta: &Metadata) -> &'static str {
    let t = meta.file_type();
    if t.is_file() {
        "a regular file"
    } else if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else {
        "not a regular file"
    }
}

/// Open `path` read-only without blocking, and refuse anything but a regular
/// file with an error that names its type ("not a regular file (a FIFO)").
pub fn open_regular(path: &Path) -> io::Result<(File, Metadata)> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("not a regular file ({})", kind_name(&meta)),
        ));
    }
    Ok((file, meta))
}

/// The permission bits (`0o777` part) of `meta`.
pub fn mode_bits(meta: &Metadata) -> u32 {
    meta.permissions().mode() & 0o777
}

/// Read a whole regular file of at most `max` bytes (checked before reading).
pub fn read_regular(path: &Path, max: u64) -> io::Result<(Vec<u8>, Metadata)> {
    use std::io::Read;
    let (file, meta) = open_regular(path)?;
    if meta.len() > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} bytes, more than the {max}-byte limit", meta.len()),
        ));
    }
    let mut out = Vec::with_capacity(meta.len() as usize);
    // take(): a file that grows while being read still stops at the limit.
    file.take(max + 1).read_to_end(&mut out)?;
    if out.len() as u64 > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("grew past the {max}-byte limit while being read"),
        ));
    }
    Ok((out, meta))
}

/// Read up to `buf.len()` bytes at `offset`, stopping early only at the end of the file.
pub fn read_up_to(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    use std::os::unix::fs::FileExt;
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// The first offset at or after `from` (below `end`) that is in a hole of
/// `file`, if any (SEEK_HOLE; a file system without it reports no hole).
pub fn first_hole(file: &File, from: u64, end: u64) -> io::Result<Option<u64>> {
    use std::os::fd::AsRawFd;
    if from >= end {
        return Ok(None);
    }
    // SAFETY: lseek on a valid open descriptor; it only moves the file offset.
    let r = unsafe { libc::lseek(file.as_raw_fd(), from as libc::off_t, libc::SEEK_HOLE) };
    if r < 0 {
        let e = io::Error::last_os_error();
        // ENXIO: `from` is at or past the end; EINVAL: no SEEK_HOLE support.
        return match e.raw_os_error() {
            Some(libc::ENXIO) | Some(libc::EINVAL) => Ok(None),
            _ => Err(e),
        };
    }
    Ok(Some(r as u64).filter(|&h| h < end))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fifo_is_refused_by_type_without_blocking() {
        let d = tempfile::tempdir().unwrap();
        let fifo = d.path().join("f");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo with a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let err = open_regular(&fifo).unwrap_err();
        assert_eq!(err.to_string(), "not a regular file (a FIFO)");
        let err = open_regular(d.path()).unwrap_err();
        assert_eq!(err.to_string(), "not a regular file (a directory)");
        let err = read_regular(Path::new("/dev/zero"), 10).unwrap_err();
        assert_eq!(err.to_string(), "not a regular file (a character device)");
    }

    #[test]
    fn read_regular_checks_the_size_first() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("s");
        std::fs::write(&p, b"12345").unwrap();
        assert_eq!(read_regular(&p, 5).unwrap().0, b"12345");
        let err = read_regular(&p, 4).unwrap_err();
        assert_eq!(err.to_string(), "5 bytes, more than the 4-byte limit");
    }

    #[test]
    fn holes_are_found() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("sparse");
        let f = File::create(&p).unwrap();
        f.set_len(1 << 20).unwrap();
        use std::os::unix::fs::FileExt;
        f.write_all_at(&[1u8; 8192], 0).unwrap();
        f.sync_all().unwrap();
        let f = File::open(&p).unwrap();
        assert_eq!(first_hole(&f, 0, 4096).unwrap(), None);
        let h = first_hole(&f, 0, 1 << 20).unwrap();
        assert!(h.is_some_and(|h| h >= 8192), "{h:?}");
    }
}

/// How a file will be read, told to the kernel (`posix_fadvise`): `Random`
/// makes every read fetch exactly what it asks for, with no readahead around
/// it (on a disk whose `read_ahead_kb` is 8 MiB, a cold 4 KiB pread can
/// otherwise pull megabytes, which a bandwidth-capped restore pays for).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// The kernel's default readahead.
    Normal,
    /// No readahead.
    Random,
    /// Read from start to end: a doubled readahead window.
    Sequential,
}

/// Tell the kernel how `file` will be read (best effort).
pub fn advise(file: &File, access: Access) {
    use std::os::fd::AsRawFd;
    let advice = match access {
        Access::Normal => libc::POSIX_FADV_NORMAL,
        Access::Random => libc::POSIX_FADV_RANDOM,
        Access::Sequential => libc::POSIX_FADV_SEQUENTIAL,
    };
    // SAFETY: posix_fadvise only advises the kernel about an open descriptor.
    unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, advice) };
}

/// Drop `[offset, offset + len)` of `file` (`len` 0: to its end) from the page cache (best effort):
/// for bytes read once whose copy lives on elsewhere (a loading set's pages,
/// a checkpoint's stored pages, once they are in the page cache of `memory`).
pub fn drop_cached(file: &File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    // SAFETY: posix_fadvise only advises the kernel about an open descriptor.
    unsafe {
        libc::posix_fadvise(
            file.as_raw_fd(),
            offset as libc::off_t,
            len as libc::off_t,
            libc::POSIX_FADV_DONTNEED,
        )
    };
}

/// The user a file must be readable by: a daemon running as root on behalf of
/// someone else serves a checkpoint only if that user could read it and every
/// disk image and parent it names (the fingerprints and CRCs are integrity
/// checks, not access control).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reader {
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Supplementary groups.
    pub groups: Vec<u32>,
}

impl Reader {
    /// The user `uid` with the groups the system lists for them.
    pub fn of_uid(uid: u32) -> io::Result<Reader> {
        // SAFETY: passwd is plain data; getpwuid_r fills it from `buf`, which
        // outlives every use of the pointers it sets.
        let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
        let mut buf = vec![0 as libc::c_char; 16384];
        let mut res: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: all pointers are valid for the sizes given.
        let rc = unsafe { libc::getpwuid_r(uid, &mut pw, buf.as_mut_ptr(), buf.len(), &mut res) };
        if rc != 0 || res.is_null() {
            // A uid without a passwd entry: its own gid is unknown; no groups.
            return Ok(Reader {
                uid,
                gid: u32::MAX,
                groups: Vec::new(),
            });
        }
        let gid = pw.pw_gid;
        let mut groups = vec![0 as libc::gid_t; 256];
        let mut n = groups.len() as libc::c_int;
        // SAFETY: pw_name points into `buf` (alive); `groups` holds `n` entries.
        let rc = unsafe { libc::getgrouplist(pw.pw_name, gid, groups.as_mut_ptr(), &mut n) };
        groups.truncate(if rc < 0 { 0 } else { n.max(0) as usize });
        Ok(Reader { uid, gid, groups })
    }

    /// The user named `who` (a name or a numeric uid).
    pub fn named(who: &str) -> io::Result<Reader> {
        if let Ok(uid) = who.parse::<u32>() {
            return Reader::of_uid(uid);
        }
        let name = std::ffi::CString::new(who)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "user name contains NUL"))?;
        // SAFETY: as in `of_uid`; `name` is a valid C string.
        let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
        let mut buf = vec![0 as libc::c_char; 16384];
        let mut res: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: all pointers are valid for the sizes given.
        let rc = unsafe {
            libc::getpwnam_r(
                name.as_ptr(),
                &mut pw,
                buf.as_mut_ptr(),
                buf.len(),
                &mut res,
            )
        };
        if rc != 0 || res.is_null() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("no user named {who:?}"),
            ));
        }
        Reader::of_uid(pw.pw_uid)
    }

    fn allows(&self, m: &Metadata, bit: u32) -> bool {
        use std::os::unix::fs::MetadataExt;
        let mode = m.mode();
        let class = if m.uid() == self.uid {
            mode >> 6
        } else if m.gid() == self.gid || self.groups.contains(&m.gid()) {
            mode >> 3
        } else {
            mode
        };
        class & bit != 0
    }

    /// Whether this user could read `path`: search permission on every
    /// directory above it (after resolving symlinks) and read permission on
    /// the file. Root may read everything.
    pub fn may_read(&self, path: &Path) -> io::Result<bool> {
        if self.uid == 0 {
            return Ok(true);
        }
        let real = std::fs::canonicalize(path)?;
        for dir in real.ancestors().skip(1) {
            if !self.allows(&std::fs::metadata(dir)?, 0o1) {
                return Ok(false);
            }
        }
        Ok(self.allows(&std::fs::metadata(&real)?, 0o4))
    }
}
