//! Command line: `ckptfs-mountd VM.ckpt MOUNTPOINT [flags] [-o opts]`.
//!
//! Every flag also has a `-o` spelling (`cache_mb=N`, `prefetch=P`,
//! `loading_set=F`, `no_loading_set`, `record_loading_set`,
//! `loading_set_window=S`, `wait_loading_set`, `loader_threads=N`, `for_user=U`, `threads=N`,
//! `notify_store=BOOL`, `chunk_kb=N`, `readahead_kb=N`, `foreground`) so
//! `mount -t fuse.ckptfs` can pass them through mount.fuse.ckptfs. An explicit
//! flag wins over `-o`. Numbers are bounded: a value outside its range is one
//! clear error, never an overflow or a mount that cannot serve.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use fuser::{MountOption, SessionACL};

/// Which prefetching runs besides the loading set; each includes the ones before.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Policy {
    /// Demand reads (and the loading set) only.
    None,
    /// Plus readahead of sequential streams of small reads.
    Readahead,
    /// Plus a background fetch of every page, in disk order.
    All,
}

impl Policy {
    /// Stream readahead is on.
    pub fn readahead(self) -> bool {
        self != Policy::None
    }

    /// The background sweep is on.
    pub fn background(self) -> bool {
        self == Policy::All
    }

    /// The default: `none` when a loading set is pre-warmed from local storage, else `all`.
    /// With a loading set, the background sweep's reads queue ahead of the next demand misses
    /// in the storage (a throttled disk's FIFO, a shared one's queue) and the VM stalls on
    /// them: side by side, `none` lost less work than `all` in 5 of 6 runs (one
    /// noisy run had it the other way), and left 1 of 15 login storms unresponsive against
    /// 7 of 15 with `all` (bench/RESULTS.md). Without a set the sweep is what brings the
    /// working set in, and an object store's background fetch fills the local block cache.
    pub fn default_for(local_loading_set: bool) -> Policy {
        if local_loading_set {
            Policy::None
        } else {
            Policy::All
        }
    }

    /// The CLI spelling.
    pub fn name(self) -> &'static str {
        match self {
            Policy::None => "none",
            Policy::Readahead => "readahead",
            Policy::All => "all",
        }
    }
}

/// Serve a ckptfs checkpoint's guest RAM as a lazily restored FUSE file.
#[derive(Debug, Parser)]
#[command(name = "ckptfs-mountd", version)]
pub struct Cli {
    /// The checkpoint file, or s3://BUCKET/PREFIX for one pushed with `ckptfs push`.
    pub checkpoint: PathBuf,
    /// Where to mount it (an existing directory).
    pub mountpoint: PathBuf,
    /// Stay in the foreground (default: detach once the mount is ready).
    #[arg(short, long)]
    pub foreground: bool,
    /// Daemon cache bound in MiB [default: 256].
    #[arg(long)]
    pub cache_mb: Option<u64>,
    /// Prefetch besides the loading set; each includes the previous ones [default: none
    /// when a local loading set is used, else all].
    #[arg(long, value_enum)]
    pub prefetch: Option<Policy>,
    /// Loading-set file [default: CHECKPOINT.ls].
    #[arg(long)]
    pub loading_set: Option<PathBuf>,
    /// Do not use a loading set even if one exists.
    #[arg(long)]
    pub no_loading_set: bool,
    /// Record the pages a restore touches and write them as the loading set on
    /// exit (slower: the kernel's read-around and all prefetch are off).
    #[arg(long)]
    pub record_loading_set: bool,
    /// Seconds after the first read of `memory` during which touched pages
    /// belong to the recorded loading set [default: 5].
    #[arg(long)]
    pub loading_set_window: Option<f64>,
    /// Detach (return) only once the loading set is in the page cache.
    #[arg(long)]
    pub wait_loading_set: bool,
    /// Serve only what this user (name or uid) may read: the checkpoint and
    /// every disk image and parent it names [default: the checkpoint's owner].
    #[arg(long, value_name = "USER")]
    pub for_user: Option<String>,
    /// Percent of the time the background sweep may take while the VM is
    /// still faulting (0: a trickle of one chunk every 50 ms) [default: 0].
    #[arg(long, value_name = "PCT")]
    pub background_share: Option<u32>,
    /// Threads that verify and push loading-set pages [default: 2].
    #[arg(long)]
    pub loader_threads: Option<usize>,
    /// FUSE worker threads [default: 4].
    #[arg(long)]
    pub threads: Option<usize>,
    /// Push prefetched pages into the kernel page cache [default: true].
    #[arg(long)]
    pub notify_store: Option<bool>,
    /// Prefetch chunk size in KiB, a multiple of 4 [default: 64].
    #[arg(long)]
    pub chunk_kb: Option<u64>,
    /// Kernel read-around of the mount (its bdi read_ahead_kb), i.e. how much
    /// a page fault reads [default: 16 with a loading set, else 128; 0 while
    /// recording].
    #[arg(long)]
    pub readahead_kb: Option<u64>,
    /// Mount options, comma separated (may repeat).
    #[arg(short = 'o', value_name = "OPTS")]
    pub opts: Vec<String>,
    /// s3:// only: a disk image to use instead of a recorded path, in
    /// disk-table order (repeatable).
    #[arg(long)]
    pub disk: Vec<PathBuf>,
    /// s3:// only: the on-disk block cache, bounded by --cache-mb
    /// [default: /var/cache/ckptfs/remote].
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
    /// s3:// only: seconds a read keeps retrying a failing store before it
    /// fails with EIO [default: 8].
    #[arg(long)]
    pub retry_secs: Option<f64>,
}

/// Default prefetch chunk size. Measured on a 2 GiB guest, cold
/// (bench/RESULTS.md): 64 KiB chunks gave 1.6x the 4 KiB random-read IOPS of
/// 256 KiB chunks at the same sequential throughput.
pub const DEFAULT_CHUNK_KB: u64 = 64;
/// Default kernel read-around of the mount without a loading set: a fault
/// then brings its neighbours, which a VM without a recorded working set is
/// likely to need next (the kernel's own default for FUSE).
pub const DEFAULT_READAHEAD_KB: u64 = 128;
/// Default read-around once a loading set is in: the faults left are
/// scattered, and each should read little more than its page (measured in
/// bench/RESULTS.md: 4-32 KiB beat 128 KiB, 16 KiB best locally).
pub const LOADING_SET_READAHEAD_KB: u64 = 16;
/// Default recording window.
pub const DEFAULT_WINDOW_SECS: f64 = 5.0;

/// Largest daemon cache: 1 TiB.
const MAX_CACHE_MB: u64 = 1 << 20;
/// Most FUSE threads (each holds a descriptor and a 1 MiB buffer).
const MAX_THREADS: u64 = 64;
/// Largest read-around: 64 MiB.
const MAX_READAHEAD_KB: u64 = 64 << 10;

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
    /// Prefetch policy as asked (None: the default, which depends on whether a loading set
    /// is used: see [`Policy::default_for`]).
    pub policy: Option<Policy>,
    /// Loading-set path, unless loading sets are off.
    pub loading_set: Option<PathBuf>,
    /// Record a loading set (to `loading_set`'s path).
    pub record: bool,
    /// Recording window.
    pub window: Duration,
    /// Signal readiness only once the loading set is in.
    pub wait_loading_set: bool,
    /// Loader push threads.
    pub loader_threads: usize,
    /// Background sweep share while the VM faults, percent.
    pub background_share: u32,
    /// The user the mount is for (None: the default, resolved at mount).
    pub for_user: Option<String>,
    /// FUSE threads.
    pub threads: usize,
    /// Use notify-store.
    pub notify_store: bool,
    /// Chunk size in bytes.
    pub chunk_bytes: usize,
    /// bdi read_ahead_kb to set (None: [`DEFAULT_READAHEAD_KB`], or
    /// [`LOADING_SET_READAHEAD_KB`] once a loading set is loaded).
    pub readahead_kb: Option<u64>,
    /// Kernel mount options.
    pub mount_options: Vec<MountOption>,
    /// Who may access the mount.
    pub acl: SessionACL,
    /// s3:// only: disk images replacing the recorded paths.
    pub disks: Vec<PathBuf>,
    /// s3:// only: the block cache folder.
    pub cache_dir: Option<PathBuf>,
    /// No loading set at all (s3://: not the manifest's either).
    pub no_loading_set: bool,
    /// s3:// only: how long a read retries a failing store.
    pub retry: Duration,
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
    no_loading_set: bool,
    wait_loading_set: bool,
    cache_mb: Option<u64>,
    policy: Option<Policy>,
    loading_set: Option<PathBuf>,
    window: Option<f64>,
    loader_threads: Option<u64>,
    background_share: Option<u64>,
    for_user: Option<String>,
    threads: Option<u64>,
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
        ("threads", v) => acc.threads = Some(num(v)?),
        ("loader_threads", v) => acc.loader_threads = Some(num(v)?),
        ("background_share", v) => acc.background_share = Some(num(v)?),
        ("chunk_kb", v) => acc.chunk_kb = Some(num(v)?),
        ("readahead_kb", v) => acc.readahead_kb = Some(num(v)?),
        ("loading_set_window", Some(v)) => {
            acc.window = Some(v.parse().map_err(|_| bad(o, "expected seconds"))?)
        }
        ("prefetch", Some(v)) => {
            acc.policy = Some(
                <Policy as clap::ValueEnum>::from_str(v, false)
                    .map_err(|_| bad(o, "expected none|readahead|all"))?,
            )
        }
        ("loading_set", Some(v)) => acc.loading_set = Some(PathBuf::from(v)),
        ("for_user", Some(v)) => acc.for_user = Some(v.to_string()),
        ("notify_store", Some(v)) => {
            acc.notify_store = Some(parse_bool(v).ok_or(bad(o, "expected true|false"))?)
        }
        ("record_loading_set", None) => acc.record = true,
        ("no_loading_set", None) => acc.no_loading_set = true,
        ("wait_loading_set", None) => acc.wait_loading_set = true,
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

/// `value` if it lies in `range`, else an error naming the option.
fn bounded(
    name: &str,
    value: u64,
    range: std::ops::RangeInclusive<u64>,
    why: &'static str,
) -> Result<u64, OptionError> {
    if range.contains(&value) {
        Ok(value)
    } else {
        Err(bad(&format!("{name}={value}"), why))
    }
}

impl Settings {
    /// Make every path absolute, so a daemon that left the caller's working
    /// directory (it moves to `/`) still finds its files.
    pub fn make_absolute(&mut self) -> std::io::Result<()> {
        if self.remote_url().is_none() {
            self.checkpoint = std::path::absolute(&self.checkpoint)?;
        }
        for d in self.disks.iter_mut().chain(self.cache_dir.as_mut()) {
            *d = std::path::absolute(&*d)?;
        }
        self.mountpoint = std::path::absolute(&self.mountpoint)?;
        if let Some(p) = &mut self.loading_set {
            *p = std::path::absolute(&*p)?;
        }
        Ok(())
    }
}

impl Settings {
    /// The s3:// location served, when the source is an object store.
    pub fn remote_url(&self) -> Option<&str> {
        self.checkpoint
            .to_str()
            .filter(|s| ckptfs::remote::is_remote(s))
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
        let threads = self.threads.map(|t| t as u64).or(o.threads).unwrap_or(4);
        let threads = bounded("threads", threads, 1..=MAX_THREADS, "must be 1 to 64")?;
        let loader = self.loader_threads.map(|t| t as u64);
        let loader = loader.or(o.loader_threads).unwrap_or(2);
        let loader = bounded("loader_threads", loader, 1..=16, "must be 1 to 16")?;
        let cache_mb = self.cache_mb.or(o.cache_mb).unwrap_or(256);
        let cache_mb = bounded(
            "cache_mb",
            cache_mb,
            1..=MAX_CACHE_MB,
            "must be 1 to 1048576",
        )?;
        let record = self.record_loading_set || o.record;
        let readahead = self.readahead_kb.or(o.readahead_kb).or(record.then_some(0));
        let readahead = readahead
            .map(|kb| {
                bounded(
                    "readahead_kb",
                    kb,
                    0..=MAX_READAHEAD_KB,
                    "must be 0 to 65536",
                )
            })
            .transpose()?;
        let window = self
            .loading_set_window
            .or(o.window)
            .unwrap_or(DEFAULT_WINDOW_SECS);
        if !(window > 0.0 && window <= 3600.0) {
            return Err(bad(
                &format!("loading_set_window={window}"),
                "must be more than 0 and at most 3600 seconds",
            ));
        }
        let no_set = self.no_loading_set || o.no_loading_set;
        if record && no_set {
            return Err(bad("record_loading_set", "conflicts with no_loading_set"));
        }
        let remote = self
            .checkpoint
            .to_str()
            .is_some_and(ckptfs::remote::is_remote);
        if remote && record && self.loading_set.is_none() && o.loading_set.is_none() {
            return Err(bad(
                "record_loading_set",
                "needs loading_set=FILE for an s3:// source (or record from the local checkpoint and push it)",
            ));
        }
        if !remote
            && (!self.disk.is_empty() || self.cache_dir.is_some() || self.retry_secs.is_some())
        {
            return Err(bad(
                "disk/cache_dir/retry_secs",
                "only apply to an s3:// source",
            ));
        }
        let retry = self.retry_secs.unwrap_or(8.0);
        if !(0.0..=600.0).contains(&retry) {
            return Err(bad(
                &format!("retry_secs={retry}"),
                "must be 0 to 600 seconds",
            ));
        }
        // An s3:// source's loading set is in its manifest (see `remote`).
        let loading_set = (!no_set && (!remote || record)).then(|| {
            self.loading_set
                .clone()
                .or(o.loading_set)
                .unwrap_or_else(|| {
                    let mut p = self.checkpoint.as_os_str().to_owned();
                    p.push(".ls");
                    PathBuf::from(p)
                })
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
        // With allow_other the kernel must check every access against the
        // files' owner and mode (fuse's default_permissions): guest RAM is as
        // private as the checkpoint, not readable by every local user.
        if o.acl == SessionACL::All
            && !mount_options
                .iter()
                .any(|m| matches!(m, MountOption::DefaultPermissions))
        {
            mount_options.push(MountOption::DefaultPermissions);
        }
        // Kernel-side subtype: /proc/mounts shows "fuse.ckptfs".
        mount_options.push(MountOption::CUSTOM("subtype=ckptfs".into()));
        Ok(Settings {
            checkpoint: self.checkpoint.clone(),
            mountpoint: self.mountpoint.clone(),
            foreground: self.foreground || o.foreground,
            cache_bytes: cache_mb << 20,
            policy: self.prefetch.or(o.policy),
            loading_set,
            record,
            window: Duration::from_secs_f64(window),
            wait_loading_set: self.wait_loading_set || o.wait_loading_set,
            loader_threads: loader as usize,
            background_share: bounded(
                "background_share",
                self.background_share
                    .map(u64::from)
                    .or(o.background_share)
                    .unwrap_or(0),
                0..=100,
                "must be 0 to 100",
            )? as u32,
            for_user: self.for_user.clone().or(o.for_user),
            threads: threads as usize,
            notify_store: self.notify_store.or(o.notify_store).unwrap_or(true),
            chunk_bytes: (chunk_kb << 10) as usize,
            readahead_kb: readahead,
            mount_options,
            acl: o.acl,
            disks: self.disk.clone(),
            cache_dir: self.cache_dir.clone(),
            no_loading_set: no_set,
            retry: Duration::from_secs_f64(retry),
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
        assert_eq!(s.policy, None);
        assert_eq!(s.loading_set, Some(PathBuf::from("vm.ckpt.ls")));
        assert_eq!(s.threads, 4);
        assert_eq!(s.loader_threads, 2);
        assert_eq!(s.readahead_kb, None, "decided at mount");
        assert_eq!(s.window, Duration::from_secs(5));
        assert!(s.notify_store && !s.record && !s.foreground && !s.wait_loading_set);
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
        assert_eq!(s.policy, Some(Policy::Readahead));
        assert!(!s.notify_store);
        let s = settings(&[
            "-o",
            "allow_other,record_loading_set,loading_set=/tmp/x.ls,loading_set_window=2.5",
        ])
        .unwrap();
        assert_eq!(s.acl, SessionACL::All);
        assert!(
            s.mount_options.contains(&MountOption::DefaultPermissions),
            "allow_other implies default_permissions"
        );
        assert!(s.record);
        assert_eq!(s.readahead_kb, Some(0), "recording reads single pages");
        assert_eq!(s.window, Duration::from_millis(2500));
        assert_eq!(s.loading_set, Some(PathBuf::from("/tmp/x.ls")));
        assert_eq!(
            settings(&["-o", "no_loading_set"]).unwrap().loading_set,
            None
        );
    }

    #[test]
    fn unknown_malformed_or_out_of_range_options_are_refused() {
        assert!(settings(&["-o", "frobnicate"]).is_err());
        assert!(settings(&["-o", "cache_mb=lots"]).is_err());
        assert!(settings(&["-o", "prefetch=workingset"]).is_err());
        assert!(settings(&["--chunk-kb", "6"]).is_err());
        let e = settings(&["--cache-mb", "18446744073709551615"]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "bad mount option 'cache_mb=18446744073709551615': must be 1 to 1048576"
        );
        assert!(settings(&["--threads", "100000"]).is_err());
        assert!(settings(&["--threads", "0"]).is_err());
        assert!(settings(&["--loader-threads", "0"]).is_err());
        assert!(settings(&["--readahead-kb", "99999999"]).is_err());
        assert!(settings(&["--loading-set-window", "0"]).is_err());
        assert!(settings(&["--loading-set-window", "NaN"]).is_err());
        assert!(settings(&["--record-loading-set", "--no-loading-set"]).is_err());
    }
}
