#!/usr/bin/env bash
# Server CPU time per review, whole process: utime + stime of the server from
# /proc/PID/stat before and after each h2load run, divided by the reviews it
# answered. Counts everything the process does for a review (TLS, HTTP/1.1 or
# HTTP/2 framing, timers, limits, the review, metrics, the log line), and not
# the load generator sharing the machine, so it is steadier than req/s on a
# busy VM. With BASELINE the binaries alternate round by round (who runs
# first rotates every round) and one table compares them. See
# BENCHMARKS.md.
#
#   bench/cpu.sh                            # the work tree (release build)
#   BASELINE=/path/to/old bench/cpu.sh      # before/after: work tree vs old
#   BIN=/path/to/new BASELINE=/path/to/old bench/cpu.sh   # two given binaries
#   BASELINE="/path/a /path/b" bench/cpu.sh  # several baselines, one table
#   ROUNDS=7 N=40000 CLIENTS=16 bench/cpu.sh
#   BODY=FILE bench/cpu.sh                  # another review, sent as is
#
# Each round starts every binary afresh (RUST_LOG=info, JSON log lines to a
# file, development certificate), sends WARMUP reviews, then N reviews over
# HTTP/1.1 and N over HTTP/2 (h2load, TLS, CLIENTS keep-alive connections,
# one request in flight each). The body is the Istio-injected pod review made
# compact, as the apiserver sends it (as bench/run.sh). Prints the median of
# the rounds and every round. The kernel counts CPU time in ticks of
# 1/CLK_TCK s (10 ms): with the defaults a round is 100-300 ticks.
#
# Needs: python3 and h2load (installed from Debian's nghttp2-client when
# missing; run as root or with sudo available); the Rust toolchain unless
# BIN is given.
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-5}
N=${N:-40000}
WARMUP=${WARMUP:-2000}
CLIENTS=${CLIENTS:-16}
PORT=${PORT:-18643}
METRICS_PORT=${METRICS_PORT:-19290}
URL="https://127.0.0.1:${PORT}/mutate?timeout=5s"
WORK=$(mktemp -d)
trap 'kill "${SERVER:-0}" 2>/dev/null || true; rm -rf "$WORK"' EXIT

if ! command -v h2load >/dev/null; then
  echo "== installing h2load (Debian nghttp2-client)"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq nghttp2-client >/dev/null
fi

if [ -z "${BIN:-}" ]; then
  echo "== building (release)"
  cargo build --release --locked --quiet
  BIN=target/release/canary-injector
fi
BINS=("$BIN")
NAMES=(bin)
read -r -a BASES <<<"${BASELINE:-}"
for i in "${!BASES[@]}"; do
  BINS+=("${BASES[$i]}")
  if [ "${#BASES[@]}" = 1 ]; then NAMES+=(baseline); else NAMES+=("baseline$((i + 1))"); fi
done
for b in "${BINS[@]}"; do [ -x "$b" ] || { echo "not an executable: $b"; exit 2; }; done

if [ -z "${BODY:-}" ]; then
  BODY="$WORK/istio-pod.review.json"
  python3 -c 'import json, sys; json.dump(json.load(open(sys.argv[1])), open(sys.argv[2], "w"), separators=(",", ":"))' \
    tests/fixtures/istio-pod.review.json "$BODY"
fi
TICK=$(getconf CLK_TCK)

start_server() { # BINARY NAME
  RUST_LOG=info "$1" --log-format json serve \
    --listen "127.0.0.1:${PORT}" --metrics-listen "127.0.0.1:${METRICS_PORT}" \
    --dev-cert-dir "$WORK/certs-$2" --shutdown-delay-seconds 0 \
    2>"$WORK/server.log" >/dev/null &
  SERVER=$!
  for _ in $(seq 100); do
    grep -q '"serving"' "$WORK/server.log" 2>/dev/null && return 0
    sleep 0.1
  done
  echo "$1 did not start (port ${PORT} or ${METRICS_PORT} in use? set PORT/METRICS_PORT)"
  cat "$WORK/server.log"; exit 1
}
stop_server() { kill "$SERVER"; wait "$SERVER" 2>/dev/null || true; rm -f "$WORK/server.log"; }
# utime + stime of the whole process (every thread, live or exited), in
# ticks; the fields after the parenthesised command name.
cpu_ticks() { sed 's/.*) //' "/proc/$SERVER/stat" | awk '{print $12 + $13}'; }

# h2load PROTOCOL_FLAGS...: runs N reviews, fails unless all got 2xx;
# prints "us/review req/s".
measure() {
  local before after out
  before=$(cpu_ticks)
  out=$(h2load "$@" -n "$N" -c "$CLIENTS" -t 1 -d "$BODY" -H 'content-type: application/json' "$URL" 2>&1) \
    || { echo "$out" >&2; exit 1; }
  after=$(cpu_ticks)
  grep -q "status codes: $N 2xx" <<<"$out" || { echo "$out" >&2; exit 1; }
  python3 - "$before" "$after" "$TICK" "$N" "$out" <<'PY'
import re, sys
before, after, tick, n = (int(x) for x in sys.argv[1:5])
rps = float(re.search(r"finished in [\d.]+m?s, ([\d.]+) req/s", sys.argv[5]).group(1))
print(f"{(after - before) / tick * 1e6 / n:.1f} {rps:.0f}")
PY
}

declare -A RUNS
for round in $(seq "$ROUNDS"); do
  # Rotate who goes first every round, so drift in the machine's speed
  # lands on all.
  order=()
  for k in "${!BINS[@]}"; do order+=($(( (k + round - 1) % ${#BINS[@]} ))); done
  for i in "${order[@]}"; do
    name=${NAMES[$i]}
    echo "== round $round/$ROUNDS: $name (${BINS[$i]})"
    start_server "${BINS[$i]}" "$name"
    h2load --h1 -n "$WARMUP" -c "$CLIENTS" -t 1 -d "$BODY" -H 'content-type: application/json' "$URL" >/dev/null
    RUNS["$name h1"]+="$(measure --h1)"$'\n'
    RUNS["$name h2"]+="$(measure -m 1)"$'\n'
    stop_server
  done
done

median() { sed '/^$/d' | sort -n | awk '{a[NR]=$0} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }
col() { printf '%s' "${RUNS[$1]}" | sed '/^$/d' | cut -d' ' -f"$2"; }
printf '\n%-10s %-5s %14s %10s   %s\n' binary proto "us/review" "req/s" "us/review of every round, in order"
for name in "${NAMES[@]}"; do
  for proto in h1 h2; do
    key="$name $proto"
    printf '%-10s %-5s %14s %10s   %s\n' "$name" "$proto" \
      "$(col "$key" 1 | median)" "$(col "$key" 2 | median)" "$(col "$key" 1 | paste -sd' ')"
  done
done
# Also per round: the runs of a round are minutes closer than the rounds
# are to each other, so their ratio drifts less than either.
for base in "${NAMES[@]:1}"; do
  for proto in h1 h2; do
    python3 - "$proto" "$base" "$(col "bin $proto" 1 | paste -sd' ')" "$(col "$base $proto" 1 | paste -sd' ')" <<'PY'
import statistics, sys
proto, base = sys.argv[1], sys.argv[2]
a, b = [float(x) for x in sys.argv[3].split()], [float(x) for x in sys.argv[4].split()]
pct = lambda x, y: 100 * (x - y) / y
rounds = [pct(x, y) for x, y in zip(a, b)]
print(f"{proto}: bin vs {base} {pct(statistics.median(a), statistics.median(b)):+.1f}% CPU per review (medians); "
      f"per round {statistics.median(rounds):+.1f}% (median of {' '.join(f'{r:+.0f}' for r in rounds)})")
PY
  done
done
for i in "${!BINS[@]}"; do printf '%s: %s\n' "${NAMES[$i]}" "${BINS[$i]}"; done
printf '%s rounds of %s reviews per protocol, %s clients, body %s bytes\n' "$ROUNDS" "$N" "$CLIENTS" "$(wc -c <"$BODY")"
