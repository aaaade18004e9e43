//! The real `meshlb` binary: up, client, call, demo, and bad usage.

use std::io::{BufRead, BufReader};
use std::ops::{Deref, DerefMut};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

fn meshlb() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_meshlb"));
    cmd.current_dir(env!("CARGO_MANIFEST_DIR"));
    cmd.env("RUST_LOG", "warn");
    cmd
}

/// A running `meshlb up`, stopped (SIGTERM, then SIGKILL) however the test ends: a failed
/// assertion must not leave its replicas running behind the test.
struct Fleet(Child);

impl Deref for Fleet {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl DerefMut for Fleet {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        if !matches!(self.0.try_wait(), Ok(None)) {
            return;
        }
        // SAFETY: kill(2) on our own child's pid has no memory effects.
        unsafe {
            libc::kill(self.0.id() as i32, libc::SIGTERM);
        }
        // `up` stops its replicas on SIGTERM; SIGKILL only if it does not end in time.
        let deadline = Instant::now() + Duration::from_secs(10);
        while matches!(self.0.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `meshlb up` on free ports; returns the child and the target it printed.
fn up(replicas: &str) -> (Fleet, String) {
    up_with(&["--replicas", replicas], replicas.parse().unwrap())
}

fn up_with(args: &[&str], replicas: usize) -> (Fleet, String) {
    let (child, target, serving, lines) = spawn_up(args);
    assert_eq!(serving.len(), replicas);
    // Keep draining stdout so `up` never blocks on a full pipe.
    std::thread::spawn(move || lines.for_each(drop));
    (child, target)
}

type Lines = std::io::Lines<BufReader<std::process::ChildStdout>>;

/// `meshlb up` on free ports: the child, its target, the lines of the replicas that said
/// SERVING, and the rest of its output.
fn spawn_up(args: &[&str]) -> (Fleet, String, Vec<String>, Lines) {
    // From another folder: `up` needs nothing from the repository (its fleet and data are built in).
    let mut child = Fleet(
        meshlb()
            .current_dir(std::env::temp_dir())
            .args(["up", "--base-port", "0"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let mut serving = Vec::new();
    let target = loop {
        let line = lines
            .next()
            .expect("up printed its target before exiting")
            .unwrap();
        if line.contains("SERVING") {
            serving.push(line.clone());
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

fn stop(mut child: Fleet) {
    // SAFETY: kill(2) on our own child's pid has no memory effects.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let status = child.wait().unwrap();
    assert!(status.success(), "up exited with {status}");
}

/// The replicas of a client's JSON report that served calls, with how many.
fn serving(report: &serde_json::Value) -> Vec<(&str, u64)> {
    report["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["id"].as_str().unwrap(), r["calls"].as_u64().unwrap()))
        .filter(|(_, calls)| *calls > 0)
        .collect()
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
    // 300 calls cost the client some CPU, and not a whole second each.
    let cpu = report["cpu_us_per_call"].as_f64().unwrap();
    assert!(cpu > 0.0 && cpu < 1e6, "cpu per call {cpu}: {report}");
    let replicas = report["replicas"].as_array().unwrap();
    assert_eq!(replicas.len(), 3);
    let sum: u64 = replicas.iter().map(|r| r["calls"].as_u64().unwrap()).sum();
    assert_eq!(sum, 300);
    for key in ["p50", "p90", "p99", "p999", "max"] {
        assert!(report["latency_ms"][key].as_f64().unwrap() > 0.0, "{key}");
    }

    // The client starts calling once one replica is ready: enough calls that one joining a
    // few dozen calls late still gets its share within the margin.
    let (_, rr) = json_client(
        &target,
        &[
            "--requests",
            "600",
            "--concurrency",
            "3",
            "--policy",
            "round-robin",
            "--call",
            "list-users",
        ],
    );
    assert_eq!(rr["policy"], "round-robin");
    assert_eq!(rr["ok"], 600);
    for r in rr["replicas"].as_array().unwrap() {
        let calls = r["calls"].as_u64().unwrap();
        assert!((160..=240).contains(&calls), "uneven round-robin: {rr}");
    }

    // A subset of one: every call goes to the one member this client chose.
    let (out, one) = json_client(&target, &["--requests", "100", "--subset", "1"]);
    assert_eq!(out.status.code(), Some(0), "{one}");
    assert_eq!(one["ok"], 100);
    let calls: Vec<u64> = serving(&one).iter().map(|(_, calls)| *calls).collect();
    assert_eq!(calls, [100], "{one}");
    // Three clients that know their places (0/3, 1/3, 2/3) with subsets of one: each has a
    // replica of its own, and between them every replica has a client. Salted subsets would
    // leave one idle seven times in nine.
    let mut placed = std::collections::BTreeSet::new();
    for coordinate in ["0/3", "1/3", "2/3"] {
        let (out, report) = json_client(
            &target,
            &[
                "--requests",
                "30",
                "--subset",
                "1",
                "--coordinate",
                coordinate,
            ],
        );
        assert_eq!(out.status.code(), Some(0), "{report}");
        let served = serving(&report);
        assert_eq!(served.len(), 1, "{coordinate}: {report}");
        assert!(
            placed.insert(served[0].0.to_string()),
            "{coordinate}: {placed:?}"
        );
    }
    assert_eq!(placed.len(), 3);
    // An aperture of one, one call at a time: the load needs one member, and only it serves.
    let (out, narrow) = json_client(
        &target,
        &["--requests", "60", "--concurrency", "1", "--aperture", "1"],
    );
    assert_eq!(out.status.code(), Some(0), "{narrow}");
    let served = serving(&narrow).len();
    assert_eq!(served, 1, "{narrow}");

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
    assert_usage_error(
        &["client", "--target", "x:1", "--probe", "pkg.Svc"],
        "package.Service/Method",
    );
    // Values that used to panic or make no sense.
    assert_usage_error(&["client", "--target", "x:1", "--rate", "1e12"], "--rate");
    assert_usage_error(&["client", "--target", "x:1", "--timeout", "0s"], "0s");
    assert_usage_error(&["client", "--target", "x:1", "--duration", "0s"], "0s");
    assert_usage_error(&["client", "--target", "x:1", "--requests", "0"], "0");
    assert_usage_error(
        &["client", "--target", "x:1", "--aperture", "0"],
        "number of endpoints",
    );
    assert_usage_error(
        &["client", "--target", "x:1", "--coordinate", "3/3"],
        "I/COUNT",
    );
    // A place among the clients, and nothing to place: every endpoint is used.
    assert_usage_error(
        &["client", "--target", "x:1", "--coordinate", "1/3"],
        "has neither",
    );
    assert_usage_error(
        &[
            "client",
            "--target",
            "x:1",
            "--policy",
            "pick-first",
            "--aperture",
            "12",
            "--coordinate",
            "1/3",
        ],
        "pick-first uses no aperture",
    );
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
    let started = Instant::now();
    let (out, report) = json_client(dead, &["--requests", "10"]);
    assert!(
        started.elapsed() < Duration::from_millis(4500),
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
    let started = Instant::now();
    let out = meshlb()
        .args(["call", "--target", &target, "--timeout", "1s"])
        .args(["get-point", "--name", "james", "--age", "26"])
        .output()
        .unwrap();
    let took = started.elapsed();
    assert_eq!(out.status.code(), Some(1));
    assert!(took < Duration::from_millis(2500), "took {took:?}");
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

/// What each line of a `--watch` frame is, runs of rows counted once: the frame's structure,
/// whatever the figures.
fn frame_structure(frame: &[String]) -> Vec<&'static str> {
    let mut kinds: Vec<&'static str> = Vec::new();
    for line in frame {
        let kind = if line.starts_with("meshlb client --watch ") {
            "title"
        } else if line.split_whitespace().collect::<Vec<_>>()
            == [
                "endpoint",
                "state",
                "in-flight",
                "served",
                "errors",
                "shed",
                "ewma",
            ]
        {
            "endpoint header"
        } else if line.starts_with(|c: char| c.is_ascii_digit()) {
            "endpoint"
        } else if line.is_empty() {
            "blank"
        } else if line == "last second:" {
            "last second"
        } else if line.split_whitespace().collect::<Vec<_>>()
            == [
                "replica", "address", "calls", "share", "errors", "p50", "p99",
            ]
        {
            "replica header"
        } else if line.starts_with("calls ") && line.contains(" calls/s over ") {
            "totals"
        } else if line.starts_with("latency p50 ") {
            "latency"
        } else {
            "replica"
        };
        if kinds.last() != Some(&kind) || !matches!(kind, "endpoint" | "replica") {
            kinds.push(kind);
        }
    }
    kinds
}

/// The README's sample of the live view (the `text` block that starts with the watch title).
fn readme_watch_sample() -> Vec<String> {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let start = readme
        .find("```text\nmeshlb client --watch ")
        .expect("the README shows a --watch frame");
    let body = &readme[start + "```text\n".len()..];
    body[..body.find("```").unwrap()]
        .lines()
        .map(str::to_owned)
        .collect()
}

#[test]
fn watch_runs_until_ctrl_c_counts_retries_per_second_and_looks_as_the_readme_shows() {
    let (mut fleet, target, serving, lines) = spawn_up(&["--replicas", "3"]);
    std::thread::spawn(move || lines.for_each(drop));
    let pid_of = |name: &str| -> i32 {
        serving
            .iter()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().find_map(|w| w.strip_prefix("pid=")))
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("up prints {name}'s pid: {serving:?}"))
    };
    // A replica that answers at once has its calls on the wire for microseconds, so a kill
    // often finds none there and nothing is retried. 10 ms on the two fast replicas keeps calls
    // on users-2 when it dies (users-3, at 40 ms, is still the latency outlier).
    for name in ["users-1", "users-2"] {
        let admin = serving
            .iter()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().find_map(|w| w.strip_prefix("admin=")))
            .unwrap_or_else(|| panic!("up prints {name}'s admin address: {serving:?}"));
        let out = meshlb()
            .args(["faults", "--addr", admin, "--latency", "10ms"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
    }
    // No --duration: a watch runs until Ctrl-C, however many calls that is.
    let mut watch = meshlb()
        .args([
            "client",
            "--target",
            &target,
            "--watch",
            "--concurrency",
            "8",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(watch.stdout.take().unwrap()).lines();
    let mut frames: Vec<Vec<String>> = Vec::new();
    let mut frame = Vec::new();
    let mut killed = false;
    let mut retried_then_calm = false;
    let mut retries_seen = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    for line in lines.by_ref() {
        let line = line.unwrap();
        if line.starts_with("meshlb client --watch ") && !frame.is_empty() {
            frames.push(std::mem::take(&mut frame));
        }
        if let Some(retries) = line
            .strip_prefix("calls ")
            .and_then(|l| l.split("retries ").nth(1))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|n| n.parse::<u64>().ok())
        {
            if killed && retries > 0 {
                retries_seen += 1;
            } else if retries_seen > 0 && retries == 0 {
                // Per second: the count falls back once the kill's retries are a second old.
                retried_then_calm = true;
            }
        }
        frame.push(line);
        let served: u64 = frames.last().map_or(0, |f| {
            f.iter()
                .filter(|l| l.starts_with(|c: char| c.is_ascii_digit()))
                .filter_map(|l| {
                    l.split_whitespace()
                        .nth(3 + usize::from(l.contains("(latency)")))
                })
                .filter_map(|n| n.parse::<u64>().ok())
                .sum()
        });
        if !killed && frames.len() >= 2 && served > 1000 {
            // Not at once: a frame has just been drawn, and while the client draws, its calls
            // wait on it rather than on the replicas, so a kill now can find none on the wire.
            // Half a second later the calls are back on the replicas.
            let pid = pid_of("users-2");
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(500));
                // SAFETY: kill(2) on a child of `up`, which we started; no memory effects.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
            });
            killed = true;
        }
        if retried_then_calm || Instant::now() > deadline {
            break;
        }
    }
    // SAFETY: kill(2) on our own child's pid has no memory effects.
    unsafe {
        libc::kill(watch.id() as i32, libc::SIGINT);
    }
    let rest: Vec<String> = lines.map(|l| l.unwrap()).collect();
    let status = watch.wait().unwrap();
    assert!(
        killed,
        "the watch passed 1000 calls without --duration: {frames:?}"
    );
    assert!(
        retried_then_calm,
        "retries after the kill, then a second without: {frames:?}"
    );
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
    // A frame after the kill has the README sample's lines, in its order. The killed replica
    // shows out of rotation: ejected by its failed calls, or connecting once that ends.
    let killed_addr = serving
        .iter()
        .find(|l| l.starts_with("users-2"))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or_else(|| panic!("up prints users-2's address: {serving:?}"));
    let after_kill = frames
        .iter()
        .rev()
        .find(|f| {
            f.iter().any(|l| {
                l.split_whitespace().next() == Some(killed_addr)
                    && (l.contains(" connecting ") || l.contains(" ejected "))
            })
        })
        .unwrap_or_else(|| panic!("users-2 shows as out of rotation: {frames:?}"));
    assert_eq!(
        frame_structure(after_kill),
        frame_structure(&readme_watch_sample()),
        "{after_kill:#?}"
    );
    // users-2 is gone, so `up`'s exit status after SIGTERM says so; only its ending matters.
    // SAFETY: kill(2) on our own child's pid has no memory effects.
    unsafe {
        libc::kill(fleet.id() as i32, libc::SIGTERM);
    }
    fleet.wait().unwrap();
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

#[test]
fn up_tls_cleans_up_its_own_certificates_and_uses_a_folder_it_is_given() {
    let ca_of = |lines: &[String]| -> PathBuf {
        let try_line = lines
            .iter()
            .find(|l| l.starts_with("try:"))
            .unwrap_or_else(|| panic!("a try: line in {lines:?}"));
        let words: Vec<&str> = try_line.split_whitespace().collect();
        let at = words
            .iter()
            .position(|w| *w == "--tls-ca")
            .expect("--tls-ca");
        PathBuf::from(words[at + 1])
    };
    let lines_of = crate::support::lines_until_try;
    let up = |extra: &[&str]| {
        Fleet(
            meshlb()
                .current_dir(std::env::temp_dir())
                .args(["up", "--base-port", "0", "--replicas", "1", "--tls"])
                .args(extra)
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        )
    };
    // No --certs: a temporary folder, named in the client flags, gone after Ctrl-C.
    let mut child = up(&[]);
    let ca = ca_of(&lines_of(&mut child));
    assert!(ca.exists(), "{} exists while up runs", ca.display());
    // SAFETY: kill(2) on our own child's pid has no memory effects.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGINT);
    }
    assert!(child.wait().unwrap().success());
    assert!(!ca.exists(), "{} is removed with the fleet", ca.display());
    assert!(!ca.parent().unwrap().exists());

    // --certs DIR: those certificates, named as given, left in place.
    let dir = std::env::temp_dir().join(format!("meshlb-it-certs-{}", std::process::id()));
    let made = meshlb()
        .args(["certs", "--out", dir.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(made.status.success(), "{made:?}");
    let mut child = up(&["--certs", dir.to_str().unwrap()]);
    let ca = ca_of(&lines_of(&mut child));
    assert_eq!(ca, dir.join("ca.pem"));
    stop(child);
    assert!(dir.join("ca.pem").exists(), "a given folder is the user's");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn tools_log_only_warnings_by_default_and_never_colour_a_pipe() {
    let (fleet, target) = up("2");
    let client = |rust_log: Option<&str>| {
        let mut cmd = meshlb();
        cmd.env_remove("RUST_LOG");
        if let Some(level) = rust_log {
            cmd.env("RUST_LOG", level);
        }
        let out = cmd
            .args(["client", "--target", &target, "--requests", "50"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    // Asked for, the balancer's own lines are there (so the default below filters something)...
    let verbose = client(Some("meshlb=debug"));
    assert!(verbose.contains("DEBUG"), "{verbose}");
    // ... and never with colour codes when stderr is not a terminal.
    assert!(!verbose.contains('\u{1b}'), "{verbose:?}");
    // By default: nothing below a warning.
    let quiet = client(None);
    assert!(
        !quiet.contains("INFO") && !quiet.contains("DEBUG"),
        "{quiet}"
    );
    assert!(!quiet.contains('\u{1b}'), "{quiet:?}");
    stop(fleet);
}
