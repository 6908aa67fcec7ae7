"""aMUSEd (masked-token generation) through the client: `kd up` on the tiny aMUSEd folder runs
three stages without a prior; the client's aMUSEd arguments reach the token generator, and
what the family lacks is refused naming the field."""

from __future__ import annotations

import pytest

import kandinsky_serve as ks

SMALL = dict(width=64, height=64, steps=3)


def test_amused_generates_and_lists_its_tasks(amused_stack):
    with ks.Client(amused_stack.target, timeout=60) as kd:
        [m] = kd.list_models()
        assert m.name == "amused-256"
        assert m.default_steps == 12
        [img] = kd.generate("a lighthouse", seeds=3, **SMALL)
        assert img.image.size == (64, 64)
        assert img.model == "amused-256"
        [again] = kd.generate("a lighthouse", seeds=3, **SMALL)
        assert again.data == img.data
        [hot] = kd.generate(
            "a lighthouse", seeds=3, temperature=(8.0, 4.0), aesthetic_score=2.5, **SMALL
        )
        assert hot.data != img.data, "temperature and aesthetic score reach the model"


def test_what_amused_lacks_is_refused_by_field(amused_stack):
    with ks.Client(amused_stack.target, timeout=60) as kd:
        with pytest.raises(ks.InvalidArgument) as e:
            kd.generate("a cat", prior_steps=2, **SMALL)
        assert e.value.field == "prior.num_inference_steps"
        with pytest.raises(ks.InvalidArgument) as e:
            kd.generate("a cat", scheduler="ddim", **SMALL)
        assert e.value.field == "decoder.scheduler"
        with pytest.raises(ks.InvalidArgument) as e:
            kd.generate("a cat", temperature=(1.0,), **SMALL)
        assert e.value.field == "decoder.masked_tokens.temperature_start"
        with pytest.raises(ks.InvalidArgument) as e:
            kd.generate("a cat", aesthetic_score=11.0, **SMALL)
        assert e.value.field == "decoder.masked_tokens.aesthetic_score"


def test_amused_arguments_are_refused_by_a_kandinsky_model(client):
    with pytest.raises(ks.InvalidArgument) as e:
        client.generate("a cat", aesthetic_score=5.0, width=64, height=64, prior_steps=2, steps=2)
    assert e.value.field == "decoder.masked_tokens"
