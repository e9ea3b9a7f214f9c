//! End to end, on real KVM and FUSE, for every workload: vmm-lite boots the
//! guest and checkpoints it with I/O-tracking hints, the checkpoint verifies
//! against the raw dump, ckptfs-mountd serves it, and the VM restored through
//! the mount (and by every baseline) ends in exactly the checkpointed state.
//!
//! This drives `bench demo`, which finds vmm-lite and ckptfs-mountd beside the
//! bench binary: `cargo test --workspace` builds them all (scripts/test.sh).

use std::process::Command;

fn demo(workload: &str) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_bench"))
        .args([
            "demo",
            "--guest-mib",
            "32",
            "--duration",
            "0.5",
            "--json",
            "--workload",
            workload,
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "bench demo --workload {workload} failed:\n{stderr}"
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("demo JSON: {e}\n{stderr}"))
}

fn check(workload: &str) {
    let v = demo(workload);
    assert_eq!(v["state_identical"], true, "{v}");
    let methods: Vec<&str> = v["restores"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["method"].as_str().unwrap())
        .collect();
    assert_eq!(
        methods,
        [
            "eager-raw",
            "eager-optimized",
            "lazy-raw",
            "ckptfs",
            "ckptfs-ls",
            "ckptfs-ls-zero",
            "warm"
        ]
    );
    for r in v["restores"].as_array().unwrap() {
        assert_eq!(
            r["check_ok"], true,
            "{} restored a different state: {v}",
            r["method"]
        );
        assert!(r["first_response_ms"].as_f64().unwrap() > 0.0, "{r}");
    }
    // The loading set was recorded and pushed before the VM resumed.
    assert!(v["loading_set"]["pages"].as_u64().unwrap() > 0, "{v}");
    let ls = v["restores"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["method"] == "ckptfs-ls")
        .unwrap();
    assert!(
        ls["loadset_bytes"].as_u64().is_some(),
        "loading set not pushed: {ls}"
    );
    let ck = &v["checkpoint"];
    assert_eq!(ck["pages"], 32 * 256);
    assert_eq!(ck["invalid_entries"], 0);
    assert!(ck["size_ratio"].as_f64().unwrap() < 1.0, "{ck}");
}

#[test]
fn mixed_guest_restores_identically_through_every_method() {
    check("mixed");
}

#[test]
fn pagecache_guest_is_mostly_disk_references_and_restores_identically() {
    check("pagecache");
}

#[test]
fn anon_guest_restores_identically() {
    check("anon");
}
