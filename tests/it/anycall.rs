//! `--call package.Service/Method`: the CLI drives any method, its schema from server reflection,
//! a `.proto` file or a descriptor set, its messages as JSON. Real replicas on loopback (with and
//! without reflection), the real binary.

use crate::support::{ipv4_target, users, Process, Replica};
use meshlb::replica::{FaultConfig, ReplicaConfig};
use std::process::Output;
use std::time::Duration;

const GET_POINT: &str = "userguide.v1.UserGuideService/GetPoint";
const LIST_USERS: &str = "userguide.v1.UserGuideService/ListUsers";
const PROTO: &str = "proto/userguide/v1/userguide.proto";

/// Runs `meshlb ARGS` (from the repository, so `proto/` paths work) with `stdin`, within a deadline.
async fn meshlb(args: &[&str], stdin: &str) -> Output {
    use tokio::io::AsyncWriteExt;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_meshlb"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("RUST_LOG", "warn")
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("run meshlb");
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.as_bytes()).await.unwrap();
    drop(input);
    tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("meshlb ends")
        .unwrap()
}

/// `meshlb call --target TARGET --call METHOD ARGS`.
async fn call(target: &str, method: &str, args: &[&str], stdin: &str) -> Output {
    let mut all = vec!["call", "--target", target, "--call", method];
    all.extend_from_slice(args);
    meshlb(&all, stdin).await
}

/// `meshlb client ARGS --requests N --format json`: its report, the run having succeeded.
async fn load(args: &[&str], requests: u32) -> serde_json::Value {
    let n = requests.to_string();
    let mut all = vec!["client"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--requests", &n, "--format", "json"]);
    let out = meshlb(&all, "").await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["ok"], requests, "{report}");
    report
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn lines(out: &Output) -> Vec<String> {
    text(&out.stdout).lines().map(str::to_owned).collect()
}

/// A usage error: exit code 2 and one line on stderr that says `wants`.
fn refused(out: &Output, wants: &str) {
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr: {err}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    assert!(err.contains(wants), "{err:?} should say {wants:?}");
}

async fn without_reflection(id: &str) -> Replica {
    let mut config = ReplicaConfig::new(id, users());
    config.reflection = false;
    Replica::start_with("127.0.0.1", config).await
}

/// What the typed data says `ListUsers` with these points returns: the names.
fn names_with(points: i64) -> Vec<String> {
    let data: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/replicas/users.json"))
            .unwrap(),
    )
    .unwrap();
    let mut names: Vec<String> = data
        .as_array()
        .unwrap()
        .iter()
        .filter(|u| u["points"].as_i64() == Some(points))
        .map(|u| u["name"].as_str().unwrap().to_owned())
        .collect();
    names.sort();
    names
}

#[tokio::test]
async fn reflection_gives_the_schema_and_json_goes_both_ways() {
    let a = Replica::start("127.0.0.1", "any-1", FaultConfig::default()).await;
    let b = Replica::start("127.0.0.1", "any-2", FaultConfig::default()).await;
    let target = ipv4_target(&[a.addr, b.addr]);

    let out = call(
        &target,
        GET_POINT,
        &["-d", r#"{"profile": {"name": "james", "age": 26}}"#],
        "",
    )
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let got = lines(&out);
    // int64 goes out as a string, as the JSON mapping says.
    assert_eq!(got[0], r#"{"point":{"value":"1000"}}"#);
    assert!(got[1].starts_with("served by any-"), "{got:?}");

    // The request from stdin, a server-streaming answer one JSON line per message.
    let out = call(
        &target,
        LIST_USERS,
        &["-d", "@-"],
        r#"{"point": {"value": "1000"}}"#,
    )
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let got = lines(&out);
    let mut names: Vec<String> = got[..got.len() - 1]
        .iter()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["user"]["profile"]["name"].as_str().unwrap().to_owned()
        })
        .collect();
    names.sort();
    assert_eq!(names, names_with(1000));

    // list and describe, by reflection.
    let out = meshlb(&["list", "--target", &target], "").await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(lines(&out).contains(&"userguide.v1.UserGuideService".to_owned()));
    let out = meshlb(
        &["list", "--target", &target, "userguide.v1.UserGuideService"],
        "",
    )
    .await;
    assert_eq!(lines(&out), [GET_POINT, LIST_USERS]);
    let out = meshlb(
        &[
            "describe",
            "--target",
            &target,
            "userguide.v1.ListUsersResponse",
        ],
        "",
    )
    .await;
    assert_eq!(
        text(&out.stdout),
        "message userguide.v1.ListUsersResponse {\n  userguide.v1.User user = 1;\n}\n"
    );
    // A message no service of this port uses is still found by what defines it.
    let out = meshlb(
        &["describe", "--target", &target, "meshlb.admin.v1.Faults"],
        "",
    )
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).starts_with("message meshlb.admin.v1.Faults {"),
        "{}",
        text(&out.stdout)
    );
    let out = meshlb(&["describe", "--target", &target, "userguide.v1.Nope"], "").await;
    refused(&out, "unknown symbol userguide.v1.Nope");
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn without_reflection_a_proto_file_or_a_descriptor_set_gives_the_schema() {
    let a = without_reflection("plain-1").await;
    let target = ipv4_target(&[a.addr]);
    let data = r#"{"profile": {"name": "amy", "age": 24}}"#;

    let out = call(&target, GET_POINT, &["-d", data], "").await;
    refused(&out, "no reflection service");

    let out = call(&target, GET_POINT, &["--proto", PROTO, "-d", data], "").await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(lines(&out)[0], r#"{"point":{"value":"1000"}}"#);

    let dir = std::env::temp_dir().join(format!("meshlb-anycall-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let set = dir.join("userguide.protoset");
    std::fs::write(&set, meshlb::proto::FILE_DESCRIPTOR_SET).unwrap();
    let request = dir.join("request.json");
    std::fs::write(&request, data).unwrap();
    let out = call(
        &target,
        GET_POINT,
        &[
            "--protoset",
            set.to_str().unwrap(),
            "-d",
            &format!("@{}", request.display()),
        ],
        "",
    )
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(lines(&out)[0], r#"{"point":{"value":"1000"}}"#);

    // A load over the .proto, by any method: the same table as UserGuide's own.
    let report = load(
        &[
            "--target", &target, "--call", GET_POINT, "--proto", PROTO, "-d", data,
        ],
        50,
    )
    .await;
    assert_eq!(report["replicas"][0]["id"], "plain-1", "{report}");

    // A .proto that does not compile: protox's file, line and column.
    let bad = dir.join("bad.proto");
    std::fs::write(
        &bad,
        "syntax = \"proto3\";\nmessage M {\n  int32 x = ;\n}\n",
    )
    .unwrap();
    let out = call(&target, "M/X", &["--proto", bad.to_str().unwrap()], "").await;
    refused(&out, "bad.proto:3:");
    let _ = std::fs::remove_dir_all(&dir);
    a.stop().await;
}

#[tokio::test]
async fn the_replica_flag_turns_reflection_off() {
    let plain = Process::spawn("127.0.0.1", &["--no-reflection"]);
    let target = format!("ipv4:{}", plain.addr);
    refused(
        &meshlb(&["list", "--target", &target], "").await,
        "no reflection service",
    );
    let out = meshlb(&["list", "--target", &target, "--proto", PROTO], "").await;
    assert_eq!(
        lines(&out),
        ["userguide.v1.UserGuideService"],
        "{}",
        text(&out.stderr)
    );
    // A file needs no server, so no --target either; without a file, --target is named.
    let out = meshlb(&["list", "--proto", PROTO], "").await;
    assert_eq!(
        lines(&out),
        ["userguide.v1.UserGuideService"],
        "{}",
        text(&out.stderr)
    );
    refused(&meshlb(&["describe"], "").await, "--target");
}

#[tokio::test]
async fn the_admin_service_is_called_the_same_way_and_grouped_by_address() {
    let a = Replica::start("127.0.0.1", "adm-1", FaultConfig::default()).await;
    let b = Replica::start("127.0.0.1", "adm-2", FaultConfig::default()).await;
    let one = format!("ipv4:{}", a.admin);
    // uint64 in as a string, a double as a number; the previous knobs come back (all defaults:
    // an empty object).
    let out = call(
        &one,
        "meshlb.admin.v1.AdminService/SetFaults",
        &[
            "-d",
            r#"{"faults": {"latencyUs": "1500", "fail_rate": 0.25}}"#,
        ],
        "",
    )
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(lines(&out)[0], r#"{"previous":{}}"#);
    let out = call(&one, "meshlb.admin.v1.AdminService/GetFaults", &[], "").await;
    assert_eq!(
        lines(&out),
        [
            r#"{"faults":{"latencyUs":"1500","failRate":0.25},"serving":true}"#.to_owned(),
            format!("served by {}", a.admin)
        ]
    );

    // The admin listeners send no x-replica-id: the distribution is by address.
    let both = ipv4_target(&[a.admin, b.admin]);
    let report = load(
        &[
            "--target",
            &both,
            "--call",
            "meshlb.admin.v1.AdminService/GetFaults",
        ],
        200,
    )
    .await;
    let mut ids: Vec<String> = report["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_owned())
        .collect();
    ids.sort();
    let mut want = vec![a.admin.to_string(), b.admin.to_string()];
    want.sort();
    assert_eq!(ids, want, "{report}");
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn unknown_names_misfit_json_and_bad_flags_are_named() {
    let a = Replica::start("127.0.0.1", "err-1", FaultConfig::default()).await;
    let target = ipv4_target(&[a.addr]);
    let with = |method: &'static str, data: &'static str| {
        let target = target.clone();
        async move { call(&target, method, &["-d", data], "").await }
    };
    refused(
        &with("userguide.v1.UserGuideService/Nope", "{}").await,
        "unknown method Nope of userguide.v1.UserGuideService; there are: GetPoint, ListUsers",
    );
    refused(
        &with("userguide.v1.Nope/GetPoint", "{}").await,
        "unknown service userguide.v1.Nope; there are: userguide.v1.UserGuideService",
    );
    refused(
        &with(GET_POINT, r#"{"profile": {"age": "old"}}"#).await,
        "at profile.age",
    );
    refused(
        &with(GET_POINT, r#"{"profile": {"nickname": "x"}}"#).await,
        "nickname",
    );
    refused(&with(GET_POINT, "{").await, "not JSON");
    refused(&with("NoDots", "{}").await, "package.Service/Method");
    // Binary metadata in base64, as grpcurl takes it, goes through; bad base64 is named.
    let out = call(
        &target,
        GET_POINT,
        &[
            "-d",
            r#"{"profile": {"name": "james", "age": 26}}"#,
            "-H",
            "x-trace-bin: AAEC/w==",
        ],
        "",
    )
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = call(&target, GET_POINT, &["-H", "x-trace-bin: not base64!"], "").await;
    refused(&out, "bad header");
    let out = call(&target, GET_POINT, &["-H", "no colon"], "").await;
    refused(&out, "bad header");
    let out = call(&target, GET_POINT, &["-d", "@/nonexistent.json"], "").await;
    refused(&out, "/nonexistent.json");
    refused(
        &with(GET_POINT, "{}\n{}").await,
        "takes one request message, got 2",
    );
    let out = meshlb(&["list", "--target", &target, "-H", "no colon"], "").await;
    refused(&out, "bad header");
    // -d goes with --call; the UserGuide calls keep their own flags.
    let out = meshlb(&["client", "--target", &target, "-d", "{}"], "").await;
    refused(&out, "go with --call");
    a.stop().await;
}

#[tokio::test]
async fn an_older_server_with_only_v1alpha_reflection_is_understood() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(meshlb::proto::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .unwrap();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(reflection)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let target = format!("ipv4:{addr}");
    let out = meshlb(&["list", "--target", &target], "").await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        lines(&out).contains(&"userguide.v1.UserGuideService".to_owned()),
        "{}",
        text(&out.stdout)
    );
    let out = meshlb(&["describe", "--target", &target, LIST_USERS], "").await;
    assert_eq!(
        text(&out.stdout).trim(),
        "rpc ListUsers(userguide.v1.ListUsersRequest) returns (stream userguide.v1.ListUsersResponse);"
    );
    server.abort();
}

#[tokio::test]
async fn a_bidirectional_stream_takes_json_lines_and_prints_each_answer() {
    // The reflection service is itself a bidirectional stream: two requests, two answers.
    let a = Replica::start("127.0.0.1", "bidi-1", FaultConfig::default()).await;
    let dir = std::env::temp_dir().join(format!("meshlb-bidi-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let set = dir.join("reflection.protoset");
    std::fs::write(&set, tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET).unwrap();
    let out = call(
        &ipv4_target(&[a.addr]),
        "grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        &["--protoset", set.to_str().unwrap(), "-d", "@-"],
        "{\"listServices\": \"\"}\n{\"fileContainingSymbol\": \"userguide.v1.User\"}\n",
    )
    .await;
    let _ = std::fs::remove_dir_all(&dir);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let got = lines(&out);
    assert_eq!(got.len(), 3, "{got:?}");
    let first: serde_json::Value = serde_json::from_str(&got[0]).unwrap();
    assert_eq!(
        first["listServicesResponse"]["service"][0]["name"], "userguide.v1.UserGuideService",
        "{first}"
    );
    let second: serde_json::Value = serde_json::from_str(&got[1]).unwrap();
    assert!(
        second["fileDescriptorResponse"]["fileDescriptorProto"][0].is_string(),
        "bytes as base64: {second}"
    );
    assert!(got[2].starts_with("served by bidi-1"), "{got:?}");
    a.stop().await;
}
