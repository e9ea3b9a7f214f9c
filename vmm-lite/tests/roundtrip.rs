//! Boot -> run with a checkpoint (raw dump + state) -> restore: the restored VM's CHECK equals
//! the one taken before the checkpoint, for each workload and each way of loading memory, and
//! the restored VM continues exactly as the original did.

mod common;

use common::{Setup, run_json};

const MEM: &str = "16M";
const CONTINUE: &str = "40";

fn round_trip(workload: &str) {
    let t = Setup::new("16M");
    let (raw, state, disk) = (t.p("mem.raw"), t.p("state.bin"), t.disk());
    let report = run_json(&[
        "run",
        "--mem",
        MEM,
        "--disk",
        &disk,
        "--workload",
        workload,
        "--checkpoint-after",
        "0.2",
        "--raw-out",
        &raw,
        "--state-out",
        &state,
        "--continue-requests",
        CONTINUE,
        "--continue-writes",
    ]);
    let check = report["check"].as_str().unwrap().to_string();
    assert!(report["warmup_requests"].as_u64().unwrap() > 0, "{report}");
    assert_eq!(std::fs::metadata(&raw).unwrap().len(), 16 << 20);

    let lazy = run_json(&[
        "restore",
        "--mem-file",
        &raw,
        "--state",
        &state,
        "--disk",
        &disk,
        "--requests",
        "0",
    ]);
    assert_eq!(
        lazy["check"].as_str().unwrap(),
        check,
        "{workload}: lazy restore"
    );
    let eager = run_json(&[
        "restore",
        "--mem-file",
        &raw,
        "--eager",
        "--state",
        &state,
        "--disk",
        &disk,
        "--requests",
        "0",
    ]);
    assert_eq!(
        eager["check"].as_str().unwrap(),
        check,
        "{workload}: eager restore"
    );

    // READ requests change nothing: the CHECK after them is still the checkpoint's.
    let reads = run_json(&[
        "restore",
        "--mem-file",
        &raw,
        "--state",
        &state,
        "--disk",
        &disk,
        "--requests",
        "200",
    ]);
    assert_eq!(reads["requests"].as_u64(), Some(200));
    assert_eq!(
        reads["check"].as_str().unwrap(),
        check,
        "{workload}: after READ requests"
    );

    // WORK requests after a restore end where the original VM ended after the same requests.
    let writes = run_json(&[
        "restore",
        "--mem-file",
        &raw,
        "--state",
        &state,
        "--disk",
        &disk,
        "--requests",
        CONTINUE,
        "--writes",
    ]);
    assert_eq!(
        writes["check"], report["check_after_continue"],
        "{workload}: continued run"
    );
    assert_ne!(writes["check"].as_str().unwrap(), check);
}

#[test]
fn mixed_round_trip() {
    round_trip("mixed");
}

#[test]
fn pagecache_round_trip() {
    round_trip("pagecache");
}

#[test]
fn anon_round_trip() {
    round_trip("anon");
}

#[test]
fn desktop_round_trip() {
    round_trip("desktop");
}

#[test]
fn timeline_has_a_line_per_request() {
    let t = Setup::new("16M");
    let (raw, state, disk, timeline) = (t.p("mem.raw"), t.p("state.bin"), t.disk(), t.p("t.jsonl"));
    run_json(&[
        "run",
        "--mem",
        MEM,
        "--disk",
        &disk,
        "--checkpoint-after",
        "0.1",
        "--raw-out",
        &raw,
        "--state-out",
        &state,
    ]);
    let report = run_json(&[
        "restore",
        "--mem-file",
        &raw,
        "--state",
        &state,
        "--disk",
        &disk,
        "--duration",
        "0.2",
        "--timeline",
        &timeline,
    ]);
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&timeline)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let works = lines.iter().filter(|l| l["kind"] == "work").count() as u64;
    assert_eq!(Some(works), report["requests"].as_u64());
    assert_eq!(lines.last().unwrap()["kind"], "check");
    let times: Vec<u64> = lines.iter().map(|l| l["t_ns"].as_u64().unwrap()).collect();
    assert!(
        times.windows(2).all(|w| w[0] <= w[1]),
        "timestamps are monotonic"
    );
    assert!(times[0] > 0);
}

#[test]
fn counted_warmup_is_deterministic() {
    let t = Setup::new("16M");
    let disk = t.disk();
    let args = [
        "run",
        "--mem",
        MEM,
        "--disk",
        &disk,
        "--workload",
        "pagecache",
        "--warmup-requests",
        "500",
    ];
    let (a, b) = (run_json(&args), run_json(&args));
    assert_eq!(a["warmup_requests"].as_u64(), Some(500));
    assert_eq!(a["check"], b["check"]);
    assert_eq!(a["hints"], b["hints"]);
    let mut other_seed = args.to_vec();
    other_seed.extend(["--seed", "2"]);
    assert_ne!(run_json(&other_seed)["check"], a["check"]);
}
