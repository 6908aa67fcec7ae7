#!/usr/bin/env python3
"""Few-step (distilled student) parity fixtures: diffusers' LCMScheduler and TCDScheduler.

Writes `tests/fixtures/tiny/reference/fewstep/` (and nothing else):

* `scheduler_<variant>.{safetensors,json}`: timesteps for N = 1, 2, 3, 4, 8, 50 and for explicit
  lists (DMD2's [999, 749, 499, 249], [999], [999, 500, 20]); a 4-step and a DMD2-list step()
  sequence over fixed model outputs with every noise draw recorded; add_noise; the diffusers
  error message of every refused schedule.
* `pipeline_*`: the whole KandinskyV22Pipeline / KandinskyV22Img2ImgPipeline loop on the
  committed tiny decoder checkpoint with an LCM or TCD scheduler built by
  `XScheduler.from_config(<the checkpoint's scheduler config>)` (what a student folder ships and
  what the denoiser builds when a client picks SCHEDULER_LCM / SCHEDULER_TCD): 1 and 4 steps,
  with and without CFG, DMD2's explicit timesteps, img2img at strength 0.5.

Run through `make fixtures` (needs tools/reference/.venv); CI never runs it.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import gen_decoder as gd  # noqa: E402
from common import record_noise, seed_all, write_json  # noqa: E402
from diffusers import LCMScheduler, TCDScheduler, UNet2DConditionModel, VQModel  # noqa: E402

OUT = gd.TINY / "reference" / "fewstep"
CLASSES = {"LCMScheduler": LCMScheduler, "TCDScheduler": TCDScheduler}
SCHED_NS = [1, 2, 3, 4, 8, 50]
CUSTOM = {"dmd2": [999, 749, 499, 249], "one": [999], "uneven": [999, 500, 20]}
SHAPE = (1, 4, 2, 2)


def teacher_config() -> dict:
    """The tiny decoder checkpoint's own scheduler config (DDPM, hub values)."""
    return json.loads((gd.CK_TINY / "scheduler" / "scheduler_config.json").read_text())


def student_config(cls: str) -> dict:
    """`XScheduler.from_config(teacher config)`: every key the class takes, as saved."""
    return gd.sched_config_json(CLASSES[cls].from_config(teacher_config()))


def variants() -> list[dict]:
    return [
        dict(name="lcm_k22", cls="LCMScheduler", cfg=student_config("LCMScheduler"), eta=None),
        dict(name="lcm_default", cls="LCMScheduler", cfg=gd.sched_config_json(LCMScheduler()), eta=None),
        dict(name="tcd_k22", cls="TCDScheduler", cfg=student_config("TCDScheduler"), eta=0.3),
        dict(name="tcd_gamma0", cls="TCDScheduler", cfg=student_config("TCDScheduler"), eta=0.0),
    ]


def new(var: dict):
    return CLASSES[var["cls"]].from_config(var["cfg"])


def error_of(fn) -> str:
    try:
        fn()
    except (ValueError, IndexError) as e:
        return str(e)
    raise AssertionError("expected a refusal")


@torch.no_grad()
def step_sequence(var: dict, schedule: dict, seed: int, prefix: str, t: dict) -> dict:
    """Runs step() over the whole schedule on one instance, recording every draw."""
    s = new(var)
    s.set_timesteps(**schedule)
    ts = s.timesteps.clone()
    n = len(ts)
    x = gd.randn(SHAPE, seed)
    t[f"{prefix}_initial_sample"] = x.clone()
    mos = gd.randn((n,) + SHAPE, seed + 1)
    t[f"{prefix}_model_outputs"] = mos
    g = gd.gen(seed + 2)
    kw = {} if var["eta"] is None else {"eta": var["eta"]}
    prevs, denoised, noises, flags = [], [], [], []
    with record_noise() as drawn:
        for i in range(n):
            before = len(drawn)
            o = s.step(mos[i], ts[i], x, generator=g, return_dict=False, **kw)
            x = o[0]
            prevs.append(x.clone())
            denoised.append(o[1].clone())
            k = len(drawn) - before
            assert k in (0, 1)
            flags.append(k)
            noises.append(drawn[-1].clone() if k else torch.zeros(SHAPE))
    t[f"{prefix}_timesteps"] = ts.to(torch.int64)
    t[f"{prefix}_prev_samples"] = torch.stack(prevs)
    t[f"{prefix}_denoised"] = torch.stack(denoised)
    t[f"{prefix}_noise"] = torch.stack(noises)
    t[f"{prefix}_noise_drawn"] = torch.tensor(flags, dtype=torch.int64)
    return {"schedule": schedule, "steps": n, "draws": sum(flags)}


@torch.no_grad()
def scheduler_reference(var: dict, seed: int) -> None:
    t: dict[str, torch.Tensor] = {}
    valid = []
    for n in SCHED_NS:
        s = new(var)
        s.set_timesteps(n)
        valid.append(n)
        t[f"timesteps_n{n}"] = s.timesteps.clone().to(torch.int64)
    for name, ts in CUSTOM.items():
        s = new(var)
        s.set_timesteps(timesteps=ts)
        assert s.timesteps.tolist() == ts
        t[f"timesteps_custom_{name}"] = s.timesteps.clone().to(torch.int64)
    sequences = {
        "step": step_sequence(var, {"num_inference_steps": 4}, seed, "step", t),
        "dmd2": step_sequence(var, {"timesteps": CUSTOM["dmd2"]}, seed + 10, "dmd2", t),
        "one": step_sequence(var, {"num_inference_steps": 1}, seed + 20, "one", t),
    }
    s = new(var)
    s.set_timesteps(4)
    an_t = [0, 1, 250, 499, 999]
    x0 = gd.randn(SHAPE, seed + 3)
    nz = gd.randn(SHAPE, seed + 4)
    t["add_noise_original"] = x0
    t["add_noise_noise"] = nz
    t["add_noise_timesteps"] = torch.tensor(an_t, dtype=torch.int64)
    t["add_noise_out"] = torch.stack([s.add_noise(x0, nz, torch.tensor([tt], dtype=torch.int64)) for tt in an_t])
    orig = var["cfg"]["original_inference_steps"]
    errors = {
        "too_many_steps": {"num_inference_steps": orig + 1,
                           "message": error_of(lambda: new(var).set_timesteps(orig + 1))},
        "not_descending": {"timesteps": [999, 999, 499],
                           "message": error_of(lambda: new(var).set_timesteps(timesteps=[999, 999, 499]))},
        "ascending": {"timesteps": [249, 499],
                      "message": error_of(lambda: new(var).set_timesteps(timesteps=[249, 499]))},
        "out_of_range": {"timesteps": [1000, 500],
                         "message": error_of(lambda: new(var).set_timesteps(timesteps=[1000, 500]))},
        "both": {"num_inference_steps": 4, "timesteps": [999],
                 "message": error_of(lambda: new(var).set_timesteps(4, timesteps=[999]))},
    }
    meta = {
        "variant": var["name"],
        "class": var["cls"],
        "config": var["cfg"],
        "eta": var["eta"],
        "num_inference_steps_valid": valid,
        "custom_timesteps": CUSTOM,
        "sequences": sequences,
        "errors": errors,
        "sequence_note": "<seq>_noise[i] is the randn_tensor draw inside step i (zeros where <seq>_noise_drawn[i] == 0); "
                         "steps run in order on one instance: step(<seq>_model_outputs[i], <seq>_timesteps[i], x_i, "
                         "eta=eta) with x_0 = <seq>_initial_sample, x_{i+1} = <seq>_prev_samples[i]; <seq>_denoised is "
                         "the step's second output (LCM: denoised, TCD: pred_noised_sample)",
        "add_noise_note": "add_noise_out[k] = add_noise(add_noise_original, add_noise_noise, tensor([t_k]))",
    }
    gd.save_ref(OUT / f"scheduler_{var['name']}", t, meta)


class CustomTimesteps:
    """Makes the pipeline's `scheduler.set_timesteps(N, device=…)` set an explicit list instead:
    what a K2.2 pipeline would do if it took `timesteps` (it does not)."""

    def __init__(self, scheduler, timesteps: list[int]):
        self.s, self.ts = scheduler, timesteps
        self.orig = scheduler.set_timesteps

    def __enter__(self):
        self.s.set_timesteps = lambda n=None, device=None, **kw: self.orig(timesteps=self.ts, device=device)
        return self

    def __exit__(self, *exc):
        del self.s.__dict__["set_timesteps"]
        return False


def load_tiny():
    unet = UNet2DConditionModel.from_pretrained(str(gd.CK_TINY / "unet"), torch_dtype=torch.float32).eval()
    movq = VQModel.from_pretrained(str(gd.CK_TINY / "movq"), torch_dtype=torch.float32).eval()
    return SimpleNamespace(unet=unet, movq=movq, ck_path=gd.CK_TINY)


def pipeline_cases(base) -> None:
    lcm, tcd = student_config("LCMScheduler"), student_config("TCDScheduler")
    gd.text2img_case(OUT, "tiny", "lcm_1", base, "LCMScheduler", lcm, 1, guidance=1.0, latent_seed=8001,
                     noise_seed=9001, keep_step0=True)
    gd.text2img_case(OUT, "tiny", "lcm_4", base, "LCMScheduler", lcm, 4, guidance=1.0, latent_seed=8002,
                     noise_seed=9002)
    gd.text2img_case(OUT, "tiny", "lcm_4_cfg", base, "LCMScheduler", lcm, 4, guidance=4.0, latent_seed=8003,
                     noise_seed=9003)
    gd.text2img_case(OUT, "tiny", "tcd_4", base, "TCDScheduler", tcd, 4, guidance=1.0, latent_seed=8004,
                     noise_seed=9004)
    # DMD2's schedule through the same loop.
    real_new = gd.new_scheduler

    def with_list(kind, cfg):
        s = real_new(kind, cfg)
        CustomTimesteps(s, CUSTOM["dmd2"]).__enter__()
        return s

    gd.new_scheduler = with_list
    try:
        gd.text2img_case(OUT, "tiny", "lcm_dmd2", base, "LCMScheduler", lcm, 4, guidance=1.0, latent_seed=8005,
                         noise_seed=9005)
    finally:
        gd.new_scheduler = real_new
    meta_path = OUT / "pipeline_text2img_lcm_dmd2.json"
    meta = json.loads(meta_path.read_text())
    meta["timesteps"] = CUSTOM["dmd2"]
    meta["timesteps_note"] = ("scheduler.set_timesteps(timesteps=[999, 749, 499, 249]) in place of the pipeline's "
                              "set_timesteps(num_inference_steps)")
    write_json(meta_path, meta)
    saved_ref = gd.REF_TINY
    gd.REF_TINY = OUT
    try:
        gd.img2img_case("lcm_4_s05", base, "LCMScheduler", lcm, 0.5, steps=4, guidance=1.0, noise_seed=9006)
    finally:
        gd.REF_TINY = saved_ref
    # This run's own MoVQ encoding of the init image (the decoder fixtures' copy may differ in the
    # last bits: another thread count).
    committed = load_file(str(saved_ref / "pipeline_inputs.safetensors"))["img2img_image_latents"]
    latents = gd.SHARED["img2img_image_latents"]
    assert (latents - committed).norm() / committed.norm() < 1e-5
    gd.save_ref(OUT / "pipeline_inputs", {"img2img_image_latents": latents}, {
        "img2img_image_latents": "movq.encode(pre).latents of the init image in this run (pre as in "
                                 "decoder/pipeline_inputs.json), the latents the img2img case started from"})


def main() -> None:
    seed_all(0)
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    for i, var in enumerate(variants()):
        scheduler_reference(var, 11000 + 100 * i)
    pipeline_cases(load_tiny())
    write_json(OUT / "index.json", {
        "generator": "tools/reference/gen_fewstep.py",
        "versions": gd.versions(),
        "schedulers": [v["name"] for v in variants()],
        "pipelines": sorted(gd.INDEX["tiny"].keys()),
    })
    total = sum(p.stat().st_size for p in OUT.iterdir())
    print(f"[gen_fewstep] wrote {OUT} ({total / 1e3:.0f} kB)")


if __name__ == "__main__":
    main()
