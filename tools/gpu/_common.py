"""Shared helpers of the tools/gpu scripts (any torch + diffusers + transformers; stdlib otherwise).

Nothing here imports torch at module import time, so `report.py` and `gpumem.py` run on a bare
Python too.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def log(msg: str) -> None:
    print(f"[{Path(sys.argv[0]).stem}] {msg}", file=sys.stderr, flush=True)


class Emitter:
    """Appends one JSON object per line to a results file (and echoes it to stdout)."""

    def __init__(self, path: str | None):
        self.path = path

    def __call__(self, **obj) -> None:
        line = json.dumps(obj, sort_keys=True)
        print(line, flush=True)
        if self.path:
            with open(self.path, "a") as f:
                f.write(line + "\n")


def median(xs: list[float]) -> float:
    s = sorted(xs)
    if not s:
        return float("nan")
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def sync(device) -> None:
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def time_runs(fn, device, iters: int, max_s: float) -> tuple[float, list[float]]:
    """One warm-up, then up to `iters` timed runs (stopping once `max_s` has passed)."""
    t0 = time.perf_counter()
    fn()
    sync(device)
    warm = time.perf_counter() - t0
    times = []
    start = time.perf_counter()
    for _ in range(max(1, iters)):
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
        if time.perf_counter() - start > max_s:
            break
    return warm, times


def strict_fp32() -> None:
    """fp32 references in true fp32: no TF32 in matmuls or convolutions."""
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        torch.set_float32_matmul_precision("highest")
    except Exception:  # noqa: BLE001
        pass


def read_json(path) -> dict:
    return json.loads(Path(path).read_text())


def movq_scale_factor(decoder_dir) -> int:
    cfg = read_json(Path(decoder_dir) / "movq" / "config.json")
    return 2 ** (len(cfg["block_out_channels"]) - 1)


def quiet_libraries() -> None:
    import warnings

    warnings.filterwarnings("ignore")
    try:
        import diffusers

        diffusers.utils.logging.set_verbosity_error()
        diffusers.utils.logging.disable_progress_bar()
    except Exception:  # noqa: BLE001
        pass
    try:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except Exception:  # noqa: BLE001
        pass
