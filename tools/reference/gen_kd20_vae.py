#!/usr/bin/env python3
"""Kandinsky 2.0 image autoencoder fixture: the official `kandinsky2.vqgan.autoencoder.AutoencoderKL`.

Writes `tests/fixtures/kd20-vae/` (and nothing else; the folder is rebuilt from scratch):

* `vae.ckpt`: `torch.save({"state_dict": <fp16 tensors>, "global_step": 1})`, a plain dict as a
  Lightning checkpoint has it, original latent-diffusion key names (`encoder.down.0.block.0.norm1.weight`,
  `encoder.mid.attn_1.q.weight`, `decoder.up.2.upsample.conv.weight`, `quant_conv.weight`, ...).
  The official pipeline reads it as `torch.load(path)["state_dict"]` with `strict=False`.
* `config.json`: the shape of `CONFIG_2_0["image_enc_params"]` (`name`, `scale`,
  `params.embed_dim`, `params.ddconfig`) for this tiny model; the official folder has no config
  for the VAE (the code's `CONFIG_2_0` is its config, and `kd_models::kl::KlConfig::default()`
  carries those values); the Rust side reads this sidecar only for the fixture. One key is not
  upstream: `ddconfig.norm_num_groups` (see below).
* `reference.safetensors` (fp32, computed by the official code from the re-loaded fp16 weights
  upcast to fp32) + `reference.json` (the numbers and shapes):
  - `decode_latents` (2, 4, 8, 8): random latents as the sampler leaves them;
    `decoded` (2, 3, 32, 32) = `image_encoder.decode(decode_latents / scale)` (what
    `Kandinsky2.generate_img` does before cropping and `process_images`);
    `decoder_mid` (2, 8, 8, 8): the decoder's mid-block output (after `mid.block_2`);
  - `image` (1, 3, 32, 32): a smooth image in [-1, 1] (`prepare_image`'s range);
    `encoder_down` (1, 8, 8, 8): the encoder's down path (the last level's last resnet, before
    `mid`); `moments` (1, 8, 8, 8) = `quant_conv(encoder(image))`;
    `posterior_mean` / `posterior_std` (1, 4, 8, 8);
    `noise` (1, 1, 4, 8, 8): the one Gaussian draw `DiagonalGaussianDistribution.sample()` made
    (recorded from `torch.randn`, stacked for `ReplayNoise::from_stacked`);
    `latents` (1, 4, 8, 8) = `image_encoder.encode(image).sample() * scale` (what
    `generate_img2img` / `generate_inpainting` start from).

Architecture: `ch` 4, `ch_mult` [1, 2, 2] (widths 4, 8, 8; one channel change per direction, so
`nin_shortcut` is exercised), `num_res_blocks` 1, `attn_resolutions` [] (as the real 2.0 config:
only the mid-block attentions), `double_z`, `z_channels` 4, `embed_dim` 4. Two departures from a
literal tiny copy of the real model, both forced by the 150 KB budget:

* `ch` is 4, not 8: with `ch` 8 the fp16 checkpoint alone is ~169 KB (62k parameters and ~300
  bytes of zip/pickle overhead for each of its 152 tensors); `ch` 4 is ~79 KB.
* GroupNorm groups: upstream `vqgan_blocks.Normalize` hard-codes `num_groups=32`, which needs
  every width to be a multiple of 32 (a 32-wide model is ~580 KB in fp16). The generator replaces
  the module-level `Normalize` (looked up at call time by `Encoder`/`Decoder`/`ResnetBlock`/
  `AttnBlock`) with the same `GroupNorm(eps=1e-6, affine=True)` at 2 groups (2 and 4 channels
  per group), recorded as `ddconfig.norm_num_groups: 2`; the Rust config defaults to 32.

The package source is never edited: it is imported without `kandinsky2/__init__.py` (which needs
`huggingface_hub.cached_download` and the 2.1/2.2 modules) through a stand-in package object whose
`__path__` is the real one, with a stand-in `pytorch_lightning` (only `LightningModule` is used, as
a base class) and, when the venv lacks it, a stand-in `einops` (imported, never called on this
path).

Deterministic and idempotent (seeded generators, torch's own zip writer). Run through
`make fixtures` (needs tools/reference/.venv); CI never runs it.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import math
import shutil
import sys
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import FIXTURES, perturb, save_reference, seed_all, write_json  # noqa: E402

OFFICIAL_SRC = Path("/work/shared/reference/kandinsky2-src")
OUT = FIXTURES / "kd20-vae"
BUDGET_BYTES = 150_000
GROUPS = 2

DDCONFIG = {
    "double_z": True,
    "z_channels": 4,
    "resolution": 64,
    "in_channels": 3,
    "out_ch": 3,
    "ch": 4,
    "ch_mult": [1, 2, 2],
    "num_res_blocks": 1,
    "attn_resolutions": [],
    "dropout": 0.0,
}
EMBED_DIM = 4


def import_official():
    """`(vqgan_blocks, autoencoder, configs)` of the official package, `Normalize` patched."""
    if "kandinsky2" not in sys.modules:
        pkg = types.ModuleType("kandinsky2")
        pkg.__path__ = [str(OFFICIAL_SRC / "kandinsky2")]
        sys.modules["kandinsky2"] = pkg
    if importlib.util.find_spec("pytorch_lightning") is None and "pytorch_lightning" not in sys.modules:
        pl = types.ModuleType("pytorch_lightning")
        pl.LightningModule = torch.nn.Module
        sys.modules["pytorch_lightning"] = pl
    if importlib.util.find_spec("einops") is None and "einops" not in sys.modules:
        # Imported by vqgan_blocks / quntize / movq_modules, used only by classes this script
        # never builds (LinearAttention, VectorQuantizer, the MoVQ decoder).
        einops = types.ModuleType("einops")

        def rearrange(*_args, **_kwargs):
            raise NotImplementedError("einops stand-in: not on the AutoencoderKL path")

        einops.rearrange = rearrange
        sys.modules["einops"] = einops
    blocks = importlib.import_module("kandinsky2.vqgan.vqgan_blocks")
    ae = importlib.import_module("kandinsky2.vqgan.autoencoder")
    configs = importlib.import_module("kandinsky2.configs")
    assert Path(ae.__file__).resolve().is_relative_to(OFFICIAL_SRC.resolve()), ae.__file__

    def normalize(in_channels, num_groups=32):
        assert num_groups == 32  # what upstream asks for everywhere; replaced by GROUPS
        return torch.nn.GroupNorm(num_groups=GROUPS, num_channels=in_channels, eps=1e-6, affine=True)

    blocks.Normalize = normalize
    return blocks, ae, configs


@contextlib.contextmanager
def quiet():
    """The official constructors print ("making attention of type ...", "Restored from ...")."""
    with open("/dev/null", "w") as devnull, contextlib.redirect_stdout(devnull):
        yield


@contextlib.contextmanager
def record_randn():
    """Records every `torch.randn` call (the posterior's `sample()` draws through it)."""
    original = torch.randn
    drawn: list[torch.Tensor] = []

    def recording(*args, **kwargs):
        t = original(*args, **kwargs)
        drawn.append(t.detach().clone())
        return t

    torch.randn = recording
    try:
        yield drawn
    finally:
        torch.randn = original


def smooth_image(h: int, w: int) -> torch.Tensor:
    """(1, 3, h, w) in [-1, 1]: low-frequency sinusoids, a different one per channel."""
    y = torch.linspace(0.0, 1.0, h, dtype=torch.float64)[:, None]
    x = torch.linspace(0.0, 1.0, w, dtype=torch.float64)[None, :]
    chans = [
        torch.sin(2 * math.pi * (0.8 * x + 0.3 * y) + 0.4),
        torch.cos(2 * math.pi * (0.5 * x - 0.9 * y)) * 0.9,
        torch.tanh(3.0 * (x - 0.5)) * torch.cos(2 * math.pi * y) * 0.95,
    ]
    return torch.stack(chans)[None].to(torch.float32).clamp(-1.0, 1.0)


def capture(module: torch.nn.Module, store: dict, name: str):
    def hook(_m, _inp, out):
        store[name] = out.detach().clone()

    return module.register_forward_hook(hook)


@torch.no_grad()
def main() -> None:
    seed_all(0)
    _, ae, configs = import_official()
    official = configs.CONFIG_2_0["image_enc_params"]
    assert official["name"] == "AutoencoderKL"
    scale = float(official["scale"])
    assert scale == 0.0512, scale
    # The fixture keeps every key of the real ddconfig, only at tiny widths.
    assert set(DDCONFIG) == set(official["params"]["ddconfig"]), official["params"]["ddconfig"]
    assert official["params"]["embed_dim"] == EMBED_DIM

    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)

    with quiet():
        model = ae.AutoencoderKL(ddconfig=dict(DDCONFIG), embed_dim=EMBED_DIM)
    perturb(model, seed=2000)
    sd = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    ckpt = OUT / "vae.ckpt"
    torch.save({"state_dict": sd, "global_step": 1}, ckpt)

    # Re-load through the official path (`init_from_ckpt`: torch.load(...)["state_dict"],
    # strict=False) into an fp32 model, and check that every tensor was restored.
    with quiet():
        model = ae.AutoencoderKL(ddconfig=dict(DDCONFIG), embed_dim=EMBED_DIM, ckpt_path=str(ckpt))
    model.eval()
    loaded = model.state_dict()
    assert set(loaded) == set(sd), set(loaded) ^ set(sd)
    for k, v in sd.items():
        assert loaded[k].dtype == torch.float32 and torch.equal(loaded[k], v.float()), k

    write_json(
        OUT / "config.json",
        {
            "name": "AutoencoderKL",
            "scale": scale,
            "params": {"embed_dim": EMBED_DIM, "ddconfig": {**DDCONFIG, "norm_num_groups": GROUPS}},
        },
    )

    mids: dict[str, torch.Tensor] = {}
    assert len(model.encoder.down[-1].attn) == 0  # else the down path ends after an attention
    hooks = [
        capture(model.encoder.down[-1].block[-1], mids, "encoder_down"),
        capture(model.decoder.mid.block_2, mids, "decoder_mid"),
    ]

    # Decode as Kandinsky2.generate_img: image_encoder.decode(samples / scale).
    gen = torch.Generator().manual_seed(7)
    decode_latents = torch.randn((2, 4, 8, 8), generator=gen)
    decoded = model.decode(decode_latents / scale)

    # Encode as generate_img2img / generate_inpainting: encode(image).sample() * scale.
    image = smooth_image(32, 32)
    assert image.min() >= -1.0 and image.max() <= 1.0
    moments = model.quant_conv(model.encoder(image))
    posterior = model.encode(image)
    torch.manual_seed(11)
    with record_randn() as drawn:
        latents = posterior.sample() * scale
    assert len(drawn) == 1 and drawn[0].shape == (1, 4, 8, 8), [d.shape for d in drawn]
    noise = drawn[0]
    replay = (posterior.mean + posterior.std * noise) * scale
    assert torch.equal(replay, latents)
    for h in hooks:
        h.remove()

    tensors = {
        "decode_latents": decode_latents,
        "decoded": decoded,
        "decoder_mid": mids["decoder_mid"],
        "image": image,
        "moments": moments,
        "encoder_down": mids["encoder_down"],
        "posterior_mean": posterior.mean,
        "posterior_std": posterior.std,
        "noise": noise[None],
        "latents": latents,
    }
    for k, v in tensors.items():
        assert v.dtype == torch.float32 and torch.isfinite(v).all(), k
    save_reference(
        OUT / "reference",
        tensors,
        {
            "scale": scale,
            "decode": "decoded = AutoencoderKL.decode(decode_latents / scale)",
            "encode": "latents = AutoencoderKL.encode(image).sample() * scale "
            "= (mean + exp(0.5 * clamp(logvar, -30, 20)) * noise[0]) * scale",
            "shapes": {k: list(v.shape) for k, v in tensors.items()},
        },
    )

    total = sum(p.stat().st_size for p in OUT.iterdir())
    print(f"kd20-vae: {total} bytes in {OUT.relative_to(FIXTURES.parent.parent)}")
    assert total <= BUDGET_BYTES, f"{total} bytes > budget {BUDGET_BYTES}"


if __name__ == "__main__":
    main()
