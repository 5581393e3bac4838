#!/usr/bin/env bash
# Every test of Panes, Rust and Python, on a fresh Debian machine with the Rust
# toolchain: installs what the tests need (Python venv, Mesa's software Vulkan driver
# for the GPU tests, Redis for the serving benchmark's reference, cmake and curl's
# headers for librdkafka, Chromium for the status page's browser test, and the tansu
# broker for the Kafka tests; moto's S3 server, in the venv, for the object-store
# tests), then formatting,
# lints (clippy, on the tests' build), unit, integration and doc tests (the GPU
# backend's and the GPU benchmark's on lavapipe, none skipped), every fuzz target for
# 30 s (cargo-fuzz installed if missing), a demo smoke run, the
# Python package built and installed with `pip install ./python` into a venv, and the
# Python suite (oracles in DuckDB SQL, stub checks, examples).
set -euo pipefail
cd "$(dirname "$0")/.."

# Each step with the wall time since the start, so a slow CI run shows where it went.
log() { printf '\n== [%s, +%d s] %s\n' "$(date -u +%T)" "$SECONDS" "$*"; }

# System packages the tests need.
missing=()
command -v python3 >/dev/null || missing+=(python3)
python3 -c 'import ensurepip, venv' 2>/dev/null || missing+=(python3-venv)
# The GPU backend's tests run on lavapipe (Mesa's software Vulkan) where no GPU exists.
ls /usr/share/vulkan/icd.d/lvp_icd.*.json >/dev/null 2>&1 || missing+=(mesa-vulkan-drivers)
ldconfig -p | grep -q 'libvulkan\.so\.1' || missing+=(libvulkan1)
# The serving load generator's smoke test compares against Redis.
command -v redis-server >/dev/null || missing+=(redis-server)
# librdkafka (the `kafka` feature) is built from source with cmake; its build includes
# curl's header.
command -v cmake >/dev/null || missing+=(cmake)
[[ -f /usr/include/x86_64-linux-gnu/curl/curl.h || -f /usr/include/curl/curl.h ]] || missing+=(libcurl4-openssl-dev)
dpkg -s libssl-dev >/dev/null 2>&1 || missing+=(libssl-dev)
command -v pkg-config >/dev/null || missing+=(pkg-config)
# The Python TLS tests make their certificates with the openssl command.
command -v openssl >/dev/null || missing+=(openssl)
# The status page's test opens it in headless Chromium.
command -v chromium >/dev/null || missing+=(chromium)
if ((${#missing[@]})); then
  log "apt-get install ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi

# Two slow installs run in the background, beside formatting, lints and the tests'
# build (a build on two cores leaves one idle at times: build scripts, links), each into
# a log under target/, and are waited for where they are first needed: the tansu broker
# of the Kafka tests (built once, ~10 min of CPU) and the Python venv with the suite's
# oracles (downloads).
export PATH="$HOME/.cargo/bin:$PATH"
mkdir -p target
background() {
  local name=$1
  shift
  log "$name, in the background (log: target/$name.log)"
  "$@" >"target/$name.log" 2>&1 &
  bg_pids[$name]=$!
}
# Waits for background job NAME (when started); its log is shown if it failed.
await() {
  local name=$1
  [[ -n ${bg_pids[$name]:-} ]] || return 0
  log "waiting for $name"
  if ! wait "${bg_pids[$name]}"; then
    tail -n 60 "target/$name.log" >&2
    echo "$name failed (log: target/$name.log)" >&2
    exit 1
  fi
  unset "bg_pids[$name]"
}
declare -A bg_pids=()
# A failing step stops what still runs in the background.
trap 'kill $(jobs -p) 2>/dev/null || true' EXIT
if ! command -v tansu >/dev/null; then
  # Optimised a little only: a test broker, built in less time than a release build.
  background tansu-install env CARGO_PROFILE_RELEASE_OPT_LEVEL=1 \
    cargo install tansu --version 0.6.0 --features dynostore --locked
fi
python_env() {
  [[ -x .venv/bin/python ]] || python3 -m venv .venv
  .venv/bin/pip install --disable-pip-version-check -r python/requirements-test.txt
}
background python-env python_env

# No adapter is a test failure, not a skipped GPU test.
export PANES_REQUIRE_GPU=1
# Every crate with every feature the tests need, built once.
# (benches/harness.py builds its Nexmark generator with the same features, to reuse this build.)
features=(--features panes-engine/kafka,panes-bench/kafka)

log "cargo fmt --check"
cargo fmt --all -- --check

# Lints ride on the tests' build: the workspace's own crates are compiled by
# clippy-driver (what `cargo clippy` runs, there in check mode) with warnings denied,
# every target (benches and examples too, as `cargo clippy --all-targets`). The
# dependencies are compiled once, for the tests, instead of also being checked for a
# separate clippy pass. Every later cargo command of this script (doc tests, the
# Python extension, the benchmark harness) sees the same wrapper, so it reuses this
# build instead of compiling the workspace again.
export RUSTC_WORKSPACE_WRAPPER=clippy-driver
export CLIPPY_ARGS="-D__CLIPPY_HACKERY__warnings__CLIPPY_HACKERY__"
log "Rust tests and lints: build (clippy, warnings denied)"
cargo test --workspace --all-targets --locked --no-run "${features[@]}"
nextest=0
cargo nextest --version >/dev/null 2>&1 && nextest=1
await tansu-install
# The object-store tests run against moto's S3 server, from the venv.
await python-env
export PANES_MOTO="$PWD/.venv/bin/moto_server"
log "Rust tests"
if ((nextest)); then
  cargo nextest run --workspace --locked --no-fail-fast "${features[@]}"
else
  cargo test --workspace --locked --no-fail-fast "${features[@]}"
fi
log "doc tests"
cargo test --workspace --doc --locked "${features[@]}"

log "fuzz targets, 30 s each (scripts/fuzz.sh 1800 runs them for 30 minutes)"
# (Instrumented by cargo fuzz, without the lint wrapper: lints ran above.)
env -u RUSTC_WORKSPACE_WRAPPER -u CLIPPY_ARGS PANES_FUZZ_OPT_LEVEL=1 ./scripts/fuzz.sh 30

log "demo smoke run"
# The integration tests built the CLI (with the workspace's unified features; building
# it alone would recompile Arrow with a different feature set).
test -x target/debug/panes
target/debug/panes demo --events 200000 >/dev/null

log "pip install ./python (the extension module)"
# The suite checks answers, not speed: the wheel is built in the dev profile, with the
# features of the tests' build (python/Cargo.toml, `test-build`), so that it reuses that
# build instead of compiling every crate again.
MATURIN_PEP517_ARGS="--profile dev --features test-build" .venv/bin/pip install -q --disable-pip-version-check --force-reinstall --no-deps ./python
log "Python suite"
# No Chromium is a test failure, not a skipped browser test.
PANES_REQUIRE_BROWSER=1 PANES_BIN="$PWD/target/debug/panes" .venv/bin/python -m pytest -q python/tests
log "all tests passed"
