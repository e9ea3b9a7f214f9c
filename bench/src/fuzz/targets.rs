//! What the fuzzer attacks, each with its oracle.
//!
//! - `checkpoint`: a checkpoint with ZERO, DISK, BLOB and PARENT entries (a
//!   child of a parent, both mutated in turn); every page that reads back must
//!   equal the original guest's page, whatever else happens.
//! - `loadset`: a loading set of that checkpoint; every page it lets through
//!   (`LoadingSet::verify`) must equal the original.
//! - `options`: the daemon's command line (`ckptfs-mountd`): never a panic.
//! - `zero-ranges`: the zero-ranges text; whatever is accepted lies inside
//!   guest memory, sorted and disjoint.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use ckptfs::synth::{self, Mix, Rng};
use ckptfs::{Checkpoint, CreateOptions, PAGE_SIZE, PageIndex, PageReader};

use super::mutate::{Fields, mutate};

/// What one case showed.
#[derive(Debug, Default)]
pub struct Outcome {
    /// The mutated input was accepted (opened / parsed).
    pub accepted: bool,
    /// Pages read back (all equal to the original).
    pub pages_ok: u64,
    /// A page came back with bytes other than the original's: the bug we hunt.
    pub wrong: Option<String>,
}

/// One fuzz target.
pub trait Target {
    /// Its name.
    fn name(&self) -> &'static str;
    /// Mutate a valid input and check the oracle; the input is left in
    /// [`Target::input_path`] for the record.
    fn run_case(&mut self, rng: &mut Rng) -> Outcome;
    /// Where the last case's input is.
    fn input_path(&self) -> Option<PathBuf>;
}

const GUEST_PAGES: usize = 96;
const DISK_BLOCKS: u64 = 48;

/// Header fields of format v2 (`ckptfs::format`).
fn checkpoint_fields() -> Fields {
    use ckptfs::format::*;
    let mut numbers = vec![
        (VERSION_OFFSET, 4),
        (PAGE_SIZE_OFFSET, 4),
        (FLAGS_OFFSET, 4),
    ];
    for at in [GUEST_SIZE_OFFSET, PAGE_COUNT_OFFSET] {
        numbers.push((at, 8));
    }
    for at in [
        DISKS_OFFSET,
        PARENTS_OFFSET,
        TABLE_OFFSET,
        BLOBS_OFFSET,
        STATE_OFFSET,
    ] {
        numbers.push((at, 8));
        numbers.push((at + 8, 8));
    }
    for at in [
        DISKS_CRC_OFFSET,
        PARENTS_CRC_OFFSET,
        TABLE_CRC_OFFSET,
        STATE_CRC_OFFSET,
    ] {
        numbers.push((at, 4));
    }
    Fields {
        numbers,
        header_crc: Some((HEADER_CRC_OFFSET, HEADER_CRC_OFFSET)),
    }
}

/// A child checkpoint over a parent and a disk, and the guests they hold.
pub struct CheckpointTarget {
    dir: PathBuf,
    parent: Vec<u8>,
    child: Vec<u8>,
    child_mem: Vec<u8>,
    last: PathBuf,
}

impl CheckpointTarget {
    /// Build the base files in `dir`.
    pub fn new(dir: &Path, seed: u64) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let disk = synth::disk_image(DISK_BLOCKS, seed);
        std::fs::write(dir.join("disk.img"), &disk)?;
        let plan = synth::plan(GUEST_PAGES, DISK_BLOCKS, Mix::MIXED, seed);
        let parent_mem = synth::memory_image(&plan, &disk, seed);
        // The child: the parent with a third of its pages changed.
        let mut child_mem = parent_mem.clone();
        let mut rng = Rng::new(seed ^ 0x55);
        for p in (0..GUEST_PAGES).filter(|p| p % 3 == 1) {
            rng.fill(&mut child_mem[p * PAGE_SIZE..][..64]);
        }
        let opts = |parent: Option<PathBuf>| CreateOptions {
            disks: vec![dir.join("disk.img")],
            scan_disks: true,
            parent,
            vmm_state: Some(b"fuzz vmm state".to_vec()),
            ..CreateOptions::default()
        };
        let (p, c) = (dir.join("parent.ckpt"), dir.join("child.ckpt"));
        ckptfs::create(&parent_mem, &opts(None), &p).context("creating the parent")?;
        ckptfs::create(&child_mem, &opts(Some(p.clone())), &c).context("creating the child")?;
        let child = Checkpoint::open(&c)?;
        anyhow::ensure!(
            child.parent_records().len() == 1,
            "the fuzz child has no parent"
        );
        Ok(CheckpointTarget {
            dir: dir.to_owned(),
            parent: std::fs::read(&p)?,
            child: std::fs::read(&c)?,
            child_mem,
            last: c,
        })
    }
}

/// Every page of `ck` that reads back must equal `mem`'s; returns how many did.
fn check_pages(ck: &Checkpoint, mem: &[u8]) -> Result<u64, String> {
    let _ = ckptfs::verify::inspect(ck);
    let pages = ck.page_count().min((mem.len() / PAGE_SIZE) as u64);
    let mut ok = 0;
    let mut buf = vec![0u8; 8 * PAGE_SIZE];
    for p in 0..pages {
        let one = &mut buf[..PAGE_SIZE];
        if ck.read_pages(PageIndex(p), one).is_ok() {
            if *one != mem[p as usize * PAGE_SIZE..][..PAGE_SIZE] {
                return Err(format!("page {p} read back wrong bytes"));
            }
            ok += 1;
        }
    }
    // Multi-page reads coalesce runs: check them too.
    for first in (0..pages.saturating_sub(8)).step_by(8) {
        if ck.read_pages(PageIndex(first), &mut buf).is_ok()
            && buf[..] != mem[first as usize * PAGE_SIZE..][..8 * PAGE_SIZE]
        {
            return Err(format!(
                "pages {first}..{} read back wrong bytes",
                first + 8
            ));
        }
    }
    Ok(ok)
}

impl Target for CheckpointTarget {
    fn name(&self) -> &'static str {
        "checkpoint"
    }

    fn run_case(&mut self, rng: &mut Rng) -> Outcome {
        let fields = checkpoint_fields();
        let (mut parent, mut child) = (self.parent.clone(), self.child.clone());
        let which = if rng.below(10) < 7 {
            &mut child
        } else {
            &mut parent
        };
        mutate(rng, which, &fields);
        let (p, c) = (self.dir.join("parent.ckpt"), self.dir.join("child.ckpt"));
        if std::fs::write(&p, &parent)
            .and_then(|()| std::fs::write(&c, &child))
            .is_err()
        {
            return Outcome::default();
        }
        self.last = c.clone();
        let Ok(ck) = Checkpoint::open(&c) else {
            return Outcome::default();
        };
        match check_pages(&ck, &self.child_mem) {
            Ok(pages_ok) => Outcome {
                accepted: true,
                pages_ok,
                wrong: None,
            },
            Err(e) => Outcome {
                accepted: true,
                pages_ok: 0,
                wrong: Some(e),
            },
        }
    }

    fn input_path(&self) -> Option<PathBuf> {
        Some(self.last.clone())
    }
}

/// Header fields of a loading set (`ckptfs::loadset`).
fn loadset_fields() -> Fields {
    use ckptfs::loadset::*;
    let mut numbers = vec![(VERSION_OFFSET, 4), (FLAGS_OFFSET, 4), (WINDOW_OFFSET, 4)];
    for at in [
        IDENTITY_OFFSET,
        GUEST_SIZE_OFFSET,
        RUN_COUNT_OFFSET,
        DATA_PAGES_OFFSET,
        DATA_OFFSET_OFFSET,
    ] {
        numbers.push((at, 8));
    }
    numbers.push((RUNS_CRC_OFFSET, 4));
    numbers.push((DATA_CRC_OFFSET, 4));
    // Run entries: first page, pages, flags.
    for r in 0..4 {
        let at = HEADER_LEN + r * RUN_LEN;
        numbers.extend([(at, 8), (at + 8, 4), (at + 16, 4)]);
    }
    Fields {
        numbers,
        header_crc: Some((HEADER_CRC_OFFSET, HEADER_CRC_OFFSET)),
    }
}

/// A loading set of a checkpoint of its own.
pub struct LoadSetTarget {
    ck: Checkpoint,
    path: PathBuf,
    base: Vec<u8>,
    mem: Vec<u8>,
}

impl LoadSetTarget {
    /// A checkpoint and a loading set of it in `dir`.
    pub fn new(dir: &Path, seed: u64) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let disk = synth::disk_image(DISK_BLOCKS, seed);
        std::fs::write(dir.join("disk.img"), &disk)?;
        let plan = synth::plan(GUEST_PAGES, DISK_BLOCKS, Mix::MIXED, seed);
        let mem = synth::memory_image(&plan, &disk, seed);
        let opts = CreateOptions {
            disks: vec![dir.join("disk.img")],
            scan_disks: true,
            ..CreateOptions::default()
        };
        let ckpt = dir.join("vm.ckpt");
        ckptfs::create(&mem, &opts, &ckpt)?;
        let ck = Checkpoint::open(&ckpt)?;
        let touches: Vec<(u64, u32, bool)> = [7u64, 8, 9, 3, 40, 41, 90, 2]
            .iter()
            .map(|&p| (p, p as u32, ck.is_zero(PageIndex(p))))
            .collect();
        let runs = ckptfs::loadset::runs_from_touches(&touches);
        let path = dir.join("vm.ckpt.ls");
        ckptfs::loadset::write(&path, &ck, &runs, 1000, 0o600)?;
        Ok(LoadSetTarget {
            ck,
            base: std::fs::read(&path)?,
            path,
            mem,
        })
    }
}

impl Target for LoadSetTarget {
    fn name(&self) -> &'static str {
        "loadset"
    }

    fn run_case(&mut self, rng: &mut Rng) -> Outcome {
        let ck = &self.ck;
        let mut data = self.base.clone();
        mutate(rng, &mut data, &loadset_fields());
        if std::fs::write(&self.path, &data).is_err() {
            return Outcome::default();
        }
        let Ok(set) = ckptfs::loadset::LoadingSet::open(&self.path, ck) else {
            return Outcome::default();
        };
        let mut out = Outcome {
            accepted: true,
            ..Outcome::default()
        };
        let mut reader = set.blocks(3 * PAGE_SIZE);
        while let Ok(Some(block)) = reader.next_block() {
            for p in &block.pieces {
                let bytes = &block.data[p.at..p.at + p.pages as usize * PAGE_SIZE];
                if set.verify(ck, p.first_page, bytes).is_err() {
                    continue;
                }
                let want = &self.mem[p.first_page as usize * PAGE_SIZE..][..bytes.len()];
                if bytes != want {
                    out.wrong = Some(format!(
                        "pages from {} passed with wrong bytes",
                        p.first_page
                    ));
                    return out;
                }
                out.pages_ok += u64::from(p.pages);
            }
        }
        out
    }

    fn input_path(&self) -> Option<PathBuf> {
        Some(self.path.clone())
    }
}

/// The daemon's option parser.
pub struct OptionsTarget {
    last: Vec<String>,
}

const TOKENS: &[&str] = &[
    "--foreground",
    "--cache-mb",
    "--prefetch",
    "--loading-set",
    "--no-loading-set",
    "--record-loading-set",
    "--loading-set-window",
    "--wait-loading-set",
    "--loader-threads",
    "--threads",
    "--notify-store",
    "--chunk-kb",
    "--readahead-kb",
    "-o",
    "all",
    "none",
    "readahead",
    "true",
    "false",
    "0",
    "1",
    "4",
    "-1",
    "65536",
    "18446744073709551615",
    "99999999999999999999",
    "NaN",
    "inf",
    "1e300",
    "0.001",
    "",
    ",",
    "=",
    "vm.ckpt",
    "/mnt",
    "cache_mb=",
    "prefetch=all",
    "loading_set_window=0",
    "threads=0",
    "chunk_kb=6",
    "allow_other",
    "fsname=a,b",
    "readahead_kb=70000",
    "record_loading_set,no_loading_set",
    "x-gvfs",
];

impl OptionsTarget {
    /// A fresh target.
    pub fn new() -> Self {
        OptionsTarget { last: Vec::new() }
    }
}

impl Target for OptionsTarget {
    fn name(&self) -> &'static str {
        "options"
    }

    fn run_case(&mut self, rng: &mut Rng) -> Outcome {
        use clap::Parser;
        let mut args = vec!["ckptfs-mountd".to_string()];
        for _ in 0..rng.below(10) {
            let mut t = TOKENS[rng.below(TOKENS.len() as u64) as usize].to_string();
            if rng.below(4) == 0 {
                t.push_str(TOKENS[rng.below(TOKENS.len() as u64) as usize]);
            }
            args.push(t);
        }
        self.last = args.clone();
        let accepted = mountd::options::Cli::try_parse_from(&args)
            .ok()
            .and_then(|cli| cli.settings().ok())
            .is_some();
        Outcome {
            accepted,
            ..Outcome::default()
        }
    }

    fn input_path(&self) -> Option<PathBuf> {
        None
    }
}

/// The zero-ranges text.
pub struct ZeroRangesTarget {
    base: Vec<u8>,
}

impl ZeroRangesTarget {
    /// A fresh target.
    pub fn new() -> Self {
        ZeroRangesTarget {
            base: b"0 3\n7 1\n20 44\n90 6\n".to_vec(),
        }
    }
}

impl Target for ZeroRangesTarget {
    fn name(&self) -> &'static str {
        "zero-ranges"
    }

    fn run_case(&mut self, rng: &mut Rng) -> Outcome {
        let mut data = self.base.clone();
        mutate(rng, &mut data, &Fields::default());
        let text = String::from_utf8_lossy(&data);
        let pages = GUEST_PAGES as u64;
        let Ok(ranges) = ckptfs::source::parse_zero_ranges(&text, pages) else {
            return Outcome::default();
        };
        let sane = ranges.windows(2).all(|w| w[0].end <= w[1].start)
            && ranges.iter().all(|r| r.start < r.end && r.end <= pages);
        Outcome {
            accepted: true,
            pages_ok: 0,
            wrong: (!sane).then(|| format!("accepted bad ranges {ranges:?}")),
        }
    }

    fn input_path(&self) -> Option<PathBuf> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_checkpoint_oracle_catches_wrong_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = CheckpointTarget::new(dir.path(), 5).unwrap();
        let ck = Checkpoint::open(&dir.path().join("child.ckpt")).unwrap();
        assert_eq!(check_pages(&ck, &t.child_mem).unwrap(), GUEST_PAGES as u64);
        let mut other = t.child_mem.clone();
        other[5 * PAGE_SIZE + 9] ^= 1;
        assert!(check_pages(&ck, &other).unwrap_err().contains("page 5"));
        // A mutated case never passes wrong bytes.
        let out = t.run_case(&mut Rng::new(9));
        assert!(out.wrong.is_none());
    }

    #[test]
    fn the_zero_ranges_oracle_accepts_the_base_text() {
        let t = ZeroRangesTarget::new();
        let text = String::from_utf8(t.base.clone()).unwrap();
        assert_eq!(
            ckptfs::source::parse_zero_ranges(&text, GUEST_PAGES as u64)
                .unwrap()
                .len(),
            4
        );
    }
}
