//! Command line: `ckptfs-mountd VM.ckpt MOUNTPOINT [flags] [-o opts]`.
//!
//! Every flag also has a `-o` spelling (`cache_mb=N`, `prefetch=P`, `workingset=F`,
//! `record_workingset`, `threads=N`, `notify_store=BOOL`, `chunk_kb=N`,
//! `readahead_kb=N`, `foreground`) so `mount -t fuse.ckptfs` can pass them through
//! mount.fuse.ckptfs. An explicit flag wins over `-o`.

use std::path::PathBuf;

use clap::Parser;
use fuser::{MountOption, SessionACL};

use crate::prefetch::Policy;

/// Serve a ckptfs checkpoint's guest RAM as a lazily restored FUSE file.
#[derive(Debug, Parser)]
#[command(name = "ckptfs-mountd", version)]
pub struct Cli {
    /// The checkpoint file.
    pub checkpoint: PathBuf,
    /// Where to mount it (an existing directory).
    pub mountpoint: PathBuf,
    /// Stay in the foreground (default: detach once the mount is ready).
    #[arg(short, long)]
    pub foreground: bool,
    /// Daemon cache bound in MiB [default: 256].
    #[arg(long)]
    pub cache_mb: Option<u64>,
    /// Prefetch policy; each includes the previous ones [default: all].
    #[arg(long, value_enum)]
    pub prefetch: Option<Policy>,
    /// Working-set sidecar [default: CHECKPOINT.ws].
    #[arg(long)]
    pub workingset: Option<PathBuf>,
    /// Record the demand working set and write it to the sidecar on exit.
    #[arg(long)]
    pub record_workingset: bool,
    /// FUSE worker threads [default: 4].
    #[arg(long)]
    pub threads: Option<usize>,
    /// Push prefetched chunks into the kernel page cache [default: true].
    #[arg(long)]
    pub notify_store: Option<bool>,
    /// Cache chunk size in KiB, a multiple of 4 [default: 64].
    #[arg(long)]
    pub chunk_kb: Option<u64>,
    /// Kernel readahead of the mount (its bdi read_ahead_kb) [default: 8192].
    #[arg(long)]
    pub readahead_kb: Option<u64>,
    /// Mount options, comma separated (may repeat).
    #[arg(short = 'o', value_name = "OPTS")]
    pub opts: Vec<String>,
}

/// Default chunk size. Measured on a 2 GiB guest, cold (bench/RESULTS.md):
/// 64 KiB chunks gave 1.6x the 4 KiB random-read IOPS of 256 KiB chunks (a miss
/// rebuilds less) at the same sequential throughput (the kernel sends 1 MiB
/// reads either way); 1 MiB chunks were worse again.
pub const DEFAULT_CHUNK_KB: u64 = 64;

/// Fully resolved settings.
#[derive(Clone, Debug)]
pub struct Settings {
    /// The checkpoint file.
    pub checkpoint: PathBuf,
    /// Mount point.
    pub mountpoint: PathBuf,
    /// Do not detach.
    pub foreground: bool,
    /// Cache bound in bytes.
    pub cache_bytes: u64,
    /// Prefetch policy.
    pub policy: Policy,
    /// Working-set sidecar path.
    pub workingset: PathBuf,
    /// Record the working set.
    pub record: bool,
    /// FUSE threads.
    pub threads: usize,
    /// Use notify-store.
    pub notify_store: bool,
    /// Chunk size in bytes.
    pub chunk_bytes: usize,
    /// bdi read_ahead_kb to set (0 = leave alone).
    pub readahead_kb: u64,
    /// Kernel mount options.
    pub mount_options: Vec<MountOption>,
    /// Who may access the mount.
    pub acl: SessionACL,
}

/// A bad option value or an unknown option.
#[derive(Debug, thiserror::Error)]
#[error("bad mount option '{option}': {why}")]
pub struct OptionError {
    option: String,
    why: &'static str,
}

fn bad(option: &str, why: &'static str) -> OptionError {
    OptionError {
        option: option.to_string(),
        why,
    }
}

fn parse_bool(s: &str) -> Option<bool> {
    match s {
        "true" | "1" | "yes" | "on" => Some(true),
        "false" | "0" | "no" | "off" => Some(false),
        _ => None,
    }
}

/// `-o` values, before flags override them.
#[derive(Debug, Default)]
struct FromOpts {
    foreground: bool,
    record: bool,
    cache_mb: Option<u64>,
    policy: Option<Policy>,
    workingset: Option<PathBuf>,
    threads: Option<usize>,
    notify_store: Option<bool>,
    chunk_kb: Option<u64>,
    readahead_kb: Option<u64>,
    mount: Vec<MountOption>,
    acl: SessionACL,
}

fn parse_opt(o: &str, acc: &mut FromOpts) -> Result<(), OptionError> {
    let (key, val) = match o.split_once('=') {
        Some((k, v)) => (k, Some(v)),
        None => (o, None),
    };
    let num = |v: Option<&str>| {
        v.and_then(|v| v.parse::<u64>().ok())
            .ok_or(bad(o, "expected a number"))
    };
    match (key, val) {
        ("cache_mb", v) => acc.cache_mb = Some(num(v)?),
        ("threads", v) => acc.threads = Some(num(v)? as usize),
        ("chunk_kb", v) => acc.chunk_kb = Some(num(v)?),
        ("readahead_kb", v) => acc.readahead_kb = Some(num(v)?),
        ("prefetch", Some(v)) => {
            acc.policy = Some(
                <Policy as clap::ValueEnum>::from_str(v, false)
                    .map_err(|_| bad(o, "expected none|readahead|workingset|all"))?,
            )
        }
        ("workingset", Some(v)) => acc.workingset = Some(PathBuf::from(v)),
        ("notify_store", Some(v)) => {
            acc.notify_store = Some(parse_bool(v).ok_or(bad(o, "expected true|false"))?)
        }
        ("record_workingset", None) => acc.record = true,
        ("foreground", None) => acc.foreground = true,
        ("allow_other", None) => acc.acl = SessionACL::All,
        ("allow_root", None) => acc.acl = SessionACL::RootAndOwner,
        ("auto_unmount", None) => acc.mount.push(MountOption::AutoUnmount),
        ("default_permissions", None) => acc.mount.push(MountOption::DefaultPermissions),
        ("fsname", Some(v)) => acc.mount.push(MountOption::FSName(v.into())),
        ("ro", None) => acc.mount.push(MountOption::RO),
        ("nosuid", None) => acc.mount.push(MountOption::NoSuid),
        ("suid", None) => acc.mount.push(MountOption::Suid),
        ("nodev", None) => acc.mount.push(MountOption::NoDev),
        ("dev", None) => acc.mount.push(MountOption::Dev),
        ("noexec", None) => acc.mount.push(MountOption::NoExec),
        ("exec", None) => acc.mount.push(MountOption::Exec),
        ("noatime", None) => acc.mount.push(MountOption::NoAtime),
        ("atime", None) => acc.mount.push(MountOption::Atime),
        ("sync", None) => acc.mount.push(MountOption::Sync),
        ("async", None) => acc.mount.push(MountOption::Async),
        ("dirsync", None) => acc.mount.push(MountOption::DirSync),
        // fstab / mount(8) bookkeeping that means nothing to the filesystem.
        ("rw" | "defaults" | "auto" | "noauto" | "user" | "users" | "nofail" | "_netdev", None) => {
        }
        (k, _) if k.starts_with("x-") || k.starts_with("comment=") => {}
        _ => return Err(bad(o, "unknown option")),
    }
    Ok(())
}

impl Settings {
    /// Make every path absolute, so a daemon that left the caller's working
    /// directory (it moves to `/`) still finds its files.
    pub fn make_absolute(&mut self) -> std::io::Result<()> {
        self.checkpoint = std::path::absolute(&self.checkpoint)?;
        self.mountpoint = std::path::absolute(&self.mountpoint)?;
        self.workingset = std::path::absolute(&self.workingset)?;
        Ok(())
    }
}

impl Cli {
    /// Merge `-o` options, flags and defaults.
    pub fn settings(&self) -> Result<Settings, OptionError> {
        let mut o = FromOpts::default();
        for group in &self.opts {
            for opt in group.split(',').filter(|s| !s.is_empty()) {
                parse_opt(opt, &mut o)?;
            }
        }
        let chunk_kb = self.chunk_kb.or(o.chunk_kb).unwrap_or(DEFAULT_CHUNK_KB);
        if chunk_kb == 0 || !chunk_kb.is_multiple_of(4) || chunk_kb > 16 * 1024 {
            return Err(bad(
                &format!("chunk_kb={chunk_kb}"),
                "must be a multiple of 4, at most 16384",
            ));
        }
        let threads = self.threads.or(o.threads).unwrap_or(4);
        if threads == 0 {
            return Err(bad("threads=0", "need at least one thread"));
        }
        let workingset = self.workingset.clone().or(o.workingset).unwrap_or_else(|| {
            let mut p = self.checkpoint.as_os_str().to_owned();
            p.push(".ws");
            PathBuf::from(p)
        });
        let mut mount_options = o.mount;
        if !mount_options
            .iter()
            .any(|m| matches!(m, MountOption::FSName(_)))
        {
            // Mount options are comma-separated: keep a comma in the path out of them.
            let name = self.checkpoint.display().to_string().replace(',', "_");
            mount_options.push(MountOption::FSName(name));
        }
        // Kernel-side subtype: /proc/mounts shows "fuse.ckptfs".
        mount_options.push(MountOption::CUSTOM("subtype=ckptfs".into()));
        Ok(Settings {
            checkpoint: self.checkpoint.clone(),
            mountpoint: self.mountpoint.clone(),
            foreground: self.foreground || o.foreground,
            cache_bytes: self.cache_mb.or(o.cache_mb).unwrap_or(256) << 20,
            policy: self.prefetch.or(o.policy).unwrap_or(Policy::All),
            workingset,
            record: self.record_workingset || o.record,
            threads,
            notify_store: self.notify_store.or(o.notify_store).unwrap_or(true),
            chunk_bytes: (chunk_kb << 10) as usize,
            readahead_kb: self.readahead_kb.or(o.readahead_kb).unwrap_or(8192),
            mount_options,
            acl: o.acl,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(args: &[&str]) -> Result<Settings, OptionError> {
        let mut v = vec!["ckptfs-mountd", "vm.ckpt", "/mnt/vm"];
        v.extend_from_slice(args);
        Cli::try_parse_from(v).unwrap().settings()
    }

    #[test]
    fn defaults_match_the_documented_ones() {
        let s = settings(&[]).unwrap();
        assert_eq!(s.cache_bytes, 256 << 20);
        assert_eq!(s.policy, Policy::All);
        assert_eq!(s.workingset, PathBuf::from("vm.ckpt.ws"));
        assert_eq!(s.threads, 4);
        assert!(s.notify_store && !s.record && !s.foreground);
    }

    #[test]
    fn dash_o_options_apply_and_flags_override_them() {
        let s = settings(&[
            "-o",
            "rw,cache_mb=64,prefetch=readahead,notify_store=false",
            "--cache-mb",
            "32",
        ])
        .unwrap();
        assert_eq!(s.cache_bytes, 32 << 20);
        assert_eq!(s.policy, Policy::Readahead);
        assert!(!s.notify_store);
        let s = settings(&["-o", "allow_other,record_workingset,workingset=/tmp/x.ws"]).unwrap();
        assert_eq!(s.acl, SessionACL::All);
        assert!(s.record);
        assert_eq!(s.workingset, PathBuf::from("/tmp/x.ws"));
    }

    #[test]
    fn unknown_or_malformed_options_are_refused() {
        assert!(settings(&["-o", "frobnicate"]).is_err());
        assert!(settings(&["-o", "cache_mb=lots"]).is_err());
        assert!(settings(&["-o", "prefetch=sometimes"]).is_err());
        assert!(settings(&["--chunk-kb", "6"]).is_err());
    }
}
