//! Filesystem-level tests: the fio jobs of tests/fio/ against a mounted `memory`.
//! fio is a required tool here (scripts/setup.sh installs it): missing fio fails.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::Env;

fn job_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fio")
}

/// Run one job file on `file`; returns fio's JSON report.
fn run_fio(job: &str, file: &Path) -> serde_json::Value {
    let out = Command::new("fio")
        .arg("--output-format=json")
        .arg(job_dir().join(job))
        .env("FILE", file)
        .env("RUNTIME", "1")
        .env("INVALIDATE", "1")
        .output()
        .unwrap_or_else(|e| panic!("cannot run fio ({e}): install it with scripts/setup.sh"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "fio {job} failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    // fio may print notes before the JSON document.
    let json = &stdout[stdout.find('{').unwrap_or(0)..];
    serde_json::from_str(json)
        .unwrap_or_else(|e| panic!("fio {job} output is not JSON ({e}): {stdout}"))
}

fn check_report(job: &str, report: &serde_json::Value, jobs: usize) {
    let list = report["jobs"].as_array().expect("jobs array");
    assert_eq!(list.len(), jobs, "{job}: job count");
    for j in list {
        let name = j["jobname"].as_str().unwrap_or("?");
        assert_eq!(j["error"].as_i64(), Some(0), "{job}/{name}: fio error");
        let bytes = j["read"]["io_bytes"].as_u64().unwrap_or(0);
        assert!(bytes > 0, "{job}/{name}: read nothing");
    }
}

#[test]
fn fio_jobs_complete_without_errors_on_the_mount() {
    let env = Env::new();
    let m = env.mount(&[]);
    for (job, jobs) in [
        ("seq-1m.fio", 1),
        ("rand-4k.fio", 1),
        ("mmap.fio", 1),
        ("multi.fio", 5),
    ] {
        let report = run_fio(job, &env.memory());
        check_report(job, &report, jobs);
    }
    let s = m.stats();
    assert_eq!(s["read_errors"], 0, "{s}");
    // The sequential job read the whole file exactly.
    let report = run_fio("seq-1m.fio", &env.memory());
    assert_eq!(
        report["jobs"][0]["read"]["io_bytes"].as_u64(),
        Some(common::GUEST_MIB << 20)
    );
}

#[test]
fn mount_helper_translates_mount_options() {
    let env = Env::new();
    let helper = Path::new(env!("CARGO_MANIFEST_DIR")).join("mount.fuse.ckptfs");
    let bin_dir = Path::new(common::mountd_bin()).parent().unwrap();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = Command::new("sh")
        .arg(&helper)
        .arg(&env.fx.ckpt)
        .arg(&env.mnt)
        .args(["-o", "rw,nosuid,prefetch=readahead,cache_mb=16"])
        .env("PATH", path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let m = common::Mount {
        mnt: env.mnt.clone(),
        child: None,
    };
    let s = m.stats();
    assert_eq!(s["prefetch_policy"], "readahead");
    assert_eq!(s["cache"]["capacity_chunks"], 256);
    assert!(std::fs::read(env.memory()).unwrap() == env.original());
}
