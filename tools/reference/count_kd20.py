#!/usr/bin/env python3
"""Parameter and FLOP counts of the real Kandinsky 2.0 configuration, to set expectations for a GPU.

Run:  tools/reference/.venv/bin/python tools/reference/count_kd20.py   (offline, ~15 s on 2 cores)

No weights are needed: every part is built without storage (no memory for the ~2B parameters)
by the OFFICIAL code (`/work/shared/reference/kandinsky2-src`, imported as `gen_kd20_unet.py` /
`gen_kd20_vae.py` do, never edited): the UNets and the autoencoder on torch's `meta` device,
the two transformers text encoders under `FakeTensorMode` (see `main`); the FLOPs of each are
counted with `torch.utils.flop_counter.FlopCounterMode` (a multiply-add = 2 FLOPs; it counts
matrix products and convolutions: mm/addmm/bmm/baddbmm, convolution and the fused
scaled-dot-product-attention kernels; the UNet's `einsum` attention and the autoencoder's
`torch.bmm` attention reach it as `bmm`; norms, activations, softmax are not counted).

* UNet: `create_model(**CONFIG_2_0["model_config"])` = `Text2ImUNet` (384 channels, mult 1,2,3,4,
  3 res blocks, attention at 32/16/8, head width 64, model_dim 768); inpainting = the same with
  `inpainting=True` (`InpaintText2ImUNet`, 4 * 2 + 1 = 9 input channels).
* Text encoder 1, M-CLIP (`model_name: "multiclip"`): `MultilingualCLIP` = XLM-RoBERTa-large
  (hidden 1024, 24 layers, 16 heads, intermediate 4096, vocab 250002, max positions 514, with
  `XLMRobertaModel`'s pooler) + `LinearTransformation` 1024 -> 640 (the class defaults;
  `text_encoder_in_dim2: 640` in the config is this pooled width, not the mT5 width).
* Text encoder 2, `MT5EncoderModel`: mT5-small (d_model 512, 8 layers, 6 heads of 64, gated-GELU
  d_ff 1024, vocab 250112). The hub config cannot be read here; the width is fixed by the UNet,
  which hard-codes 512 for it (`proj2 = AttentionPooling(8, 512, ...)`, `to_model_dim2 =
  nn.Linear(512, model_dim)`), and 512 is mT5-small's d_model (base 768, large 1024, xl 2048);
  the model card calls it "mT5-encoder-small, 146M".
* Autoencoder: `AutoencoderKL(**CONFIG_2_0["image_enc_params"]["params"])` (ch 128, mult
  1,2,4,4, 4 latent channels; the latent-diffusion KL-f8 layout), `ckpt_path` None. The
  "text2img total" counts all of it (the pipeline loads it whole; text-to-image runs the decoder).

Workload, as `Kandinsky2.generate_text2img` runs it for one 512x512 image: `encode_text` runs
each encoder on 2 rows (the prompt and the empty prompt) of 77 tokens (a fixed `max_length=77`
for both tokenizers); every DDIM step runs the UNet on 2 rows of 4x64x64 latents (classifier-free
guidance); the text projections (`get_text_emb`) run once, then are cached (`cache_text_emb`);
one `image_encoder.decode` of a 4x64x64 latent. 100 steps is the official default, 50 for
comparison. Never run by CI.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import json
import sys
import tempfile
import types
from pathlib import Path

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode
from transformers import MT5Config, MT5EncoderModel, XLMRobertaConfig

OFFICIAL_SRC = Path("/work/shared/reference/kandinsky2-src")
TOKENS = 77  # Kandinsky2.encode_text: max_length=77, padding="max_length", both encoders
XLMR_LARGE = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                  intermediate_size=4096, vocab_size=250002, max_position_embeddings=514,
                  type_vocab_size=1, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                  layer_norm_eps=1e-5, hidden_act="gelu")
MT5_SMALL = dict(d_model=512, d_kv=64, d_ff=1024, num_layers=8, num_heads=6, vocab_size=250112,
                 relative_attention_num_buckets=32, feed_forward_proj="gated-gelu",
                 tie_word_embeddings=False, is_encoder_decoder=False)


def import_official():
    """The official modules, without `kandinsky2/__init__.py` (needs the hub download API)."""
    if "kandinsky2" not in sys.modules:
        pkg = types.ModuleType("kandinsky2")
        pkg.__path__ = [str(OFFICIAL_SRC / "kandinsky2")]
        sys.modules["kandinsky2"] = pkg
    if importlib.util.find_spec("pytorch_lightning") is None and "pytorch_lightning" not in sys.modules:
        pl = types.ModuleType("pytorch_lightning")  # only used as a base class
        pl.LightningModule = torch.nn.Module
        sys.modules["pytorch_lightning"] = pl
    names = ["model.model_creation", "model.text_encoders", "vqgan.autoencoder", "configs"]
    mods = [importlib.import_module(f"kandinsky2.{n}") for n in names]
    assert Path(mods[0].__file__).resolve().is_relative_to(OFFICIAL_SRC.resolve()), mods[0].__file__
    return mods


def params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def flops(fn, by_op: dict | None = None) -> int:
    with FlopCounterMode(display=False) as f:
        fn()
    if by_op is not None:  # which aten ops the count is made of
        counts = f.get_flop_counts()["Global"]
        by_op.update({str(k).removeprefix("aten."): v for k, v in counts.items()})
    return f.get_total_flops()


def text_encoder(te, name: str, model: torch.nn.Module):
    """An official `TextEncoder` around a model built here (its __init__ would load weights)."""
    enc = te.TextEncoder.__new__(te.TextEncoder)
    torch.nn.Module.__init__(enc)
    enc.model_name, enc.model = name, model.eval()
    return enc


def fmt_p(n: int) -> str:
    return f"{n / 1e6:9.1f} M ({n / 1e9:.3f} B)"


@torch.no_grad()
def main() -> None:
    mc, te, ae, configs = import_official()
    cfg = configs.CONFIG_2_0
    dev = torch.device("meta")
    B = 2  # encode_text / the sampler: [prompt] * 1 + [""] * 1

    with dev:
        unet = mc.create_model(**dict(cfg["model_config"], inpainting=False)).eval()
        unet_inp = mc.create_model(**dict(cfg["model_config"], inpainting=True)).eval()
        vae_params = dict(cfg["image_enc_params"]["params"], ckpt_path=None)
        with contextlib.redirect_stdout(io.StringIO()):  # the official Encoder/Decoder print
            vae = ae.AutoencoderKL(**vae_params).eval()
    assert type(unet).__name__ == "Text2ImUNet" and type(unet_inp).__name__ == "InpaintText2ImUNet"
    assert unet_inp.input_blocks[0][0].in_channels == 9
    # The text encoders are built and run under FakeTensorMode (no storage either): on meta,
    # transformers' mask helper asks `attention_mask.all()`, which a meta tensor cannot answer;
    # fake tensors count as "tracing" there, so it keeps the mask (no FLOP difference).
    fake = FakeTensorMode()
    with fake:
        with tempfile.TemporaryDirectory() as tmp:  # MultilingualCLIP reads AutoConfig(folder)
            XLMRobertaConfig(**XLMR_LARGE).save_pretrained(tmp)
            mclip = te.MultilingualCLIP(tmp)  # in_features=1024, out_features=640 (defaults)
        mt5 = MT5EncoderModel(MT5Config(**MT5_SMALL))
    enc1, enc2 = text_encoder(te, "multiclip", mclip), text_encoder(te, "MT5EncoderModel", mt5)

    # ---- parameters
    p = {
        "unet": params(unet), "unet_inpaint": params(unet_inp), "mclip": params(mclip),
        "mclip_proj": params(mclip.LinearTransformation), "mt5": params(mt5),
        "vae_encoder": params(vae.encoder) + params(vae.quant_conv),
        "vae_decoder": params(vae.decoder) + params(vae.post_quant_conv), "vae": params(vae),
    }
    p["text2img_total"] = p["unet"] + p["mclip"] + p["mt5"] + p["vae"]
    print("Kandinsky 2.0 (CONFIG_2_0), parameters")
    print(f"  UNet text2img (Text2ImUNet, 4 in ch)        {fmt_p(p['unet'])}")
    print(f"  UNet inpainting (InpaintText2ImUNet, 9 in)  {fmt_p(p['unet_inpaint'])}")
    print(f"  M-CLIP: XLM-R large + proj 1024->640        {fmt_p(p['mclip'])}"
          f"  (proj {p['mclip_proj'] / 1e6:.2f} M, pooler "
          f"{params(mclip.transformer.pooler) / 1e6:.2f} M)")
    print(f"  mT5-small encoder (d_model 512)             {fmt_p(p['mt5'])}"
          f"  (token embeddings {params(mt5.shared) / 1e6:.1f} M)")
    print(f"  autoencoder KL-f8: encoder + quant_conv     {fmt_p(p['vae_encoder'])}")
    print(f"                     decoder + post_quant     {fmt_p(p['vae_decoder'])}")
    print(f"                     total                    {fmt_p(p['vae'])}")
    print(f"  text2img model total (UNet+2 enc+AE)        {fmt_p(p['text2img_total'])}")

    # ---- FLOPs
    lat = cfg["model_config"]["image_size"]  # 64 latents = 512 px (f8)
    with fake:
        ids = torch.zeros((B, TOKENS), dtype=torch.long)
        mask = torch.ones((B, TOKENS), dtype=torch.long)  # the count does not depend on padding
        f_enc1 = flops(lambda: enc1(ids, mask))
        f_enc2 = flops(lambda: enc2(ids, mask))
    emb = dict(full_emb1=torch.zeros((B, TOKENS, 1024), device=dev),
               pooled_emb1=torch.zeros((B, 640), device=dev),
               full_emb2=torch.zeros((B, TOKENS, 512), device=dev), pooled_emb2=None)
    x = torch.zeros((B, 4, lat, lat), device=dev)
    t = torch.zeros((B,), device=dev)
    unet.del_cache()
    f_textproj = flops(lambda: unet.get_text_emb(**emb))  # once per image, then cached
    step_ops: dict[str, int] = {}
    f_step = flops(lambda: unet(x, t, **emb), step_ops)  # uses the cache, as every step does
    unet.del_cache()
    unet_inp.del_cache()
    unet_inp.get_text_emb(**emb)
    f_step_inp = flops(lambda: unet_inp(x, t, inpaint_image=x, inpaint_mask=x[:, :1], **emb))
    unet_inp.del_cache()
    z = torch.zeros((1, 4, lat, lat), device=dev)
    dec_ops: dict[str, int] = {}
    f_dec = flops(lambda: vae.decode(z), dec_ops)
    side = lat * 8
    f_enc = flops(lambda: vae.encode(torch.zeros((1, 3, side, side), device=dev)).mean)

    def image(steps: int) -> int:
        return f_enc1 + f_enc2 + f_textproj + steps * f_step + f_dec

    g = lambda n: f"{n / 1e9:10.1f} GFLOP"  # noqa: E731
    print(f"FLOPs ({side}x{side}, {lat}x{lat} latents; multiply-add = 2)")
    print(f"  M-CLIP, {B} rows x {TOKENS} tokens               {g(f_enc1)}")
    print(f"  mT5-small encoder, {B} rows x {TOKENS} tokens    {g(f_enc2)}")
    print(f"  UNet text projections (once, cached)     {g(f_textproj)}")
    print(f"  UNet step, batch {B} (one CFG step)         {g(f_step)}")
    print("    by op: " + ", ".join(f"{k} {v / 1e9:.1f}" for k, v in sorted(step_ops.items())))
    print(f"  UNet inpainting step, batch {B}             {g(f_step_inp)}")
    print(f"  autoencoder decode, 1 latent             {g(f_dec)}")
    print("    by op: " + ", ".join(f"{k} {v / 1e9:.1f}" for k, v in sorted(dec_ops.items())))
    print(f"  autoencoder encode, 1 image (img2img)    {g(f_enc)}")
    for steps in (100, 50):
        print(f"  one image, {steps:3d} DDIM steps                {image(steps) / 1e12:10.2f} TFLOP"
              f"  (UNet {steps * f_step / image(steps):.1%})")

    summary = {"params": p, "flops": {
        "mclip_2x77": f_enc1, "mt5_2x77": f_enc2, "unet_text_proj": f_textproj,
        "unet_step_b2": f_step, "unet_inpaint_step_b2": f_step_inp, "vae_decode_64": f_dec,
        "vae_encode_512": f_enc, "image_100_steps": image(100), "image_50_steps": image(50)}}
    print("kd20 " + json.dumps(summary, sort_keys=True))


if __name__ == "__main__":
    main()
