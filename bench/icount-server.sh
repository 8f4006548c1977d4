#!/usr/bin/env bash
# Instructions per review of the whole server (callgrind): `serve` runs under
# valgrind and h2load sends it the compact Istio pod review over TLS, HTTP/1.1
# then HTTP/2 (16 keep-alive connections). The counters are zeroed and dumped
# around two runs of each protocol, N1 and N2 reviews, each on new
# connections, so (dump(N2) - dump(N1)) / (N2 - N1) is what one more review
# costs: TLS records, HTTP framing, timers, limits, the review, metrics and
# the log line, without the handshakes and start-up. It repeats exactly for
# the same binary whatever else the machine does, which CPU time on this VM
# does not (bench/cpu.sh). Counts user space only: the kernel's share
# (loopback TCP) is in bench/cpu.sh. See BENCHMARKS.md.
#
#   bench/icount-server.sh                        # the work tree (release build)
#   BIN=/path/to/binary bench/icount-server.sh    # another binary
#   BASELINE=/path/to/old bench/icount-server.sh  # and a second one, same table
#   BASELINE="/path/a /path/b" bench/icount-server.sh   # or several
#   N1=200 N2=2200 bench/icount-server.sh
#
# The dumps stay in target/icount-server/<name>.<h1|h2>.<N> for
# `callgrind_annotate --inclusive=yes FILE` (build with
# CARGO_PROFILE_RELEASE_DEBUG=line-tables-only for file and line names).
#
# Needs: python3, valgrind and h2load (installed from Debian when missing;
# run as root or with sudo available); the Rust toolchain unless BIN is given.
set -euo pipefail
cd "$(dirname "$0")/.."

N1=${N1:-200}
N2=${N2:-2200}
CLIENTS=${CLIENTS:-16}
PORT=${PORT:-18843}
METRICS_PORT=${METRICS_PORT:-19590}
URL="https://127.0.0.1:${PORT}/mutate?timeout=5s"
OUT=$PWD/target/icount-server
WORK=$(mktemp -d)
trap 'kill "${VG:-0}" 2>/dev/null || true; rm -rf "$WORK"' EXIT
mkdir -p "$OUT"

need() { # COMMAND PACKAGE
  command -v "$1" >/dev/null && return 0
  echo "== installing $1 (Debian $2)"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "$2" >/dev/null
}
need h2load nghttp2-client
need valgrind valgrind

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

BODY="$WORK/istio-pod.review.json"
python3 -c 'import json, sys; json.dump(json.load(open(sys.argv[1])), open(sys.argv[2], "w"), separators=(",", ":"))' \
  tests/fixtures/istio-pod.review.json "$BODY"

load() { # N H2LOAD_FLAGS...
  local n=$1; shift
  h2load "$@" -n "$n" -c "$CLIENTS" -t 1 -d "$BODY" -H 'content-type: application/json' "$URL" >"$WORK/h2load.out" 2>&1 \
    && grep -q "status codes: $n 2xx" "$WORK/h2load.out" || { cat "$WORK/h2load.out"; exit 1; }
}
summary() { sed -n 's/^summary: //p' "$1"; }

declare -A PER
for i in "${!BINS[@]}"; do
  name=${NAMES[$i]}
  echo "== $name (${BINS[$i]}) under callgrind"
  rm -f "$OUT/$name".*
  RUST_LOG=info valgrind --tool=callgrind --callgrind-out-file="$OUT/$name.start" \
    "${BINS[$i]}" --log-format json serve \
    --listen "127.0.0.1:${PORT}" --metrics-listen "127.0.0.1:${METRICS_PORT}" \
    --dev-cert-dir "$WORK/certs-$name" --shutdown-delay-seconds 0 \
    2>"$WORK/server.log" >/dev/null &
  VG=$!
  for _ in $(seq 600); do grep -q '"serving"' "$WORK/server.log" 2>/dev/null && break; sleep 0.2; done
  grep -q '"serving"' "$WORK/server.log" || { cat "$WORK/server.log"; exit 1; }
  load 200 --h1 # warm-up: first-use allocations, lazy statics
  load 200 -m 1
  for proto in h1 h2; do
    flags=(--h1); [ "$proto" = h2 ] && flags=(-m 1)
    for n in "$N1" "$N2"; do
      callgrind_control -z "$VG" >/dev/null 2>&1
      load "$n" "${flags[@]}"
      callgrind_control -d "$proto.$n" "$VG" >/dev/null 2>&1
    done
  done
  kill "$VG"; wait "$VG" 2>/dev/null || true
  # Dumps are numbered in order: h1 N1, h1 N2, h2 N1, h2 N2.
  k=1
  for proto in h1 h2; do
    for n in "$N1" "$N2"; do mv "$OUT/$name.start.$k" "$OUT/$name.$proto.$n"; k=$((k + 1)); done
    PER["$name $proto"]=$(( ($(summary "$OUT/$name.$proto.$N2") - $(summary "$OUT/$name.$proto.$N1")) / (N2 - N1) ))
  done
done

printf '\n%-10s %12s %12s\n' binary "HTTP/1.1" "HTTP/2"
for name in "${NAMES[@]}"; do
  printf '%-10s %12s %12s\n' "$name" "${PER[$name h1]}" "${PER[$name h2]}"
done
for base in "${NAMES[@]:1}"; do
  python3 -c "import sys; a = [int(x) for x in sys.argv[2:]]; print(f'bin vs {sys.argv[1]}: HTTP/1.1 {100 * (a[0] - a[2]) / a[2]:+.1f}%, HTTP/2 {100 * (a[1] - a[3]) / a[3]:+.1f}%')" \
    "$base" "${PER[bin h1]}" "${PER[bin h2]}" "${PER[$base h1]}" "${PER[$base h2]}"
done
printf '(instructions per review, user space, whole server; dumps in %s)\n' "$OUT"
for i in "${!BINS[@]}"; do printf '%s: %s\n' "${NAMES[$i]}" "${BINS[$i]}"; done
exit 0
