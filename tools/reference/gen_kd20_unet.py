#!/usr/bin/env python3
"""Kandinsky 2.0 UNet fixture: the official `kandinsky2.model.text2im_model.Text2ImUNet`.

Writes `tests/fixtures/kd20-unet/` (and nothing else; the folder is rebuilt from scratch):

* `model.pt` / `inpaint/model.pt`: `torch.save(state_dict)` in fp16 with the official key names
  (`time_embed.0.weight`, `input_blocks.1.0.in_layers.0.weight`, `middle_block.1.encoder_kv.weight`,
  `proj.weight`, `proj2.q_linear.weight`, `to_model_dim2.weight`, `ln_model1.weight`, `out.2.weight`,
  ...), as the official `Kandinsky-2-0.pt` / `Kandinsky-2-0-inpainting.pt` are (plain state dicts
  read with `load_state_dict(strict=False)`; the script checks every tensor is restored).
* `config.json` / `inpaint/config.json`: the keys of `CONFIG_2_0["model_config"]` for these tiny
  models, plus two keys that are not upstream (see below): `norm_num_groups` and
  `text_encoder2_dim`.
* `reference.safetensors` / `inpaint/reference.safetensors` (fp32, computed by the official code from
  the re-loaded fp16 weights upcast to fp32) + `reference.json` (shapes):
  inputs `x` (2, 4, 16, 16), `timesteps` (2,) (fractional, as `rescale_timesteps` makes them),
  `full_emb1` (2, 5, 20), `pooled_emb1` (2, 12), `full_emb2` (2, 7, 16) (and for inpainting
  `inpaint_image` (2, 4, 16, 16), `inpaint_mask` (2, 1, 16, 16));
  intermediates `time_emb` (2, 32) = `time_embed(timestep_embedding(t))`, `xf_proj` (2, 32),
  `xf_out` (2, 24, 12) (NCL, as the attention blocks get it), `emb` (2, 32) = time_emb + xf_proj,
  `input_block_1` (2, 8, 16, 16) (after `input_blocks[1]`), `input_block_2` (2, 8, 8, 8) (the
  resblock_updown downsample), `middle` (2, 16, 8, 8) (after `middle_block`); output `out`
  (2, 8, 16, 16). The inpainting references keep only the inputs, `xf_proj`, `xf_out` and `out`
  (budget), and the inpainting model has channel_mult "1,1" (widths 8, 8, one head; budget); its
  `in_channels` stays 4 in the config, as upstream, and the model has 4 * 2 + 1 = 9.

Architecture: `CONFIG_2_0["model_config"]` with image_size 16, num_channels 8, num_res_blocks 1,
channel_mult "1,2" (widths 8, 16), attention_resolutions "8" (ds 2: level 1 and the middle),
num_head_channels 8 (two heads at width 16), model_dim 24, text_encoder_in_dim1 20,
text_encoder_in_dim2 12, use_scale_shift_norm and resblock_updown on, pooling_type "from_model",
in 4 / out 8 channels. Two departures from a literal tiny copy, both forced by the 400 KB budget:

* GroupNorm groups: upstream `nn.normalization` hard-codes 32 groups (every width a multiple of
  32; a 32-wide model is ~1.7 MB in fp16). The generator replaces the name `normalization` in
  `kandinsky2.model.unet` (looked up at call time by `ResBlock`, `AttentionBlock` and
  `UNetModel`) with the same `GroupNorm32` at 4 groups, recorded as `norm_num_groups: 4`.
* `Text2ImUNet` hard-codes the mT5 width 512 (`proj2 = AttentionPooling(8, 512, ...)`,
  `to_model_dim2 = nn.Linear(512, model_dim)`); `proj2` alone is ~850k parameters at 512. While the
  model is built, the generator gives `text2im_model` an `AttentionPooling` and an `nn.Linear` that
  turn an input width of exactly 512 into 16, recorded as `text_encoder2_dim: 16`. The Rust config
  defaults it to 512.

`full_emb2` is pooled by `proj2` over every token (the official code takes no attention mask), and
`pooled_emb2` is ignored by the official `get_text_emb`; the references pass it as None.

Deterministic and idempotent. Run through `make fixtures`; CI never runs it.
"""

from __future__ import annotations

import importlib
import importlib.util
import shutil
import sys
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import FIXTURES, perturb, save_reference, seed_all, write_json  # noqa: E402

OFFICIAL_SRC = Path("/work/shared/reference/kandinsky2-src")
OUT = FIXTURES / "kd20-unet"
BUDGET_BYTES = 400_000
GROUPS = 4
MT5_DIM = 16

MODEL_CONFIG = {
    "image_size": 16,
    "num_channels": 8,
    "num_res_blocks": 1,
    "channel_mult": "1,2",
    "num_heads": 1,
    "num_head_channels": 8,
    "num_heads_upsample": -1,
    "attention_resolutions": "8",
    "dropout": 0,
    "model_dim": 24,
    "use_scale_shift_norm": True,
    "resblock_updown": True,
    "use_fp16": False,
    "cache_text_emb": True,
    "text_encoder_in_dim1": 20,
    "text_encoder_in_dim2": 12,
    "pooling_type": "from_model",
    "in_channels": 4,
    "out_channels": 8,
    "up": False,
    "inpainting": False,
}


def import_official():
    if "kandinsky2" not in sys.modules:
        pkg = types.ModuleType("kandinsky2")
        pkg.__path__ = [str(OFFICIAL_SRC / "kandinsky2")]
        sys.modules["kandinsky2"] = pkg
    if importlib.util.find_spec("pytorch_lightning") is None and "pytorch_lightning" not in sys.modules:
        pl = types.ModuleType("pytorch_lightning")
        pl.LightningModule = torch.nn.Module
        sys.modules["pytorch_lightning"] = pl
    unet = importlib.import_module("kandinsky2.model.unet")
    nnmod = importlib.import_module("kandinsky2.model.nn")
    t2i = importlib.import_module("kandinsky2.model.text2im_model")
    mc = importlib.import_module("kandinsky2.model.model_creation")
    configs = importlib.import_module("kandinsky2.configs")
    assert Path(t2i.__file__).resolve().is_relative_to(OFFICIAL_SRC.resolve()), t2i.__file__

    def normalization(channels, swish=0.0):
        return nnmod.GroupNorm32(num_channels=channels, num_groups=GROUPS, swish=swish)

    unet.normalization = normalization
    return unet, t2i, mc, configs


def build(t2i, mc, cfg):
    """`create_model(**cfg)` with the 512 of the mT5 width turned into MT5_DIM."""
    orig_pool, orig_nn = t2i.AttentionPooling, t2i.nn

    def pool(heads, in_dim, out_dim):
        return orig_pool(heads, MT5_DIM if in_dim == 512 else in_dim, out_dim)

    nn = types.ModuleType("nn_width_patch")
    nn.__dict__.update(torch.nn.__dict__)
    nn.Linear = lambda i, o, *a, **k: torch.nn.Linear(MT5_DIM if i == 512 else i, o, *a, **k)
    t2i.AttentionPooling, t2i.nn = pool, nn
    try:
        return mc.create_model(**cfg)
    finally:
        t2i.AttentionPooling, t2i.nn = orig_pool, orig_nn


def capture(module, store, name):
    def hook(_m, _inp, out):
        store[name] = out.detach().float().clone()

    return module.register_forward_hook(hook)


@torch.no_grad()
def make_variant(t2i, mc, configs, out: Path, inpainting: bool, seed: int) -> None:
    cfg = dict(MODEL_CONFIG, inpainting=inpainting)
    if inpainting:
        cfg["channel_mult"] = "1,1"  # the budget: widths 8, 8 (one head)
    assert set(cfg) == set(configs.CONFIG_2_0["model_config"]), "model_config keys drifted"
    torch.manual_seed(seed)
    model = build(t2i, mc, cfg)
    perturb(model, seed + 1, scale=0.3)
    sd = {k: v.to(torch.float16).contiguous() for k, v in sorted(model.state_dict().items())}
    out.mkdir(parents=True, exist_ok=True)
    torch.save(sd, out / "model.pt")
    write_json(out / "config.json", dict(cfg, norm_num_groups=GROUPS, text_encoder2_dim=MT5_DIM))

    # Reload as the pipeline does, upcast to fp32.
    torch.manual_seed(seed + 7)
    model = build(t2i, mc, cfg).eval()
    loaded = torch.load(out / "model.pt", map_location="cpu", weights_only=True)
    res = model.load_state_dict({k: v.float() for k, v in loaded.items()}, strict=False)
    assert not res.missing_keys and not res.unexpected_keys, res
    assert set(loaded) == set(model.state_dict())

    g = torch.Generator().manual_seed(seed + 100)
    B = 2
    inputs = {
        "x": torch.randn(B, 4, 16, 16, generator=g),
        "timesteps": torch.tensor([3.5, 871.25]),
        "full_emb1": torch.randn(B, 5, MODEL_CONFIG["text_encoder_in_dim1"], generator=g),
        "pooled_emb1": torch.randn(B, MODEL_CONFIG["text_encoder_in_dim2"], generator=g),
        "full_emb2": torch.randn(B, 7, MT5_DIM, generator=g),
    }
    kwargs = {}
    if inpainting:
        inputs["inpaint_image"] = torch.randn(B, 4, 16, 16, generator=g)
        inputs["inpaint_mask"] = (torch.rand(B, 1, 16, 16, generator=g) > 0.5).float()
        kwargs = {"inpaint_image": inputs["inpaint_image"], "inpaint_mask": inputs["inpaint_mask"]}

    store: dict[str, torch.Tensor] = {}
    hooks = []
    if not inpainting:  # the budget: the inpainting references keep the text and the output
        hooks = [
            capture(model.time_embed, store, "time_emb"),
            capture(model.input_blocks[1], store, "input_block_1"),
            capture(model.input_blocks[2], store, "input_block_2"),
            capture(model.middle_block, store, "middle"),
        ]
    model.del_cache()
    text = model.get_text_emb(
        full_emb1=inputs["full_emb1"], pooled_emb1=inputs["pooled_emb1"],
        full_emb2=inputs["full_emb2"], pooled_emb2=None,
    )
    y = model(inputs["x"], inputs["timesteps"], full_emb1=inputs["full_emb1"],
              pooled_emb1=inputs["pooled_emb1"], full_emb2=inputs["full_emb2"],
              pooled_emb2=None, **kwargs)
    model.del_cache()
    for h in hooks:
        h.remove()
    tensors = dict(inputs)
    tensors.update(store)
    tensors["xf_proj"] = text["xf_proj"]
    tensors["xf_out"] = text["xf_out"]
    if not inpainting:
        tensors["emb"] = store["time_emb"] + text["xf_proj"]
    tensors["out"] = y
    tensors = {k: v.float().contiguous() for k, v in tensors.items()}
    meta = {k: list(v.shape) for k, v in sorted(tensors.items())}
    save_reference(out / "reference", tensors, meta)


def main() -> None:
    seed_all(0)
    _, t2i, mc, configs = import_official()
    if OUT.exists():
        shutil.rmtree(OUT)
    make_variant(t2i, mc, configs, OUT, inpainting=False, seed=2000)
    make_variant(t2i, mc, configs, OUT / "inpaint", inpainting=True, seed=3000)
    total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"{OUT}: {total} bytes")
    assert total <= BUDGET_BYTES, f"{total} bytes > budget {BUDGET_BYTES}"


if __name__ == "__main__":
    main()
