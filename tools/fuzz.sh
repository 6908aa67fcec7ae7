#!/usr/bin/env bash
# make fuzz: builds the cargo-fuzz targets in fuzz/ (nightly, AddressSanitizer) and runs each for
# FUZZ_SECONDS (default 60) from the committed seeds in fuzz/seeds/<target>/. New inputs go to a
# scratch corpus under .cache/fuzz/, never into the tree. A crash fails the run and leaves its
# input in fuzz/artifacts/<target>/ (make it a unit test, then fix it). Installs cargo-fuzz when
# missing; needs the nightly toolchain (rustup's `nightly`).
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_EACH=${FUZZ_SECONDS:-60}
# The instrumented build lives outside the clone, so a fresh clone on the same machine reuses it.
TARGET_DIR=${KD_FUZZ_TARGET_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/kandinsky-serve/fuzz-target}
TARGETS=(wire_tensor generate_request image_decode tokenize pickle_weights spm_model)

rustup run nightly rustc --version >/dev/null 2>&1 \
  || { echo "fuzz: the nightly toolchain is missing (rustup toolchain install nightly)" >&2; exit 2; }
if ! cargo fuzz --version >/dev/null 2>&1; then
  cargo install cargo-fuzz --locked --version 0.13.2
fi
cd fuzz
cargo +nightly fuzz build -O --target-dir "$TARGET_DIR"
summary=()
for t in "${TARGETS[@]}"; do
  corpus="../.cache/fuzz/corpus/$t"
  mkdir -p "$corpus"
  log="../.cache/fuzz/$t.log"
  echo "== fuzz $t (${SECONDS_EACH} s)"
  if ! cargo +nightly fuzz run -O --target-dir "$TARGET_DIR" "$t" "$corpus" "seeds/$t" -- \
      -max_total_time="$SECONDS_EACH" -rss_limit_mb=4096 -timeout=20 -print_final_stats=1 \
      >"$log" 2>&1; then
    tail -n 60 "$log"
    echo "fuzz: $t found a crash (input in fuzz/artifacts/$t/)" >&2
    exit 1
  fi
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n1)
  summary+=("$t execs=${execs:-?}")
done
echo "fuzz: ${summary[*]}"
