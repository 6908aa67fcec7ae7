"""Generates the tiny Kandinsky 2.2 *prior* checkpoint and its diffusers reference tensors.

Never run by CI. Run from the repository root:

    tools/reference/.venv/bin/python tools/reference/gen_prior.py

Deterministic and idempotent: deletes and rewrites only its own outputs

    tests/fixtures/tiny/kandinsky-2-2-prior/      (checkpoint, official diffusers layout)
    tests/fixtures/tiny/reference/prior/          (reference tensors + json sidecars + input images)

Every file and key is documented in tools/reference/PRIOR.md.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import PIL.Image
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import build_tokenizer  # noqa: E402
from common import FIXTURES, dir_size_mb, perturb, record_noise, save_reference, seed_all, write_json  # noqa: E402


def save_ref(path: Path, tensors: dict, meta: dict | None = None) -> None:
    """save_reference on private copies (safetensors refuses tensors that share storage, e.g. chunk() views)."""
    save_reference(path, {k: (v.detach().clone() if isinstance(v, torch.Tensor) else v) for k, v in tensors.items()}, meta)

CKPT = FIXTURES / "tiny" / "kandinsky-2-2-prior"
REF = FIXTURES / "tiny" / "reference" / "prior"
MAX_LEN = 77
EMB = 32  # embedding_dim / projection_dim of the tiny models

IMAGE_MEAN = [0.48145466, 0.4578275, 0.40821073]
IMAGE_STD = [0.26862954, 0.26130258, 0.27577711]

LONG_PROMPT = (
    "A breathtaking, ultra detailed oil painting of a majestic white horse galloping across a misty "
    "meadow at dawn, golden sunlight breaking through ancient oak trees, dew drops sparkling on the grass, "
    "wildflowers in red, yellow and violet, a distant castle on a hill, dramatic clouds, volumetric light, "
    "cinematic composition, painted in the style of the old masters with rich textures and subtle glazes, "
    "trending on artstation, award winning, masterpiece, 8k resolution, sharp focus, intricate details "
    "everywhere you look"
)

# Tokenizer fixture prompts (order is the row order of tokenizer.safetensors).
TOKENIZER_PROMPTS = [
    "a photo of a cat",
    "horse",
    "red cat, 4k photo",
    "A RED cat!!! wearing... a hat?! (4K, ultra-detailed) -- #1 @home; 50% off: \"quotes\" & "
    "'apostrophes' don't it's we'll <tag> x=3.14",
    "Café crème brûlée à la façon de Noël, naïve señor",
    "Кот в сапогах",
    "一只可爱的猫",
    "🐱 cat emoji 🚀✨ 👩‍🚀",
    "",
    "cafe\u0301 with  multiple   spaces\tand\nnewlines  ",
    "日本語のテキスト and 한국어",
    "Straße ÆØÅ İstanbul",
    LONG_PROMPT,
]

TEXT_ENCODER_PROMPTS = ["a photo of a cat", "horse", "", LONG_PROMPT, "Кот в сапогах"]


# ---------------------------------------------------------------------------------------------------
# Checkpoint


def build_checkpoint() -> None:
    from diffusers import KandinskyV22PriorPipeline, PriorTransformer, UnCLIPScheduler
    from transformers import (
        CLIPImageProcessor,
        CLIPTextConfig,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    torch.manual_seed(0)
    prior = PriorTransformer(num_attention_heads=2, attention_head_dim=12, embedding_dim=EMB, num_layers=2)
    perturb(prior, seed=100)
    with torch.no_grad():
        g = torch.Generator().manual_seed(101)
        prior.clip_mean.copy_(0.1 * torch.randn(prior.clip_mean.shape, generator=g))
        prior.clip_std.copy_(1.0 + 0.1 * torch.randn(prior.clip_std.shape, generator=g))
        assert bool((prior.clip_std > 0).all())

    torch.manual_seed(1)
    text_encoder = CLIPTextModelWithProjection(
        CLIPTextConfig(
            bos_token_id=0,
            eos_token_id=2,  # legacy value of the real checkpoint -> argmax pooling
            pad_token_id=1,
            hidden_size=EMB,
            projection_dim=EMB,
            intermediate_size=37,
            layer_norm_eps=1e-5,
            num_attention_heads=4,
            num_hidden_layers=5,
            vocab_size=49408,
            max_position_embeddings=MAX_LEN,
            hidden_act="gelu",
        )
    )
    perturb(text_encoder, seed=200)

    torch.manual_seed(2)
    image_encoder = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=EMB,
            image_size=224,
            patch_size=14,
            projection_dim=EMB,
            intermediate_size=37,
            num_attention_heads=4,
            num_channels=3,
            num_hidden_layers=5,
            hidden_act="gelu",
        )
    )
    perturb(image_encoder, seed=300)

    scheduler = UnCLIPScheduler(
        num_train_timesteps=1000,
        variance_type="fixed_small_log",
        prediction_type="sample",
        clip_sample=True,
        clip_sample_range=10.0,
    )
    image_processor = CLIPImageProcessor(
        crop_size=224,
        do_center_crop=True,
        do_normalize=True,
        do_resize=True,
        image_mean=IMAGE_MEAN,
        image_std=IMAGE_STD,
        resample=3,
        size=224,
    )

    # Tokenizer first into a temporary folder (the pipeline save writes its own tokenizer files,
    # which are replaced below by build_tokenizer's complete set).
    tok_dir = CKPT / "tokenizer"
    build_tokenizer.build(tok_dir)
    tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir))

    pipe = KandinskyV22PriorPipeline(
        prior=prior,
        image_encoder=image_encoder.to(torch.float16),  # stored fp16 like the real repo
        text_encoder=text_encoder.to(torch.float16),  # stored fp16 to keep the 49408x32 embedding small
        tokenizer=tokenizer,
        scheduler=scheduler,
        image_processor=image_processor,
    )
    pipe.save_pretrained(str(CKPT), safe_serialization=True)
    build_tokenizer.build(tok_dir)

    # Without torchvision, transformers 5 instantiates CLIPImageProcessorPil for CLIPImageProcessor and the
    # pipeline save records that class name; the official model_index.json says CLIPImageProcessor.
    mi_path = CKPT / "model_index.json"
    mi = json.loads(mi_path.read_text())
    mi["image_processor"] = ["transformers", "CLIPImageProcessor"]
    mi_path.write_text(json.dumps(mi, indent=2, sort_keys=True) + "\n")


def load_pipeline(cls_name: str = "KandinskyV22PriorPipeline"):
    import diffusers

    cls = getattr(diffusers, cls_name)
    pipe = cls.from_pretrained(str(CKPT), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    for name in ("prior", "text_encoder", "image_encoder"):
        m = getattr(pipe, name)
        assert m.dtype == torch.float32, (name, m.dtype)
        m.eval()
    return pipe


# ---------------------------------------------------------------------------------------------------
# Helpers


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def tokenize(tokenizer, prompts):
    """The pipeline's exact tokenizer call (_encode_prompt)."""
    return tokenizer(prompts, padding="max_length", max_length=MAX_LEN, truncation=True, return_tensors="pt")


def stack_noise(draws: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    if not draws:
        return {}
    shapes = {tuple(d.shape) for d in draws}
    if len(shapes) == 1:
        return {"noise": torch.stack(draws)}
    return {f"noise.{i}": d for i, d in enumerate(draws)}


class Tracer(contextlib.AbstractContextManager):
    """Records, per internal pipeline call ("segment" = one scheduler.set_timesteps call), the conditioning
    the prior receives, every scheduler.step (inputs/outputs), the post-processed latents, and which noise
    draw (from `record_noise`'s list) belongs to which step."""

    def __init__(self, pipe, drawn: list):
        self.pipe = pipe
        self.drawn = drawn
        self.segs: list[dict] = []
        self.noise_schedule: list[dict] = []

    def __enter__(self):
        sch, prior = self.pipe.scheduler, self.pipe.prior
        orig_set, orig_step, orig_post = sch.set_timesteps, sch.step, prior.post_process_latents

        def set_timesteps(n, device=None):
            self._flush_unclaimed("add_noise")
            self.segs.append({"n": int(n), "steps": [], "cond": None, "post": None})
            return orig_set(n, device=device)

        def step(model_output, timestep, sample, prev_timestep=None, generator=None, return_dict=True):
            self._flush_unclaimed("add_noise")
            before = len(self.drawn)
            out = orig_step(model_output, timestep, sample, prev_timestep=prev_timestep, generator=generator, return_dict=return_dict)
            prev_sample = out.prev_sample if return_dict else out[0]
            t = int(timestep)
            for i in range(before, len(self.drawn)):
                self.noise_schedule.append({"index": i, "segment": len(self.segs) - 1, "kind": "step", "timestep": t})
            self.segs[-1]["steps"].append(
                {
                    "t": t,
                    "prev": None if prev_timestep is None else int(prev_timestep),
                    "sample": sample.detach().clone(),
                    "model_output": model_output.detach().clone(),
                    "prev_sample": prev_sample.detach().clone(),
                }
            )
            return out

        def post(latents):
            out = orig_post(latents)
            self.segs[-1]["post"] = out.detach().clone()
            return out

        def pre_hook(module, args, kwargs):
            seg = self.segs[-1]
            if seg["cond"] is None:
                seg["cond"] = {
                    "text_embeds": kwargs["proj_embedding"].detach().clone(),
                    "hidden_states": kwargs["encoder_hidden_states"].detach().clone(),
                    "mask": kwargs["attention_mask"].detach().to(torch.int64).clone(),
                }

        sch.set_timesteps, sch.step, prior.post_process_latents = set_timesteps, step, post
        self._hook = prior.register_forward_pre_hook(pre_hook, with_kwargs=True)
        self._restore = lambda: (
            delattr(sch, "set_timesteps"),
            delattr(sch, "step"),
            delattr(prior, "post_process_latents"),
            self._hook.remove(),
        )
        return self

    def _flush_unclaimed(self, kind):
        claimed = {e["index"] for e in self.noise_schedule}
        for i in range(len(self.drawn)):
            if i not in claimed:
                self.noise_schedule.append({"index": i, "segment": len(self.segs) - 1, "kind": kind})

    def __exit__(self, *exc):
        self._restore()
        self.noise_schedule.sort(key=lambda e: e["index"])
        return False

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        multi = len(self.segs) > 1
        for si, seg in enumerate(self.segs):
            p = f"seg{si}." if multi else ""
            steps = seg["steps"]
            out[p + "trace.timesteps"] = torch.tensor([s["t"] for s in steps], dtype=torch.int64)
            out[p + "trace.prev_timesteps"] = torch.tensor(
                [-1 if s["prev"] is None else s["prev"] for s in steps], dtype=torch.int64
            )
            out[p + "trace.sample_in"] = torch.stack([s["sample"] for s in steps])
            out[p + "trace.model_output"] = torch.stack([s["model_output"] for s in steps])
            out[p + "trace.prev_sample"] = torch.stack([s["prev_sample"] for s in steps])
            out[p + "post_processed"] = seg["post"]
            for k, v in seg["cond"].items():
                out[p + "cond." + k] = v
        return out

    def meta(self) -> dict:
        for e in self.noise_schedule:
            if e["kind"] == "add_noise":
                e["timestep"] = self.segs[e["segment"]]["steps"][0]["t"]
        return {
            "segments": [
                {
                    "num_inference_steps": s["n"],
                    "timesteps": [st["t"] for st in s["steps"]],
                    "prev_timesteps": [st["prev"] for st in s["steps"]],
                }
                for s in self.segs
            ],
            "noise_schedule": self.noise_schedule,
        }


@contextlib.contextmanager
def replay_noise(draws: list[torch.Tensor]):
    """Replaces diffusers' randn_tensor by popping the given tensors in order (verification only)."""
    from diffusers.utils import torch_utils

    original = torch_utils.randn_tensor
    queue = list(draws)

    def replay(shape, generator=None, device=None, dtype=None, layout=None):
        t = queue.pop(0)
        assert tuple(t.shape) == tuple(shape), (t.shape, shape)
        return t.clone().to(dtype=dtype or t.dtype)

    patched = []
    for name, mod in list(sys.modules.items()):
        if name.startswith("diffusers") and getattr(mod, "randn_tensor", None) is original:
            setattr(mod, "randn_tensor", replay)
            patched.append(mod)
    try:
        yield queue
    finally:
        for mod in patched:
            setattr(mod, "randn_tensor", original)


# ---------------------------------------------------------------------------------------------------
# Images


def make_images() -> dict[str, Path]:
    """Two deterministic test images built from integer formulas (no RNG), written as PNG."""
    # A: 160x96 RGB, horizontal red ramp, vertical green ramp, blue checkerboard, white diagonal stripes.
    h, w = 96, 160
    y, x = np.mgrid[0:h, 0:w]
    a = np.zeros((h, w, 3), dtype=np.uint8)
    a[..., 0] = (x * 255) // (w - 1)
    a[..., 1] = (y * 255) // (h - 1)
    a[..., 2] = np.where(((x // 10) + (y // 12)) % 2 == 0, 230, 20)
    a[(x + y) % 17 == 0] = 255
    # B: 320x256 RGBA (downscaled by the processor), integer patterns + alpha ramp with opaque/transparent bands.
    h, w = 256, 320
    y, x = np.mgrid[0:h, 0:w]
    b = np.zeros((h, w, 4), dtype=np.uint8)
    b[..., 0] = (x * y) % 256
    b[..., 1] = (x ^ y) & 255
    b[..., 2] = (3 * x + 5 * y) % 256
    alpha = (x * 255) // (w - 1)
    alpha = np.where(y < 40, 255, alpha)
    alpha = np.where(y >= 216, 0, alpha)
    b[..., 3] = alpha
    paths = {"a": REF / "image_a_160x96_rgb.png", "b": REF / "image_b_320x256_rgba.png"}
    PIL.Image.fromarray(a, mode="RGB").save(paths["a"], format="PNG")
    PIL.Image.fromarray(b, mode="RGBA").save(paths["b"], format="PNG")
    return paths


def open_image(path: Path) -> PIL.Image.Image:
    im = PIL.Image.open(path)
    im.load()
    return im


# ---------------------------------------------------------------------------------------------------
# Reference generators


def gen_tokenizer(pipe) -> None:
    tok = pipe.tokenizer
    enc = tokenize(tok, TOKENIZER_PROMPTS)
    st = build_tokenizer.simple_tokenizer()
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(str(CKPT / "tokenizer" / "tokenizer.json"))
    raw.enable_truncation(max_length=MAX_LEN)
    raw.enable_padding(length=MAX_LEN, pad_id=build_tokenizer.EOS_ID, pad_token=build_tokenizer.EOS)
    untruncated = []
    for i, p in enumerate(TOKENIZER_PROMPTS):
        ids = enc.input_ids[i].tolist()
        n = int(enc.attention_mask[i].sum())
        slow = build_tokenizer.simple_ids(st, p)
        assert ids[:n] == slow, f"slow/fast mismatch for {p!r}: {ids[:n]} vs {slow}"
        assert all(t == build_tokenizer.EOS_ID for t in ids[n:])
        r = raw.encode(p)
        assert r.ids == ids and r.attention_mask == enc.attention_mask[i].tolist(), p
        untruncated.append(len(tok(p).input_ids))
    meta = {
        "prompts": TOKENIZER_PROMPTS,
        "call": "tokenizer(prompts, padding='max_length', max_length=77, truncation=True)",
        "untruncated_lengths": untruncated,
        "lengths": [int(m.sum()) for m in enc.attention_mask],
        "slow_reference": "OpenAI SimpleTokenizer (open_clip 3.3.0 tokenizer.py, ftfy 6.3.1): agrees on every prompt",
    }
    save_ref(
        REF / "tokenizer",
        {"input_ids": enc.input_ids.to(torch.int64), "attention_mask": enc.attention_mask.to(torch.int64)},
        meta,
    )


@torch.no_grad()
def gen_text_encoder(pipe) -> None:
    enc = tokenize(pipe.tokenizer, TEXT_ENCODER_PROMPTS)
    ids = enc.input_ids.to(torch.int64)
    out = pipe.text_encoder(ids)
    idx = ids.to(torch.int32).argmax(dim=-1).to(torch.int64)
    pooled = out.last_hidden_state[torch.arange(ids.shape[0]), idx]
    assert torch.equal(pipe.text_encoder.text_projection(pooled), out.text_embeds)
    save_ref(
        REF / "text_encoder",
        {
            "input_ids": ids,
            "text_embeds": out.text_embeds,
            "last_hidden_state": out.last_hidden_state,
            "pooled_output": pooled,
            "pooled_index": idx,
        },
        {"prompts": TEXT_ENCODER_PROMPTS, "attention_mask_passed": False},
    )


def _size_dict(size):
    from transformers.image_utils import SizeDict

    return size if isinstance(size, SizeDict) else SizeDict(**size)


@torch.no_grad()
def gen_image_processor(pipe, paths) -> dict[str, torch.Tensor]:
    ip = pipe.image_processor
    tensors, meta = {}, {"images": {}}
    pixel = {}
    for key, path in paths.items():
        im = open_image(path)
        pv = ip(im, return_tensors="pt").pixel_values
        # Intermediates through the processor's own stage functions (checked against the full call).
        arr = ip.process_image(im, do_convert_rgb=True)  # (3,H,W) uint8 after RGB conversion
        resized = ip.resize(arr, _size_dict(ip.size), resample=ip.resample)
        cropped = ip.center_crop(resized, _size_dict(ip.crop_size))
        x = ip.normalize(ip.rescale(cropped, ip.rescale_factor), ip.image_mean, ip.image_std)
        assert torch.equal(torch.from_numpy(np.ascontiguousarray(x))[None], pv), key
        rgb = np.ascontiguousarray(arr.transpose(1, 2, 0))
        if im.mode == "RGB":
            assert np.array_equal(np.array(im), rgb)  # conversion is the identity
        else:  # RGBA: transformers 5 composites onto opaque white (transformers 4 dropped alpha)
            white = PIL.Image.new("RGBA", im.size, (255, 255, 255, 255))
            assert np.array_equal(np.array(PIL.Image.alpha_composite(white, im.convert("RGBA")).convert("RGB")), rgb)
        tensors[f"{key}.rgb_u8"] = torch.from_numpy(rgb)
        tensors[f"{key}.cropped_u8"] = torch.from_numpy(np.ascontiguousarray(cropped.transpose(1, 2, 0)))
        if key == "a":
            tensors["a.pixel_values"] = pv
        pixel[key] = pv
        meta["images"][key] = {
            "file": path.name,
            "mode": im.mode,
            "size_wh": list(im.size),
            "resized_hw": list(resized.shape[1:]),
            "crop_top_left": [(resized.shape[1] - 224) // 2, (resized.shape[2] - 224) // 2],
        }
    meta["processor"] = ip.to_dict()
    meta["processor_class_instantiated"] = type(ip).__name__
    save_ref(REF / "image_processor", tensors, meta)
    return pixel


@torch.no_grad()
def gen_image_encoder(pipe, pixel) -> None:
    g = gen(400)
    pv16 = torch.randn((2, 3, 224, 224), generator=g).to(torch.float16)
    out = pipe.image_encoder(pv16.to(torch.float32))
    zero = pipe.image_encoder(torch.zeros(1, 3, 224, 224))
    assert torch.equal(pipe.get_zero_embed(1), zero.image_embeds)
    emb_a = pipe.image_encoder(pixel["a"]).image_embeds
    emb_b = pipe.image_encoder(pixel["b"]).image_embeds
    save_ref(
        REF / "image_encoder",
        {
            "pixel_values_f16": pv16,
            "image_embeds": out.image_embeds,
            "last_hidden_state": out.last_hidden_state,
            "zero_image_embeds": zero.image_embeds,
            "image_a_embeds": emb_a,
            "image_b_embeds": emb_b,
        },
        {"note": "inputs are stored as float16 and upcast to float32 before the forward"},
    )


@torch.no_grad()
def gen_prior_forward(pipe) -> None:
    g = gen(500)
    b = 2
    hidden = torch.randn((b, EMB), generator=g)
    proj = torch.randn((b, EMB), generator=g)
    ehs = torch.randn((b, MAX_LEN, EMB), generator=g)
    lengths = [7, 20]
    mask = torch.zeros((b, MAX_LEN), dtype=torch.int64)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    cases = [
        ("t999", torch.tensor(999, dtype=torch.int64), True),
        ("t42", torch.tensor(42, dtype=torch.int64), True),
        ("t_per_sample", torch.tensor([500, 3], dtype=torch.int64), True),
        ("t999_nomask", torch.tensor(999, dtype=torch.int64), False),
    ]
    tensors = {
        "hidden_states": hidden,
        "proj_embedding": proj,
        "encoder_hidden_states": ehs,
        "attention_mask": mask,
    }
    meta = {"cases": [], "mask_lengths": lengths}
    for name, t, use_mask in cases:
        out = pipe.prior(
            hidden,
            timestep=t,
            proj_embedding=proj,
            encoder_hidden_states=ehs,
            attention_mask=mask.bool() if use_mask else None,
        ).predicted_image_embedding
        tensors[f"{name}.timestep"] = t
        tensors[f"{name}.predicted_image_embedding"] = out
        meta["cases"].append({"name": name, "timestep": t.tolist(), "attention_mask": use_mask})
    z = torch.randn((b, EMB), generator=g)
    tensors["post_process.input"] = z
    tensors["post_process.output"] = pipe.prior.post_process_latents(z)
    tensors["clip_mean"] = pipe.prior.clip_mean.detach().clone()
    tensors["clip_std"] = pipe.prior.clip_std.detach().clone()
    save_ref(REF / "prior_forward", tensors, meta)


@torch.no_grad()
def gen_scheduler(pipe) -> None:
    from diffusers import UnCLIPScheduler

    sch = UnCLIPScheduler.from_pretrained(str(CKPT), subfolder="scheduler")
    tensors = {"betas": sch.betas.clone(), "alphas_cumprod": sch.alphas_cumprod.clone()}
    meta = {"timesteps": {}, "steps": [], "add_noise": {}}
    for n in (2, 5, 25):
        sch.set_timesteps(n)
        tensors[f"timesteps_n{n}"] = sch.timesteps.clone().to(torch.int64)
        meta["timesteps"][str(n)] = sch.timesteps.tolist()

    g = gen(600)
    cases = [
        (999, 749, 1.0),
        (500, 458, 1.0),
        (250, 0, 1.0),
        (42, None, 1.0),  # prev None -> t-1, uses betas[t]
        (1, 0, 1.0),  # explicit prev == t-1 -> same branch
        (0, None, 1.0),  # last step: no noise drawn
        (749, 500, 25.0),  # model_output beyond +-10 -> clip_sample clamps x0
    ]
    for i, (t, prev, scale) in enumerate(cases):
        model_output = torch.randn((2, EMB), generator=g) * scale
        sample = torch.randn((2, EMB), generator=g)
        with record_noise() as drawn:
            out = sch.step(model_output, t, sample, prev_timestep=prev, generator=gen(700 + i))
        assert len(drawn) == (1 if t > 0 else 0)
        tensors[f"step{i}.model_output"] = model_output
        tensors[f"step{i}.sample"] = sample
        if drawn:
            tensors[f"step{i}.noise"] = drawn[0]
            tensors[f"step{i}.sigma"] = sch._get_variance(t, prev_timestep=prev).reshape(1).clone()
        tensors[f"step{i}.prev_sample"] = out.prev_sample
        tensors[f"step{i}.pred_original_sample"] = out.pred_original_sample
        meta["steps"].append({"key": f"step{i}", "timestep": t, "prev_timestep": prev, "noise": bool(drawn)})

    x0 = torch.randn((3, EMB), generator=g)
    eps = torch.randn((3, EMB), generator=g)
    ts = torch.tensor([999, 250, 0], dtype=torch.int64)
    tensors.update(
        {
            "add_noise.original": x0,
            "add_noise.noise": eps,
            "add_noise.timesteps": ts,
            "add_noise.noisy": sch.add_noise(x0, eps, ts),
        }
    )
    meta["add_noise"] = {"timesteps": ts.tolist()}
    meta["config"] = dict(sch.config)
    save_ref(REF / "scheduler", tensors, meta)


def _run_traced(pipe, fn):
    with record_noise() as drawn:
        with Tracer(pipe, drawn) as tr:
            out = fn()
    return out, list(drawn), tr


@torch.no_grad()
def gen_prior_pipeline(pipe) -> list[dict]:
    """KandinskyV22PriorPipeline.__call__ cases. Returns replay specs for verification."""
    cases = [
        # name, prompt, negative_prompt, n_per_prompt, steps, guidance
        ("horse_s2", "horse", None, 1, 2, 4.0),
        ("horse_s5", "horse", None, 1, 5, 4.0),
        ("horse_neg_s2", "horse", "low quality", 1, 2, 4.0),
        ("batch2_neg_s5", ["a photo of a cat", "horse"], ["blurry", "low quality, ugly"], 1, 5, 4.0),
        ("horse_nocfg_s5", "horse", None, 1, 5, 1.0),
        ("batch2_n2_s5", ["horse", "a photo of a cat"], None, 2, 5, 4.0),
        ("horse_neg_n2_s2", "horse", "low quality", 2, 2, 4.0),
    ]
    specs = []
    for ci, (name, prompt, neg, n, steps, gs) in enumerate(cases):
        nprompts = (len(prompt) if isinstance(prompt, list) else 1) * (2 if neg is not None else 1)
        latents = torch.randn((nprompts * n, EMB), generator=gen(1000 + ci))
        kwargs = dict(
            prompt=prompt,
            negative_prompt=neg,
            num_images_per_prompt=n,
            num_inference_steps=steps,
            guidance_scale=gs,
            latents=latents.clone(),
            generator=gen(2000 + ci),
        )
        out, drawn, tr = _run_traced(pipe, lambda: pipe(**kwargs))
        tensors = {
            "latents": latents,
            **stack_noise(drawn),
            "image_embeds": out.image_embeds,
            "negative_image_embeds": out.negative_image_embeds,
            **tr.tensors(),
        }
        meta = {
            "pipeline": "KandinskyV22PriorPipeline.__call__",
            "prompt": prompt,
            "negative_prompt": neg,
            "num_images_per_prompt": n,
            "num_inference_steps": steps,
            "guidance_scale": gs,
            "latents_seed": 1000 + ci,
            "generator_seed": 2000 + ci,
            "negative_image_embeds_source": "zero-image embed (get_zero_embed)" if neg is None else "prior sample of negative_prompt (chunk)",
            **tr.meta(),
        }
        save_ref(REF / "pipeline" / name, tensors, meta)
        specs.append(("__call__", name, {k: v for k, v in kwargs.items() if k != "generator"}, drawn, out))
    return specs


@torch.no_grad()
def gen_interpolate(pipe, paths) -> list:
    img = open_image(paths["a"])
    cases = [
        ("fusion_cat_img_dog_s5", ["a cat", "IMG_A", "a dog"], [0.3, 0.3, 0.4], 5, {}),
        ("fusion_neg_s2", ["a cat", "IMG_A", "a dog"], [0.3, 0.3, 0.4], 2, {"negative_prompt": "low quality"}),
    ]
    specs = []
    for ci, (name, items, weights, steps, extra) in enumerate(cases):
        latents = torch.randn((1, EMB), generator=gen(3000 + ci))
        resolved = [img if it == "IMG_A" else it for it in items]
        kwargs = dict(
            images_and_prompts=resolved,
            weights=weights,
            num_inference_steps=steps,
            latents=latents.clone(),
            generator=gen(4000 + ci),
            **extra,
        )
        out, drawn, tr = _run_traced(pipe, lambda: pipe.interpolate(**kwargs))
        # Per-item embeddings in item order: a text item is the image_embeds of its internal prior call
        # (= that segment's post-processed latents); the image item is the image encoder on the processed PNG.
        pv = pipe.image_processor(img, return_tensors="pt").pixel_values[0].unsqueeze(0)
        direct = pipe.image_encoder(pv).image_embeds
        text_segs = iter(range(len(tr.segs)))
        item_embeds = [direct if it == "IMG_A" else tr.segs[next(text_segs)]["post"] for it in items]
        recomposed = sum(w * e for w, e in zip(weights, item_embeds))
        assert torch.allclose(recomposed, out.image_embeds, atol=1e-6), "weighted sum mismatch"
        tensors = {
            "latents": latents,
            **stack_noise(drawn),
            "image_embeds": out.image_embeds,
            "negative_image_embeds": out.negative_image_embeds,
            "item_embeds": torch.stack(item_embeds),
            **tr.tensors(),
        }
        meta = {
            "pipeline": "KandinskyV22PriorPipeline.interpolate",
            "images_and_prompts": [("<image_a_160x96_rgb.png>" if it == "IMG_A" else it) for it in items],
            "weights": weights,
            "num_inference_steps": steps,
            "guidance_scale": 4.0,
            "num_images_per_prompt": 1,
            "negative_prompt": extra.get("negative_prompt", ""),
            "negative_prior_prompt": None,
            "latents_seed": 3000 + ci,
            "generator_seed": 4000 + ci,
            "segment_prompts": [it for it in items if it != "IMG_A"] + [extra.get("negative_prompt", "")],
            **tr.meta(),
        }
        save_ref(REF / "pipeline" / name, tensors, meta)
        specs.append(("interpolate", name, {k: v for k, v in kwargs.items() if k != "generator"}, drawn, out))
    return specs


@torch.no_grad()
def gen_emb2emb(pipe_prior, paths) -> list:
    from diffusers import KandinskyV22PriorEmb2EmbPipeline

    pipe = KandinskyV22PriorEmb2EmbPipeline(**pipe_prior.components)
    pipe.set_progress_bar_config(disable=True)
    cases = [
        # name, image kind, strength, steps, negative_prompt, n
        ("emb2emb_emb_st05_s5", "emb", 0.5, 5, None, 1),
        ("emb2emb_pil_st03_s25", "pil_a", 0.3, 25, None, 1),
        ("emb2emb_pil_rgba_neg_st05_s5", "pil_b", 0.5, 5, "low quality", 1),
        ("emb2emb_emb_n2_st03_s25", "emb", 0.3, 25, None, 2),
    ]
    specs = []
    for ci, (name, kind, strength, steps, neg, n) in enumerate(cases):
        if kind == "emb":
            image = torch.randn((1, EMB), generator=gen(5000 + ci))
            image_in = image.clone()
        else:
            image = open_image(paths["a" if kind == "pil_a" else "b"])
            pv = pipe.image_processor(image, return_tensors="pt").pixel_values
            image_in = pipe.image_encoder(pv).image_embeds
        kwargs = dict(
            prompt="horse",
            image=image.clone() if isinstance(image, torch.Tensor) else image,
            strength=strength,
            negative_prompt=neg,
            num_images_per_prompt=n,
            num_inference_steps=steps,
            guidance_scale=4.0,
            generator=gen(6000 + ci),
        )
        out, drawn, tr = _run_traced(pipe, lambda: pipe(**kwargs))
        tensors = {
            "image_embeds_in": image_in,
            **stack_noise(drawn),
            "image_embeds": out.image_embeds,
            "negative_image_embeds": out.negative_image_embeds,
            **tr.tensors(),
        }
        meta = {
            "pipeline": "KandinskyV22PriorEmb2EmbPipeline.__call__",
            "prompt": "horse",
            "image": "2-D embedding tensor (image_embeds_in)" if kind == "emb" else f"PIL <{paths['a' if kind == 'pil_a' else 'b'].name}>",
            "strength": strength,
            "negative_prompt": neg,
            "num_images_per_prompt": n,
            "num_inference_steps": steps,
            "guidance_scale": 4.0,
            "generator_seed": 6000 + ci,
            "image_seed": 5000 + ci if kind == "emb" else None,
            **tr.meta(),
        }
        save_ref(REF / "pipeline" / name, tensors, meta)
        specs.append(("emb2emb", name, {k: v for k, v in kwargs.items() if k != "generator"}, drawn, out))
    return specs


# ---------------------------------------------------------------------------------------------------
# Verification


@torch.no_grad()
def verify(specs) -> None:
    """Reloads the checkpoint folder from scratch and replays every pipeline case with the recorded noise
    (no generator): outputs must be bit-identical to the references."""
    from diffusers import KandinskyV22PriorEmb2EmbPipeline
    from safetensors.torch import load_file

    pipe = load_pipeline()
    emb = KandinskyV22PriorEmb2EmbPipeline(**pipe.components)
    emb.set_progress_bar_config(disable=True)
    for kind, name, kwargs, drawn, _ in specs:
        ref = load_file(str(REF / "pipeline" / f"{name}.safetensors"))
        with replay_noise(drawn) as queue:
            if kind == "__call__":
                out = pipe(**kwargs)
            elif kind == "interpolate":
                out = pipe.interpolate(**kwargs)
            else:
                out = emb(**kwargs)
            assert not queue, f"{name}: {len(queue)} unused noise draws"
        for k in ("image_embeds", "negative_image_embeds"):
            assert torch.equal(out[k] if isinstance(out, dict) else getattr(out, k), ref[k]), f"{name}.{k}"
    print(f"verify: {len(specs)} pipeline cases replayed bit-exactly from a fresh reload")

    # Same case through the torch generator instead of replayed noise (what a diffusers user would run).
    ref = load_file(str(REF / "pipeline" / "horse_s2.safetensors"))
    meta = json.loads((REF / "pipeline" / "horse_s2.json").read_text())
    out = pipe(
        "horse",
        num_inference_steps=2,
        guidance_scale=4.0,
        latents=ref["latents"],
        generator=gen(meta["generator_seed"]),
    )
    assert torch.equal(out.image_embeds, ref["image_embeds"]) and torch.equal(out.negative_image_embeds, ref["negative_image_embeds"])

    # Hub layout (vocab.json + merges.txt, no tokenizer.json) must tokenize identically.
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        for f in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
            shutil.copy(CKPT / "tokenizer" / f, Path(tmp) / f)
        slow_layout = CLIPTokenizer.from_pretrained(tmp)
        ref = load_file(str(REF / "tokenizer.safetensors"))
        enc = tokenize(slow_layout, TOKENIZER_PROMPTS)
        assert torch.equal(enc.input_ids, ref["input_ids"]) and torch.equal(enc.attention_mask, ref["attention_mask"])
    print("verify: generator run and vocab+merges-only tokenizer load agree with the references")


def versions() -> dict:
    import diffusers
    import safetensors
    import tokenizers
    import transformers

    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "safetensors": safetensors.__version__,
        "numpy": np.__version__,
        "pillow": PIL.__version__,
        "open_clip_torch (BPE source)": build_tokenizer.OPEN_CLIP_VERSION,
    }


def main() -> None:
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    seed_all(0)
    for d in (CKPT, REF):
        if d.exists():
            shutil.rmtree(d)
    REF.mkdir(parents=True)

    build_checkpoint()
    pipe = load_pipeline()
    paths = make_images()
    gen_tokenizer(pipe)
    gen_text_encoder(pipe)
    pixel = gen_image_processor(pipe, paths)
    gen_image_encoder(pipe, pixel)
    gen_prior_forward(pipe)
    gen_scheduler(pipe)
    specs = gen_prior_pipeline(pipe)
    specs += gen_interpolate(pipe, paths)
    specs += gen_emb2emb(pipe, paths)
    write_json(REF / "manifest.json", {"generator": "tools/reference/gen_prior.py", "versions": versions()})
    verify(specs)
    total = dir_size_mb(CKPT) + dir_size_mb(REF)
    print(f"checkpoint {dir_size_mb(CKPT):.2f} MB + references {dir_size_mb(REF):.2f} MB = {total:.2f} MB")
    assert total < 10.0, total


if __name__ == "__main__":
    main()
