#!/usr/bin/env bash
# `make test` step: tools/gpu/check.sh runs on a CPU with the fixture model and no torch (as on a
# fresh CI machine) and still writes its report: the table header, every parity row present and
# skipped with its reason (no references without diffusers), our whole-pipeline rows measured
# through the five services and in-process, 8/8 concurrent requests answered, and the steps
# table. The full test with diffusers' references is tools/gpu/test-check.sh.
# Uses the debug binaries `make test` has built (target/debug).
set -euo pipefail
cd "$(dirname "$0")/../.."
out=$(mktemp -d "${TMPDIR:-/tmp}/kd-gpu-skeleton.XXXXXX")
trap 'rm -rf "$out"' EXIT
cargo build --locked --bins -q
# A Python without torch: parity cannot run, so check.sh exits 1 (INCOMPLETE) by design.
python=$(mktemp -d "${TMPDIR:-/tmp}/kd-gpu-py.XXXXXX")
trap 'rm -rf "$out" "$python"' EXIT
python3 -m venv --without-pip "$python" 2>/dev/null || python3 -m virtualenv -q --no-pip "$python"
set +e
OUT=$out KD_GPU_PYTHON=$python/bin/python bash tools/gpu/check.sh --device cpu --model fixture \
  --bins target/debug --no-build --budget-s 240 >"$out/check.log" 2>&1
rc=$?
set -e
r=$out/gpu-report.md
fail() { echo "gpu check skeleton: $*" >&2; cat "$r" "$out/check.log" >&2 2>/dev/null; exit 1; }
[ -f "$r" ] || fail "no report (check.sh exit $rc)"
[ "$rc" = 1 ] || fail "check.sh exit $rc; expected 1 (parity incomplete without references)"
grep -qE '^\| workload \| ours \| diffusers \| ratio \| limit \| result \|$' "$r" || fail "no table header"
for dt in f32 f16 bf16; do
  for m in text_encoder image_encoder prior unet movq; do
    grep -qE "^\| parity $m $dt .*\| skipped: " "$r" || fail "parity $m $dt row missing"
  done
done
grep -qE '^- parity: \*\*INCOMPLETE\*\*' "$r" || fail "parity verdict"
grep -qE '^\| text2img 64² 5\+10 steps, five services [^|]*\| [0-9.e+-]+ s \|' "$r" || fail "services row"
grep -qE '^\| text2img 64² 5\+10 steps, in-process [^|]*\| [0-9.e+-]+ s \|' "$r" || fail "in-process row"
grep -qE '^\| images/s, 8 concurrent requests \| [0-9.e+-]+ images/s \(8/8 ok\)' "$r" || fail "8 concurrent requests"
grep -qE '^\| services \| ran \|' "$r" || fail "services step did not run"
echo "gpu check skeleton: ok ($(grep -c '^| ' "$r") table rows)"
