//! Metrics scraped from real replicas and real clients agree with what the clients report.

use crate::support::{eventually, get_point_request, ipv4_target, Replica};
use meshlb::replica::FaultConfig;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

/// `GET /metrics` at `addr`: the text.
fn scrape(addr: SocketAddr) -> String {
    try_scrape(addr).expect("connect to /metrics")
}

fn try_scrape(addr: SocketAddr) -> std::io::Result<String> {
    let mut stream = std::net::TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut text = String::new();
    stream.read_to_string(&mut text)?;
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP answer");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "{head}"
    );
    Ok(body.to_owned())
}

/// The value of the sample of `name` whose labels include every `labels` pair (summed over the
/// samples that match).
fn value(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, v) = l.rsplit_once(' ')?;
            let (n, rest) = series.split_once('{').unwrap_or((series, "}"));
            if n != name {
                return None;
            }
            let all = labels
                .iter()
                .all(|(k, val)| rest.contains(&format!("{k}=\"{val}\"")));
            all.then(|| v.parse::<f64>().ok()).flatten()
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn library_metrics_count_what_the_calls_saw() {
    let healthy = Replica::start("127.0.0.1", "healthy", FaultConfig::default()).await;
    let flaky = Replica::start(
        "127.0.0.1",
        "flaky",
        FaultConfig {
            fail_rate: 0.3,
            ..FaultConfig::default()
        },
    )
    .await;
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = meshlb::balance::Metrics::register(&mut registry);
    let lb = crate::support::userguide(ipv4_target(&[healthy.addr, flaky.addr]))
        .health_service(meshlb::proto::USERGUIDE_SERVICE)
        .metrics(&metrics)
        .build()
        .await
        .unwrap();
    let mut client =
        meshlb::proto::userguide::v1::user_guide_service_client::UserGuideServiceClient::new(
            lb.clone(),
        );
    let mut seen: BTreeMap<String, u64> = BTreeMap::new();
    for _ in 0..300 {
        let code = match client.get_point(get_point_request()).await {
            Ok(_) => "OK",
            Err(status) if status.code() == tonic::Code::Unavailable => "Unavailable",
            Err(status) => panic!("unexpected {status}"),
        };
        *seen.entry(code.to_owned()).or_default() += 1;
    }
    let text = meshlb::metrics::encode(&registry);
    let target = lb.target().to_owned();
    for (code, n) in &seen {
        let counted = value(
            &text,
            "grpc_client_handled_total",
            &[
                ("target", &target),
                ("grpc_method", "GetPoint"),
                ("grpc_code", code),
            ],
        );
        assert_eq!(counted, *n as f64, "{code}: {text}");
    }
    let histogram = value(
        &text,
        "grpc_client_handling_seconds_count",
        &[("grpc_method", "GetPoint")],
    );
    assert_eq!(histogram, 300.0);
    // Attempts per endpoint agree with what each replica counted, code by code (the flaky one
    // answered UNAVAILABLE, and those calls were retried).
    let retries = value(
        &text,
        "meshlb_balancer_retries_total",
        &[("target", &target)],
    );
    assert_eq!(retries, lb.retries() as f64);
    assert!(retries > 0.0, "{text}");
    for replica in [&healthy, &flaky] {
        let server = scrape(replica.metrics);
        let endpoint = replica.addr.to_string();
        for (client_code, server_code) in [("OK", "OK"), ("Unavailable", "Unavailable")] {
            let attempts = value(
                &text,
                "meshlb_endpoint_calls_total",
                &[("endpoint", &endpoint), ("grpc_code", client_code)],
            );
            let handled = value(
                &server,
                "grpc_server_handled_total",
                &[("grpc_method", "GetPoint"), ("grpc_code", server_code)],
            );
            assert_eq!(attempts, handled, "{} {client_code}", replica.id);
        }
        // Exactly one state at a time (the flaky one may be ejected for its failures by now).
        let states: Vec<f64> = [
            "ready",
            "connecting",
            "unhealthy",
            "ejected_failures",
            "ejected_latency",
            "probing",
        ]
        .iter()
        .map(|state| {
            value(
                &text,
                "meshlb_endpoint_state",
                &[("endpoint", &endpoint), ("state", state)],
            )
        })
        .collect();
        assert_eq!(
            states.iter().sum::<f64>(),
            1.0,
            "{}: {states:?}",
            replica.id
        );
        assert!(states.iter().all(|v| *v == 0.0 || *v == 1.0));
    }
    assert!(
        value(
            &scrape(flaky.metrics),
            "grpc_server_handled_total",
            &[("grpc_code", "Unavailable")]
        ) > 0.0
    );
    // Nothing is left in flight once every call has ended; an endpoint in rotation that has
    // answered well has a latency estimate (failures feed it nothing, and an ejection forgets
    // it: the flaky one, ejected after a run of failures, may have none).
    let mut estimated = 0;
    for replica in [&healthy, &flaky] {
        let endpoint = replica.addr.to_string();
        let of = |name| value(&text, name, &[("endpoint", &endpoint)]);
        assert_eq!(of("meshlb_endpoint_in_flight_calls"), 0.0, "{text}");
        let with =
            |name, label: (&str, &str)| value(&text, name, &[("endpoint", &endpoint), label]);
        if with("meshlb_endpoint_calls_total", ("grpc_code", "OK")) > 0.0
            && with("meshlb_endpoint_state", ("state", "ready")) == 1.0
        {
            assert!(of("meshlb_endpoint_latency_ewma_seconds") > 0.0, "{text}");
            estimated += 1;
        }
        let server = scrape(replica.metrics);
        let getpoint = [("grpc_method", "GetPoint")];
        let started = value(&server, "grpc_server_started_total", &getpoint);
        let handled = value(&server, "grpc_server_handled_total", &getpoint);
        assert_eq!(started, handled, "{}: {server}", replica.id);
        assert_eq!(
            value(&server, "meshlb_replica_in_flight_calls", &getpoint),
            0.0
        );
        // Each request is a 5-byte gRPC prefix and a non-empty message.
        assert!(value(&server, "meshlb_replica_received_bytes_total", &getpoint) > 5.0 * started);
        assert!(value(&server, "meshlb_replica_sent_bytes_total", &getpoint) > 0.0);
    }
    // The healthy one, at least, is never ejected.
    assert!(estimated >= 1, "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_requests_are_counted_by_route_with_their_bytes() {
    let replica = Replica::start("127.0.0.1", "rest", FaultConfig::default()).await;
    let (status, body) =
        crate::support::http_get(replica.addr, "/v1/points?name=james&age=26").await;
    assert_eq!(status, 200, "{body}");
    let (status, _) = crate::support::http_get(replica.addr, "/v1/nope").await;
    assert_eq!(status, 404);
    let addr = replica.metrics;
    let text = tokio::task::spawn_blocking(move || scrape(addr))
        .await
        .unwrap();
    let points = [("route", "/v1/points")];
    let ok = value(
        &text,
        "meshlb_replica_http_requests_total",
        &[("route", "/v1/points"), ("code", "200")],
    );
    assert_eq!(ok, 1.0, "{text}");
    assert_eq!(
        value(&text, "meshlb_replica_http_requests_started_total", &points),
        1.0
    );
    assert_eq!(
        value(&text, "meshlb_replica_http_in_flight_requests", &points),
        0.0
    );
    assert_eq!(
        value(&text, "meshlb_replica_http_sent_bytes_total", &points),
        body.len() as f64
    );
    // A made-up path is one `other` route, not a series of its own.
    assert_eq!(
        value(
            &text,
            "meshlb_replica_http_requests_total",
            &[("route", "other"), ("code", "404")]
        ),
        1.0,
        "{text}"
    );
    assert!(!text.contains("/v1/nope"));
}

#[test]
fn the_clients_metrics_listener_serves_during_load_and_agrees_with_its_report() {
    let (mut up, lines) = spawn_up();
    let target = lines
        .iter()
        .find_map(|l| l.strip_prefix("target: "))
        .unwrap()
        .to_owned();
    let replicas: Vec<(String, SocketAddr, SocketAddr)> = lines
        .iter()
        .filter(|l| l.contains("SERVING"))
        .map(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            let metrics = words
                .iter()
                .find_map(|w| w.strip_prefix("metrics="))
                .expect("up prints each replica's metrics address");
            (
                words[0].to_owned(),
                words[1].parse().unwrap(),
                metrics.parse().unwrap(),
            )
        })
        .collect();
    assert_eq!(replicas.len(), 2);
    // The first replica fails half its calls: errors to count by code on both sides.
    let admin = lines
        .iter()
        .find(|l| l.contains("SERVING"))
        .and_then(|l| l.split_whitespace().find_map(|w| w.strip_prefix("admin=")))
        .expect("up prints each replica's admin address")
        .to_owned();
    let faults = Command::new(env!("CARGO_BIN_EXE_meshlb"))
        .args(["faults", "--addr", &admin, "--fail-rate", "0.5"])
        .output()
        .unwrap();
    assert!(faults.status.success(), "{faults:?}");

    let mut client = Command::new(env!("CARGO_BIN_EXE_meshlb"))
        .args(["client", "--target", &target, "--format", "json"])
        .args(["--rate", "300", "--duration", "4s"])
        .args(["--metrics-listen", "127.0.0.1:0"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(client.stderr.take().unwrap());
    let mut line = String::new();
    stderr.read_line(&mut line).unwrap();
    let listen: SocketAddr = line
        .trim()
        .strip_prefix("metrics on ")
        .unwrap_or_else(|| panic!("{line}"))
        .parse()
        .unwrap();
    // During the load: calls are counted as they end, and both endpoints are ready.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let during = loop {
        let text = scrape(listen);
        if value(&text, "grpc_client_handled_total", &[("grpc_code", "OK")]) > 100.0 {
            break text;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no calls counted: {text}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    // Each endpoint is in exactly one state; the failing one may be ejected by now.
    assert_eq!(value(&during, "meshlb_endpoint_state", &[]), 2.0);
    assert!(value(&during, "meshlb_endpoint_state", &[("state", "ready")]) >= 1.0);
    let mut last = during;
    while let Ok(text) = try_scrape(listen) {
        last = text;
        if client.try_wait().unwrap().is_some() {
            break;
        }
        // Often: the last scrape must come within 60 calls (200 ms) of the load's end, on a
        // loaded machine where a scrape itself can take a while.
        std::thread::sleep(Duration::from_millis(10));
    }
    let out = client.wait_with_output().unwrap();
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // Exit 1 says some calls failed; the report says how many.
    let failed = report["calls"].as_u64().unwrap() - report["ok"].as_u64().unwrap();
    assert_eq!(out.status.code(), Some(if failed > 0 { 1 } else { 0 }));
    let calls = report["ok"].as_f64().unwrap();
    let counted = value(&last, "grpc_client_handled_total", &[("grpc_code", "OK")]);
    // The last scrape is a few ms before the end, at 300 calls/s.
    assert!(
        counted <= calls && counted >= calls - 60.0,
        "scraped {counted}, reported {calls}"
    );
    // Errors by code: what callers saw, in the metrics and in the report alike.
    let reported = report["errors"]["UNAVAILABLE"].as_f64().unwrap_or(0.0);
    let counted = value(
        &last,
        "grpc_client_handled_total",
        &[("grpc_code", "Unavailable")],
    );
    assert!(
        counted <= reported && counted >= reported - 30.0,
        "scraped {counted} UNAVAILABLE, reported {reported}"
    );
    // Attempts by code, per endpoint: the client's count is the failing replica's own.
    let (_, failing, failing_metrics) = &replicas[0];
    let attempts = value(
        &last,
        "meshlb_endpoint_calls_total",
        &[
            ("endpoint", &failing.to_string()),
            ("grpc_code", "Unavailable"),
        ],
    );
    let answered = value(
        &scrape(*failing_metrics),
        "grpc_server_handled_total",
        &[("grpc_method", "GetPoint"), ("grpc_code", "Unavailable")],
    );
    assert!(answered > 0.0, "the failing replica failed calls");
    // The replica also counts the attempts of calls that ended after the client's last scrape:
    // at most 3 each (the service config's maxAttempts). The OK check above lets that scrape
    // be 60 calls early; a fixed margin here, of attempts at one replica, was the tighter of
    // the two, and failed once on a loaded machine.
    let ended_after =
        report["calls"].as_f64().unwrap() - value(&last, "grpc_client_handled_total", &[]);
    assert!(
        attempts <= answered && attempts >= answered - 30.0 - 3.0 * ended_after,
        "client counted {attempts} UNAVAILABLE attempts, the replica {answered}; \
         {ended_after} calls ended after the last scrape"
    );
    // Each replica counted the calls the client's report gives it, and its probes.
    for (id, addr, metrics) in &replicas {
        let row = report["replicas"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["addr"] == addr.to_string())
            .unwrap_or_else(|| panic!("{id} is in the report"));
        let handled = value(
            &scrape(*metrics),
            "grpc_server_handled_total",
            &[("grpc_method", "GetPoint"), ("grpc_code", "OK")],
        );
        // Probes of an ejected replica are copies of calls: answered, but not in the report.
        let ok = row["calls"].as_f64().unwrap() - row["errors"].as_f64().unwrap();
        let probes = value(
            &last,
            "meshlb_endpoint_probes_total",
            &[("endpoint", &addr.to_string())],
        );
        assert!(
            handled >= ok && handled <= ok + probes,
            "{id}: handled {handled}, the report's {ok} and {probes} probes"
        );
        assert!(handled > 0.0);
    }
    // SAFETY: kill(2) on our own child's pid has no memory effects.
    unsafe {
        libc::kill(up.id() as i32, libc::SIGTERM);
    }
    assert!(up.wait().unwrap().success());
}

/// `meshlb up --replicas 2` on free ports: the child and its lines up to `try:`.
fn spawn_up() -> (std::process::Child, Vec<String>) {
    let mut up = Command::new(env!("CARGO_BIN_EXE_meshlb"))
        .args(["up", "--replicas", "2", "--base-port", "0"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let seen = crate::support::lines_until_try(&mut up);
    (up, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_reports_its_state_and_faults() {
    let replica = Replica::start("127.0.0.1", "state", crate::support::latency(7)).await;
    let text = eventually("the metrics listener answers", || {
        let addr = replica.metrics;
        async move { tokio::task::spawn_blocking(move || scrape(addr)).await.ok() }
    })
    .await;
    assert_eq!(value(&text, "meshlb_replica_serving", &[]), 1.0);
    assert_eq!(value(&text, "meshlb_replica_draining", &[]), 0.0);
    assert_eq!(
        value(&text, "meshlb_replica_fault_latency_seconds", &[]),
        0.007
    );
    assert!(value(&text, "process_open_fds", &[]) > 0.0, "{text}");
    crate::support::set_serving(replica.admin, false).await;
    let addr = replica.metrics;
    let text = tokio::task::spawn_blocking(move || scrape(addr))
        .await
        .unwrap();
    assert_eq!(value(&text, "meshlb_replica_serving", &[]), 0.0);
}
