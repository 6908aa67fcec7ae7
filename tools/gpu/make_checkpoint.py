#!/usr/bin/env python3
"""Makes a random-weight Kandinsky 2.2 checkpoint pair in the official diffusers folder layout.

    python tools/gpu/make_checkpoint.py --out DIR [--size full|small] [--device cuda] [--seed 0]

writes DIR/kandinsky-2-2-prior/ (prior, text_encoder, image_encoder, tokenizer, scheduler,
image_processor, model_index.json) and DIR/kandinsky-2-2-decoder/ (unet, movq, scheduler,
model_index.json), every weight file fp16 safetensors.

`--size full` uses the real configs of kandinsky-community/kandinsky-2-2-{prior,decoder}
(../shared/docs/kandinsky22-spec.md §3.2-3.4, §4.1, §5.1; 4.89 B parameters, ~9.8 GB fp16):
build it on the GPU (`--device cuda`, ~1 min). `--size small` keeps every block type but shrinks
widths and depths (~30 M parameters), to test the full-size path on a CPU.

The models are built with their own random init and then every parameter is perturbed (as
tools/reference/common.py does for the fixtures) so that no norm is an identity and no embedding
is zero; `clip_std` is set around 1 so that the prior output has a realistic scale. Tokenizer,
image processor and scheduler configs are the real ones (copied from tests/fixtures).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import FIXTURES, log, quiet_libraries  # noqa: E402

# --- real configs (spec §4.1, §5.1, §3.4, §3.2, §3.3) ------------------------------------------
UNET_FULL = {
    "act_fn": "silu",
    "addition_embed_type": "image",
    "addition_embed_type_num_heads": 64,
    "attention_head_dim": 64,
    "block_out_channels": [384, 768, 1152, 1536],
    "down_block_types": [
        "ResnetDownsampleBlock2D",
        "SimpleCrossAttnDownBlock2D",
        "SimpleCrossAttnDownBlock2D",
        "SimpleCrossAttnDownBlock2D",
    ],
    "up_block_types": [
        "SimpleCrossAttnUpBlock2D",
        "SimpleCrossAttnUpBlock2D",
        "SimpleCrossAttnUpBlock2D",
        "ResnetUpsampleBlock2D",
    ],
    "mid_block_type": "UNetMidBlock2DSimpleCrossAttn",
    "layers_per_block": 3,
    "cross_attention_dim": 768,
    "encoder_hid_dim": 1280,
    "encoder_hid_dim_type": "image_proj",
    "in_channels": 4,
    "out_channels": 8,
    "resnet_time_scale_shift": "scale_shift",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "time_embedding_type": "positional",
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False,
    "class_embed_type": None,
    "center_input_sample": False,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "dropout": 0.0,
    "only_cross_attention": False,
    "cross_attention_norm": None,
    "num_attention_heads": None,
    "sample_size": 64,
    "use_linear_projection": False,
    "upcast_attention": False,
}
MOVQ_FULL = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 256, 512],
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 3 + ["AttnDownEncoderBlock2D"],
    "up_block_types": ["AttnUpDecoderBlock2D"] + ["UpDecoderBlock2D"] * 3,
    "latent_channels": 4,
    "vq_embed_dim": 4,
    "num_vq_embeddings": 16384,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "norm_type": "spatial",
    "sample_size": 32,
    "scaling_factor": 0.18215,
    "mid_block_add_attention": True,
    "lookup_from_codebook": False,
    "force_upcast": False,
}
PRIOR_FULL = {
    "num_attention_heads": 32,
    "attention_head_dim": 64,
    "num_layers": 20,
    "embedding_dim": 1280,
    "num_embeddings": 77,
    "additional_embeddings": 4,
    "dropout": 0.0,
    "time_embed_act_fn": "silu",
    "norm_in_type": None,
    "embedding_proj_norm_type": None,
    "encoder_hid_proj_type": "linear",
    "added_emb_type": "prd",
    "time_embed_dim": None,
    "embedding_proj_dim": None,
    "clip_embed_dim": None,
}
TEXT_FULL = {
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "max_position_embeddings": 77,
    "vocab_size": 49408,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-5,
    "projection_dim": 1280,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}
VISION_FULL = {
    "hidden_size": 1664,
    "intermediate_size": 8192,
    "num_hidden_layers": 48,
    "num_attention_heads": 16,
    "image_size": 224,
    "patch_size": 14,
    "num_channels": 3,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-5,
    "projection_dim": 1280,
}
# Parameter counts of the real models (spec §10): checked after building the full size.
FULL_PARAMS = {
    "unet": 1_253_057_288,
    "movq": 67_832_495,
    "prior": 1_026_225_920,
    "text_encoder": 694_659_840,
    "image_encoder": 1_844_907_264,
}


def small_configs():
    """Every block type of the real configs, narrower and shallower (CLIP width 256)."""
    unet = dict(UNET_FULL, block_out_channels=[64, 128, 192, 256], layers_per_block=1,
                cross_attention_dim=128, encoder_hid_dim=256)
    movq = dict(MOVQ_FULL, block_out_channels=[32, 64, 64, 128], num_vq_embeddings=64)
    prior = dict(PRIOR_FULL, num_attention_heads=4, num_layers=2, embedding_dim=256)
    text = dict(TEXT_FULL, hidden_size=256, intermediate_size=1024, num_hidden_layers=2,
                num_attention_heads=4, projection_dim=256)
    vision = dict(VISION_FULL, hidden_size=256, intermediate_size=1024, num_hidden_layers=2,
                  num_attention_heads=4, projection_dim=256)
    return unet, movq, prior, text, vision


def perturb(module, seed: int, scale: float = 0.1) -> None:
    """Gaussian noise on every float parameter, scaled to its own std (or `scale` if constant)."""
    import torch

    with torch.no_grad():
        for i, (_, p) in enumerate(sorted(module.named_parameters(), key=lambda kv: kv[0])):
            if not p.dtype.is_floating_point:
                continue
            gen = torch.Generator(device=p.device).manual_seed(seed * 100_003 + i)
            std = p.float().std().item() if p.numel() > 1 else 0.0
            s = scale * (std if std > 1e-6 else 1.0)
            p.add_(torch.randn(p.shape, generator=gen, device=p.device, dtype=torch.float32).to(p.dtype) * s)


def copy_resolved(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for f in sorted(src.iterdir()):
        shutil.copyfile(f.resolve(), dst / f.name)


def n_params(m) -> int:
    return sum(p.numel() for p in m.parameters())


def save(model, path: Path, name: str, counts: dict) -> None:
    import torch

    counts[name] = n_params(model)
    t = time.time()
    model.to(torch.float16).save_pretrained(str(path), safe_serialization=True)
    log(f"{name}: {counts[name]:,} parameters -> {path} ({time.time() - t:.1f} s)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--size", choices=["full", "small"], default="full")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", default="", help="comma-separated subset (debugging)")
    a = ap.parse_args()

    import torch
    from diffusers import PriorTransformer, UNet2DConditionModel, VQModel
    from transformers import (CLIPTextConfig, CLIPTextModelWithProjection, CLIPVisionConfig,
                              CLIPVisionModelWithProjection)

    quiet_libraries()
    torch.manual_seed(a.seed)
    dev = torch.device(a.device)
    unet_cfg, movq_cfg, prior_cfg, text_cfg, vision_cfg = (
        (UNET_FULL, MOVQ_FULL, PRIOR_FULL, TEXT_FULL, VISION_FULL) if a.size == "full" else small_configs()
    )
    only = set(filter(None, a.only.split(",")))
    want = lambda n: not only or n in only  # noqa: E731

    prior_root = a.out / "kandinsky-2-2-prior"
    dec_root = a.out / "kandinsky-2-2-decoder"
    src_prior = FIXTURES / "tiny" / "kandinsky-2-2-prior"
    src_dec = FIXTURES / "deep" / "kandinsky-2-2-decoder"
    for root in (prior_root, dec_root):
        if root.exists():
            shutil.rmtree(root)
        root.mkdir(parents=True)
    # Real tokenizer (CLIP BPE 49408), image processor and scheduler configs; same model_index.
    copy_resolved(src_prior / "tokenizer", prior_root / "tokenizer")
    copy_resolved(src_prior / "image_processor", prior_root / "image_processor")
    copy_resolved(src_prior / "scheduler", prior_root / "scheduler")
    shutil.copyfile((src_prior / "model_index.json").resolve(), prior_root / "model_index.json")
    copy_resolved(src_dec / "scheduler", dec_root / "scheduler")
    shutil.copyfile((src_dec / "model_index.json").resolve(), dec_root / "model_index.json")

    counts: dict[str, int] = {}
    t0 = time.time()
    with torch.device(dev):
        if want("unet"):
            m = UNet2DConditionModel(**unet_cfg)
            perturb(m, a.seed + 1)
            save(m, dec_root / "unet", "unet", counts)
            del m
        if want("movq"):
            m = VQModel(**movq_cfg)
            perturb(m, a.seed + 2)
            save(m, dec_root / "movq", "movq", counts)
            del m
        if want("prior"):
            m = PriorTransformer(**prior_cfg)
            perturb(m, a.seed + 3)
            with torch.no_grad():
                m.clip_std.copy_(1.0 + 0.1 * torch.randn_like(m.clip_std))
            save(m, prior_root / "prior", "prior", counts)
            del m
        if want("text_encoder"):
            m = CLIPTextModelWithProjection(CLIPTextConfig(**text_cfg))
            perturb(m, a.seed + 4)
            save(m, prior_root / "text_encoder", "text_encoder", counts)
            del m
        if want("image_encoder"):
            m = CLIPVisionModelWithProjection(CLIPVisionConfig(**vision_cfg))
            perturb(m, a.seed + 5)
            save(m, prior_root / "image_encoder", "image_encoder", counts)
            del m
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    bad = {k: (v, FULL_PARAMS[k]) for k, v in counts.items() if a.size == "full" and v != FULL_PARAMS[k]}
    summary = {"size": a.size, "params": counts, "seconds": round(time.time() - t0, 1), "mismatch": bad}
    (a.out / "checkpoint.json").write_text(json.dumps(summary, indent=2) + "\n")
    log(json.dumps(summary))
    if bad:
        log(f"parameter counts differ from the real models: {bad}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
