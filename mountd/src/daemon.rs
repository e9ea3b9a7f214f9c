//! Process lifecycle: detach, open, mount, serve until unmounted, clean up.
//!
//! Detaching follows libfuse's `fuse_daemonize`: fork before any thread exists,
//! the child opens the checkpoint and mounts while its stderr is still the
//! terminal, then tells the waiting parent over a pipe that the mount is ready;
//! the parent exits 0 only then, or with the child's status if it failed.

use std::fs;
use std::io::{self, Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread;

use anyhow::{Context, bail};
use ckptfs::loadset::LoadingSet;
use ckptfs::{Checkpoint, PageReader};
use log::{debug, info, warn};

use crate::fs::{CkptFs, MEMORY_INO, Ownership};
use crate::kernel::NotifierCache;
use crate::loader;
use crate::options::{Policy, Settings};
use crate::readpath::ReadPath;
use crate::record::Recorder;
use crate::scheduler::{Scheduler, Workers};
use crate::shared::{Config, Shared};

/// Write end of the readiness pipe held by a detached child.
pub struct Ready(fs::File);

impl Ready {
    /// Tell the parent the mount is ready, then drop the terminal.
    fn signal(mut self) {
        let _ = self.0.write_all(b"R");
        redirect_stdio_to_null();
    }
}

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Fork; the parent waits for readiness and exits, the child returns its `Ready`.
/// Must run before any thread is started.
pub fn detach() -> io::Result<Ready> {
    let mut fds = [0; 2];
    // SAFETY: `fds` is a valid array of two c_ints for pipe2 to fill.
    cvt(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) })?;
    // SAFETY: both descriptors were just created by pipe2 and are owned only here.
    let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: the process is single-threaded here (documented precondition), so the
    // child may keep running Rust code after fork.
    let pid = cvt(unsafe { libc::fork() })?;
    if pid > 0 {
        drop(wr);
        std::process::exit(wait_for_child(fs::File::from(rd), pid));
    }
    drop(rd);
    // SAFETY: setsid has no memory-safety preconditions; it detaches from the terminal's session.
    unsafe { libc::setsid() };
    // Do not keep the caller's working directory busy (paths are absolute by now).
    std::env::set_current_dir("/")?;
    Ok(Ready(fs::File::from(wr)))
}

fn wait_for_child(mut rd: fs::File, pid: libc::pid_t) -> i32 {
    let mut b = [0u8; 1];
    if matches!(rd.read(&mut b), Ok(1)) && b[0] == b'R' {
        return 0;
    }
    let mut status = 0;
    // SAFETY: `status` is a valid out-pointer; `pid` is our own child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    if libc::WIFEXITED(status) && libc::WEXITSTATUS(status) != 0 {
        libc::WEXITSTATUS(status)
    } else {
        1
    }
}

fn redirect_stdio_to_null() {
    let Ok(null) = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
    else {
        return;
    };
    use std::os::fd::AsRawFd;
    for fd in 0..3 {
        // SAFETY: dup2 onto the standard descriptors, which this process owns.
        unsafe { libc::dup2(null.as_raw_fd(), fd) };
    }
}

/// Block the termination signals in this thread (and every thread it starts
/// later); the signal thread takes them with sigwait.
fn block_signals() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset/sigaddset initialise it, and
    // pthread_sigmask only reads it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::sigaddset(&mut set, s);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

/// The mount's device number, which names its bdi and its FUSE connection in
/// sysfs. Read from /proc/self/mountinfo: a stat of the mount point would send
/// GETATTR to this very daemon before it serves requests, and deadlock.
fn mount_dev(canonical_mountpoint: &Path) -> Option<(u32, u32)> {
    let want = canonical_mountpoint.to_str()?;
    let info = fs::read_to_string("/proc/self/mountinfo").ok()?;
    // Fields: id parent major:minor root mountpoint ...; the last match is the newest.
    let line = info
        .lines()
        .rev()
        .find(|l| l.split(' ').nth(4) == Some(want))?;
    let (major, minor) = line.split(' ').nth(2)?.split_once(':')?;
    Some((major.parse().ok()?, minor.parse().ok()?))
}

/// Set the kernel read-around of the mount: how much a page fault or a small
/// buffered read asks for (0 while recording: single pages).
fn set_kernel_readahead(dev: (u32, u32), kb: u64) {
    let path = format!("/sys/class/bdi/{}:{}/read_ahead_kb", dev.0, dev.1);
    match fs::write(&path, kb.to_string()) {
        Ok(()) => debug!("mountd: {path} = {kb}"),
        Err(e) => debug!("mountd: cannot set {path}: {e}"),
    }
}

fn unmount_on_signals(
    set: libc::sigset_t,
    mut unmounter: fuser::SessionUnmounter,
    mnt: PathBuf,
    dev: Option<(u32, u32)>,
) {
    let mut count = 0;
    loop {
        let mut sig = 0;
        // SAFETY: `set` is an initialised sigset_t and `sig` a valid out-pointer.
        if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
            continue;
        }
        count += 1;
        if count == 1 {
            info!("mountd: signal {sig}, unmounting {}", mnt.display());
            if let Err(e) = unmounter.unmount() {
                warn!(
                    "mountd: unmount failed ({e}); detaching lazily, open files stay served until closed"
                );
                lazy_unmount(&mnt);
            }
        } else if let Some((major, minor)) = dev {
            // A second signal: abort the connection even if files are still open.
            let conn = (major << 20) | minor;
            warn!("mountd: signal {sig} again, aborting FUSE connection {conn}");
            let _ = fs::write(format!("/sys/fs/fuse/connections/{conn}/abort"), "1");
        }
    }
}

fn lazy_unmount(mnt: &Path) {
    let Ok(c) = std::ffi::CString::new(mnt.as_os_str().as_bytes()) else {
        return;
    };
    // SAFETY: `c` is a valid NUL-terminated path for the duration of the call.
    unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
}

/// The user the mount is for: `--for-user`, else the checkpoint file's owner
/// (the mount's files take the checkpoint's owner and mode, so whatever they
/// serve must be readable by that user: a root daemon must not serve a
/// root-only disk image that a user's crafted checkpoint names).
fn mount_reader(s: &Settings) -> anyhow::Result<ckptfs::input::Reader> {
    use ckptfs::input::Reader;
    use std::os::unix::fs::MetadataExt;
    if let Some(who) = &s.for_user {
        return Reader::named(who).with_context(|| format!("--for-user {who}"));
    }
    let owner = fs::metadata(&s.checkpoint)
        .with_context(|| format!("checkpoint {}", s.checkpoint.display()))?
        .uid();
    Ok(Reader::of_uid(owner)?)
}

/// Refuse a mount point that is missing, not a directory, already a ckptfs
/// mount, or a stale FUSE mount whose daemon died, and say the way out.
fn check_mount_point(mnt: &Path) -> anyhow::Result<()> {
    // statfs always reaches a FUSE daemon (stat may be answered from cached
    // attributes), so it is what tells a dead one: ENOTCONN.
    let stale = std::ffi::CString::new(mnt.as_os_str().as_bytes())
        .ok()
        .is_some_and(|c| {
            // SAFETY: statvfs is plain data; zeroed is a valid value to overwrite.
            let mut buf: libc::statvfs = unsafe { std::mem::zeroed() };
            // SAFETY: `c` is a valid NUL-terminated path, `buf` a valid out-pointer.
            let rc = unsafe { libc::statvfs(c.as_ptr(), &mut buf) };
            rc != 0 && io::Error::last_os_error().raw_os_error() == Some(libc::ENOTCONN)
        });
    if stale {
        bail!(
            "mount point {} is a stale FUSE mount (its daemon is gone); clear it with `fusermount3 -u -z {}`",
            mnt.display(),
            mnt.display()
        );
    }
    match fs::metadata(mnt) {
        Err(e) => bail!("mount point {}: {e}", mnt.display()),
        Ok(m) if !m.is_dir() => bail!("mount point {} is not a directory", mnt.display()),
        Ok(_) => {}
    }
    if is_ckptfs_mount(&mnt.canonicalize()?) {
        bail!(
            "{} is already a ckptfs mount; unmount it first (`fusermount3 -u {}`)",
            mnt.display(),
            mnt.display()
        );
    }
    Ok(())
}

/// Whether the newest mount on `canonical_mountpoint` is a ckptfs mount.
fn is_ckptfs_mount(canonical_mountpoint: &Path) -> bool {
    let Some(want) = canonical_mountpoint.to_str() else {
        return false;
    };
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    // "... mountpoint ... - fstype source options": the type follows the separator.
    info.lines()
        .rev()
        .find(|l| l.split(' ').nth(4) == Some(want))
        .and_then(|l| l.split_once(" - "))
        .is_some_and(|(_, rest)| rest.starts_with("fuse.ckptfs "))
}

/// Write the recorded loading set next to the checkpoint, no more readable
/// than the checkpoint itself.
fn save_loading_set(s: &Settings, shared: &Shared) {
    let (Some(rec), Some(path)) = (&shared.recorder, &s.loading_set) else {
        return;
    };
    let mode = ckptfs::atomic_file::derived_mode(&[&s.checkpoint]);
    match rec.save(path, &*shared.source, mode) {
        Ok(w) => info!(
            "mountd: recorded loading set {}: {} runs, {} pages stored, {} zero pages",
            path.display(),
            w.runs,
            w.data_pages,
            w.zero_pages
        ),
        Err(e) => warn!("mountd: cannot write the loading set: {}", crate::chain(&e)),
    }
}

/// The page source, the owner of the mount's files and the VMM state: a
/// checkpoint file, or (s3://) a pushed checkpoint, also returned as such.
type Source = (
    Arc<dyn PageReader>,
    Ownership,
    Vec<u8>,
    Option<Arc<ckptfs::remote::RemoteCheckpoint>>,
);

fn open_source(s: &Settings) -> anyhow::Result<Source> {
    if let Some(url) = s.remote_url() {
        let (rc, owner, state) = crate::remote::open(s, url)?;
        return Ok((rc.clone(), owner, state, Some(rc)));
    }
    // The library's errors name the checkpoint or disk image themselves.
    let reader = mount_reader(s)?;
    let opts = ckptfs::OpenOptions {
        reader: Some(reader),
        // What the daemon rebuilds lives on in the page cache of `memory`.
        drop_read_blobs: true,
        ..Default::default()
    };
    let ckpt = Checkpoint::open_with(&s.checkpoint, &opts)?;
    // The mount's files take the checkpoint's owner, and no more permission
    // than every file the pages come from allows.
    let mut owner = Ownership::of(&fs::metadata(&s.checkpoint)?);
    owner.mode &= ckpt.sources_mode() as u16;
    let vmm_state = ckpt.vmm_state().to_vec();
    Ok((Arc::new(ckpt), owner, vmm_state, None))
}

/// Open the checkpoint, mount, serve until unmounted. `ready` is set when detached.
pub fn serve(s: &Settings, ready: Option<Ready>) -> anyhow::Result<()> {
    check_mount_point(&s.mountpoint)?;
    let (source, owner, vmm_state, remote) = open_source(s)?;
    let recorder = s
        .record
        .then(|| Recorder::new(source.page_count(), s.window));
    // Read the loading set before `shared` exists: whether there is a usable one decides
    // the default policy.
    let local_set = match (&s.loading_set, s.record, s.notify_store) {
        (Some(path), false, true) => Some((path, LoadingSet::open(path, &*source))),
        _ => None,
    };
    let usable_set = matches!(local_set, Some((_, Ok(_))));
    let config = Config {
        chunk_bytes: s.chunk_bytes,
        cache_bytes: s.cache_bytes,
        policy: if s.record {
            Policy::None
        } else {
            s.policy.unwrap_or(Policy::default_for(usable_set))
        },
        notify_store: s.notify_store,
        checkpoint_name: s.checkpoint.display().to_string(),
    };
    let shared = Arc::new(Shared::new(source, config, recorder));
    let remote_set = remote
        .as_ref()
        .filter(|_| s.notify_store && !s.record && !s.no_loading_set)
        .filter(|rc| crate::remote::begin_loading_set(&shared, rc))
        .cloned();
    if let Some(rc) = &remote {
        crate::remote::start_background(&shared, rc, remote_set.is_some());
    }
    let set = match (local_set, &s.loading_set, s.record, s.notify_store) {
        (Some((path, opened)), ..) => loader::open(&shared, path, opened),
        (None, Some(path), false, false) if path.exists() => {
            warn!("mountd: not using the loading set: it needs notify-store");
            None
        }
        _ => None,
    };
    let readahead_kb = s.readahead_kb.unwrap_or(if set.is_some() {
        crate::options::LOADING_SET_READAHEAD_KB
    } else {
        crate::options::DEFAULT_READAHEAD_KB
    });
    let sched = Arc::new(Scheduler::with_background_share(s.background_share));
    let reads = ReadPath::new(shared.clone(), sched.clone());
    let fs = CkptFs::new(shared.clone(), reads, vmm_state, owner);

    let sigset = block_signals();
    let mut config = fuser::Config::default();
    config.mount_options = s.mount_options.clone();
    config.acl = s.acl;
    config.n_threads = Some(s.threads);
    config.clone_fd = true;
    let canonical = s.mountpoint.canonicalize()?;
    let mut session = fuser::Session::new(fs, &canonical, &config)
        .with_context(|| format!("cannot mount on {}", s.mountpoint.display()))?;
    let dev = mount_dev(&canonical);
    if let Some(dev) = dev {
        set_kernel_readahead(dev, readahead_kb);
    }
    shared.kernel.set_sink(Box::new(NotifierCache {
        notifier: session.notifier(),
        ino: MEMORY_INO,
    }));
    let unmounter = session.unmount_callable();
    let mnt = s.mountpoint.clone();
    thread::Builder::new()
        .name("ckptfs-signals".into())
        .spawn(move || unmount_on_signals(sigset, unmounter, mnt, dev))?;
    let workers = Workers::start(shared.clone(), sched.clone())?;
    info!(
        "mountd: serving {} ({} MiB) on {}, prefetch {}, read-around {} KiB{}",
        s.checkpoint.display(),
        shared.guest_size() >> 20,
        s.mountpoint.display(),
        shared.config.policy.name(),
        readahead_kb,
        if s.record {
            ", recording the loading set"
        } else {
            ""
        }
    );
    // Readiness: at once, or (--wait-loading-set) once the loading set is in.
    let has_set = set.is_some() || remote_set.is_some();
    let (now, later) = match (ready, s.wait_loading_set && has_set) {
        (Some(r), true) => (None, Some(r)),
        (r, _) => (r, None),
    };
    if let Some(r) = now {
        r.signal();
    }
    let loader = match (set, remote_set) {
        (None, Some(rc)) => Some(crate::remote::start_loader(
            shared.clone(),
            rc,
            canonical.join("memory"),
            Box::new(move || {
                if let Some(r) = later {
                    r.signal();
                }
            }),
        )?),
        (Some(set), _) => Some(loader::start(
            shared.clone(),
            set,
            canonical.join("memory"),
            s.loader_threads,
            Box::new(move || {
                if let Some(r) = later {
                    r.signal();
                }
            }),
        )?),
        (None, None) => None,
    };
    let res = session.run();
    sched.shut_down();
    workers.join();
    if let Some(l) = loader {
        let _ = l.join();
    }
    save_loading_set(s, &shared);
    if let Some(rc) = &remote {
        crate::remote::log_stats(rc);
    }
    info!("mountd: unmounted {}", s.mountpoint.display());
    res.context("FUSE session failed")
}
