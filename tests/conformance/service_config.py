#!/usr/bin/env python3
"""Conformance with a peer nobody here wrote: the same gRPC service config, fed to a grpcio
(grpc-core) client and to meshlb, gives the same verdicts against one real replica that fails 30 %
of calls with UNAVAILABLE (`--fail-rate 0.3`).

Usage: service_config.py MESHLB_BINARY   (run from anywhere; needs grpcio and grpcio-tools)

1. With replicas/service-config.json (GetPoint retried on UNAVAILABLE, 3 attempts): both finish
   with (about) no failed call.
2. With the same config minus its retryPolicy: both see about 30 % of calls fail.
3. Non-retryable codes are not retried by either: calls for a user who does not exist end in
   NOT_FOUND, and the replica's own metrics count exactly one NOT_FOUND answer per call.
Exits 0 when both clients agree on every verdict; prints the figures either way.
"""

import json
import os
import subprocess
import sys
import tempfile
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..", "..")
CALLS = 300
MISSING_CALLS = 20


def not_found_answers(metrics_addr):
    with urllib.request.urlopen(f"http://{metrics_addr}/metrics", timeout=10) as r:
        text = r.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith("grpc_server_handled_total{") and 'grpc_method="GetPoint"' in line \
                and 'grpc_code="NotFound"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def grpcio_run(pb2, pb2_grpc, addr, config, name, age, calls):
    import grpc
    options = [("grpc.enable_retries", 1), ("grpc.service_config", json.dumps(config))]
    failed = not_found = 0
    with grpc.insecure_channel(addr, options=options) as channel:
        stub = pb2_grpc.UserGuideServiceStub(channel)
        for _ in range(calls):
            try:
                stub.GetPoint(pb2.GetPointRequest(profile=pb2.Profile(name=name, age=age)), timeout=10)
            except grpc.RpcError as e:
                failed += 1
                not_found += e.code() == grpc.StatusCode.NOT_FOUND
    return failed, not_found


def meshlb_run(meshlb, addr, config_path, calls):
    out = subprocess.run([meshlb, "client", "--target", f"ipv4:{addr}", "--requests", str(calls),
                          "--concurrency", "1", "--format", "json", "--service-config", config_path],
                         capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, RUST_LOG="error"))
    report = json.loads(out.stdout)
    return report["calls"] - report["ok"]


def meshlb_missing(meshlb, addr, config_path, calls):
    failed = 0
    for _ in range(calls):
        out = subprocess.run([meshlb, "call", "--target", f"ipv4:{addr}", "--service-config", config_path,
                              "get-point", "--name", "nobody", "--age", "1"],
                             capture_output=True, text=True, timeout=30,
                             env=dict(os.environ, RUST_LOG="error"))
        if "NOT_FOUND" in out.stderr:
            failed += 1
    return failed


def main():
    meshlb = os.path.abspath(sys.argv[1])
    # The stubs come from proto/ as the talk's Python client makes them.
    sys.path.insert(0, os.path.join(ROOT, "examples", "python"))
    from client import load_stubs  # noqa: E402
    pb2, pb2_grpc = load_stubs()
    with open(os.path.join(ROOT, "replicas", "service-config.json")) as f:
        with_retries = json.load(f)
    without_retries = json.loads(json.dumps(with_retries))
    for method in without_retries["methodConfig"]:
        method.pop("retryPolicy", None)
    work = tempfile.mkdtemp(prefix="meshlb-conformance-")
    paths = {}
    for label, config in [("with", with_retries), ("without", without_retries)]:
        paths[label] = os.path.join(work, f"{label}.json")
        with open(paths[label], "w") as f:
            json.dump(config, f)

    replica = subprocess.Popen([meshlb, "replica", "--listen", "127.0.0.1:0", "--fail-rate", "0.3",
                                "--metrics-listen", "127.0.0.1:0", "--id", "flaky"],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        addr = replica.stdout.readline().split()[-1]
        replica.stdout.readline()
        metrics = replica.stdout.readline().split()[-1]
        results = {}
        for label, config in [("with", with_retries), ("without", without_retries)]:
            results[("grpcio", label)] = grpcio_run(pb2, pb2_grpc, addr, config, "james", 26, CALLS)[0] / CALLS
            results[("meshlb", label)] = meshlb_run(meshlb, addr, paths[label], CALLS) / CALLS
        before = not_found_answers(metrics)
        _, grpcio_missing = grpcio_run(pb2, pb2_grpc, addr, with_retries, "nobody", 1, MISSING_CALLS)
        after_grpcio = not_found_answers(metrics)
        meshlb_nf = meshlb_missing(meshlb, addr, paths["with"], MISSING_CALLS)
        after_meshlb = not_found_answers(metrics)
    finally:
        replica.terminate()
        replica.wait(timeout=30)

    failures = []
    for client in ["grpcio", "meshlb"]:
        w, wo = results[(client, "with")], results[(client, "without")]
        print(f"{client}: {w:.1%} failed with the retry policy, {wo:.1%} without")
        # 30 % x 30 % x 30 % = 2.7 % fail all three attempts.
        if w > 0.08:
            failures.append(f"{client} with the retry policy: {w:.1%} failed (expected ~3 %)")
        if not 0.18 <= wo <= 0.42:
            failures.append(f"{client} without it: {wo:.1%} failed (expected ~30 %)")
    grpcio_answers = after_grpcio - before
    meshlb_answers = after_meshlb - after_grpcio
    print(f"NOT_FOUND: grpcio {grpcio_missing} of {MISSING_CALLS} calls ended NOT_FOUND, the replica answered "
          f"NOT_FOUND {grpcio_answers:.0f} times; meshlb {meshlb_nf} calls, {meshlb_answers:.0f} answers")
    # A call for the missing user ends in NOT_FOUND (an injected UNAVAILABLE before it is
    # retried; rarely, three UNAVAILABLEs), and each such call was answered NOT_FOUND exactly
    # once: NOT_FOUND is never retried.
    for client, calls, answers in [("grpcio", grpcio_missing, grpcio_answers), ("meshlb", meshlb_nf, meshlb_answers)]:
        if calls != answers or calls < MISSING_CALLS * 0.75:
            failures.append(f"{client}: {calls} calls ended NOT_FOUND, the replica answered NOT_FOUND {answers:.0f} times")
    for f in failures:
        print("FAIL:", f, file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
