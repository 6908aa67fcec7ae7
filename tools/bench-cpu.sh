#!/usr/bin/env bash
# make bench-cpu: this project's CPU kernels against PyTorch (diffusers / transformers) on the same
# weights, inputs, thread count and machine, in one run, side by side.
#
#   tools/bench-cpu.sh   (env: BENCH_MODEL=full|small, BENCH_ROUNDS=4, BENCH_THREADS=2,
#                         KD_BENCH_CACHE=~/.cache/kandinsky-serve/bench-cpu, OUT=target/bench-cpu)
#
# Once per model size (cached outside git): a random-weight Kandinsky 2.2 checkpoint with the real
# configurations in the official layout, fp16 safetensors (tools/gpu/make_checkpoint.py; `full`
# is ~9.8 GB on disk), and the fp32 PyTorch references of every module with their timing
# workloads (tools/gpu/reference.py --cpu-workloads, sizes 512 and 256).
#
# Then BENCH_ROUNDS rounds; in each, every stage runs once in ours (`kd-gpucheck modules`, f32)
# and once in PyTorch (tools/gpu/bench_diffusers.py, fp32), each in a process of its own under
# /usr/bin/time (peak RSS), alternating which goes first (an even number of rounds, so each side
# goes first as often: the first process after another stage's pays for the memory that stage
# left behind, which moved load times 2×). A process loads its stage from the
# fp16 files (timed), checks parity (ours only), and times each workload once after a warm-up.
# The table (tools/bench_cpu_table.py) takes medians over the rounds; its last line is
# `unet64 ratio=<ours/PyTorch> movq512 ratio=<...> ...` for scripts.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${BENCH_MODEL:-full}
ROUNDS=${BENCH_ROUNDS:-4}
THREADS=${BENCH_THREADS:-2}
CACHE=${KD_BENCH_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kandinsky-serve/bench-cpu}
OUT=${OUT:-target/bench-cpu}
PY=tools/reference/.venv/bin/python
case "$MODEL" in full|small) ;; *) echo "bench-cpu: BENCH_MODEL is full or small" >&2; exit 2 ;; esac
[ "$ROUNDS" -ge 1 ] 2>/dev/null || { echo "bench-cpu: BENCH_ROUNDS is a positive integer" >&2; exit 2; }
[ -x /usr/bin/time ] || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq time >/dev/null; }
say() { printf '== bench-cpu %s: %s\n' "$(date +%T)" "$*" >&2; }

make -s "$PY"
cargo build --release --locked -q -p kd-gpucheck
BIN=target/release/kd-gpucheck

CK=$CACHE/$MODEL
if [ ! -f "$CK/.complete" ]; then
  say "making the $MODEL random-weight checkpoint and its references in $CK (once)"
  rm -rf "$CK"
  "$PY" tools/gpu/make_checkpoint.py --out "$CK" --size "$MODEL" --device cpu
  "$PY" tools/gpu/reference.py --prior-dir "$CK/kandinsky-2-2-prior" \
    --decoder-dir "$CK/kandinsky-2-2-decoder" --out "$CK/refs" --device cpu \
    --size-a 512 --size-b 256 --cpu-workloads
  touch "$CK/.complete"
fi
PRIOR=$CK/kandinsky-2-2-prior DECODER=$CK/kandinsky-2-2-decoder REFS=$CK/refs

rm -rf "$OUT" && mkdir -p "$OUT"
export RAYON_NUM_THREADS=$THREADS OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS
ours() { # stage round
  local mods=$1
  [ "$1" = prior ] && mods=image_encoder,prior
  /usr/bin/time -f '%M' -o "$OUT/ours-$1-$2.rss" "$BIN" modules --refs "$REFS" \
    --prior-dir "$PRIOR" --decoder-dir "$DECODER" --device cpu --dtype f32 --modules "$mods" \
    --iters 1 >"$OUT/ours-$1-$2.jsonl"
}
torch() { # stage round
  /usr/bin/time -f '%M' -o "$OUT/torch-$1-$2.rss" "$PY" tools/gpu/bench_diffusers.py \
    --prior-dir "$PRIOR" --decoder-dir "$DECODER" --refs "$REFS" --results "$OUT/torch-$1-$2.jsonl" \
    --device cpu --dtype fp32 --parts modules --modules "$1" --threads "$THREADS" --iters 1
}
for r in $(seq 1 "$ROUNDS"); do
  for stage in unet movq prior text_encoder; do
    say "round $r/$ROUNDS: $stage"
    if [ $((r % 2)) = 1 ]; then ours "$stage" "$r"; torch "$stage" "$r"
    else torch "$stage" "$r"; ours "$stage" "$r"; fi
  done
done
"$PY" tools/bench_cpu_table.py "$OUT" --model "$MODEL" --threads "$THREADS" | tee "$OUT/table.md"
