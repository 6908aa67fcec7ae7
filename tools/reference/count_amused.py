#!/usr/bin/env python3
"""Parameter and FLOP counts of the real aMUSEd configurations, to set expectations for a GPU.

No weights are needed: the models are built on torch's `meta` device from their configs and
the FLOPs of one forward are counted with `torch.utils.flop_counter` (a multiply-add = 2 FLOPs).

* VQ-GAN: the hub's `vqvae/config.json` (the same in amused-256 and amused-512).
* Text encoder: CLIP ViT-L/14's text tower with projection (hidden 768, 12 layers, 77 tokens).
* Transformer: `UVit2DModel`'s defaults are the aMUSEd values (hidden 1024, 22 layers, 16 heads,
  768-channel ConvNeXt blocks, 8192-entry codebook); amused-256 runs 16×16 tokens without
  down/upsampling, amused-512 runs 32×32 tokens downsampled to 16×16 (the model card: "after the
  model is trained on 256x256 images, downsampling and upsampling layers are added").

Prints one line per model part and the per-image totals for 12 steps with classifier-free
guidance (two transformer rows per step), then, for comparison, a Kandinsky 2.2 image at the
same sizes with the real configs of `tools/gpu/make_checkpoint.py` (text tower, prior 25 steps,
UNet 50 steps, both with classifier-free guidance, MoVQ decode). Never run by CI.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from diffusers import PriorTransformer, UNet2DConditionModel, UVit2DModel, VQModel
from transformers import CLIPTextConfig, CLIPTextModelWithProjection

VQ = dict(act_fn="silu", block_out_channels=[128, 256, 256, 512, 768],
          down_block_types=["DownEncoderBlock2D"] * 5, in_channels=3, latent_channels=64,
          layers_per_block=2, lookup_from_codebook=True, mid_block_add_attention=False,
          norm_num_groups=32, norm_type="group", num_vq_embeddings=8192, out_channels=3,
          sample_size=32, up_block_types=["UpDecoderBlock2D"] * 5, force_upcast=True)
CLIP_L = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                        num_hidden_layers=12, projection_dim=768, vocab_size=49408)


def params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def flops(fn) -> int:
    with FlopCounterMode(display=False) as f:
        fn()
    return f.get_total_flops()


@torch.no_grad()
def main() -> None:
    dev = torch.device("meta")
    with dev:
        vq = VQModel(**VQ).eval()
        clip = CLIPTextModelWithProjection(CLIP_L).eval()
    print(f"vqvae          params {params(vq) / 1e6:8.1f} M")
    print(f"text_encoder   params {params(clip) / 1e6:8.1f} M")
    ids = torch.zeros((1, 77), dtype=torch.long, device=dev)
    f_clip = flops(lambda: clip(ids, output_hidden_states=True))
    print(f"text_encoder   1 prompt           {f_clip / 1e9:8.1f} GFLOP")
    for name, side, down in [("amused-256", 256, False), ("amused-512", 512, True)]:
        hw = side // 16
        with dev:
            t = UVit2DModel(sample_size=hw, downsample=down, upsample=down).eval()
        tokens = torch.zeros((2, hw, hw), dtype=torch.long, device=dev)
        ehs = torch.zeros((2, 77, 768), device=dev)
        pooled = torch.zeros((2, 768), device=dev)
        micro = torch.zeros((2, 5), device=dev)
        f_step = flops(lambda: t(tokens, ehs, pooled, micro))
        idx = torch.zeros((1, hw, hw), dtype=torch.long, device=dev)
        f_dec = flops(lambda: vq.decode(idx, force_not_quantize=True, shape=(1, hw, hw, 64)))
        total = 2 * f_clip + 12 * f_step + f_dec
        print(f"{name}     transformer params {params(t) / 1e6:8.1f} M; "
              f"one CFG step (2 rows of {hw}x{hw} tokens) {f_step / 1e9:8.1f} GFLOP; "
              f"VQ decode {f_dec / 1e9:8.1f} GFLOP; "
              f"image (2 prompts + 12 steps + decode) {total / 1e12:6.2f} TFLOP; "
              f"all params {(params(t) + params(vq) + params(clip)) / 1e6:8.1f} M")


@torch.no_grad()
def kandinsky22() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "gpu"))
    import make_checkpoint as mc  # the real Kandinsky 2.2 configs

    dev = torch.device("meta")
    with dev:
        unet = UNet2DConditionModel(**mc.UNET_FULL).eval()
        movq = VQModel(**mc.MOVQ_FULL).eval()
        prior = PriorTransformer(**mc.PRIOR_FULL).eval()
        text = CLIPTextModelWithProjection(CLIPTextConfig(**mc.TEXT_FULL)).eval()
    ids = torch.zeros((1, 77), dtype=torch.long, device=dev)
    f_text = flops(lambda: text(ids))
    emb = torch.zeros((2, 1280), device=dev)
    f_prior = flops(lambda: prior(emb, torch.tensor([1, 1], device=dev), proj_embedding=emb,
                                  encoder_hidden_states=torch.zeros((2, 77, 1280), device=dev),
                                  attention_mask=torch.ones((2, 77), dtype=torch.bool, device=dev)))
    total_p = params(unet) + params(movq) + params(prior) + params(text)
    print(f"kandinsky-2-2  params {total_p / 1e6:8.1f} M (unet {params(unet) / 1e6:.1f}, movq "
          f"{params(movq) / 1e6:.1f}, prior {params(prior) / 1e6:.1f}, text {params(text) / 1e6:.1f})")
    for side in (256, 512):
        lat = side // 8
        x = torch.zeros((2, 4, lat, lat), device=dev)
        f_unet = flops(lambda: unet(x, torch.tensor([1, 1], device=dev), encoder_hidden_states=None,
                                    added_cond_kwargs={"image_embeds": emb}))
        z = torch.zeros((1, 4, lat, lat), device=dev)
        f_movq = flops(lambda: movq.decode(z, force_not_quantize=True))
        total = 2 * f_text + 25 * f_prior + 50 * f_unet + f_movq
        print(f"kandinsky-2-2  {side}x{side}: one CFG UNet step {f_unet / 1e9:8.1f} GFLOP; prior step "
              f"{f_prior / 1e9:6.1f} GFLOP; MoVQ decode {f_movq / 1e9:8.1f} GFLOP; image (2 prompts + "
              f"25 prior + 50 UNet steps + decode) {total / 1e12:6.2f} TFLOP")


if __name__ == "__main__":
    main()
    kandinsky22()
