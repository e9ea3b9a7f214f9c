//! A small typed QMP client: the commands a save and a restore need.
//!
//! The `qapi` crate (qapi-qmp 0.15) was considered: its types are generated at
//! build time from QEMU 9.1's schema (a long compile on this project's two
//! cores) and its `migrate` and `query-migrate` types follow 9.1 while Debian 12
//! ships QEMU 7.2. A dozen commands do not need it.
//!
//! One request at a time: a command is written as one JSON line and the reply
//! is the next line carrying `return` or `error`; asynchronous events in
//! between are skipped. A file descriptor for `getfd` travels as SCM_RIGHTS
//! ancillary data with the command's bytes.

use std::io::{self, BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

/// How long one QMP reply may take (QEMU answers at once; TCG guests do not delay it).
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// Errors of a QMP session; each names the socket.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// The socket could not be connected to.
    #[error("connecting to QMP socket {socket}")]
    Connect {
        /// The socket.
        socket: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Reading or writing the socket failed.
    #[error("QMP socket {socket}: {command}")]
    Io {
        /// The socket.
        socket: PathBuf,
        /// The command being run (or "greeting").
        command: String,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// QEMU closed the connection.
    #[error("QMP socket {socket}: QEMU closed the connection during {command}")]
    Closed {
        /// The socket.
        socket: PathBuf,
        /// The command being run.
        command: String,
    },
    /// The peer does not speak QMP.
    #[error("QMP socket {socket}: not a QMP greeting: {greeting}")]
    NotQmp {
        /// The socket.
        socket: PathBuf,
        /// What it sent.
        greeting: String,
    },
    /// A reply that is not the JSON expected.
    #[error("QMP socket {socket}: {command} returned {reply}: {reason}")]
    Reply {
        /// The socket.
        socket: PathBuf,
        /// The command.
        command: String,
        /// The reply (or the line that is not JSON).
        reply: String,
        /// What is wrong with it.
        reason: String,
    },
    /// QEMU refused the command.
    #[error("QMP socket {socket}: {command} failed: {desc}")]
    Command {
        /// The socket.
        socket: PathBuf,
        /// The command.
        command: String,
        /// QEMU's error description.
        desc: String,
    },
    /// A migration failed or did not finish in time.
    #[error("QMP socket {socket}: migration {what}")]
    Migration {
        /// The socket.
        socket: PathBuf,
        /// failed (with QEMU's reason), cancelled, or not complete after ...
        what: String,
    },
}

/// A QMP session on a unix socket, past capability negotiation.
pub struct Qmp {
    socket: PathBuf,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

/// `query-version`'s reply.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
pub struct Version {
    /// Major version.
    pub major: u32,
    /// Minor version.
    pub minor: u32,
    /// Micro version.
    pub micro: u32,
}

#[derive(Deserialize)]
struct VersionInfo {
    qemu: Version,
}

/// One entry of `query-memdev`.
#[derive(Clone, Debug, Deserialize)]
pub struct Memdev {
    /// The backend's id (absent for a backend QEMU made itself before 5.0).
    pub id: Option<String>,
    /// Bytes.
    pub size: u64,
    /// share=on.
    pub share: Option<bool>,
}

/// One entry of `query-block`: a block device and its medium.
#[derive(Clone, Debug, Deserialize)]
pub struct BlockInfo {
    /// The device name (empty for -blockdev devices).
    pub device: String,
    /// The qdev path, if any.
    pub qdev: Option<String>,
    /// The medium, absent when empty.
    pub inserted: Option<BlockMedium>,
}

/// `query-block`'s `inserted`.
#[derive(Clone, Debug, Deserialize)]
pub struct BlockMedium {
    /// The image's file name (or a `json:` description).
    pub file: String,
    /// Read-only.
    pub ro: bool,
    /// Image format driver (raw, qcow2, ...).
    pub drv: String,
}

/// `query-migrate`'s reply, the fields a save and a restore read.
#[derive(Debug, Deserialize)]
pub struct MigrationInfo {
    /// setup, active, completed, failed, ... (absent before any migration).
    pub status: Option<String>,
    /// Why a migration failed.
    #[serde(rename = "error-desc")]
    pub error_desc: Option<String>,
}

/// `query-status`'s reply.
#[derive(Debug, Deserialize)]
pub struct StatusInfo {
    /// Whether the vCPUs run.
    pub running: bool,
    /// running, paused, inmigrate, postmigrate, prelaunch, ...
    pub status: String,
}

impl Qmp {
    /// Connect to `socket` (retrying for up to `wait` while QEMU creates it),
    /// read the greeting and leave capability negotiation.
    pub fn connect(socket: &Path, wait: Duration) -> Result<Qmp, QmpError> {
        let t0 = Instant::now();
        let stream = loop {
            match UnixStream::connect(socket) {
                Ok(s) => break s,
                Err(source) if t0.elapsed() >= wait => {
                    return Err(QmpError::Connect {
                        socket: socket.to_owned(),
                        source,
                    });
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        let io_err = |source| QmpError::Io {
            socket: socket.to_owned(),
            command: "greeting".into(),
            source,
        };
        stream
            .set_read_timeout(Some(REPLY_TIMEOUT))
            .map_err(io_err)?;
        let writer = stream.try_clone().map_err(io_err)?;
        let mut qmp = Qmp {
            socket: socket.to_owned(),
            reader: BufReader::new(stream),
            writer,
        };
        let greeting = qmp.read_message("greeting")?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::NotQmp {
                socket: socket.to_owned(),
                greeting: greeting.to_string(),
            });
        }
        qmp.execute("qmp_capabilities", json!({}))?;
        Ok(qmp)
    }

    /// The socket this session is on.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Run one command and return its `return` value.
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, QmpError> {
        let line = request(command, arguments);
        self.writer
            .write_all(line.as_bytes())
            .map_err(|source| self.io_err(command, source))?;
        self.reply(command)
    }

    /// Run `command` with `fd` passed along (SCM_RIGHTS), as `getfd` needs.
    fn execute_with_fd(
        &mut self,
        command: &str,
        arguments: Value,
        fd: BorrowedFd,
    ) -> Result<Value, QmpError> {
        let line = request(command, arguments);
        send_with_fd(&self.writer, line.as_bytes(), fd)
            .map_err(|source| self.io_err(command, source))?;
        self.reply(command)
    }

    fn reply(&mut self, command: &str) -> Result<Value, QmpError> {
        loop {
            let mut msg = self.read_message(command)?;
            if let Some(ret) = msg.get_mut("return") {
                return Ok(ret.take());
            }
            if let Some(err) = msg.get("error") {
                let desc = err["desc"].as_str().map_or(err.to_string(), str::to_owned);
                return Err(QmpError::Command {
                    socket: self.socket.clone(),
                    command: command.into(),
                    desc,
                });
            }
        }
    }

    fn io_err(&self, command: &str, source: io::Error) -> QmpError {
        QmpError::Io {
            socket: self.socket.clone(),
            command: command.into(),
            source,
        }
    }

    fn read_message(&mut self, command: &str) -> Result<Value, QmpError> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => Err(QmpError::Closed {
                socket: self.socket.clone(),
                command: command.into(),
            }),
            Ok(_) => serde_json::from_str(&line).map_err(|e| QmpError::Reply {
                socket: self.socket.clone(),
                command: command.into(),
                reply: line.trim_end().into(),
                reason: e.to_string(),
            }),
            Err(source) => Err(self.io_err(command, source)),
        }
    }

    fn execute_as<T: DeserializeOwned>(
        &mut self,
        command: &str,
        arguments: Value,
    ) -> Result<T, QmpError> {
        let ret = self.execute(command, arguments)?;
        serde_json::from_value(ret.clone()).map_err(|e| QmpError::Reply {
            socket: self.socket.clone(),
            command: command.into(),
            reply: ret.to_string(),
            reason: e.to_string(),
        })
    }

    /// QEMU's version.
    pub fn query_version(&mut self) -> Result<Version, QmpError> {
        Ok(self
            .execute_as::<VersionInfo>("query-version", json!({}))?
            .qemu)
    }

    /// The memory backends.
    pub fn query_memdev(&mut self) -> Result<Vec<Memdev>, QmpError> {
        self.execute_as("query-memdev", json!({}))
    }

    /// The block devices.
    pub fn query_block(&mut self) -> Result<Vec<BlockInfo>, QmpError> {
        self.execute_as("query-block", json!({}))
    }

    /// A QOM property of the object at `path` (e.g. `/objects/pc.ram`, `mem-path`).
    pub fn qom_get(&mut self, path: &str, property: &str) -> Result<Value, QmpError> {
        self.execute("qom-get", json!({ "path": path, "property": property }))
    }

    /// Pause the vCPUs.
    pub fn stop(&mut self) -> Result<(), QmpError> {
        self.execute("stop", json!({})).map(drop)
    }

    /// Resume the vCPUs (a VM saved while paused is restored paused).
    pub fn cont(&mut self) -> Result<(), QmpError> {
        self.execute("cont", json!({})).map(drop)
    }

    /// Turn a migration capability (e.g. `x-ignore-shared`) on or off.
    pub fn set_capability(&mut self, capability: &str, state: bool) -> Result<(), QmpError> {
        let caps = json!({ "capabilities": [{ "capability": capability, "state": state }] });
        self.execute("migrate-set-capabilities", caps).map(drop)
    }

    /// Hand `fd` to QEMU under `name` (`getfd`), for an `fd:NAME` migration URI.
    pub fn getfd(&mut self, name: &str, fd: BorrowedFd) -> Result<(), QmpError> {
        self.execute_with_fd("getfd", json!({ "fdname": name }), fd)
            .map(drop)
    }

    /// Start an outgoing migration to `uri` (e.g. `fd:NAME`, `exec:cat > FILE`).
    pub fn migrate(&mut self, uri: &str) -> Result<(), QmpError> {
        self.execute("migrate", json!({ "uri": uri })).map(drop)
    }

    /// Start an incoming migration from `uri` (QEMU started with `-incoming defer`).
    pub fn migrate_incoming(&mut self, uri: &str) -> Result<(), QmpError> {
        self.execute("migrate-incoming", json!({ "uri": uri }))
            .map(drop)
    }

    /// The state of the current (or last) migration.
    pub fn query_migrate(&mut self) -> Result<MigrationInfo, QmpError> {
        self.execute_as("query-migrate", json!({}))
    }

    /// Whether the VM runs.
    pub fn query_status(&mut self) -> Result<StatusInfo, QmpError> {
        self.execute_as("query-status", json!({}))
    }

    /// Poll `query-migrate` until the migration completed; fails on `failed`,
    /// `cancelled` or after `timeout`.
    pub fn wait_migration(&mut self, timeout: Duration) -> Result<(), QmpError> {
        let t0 = Instant::now();
        let mut pause = Duration::from_millis(1);
        loop {
            let info = self.query_migrate()?;
            let what = match info.status.as_deref() {
                Some("completed") => return Ok(()),
                Some(s @ ("failed" | "cancelled")) => {
                    format!("{s}: {}", info.error_desc.unwrap_or_default())
                }
                s if t0.elapsed() > timeout => {
                    format!("not complete after {timeout:?} (status {s:?})")
                }
                _ => {
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_millis(50));
                    continue;
                }
            };
            return Err(QmpError::Migration {
                socket: self.socket.clone(),
                what,
            });
        }
    }

    /// Ask QEMU to exit (it may close the connection before replying).
    pub fn quit(&mut self) {
        let _ = self.execute("quit", json!({}));
    }
}

fn request(command: &str, arguments: Value) -> String {
    let mut line = json!({ "execute": command, "arguments": arguments }).to_string();
    line.push('\n');
    line
}

/// Write `bytes` to `stream` with `fd` attached as SCM_RIGHTS (on the first byte).
fn send_with_fd(stream: &UnixStream, bytes: &[u8], fd: BorrowedFd) -> io::Result<()> {
    let raw = fd.as_raw_fd();
    // A control buffer for one descriptor, aligned for cmsghdr.
    #[repr(C)]
    union Control {
        buf: [u8; 64],
        _align: libc::cmsghdr,
    }
    // SAFETY: CMSG_SPACE is a pure size computation.
    let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<libc::c_int>() as u32) } as usize;
    assert!(space <= 64);
    let mut control = Control { buf: [0; 64] };
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: bytes.len(),
    };
    // SAFETY: msghdr is plain data; zeroed is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    // SAFETY: taking the address of a union field does not read it.
    msg.msg_control = unsafe { control.buf.as_mut_ptr() } as *mut libc::c_void;
    msg.msg_controllen = space;
    // SAFETY: msg_control points at `space` bytes we own, so CMSG_FIRSTHDR
    // returns a header inside it, with room for one c_int of data.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<libc::c_int>() as u32) as usize;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg) as *mut libc::c_int, raw);
    }
    // SAFETY: msg points at live buffers (iov, control) for the call's duration.
    let n = unsafe { libc::sendmsg(stream.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    // The descriptor went with the first byte; the rest is plain data.
    let mut stream = stream;
    stream.write_all(&bytes[n as usize..])
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::fd::AsFd;

    /// A fake QEMU on one end of a socket pair: greets, then answers each
    /// request line with `answer(request)`.
    fn fake_qemu(
        answer: impl Fn(&Value) -> Value + Send + 'static,
    ) -> (
        tempfile::TempDir,
        PathBuf,
        std::thread::JoinHandle<Vec<Value>>,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let h = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            s.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\n")
                .unwrap();
            let mut seen = Vec::new();
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut line = String::new();
            while r.read_line(&mut line).unwrap() > 0 {
                let req: Value = serde_json::from_str(&line).unwrap();
                s.write_all(b"{\"event\": \"STOP\"}\n").unwrap();
                let mut out = answer(&req).to_string();
                out.push('\n');
                s.write_all(out.as_bytes()).unwrap();
                seen.push(req);
                line.clear();
            }
            seen
        });
        (dir, path, h)
    }

    #[test]
    fn replies_are_typed_and_events_skipped() {
        let (_d, path, h) = fake_qemu(|req| match req["execute"].as_str().unwrap() {
            "query-version" => {
                json!({"return": {"qemu": {"major": 7, "minor": 2, "micro": 22}, "package": ""}})
            }
            "query-status" => json!({"return": {"running": false, "status": "paused"}}),
            _ => json!({"return": {}}),
        });
        let mut q = Qmp::connect(&path, Duration::from_secs(5)).unwrap();
        assert_eq!(
            q.query_version().unwrap(),
            Version {
                major: 7,
                minor: 2,
                micro: 22
            }
        );
        assert_eq!(q.query_status().unwrap().status, "paused");
        drop(q);
        let seen = h.join().unwrap();
        assert_eq!(seen[0]["execute"], "qmp_capabilities");
    }

    #[test]
    fn a_refused_command_is_one_line_naming_socket_and_command() {
        let (_d, path, _h) = fake_qemu(|req| match req["execute"].as_str().unwrap() {
            "stop" => json!({"error": {"class": "GenericError", "desc": "no way"}}),
            _ => json!({"return": {}}),
        });
        let mut q = Qmp::connect(&path, Duration::from_secs(5)).unwrap();
        let e = q.stop().unwrap_err().to_string();
        assert!(e.contains("stop failed: no way"), "{e}");
        assert!(e.contains(path.to_str().unwrap()), "{e}");
        assert!(!e.contains('\n'));
    }

    #[test]
    fn a_missing_socket_names_it() {
        let e = Qmp::connect(Path::new("/nonexistent/qmp.sock"), Duration::ZERO)
            .err()
            .unwrap();
        let chain = format!("{e}: {}", std::error::Error::source(&e).unwrap());
        assert!(chain.contains("/nonexistent/qmp.sock"), "{chain}");
        assert!(chain.contains("No such file"), "{chain}");
    }

    #[test]
    fn getfd_passes_a_descriptor() {
        let (a, b) = UnixStream::pair().unwrap();
        let (mut rd, wr) = std::io::pipe().unwrap();
        send_with_fd(&a, b"hello\n", wr.as_fd()).unwrap();
        drop(wr);
        // Receive the descriptor and write through it.
        let mut buf = [0u8; 16];
        #[repr(C)]
        union Control {
            buf: [u8; 64],
            _align: libc::cmsghdr,
        }
        let mut control = Control { buf: [0; 64] };
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr() as *mut libc::c_void,
            iov_len: buf.len(),
        };
        // SAFETY: a zeroed msghdr filled with pointers to live buffers.
        let got = unsafe {
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = control.buf.as_mut_ptr() as *mut libc::c_void;
            msg.msg_controllen = 64;
            assert!(libc::recvmsg(b.as_raw_fd(), &mut msg, 0) > 0);
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            assert_eq!((*cmsg).cmsg_type, libc::SCM_RIGHTS);
            std::ptr::read_unaligned(libc::CMSG_DATA(cmsg) as *const libc::c_int)
        };
        assert_eq!(&buf[..6], b"hello\n");
        // SAFETY: `got` is a descriptor the kernel just installed for us.
        let mut f = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(got) };
        f.write_all(b"through").unwrap();
        drop(f);
        let mut s = String::new();
        rd.read_to_string(&mut s).unwrap();
        assert_eq!(s, "through");
    }
}
