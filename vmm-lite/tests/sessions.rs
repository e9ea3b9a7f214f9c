//! Request streams: the existing workloads' checkpoints and READ streams are exactly what
//! they were before sessions existed, `--request-seed` varies the READ stream without
//! changing the CHECK, and two desktop sessions touch mostly, not entirely, the same pages.

mod common;

use std::collections::BTreeSet;

use common::{Setup, run_json};

/// A VM checkpointed after `warmup` counted requests: (setup, raw dump, state, run report).
fn checkpointed(
    workload: &str,
    mem: &str,
    warmup: &str,
) -> (Setup, String, String, serde_json::Value) {
    let t = Setup::new("16M");
    let (raw, state) = (t.p("mem.raw"), t.p("state.bin"));
    let report = run_json(&[
        "run",
        "--mem",
        mem,
        "--disk",
        &t.disk(),
        "--workload",
        workload,
        "--seed",
        "3",
        "--warmup-requests",
        warmup,
        "--raw-out",
        &raw,
        "--state-out",
        &state,
    ]);
    (t, raw, state, report)
}

/// Restores `raw` + `state` with `extra` arguments; returns the report and the responses of
/// the timeline.
fn restore(t: &Setup, raw: &str, state: &str, extra: &[&str]) -> (serde_json::Value, Vec<u64>) {
    let timeline = t.p(&format!(
        "timeline-{}.jsonl",
        extra.join("-").replace('/', "_")
    ));
    let disk = t.disk();
    let mut args = vec![
        "restore",
        "--mem-file",
        raw,
        "--state",
        state,
        "--disk",
        &disk,
        "--timeline",
        &timeline,
    ];
    args.extend_from_slice(extra);
    let report = run_json(&args);
    let responses = std::fs::read_to_string(&timeline)
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["response"]
                .as_u64()
                .unwrap()
        })
        .collect();
    (report, responses)
}

/// Pages listed in a `--touched-out` file.
fn touched(path: &str) -> BTreeSet<u64> {
    let text = std::fs::read_to_string(path).unwrap();
    let ranges = ckptfs::source::parse_zero_ranges(&text, u64::MAX).unwrap();
    ranges.into_iter().flatten().collect()
}

#[test]
fn existing_workloads_keep_their_checks_and_read_streams() {
    // Recorded with vmm-lite before the desktop workload, the boot info extension and
    // sessions: 16 MiB guest, 16 MiB disk (mkdisk seed 1), seed 3, 300 WORK requests, then
    // the first READ responses of a restore.
    let golden = [
        (
            "mixed",
            "0xd8c0563a6e1362f4",
            [3926440874, 3576587595, 2661346548],
        ),
        (
            "pagecache",
            "0xff7f5fe8f241117d",
            [1385696615, 490961829, 4073169489],
        ),
        (
            "anon",
            "0x95146b70c3eb2204",
            [746262584, 3710026265, 3015443902],
        ),
    ];
    for (workload, check, reads) in golden {
        let (t, raw, state, report) = checkpointed(workload, "16M", "300");
        assert_eq!(report["check"], check, "{workload}: checkpoint CHECK");
        let (restored, responses) = restore(&t, &raw, &state, &["--requests", "3"]);
        assert_eq!(responses[..3], reads, "{workload}: READ stream of seed 0");
        assert_eq!(restored["check"], check, "{workload}: CHECK after READs");
    }
}

#[test]
fn request_seed_changes_the_reads_but_not_the_check() {
    let (t, raw, state, report) = checkpointed("mixed", "16M", "100");
    let (a, reads_a) = restore(&t, &raw, &state, &["--requests", "50"]);
    let (b, reads_b) = restore(
        &t,
        &raw,
        &state,
        &["--requests", "50", "--request-seed", "7"],
    );
    let (c, reads_c) = restore(
        &t,
        &raw,
        &state,
        &["--requests", "50", "--request-seed", "7"],
    );
    for r in [&a, &b, &c] {
        assert_eq!(r["check"], report["check"], "{r}");
    }
    assert_eq!(b["request_seed"], 7);
    assert_eq!(reads_b, reads_c, "one seed, one stream");
    let same = reads_a.iter().zip(&reads_b).filter(|(x, y)| x == y).count();
    assert!(same < 5, "seeds 0 and 7 gave {same} equal responses of 51");
}

#[test]
fn desktop_sessions_share_most_but_not_all_touched_pages() {
    let (t, raw, state, report) = checkpointed("desktop", "32M", "200");
    let session = |seed: &str, out: &str| {
        let out = t.p(out);
        let args = [
            "--requests",
            "1500",
            "--request-seed",
            seed,
            "--touched-out",
            &out,
        ];
        let (r, _) = restore(&t, &raw, &state, &args);
        assert_eq!(
            r["check"], report["check"],
            "seed {seed}: READs change nothing"
        );
        let pages = touched(&out);
        assert_eq!(r["touched_pages"].as_u64(), Some(pages.len() as u64));
        pages
    };
    let recorded = session("1", "touched-1.txt");
    let measured = session("2", "touched-2.txt");
    assert_eq!(
        session("2", "touched-2b.txt"),
        measured,
        "one seed, one touched set"
    );
    let covered = measured.intersection(&recorded).count() as f64 / measured.len() as f64;
    assert!(
        (0.80..0.97).contains(&covered),
        "a recording of seed 1 covers {:.1} % of the {} pages seed 2 touched ({} recorded)",
        covered * 100.0,
        measured.len(),
        recorded.len()
    );
    // 32 MiB = 8192 pages, heap 7680: a 12 % working set is ~920 pages, plus cold pages.
    assert!((700..2500).contains(&measured.len()), "{}", measured.len());
}
