//! The guest's inputs: the cached Debian kernel, the tools, and two disks of
//! files with known content: a 1 KiB-block ext4 image, and an MBR disk with a
//! 4 KiB-block ext4 at sector 63 (byte 32,256: its blocks sit 3,584 bytes past
//! a 4 KiB boundary) and one at a 1 MiB-aligned partition.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::initramfs::{self, GuestMount};
use super::vm::DiskImage;

/// Bytes per disk sector.
pub const SECTOR: u64 = 512;

/// The kernel package that scripts/setup-qemu.sh extracted.
pub struct Kernel {
    dir: PathBuf,
}

impl Kernel {
    /// `$CKPTFS_LINUX_CACHE/current` (default /var/cache/ckptfs/linux/current);
    /// panics, naming the script, when it is not there.
    pub fn cached() -> Kernel {
        let cache = std::env::var_os("CKPTFS_LINUX_CACHE")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/var/cache/ckptfs/linux"));
        let dir = cache.join("current");
        assert!(
            dir.join("load-order").exists() && dir.join("vmlinuz").exists(),
            "no Debian kernel in {}: run scripts/setup-qemu.sh",
            dir.display()
        );
        Kernel { dir }
    }

    pub fn vmlinuz(&self) -> PathBuf {
        self.dir.join("vmlinuz")
    }

    /// The package name the cache entry came from (the link's target).
    pub fn package(&self) -> String {
        std::fs::read_link(&self.dir)
            .map(|p| p.display().to_string())
            .unwrap_or_default()
    }

    /// Module files in load order.
    pub fn modules(&self) -> Vec<PathBuf> {
        std::fs::read_to_string(self.dir.join("load-order"))
            .unwrap()
            .lines()
            .map(|m| self.dir.join("modules").join(m))
            .collect()
    }
}

/// Run scripts/setup-qemu.sh (a no-op when everything is installed), then
/// check that every tool is there: the test fails, never skips, without them.
pub fn install_and_check_tools() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/setup-qemu.sh");
    let out = Command::new(&script)
        .output()
        .expect("running setup-qemu.sh");
    assert!(
        out.status.success(),
        "{} failed: {}",
        script.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    for tool in [
        "qemu-system-x86_64",
        "qemu-img",
        "mkfs.ext4",
        "md5sum",
        "fusermount3",
    ] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success());
        assert!(found, "{tool} is missing: run scripts/setup-qemu.sh");
    }
    assert!(Path::new(initramfs::BUSYBOX).exists(), "no static busybox");
    assert!(Path::new("/dev/fuse").exists(), "/dev/fuse is missing");
}

/// One ext4 file system of the test and the files it holds.
pub struct FsSpec {
    /// Guest block device and mount point.
    pub mount: GuestMount,
    /// mkfs.ext4 -b.
    pub block_size: u32,
    /// File-system size.
    pub bytes: u64,
    /// Lengths of its files (not page multiples, so tails are partial pages).
    pub file_lens: &'static [usize],
}

const MIB: u64 = 1 << 20;

/// Disk A: a whole-disk 1 KiB-block ext4 (what Debian's mke2fs makes below 512 MiB).
pub const SMALL_FS: FsSpec = FsSpec {
    mount: GuestMount {
        dev: "vda",
        dir: "/mnt/a",
    },
    block_size: 1024,
    bytes: 64 * MIB,
    file_lens: &[
        16 << 20,
        (12 << 20) + 1234,
        (8 << 20) + 777,
        (4 << 20) + 4095,
    ],
};

/// Disk B, partition 1 at sector 63: 4 KiB blocks at 4 KiB + 3,584 offsets.
pub const SECTOR63_FS: FsSpec = FsSpec {
    mount: GuestMount {
        dev: "vdb1",
        dir: "/mnt/b1",
    },
    block_size: 4096,
    bytes: 32 * MIB,
    file_lens: &[12 << 20, (8 << 20) + 99],
};

/// Disk B, partition 2 at 33 MiB: 4 KiB blocks at 4 KiB-aligned disk offsets.
pub const ALIGNED_FS: FsSpec = FsSpec {
    mount: GuestMount {
        dev: "vdb2",
        dir: "/mnt/b2",
    },
    block_size: 4096,
    bytes: 32 * MIB,
    file_lens: &[12 << 20, (8 << 20) + 4000],
};

/// First sector of disk B's partitions: the old DOS default, and 1 MiB-aligned.
pub const SECTOR63_START: u64 = 63;
pub const ALIGNED_START: u64 = 33 * MIB / SECTOR;

/// A file the guest reads, with its content and the host's md5sum of it.
pub struct GuestFile {
    pub guest_path: String,
    pub data: Vec<u8>,
    pub md5: String,
}

/// A file system placed on a disk.
pub struct Placed {
    pub fs: &'static FsSpec,
    /// Index into [`Guest::disks`].
    pub disk: usize,
    /// Byte offset of the file system on that disk.
    pub offset: u64,
}

/// Everything QEMU needs to boot the guest, and what the guest should answer.
pub struct Guest {
    pub vmlinuz: PathBuf,
    pub initrd: PathBuf,
    pub cmdline: String,
    /// Raw disk images, in the order they are attached (vda, vdb).
    pub disks: Vec<PathBuf>,
    pub placed: Vec<Placed>,
    pub files: Vec<GuestFile>,
}

impl Guest {
    /// Build the initramfs and both disks in `dir`.
    pub fn build(dir: &Path, kernel: &Kernel) -> Guest {
        let all = [&SMALL_FS, &SECTOR63_FS, &ALIGNED_FS];
        let mut files = Vec::new();
        let mut images = Vec::new();
        for (n, fs) in all.iter().enumerate() {
            let image = dir.join(format!("fs{n}.img"));
            files.extend(make_fs(fs, &dir.join(format!("fs{n}")), &image, n as u64));
            images.push(image);
        }
        let disk_a = dir.join("small-1k.img");
        std::fs::rename(&images[0], &disk_a).unwrap();
        let disk_b = dir.join("mbr-sector63.img");
        let parts = [
            (SECTOR63_START, &images[1], &SECTOR63_FS),
            (ALIGNED_START, &images[2], &ALIGNED_FS),
        ];
        write_mbr_disk(&disk_b, &parts);
        let initrd = dir.join("initrd.cpio");
        initramfs::write(&initrd, &kernel.modules(), &all.map(|fs| fs.mount));
        let placed = vec![
            Placed {
                fs: &SMALL_FS,
                disk: 0,
                offset: 0,
            },
            Placed {
                fs: &SECTOR63_FS,
                disk: 1,
                offset: SECTOR63_START * SECTOR,
            },
            Placed {
                fs: &ALIGNED_FS,
                disk: 1,
                offset: ALIGNED_START * SECTOR,
            },
        ];
        Guest {
            vmlinuz: kernel.vmlinuz(),
            initrd,
            cmdline: kernel_cmdline(),
            disks: vec![disk_a, disk_b],
            placed,
            files,
        }
    }

    /// The disks as raw images, as the guest was booted with them.
    pub fn raw_disks(&self) -> Vec<DiskImage> {
        self.disks
            .iter()
            .map(|path| DiskImage {
                path: path.clone(),
                format: "raw",
            })
            .collect()
    }

    /// The host's md5sums by guest path.
    pub fn expected_md5(&self) -> BTreeMap<String, String> {
        self.files
            .iter()
            .map(|f| (f.guest_path.clone(), f.md5.clone()))
            .collect()
    }

    /// The files of file system `fs`.
    pub fn files_of<'a>(&'a self, fs: &'a FsSpec) -> impl Iterator<Item = &'a GuestFile> + 'a {
        let prefix = format!("{}/", fs.mount.dir);
        self.files
            .iter()
            .filter(move |f| f.guest_path.starts_with(&prefix))
    }
}

/// A tiny command line: serial console, no boot chatter, and the TSC rate and
/// delay-loop constant given, since PIT calibration can hang under TCG (TCG's
/// guest TSC runs at the host's rate).
fn kernel_cmdline() -> String {
    const HZ: u64 = 250; // CONFIG_HZ of Debian's kernels
    let khz = host_tsc_khz();
    format!(
        "console=ttyS0 quiet loglevel=1 panic=-1 8250.nr_uarts=1 tsc_early_khz={khz} lpj={}",
        khz * 1000 / HZ
    )
}

/// The host's TSC rate, measured over 100 ms.
fn host_tsc_khz() -> u64 {
    let t0 = std::time::Instant::now();
    // SAFETY: RDTSC only reads the time-stamp counter; every x86_64 CPU has it.
    let c0 = unsafe { std::arch::x86_64::_rdtsc() };
    std::thread::sleep(std::time::Duration::from_millis(100));
    // SAFETY: as above.
    let c1 = unsafe { std::arch::x86_64::_rdtsc() };
    let us = t0.elapsed().as_micros() as u64;
    (c1 - c0) * 1000 / us
}

/// Pseudo-random bytes (splitmix64): never a zero page, every page distinct.
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x5eed;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        out.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Stage `fs`'s files in `stage`, build the ext4 image with `mkfs.ext4 -d`, and
/// return the files with their md5sums.
fn make_fs(fs: &FsSpec, stage: &Path, image: &Path, fs_index: u64) -> Vec<GuestFile> {
    std::fs::create_dir_all(stage).unwrap();
    let mut files = Vec::new();
    for (n, &len) in fs.file_lens.iter().enumerate() {
        let name = format!("file{n}.bin");
        let data = pseudo_random(len, fs_index * 100 + n as u64 + 1);
        let host = stage.join(&name);
        std::fs::write(&host, &data).unwrap();
        files.push(GuestFile {
            guest_path: format!("{}/{name}", fs.mount.dir),
            md5: host_md5(&host),
            data,
        });
    }
    std::fs::File::create(image)
        .unwrap()
        .set_len(fs.bytes)
        .unwrap();
    let out = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-b", &fs.block_size.to_string(), "-d"])
        .arg(stage)
        .arg(image)
        .output()
        .expect("running mkfs.ext4");
    assert!(
        out.status.success(),
        "mkfs.ext4 failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    files
}

fn host_md5(path: &Path) -> String {
    let out = Command::new("md5sum").arg(path).output().unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap()[..32].to_string()
}

/// Write a disk with an MBR and each `(start sector, image)` as a Linux
/// partition, in order.
fn write_mbr_disk(disk: &Path, parts: &[(u64, &PathBuf, &FsSpec)]) {
    use std::os::unix::fs::FileExt;
    let mut mbr = [0u8; SECTOR as usize];
    let mut end = 0;
    for (n, (start, image, fs)) in parts.iter().enumerate() {
        let sectors = fs.bytes / SECTOR;
        let e = &mut mbr[446 + 16 * n..446 + 16 * (n + 1)];
        e[0] = 0x00; // not bootable
        e[1..4].copy_from_slice(&[0xfe, 0xff, 0xff]); // CHS: use the LBA fields
        e[4] = 0x83; // Linux
        e[5..8].copy_from_slice(&[0xfe, 0xff, 0xff]);
        e[8..12].copy_from_slice(&u32::try_from(*start).unwrap().to_le_bytes());
        e[12..16].copy_from_slice(&u32::try_from(sectors).unwrap().to_le_bytes());
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(disk)
            .unwrap();
        f.write_all_at(&std::fs::read(image).unwrap(), start * SECTOR)
            .unwrap();
        std::fs::remove_file(image).unwrap();
        end = end.max((start + sectors) * SECTOR);
    }
    mbr[510] = 0x55;
    mbr[511] = 0xaa;
    let f = std::fs::OpenOptions::new().write(true).open(disk).unwrap();
    f.write_all_at(&mbr, 0).unwrap();
    f.set_len(end).unwrap();
}
