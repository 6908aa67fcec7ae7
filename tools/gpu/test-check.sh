#!/usr/bin/env bash
# Test of tools/gpu/check.sh on a CPU: runs it on the fixtures (and, unless KD_GPU_TEST_SMALL=0,
# once more on a small checkpoint that make_checkpoint.py builds: the path the GPU run takes) and
# checks the report: the table header, every module's f32 and f16 parity row within its limit,
# bf16 skipped with its reason, the whole-pipeline rows (services and in-process) and 8/8
# concurrent requests answered.
#
#   tools/gpu/test-check.sh            # ~1.5-3 min on 2 cores once the release binaries are built
#
# Needs: the release binaries (check.sh runs `cargo build --release --bins --locked`, a no-op
# when they are fresh; KD_GPU_TEST_NO_BUILD=1 passes --no-build) and a Python with torch,
# diffusers and transformers: KD_GPU_PYTHON, else tools/reference/.venv/bin/python (made by
# `make tools/reference/.venv/bin/python` from tools/reference/requirements.txt).
# Env: KD_GPU_TEST_BUDGET (seconds per check.sh run, default 200), KD_GPU_TEST_KEEP=1 keeps
# the output folder. Exit status 0 = pass.
set -uo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
cd "$REPO" || exit 2

PY=${KD_GPU_PYTHON:-$REPO/tools/reference/.venv/bin/python}
if ! "$PY" -c 'import torch, diffusers, transformers' 2>/dev/null; then
  echo "test-check: $PY cannot import torch, diffusers and transformers." >&2
  echo "  Make the reference venv (make tools/reference/.venv/bin/python) or set KD_GPU_PYTHON." >&2
  exit 1
fi
BUDGET=${KD_GPU_TEST_BUDGET:-200}
TMP=$(mktemp -d "${TMPDIR:-/tmp}/kd-gpu-test.XXXXXX")
[ "${KD_GPU_TEST_KEEP:-0}" = 1 ] || trap 'rm -rf "$TMP"' EXIT
BUILD_FLAG=(); [ "${KD_GPU_TEST_NO_BUILD:-0}" = 1 ] && BUILD_FLAG=(--no-build)

FAILS=0
fail() { echo "FAIL: $*" >&2; FAILS=$((FAILS + 1)); }
has() { grep -qE -- "$2" "$1" || fail "$3"; }

check_report() { # out-dir model
  local out=$1 model=$2 r=$1/gpu-report.md
  [ -f "$r" ] || { fail "$model: no $r"; return; }
  has "$r" '^\| workload \| ours \| diffusers \| ratio \| limit \| result \|$' "$model: table header"
  for dt in f32 f16; do
    for m in text_encoder image_encoder prior unet movq; do
      has "$r" "^\| parity $m $dt [^|]*\| rel L2 [0-9.e+-]+ \|.*\| pass \|$" "$model: parity $m $dt missing or not within its limit"
    done
  done
  for m in text_encoder image_encoder prior unet movq; do
    has "$r" "^\| parity $m bf16 .*skipped: .*bf16" "$model: parity $m bf16 should be skipped with its reason"
  done
  if grep -q '| FAIL |' "$r"; then fail "$model: a FAIL row"; fi
  has "$r" '^- parity: \*\*PASS\*\*' "$model: parity verdict"
  has "$r" '^\| UNet step 64² CFG \(batch 2\), f32 \| [0-9.e+-]+ s \| [0-9.e+-]+ s \(fp32\) \| [0-9.]+×' "$model: UNet step row"
  has "$r" '^\| MoVQ decode 64², f32 \| [0-9.e+-]+ s \| [0-9.e+-]+ s \(fp32\)' "$model: MoVQ row"
  has "$r" '^\| text2img 64² 5\+10 steps, five services [^|]*\| [0-9.e+-]+ s \| [0-9.e+-]+ s \(fp32\)' "$model: services pipeline row"
  has "$r" '^\| text2img 64² 5\+10 steps, in-process [^|]*\| [0-9.e+-]+ s \| [0-9.e+-]+ s \(fp32\)' "$model: in-process pipeline row"
  has "$r" '^\| images/s, 8 concurrent requests \| [0-9.e+-]+ images/s \(8/8 ok\)' "$model: 8 concurrent requests"
  has "$r" '^\| peak RSS \(CPU run\) memory, denoiser stage \| [0-9]+ MiB' "$model: denoiser memory row"
  for s in reference ours-modules-f32 ours-modules-f16 diffusers-modules services ours-pipeline diffusers-pipeline; do
    has "$r" "^\| $s \| ran \|" "$model: step $s did not run"
  done
  has "$r" '^\| ours-modules-bf16 \| skipped \|' "$model: bf16 step should be skipped"
}

run_check() { # model
  local model=$1 out=$TMP/out-$1 t0=$(date +%s)
  echo "== test-check: check.sh --device cpu --model $model (budget $BUDGET s)"
  OUT=$out KD_GPU_PYTHON=$PY timeout $((BUDGET + 120)) bash "$HERE/check.sh" --device cpu --model "$model" \
    --budget-s "$BUDGET" "${BUILD_FLAG[@]}" >"$TMP/$model.log" 2>&1
  local rc=$?
  echo "   check.sh exit $rc in $(($(date +%s) - t0)) s"
  [ $rc -eq 0 ] || { fail "$model: check.sh exited $rc"; tail -30 "$TMP/$model.log" >&2; }
  check_report "$out" "$model"
  [ "$FAILS" -eq 0 ] || cat "$out/gpu-report.md" >&2
  BUILD_FLAG=(--no-build)
}

run_check fixture
if [ "${KD_GPU_TEST_SMALL:-1}" = 1 ]; then
  run_check small
  has "$TMP/out-small/gpu-report.md" '^\| checkpoint \| ran \|' "small: checkpoint step did not run"
fi
if [ "$FAILS" -eq 0 ]; then echo "test-check: PASS"; else echo "test-check: $FAILS failure(s)" >&2; exit 1; fi
