#!/usr/bin/env bash
# tools/gpu/check.sh: parity, speed and memory of kandinsky-serve against diffusers, in one run,
# with one table in $OUT/gpu-report.md (OUT defaults to ./out). See tools/gpu/README.md.
#
#   tools/gpu/check.sh [--device cpu|cuda] [--model fixture|small|full] [--bins DIR_OR_TARXZ]
#                      [--diffusers-wheel PATH] [--budget-s N] [--sizes A,B] [--steps P,D]
#                      [--skip STEP,...] [--python PY] [--work DIR] [--no-build] [--keep-work]
#
# --device cpu (default): --model fixture (tests/fixtures/tiny/kandinsky-2-2-prior + deep decoder),
#     binaries from target/release (`cargo build --release --bins --locked` first, a no-op when
#     fresh; --no-build skips it), Python from tools/reference/.venv, sizes 64,128, steps 5,10.
# --device cuda: --model full: a full-size random-weight Kandinsky 2.2 checkpoint is made on the
#     GPU first; binaries from --bins (default target/cuda-dist/kd-cuda-bins.tar.xz), Python =
#     python3 (+ the --diffusers-wheel, installed with --no-deps into the work folder), sizes
#     512,768, steps 25,50.
# --model small: the full-size path (made checkpoint, same folder layout) with shrunk configs.
#
# Every step runs under `timeout`, bounded by what is left of --budget-s (default 540 on cuda,
# 600 on cpu; 15 s are kept for the report); a step that fails, times out or cannot run is
# recorded with its reason and the rest go on, so a partial run still writes the report.
# Env: OUT, KD_DIFFUSERS_WHEEL, KD_GPU_PYTHON, KD_GPU_WORK. Exit status: 0 when every parity
# row that ran passed (and at least one ran), 1 otherwise. On a CPU every timed process runs with
# KD_GPU_CPU_THREADS threads (default 1: OMP_NUM_THREADS for torch, RAYON_NUM_THREADS for candle),
# since a multi-threaded torch on a shared 2-core machine times noise (10-100x spikes).
# Steps: checkpoint reference ours-modules-{f16,bf16,f32} diffusers-modules services ours-pipeline
# diffusers-pipeline (--skip takes these names).
set -uo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
cd "$REPO" || exit 2

DEVICE=cpu MODEL="" BINS="" WHEEL=${KD_DIFFUSERS_WHEEL:-} BUDGET="" SIZES="" STEPS=""
PY=${KD_GPU_PYTHON:-} WORK=${KD_GPU_WORK:-} BUILD=1 KEEP=0 SKIP=","
[ -n "$WORK" ] && KEEP=1
usage() { sed -n '2,26p' "$HERE/check.sh" | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE=$2; shift 2 ;;
    --model) MODEL=$2; shift 2 ;;
    --bins) BINS=$2; shift 2 ;;
    --diffusers-wheel) WHEEL=$2; shift 2 ;;
    --budget-s) BUDGET=$2; shift 2 ;;
    --sizes) SIZES=$2; shift 2 ;;
    --steps) STEPS=$2; shift 2 ;;
    --python) PY=$2; shift 2 ;;
    --skip) SKIP=",$2,"; shift 2 ;;
    --work) WORK=$2; KEEP=1; shift 2 ;;
    --no-build) BUILD=0; shift ;;
    --keep-work) KEEP=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "check.sh: unknown argument $1" >&2; usage >&2; exit 2 ;;
  esac
done
case "$DEVICE" in
  cpu) CDEV=cpu; TDEV=cpu ;;
  cuda) CDEV=cuda:0; TDEV=cuda:0 ;;
  cuda:*) CDEV=$DEVICE; TDEV=$DEVICE ;;
  *) echo "check.sh: --device cpu|cuda" >&2; exit 2 ;;
esac
if [ "$DEVICE" = cpu ]; then
  MODEL=${MODEL:-fixture}; BUDGET=${BUDGET:-600}
  DTYPES="f32 f16 bf16"; PRIMARY=f32; DDTYPE=fp32
else
  MODEL=${MODEL:-full}; BUDGET=${BUDGET:-540}
  DTYPES="f16 bf16 f32"; PRIMARY=f16; DDTYPE=fp16
fi
case "$MODEL" in
  full) SIZES=${SIZES:-512,768}; STEPS=${STEPS:-25,50} ;;
  fixture|small) SIZES=${SIZES:-64,128}; STEPS=${STEPS:-5,10} ;;
  *) echo "check.sh: --model fixture|small|full" >&2; exit 2 ;;
esac
SIZE_A=${SIZES%,*} SIZE_B=${SIZES#*,} PSTEPS=${STEPS%,*} DSTEPS=${STEPS#*,}
if [ "$DEVICE" = cpu ]; then
  export OMP_NUM_THREADS=${KD_GPU_CPU_THREADS:-1} RAYON_NUM_THREADS=${KD_GPU_CPU_THREADS:-1}
  export MKL_NUM_THREADS=$OMP_NUM_THREADS
fi

OUT=${OUT:-./out}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
if [ -z "$WORK" ]; then WORK=$(mktemp -d "${TMPDIR:-/tmp}/kd-gpu-check.XXXXXX"); else mkdir -p "$WORK"; fi
WORK=$(cd "$WORK" && pwd)
RESULTS=$OUT/results.jsonl STEPSF=$OUT/steps.jsonl LOG=$OUT/check.log
: >"$RESULTS"; : >"$STEPSF"; : >"$LOG"
rm -f "$OUT/gpu-report.md" "$OUT/mem.json" "$OUT/mem-single.json"
exec > >(tee -a "$LOG") 2>&1
TEEPID=$!
START=$(date +%s)
RESERVE=15

say() { printf '== gpu-check %s: %s\n' "$(date +%T)" "$*"; }
json_str() {
  local s=$1
  s=${s//\\/\\\\}; s=${s//\"/\\\"}; s=${s//$'\n'/ }; s=${s//$'\r'/ }; s=${s//$'\t'/ }
  printf '"%s"' "$s"
}
env_line() { printf '{"kind":"env","key":%s,"value":%s}\n' "$(json_str "$1")" "$(json_str "$2")" >>"$RESULTS"; }
record() { # name status seconds limit note
  printf '{"name":%s,"status":%s,"seconds":%s,"limit":%s,"note":%s}\n' "$(json_str "$1")" \
    "$(json_str "$2")" "${3:-0}" "$(json_str "${4:-—}")" "$(json_str "${5:-}")" >>"$STEPSF"
  say "step $1: $2 ${5:+($5)}"
}
skip() { record "$1" skipped 0 "—" "$2"; }
remaining() { echo $((BUDGET - ($(date +%s) - START) - RESERVE)); }
need() { if [ "$MODEL" = full ]; then echo "$1"; else echo "$2"; fi; } # a step's minimum time

# run_step NAME LIMIT_S MIN_S CMD...: runs CMD under timeout (the smaller of LIMIT_S and what
# is left of the budget), or skips it when less than MIN_S is left. Returns CMD's status.
run_step() {
  local name=$1 limit=$2 min=$3; shift 3
  case "$SKIP" in *",$name,"*) skip "$name" "--skip $name"; STEP_NOTE=""; return 98 ;; esac
  local rem; rem=$(remaining)
  if [ "$rem" -lt "$min" ]; then
    skip "$name" "budget: ${rem} s left, the step needs at least ${min} s"
    return 97
  fi
  [ "$limit" -gt "$rem" ] && limit=$rem
  say "step $name (limit ${limit} s): $*"
  local t0 rc l0; t0=$(date +%s); l0=$(wc -l <"$LOG")
  timeout --kill-after=10 "$limit" "$@"
  rc=$?
  local dt=$(($(date +%s) - t0))
  if [ $rc -eq 0 ]; then
    record "$name" ran "$dt" "$limit" "${STEP_NOTE:-}"
  elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    record "$name" timeout "$dt" "$limit" "timed out after ${limit} s (partial results kept)"
  else
    record "$name" failed "$dt" "$limit" "exit status $rc: $(tail -n +"$((l0 + 1))" "$LOG" | grep -v '^{' | grep -iE 'error|exception|panick' | tail -1 | cut -c1-200)"
  fi
  STEP_NOTE=""
  return $rc
}

MEMPID=""
cleanup() {
  [ -n "$MEMPID" ] && kill -TERM "$MEMPID" 2>/dev/null && wait "$MEMPID" 2>/dev/null
  [ "$KEEP" = 1 ] || rm -rf "$WORK"
}
trap cleanup EXIT

say "device $DEVICE ($CDEV), model $MODEL, sizes $SIZE_A,$SIZE_B, steps $PSTEPS+$DSTEPS, budget ${BUDGET} s, OUT $OUT, work $WORK"
env_line "command" "tools/gpu/check.sh --device $DEVICE --model $MODEL --sizes $SIZES --steps $STEPS --budget-s $BUDGET"
env_line "git" "$(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet HEAD 2>/dev/null || echo ' (+ local changes)')"
env_line "host" "$(uname -srm), $(getconf _NPROCESSORS_ONLN) CPUs${RAYON_NUM_THREADS:+; timed CPU work on $RAYON_NUM_THREADS thread(s) (KD_GPU_CPU_THREADS)}"

# ---- setup: Python, diffusers, binaries ---------------------------------------------------------
t0=$(date +%s); notes=()
if [ -z "$PY" ]; then
  if [ "$DEVICE" = cpu ] && [ -x tools/reference/.venv/bin/python ]; then PY=$REPO/tools/reference/.venv/bin/python
  else PY=$(command -v python3 || echo python3); fi
fi
if [ -n "$WHEEL" ]; then
  if [ -f "$WHEEL" ]; then
    if timeout 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --disable-pip-version-check \
        --target "$WORK/site" "$WHEEL"; then
      export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"; notes+=("installed $(basename "$WHEEL")")
    else notes+=("pip could not install $WHEEL"); fi
  else notes+=("--diffusers-wheel $WHEEL: no such file"); fi
fi
PYINFO=$(timeout 120 "$PY" -c '
import importlib, sys
out = ["python " + sys.version.split()[0]]
for m in ("torch", "diffusers", "transformers", "safetensors"):
    try:
        mod = importlib.import_module(m)
        out.append(f"{m} {mod.__version__}" + (f" ({mod.__path__[0]})" if m == "diffusers" else ""))
    except Exception as e:
        out.append(f"{m} MISSING ({type(e).__name__}: {e})".replace("\n", " "))
try:
    import torch
    if torch.cuda.is_available(): out.append("gpu " + torch.cuda.get_device_name(0))
except Exception: pass
print("; ".join(out))' 2>&1 | tail -1)
env_line "python" "$PY: $PYINFO"
HAVE_TORCH=1; HAVE_DIFFUSERS=1
case "$PYINFO" in *"torch MISSING"*) HAVE_TORCH=0; HAVE_DIFFUSERS=0 ;; esac
case "$PYINFO" in *"diffusers MISSING"*|*"transformers MISSING"*) HAVE_DIFFUSERS=0 ;; esac
NO_DIFFUSERS_WHY="diffusers not importable ($PYINFO)"
[ "$HAVE_DIFFUSERS" = 1 ] || notes+=("$NO_DIFFUSERS_WHY")

# Binaries.
if [ -z "$BINS" ]; then
  if [ "$DEVICE" = cpu ]; then BINS=target/release
  elif [ -f target/cuda-dist/kd-cuda-bins.tar.xz ]; then BINS=target/cuda-dist/kd-cuda-bins.tar.xz
  else BINS=target/cuda-dist; fi
fi
# --bins: a folder or an archive, or a comma-separated list of them merged into one folder
# (e.g. the CUDA archive plus a folder holding a separately built kd-gpucheck).
unpack() { # archive dir: tar (needs xz for .tar.xz), else Python's tarfile (lzma is stdlib)
  tar -C "$2" -xf "$1" 2>/dev/null || python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])' "$1" "$2"
}
case "$BINS" in
  *,*|*.tar.xz|*.txz|*.tar)
    BINDIR=$WORK/bins; mkdir -p "$BINDIR"
    IFS=, read -r -a bin_items <<<"$BINS"
    for item in "${bin_items[@]}"; do
      case "$item" in
        *.tar.xz|*.txz|*.tar)
          if unpack "$item" "$BINDIR"; then notes+=("unpacked $item"); else notes+=("could not unpack $item"); fi ;;
        *)
          if [ -d "$item" ]; then
            for f in "$item"/*; do [ -f "$f" ] && [ -x "$f" ] && ln -sf "$(cd "$(dirname "$f")" && pwd)/$(basename "$f")" "$BINDIR/"; done
            notes+=("binaries from $item")
          else notes+=("--bins $item: no such folder"); fi ;;
      esac
    done ;;
  *) BINDIR=$BINS ;;
esac
BINDIR=$(cd "$BINDIR" 2>/dev/null && pwd || echo "$BINDIR")
if [ "$DEVICE" = cpu ] && [ "$BUILD" = 1 ] && [ "$BINDIR" = "$REPO/target/release" ] && command -v cargo >/dev/null; then
  say "cargo build --release --bins --locked (a no-op when the binaries are fresh)"
  if timeout 1800 cargo build --release --bins --locked; then notes+=("cargo build ok")
  else notes+=("cargo build failed"); fi
fi
if [ "$DEVICE" != cpu ]; then
  # The CUDA binaries link libcudart/libcublas/libcurand/libnvrtc at start: the torch venv's
  # nvidia wheels carry them; libcuda.so.1 comes with the driver.
  NVLIB=$("$PY" -c '
import glob, os
try:
    import nvidia
    roots = list(nvidia.__path__)
except Exception:
    roots = []
dirs = []
for r in roots:
    for pat in ("libcudart.so*", "libcublas.so*", "libcurand.so*", "libnvrtc.so*"):
        for f in glob.glob(os.path.join(r, "**", pat), recursive=True):
            d = os.path.dirname(f)
            if d not in dirs: dirs.append(d)
print(":".join(dirs))' 2>/dev/null)
  for d in /usr/local/nvidia/lib64 /usr/local/nvidia/lib; do # libcuda.so.1 (the driver's)
    [ -e "$d/libcuda.so.1" ] && NVLIB="${NVLIB:+$NVLIB:}$d"
  done
  export LD_LIBRARY_PATH="${NVLIB}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  env_line "LD_LIBRARY_PATH" "$LD_LIBRARY_PATH"
  env_line "gpu" "$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -1)"
fi
MISSING_BINS=()
for b in kd kd-gateway kd-text-encoder kd-prior kd-denoiser kd-movq kd-gpucheck; do
  [ -x "$BINDIR/$b" ] || MISSING_BINS+=("$b")
done
HAVE_GPUCHECK=1; HAVE_SERVICES=1
[ -x "$BINDIR/kd-gpucheck" ] || HAVE_GPUCHECK=0
for b in kd kd-gateway kd-text-encoder kd-prior kd-denoiser kd-movq; do [ -x "$BINDIR/$b" ] || HAVE_SERVICES=0; done
if [ "$HAVE_GPUCHECK" = 1 ] && ! "$BINDIR/kd-gpucheck" --help >/dev/null 2>"$WORK/gpucheck-help.err"; then
  HAVE_GPUCHECK=0; notes+=("kd-gpucheck does not start: $(tail -1 "$WORK/gpucheck-help.err")")
fi
if [ "$HAVE_SERVICES" = 1 ] && ! "$BINDIR/kd-denoiser" --help >/dev/null 2>"$WORK/denoiser-help.err"; then
  HAVE_SERVICES=0; notes+=("kd-denoiser does not start: $(tail -1 "$WORK/denoiser-help.err")")
fi
[ ${#MISSING_BINS[@]} -eq 0 ] || notes+=("missing binaries in $BINDIR: ${MISSING_BINS[*]}")
env_line "binaries" "$BINDIR"
record setup "$([ "$HAVE_TORCH" = 1 ] && echo ran || echo failed)" $(($(date +%s) - t0)) "—" "$([ ${#notes[@]} -gt 0 ] && printf '%s; ' "${notes[@]}" | sed 's/; $//')"

# Memory watcher (GPU: nvidia-smi per process; CPU: peak RSS of the kd-* processes).
MEMSRC=rss; [ "$DEVICE" != cpu ] && MEMSRC=gpu
if [ "$MEMSRC" = rss ] || command -v nvidia-smi >/dev/null; then
  python3 "$HERE/gpumem.py" watch --out "$OUT/mem.json" --source "$MEMSRC" --interval 0.25 &
  MEMPID=$!
fi

# ---- checkpoint -----------------------------------------------------------------------------
CKPT_OK=0
case "$MODEL" in
  fixture)
    PRIOR_DIR=$REPO/tests/fixtures/tiny/kandinsky-2-2-prior
    DECODER_DIR=$REPO/tests/fixtures/deep/kandinsky-2-2-decoder
    CKPT_OK=1
    skip checkpoint "--model fixture: tests/fixtures/tiny/kandinsky-2-2-prior + tests/fixtures/deep/kandinsky-2-2-decoder" ;;
  *)
    PRIOR_DIR=$WORK/ckpt/kandinsky-2-2-prior
    DECODER_DIR=$WORK/ckpt/kandinsky-2-2-decoder
    if [ "$HAVE_DIFFUSERS" = 1 ]; then
      STEP_NOTE="$MODEL-size random-weight checkpoint, fp16 safetensors, in $WORK/ckpt"
      run_step checkpoint 300 "$(need 60 15)" "$PY" "$HERE/make_checkpoint.py" --out "$WORK/ckpt" --size "$MODEL" --device "$TDEV" \
        && CKPT_OK=1
      [ -f "$WORK/ckpt/checkpoint.json" ] && env_line "checkpoint" "$(tr -d '\n ' <"$WORK/ckpt/checkpoint.json")"
    else
      skip checkpoint "$NO_DIFFUSERS_WHY: cannot build the $MODEL-size checkpoint"
    fi ;;
esac
env_line "prior folder" "$PRIOR_DIR"
env_line "decoder folder" "$DECODER_DIR"

# ---- references ------------------------------------------------------------------------------
REFS=$WORK/refs REFS_OK=0
if [ "$CKPT_OK" = 0 ]; then skip reference "no checkpoint (see the checkpoint step)"
elif [ "$HAVE_DIFFUSERS" = 0 ]; then skip reference "$NO_DIFFUSERS_WHY"
else
  STEP_NOTE="fp32 on $TDEV, TF32 off; UNet/MoVQ at ${SIZE_A}²"
  run_step reference 180 "$(need 20 10)" "$PY" "$HERE/reference.py" --prior-dir "$PRIOR_DIR" --decoder-dir "$DECODER_DIR" \
    --out "$REFS" --device "$TDEV" --size-a "$SIZE_A" --size-b "$SIZE_B" && REFS_OK=1
fi

# ---- ours: module parity + timing, one process per dtype -------------------------------------
gpucheck_modules() { # dtype iters
  "$BINDIR/kd-gpucheck" modules --refs "$REFS" --prior-dir "$PRIOR_DIR" --decoder-dir "$DECODER_DIR" \
    --device "$CDEV" --dtype "$1" --iters "$2" --max-seconds "$3" >>"$RESULTS"
}
for dt in $DTYPES; do
  name=ours-modules-$dt
  if [ "$dt" = bf16 ] && [ "$DEVICE" = cpu ]; then
    skip "$name" "candle's CPU backend has no bf16 matmul/convolution (bf16 parity needs --device cuda)"
  elif [ "$HAVE_GPUCHECK" = 0 ]; then
    skip "$name" "no runnable kd-gpucheck in $BINDIR (tools/cuda-build.sh must build it: see README)"
  elif [ "$REFS_OK" = 0 ]; then
    skip "$name" "no references (see the reference step)"
  else
    iters=2; [ "$dt" = "$PRIMARY" ] && iters=5
    export -f gpucheck_modules; export BINDIR REFS PRIOR_DIR DECODER_DIR CDEV RESULTS
    STEP_NOTE="parity of 5 modules + $(grep -c '"module"' "$REFS/manifest.json" 2>/dev/null || echo 5) timed workloads"
    run_step "$name" 150 "$(need 25 10)" bash -c "gpucheck_modules $dt $iters $((iters * 3))"
  fi
done

# ---- diffusers: module timing + peak memory per stage ---------------------------------------
if [ "$REFS_OK" = 0 ]; then skip diffusers-modules "no references/manifest (see the reference step)"
elif [ "$HAVE_DIFFUSERS" = 0 ]; then skip diffusers-modules "$NO_DIFFUSERS_WHY"
else
  STEP_NOTE="diffusers $DDTYPE, default (SDPA) attention"
  run_step diffusers-modules 150 "$(need 25 10)" "$PY" "$HERE/bench_diffusers.py" --prior-dir "$PRIOR_DIR" --decoder-dir "$DECODER_DIR" \
    --refs "$REFS" --results "$RESULTS" --device "$TDEV" --dtype "$DDTYPE" --parts modules --iters 5 --max-seconds 15 >/dev/null
fi

# ---- the five services: kd up, kd generate, 8 concurrent -------------------------------------
services_step() {
  set -uo pipefail
  calc() { awk "BEGIN { print $1 }"; }
  local port; port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  local gw=http://127.0.0.1:$port up=$WORK/kd-up.log
  local t0; t0=$(date +%s.%N)
  KD_DTYPE=$SVC_DTYPE KD_MAX_CONCURRENCY=8 RUST_LOG=${RUST_LOG:-warn} "$BINDIR/kd" up --prior-dir "$PRIOR_DIR" \
    --decoder-dir "$DECODER_DIR" --device "$CDEV" --listen "127.0.0.1:$port" --bin-dir "$BINDIR" --ready-timeout 600 \
    >"$up" 2>&1 &
  local pid=$!
  # Expanded now: `pid` is local, gone by the time the EXIT trap runs.
  trap "kill -TERM $pid 2>/dev/null; wait $pid 2>/dev/null" EXIT
  until grep -q "kandinsky-serve is up" "$up"; do
    if ! kill -0 "$pid" 2>/dev/null; then echo "kd up exited:"; tail -20 "$up"; return 1; fi
    sleep 0.2
  done
  local t1; t1=$(date +%s.%N)
  printf '{"kind":"startup","impl":"ours-services","dtype":"%s","device":"%s","seconds":%s}\n' "$SVC_DTYPE" "$CDEV" \
    "$(calc "$t1 - $t0")" >>"$RESULTS"
  gen() { # seed out
    "$BINDIR/kd" generate "a photo of a red fox in the snow" --gateway "$gw" --json --width "$SIZE_A" --height "$SIZE_A" \
      --prior-steps "$PSTEPS" --steps "$DSTEPS" --seed "$1" --timeout 300 -o "$WORK/$2.png"
  }
  secs() { grep -o '"seconds":[0-9.eE+-]*' | tail -1 | cut -d: -f2; }
  echo "warm-up request"; gen 1 warm | tail -1 || return 1
  local runs=() s
  for i in 1 2; do
    s=$(gen $((i + 1)) run$i | secs); [ -n "$s" ] || return 1
    echo "request $i: $s s"; runs+=("$s")
  done
  local med; med=$(printf '%s\n' "${runs[@]}" | sort -g | awk '{a[NR]=$1} END {print (a[1]+a[NR])/2}')
  printf '{"kind":"pipeline","impl":"ours-services","dtype":"%s","device":"%s","size":%s,"prior_steps":%s,"steps":%s,"runs_s":[%s],"median_s":%s}\n' \
    "$SVC_DTYPE" "$CDEV" "$SIZE_A" "$PSTEPS" "$DSTEPS" "$(IFS=,; echo "${runs[*]}")" "$med" >>"$RESULTS"
  [ -f "$OUT/mem.json" ] && sleep 1.2 && python3 "$HERE/gpumem.py" snapshot --from "$OUT/mem.json" --to "$OUT/mem-single.json"
  local n=8 pids=() ok=0 c0 c1
  c0=$(date +%s.%N)
  for i in $(seq 1 $n); do gen $((100 + i)) "c$i" >"$WORK/c$i.json" 2>&1 & pids+=($!); done
  for p in "${pids[@]}"; do wait "$p" && ok=$((ok + 1)); done
  c1=$(date +%s.%N)
  local wall; wall=$(calc "$c1 - $c0")
  echo "$n concurrent: $ok ok in $wall s"
  printf '{"kind":"throughput","impl":"ours-services","dtype":"%s","device":"%s","mode":"%s concurrent kd generate","requests":%s,"ok":%s,"seconds":%s,"images_per_s":%s,"size":%s,"prior_steps":%s,"steps":%s}\n' \
    "$SVC_DTYPE" "$CDEV" "$n" "$n" "$ok" "$wall" "$(calc "$ok / $wall")" "$SIZE_A" "$PSTEPS" "$DSTEPS" >>"$RESULTS"
  [ "$ok" -eq "$n" ] || { tail -3 "$WORK"/c*.json; return 1; }
}
if [ "$CKPT_OK" = 0 ]; then skip services "no checkpoint (see the checkpoint step)"
elif [ "$HAVE_SERVICES" = 0 ]; then skip services "service binaries missing in $BINDIR"
else
  export -f services_step; export SVC_DTYPE=$PRIMARY BINDIR PRIOR_DIR DECODER_DIR CDEV RESULTS WORK OUT HERE SIZE_A PSTEPS DSTEPS
  STEP_NOTE="kd up ($PRIMARY, KD_MAX_CONCURRENCY=8), warm-up + 2 timed requests, then 8 concurrent"
  run_step services 300 "$(need 60 20)" bash -c services_step
  if [ -s "$WORK/kd-up.log" ]; then echo "---- kd up log (tail)"; tail -15 "$WORK/kd-up.log"; fi
fi

# ---- diffusers: whole pipeline + batch of 8 --------------------------------------------------
if [ "$CKPT_OK" = 0 ]; then skip diffusers-pipeline "no checkpoint"
elif [ "$HAVE_DIFFUSERS" = 0 ]; then skip diffusers-pipeline "$NO_DIFFUSERS_WHY"
else
  STEP_NOTE="KandinskyV22PriorPipeline + KandinskyV22Pipeline, $DDTYPE, 2+2-step warm-up, 2 runs, then 8 prompts in one call"
  run_step diffusers-pipeline 200 "$(need 30 10)" "$PY" "$HERE/bench_diffusers.py" --prior-dir "$PRIOR_DIR" --decoder-dir "$DECODER_DIR" \
    --refs "${REFS}" --results "$RESULTS" --device "$TDEV" --dtype "$DDTYPE" --parts pipeline,batch --size "$SIZE_A" \
    --prior-steps "$PSTEPS" --steps "$DSTEPS" --batch 8 --runs 2 >/dev/null
fi

# ---- ours: whole pipeline in-process ---------------------------------------------------------
if [ "$CKPT_OK" = 0 ]; then skip ours-pipeline "no checkpoint"
elif [ "$HAVE_GPUCHECK" = 0 ]; then skip ours-pipeline "no runnable kd-gpucheck in $BINDIR"
else
  gpucheck_pipeline() {
    "$BINDIR/kd-gpucheck" pipeline --prior-dir "$PRIOR_DIR" --decoder-dir "$DECODER_DIR" --device "$CDEV" \
      --dtype "$PRIMARY" --size "$SIZE_A" --prior-steps "$PSTEPS" --steps "$DSTEPS" --runs 3 >>"$RESULTS"
  }
  export -f gpucheck_pipeline; export PRIMARY SIZE_A PSTEPS DSTEPS
  STEP_NOTE="kd_models::pipeline::Text2Image, $PRIMARY, warm-up + 2 runs"
  run_step ours-pipeline 150 "$(need 30 10)" bash -c gpucheck_pipeline
fi

# ---- report ------------------------------------------------------------------------------------
if [ -n "$MEMPID" ]; then kill -TERM "$MEMPID" 2>/dev/null; wait "$MEMPID" 2>/dev/null; MEMPID=""; fi
[ -f "$OUT/mem-single.json" ] || { [ -f "$OUT/mem.json" ] && cp "$OUT/mem.json" "$OUT/mem-single.json"; }
ELAPSED=$(($(date +%s) - START))
python3 "$HERE/report.py" --out "$OUT" --device "$CDEV" --model "$MODEL" --dtypes "$(echo $DTYPES | tr ' ' ,)" \
  --primary "$PRIMARY" --budget-s "$BUDGET" --elapsed-s "$ELAPSED" --size-a "$SIZE_A" --steps "$STEPS" >/dev/null || {
  say "report.py failed: writing the raw lines instead"
  { echo "# kandinsky-serve GPU check (report.py failed: raw results)"; echo; echo '```'; cat "$STEPSF" "$RESULTS"
    echo '```'; } >"$OUT/gpu-report.md"
}
say "done in ${ELAPSED} s: $OUT/gpu-report.md"
STATUS=1
grep -q -- '- parity: \*\*PASS\*\*' "$OUT/gpu-report.md" 2>/dev/null && STATUS=0
exec >&- 2>&-   # let tee finish check.log before the caller collects $OUT
wait "$TEEPID" 2>/dev/null
exit $STATUS
