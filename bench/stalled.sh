#!/usr/bin/env bash
# Memory under stalled uploads (issue #12): starts the release binary, opens
# N uploads that each declare a 3 MiB review, send all of it but the last
# KiB, and stall (?timeout=30s), holds them, and reports how many were
# refused at once (503) and the server's peak RSS (VmHWM from /proc).
#
#   bench/stalled.sh                  # 40 uploads (the issue's reproduction)
#   N=100 bench/stalled.sh            # more
#   BIN=path/to/canary-injector bench/stalled.sh   # another build, e.g. an older one
#
# Needs: the Rust toolchain (unless BIN is set) and python3. Prints figures;
# asserts nothing (memory is measured here, not in timed tests).
set -euo pipefail
cd "$(dirname "$0")/.."

N=${N:-40}
MIB=${MIB:-3}
HOLD=${HOLD:-5}
PORT=${PORT:-18453}
METRICS_PORT=${METRICS_PORT:-19093}
WORK=$(mktemp -d)
trap 'kill "${SERVER:-0}" 2>/dev/null || true; rm -rf "$WORK"' EXIT

if [ -z "${BIN:-}" ]; then
  echo "== building (release)"
  cargo build --release --locked --quiet
  BIN=target/release/canary-injector
fi

RUST_LOG=${RUST_LOG:-warn} "$BIN" serve \
  --listen "127.0.0.1:${PORT}" --metrics-listen "127.0.0.1:${METRICS_PORT}" \
  --dev-cert-dir "$WORK/certs" --shutdown-delay-seconds 0 2>"$WORK/server.log" >/dev/null &
SERVER=$!
for _ in $(seq 100); do
  python3 -c "import socket; socket.create_connection(('127.0.0.1', $PORT), 0.1).close()" 2>/dev/null && break
  sleep 0.1
done

python3 - "$SERVER" "$PORT" "$N" "$MIB" "$HOLD" <<'PY'
import socket, ssl, sys, threading, time

pid, port, n, mib, hold = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
size = mib * 1024 * 1024
ctx = ssl.create_default_context()
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
ctx.set_alpn_protocols(["http/1.1"])

def status(key):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])  # KiB

results = [None] * n   # (status line or "stalled", seconds from start of upload to answer)
release = threading.Event()
socks = []

def upload(i):
    s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port)), server_hostname="localhost")
    socks.append(s)
    s.settimeout(30)
    head = (f"POST /mutate?timeout=30s HTTP/1.1\r\nhost: localhost\r\n"
            f"content-type: application/json\r\ncontent-length: {size}\r\n\r\n").encode()
    start = time.monotonic()
    chunk = b" " * 65536
    sent, answer = 0, b""
    try:
        s.sendall(head)
        while sent < size - 1024:
            part = chunk[: min(len(chunk), size - 1024 - sent)]
            s.sendall(part)
            sent += len(part)
            s.setblocking(False)
            try:
                answer = s.recv(4096)
            except (ssl.SSLWantReadError, BlockingIOError):
                pass
            s.setblocking(True)
            s.settimeout(30)
            if answer:
                break
    except OSError:
        pass
    if not answer:
        # Stalled one KiB short of the declared length: wait for an answer
        # (a refusal comes at once) or for the end of the hold.
        s.settimeout(0.2)
        while not release.is_set() and not answer:
            try:
                answer = s.recv(4096)
                if not answer:
                    break
            except (socket.timeout, ssl.SSLWantReadError):
                continue
            except OSError:
                break
    took = time.monotonic() - start
    line = answer.split(b"\r\n", 1)[0].decode(errors="replace") if answer else "stalled"
    results[i] = (line, took)

base = status("VmRSS")
threads = [threading.Thread(target=upload, args=(i,)) for i in range(n)]
t0 = time.monotonic()
for t in threads:
    t.start()
peak_rss = base
while time.monotonic() - t0 < hold:
    peak_rss = max(peak_rss, status("VmRSS"))
    time.sleep(0.05)
hwm = status("VmHWM")
release.set()
for t in threads:
    t.join()
for s in socks:
    s.close()

by = {}
for line, took in results:
    by.setdefault(line, []).append(took)
print(f"uploads: {n} x {mib} MiB declared, each stalled 1 KiB short (?timeout=30s), held {hold:g} s")
for line, times in sorted(by.items()):
    times.sort()
    if line == "stalled":
        print(f"  {len(times):4d} accepted and stalled until released")
    else:
        print(f"  {len(times):4d} answered {line!r}: median {times[len(times)//2]*1000:.0f} ms, max {times[-1]*1000:.0f} ms after the upload began")
print(f"server RSS: {base/1024:.1f} MiB before, peak {hwm/1024:.1f} MiB (VmHWM; sampled VmRSS peak {peak_rss/1024:.1f} MiB)")
PY
if ! kill -0 "$SERVER" 2>/dev/null; then
  echo "server exited during the run:"; tail -5 "$WORK/server.log"
fi
