"""Times one decoder UNet step (CFG batch 2) with diffusers on the deep fixture UNet at a 64x64
latent, to compare with `cargo bench -p kd-models --bench unet_step` (candle).

    tools/reference/.venv/bin/python tools/reference/bench_unet.py [ITERS] [THREADS]

Loads tests/fixtures/deep/kandinsky-2-2-decoder/unet as fp32 (and as fp16 for a second row;
CPU fp16 in torch is usually slow), torch.set_num_threads(THREADS, default 2). Prints the
median ms/step over ITERS (default 10) after one warm-up. Not run by CI.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from diffusers import UNet2DConditionModel

REPO = Path(__file__).resolve().parents[2]
UNET = REPO / "tests/fixtures/deep/kandinsky-2-2-decoder/unet"


@torch.no_grad()
def bench(dtype: torch.dtype, iters: int) -> float:
    unet = UNet2DConditionModel.from_pretrained(UNET, torch_dtype=dtype).eval()
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn((2, 4, 64, 64), generator=gen).to(dtype)
    embeds = torch.randn((2, unet.config.encoder_hid_dim), generator=gen).to(dtype)
    t = torch.tensor(981)
    times = []
    for i in range(iters + 1):
        start = time.perf_counter()
        out = unet(sample, t, encoder_hidden_states=None,
                   added_cond_kwargs={"image_embeds": embeds}).sample
        out.float().sum().item()
        if i > 0:
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    iters = int(sys.argv[1]) if len(sys.argv) > 1 else 10
    threads = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    torch.set_num_threads(threads)
    print(f"diffusers deep UNet, batch 2 (CFG), latent 64x64, torch threads {threads}")
    for dtype in (torch.float32, torch.float16):
        print(f"{dtype}: {bench(dtype, iters):.1f} ms/step (median of {iters})")


if __name__ == "__main__":
    main()
