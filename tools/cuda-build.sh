#!/usr/bin/env bash
# `make cuda`: the four stage binaries with candle's CUDA backend (plus the CPU-only gateway and
# `kd`), built on a CPU-only x86-64 Linux machine from the CUDA 13.0 toolkit wheels on PyPI: no
# system CUDA, no GPU and no driver at build time. CI runs it, so a change that breaks the CUDA
# build does not land.
#
# Target: an NVIDIA H200 (compute capability 9.0, sm_90a) with driver >= 580 (CUDA 13.0). nvcc and
# nvvm are pinned to 13.0.88 so the embedded PTX is ISA 9.0, which a 13.0 driver can JIT.
#
# Output: target/cuda-dist/ with the stripped binaries and kd-cuda-bins.tar.xz (all of them in
# one archive, ~11 MB: the stage binaries share one 33 MB fatbin, which xz stores once).
#
# Caches (kept between runs on one machine; a second run only rebuilds what changed):
#   KD_CUDA_CACHE=~/.cache/kandinsky-serve/cuda   the wheel venv and the assembled CUDA root
#   CARGO_TARGET_DIR=$KD_CUDA_CACHE/target         a target dir of its own (other features than
#                                                  the CPU build, so neither rebuilds the other),
#                                                  outside the clone so a fresh clone reuses it
# Other knobs: CUDA_COMPUTE_CAP (default 90), CUDA_DIST (default target/cuda-dist),
# KD_CUDA_XZ_PRESET (default 9: ~15 MB in ~3 min on 2 cores; 1: ~18 MB in ~20 s).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD

CACHE=${KD_CUDA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kandinsky-serve/cuda}
CUDA_VENV=$CACHE/venv
CUDA_ROOT=$CACHE/root
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$CACHE/target}
CUDA_DIST=${CUDA_DIST:-$REPO/target/cuda-dist}
# With the CUDA backend: the four stages and kd-gpucheck (the parity and timing tool of
# tools/gpu/check.sh); CPU-only: the gateway and kd.
STAGES="kd-text-encoder kd-prior kd-denoiser kd-movq kd-gpucheck"
CPU_ONLY="kd-gateway kd"

say() { printf '== cuda: %s\n' "$*" >&2; }

command -v g++ >/dev/null || {
  say "installing g++ (nvcc's host compiler)"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq g++ >/dev/null
}
command -v xz >/dev/null || {
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq xz-utils >/dev/null
}

# The toolkit pieces, pinned. nvidia-nvvm is pinned too: nvidia-cuda-nvcc depends on it unpinned
# and pip would pull the newest cicc, whose PTX a 13.0 driver rejects.
WHEELS="nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88
nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 nvidia-cuda-nvrtc==13.0.88
nvidia-cublas==13.0.2.14 nvidia-curand==10.4.0.35"
mkdir -p "$CACHE"
if [ "$(cat "$CUDA_VENV/.wheels" 2>/dev/null)" != "$WHEELS" ]; then
  say "installing the CUDA 13.0 wheels into $CUDA_VENV"
  rm -rf "$CUDA_VENV"
  python3 -m venv "$CUDA_VENV"
  # shellcheck disable=SC2086
  "$CUDA_VENV/bin/pip" install -q --disable-pip-version-check $WHEELS
  printf '%s' "$WHEELS" >"$CUDA_VENV/.wheels"
fi
WHEEL=$(echo "$CUDA_VENV"/lib/python3*/site-packages/nvidia/cu13)
[ -x "$WHEEL/bin/nvcc" ] || { echo "nvcc not found under $WHEEL" >&2; exit 1; }

# One CUDA root the build scripts understand: cudaforge (candle-kernels) takes nvcc from PATH and
# include/ beside it; cudarc links -lcuda -lnvrtc -lcurand -lcublas -lcublasLt from lib64 and
# lib64/stubs; candle-kernels links -lcudart. The wheels ship versioned sonames only.
rm -rf "$CUDA_ROOT"
mkdir -p "$CUDA_ROOT/lib64/stubs"
for d in bin include nvvm; do ln -s "$WHEEL/$d" "$CUDA_ROOT/$d"; done
for l in cudart cublas cublasLt curand nvrtc; do
  f=$(ls "$WHEEL"/lib/lib$l.so.* | grep -v '\.alt\.' | head -1)
  ln -s "$f" "$CUDA_ROOT/lib64/lib$l.so"
done

# libcuda.so.1 comes with the driver. The link uses a stub exporting every cu* entry point that
# cudarc declares (each returns CUDA_ERROR_STUB_LIBRARY); at run time the driver's library is
# loaded. The stub never leaves this cache.
cargo fetch --locked -q
CUDARC_VER=$(awk '/^name = "cudarc"$/{getline; gsub(/[^0-9.]/,""); print; exit}' Cargo.lock)
CUDARC_SYS=$(ls "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-"$CUDARC_VER"/src/driver/sys/mod.rs | head -1)
STUB_SRC=$CUDA_ROOT/lib64/stubs/libcuda_stub.c
{
  echo '/* link-time stub for libcuda.so.1; not for run time */'
  grep -oE '^pub unsafe fn cu[A-Za-z0-9_]+' "$CUDARC_SYS" | awk '{print $4}' | sort -u |
    while read -r s; do echo "int $s(void){return 34;}"; done
} >"$STUB_SRC"
gcc -shared -fPIC -O2 -Wl,-soname,libcuda.so.1 -o "$CUDA_ROOT/lib64/stubs/libcuda.so" "$STUB_SRC"

export PATH="$CUDA_ROOT/bin:$PATH"
export CUDA_HOME="$CUDA_ROOT"
export CUDAFORGE_THREADS=${CUDAFORGE_THREADS:-$(nproc)}
say "$(nvcc --version | tail -1)"
pkgs=(); feats=()
for p in $STAGES; do pkgs+=(-p "$p"); feats+=("$p/cuda"); done
for p in $CPU_ONLY; do pkgs+=(-p "$p"); done
start=$(date +%s)
cargo build --release --locked "${pkgs[@]}" --features "$(IFS=,; echo "${feats[*]}")"
say "build took $(( $(date +%s) - start )) s"

rm -rf "$CUDA_DIST"
mkdir -p "$CUDA_DIST"
names=()
for p in $STAGES $CPU_ONLY; do
  strip -o "$CUDA_DIST/$p" "$CARGO_TARGET_DIR/release/$p"
  names+=("$p")
done
tar -C "$CUDA_DIST" -cf - "${names[@]}" | xz -T1 --lzma2="preset=${KD_CUDA_XZ_PRESET:-9},dict=256MiB" >"$CUDA_DIST/kd-cuda-bins.tar.xz"
# A stage binary that does not reference the CUDA runtime was built without the feature.
for p in $STAGES; do
  grep -q "cublasCreate" "$CUDA_DIST/$p" || { echo "$p has no CUDA backend" >&2; exit 1; }
done
ls -l "$CUDA_DIST" >&2
say "done: $CUDA_DIST/kd-cuda-bins.tar.xz (on the GPU machine the binaries need libcuda.so.1 from \
the driver and libcudart.so.13, libcublas(Lt).so.13, libcurand.so.10 on LD_LIBRARY_PATH)"
