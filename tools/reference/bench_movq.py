"""diffusers MoVQ decode time and peak RSS on the deep fixture config, for comparison with
`crates/kd-models/benches/movq_decode.rs`. Same latents formula, f32, CPU, 2 torch threads.

    tools/reference/.venv/bin/python tools/reference/bench_movq.py [--cases 64,128] [--reps 2]

Each case runs in a child process so that its peak RSS (ru_maxrss) is its own.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import time

from common import FIXTURES


def child(side: int, reps: int) -> None:
    import torch
    from diffusers import VQModel

    torch.set_num_threads(2)
    movq = VQModel.from_pretrained(FIXTURES / "deep" / "kandinsky-2-2-decoder" / "movq", torch_dtype=torch.float32)
    movq.eval()
    i = torch.arange(4 * side * side, dtype=torch.float32)
    z = (torch.sin(i * 0.013) + 0.3 * torch.cos((i % side) * 0.2)).reshape(1, 4, side, side)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    cpu0 = time.process_time()
    with torch.no_grad():
        for _ in range(reps):
            t = time.perf_counter()
            img = movq.decode(z, force_not_quantize=True).sample
            float(img.sum())
            times.append(time.perf_counter() - t)
    cpu = (time.process_time() - cpu0) / reps
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(
        f"RESULT latent={side}x{side} image={side*8}x{side*8} reps={reps} best_s={min(times):.3f} "
        f"mean_s={sum(times)/len(times):.3f} cpu_s_per_decode={cpu:.2f} peak_rss_before_decode_mib={base/1024:.0f} peak_rss_mib={peak/1024:.0f}"
    )


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--cases", default="64,128")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--child", type=int)
    a = p.parse_args()
    if a.child:
        child(a.child, a.reps)
        return
    print("diffusers VQModel.decode, deep fixture config, f32, CPU, torch threads 2")
    for c in a.cases.split(","):
        out = subprocess.run(
            [sys.executable, __file__, "--child", c, "--reps", str(a.reps)],
            capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
        lines = [l for l in out.stdout.splitlines() if l.startswith("RESULT")]
        print(lines[0] if lines else f"case {c} failed: {out.stderr.strip().splitlines()[-1:]}")


if __name__ == "__main__":
    main()
