"""CI check: the Python client's trace continues in a real meshlb replica.

Starts an OTLP receiver (the collector's TraceService, from opentelemetry-proto), a `meshlb replica`
exporting to it, and the instrumented Python client exporting to it too; then asserts that the
replica's GetPoint server span has the Python client span's trace id and that span as its parent.

    python check_trace.py path/to/meshlb
"""

import os
import subprocess
import sys
import threading
import time
from concurrent import futures

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

import client

SPANS = []
LOCK = threading.Lock()


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    def Export(self, request, context):
        with LOCK:
            for rs in request.resource_spans:
                service = next((a.value.string_value for a in rs.resource.attributes
                                if a.key == "service.name"), "")
                for ss in rs.scope_spans:
                    for span in ss.spans:
                        SPANS.append((service, span))
        return trace_service_pb2.ExportTraceServiceResponse()


def main(meshlb):
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Receiver(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = dict(os.environ, OTEL_EXPORTER_OTLP_ENDPOINT=endpoint, OTEL_SERVICE_NAME="replica",
               OTEL_BSP_SCHEDULE_DELAY="100", RUST_LOG="warn")
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
    replica = subprocess.Popen([meshlb, "replica", "--listen", "127.0.0.1:0", "--id", "py-target",
                                "--data", os.path.join(root, "replicas", "users.json")],
                               env=env, stdout=subprocess.PIPE, text=True)
    try:
        line = replica.stdout.readline().strip()
        assert line.startswith("listening on "), line
        target = line[len("listening on "):]

        os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = endpoint
        os.environ["OTEL_SERVICE_NAME"] = "python-client"
        provider = client.setup_tracing()
        points, users, replica_id = client.run(target)
        provider.shutdown()
        assert points == 1000, points
        assert users == ["james", "amy", "robert"], users
        assert replica_id == "py-target", replica_id

        deadline = time.time() + 20
        while time.time() < deadline:
            with LOCK:
                py = [s for svc, s in SPANS if svc == "python-client" and s.name.endswith("GetPoint")]
                rs = [s for svc, s in SPANS if svc == "replica" and s.name.endswith("GetPoint")]
            if py and rs:
                break
            time.sleep(0.1)
        assert py, "no span from the Python client"
        assert rs, "no server span from the replica"
        py_span, server_span = py[0], rs[0]
        assert server_span.trace_id == py_span.trace_id, "the replica did not continue the trace"
        assert server_span.parent_span_id == py_span.span_id, "the parent is not the Python span"
        print(f"ok: trace {py_span.trace_id.hex()} continues from the Python client "
              f"(span {py_span.span_id.hex()}) into the replica (span {server_span.span_id.hex()})")
    finally:
        replica.terminate()
        replica.wait(timeout=30)
        server.stop(None)


if __name__ == "__main__":
    main(sys.argv[1])
