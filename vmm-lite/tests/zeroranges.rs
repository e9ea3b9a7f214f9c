//! `restore --zero-ranges`: mapping the checkpoint's zero runs anonymous changes nothing the
//! guest sees, a bad file is one clear line, and a file that zeroes a page identifying the VM
//! is caught.

mod common;

use ckptfs::Checkpoint;
use common::{Setup, run_fails, run_json};

/// A checkpointed VM with its zero-ranges file: (setup, raw dump, state, zfile, CHECK).
fn checkpointed(workload: &str) -> (Setup, String, String, String, String) {
    let t = Setup::new("16M");
    let (raw, state, ckpt, zfile) = (t.p("mem.raw"), t.p("state.bin"), t.p("vm.ckpt"), t.p("z"));
    let report = run_json(&[
        "run",
        "--mem",
        "16M",
        "--disk",
        &t.disk(),
        "--workload",
        workload,
        "--warmup-requests",
        "200",
        "-o",
        &ckpt,
        "--raw-out",
        &raw,
        "--state-out",
        &state,
    ]);
    let c = Checkpoint::open(&t.path("vm.ckpt")).unwrap();
    let text = ckptfs::source::format_zero_ranges(&ckptfs::source::zero_ranges(&c));
    std::fs::write(&zfile, text).unwrap();
    let check = report["check"].as_str().unwrap().to_string();
    (t, raw, state, zfile, check)
}

fn restore(t: &Setup, raw: &str, state: &str, extra: &[&str]) -> serde_json::Value {
    let disk = t.disk();
    let mut args = vec![
        "restore",
        "--mem-file",
        raw,
        "--state",
        state,
        "--disk",
        &disk,
        "--requests",
        "300",
    ];
    args.extend_from_slice(extra);
    run_json(&args)
}

fn zero_ranges_keep_the_check(workload: &str) {
    let (t, raw, state, zfile, check) = checkpointed(workload);
    let plain = restore(&t, &raw, &state, &[]);
    assert_eq!(plain["check"], check.as_str());
    assert!(plain.get("zero_ranges").is_none(), "{plain}");
    let zero = restore(&t, &raw, &state, &["--zero-ranges", &zfile]);
    assert_eq!(zero["check"], check.as_str(), "{workload}: {zero}");
    let z = &zero["zero_ranges"];
    assert!(z["ranges_mapped"].as_u64().unwrap() >= 1, "{z}");
    assert!(z["bytes_mapped"].as_u64().unwrap() >= 2 << 20, "{z}");
    assert!(z["bytes_mapped"].as_u64().unwrap() <= z["pages_in_file"].as_u64().unwrap() * 4096);
    assert!(z["ms"].as_f64().is_some(), "{z}");
}

#[test]
fn mixed_zero_ranges_keep_the_check() {
    zero_ranges_keep_the_check("mixed");
}

#[test]
fn desktop_zero_ranges_keep_the_check() {
    // One free run per 2 MiB segment.
    zero_ranges_keep_the_check("desktop");
}

#[test]
fn a_bad_zero_ranges_file_is_one_line_naming_it() {
    let (t, raw, state, _zfile, _check) = checkpointed("mixed");
    let disk = t.disk();
    for (name, text, reason) in [
        ("garbage", "hello\n", "line 1"),
        (
            "outside",
            "16 32\n4000 200\n",
            "line 2: range is empty or outside guest memory",
        ),
        (
            "unsorted",
            "100 20\n50 20\n",
            "line 2: ranges overlap or are not sorted",
        ),
    ] {
        let path = t.p(name);
        std::fs::write(&path, text).unwrap();
        let err = run_fails(&[
            "restore",
            "--mem-file",
            &raw,
            "--state",
            &state,
            "--disk",
            &disk,
            "--zero-ranges",
            &path,
        ]);
        let lines: Vec<&str> = err.lines().collect();
        assert_eq!(lines.len(), 1, "{err}");
        assert!(
            lines[0].contains(&path) && lines[0].contains(reason),
            "{name}: {err}"
        );
    }
    let missing = t.p("missing");
    let err = run_fails(&[
        "restore",
        "--mem-file",
        &raw,
        "--state",
        &state,
        "--disk",
        &disk,
        "--zero-ranges",
        &missing,
    ]);
    assert!(
        err.contains(&missing) && err.contains("cannot read"),
        "{err}"
    );
}

#[test]
fn zero_ranges_over_the_guest_stack_are_caught() {
    // Pages 0x1f0..0x200 hold the guest's stack: never zero in a real checkpoint of this VM.
    let (t, raw, state, _zfile, _check) = checkpointed("mixed");
    let wrong = t.p("wrong");
    std::fs::write(&wrong, "496 16\n").unwrap();
    let err = run_fails(&[
        "restore",
        "--mem-file",
        &raw,
        "--state",
        &state,
        "--disk",
        &t.disk(),
        "--zero-ranges",
        &wrong,
    ]);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains(&wrong) && err.contains("guest stack") && err.contains("another checkpoint"),
        "{err}"
    );
}
