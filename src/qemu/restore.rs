//! `ckptfs qemu restore`: the QEMU arguments and QMP steps that restore a
//! checkpoint from its mount.
//!
//! The guest RAM comes from the mount's `memory` as a `memory-backend-file`
//! with `share=off` (MAP_PRIVATE: guest writes stay in QEMU's memory, the file
//! is only read), named as the RAM block in the saved stream; QEMU waits with
//! `-incoming defer`; over QMP, `x-ignore-shared` is set (the saved stream was
//! made with it and QEMU checks that both sides agree) and `migrate-incoming`
//! reads the device state from the mount's `vmm-state`.
//!
//! QEMU >= 8.2 opens a backend with `readonly=on,rom=off` read-only. Older
//! QEMU (Debian 12 has 7.2) opens mem-path read-write even with share=off;
//! the mount serves such an open with direct I/O, and the kernel then drops
//! the file's page cache when QEMU maps it: pages a loading set pushed before
//! that are lost, so the mount must not wait for the loading set first (its
//! loader goes on pushing while QEMU runs).

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};

use crate::checkpoint::Checkpoint;

use super::qmp::{Qmp, QmpError, Version};
use super::stream::{self, IGNORE_SHARED, StreamError};

/// The first QEMU whose memory-backend-file takes `rom=off` (with
/// `readonly=on`: the file opened O_RDONLY, guest RAM still writable).
pub const READONLY_SINCE: Version = Version {
    major: 8,
    minor: 2,
    micro: 0,
};

/// Why a checkpoint cannot be restored into QEMU.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// The checkpoint has no VMM state.
    #[error(
        "checkpoint {0} has no VMM state: make it with `ckptfs qemu save` (or `ckptfs create --state` with QEMU's x-ignore-shared device state)"
    )]
    NoState(PathBuf),
    /// Its VMM state is not a QEMU migration stream.
    #[error("checkpoint {path}: its VMM state")]
    Stream {
        /// The checkpoint.
        path: PathBuf,
        /// Cause.
        #[source]
        source: StreamError,
    },
    /// Saved without x-ignore-shared.
    #[error(
        "checkpoint {0}: its QEMU device state was saved without x-ignore-shared (it carries the RAM itself); save with `ckptfs qemu save`"
    )]
    NotIgnoreShared(PathBuf),
    /// No RAM block, or several, of the guest's size.
    #[error("checkpoint {path}: {what}")]
    Block {
        /// The checkpoint.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
    /// QEMU's --version could not be run or read.
    #[error("running {0} --version")]
    Version(PathBuf, #[source] std::io::Error),
    /// A QEMU argument this restore cannot rewrite.
    #[error("QEMU argument {0}")]
    Argument(String),
    /// The incoming migration.
    #[error(transparent)]
    Qmp(#[from] QmpError),
    /// The mount's vmm-state cannot be opened.
    #[error("opening {}", .0.display())]
    OpenState(PathBuf, #[source] std::io::Error),
}

/// How to restore one checkpoint mounted at one place.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Plan {
    /// The RAM backend's id (the stream's RAM block for the guest RAM).
    pub backend: String,
    /// Guest RAM bytes.
    pub size: u64,
    /// Machine type the VM was saved with (the restoring QEMU must use it).
    pub machine: Option<String>,
    /// The mount's `memory`.
    pub memory: PathBuf,
    /// The mount's `vmm-state`.
    pub vmm_state: PathBuf,
    /// QEMU's version, if known.
    pub qemu_version: Option<String>,
    /// `readonly=on,rom=off` (QEMU >= 8.2).
    pub readonly: bool,
}

impl Plan {
    /// The plan for `ck` mounted at `mountpoint`, for a QEMU of `version`
    /// (None: unknown, treated as older than 8.2).
    pub fn new(
        ck: &Checkpoint,
        mountpoint: &Path,
        version: Option<Version>,
    ) -> Result<Plan, RestoreError> {
        let path = ck.path().to_owned();
        let state = ck.vmm_state();
        if state.is_empty() {
            return Err(RestoreError::NoState(path));
        }
        let head = stream::parse(state).map_err(|source| RestoreError::Stream {
            path: path.clone(),
            source,
        })?;
        if !head.ignores_shared() {
            return Err(RestoreError::NotIgnoreShared(path));
        }
        let size = ck.guest_size();
        let blocks = head.blocks_of_size(size);
        let backend = match blocks.as_slice() {
            [b] => b.id.clone(),
            [] => {
                return Err(RestoreError::Block {
                    path,
                    what: format!(
                        "its QEMU device state has no RAM block of the checkpoint's {size} bytes"
                    ),
                });
            }
            many => {
                let ids: Vec<&str> = many.iter().map(|b| b.id.as_str()).collect();
                return Err(RestoreError::Block {
                    path,
                    what: format!(
                        "several RAM blocks of {size} bytes ({}); ckptfs restores one",
                        ids.join(", ")
                    ),
                });
            }
        };
        Ok(Plan {
            backend,
            size,
            machine: head.machine,
            memory: mountpoint.join("memory"),
            vmm_state: mountpoint.join("vmm-state"),
            qemu_version: version.map(super::save::version_string),
            readonly: version.is_some_and(|v| {
                (v.major, v.minor) >= (READONLY_SINCE.major, READONLY_SINCE.minor)
            }),
        })
    }

    /// The `-object` value of the RAM backend on the mount.
    pub fn backend_object(&self) -> String {
        let mut s = format!(
            "memory-backend-file,id={},size={},mem-path={},share=off",
            self.backend,
            self.size,
            qemu_opt_escape(&self.memory.display().to_string())
        );
        if self.readonly {
            s.push_str(",readonly=on,rom=off");
        }
        s
    }

    /// Arguments to add to the saved VM's QEMU command line (in place of its
    /// own memory backend and any -incoming).
    pub fn args(&self) -> Vec<String> {
        vec![
            "-object".into(),
            self.backend_object(),
            "-machine".into(),
            format!("memory-backend={}", self.backend),
            "-incoming".into(),
            "defer".into(),
        ]
    }

    /// `migrate-incoming`'s URI for a user's QMP session: `cat` of `vmm-state`.
    pub fn incoming_uri(&self) -> String {
        format!(
            "exec:cat {}",
            sh_quote(&self.vmm_state.display().to_string())
        )
    }

    /// The QMP commands a user sends after starting QEMU with [`Plan::args`].
    pub fn qmp_commands(&self) -> Vec<Value> {
        vec![
            json!({"execute": "migrate-set-capabilities", "arguments": {"capabilities": [{"capability": IGNORE_SHARED, "state": true}]}}),
            json!({"execute": "migrate-incoming", "arguments": {"uri": self.incoming_uri()}}),
            json!({"execute": "cont"}),
        ]
    }

    /// `user` (a QEMU command line without the program) with the RAM backend
    /// of the same id replaced by ours, any -incoming dropped, and
    /// [`Plan::args`] added for what is missing.
    pub fn rewrite(&self, user: &[OsString]) -> Result<Vec<OsString>, RestoreError> {
        let mut out = Vec::with_capacity(user.len() + 6);
        let mut replaced = false;
        let mut it = user.iter();
        while let Some(a) = it.next() {
            match a.to_str() {
                Some("-object" | "--object") => {
                    let value = it
                        .next()
                        .ok_or_else(|| RestoreError::Argument(format!("{a:?} without a value")))?;
                    if self.is_our_backend(value)? {
                        out.extend(["-object".into(), self.backend_object().into()]);
                        replaced = true;
                    } else {
                        out.extend([a.clone(), value.clone()]);
                    }
                }
                Some("-incoming" | "--incoming") => {
                    it.next();
                }
                Some("-mem-path" | "--mem-path") => {
                    return Err(RestoreError::Argument(format!(
                        "{a:?}: the restore gives the RAM as -object memory-backend-file,id={} (drop -mem-path)",
                        self.backend
                    )));
                }
                _ => out.push(a.clone()),
            }
        }
        let mut add = self.args();
        if replaced {
            add.drain(..2);
        }
        out.extend(add.into_iter().map(OsString::from));
        Ok(out)
    }

    /// Whether an -object value defines the backend with our id.
    fn is_our_backend(&self, value: &OsStr) -> Result<bool, RestoreError> {
        let v = value.to_string_lossy();
        if v.trim_start().starts_with('{') {
            return if v.contains(&format!("\"{}\"", self.backend)) {
                Err(RestoreError::Argument(format!(
                    "-object {v}: give the RAM backend in key=value form so it can be replaced"
                )))
            } else {
                Ok(false)
            };
        }
        Ok(qemu_opt_split(&v)
            .iter()
            .any(|kv| kv.strip_prefix("id=") == Some(self.backend.as_str())))
    }

    /// Run the incoming migration on a QEMU started with [`Plan::args`]: set
    /// x-ignore-shared, hand QEMU the opened `vmm-state` (`getfd`, so no shell
    /// runs) and wait until the state is loaded.
    pub fn incoming(&self, qmp: &mut Qmp, timeout: Duration) -> Result<(), RestoreError> {
        use std::os::fd::AsFd;
        qmp.set_capability(IGNORE_SHARED, true)?;
        let state = std::fs::File::open(&self.vmm_state)
            .map_err(|e| RestoreError::OpenState(self.vmm_state.clone(), e))?;
        qmp.getfd("ckptfs-state", state.as_fd())?;
        drop(state);
        qmp.migrate_incoming("fd:ckptfs-state")?;
        qmp.wait_migration(timeout)?;
        Ok(())
    }
}

/// A QEMU option value with commas doubled (QEMU's escape).
fn qemu_opt_escape(s: &str) -> String {
    s.replace(',', ",,")
}

/// QEMU key=value options split at single commas (",," is a literal comma).
fn qemu_opt_split(s: &str) -> Vec<String> {
    let mut parts = vec![String::new()];
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                parts.last_mut().unwrap().push(',');
            } else {
                parts.push(String::new());
            }
        } else {
            parts.last_mut().unwrap().push(c);
        }
    }
    parts
}

/// `s` quoted for a POSIX shell when it needs it.
pub fn sh_quote(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,+@%".contains(&b))
    {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// The version `binary --version` prints.
pub fn qemu_version(binary: &Path) -> Result<Version, RestoreError> {
    let out = Command::new(binary)
        .arg("--version")
        .output()
        .map_err(|e| RestoreError::Version(binary.to_owned(), e))?;
    let text = String::from_utf8_lossy(&out.stdout);
    parse_version(&text).ok_or_else(|| {
        RestoreError::Version(
            binary.to_owned(),
            std::io::Error::other(format!(
                "no version in {:?}",
                text.lines().next().unwrap_or("")
            )),
        )
    })
}

/// The version in "QEMU emulator version 7.2.22 (Debian ...)".
pub fn parse_version(text: &str) -> Option<Version> {
    let rest = text.split("version ").nth(1)?;
    let num: String = rest
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    let mut it = num.split('.').map(|n| n.parse::<u32>());
    Some(Version {
        major: it.next()?.ok()?,
        minor: it.next()?.ok()?,
        micro: it.next().and_then(Result::ok).unwrap_or(0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(readonly: bool) -> Plan {
        Plan {
            backend: "pc.ram".into(),
            size: 256 << 20,
            machine: Some("pc-i440fx-7.2".into()),
            memory: "/mnt/vm,1/memory".into(),
            vmm_state: "/mnt/vm,1/vmm-state".into(),
            qemu_version: None,
            readonly,
        }
    }

    fn os(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsString::from).collect()
    }

    #[test]
    fn versions_parse_and_gate_readonly() {
        let v = parse_version(
            "QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)\nCopyright",
        )
        .unwrap();
        assert_eq!((v.major, v.minor, v.micro), (7, 2, 22));
        let v = parse_version("QEMU emulator version 8.2.0").unwrap();
        assert!((v.major, v.minor) >= (READONLY_SINCE.major, READONLY_SINCE.minor));
        assert_eq!(
            parse_version("QEMU emulator version 10.0").unwrap().major,
            10
        );
        assert!(parse_version("no such thing").is_none());
    }

    #[test]
    fn backend_is_private_and_readonly_only_when_qemu_can() {
        assert_eq!(
            plan(false).backend_object(),
            "memory-backend-file,id=pc.ram,size=268435456,mem-path=/mnt/vm,,1/memory,share=off"
        );
        assert!(
            plan(true)
                .backend_object()
                .ends_with(",share=off,readonly=on,rom=off")
        );
    }

    #[test]
    fn rewrite_replaces_our_backend_and_drops_incoming() {
        let user = os(&[
            "-m",
            "256M",
            "-object",
            "memory-backend-file,id=pc.ram,size=256M,mem-path=/var/vm/ram,share=on",
            "-object",
            "rng-random,id=rng0,filename=/dev/urandom",
            "-machine",
            "pc,memory-backend=pc.ram",
            "-incoming",
            "tcp:0:4444",
        ]);
        let out = plan(false).rewrite(&user).unwrap();
        let out: Vec<&str> = out.iter().map(|s| s.to_str().unwrap()).collect();
        assert_eq!(
            out,
            [
                "-m",
                "256M",
                "-object",
                "memory-backend-file,id=pc.ram,size=268435456,mem-path=/mnt/vm,,1/memory,share=off",
                "-object",
                "rng-random,id=rng0,filename=/dev/urandom",
                "-machine",
                "pc,memory-backend=pc.ram",
                "-machine",
                "memory-backend=pc.ram",
                "-incoming",
                "defer",
            ]
        );
    }

    #[test]
    fn rewrite_adds_the_backend_when_missing_and_refuses_mem_path() {
        let out = plan(false).rewrite(&os(&["-m", "256M"])).unwrap();
        assert_eq!(out.len(), 2 + 6);
        assert_eq!(out[3], OsString::from(plan(false).backend_object()));
        let e = plan(false)
            .rewrite(&os(&["-mem-path", "/dev/hugepages"]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("drop -mem-path"), "{e}");
        // An id merely containing ours is not ours.
        let out = plan(false)
            .rewrite(&os(&["-object", "memory-backend-ram,id=pc.ram2,size=1M"]))
            .unwrap();
        assert_eq!(
            out[1],
            OsString::from("memory-backend-ram,id=pc.ram2,size=1M")
        );
    }

    #[test]
    fn user_instructions_quote_paths() {
        assert_eq!(plan(false).incoming_uri(), "exec:cat /mnt/vm,1/vmm-state");
        let mut p = plan(false);
        p.vmm_state = "/mnt/my vm/vmm-state".into();
        assert_eq!(p.incoming_uri(), "exec:cat '/mnt/my vm/vmm-state'");
        assert_eq!(p.qmp_commands()[2]["execute"], "cont");
    }
}
