"""Image-to-image, inpaint, outpaint, variation, fusion and ControlNet hints."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image, ImageDraw

import kandinsky_serve as ks
from conftest import FAST


@pytest.fixture(scope="module")
def source(client) -> Image.Image:
    return client.generate("a house", seeds=1, **FAST)[0].image


def mask_of(size, box) -> Image.Image:
    m = Image.new("L", size, 0)
    ImageDraw.Draw(m).rectangle(box, fill=255)
    return m


def test_image_to_image(client, source, tmp_path: Path):
    [a] = client.generate(
        "a house in winter", image=source, strength=0.5, seeds=2, **{**FAST, "steps": 4}
    )
    assert a.image.size == (64, 64) and a.seed == 2
    # The same image as encoded bytes or as a file gives the same result.
    png = tmp_path / "source.png"
    source.save(png)
    [b] = client.generate(
        "a house in winter", image=png.read_bytes(), strength=0.5, seeds=2, **{**FAST, "steps": 4}
    )
    [c] = client.generate(
        "a house in winter", image=png, strength=0.5, seeds=2, **{**FAST, "steps": 4}
    )
    assert a.data == b.data == c.data
    [other] = client.generate("a house in winter", seeds=2, **{**FAST, "steps": 4})
    assert other.data != a.data


def test_image_to_image_resizes_the_input(client, source):
    [img] = client.generate("a house", image=source, seeds=2, **{**FAST, "width": 128, "steps": 4})
    assert img.image.size == (128, 64)


def test_image_to_image_strength_out_of_range_names_the_field(client, source):
    with pytest.raises(ks.InvalidArgument) as e:
        client.generate("a house", image=source, strength=1.5, **FAST)
    assert e.value.field == "image_to_image.strength"


def test_inpaint(inpaint_stack, source):
    with ks.Client(inpaint_stack.target, timeout=60) as kd:
        mask = mask_of(source.size, (16, 16, 47, 47))
        [a] = kd.generate("a window", image=source, mask=mask, seeds=3, **FAST)
        [b] = kd.generate("a window", image=source, mask=mask, seeds=3, **FAST)
        assert a.image.size == (64, 64) and a.seed == 3
        assert a.data == b.data
        [m] = kd.list_models()
        assert m.tasks == ("inpaint", "outpaint"), m.tasks


def test_inpaint_on_a_text_to_image_model_is_refused(client, source):
    with pytest.raises(ks.InvalidArgument) as e:
        client.generate("a window", image=source, mask=mask_of(source.size, (0, 0, 31, 31)), **FAST)
    assert e.value.field == "model", str(e.value)


def test_outpaint(inpaint_stack, source):
    with ks.Client(inpaint_stack.target, timeout=60) as kd:
        [img] = kd.generate(
            "more sky",
            image=source,
            outpaint=ks.Margins(right=64),
            seeds=4,
            **{**FAST, "width": 128},
        )
        assert img.image.size == (128, 64)


def test_variation_and_fusion(client, source):
    [v] = client.generate(variation=source, seeds=5, **FAST)
    assert v.image.size == (64, 64)
    [f] = client.generate(
        fusion=["a cat", (source, 0.5), ks.FusionItem("a dog", 0.25)], seeds=5, **FAST
    )
    assert f.image.size == (64, 64)
    assert v.data != f.data


def test_conflicting_task_arguments_are_refused_before_sending(client, source):
    with pytest.raises(ks.InvalidArgument) as e:
        client.generate("x", mask=source)
    assert e.value.field == "image"
    with pytest.raises(ks.InvalidArgument) as e:
        client.generate("x", image=source, mask=source, outpaint=(0, 0, 64, 0))
    assert e.value.field == "outpaint"
    with pytest.raises(ks.InvalidArgument) as e:
        client.generate("x", strength=0.5)
    assert e.value.field == "strength"
    with pytest.raises(ks.InvalidArgument) as e:
        client.generate("x", image=object())
    assert e.value.field == "image_to_image.image"


def test_controlnet_depth_hint(controlnet_stack):
    depth = Image.linear_gradient("L").resize((64, 64))
    with ks.Client(controlnet_stack.target, timeout=60) as kd:
        [m] = kd.list_models()
        assert m.takes_hint is True
        assert m.tasks == ("text_to_image", "image_to_image"), m.tasks
        [a] = kd.generate("a room", hint=depth, seeds=6, **FAST)
        [b] = kd.generate("a room", hint=depth.rotate(90), seeds=6, **FAST)
        assert a.image.size == (64, 64)
        assert a.data != b.data
        with pytest.raises(ks.InvalidArgument) as e:
            kd.generate("a room", seeds=6, **FAST)  # a ControlNet model needs the hint
        assert e.value.field == "text_to_image.hint", str(e.value)


def test_controlnet_image_to_image_with_a_hint(controlnet_stack, source):
    depth = Image.linear_gradient("L").resize((64, 64))
    with ks.Client(controlnet_stack.target, timeout=60) as kd:
        [a] = kd.generate(
            "a room", image=source, strength=0.5, hint=depth, seeds=6, **{**FAST, "steps": 4}
        )
        [b] = kd.generate("a room", hint=depth, seeds=6, **{**FAST, "steps": 4})
        assert a.image.size == (64, 64)
        assert a.data != b.data
        with pytest.raises(ks.InvalidArgument) as e:
            kd.generate("a room", image=source, seeds=6, **FAST)
        assert e.value.field == "image_to_image.hint", str(e.value)


def test_a_hint_on_a_model_without_controlnet_is_refused(client):
    with pytest.raises(ks.InvalidArgument) as e:
        client.generate("a room", hint=Image.new("L", (64, 64)), **FAST)
    assert e.value.field == "text_to_image.hint", str(e.value)
