#!/usr/bin/env python3
"""Kandinsky 2.0 end-to-end pipeline fixture: the OFFICIAL `Kandinsky2` object.

Writes, under `tests/fixtures/kd20/` (next to the text encoders of gen_kd20.py, which it reads):

* `Kandinsky-2-0.pt`: a tiny `Text2ImUNet` state dict (fp16, official key names), built as
  gen_kd20_unet.py builds its model (GroupNorm at 4 groups, the hard-coded mT5 width 512 turned
  into the fixture mT5's 32) but with the widths of the fixture text encoders:
  `text_encoder_in_dim1` 32 (XLM-R hidden), `text_encoder_in_dim2` 24 (the M-CLIP projection),
  image_size 16, in 4 / out 8 channels.
* `unet.json`: the `model_config` keys + the non-upstream `norm_num_groups` / `text_encoder2_dim`.
* `vae.ckpt` + `vae.json`: a tiny official `AutoencoderKL` (`{"state_dict": fp16}`), GroupNorm at
  2 groups as gen_kd20_vae.py, but ch_mult [1, 2, 2, 2] (a scale factor of 8 as the real 2.0 VAE:
  `get_new_h_w` hard-codes 64 pixels -> 8 latents); `vae.json` is the `image_enc_params` entry.
* `reference/pipeline.safetensors` + `reference/pipeline.json`: per case `<case>.noise.<i>`
  (every `torch.randn` / `randn_like` draw of the run, in order, rounded to f16 at the source so
  the replay is exact), `<case>.images` (f32 (B, 3, h, w): `generate_img`'s crop, just before
  `process_images`) and `<case>.uint8` ((B, h, w, 3), `process_images`' arrays).

* `reference/pipeline_img2img.safetensors` + `.json`: `generate_img2img` per IMG2IMG_CASES, same
  keys plus `init` (the prepared init image of every case, f32 (1, 3, 64, 64) in [-1, 1]). The official
  `prepare_image` resizes to 512x512 (and the latents then follow the image: `generate_img` is
  called without h/w, so its 512 crop is a no-op); here ONLY that resize size is patched to 64x64
  (same bicubic resize, same `/ 127.5 - 1`), everything else is the official call. Draws: the
  posterior `sample()`, q_sample's `randn_like`, then the sampler's.

The references come from `Kandinsky2(config, "Kandinsky-2-0.pt", "cpu")` itself (its `__init__`
reads the tokenizers, text encoders, VAE and UNet from these files), `generate_text2img` and
`generate_img2img` (inpainting is not covered: it needs the inpainting UNet). Run through
`make fixtures` (needs tools/reference/.venv); CI never runs it.
"""

from __future__ import annotations

import copy
import importlib
import importlib.machinery
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import gen_kd20_sampling as gs  # noqa: E402
import gen_kd20_unet as gu  # noqa: E402
import gen_kd20_vae as gv  # noqa: E402
from common import FIXTURES, perturb, save_reference, seed_all, write_json  # noqa: E402

OUT = FIXTURES / "kd20"
TE1, TE2 = OUT / "text_encoder1", OUT / "text_encoder2"
BUDGET_BYTES = 750_000
MT5_DIM = 32
XLMR_HIDDEN, MCLIP_OUT = 32, 24

MODEL_CONFIG = dict(gu.MODEL_CONFIG, text_encoder_in_dim1=XLMR_HIDDEN, text_encoder_in_dim2=MCLIP_OUT)
DDCONFIG = dict(gv.DDCONFIG, ch_mult=[1, 2, 2, 2])

CASES = [
    # name, kind, prompt, kwargs
    ("p_latin", "text2img", "a red fox in the snow",
     dict(num_steps=4, batch_size=2, guidance_scale=7, h=64, w=64, sampler="p_sampler")),
    ("ddim_cyrillic", "text2img", "рыжая лиса на снегу",
     dict(num_steps=4, batch_size=1, guidance_scale=1, h=40, w=64, sampler="ddim_sampler")),
]

IMG2IMG_CASES = [
    # name, prompt, kwargs of generate_img2img
    ("i2i_p", "a red fox in the snow",
     dict(strength=0.5, num_steps=4, guidance_scale=7, sampler="p_sampler")),
    ("i2i_ddim", "рыжая лиса на снегу",
     dict(strength=0.5, num_steps=4, guidance_scale=7, sampler="ddim_sampler")),
]
IMG2IMG_SIZE = 64

PLMS_CASES = [
    # name, prompt, kwargs of generate_text2img (5 steps: the first step and all three
    # Adams-Bashforth orders)
    ("plms_latin", "a red fox in the snow",
     dict(num_steps=5, batch_size=1, guidance_scale=5, h=64, w=64, sampler="plms_sampler")),
]

INP = FIXTURES / "kd20-inpaint"
ADDED_BUDGET_BYTES = 450_000
MASK_H, MASK_W = 60, 70
INPAINT_CASES = [
    # name, prompt, kwargs of generate_inpainting
    ("inp_p", "a red fox in the snow",
     dict(num_steps=3, guidance_scale=7, sampler="p_sampler")),
    ("inp_ddim", "рыжая лиса на снегу",
     dict(num_steps=4, guidance_scale=5, sampler="ddim_sampler")),
]


def init_pil():
    """A deterministic 80x72 RGB init image (smooth gradients + a little texture)."""
    from PIL import Image
    y, x = np.mgrid[0:72, 0:80].astype(np.float32)
    rng = np.random.default_rng(5)
    r = 255 * x / 79
    g = 255 * y / 71
    b = 127.5 + 100 * np.sin(x / 7) * np.cos(y / 5)
    arr = np.stack([r, g, b], -1) + rng.normal(0, 12, (72, 80, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def main() -> None:
    seed_all(0)
    _, t2i, mc, configs = gu.import_official()
    pl = sys.modules.get("pytorch_lightning")
    if pl is not None and pl.__spec__ is None:  # gu's stand-in: later find_spec calls need a spec
        pl.__spec__ = importlib.machinery.ModuleSpec("pytorch_lightning", None)
    _, ae, _ = gv.import_official()
    k2 = importlib.import_module("kandinsky2.kandinsky2_model")
    cf = configs
    utils = sys.modules["kandinsky2.utils"]

    # --- the UNet checkpoint
    gu.MT5_DIM = MT5_DIM  # read by gu.build at call time
    assert set(MODEL_CONFIG) == set(configs.CONFIG_2_0["model_config"])
    torch.manual_seed(4000)
    model = gu.build(t2i, mc, dict(MODEL_CONFIG))
    perturb(model, 4001, scale=0.3)
    sd = {k: v.to(torch.float16).contiguous() for k, v in sorted(model.state_dict().items())}
    unet_path = OUT / "Kandinsky-2-0.pt"
    torch.save(sd, unet_path)
    write_json(OUT / "unet.json", dict(MODEL_CONFIG, norm_num_groups=gu.GROUPS, text_encoder2_dim=MT5_DIM))

    # --- the VAE checkpoint
    with gv.quiet():
        vae = ae.AutoencoderKL(ddconfig=dict(DDCONFIG), embed_dim=gv.EMBED_DIM)
    perturb(vae, seed=4002)
    vsd = {k: v.detach().to(torch.float16).contiguous() for k, v in vae.state_dict().items()}
    torch.save({"state_dict": vsd, "global_step": 1}, OUT / "vae.ckpt")
    scale = float(configs.CONFIG_2_0["image_enc_params"]["scale"])
    write_json(OUT / "vae.json", {
        "name": "AutoencoderKL", "scale": scale,
        "params": {"embed_dim": gv.EMBED_DIM, "ddconfig": {**DDCONFIG, "norm_num_groups": gv.GROUPS}},
    })

    # --- the official object
    config = copy.deepcopy(cf.CONFIG_2_0)
    config["tokenizer_name1"], config["tokenizer_name2"] = str(TE1), str(TE2)
    config["text_enc_params1"] = {**config["text_enc_params1"], "model_path": str(TE1),
                                  "in_features": XLMR_HIDDEN, "out_features": MCLIP_OUT}
    config["text_enc_params2"] = {**config["text_enc_params2"], "model_path": str(TE2)}
    config["image_enc_params"]["params"] = {"ckpt_path": str(OUT / "vae.ckpt"), "embed_dim": gv.EMBED_DIM,
                                            "ddconfig": dict(DDCONFIG)}
    config["model_config"] = dict(MODEL_CONFIG)
    k2.create_model = lambda **cfg: gu.build(t2i, mc, cfg)  # the 512 -> 32 width patch while building
    with gv.quiet():
        m = k2.Kandinsky2(config, str(unet_path), "cpu", task_type="text2img")
    loaded = m.model.state_dict()
    assert set(loaded) == set(sd), set(loaded) ^ set(sd)
    for k, v in sd.items():
        assert torch.equal(loaded[k], v.float()), k
    vl = m.image_encoder.state_dict()
    assert set(vl) == set(vsd), set(vl) ^ set(vsd)
    for k, v in vsd.items():
        assert torch.equal(vl[k], v.float()), k

    tensors: dict[str, torch.Tensor] = {}
    meta: dict = {"cases": {}}
    o_proc = utils.process_images
    for name, kind, prompt, kw in CASES:
        captured = {}

        def process_images(batch, _c=captured):
            _c["images"] = batch.detach().float().clone()
            return o_proc(batch)

        k2.process_images = process_images
        try:
            with gs.official_run() as (drawn, _pct):
                pil = m.generate_text2img(prompt, progress=False, **kw)
        finally:
            k2.process_images = o_proc
        tensors[f"{name}.images"] = captured["images"]
        tensors[f"{name}.uint8"] = torch.from_numpy(np.stack([np.asarray(p) for p in pil]))
        for i, d in enumerate(drawn):
            tensors[f"{name}.noise.{i}"] = d.half()
        meta["cases"][name] = dict(kind=kind, prompt=prompt, draws=len(drawn), **kw)
        print(name, tuple(captured["images"].shape), "draws", len(drawn))
    meta["shapes"] = {k: list(v.shape) for k, v in sorted(tensors.items())}
    save_reference(OUT / "reference" / "pipeline", tensors, None)
    (OUT / "reference" / "pipeline.json").write_text(json.dumps(meta, indent=2, sort_keys=True,
                                                                ensure_ascii=False) + "\n")

    # --- img2img: the official generate_img2img, prepare_image's resize patched to 64x64
    o_prep = k2.prepare_image
    tensors, meta = {}, {"cases": {}, "size": IMG2IMG_SIZE}
    pil_in = init_pil()
    for name, prompt, kw in IMG2IMG_CASES:
        captured = {}

        def process_images(batch, _c=captured):
            _c["images"] = batch.detach().float().clone()
            return o_proc(batch)

        def prepare_image(pil_image, _c=captured):
            img = o_prep(pil_image, w=IMG2IMG_SIZE, h=IMG2IMG_SIZE)
            _c["init"] = img.detach().float().clone()
            return img

        k2.process_images, k2.prepare_image = process_images, prepare_image
        try:
            with gs.official_run() as (drawn, _pct):
                pil = m.generate_img2img(prompt, pil_in, progress=False, **kw)
        finally:
            k2.process_images, k2.prepare_image = o_proc, o_prep
        if "init" in tensors:  # one init image for every case
            assert torch.equal(tensors["init"], captured["init"])
        tensors["init"] = captured["init"]
        tensors[f"{name}.images"] = captured["images"]
        tensors[f"{name}.uint8"] = torch.from_numpy(np.stack([np.asarray(p) for p in pil]))
        for i, d in enumerate(drawn):
            tensors[f"{name}.noise.{i}"] = d.half()
        meta["cases"][name] = dict(prompt=prompt, draws=len(drawn), **kw)
        print(name, tuple(captured["images"].shape), "draws", len(drawn), [tuple(d.shape) for d in drawn])
    meta["shapes"] = {k: list(v.shape) for k, v in sorted(tensors.items())}
    save_reference(OUT / "reference" / "pipeline_img2img", tensors, None)
    (OUT / "reference" / "pipeline_img2img.json").write_text(json.dumps(meta, indent=2, sort_keys=True,
                                                                        ensure_ascii=False) + "\n")

    new = [unet_path, OUT / "unet.json", OUT / "vae.ckpt", OUT / "vae.json",
           OUT / "reference" / "pipeline.safetensors", OUT / "reference" / "pipeline.json",
           OUT / "reference" / "pipeline_img2img.safetensors", OUT / "reference" / "pipeline_img2img.json"]
    total = sum(p.stat().st_size for p in new)
    print(f"{OUT}: {total} new bytes")
    assert total <= BUDGET_BYTES, f"{total} bytes > budget {BUDGET_BYTES}"

    # --- later additions: written after (and independently of) everything above, which they
    # leave byte-identical (the global RNG state above is untouched; their own seeds follow)
    added = plms_case(m, k2, o_proc)
    added += inpainting_cases(k2, t2i, mc, configs, config, pil_in, tensors["init"], o_proc)
    total = sum(p.stat().st_size for p in added)
    print(f"added fixtures: {total} bytes")
    assert total <= ADDED_BUDGET_BYTES, f"{total} bytes > budget {ADDED_BUDGET_BYTES}"


def run_recorded(call, captured, o_proc):
    """`call()` with every draw recorded and `process_images`' input captured."""
    def process_images(batch, _c=captured):
        _c["images"] = batch.detach().float().clone()
        return o_proc(batch)

    k2 = sys.modules["kandinsky2.kandinsky2_model"]
    k2.process_images = process_images
    try:
        with gs.official_run() as (drawn, _pct):
            pil = call()
    finally:
        k2.process_images = o_proc
    return pil, drawn


def plms_case(m, k2, o_proc) -> list[Path]:
    """`generate_text2img(sampler="plms_sampler")` on the text2img folder: PLMS_CASES into
    `reference/pipeline_plms.{safetensors,json}` (same keys as `pipeline.*`)."""
    tensors, meta = {}, {"cases": {}}
    torch.manual_seed(4100)
    for name, prompt, kw in PLMS_CASES:
        captured = {}
        pil, drawn = run_recorded(lambda: m.generate_text2img(prompt, progress=False, **kw), captured, o_proc)
        tensors[f"{name}.images"] = captured["images"]
        tensors[f"{name}.uint8"] = torch.from_numpy(np.stack([np.asarray(p) for p in pil]))
        for i, d in enumerate(drawn):
            tensors[f"{name}.noise.{i}"] = d.half()
        meta["cases"][name] = dict(kind="text2img", prompt=prompt, draws=len(drawn), **kw)
        print(name, tuple(captured["images"].shape), "draws", len(drawn))
    meta["shapes"] = {k: list(v.shape) for k, v in sorted(tensors.items())}
    base = OUT / "reference" / "pipeline_plms"
    save_reference(base, tensors, None)
    base.with_suffix(".json").write_text(json.dumps(meta, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
    return [base.with_suffix(".safetensors"), base.with_suffix(".json")]


def keep_mask():
    """The official keep mask (1 = keep, 0 = repaint) as `generate_inpainting` takes it: an
    (H, W) float32 array, here 60x70 so that the nearest resize to the 8x8 latents has the
    non-integer ratios 7.5 and 8.75, with a repaint rectangle off the latent grid."""
    mask = np.ones((MASK_H, MASK_W), dtype=np.float32)
    mask[13:41, 22:50] = 0.0
    return mask


def inpainting_cases(k2, t2i, mc, configs, config, pil_in, init, o_proc) -> list[Path]:
    """`tests/fixtures/kd20-inpaint/`: the tiny inpainting UNet and `generate_inpainting`."""
    INP.mkdir(parents=True, exist_ok=True)
    for name in ("vae.ckpt", "vae.json", "text_encoder1", "text_encoder2"):
        link = INP / name
        target = Path("..") / OUT.name / name
        if link.is_symlink() and Path(link.readlink()) == target:
            continue
        assert not link.exists() and not link.is_symlink(), f"{link} exists and is not the symlink {target}"
        link.symlink_to(target)

    cfg = dict(MODEL_CONFIG, inpainting=True)
    assert set(cfg) == set(configs.CONFIG_2_0["model_config"])
    torch.manual_seed(4010)
    model = gu.build(t2i, mc, dict(cfg))
    perturb(model, 4011, scale=0.3)
    sd = {k: v.to(torch.float16).contiguous() for k, v in sorted(model.state_dict().items())}
    unet_path = INP / "Kandinsky-2-0-inpainting.pt"
    torch.save(sd, unet_path)
    write_json(INP / "unet.json", dict(cfg, norm_num_groups=gu.GROUPS, text_encoder2_dim=MT5_DIM))

    config = copy.deepcopy(config)
    config["tokenizer_name1"], config["tokenizer_name2"] = str(INP / "text_encoder1"), str(INP / "text_encoder2")
    config["text_enc_params1"]["model_path"] = str(INP / "text_encoder1")
    config["text_enc_params2"]["model_path"] = str(INP / "text_encoder2")
    config["image_enc_params"]["params"]["ckpt_path"] = str(INP / "vae.ckpt")
    config["model_config"] = dict(MODEL_CONFIG)  # __init__ turns inpainting on for the task
    with gv.quiet():
        m = k2.Kandinsky2(config, str(unet_path), "cpu", task_type="inpainting")
    assert m.config["model_config"]["inpainting"] is True
    loaded = m.model.state_dict()  # load_state_dict(strict=False): check every tensor arrived
    assert set(loaded) == set(sd), set(loaded) ^ set(sd)
    for k, v in sd.items():
        assert torch.equal(loaded[k], v.float()), k
    assert m.model.input_blocks[0][0].weight.shape[1] == 2 * 4 + 1

    # Upstream prepares every image at 512x512 and samples at generate_img's default h = w = 512
    # (64x64 latents), which agree; both sizes are patched to IMG2IMG_SIZE together (the same
    # patch as img2img's), nothing else.
    o_prep, o_mask, o_gen = k2.prepare_image, k2.prepare_mask, m.generate_img
    mask_np = keep_mask()
    tensors = {"keep_mask": torch.from_numpy(mask_np).to(torch.uint8)[None, None]}
    meta = {"cases": {}, "size": IMG2IMG_SIZE, "init": "kd20/reference/pipeline_img2img.safetensors:init"}
    torch.manual_seed(4200)
    for name, prompt, kw in INPAINT_CASES:
        captured = {}

        def prepare_image(pil_image, _c=captured):
            img = o_prep(pil_image, w=IMG2IMG_SIZE, h=IMG2IMG_SIZE)
            _c["init"] = img.detach().float().clone()
            return img

        def prepare_mask(mask, _c=captured):
            _c["mask_resized"] = mask.detach().float().clone()
            out = o_mask(mask)
            _c["mask_prepared"] = out.detach().float().clone()
            return out

        def generate_img(*args, **kwargs):
            assert "h" not in kwargs and "w" not in kwargs
            return o_gen(*args, h=IMG2IMG_SIZE, w=IMG2IMG_SIZE, **kwargs)

        k2.prepare_image, k2.prepare_mask, m.generate_img = prepare_image, prepare_mask, generate_img
        try:
            pil, drawn = run_recorded(
                lambda: m.generate_inpainting(prompt, pil_in, mask_np.copy(), progress=False, **kw),
                captured, o_proc)
        finally:
            k2.prepare_image, k2.prepare_mask, m.generate_img = o_prep, o_mask, o_gen
        assert torch.equal(captured["init"], init), "the inpainting init differs from img2img's"
        for key in ("mask_resized", "mask_prepared"):
            if key in tensors:
                assert torch.equal(tensors[key], captured[key]), key
            tensors[key] = captured[key]
        tensors[f"{name}.images"] = captured["images"]
        tensors[f"{name}.uint8"] = torch.from_numpy(np.stack([np.asarray(p) for p in pil]))
        for i, d in enumerate(drawn):
            tensors[f"{name}.noise.{i}"] = d.half()
        meta["cases"][name] = dict(prompt=prompt, draws=len(drawn), **kw)
        print(name, tuple(captured["images"].shape), "draws", len(drawn), [tuple(d.shape) for d in drawn])
    # the nearest resize by torch's formula: src = min(floor(dst * (in / out)), in - 1) in f32
    rows = [min(int(np.floor(np.float32(i) * np.float32(MASK_H / 8))), MASK_H - 1) for i in range(8)]
    cols = [min(int(np.floor(np.float32(j) * np.float32(MASK_W / 8))), MASK_W - 1) for j in range(8)]
    assert torch.equal(tensors["mask_resized"][0, 0], torch.from_numpy(mask_np[np.ix_(rows, cols)]))
    assert not torch.equal(tensors["mask_resized"], tensors["mask_prepared"])
    meta["shapes"] = {k: list(v.shape) for k, v in sorted(tensors.items())}
    base = INP / "reference" / "inpaint"
    save_reference(base, tensors, None)
    base.with_suffix(".json").write_text(json.dumps(meta, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
    return [unet_path, INP / "unet.json", base.with_suffix(".safetensors"), base.with_suffix(".json")]


if __name__ == "__main__":
    main()
