#!/usr/bin/env bash
# Instructions per review (callgrind): the admission handler on a review body,
# counted by valgrind, which repeats exactly for the same binary and input
# whatever else the machine does (criterion's times on this VM drift by tens of
# percent). Each revision is built in release into target/icount/ with a small
# harness that runs `admission::review` N times; the count for 1 review is
# subtracted from the count for 1,001, so start-up and parsing the fixture
# drop out. See BENCHMARKS.md.
#
#   bench/icount.sh                 # the work tree, on the three fixtures below
#   bench/icount.sh 5cad86a HEAD    # revisions (git worktrees under target/icount/)
#   FIXTURES="pod.review.json" bench/icount.sh
#
# Needs: the Rust toolchain and valgrind (installed from Debian when missing).
# Revisions before 5cad86a have another `review` signature and are not
# supported by the harness. Prints figures; asserts nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
top=$PWD
FIXTURES=${FIXTURES:-"istio-pod.review.json kube-system-pod.review.json pod.review.json"}
work=$top/target/icount
mkdir -p "$work"

if ! command -v valgrind >/dev/null; then
  echo "== installing valgrind (Debian)"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq valgrind >/dev/null
fi

# harness NAME SOURCE_DIR: a crate that calls the handler of SOURCE_DIR.
harness() {
  local dir=$work/harness-$1
  mkdir -p "$dir/src"
  cat >"$dir/Cargo.toml" <<TOML
[package]
name = "icount-$1"
version = "0.0.0"
edition = "2024"
publish = false

[dependencies]
canary-injector = { path = "$2" }
serde_json = "1"

[profile.release]
codegen-units = 1
lto = "thin"
TOML
  cat >"$dir/src/main.rs" <<'RS'
use std::hint::black_box;
fn main() {
    let mut args = std::env::args().skip(1);
    let file = args.next().unwrap();
    let n: usize = args.next().unwrap().parse().unwrap();
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(file).unwrap()).unwrap();
    let body = serde_json::to_vec(&v).unwrap(); // compact, as the apiserver sends it
    let cfg = canary_injector::config::Config::default();
    let view = canary_injector::admission::no_cluster;
    for _ in 0..n {
        black_box(canary_injector::admission::review(black_box(&body), &cfg, &view).unwrap());
    }
}
RS
  cp "$2/Cargo.lock" "$dir/Cargo.lock"
  (cd "$dir" && CARGO_TARGET_DIR=$work/target cargo build --release --quiet)
}

count() { # BINARY FIXTURE N -> instructions
  valgrind --tool=callgrind --callgrind-out-file=/dev/null "$1" "$2" "$3" 2>&1 \
    | sed -n 's/.*Collected : \([0-9]*\).*/\1/p'
}

names=()
if [ $# -eq 0 ]; then
  harness worktree "$top"; names+=(worktree)
else
  for rev in "$@"; do
    sha=$(git rev-parse --short "$rev")
    [ -d "$work/src-$sha" ] || git worktree add -f --detach "$work/src-$sha" "$sha" >/dev/null
    harness "$sha" "$work/src-$sha"; names+=("$sha")
  done
fi

printf '%-32s' fixture; printf '%14s' "${names[@]}"; echo
for fx in $FIXTURES; do
  printf '%-32s' "$fx"
  for name in "${names[@]}"; do
    bin=$work/target/release/icount-$name
    one=$(count "$bin" "tests/fixtures/$fx" 1)
    many=$(count "$bin" "tests/fixtures/$fx" 1001)
    printf '%14s' "$(( (many - one) / 1000 ))"
  done
  echo
done
echo "(instructions per review, compact body, default configuration, no cluster)"
