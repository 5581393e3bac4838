#!/usr/bin/env bash
# Runs every fuzz target (fuzz/fuzz_targets/) for SECONDS each (default 60), two at a
# time, from the committed seeds (fuzz/seeds/<target>/) plus what earlier runs found
# (fuzz/corpus/<target>/, not committed). Installs cargo-fuzz if missing and builds the
# targets with coverage instrumentation on the stable toolchain (no sanitizer).
# PANES_FUZZ_OPT_LEVEL sets the targets' optimisation level (default 3). The test command
# uses 1 for its one minute per target: measured cold, the build took 8.3 min instead of
# 10.0, and the targets made 57-80 % of the runs per second.
# A crash stops with the failing input under fuzz/artifacts/<target>/; reproduce it with
#   (cd fuzz && cargo fuzz run -s none TARGET artifacts/TARGET/crash-...)
#
#   scripts/fuzz.sh            # 60 s per target (the test command)
#   scripts/fuzz.sh 1800       # 30 minutes per target
#   scripts/fuzz.sh 600 arrow_ipc checkpoint
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
export PATH="$HOME/.cargo/bin:$PATH"

seconds=${1:-60}
shift || true
targets=("$@")
if ((${#targets[@]} == 0)); then
  targets=(feature_file arrow_ipc ingest_request flight_ticket kafka_message checkpoint)
fi

if ! cargo fuzz --version >/dev/null 2>&1; then
  cargo install cargo-fuzz --version 0.13.2 --locked
fi
CARGO_PROFILE_RELEASE_OPT_LEVEL=${PANES_FUZZ_OPT_LEVEL:-3} cargo fuzz build -s none
bin=target/x86_64-unknown-linux-gnu/release

run() {
  local t=$1 max_len=65536
  # A checkpoint seed holds a whole pane state.
  [[ $t == checkpoint ]] && max_len=1048576
  mkdir -p "corpus/$t" "artifacts/$t"
  "$bin/$t" "corpus/$t" "seeds/$t" \
    -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -max_len="$max_len" \
    -artifact_prefix="artifacts/$t/" -print_final_stats=1 >"artifacts/$t.log" 2>&1
}

failed=()
for ((i = 0; i < ${#targets[@]}; i += 2)); do
  pids=()
  for t in "${targets[@]:i:2}"; do
    run "$t" &
    pids+=("$!:$t")
  done
  for p in "${pids[@]}"; do
    if wait "${p%%:*}"; then
      printf '%-16s %s\n' "${p#*:}" "$(grep -m1 -o 'Done [0-9]* runs in [0-9]* second(s)' "artifacts/${p#*:}.log")"
    else
      failed+=("${p#*:}")
      echo "${p#*:}: CRASH"; grep -E -A20 'panicked|ERROR|deadly|SUMMARY' "artifacts/${p#*:}.log" | head -40
    fi
  done
done
if ((${#failed[@]})); then
  echo "fuzz targets that crashed: ${failed[*]} (inputs under fuzz/artifacts/)" >&2
  exit 1
fi
