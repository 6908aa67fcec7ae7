#!/usr/bin/env python3
"""aMUSEd (Muse-style masked-token generation) parity fixtures: diffusers' `UVit2DModel`,
`VQModel` with a codebook lookup, `AmusedScheduler` and the three `Amused*Pipeline`s.

Writes (and nothing else):

* `tests/fixtures/tiny/amused-256/`: an `AmusedPipeline` folder with diffusers' fast-test
  dummy transformer and VQ-GAN shapes (widths raised to the shared tiny CLIP text encoder's 32),
  the tiny K2.2 prior's `CLIPTextModelWithProjection` and the real CLIP tokenizer.
* `tests/fixtures/deep/amused-512/`: the real block structure at reduced widths (2 ConvNeXt
  res blocks per UVit block, 2 transformer layers, several heads, a 3-level VQ-GAN).
* `tests/fixtures/tiny/amused-transformer-flat/`: a standalone `UVit2DModel` without
  down/upsampling (as the real amused-256), with biases and non-affine norms; its forward
  reference is `tests/fixtures/tiny/reference/amused-flat/transformer`.
* `tests/fixtures/{tiny,deep}/reference/amused/`:
  - `transformer`: a forward on random ids (with mask tokens), text states and micro-conds,
    with intermediate outputs (`embed`, `cond`, `down`, `transformer`);
  - `vqvae`: decode from token indices, encode of an image to latents and to indices;
  - `text_encoder` (tiny only; the encoder is shared): token ids, `text_embeds` and the
    penultimate hidden states for a few prompts;
  - `scheduler_<name>`: `step()` sequences over fixed logits (cosine and linear schedules, a
    starting mask ratio below 1) and `add_noise`, with every uniform draw recorded;
  - `pipeline_<name>`: whole text2img / img2img / inpaint runs with every draw recorded.

**Draws.** torch's RNG cannot be reproduced in Rust, so every uniform the scheduler draws is
recorded in draw order and replayed by the Rust tests (`ReplayNoise`):
  - `torch.multinomial(probs, 1)` is replaced by inverse-CDF sampling from one uniform per row
    (`u ~ U[0,1)` in float32; the first index whose float64 cumulative sum exceeds `u · total`):
    the same categorical distribution, drawn from a recordable source. The Rust sampler does the
    same, so production sampling is this algorithm with seeded uniforms;
  - `gumbel_noise` (the re-masking's Gumbel noise) records its uniform tensor;
  - `torch.rand` (img2img's `add_noise`) records its tensor.

Run through `make fixtures` (needs tools/reference/.venv); CI never runs it.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import diffusers.schedulers.scheduling_amused as sa  # noqa: E402
from common import FIXTURES, perturb, save_reference, seed_all, write_json  # noqa: E402
from diffusers import (  # noqa: E402
    AmusedImg2ImgPipeline,
    AmusedInpaintPipeline,
    AmusedPipeline,
    AmusedScheduler,
    UVit2DModel,
    VQModel,
)
from transformers import CLIPTextModelWithProjection, CLIPTokenizer  # noqa: E402

PRIOR = FIXTURES / "tiny" / "kandinsky-2-2-prior"

TINY_TRANSFORMER = dict(
    hidden_size=32, use_bias=False, hidden_dropout=0.0, cond_embed_dim=32, micro_cond_encode_dim=2,
    micro_cond_embed_dim=10, encoder_hidden_size=32, vocab_size=40, codebook_size=32, in_channels=8,
    block_out_channels=8, num_res_blocks=1, downsample=True, upsample=True, block_num_heads=1,
    num_hidden_layers=1, num_attention_heads=1, attention_dropout=0.0, intermediate_size=16,
    layer_norm_eps=1e-06, ln_elementwise_affine=True, sample_size=8,
)
TINY_VQ = dict(
    act_fn="silu", block_out_channels=[8, 16], down_block_types=["DownEncoderBlock2D"] * 2,
    in_channels=3, latent_channels=8, layers_per_block=1, norm_num_groups=8, num_vq_embeddings=32,
    out_channels=3, sample_size=16, up_block_types=["UpDecoderBlock2D"] * 2,
    mid_block_add_attention=False, lookup_from_codebook=True, force_upcast=True,
)
DEEP_TRANSFORMER = dict(
    hidden_size=32, use_bias=False, hidden_dropout=0.0, cond_embed_dim=32, micro_cond_encode_dim=4,
    micro_cond_embed_dim=20, encoder_hidden_size=32, vocab_size=72, codebook_size=64, in_channels=16,
    block_out_channels=16, num_res_blocks=2, downsample=True, upsample=True, block_num_heads=2,
    num_hidden_layers=2, num_attention_heads=4, attention_dropout=0.0, intermediate_size=64,
    layer_norm_eps=1e-06, ln_elementwise_affine=True, sample_size=16,
)
DEEP_VQ = dict(
    act_fn="silu", block_out_channels=[8, 16, 16], down_block_types=["DownEncoderBlock2D"] * 3,
    in_channels=3, latent_channels=8, layers_per_block=2, norm_num_groups=8, num_vq_embeddings=64,
    out_channels=3, sample_size=64, up_block_types=["UpDecoderBlock2D"] * 3,
    mid_block_add_attention=False, lookup_from_codebook=True, force_upcast=True,
)

# The real amused-256's transformer does not down/upsample; this variant also covers biases and
# norms without affine weights (transformer only, tests/fixtures/tiny/amused-transformer-flat).
FLAT_TRANSFORMER = {**TINY_TRANSFORMER, "downsample": False, "upsample": False, "use_bias": True,
                    "ln_elementwise_affine": False, "block_num_heads": 2, "num_attention_heads": 2}

PROMPTS = ["a red cat on a blue sofa", "", "Муза: маска и токены", "一只猫"]


def gen(seed: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed)


def rel(p: Path) -> str:
    return str(p.relative_to(FIXTURES.parent.parent))


# ----------------------------------------------------------------------------------------------
# Recorded uniform draws
# ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def record_uniforms():
    """Records every uniform the aMUSEd scheduler draws, in order (see the module docstring)."""
    draws: list[torch.Tensor] = []
    orig_rand, orig_multinomial, orig_gumbel = torch.rand, torch.multinomial, sa.gumbel_noise

    def rand(*shape, generator=None, device=None, dtype=None, **kw):
        t = orig_rand(*shape, generator=generator, dtype=torch.float32)
        draws.append(t.clone())
        return t.to(device=device) if device is not None else t

    def multinomial(probs, num_samples, replacement=False, generator=None):
        assert num_samples == 1 and probs.dim() == 2
        u = orig_rand(probs.shape[0], generator=generator, dtype=torch.float32)
        draws.append(u.clone())
        cdf = probs.double().cumsum(-1)
        target = (u.double() * cdf[:, -1]).unsqueeze(-1)
        idx = (cdf <= target).sum(-1, keepdim=True).clamp(max=probs.shape[-1] - 1)
        return idx

    def gumbel(t, generator=None):
        u = orig_rand(t.shape, generator=generator, dtype=torch.float32)
        draws.append(u.clone())
        return -torch.log((-torch.log(u.clamp(1e-20))).clamp(1e-20)).to(t.dtype)

    torch.rand, torch.multinomial, sa.gumbel_noise = rand, multinomial, gumbel
    try:
        yield draws
    finally:
        torch.rand, torch.multinomial, sa.gumbel_noise = orig_rand, orig_multinomial, orig_gumbel


def stack_draws(draws: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Draws of different shapes: `draw_<i>` each, plus `draws` = their count."""
    out = {f"draw_{i}": d for i, d in enumerate(draws)}
    out["draws"] = torch.tensor([len(draws)], dtype=torch.int64)
    return out


# ----------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------


def build(cls, cfg: dict, seed: int):
    torch.manual_seed(0)
    m = cls(**cfg)
    perturb(m, seed)
    return m.eval()


def save_checkpoint(path: Path, transformer_cfg: dict, vq_cfg: dict, seed: int, dtype) -> AmusedPipeline:
    if path.exists():
        shutil.rmtree(path)
    transformer = build(UVit2DModel, transformer_cfg, seed).to(dtype)
    vqvae = build(VQModel, vq_cfg, seed + 1).to(dtype)
    # The real codebook has entries of unit scale; the init's ±1/n would make every latent
    # nearest to a handful of entries.
    with torch.no_grad():
        vqvae.quantize.embedding.weight.copy_(
            torch.randn(vqvae.quantize.embedding.weight.shape, generator=gen(seed + 2)).to(dtype)
        )
    scheduler = AmusedScheduler(mask_token_id=transformer_cfg["vocab_size"] - 1)
    text_encoder = CLIPTextModelWithProjection.from_pretrained(str(PRIOR / "text_encoder"))
    tokenizer = CLIPTokenizer.from_pretrained(str(PRIOR / "tokenizer"))
    pipe = AmusedPipeline(vqvae=vqvae, tokenizer=tokenizer, text_encoder=text_encoder,
                          transformer=transformer, scheduler=scheduler)
    pipe.save_pretrained(str(path), safe_serialization=True)
    # The text encoder and tokenizer are the prior's own files (stored once by the dedupe step).
    for sub in ("text_encoder", "tokenizer"):
        shutil.rmtree(path / sub)
        shutil.copytree(PRIOR / sub, path / sub)
    return load(path)


def load(path: Path, cls=AmusedPipeline):
    pipe = cls.from_pretrained(str(path), torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    for m in (pipe.transformer, pipe.vqvae, pipe.text_encoder):
        m.eval()
        bad = [n for n, p in m.state_dict().items() if p.dtype != torch.float32]
        assert not bad, bad[:3]
    return pipe


# ----------------------------------------------------------------------------------------------
# References
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def transformer_reference(out: Path, pipe, seed: int, b: int, intermediates: bool) -> None:
    t = pipe.transformer
    c = t.config
    h, w = c.sample_size, c.sample_size
    g = gen(seed)
    ids = torch.randint(0, c.codebook_size, (b, h, w), generator=g)
    masked = torch.rand((b, h, w), generator=g) < 0.4
    ids[masked] = c.vocab_size - 1
    ehs = torch.randn((b, 77, c.encoder_hidden_size), generator=g)
    pooled = torch.randn((b, c.cond_embed_dim), generator=g)
    micro = torch.tensor([[256.0, 256.0, 0.0, 0.0, 6.0], [512.0, 384.0, 12.0, 3.0, 5.5]])[:b]
    store = {}
    hooks = [
        t.embed.register_forward_hook(lambda m, i, o: store.setdefault("embed", o.clone())),
        t.cond_embed.register_forward_hook(lambda m, i, o: store.setdefault("cond", o.clone())),
        t.down_block.register_forward_hook(lambda m, i, o: store.setdefault("down", o.clone())),
        t.up_block.register_forward_pre_hook(lambda m, i: store.setdefault("transformer", i[0].clone())),
    ]
    logits = t(ids, encoder_hidden_states=ehs, pooled_text_emb=pooled, micro_conds=micro)
    for hk in hooks:
        hk.remove()
    if not intermediates:
        store = {}
    save_reference(out / "transformer", dict(input_ids=ids, encoder_hidden_states=ehs,
                                             pooled_text_emb=pooled, micro_conds=micro,
                                             logits=logits, **store))


def smooth_image(b: int, hw: int, seed: int) -> torch.Tensor:
    """A smooth image in [0, 1] (gradients and blobs; random pixels would all quantise alike)."""
    y, x = torch.meshgrid(torch.linspace(0, 1, hw), torch.linspace(0, 1, hw), indexing="ij")
    g = gen(seed)
    imgs = []
    for _ in range(b):
        f = torch.rand(3, 3, generator=g) * 6
        ch = [0.5 + 0.5 * torch.sin(f[k, 0] * x + f[k, 1] * y + f[k, 2]) for k in range(3)]
        imgs.append(torch.stack(ch))
    return torch.stack(imgs).float()


@torch.no_grad()
def vqvae_reference(out: Path, pipe, seed: int, b: int) -> None:
    vq = pipe.vqvae
    c = vq.config
    sf = 2 ** (len(c.block_out_channels) - 1)
    hw = pipe.transformer.config.sample_size
    g = gen(seed)
    indices = torch.randint(0, c.num_vq_embeddings, (b, hw, hw), generator=g)
    decoded = vq.decode(indices, force_not_quantize=True,
                        shape=(b, hw, hw, c.vq_embed_dim or c.latent_channels)).sample
    image = smooth_image(b, hw * sf, seed)
    latents = vq.encode(image).latents
    enc_indices = vq.quantize(latents)[2][2].reshape(b, hw, hw)
    # Distance margin of each encode decision: how far the nearest entry is from the second.
    flat = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
    d = torch.cdist(flat, vq.quantize.embedding.weight)
    top2 = d.topk(2, largest=False).values
    margin = (top2[:, 1] - top2[:, 0]).min().item()
    assert margin > 2e-5, f"encode margin {margin} too small for exact indices"
    save_reference(out / "vqvae", dict(indices=indices, decoded=decoded, image=image,
                                       latents=latents, encoded_indices=enc_indices),
                   meta=dict(min_encode_margin=margin))


@torch.no_grad()
def text_encoder_reference(out: Path, pipe) -> None:
    tok = pipe.tokenizer(PROMPTS, padding="max_length", truncation=True,
                         max_length=pipe.tokenizer.model_max_length, return_tensors="pt")
    o = pipe.text_encoder(tok.input_ids, return_dict=True, output_hidden_states=True)
    save_reference(out / "text_encoder", dict(input_ids=tok.input_ids, text_embeds=o.text_embeds,
                                              penultimate=o.hidden_states[-2]),
                   meta=dict(prompts=PROMPTS))


@torch.no_grad()
def scheduler_reference(out: Path, name: str, codebook: int, mask_id: int, hw: int, steps: int,
                        schedule: str, temperature, starting_mask_ratio: float, seed: int) -> None:
    sched = AmusedScheduler(mask_token_id=mask_id, masking_schedule=schedule)
    if temperature is None:
        sched.set_timesteps(steps)
    else:
        sched.set_timesteps(steps, temperature)
    g = gen(seed)
    b = 2
    sample = torch.full((b, hw, hw), mask_id, dtype=torch.long)
    if starting_mask_ratio < 1.0:
        keep = torch.rand((b, hw, hw), generator=g) >= starting_mask_ratio
        sample[keep] = torch.randint(0, codebook, (int(keep.sum()),), generator=g)
    start = sample.clone()
    logits, prev, pred = [], [], []
    step_gen = gen(seed + 1)
    with record_uniforms() as draws:
        for t in sched.timesteps:
            # Stored as float16: rounded here so both sides see the same values.
            lg = (torch.randn((b, codebook, hw, hw), generator=g) * 3).half().float()
            o = sched.step(lg, t, sample, starting_mask_ratio=starting_mask_ratio, generator=step_gen)
            logits.append(lg)
            prev.append(o.prev_sample)
            pred.append(o.pred_original_sample)
            sample = o.prev_sample
    noised = {}
    for i, t in enumerate(sched.timesteps[:3]):
        with record_uniforms() as nd:
            noised[f"add_noise_{i}"] = sched.add_noise(prev[-1], t, generator=gen(seed + 10 + i))
        noised[f"add_noise_{i}_draw"] = nd[0]
    meta = dict(codebook_size=codebook, mask_token_id=mask_id, steps=steps, masking_schedule=schedule,
                temperature=list(temperature) if isinstance(temperature, tuple) else temperature,
                starting_mask_ratio=starting_mask_ratio,
                timesteps=sched.timesteps.tolist(), temperatures=sched.temperatures.tolist())
    save_reference(out / f"scheduler_{name}", dict(
        start=start, logits=torch.stack(logits).half(), prev_sample=torch.stack(prev),
        pred_original_sample=torch.stack(pred), **stack_draws(draws), **noised), meta=meta)


def latent_mask(b: int, hw: int) -> torch.Tensor:
    """A token mask (1 = regenerate): a rectangle in the lower right."""
    m = torch.zeros((b, 1, hw, hw))
    m[:, :, hw // 2:, hw // 4:] = 1.0
    return m


@torch.no_grad()
def pipeline_reference(out: Path, path: Path, name: str, kind: str, seed: int, **kw) -> None:
    cls = {"text2img": AmusedPipeline, "img2img": AmusedImg2ImgPipeline, "inpaint": AmusedInpaintPipeline}[kind]
    pipe = load(path, cls)  # a fresh scheduler: the inpaint pipeline rewrites its masking schedule
    args = dict(kw)
    tensors = {}
    hw = pipe.transformer.config.sample_size
    sf = pipe.vae_scale_factor
    if kind in ("img2img", "inpaint"):
        image = smooth_image(1, hw * sf, seed + 5)
        args["image"] = image
        tensors["init_image"] = image
    if kind == "inpaint":
        mask = latent_mask(1, hw)
        args["mask_image"] = mask
        tensors["mask"] = mask
    steps_seen = []

    def cb(i, t, latents):
        steps_seen.append(latents.clone())

    with record_uniforms() as draws:
        res = pipe(generator=gen(seed), output_type="np", callback=cb, callback_steps=1, **args)
    tokens = steps_seen[-1]
    image = torch.from_numpy(np.asarray(res.images)).float()
    meta = {k: v for k, v in kw.items()}
    meta.update(kind=kind, vae_scale_factor=sf,
                masking_schedule=pipe.scheduler.config.masking_schedule)
    save_reference(out / f"pipeline_{name}", dict(
        tokens=tokens, step_tokens=torch.stack(steps_seen), image=image, **tensors,
        **stack_draws(draws)), meta=meta)


def generate(root: str, name: str, tcfg: dict, vcfg: dict, seed: int, dtype, text: bool, cases: list) -> None:
    """`text`: also the text encoder and scheduler references (model-independent: tiny only)."""
    path = FIXTURES / root / name
    out = FIXTURES / root / "reference" / "amused"
    if out.exists():
        shutil.rmtree(out)
    pipe = save_checkpoint(path, tcfg, vcfg, seed, dtype)
    transformer_reference(out, pipe, seed + 3, 2 if text else 1, text)
    vqvae_reference(out, pipe, seed + 4, 2 if text else 1)
    if text:
        text_encoder_reference(out, pipe)
        hw = tcfg["sample_size"]
        for (sname, schedule, temp, ratio) in [("cosine", "cosine", None, 1.0),
                                                ("linear", "linear", (3, 1), 1.0),
                                                ("partial", "cosine", 1.5, 0.6)]:
            scheduler_reference(out, sname, tcfg["codebook_size"], tcfg["vocab_size"] - 1, hw, 6,
                                schedule, temp, ratio, seed + 7)
    for (cname, kind, kw) in cases:
        pipeline_reference(out, path, cname, kind, seed + 20, **kw)
    write_json(out / "index.json", sorted(p.name for p in out.iterdir()))
    print(f"wrote {rel(path)} and {rel(out)}", flush=True)


@torch.no_grad()
def flat_transformer() -> None:
    """A standalone `UVit2DModel` folder without down/upsampling, and its forward reference."""
    path = FIXTURES / "tiny" / "amused-transformer-flat"
    if path.exists():
        shutil.rmtree(path)
    build(UVit2DModel, FLAT_TRANSFORMER, 300).save_pretrained(str(path), safe_serialization=True)
    t = UVit2DModel.from_pretrained(str(path)).eval()
    pipe = type("P", (), {"transformer": t})()
    transformer_reference(FIXTURES / "tiny" / "reference" / "amused-flat", pipe, 301, 1, False)
    print(f"wrote {rel(path)}", flush=True)


def main() -> None:
    seed_all(0)
    generate("tiny", "amused-256", TINY_TRANSFORMER, TINY_VQ, 100, torch.float32, True, [
        ("text2img", "text2img", dict(prompt="a red cat on a blue sofa", num_inference_steps=6)),
        ("text2img_batch", "text2img", dict(prompt=["a red cat", "Муза"], negative_prompt=["blurry", ""],
                                            num_inference_steps=4, guidance_scale=4.0,
                                            micro_conditioning_aesthetic_score=5,
                                            micro_conditioning_crop_coord=(3, 7))),
        ("text2img_nocfg", "text2img", dict(prompt="a red cat", num_inference_steps=5, guidance_scale=1.0,
                                            temperature=(1.5, 0.5))),
        ("img2img", "img2img", dict(prompt="winter mountains", num_inference_steps=8, strength=0.5)),
        ("inpaint", "inpaint", dict(prompt="a window", num_inference_steps=6, strength=1.0)),
    ])
    flat_transformer()
    generate("deep", "amused-512", DEEP_TRANSFORMER, DEEP_VQ, 200, torch.float16, False, [
        ("text2img", "text2img", dict(prompt="a photo of an astronaut", num_inference_steps=12)),
        ("img2img", "img2img", dict(prompt="winter mountains", num_inference_steps=12, strength=0.7)),
        ("inpaint", "inpaint", dict(prompt="a window", num_inference_steps=12, strength=0.8)),
    ])


if __name__ == "__main__":
    main()
