//! qcow2 disk images (made with qemu-img): pages are matched against the
//! virtual disk, read back through the cluster mapping (plain, compressed, and
//! from a backing file), and a changed image is refused.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use ckptfs::disk::{DiskFormat, DiskImage};
use ckptfs::synth::{self, Mix, Region};
use ckptfs::{Checkpoint, CreateOptions, PageIndex};
use common::*;

fn qemu_img(args: &[&str]) {
    run_tool(Command::new("qemu-img").args(args), "qemu-utils");
}

fn qemu_io(image: &Path, cmd: &str) {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "qcow2", "-c", cmd]).arg(image);
    run_tool(&mut c, "qemu-utils");
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A disk that compresses well (each sector is 64 random bytes, 8 times) and
/// whose 512-byte windows are all distinct.
fn compressible_disk(blocks: u64, seed: u64) -> Vec<u8> {
    let mut rng = synth::Rng::new(seed);
    let mut d = vec![0u8; blocks as usize * 4096];
    for sector in d.chunks_mut(512) {
        let mut pat = [0u8; 64];
        rng.fill(&mut pat);
        for c in sector.chunks_mut(64) {
            c.copy_from_slice(&pat);
        }
    }
    d
}

/// A guest over `disk` with page-cache pages at 1 KiB alignment.
fn guest(disk: &[u8], pages: usize, seed: u64) -> (Vec<u8>, u64) {
    let region = Region {
        start: 1024,
        end: disk.len() as u64,
        align: 1024,
    };
    let plan = synth::plan_in(pages, &[region], Mix::RUNS, seed);
    let expected_disk = synth::expected_counts(&plan).1;
    (synth::memory_image(&plan, disk, seed), expected_disk)
}

fn create_over(mem: &[u8], disk: &Path, out: &Path) -> ckptfs::Summary {
    let opts = CreateOptions {
        disks: vec![disk.to_owned()],
        scan_disks: true,
        ..Default::default()
    };
    ckptfs::create(mem, &opts, out).unwrap()
}

fn read_all(ck: &Checkpoint) -> (Vec<u8>, ckptfs::ReadCounts) {
    let mut out = vec![0u8; ck.guest_size() as usize];
    let counts = ck.read_pages(PageIndex(0), &mut out).unwrap();
    (out, counts)
}

struct Images {
    _dir: tempfile::TempDir,
    dir: PathBuf,
    raw: PathBuf,
    disk: Vec<u8>,
}

fn images(blocks: u64, seed: u64) -> Images {
    let dir = tempfile::tempdir().unwrap();
    let disk = compressible_disk(blocks, seed);
    let raw = dir.path().join("disk.raw");
    std::fs::write(&raw, &disk).unwrap();
    Images {
        dir: dir.path().to_owned(),
        _dir: dir,
        raw,
        disk,
    }
}

#[test]
fn a_qcow2_disk_finds_the_same_pages_as_its_raw_image_and_reads_them_back() {
    let im = images(2048, 1);
    let q = im.dir.join("disk.qcow2");
    qemu_img(&["convert", "-f", "raw", "-O", "qcow2", s(&im.raw), s(&q)]);
    let (mem, expected) = guest(&im.disk, 2048, 2);
    let raw_sum = create_over(&mem, &im.raw, &im.dir.join("raw.ckpt"));
    let q_sum = create_over(&mem, &q, &im.dir.join("q.ckpt"));
    assert_eq!(raw_sum.disk_pages, expected);
    assert_eq!(q_sum.disk_pages, expected);
    assert_eq!(q_sum.blobs_stored, raw_sum.blobs_stored);
    let ck = Checkpoint::open(&im.dir.join("q.ckpt")).unwrap();
    assert_eq!(ck.disk_records()[0].format, DiskFormat::Qcow2);
    assert_eq!(ck.disk_records()[0].size, im.disk.len() as u64);
    let (back, counts) = read_all(&ck);
    assert!(back == mem);
    assert_eq!(counts.disk_bytes, expected * 4096);
}

#[test]
fn compressed_clusters_are_inflated() {
    let im = images(1024, 3);
    let q = im.dir.join("c.qcow2");
    qemu_img(&[
        "convert",
        "-c",
        "-f",
        "raw",
        "-O",
        "qcow2",
        s(&im.raw),
        s(&q),
    ]);
    // QEMU 7.2's `qemu-img map` does not report compression; the size does.
    assert!(
        std::fs::metadata(&q).unwrap().len() < im.disk.len() as u64 / 3,
        "qemu-img did not compress the test image"
    );
    let (mem, expected) = guest(&im.disk, 1024, 4);
    let sum = create_over(&mem, &q, &im.dir.join("c.ckpt"));
    assert_eq!(sum.disk_pages, expected);
    let (back, _) = read_all(&Checkpoint::open(&im.dir.join("c.ckpt")).unwrap());
    assert!(back == mem);
}

#[test]
fn pages_of_a_backing_file_and_of_the_overlay_are_both_found() {
    let im = images(1024, 5);
    let base = im.dir.join("base.qcow2");
    qemu_img(&["convert", "-f", "raw", "-O", "qcow2", s(&im.raw), s(&base)]);
    let top = im.dir.join("top.qcow2");
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-F",
        "qcow2",
        "-b",
        "base.qcow2",
        s(&top),
    ]);
    // The guest wrote 256 KiB at 1 MiB: those bytes live only in the overlay.
    qemu_io(&top, "write -P 0x5a 1M 256k");
    let mut disk = im.disk.clone();
    disk[1 << 20..(1 << 20) + (256 << 10)].fill(0x5a);
    let (mut mem, _) = guest(&disk, 512, 6);
    // One page from the overlay's new data, one from the base.
    mem[..4096].copy_from_slice(&disk[(1 << 20) + 8192..][..4096]);
    mem[4096..8192].copy_from_slice(&disk[(3 << 20) + 512..][..4096]);
    let sum = create_over(&mem, &top, &im.dir.join("b.ckpt"));
    let ck = Checkpoint::open(&im.dir.join("b.ckpt")).unwrap();
    assert!(sum.disk_pages >= 2);
    for p in [0, 1] {
        assert!(matches!(
            ck.entry(PageIndex(p)).source,
            ckptfs::PageSource::Disk { .. }
        ));
    }
    assert!(read_all(&ck).0 == mem);
}

fn open_chain(p: &Path) -> String {
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
fn a_changed_qcow2_is_refused_at_open() {
    let im = images(1024, 7);
    let q = im.dir.join("d.qcow2");
    qemu_img(&["convert", "-f", "raw", "-O", "qcow2", s(&im.raw), s(&q)]);
    let (mem, _) = guest(&im.disk, 256, 8);
    let ckpt = im.dir.join("d.ckpt");
    create_over(&mem, &q, &ckpt);
    let abs = std::path::absolute(&q).unwrap();
    let want = format!(
        "checkpoint {} needs a backing disk image: disk image {} changed since the checkpoint was made: ",
        ckpt.display(),
        abs.display()
    );
    // A snapshot of the image taken and discarded leaves its bytes as they were,
    // but a guest write that allocates a cluster changes its metadata.
    let before = std::fs::read(&q).unwrap();
    qemu_img(&["resize", s(&q), "+1M"]);
    assert_eq!(
        open_chain(&ckpt),
        format!(
            "{want}size is {} bytes, was {}",
            (4 << 20) + (1 << 20),
            4 << 20
        )
    );
    std::fs::write(&q, &before).unwrap();
    Checkpoint::open(&ckpt).unwrap();
    // A write into a never-written (zero) part of a sparse image: a new cluster.
    let sparse = im.dir.join("s.qcow2");
    qemu_img(&["create", "-f", "qcow2", s(&sparse), "4M"]);
    qemu_io(&sparse, "write -P 0x33 0 64k");
    let mut mem = vec![0u8; 4 * 4096];
    mem[..4096].fill(0x33);
    let ckpt2 = im.dir.join("s.ckpt");
    assert_eq!(create_over(&mem, &sparse, &ckpt2).disk_pages, 1);
    qemu_io(&sparse, "write -P 0x44 2M 4k");
    let abs = std::path::absolute(&sparse).unwrap();
    assert_eq!(
        open_chain(&ckpt2),
        format!(
            "checkpoint {} needs a backing disk image: disk image {} changed since the checkpoint was made: content fingerprint differs",
            ckpt2.display(),
            abs.display()
        )
    );
}

#[test]
fn a_fingerprint_covers_the_backing_file() {
    let im = images(256, 9);
    let base = im.dir.join("base.qcow2");
    qemu_img(&["create", "-f", "qcow2", s(&base), "1M"]);
    qemu_io(&base, "write -P 0x11 0 64k");
    let top = im.dir.join("top.qcow2");
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-F",
        "qcow2",
        "-b",
        "base.qcow2",
        s(&top),
    ]);
    let fp = DiskImage::open(&top).unwrap().fingerprint().unwrap();
    let top_before = std::fs::read(&top).unwrap();
    // A write to the base that allocates a cluster there changes the top's
    // fingerprint, though the top file is untouched and the block is not sampled.
    qemu_io(&base, "write -P 0x77 512k 4k");
    assert_eq!(std::fs::read(&top).unwrap(), top_before);
    assert!(!ckptfs::disk::fingerprint_blocks(1 << 20).contains(&(512 / 4)));
    assert_ne!(DiskImage::open(&top).unwrap().fingerprint().unwrap(), fp);
}

#[test]
fn a_backing_fifo_or_loop_is_refused_without_hanging() {
    let im = images(64, 11);
    let fifo = im.dir.join("fifo");
    let c = std::ffi::CString::new(s(&fifo)).unwrap();
    // SAFETY: mkfifo with a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let top = im.dir.join("top.qcow2");
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-u",
        "-F",
        "raw",
        "-b",
        "fifo",
        s(&top),
        "1M",
    ]);
    let e = ckptfs::checkpoint::error_chain(&DiskImage::open(&top).unwrap_err());
    assert!(e.ends_with("fifo: not a regular file (a FIFO)"), "{e}");
    // a.qcow2 backed by b.qcow2 backed by a.qcow2.
    let a = im.dir.join("a.qcow2");
    let b = im.dir.join("b.qcow2");
    qemu_img(&["create", "-f", "qcow2", s(&a), "1M"]);
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-u",
        "-F",
        "qcow2",
        "-b",
        "a.qcow2",
        s(&b),
        "1M",
    ]);
    qemu_img(&["rebase", "-u", "-F", "qcow2", "-b", "b.qcow2", s(&a)]);
    let e = ckptfs::checkpoint::error_chain(&DiskImage::open(&a).unwrap_err());
    assert!(
        e.contains("backing chain deeper than 16 images (a loop?)"),
        "{e}"
    );
}
