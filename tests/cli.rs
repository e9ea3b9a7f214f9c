//! The `ckptfs` CLI end to end: create / inspect / verify, and every bad-input case.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::*;

fn ckptfs(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ckptfs"))
        .args(args)
        .output()
        .unwrap()
}

/// `ckptfs create --mem MEM --disk DISK -o OUT`.
fn create(mem: &Path, disk: &Path, out: &Path) -> Output {
    ckptfs(&["create", "--mem", s(mem), "--disk", s(disk), "-o", s(out)])
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Asserts a failed run printed exactly one line naming `file` and containing `what`.
fn assert_one_line_error(out: &Output, file: &str, what: &str) {
    assert!(!out.status.success(), "expected failure, got success");
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "want one error line, got: {err}");
    assert!(lines[0].starts_with("ckptfs: error: "), "{err}");
    assert!(lines[0].contains(file), "error does not name {file}: {err}");
    assert!(
        lines[0].contains(what),
        "error does not say {what:?}: {err}"
    );
}

fn created(f: &Fixture) {
    let out = ckptfs(&[
        "create",
        "--mem",
        s(&f.mem_path),
        "--disk",
        s(&f.disk),
        "-o",
        s(&f.ckpt),
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let (zero, disk, blob, _) = expected_counts(&f.plan);
    assert_eq!(summary["zero_pages"], zero);
    assert_eq!(summary["disk_pages"], disk);
    assert_eq!(summary["blob_pages"], blob);
}

fn hash(p: &Path) -> u32 {
    crc32fast::hash(&std::fs::read(p).unwrap())
}

#[test]
fn create_inspect_verify_round_trip_leaves_inputs_untouched() {
    let f = fixture(1024, 256, 21);
    let (mem_before, disk_before) = (hash(&f.mem_path), hash(&f.disk));
    created(&f);
    assert_eq!(
        (hash(&f.mem_path), hash(&f.disk)),
        (mem_before, disk_before)
    );
    let out = ckptfs(&["inspect", s(&f.ckpt), "--json"]);
    assert!(out.status.success());
    let ins: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(ins["pages"], 1024);
    assert_eq!(ins["disks"][0]["pages"], ins["disk_pages"]);
    let out = ckptfs(&["verify", s(&f.ckpt), "--mem", s(&f.mem_path)]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("OK"));
}

#[test]
fn missing_inputs_are_named() {
    let f = fixture(16, 16, 1);
    let missing = f.dir.path().join("nope.img");
    let out = ckptfs(&["create", "--mem", s(&missing), "-o", s(&f.ckpt)]);
    assert_one_line_error(&out, "nope.img", "No such file");
    let out = create(&f.mem_path, &missing, &f.ckpt);
    assert_one_line_error(&out, "nope.img", "No such file");
    let out = ckptfs(&["inspect", s(&missing)]);
    assert_one_line_error(&out, "nope.img", "No such file");
    assert!(!f.ckpt.exists());
}

#[test]
fn odd_sized_memory_dump_is_refused() {
    let f = fixture(16, 16, 1);
    std::fs::write(&f.mem_path, vec![1u8; 4097]).unwrap();
    let out = create(&f.mem_path, &f.disk, &f.ckpt);
    assert_one_line_error(&out, "mem.raw", "not a multiple of 4096");
}

#[test]
fn vmdk_disk_gets_conversion_hint_and_a_broken_qcow2_is_named() {
    let f = fixture(16, 16, 1);
    let v = f.dir.path().join("disk.vmdk");
    let mut data = b"KDMV\x01\0\0\0".to_vec();
    data.resize(1 << 16, 0);
    std::fs::write(&v, data).unwrap();
    let out = create(&f.mem_path, &v, &f.ckpt);
    assert_one_line_error(&out, "disk.vmdk", "qemu-img convert -O qcow2");
    let q = f.dir.path().join("disk.qcow2");
    let mut data = b"QFI\xfb\0\0\0\x03".to_vec();
    data.resize(1 << 16, 0);
    std::fs::write(&q, data).unwrap();
    let out = create(&f.mem_path, &q, &f.ckpt);
    assert_one_line_error(&out, "disk.qcow2", "cluster size");
}

#[test]
fn output_over_an_input_is_refused() {
    let f = fixture(16, 16, 1);
    let before = hash(&f.mem_path);
    let out = create(&f.mem_path, &f.disk, &f.mem_path);
    assert_one_line_error(&out, "mem.raw", "refusing to overwrite");
    let out = create(&f.mem_path, &f.disk, &f.disk);
    assert_one_line_error(&out, "disk.img", "refusing to overwrite");
    assert_eq!(hash(&f.mem_path), before);
}

/// Corrupt a copy of a good checkpoint and expect `inspect` to name the problem.
fn corrupted(f: &Fixture, name: &str, edit: impl FnOnce(&mut Vec<u8>)) -> Output {
    let mut bytes = std::fs::read(&f.ckpt).unwrap();
    edit(&mut bytes);
    let bad = f.dir.path().join(name);
    std::fs::write(&bad, bytes).unwrap();
    ckptfs(&["inspect", s(&bad)])
}

fn u64_at(b: &[u8], at: usize) -> usize {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap()) as usize
}

/// Asserts a failed run printed exactly `ckptfs: error: checkpoint PATH: WHAT`.
fn assert_format_error(out: &Output, path: &Path, what: &str) {
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        err,
        format!("ckptfs: error: checkpoint {}: {what}\n", path.display())
    );
}

#[test]
fn corrupted_checkpoints_each_get_one_line_with_the_cause_once() {
    let f = fixture(256, 64, 9);
    created(&f);
    let dir = f.dir.path();
    type Edit = Box<dyn Fn(&mut Vec<u8>)>;
    let cases: Vec<(&str, Edit, String)> = vec![
        (
            "short.ckpt",
            Box::new(|b| b.truncate(100)),
            "file is 100 bytes, shorter than the 256-byte header (truncated?)".into(),
        ),
        (
            "magic.ckpt",
            Box::new(|b| b[0] = b'X'),
            "not a ckptfs checkpoint (bad magic)".into(),
        ),
        (
            "version.ckpt",
            Box::new(|b| b[8] = 7),
            "format version 7 is not supported (this build reads version 2)".into(),
        ),
        (
            "v1.ckpt",
            Box::new(|b| b[8] = 1),
            "format version 1 is no longer supported (this build reads version 2); \
             re-create it from the memory dump with `ckptfs create`"
                .into(),
        ),
        (
            "hdr.ckpt",
            Box::new(|b| b[17] ^= 0x40),
            "header checksum mismatch (corrupted header)".into(),
        ),
        (
            "table.ckpt",
            Box::new(|b| {
                let at = u64_at(b, 64) + 5;
                b[at] ^= 1
            }),
            "page table checksum mismatch (corrupted)".into(),
        ),
        (
            "disks.ckpt",
            Box::new(|b| {
                let at = u64_at(b, 32) + 9;
                b[at] ^= 1
            }),
            "disk table checksum mismatch (corrupted)".into(),
        ),
        (
            "trailing.ckpt",
            Box::new(|b| b.push(0)),
            "the file has bytes after its last section".into(),
        ),
    ];
    for (name, edit, what) in cases {
        let out = corrupted(&f, name, edit);
        assert_format_error(&out, &dir.join(name), &what);
    }
    let out = corrupted(&f, "trunc.ckpt", |b| b.truncate(b.len() - 4096));
    assert_one_line_error(&out, "trunc.ckpt", "outside");
}

#[test]
fn a_version_1_checkpoint_is_refused_with_how_to_recreate_it() {
    // The first bytes of a real version-1 file: magic, version 1, page size.
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("old.ckpt");
    let mut v1 = b"CKPTFS\r\n".to_vec();
    v1.extend(1u32.to_le_bytes());
    v1.extend(4096u32.to_le_bytes());
    v1.resize(8192, 0);
    std::fs::write(&p, v1).unwrap();
    for cmd in ["inspect", "verify"] {
        let out = ckptfs(&[cmd, s(&p)]);
        assert_format_error(
            &out,
            &p,
            "format version 1 is no longer supported (this build reads version 2); \
             re-create it from the memory dump with `ckptfs create`",
        );
    }
}

#[test]
fn corrupted_blob_fails_verify_naming_the_page() {
    let f = fixture(256, 64, 13);
    created(&f);
    let blob_page = f.plan.iter().position(|p| *p == Planted::Random).unwrap();
    let ck = ckptfs::Checkpoint::open(&f.ckpt).unwrap();
    let ckptfs::PageSource::Blob(b) = ck.entry(ckptfs::PageIndex(blob_page as u64)).source else {
        panic!()
    };
    let at = (ck.header().blobs_offset + b.0 * 4096 + 10) as usize;
    // Deduplicated pages share the blob: every one of them must fail, no other.
    let sharing = (0..256)
        .filter(|&p| ck.entry(ckptfs::PageIndex(p)).source == ckptfs::PageSource::Blob(b))
        .count();
    drop(ck);
    let bad = f.dir.path().join("blob.ckpt");
    let mut bytes = std::fs::read(&f.ckpt).unwrap();
    bytes[at] ^= 0xff;
    std::fs::write(&bad, bytes).unwrap();
    let out = ckptfs(&["verify", s(&bad), "--json"]);
    assert!(!out.status.success());
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["bad_pages"], sharing);
    assert_eq!(r["first_bad"][0]["page"], blob_page);
    assert!(
        r["first_bad"][0]["problem"]
            .as_str()
            .unwrap()
            .contains("CRC mismatch")
    );
}

#[test]
fn changed_disk_is_caught_by_fingerprint_or_page_crc() {
    let f = fixture(512, 256, 17);
    created(&f);
    // A block the fingerprint does not sample but a page references: only the
    // per-page CRC catches it, and verify names that page.
    let sampled = ckptfs::disk::fingerprint_blocks(256 * 4096);
    let (page, block) = f
        .plan
        .iter()
        .enumerate()
        .find_map(|(i, p)| match p {
            Planted::Disk(at) if !sampled.contains(&(at / 4096)) => Some((i, *at)),
            _ => None,
        })
        .unwrap();
    let mut disk = std::fs::read(&f.disk).unwrap();
    disk[block as usize + 5] ^= 1;
    std::fs::write(&f.disk, &disk).unwrap();
    let out = ckptfs(&["verify", s(&f.ckpt), "--json"]);
    assert!(!out.status.success());
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let bad: Vec<u64> = r["first_bad"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["page"].as_u64().unwrap())
        .collect();
    assert!(bad.contains(&(page as u64)), "{r}");
    assert!(
        r["first_bad"][0]["problem"]
            .as_str()
            .unwrap()
            .contains("disk.img"),
        "{r}"
    );
    // Resizing the image is caught at open, before any page is served.
    disk.truncate(disk.len() - 4096);
    std::fs::write(&f.disk, &disk).unwrap();
    let out = ckptfs(&["verify", s(&f.ckpt)]);
    assert_one_line_error(&out, "disk.img", "changed since the checkpoint");
}

#[test]
fn verify_against_a_different_dump_names_differing_pages() {
    let f = fixture(128, 64, 23);
    created(&f);
    let mut other = f.mem.clone();
    other[77 * 4096] ^= 1;
    let other_path = f.dir.path().join("other.raw");
    std::fs::write(&other_path, other).unwrap();
    let out = ckptfs(&["verify", s(&f.ckpt), "--mem", s(&other_path), "--json"]);
    assert!(!out.status.success());
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["bad_pages"], 1);
    assert_eq!(r["first_bad"][0]["page"], 77);
}

#[test]
fn create_with_a_parent_and_inspect_shows_parents_and_kinds() {
    let f = fixture(256, 64, 41);
    created(&f);
    let mut mem = f.mem.clone();
    mem[3 * 4096] ^= 0xff;
    let child_mem = f.dir.path().join("child.raw");
    std::fs::write(&child_mem, &mem).unwrap();
    let child = f.dir.path().join("child.ckpt");
    let out = ckptfs(&[
        "create",
        "--mem",
        s(&child_mem),
        "--parent",
        s(&f.ckpt),
        "-o",
        s(&child),
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let sum: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let (zero, ..) = expected_counts(&f.plan);
    let changed_nonzero = u64::from(f.plan[3] != Planted::Zero);
    assert_eq!(sum["parent_pages"], 256 - zero - changed_nonzero);
    let out = ckptfs(&["inspect", s(&child), "--json"]);
    assert!(out.status.success());
    let ins: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(ins["parent_pages"], sum["parent_pages"]);
    assert_eq!(ins["parents"][0]["pages"], sum["parent_pages"]);
    let parent_abs = std::path::absolute(&f.ckpt).unwrap();
    assert_eq!(ins["parents"][0]["path"], parent_abs.to_str().unwrap());
    let out = ckptfs(&["inspect", s(&child)]);
    let text = String::from_utf8_lossy(&out.stdout);
    for want in ["  ZERO ", "  DISK ", "  PARENT ", "  BLOB ", "parent 0: "] {
        assert!(
            text.contains(want),
            "inspect does not show {want:?}: {text}"
        );
    }
    let out = ckptfs(&["verify", s(&child), "--mem", s(&child_mem)]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn inspect_shows_a_checkpoint_whose_disk_is_missing_and_names_the_disk() {
    let f = fixture(128, 32, 43);
    created(&f);
    std::fs::remove_file(&f.disk).unwrap();
    let out = ckptfs(&["inspect", s(&f.ckpt)]);
    assert!(!out.status.success());
    let disk = std::path::absolute(&f.disk).unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        format!(
            "ckptfs: error: checkpoint {} needs a backing disk image: disk image {}: No such file or directory (os error 2)\n",
            f.ckpt.display(),
            disk.display()
        )
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("  guest RAM "), "{text}");
    assert!(
        text.contains(&format!("disk 0: {} (raw", disk.display())) && text.contains("UNUSABLE"),
        "{text}"
    );
}
