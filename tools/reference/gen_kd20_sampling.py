#!/usr/bin/env python3
"""Kandinsky 2.0 sampling parity fixtures: the official guided-diffusion code, no UNet.

Runs the OFFICIAL objects of the `kandinsky2` package (ai-forever/Kandinsky-2 `aeefc1c`,
/work/shared/reference/kandinsky2-src): `create_gaussian_diffusion(**CONFIG_2_0["diffusion_config"])`
(a `SpacedDiffusion`, learned-range variance, rescaled timesteps) with small respacings,
`p_sample_loop`, `DDIMSampler`, `PLMSSampler`, and `Kandinsky2.generate_text2img` /
`generate_img2img` / `generate_img` themselves (classifier-free guidance, the sampler branches,
`init_step`, the inpainting `denoised_fn`; inpainting runs `generate_img` after
`generate_inpainting`'s own mask preparation, at 8x8 latents) on a stand-in
`Kandinsky2` object whose UNet is a small random conv net (4 -> 8 channels: eps + variance
values, as the real UNet) and whose text encoders return fixed per-row vectors. The latents are
(B, 4, 8, 8); with CFG the pipeline's batch is doubled (cond rows first).

Writes `tests/fixtures/kd20-sampling/` (and nothing else):

* `sampling.safetensors` + `sampling.json`: per case `<case>.x` (every model call's input, f32;
  with CFG only the first half, the model is always called on `cat([half, half])`),
  `<case>.t` (the timestep the model received, one value per call: the whole batch shares it),
  `<case>.out` (the model's output, f16: the stand-in net rounds its output to f16 so that the
  stored values are exact; DDIM/PLMS keep the eps channels only, they never read the rest),
  `<case>.noise` (every `torch.randn` / `randn_like` draw of the loop in draw order, f16: the
  draws are rounded to f16 at the source, so the replay is exact), `<case>.sample` (the final
  samples, f32: the full state for direct loops, the pipeline's `samples[:batch_size]` for the
  pipeline cases); img2img adds `<case>.init_latents`, `<case>.q_noise`, `<case>.x_T`; inpainting
  adds `<case>.init_img`, `<case>.img_mask`, `<case>.mask_raw`.
* `schedules.json`: `space_timesteps` for many respacing strings, the spaced diffusion arrays
  for a few, DDIM/PLMS schedules (`make_ddim_timesteps` + `apply_init_step` +
  `make_ddim_sampling_parameters`), img2img start steps, numpy percentiles (the dynamic
  threshold), and the official error of every refused argument.

Run through `make fixtures` (needs tools/reference/.venv); CI never runs it.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import importlib.util
import json
import math
import sys
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from common import FIXTURES, save_reference, seed_all  # noqa: E402

OUT = FIXTURES / "kd20-sampling"
C, H, W = 4, 8, 8
GUIDANCE = 4.5


# ---------------------------------------------------------------------------------------------------
# The official package, imported without `kandinsky2/__init__.py` (it imports
# `huggingface_hub.cached_download`, gone from huggingface_hub 1.x, and the 2.1/2.2 modules that
# need `clip`): a stand-in package object whose `__path__` is the real one, plus a stand-in
# `pytorch_lightning` (only `LightningModule` is used, as the VAE's base class).


def import_official():
    if "kandinsky2.kandinsky2_model" not in sys.modules:
        spec = importlib.util.find_spec("kandinsky2")
        assert spec is not None and spec.submodule_search_locations, "kandinsky2 is not installed"
        pkg = types.ModuleType("kandinsky2")
        pkg.__path__ = list(spec.submodule_search_locations)
        sys.modules["kandinsky2"] = pkg
        if importlib.util.find_spec("pytorch_lightning") is None:
            pl = types.ModuleType("pytorch_lightning")
            pl.LightningModule = torch.nn.Module
            sys.modules["pytorch_lightning"] = pl
    k2 = importlib.import_module("kandinsky2.kandinsky2_model")
    mc = importlib.import_module("kandinsky2.model.model_creation")
    rs = importlib.import_module("kandinsky2.model.respace")
    sp = importlib.import_module("kandinsky2.model.samplers")
    cf = importlib.import_module("kandinsky2.configs")
    return k2, mc, rs, sp, cf


# ---------------------------------------------------------------------------------------------------
# Device redirect and noise recording. `DDIMSampler` / `PLMSSampler` hard-code "cuda"
# (`register_buffer`, `to_torch`, `ddim_sampling`'s `device`); every "cuda" handed to
# `Tensor.to`, `torch.full` or `torch.randn` becomes "cpu" while a context is active. Every
# `torch.randn` / `torch.randn_like` draw (the code's only draws: `th.randn`, `th.randn_like`,
# `noise_like`) is rounded to f16 (so that storing it as f16 is exact) and recorded in order.


def _cpu(a):
    if isinstance(a, str) and a.startswith("cuda"):
        return "cpu"
    if isinstance(a, torch.device) and a.type == "cuda":
        return torch.device("cpu")
    return a


@contextlib.contextmanager
def official_run():
    drawn: list[torch.Tensor] = []
    percentiles: list[float] = []
    o_to, o_full, o_randn, o_like, o_pct = torch.Tensor.to, torch.full, torch.randn, torch.randn_like, np.percentile

    def to(self, *args, **kw):
        return o_to(self, *[_cpu(a) for a in args], **{k: _cpu(v) for k, v in kw.items()})

    def full(*args, **kw):
        return o_full(*args, **{k: _cpu(v) for k, v in kw.items()})

    def keep(t):
        t = t.half().to(t.dtype)
        drawn.append(t.detach().clone())
        return t

    def randn(*args, **kw):
        return keep(o_randn(*args, **{k: _cpu(v) for k, v in kw.items()}))

    def randn_like(x, *args, **kw):
        return keep(o_like(x, *args, **kw))

    def percentile(*args, **kw):
        r = o_pct(*args, **kw)
        percentiles.append(float(np.asarray(r).reshape(-1)[0]))
        return r

    torch.Tensor.to, torch.full, torch.randn, torch.randn_like, np.percentile = to, full, randn, randn_like, percentile
    try:
        yield drawn, percentiles
    finally:
        torch.Tensor.to, torch.full, torch.randn, torch.randn_like, np.percentile = o_to, o_full, o_randn, o_like, o_pct


# ---------------------------------------------------------------------------------------------------
# The stand-in UNet: a small random conv net, (x, t) -> 8 channels (eps, then variance values in
# [-1, 1] as the learned-range parameterisation expects), conditioned on `pooled_emb1` per row so
# the cond and uncond halves differ. Its output is rounded to f16 (exactly storable). Every call's
# input, timestep and output is recorded.


class TinyNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv_in = torch.nn.Conv2d(C, 16, 3, padding=1)
        self.t_proj = torch.nn.Linear(8, 16)
        self.c_proj = torch.nn.Linear(C, 16)
        self.conv_out = torch.nn.Conv2d(16, 2 * C, 3, padding=1)
        self.calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def del_cache(self):  # Text2ImUNet's text-embedding cache (generate_img calls it)
        pass

    def forward(self, x, t, pooled_emb1=None, **_):
        freqs = torch.tensor([1.0, 3.0, 7.0, 13.0]) * math.pi
        tf = t.float()[:, None] / 1000.0 * freqs[None]
        temb = torch.cat([torch.sin(tf), torch.cos(tf)], dim=1)
        h = self.conv_in(x) + self.t_proj(temb)[:, :, None, None]
        if pooled_emb1 is not None:
            h = h + self.c_proj(pooled_emb1)[:, :, None, None]
        out = self.conv_out(torch.nn.functional.silu(h))
        eps, var = out[:, :C] * 2.0, torch.tanh(out[:, C:] * 3.0)
        out = torch.cat([eps, var], dim=1).half().float()
        self.calls.append((x.detach().clone(), t.detach().clone(), out.detach().clone()))
        return out


def make_pipeline(k2, cf, net, task_type: str, batch_cond: torch.Tensor):
    """A `Kandinsky2` without checkpoints: the real methods, stand-in encoders and UNet."""
    m = k2.Kandinsky2.__new__(k2.Kandinsky2)
    m.config = copy.deepcopy(cf.CONFIG_2_0)
    m.device = "cpu"
    m.task_type = task_type
    m.use_fp16 = False
    m.use_image_enc = False  # no VAE decode: generate_img returns the latents
    m.scale = cf.CONFIG_2_0["image_enc_params"]["scale"]
    m.model = net

    def encode_text(text_encoder, tokenizer, prompt, batch_size):
        # [prompt] * batch_size + [""] * batch_size, as the real encode_text
        pooled = torch.cat([batch_cond[0:1].repeat(batch_size, 1), batch_cond[1:2].repeat(batch_size, 1)])
        return torch.zeros(2 * batch_size, 1, C), pooled

    m.encode_text = encode_text
    m.text_encoder1 = m.text_encoder2 = m.tokenizer1 = m.tokenizer2 = None
    return m


@contextlib.contextmanager
def capture_pipeline(k2, m):
    """Records generate_img's arguments and its final latents (process_images is the identity)."""
    got: dict = {}
    o_proc, o_q = k2.process_images, k2.q_sample
    o_gen = m.generate_img

    def process_images(batch):
        got["samples"] = batch.detach().clone()
        return batch

    def q_sample(x_start, t, **kw):
        got["init_latents"], got["q_t"] = x_start.detach().clone(), int(t)
        return o_q(x_start, t, **kw)

    def generate_img(*args, **kw):
        got["gen_kwargs"] = kw
        return o_gen(*args, **kw)

    k2.process_images, k2.q_sample, m.generate_img = process_images, q_sample, generate_img
    try:
        yield got
    finally:
        k2.process_images, k2.q_sample = o_proc, o_q
        del m.generate_img


# ---------------------------------------------------------------------------------------------------
# Cases


def diffusion(mc, cf, respacing: str):
    cfg = copy.deepcopy(cf.CONFIG_2_0["diffusion_config"])
    cfg["timestep_respacing"] = respacing
    return mc.create_gaussian_diffusion(**cfg)


def pack(case: str, net: TinyNet, drawn, *, cfg: bool, eps_only: bool, sample, tensors: dict, meta: dict,
         percentiles, skip_draws: int = 0):
    xs, ts, outs = [], [], []
    for x, t, out in net.calls:
        assert bool((t == t.reshape(-1)[0]).all()), "a call with mixed timesteps"
        if cfg:
            n = x.shape[0] // 2
            assert torch.equal(x[:n], x[n:]), "CFG model input is not cat([half, half])"
            x = x[:n]
        xs.append(x)
        ts.append(float(t.reshape(-1)[0]))
        outs.append(out[:, :C] if eps_only else out)
    net.calls.clear()
    draws = drawn[skip_draws:]
    assert len({tuple(d.shape) for d in draws}) == 1, [d.shape for d in draws]
    tensors[f"{case}.x"] = torch.stack(xs).float()
    tensors[f"{case}.t"] = torch.tensor(ts, dtype=torch.float32)
    tensors[f"{case}.out"] = torch.stack(outs).half()
    tensors[f"{case}.noise"] = torch.stack(draws).half()
    tensors[f"{case}.sample"] = sample.float()
    meta["calls"] = len(xs)
    meta["draws"] = len(draws)
    meta["t"] = ts
    meta["percentiles_row0"] = percentiles
    meta["cfg"] = cfg
    return meta


def run_cases(k2, mc, sp, cf):
    seed_all(0)
    net = TinyNet()
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(1.5)
    cond = torch.randn(2, C)  # row 0: the prompt's pooled embedding, row 1: the empty prompt's
    tensors: dict[str, torch.Tensor] = {}
    cases: dict[str, dict] = {}
    torch.manual_seed(1234)

    # --- p_sample_loop directly (no CFG), B = 2: with / without clip_denoised (dynamic threshold)
    for case, respacing, clip in [("p_plain_thresh", "4", True), ("p_plain_nothresh", "2,2", False)]:
        d = diffusion(mc, cf, respacing)
        with official_run() as (drawn, pct), torch.no_grad():
            sample = d.p_sample_loop(net, (2, C, H, W), clip_denoised=clip, progress=False)
        cases[case] = pack(case, net, drawn, cfg=False, eps_only=False, sample=sample, tensors=tensors,
                           percentiles=pct, meta=dict(kind="p_sample_loop", respacing=respacing,
                                                      clip_denoised=clip, batch=2,
                                                      timestep_map=list(map(int, d.timestep_map))))

    # --- the pipeline's p_sampler (generate_text2img: respacing str(num_steps), clip_denoised on)
    m = make_pipeline(k2, cf, net, "text2img", cond)
    with official_run() as (drawn, pct), capture_pipeline(k2, m) as got, torch.no_grad():
        m.generate_text2img("p", num_steps=5, batch_size=1, guidance_scale=GUIDANCE, progress=False,
                            h=64, w=64, sampler="p_sampler")
    cases["p_cfg_thresh"] = pack("p_cfg_thresh", net, drawn, cfg=True, eps_only=False, sample=got["samples"],
                                 tensors=tensors, percentiles=pct,
                                 meta=dict(kind="generate_text2img", sampler="p_sampler", num_steps=5,
                                           batch=1, guidance_scale=GUIDANCE, clip_denoised=True,
                                           respacing="5"))

    # --- generate_img with p_sampler on a diffusion whose p_sample_loop has clip_denoised=False
    # (not reachable from generate_text2img: the thresholding-off CFG case), respacing "ddim4"
    d = diffusion(mc, cf, "ddim4")
    o_loop = d.p_sample_loop
    d.p_sample_loop = lambda *a, **kw: o_loop(*a, clip_denoised=False, **kw)
    with official_run() as (drawn, pct), capture_pipeline(k2, m) as got, torch.no_grad():
        m.generate_img("p", batch_size=1, diffusion=d, num_steps=4, guidance_scale=GUIDANCE, progress=False,
                       h=64, w=64, sampler="p_sampler")
    cases["p_cfg_nothresh"] = pack("p_cfg_nothresh", net, drawn, cfg=True, eps_only=False,
                                   sample=got["samples"], tensors=tensors, percentiles=pct,
                                   meta=dict(kind="generate_img", sampler="p_sampler", batch=1,
                                             guidance_scale=GUIDANCE, clip_denoised=False, respacing="ddim4",
                                             timestep_map=list(map(int, d.timestep_map))))

    # --- DDIMSampler / PLMSSampler directly (no CFG; the model returns eps), B = 2
    d1000 = diffusion(mc, cf, "")
    with official_run() as (drawn, pct), torch.no_grad():
        s = sp.DDIMSampler(model=lambda x, t: net(x, t)[:, :C], old_diffusion=d1000, schedule="linear")
        sample, _ = s.sample(4, 2, (C, H, W), conditioning={}, eta=0.5)
    cases["ddim_plain"] = pack("ddim_plain", net, drawn, cfg=False, eps_only=True, sample=sample,
                               tensors=tensors, percentiles=pct,
                               meta=dict(kind="DDIMSampler.sample", steps=4, eta=0.5, batch=2))
    with official_run() as (drawn, pct), torch.no_grad():
        s = sp.PLMSSampler(model=lambda x, t: net(x, t)[:, :C], old_diffusion=d1000, schedule="linear")
        sample, _ = s.sample(4, 2, (C, H, W), conditioning={})
    cases["plms_plain"] = pack("plms_plain", net, drawn, cfg=False, eps_only=True, sample=sample,
                               tensors=tensors, percentiles=pct,
                               meta=dict(kind="PLMSSampler.sample", steps=4, batch=2))

    # --- the pipeline's DDIM / PLMS (generate_text2img; ddim_eta is never passed: eta 0)
    for case, sampler in [("ddim_cfg", "ddim_sampler"), ("plms_cfg", "plms_sampler")]:
        with official_run() as (drawn, pct), capture_pipeline(k2, m) as got, torch.no_grad():
            m.generate_text2img("p", num_steps=4, batch_size=1, guidance_scale=GUIDANCE, progress=False,
                                h=64, w=64, sampler=sampler, ddim_eta=0.05)
        cases[case] = pack(case, net, drawn, cfg=True, eps_only=True, sample=got["samples"], tensors=tensors,
                           percentiles=pct, meta=dict(kind="generate_text2img", sampler=sampler, num_steps=4,
                                                      batch=1, guidance_scale=GUIDANCE, ddim_eta=0.05))

    # --- img2img (generate_img2img): q_sample of the init latents at timestep_map[start - 1]
    init_latents = torch.randn(1, C, H, W) * 0.8
    m2 = make_pipeline(k2, cf, net, "img2img", cond)
    m2.image_encoder = types.SimpleNamespace(
        encode=lambda image: types.SimpleNamespace(sample=lambda: init_latents / m2.scale))
    for case, sampler, steps, strength in [("img2img_p", "p_sampler", 10, 0.7), ("img2img_ddim", "ddim_sampler", 10, 0.7)]:
        with official_run() as (drawn, pct), capture_pipeline(k2, m2) as got, torch.no_grad():
            m2.generate_img2img("p", Image.new("RGB", (64, 64)), strength=strength, num_steps=steps,
                                guidance_scale=GUIDANCE, progress=False, sampler=sampler)
        kw = got["gen_kwargs"]
        meta = dict(kind="generate_img2img", sampler=sampler, num_steps=steps, strength=strength, batch=1,
                    guidance_scale=GUIDANCE, init_step=int(kw["init_step"]), q_t=got["q_t"])
        tensors[f"{case}.init_latents"] = got["init_latents"].float()
        tensors[f"{case}.q_noise"] = drawn[0].half()
        tensors[f"{case}.x_T"] = kw["noise"].float()
        cases[case] = pack(case, net, drawn, cfg=True, eps_only=sampler != "p_sampler", sample=got["samples"],
                           tensors=tensors, percentiles=pct, meta=meta, skip_draws=1)

    # --- inpainting, p_sampler: denoised_fn = dynamic threshold at dynamic_threshold_v, then the
    # mask blend; then clip_denoised's 99.5 threshold again. `generate_inpainting` calls
    # generate_img without h/w (512 -> 64x64 latents), so its preparation is repeated here on the
    # 8x8 latents (official `prepare_mask`, nearest interpolation, repeat(2)), then the official
    # generate_img runs with h = w = 64.
    m3 = make_pipeline(k2, cf, net, "inpainting", cond)
    mask = np.zeros((64, 64), dtype=np.float32)
    mask[8:40, 16:56] = 1.0
    mask_raw = torch.nn.functional.interpolate(torch.from_numpy(mask)[None, None], (H, W), mode="nearest")
    # prepare_mask writes into its argument (`mask.float()[0]` is a view of a float tensor)
    img_mask = k2.prepare_mask(mask_raw.clone()).repeat(2, 1, 1, 1)
    init_img = init_latents.repeat(2, 1, 1, 1)
    with official_run() as (drawn, pct), capture_pipeline(k2, m3) as got, torch.no_grad():
        m3.generate_img("p", batch_size=1, diffusion=diffusion(mc, cf, "3"), num_steps=3, guidance_scale=GUIDANCE,
                        progress=False, dynamic_threshold_v=90.0, denoised_type="dynamic_threshold",
                        init_img=init_img, img_mask=img_mask, h=64, w=64, sampler="p_sampler")
    raw = {"mask": mask_raw}
    kw = got["gen_kwargs"]
    tensors["inpaint_p.init_img"] = kw["init_img"].float()
    tensors["inpaint_p.img_mask"] = kw["img_mask"].float()
    tensors["inpaint_p.mask_raw"] = raw["mask"].float()
    cases["inpaint_p"] = pack("inpaint_p", net, drawn, cfg=True, eps_only=False, sample=got["samples"],
                              tensors=tensors, percentiles=pct,
                              meta=dict(kind="generate_img (inpainting)", sampler="p_sampler", num_steps=3, batch=1,
                                        guidance_scale=GUIDANCE, dynamic_threshold_v=90.0,
                                        denoised_type="dynamic_threshold", respacing="3"))
    return tensors, cases


# ---------------------------------------------------------------------------------------------------
# Schedules, percentiles, refusals


def error_of(fn) -> str:
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the official code raises whatever it raises
        return f"{type(e).__name__}: {e}"
    raise AssertionError("expected a refusal")


def schedules(k2, mc, rs, sp, cf) -> dict:
    out: dict = {}
    strings = ["5", "2,2", "ddim4", "ddim25", "ddim50", "ddim7", "7", "10", "3,4", "10,5,3", "40", "1,1,1",
               "100,1", "4, 4", "+3", " 6 ", "0,5"]
    out["space_timesteps"] = {s: sorted(int(v) for v in rs.space_timesteps(1000, s)) for s in strings}
    out["space_timesteps_errors"] = {s: error_of(lambda s=s: diffusion(mc, cf, s))
                                     for s in ["abc", "ddim", "ddimx", "1001", "0,", "600,600", "0", "ddim0", "ddim2000"]}
    # "0" and "ddim0" are accepted by space_timesteps but give an empty / degenerate process
    diff = {}
    for s in ["5", "2,2", "ddim4", "3", ""]:
        d = diffusion(mc, cf, s)
        keys = ["betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_recip_alphas_cumprod",
                "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                "posterior_mean_coef1", "posterior_mean_coef2"]
        ent = {"timestep_map_len": len(d.timestep_map), "num_timesteps": d.num_timesteps,
               "rescale_timesteps": d.rescale_timesteps, "original_num_steps": d.original_num_steps}
        if s == "":
            idx = [0, 1, 2, 499, 998, 999]
            ent["index"] = idx
            ent.update({k: [float(getattr(d, k)[i]) for i in idx] for k in keys})
            ent["log_betas"] = [float(np.log(d.betas)[i]) for i in idx]
        else:
            ent["timestep_map"] = list(map(int, d.timestep_map))
            ent.update({k: [float(v) for v in getattr(d, k)] for k in keys})
            ent["log_betas"] = [float(v) for v in np.log(d.betas)]
        diff[s] = ent
    out["diffusion"] = diff

    d1000 = diffusion(mc, cf, "")
    ddim = {}
    for S, eta, init in [(1, 0.0, None), (4, 0.0, None), (5, 0.5, None), (6, 0.0, None), (7, 0.3, None),
                         (50, 0.0, None), (10, 0.0, 300), (10, 0.8, 250), (10, 0.0, 1), (10, 0.0, 1000)]:
        with official_run():
            s = sp.DDIMSampler(model=None, old_diffusion=d1000, schedule="linear")
            s.make_schedule(S, ddim_eta=eta, verbose=False, init_step=init)
        ddim[f"{S}/{eta}/{init}"] = {
            "steps": S, "eta": eta, "init_step": init,
            "timesteps": [int(v) for v in s.ddim_timesteps],
            "alphas": [float(v) for v in s.ddim_alphas], "alphas_prev": [float(v) for v in s.ddim_alphas_prev],
            "sigmas": [float(v) for v in s.ddim_sigmas],
        }
    out["ddim"] = ddim

    def ddim_err(S, eta=0.0, init=None):
        with official_run():
            s = sp.DDIMSampler(model=None, old_diffusion=d1000, schedule="linear")
            s.make_schedule(S, ddim_eta=eta, verbose=False, init_step=init)

    def plms_err(S, eta):
        with official_run():
            s = sp.PLMSSampler(model=None, old_diffusion=d1000, schedule="linear")
            s.make_schedule(S, ddim_eta=eta, verbose=False)

    out["ddim_errors"] = {"0": error_of(lambda: ddim_err(0)), "3": error_of(lambda: ddim_err(3)),
                          "1000": error_of(lambda: ddim_err(1000)), "1001": error_of(lambda: ddim_err(1001)),
                          "respaced": error_of(lambda: sp.DDIMSampler(None, diffusion(mc, cf, "5")).make_schedule(5)),
                          "plms_eta": error_of(lambda: plms_err(5, 0.5))}
    out["p_sampler_errors"] = {"1": error_of(lambda: diffusion(mc, cf, "1"))}

    # img2img start steps: int(num_timesteps * (1 - strength))
    out["img2img_start"] = [[n, st, int(n * (1 - st))] for n in [10, 50, 100, 1000]
                            for st in [0.0, 0.1, 0.3, 0.5, 0.55, 0.7, 0.9, 0.95, 0.999, 1.0]]

    # numpy's linear percentile of |x| over row 0 (f32; values rounded to f16 to keep the file small)
    g = torch.Generator().manual_seed(7)
    pct = []
    for n, ps in [(256, [99.5, 90.0, 50.0, 0.0, 100.0, 95, 99.9]), (7, [99.5, 50.0, 10.0]), (1, [99.5])]:
        v = (torch.randn(n, generator=g) * 1.7).half().float().numpy()
        res = {}
        for p in ps:
            r = np.percentile(np.abs(v)[None], p, axis=(1,))[0]
            assert r.dtype == np.float32
            res[str(p)] = float(r)
        pct.append({"values": [float(x) for x in v], "results": res})
    out["percentile"] = pct
    out["config"] = dict(cf.CONFIG_2_0["diffusion_config"])
    return out


def main() -> None:
    k2, mc, rs, sp, cf = import_official()
    src = Path(k2.__file__).resolve()
    tensors, cases = run_cases(k2, mc, sp, cf)
    if OUT.exists():
        for f in OUT.iterdir():
            f.unlink()
    save_reference(OUT / "sampling", tensors, {
        "source": "kandinsky2 " + src.parent.name + " (official, aeefc1c)",
        "latent": [C, H, W],
        "cases": cases,
        "model_t": "stored as f32; integer-valued torch.long for DDIM/PLMS, float for p_sampler",
    })
    # compact: one number per line would double the size
    (OUT / "schedules.json").write_text(json.dumps(schedules(k2, mc, rs, sp, cf), sort_keys=True,
                                                   separators=(",", ":")) + "\n")
    total = sum(f.stat().st_size for f in OUT.iterdir())
    print(f"wrote {OUT} ({total / 1024:.1f} KiB)")
    assert total <= 250 * 1000, f"fixture budget: {total} bytes > 250 KB"


if __name__ == "__main__":
    main()
