#!/usr/bin/env bash
# `make demo`: build, start the whole stack on the bundled small model, generate one image, stop.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-demo.png}
cargo build --locked --bins -q
bin=target/debug
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])' 2>/dev/null || echo 50151)
log=$(mktemp)
"$bin/kd" up --listen "127.0.0.1:$port" >"$log" 2>&1 &
up=$!
trap 'kill -TERM $up 2>/dev/null || true; wait $up 2>/dev/null || true' EXIT
for _ in $(seq 1 600); do
  grep -q "kandinsky-serve is up" "$log" && break
  kill -0 $up 2>/dev/null || { cat "$log"; echo "kd up exited"; exit 1; }
  sleep 0.5
done
grep -q "kandinsky-serve is up" "$log" || { cat "$log"; echo "the stack did not come up"; exit 1; }
echo "stack is up on 127.0.0.1:$port; generating $OUT"
"$bin/kd" generate "a red cat, 4k photo" --gateway "http://127.0.0.1:$port" \
  --width 256 --height 256 --seed 42 --prior-steps 10 --steps 20 -o "$OUT"
echo "done: $OUT (a random-weight model: expect colourful noise, not a cat)"
