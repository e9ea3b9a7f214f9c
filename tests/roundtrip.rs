//! Create -> open -> read round trips on generated images with planted page kinds.

mod common;

use ckptfs::{Checkpoint, CreateOptions, DiskHint, DiskIndex, DiskOffset, PageIndex, PageSource};
use common::*;
use proptest::prelude::*;

fn scan_opts(f: &Fixture) -> CreateOptions {
    CreateOptions {
        disks: vec![f.disk.clone()],
        scan_disks: true,
        ..Default::default()
    }
}

fn read_all(ck: &Checkpoint) -> Vec<u8> {
    let mut out = vec![0u8; ck.guest_size() as usize];
    ck.read_pages(PageIndex(0), &mut out).unwrap();
    out
}

#[test]
fn scan_classifies_planted_pages_and_reconstructs_exactly() {
    let f = fixture(2048, 1024, 7);
    let s = ckptfs::create(&f.mem, &scan_opts(&f), &f.ckpt).unwrap();
    let (zero, disk, blob, distinct) = expected_counts(&f.plan);
    assert_eq!(
        (s.zero_pages, s.disk_pages, s.blob_pages, s.blobs_stored),
        (zero, disk, blob, distinct)
    );
    assert_eq!(
        s.checkpoint_bytes,
        std::fs::metadata(&f.ckpt).unwrap().len()
    );
    let ck = Checkpoint::open(&f.ckpt).unwrap();
    assert_eq!(read_all(&ck), f.mem);
    for (i, p) in f.plan.iter().enumerate() {
        let src = ck.entry(PageIndex(i as u64)).source;
        match p {
            Planted::Zero => assert_eq!(src, PageSource::Zero),
            Planted::Disk(_) => assert!(matches!(src, PageSource::Disk { .. })),
            _ => assert!(matches!(src, PageSource::Blob(_))),
        }
    }
}

#[test]
fn hints_alone_find_disk_pages_without_a_scan_and_bad_hints_fall_back() {
    let f = fixture(1024, 512, 11);
    let mut hints: Vec<DiskHint> = f
        .plan
        .iter()
        .enumerate()
        .filter_map(|(i, p)| match p {
            Planted::Disk(b) => Some(DiskHint {
                page: PageIndex(i as u64),
                disk: DiskIndex(0),
                offset: DiskOffset(*b),
            }),
            _ => None,
        })
        .collect();
    let good = hints.len() as u64;
    // A stale hint: the page holds random bytes now.
    let random_page = f.plan.iter().position(|p| *p == Planted::Random).unwrap();
    hints.push(DiskHint {
        page: PageIndex(random_page as u64),
        disk: DiskIndex(0),
        offset: DiskOffset(0),
    });
    // A hint to a disk that does not exist.
    let other = f.plan.iter().rposition(|p| *p == Planted::Random).unwrap();
    hints.push(DiskHint {
        page: PageIndex(other as u64),
        disk: DiskIndex(9),
        offset: DiskOffset(0),
    });
    let opts = CreateOptions {
        disks: vec![f.disk.clone()],
        hints,
        scan_disks: false,
        ..Default::default()
    };
    let s = ckptfs::create(&f.mem, &opts, &f.ckpt).unwrap();
    assert_eq!(s.hints_verified, good);
    assert_eq!(s.hints_rejected, 2);
    assert_eq!(s.disk_pages, good);
    assert_eq!(s.disk_windows_indexed, 0);
    assert_eq!(read_all(&Checkpoint::open(&f.ckpt).unwrap()), f.mem);
}

#[test]
fn adjacent_disk_pages_are_coalesced_into_one_read() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("d.img");
    let data = make_disk(&disk, 64, 3);
    let plan: Vec<Planted> = (0..32).map(|b| Planted::Disk((b + 10) * 4096)).collect();
    let mem = make_mem(&plan, &data, 1);
    let ckpt = dir.path().join("c.ckpt");
    let opts = CreateOptions {
        disks: vec![disk],
        scan_disks: true,
        ..Default::default()
    };
    ckptfs::create(&mem, &opts, &ckpt).unwrap();
    let ck = Checkpoint::open(&ckpt).unwrap();
    let mut out = vec![0u8; mem.len()];
    let counts = ck.read_pages(PageIndex(0), &mut out).unwrap();
    assert_eq!(out, mem);
    assert_eq!(counts.disk_reads, 1);
    assert_eq!(counts.disk_bytes, mem.len() as u64);
}

#[test]
fn vmm_state_is_stored_verbatim() {
    let f = fixture(64, 16, 5);
    let mut opts = scan_opts(&f);
    opts.vmm_state = Some(b"regs and devices".to_vec());
    ckptfs::create(&f.mem, &opts, &f.ckpt).unwrap();
    assert_eq!(
        Checkpoint::open(&f.ckpt).unwrap().vmm_state(),
        b"regs and devices"
    );
}

#[test]
fn empty_guest_is_refused_and_zero_guest_is_tiny() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("e.ckpt");
    let err = ckptfs::create(&[], &CreateOptions::default(), &ckpt).unwrap_err();
    assert_eq!(
        err.to_string(),
        "memory image is empty: no guest memory to checkpoint"
    );
    assert!(!ckpt.exists());
    let zeros = vec![0u8; 8 << 20];
    let s = ckptfs::create(&zeros, &CreateOptions::default(), &ckpt).unwrap();
    assert_eq!(s.zero_pages, 2048);
    assert!(s.checkpoint_bytes < 64 * 1024, "{}", s.checkpoint_bytes);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]
    #[test]
    fn any_plan_round_trips(kinds in proptest::collection::vec(0u8..4, 1..200), seed in 1u64..u64::MAX) {
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("d.img");
        let data = make_disk(&disk, 32, seed ^ 0x5eed_d15c);
        let mut randoms = Vec::new();
        let plan: Vec<Planted> = kinds.iter().enumerate().map(|(i, k)| match k {
            0 => Planted::Zero,
            1 => Planted::Disk((i as u64 * 7 + seed) % 32 * 4096),
            3 if !randoms.is_empty() => Planted::Repeat(randoms[i % randoms.len()]),
            _ => { randoms.push(i); Planted::Random }
        }).collect();
        let mem = make_mem(&plan, &data, seed);
        let ckpt = dir.path().join("p.ckpt");
        let opts = CreateOptions { disks: vec![disk], scan_disks: true, ..Default::default() };
        let s = ckptfs::create(&mem, &opts, &ckpt).unwrap();
        let (zero, dsk, blob, distinct) = expected_counts(&plan);
        prop_assert_eq!((s.zero_pages, s.disk_pages, s.blob_pages, s.blobs_stored), (zero, dsk, blob, distinct));
        let ck = Checkpoint::open(&ckpt).unwrap();
        // Read back in uneven pieces to exercise run boundaries.
        let mut out = vec![0u8; mem.len()];
        let mut at = 0;
        let mut step = 1;
        while at < plan.len() {
            let n = step.min(plan.len() - at);
            ck.read_pages(PageIndex(at as u64), &mut out[at * 4096..(at + n) * 4096]).unwrap();
            at += n;
            step = step % 7 + 1;
        }
        prop_assert_eq!(out, mem);
    }
}

#[test]
fn sparse_image_holes_become_zero_pages_without_reads() {
    use std::os::unix::fs::FileExt;
    let dir = tempfile::tempdir().unwrap();
    let mem_path = dir.path().join("sparse.raw");
    let f = std::fs::File::create(&mem_path).unwrap();
    f.set_len(64 << 20).unwrap();
    // Data at page 0 and in the middle of page 8000 (a partial page of data).
    f.write_all_at(&[1u8; 4096], 0).unwrap();
    f.write_all_at(b"data", 8000 * 4096 + 100).unwrap();
    drop(f);
    let image = ckptfs::MemoryImage::open(&mem_path).unwrap();
    assert!(
        !image.holes().is_empty(),
        "tmp filesystem should support SEEK_HOLE"
    );
    let ckpt = dir.path().join("s.ckpt");
    let s = ckptfs::create::create_from_image(&image, &CreateOptions::default(), &ckpt).unwrap();
    assert_eq!((s.zero_pages, s.blob_pages), (16382, 2));
    let ck = Checkpoint::open(&ckpt).unwrap();
    assert_eq!(read_all(&ck), image.bytes());
}
