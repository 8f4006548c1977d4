#!/usr/bin/env bash
# End-to-end benchmark: builds the release binary, starts the server on
# loopback, drives it with h2load over TLS (HTTP/1.1 and HTTP/2, keep-alive),
# measures the same listener answering a pre-built response (the floor),
# runs a soak for leaks, and prints one table. See BENCHMARKS.md.
#
#   bench/run.sh            # full run (~5 min on 2 cores, after the build)
#   QUICK=1 bench/run.sh    # shorter runs and a 100k soak, for a smoke test
#   ROUNDS=5 bench/run.sh   # more alternating ours/floor rounds (default 3)
#   BODY=FILE bench/run.sh  # send another review (default: the Istio pod, compact)
#
# Needs: the Rust toolchain, python3, and h2load (installed from Debian's
# nghttp2-client when missing; run as root or with sudo available).
set -euo pipefail
cd "$(dirname "$0")/.."

QUICK=${QUICK:-0}
CLIENTS=${CLIENTS:-16}
if [ "$QUICK" = 1 ]; then N=20000; RATE_SECS=10; SOAK=100000; else N=200000; RATE_SECS=30; SOAK=1000000; fi
PORT=${PORT:-18443}
METRICS_PORT=${METRICS_PORT:-19090}
URL="https://127.0.0.1:${PORT}/mutate?timeout=5s"
WORK=$(mktemp -d)
trap 'kill "${SERVER:-0}" 2>/dev/null || true; rm -rf "$WORK"' EXIT

if ! command -v h2load >/dev/null; then
  echo "== installing h2load (Debian nghttp2-client)"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq nghttp2-client >/dev/null
fi

echo "== building (release)"
cargo build --release --locked --quiet
BIN=target/release/canary-injector
# The Istio-injected pod review, compact as the apiserver sends it (the
# fixture is indented for people: 14.5 KB instead of 7 KB). BODY=FILE to
# send another review as is.
if [ -z "${BODY:-}" ]; then
  BODY="$WORK/istio-pod.review.json"
  python3 -c 'import json, sys; json.dump(json.load(open(sys.argv[1])), open(sys.argv[2], "w"), separators=(",", ":"))' \
    tests/fixtures/istio-pod.review.json "$BODY"
fi

start_server() {
  RUST_LOG=${RUST_LOG:-info} "$BIN" --log-format json serve \
    --listen "127.0.0.1:${PORT}" --metrics-listen "127.0.0.1:${METRICS_PORT}" \
    --dev-cert-dir "$WORK/certs" --shutdown-delay-seconds 0 "$@" 2>"$WORK/server.log" >/dev/null &
  SERVER=$!
  for _ in $(seq 100); do
    grep -q '"serving"' "$WORK/server.log" 2>/dev/null && return 0
    sleep 0.1
  done
  echo "server did not start"; cat "$WORK/server.log"; exit 1
}
stop_server() { kill "$SERVER"; wait "$SERVER" 2>/dev/null || true; }
rss_kib() { awk "/^$1:/ {print \$2}" "/proc/$SERVER/status"; }

# h2load with a per-request log; prints "req/s p50 p99 p99.9 failed" (ms).
load() {
  local name=$1; shift
  local log="$WORK/$name.log"
  h2load "$@" -d "$BODY" -H 'content-type: application/json' --log-file="$log" "$URL" \
    > "$WORK/$name.out" 2>&1 || { cat "$WORK/$name.out"; exit 1; }
  python3 - "$log" "$WORK/$name.out" <<'PY'
import re, sys
rows = [l.split("\t") for l in open(sys.argv[1]) if l.strip()]
lat = sorted(int(r[2]) / 1000.0 for r in rows)        # duration in us -> ms
bad = sum(1 for r in rows if r[1] != "200")
out = open(sys.argv[2]).read()
m = re.search(r"finished in ([\d.]+)(m?s), ([\d.]+) req/s", out)
def q(p): return lat[min(len(lat) - 1, int(p * len(lat)))]
print(f"{float(m.group(3)):.0f} {q(0.50):.3f} {q(0.99):.3f} {q(0.999):.3f} {bad}")
PY
}

# Server-side latency quantiles (upper bucket bounds, ms) from the
# admission_duration_seconds histogram, between two scrapes.
scrape() { python3 -c "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:${METRICS_PORT}/metrics').read().decode())" > "$1"; }
server_quantiles() {
  python3 - "$1" "$2" <<'PY'
import re, sys
def buckets(path):
    t = open(path).read()
    return {m.group(1): int(m.group(2)) for m in re.finditer(
        r'canary_injector_admission_duration_seconds_bucket\{kind="Pod",le="([^"]+)"\} (\d+)', t)}
a, b = buckets(sys.argv[1]), buckets(sys.argv[2])
rows = sorted(((float(k) if k != "+Inf" else float("inf")), b[k] - a.get(k, 0)) for k in b)
total = rows[-1][1]
out = []
for q in (0.5, 0.99, 0.999):
    le = next(le for le, c in rows if c >= q * total)
    out.append(f"p{q*100:g}<={le*1000:g}ms")
print(" ".join(out), f"(n={total})")
PY
}

# Fixed concurrency, ours and the floor alternating ROUNDS times (this VM's
# speed drifts by tens of percent within minutes; alternating spreads the
# drift over both). The table shows the median run of each.
declare -A RESULT RUNS
ROUNDS=${ROUNDS:-3}
median_run() { printf '%s\n' "${RUNS[$1]}" | sed '/^$/d' | sort -n | awk '{a[NR]=$0} END {print a[int((NR+1)/2)]}'; }
fixed() {
  local tag=$1
  RUNS["$tag h1"]+=$(load "$tag-h1" --h1 -n "$N" -c "$CLIENTS" -t 1)$'\n'
  RUNS["$tag h2"]+=$(load "$tag-h2" -n "$N" -c "$CLIENTS" -m 1 -t 1)$'\n'
}
# Fixed rate: 1,000 reviews/s (10 clients x 100/s) for RATE_SECS.
rate() {
  RESULT["$1 h1 @1000/s"]=$(load "$1-rate-h1" --h1 -c 10 --rps 100 -t 1 -D "$RATE_SECS")
  RESULT["$1 h2 @1000/s"]=$(load "$1-rate-h2" -c 10 --rps 100 -m 1 -t 1 -D "$RATE_SECS")
}

echo "== answer for the floor"
start_server
# The floor answers with exactly what the real server answers for BODY.
python3 - "$BODY" "$WORK/floor.json" "$URL" <<'PY'
import ssl, sys, urllib.request
req = urllib.request.Request(sys.argv[3], data=open(sys.argv[1], "rb").read(),
                             headers={"content-type": "application/json"})
body = urllib.request.urlopen(req, context=ssl._create_unverified_context()).read()
open(sys.argv[2], "wb").write(body)
PY
stop_server

for round in $(seq "$ROUNDS"); do
  echo "== round $round/$ROUNDS: canary-injector, then the floor (same listener and TLS, pre-built response)"
  start_server
  fixed ours
  hwm=$(rss_kib VmHWM); [ "$hwm" -gt "${PEAK_RSS:-0}" ] && PEAK_RSS=$hwm
  stop_server
  start_server --bench-floor-response "$WORK/floor.json"
  fixed floor
  stop_server
done
for key in "ours h1" "ours h2" "floor h1" "floor h2"; do RESULT["$key"]=$(median_run "$key"); done

echo "== 1,000 reviews/s"
start_server
scrape "$WORK/m0"
rate ours
scrape "$WORK/m2"
SERVER_Q=$(server_quantiles "$WORK/m0" "$WORK/m2")
stop_server
start_server --bench-floor-response "$WORK/floor.json"
rate floor
stop_server

echo "== soak: $SOAK reviews, RSS every 10%"
start_server
SOAK_RSS=()
STEP=$((SOAK / 10))
for i in $(seq 10); do
  h2load -n "$STEP" -c "$CLIENTS" -m 1 -t 1 -d "$BODY" -H 'content-type: application/json' "$URL" \
    > "$WORK/soak.out" 2>&1
  grep -q " 0 failed, 0 errored" "$WORK/soak.out" || { cat "$WORK/soak.out"; exit 1; }
  SOAK_RSS+=("$(rss_kib VmRSS)")
done
SOAK_HWM=$(rss_kib VmHWM)
stop_server

printf '\n%-22s %10s %9s %9s %9s %7s %9s\n' run "req/s" "p50 ms" "p99 ms" "p99.9 ms" failed "vs floor"
for key in "ours h1" "ours h2" "floor h1" "floor h2" "ours h1 @1000/s" "floor h1 @1000/s" "ours h2 @1000/s" "floor h2 @1000/s"; do
  read -r rps p50 p99 p999 bad <<<"${RESULT[$key]}"
  ratio="-"
  case "$key" in
    "ours h1") ratio=$(python3 -c "print(f'{$rps / $(echo "${RESULT["floor h1"]}" | cut -d" " -f1):.2f}')") ;;
    "ours h2") ratio=$(python3 -c "print(f'{$rps / $(echo "${RESULT["floor h2"]}" | cut -d" " -f1):.2f}')") ;;
  esac
  printf '%-22s %10s %9s %9s %9s %7s %9s\n' "$key" "$rps" "$p50" "$p99" "$p999" "$bad" "$ratio"
done
for key in "ours h1" "ours h2" "floor h1" "floor h2"; do
  printf 'all rounds, %s req/s: %s\n' "$key" "$(printf '%s\n' "${RUNS[$key]}" | sed '/^$/d' | cut -d' ' -f1 | paste -sd' ')"
done
printf 'server-side latency at 1000/s, h1 and h2 (admission_duration_seconds): %s\n' "$SERVER_Q"
printf 'peak RSS under load: %s KiB\n' "$PEAK_RSS"
printf 'soak RSS (KiB) after each %s reviews: %s\n' "$STEP" "${SOAK_RSS[*]}"
printf 'soak peak RSS: %s KiB\n' "$SOAK_HWM"
