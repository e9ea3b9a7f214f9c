//! Storage tiers: local disk, or reads capped at N MB/s for every process of
//! a restore (the VMM, the ckptfs daemon, eager reads alike) with the blkio
//! cgroup (v1): `blkio.throttle.read_bps_device` of the disk that holds the
//! images. The bench process joins the group for the restore only (children
//! inherit it) and leaves it afterwards; the group is removed on drop.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

const BLKIO: &str = "/sys/fs/cgroup/blkio";

/// Where a restore reads from.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Tier {
    /// The local disk, unthrottled.
    Local,
    /// Reads limited to this many MB/s (10^6 bytes).
    Mbps(u64),
}

impl Tier {
    /// Label used in tables.
    pub fn label(self) -> String {
        match self {
            Tier::Local => "local".into(),
            Tier::Mbps(n) => format!("{n} MB/s"),
        }
    }
}

/// The block device (major:minor of the whole disk) holding `path`.
pub fn disk_of(path: &Path) -> Result<(u32, u32)> {
    let dev = fs::metadata(path)
        .with_context(|| format!("stat {}", path.display()))?
        .dev();
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    // A partition's sysfs entry has a `partition` file; throttle its disk.
    let sys = PathBuf::from(format!("/sys/dev/block/{major}:{minor}"));
    if sys.join("partition").exists() {
        let parent = fs::canonicalize(&sys)?
            .parent()
            .map(|p| p.join("dev"))
            .context("partition without a parent disk")?;
        let text = fs::read_to_string(&parent)?;
        let (a, b) = text.trim().split_once(':').context("bad dev file")?;
        return Ok((a.parse()?, b.parse()?));
    }
    Ok((major, minor))
}

/// A blkio cgroup that caps reads (or, for the local tier, only counts them);
/// the bench process is in it while this lives.
pub struct Throttle {
    group: PathBuf,
    disk: (u32, u32),
}

impl Throttle {
    /// Put this process into a blkio group on the disk holding `dir`, with
    /// reads capped at `mbps` MB/s (None: uncapped, only counted).
    pub fn start(dir: &Path, mbps: Option<u64>) -> Result<Self> {
        if !Path::new(BLKIO).join("cgroup.procs").exists() {
            bail!("{BLKIO} is not a blkio cgroup (v1) hierarchy: cannot limit storage bandwidth");
        }
        let (major, minor) = disk_of(dir)?;
        let group = Path::new(BLKIO).join(format!("ckptfs-bench-{}", std::process::id()));
        if !group.exists() {
            fs::create_dir(&group).with_context(|| format!("creating {}", group.display()))?;
        }
        let t = Throttle {
            group,
            disk: (major, minor),
        };
        // 0 removes a limit.
        let bps = mbps.unwrap_or(0) * 1_000_000;
        fs::write(
            t.group.join("blkio.throttle.read_bps_device"),
            format!("{major}:{minor} {bps}"),
        )
        .context("setting blkio.throttle.read_bps_device")?;
        fs::write(t.group.join("cgroup.procs"), std::process::id().to_string())
            .context("joining the blkio cgroup")?;
        Ok(t)
    }
}

impl Throttle {
    /// Bytes the group's processes have read from the disk so far.
    pub fn read_bytes(&self) -> u64 {
        let text = fs::read_to_string(self.group.join("blkio.throttle.io_service_bytes"))
            .unwrap_or_default();
        let want = format!("{}:{} Read ", self.disk.0, self.disk.1);
        text.lines()
            .find_map(|l| l.strip_prefix(&want))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for Throttle {
    fn drop(&mut self) {
        let _ = fs::write(
            Path::new(BLKIO).join("cgroup.procs"),
            std::process::id().to_string(),
        );
        // Daemons that outlive a restore keep the group busy for a moment.
        for _ in 0..50 {
            if fs::remove_dir(&self.group).is_ok() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        eprintln!("bench: could not remove {}", self.group.display());
    }
}

/// Sequential read speed of `file` from a cold cache, MB/s (the bandwidth an
/// eager restore of the raw dump gets on this tier).
pub fn cold_read_mbps(file: &Path) -> Result<f64> {
    use std::io::Read;
    crate::restore::evict(&[file.to_owned()])?;
    let t0 = std::time::Instant::now();
    let mut f = fs::File::open(file)?;
    let mut buf = vec![0u8; 8 << 20];
    let mut total = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        total += n as u64;
    }
    Ok(total as f64 / 1e6 / t0.elapsed().as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_root_disk_is_found() {
        let (major, _) = disk_of(Path::new("/")).unwrap();
        assert!(major > 0);
    }
}
