//! Parent checkpoints: a child made against a parent stores only what changed,
//! reads back exactly through chains, and refuses to open when a parent is
//! missing or changed.

mod common;

use std::path::{Path, PathBuf};

use ckptfs::format::Location;
use ckptfs::{Checkpoint, CreateOptions, OpenError, PageIndex, PageSource, ParentIndex};
use common::*;
use proptest::prelude::*;

fn opts(disks: &[&Path], parent: Option<&Path>) -> CreateOptions {
    CreateOptions {
        disks: disks.iter().map(|d| d.to_path_buf()).collect(),
        scan_disks: true,
        parent: parent.map(Path::to_path_buf),
        ..Default::default()
    }
}

fn read_all(ck: &Checkpoint) -> Vec<u8> {
    let mut out = vec![0u8; ck.guest_size() as usize];
    ck.read_pages(PageIndex(0), &mut out).unwrap();
    out
}

/// `mem` with the pages in `changed` overwritten by fresh random bytes.
fn modified(mem: &[u8], changed: &[usize], seed: u64) -> Vec<u8> {
    let mut m = mem.to_vec();
    let mut rng = ckptfs::synth::Rng::new(seed);
    for &p in changed {
        rng.fill(&mut m[p * 4096..(p + 1) * 4096]);
    }
    m
}

/// A parent checkpoint over a fixture and a child whose every 5th page changed.
struct Family {
    f: Fixture,
    child_mem: Vec<u8>,
    child: PathBuf,
    changed: Vec<usize>,
}

fn family(pages: usize, seed: u64) -> Family {
    let f = fixture(pages, 256, seed);
    ckptfs::create(&f.mem, &opts(&[&f.disk], None), &f.ckpt).unwrap();
    let changed: Vec<usize> = (0..pages).step_by(5).collect();
    let child_mem = modified(&f.mem, &changed, seed ^ 1);
    let child = f.dir.path().join("child.ckpt");
    Family {
        child_mem,
        child,
        changed,
        f,
    }
}

#[test]
fn pages_equal_to_the_parents_become_parent_refs_and_read_back() {
    let fam = family(1024, 3);
    let f = &fam.f;
    let s = ckptfs::create(&fam.child_mem, &opts(&[&f.disk], Some(&f.ckpt)), &fam.child).unwrap();
    let unchanged_nonzero = (0..1024)
        .filter(|p| !fam.changed.contains(p) && f.plan[*p] != Planted::Zero)
        .count() as u64;
    assert_eq!(s.parent_pages, unchanged_nonzero);
    assert_eq!(s.blobs_stored, fam.changed.len() as u64);
    let ck = Checkpoint::open(&fam.child).unwrap();
    assert_eq!(read_all(&ck), fam.child_mem);
    let parent = Checkpoint::open(&f.ckpt).unwrap();
    for p in (0..1024u64).filter(|p| !fam.changed.contains(&(*p as usize))) {
        let page = PageIndex(p);
        let (stored, _) = ck.stored_entry(page).unwrap();
        match parent.entry(page).source {
            PageSource::Zero => assert_eq!(stored, Location::Zero),
            PageSource::Disk { offset, .. } => {
                assert_eq!(stored, Location::Parent(ParentIndex(0)));
                // A parent's DISK entry is copied (the shared disk is disk 0 of both).
                assert!(matches!(ck.entry(page).source,
                    PageSource::Disk { offset: o, .. } if o == offset));
            }
            PageSource::Blob(b) => {
                assert_eq!(stored, Location::Parent(ParentIndex(0)));
                assert_eq!(
                    ck.entry(page).source,
                    PageSource::ParentBlob {
                        ancestor: ckptfs::AncestorIndex(0),
                        blob: b
                    }
                );
            }
            other => panic!("parent page {p} is {other:?}"),
        }
    }
    assert_eq!(ck.ancestors().len(), 1);
    assert_eq!(ck.disk_count(), 1, "the shared disk is opened once");
}

#[test]
fn a_chain_of_three_resolves_to_the_grandparents_blobs_and_disks() {
    let fam = family(512, 5);
    let f = &fam.f;
    // The child uses a second disk only; the parent's disk comes with the parent.
    let other = f.dir.path().join("other.img");
    make_disk(&other, 16, 99);
    ckptfs::create(&fam.child_mem, &opts(&[&other], Some(&f.ckpt)), &fam.child).unwrap();
    let grandchild = f.dir.path().join("grandchild.ckpt");
    let gc_mem = modified(&fam.child_mem, &[1, 2, 3], 77);
    let s = ckptfs::create(&gc_mem, &opts(&[], Some(&fam.child)), &grandchild).unwrap();
    assert_eq!(s.blobs_stored, 3);
    let ck = Checkpoint::open(&grandchild).unwrap();
    assert_eq!(read_all(&ck), gc_mem);
    assert_eq!(ck.ancestors().len(), 2);
    assert_eq!(ck.disk_count(), 2);
    assert_eq!(ck.disk_path(ckptfs::DiskIndex(1)), Some(&*f.disk));
    // A page unchanged since the grandparent resolves straight to its blob.
    let p = (0..512)
        .find(|p| !fam.changed.contains(p) && f.plan[*p] == Planted::Random && *p > 3)
        .unwrap();
    assert!(matches!(
        ck.entry(PageIndex(p as u64)).source,
        PageSource::ParentBlob { ancestor, .. } if ck.ancestors()[usize::from(ancestor.0)].path() == f.ckpt
    ));
}

fn open_err(p: &Path) -> String {
    let e = Checkpoint::open(p).unwrap_err();
    let mut s = e.to_string();
    let mut src = std::error::Error::source(&e);
    while let Some(c) = src {
        s.push_str(&format!(": {c}"));
        src = c.source();
    }
    s
}

#[test]
fn a_deleted_or_changed_parent_makes_the_child_refuse_to_open() {
    let fam = family(256, 7);
    let f = &fam.f;
    ckptfs::create(&fam.child_mem, &opts(&[&f.disk], Some(&f.ckpt)), &fam.child).unwrap();
    let child = fam.child.display().to_string();
    let parent = std::path::absolute(&f.ckpt).unwrap();
    let good = std::fs::read(&f.ckpt).unwrap();

    // Rewritten blobs (a sampled block of the blob section): the fingerprint.
    let ck = Checkpoint::open(&f.ckpt).unwrap();
    let blobs = ck.header().blobs();
    drop(ck);
    let block = ckptfs::disk::fingerprint_blocks(good.len() as u64)
        .into_iter()
        .map(|b| b * 4096)
        .find(|&at| at >= blobs.offset && at + 4096 <= blobs.end())
        .unwrap();
    let mut bad = good.clone();
    bad[block as usize + 7] ^= 1;
    std::fs::write(&f.ckpt, &bad).unwrap();
    assert_eq!(
        open_err(&fam.child),
        format!(
            "checkpoint {child}: parent checkpoint {} changed since it was made: content fingerprint differs",
            parent.display()
        )
    );

    // Re-created from other memory: a different identity (and size).
    let other = modified(&f.mem, &[0], 1);
    std::fs::remove_file(&f.ckpt).unwrap();
    ckptfs::create(&other, &opts(&[&f.disk], None), &f.ckpt).unwrap();
    let e = open_err(&fam.child);
    assert!(
        e.starts_with(&format!(
            "checkpoint {child}: parent checkpoint {} changed since it was made: ",
            parent.display()
        )),
        "{e}"
    );

    // Deleted.
    std::fs::remove_file(&f.ckpt).unwrap();
    assert_eq!(
        open_err(&fam.child),
        format!(
            "checkpoint {child} needs its parent checkpoint: checkpoint {}: No such file or directory (os error 2)",
            parent.display()
        )
    );
    // inspect still shows the child, names the missing parent, and fails.
    let lenient = ckptfs::OpenOptions {
        allow_missing: true,
        ..Default::default()
    };
    let ck = Checkpoint::open_with(&fam.child, &lenient).unwrap();
    let ins = ckptfs::verify::inspect(&ck);
    assert!(ins.parents[0].missing.is_some());
    assert_eq!(ins.parent_pages, ins.parents[0].pages);
    assert!(ins.parent_pages > 0 && ins.invalid_entries == 0);
    assert!(!ins.ok());

    // Restored: the child opens again.
    std::fs::write(&f.ckpt, &good).unwrap();
    assert_eq!(
        read_all(&Checkpoint::open(&fam.child).unwrap()),
        fam.child_mem
    );
}

#[test]
fn a_parent_of_another_size_still_serves_the_pages_it_has() {
    let f = fixture(64, 32, 11);
    ckptfs::create(&f.mem, &opts(&[&f.disk], None), &f.ckpt).unwrap();
    let mut bigger = f.mem.clone();
    bigger.extend(vec![5u8; 8 * 4096]);
    let child = f.dir.path().join("c.ckpt");
    let s = ckptfs::create(&bigger, &opts(&[], Some(&f.ckpt)), &child).unwrap();
    assert!(s.parent_pages > 0);
    assert_eq!(read_all(&Checkpoint::open(&child).unwrap()), bigger);
}

#[test]
fn a_corrupt_parent_entry_fails_its_page_not_the_open() {
    let fam = family(64, 13);
    let f = &fam.f;
    ckptfs::create(&fam.child_mem, &opts(&[], Some(&f.ckpt)), &fam.child).unwrap();
    let ck = Checkpoint::open(&fam.child).unwrap();
    let p = (0..64u64)
        .find(|&p| matches!(ck.stored_entry(PageIndex(p)), Ok((Location::Parent(_), _))))
        .unwrap();
    let at = ck.header().table_offset as usize + p as usize * 12;
    drop(ck);
    // Point the entry at parent 5 (there is one) and fix the table CRC.
    let mut b = std::fs::read(&fam.child).unwrap();
    b[at + 6] = 5;
    let h = ckptfs::format::Header::decode(&b, b.len() as u64).unwrap();
    let table = &b[h.table_offset as usize..(h.table_offset + h.table_len) as usize];
    let mut h2 = h;
    h2.table_crc = crc32fast::hash(table);
    b[..256].copy_from_slice(&h2.encode());
    std::fs::write(&fam.child, &b).unwrap();
    let ck = Checkpoint::open(&fam.child).unwrap();
    let e = ck.try_entry(PageIndex(p)).unwrap_err().to_string();
    assert!(
        e.contains("names a parent the parent table does not list"),
        "{e}"
    );
    let ins = ckptfs::verify::inspect(&ck);
    assert_eq!(ins.invalid_entries, 1);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(12))]
    #[test]
    fn any_child_of_any_parent_round_trips(
        changes in proptest::collection::vec((0usize..128, 0u8..3), 0..40),
        seed in 1u64..u64::MAX,
    ) {
        let f = fixture(128, 64, seed);
        ckptfs::create(&f.mem, &opts(&[&f.disk], None), &f.ckpt).unwrap();
        let disk = std::fs::read(&f.disk).unwrap();
        let mut mem = f.mem.clone();
        let mut rng = ckptfs::synth::Rng::new(seed);
        for (p, how) in changes {
            let page = &mut mem[p * 4096..(p + 1) * 4096];
            match how {
                0 => page.fill(0),
                1 => {
                    let at = rng.below(disk.len() as u64 / 512 - 8) as usize * 512;
                    page.copy_from_slice(&disk[at..at + 4096]);
                }
                _ => rng.fill(page),
            }
        }
        let child = f.dir.path().join("child.ckpt");
        let s = ckptfs::create(&mem, &opts(&[&f.disk], Some(&f.ckpt)), &child).unwrap();
        prop_assert_eq!(s.zero_pages + s.disk_pages + s.blob_pages + s.parent_pages, 128);
        let ck = Checkpoint::open(&child).unwrap();
        let mut out = vec![0u8; mem.len()];
        let mut at = 0;
        let mut step = 1;
        while at < 128 {
            let n = step.min(128 - at);
            ck.read_pages(PageIndex(at as u64), &mut out[at * 4096..(at + n) * 4096]).unwrap();
            at += n;
            step = step % 5 + 1;
        }
        prop_assert_eq!(out, mem);
    }
}

#[test]
fn a_parent_that_is_missing_at_create_is_named() {
    let f = fixture(16, 16, 1);
    let missing = f.dir.path().join("nope.ckpt");
    let e = ckptfs::create(&f.mem, &opts(&[], Some(&missing)), &f.ckpt).unwrap_err();
    let ckptfs::CreateError::Parent(OpenError::Io { path, .. }) = &e else {
        panic!("{e}")
    };
    assert_eq!(path, &missing);
}
