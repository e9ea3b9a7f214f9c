//! A small typed QMP client: the handful of commands a save and a restore need.
//!
//! The `qapi` crate (qapi-qmp 0.15) was considered: its types are generated at
//! build time from QEMU 9.1's schema (a long compile on this project's two
//! cores) and its `migrate` and `query-migrate` types follow 9.1 while Debian 12
//! ships QEMU 7.2. Six commands do not need it.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::{Value, json};

/// How long one QMP reply may take (QEMU answers at once; TCG guests do not delay it).
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// A QMP session on a unix socket, past capability negotiation.
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

/// `query-migrate`'s reply, the fields this test reads.
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
    /// running, paused, inmigrate, postmigrate, ...
    pub status: String,
}

impl Qmp {
    /// Connect to `socket` (waiting up to `wait` for QEMU to create it), read the
    /// greeting and leave capability negotiation.
    pub fn connect(socket: &Path, wait: Duration) -> Result<Qmp, String> {
        let t0 = Instant::now();
        let stream = loop {
            match UnixStream::connect(socket) {
                Ok(s) => break s,
                Err(e) if t0.elapsed() > wait => {
                    return Err(format!("connecting to QMP {}: {e}", socket.display()));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        stream
            .set_read_timeout(Some(REPLY_TIMEOUT))
            .map_err(|e| e.to_string())?;
        let writer = stream.try_clone().map_err(|e| e.to_string())?;
        let mut qmp = Qmp {
            reader: BufReader::new(stream),
            writer,
        };
        let greeting = qmp.read_message()?;
        if greeting.get("QMP").is_none() {
            return Err(format!("not a QMP greeting: {greeting}"));
        }
        qmp.execute("qmp_capabilities", json!({}))?;
        Ok(qmp)
    }

    /// Run one command and return its `return` value; asynchronous events that
    /// arrive before the reply are skipped.
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, String> {
        let mut line = json!({ "execute": command, "arguments": arguments }).to_string();
        line.push('\n');
        self.writer
            .write_all(line.as_bytes())
            .map_err(|e| format!("sending QMP {command}: {e}"))?;
        loop {
            let msg = self.read_message()?;
            if let Some(ret) = msg.get("return") {
                return Ok(ret.clone());
            }
            if let Some(err) = msg.get("error") {
                return Err(format!("QMP {command} failed: {err}"));
            }
        }
    }

    fn read_message(&mut self) -> Result<Value, String> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => Err("QMP connection closed".to_string()),
            Ok(_) => {
                serde_json::from_str(&line).map_err(|e| format!("bad QMP message {line:?}: {e}"))
            }
            Err(e) => Err(format!("reading QMP: {e}")),
        }
    }

    fn execute_as<T: for<'de> Deserialize<'de>>(
        &mut self,
        command: &str,
        arguments: Value,
    ) -> Result<T, String> {
        let ret = self.execute(command, arguments)?;
        serde_json::from_value(ret.clone())
            .map_err(|e| format!("QMP {command} returned {ret}: {e}"))
    }

    /// Pause the vCPUs.
    pub fn stop(&mut self) -> Result<(), String> {
        self.execute("stop", json!({})).map(drop)
    }

    /// Resume the vCPUs (a VM saved while paused is restored paused).
    pub fn cont(&mut self) -> Result<(), String> {
        self.execute("cont", json!({})).map(drop)
    }

    /// Turn a migration capability (e.g. `x-ignore-shared`) on or off.
    pub fn set_capability(&mut self, capability: &str, state: bool) -> Result<(), String> {
        let caps = json!({ "capabilities": [{ "capability": capability, "state": state }] });
        self.execute("migrate-set-capabilities", caps).map(drop)
    }

    /// Start an outgoing migration to `uri` (e.g. `exec:cat > FILE`).
    pub fn migrate(&mut self, uri: &str) -> Result<(), String> {
        self.execute("migrate", json!({ "uri": uri })).map(drop)
    }

    /// Start an incoming migration from `uri` (QEMU started with `-incoming defer`).
    pub fn migrate_incoming(&mut self, uri: &str) -> Result<(), String> {
        self.execute("migrate-incoming", json!({ "uri": uri }))
            .map(drop)
    }

    /// The state of the current (or last) migration.
    pub fn query_migrate(&mut self) -> Result<MigrationInfo, String> {
        self.execute_as("query-migrate", json!({}))
    }

    /// Whether the VM runs.
    pub fn query_status(&mut self) -> Result<StatusInfo, String> {
        self.execute_as("query-status", json!({}))
    }

    /// Poll `query-migrate` until the migration completed; fails on `failed`,
    /// `cancelled` or after `timeout`.
    pub fn wait_migration(&mut self, timeout: Duration) -> Result<(), String> {
        let t0 = Instant::now();
        loop {
            let info = self.query_migrate()?;
            match info.status.as_deref() {
                Some("completed") => return Ok(()),
                Some(s @ ("failed" | "cancelled")) => {
                    return Err(format!(
                        "migration {s}: {}",
                        info.error_desc.unwrap_or_default()
                    ));
                }
                s if t0.elapsed() > timeout => {
                    return Err(format!("migration not complete after {timeout:?}: {s:?}"));
                }
                _ => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    /// Ask QEMU to exit (it may close the connection before replying).
    pub fn quit(&mut self) {
        let _ = self.execute("quit", json!({}));
    }
}
