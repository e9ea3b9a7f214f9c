//! Writing files safely as root: every file ckptfs writes (checkpoints, loading
//! sets, working-set sidecars) goes through [`AtomicFile`].
//!
//! The bytes go to a temporary file in the target's directory with an
//! unguessable name, created `O_CREAT | O_EXCL | O_NOFOLLOW` relative to a
//! descriptor of that directory (so neither a planted symlink nor a file
//! planted under a guessed name is ever opened), mode 0600 while being
//! written; [`AtomicFile::commit`] sets the final mode, fsyncs, and renames it
//! over the target (`rename` replaces a symlink at the target, never follows
//! it) and fsyncs the directory. A temporary file that is not committed is
//! removed when the `AtomicFile` is dropped. This is what coreutils' `install`
//! and systemd's `fopen_temporary` do.

use std::ffi::{CString, OsStr};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Temporary files being written right now (absolute paths), removed by
/// [`remove_pending`] when the process is interrupted.
static PENDING: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

fn pending() -> std::sync::MutexGuard<'static, Vec<PathBuf>> {
    PENDING.lock().unwrap_or_else(|e| e.into_inner())
}

/// Remove every temporary file not yet committed (from a signal-handling
/// thread, before exiting on SIGINT/SIGTERM: destructors do not run then).
pub fn remove_pending() {
    remove_pending_under(Path::new("/"));
}

fn remove_pending_under(dir: &Path) {
    pending().retain(|p| {
        if !p.starts_with(dir) {
            return true;
        }
        let _ = std::fs::remove_file(p);
        false
    });
}

/// Unblock every signal in the calling thread: call it before `exec` (or in a
/// child before it execs), so a program started from a process that blocked
/// signals for [`clean_up_on_signals`] does not inherit the blocked mask (a
/// VMM or daemon that ignored SIGTERM).
pub fn unblock_signals() {
    // SAFETY: an empty sigset_t is plain data; SIG_SETMASK only reads it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::pthread_sigmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
    }
}

/// Block SIGINT, SIGTERM and SIGHUP in this thread and every thread started
/// after it, and start a thread that takes them: it removes the pending
/// temporary files and exits with 128 + the signal number, as the shell would.
/// Call it first thing in `main`, before any other thread exists.
pub fn clean_up_on_signals() {
    // SAFETY: sigset_t is plain data initialised by sigemptyset/sigaddset;
    // pthread_sigmask only reads it.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::sigaddset(&mut set, s);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    };
    let spawned = std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let mut sig = 0;
            // SAFETY: `set` is an initialised sigset_t, `sig` a valid out-pointer.
            while unsafe { libc::sigwait(&set, &mut sig) } != 0 {}
            remove_pending();
            std::process::exit(128 + sig);
        });
    if let Err(e) = spawned {
        log::warn!("cannot start the signal thread: {e}");
    }
}

/// Writing a checkpoint through an [`AtomicFile`] failed: which step, and the output path.
#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    /// The temporary file could not be created.
    #[error("creating a temporary file beside {path}")]
    TempFile {
        /// The output path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Writing the checkpoint failed.
    #[error("writing checkpoint {path}")]
    Write {
        /// The output path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Flushing the checkpoint to stable storage failed.
    #[error("flushing checkpoint {path} to disk")]
    Fsync {
        /// The output path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Renaming the finished file into place failed.
    #[error("renaming the finished checkpoint into place as {path}")]
    Rename {
        /// The output path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
}

impl OutputError {
    /// The step's error constructor for `path`, for `map_err`.
    pub fn at(
        path: &Path,
        step: fn(PathBuf, io::Error) -> OutputError,
    ) -> impl FnOnce(io::Error) -> OutputError + '_ {
        move |source| step(path.to_owned(), source)
    }

    /// Creating the temporary file.
    pub fn temp_file(path: PathBuf, source: io::Error) -> Self {
        OutputError::TempFile { path, source }
    }

    /// Writing.
    pub fn write(path: PathBuf, source: io::Error) -> Self {
        OutputError::Write { path, source }
    }

    /// Flushing.
    pub fn fsync(path: PathBuf, source: io::Error) -> Self {
        OutputError::Fsync { path, source }
    }

    /// Renaming into place.
    pub fn rename(path: PathBuf, source: io::Error) -> Self {
        OutputError::Rename { path, source }
    }
}

/// A file being written; it appears at its target path only on [`commit`](Self::commit).
#[derive(Debug)]
pub struct AtomicFile {
    dir: OwnedFd,
    tmp_name: CString,
    name: CString,
    target: PathBuf,
    file: Option<File>,
    mode: u32,
    synced: bool,
}

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// 16 random bytes from the kernel, as 32 hex digits.
fn random_hex() -> io::Result<String> {
    let mut b = [0u8; 16];
    let mut done = 0;
    while done < b.len() {
        // SAFETY: getrandom writes at most `len` bytes into the buffer it is given.
        let n = unsafe { libc::getrandom(b[done..].as_mut_ptr().cast(), b.len() - done, 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        done += n as usize;
    }
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

fn cstring(b: &[u8]) -> io::Result<CString> {
    CString::new(b).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))
}

impl AtomicFile {
    /// Start writing `target`; `mode` is applied on commit (e.g. 0o600, 0o644).
    pub fn create(target: &Path, mode: u32) -> io::Result<Self> {
        let name = target
            .file_name()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no file name"))?;
        let parent = match target.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let dir_c = cstring(parent.as_os_str().as_bytes())?;
        // SAFETY: a valid NUL-terminated path; the descriptor returned is owned below.
        let dfd = cvt(unsafe {
            libc::open(
                dir_c.as_ptr(),
                libc::O_DIRECTORY | libc::O_PATH | libc::O_CLOEXEC,
            )
        })?;
        // SAFETY: `dfd` was just returned by open and is owned by nobody else.
        let dir = unsafe { OwnedFd::from_raw_fd(dfd) };
        let mut tmp = b".".to_vec();
        tmp.extend_from_slice(name.as_bytes());
        tmp.extend_from_slice(format!(".tmp-{}", random_hex()?).as_bytes());
        let tmp_name = cstring(&tmp)?;
        // Registered before it exists, so a signal right after the create cannot
        // miss it (removing a name that was never created is harmless).
        let abs = std::path::absolute(parent.join(OsStr::from_bytes(&tmp)))?;
        pending().push(abs.clone());
        // SAFETY: `dir` is an open directory descriptor and `tmp_name` a valid
        // NUL-terminated name; O_EXCL|O_NOFOLLOW refuse any existing file or link.
        let fd = cvt(unsafe {
            libc::openat(
                dir.as_raw_fd(),
                tmp_name.as_ptr(),
                libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC,
                0o600 as libc::c_uint,
            )
        })
        .inspect_err(|_| pending().retain(|p| *p != abs))?;
        // SAFETY: `fd` was just created by openat and is owned only here.
        let file = unsafe { File::from_raw_fd(fd) };
        Ok(AtomicFile {
            dir,
            tmp_name,
            name: cstring(name.as_bytes())?,
            target: target.to_owned(),
            file: Some(file),
            mode,
            synced: false,
        })
    }

    /// The open temporary file, to write (and seek) into.
    pub fn file(&mut self) -> &mut File {
        self.file.as_mut().expect("file is present until commit")
    }

    /// Where the file will appear.
    pub fn target(&self) -> &Path {
        &self.target
    }

    /// Name of the temporary file inside the target's directory.
    pub fn temp_name(&self) -> &OsStr {
        OsStr::from_bytes(self.tmp_name.as_bytes())
    }

    /// Set the final mode and fsync the data: the first half of
    /// [`commit`](Self::commit), for callers that report the two steps apart.
    pub fn sync(&mut self) -> io::Result<()> {
        let file = self.file.as_ref().expect("file is present until commit");
        // SAFETY: fchmod on a descriptor we own.
        cvt(unsafe { libc::fchmod(file.as_raw_fd(), self.mode as libc::mode_t) })?;
        file.sync_all()?;
        self.synced = true;
        Ok(())
    }

    /// Set the final mode, fsync, rename over the target, fsync the directory.
    pub fn commit(mut self) -> io::Result<()> {
        if !self.synced {
            self.sync()?;
        }
        drop(self.file.take());
        // SAFETY: both names are valid NUL-terminated names relative to `dir`.
        let r = cvt(unsafe {
            libc::renameat(
                self.dir.as_raw_fd(),
                self.tmp_name.as_ptr(),
                self.dir.as_raw_fd(),
                self.name.as_ptr(),
            )
        });
        if let Err(e) = r {
            self.unlink();
            return Err(e);
        }
        self.forget_pending();
        self.tmp_name = CString::default();
        // fsync of the directory makes the rename durable; an O_PATH descriptor
        // cannot be fsynced, so open the directory itself (best effort).
        if let Ok(d) = File::open(self.target.parent().unwrap_or(Path::new("."))) {
            let _ = d.sync_all();
        }
        Ok(())
    }

    fn forget_pending(&self) {
        let name = OsStr::from_bytes(self.tmp_name.as_bytes());
        pending().retain(|p| p.file_name() != Some(name));
    }

    fn unlink(&self) {
        if self.tmp_name.as_bytes().is_empty() {
            return;
        }
        self.forget_pending();
        // SAFETY: a valid name relative to an open directory descriptor.
        unsafe { libc::unlinkat(self.dir.as_raw_fd(), self.tmp_name.as_ptr(), 0) };
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if self.file.is_some() {
            self.unlink();
        }
    }
}

/// Write `bytes` to `target` through an [`AtomicFile`] with `mode`.
pub fn write(target: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    use std::io::Write;
    let mut f = AtomicFile::create(target, mode)?;
    f.file().write_all(bytes)?;
    f.commit()
}

/// The process's umask (from `/proc/self/status`; 0o022 if it cannot be read).
pub fn umask() -> u32 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Umask:"))
                .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
        })
        .unwrap_or(0o022)
}

/// Permission bits for a file derived from inputs with `modes`: their
/// intersection, limited to 0o666 and to what the umask allows.
pub fn mode_from_inputs(modes: impl IntoIterator<Item = u32>) -> u32 {
    modes.into_iter().fold(0o666 & !umask(), |m, x| m & x)
}

/// The most restrictive permission bits of `paths` (their intersection),
/// limited to 0o666: a file derived from these inputs is never more readable
/// than the least readable of them.
pub fn derived_mode(paths: &[&Path]) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    paths
        .iter()
        .filter_map(|p| std::fs::metadata(p).ok())
        .fold(0o666, |m, md| m & md.permissions().mode())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn commit_renames_into_place_with_the_mode() {
        let d = tempfile::tempdir().unwrap();
        let target = d.path().join("out.bin");
        write(&target, b"hello", 0o640).unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"hello");
        let mode = std::fs::metadata(&target).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o640);
        assert_eq!(
            std::fs::read_dir(d.path()).unwrap().count(),
            1,
            "no temp left"
        );
    }

    #[test]
    fn a_planted_symlink_at_the_target_is_replaced_not_followed() {
        let d = tempfile::tempdir().unwrap();
        let victim = d.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        let target = d.path().join("out");
        std::os::unix::fs::symlink(&victim, &target).unwrap();
        write(&target, b"new", 0o600).unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        assert!(!std::fs::symlink_metadata(&target).unwrap().is_symlink());
        assert_eq!(std::fs::read(&target).unwrap(), b"new");
    }

    #[test]
    fn temp_names_are_unguessable_and_removed_when_dropped() {
        let d = tempfile::tempdir().unwrap();
        let target = d.path().join("x");
        let mut a = AtomicFile::create(&target, 0o600).unwrap();
        let b = AtomicFile::create(&target, 0o600).unwrap();
        assert_ne!(a.temp_name(), b.temp_name());
        assert!(a.temp_name().len() > 32);
        a.file().write_all(b"partial").unwrap();
        drop(a);
        drop(b);
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 0);
        assert!(!target.exists());
    }

    #[test]
    fn pending_temp_files_are_removed_on_request() {
        let d = tempfile::tempdir().unwrap();
        let mut a = AtomicFile::create(&d.path().join("a"), 0o600).unwrap();
        a.file().write_all(b"half").unwrap();
        let tmp = d.path().join(a.temp_name());
        assert!(tmp.exists());
        // Only this test's directory: other tests write files in parallel.
        let dir = std::path::absolute(d.path()).unwrap();
        remove_pending_under(&dir);
        assert!(!tmp.exists(), "an interrupted write leaves no temp file");
        std::mem::forget(a); // as if the process died here
        let b = AtomicFile::create(&d.path().join("b"), 0o600).unwrap();
        b.commit().unwrap();
        remove_pending_under(&dir);
        assert!(
            d.path().join("b").exists(),
            "a committed file is not pending"
        );
    }

    #[test]
    fn derived_mode_is_the_intersection() {
        let d = tempfile::tempdir().unwrap();
        let a = d.path().join("a");
        let b = d.path().join("b");
        std::fs::write(&a, b"").unwrap();
        std::fs::write(&b, b"").unwrap();
        std::fs::set_permissions(&a, std::fs::Permissions::from_mode(0o644)).unwrap();
        std::fs::set_permissions(&b, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(derived_mode(&[&a, &b]), 0o600);
        assert_eq!(derived_mode(&[&a]), 0o644);
    }

    #[test]
    fn mode_from_inputs_is_the_intersection_under_the_umask() {
        let m = mode_from_inputs([0o644, 0o640]);
        assert_eq!(m & !0o640, 0);
        assert_eq!(m, 0o640 & !umask());
        assert_eq!(mode_from_inputs([0o755]) & 0o111, 0);
    }

    #[test]
    fn sync_then_commit_renames() {
        let d = tempfile::tempdir().unwrap();
        let target = d.path().join("t");
        let mut f = AtomicFile::create(&target, 0o600).unwrap();
        f.file().write_all(b"x").unwrap();
        f.sync().unwrap();
        f.commit().unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"x");
    }
}
