//! Host memory of a group of processes and files: `/proc/PID/smaps` and
//! `smaps_rollup` (PSS, USS, anonymous pages, per mapping), `/proc/PID/status`
//! (page tables) and the page cache of a file (`mincore` over a private,
//! read-only mapping of it: pages the kernel holds for the file, whoever
//! mapped or read them).

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result, ensure};

/// The `Key:  N kB` fields of one smaps block, in bytes.
pub type Fields = HashMap<String, u64>;

/// One mapping of `/proc/PID/smaps`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Vma {
    /// First address.
    pub start: u64,
    /// One past the last address.
    pub end: u64,
    /// The mapped file's path, `[heap]` and the like, or empty (anonymous).
    pub path: String,
    /// Its size fields, bytes.
    pub fields: Fields,
}

impl Vma {
    /// A field in bytes (0 if absent).
    pub fn get(&self, key: &str) -> u64 {
        self.fields.get(key).copied().unwrap_or(0)
    }
}

/// Parses a `Key:   123 kB` line into (key, bytes); None for other lines.
fn kb_field(line: &str) -> Option<(String, u64)> {
    let (key, rest) = line.split_once(':')?;
    let v = rest.trim().strip_suffix("kB")?.trim().parse::<u64>().ok()?;
    Some((key.trim().to_owned(), v * 1024))
}

/// The mappings of a `/proc/PID/smaps` text.
pub fn parse_smaps(text: &str) -> Vec<Vma> {
    let mut out: Vec<Vma> = Vec::new();
    for line in text.lines() {
        if let Some((key, bytes)) = kb_field(line) {
            if let Some(v) = out.last_mut() {
                v.fields.insert(key, bytes);
            }
            continue;
        }
        // A header: `start-end perms offset dev inode   [path]`.
        let mut parts = line.split_whitespace();
        let Some((a, b)) = parts.next().and_then(|r| r.split_once('-')) else {
            continue;
        };
        let (Ok(start), Ok(end)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) else {
            continue;
        };
        let path = parts.nth(4).map_or(String::new(), |_| {
            // The path is everything after the 5th column (it may hold spaces).
            line.split_whitespace()
                .skip(5)
                .collect::<Vec<_>>()
                .join(" ")
        });
        out.push(Vma {
            start,
            end,
            path,
            fields: Fields::new(),
        });
    }
    out
}

/// The fields of a `smaps_rollup` (or `status`) text, bytes.
pub fn parse_fields(text: &str) -> Fields {
    text.lines().filter_map(kb_field).collect()
}

/// What one process uses, bytes.
#[derive(Clone, Copy, Debug, Default, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct ProcMem {
    /// Proportional set size.
    pub pss: u64,
    /// Unique set size (private clean + private dirty).
    pub uss: u64,
    /// Anonymous pages (copy-on-write copies of file pages included).
    pub anon: u64,
    /// Page tables (`VmPTE`).
    pub page_tables: u64,
}

impl ProcMem {
    /// From a `smaps_rollup` text and a `status` text.
    pub fn from_texts(rollup: &str, status: &str) -> Self {
        let r = parse_fields(rollup);
        let s = parse_fields(status);
        let f = |m: &Fields, k: &str| m.get(k).copied().unwrap_or(0);
        ProcMem {
            pss: f(&r, "Pss"),
            uss: f(&r, "Private_Clean") + f(&r, "Private_Dirty"),
            anon: f(&r, "Anonymous"),
            page_tables: f(&s, "VmPTE"),
        }
    }

    /// Of a running process.
    pub fn of(pid: u32) -> Result<Self> {
        let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
            .with_context(|| format!("process {pid} is gone"))?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        Ok(Self::from_texts(&rollup, &status))
    }

    /// Sum of several.
    pub fn sum<'a>(v: impl IntoIterator<Item = &'a ProcMem>) -> ProcMem {
        v.into_iter().fold(ProcMem::default(), |a, b| ProcMem {
            pss: a.pss + b.pss,
            uss: a.uss + b.uss,
            anon: a.anon + b.anon,
            page_tables: a.page_tables + b.page_tables,
        })
    }
}

/// Guest RAM of a VMM: the mappings of `file` (a lazy restore), else the
/// anonymous mapping of exactly `size` bytes (an eager one). Returns (resident,
/// anonymous) bytes over those mappings.
pub fn guest_ram(vmas: &[Vma], file: &Path, size: u64) -> (u64, u64) {
    let name = file.to_string_lossy();
    let mine: Vec<&Vma> = vmas.iter().filter(|v| v.path == name).collect();
    let mine = if mine.is_empty() {
        vmas.iter()
            .filter(|v| v.path.is_empty() && v.end - v.start == size)
            .collect()
    } else {
        mine
    };
    mine.iter().fold((0, 0), |(r, a), v| {
        (r + v.get("Rss"), a + v.get("Anonymous"))
    })
}

/// Guest RAM of running VMM `pid` (see [`guest_ram`]).
pub fn guest_ram_of(pid: u32, file: &Path, size: u64) -> Result<(u64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps"))
        .with_context(|| format!("process {pid} is gone"))?;
    Ok(guest_ram(&parse_smaps(&text), file, size))
}

/// Bytes of `path` in the page cache (mincore; 0 for an empty or missing file).
pub fn cached_bytes(path: &Path) -> Result<u64> {
    use std::os::fd::AsRawFd;
    let Ok(f) = std::fs::File::open(path) else {
        return Ok(0);
    };
    let len = f.metadata()?.len() as usize;
    if len == 0 {
        return Ok(0);
    }
    // SAFETY: a fresh private read-only mapping of an open file; only mincore looks at it
    // (nothing reads it, so no page is faulted in), and it is unmapped below.
    let addr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_PRIVATE,
            f.as_raw_fd(),
            0,
        )
    };
    ensure!(
        addr != libc::MAP_FAILED,
        "mapping {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
    let pages = len.div_ceil(4096);
    let mut vec = vec![0u8; pages];
    // SAFETY: `addr` maps `len` bytes; `vec` has one byte per page of them.
    let rc = unsafe { libc::mincore(addr, len, vec.as_mut_ptr()) };
    let err = std::io::Error::last_os_error();
    // SAFETY: unmaps exactly the mapping made above.
    unsafe { libc::munmap(addr, len) };
    ensure!(rc == 0, "mincore of {}: {err}", path.display());
    Ok(vec.iter().filter(|&&b| b & 1 == 1).count() as u64 * 4096)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMAPS: &str = "\
55d0c0a00000-55d0c0a21000 r--p 00000000 fe:00 1234    /usr/bin/vmm-lite
Size:                132 kB
Rss:                 132 kB
Pss:                  66 kB
Anonymous:             0 kB
7f0000000000-7f0010000000 rw-p 00000000 00:2a 2       /var/tmp/x/mnt/memory
Size:             262144 kB
Rss:               20480 kB
Pss:               10240 kB
Anonymous:          4096 kB
7f1000000000-7f1010000000 rw-p 00000000 00:00 0 
Size:             262144 kB
Rss:              262144 kB
Anonymous:        262144 kB
VmFlags: rd wr mr mw me ac
";

    #[test]
    fn smaps_mappings_and_their_fields_are_parsed() {
        let v = parse_smaps(SMAPS);
        assert_eq!(v.len(), 3);
        assert_eq!(v[0].path, "/usr/bin/vmm-lite");
        assert_eq!(v[0].get("Pss"), 66 * 1024);
        assert_eq!(v[1].end - v[1].start, 256 << 20);
        assert_eq!(v[2].path, "");
        assert_eq!(v[2].get("Anonymous"), 256 << 20);
    }

    #[test]
    fn guest_ram_is_the_file_mapping_or_the_anonymous_one_of_guest_size() {
        let v = parse_smaps(SMAPS);
        let lazy = guest_ram(&v, Path::new("/var/tmp/x/mnt/memory"), 256 << 20);
        assert_eq!(lazy, (20 << 20, 4 << 20));
        let eager = guest_ram(&v, Path::new("/var/tmp/x/mem.raw"), 256 << 20);
        assert_eq!(eager, (256 << 20, 256 << 20));
    }

    #[test]
    fn rollup_and_status_give_pss_uss_anon_and_page_tables() {
        let rollup = "00400000-7fff r--p 0 0:0 0 [rollup]\nRss: 100 kB\nPss: 60 kB\n\
                      Private_Clean: 8 kB\nPrivate_Dirty: 32 kB\nAnonymous: 30 kB\n";
        let status = "Name:\tvmm-lite\nVmRSS:\t 100 kB\nVmPTE:\t      12 kB\n";
        let m = ProcMem::from_texts(rollup, status);
        assert_eq!(
            m,
            ProcMem {
                pss: 60 * 1024,
                uss: 40 * 1024,
                anon: 30 * 1024,
                page_tables: 12 * 1024
            }
        );
        assert_eq!(ProcMem::sum([&m, &m]).uss, 80 * 1024);
    }

    #[test]
    fn a_cached_file_counts_its_pages() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, vec![7u8; 64 << 10]).unwrap();
        // Just written: in the page cache.
        assert_eq!(cached_bytes(&p).unwrap(), 64 << 10);
        assert_eq!(cached_bytes(&dir.path().join("missing")).unwrap(), 0);
    }
}
