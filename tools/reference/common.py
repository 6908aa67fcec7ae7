"""Shared helpers for the diffusers reference-fixture generators.

Never run by CI. `make fixtures` runs the generators, which import this module.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures"


def seed_all(seed: int = 0) -> None:
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)


@torch.no_grad()
def perturb(module: torch.nn.Module, seed: int, scale: float = 0.1) -> None:
    """Moves every parameter away from its init so that no layer is an identity or zero.

    diffusers initialises norms to weight 1 / bias 0 and some projections to zero; a parity test
    over such weights could pass with a layer missing. Every float parameter gets Gaussian noise
    scaled to its own magnitude (or `scale` where it is all zeros).
    """
    gen = torch.Generator().manual_seed(seed)
    for _, p in sorted(module.named_parameters(), key=lambda kv: kv[0]):
        if not p.dtype.is_floating_point:
            continue
        std = p.float().std().item() if p.numel() > 1 else 0.0
        s = scale * (std if std > 1e-6 else 1.0)
        p.add_(torch.randn(p.shape, generator=gen).to(p.dtype) * s)


def save_reference(path: Path, tensors: dict[str, torch.Tensor], meta: dict | None = None) -> None:
    """Writes `<path>.safetensors` (contiguous CPU tensors) and, if given, `<path>.json`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    out = {}
    for k, v in tensors.items():
        if not isinstance(v, torch.Tensor):
            v = torch.tensor(v)
        if v.dtype == torch.bool:
            v = v.to(torch.int64)
        if v.dim() == 0:
            v = v.reshape(1)
        out[k] = v.detach().to("cpu").contiguous()
    save_file(out, str(path.with_suffix(".safetensors")))
    if meta is not None:
        path.with_suffix(".json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


@contextlib.contextmanager
def record_noise():
    """Records, in draw order, every tensor diffusers draws through `randn_tensor`.

    Pipelines and schedulers import `randn_tensor` into their own module namespace, so every
    loaded `diffusers.*` module holding the original function is patched. Yields the list that
    receives the draws; the Rust tests replay them in the same order.
    """
    from diffusers.utils import torch_utils

    original = torch_utils.randn_tensor
    drawn: list[torch.Tensor] = []

    def recording(*args, **kwargs):
        t = original(*args, **kwargs)
        drawn.append(t.detach().clone())
        return t

    patched = []
    for name, mod in list(sys.modules.items()):
        if name.startswith("diffusers") and getattr(mod, "randn_tensor", None) is original:
            setattr(mod, "randn_tensor", recording)
            patched.append(mod)
    try:
        yield drawn
    finally:
        for mod in patched:
            setattr(mod, "randn_tensor", original)


def dir_size_mb(path: Path) -> float:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            total += os.path.getsize(os.path.join(root, f))
    return total / 1e6
