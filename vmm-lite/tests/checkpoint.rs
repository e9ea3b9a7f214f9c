//! run -> ckptfs checkpoint: the checkpoint rebuilds exactly the raw dump, carries the VMM
//! state, and restoring from it (eagerly, through read_pages) gives the checkpoint's CHECK.

mod common;

use ckptfs::{Checkpoint, PageIndex};
use common::{Setup, run_json};

fn checkpoint_matches_raw_dump(workload: &str, no_scan: bool) {
    let t = Setup::new("16M");
    let (raw, state, ckpt, disk) = (t.p("mem.raw"), t.p("state.bin"), t.p("vm.ckpt"), t.disk());
    let mut args = vec![
        "run",
        "--mem",
        "16M",
        "--disk",
        &disk,
        "--workload",
        workload,
        "--checkpoint-after",
        "0.2",
        "-o",
        &ckpt,
        "--raw-out",
        &raw,
        "--state-out",
        &state,
    ];
    if no_scan {
        args.push("--no-scan");
    }
    let report = run_json(&args);
    let summary = &report["checkpoint"];
    assert_eq!(summary["hints_rejected"].as_u64(), Some(0), "{report}");
    assert_eq!(summary["hints_verified"], report["hints"], "{report}");
    if workload != "anon" {
        assert!(summary["disk_pages"].as_u64().unwrap() > 0, "{report}");
    }

    let c = Checkpoint::open(&t.path("vm.ckpt")).unwrap();
    let mem = std::fs::read(&raw).unwrap();
    assert_eq!(c.guest_size(), mem.len() as u64);
    let mut rebuilt = vec![0u8; mem.len()];
    c.read_pages(PageIndex(0), &mut rebuilt).unwrap();
    assert!(
        rebuilt == mem,
        "{workload}: rebuilt memory differs from the raw dump"
    );
    assert_eq!(c.vmm_state(), &std::fs::read(&state).unwrap()[..]);

    let restored = run_json(&[
        "restore",
        "--ckpt",
        &ckpt,
        "--disk",
        &disk,
        "--requests",
        "100",
    ]);
    assert_eq!(
        restored["check"], report["check"],
        "{workload}: restore --ckpt"
    );
    assert_eq!(restored["mode"], "ckpt-eager");
}

#[test]
fn mixed_checkpoint_with_hints_only() {
    checkpoint_matches_raw_dump("mixed", true);
}

#[test]
fn pagecache_checkpoint_with_scan() {
    checkpoint_matches_raw_dump("pagecache", false);
}

#[test]
fn anon_checkpoint() {
    checkpoint_matches_raw_dump("anon", true);
}

#[test]
fn desktop_checkpoint_with_hints_only() {
    checkpoint_matches_raw_dump("desktop", true);
}
