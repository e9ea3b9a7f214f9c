//! `ckptfs qemu save`: checkpoint a running QEMU VM.
//!
//! Steps, each a function below: find the RAM's `memory-backend-file` over
//! QMP and check it is the given file with `share=on` ([`find_backend`]);
//! stop the VM; save the device state with `x-ignore-shared` through a pipe
//! handed to QEMU with `getfd` ([`save_device_state`]: no temporary file, no
//! shell); make the checkpoint from the RAM file, the disks and that state;
//! then resume the VM, leave it paused, or quit it.

use std::io::Read;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::create::{CreateError, CreateOptions, Summary};
use crate::memory::{MemoryImage, MemoryImageError};

use super::qmp::{Qmp, QmpError, Version};
use super::stream::{self, IGNORE_SHARED, StreamError};

/// What to do with the VM once the checkpoint is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum After {
    /// Resume it if it was running (a live checkpoint).
    Resume,
    /// Leave it paused.
    LeavePaused,
    /// Quit QEMU.
    Quit,
}

/// What to save.
#[derive(Clone, Debug)]
pub struct SaveOptions {
    /// QEMU's QMP socket.
    pub qmp: PathBuf,
    /// The RAM file: the mem-path of QEMU's memory-backend-file.
    pub mem_file: PathBuf,
    /// Disk images whose blocks the guest's page cache may hold.
    pub disks: Vec<PathBuf>,
    /// The checkpoint to write.
    pub output: PathBuf,
    /// Then resume, leave paused, or quit.
    pub after: After,
    /// Progress bar on stderr.
    pub progress: bool,
    /// How long the device-state migration may take.
    pub timeout: Duration,
}

/// What a save did.
#[derive(Clone, Debug, serde::Serialize)]
pub struct SaveReport {
    /// QEMU's version, e.g. 7.2.22.
    pub qemu_version: String,
    /// The RAM backend's id (its RAM block in the migration stream).
    pub backend: String,
    /// Machine type from the stream, e.g. pc-i440fx-7.2.
    pub machine: Option<String>,
    /// Bytes of device state saved (the checkpoint's VMM-state section).
    pub state_bytes: u64,
    /// The VM ran when the save began.
    pub was_running: bool,
    /// What happened to it: resumed, paused or quit.
    pub vm: &'static str,
    /// Seconds the VM was paused, if it was resumed.
    pub paused_seconds: Option<f64>,
    /// Seconds spent saving the device state.
    pub state_seconds: f64,
    /// Things the user should know (disks written after a live checkpoint, ...).
    pub warnings: Vec<String>,
    /// The checkpoint.
    pub checkpoint: Summary,
}

/// Why a save failed. Each names the socket or file and the problem.
#[derive(Debug, thiserror::Error)]
pub enum SaveError {
    /// No QEMU listens on the socket.
    #[error(
        "no QEMU QMP socket at {0} (start QEMU with -qmp unix:{0},server=on,wait=off)",
        socket.display()
    )]
    NoSocket {
        /// The socket.
        socket: PathBuf,
    },
    /// A QMP command failed.
    #[error(transparent)]
    Qmp(#[from] QmpError),
    /// QEMU's RAM is not in a file.
    #[error(
        "QEMU at {} has no memory-backend-file: its RAM is not file-backed; start it with -object memory-backend-file,id=pc.ram,size=SIZE,mem-path={},share=on -machine memory-backend=pc.ram",
        socket.display(), mem_file.display()
    )]
    NotFileBacked {
        /// The socket.
        socket: PathBuf,
        /// The RAM file the user named.
        mem_file: PathBuf,
    },
    /// The RAM file is mapped share=off: the file does not hold the guest's RAM.
    #[error(
        "QEMU's memory-backend-file {id} ({}) has share=off: add share=on to its -object options (with share=off the file does not receive the guest's writes)",
        mem_path.display()
    )]
    NotShared {
        /// The backend id.
        id: String,
        /// Its mem-path.
        mem_path: PathBuf,
    },
    /// mem-path is a directory: QEMU made an unlinked temporary file in it.
    #[error(
        "QEMU's memory-backend-file {id} has mem-path={} a directory (QEMU's RAM is an unlinked file in it): give mem-path a file name",
        mem_path.display()
    )]
    MemPathIsDir {
        /// The backend id.
        id: String,
        /// Its mem-path.
        mem_path: PathBuf,
    },
    /// The RAM file given is none of QEMU's file backends.
    #[error("--mem-file {} is not QEMU's RAM file; its memory-backend-file RAM is {found}", mem_file.display())]
    OtherFile {
        /// The RAM file the user named.
        mem_file: PathBuf,
        /// The backends found, "id = path", comma separated.
        found: String,
    },
    /// The RAM file cannot be examined.
    #[error("RAM file {}", path.display())]
    MemFile {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The RAM file's size is not the backend's.
    #[error("RAM file {} is {file} bytes, but QEMU's memory-backend-file {id} is {backend} bytes", path.display())]
    SizeMismatch {
        /// The file.
        path: PathBuf,
        /// The backend id.
        id: String,
        /// File size.
        file: u64,
        /// Backend size.
        backend: u64,
    },
    /// QEMU is not in a state that can be saved.
    #[error("QEMU at {} is {status}: only a running or paused VM can be saved", socket.display())]
    BadState {
        /// The socket.
        socket: PathBuf,
        /// Its run state.
        status: String,
    },
    /// The pipe for the device state.
    #[error("creating a pipe for QEMU's device state")]
    Pipe(#[source] std::io::Error),
    /// What QEMU wrote is not what a restore can use.
    #[error("the device state QEMU saved: {0}")]
    Stream(#[source] StreamError),
    /// The saved stream does not ignore shared RAM (it would hold all of RAM).
    #[error(
        "the device state QEMU saved holds the RAM itself ({0} bytes): x-ignore-shared did not apply to block {1}"
    )]
    RamInStream(u64, String),
    /// The stream has no RAM block for the backend.
    #[error("the device state QEMU saved has no RAM block {0} of the backend's size")]
    NoBlock(String),
    /// Opening the RAM file for the checkpoint.
    #[error(transparent)]
    Image(#[from] MemoryImageError),
    /// Making the checkpoint.
    #[error(transparent)]
    Create(#[from] CreateError),
}

/// The file-backed RAM QEMU uses.
#[derive(Debug)]
struct Backend {
    id: String,
    size: u64,
}

/// Save the VM behind `opts.qmp` into `opts.output`.
pub fn save(opts: &SaveOptions) -> Result<SaveReport, SaveError> {
    let mut qmp = connect(&opts.qmp)?;
    let version = qmp.query_version()?;
    let backend = find_backend(&mut qmp, &opts.mem_file)?;
    let status = qmp.query_status()?;
    if !matches!(
        status.status.as_str(),
        "running" | "paused" | "postmigrate" | "prelaunch"
    ) {
        return Err(SaveError::BadState {
            socket: opts.qmp.clone(),
            status: status.status,
        });
    }
    let paused_at = Instant::now();
    if status.running {
        qmp.stop()?;
    }
    log::info!("qemu save: VM stopped; saving its device state");
    let t = Instant::now();
    let saved = checkpoint(&mut qmp, opts, &backend);
    if saved.is_err() && status.running {
        // A failed save must not leave the user's VM paused.
        let _ = qmp.cont();
    }
    let (state, head, summary) = saved?;
    let state_seconds = t.elapsed().as_secs_f64() - summary.seconds;
    let mut warnings = disk_warnings(&mut qmp, &opts.disks, opts.after, status.running)?;
    let (vm, paused_seconds) = match opts.after {
        After::Quit => {
            qmp.quit();
            ("quit", None)
        }
        After::Resume if status.running => {
            qmp.cont()?;
            ("resumed", Some(paused_at.elapsed().as_secs_f64()))
        }
        After::Resume | After::LeavePaused => ("paused", None),
    };
    if opts.after == After::Resume && !status.running {
        warnings.push(format!(
            "the VM was {} before the save and stays paused",
            status.status
        ));
    }
    Ok(SaveReport {
        qemu_version: version_string(version),
        backend: backend.id,
        machine: head.machine,
        state_bytes: state.len() as u64,
        was_running: status.running,
        vm,
        paused_seconds,
        state_seconds,
        warnings,
        checkpoint: summary,
    })
}

/// The stopped VM's device state, checked, and the checkpoint made with it.
fn checkpoint(
    qmp: &mut Qmp,
    opts: &SaveOptions,
    backend: &Backend,
) -> Result<(Vec<u8>, stream::StreamHead, Summary), SaveError> {
    let state = save_device_state(qmp, opts.timeout)?;
    let head = stream::parse(&state).map_err(SaveError::Stream)?;
    if !head.ignores_shared() {
        return Err(SaveError::RamInStream(
            state.len() as u64,
            backend.id.clone(),
        ));
    }
    if !head
        .ram_blocks
        .iter()
        .any(|b| b.id == backend.id && b.size == backend.size)
    {
        return Err(SaveError::NoBlock(backend.id.clone()));
    }
    let image = MemoryImage::open(&opts.mem_file)?;
    let create = CreateOptions {
        disks: opts.disks.clone(),
        scan_disks: true,
        vmm_state: Some(state.clone()),
        progress: opts.progress,
        ..Default::default()
    };
    let summary = crate::create::create_from_image(&image, &create, &opts.output)?;
    Ok((state, head, summary))
}

fn connect(socket: &Path) -> Result<Qmp, SaveError> {
    match Qmp::connect(socket, Duration::ZERO) {
        Err(QmpError::Connect { source, .. })
            if matches!(
                source.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            Err(SaveError::NoSocket {
                socket: socket.to_owned(),
            })
        }
        r => Ok(r?),
    }
}

/// QEMU's version as `major.minor.micro`, for messages.
pub fn version_string(v: Version) -> String {
    format!("{}.{}.{}", v.major, v.minor, v.micro)
}

/// The memory-backend-file whose mem-path is `mem_file`, checked for
/// share=on and size.
fn find_backend(qmp: &mut Qmp, mem_file: &Path) -> Result<Backend, SaveError> {
    let want = std::fs::metadata(mem_file).map_err(|source| SaveError::MemFile {
        path: mem_file.to_owned(),
        source,
    })?;
    let mut found = Vec::new();
    for dev in qmp.query_memdev()? {
        let Some(id) = dev.id else { continue };
        // Only a memory-backend-file has mem-path; the others refuse the property.
        let Ok(path) = qmp.qom_get(&format!("/objects/{id}"), "mem-path") else {
            continue;
        };
        let mem_path = PathBuf::from(path.as_str().unwrap_or_default());
        let Ok(meta) = std::fs::metadata(&mem_path) else {
            found.push(format!("{id} = {} (not visible here)", mem_path.display()));
            continue;
        };
        if meta.is_dir() {
            if found.is_empty() && same_dir(&mem_path, mem_file) {
                return Err(SaveError::MemPathIsDir { id, mem_path });
            }
            found.push(format!("{id} = an unlinked file in {}", mem_path.display()));
            continue;
        }
        if (meta.dev(), meta.ino()) != (want.dev(), want.ino()) {
            found.push(format!("{id} = {}", mem_path.display()));
            continue;
        }
        let share = match dev.share {
            Some(s) => s,
            None => qmp
                .qom_get(&format!("/objects/{id}"), "share")?
                .as_bool()
                .unwrap_or(false),
        };
        if !share {
            return Err(SaveError::NotShared { id, mem_path });
        }
        if want.len() != dev.size {
            return Err(SaveError::SizeMismatch {
                path: mem_file.to_owned(),
                id,
                file: want.len(),
                backend: dev.size,
            });
        }
        return Ok(Backend { id, size: dev.size });
    }
    if found.is_empty() {
        return Err(SaveError::NotFileBacked {
            socket: qmp.socket().to_owned(),
            mem_file: mem_file.to_owned(),
        });
    }
    Err(SaveError::OtherFile {
        mem_file: mem_file.to_owned(),
        found: found.join(", "),
    })
}

/// Whether `file` lies in directory `dir`.
fn same_dir(dir: &Path, file: &Path) -> bool {
    match (dir.canonicalize(), file.canonicalize()) {
        (Ok(d), Ok(f)) => f.parent() == Some(d.as_path()),
        _ => false,
    }
}

/// The fd name the device state is migrated to.
const STATE_FD: &str = "ckptfs-state";

/// Migrate the (stopped) VM's device state with x-ignore-shared into a pipe
/// that a thread drains; the capability is set back to what it was, so a
/// later ordinary migration still sends the RAM.
fn save_device_state(qmp: &mut Qmp, timeout: Duration) -> Result<Vec<u8>, SaveError> {
    let before = ignore_shared_state(qmp)?;
    let (mut rd, wr) = std::io::pipe().map_err(SaveError::Pipe)?;
    let reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        rd.read_to_end(&mut v).map(|_| v)
    });
    let migrated = (|| {
        qmp.set_capability(IGNORE_SHARED, true)?;
        qmp.getfd(STATE_FD, wr.as_fd())?;
        // QEMU holds its own copy now; ours must go for the reader to see EOF.
        drop(wr);
        qmp.migrate(&format!("fd:{STATE_FD}"))?;
        qmp.wait_migration(timeout)
    })();
    let restored = qmp.set_capability(IGNORE_SHARED, before);
    migrated?;
    restored?;
    let state = reader
        .join()
        .expect("the state reader does not panic")
        .map_err(SaveError::Pipe)?;
    Ok(state)
}

/// The current value of x-ignore-shared.
fn ignore_shared_state(qmp: &mut Qmp) -> Result<bool, SaveError> {
    let caps = qmp.execute("query-migrate-capabilities", serde_json::json!({}))?;
    Ok(caps
        .as_array()
        .and_then(|a| a.iter().find(|c| c["capability"] == IGNORE_SHARED))
        .and_then(|c| c["state"].as_bool())
        .unwrap_or(false))
}

/// Warn about disks given but not attached, and about writable disks of a VM
/// that runs on after a live checkpoint (a write to them invalidates the
/// checkpoint's references into them).
fn disk_warnings(
    qmp: &mut Qmp,
    disks: &[PathBuf],
    after: After,
    was_running: bool,
) -> Result<Vec<String>, SaveError> {
    let attached: Vec<(std::fs::Metadata, bool)> = qmp
        .query_block()?
        .into_iter()
        .filter_map(|b| b.inserted)
        .filter_map(|m| std::fs::metadata(&m.file).ok().map(|meta| (meta, m.ro)))
        .collect();
    let mut warnings = Vec::new();
    for disk in disks {
        let Ok(meta) = std::fs::metadata(disk) else {
            continue;
        };
        let same = |m: &std::fs::Metadata| (m.dev(), m.ino()) == (meta.dev(), meta.ino());
        match attached.iter().find(|(m, _)| same(m)) {
            None => warnings.push(format!(
                "disk {} is not attached to this VM (by that file name)",
                disk.display()
            )),
            Some((_, false)) if after == After::Resume && was_running => warnings.push(format!(
                "the VM runs on with disk {} writable: a guest write to it invalidates this checkpoint's pages that refer to it (use --leave-paused or --quit, or snapshot the disk)",
                disk.display()
            )),
            Some(_) => {}
        }
    }
    Ok(warnings)
}
