//! The I/O-tracking hints are exactly what a content scan of the disk finds, except for pages
//! the guest modified after reading them, which are never hinted.

mod common;

use std::collections::{BTreeSet, HashMap};

use common::{Setup, run_json};
use vmm_lite::abi;

const PAGE: usize = 4096;

struct Outcome {
    mem: Vec<u8>,
    disk: Vec<u8>,
    hints: BTreeSet<(u64, u64)>,
    report: serde_json::Value,
}

fn run_with_hints(workload: &str) -> Outcome {
    let t = Setup::new("16M");
    let (raw, hints, disk) = (t.p("mem.raw"), t.p("hints.json"), t.disk());
    let report = run_json(&[
        "run",
        "--mem",
        "32M",
        "--disk",
        &disk,
        "--workload",
        workload,
        "--checkpoint-after",
        "0.5",
        "--raw-out",
        &raw,
        "--hints-out",
        &hints,
    ]);
    let pairs: Vec<[u64; 2]> = serde_json::from_slice(&std::fs::read(&hints).unwrap()).unwrap();
    Outcome {
        mem: std::fs::read(&raw).unwrap(),
        disk: std::fs::read(&t.disk).unwrap(),
        hints: pairs.into_iter().map(|[p, o]| (p, o)).collect(),
        report,
    }
}

/// (page, disk offset) for every guest page whose bytes equal a disk block.
fn content_scan(mem: &[u8], disk: &[u8]) -> BTreeSet<(u64, u64)> {
    let blocks: HashMap<&[u8], u64> = disk
        .chunks(PAGE)
        .enumerate()
        .map(|(i, b)| (b, (i * PAGE) as u64))
        .collect();
    mem.chunks(PAGE)
        .enumerate()
        .filter_map(|(p, page)| blocks.get(page).map(|&o| (p as u64, o)))
        .collect()
}

fn check_hints_match_scan(workload: &str) {
    let o = run_with_hints(workload);
    assert!(
        !o.hints.is_empty(),
        "{workload}: no hints at all: {}",
        o.report
    );
    assert_eq!(o.hints.len() as u64, o.report["hints"].as_u64().unwrap());
    let scan = content_scan(&o.mem, &o.disk);
    let missing: Vec<_> = scan.difference(&o.hints).take(5).collect();
    let extra: Vec<_> = o.hints.difference(&scan).take(5).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "{workload}: scan-only {missing:?}, hint-only {extra:?}"
    );

    // The page cache: heap page i was read from disk block i. Those the guest modified since
    // (it does, as part of its WORK requests) differ from their block and must not be hinted.
    let heap_first = abi::HEAP_ADDR / abi::PAGE_SIZE;
    let modified: Vec<u64> = o
        .hints
        .iter()
        .map(|&(p, _)| p)
        .chain((0..64).map(|i| heap_first + i))
        .filter(|&p| {
            let i = (p - heap_first) as usize;
            let page = &o.mem[p as usize * PAGE..][..PAGE];
            page != &o.disk[i * PAGE..][..PAGE]
        })
        .collect();
    assert!(
        !modified.is_empty(),
        "{workload}: the guest modified no cached page; the test proves nothing"
    );
    for p in &modified {
        assert!(
            !o.hints.iter().any(|&(hp, _)| hp == *p),
            "{workload}: modified page {p} is hinted"
        );
    }
    // Every other hint says heap page i = block i.
    for &(p, off) in &o.hints {
        assert_eq!(
            off,
            (p - heap_first) * abi::PAGE_SIZE,
            "{workload}: page {p} hinted to {off:#x}"
        );
    }
}

#[test]
fn pagecache_hints_equal_content_scan_minus_modified_pages() {
    check_hints_match_scan("pagecache");
}

#[test]
fn mixed_hints_equal_content_scan_minus_modified_pages() {
    check_hints_match_scan("mixed");
}

#[test]
fn anon_workload_has_no_hints() {
    let o = run_with_hints("anon");
    assert!(o.hints.is_empty());
    assert!(content_scan(&o.mem, &o.disk).is_empty());
}

#[test]
fn desktop_hints_equal_content_scan() {
    // The desktop interleaves page cache, computed data and free memory in 2 MiB segments:
    // cached pages are scattered over RAM, and the hints still name exactly their blocks.
    let o = run_with_hints("desktop");
    let scan = content_scan(&o.mem, &o.disk);
    assert!(!o.hints.is_empty(), "{}", o.report);
    let missing: Vec<_> = scan.difference(&o.hints).take(5).collect();
    let extra: Vec<_> = o.hints.difference(&scan).take(5).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "desktop: scan-only {missing:?}, hint-only {extra:?}"
    );
    let segments: BTreeSet<u64> = o.hints.iter().map(|&(p, _)| p / 512).collect();
    assert!(segments.len() > 4, "hints in segments {segments:?}");
}
