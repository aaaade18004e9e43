#!/usr/bin/env bash
# Instructions per call of `meshlb client`, counted by callgrind, three ways: tracing off, 1 %
# sampled, every call sampled. Calls/s on a shared 2-core machine moves 5-10 % between runs of
# the same binary; these counts repeat to 0.1 %, so they are the figure to compare two commits by
# (BENCHMARKS.md, "by instructions").
#
# Usage: scripts/instructions.sh [CALLS]   (default 5000; needs valgrind: apt-get install valgrind)
#
# Three replicas with no injected latency (`meshlb up`), the OTLP receiver of
# examples/otlp_sink.rs in a process of its own, and the client under valgrind against them.
# The client's instructions include its exporter thread, not the replicas' or the receiver's.
# Then the same three clients, outside valgrind, against one replica inside it: one that exports
# nothing (as the bench's replicas), then one that exports to the same receiver (parent-based,
# the default: it samples what its caller sampled, and every call of a caller that sends no
# `traceparent`). What the caller's tracing costs the replica, start-up and drain included.
set -euo pipefail
calls=${1:-5000}
cd "$(dirname "$0")/.."
command -v valgrind >/dev/null || { echo "valgrind is not installed (apt-get install valgrind)" >&2; exit 2; }
cargo build --release --quiet --bin meshlb --example otlp_sink
meshlb=target/release/meshlb
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

cat > "$work/fleet.toml" <<TOML
[fleet]
host = "127.0.0.1"
base_port = 0
[[replica]]
id = "users-1"
[[replica]]
id = "users-2"
[[replica]]
id = "users-3"
TOML
"$meshlb" up --fleet "$work/fleet.toml" > "$work/up.out" 2> "$work/up.err" &
pids+=($!)
sink="127.0.0.1:$(free_port)"
target/release/examples/otlp_sink "$sink" > "$work/sink.out" 2>&1 &
pids+=($!)

target=""
for _ in $(seq 300); do
    target=$(sed -n 's/^target: //p' "$work/up.out")
    [ -n "$target" ] && break
    sleep 0.1
done
[ -n "$target" ] || { echo "the fleet did not come up:" >&2; cat "$work/up.err" >&2; exit 1; }

# One run; prints the instructions callgrind collected.
count() {
    env "$@" valgrind --tool=callgrind --callgrind-out-file="$work/cg.out" \
        "$meshlb" client --target "$target" --requests "$calls" --format json \
        > "$work/client.json" 2> "$work/valgrind.err" \
        || { echo "the client failed:" >&2; cat "$work/valgrind.err" >&2; exit 1; }
    sed -n 's/.*Collected : \([0-9]*\).*/\1/p' "$work/valgrind.err"
}

off=$(count -u OTEL_EXPORTER_OTLP_ENDPOINT)
pct=$(count OTEL_EXPORTER_OTLP_ENDPOINT="http://$sink" OTEL_TRACES_SAMPLER=traceidratio OTEL_TRACES_SAMPLER_ARG=0.01)
every=$(count OTEL_EXPORTER_OTLP_ENDPOINT="http://$sink" OTEL_TRACES_SAMPLER=always_on)

echo "$(git rev-parse --short HEAD), $calls calls, instructions per call:"
for row in "tracing off:$off" "1 % sampled:$pct" "every call sampled:$every"; do
    name=${row%%:*}; n=${row##*:}
    awk -v name="$name" -v n="$n" -v off="$off" -v calls="$calls" 'BEGIN {
        printf "  %-20s %7.1fk  (%+.1fk, %.2fx of off by instructions)\n",
            name, n / calls / 1000, (n - off) / calls / 1000, off / n }'
done

# One run against a replica of its own under callgrind, in the environment `$replica_env`
# sets; prints the replica's instructions.
replica_count() {
    env $replica_env valgrind --tool=callgrind \
        --callgrind-out-file="$work/replica.cg.out" \
        "$meshlb" replica --listen 127.0.0.1:0 --drain-grace 0s --id counted \
        > "$work/replica.out" 2> "$work/replica.err" &
    local replica=$! addr=""
    for _ in $(seq 600); do
        addr=$(sed -n 's/^listening on //p' "$work/replica.out")
        [ -n "$addr" ] && break
        sleep 0.1
    done
    # `exit` here leaves only the `$(...)` this runs in, whose trap is not the script's.
    [ -n "$addr" ] || { echo "the replica did not start:" >&2; cat "$work/replica.err" >&2; kill "$replica"; exit 1; }
    env "$@" "$meshlb" client --target "$addr" --requests "$calls" --format json \
        > "$work/client.json" 2> "$work/client.err" \
        || { echo "the client failed:" >&2; cat "$work/client.err" >&2; kill "$replica"; exit 1; }
    kill -TERM "$replica"
    wait "$replica" || true
    sed -n 's/.*Collected : \([0-9]*\).*/\1/p' "$work/replica.err"
}

replica_rows() {
    local off pct every
    off=$(replica_count -u OTEL_EXPORTER_OTLP_ENDPOINT)
    pct=$(replica_count OTEL_EXPORTER_OTLP_ENDPOINT="http://$sink" OTEL_TRACES_SAMPLER=traceidratio OTEL_TRACES_SAMPLER_ARG=0.01)
    every=$(replica_count OTEL_EXPORTER_OTLP_ENDPOINT="http://$sink" OTEL_TRACES_SAMPLER=always_on)
    for row in "tracing off:$off" "1 % sampled:$pct" "every call sampled:$every"; do
        name=${row%%:*}; n=${row##*:}
        awk -v name="$name" -v n="$n" -v off="$off" -v calls="$calls" 'BEGIN {
            printf "  %-20s %7.1fk  (%+.1fk)\n", name, n / calls / 1000, (n - off) / calls / 1000 }'
    done
}

echo "one replica that exports nothing, instructions per call, as the client traces:"
replica_env="-u OTEL_EXPORTER_OTLP_ENDPOINT" replica_rows
echo "one replica that exports, instructions per call, as the client traces:"
replica_env="OTEL_EXPORTER_OTLP_ENDPOINT=http://$sink" replica_rows
