#!/usr/bin/env python3
"""fp32 diffusers/transformers references of every module for fixed seeded inputs.

    python tools/gpu/reference.py --prior-dir P --decoder-dir D --out REFS \
        [--device cuda] [--size-a 512] [--size-b 768] [--seed 0]

Writes REFS/<module>.safetensors for text_encoder, image_encoder, prior, unet, movq — inputs as
`in.<name>`, fp32 reference outputs as `out.<name>` — and REFS/manifest.json, which names the
files and the timing workloads (shapes) that `kd-gpucheck modules` and `bench_diffusers.py` run:

  unet_a  UNet step, batch 2 (CFG), image size A    unet_b  the same at size B
  movq_a  MoVQ decode of one image of size A        prior_step  prior forward, batch 2 (CFG)
  text_encoder  CLIP text tower, batch 2
  (with --cpu-workloads also movq_b, a MoVQ decode at size B, and image_encoder, CLIP vision)

Inputs are drawn on the CPU from a seeded generator (the same on any device); the references are
computed on --device in fp32 with TF32 off, one module loaded at a time, from the (fp16) weight
files upcast to fp32 — the same values the Rust side loads. The parity input of the UNet is the
size-A workload (latent A/8, batch 2); of the MoVQ a size-A decode; the prior sees the CLIP text
outputs of [prompt, ""].
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import log, movq_scale_factor, quiet_libraries, strict_fp32  # noqa: E402

PROMPT = "a photo of a red fox in the snow"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prior-dir", required=True, type=Path)
    ap.add_argument("--decoder-dir", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--size-a", type=int, default=512)
    ap.add_argument("--size-b", type=int, default=768)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timestep", type=int, default=500)
    ap.add_argument("--cpu-workloads", action="store_true",
                    help="also time a MoVQ decode at size B (movq_b) and the CLIP vision tower "
                         "(image_encoder), as `make bench-cpu` reports them")
    a = ap.parse_args()

    import torch
    from diffusers import PriorTransformer, UNet2DConditionModel, VQModel
    from safetensors.torch import save_file
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer, CLIPVisionModelWithProjection

    quiet_libraries()
    strict_fp32()
    dev = torch.device(a.device)
    f32 = torch.float32
    a.out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(a.seed)
    sf = movq_scale_factor(a.decoder_dir)
    la, lb = a.size_a // sf, a.size_b // sf
    t_all = time.time()

    def save(name: str, inputs: dict, outputs: dict) -> None:
        tensors = {f"in.{k}": v.detach().cpu().contiguous() for k, v in inputs.items()}
        tensors.update({f"out.{k}": v.detach().float().cpu().contiguous() for k, v in outputs.items()})
        save_file(tensors, str(a.out / f"{name}.safetensors"))
        bad = [k for k, v in outputs.items() if not torch.isfinite(v).all()]
        log(f"{name}: " + ", ".join(f"{k} {tuple(v.shape)}" for k, v in outputs.items())
            + (f"  NON-FINITE: {bad}" if bad else ""))

    def free(*ms) -> None:
        for m in ms:
            del m
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()

    # CLIP text tower on [prompt, ""] (the prior's cond/uncond rows).
    t = time.time()
    tok = CLIPTokenizer.from_pretrained(str(a.prior_dir / "tokenizer"))
    enc = tok([PROMPT, ""], padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt")
    ids, mask = enc.input_ids.to(torch.int64), enc.attention_mask.to(torch.int64)
    te = CLIPTextModelWithProjection.from_pretrained(str(a.prior_dir / "text_encoder"), torch_dtype=f32).to(dev).eval()
    with torch.no_grad():
        o = te(ids.to(dev))
    text_embeds, hidden = o.text_embeds.float().cpu(), o.last_hidden_state.float().cpu()
    save("text_encoder", {"input_ids": ids}, {"text_embeds": text_embeds, "last_hidden_state": hidden})
    free(te)
    log(f"text_encoder done in {time.time() - t:.1f} s")

    # CLIP vision tower on one random preprocessed image.
    t = time.time()
    ie = CLIPVisionModelWithProjection.from_pretrained(str(a.prior_dir / "image_encoder"), torch_dtype=f32).to(dev).eval()
    size = ie.config.image_size
    px = torch.randn((1, 3, size, size), generator=gen) * 0.5
    with torch.no_grad():
        emb = ie(px.to(dev)).image_embeds
    save("image_encoder", {"pixel_values": px}, {"image_embeds": emb})
    free(ie)
    log(f"image_encoder done in {time.time() - t:.1f} s")

    # Prior transformer, batch 2 (CFG layout uncond/cond does not matter for one forward).
    t = time.time()
    prior = PriorTransformer.from_pretrained(str(a.prior_dir / "prior"), torch_dtype=f32).to(dev).eval()
    d = prior.config.embedding_dim
    hs = torch.randn((2, d), generator=gen)
    with torch.no_grad():
        out = prior(hs.to(dev), timestep=a.timestep, proj_embedding=text_embeds.to(dev),
                    encoder_hidden_states=hidden.to(dev), attention_mask=mask.bool().to(dev)).predicted_image_embedding
    save("prior", {"hidden_states": hs, "proj_embedding": text_embeds, "encoder_hidden_states": hidden,
                   "attention_mask": mask}, {"predicted_image_embedding": out})
    free(prior)
    log(f"prior done in {time.time() - t:.1f} s")

    # Decoder UNet, batch 2 at size A.
    t = time.time()
    unet = UNet2DConditionModel.from_pretrained(str(a.decoder_dir / "unet"), torch_dtype=f32).to(dev).eval()
    e = unet.config.encoder_hid_dim
    sample = torch.randn((2, unet.config.in_channels, la, la), generator=gen)
    image_embeds = torch.randn((2, e), generator=gen)
    with torch.no_grad():
        out = unet(sample.to(dev), a.timestep, encoder_hidden_states=None,
                   added_cond_kwargs={"image_embeds": image_embeds.to(dev)}).sample
    save("unet", {"sample": sample, "image_embeds": image_embeds}, {"sample": out})
    free(unet)
    log(f"unet done in {time.time() - t:.1f} s")

    # MoVQ decode of one size-A image.
    t = time.time()
    movq = VQModel.from_pretrained(str(a.decoder_dir / "movq"), torch_dtype=f32).to(dev).eval()
    z = torch.randn((1, movq.config.latent_channels, la, la), generator=gen)
    with torch.no_grad():
        img = movq.decode(z.to(dev), force_not_quantize=True).sample
    save("movq", {"latents": z}, {"decoded": img})
    free(movq)
    log(f"movq done in {time.time() - t:.1f} s")

    A, B = a.size_a, a.size_b
    manifest = {
        "seed": a.seed,
        "prompt": PROMPT,
        "size_a": A,
        "size_b": B,
        "movq_scale_factor": sf,
        "device": a.device,
        "modules": {
            "text_encoder": {"file": "text_encoder.safetensors", "label": "CLIP text, batch 2"},
            "image_encoder": {"file": "image_encoder.safetensors", "label": "CLIP vision, batch 1"},
            "prior": {"file": "prior.safetensors", "label": "batch 2", "timestep": a.timestep},
            "unet": {"file": "unet.safetensors", "label": f"{A}², batch 2", "timestep": a.timestep},
            "movq": {"file": "movq.safetensors", "label": f"decode {A}²"},
        },
        "timing": {
            "unet_a": {"module": "unet", "batch": 2, "latent": la, "image": A,
                       "label": f"UNet step {A}² CFG (batch 2)"},
            "unet_b": {"module": "unet", "batch": 2, "latent": lb, "image": B,
                       "label": f"UNet step {B}² CFG (batch 2)"},
            "movq_a": {"module": "movq", "batch": 1, "latent": la, "image": A, "label": f"MoVQ decode {A}²"},
            "prior_step": {"module": "prior", "batch": 2, "label": "prior step (CFG, batch 2)"},
            "text_encoder": {"module": "text_encoder", "batch": 2, "label": "CLIP text encode (batch 2)"},
        },
        "seconds": round(time.time() - t_all, 1),
    }
    if a.cpu_workloads:
        manifest["timing"]["movq_b"] = {"module": "movq", "batch": 1, "latent": lb, "image": B,
                                        "label": f"MoVQ decode {B}²"}
        manifest["timing"]["image_encoder"] = {"module": "image_encoder", "batch": 1,
                                               "label": "CLIP vision encode (1 image)"}
    (a.out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    log(f"references in {a.out} ({manifest['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
