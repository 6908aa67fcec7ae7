#!/usr/bin/env python3
"""Decoder-side parity fixtures for kandinsky-serve (UNet, MoVQ, schedulers, V22 decoder pipelines).

Run:  tools/reference/.venv/bin/python tools/reference/gen_decoder.py

Never run by CI; its outputs are committed. Deterministic and idempotent: it deletes and rewrites
exactly the directories it owns (see OWNED below) and nothing else. Everything is built from
configs with random weights (no hub access). See tools/reference/DECODER.md for every file/key.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import copy
import filecmp
import json
import random
import shutil
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import PIL.Image  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from safetensors import safe_open  # noqa: E402

from common import FIXTURES, REPO, perturb, record_noise, save_reference, seed_all, write_json  # noqa: E402

import diffusers  # noqa: E402
from diffusers import (  # noqa: E402
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    KandinskyV22ControlnetImg2ImgPipeline,
    KandinskyV22ControlnetPipeline,
    KandinskyV22Img2ImgPipeline,
    KandinskyV22InpaintPipeline,
    KandinskyV22Pipeline,
    UNet2DConditionModel,
    VQModel,
)
from diffusers.pipelines.kandinsky2_2.pipeline_kandinsky2_2_inpainting import (  # noqa: E402
    prepare_mask,
    prepare_mask_and_masked_image,
)
from diffusers.utils.pil_utils import numpy_to_pil  # noqa: E402

diffusers.utils.logging.set_verbosity_error()
warnings.filterwarnings("ignore", category=FutureWarning)

TINY = FIXTURES / "tiny"
DEEP = FIXTURES / "deep"
CK_TINY = TINY / "kandinsky-2-2-decoder"
CK_INPAINT = TINY / "kandinsky-2-2-decoder-inpaint"
CK_CONTROL = TINY / "kandinsky-2-2-controlnet-depth"
CK_DEEP = DEEP / "kandinsky-2-2-decoder"
REF_TINY = TINY / "reference" / "decoder"
REF_DEEP = DEEP / "reference" / "decoder"
OWNED = [CK_TINY, CK_INPAINT, CK_CONTROL, CK_DEEP, REF_TINY, REF_DEEP]

# ----------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------

# diffusers tests/pipelines/kandinsky2_2/test_kandinsky.py `dummy_unet` (spec §7.1)
TINY_UNET = {
    "in_channels": 4,
    "out_channels": 8,
    "addition_embed_type": "image",
    "down_block_types": ("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
    "up_block_types": ("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
    "mid_block_type": "UNetMidBlock2DSimpleCrossAttn",
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "encoder_hid_dim": 32,
    "encoder_hid_dim_type": "image_proj",
    "cross_attention_dim": 32,
    "attention_head_dim": 4,
    "resnet_time_scale_shift": "scale_shift",
    "class_embed_type": None,
}
TINY_UNET_INPAINT = {**TINY_UNET, "in_channels": 9}
# test_kandinsky_controlnet.py `dummy_unet`
TINY_UNET_CONTROL = {**TINY_UNET, "in_channels": 8, "addition_embed_type": "image_hint", "cross_attention_dim": 100}

# test_kandinsky.py `dummy_movq_kwargs`
TINY_MOVQ = {
    "block_out_channels": [32, 64],
    "down_block_types": ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"],
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "norm_type": "spatial",
    "num_vq_embeddings": 12,
    "out_channels": 3,
    "up_block_types": ["AttnUpDecoderBlock2D", "UpDecoderBlock2D"],
    "vq_embed_dim": 4,
}
# 4-level MoVQ of test_kandinsky_controlnet.py (only used for the un-perturbed sanity check)
TEST_MOVQ_4LEVEL = {
    **TINY_MOVQ,
    "block_out_channels": [32, 32, 64, 64],
    "down_block_types": ["DownEncoderBlock2D"] * 3 + ["AttnDownEncoderBlock2D"],
    "up_block_types": ["AttnUpDecoderBlock2D"] + ["UpDecoderBlock2D"] * 3,
}

# Real 4-level structure (spec §4.1, §5.1) at reduced widths; sized for the fixture budget.
DEEP_UNET = {
    "in_channels": 4,
    "out_channels": 8,
    "addition_embed_type": "image",
    "down_block_types": ("ResnetDownsampleBlock2D",) + ("SimpleCrossAttnDownBlock2D",) * 3,
    "up_block_types": ("SimpleCrossAttnUpBlock2D",) * 3 + ("ResnetUpsampleBlock2D",),
    "mid_block_type": "UNetMidBlock2DSimpleCrossAttn",
    "block_out_channels": (32, 32, 32, 32),
    "layers_per_block": 2,
    "encoder_hid_dim": 32,
    "encoder_hid_dim_type": "image_proj",
    "cross_attention_dim": 48,
    "attention_head_dim": 16,
    "resnet_time_scale_shift": "scale_shift",
    "class_embed_type": None,
    "norm_num_groups": 32,
    "sample_size": 8,
}
DEEP_MOVQ = {
    "block_out_channels": [32, 32, 32, 32],
    "down_block_types": ["DownEncoderBlock2D"] * 3 + ["AttnDownEncoderBlock2D"],
    "up_block_types": ["AttnUpDecoderBlock2D"] + ["UpDecoderBlock2D"] * 3,
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "vq_embed_dim": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "norm_type": "spatial",
    "num_vq_embeddings": 16,
    "sample_size": 32,
}

# Hub `kandinsky-2-2-decoder/scheduler/scheduler_config.json` as read in spec §6.1 (clip_sample true).
HUB_DDPM = {
    "num_train_timesteps": 1000,
    "beta_schedule": "linear",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "clip_sample": True,
    "steps_offset": 1,
    "prediction_type": "epsilon",
    "thresholding": False,
    "variance_type": "fixed_small",
}
# `-decoder-inpaint` hub scheduler says clip_sample false (spec §6.1).
HUB_DDPM_INPAINT = {**HUB_DDPM, "clip_sample": False}
# diffusers test scheduler (spec §7.1); img2img tests use steps_offset 0.
TEST_DDIM = {
    "num_train_timesteps": 1000,
    "beta_schedule": "linear",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
    "thresholding": False,
}
DPMPP = {
    "num_train_timesteps": 1000,
    "beta_schedule": "linear",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "algorithm_type": "dpmsolver++",
    "solver_order": 2,
}

EXPECTED_T2I_SLICE = [0.3420, 0.9505, 0.3919, 1.0000, 0.5188, 0.3109, 0.6139, 0.5624, 0.6811]
EXPECTED_CONTROL_SLICE = [0.6959826, 0.868279, 0.7558092, 0.68769467, 0.85805804, 0.65977496, 0.44885302,
                          0.5959111, 0.4251595]

SEED_PERTURB = {"tiny_unet": 101, "tiny_movq": 102, "inpaint_unet": 103, "control_unet": 104,
                "deep_unet": 201, "deep_movq": 202}

INDEX: dict[str, dict] = {"tiny": {}, "deep": {}}
REPORT: list[str] = []


def json_clean(obj):
    """Strict JSON for the Rust side: non-finite floats (DPM's lambda_min_clipped = -inf) become strings."""
    if isinstance(obj, float) and not np.isfinite(obj):
        return "-inf" if obj < 0 else ("inf" if obj > 0 else "nan")
    if isinstance(obj, dict):
        return {str(k): json_clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_clean(v) for v in obj]
    return obj


def save_ref(path: Path, tensors: dict, meta: dict | None = None) -> None:
    save_reference(path, tensors, json_clean(meta) if meta is not None else None)
    if meta is not None:
        json.loads(path.with_suffix(".json").read_text(), parse_constant=_reject)


def _reject(c):
    raise ValueError(f"non-strict JSON constant {c}")


def log(msg: str) -> None:
    print(msg, flush=True)
    REPORT.append(msg)


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------


def floats_tensor(shape, rng: random.Random) -> torch.Tensor:
    """diffusers `testing_utils.floats_tensor` (scale 1): Python `random.random()` values, row-major."""
    total = 1
    for d in shape:
        total *= d
    values = [rng.random() for _ in range(total)]
    return torch.tensor(data=values, dtype=torch.float).view(shape).contiguous()


def gen(seed: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed)


def randn(shape, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=gen(seed), dtype=torch.float32)


def to_u8(image_nhwc: np.ndarray) -> np.ndarray:
    """PIL-equivalent uint8 via diffusers' own numpy_to_pil: round(x*255) (half-to-even), uint8."""
    return np.stack([np.array(p) for p in numpy_to_pil(image_nhwc)], axis=0)


def sched_config_json(s) -> dict:
    return json.loads(s.to_json_string())


def rel(p: Path) -> str:
    return str(p.relative_to(REPO))


def new_scheduler(kind: str, cfg: dict):
    cls = {"DDPMScheduler": DDPMScheduler, "DDIMScheduler": DDIMScheduler,
           "DPMSolverMultistepScheduler": DPMSolverMultistepScheduler,
           "LCMScheduler": diffusers.LCMScheduler, "TCDScheduler": diffusers.TCDScheduler}[kind]
    return cls.from_config(cfg)


def assert_all_f32(module: torch.nn.Module, what: str) -> None:
    bad = [n for n, p in module.state_dict().items() if p.dtype != torch.float32]
    assert not bad, f"{what}: non-f32 tensors after reload: {bad[:5]}"


def capture(module: torch.nn.Module, names: list[str]):
    """Forward hooks recording the first output of each named submodule. Returns (store, remove_fn)."""
    store: dict[str, torch.Tensor] = {}
    handles = []
    mods = dict(module.named_modules())
    for name in names:
        def hook(_m, _inp, out, name=name):
            if name in store or f"{name}.0" in store:
                return
            if isinstance(out, tuple):
                if name == "add_embedding":  # ImageHintTimeEmbedding -> (aug_emb, hint4)
                    store["add_embedding.aug_emb"] = out[0].detach().clone()
                    store["add_embedding.hint"] = out[1].detach().clone()
                    return
                out = out[0]  # down blocks: (hidden, res_samples)
            store[name] = out.detach().clone()
        handles.append(mods[name].register_forward_hook(hook))

    def remove():
        for h in handles:
            h.remove()
    return store, remove


# ----------------------------------------------------------------------------------------------
# Sanity check with the un-perturbed diffusers dummies
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def sanity_check() -> dict:
    res = {}
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**TINY_UNET)
    torch.manual_seed(0)
    movq = VQModel(**TINY_MOVQ)
    assert sum(p.numel() for p in unet.parameters()) == 884456
    assert sum(p.numel() for p in movq.parameters()) == 715327
    pipe = KandinskyV22Pipeline(unet=unet, scheduler=DDIMScheduler(**TEST_DDIM), movq=movq)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        image_embeds=floats_tensor((1, 32), random.Random(0)),
        negative_image_embeds=floats_tensor((1, 32), random.Random(1)),
        generator=gen(0), height=64, width=64, guidance_scale=4.0, num_inference_steps=2, output_type="np",
    ).images
    got = out[0, -3:, -3:, -1].flatten().tolist()
    diff = float(np.abs(np.array(got) - np.array(EXPECTED_T2I_SLICE)).max())
    log(f"sanity text2img (unperturbed dummies, DDIM 2 steps, seed 0): slice={np.round(got, 4).tolist()} "
        f"max|diff|={diff:.2e}")
    assert out.shape == (1, 64, 64, 3) and diff < 1e-2, "dummy config does not reproduce test_kandinsky slice"
    res["text2img"] = {"slice": got, "expected": EXPECTED_T2I_SLICE, "max_abs_diff": diff}

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**TINY_UNET_CONTROL)
    torch.manual_seed(0)
    movq = VQModel(**TEST_MOVQ_4LEVEL)
    pipe = KandinskyV22ControlnetPipeline(unet=unet, scheduler=DDIMScheduler(**TEST_DDIM), movq=movq)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        image_embeds=floats_tensor((1, 32), random.Random(0)),
        negative_image_embeds=floats_tensor((1, 32), random.Random(1)),
        hint=floats_tensor((1, 3, 64, 64), random.Random(0)),
        generator=gen(0), height=64, width=64, guidance_scale=4.0, num_inference_steps=2, output_type="np",
    ).images
    got = out[0, -3:, -3:, -1].flatten().tolist()
    diff = float(np.abs(np.array(got) - np.array(EXPECTED_CONTROL_SLICE)).max())
    log(f"sanity controlnet (unperturbed dummies): max|diff|={diff:.2e}")
    assert diff < 1e-2, "controlnet dummy config does not reproduce the diffusers slice"
    res["controlnet"] = {"slice": got, "expected": EXPECTED_CONTROL_SLICE, "max_abs_diff": diff}
    return res


# ----------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------


def build(cls, cfg: dict, seed_key: str):
    torch.manual_seed(0)  # same init as the diffusers dummies
    m = cls(**cfg)
    perturb(m, SEED_PERTURB[seed_key])
    return m.eval()


def save_checkpoint(pipe_cls, path: Path, unet, movq, scheduler, unet_dtype, movq_dtype):
    unet = copy.deepcopy(unet).to(unet_dtype)
    movq = copy.deepcopy(movq).to(movq_dtype)
    pipe = pipe_cls(unet=unet, scheduler=scheduler, movq=movq)
    pipe.save_pretrained(str(path), safe_serialization=True)
    # Mirror the hub scheduler file, which carries a key DDPMScheduler does not take.
    sc = path / "scheduler" / "scheduler_config.json"
    cfg = json.loads(sc.read_text())
    cfg["set_alpha_to_one"] = False
    sc.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    # Check the stored dtypes.
    for sub, dt in (("unet", unet_dtype), ("movq", movq_dtype)):
        with safe_open(str(path / sub / "diffusion_pytorch_model.safetensors"), "pt") as f:
            dts = {f.get_slice(k).get_dtype() for k in f.keys()}
        want = {torch.float16: "F16", torch.float32: "F32"}[dt]
        assert dts == {want}, f"{path}/{sub}: stored dtypes {dts}, wanted {want}"
    reloaded = pipe_cls.from_pretrained(str(path), torch_dtype=torch.float32)
    reloaded.set_progress_bar_config(disable=True)
    assert_all_f32(reloaded.unet, f"{path}/unet")
    assert_all_f32(reloaded.movq, f"{path}/movq")
    # The reloaded fp32 weights are exactly the stored values.
    for a, b in ((unet, reloaded.unet), (movq, reloaded.movq)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(sa[k].float(), sb[k]), k
    reloaded.unet.eval()
    reloaded.movq.eval()
    return reloaded


def hardlink_identical(src_dir: Path, dst_dir: Path) -> list[str]:
    """Replaces files in dst_dir that are byte-identical to src_dir's by hard links (git stores one blob)."""
    linked = []
    for f in sorted(src_dir.iterdir()):
        g = dst_dir / f.name
        assert g.exists() and filecmp.cmp(f, g, shallow=False), f"{g} differs from {f}"
        g.unlink()
        os.link(f, g)
        linked.append(rel(g))
    return linked


def movq_attention_key_style(path: Path) -> dict:
    with safe_open(str(path / "movq" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        keys = sorted(f.keys())
    att = [k for k in keys if ".attentions." in k]
    return {
        "to_q_style": sorted({k.split(".attentions.")[1].split(".", 1)[1] for k in att}),
        "has_legacy_query_key_value": any(k.endswith((".query.weight", ".key.weight", ".value.weight",
                                                      ".proj_attn.weight")) for k in keys),
        "num_tensors": len(keys),
    }


# ----------------------------------------------------------------------------------------------
# Deterministic inputs
# ----------------------------------------------------------------------------------------------


def init_image_u8(h: int = 64, w: int = 64) -> np.ndarray:
    """(h, w, 3) uint8, integer-only formula."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.int64)
    r = (4 * xx + 2 * yy) % 256
    g = np.clip(255 - 4 * yy, 0, 255)
    b = np.where((xx - w // 2) ** 2 + (yy - h // 2) ** 2 < (h // 3) ** 2, 220, 40)
    return np.stack([r, g, b], axis=-1).astype(np.uint8)


def inpaint_mask_u8(h: int = 64, w: int = 64) -> np.ndarray:
    """(h, w) uint8, 255 = repaint. Rectangle with odd start rows/cols so the nearest resize matters."""
    m = np.zeros((h, w), dtype=np.uint8)
    m[15:41, 23:57] = 255
    return m


def smooth_image(h: int, w: int) -> torch.Tensor:
    """(1, 3, h, w) float32 in [-1, 1]: smooth patterns, distinct per channel."""
    y = torch.arange(h, dtype=torch.float32)[:, None]
    x = torch.arange(w, dtype=torch.float32)[None, :]
    c0 = torch.sin(0.21 * x + 0.05 * y)
    c1 = torch.cos(0.13 * y) * torch.sin(0.07 * x + 1.0)
    c2 = torch.tanh((x - w / 2) / 9.0) * torch.cos(0.11 * (x + y))
    return torch.stack([c0, c1, c2], dim=0)[None].clamp(-1, 1).contiguous()


def depth_hint(h: int, w: int) -> torch.Tensor:
    """(1, 3, h, w) float32 in [0, 1]: radial depth-like map, x ramp, y ramp (distinct channels)."""
    y = torch.arange(h, dtype=torch.float32)[:, None].expand(h, w)
    x = torch.arange(w, dtype=torch.float32)[None, :].expand(h, w)
    r = torch.sqrt((x - w * 0.4) ** 2 + (y - h * 0.6) ** 2)
    c0 = 1.0 - (r / r.max())
    c1 = x / (w - 1)
    c2 = y / (h - 1)
    return torch.stack([c0, c1, c2], dim=0)[None].contiguous()


# ----------------------------------------------------------------------------------------------
# UNet / MoVQ references
# ----------------------------------------------------------------------------------------------

UNET_CAPTURE = ["time_embedding", "add_embedding", "encoder_hid_proj"]


@torch.no_grad()
def unet_reference(out: Path, unet, hw: int, seed: int, hint: bool, label: str, group: str) -> None:
    cfg = unet.config
    n_down = len(cfg.block_out_channels)
    names = UNET_CAPTURE + [f"down_blocks.{i}" for i in range(n_down)] + ["mid_block"] + \
        [f"up_blocks.{i}" for i in range(n_down if hw <= 8 else n_down - 2)]  # size budget
    sample_ch = 4 if hint else cfg.in_channels
    t = {
        "sample": randn((2, sample_ch, hw, hw), seed),
        "image_embeds": randn((2, cfg.encoder_hid_dim), seed + 1),
        "timestep_a": torch.tensor([981.0], dtype=torch.float32),
        "timestep_b": torch.tensor([1.0], dtype=torch.float32),
    }
    added = {"image_embeds": t["image_embeds"]}
    if hint:
        t["hint"] = torch.rand((2, 3, 8 * hw, 8 * hw), generator=gen(seed + 2), dtype=torch.float32)
        added["hint"] = t["hint"]
    store, remove = capture(unet, names)
    t["out_a"] = unet(t["sample"], t["timestep_a"][0], encoder_hidden_states=None,
                      added_cond_kwargs=added, return_dict=False)[0]
    remove()
    t["out_b"] = unet(t["sample"], t["timestep_b"][0], encoder_hidden_states=None,
                      added_cond_kwargs=added, return_dict=False)[0]
    for k, v in store.items():
        t[f"inter_a.{k}"] = v[:1].contiguous()  # batch element 0 only (size budget)
    meta = {
        "what": f"UNet2DConditionModel forward ({label})",
        "call": "unet(sample, timestep (0-dim f32 tensor), encoder_hidden_states=None, "
                "added_cond_kwargs={'image_embeds': image_embeds" + (", 'hint': hint" if hint else "") + "})",
        "unet_config": dict(cfg),
        "inputs_generated_with": f"torch.randn seed {seed} (sample), {seed + 1} (image_embeds)"
                                 + (f", torch.rand seed {seed + 2} (hint)" if hint else ""),
        "intermediates": "inter_a.* = outputs of the named submodules during the timestep_a call, batch element 0 "
                         "only (down_blocks.i: hidden state only, i.e. after the down-sampler; add_embedding for "
                         "image_hint: aug_emb and hint)",
    }
    save_ref(out, t, meta)
    INDEX[group][out.name] = {"kind": "unet_forward", "label": label, "keys": sorted(t.keys())}


@torch.no_grad()
def movq_reference(out: Path, movq, image_hw: int, ns_latent: tuple[int, int], seed: int, group: str,
                   deep: bool) -> None:
    t = {}
    x = smooth_image(image_hw, image_hw)
    t["image"] = x
    enc_names = ["encoder"] + (["encoder.down_blocks.3", "encoder.mid_block"] if deep else [])
    store, remove = capture(movq, enc_names)
    lat = movq.encode(x).latents
    remove()
    t["latents"] = lat
    t["inter_encode.encoder_out"] = store["encoder"]
    if deep:
        t["inter_encode.encoder.down_blocks.3"] = store["encoder.down_blocks.3"]
        t["inter_encode.encoder.mid_block"] = store["encoder.mid_block"]
    dec = movq.decode(lat, force_not_quantize=True).sample
    t["decoded"] = dec
    post = (dec * 0.5 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).contiguous()
    t["decoded_u8"] = torch.from_numpy(to_u8(post.numpy()))  # the f32 NHWC form is kept for the ns decode only

    z = randn((1, 4) + ns_latent, seed)
    t["ns_latents"] = z
    dec_names = ["post_quant_conv", "decoder.conv_in", "decoder.mid_block"] + (["decoder.up_blocks.0"] if deep else [])
    store, remove = capture(movq, dec_names)
    dec2 = movq.decode(z, force_not_quantize=True).sample
    remove()
    for k, v in store.items():
        t[f"inter_ns_decode.{k}"] = v
    t["ns_decoded"] = dec2
    post2 = (dec2 * 0.5 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).contiguous()
    t["ns_decoded_nhwc01"] = post2
    t["ns_decoded_u8"] = torch.from_numpy(to_u8(post2.numpy()))
    meta = {
        "what": "VQModel (MoVQ) encode / decode(force_not_quantize=True) / pipeline post-processing",
        "movq_config": dict(movq.config),
        "scale_factor": 2 ** (len(movq.config.block_out_channels) - 1),
        "image_formula": "smooth_image() in gen_decoder.py (stored, no need to recompute)",
        "ns_latents_generated_with": f"torch.randn seed {seed}",
        "post_processing": "nhwc01 = clamp(x*0.5+0.5, 0, 1) permuted NCHW->NHWC; u8 = round_half_even(nhwc01*255) "
                           "as uint8 (diffusers numpy_to_pil)",
    }
    save_ref(out, t, meta)
    INDEX[group][out.name] = {"kind": "movq", "keys": sorted(t.keys())}


# ----------------------------------------------------------------------------------------------
# Scheduler references
# ----------------------------------------------------------------------------------------------

SCHED_NS = [1, 2, 10, 25, 50, 100]
SCHED_SHAPE = (1, 4, 2, 2)  # schedulers are elementwise; small to save space
STEP_N = 10


def scheduler_variants() -> list[dict]:
    v = [
        dict(name="ddpm_hub", cls="DDPMScheduler", cfg=HUB_DDPM, store_alphas=True),
        dict(name="ddpm_clip_false", cls="DDPMScheduler", cfg={**HUB_DDPM, "clip_sample": False}),
        dict(name="ddpm_trailing", cls="DDPMScheduler", cfg={**HUB_DDPM, "timestep_spacing": "trailing"}),
        dict(name="ddpm_linspace", cls="DDPMScheduler", cfg={**HUB_DDPM, "timestep_spacing": "linspace"}),
        dict(name="ddpm_offset0", cls="DDPMScheduler", cfg={**HUB_DDPM, "steps_offset": 0}),
        dict(name="ddpm_scaled_linear", cls="DDPMScheduler", cfg={**HUB_DDPM, "beta_schedule": "scaled_linear"},
             store_alphas=True),
        dict(name="ddpm_learned_range", cls="DDPMScheduler", cfg={**HUB_DDPM, "variance_type": "learned_range"},
             model_channels=8),
        dict(name="ddim_test", cls="DDIMScheduler", cfg=TEST_DDIM, step_kwargs={"eta": 0.0}),
        dict(name="ddim_offset0", cls="DDIMScheduler", cfg={**TEST_DDIM, "steps_offset": 0},
             step_kwargs={"eta": 0.0}),
        dict(name="ddim_eta05", cls="DDIMScheduler", cfg=TEST_DDIM, step_kwargs={"eta": 0.5}),
        dict(name="dpmpp_2m", cls="DPMSolverMultistepScheduler", cfg=DPMPP),
        # What `DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)` gives for the hub DDPM config
        # (inherits timestep_spacing "leading", steps_offset 1, variance_type "fixed_small").
        dict(name="dpmpp_2m_from_hub_ddpm", cls="DPMSolverMultistepScheduler",
             cfg={**{k: v for k, v in sched_config_json(DDPMScheduler.from_config(HUB_DDPM)).items()
                     if not k.startswith("_")}, "algorithm_type": "dpmsolver++",
                  "solver_order": 2}),
    ]
    return v


@torch.no_grad()
def scheduler_reference(outdir: Path, var: dict, seed: int) -> None:
    name = var["name"]
    step_kwargs = var.get("step_kwargs", {})
    mc = var.get("model_channels", 4)
    t = {}
    s = new_scheduler(var["cls"], var["cfg"])
    if var.get("store_alphas"):  # identical for every variant with the hub betas; stored for two schedules
        t["alphas_cumprod"] = s.alphas_cumprod.clone()
    valid, invalid = [], {}
    for n in SCHED_NS:
        s = new_scheduler(var["cls"], var["cfg"])
        try:
            s.set_timesteps(n)
        except Exception as e:  # pragma: no cover - recorded, not expected for these variants
            invalid[str(n)] = repr(e)
            continue
        valid.append(n)
        t[f"timesteps_n{n}"] = s.timesteps.clone().to(torch.int64)
        if var["cls"] == "DPMSolverMultistepScheduler":
            t[f"sigmas_n{n}"] = s.sigmas.clone()

    # Full step() sequence over N=10
    s = new_scheduler(var["cls"], var["cfg"])
    s.set_timesteps(STEP_N)
    ts = s.timesteps.clone()
    x = randn(SCHED_SHAPE, seed)
    t["step_initial_sample"] = x.clone()
    mos = randn((STEP_N, SCHED_SHAPE[0], mc) + SCHED_SHAPE[2:], seed + 1)
    t["step_model_outputs"] = mos
    g = gen(seed + 2)
    prevs, x0s, noises, drawn_flags = [], [], [], []
    with record_noise() as drawn:
        for i in range(STEP_N):
            before = len(drawn)
            kw = dict(step_kwargs)
            if var["cls"] in ("DDPMScheduler", "DDIMScheduler", "DPMSolverMultistepScheduler"):
                kw["generator"] = g
            o = s.step(mos[i], ts[i], x, **kw)
            x = o.prev_sample
            prevs.append(x.clone())
            if getattr(o, "pred_original_sample", None) is not None:
                x0s.append(o.pred_original_sample.clone())
            n_new = len(drawn) - before
            assert n_new in (0, 1)
            drawn_flags.append(n_new)
            noises.append(drawn[-1].clone() if n_new else torch.zeros(SCHED_SHAPE))
    t["step_timesteps"] = ts.to(torch.int64)
    t["step_prev_samples"] = torch.stack(prevs)
    if x0s:
        t["step_pred_original_samples"] = torch.stack(x0s)
    t["step_noise"] = torch.stack(noises)
    t["step_noise_drawn"] = torch.tensor(drawn_flags, dtype=torch.int64)
    if var["cls"] == "DPMSolverMultistepScheduler":
        t["step_sigmas"] = s.sigmas.clone()

    # add_noise
    s = new_scheduler(var["cls"], var["cfg"])
    s.set_timesteps(STEP_N)
    if var["cls"] == "DPMSolverMultistepScheduler":
        # DPM++ looks t up in its current schedule (index_for_timestep); use schedule members.
        an_t = [int(s.timesteps[0]), int(s.timesteps[4]), int(s.timesteps[-1])]
    else:
        an_t = [0, 1, 250, 500, 999]
    x0 = randn(SCHED_SHAPE, seed + 3)
    nz = randn(SCHED_SHAPE, seed + 4)
    t["add_noise_original"] = x0
    t["add_noise_noise"] = nz
    t["add_noise_timesteps"] = torch.tensor(an_t, dtype=torch.int64)
    t["add_noise_out"] = torch.stack([s.add_noise(x0, nz, torch.tensor([tt], dtype=torch.int64)) for tt in an_t])

    full_cfg = sched_config_json(new_scheduler(var["cls"], var["cfg"]))
    meta = {
        "variant": name,
        "class": var["cls"],
        "config": full_cfg,
        "config_overrides": var["cfg"],
        "construct": f"{var['cls']}.from_config(config_overrides)  (== config, all keys)",
        "init_noise_sigma": float(new_scheduler(var["cls"], var["cfg"]).init_noise_sigma),
        "step_kwargs": step_kwargs,
        "num_inference_steps_valid": valid,
        "num_inference_steps_invalid": invalid,
        "step_n": STEP_N,
        "step_model_output_channels": mc,
        "step_noise_note": "step_noise[i] is the randn_tensor draw made inside step i (zeros where "
                           "step_noise_drawn[i] == 0). Steps are called in order on one scheduler instance: "
                           "step(step_model_outputs[i], step_timesteps[i], sample_i, **step_kwargs) with "
                           "sample_0 = step_initial_sample and sample_{i+1} = step_prev_samples[i].",
        "add_noise_note": "add_noise_out[k] = add_noise(add_noise_original, add_noise_noise, "
                          "tensor([add_noise_timesteps[k]])) after set_timesteps(10)",
        "generated_with": f"torch.randn seeds {seed} (initial sample), {seed + 1} (model outputs), "
                          f"{seed + 2} (step noise generator), {seed + 3}/{seed + 4} (add_noise)",
    }
    out = outdir / f"scheduler_{name}"
    save_ref(out, t, meta)
    INDEX["tiny"][f"schedulers/{out.name}"] = {"kind": "scheduler", "class": var["cls"], "keys": sorted(t.keys())}


# ----------------------------------------------------------------------------------------------
# Pipeline references
# ----------------------------------------------------------------------------------------------


class Recorder:
    """Wraps scheduler.step, movq.encode and movq.decode of a pipeline instance."""

    def __init__(self, pipe):
        self.steps: list[dict] = []
        self.decode_in: list[torch.Tensor] = []
        self.encode_out: list[torch.Tensor] = []
        self.unet_in: list[dict] = []
        sched, movq, unet = pipe.scheduler, pipe.movq, pipe.unet
        orig_step, orig_dec, orig_enc, orig_unet = sched.step, movq.decode, movq.encode, unet.forward

        def step(model_output, timestep, sample, *a, **k):
            o = orig_step(model_output, timestep, sample, *a, **k)
            self.steps.append({"t": int(timestep), "model_output": model_output.detach().clone(),
                               "sample": sample.detach().clone(), "prev": o[0].detach().clone()})
            return o

        def decode(z, *a, **k):
            self.decode_in.append(z.detach().clone())
            return orig_dec(z, *a, **k)

        def encode(x, *a, **k):
            o = orig_enc(x, *a, **k)
            self.encode_out.append(o[0].detach().clone())
            return o

        def unet_fwd(sample, timestep, *a, **k):
            self.unet_in.append({"sample": sample.detach().clone(),
                                 "added": {kk: vv.detach().clone() for kk, vv in k["added_cond_kwargs"].items()}})
            return orig_unet(sample, timestep, *a, **k)

        sched.step, movq.decode, movq.encode, unet.forward = step, decode, encode, unet_fwd
        self._restore = (sched, movq, unet)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        sched, movq, unet = self._restore
        for obj, attr in ((sched, "step"), (movq, "decode"), (movq, "encode"), (unet, "forward")):
            del obj.__dict__[attr]  # drop the instance attribute -> class method again
        return False


def embeds_pair() -> tuple[torch.Tensor, torch.Tensor]:
    return floats_tensor((1, 32), random.Random(0)), floats_tensor((1, 32), random.Random(1))


EMBEDS_NOTE = ("image_embeds = floats_tensor((1,32), random.Random(0)), negative_image_embeds = floats_tensor((1,32), "
               "random.Random(1)) (the diffusers test inputs; also stored in this file)")
SHARED: dict[str, torch.Tensor] = {}  # -> tiny/reference/decoder/pipeline_inputs.safetensors


def latent_hw(h: int, w: int, sf: int) -> tuple[int, int]:
    """downscale_height_and_width of the V22 pipelines."""
    return -(-h // sf ** 2) * sf, -(-w // sf ** 2) * sf


def finish_pipeline_case(out: Path, group: str, kind: str, t: dict, meta: dict, rec: Recorder, drawn, images,
                         keep_step0: bool) -> None:
    t["timesteps"] = torch.tensor([s["t"] for s in rec.steps], dtype=torch.int64)
    if drawn:
        t["noise"] = torch.stack(drawn)
    if keep_step0:
        t["step0_noise_pred"] = rec.steps[0]["model_output"]
        meta["step0_noise_pred_note"] = ("model_output passed to scheduler.step at the first step: CFG-combined "
                                         "epsilon (variance channels dropped unless variance_type is learned*)")
    assert len(rec.decode_in) == 1
    t["final_latents"] = rec.decode_in[0]
    t["image"] = torch.from_numpy(np.ascontiguousarray(images))
    t["image_u8"] = torch.from_numpy(to_u8(images))
    meta["num_noise_draws"] = len(drawn)
    meta["steps_run"] = len(rec.steps)
    meta["outputs_note"] = ("image = output_type='np' result (B,H,W,3) f32 in [0,1]; image_u8 = round_half_even("
                            "image*255) as uint8 (= output_type='pil')")
    save_ref(out, t, meta)
    INDEX[group][out.name] = {"kind": kind, "keys": sorted(t.keys())}


@torch.no_grad()
def text2img_case(outdir: Path, group: str, name: str, base, sched_cls: str, sched_cfg: dict, steps: int,
                  guidance: float = 4.0, n: int = 1, height: int = 64, width: int = 64, latent_seed: int = 1000,
                  noise_seed: int = 2000, check_latent_output: bool = False, keep_step0: bool = False) -> None:
    pipe = KandinskyV22Pipeline(unet=base.unet, movq=base.movq, scheduler=new_scheduler(sched_cls, sched_cfg))
    pipe.set_progress_bar_config(disable=True)
    emb, neg = embeds_pair()
    lh, lw = latent_hw(height, width, pipe.movq_scale_factor)
    latents = randn((n, 4, lh, lw), latent_seed)
    kwargs = dict(image_embeds=emb, negative_image_embeds=neg, height=height, width=width,
                  num_inference_steps=steps, guidance_scale=guidance, num_images_per_prompt=n)
    with Recorder(pipe) as rec, record_noise() as drawn:
        images = pipe(**kwargs, generator=gen(noise_seed), latents=latents.clone(), output_type="np").images
    drawn = list(drawn)
    if check_latent_output:
        pipe2 = KandinskyV22Pipeline(unet=base.unet, movq=base.movq, scheduler=new_scheduler(sched_cls, sched_cfg))
        pipe2.set_progress_bar_config(disable=True)
        lat = pipe2(**kwargs, generator=gen(noise_seed), latents=latents.clone(), output_type="latent").images
        assert torch.equal(lat, rec.decode_in[0]), "output_type=latent differs from the decode input"
    t = {"image_embeds": emb, "negative_image_embeds": neg, "latents": latents}
    meta = {
        "pipeline": "KandinskyV22Pipeline",
        "checkpoint": rel(base.ck_path),
        "scheduler_class": sched_cls,
        "scheduler_config": sched_config_json(pipe.scheduler),
        "height": height, "width": width, "num_inference_steps": steps, "guidance_scale": guidance,
        "num_images_per_prompt": n, "output_type": "np",
        "latents_note": f"explicit `latents` argument (torch.randn seed {latent_seed}); init_noise_sigma = 1",
        "noise_note": (f"noise[i] = the randn_tensor draw inside scheduler.step at step i (generator seed "
                       f"{noise_seed}; DDPM draws at every step because t > 0 throughout)" if drawn else
                       "no random draws (explicit latents, deterministic scheduler)"),
        "embeds_note": EMBEDS_NOTE,
        "final_latents_note": "latents after the last step (== output_type='latent' result; the movq.decode input)",
    }
    finish_pipeline_case(outdir / f"pipeline_text2img_{name}", group, "text2img", t, meta, rec, drawn, images,
                         keep_step0)


@torch.no_grad()
def img2img_case(name: str, base, sched_cls: str, sched_cfg: dict, strength: float, steps: int = 10,
                 guidance: float = 4.0, noise_seed: int = 3000, keep_step0: bool = False) -> None:
    pipe = KandinskyV22Img2ImgPipeline(unet=base.unet, movq=base.movq, scheduler=new_scheduler(sched_cls, sched_cfg))
    pipe.set_progress_bar_config(disable=True)
    emb, neg = embeds_pair()
    u8 = init_image_u8()
    pil = PIL.Image.fromarray(u8)
    pre = pipe.image_processor.preprocess(pil, 64, 64)
    assert torch.equal(pre, torch.from_numpy(u8).permute(2, 0, 1)[None].float() / 255.0 * 2.0 - 1.0)
    with Recorder(pipe) as rec, record_noise() as drawn:
        images = pipe(image_embeds=emb, image=pil, negative_image_embeds=neg, height=64, width=64,
                      num_inference_steps=steps, guidance_scale=guidance, strength=strength,
                      generator=gen(noise_seed), output_type="np").images
    drawn = list(drawn)
    SHARED.setdefault("img2img_image_latents", rec.encode_out[0])
    assert torch.equal(SHARED["img2img_image_latents"], rec.encode_out[0])
    assert torch.equal(rec.unet_in[0]["sample"][:1], rec.steps[0]["sample"])
    t = {"image_embeds": emb, "negative_image_embeds": neg, "noised_latents": rec.steps[0]["sample"]}
    meta = {
        "pipeline": "KandinskyV22Img2ImgPipeline",
        "checkpoint": rel(base.ck_path),
        "scheduler_class": sched_cls,
        "scheduler_config": sched_config_json(pipe.scheduler),
        "height": 64, "width": 64, "num_inference_steps": steps, "strength": strength,
        "guidance_scale": guidance, "num_images_per_prompt": 1, "output_type": "np",
        "inputs_note": "the init image is pipeline_inputs.init_image_u8 (also init_image.png) passed as a PIL RGB "
                       "image; preprocessed as f32(x)/255 then 2x-1 (the bicubic resize is a no-op at 64x64); "
                       "movq.encode(...).latents is pipeline_inputs.img2img_image_latents (not quantised, not scaled)",
        "noise_note": (f"draw order (generator seed {noise_seed}): noise[0] = add_noise noise "
                       "(noised_latents = scheduler.add_noise(img2img_image_latents, noise[0], timesteps[0])); "
                       "noise[1+i] = scheduler.step draw at step i (DDPM only; DDIM eta=0 draws nothing)"),
        "embeds_note": EMBEDS_NOTE,
        "timesteps_note": "timesteps = scheduler.timesteps[t_start:] with init = min(int(N*strength), N), "
                          "t_start = N - init (N = num_inference_steps)",
        "final_latents_note": "latents after the last step (the movq.decode input)",
    }
    finish_pipeline_case(REF_TINY / f"pipeline_img2img_{name}", "tiny", "img2img", t, meta, rec, drawn, images,
                         keep_step0)


@torch.no_grad()
def inpaint_case(name: str, base, steps: int, guidance: float = 4.0, latent_seed: int = 4000,
                 noise_seed: int = 5000, keep_step0: bool = False) -> None:
    pipe = KandinskyV22InpaintPipeline(unet=base.unet, movq=base.movq,
                                       scheduler=new_scheduler("DDPMScheduler", dict(base.scheduler.config)))
    pipe.set_progress_bar_config(disable=True)
    emb, neg = embeds_pair()
    u8 = init_image_u8()
    m8 = inpaint_mask_u8()
    pil = PIL.Image.fromarray(u8)
    pil_mask = PIL.Image.fromarray(m8, mode="L")
    lh, lw = latent_hw(64, 64, pipe.movq_scale_factor)
    latents = randn((1, 4, lh, lw), latent_seed)
    # Intermediates computed with the pipeline's own helpers, on copies.
    keep_px, img_pre = prepare_mask_and_masked_image(pil.copy(), pil_mask.copy(), 64, 64)
    assert torch.equal(img_pre, torch.from_numpy(u8).permute(2, 0, 1)[None].float() / 127.5 - 1.0)
    assert torch.equal(img_pre, torch.from_numpy(u8).permute(2, 0, 1)[None].float() / 255.0 * 2.0 - 1.0)
    with Recorder(pipe) as rec, record_noise() as drawn:
        images = pipe(image_embeds=emb, image=pil, mask_image=pil_mask, negative_image_embeds=neg, height=64,
                      width=64, num_inference_steps=steps, guidance_scale=guidance, generator=gen(noise_seed),
                      latents=latents.clone(), output_type="np").images
    drawn = list(drawn)
    image_latents = rec.encode_out[0]
    near = F.interpolate(keep_px.to(torch.float32), tuple(image_latents.shape[-2:]), mode="nearest")
    prepared = prepare_mask(near.clone())
    masked = image_latents * prepared
    u0 = rec.unet_in[0]["sample"]
    assert torch.equal(u0[:, 4:8], masked.repeat(2, 1, 1, 1)), "masked image latents mismatch"
    assert torch.equal(u0[:, 8:9], prepared.repeat(2, 1, 1, 1)), "prepared mask mismatch"
    shared = {
        "inpaint_mask_u8": torch.from_numpy(m8)[None],
        "inpaint_image_latents": image_latents,
        "inpaint_mask_latent_nearest": near,
        "inpaint_mask_latent_prepared": prepared,
        "inpaint_masked_image_latents": masked,
    }
    for k, v in shared.items():
        SHARED.setdefault(k, v)
        assert torch.equal(SHARED[k], v), k
    t = {"image_embeds": emb, "negative_image_embeds": neg, "latents": latents}
    meta = {
        "pipeline": "KandinskyV22InpaintPipeline",
        "checkpoint": rel(CK_INPAINT),
        "scheduler_class": "DDPMScheduler",
        "scheduler_config": sched_config_json(pipe.scheduler),
        "height": 64, "width": 64, "num_inference_steps": steps, "guidance_scale": guidance,
        "num_images_per_prompt": 1, "output_type": "np",
        "inputs_note": "image = pipeline_inputs.init_image_u8 as PIL RGB, mask_image = pipeline_inputs.inpaint_mask_u8 "
                       "as PIL 'L' (255 = repaint). The pipeline's intermediates are in pipeline_inputs.inpaint_*",
        "unet_input_note": "per step: cat([latents]*2 (CFG), inpaint_masked_image_latents x2, "
                           "inpaint_mask_latent_prepared x2) on channels -> 9 channels",
        "noise_note": (f"noise[i] = scheduler.step draw at step i (generator seed {noise_seed}). The re-noising of "
                       "image_latents for the per-step blend uses the initial `latents` (noise = latents.clone()), "
                       "not a new draw"),
        "latents_note": f"explicit `latents` (torch.randn seed {latent_seed})",
        "embeds_note": EMBEDS_NOTE,
        "final_latents_note": "after the final blend mask*image_latents + (1-mask)*latents (the movq.decode input)",
    }
    finish_pipeline_case(REF_TINY / f"pipeline_inpaint_{name}", "tiny", "inpaint", t, meta, rec, drawn, images,
                         keep_step0)


@torch.no_grad()
def controlnet_case(name: str, base, steps: int, guidance: float = 4.0, latent_seed: int = 6000,
                    noise_seed: int = 7000, keep_step0: bool = False) -> None:
    pipe = KandinskyV22ControlnetPipeline(unet=base.unet, movq=base.movq,
                                          scheduler=new_scheduler("DDPMScheduler", dict(base.scheduler.config)))
    pipe.set_progress_bar_config(disable=True)
    emb, neg = embeds_pair()
    hint = depth_hint(64, 64)
    lh, lw = latent_hw(64, 64, pipe.movq_scale_factor)
    latents = randn((1, 4, lh, lw), latent_seed)
    with Recorder(pipe) as rec, record_noise() as drawn:
        images = pipe(image_embeds=emb, negative_image_embeds=neg, hint=hint, height=64, width=64,
                      num_inference_steps=steps, guidance_scale=guidance, generator=gen(noise_seed),
                      latents=latents.clone(), output_type="np").images
    drawn = list(drawn)
    assert torch.equal(rec.unet_in[0]["added"]["hint"], torch.cat([hint, hint]))
    SHARED.setdefault("controlnet_hint", hint)
    t = {"image_embeds": emb, "negative_image_embeds": neg, "latents": latents}
    meta = {
        "pipeline": "KandinskyV22ControlnetPipeline",
        "checkpoint": rel(CK_CONTROL),
        "scheduler_class": "DDPMScheduler",
        "scheduler_config": sched_config_json(pipe.scheduler),
        "height": 64, "width": 64, "num_inference_steps": steps, "guidance_scale": guidance,
        "num_images_per_prompt": 1, "output_type": "np",
        "hint_note": "hint = pipeline_inputs.controlnet_hint (1,3,64,64) in [0,1], pixel resolution; CFG passes "
                     "cat([hint, hint]) to the UNet",
        "latents_note": f"explicit `latents` (torch.randn seed {latent_seed})",
        "noise_note": f"noise[i] = scheduler.step draw at step i (generator seed {noise_seed})",
        "embeds_note": EMBEDS_NOTE,
        "final_latents_note": "latents after the last step (captured as the movq.decode input; this pipeline has no "
                              "output_type='latent')",
    }
    finish_pipeline_case(REF_TINY / f"pipeline_controlnet_{name}", "tiny", "controlnet", t, meta, rec, drawn,
                         images, keep_step0)


@torch.no_grad()
def controlnet_img2img_case(name: str, base, strength: float, steps: int, guidance: float = 4.0,
                            noise_seed: int = 7100) -> None:
    """KandinskyV22ControlnetImg2ImgPipeline: img2img (noised init latents, the last
    int(N*strength) steps) with the depth hint in every UNet call."""
    pipe = KandinskyV22ControlnetImg2ImgPipeline(
        unet=base.unet, movq=base.movq,
        scheduler=new_scheduler("DDPMScheduler", dict(base.scheduler.config)))
    pipe.set_progress_bar_config(disable=True)
    emb, neg = embeds_pair()
    hint = depth_hint(64, 64)
    pil = PIL.Image.fromarray(init_image_u8())
    with Recorder(pipe) as rec, record_noise() as drawn:
        images = pipe(image_embeds=emb, image=pil, negative_image_embeds=neg, hint=hint, height=64, width=64,
                      num_inference_steps=steps, guidance_scale=guidance, strength=strength,
                      generator=gen(noise_seed), output_type="np").images
    drawn = list(drawn)
    assert torch.equal(rec.unet_in[0]["added"]["hint"], torch.cat([hint, hint]))
    assert torch.equal(SHARED["controlnet_hint"], hint)
    t = {"image_embeds": emb, "negative_image_embeds": neg, "image_latents": rec.encode_out[0],
         "noised_latents": rec.steps[0]["sample"]}
    meta = {
        "pipeline": "KandinskyV22ControlnetImg2ImgPipeline",
        "checkpoint": rel(CK_CONTROL),
        "scheduler_class": "DDPMScheduler",
        "scheduler_config": sched_config_json(pipe.scheduler),
        "height": 64, "width": 64, "num_inference_steps": steps, "strength": strength,
        "guidance_scale": guidance, "num_images_per_prompt": 1, "output_type": "np",
        "inputs_note": "the init image is pipeline_inputs.init_image_u8 as a PIL RGB image; image_latents = "
                       "movq.encode(...).latents of this checkpoint's MoVQ (stored here)",
        "hint_note": "hint = pipeline_inputs.controlnet_hint (1,3,64,64) in [0,1]; CFG passes cat([hint, hint])",
        "noise_note": (f"draw order (generator seed {noise_seed}): noise[0] = add_noise noise, "
                       "noise[1+i] = scheduler.step draw at step i"),
        "embeds_note": EMBEDS_NOTE,
        "final_latents_note": "latents after the last step (the movq.decode input)",
    }
    finish_pipeline_case(REF_TINY / f"pipeline_controlnet_img2img_{name}", "tiny", "controlnet_img2img", t, meta,
                         rec, drawn, images, False)


def save_shared_inputs() -> None:
    t = {"init_image_u8": torch.from_numpy(init_image_u8())[None], **SHARED}
    save_ref(REF_TINY / "pipeline_inputs", t, {
        "what": "inputs and input-side intermediates shared by the img2img / inpaint / controlnet pipeline cases",
        "init_image_u8": "(1,64,64,3) uint8 RGB, integer formula init_image_u8() in gen_decoder.py; == init_image.png",
        "img2img_image_latents": "movq.encode(pre).latents (tiny decoder movq), pre = VaeImageProcessor.preprocess "
                                 "of the PIL image = f32(init_image_u8)/255 then 2*x-1, NCHW (not stored; "
                                 "asserted bit-exact against that formula by gen_decoder.py)",
        "inpaint_mask_u8": "(1,64,64) uint8, 255 = repaint (rows 15..40, cols 23..56); == inpaint_mask.png",
        "inpaint_image_latents": "movq.encode(pre).latents (inpaint checkpoint movq) with pre = "
                                 "prepare_mask_and_masked_image's f32(init_image_u8)/127.5 - 1, NCHW (not stored: a "
                                 "different formula from img2img's f32(x)/255*2-1, but the f32 results are identical "
                                 "for all 256 values, asserted by gen_decoder.py)",
        "inpaint_mask_latent_nearest": "F.interpolate(keep, latent size, mode='nearest') with keep = "
                                       "1 - (f32(inpaint_mask_u8)/255 >= 0.5) (1,1,64,64), 1 = keep (not stored); "
                                       "nearest: src index = floor(dst * in/out)",
        "inpaint_mask_latent_prepared": "prepare_mask(inpaint_mask_latent_nearest) (erosion of the keep region)",
        "inpaint_masked_image_latents": "inpaint_image_latents * inpaint_mask_latent_prepared",
        "controlnet_hint": "(1,3,64,64) f32 in [0,1]: radial depth-like map, x ramp, y ramp (distinct channels)",
    })
    INDEX["tiny"]["pipeline_inputs"] = {"kind": "pipeline_inputs", "keys": sorted(t.keys())}


@torch.no_grad()
def prepare_mask_reference() -> None:
    g = gen(8000)
    m = (torch.rand((2, 1, 12, 16), generator=g) >= 0.3).to(torch.float32)
    out = prepare_mask(m.clone())
    # A 3-channel variant: the rule reads channel 0 and writes all channels.
    m3 = (torch.rand((1, 3, 6, 7), generator=g) >= 0.3).to(torch.float32)
    out3 = prepare_mask(m3.clone())
    save_ref(REF_TINY / "prepare_mask", {"mask": m, "prepared": out, "mask_3ch": m3, "prepared_3ch": out3}, {
        "what": "diffusers pipeline_kandinsky2_2_inpainting.prepare_mask (latent keep-mask erosion), standalone",
        "rule": "for each (i,j) whose ORIGINAL channel-0 value is 0: set all channels at (i-1,j), (i,j-1), "
                "(i-1,j-1), (i+1,j), (i,j+1), (i+1,j+1) to 0 where in bounds (anti-diagonals untouched)",
        "inputs": "torch.rand(generator seed 8000) >= 0.3, 1 = keep",
    })
    INDEX["tiny"]["prepare_mask"] = {"kind": "prepare_mask", "keys": ["mask", "mask_3ch", "prepared", "prepared_3ch"]}


# ----------------------------------------------------------------------------------------------
# Replay check: every pipeline case re-run from the stored files only, with the stored noise injected
# ----------------------------------------------------------------------------------------------


class InjectNoise:
    """Replaces diffusers' randn_tensor by a function returning the stored draws in order."""

    def __init__(self, draws: list[torch.Tensor]):
        self.draws = list(draws)

    def __enter__(self):
        from diffusers.utils import torch_utils

        self.original = torch_utils.randn_tensor
        self.patched = [m for n, m in list(sys.modules.items())
                        if n.startswith("diffusers") and getattr(m, "randn_tensor", None) is self.original]

        def inject(shape, *a, **k):
            t = self.draws.pop(0)
            assert tuple(t.shape) == tuple(shape), (t.shape, shape)
            return t.clone()
        for m in self.patched:
            m.randn_tensor = inject
        return self

    def __exit__(self, *exc):
        for m in self.patched:
            m.randn_tensor = self.original
        assert exc[0] is not None or not self.draws, "unused stored noise"
        return False


@torch.no_grad()
def verify_replay() -> int:
    from safetensors.torch import load_file

    pipes = {}
    n = 0
    shared = load_file(str(REF_TINY / "pipeline_inputs.safetensors"))
    for root in (REF_TINY, REF_DEEP):
        for f in sorted(root.glob("pipeline_*.json")):
            meta = json.loads(f.read_text())
            if "pipeline" not in meta:
                continue
            t = load_file(str(f.with_suffix(".safetensors")))
            cls = {"KandinskyV22Pipeline": KandinskyV22Pipeline, "KandinskyV22Img2ImgPipeline": KandinskyV22Img2ImgPipeline,
                   "KandinskyV22InpaintPipeline": KandinskyV22InpaintPipeline,
                   "KandinskyV22ControlnetPipeline": KandinskyV22ControlnetPipeline,
                   "KandinskyV22ControlnetImg2ImgPipeline": KandinskyV22ControlnetImg2ImgPipeline}[meta["pipeline"]]
            key = (meta["pipeline"], meta["checkpoint"])
            if key not in pipes:
                pipes[key] = cls.from_pretrained(str(REPO / meta["checkpoint"]), torch_dtype=torch.float32)
            base = pipes[key]
            cfg = {k: v for k, v in meta["scheduler_config"].items() if k != "lambda_min_clipped"}
            pipe = cls(unet=base.unet, movq=base.movq, scheduler=new_scheduler(meta["scheduler_class"], cfg))
            pipe.set_progress_bar_config(disable=True)
            kw = dict(image_embeds=t["image_embeds"], negative_image_embeds=t["negative_image_embeds"],
                      height=meta["height"], width=meta["width"], num_inference_steps=meta["num_inference_steps"],
                      guidance_scale=meta["guidance_scale"], output_type="np")
            img2img = ("KandinskyV22Img2ImgPipeline", "KandinskyV22ControlnetImg2ImgPipeline")
            if meta["pipeline"] not in img2img:
                kw["latents"] = t["latents"].clone()
            if meta["pipeline"] in ("KandinskyV22Pipeline",):
                kw["num_images_per_prompt"] = meta["num_images_per_prompt"]
            if meta["pipeline"] in img2img:
                kw["image"] = PIL.Image.fromarray(shared["init_image_u8"][0].numpy())
                kw["strength"] = meta["strength"]
            if meta["pipeline"] == "KandinskyV22InpaintPipeline":
                kw["image"] = PIL.Image.fromarray(shared["init_image_u8"][0].numpy())
                kw["mask_image"] = PIL.Image.fromarray(shared["inpaint_mask_u8"][0].numpy(), mode="L")
            if meta["pipeline"] in ("KandinskyV22ControlnetPipeline", "KandinskyV22ControlnetImg2ImgPipeline"):
                kw["hint"] = shared["controlnet_hint"]
            draws = list(t["noise"]) if "noise" in t else []
            with Recorder(pipe) as rec, InjectNoise(draws):
                images = pipe(**kw).images
            assert torch.equal(rec.decode_in[0], t["final_latents"]), f"{f.name}: final_latents differ on replay"
            assert np.array_equal(images, t["image"].numpy()), f"{f.name}: image differs on replay"
            assert torch.equal(rec.steps[0]["model_output"] if "step0_noise_pred" in t else torch.zeros(()),
                               t.get("step0_noise_pred", torch.zeros(())))
            n += 1
    return n


@torch.no_grad()
def verify_scheduler_replay() -> int:
    """Rebuilds every scheduler variant from its JSON `config` alone and replays the stored step sequence."""
    from safetensors.torch import load_file

    n = 0
    for f in sorted((REF_TINY / "schedulers").glob("scheduler_*.json")):
        meta = json.loads(f.read_text())
        t = load_file(str(f.with_suffix(".safetensors")))
        cfg = {k: (float(v) if v in ("-inf", "inf", "nan") else v) for k, v in meta["config"].items()}
        s = new_scheduler(meta["class"], cfg)
        for nn in meta["num_inference_steps_valid"]:
            s.set_timesteps(nn)
            assert torch.equal(s.timesteps, t[f"timesteps_n{nn}"]), (f.name, nn)
        s = new_scheduler(meta["class"], cfg)
        s.set_timesteps(meta["step_n"])
        x = t["step_initial_sample"]
        draws = [t["step_noise"][i] for i in range(meta["step_n"]) if t["step_noise_drawn"][i]]
        with InjectNoise(draws):
            for i in range(meta["step_n"]):
                x = s.step(t["step_model_outputs"][i], s.timesteps[i], x, **meta["step_kwargs"]).prev_sample
                assert torch.equal(x, t["step_prev_samples"][i]), (f.name, i)
        n += 1
    return n


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------


def versions() -> dict:
    import PIL
    import safetensors
    import transformers

    return {"python": sys.version.split()[0], "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "safetensors": safetensors.__version__,
            "pillow": PIL.__version__, "numpy": np.__version__}


def du_bytes(paths) -> tuple[int, int]:
    """(apparent bytes counting each inode once, apparent bytes counting every path)."""
    seen, unique, total = set(), 0, 0
    for p in paths:
        for root, _, files in os.walk(p):
            for f in files:
                st = os.stat(os.path.join(root, f))
                total += st.st_size
                if (st.st_dev, st.st_ino) not in seen:
                    seen.add((st.st_dev, st.st_ino))
                    unique += st.st_size
    return unique, total


def main() -> None:
    seed_all(0)
    for p in OWNED:
        if p.exists():
            shutil.rmtree(p)
    REF_TINY.mkdir(parents=True)
    REF_DEEP.mkdir(parents=True)

    sanity = sanity_check()

    # ---- checkpoints -------------------------------------------------------------------------
    tiny_unet = build(UNet2DConditionModel, TINY_UNET, "tiny_unet")
    tiny_movq = build(VQModel, TINY_MOVQ, "tiny_movq")
    inpaint_unet = build(UNet2DConditionModel, TINY_UNET_INPAINT, "inpaint_unet")
    control_unet = build(UNet2DConditionModel, TINY_UNET_CONTROL, "control_unet")
    deep_unet = build(UNet2DConditionModel, DEEP_UNET, "deep_unet")
    deep_movq = build(VQModel, DEEP_MOVQ, "deep_movq")

    tiny = save_checkpoint(KandinskyV22Pipeline, CK_TINY, tiny_unet, tiny_movq,
                           DDPMScheduler.from_config(HUB_DDPM), torch.float32, torch.float32)
    inpaint = save_checkpoint(KandinskyV22InpaintPipeline, CK_INPAINT, inpaint_unet, tiny_movq,
                              DDPMScheduler.from_config(HUB_DDPM_INPAINT), torch.float16, torch.float32)
    # The controlnet checkpoint takes the 4-level deep MoVQ (scale factor 8): the UNet's hint block always
    # downsamples the pixel-resolution hint by 8, so with the 2-level tiny MoVQ (factor 2) the pipeline breaks
    # (hint 64x64 -> 8x8 vs latents 32x32). The diffusers controlnet test uses a 4-level MoVQ for the same reason.
    control = save_checkpoint(KandinskyV22ControlnetPipeline, CK_CONTROL, control_unet, deep_movq,
                              DDPMScheduler.from_config(HUB_DDPM), torch.float16, torch.float32)
    deep = save_checkpoint(KandinskyV22Pipeline, CK_DEEP, deep_unet, deep_movq,
                           DDPMScheduler.from_config(HUB_DDPM), torch.float16, torch.float32)
    tiny.ck_path, inpaint.ck_path, control.ck_path, deep.ck_path = CK_TINY, CK_INPAINT, CK_CONTROL, CK_DEEP
    linked = hardlink_identical(CK_TINY / "movq", CK_INPAINT / "movq") + \
        hardlink_identical(CK_DEEP / "movq", CK_CONTROL / "movq")
    key_style = {"tiny": movq_attention_key_style(CK_TINY), "deep": movq_attention_key_style(CK_DEEP)}
    log(f"movq attention key style: {key_style}")
    param_counts = {name: sum(p.numel() for p in m.parameters()) for name, m in
                    (("tiny_unet", tiny.unet), ("tiny_movq", tiny.movq), ("inpaint_unet", inpaint.unet),
                     ("control_unet", control.unet), ("deep_unet", deep.unet), ("deep_movq", deep.movq))}
    tensor_counts = {name: len(m.state_dict()) for name, m in
                     (("tiny_unet", tiny.unet), ("tiny_movq", tiny.movq), ("inpaint_unet", inpaint.unet),
                      ("control_unet", control.unet), ("deep_unet", deep.unet), ("deep_movq", deep.movq))}
    log(f"param counts: {param_counts}")

    # ---- component references --------------------------------------------------------------
    unet_reference(REF_TINY / "unet_forward", tiny.unet, 8, 10, False, "tiny decoder unet", "tiny")
    unet_reference(REF_TINY / "unet_inpaint_forward", inpaint.unet, 8, 20, False, "tiny inpaint unet (9 ch)", "tiny")
    unet_reference(REF_TINY / "unet_controlnet_forward", control.unet, 8, 30, True, "tiny controlnet unet", "tiny")
    unet_reference(REF_DEEP / "unet_forward", deep.unet, 16, 40, False, "deep decoder unet", "deep")
    movq_reference(REF_TINY / "movq", tiny.movq, 64, (8, 12), 50, "tiny", deep=False)
    movq_reference(REF_DEEP / "movq", deep.movq, 64, (4, 6), 60, "deep", deep=True)

    sched_dir = REF_TINY / "schedulers"
    for k, var in enumerate(scheduler_variants()):
        scheduler_reference(sched_dir, var, 100 + 10 * k)
    prepare_mask_reference()

    # ---- pipelines ---------------------------------------------------------------------------
    PIL.Image.fromarray(init_image_u8()).save(REF_TINY / "init_image.png")
    PIL.Image.fromarray(inpaint_mask_u8(), mode="L").save(REF_TINY / "inpaint_mask.png")
    ddpm_cfg = dict(tiny.scheduler.config)
    text2img_case(REF_TINY, "tiny", "ddpm_2", tiny, "DDPMScheduler", ddpm_cfg, 2, latent_seed=1001,
                  noise_seed=2001, check_latent_output=True, keep_step0=True)
    text2img_case(REF_TINY, "tiny", "ddim_2", tiny, "DDIMScheduler", TEST_DDIM, 2, latent_seed=1003, noise_seed=2003)
    # Secondary cases at smaller / non-square sizes (size budget; the code paths do not depend on the size).
    text2img_case(REF_TINY, "tiny", "ddpm_5_32x48", tiny, "DDPMScheduler", ddpm_cfg, 5, height=32, width=48,
                  latent_seed=1002, noise_seed=2002)
    text2img_case(REF_TINY, "tiny", "dpmpp_5_32", tiny, "DPMSolverMultistepScheduler", DPMPP, 5, height=32,
                  width=32, latent_seed=1004, noise_seed=2004)
    text2img_case(REF_TINY, "tiny", "ddpm_2_nocfg_32", tiny, "DDPMScheduler", ddpm_cfg, 2, guidance=1.0, height=32,
                  width=32, latent_seed=1005, noise_seed=2005)
    text2img_case(REF_TINY, "tiny", "ddpm_2_n2_32", tiny, "DDPMScheduler", ddpm_cfg, 2, n=2, height=32, width=32,
                  latent_seed=1006, noise_seed=2006)
    ddim0 = {**TEST_DDIM, "steps_offset": 0}
    img2img_case("ddim_s02", tiny, "DDIMScheduler", ddim0, 0.2, noise_seed=3001, keep_step0=True)
    img2img_case("ddim_s05", tiny, "DDIMScheduler", ddim0, 0.5, noise_seed=3002)
    img2img_case("ddpm_s02", tiny, "DDPMScheduler", ddpm_cfg, 0.2, noise_seed=3003)
    img2img_case("ddpm_s05", tiny, "DDPMScheduler", ddpm_cfg, 0.5, noise_seed=3004)
    inpaint_case("ddpm_2", inpaint, 2, latent_seed=4001, noise_seed=5001, keep_step0=True)
    inpaint_case("ddpm_5", inpaint, 5, latent_seed=4002, noise_seed=5002)
    controlnet_case("ddpm_2", control, 2, latent_seed=6001, noise_seed=7001, keep_step0=True)
    controlnet_img2img_case("ddpm_4_s05", control, 0.5, 4, noise_seed=7101)
    save_shared_inputs()
    text2img_case(REF_DEEP, "deep", "ddpm_3", deep, "DDPMScheduler", dict(deep.scheduler.config), 3,
                  latent_seed=1101, noise_seed=2101, check_latent_output=True, keep_step0=True)

    log(f"scheduler replay check: {verify_scheduler_replay()} variants rebuilt from their JSON config and replayed "
        "bit-exactly with injected noise")
    log(f"replay check: {verify_replay()} pipeline cases reproduced bit-exactly from the stored files with "
        "injected noise (no torch RNG)")

    # ---- index + size ------------------------------------------------------------------------
    budget_paths = [CK_TINY, CK_INPAINT, CK_CONTROL, REF_TINY, DEEP / "kandinsky-2-2-decoder", REF_DEEP]
    unique, total = du_bytes(budget_paths)
    log(f"size: unique (hard links once) {unique / 1e6:.2f} MB, every path {total / 1e6:.2f} MB")
    common = {
        "generator": "tools/reference/gen_decoder.py",
        "versions": versions(),
        "sanity_check_unperturbed": sanity,
        "perturb_seeds": SEED_PERTURB,
        "param_counts": param_counts,
        "tensor_counts": tensor_counts,
        "movq_attention_keys": key_style,
        "hardlinked_movq_copies": linked,
    }
    common = json_clean(common)
    for group, root in (("tiny", REF_TINY), ("deep", REF_DEEP)):
        for name, entry in INDEX[group].items():
            with safe_open(str(root / f"{name}.safetensors"), "pt") as f:
                entry["tensors"] = {k: {"shape": list(f.get_slice(k).get_shape()), "dtype": f.get_slice(k).get_dtype()}
                                    for k in sorted(f.keys())}
            entry.pop("keys", None)
    write_json(REF_TINY / "index.json", {**common, "checkpoints": {
        "decoder": rel(CK_TINY), "inpaint": rel(CK_INPAINT), "controlnet": rel(CK_CONTROL)},
        "references": INDEX["tiny"]})
    write_json(REF_DEEP / "index.json", {**common, "checkpoints": {"decoder": rel(CK_DEEP)},
                                         "references": INDEX["deep"]})
    log("done")


if __name__ == "__main__":
    main()
