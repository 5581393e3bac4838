#!/usr/bin/env bash
# GPU check for a machine with a real GPU: builds in release, prints what Vulkan sees,
# runs the backend parity suite (Scalar / Cpu / Gpu, every aggregation × window kind)
# on the GPU, then the GPU-vs-CPU benchmark, and writes the log and the JSON report
# into the directory given as argument.
#
#   benches/gpu-check.sh OUT_DIR
#
# Needs the Rust toolchain and the crates of Cargo.lock (run `cargo fetch` first on a
# machine without network, or copy a vendored registry). Takes about 5 minutes on a
# fresh 16-core machine, most of it compiling.
#
# No adapter? A CUDA-only container image often has the NVIDIA driver but no Vulkan
# loader (libvulkan.so.1) or no ICD file (nvidia_icd.json; the container runtime adds
# it only with NVIDIA_DRIVER_CAPABILITIES including `graphics`). The diagnostics below
# show which of the two is missing.
set -uo pipefail
cd "$(dirname "$0")/.."

out=${1:?usage: benches/gpu-check.sh OUT_DIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
log="$out/gpu-check.log"
exec > >(tee "$log") 2>&1
started=$(date +%s)
step() { printf '\n== %s (%ss)\n' "$*" "$(($(date +%s) - started))"; }

step "machine"
uname -a
nproc
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv

step "Vulkan loader and ICDs"
ldconfig -p 2>/dev/null | grep -E 'libvulkan\.so' || echo "no libvulkan.so in the linker cache (Debian: libvulkan1)"
# The NVIDIA ICD (libGLX_nvidia.so.0) loads through libglvnd's dispatcher.
ldconfig -p 2>/dev/null | grep -E 'libGLdispatch\.so' || echo "no libGLdispatch.so in the linker cache (Debian: libglvnd0; the NVIDIA ICD needs it)"
for d in /usr/share/vulkan/icd.d /etc/vulkan/icd.d /usr/local/share/vulkan/icd.d; do
  [[ -d $d ]] && { echo "$d:"; ls -l "$d"; }
done
if command -v vulkaninfo >/dev/null; then
  vulkaninfo --summary 2>&1 | sed -n '/Devices:/,$p'
else
  echo "vulkaninfo not installed (Debian: vulkan-tools)"
fi

step "release build"
cargo build --release --locked -p panes-bench --bin gpu || exit 1
cargo test --release --locked -p panes-kernels --features gpu --no-run || exit 1

step "backend parity suite on the GPU"
# PANES_REQUIRE_GPU=1: no adapter is a failure, not a skip.
PANES_REQUIRE_GPU=1 cargo test --release --locked -p panes-kernels --features gpu \
  -- --nocapture --test-threads 1 2>&1 | grep -vE '^(running|$)'
suite=${PIPESTATUS[0]}
echo "parity suite exit status: $suite"

step "GPU vs CPU benchmark"
target/release/gpu --out "$out/gpu.json"
bench=$?
if grep -q 'GPU: .*(Vulkan, Cpu,' "$log"; then
  echo "WARNING: the adapter is a software renderer (lavapipe): no real GPU was found"
fi

step "done"
echo "results: $out/gpu.json, log: $log"
exit $((suite || bench))
