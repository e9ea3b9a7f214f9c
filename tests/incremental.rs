//! Incremental checkpoints: a caller's set of changed pages (a VMM's dirty log)
//! makes every other page a PARENT reference without reading it; chains of
//! such checkpoints read back exactly, `inspect` shows what each link holds,
//! `flatten` makes one self-contained file with the same pages, and a parent
//! that changed makes every dependent refuse to open.

mod common;

use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use ckptfs::format::Location;
use ckptfs::{Checkpoint, CreateError, CreateOptions, PageIndex, PageSet};
use common::*;

fn read_all(ck: &Checkpoint) -> Vec<u8> {
    let mut out = vec![0u8; ck.guest_size() as usize];
    ck.read_pages(PageIndex(0), &mut out).unwrap();
    out
}

fn incremental(parent: &Path, changed: PageSet) -> CreateOptions {
    CreateOptions {
        parent: Some(parent.to_owned()),
        changed: Some(changed),
        ..Default::default()
    }
}

/// `mem` with fresh random bytes written into `pages`; returns the set written.
fn write_pages(mem: &mut [u8], pages: impl IntoIterator<Item = u64>, seed: u64) -> PageSet {
    let mut rng = ckptfs::synth::Rng::new(seed);
    let mut set = PageSet::new((mem.len() / 4096) as u64);
    for p in pages {
        rng.fill(&mut mem[p as usize * 4096..][..4096]);
        set.insert(PageIndex(p));
    }
    set
}

fn ckptfs_cli(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ckptfs"))
        .args(args)
        .output()
        .unwrap()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Pages of a file mapping that are in the page cache.
fn resident(map: &[u8]) -> Vec<bool> {
    let mut vec = vec![0u8; map.len().div_ceil(4096)];
    // SAFETY: `map` is a live mapping of map.len() bytes starting at a page
    // boundary (memmap2 maps whole pages), and `vec` has one byte per page of it.
    let rc = unsafe { libc::mincore(map.as_ptr() as *mut _, map.len(), vec.as_mut_ptr()) };
    assert_eq!(rc, 0, "mincore: {}", std::io::Error::last_os_error());
    vec.iter().map(|b| b & 1 != 0).collect()
}

#[test]
fn pages_left_out_of_the_changed_set_are_never_read() {
    let f = fixture(512, 128, 61);
    let opts = CreateOptions {
        disks: vec![f.disk.clone()],
        scan_disks: true,
        ..Default::default()
    };
    ckptfs::create(&f.mem, &opts, &f.ckpt).unwrap();
    let mut mem = f.mem.clone();
    let changed = write_pages(&mut mem, (0..512).step_by(37), 5);
    // The changed memory as a file, out of the page cache, mapped without
    // read-ahead: a page is resident afterwards only if create touched it.
    let file_path = f.dir.path().join("child.raw");
    std::fs::write(&file_path, &mem).unwrap();
    let file = std::fs::File::open(&file_path).unwrap();
    file.sync_all().unwrap();
    // SAFETY: a plain advice call on a descriptor we own.
    let rc = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(rc, 0);
    // SAFETY: the file is private to this test and not modified while mapped.
    let map = unsafe { memmap2::Mmap::map(&file) }.unwrap();
    map.advise(memmap2::Advice::Random).unwrap();
    assert!(
        resident(&map).iter().all(|r| !r),
        "the page cache was not dropped"
    );

    let child = f.dir.path().join("child.ckpt");
    let s = ckptfs::create(&map, &incremental(&f.ckpt, changed.clone()), &child).unwrap();
    let read: Vec<u64> = (0..512u64)
        .filter(|&p| resident(&map)[p as usize])
        .collect();
    let want: Vec<u64> = changed.iter().map(|p| p.0).collect();
    assert_eq!(read, want, "create read exactly the changed pages");
    assert_eq!(s.unchanged_pages, 512 - changed.count());
    assert_eq!(s.blobs_stored, changed.count());
    let ck = Checkpoint::open(&child).unwrap();
    assert_eq!(read_all(&ck), mem);
    // Unchanged pages are PARENT, or ZERO where the parent's page is zero.
    for p in (0..512u64).filter(|p| !changed.contains(PageIndex(*p))) {
        let (loc, _) = ck.stored_entry(PageIndex(p)).unwrap();
        match f.plan[p as usize] {
            Planted::Zero => assert_eq!(loc, Location::Zero, "page {p}"),
            _ => assert!(matches!(loc, Location::Parent(_)), "page {p}: {loc:?}"),
        }
    }
}

#[test]
fn a_changed_page_that_still_holds_the_parents_bytes_becomes_parent() {
    let f = fixture(64, 32, 62);
    ckptfs::create(&f.mem, &CreateOptions::default(), &f.ckpt).unwrap();
    let mut changed = PageSet::new(64);
    changed.insert_range(0..64);
    let child = f.dir.path().join("child.ckpt");
    let s = ckptfs::create(&f.mem, &incremental(&f.ckpt, changed), &child).unwrap();
    assert_eq!(s.unchanged_pages, 0);
    assert_eq!(s.blobs_stored, 0);
    assert_eq!(s.parent_pages + s.zero_pages, 64);
}

#[test]
fn changed_sets_that_cannot_be_honoured_are_refused() {
    let f = fixture(64, 32, 63);
    ckptfs::create(&f.mem, &CreateOptions::default(), &f.ckpt).unwrap();
    let out = f.dir.path().join("child.ckpt");
    let no_parent = CreateOptions {
        changed: Some(PageSet::new(64)),
        ..Default::default()
    };
    let e = ckptfs::create(&f.mem, &no_parent, &out).unwrap_err();
    assert!(matches!(e, CreateError::ChangedWithoutParent), "{e}");
    let e = ckptfs::create(&f.mem, &incremental(&f.ckpt, PageSet::new(63)), &out).unwrap_err();
    assert_eq!(
        e.to_string(),
        "the set of changed pages covers 63 pages, the memory image 64"
    );
    // A guest larger than its parent: the new pages must be in the set.
    let mut bigger = f.mem.clone();
    bigger.extend(vec![1u8; 2 * 4096]);
    let mut changed = PageSet::new(66);
    changed.insert(PageIndex(64));
    let e = ckptfs::create(&bigger, &incremental(&f.ckpt, changed.clone()), &out).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "page 65 (guest address 0x41000) is not in the set of changed pages, but the parent checkpoint {} has only 64 pages",
            f.ckpt.display()
        )
    );
    changed.insert(PageIndex(65));
    let s = ckptfs::create(&bigger, &incremental(&f.ckpt, changed), &out).unwrap();
    assert_eq!(read_all(&Checkpoint::open(&out).unwrap()), bigger);
    assert_eq!(s.unchanged_pages, 64);
    assert!(!out.with_extension("").exists());
}

/// A base checkpoint and two incremental ones on top, each changing a few pages.
struct Chain {
    f: Fixture,
    links: Vec<PathBuf>,
    mems: Vec<Vec<u8>>,
}

fn chain(pages: usize, seed: u64) -> Chain {
    let f = fixture(pages, 128, seed);
    let opts = CreateOptions {
        disks: vec![f.disk.clone()],
        scan_disks: true,
        ..Default::default()
    };
    ckptfs::create(&f.mem, &opts, &f.ckpt).unwrap();
    let mut links = vec![f.ckpt.clone()];
    let mut mems = vec![f.mem.clone()];
    for (k, step) in [(1u64, 7u64), (2, 11)] {
        let mut mem = mems.last().unwrap().clone();
        let changed = write_pages(&mut mem, (k..pages as u64).step_by(step as usize), seed + k);
        let out = f.dir.path().join(format!("next{k}.ckpt"));
        ckptfs::create(&mem, &incremental(links.last().unwrap(), changed), &out).unwrap();
        links.push(out);
        mems.push(mem);
    }
    Chain { f, links, mems }
}

#[test]
fn a_chain_of_three_reads_back_each_link_and_inspect_shows_what_each_holds() {
    let c = chain(256, 64);
    for (link, mem) in c.links.iter().zip(&c.mems) {
        assert_eq!(&read_all(&Checkpoint::open(link).unwrap()), mem);
    }
    let top = Checkpoint::open(&c.links[2]).unwrap();
    assert_eq!(top.ancestors().len(), 2);
    let ins = ckptfs::verify::inspect(&top);
    let paths: Vec<String> = ins.chain.iter().map(|l| l.path.clone()).collect();
    let want: Vec<String> = [&c.links[2], &c.links[1], &c.links[0]]
        .iter()
        .map(|p| std::path::absolute(p).unwrap().display().to_string())
        .collect();
    assert_eq!(paths[1..], want[1..]);
    assert_eq!(ins.chain[0].parents, vec![Some(1)]);
    assert_eq!(ins.chain[1].parents, vec![Some(2)]);
    assert!(ins.chain[2].parents.is_empty());
    // Each page is held by exactly one link: the newest that wrote it, and the
    // newest link for a page still zero (an unwritten zero page stays ZERO).
    let holds: Vec<u64> = ins.chain.iter().map(|l| l.holds).collect();
    let written = |k: u64, step: usize, p: u64| p >= k && (k..256).step_by(step).any(|q| q == p);
    let mut want = [0u64; 3];
    for p in 0..256u64 {
        let zero = c.f.plan[p as usize] == Planted::Zero;
        let link = match (written(2, 11, p), written(1, 7, p)) {
            (true, _) => 0,
            (false, true) => 1,
            (false, false) if zero => 0,
            _ => 2,
        };
        want[link] += 1;
    }
    assert_eq!(holds, want);
    assert_eq!(ins.unresolved_pages, 0);
    let r = ckptfs::verify::verify(&top, Some(&c.mems[2]), |_| {});
    assert!(r.ok(), "{:?}", r.first_bad);
    assert_eq!(r.chain_files, 3);
}

#[test]
fn flatten_cli_writes_the_same_memory_and_inspect_verify_show_the_chain() {
    let c = chain(256, 65);
    let top = &c.links[2];
    let flat = c.f.dir.path().join("flat.ckpt");
    let out = ckptfs_cli(&["flatten", s(top), "-o", s(&flat), "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let sum: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(sum["chain_files"], 3);
    assert_eq!(sum["pages"], 256);
    let f = Checkpoint::open(&flat).unwrap();
    assert!(f.parent_records().is_empty());
    assert_eq!(read_all(&f), c.mems[2]);
    let mem = c.f.dir.path().join("top.raw");
    std::fs::write(&mem, &c.mems[2]).unwrap();
    let out = ckptfs_cli(&["verify", s(top), "--mem", s(&mem)]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("through a chain of 3 checkpoint files"),
        "{text}"
    );
    let out = ckptfs_cli(&["inspect", s(top)]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("  chain                3 files"), "{text}");
    for n in 0..3 {
        assert!(text.contains(&format!("    #{n} ")), "{text}");
    }
    // Flattening over one of its own inputs is refused before anything is written.
    let before = std::fs::read(&c.links[0]).unwrap();
    let out = ckptfs_cli(&["flatten", s(top), "-o", s(&c.links[0])]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("refusing to overwrite"), "{err}");
    assert_eq!(std::fs::read(&c.links[0]).unwrap(), before);
}

#[test]
fn a_modified_or_missing_base_makes_every_dependent_refuse_to_open() {
    let c = chain(128, 66);
    let base = &c.links[0];
    let good = std::fs::read(base).unwrap();
    // Re-created from other memory: the identity changes.
    let mut other = c.mems[0].clone();
    other[5] ^= 1;
    std::fs::remove_file(base).unwrap();
    ckptfs::create(&other, &CreateOptions::default(), base).unwrap();
    let abs = |p: &Path| std::path::absolute(p).unwrap().display().to_string();
    for dependent in &c.links[1..] {
        let out = ckptfs_cli(&["flatten", s(dependent), "-o", s(&c.f.dir.path().join("x"))]);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(
            err.contains(&format!(
                "parent checkpoint {} changed since it was made",
                abs(base)
            )),
            "{err}"
        );
        let out = ckptfs_cli(&["verify", s(dependent)]);
        assert!(!out.status.success());
    }
    assert!(!c.f.dir.path().join("x").exists());
    std::fs::remove_file(base).unwrap();
    let out = ckptfs_cli(&["inspect", s(&c.links[2])]);
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("    #1 "), "{text}");
    // Put back, the chain opens again.
    std::fs::write(base, &good).unwrap();
    assert_eq!(read_all(&Checkpoint::open(&c.links[2]).unwrap()), c.mems[2]);
}

#[test]
fn the_output_may_not_replace_an_ancestor_of_the_parent() {
    let c = chain(64, 67);
    let mut changed = PageSet::new(64);
    changed.insert(PageIndex(3));
    let e =
        ckptfs::create(&c.mems[2], &incremental(&c.links[2], changed), &c.links[0]).unwrap_err();
    assert!(matches!(e, CreateError::OutputIsInput(_)), "{e}");
    assert!(Checkpoint::open(&c.links[2]).is_ok());
}

#[test]
fn a_chain_grows_to_the_longest_that_opens_and_then_must_be_flattened() {
    let f = fixture(16, 16, 68);
    ckptfs::create(&f.mem, &CreateOptions::default(), &f.ckpt).unwrap();
    let mut mem = f.mem.clone();
    let mut top = f.ckpt.clone();
    let longest = ckptfs::checkpoint::MAX_PARENT_DEPTH + 1;
    for k in 1..longest {
        let changed = write_pages(&mut mem, [k as u64 % 16], k as u64);
        let next = f.dir.path().join(format!("c{k}.ckpt"));
        ckptfs::create(&mem, &incremental(&top, changed), &next).unwrap();
        top = next;
    }
    let ck = Checkpoint::open(&top).unwrap();
    assert_eq!(1 + ck.ancestors().len(), longest);
    assert_eq!(read_all(&ck), mem);
    let out = f.dir.path().join("one-too-many.ckpt");
    let e = ckptfs::create(&mem, &incremental(&top, PageSet::new(16)), &out).unwrap_err();
    assert!(
        e.to_string()
            .contains(&format!("ends a chain of {longest} checkpoint files")),
        "{e}"
    );
    let flat = f.dir.path().join("flat.ckpt");
    ckptfs::flatten::flatten(&ck, &flat, false).unwrap();
    ckptfs::create(&mem, &incremental(&flat, PageSet::new(16)), &out).unwrap();
    assert_eq!(read_all(&Checkpoint::open(&out).unwrap()), mem);
}

#[test]
fn content_scan_create_parent_builds_a_chain_through_the_cli() {
    let f = fixture(256, 64, 69);
    let mut mems = vec![f.mem.clone()];
    let mut paths = vec![f.ckpt.clone()];
    let out = ckptfs_cli(&[
        "create",
        "--mem",
        s(&f.mem_path),
        "--disk",
        s(&f.disk),
        "-o",
        s(&f.ckpt),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for k in 1..3u64 {
        let mut mem = mems.last().unwrap().clone();
        let written = write_pages(&mut mem, (k..256).step_by(9), 70 + k);
        let raw = f.dir.path().join(format!("m{k}.raw"));
        std::fs::write(&raw, &mem).unwrap();
        let ckpt = f.dir.path().join(format!("m{k}.ckpt"));
        let out = ckptfs_cli(&[
            "create",
            "--mem",
            s(&raw),
            "--parent",
            s(paths.last().unwrap()),
            "-o",
            s(&ckpt),
            "--json",
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let sum: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        // Every page not written is the parent's (compared by CRC, then byte for byte).
        assert_eq!(sum["blobs_stored"], written.count());
        assert_eq!(
            sum["unchanged_pages"], 0,
            "a dump is compared, never taken on trust"
        );
        mems.push(mem);
        paths.push(ckpt);
    }
    let out = ckptfs_cli(&["inspect", s(&paths[2]), "--json"]);
    assert!(out.status.success());
    let ins: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(ins["chain"].as_array().unwrap().len(), 3);
    let flat = f.dir.path().join("flat.ckpt");
    let out = ckptfs_cli(&["flatten", s(&paths[2]), "-o", s(&flat)]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let raw = f.dir.path().join("m2.raw");
    let out = ckptfs_cli(&["verify", s(&flat), "--mem", s(&raw)]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn flatten_stops_at_a_damaged_blob_of_an_ancestor_and_writes_nothing() {
    let c = chain(1024, 70);
    let base = &c.links[0];
    let ck = Checkpoint::open(base).unwrap();
    let blobs = ck.header().blobs();
    drop(ck);
    let mut bytes = std::fs::read(base).unwrap();
    // A blob block the parent fingerprint does not sample: the chain still opens.
    let sampled = ckptfs::disk::fingerprint_blocks(bytes.len() as u64);
    let block = (blobs.offset / 4096..blobs.end() / 4096)
        .find(|b| !sampled.contains(b))
        .unwrap();
    bytes[block as usize * 4096 + 100] ^= 0x5a;
    std::fs::write(base, &bytes).unwrap();
    let flat = c.f.dir.path().join("flat.ckpt");
    let out = ckptfs_cli(&["flatten", s(&c.links[2]), "-o", s(&flat)]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "flatten succeeded over a damaged blob"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("flattening checkpoint") && err.contains("CRC mismatch"),
        "{err}"
    );
    assert!(!flat.exists());
    let leftovers: Vec<_> = std::fs::read_dir(c.f.dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
}
