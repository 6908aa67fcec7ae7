#!/usr/bin/env python3
"""The check's workloads in diffusers (the comparison column of tools/gpu/check.sh's report).

    python tools/gpu/bench_diffusers.py --prior-dir P --decoder-dir D --refs REFS --results FILE \
        [--device cuda] [--dtype fp16] [--parts modules,pipeline,batch] [--size 512] \
        [--prior-steps 25] [--steps 50] [--batch 8] [--iters 5] [--max-seconds 20]

* `modules`: the timing workloads of REFS/manifest.json (UNet step at sizes A and B, MoVQ decode,
  prior step, CLIP text encode), each module loaded alone, median of --iters after a warm-up; and
  the peak memory of each stage (torch.cuda.max_memory_allocated over the stage's size-A workload
  with only that stage's weights loaded: text_encoder; prior = prior + image encoder, zero-image
  embedding included; denoiser = UNet; movq).
* `pipeline`: KandinskyV22PriorPipeline + KandinskyV22Pipeline, one prompt, --size², --prior-steps
  + --steps, CFG 4 on both (diffusers' defaults), after a 2+2-step warm-up.
* `batch`: the same with --batch prompts in one call (images/s).

Attention is whatever diffusers picks by default (SDPA: AttnProcessor2_0 / AttnAddedKVProcessor2_0
on torch 2). Results are JSON lines appended to --results.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Emitter, log, median, quiet_libraries, read_json, sync, time_runs  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prior-dir", required=True, type=Path)
    ap.add_argument("--decoder-dir", required=True, type=Path)
    ap.add_argument("--refs", required=True, type=Path)
    ap.add_argument("--results", default=None)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default="fp16")
    ap.add_argument("--parts", default="modules,pipeline,batch")
    ap.add_argument("--modules", default="text_encoder,prior,unet,movq",
                    help="stages the `modules` part loads (prior = prior transformer + CLIP vision; "
                         "image_encoder is an alias of prior)")
    ap.add_argument("--size", type=int, default=None, help="pipeline image side (default: manifest size_a)")
    ap.add_argument("--prior-steps", type=int, default=25)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--max-seconds", type=float, default=20.0)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    a = ap.parse_args()

    import torch

    quiet_libraries()
    if a.threads:
        torch.set_num_threads(a.threads)
    emit = Emitter(a.results)
    dev = torch.device(a.device)
    dt = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[a.dtype]
    cuda = dev.type == "cuda"
    manifest = read_json(a.refs / "manifest.json")
    parts = set(a.parts.split(","))
    stages = {"prior" if m == "image_encoder" else m for m in a.modules.split(",")}
    size = a.size or manifest["size_a"]
    common = {"impl": "diffusers", "dtype": a.dtype, "device": a.device}

    def free():
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()

    def reset_peak():
        if cuda:
            sync(dev)
            torch.cuda.reset_peak_memory_stats()

    def peak(stage: str, what: str):
        if cuda:
            sync(dev)
            emit(kind="mem", stage=stage, what=what,
                 peak_mib=torch.cuda.max_memory_allocated() / 2**20,
                 reserved_mib=torch.cuda.max_memory_reserved() / 2**20, **common)

    def timed(name: str, fn):
        spec = manifest["timing"][name]
        warm, times = time_runs(fn, dev, a.iters, a.max_seconds)
        log(f"{name} {a.dtype}: {median(times):.4f} s median of {len(times)} (warm-up {warm:.2f} s)")
        emit(kind="time", workload=name, label=spec["label"], median_s=median(times), times_s=times,
             warmup_s=warm, **common)

    def workloads(module: str):
        return sorted(k for k, v in manifest["timing"].items() if v["module"] == module)

    def refs(module: str):
        from safetensors.torch import load_file

        return load_file(str(a.refs / manifest["modules"][module]["file"]))

    if "modules" in parts:
        from diffusers import PriorTransformer, UNet2DConditionModel, VQModel
        from transformers import CLIPTextModelWithProjection, CLIPVisionModelWithProjection

        with torch.no_grad():
            # CLIP text tower.
            if "text_encoder" in stages:
                t = time.time()
                te = CLIPTextModelWithProjection.from_pretrained(str(a.prior_dir / "text_encoder"), torch_dtype=dt).to(dev).eval()
                emit(kind="load", stage="text_encoder", seconds=time.time() - t, **common)
                ids = refs("text_encoder")["in.input_ids"].to(dev)
                reset_peak()
                te(ids)
                peak("text_encoder", "CLIP text, batch 2")
                for w in workloads("text_encoder"):
                    timed(w, lambda: te(ids))
                del te
                free()

            # Prior stage: prior transformer + vision tower (the zero-image embedding).
            if "prior" in stages:
                t = time.time()
                prior = PriorTransformer.from_pretrained(str(a.prior_dir / "prior"), torch_dtype=dt).to(dev).eval()
                ie = CLIPVisionModelWithProjection.from_pretrained(str(a.prior_dir / "image_encoder"), torch_dtype=dt).to(dev).eval()
                emit(kind="load", stage="prior", seconds=time.time() - t, **common)
                r = refs("prior")
                hs, proj, ehs = (r[f"in.{k}"].to(dev, dt) for k in ("hidden_states", "proj_embedding", "encoder_hidden_states"))
                mask = r["in.attention_mask"].to(dev).bool()
                ts = manifest["modules"]["prior"].get("timestep", 500)
                s = ie.config.image_size
                reset_peak()
                ie(torch.zeros((1, 3, s, s), device=dev, dtype=dt))
                prior(hs, timestep=ts, proj_embedding=proj, encoder_hidden_states=ehs, attention_mask=mask)
                peak("prior", "zero-image embedding + prior step, batch 2")
                if workloads("image_encoder"):
                    px = refs("image_encoder")["in.pixel_values"].to(dev, dt)
                    for w in workloads("image_encoder"):
                        timed(w, lambda: ie(px))
                for w in workloads("prior"):
                    timed(w, lambda: prior(hs, timestep=ts, proj_embedding=proj, encoder_hidden_states=ehs,
                                           attention_mask=mask))
                del prior, ie
                free()

            # Decoder UNet.
            if "unet" in stages:
                t = time.time()
                unet = UNet2DConditionModel.from_pretrained(str(a.decoder_dir / "unet"), torch_dtype=dt).to(dev).eval()
                emit(kind="load", stage="denoiser", seconds=time.time() - t, **common)
                procs = sorted({type(p).__name__ for p in unet.attn_processors.values()})
                emit(kind="info", what="unet attention processors", value=",".join(procs), **common)
                ts = manifest["modules"]["unet"].get("timestep", 500)
                for w in workloads("unet"):
                    spec = manifest["timing"][w]
                    b, l = spec["batch"], spec["latent"]
                    x = torch.randn((b, unet.config.in_channels, l, l), device=dev, dtype=dt)
                    e = torch.randn((b, unet.config.encoder_hid_dim), device=dev, dtype=dt)
                    fn = lambda: unet(x, ts, encoder_hidden_states=None, added_cond_kwargs={"image_embeds": e})  # noqa: E731
                    if spec.get("image") == manifest["size_a"]:
                        reset_peak()
                        fn()
                        peak("denoiser", f"UNet step {spec['image']}² batch {b}")
                    timed(w, fn)
                del unet
                free()

            # MoVQ decoder.
            if "movq" in stages:
                t = time.time()
                movq = VQModel.from_pretrained(str(a.decoder_dir / "movq"), torch_dtype=dt).to(dev).eval()
                emit(kind="load", stage="movq", seconds=time.time() - t, **common)
                for w in workloads("movq"):
                    spec = manifest["timing"][w]
                    z = torch.randn((spec["batch"], movq.config.latent_channels, spec["latent"], spec["latent"]),
                                    device=dev, dtype=dt)
                    fn = lambda: movq.decode(z, force_not_quantize=True)  # noqa: E731
                    if spec.get("image") == manifest["size_a"]:
                        reset_peak()
                        fn()
                        peak("movq", f"decode {spec['image']}²")
                    timed(w, fn)
                del movq
                free()

    if parts & {"pipeline", "batch"}:
        from diffusers import KandinskyV22Pipeline, KandinskyV22PriorPipeline

        t = time.time()
        prior_pipe = KandinskyV22PriorPipeline.from_pretrained(str(a.prior_dir), torch_dtype=dt).to(dev)
        dec_pipe = KandinskyV22Pipeline.from_pretrained(str(a.decoder_dir), torch_dtype=dt).to(dev)
        for p in (prior_pipe, dec_pipe):
            p.set_progress_bar_config(disable=True)
        load_s = time.time() - t
        prompt = manifest.get("prompt", "a photo of a red fox in the snow")

        def run(n: int, prior_steps: int, steps: int):
            g = torch.Generator(device=dev).manual_seed(0)
            t0 = time.perf_counter()
            emb = prior_pipe([prompt] * n, num_inference_steps=prior_steps, guidance_scale=4.0, generator=g)
            sync(dev)
            t1 = time.perf_counter()
            images = dec_pipe(image_embeds=emb.image_embeds, negative_image_embeds=emb.negative_image_embeds,
                              height=size, width=size, num_inference_steps=steps, guidance_scale=4.0,
                              generator=g, output_type="pil").images
            sync(dev)
            t2 = time.perf_counter()
            assert len(images) == n and images[0].size == (size, size), images[0].size
            return t2 - t0, t1 - t0, t2 - t1

        with torch.no_grad():
            w = time.perf_counter()
            run(1, 2, 2)
            warm = time.perf_counter() - w
            if "pipeline" in parts:
                runs = [run(1, a.prior_steps, a.steps) for _ in range(max(1, a.runs))]
                log(f"pipeline {size}² {a.prior_steps}+{a.steps}: {[round(r[0], 3) for r in runs]} s")
                emit(kind="pipeline", size=size, prior_steps=a.prior_steps, steps=a.steps, load_s=load_s,
                     warmup_s=warm, runs_s=[r[0] for r in runs], median_s=median([r[0] for r in runs]),
                     prior_s=median([r[1] for r in runs]), decoder_s=median([r[2] for r in runs]), **common)
            if "batch" in parts:
                total, _, _ = run(a.batch, a.prior_steps, a.steps)
                log(f"batch {a.batch}: {total:.2f} s, {a.batch / total:.3f} images/s")
                emit(kind="throughput", mode=f"one call, batch {a.batch}", images=a.batch, seconds=total,
                     images_per_s=a.batch / total, size=size, prior_steps=a.prior_steps, steps=a.steps, **common)
    return 0


if __name__ == "__main__":
    sys.exit(main())
