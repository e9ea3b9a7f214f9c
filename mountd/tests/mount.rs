//! Real FUSE mounts of a generated 32 MiB checkpoint.

mod common;

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use ckptfs::{Checkpoint, PageIndex, PageSource};
use common::{DirectFile, Env, hash_file, is_mounted};
use mountd::fixture::Rng;

const PAGE: usize = 4096;

#[test]
fn whole_file_read_equals_original_dump() {
    let env = Env::new();
    let m = env.mount(&[]);
    let orig = env.original();
    assert_eq!(fs::metadata(env.memory()).unwrap().len(), orig.len() as u64);
    let served = fs::read(env.memory()).unwrap();
    assert!(served == orig, "memory differs from the original dump");
    assert_eq!(
        fs::read(env.mnt.join("vmm-state")).unwrap(),
        b"vmm-state: fixture"
    );
    let mut names: Vec<String> = fs::read_dir(&env.mnt)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["memory", "stats", "vmm-state", "zero-ranges"]);
    // zero-ranges lists exactly the checkpoint's zero pages.
    let ck = Checkpoint::open(&env.fx.ckpt).unwrap();
    let text = fs::read_to_string(env.mnt.join("zero-ranges")).unwrap();
    let ranges = ckptfs::source::parse_zero_ranges(&text, ck.page_count()).unwrap();
    assert_eq!(ranges, ckptfs::source::zero_ranges(&ck));
    assert!(ranges.iter().all(|r| {
        orig[r.start as usize * PAGE..r.end as usize * PAGE]
            .iter()
            .all(|&b| b == 0)
    }));
    assert!(m.unmount().is_none());
}

#[test]
fn random_map_private_page_reads_equal_original() {
    let env = Env::new();
    let _m = env.mount(&["--prefetch", "none"]);
    let orig = env.original();
    // Like QEMU with share=off: open read-write, map MAP_PRIVATE.
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(env.memory())
        .unwrap();
    // SAFETY: the file is not truncated while mapped (the daemon refuses it).
    let mut map = unsafe { memmap2::MmapOptions::new().map_copy(&f) }.unwrap();
    let pages = orig.len() / PAGE;
    let mut rng = Rng::new(9);
    for _ in 0..2000 {
        let p = rng.below(pages as u64) as usize;
        assert_eq!(
            &map[p * PAGE..][..PAGE],
            &orig[p * PAGE..][..PAGE],
            "page {p}"
        );
    }
    // Guest writes stay in the private copy.
    map[123] ^= 0xff;
    drop(map);
    let again = fs::read(env.memory()).unwrap();
    assert_eq!(again[123], orig[123]);
}

#[test]
fn concurrent_readers_in_threads_and_processes_see_the_original() {
    let env = Env::new();
    let _m = env.mount(&[
        "--prefetch",
        "none",
        "--notify-store",
        "false",
        "--cache-mb",
        "4",
    ]);
    let orig = std::sync::Arc::new(env.original());
    let procs: Vec<_> = (0..3)
        .map(|_| {
            Command::new("cmp")
                .arg(env.memory())
                .arg(&env.fx.mem)
                .spawn()
                .unwrap()
        })
        .collect();
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let (orig, path) = (orig.clone(), env.memory());
            thread::spawn(move || {
                let f = fs::File::open(path).unwrap();
                let mut rng = Rng::new(t);
                let mut buf = vec![0u8; 256 * 1024];
                for _ in 0..300 {
                    let len = (1 + rng.below(64) as usize) * 4096 - rng.below(100) as usize;
                    let off = rng.below((orig.len() - len) as u64) as usize;
                    f.read_exact_at(&mut buf[..len], off as u64).unwrap();
                    assert!(
                        buf[..len] == orig[off..off + len],
                        "thread {t} at {off}+{len}"
                    );
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    for mut p in procs {
        assert!(p.wait().unwrap().success(), "cmp saw different bytes");
    }
}

/// Pages whose source is the given blob or disk block.
fn pages_with(ck: &Checkpoint, want: PageSource) -> Vec<u64> {
    (0..ck.page_count())
        .filter(|&p| ck.entry(PageIndex(p)).source == want)
        .collect()
}

#[test]
fn corrupt_blob_and_modified_disk_block_fail_exactly_their_pages() {
    let env = Env::new();
    let orig = env.original();
    let (blob_src, disk_src) = {
        let ck = Checkpoint::open(&env.fx.ckpt).unwrap();
        let sampled = ckptfs::disk::fingerprint_blocks(fs::metadata(&env.fx.disk).unwrap().len());
        let find = |f: &dyn Fn(PageSource) -> bool| {
            (1000..ck.page_count())
                .map(|p| ck.entry(PageIndex(p)).source)
                .find(|s| f(*s))
                .unwrap()
        };
        let blob = find(&|s| matches!(s, PageSource::Blob(_)));
        let disk = find(&|s| match s {
            PageSource::Disk { offset, .. } => !sampled.contains(&(offset.0 / 4096)),
            _ => false,
        });
        let PageSource::Blob(b) = blob else {
            unreachable!()
        };
        let at = ck.header().blobs_offset + b.0 * 4096 + 100;
        ((blob, at), disk)
    };
    let ck = Checkpoint::open(&env.fx.ckpt).unwrap();
    let mut bad: Vec<u64> = pages_with(&ck, blob_src.0);
    bad.extend(pages_with(&ck, disk_src));
    drop(ck);
    // Flip one byte of the blob and one byte of the disk block.
    let flip = |path: &Path, at: u64| {
        let f = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap();
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, at).unwrap();
        f.write_all_at(&[b[0] ^ 0x5a], at).unwrap();
    };
    flip(&env.fx.ckpt, blob_src.1);
    let PageSource::Disk { offset, .. } = disk_src else {
        unreachable!()
    };
    flip(&env.fx.disk, offset.0 + 7);

    let log = env.dir.path().join("mountd.log");
    let m = env.mount_foreground(&["--prefetch", "none"], &log);
    let f = DirectFile::open(&env.memory());
    let mut failed = Vec::new();
    for p in 0..(orig.len() / PAGE) as u64 {
        match f.read_page(p) {
            Ok(bytes) => assert!(bytes == orig[p as usize * PAGE..][..PAGE], "page {p} wrong"),
            Err(errno) => {
                assert_eq!(errno, libc::EIO, "page {p}");
                failed.push(p);
            }
        }
    }
    bad.sort();
    assert_eq!(failed, bad, "EIO for exactly the corrupted pages");
    assert!(m.stats()["read_errors"].as_u64().unwrap() >= bad.len() as u64);
    drop(f);
    let status = m.unmount().unwrap();
    assert!(status.success());
    let log = fs::read_to_string(&log).unwrap();
    assert!(
        log.contains("disk.img") && log.contains("blob section of"),
        "{log}"
    );
    for p in &bad {
        assert!(
            log.contains(&format!("page {p} (")),
            "error log names page {p}: {log}"
        );
    }
}

#[test]
fn read_write_open_succeeds_but_writes_fail_and_sources_stay_untouched() {
    let env = Env::new();
    let before = (hash_file(&env.fx.ckpt), hash_file(&env.fx.disk));
    let _m = env.mount(&[]);
    let mut f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(env.memory())
        .unwrap();
    let err = f.write_all(b"hello").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");
    let err = f.write_all_at(&[1u8; 4096], 8192).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS));
    assert!(f.set_len(4096).is_err(), "truncate must fail");
    assert!(
        fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(env.memory())
            .is_err(),
        "O_TRUNC must fail"
    );
    assert!(fs::write(env.mnt.join("new-file"), b"x").is_err());
    // Reads after the refused writes still return the original bytes.
    let mut head = vec![0u8; 16384];
    f.read_exact_at(&mut head, 0).unwrap();
    assert_eq!(head, env.original()[..16384]);
    drop(f);
    assert_eq!((hash_file(&env.fx.ckpt), hash_file(&env.fx.disk)), before);
}

#[test]
fn a_writable_shared_mapping_is_refused_and_other_readers_see_the_checkpoint() {
    let env = Env::new();
    let before = hash_file(&env.fx.ckpt);
    let _m = env.mount(&["--prefetch", "none"]);
    let orig = env.original();
    // Another VM restored from the same mount maps it MAP_PRIVATE.
    let reader = fs::File::open(env.memory()).unwrap();
    // SAFETY: MAP_PRIVATE of a file the daemon never truncates.
    let other_vm = unsafe { memmap2::MmapOptions::new().map_copy_read_only(&reader) }.unwrap();
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(env.memory())
        .unwrap();
    // SAFETY: the mapping is refused; if it were not, nobody truncates the file.
    let Err(err) = (unsafe { memmap2::MmapMut::map_mut(&f) }) else {
        panic!("a writable MAP_SHARED mapping of memory must be refused");
    };
    assert_eq!(err.raw_os_error(), Some(libc::ENODEV), "{err}");
    // A read-write open still maps MAP_PRIVATE (QEMU < 8.2 with share=off).
    // SAFETY: as above.
    let mut own = unsafe { memmap2::MmapOptions::new().map_copy(&f) }.unwrap();
    own[5000] ^= 0xff;
    assert_ne!(own[5000], orig[5000]);
    assert_eq!(other_vm[5000], orig[5000], "a private write leaked");
    assert!(other_vm[..PAGE * 4] == orig[..PAGE * 4]);
    drop((own, f, other_vm, reader));
    assert_eq!(hash_file(&env.fx.ckpt), before);
}

#[test]
fn stats_json_parses_and_counts_move() {
    let env = Env::new();
    let m = env.mount(&["--prefetch", "none"]);
    let s0 = m.stats();
    for key in [
        "reads",
        "read_bytes",
        "bytes_by_source",
        "cache",
        "prefetch",
        "latency_us",
        "pages",
    ] {
        assert!(s0.get(key).is_some(), "stats lacks {key}: {s0}");
    }
    assert_eq!(s0["guest_bytes"].as_u64(), Some(common::GUEST_MIB << 20));
    let mut buf = vec![0u8; 1 << 20];
    fs::File::open(env.memory())
        .unwrap()
        .read_exact(&mut buf)
        .unwrap();
    let s1 = m.stats();
    assert!(s1["reads"].as_u64() > s0["reads"].as_u64());
    assert!(s1["read_bytes"].as_u64().unwrap() >= 1 << 20);
    let by = &s1["bytes_by_source"];
    let rebuilt = ["zero", "disk", "blob"]
        .iter()
        .map(|k| by[k].as_u64().unwrap())
        .sum::<u64>();
    assert!(rebuilt >= 1 << 20, "{s1}");
    assert!(s1["cache"]["misses"].as_u64().unwrap() > 0);
    assert!(s1["latency_us"]["max"].as_f64().unwrap() > 0.0);
    assert!(s1["pages"]["resident"].as_u64().unwrap() >= 256);
    assert!(s1["elapsed_seconds"].as_f64() >= s0["elapsed_seconds"].as_f64());
}

#[test]
fn background_fetch_completes_and_stores_into_the_page_cache() {
    let env = Env::new();
    let m = env.mount(&[]);
    // Notify-store needs the kernel to know the inode: look it up.
    let _f = fs::File::open(env.memory()).unwrap();
    let t0 = Instant::now();
    loop {
        let s = m.stats();
        if s["background_complete"] == true {
            assert_eq!(s["pages"]["resident"], s["pages"]["total"], "{s}");
            assert!(
                s["prefetch"]["stored_in_kernel_bytes"].as_u64().unwrap() > 0,
                "{s}"
            );
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "background fetch stuck: {s}"
        );
        thread::sleep(Duration::from_millis(50));
    }
    let reads_before = m.stats()["reads"].as_u64().unwrap();
    let served = fs::read(env.memory()).unwrap();
    assert!(served == env.original());
    let reads_after = m.stats()["reads"].as_u64().unwrap();
    assert!(
        reads_after - reads_before < 8,
        "stored pages should be served by the kernel, got {} FUSE reads: {}",
        reads_after - reads_before,
        m.stats()
    );
}

#[test]
fn small_sequential_reads_are_read_ahead_by_the_daemon() {
    let env = Env::new();
    let m = env.mount(&["--prefetch", "readahead", "--notify-store", "false"]);
    let orig = env.original();
    let f = DirectFile::open(&env.memory());
    for p in 0..4096u64 {
        assert!(
            f.read_page(p).unwrap() == orig[p as usize * PAGE..][..PAGE],
            "page {p}"
        );
    }
    let s = m.stats();
    assert!(
        s["prefetch"]["readahead_bytes"].as_u64().unwrap() > 0,
        "{s}"
    );
    assert!(
        s["prefetch"]["used_by_demand_bytes"].as_u64().unwrap() > 0,
        "{s}"
    );
}

#[test]
fn sigterm_unmounts_cleanly() {
    let env = Env::new();
    let log = env.dir.path().join("mountd.log");
    let mut m = env.mount_foreground(&[], &log);
    let pid = m.child.as_ref().unwrap().id() as i32;
    // SAFETY: sending a signal to our own child process.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let status = m.wait_exit(pid).unwrap();
    assert!(status.success(), "exit status {status}");
    assert!(!is_mounted(&env.mnt));
}

#[test]
fn fusermount_unmount_makes_the_daemon_exit() {
    let env = Env::new();
    let log = env.dir.path().join("mountd.log");
    let m = env.mount_foreground(&[], &log);
    let status = m.unmount().unwrap();
    assert!(status.success(), "exit status {status}");
}

/// Which pages of `len` bytes of `memory` are in the kernel page cache (mincore
/// on a read-only shared mapping, which faults nothing in).
fn cached_pages(memory: &Path, len: usize) -> Vec<bool> {
    let f = fs::File::open(memory).unwrap();
    // SAFETY: a read-only mapping of a file the daemon never truncates; it is
    // only passed to mincore, never read.
    let map = unsafe { memmap2::MmapOptions::new().len(len).map(&f) }.unwrap();
    let mut vec = vec![0u8; len.div_ceil(PAGE)];
    // SAFETY: `map` covers `len` bytes; `vec` has one byte per page, the last partial one too.
    let rc = unsafe { libc::mincore(map.as_ptr() as *mut _, len, vec.as_mut_ptr()) };
    assert_eq!(rc, 0, "mincore: {}", std::io::Error::last_os_error());
    vec.iter().map(|b| b & 1 == 1).collect()
}

/// The mount's kernel read-around (its bdi's read_ahead_kb).
fn read_ahead_kb(mnt: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let dev = fs::metadata(mnt).unwrap().dev();
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    let p = format!("/sys/class/bdi/{major}:{minor}/read_ahead_kb");
    fs::read_to_string(&p).unwrap().trim().parse().unwrap()
}

/// Record a loading set by touching `pages` (in order) through a MAP_PRIVATE
/// mapping, as a VMM would; returns the loading-set path.
fn record_loading_set(env: &Env, pages: &[u64]) -> std::path::PathBuf {
    let log = env.dir.path().join("record.log");
    let m = env.mount_foreground(&["--record-loading-set"], &log);
    {
        let f = fs::File::open(env.memory()).unwrap();
        // SAFETY: MAP_PRIVATE of a file the daemon never truncates.
        let map = unsafe { memmap2::MmapOptions::new().map_copy_read_only(&f) }.unwrap();
        let mut sum = 0u64;
        for &p in pages {
            sum += u64::from(map[p as usize * PAGE + 17]);
        }
        std::hint::black_box(sum);
        let s = m.stats();
        // Read-around is off while recording: each fault reads exactly its page.
        assert_eq!(read_ahead_kb(&env.mnt), 0);
        assert_eq!(s["recording"]["touched_pages"], pages.len(), "{s}");
    }
    assert!(m.unmount().unwrap().success());
    let ls = env.dir.path().join("vm.ckpt.ls");
    assert!(ls.exists(), "{}", fs::read_to_string(&log).unwrap());
    ls
}

/// Wait (at most 10 s) until the loading set is settled; returns the stats.
fn settled(m: &common::Mount) -> serde_json::Value {
    let t0 = Instant::now();
    loop {
        let s = m.stats();
        if s["loading_set"]["state"] != "loading" {
            return s;
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "loader stuck: {s}");
        thread::sleep(Duration::from_millis(20));
    }
}

/// The first page of `len` consecutive non-zero pages at or after `from`.
fn nonzero_run(ck: &Checkpoint, from: u64, len: u64) -> u64 {
    let nonzero = |p: u64| ck.entry(PageIndex(p)).source != PageSource::Zero;
    (from..ck.page_count() - len)
        .find(|&p| (p..p + len).all(nonzero))
        .expect("a run of non-zero pages")
}

#[test]
fn loading_set_is_recorded_page_by_page_then_in_the_page_cache_before_any_vmm_opens_memory() {
    let env = Env::new();
    let ck = Checkpoint::open(&env.fx.ckpt).unwrap();
    let zero = pages_with(&ck, PageSource::Zero)[3];
    let (a, b, c, d) = (
        nonzero_run(&ck, 700, 1),
        nonzero_run(&ck, 300, 1),
        nonzero_run(&ck, 1000, 3),
        nonzero_run(&ck, 2000, 1),
    );
    let touched = [a, b, c, c + 1, c + 2, zero, d];
    // A symlink planted where the loading set goes: the root daemon must
    // replace it, never write through it.
    let victim = env.dir.path().join("victim");
    fs::write(&victim, b"precious").unwrap();
    std::os::unix::fs::symlink(&victim, env.dir.path().join("vm.ckpt.ls")).unwrap();
    let ls = record_loading_set(&env, &touched);
    assert_eq!(fs::read(&victim).unwrap(), b"precious");
    assert!(!fs::symlink_metadata(&ls).unwrap().is_symlink());
    let set = ckptfs::loadset::LoadingSet::open(&ls, &ck).unwrap();
    let runs: Vec<(u64, u32, bool)> = set
        .runs()
        .iter()
        .map(|r| (r.first_page, r.pages, r.zero))
        .collect();
    assert_eq!(
        runs,
        [
            (a, 1, false),
            (b, 1, false),
            (c, 3, false),
            (zero, 1, true),
            (d, 1, false)
        ]
    );
    // The loading set is no more readable than the checkpoint.
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&ls) & !mode(&env.fx.ckpt), 0);

    let m = env.mount(&["--wait-loading-set", "--prefetch", "none"]);
    // After a loading set, faults read little around their page.
    assert_eq!(
        read_ahead_kb(&env.mnt),
        mountd::options::LOADING_SET_READAHEAD_KB
    );
    // The mount returned only once the set was pushed; no one has opened
    // `memory` but the daemon itself.
    let s = m.stats();
    assert_eq!(s["loading_set"]["state"], "done", "{s}");
    assert_eq!(
        s["loading_set"]["pushed_bytes"],
        touched.len() * PAGE,
        "{s}"
    );
    assert_eq!(s["reads"], 0, "{s}");
    let len = (common::GUEST_MIB << 20) as usize;
    let cached = cached_pages(&env.memory(), len);
    for &p in &touched {
        assert!(cached[p as usize], "page {p} is not in the page cache");
    }
    // A VMM touching them now gets them without one FUSE read, and right.
    let orig = env.original();
    let f = fs::File::open(env.memory()).unwrap();
    // SAFETY: MAP_PRIVATE of a file the daemon never truncates.
    let map = unsafe { memmap2::MmapOptions::new().map_copy_read_only(&f) }.unwrap();
    for &p in &touched {
        assert!(map[p as usize * PAGE..][..PAGE] == orig[p as usize * PAGE..][..PAGE]);
    }
    assert_eq!(m.stats()["reads"], 0, "{}", m.stats());
}

#[test]
fn foreign_or_damaged_loading_sets_are_refused_and_the_mount_serves_right_bytes() {
    let env = Env::new();
    let ck = Checkpoint::open(&env.fx.ckpt).unwrap();
    let (a, b) = (nonzero_run(&ck, 5, 3), nonzero_run(&ck, 3000, 1));
    let ls = record_loading_set(&env, &[a, a + 1, a + 2, b]);
    let good = fs::read(&ls).unwrap();
    let orig = env.original();
    // A set refused at open leaves the default read-around; one refused while
    // loading keeps the loading set's.
    let check_refused = |what: &str, read_ahead: u64| {
        let m = env.mount(&["--wait-loading-set", "--prefetch", "none"]);
        let s = settled(&m);
        assert_eq!(read_ahead_kb(&env.mnt), read_ahead, "{what}");
        assert_eq!(s["loading_set"]["state"], "refused", "{what}: {s}");
        let warning = s["loading_set"]["warning"].as_str().unwrap().to_owned();
        assert!(warning.contains("vm.ckpt.ls"), "{what}: {warning}");
        assert!(
            fs::read(env.memory()).unwrap() == orig,
            "{what}: wrong bytes"
        );
        warning
    };
    // A flipped byte in a stored page: its CRC (or the data CRC) catches it.
    let mut bad = good.clone();
    let data_at = ckptfs::loadset::data_offset(2) as usize;
    bad[data_at + PAGE + 99] ^= 0x10;
    fs::write(&ls, &bad).unwrap();
    let w = check_refused("flipped byte", mountd::options::LOADING_SET_READAHEAD_KB);
    let page = format!("page {}", a + 1);
    assert!(w.contains(&page) || w.contains("data checksum"), "{w}");
    // A loading set from another checkpoint.
    let other = tempfile::tempdir().unwrap();
    let fx = mountd::fixture::write(
        other.path(),
        common::GUEST_MIB << 20,
        common::DISK_MIB << 20,
        7,
    )
    .unwrap();
    let other_set = ckptfs::loadset::runs_from_touches(&[(5, 0, false)]);
    let other_ck = Checkpoint::open(&fx.ckpt).unwrap();
    ckptfs::loadset::write(&ls, &other_ck, &other_set, 1000, 0o600).unwrap();
    let w = check_refused("foreign", mountd::options::DEFAULT_READAHEAD_KB);
    assert!(w.contains("another checkpoint"), "{w}");
    // Truncated.
    fs::write(&ls, &good[..good.len() - 1]).unwrap();
    check_refused("truncated", mountd::options::DEFAULT_READAHEAD_KB);
}

#[test]
fn stored_pages_are_not_cached_twice() {
    let env = Env::new();
    let ck = Checkpoint::open(&env.fx.ckpt).unwrap();
    let h = *ck.header();
    assert!(h.blob_count > 16, "the fixture stores pages");
    // Cold checkpoint, then every page of `memory` read through the mount.
    ckptfs::input::drop_cached(&fs::File::open(&env.fx.ckpt).unwrap(), 0, 0);
    let m = env.mount(&["--prefetch", "none"]);
    assert!(fs::read(env.memory()).unwrap() == env.original());
    let s = m.stats();
    assert!(s["bytes_by_source"]["blob"].as_u64().unwrap() > 0, "{s}");
    // The rebuilt pages are in the page cache of `memory`, not of the checkpoint too.
    let len = fs::metadata(&env.fx.ckpt).unwrap().len() as usize;
    let cached = cached_pages(&env.fx.ckpt, len);
    let first = (h.blobs_offset / PAGE as u64) as usize;
    let blobs = &cached[first..first + h.blob_count as usize];
    let held = blobs.iter().filter(|&&c| c).count();
    assert_eq!(
        held,
        0,
        "{held} of {} stored pages still cached",
        blobs.len()
    );
    let mem_len = (common::GUEST_MIB << 20) as usize;
    assert!(cached_pages(&env.memory(), mem_len).iter().all(|&c| c));
}

#[test]
fn the_default_prefetch_is_none_with_a_usable_loading_set_and_all_without() {
    let env = Env::new();
    let ck = Checkpoint::open(&env.fx.ckpt).unwrap();
    let a = nonzero_run(&ck, 5, 2);
    let ls = record_loading_set(&env, &[a, a + 1]);
    let policy = |args: &[&str]| {
        let m = env.mount(args);
        let s = settled(&m);
        s["prefetch_policy"].as_str().unwrap().to_owned()
    };
    assert_eq!(policy(&["--wait-loading-set"]), "none");
    assert_eq!(policy(&["--no-loading-set"]), "all");
    assert_eq!(policy(&["--wait-loading-set", "--prefetch", "all"]), "all");
    // A set refused at open is no set: the sweep brings the pages in.
    let good = fs::read(&ls).unwrap();
    fs::write(&ls, &good[..good.len() - 1]).unwrap();
    assert_eq!(policy(&["--wait-loading-set"]), "all");
}

#[test]
fn the_tree_is_read_only_and_a_second_or_stale_mount_is_refused_clearly() {
    let env = Env::new();
    let log = env.dir.path().join("mountd.log");
    let mut m = env.mount_foreground(&[], &log);
    for (what, res) in [
        ("rm", fs::remove_file(env.mnt.join("stats"))),
        ("mv", fs::rename(env.mnt.join("stats"), env.mnt.join("s2"))),
        ("mkdir", fs::create_dir(env.mnt.join("d"))),
        ("create", fs::File::create(env.mnt.join("new")).map(drop)),
    ] {
        let err = res.expect_err(what);
        assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{what}: {err}");
    }
    let again = |expect: &str| {
        let out = Command::new(common::mountd_bin())
            .arg(&env.fx.ckpt)
            .arg(&env.mnt)
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
        assert!(err.contains(expect), "{err}");
    };
    again("already a ckptfs mount");
    // Kill the daemon: the mount goes stale.
    let pid = m.child.as_ref().unwrap().id() as i32;
    // SAFETY: sending a signal to our own child process.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    m.wait_exit(pid);
    again("stale FUSE mount");
    // The way out the message gives works.
    let st = Command::new("fusermount3")
        .args(["-u", "-z"])
        .arg(&env.mnt)
        .status()
        .unwrap();
    assert!(st.success());
    let m = env.mount(&[]);
    assert!(m.unmount().is_none());
}

#[test]
fn a_checkpoint_truncated_under_the_mount_gives_eio_and_the_daemon_survives() {
    let env = Env::new();
    let log = env.dir.path().join("mountd.log");
    let m = env.mount_foreground(&["--prefetch", "none"], &log);
    let ck = Checkpoint::open(&env.fx.ckpt).unwrap();
    let zero = pages_with(&ck, PageSource::Zero)[0];
    let blob_pages: Vec<u64> = (0..ck.page_count())
        .filter(|&p| matches!(ck.entry(PageIndex(p)).source, PageSource::Blob(_)))
        .collect();
    drop(ck);
    // Cut the file in the middle of its blob section.
    let len = fs::metadata(&env.fx.ckpt).unwrap().len();
    fs::OpenOptions::new()
        .write(true)
        .open(&env.fx.ckpt)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let orig = env.original();
    let f = DirectFile::open(&env.memory());
    let mut eio = 0;
    for &p in &blob_pages {
        match f.read_page(p) {
            Ok(bytes) => assert!(bytes == orig[p as usize * PAGE..][..PAGE], "page {p}"),
            Err(e) => {
                assert_eq!(e, libc::EIO, "page {p}");
                eio += 1;
            }
        }
    }
    assert!(eio > 0, "no blob page lay past the cut");
    // The daemon is alive and still serves the pages it can.
    assert!(f.read_page(zero).unwrap() == orig[zero as usize * PAGE..][..PAGE]);
    assert!(m.stats()["read_errors"].as_u64().unwrap() >= eio);
    drop(f);
    assert!(m.unmount().unwrap().success(), "the daemon died");
}

/// Run `cmd` as the unprivileged user 65534 (nobody); its exit status.
fn as_nobody(cmd: &[&str]) -> std::process::Output {
    Command::new("setpriv")
        .args([
            "--reuid",
            "65534",
            "--regid",
            "65534",
            "--clear-groups",
            "--",
        ])
        .args(cmd)
        .output()
        .unwrap()
}

fn chmod(p: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(p, fs::Permissions::from_mode(mode)).unwrap();
}

#[test]
fn guest_ram_is_as_private_as_the_checkpoint_under_allow_other() {
    let env = Env::new();
    chmod(env.dir.path(), 0o755);
    chmod(&env.fx.ckpt, 0o600);
    let m = env.mount(&["-o", "allow_other"]);
    use std::os::unix::fs::PermissionsExt;
    let mode = fs::metadata(env.memory()).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "memory takes the checkpoint's mode");
    let mem = env.memory();
    let out = as_nobody(&["head", "-c", "4096", mem.to_str().unwrap()]);
    assert!(!out.status.success(), "another user read guest RAM");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Permission denied"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(m);
    // A checkpoint others may read: so may they read the mount.
    chmod(&env.fx.ckpt, 0o644);
    chmod(&env.fx.disk, 0o644);
    let m = env.mount(&["-o", "allow_other"]);
    let out = as_nobody(&["head", "-c", "4096", mem.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.stdout == env.original()[..4096]);
    drop(m);
}

#[test]
fn a_root_daemon_serves_only_what_the_checkpoints_owner_may_read() {
    let env = Env::new();
    chmod(env.dir.path(), 0o755);
    chmod(&env.fx.ckpt, 0o644);
    chmod(&env.fx.disk, 0o600); // root's disk image
    // The checkpoint belongs to an unprivileged user.
    let c = std::ffi::CString::new(env.fx.ckpt.to_str().unwrap()).unwrap();
    // SAFETY: a valid C path; chown changes only the file's owner.
    assert_eq!(unsafe { libc::chown(c.as_ptr(), 65534, 65534) }, 0);
    let out = Command::new(common::mountd_bin())
        .arg(&env.fx.ckpt)
        .arg(&env.mnt)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    assert!(
        err.contains("disk.img") && err.contains("not readable by uid 65534"),
        "{err}"
    );
    assert!(
        !err.contains(&(common::DISK_MIB << 20).to_string()),
        "tells the size: {err}"
    );
    assert!(!is_mounted(&env.mnt));
    // Root may say it is for root; or the owner may be given read access.
    let m = env.mount(&["--for-user", "root"]);
    drop(m);
    chmod(&env.fx.disk, 0o640);
    let out = Command::new(common::mountd_bin())
        .arg(&env.fx.ckpt)
        .arg(&env.mnt)
        .output()
        .unwrap();
    assert!(!out.status.success(), "group root does not include nobody");
    chmod(&env.fx.disk, 0o644);
    let m = env.mount(&[]);
    use std::os::unix::fs::PermissionsExt;
    let mode = fs::metadata(env.memory()).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o644);
    drop(m);
}

#[test]
fn bad_checkpoint_is_refused_with_one_clear_line() {
    let env = Env::new();
    let garbage = env.dir.path().join("garbage.ckpt");
    fs::write(&garbage, vec![7u8; 10000]).unwrap();
    for ckpt in [garbage, env.dir.path().join("missing.ckpt")] {
        let out = Command::new(common::mountd_bin())
            .arg(&ckpt)
            .arg(&env.mnt)
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
        assert!(
            err.contains(&*ckpt.to_string_lossy()),
            "names the file: {err}"
        );
        assert!(!is_mounted(&env.mnt));
    }
    // A missing disk image, and a missing mount point.
    let moved = env.dir.path().join("elsewhere.img");
    fs::rename(&env.fx.disk, &moved).unwrap();
    let refused = |mnt: &Path| {
        let out = Command::new(common::mountd_bin())
            .arg(&env.fx.ckpt)
            .arg(mnt)
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let err = refused(&env.mnt);
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    assert!(err.contains("disk.img"), "names the disk image: {err}");
    fs::rename(&moved, &env.fx.disk).unwrap();
    let err = refused(&env.dir.path().join("no-such-dir"));
    assert!(err.contains("no-such-dir"), "names the mount point: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
}
