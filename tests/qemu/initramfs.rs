//! The guest's initramfs: a static busybox, the virtio modules of the Debian
//! kernel package, and an init that mounts the test disks read-only and then
//! runs one shell command per console line. Written as an uncompressed newc
//! cpio archive (the kernel unpacks it as it is; no cpio or gzip needed).

use std::io::Write;
use std::path::{Path, PathBuf};

use super::vm::{DONE, READY};

/// Where a file system is mounted in the guest.
#[derive(Clone, Copy)]
pub struct GuestMount {
    /// Block device, e.g. `vda` or `vdb1`.
    pub dev: &'static str,
    /// Mount point, e.g. `/mnt/a`.
    pub dir: &'static str,
}

/// The static busybox that Debian's busybox-static installs.
pub const BUSYBOX: &str = "/bin/busybox";

/// The init script: set up /proc, /sys and /dev, load the modules, wait for the
/// disks, mount them read-only, then serve commands on ttyS0 without echo.
/// Variables set by a command stay set: the loop runs in this shell.
fn init_script(modules: &[String], mounts: &[GuestMount]) -> String {
    let mut s = String::from(
        "#!/bin/busybox sh\n\
         /bin/busybox --install -s /bin\n\
         export PATH=/bin\n\
         mount -t proc proc /proc\n\
         mount -t sysfs sysfs /sys\n\
         mount -t devtmpfs devtmpfs /dev\n\
         dmesg -n 1\n\
         fail() { echo \"init: $*\"; poweroff -f; }\n",
    );
    for m in modules {
        s += &format!("insmod /lib/modules/{m} || fail insmod {m}\n");
    }
    for m in mounts {
        // devtmpfs creates the nodes from a kernel thread: wait up to 10 s.
        s += &format!(
            "n=0; while [ ! -b /dev/{dev} ]; do n=$((n+1)); [ $n -lt 100 ] || fail no /dev/{dev}; sleep 0.1; done\n\
             mkdir -p {dir} && mount -t ext4 -o ro /dev/{dev} {dir} || fail mount {dev}\n",
            dev = m.dev,
            dir = m.dir
        );
    }
    s += &format!(
        "exec </dev/ttyS0 >/dev/ttyS0 2>&1\n\
         stty -echo -onlcr\n\
         echo {READY}\n\
         while read -r cmd; do eval \"$cmd\"; echo \"{DONE}$?\"; done\n\
         fail console closed\n"
    );
    s
}

/// Write the initramfs for `modules` (paths, in load order) and `mounts`.
pub fn write(path: &Path, modules: &[PathBuf], mounts: &[GuestMount]) {
    let names: Vec<String> = modules
        .iter()
        .map(|m| m.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    let busybox = std::fs::read(BUSYBOX).unwrap_or_else(|e| {
        panic!("{BUSYBOX}: {e} (scripts/setup-qemu.sh installs busybox-static)")
    });
    let mut cpio = Cpio::default();
    for dir in ["bin", "dev", "proc", "sys", "mnt", "lib", "lib/modules"] {
        cpio.dir(dir);
    }
    // The kernel opens /dev/console for init before devtmpfs is mounted.
    cpio.char_dev("dev/console", 5, 1);
    cpio.file("bin/busybox", 0o755, &busybox);
    cpio.file("init", 0o755, init_script(&names, mounts).as_bytes());
    for (module, name) in modules.iter().zip(&names) {
        let bytes = std::fs::read(module).unwrap_or_else(|e| panic!("{}: {e}", module.display()));
        cpio.file(&format!("lib/modules/{name}"), 0o644, &bytes);
    }
    std::fs::write(path, cpio.finish()).unwrap();
}

/// A newc ("070701") cpio archive being built.
#[derive(Default)]
struct Cpio {
    out: Vec<u8>,
    ino: u32,
}

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFCHR: u32 = 0o020000;

impl Cpio {
    fn dir(&mut self, name: &str) {
        self.entry(name, S_IFDIR | 0o755, (0, 0), &[]);
    }

    fn char_dev(&mut self, name: &str, major: u32, minor: u32) {
        self.entry(name, S_IFCHR | 0o600, (major, minor), &[]);
    }

    fn file(&mut self, name: &str, perm: u32, data: &[u8]) {
        self.entry(name, S_IFREG | perm, (0, 0), data);
    }

    /// One header (13 fields of 8 hex digits), the NUL-terminated name and the
    /// data, each padded to 4 bytes.
    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) {
        self.ino += 1;
        let nlink = if mode & S_IFDIR != 0 { 2 } else { 1 };
        let fields = [
            self.ino,
            mode,
            0, // uid
            0, // gid
            nlink,
            0, // mtime
            u32::try_from(data.len()).unwrap(),
            0, // devmajor
            0, // devminor
            rdev.0,
            rdev.1,
            u32::try_from(name.len() + 1).unwrap(),
            0, // check (unused in newc)
        ];
        self.out.extend_from_slice(b"070701");
        for f in fields {
            write!(self.out, "{f:08x}").unwrap();
        }
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.out.len().is_multiple_of(4) {
            self.out.push(0);
        }
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, (0, 0), &[]);
        self.out
    }
}
