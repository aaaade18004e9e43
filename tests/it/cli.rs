//! The real `meshlb` binary: up, client, call, demo, and bad usage.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Output, Stdio};

fn meshlb() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_meshlb"));
    cmd.current_dir(env!("CARGO_MANIFEST_DIR"));
    cmd.env("RUST_LOG", "warn");
    cmd
}

/// `meshlb up` on free ports; returns the child and the target it printed.
fn up(replicas: &str) -> (Child, String) {
    up_with(&["--replicas", replicas], replicas.parse().unwrap())
}

fn up_with(args: &[&str], replicas: usize) -> (Child, String) {
    let (child, target, serving, lines) = spawn_up(args);
    assert_eq!(serving, replicas);
    // Keep draining stdout so `up` never blocks on a full pipe.
    std::thread::spawn(move || lines.for_each(drop));
    (child, target)
}

type Lines = std::io::Lines<BufReader<std::process::ChildStdout>>;

/// `meshlb up` on free ports: the child, its target, how many replicas said SERVING, and the rest
/// of its output.
fn spawn_up(args: &[&str]) -> (Child, String, usize, Lines) {
    // From another folder: `up` needs nothing from the repository (its fleet and data are built in).
    let mut child = meshlb()
        .current_dir(std::env::temp_dir())
        .args(["up", "--base-port", "0"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let mut serving = 0;
    let target = loop {
        let line = lines
            .next()
            .expect("up printed its target before exiting")
            .unwrap();
        if line.contains("SERVING") {
            serving += 1;
        }
        if let Some(t) = line.strip_prefix("target: ") {
            break t.to_owned();
        }
    };
    (child, target, serving, lines)
}

/// `meshlb call --target TARGET get-point --name NAME --age AGE`.
fn get_point(target: &str, name: &str, age: &str) -> Output {
    meshlb()
        .args([
            "call",
            "--target",
            target,
            "get-point",
            "--name",
            name,
            "--age",
            age,
        ])
        .output()
        .unwrap()
}

fn stop(mut child: Child) {
    // SAFETY: kill(2) on our own child's pid has no memory effects.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let status = child.wait().unwrap();
    assert!(status.success(), "up exited with {status}");
}

fn json_client(target: &str, extra: &[&str]) -> (Output, serde_json::Value) {
    let out = meshlb()
        .args(["client", "--target", target, "--format", "json"])
        .args(extra)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let json = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): {stdout}\nstderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out, json)
}

#[test]
fn up_then_client_json_counts_add_up_and_round_robin_is_even() {
    let (child, target) = up("3");
    assert!(target.starts_with("ipv4:"), "{target}");

    let (out, report) = json_client(&target, &["--requests", "300", "--concurrency", "4"]);
    assert_eq!(out.status.code(), Some(0));
    for key in [
        "target",
        "policy",
        "calls",
        "ok",
        "errors",
        "retries",
        "duration_s",
        "rps",
        "latency_ms",
        "replicas",
    ] {
        assert!(report.get(key).is_some(), "missing {key}: {report}");
    }
    assert_eq!(report["calls"], 300);
    assert_eq!(report["ok"], 300);
    let replicas = report["replicas"].as_array().unwrap();
    assert_eq!(replicas.len(), 3);
    let sum: u64 = replicas.iter().map(|r| r["calls"].as_u64().unwrap()).sum();
    assert_eq!(sum, 300);
    for key in ["p50", "p90", "p99", "p999", "max"] {
        assert!(report["latency_ms"][key].as_f64().unwrap() > 0.0, "{key}");
    }

    let (_, rr) = json_client(
        &target,
        &[
            "--requests",
            "300",
            "--concurrency",
            "3",
            "--policy",
            "round-robin",
            "--call",
            "list-users",
        ],
    );
    assert_eq!(rr["policy"], "round-robin");
    assert_eq!(rr["ok"], 300);
    for r in rr["replicas"].as_array().unwrap() {
        let calls = r["calls"].as_u64().unwrap();
        assert!((80..=120).contains(&calls), "uneven round-robin: {rr}");
    }

    let call = get_point(&target, "james", "26");
    let stdout = String::from_utf8_lossy(&call.stdout);
    assert!(call.status.success());
    assert!(stdout.contains(r#"{"value":1000}"#), "{stdout}");
    assert!(stdout.contains("served by users-"), "{stdout}");

    let missing = get_point(&target, "nobody", "1");
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("NOT_FOUND"));
    stop(child);
}

#[test]
fn failed_calls_exit_1_and_still_print_the_report() {
    // Nothing listens there: every call fails fast.
    let (out, report) = json_client("ipv4:127.0.0.1:1", &["--requests", "3", "--timeout", "1s"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(report["ok"], 0);
    assert_eq!(report["errors"]["UNAVAILABLE"], 3);
}

fn assert_usage_error(args: &[&str], mentions: &str) {
    let out = meshlb().args(args).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
    assert!(stderr.contains(mentions), "{args:?}: {stderr}");
    let lines: Vec<_> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{args:?}: one line, got {stderr}");
    assert!(lines[0].starts_with("error:"), "{args:?}: {stderr}");
}

#[test]
fn bad_usage_exits_2_with_one_clear_line() {
    assert_usage_error(&["client", "--target", "ipv4:nope:1"], "nope");
    assert_usage_error(&["client", "--target", "users.local"], "missing port");
    assert_usage_error(
        &["client", "--target", "x:1", "--frobnicate"],
        "--frobnicate",
    );
    assert_usage_error(
        &["client", "--target", "x:1", "--policy", "fastest"],
        "fastest",
    );
    assert_usage_error(
        &["up", "--fleet", "/nonexistent/fleet.toml"],
        "/nonexistent/fleet.toml",
    );
    assert_usage_error(&["replica", "--fail-rate", "7"], "fail rate");
    // Values that used to panic or make no sense.
    assert_usage_error(&["client", "--target", "x:1", "--rate", "1e12"], "--rate");
    assert_usage_error(&["client", "--target", "x:1", "--timeout", "0s"], "0s");
    assert_usage_error(&["client", "--target", "x:1", "--duration", "0s"], "0s");
    assert_usage_error(&["client", "--target", "x:1", "--requests", "0"], "0");
    assert_usage_error(
        &[
            "call",
            "--target",
            "x:1",
            "--timeout",
            "0s",
            "get-point",
            "--name",
            "a",
            "--age",
            "1",
        ],
        "0s",
    );
}

#[test]
fn a_dead_target_fails_fast_once_backs_off_and_says_why() {
    let dead = "ipv4:127.0.0.1:1,127.0.0.1:2,127.0.0.1:3";
    // One bounded wait (3 s), not two; a margin for a loaded machine.
    let started = std::time::Instant::now();
    let (out, report) = json_client(dead, &["--requests", "10"]);
    assert!(
        started.elapsed() < std::time::Duration::from_millis(4500),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(report["errors"]["UNAVAILABLE"], 10);
    let reasons = report["unavailable_reasons"].as_object().expect("reasons");
    let (reason, n) = reasons.iter().next().expect("a reason");
    assert_eq!(n, 10);
    assert!(reason.contains("127.0.0.1:1"), "{reason}");
    assert!(reason.contains("refused"), "{reason}");

    // A closed loop against a dead target backs off instead of spinning.
    let (_, report) = json_client(dead, &["--duration", "4s", "--concurrency", "8"]);
    let calls = report["calls"].as_u64().unwrap();
    assert!(calls > 0 && calls < 500, "{calls} calls in 4 s");
}

#[test]
fn call_honours_its_timeout_against_a_silent_endpoint() {
    // Accepts connections and never answers: the HTTP/2 handshake never completes.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let target = format!("ipv4:{}", silent.local_addr().unwrap());
    let started = std::time::Instant::now();
    let out = meshlb()
        .args(["call", "--target", &target, "--timeout", "1s"])
        .args(["get-point", "--name", "james", "--age", "26"])
        .output()
        .unwrap();
    let took = started.elapsed();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        took < std::time::Duration::from_millis(2500),
        "took {took:?}"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("error: UNAVAILABLE"), "{stderr}");
}

#[test]
fn a_two_tier_fleet_answers_through_the_front() {
    let (child, front) = up_with(
        &[
            "--fleet",
            concat!(env!("CARGO_MANIFEST_DIR"), "/replicas/two-tier.toml"),
        ],
        5,
    );
    assert_eq!(
        front.split(',').count(),
        2,
        "the entry tier is the front: {front}"
    );
    let call = get_point(&front, "amy", "24");
    let stdout = String::from_utf8_lossy(&call.stdout);
    assert!(call.status.success(), "{stdout}");
    assert!(stdout.contains(r#"{"value":1000}"#), "{stdout}");
    assert!(stdout.contains("served by front-"), "{stdout}");
    let missing = get_point(&front, "amy", "99");
    assert!(String::from_utf8_lossy(&missing.stderr).contains("NOT_FOUND"));
    stop(child);
}

#[test]
fn watch_shows_live_states_and_ctrl_c_prints_the_final_table() {
    let (fleet, target) = up("3");
    let mut watch = meshlb()
        .args([
            "client",
            "--target",
            &target,
            "--watch",
            "--duration",
            "120s",
            "--concurrency",
            "2",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = watch.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    // A live frame lists every endpoint with its state.
    let mut ready = 0;
    for line in lines.by_ref() {
        let line = line.unwrap();
        if line.contains(" ready ") {
            ready += 1;
        }
        if ready >= 2 && line.starts_with("last second:") {
            break;
        }
    }
    // SAFETY: kill(2) on our own child's pid has no memory effects.
    unsafe {
        libc::kill(watch.id() as i32, libc::SIGINT);
    }
    let rest: Vec<String> = lines.map(|l| l.unwrap()).collect();
    let status = watch.wait().unwrap();
    assert_eq!(status.code(), Some(0), "{rest:?}");
    let last = rest
        .iter()
        .rev()
        .take(4)
        .cloned()
        .collect::<Vec<_>>()
        .join("\n");
    assert!(
        last.contains("latency p50"),
        "final table expected, got: {last}"
    );
    assert!(rest.iter().any(|l| l.starts_with("calls ")), "totals line");
    stop(fleet);
}

#[test]
fn a_minute_of_chaos_loses_no_retryable_call() {
    let (child, target, _, lines) = spawn_up(&[
        "--chaos",
        "--chaos-every",
        "1500ms",
        "--chaos-length",
        "1500ms",
        "--chaos-seed",
        "3",
    ]);
    let chaos = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = chaos.clone();
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            seen.lock().unwrap().push(line);
        }
    });
    // GetPoint is retryable: every call must end well, whatever chaos does.
    let (out, report) = json_client(&target, &["--duration", "60s", "--concurrency", "8"]);
    stop(child);
    let faults: Vec<String> = chaos
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.contains("chaos:") && l.contains(" for "))
        .cloned()
        .collect();
    assert!(
        faults.len() >= 10,
        "only {} faults: {faults:?}",
        faults.len()
    );
    let kinds = ["kill -9", "freeze", "slow", "NOT_SERVING"]
        .iter()
        .filter(|k| faults.iter().any(|f| f.contains(*k)))
        .count();
    assert!(kinds >= 3, "{faults:?}");
    assert!(report["calls"].as_u64().unwrap() > 1000, "{report}");
    assert_eq!(
        report["ok"],
        report["calls"],
        "failed calls under chaos: {report}\nfaults: {faults:?}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn usage_errors_name_what_is_wrong() {
    assert_usage_error(&["client"], "--target");
    assert_usage_error(&["clinet"], "client");
    assert_usage_error(&["replica", "--tls-cert", "server.pem"], "--tls-key");
    // Bare `meshlb`: the help, not a tagline.
    let out = meshlb().output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let help = String::from_utf8_lossy(&out.stderr);
    assert!(help.contains("Usage:") && help.contains("demo"), "{help}");
}
