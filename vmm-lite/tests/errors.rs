//! Bad input gives one clear line naming the file and the problem, a non-zero exit, and no
//! panic.

mod common;

use common::{Setup, run_fails, run_json};

/// A checkpointed 16 MiB VM: (setup, raw dump, state file).
fn checkpointed() -> (Setup, String, String) {
    let t = Setup::new("16M");
    let (raw, state) = (t.p("mem.raw"), t.p("state.bin"));
    run_json(&[
        "run",
        "--mem",
        "16M",
        "--disk",
        &t.disk(),
        "--checkpoint-after",
        "0",
        "--raw-out",
        &raw,
        "--state-out",
        &state,
    ]);
    (t, raw, state)
}

fn one_line(stderr: &str) -> &str {
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "expected one line, got: {stderr}");
    lines[0]
}

#[test]
fn short_memory_file_is_refused_before_mapping() {
    let (t, raw, state) = checkpointed();
    let short = t.p("short.raw");
    std::fs::write(&short, &std::fs::read(&raw).unwrap()[..8 << 20]).unwrap();
    let disk = t.disk();
    for extra in [&[][..], &["--eager"][..]] {
        let mut args = vec![
            "restore",
            "--mem-file",
            &short,
            "--state",
            &state,
            "--disk",
            &disk,
        ];
        args.extend_from_slice(extra);
        let err = run_fails(&args);
        let line = one_line(&err);
        assert!(
            line.contains(&short) && line.contains("shorter than guest RAM"),
            "{line}"
        );
    }
}

#[test]
fn missing_memory_file_is_named() {
    let (t, _raw, state) = checkpointed();
    let missing = t.p("nope.raw");
    let line = run_fails(&[
        "restore",
        "--mem-file",
        &missing,
        "--state",
        &state,
        "--disk",
        &t.disk(),
    ]);
    let line = one_line(&line);
    assert!(
        line.contains(&missing) && line.contains("No such file"),
        "{line}"
    );
}

#[test]
fn missing_disk_is_named_for_run_and_restore() {
    let (t, raw, state) = checkpointed();
    let missing = t.p("nodisk.img");
    let err = run_fails(&[
        "run",
        "--mem",
        "16M",
        "--disk",
        &missing,
        "--checkpoint-after",
        "0",
    ]);
    assert!(one_line(&err).contains(&missing), "{err}");
    let err = run_fails(&[
        "restore",
        "--mem-file",
        &raw,
        "--state",
        &state,
        "--disk",
        &missing,
    ]);
    assert!(one_line(&err).contains(&missing), "{err}");
}

#[test]
fn bad_state_files_are_named_with_the_reason() {
    let (t, raw, state) = checkpointed();
    let good = std::fs::read(&state).unwrap();
    let mut corrupt = good.clone();
    let last = corrupt.len() - 1;
    corrupt[last] ^= 0xff;
    let cases: [(&str, Vec<u8>, &str); 4] = [
        ("garbage.bin", [b'x'; 100].to_vec(), "bad magic"),
        (
            "tiny.bin",
            b"VMML".to_vec(),
            "not a plausible VMM state size",
        ),
        ("corrupt.bin", corrupt, "checksum mismatch"),
        (
            "truncated.bin",
            good[..good.len() - 100].to_vec(),
            "truncated",
        ),
    ];
    for (name, bytes, reason) in cases {
        let path = t.p(name);
        std::fs::write(&path, bytes).unwrap();
        let err = run_fails(&[
            "restore",
            "--mem-file",
            &raw,
            "--state",
            &path,
            "--disk",
            &t.disk(),
        ]);
        let line = one_line(&err);
        assert!(
            line.contains(&path) && line.contains(reason),
            "{name}: {line}"
        );
    }
    let missing = t.p("missing-state.bin");
    let err = run_fails(&[
        "restore",
        "--mem-file",
        &raw,
        "--state",
        &missing,
        "--disk",
        &t.disk(),
    ]);
    assert!(one_line(&err).contains(&missing), "{err}");
}

#[test]
fn a_different_disk_is_refused() {
    let (t, raw, state) = checkpointed();
    let other = Setup::new("8M");
    let err = run_fails(&[
        "restore",
        "--mem-file",
        &raw,
        "--state",
        &state,
        "--disk",
        &other.disk(),
    ]);
    let line = one_line(&err);
    assert!(
        line.contains(&other.disk()) && line.contains("checkpointed with"),
        "{line}"
    );
    drop(t);
}

#[test]
fn bad_sizes_are_refused() {
    let t = Setup::new("16M");
    let err = run_fails(&["run", "--mem", "3M", "--disk", &t.disk()]);
    assert!(one_line(&err).contains("not supported"), "{err}");
    let err = run_fails(&["mkdisk", &t.p("x.img"), "--size", "1000"]);
    assert!(one_line(&err).contains("multiple of 4096"), "{err}");
}

/// A 16 MiB mixed VM after `warmup` requests with `seed`: (raw dump, state file).
fn vm(t: &Setup, name: &str, seed: &str, warmup: &str) -> (String, String) {
    let (raw, state) = (t.p(&format!("{name}.raw")), t.p(&format!("{name}.state")));
    run_json(&[
        "run",
        "--mem",
        "16M",
        "--disk",
        &t.disk(),
        "--seed",
        seed,
        "--warmup-requests",
        warmup,
        "--raw-out",
        &raw,
        "--state-out",
        &state,
    ]);
    (raw, state)
}

#[test]
fn a_state_with_another_vms_memory_is_refused() {
    let t = Setup::new("16M");
    let disk = t.disk();
    let (raw_a, state_a) = vm(&t, "a", "1", "50");
    let (raw_b, state_b) = vm(&t, "b", "2", "50");
    let (raw_c, _) = vm(&t, "c", "1", "60"); // VM a, ten requests later
    // Another seed shows in the boot info; the same VM later, in its stack.
    let cases = [
        (&raw_a, &state_b, "boot info"),
        (&raw_b, &state_a, "boot info"),
        (&raw_c, &state_a, "guest stack"),
    ];
    for (raw, state, page) in cases {
        let err = run_fails(&[
            "restore",
            "--mem-file",
            raw,
            "--state",
            state,
            "--disk",
            &disk,
            "--requests",
            "1",
        ]);
        let line = one_line(&err);
        assert!(
            line.contains(state.as_str()) && line.contains(raw.as_str()),
            "names both files: {line}"
        );
        assert!(
            line.contains("does not belong to") && line.contains(page),
            "{line}"
        );
    }
    // The right pairs resume.
    for (raw, state) in [(&raw_a, &state_a), (&raw_b, &state_b)] {
        let ok = run_json(&[
            "restore",
            "--mem-file",
            raw,
            "--state",
            state,
            "--disk",
            &disk,
            "--requests",
            "1",
        ]);
        assert_eq!(ok["requests"], 1);
    }
}

#[test]
fn a_version_1_state_is_refused_with_advice() {
    let (t, raw, state) = checkpointed();
    let mut old = std::fs::read(&state).unwrap();
    old[8] = 1; // the version field (the CRC covers only what follows the header)
    let path = t.p("v1.state");
    std::fs::write(&path, old).unwrap();
    let err = run_fails(&[
        "restore",
        "--mem-file",
        &raw,
        "--state",
        &path,
        "--disk",
        &t.disk(),
    ]);
    let line = one_line(&err);
    assert!(
        line.contains(&path)
            && line.contains("version 1")
            && line.contains("re-create the checkpoint"),
        "{line}"
    );
}

#[test]
fn desktop_options_are_checked() {
    let t = Setup::new("16M");
    let disk = t.disk();
    let err = run_fails(&[
        "run",
        "--mem",
        "16M",
        "--disk",
        &disk,
        "--desktop-ws-pct",
        "5",
    ]);
    assert!(one_line(&err).contains("need --workload desktop"), "{err}");
    let err = run_fails(&[
        "run",
        "--mem",
        "16M",
        "--disk",
        &disk,
        "--workload",
        "desktop",
        "--desktop-cache-pct",
        "80",
        "--desktop-anon-pct",
        "30",
    ]);
    assert!(one_line(&err).contains("exceed 100"), "{err}");
    let err = run_fails(&[
        "run",
        "--mem",
        "16M",
        "--disk",
        &disk,
        "--workload",
        "desktop",
        "--desktop-ws-pct",
        "0",
    ]);
    assert!(one_line(&err).contains("--desktop-ws-pct 0"), "{err}");
}
