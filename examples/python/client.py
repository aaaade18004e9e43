"""The talk's Python client, in the mesh: GetPoint and ListUsers on a meshlb replica, traced with
OpenTelemetry's gRPC instrumentation so its spans and the replica's land in one trace.

    python -m venv .venv && .venv/bin/pip install -r requirements.txt
    OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:4317 .venv/bin/python client.py 127.0.0.1:50051
"""

import os
import sys
import tempfile

import grpc
from grpc_tools import protoc
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.instrumentation.grpc import GrpcInstrumentorClient
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

PROTO_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "proto")


def load_stubs():
    """Generates the UserGuide stubs from proto/ (grpcio-tools) into a temporary directory."""
    out = tempfile.mkdtemp(prefix="meshlb-stubs-")
    rc = protoc.main(["protoc", f"-I{PROTO_ROOT}", f"--python_out={out}",
                      f"--grpc_python_out={out}", "userguide/v1/userguide.proto"])
    if rc != 0:
        sys.exit(f"protoc failed with {rc}")
    sys.path.insert(0, out)
    from userguide.v1 import userguide_pb2, userguide_pb2_grpc  # noqa: E402
    return userguide_pb2, userguide_pb2_grpc


def setup_tracing():
    provider = TracerProvider(resource=Resource.create({"service.name": os.environ.get(
        "OTEL_SERVICE_NAME", "python-client")}))
    if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(insecure=True)))
    trace.set_tracer_provider(provider)
    GrpcInstrumentorClient().instrument()
    return provider


def run(target):
    """Calls GetPoint and ListUsers; returns (points, users, replica id)."""
    pb, pb_grpc = load_stubs()
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.UserGuideServiceStub(channel)
        answer, call = stub.GetPoint.with_call(
            pb.GetPointRequest(profile=pb.Profile(name="james", age=26)))
        replica = dict(call.initial_metadata()).get("x-replica-id", "?")
        users = [u.user.profile.name for u in stub.ListUsers(
            pb.ListUsersRequest(point=pb.Point(value=1000)))]
    return answer.point.value, users, replica


if __name__ == "__main__":
    provider = setup_tracing()
    points, users, replica = run(sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:50051")
    print(f"james 26 has {points} points (served by {replica})")
    print(f"users with 1000 points: {', '.join(users)}")
    provider.shutdown()
