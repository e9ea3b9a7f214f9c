//! Damaged checkpoints never panic the reader and never yield wrong bytes:
//! random bytes of a child and of its parent are flipped, then the child is
//! opened, inspected and read page by page.

mod common;

use std::path::Path;

use ckptfs::{Checkpoint, CreateOptions, PageIndex};
use common::*;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

fn opts(disk: &Path, parent: Option<&Path>) -> CreateOptions {
    CreateOptions {
        disks: vec![disk.to_owned()],
        scan_disks: true,
        parent: parent.map(Path::to_owned),
        ..Default::default()
    }
}

/// Every page that reads back equals the original; returns how many did.
fn check_pages(path: &Path, mem: &[u8]) -> u64 {
    let Ok(ck) = Checkpoint::open(path) else {
        return 0;
    };
    let _ = ckptfs::verify::inspect(&ck);
    if ck.guest_size() != mem.len() as u64 {
        return 0;
    }
    let mut good = 0;
    let mut page = vec![0u8; 4096];
    for p in 0..ck.page_count() {
        if ck.read_pages(PageIndex(p), &mut page).is_ok() {
            assert!(
                page == mem[p as usize * 4096..][..4096],
                "page {p} read back wrong bytes"
            );
            good += 1;
        }
    }
    good
}

#[test]
fn flipped_bytes_in_a_child_or_its_parent_never_give_wrong_bytes() {
    let f = fixture(96, 32, 3);
    ckptfs::create(&f.mem, &opts(&f.disk, None), &f.ckpt).unwrap();
    let mut child_mem = f.mem.clone();
    for p in (0..96).step_by(7) {
        child_mem[p * 4096 + 11] ^= 0x5a;
    }
    let child = f.dir.path().join("child.ckpt");
    ckptfs::create(&child_mem, &opts(&f.disk, Some(&f.ckpt)), &child).unwrap();
    assert_eq!(check_pages(&child, &child_mem), 96);
    let good_child = std::fs::read(&child).unwrap();
    let good_parent = std::fs::read(&f.ckpt).unwrap();

    let mut runner = TestRunner::new(Config::with_cases(200));
    let flips = (
        any::<bool>(),
        proptest::collection::vec((any::<u64>(), 1u8..=255), 1..4),
    );
    runner
        .run(&flips, |(in_parent, flips)| {
            let (path, good) = if in_parent {
                (&f.ckpt, &good_parent)
            } else {
                (&child, &good_child)
            };
            let mut bytes = good.clone();
            for (at, x) in flips {
                // Half the flips land in the header and tables, where most checks are.
                let at = if at % 2 == 0 {
                    (at / 2) as usize % 2048.min(bytes.len())
                } else {
                    (at / 2) as usize % bytes.len()
                };
                bytes[at] ^= x;
            }
            std::fs::write(path, &bytes).unwrap();
            check_pages(&child, &child_mem);
            std::fs::write(path, good).unwrap();
            Ok(())
        })
        .unwrap();
    assert_eq!(check_pages(&child, &child_mem), 96);
}

#[test]
fn a_truncated_or_extended_child_is_refused() {
    let f = fixture(32, 16, 4);
    ckptfs::create(&f.mem, &opts(&f.disk, None), &f.ckpt).unwrap();
    let good = std::fs::read(&f.ckpt).unwrap();
    for len in [0, 11, 255, 256, 300, good.len() - 1] {
        std::fs::write(&f.ckpt, &good[..len]).unwrap();
        assert!(Checkpoint::open(&f.ckpt).is_err(), "{len} bytes opened");
    }
    let mut longer = good.clone();
    longer.extend([0u8; 4096]);
    std::fs::write(&f.ckpt, &longer).unwrap();
    assert!(Checkpoint::open(&f.ckpt).is_err());
}
