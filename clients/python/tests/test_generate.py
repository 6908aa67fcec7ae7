"""Text-to-image with Client.generate, ListModels, and the package itself."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

from PIL import Image

import kandinsky_serve as ks
from conftest import FAST
from kandinsky_serve._pb import gateway_pb2

FIELDS = gateway_pb2.ModelDescription.DESCRIPTOR.fields_by_name


def test_generate_returns_the_requested_size_seed_and_model(client, default_model):
    [img] = client.generate("a red cat, 4k photo", seeds=[7], **{**FAST, "height": 128})
    assert isinstance(img, ks.GeneratedImage)
    assert img.image.size == (64, 128)
    assert (img.width, img.height) == (64, 128)
    assert img.seed == 7
    assert img.index == 0
    assert img.model == default_model
    assert img.format == "png"
    assert Image.open(io.BytesIO(img.data)).format == "PNG"


def test_the_same_seed_gives_the_same_bytes(client):
    a = client.generate("a lighthouse", seeds=11, **FAST)[0]
    b = client.generate("a lighthouse", seeds=11, **FAST)[0]
    c = client.generate("a lighthouse", seeds=12, **FAST)[0]
    assert a.data == b.data
    assert a.data != c.data


def test_a_random_seed_is_reported_and_reproduces_the_image(client):
    [a] = client.generate("a forest", **FAST)
    [b] = client.generate("a forest", seeds=[a.seed], **FAST)
    assert a.data == b.data


def test_several_images_come_in_order_with_their_seeds(client):
    imgs = client.generate("boats", num_images=3, seeds=[1, 2, 3], **FAST)
    assert [i.index for i in imgs] == [0, 1, 2]
    assert [i.seed for i in imgs] == [1, 2, 3]
    assert len({i.data for i in imgs}) == 3


def test_sampling_options_and_output_format(client, tmp_path: Path):
    [img] = client.generate(
        "a city at night",
        negative_prompt="blurry",
        seeds=5,
        prior_guidance=1.0,
        guidance=2.5,
        scheduler="ddim",
        quality="draft",
        output_format="jpeg",
        output_quality=80,
        **FAST,
    )
    assert img.format == "jpeg"
    assert img.image.format == "JPEG"
    img.save(tmp_path / "out.jpg")
    assert (tmp_path / "out.jpg").read_bytes() == img.data


def test_list_models_describes_the_served_model(client):
    models = client.list_models()
    assert [m.is_default for m in models].count(True) == 1
    [m] = [m for m in models if m.is_default]
    assert m.name == "kandinsky-2-2"
    assert m.family == "kandinsky_2_2"
    assert m.distilled is False
    assert m.default_steps > 0 or m.default_timesteps
    if "tasks" in FIELDS:  # protos with ModelDescription.tasks
        assert m.tasks == ("text_to_image", "image_to_image", "variation", "fusion")
    else:
        assert m.tasks is None
    assert m.takes_hint is (False if "takes_hint" in FIELDS else None)


def test_the_package_never_imports_a_top_level_kandinsky_module():
    code = (
        "import sys, kandinsky_serve, kandinsky_serve._pb.gateway_pb2_grpc;"
        "assert not any(m == 'kandinsky' or m.startswith('kandinsky.') for m in sys.modules), "
        "sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    pb = Path(ks.__file__).parent / "_pb"
    for f in pb.glob("*.py*"):
        text = f.read_text()
        assert "from kandinsky." not in text and "import kandinsky." not in text, f
