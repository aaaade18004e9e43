#!/usr/bin/env python3
"""A real Prometheus scrapes a real fleet and a real client, and agrees with the client's report.

Usage: check.py MESHLB_BINARY [PROMETHEUS_BINARY]

Starts `meshlb up --replicas 2` and `meshlb client --metrics-listen`, writes a scrape config for
their metrics listeners, starts Prometheus (Debian's package; `.ci/run` installs it), then asks
Prometheus' HTTP API (/api/v1/query) for the per-replica call rate, the endpoint states and the
call counts, and compares them with what the client reports (its JSON) and with each other.
Exits 0 when everything agrees; prints what did not and exits 1 otherwise.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request

LOAD_SECONDS = 24
RATE = 200


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def query(base, expr):
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=10) as r:
        body = json.load(r)
    if body.get("status") != "success":
        raise RuntimeError(f"{expr}: {body}")
    return body["data"]["result"]


def by_label(result, label):
    return {s["metric"].get(label, ""): float(s["value"][1]) for s in result}


def wait_for(what, check, timeout=30.0):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.25)


def main():
    meshlb = os.path.abspath(sys.argv[1])
    prometheus = sys.argv[2] if len(sys.argv) > 2 else shutil.which("prometheus")
    if not prometheus:
        print("prometheus is not installed (apt-get install prometheus)", file=sys.stderr)
        return 1
    work = tempfile.mkdtemp(prefix="meshlb-prometheus-")
    env = dict(os.environ, RUST_LOG="warn")
    procs = []
    failures = []
    try:
        up = subprocess.Popen([meshlb, "up", "--replicas", "2", "--base-port", "0"],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
        procs.append(up)
        replicas = {}
        target = None
        for line in up.stdout:
            if "SERVING" in line:
                words = line.split()
                metrics = next(w.split("=", 1)[1] for w in words if w.startswith("metrics="))
                replicas[words[0]] = {"addr": words[1], "metrics": metrics}
            if line.startswith("target: "):
                target = line.split()[1]
            if line.startswith("try:"):
                break
        assert target and len(replicas) == 2, (target, replicas)

        client_metrics = f"127.0.0.1:{free_port()}"
        client = subprocess.Popen(
            [meshlb, "client", "--target", target, "--rate", str(RATE),
             "--duration", f"{LOAD_SECONDS}s", "--format", "json",
             "--metrics-listen", client_metrics],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        procs.append(client)

        config = os.path.join(work, "prometheus.yml")
        with open(config, "w") as f:
            f.write("global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n")
            f.write("  - job_name: replicas\n    static_configs:\n")
            for rid, r in replicas.items():
                f.write(f"      - targets: ['{r['metrics']}']\n        labels: {{pod: {rid}}}\n")
            f.write(f"  - job_name: client\n    static_configs:\n      - targets: ['{client_metrics}']\n")
        web = f"127.0.0.1:{free_port()}"
        prom = subprocess.Popen(
            [prometheus, f"--config.file={config}", f"--storage.tsdb.path={work}/data",
             f"--web.listen-address={web}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(prom)
        base = f"http://{web}"

        # Every target up, then enough samples for a rate over 10 s.
        def all_up():
            try:
                return len([s for s in query(base, "up") if s["value"][1] == "1"]) == 3
            except OSError:
                return False  # Prometheus is still starting
        wait_for("Prometheus to scrape all three targets", all_up)
        time.sleep(12)

        # While the load runs: the balancer has both endpoints, each in exactly one state, and at
        # least one ready (on a loaded machine one may be out as a latency outlier for a while).
        states = by_label(query(base, 'sum by (endpoint) (meshlb_endpoint_state)'), "endpoint")
        ready = by_label(query(base, 'meshlb_endpoint_state{state="ready"} == 1'), "endpoint")
        expected = {r["addr"] for r in replicas.values()}
        if set(states) != expected or any(v != 1.0 for v in states.values()) or not ready:
            failures.append(f"endpoint states: {states} (ready: {ready}), expected one state each for {expected}")
        # ...and the per-replica call rate, as the replicas count it and as the client does,
        # adds up to the offered rate and agrees between the two sides.
        server = by_label(query(base, 'sum by (pod) (rate(grpc_server_handled_total{grpc_method="GetPoint"}[10s]))'), "pod")
        client_side = by_label(query(base, 'sum by (endpoint) (rate(meshlb_endpoint_calls_total[10s]))'), "endpoint")
        total = sum(server.values())
        if not (0.8 * RATE <= total <= 1.2 * RATE):
            failures.append(f"replicas' call rate {total:.1f}/s, offered {RATE}/s")
        # The two sides are scraped up to a scrape interval apart, and p2c moves calls between
        # replicas from second to second: the smaller share's rate can differ by more than 15 % of
        # itself while both count the same calls (the exact counts are compared after the run).
        for rid, r in replicas.items():
            s, c = server.get(rid, 0.0), client_side.get(r["addr"], 0.0)
            if abs(s - c) > max(0.15 * max(s, c, 1.0), 0.1 * total):
                failures.append(f"{rid}: {s:.1f}/s counted by the replica, {c:.1f}/s by the client")

        out, err = client.communicate(timeout=LOAD_SECONDS + 30)
        if client.returncode != 0:
            failures.append(f"client exited {client.returncode}: {err}")
        report = json.loads(out)
        # After the run: what the replicas counted (they still run) is what the client reports.
        time.sleep(2)
        handled = by_label(query(base, 'sum by (pod) (grpc_server_handled_total{grpc_method="GetPoint",grpc_code="OK"})'), "pod")
        # An ejected replica's probes are copies of calls that no caller waits for: the replica
        # answered them, the report does not count them. At most one more than the last scrape
        # saw (a probe waits at least a second for the next).
        probes = by_label(query(base, 'last_over_time(meshlb_endpoint_probes_total[5m])'), "endpoint")
        for row in report["replicas"]:
            got = handled.get(row["id"])
            extra = probes.get(row["addr"], 0.0) + 1
            if got is None or not (row["calls"] <= got <= row["calls"] + extra):
                failures.append(f"{row['id']}: Prometheus has {got} calls, the client reports {row['calls']} (and {extra - 1:.0f} probes)")
        # The client's last scrape is at most a scrape interval before it ended.
        last = sum(by_label(query(base, 'last_over_time(grpc_client_handled_total{grpc_code="OK"}[5m])'), "grpc_method").values())
        if not (report["ok"] - 3 * RATE <= last <= report["ok"]):
            failures.append(f"the client's last scraped count {last}, its report {report['ok']}")
        print(f"prometheus: {len(replicas)} replicas and a client scraped; rates {server}, "
              f"report {[(r['id'], r['calls']) for r in report['replicas']]}, client total {last:.0f}/{report['ok']}")
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    p.kill()
        shutil.rmtree(work, ignore_errors=True)
    for f in failures:
        print("FAIL:", f, file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
