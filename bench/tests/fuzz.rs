//! A short bounded fuzz run (the long one: `cargo run --release -p bench --
//! fuzz --seconds 3600`): no panic, no hang, no wrong bytes accepted, and the
//! mutated inputs reach past the parsers (some are accepted and read back).

use std::process::Command;

#[test]
fn a_bounded_fuzz_run_finds_no_panic_hang_or_wrong_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_bench"))
        .args([
            "fuzz",
            "--iterations",
            "1200",
            "--seconds",
            "120",
            "--seed",
            "7",
        ])
        .arg("--failures")
        .arg(dir.path().join("failures"))
        .arg("--dir")
        .arg(dir.path().join("work"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "fuzzing failed ({}): {stdout}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v["panics"], 0, "{v}");
    assert_eq!(v["wrong_bytes"], 0, "{v}");
    assert!(v["executions"].as_u64().unwrap() >= 1200 || v["seconds"].as_f64().unwrap() >= 120.0);
    for t in v["targets"].as_array().unwrap() {
        assert!(t["executions"].as_u64().unwrap() > 0, "{t}");
        if t["target"] == "checkpoint" || t["target"] == "loadset" {
            assert!(
                t["accepted"].as_u64().unwrap() > 0,
                "no mutant got past the parser: {t}"
            );
            assert!(t["pages_checked"].as_u64().unwrap() > 0, "{t}");
        }
    }
}
