"""Reference for the image pre-processing of the Kandinsky 2.2 img2img / inpaint pipelines.

Writes tests/fixtures/tiny/reference/decoder/image_preprocess.{safetensors,json}: Pillow resizes
(BICUBIC with reducing_gap=1 for images, LANCZOS for masks) and the diffusers pre-processing
functions applied to small deterministic inputs. Never run by CI:

    tools/reference/.venv/bin/python tools/reference/gen_image_preprocess.py
"""

from __future__ import annotations

import json
from importlib.metadata import version

import numpy as np
import PIL
import torch
from PIL import Image
from safetensors.torch import save_file

from common import FIXTURES

OUT = FIXTURES / "tiny" / "reference" / "decoder"

# (width, height) targets: identity, integer-reduce paths NxN / 2x2 / Nx1 / 1xN with partial
# edge blocks, plain bicubic downscale (factor 1) and upscale.
IMAGE_SIZES = [(61, 45), (24, 16), (16, 8), (8, 8), (20, 45), (61, 15), (56, 40), (32, 48), (128, 96), (30, 22)]
MASK_SIZES = [(61, 45), (64, 64), (24, 16), (128, 96), (9, 7)]


def src_rgb() -> np.ndarray:
    h, w = 45, 61
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    base = np.stack(
        [
            127.5 + 127.5 * np.sin(x / 5.0) * np.cos(y / 7.0),
            255.0 * x / (w - 1),
            255.0 * ((x + y) % 11 < 5),
        ],
        axis=-1,
    )
    noise = np.random.RandomState(0).randint(-40, 41, size=(h, w, 3))
    return np.clip(np.round(base + noise), 0, 255).astype(np.uint8)


def src_mask() -> np.ndarray:
    h, w = 45, 61
    m = np.zeros((h, w), np.uint8)
    m[11:30, 17:44] = 255
    m[35:40, :] = np.linspace(0, 255, w).round().astype(np.uint8)[None, :]
    m[3, 5] = 255
    return m


def main() -> None:
    from diffusers.image_processor import VaeImageProcessor
    from diffusers.pipelines.kandinsky2_2.pipeline_kandinsky2_2_inpainting import (
        prepare_mask_and_masked_image,
    )

    rgb = src_rgb()
    mask = src_mask()
    img = Image.fromarray(rgb, "RGB")
    mimg = Image.fromarray(mask, "L")
    t: dict[str, torch.Tensor] = {
        "src_rgb_u8": torch.from_numpy(rgb),
        "src_mask_u8": torch.from_numpy(mask),
    }
    for w, h in IMAGE_SIZES:
        out = img.resize((w, h), resample=Image.BICUBIC, reducing_gap=1)
        t[f"bicubic_rg1_{w}x{h}"] = torch.from_numpy(np.array(out))
    for w, h in MASK_SIZES:
        out = mimg.resize((w, h), resample=Image.LANCZOS)
        t[f"lanczos_L_{w}x{h}"] = torch.from_numpy(np.array(out))
    # An RGB mask is resized in RGB and then converted to L (ITU-R 601-2 luma).
    rgb_mask = Image.fromarray(rgb, "RGB")
    out = rgb_mask.resize((32, 24), resample=Image.LANCZOS).convert("L")
    t["lanczos_rgb_to_L_32x24"] = torch.from_numpy(np.array(out))
    t["rgb_to_L_61x45"] = torch.from_numpy(np.array(rgb_mask.convert("L")))

    # diffusers img2img pre-processing (Kandinsky's VaeImageProcessor); 61x45 → rounded down to 56x40.
    proc = VaeImageProcessor(vae_scale_factor=8, resample="bicubic", reducing_gap=1)
    t["img2img_pre_h45_w61"] = proc.preprocess(img, height=45, width=61).float().contiguous()
    # inpaint pre-processing at 24x16 (width x height): image /127.5 − 1, keep-mask (1 = keep).
    m, im = prepare_mask_and_masked_image(img, mimg, 16, 24)
    t["inpaint_image_24x16"] = im.float().contiguous()
    t["inpaint_keep_mask_24x16"] = m.float().contiguous()
    t = {k: v.contiguous() for k, v in t.items()}
    save_file(t, str(OUT / "image_preprocess.safetensors"), metadata={"format": "pt"})
    meta = {
        "what": "Pillow resize (BICUBIC reducing_gap=1, LANCZOS) and diffusers img2img/inpaint pre-processing",
        "keys": {
            "src_rgb_u8": "(45, 61, 3) RGB source, HWC",
            "src_mask_u8": "(45, 61) L mask source",
            "bicubic_rg1_{w}x{h}": "Image.resize((w, h), BICUBIC, reducing_gap=1) of src_rgb, HWC u8",
            "lanczos_L_{w}x{h}": "L-mode Image.resize((w, h), LANCZOS) of src_mask",
            "lanczos_rgb_to_L_32x24": "src_rgb as RGB resized LANCZOS to 32x24, then convert('L')",
            "rgb_to_L_61x45": "src_rgb convert('L')",
            "img2img_pre_h45_w61": "VaeImageProcessor(8, bicubic, reducing_gap=1).preprocess(img, height=45, width=61): (1,3,40,56)",
            "inpaint_image_24x16": "prepare_mask_and_masked_image(img, mask, height=16, width=24) image: (1,3,16,24)",
            "inpaint_keep_mask_24x16": "its mask (1 = keep): (1,1,16,24)",
        },
        "versions": {"Pillow": PIL.__version__, "diffusers": version("diffusers"), "torch": torch.__version__},
    }
    (OUT / "image_preprocess.json").write_text(json.dumps(meta, indent=2) + "\n")


if __name__ == "__main__":
    main()
