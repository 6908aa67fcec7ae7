"""Client.generate_stream: typed events in order."""

from __future__ import annotations

import pytest

import kandinsky_serve as ks
from conftest import FAST

STAGES = ["queued", "text_encoder", "prior", "denoiser", "movq"]


def test_stream_events_come_in_order(client, default_model):
    events = list(
        client.generate_stream(
            "a castle", num_images=2, seeds=[3, 4], preview_every=1, **{**FAST, "steps": 3}
        )
    )
    progress = [e for e in events if isinstance(e, ks.Progress)]
    previews = [e for e in events if isinstance(e, ks.Preview)]
    images = [e for e in events if isinstance(e, ks.GeneratedImage)]

    assert progress[0] == ks.Progress("queued", 0, 0)
    order = [STAGES.index(p.stage) for p in progress]
    assert order == sorted(order), [p.stage for p in progress]
    assert {p.stage for p in progress} == set(STAGES)
    for stage in STAGES:
        steps = [p.step for p in progress if p.stage == stage]
        assert steps == sorted(steps)
        assert all(p.step <= p.total_steps for p in progress if p.stage == stage)
    denoiser = [p for p in progress if p.stage == "denoiser"]
    assert denoiser[-1].step == denoiser[-1].total_steps == 3

    assert [p.step for p in previews] == [1, 2, 3]
    for p in previews:
        assert len(p.images) == 2
        assert all(max(im.size) <= 256 for im in p.images)

    assert [(i.index, i.seed) for i in images] == [(0, 3), (1, 4)]
    assert all(i.image.size == (64, 64) for i in images)
    assert events[-1] == ks.Done(model=default_model)
    assert sum(isinstance(e, ks.Done) for e in events) == 1
    last_progress = max(i for i, e in enumerate(events) if isinstance(e, ks.Progress))
    assert all(events.index(i) > last_progress for i in images)


def test_stream_without_preview_every_sends_no_previews(client):
    events = list(client.generate_stream("a castle", seeds=1, **FAST))
    assert not any(isinstance(e, ks.Preview) for e in events)
    assert sum(isinstance(e, ks.GeneratedImage) for e in events) == 1


def test_stream_and_generate_give_the_same_image(client):
    [unary] = client.generate("a bridge", seeds=21, **FAST)
    streamed = [
        e
        for e in client.generate_stream("a bridge", seeds=21, **FAST)
        if isinstance(e, ks.GeneratedImage)
    ]
    assert [s.data for s in streamed] == [unary.data]


def test_closing_a_stream_early_cancels_it(client):
    stream = client.generate_stream("a slow one", seeds=1, **{**FAST, "steps": 20})
    first = next(stream)
    assert isinstance(first, ks.Progress)
    stream.close()
    assert len(client.generate("after the cancel", **FAST)) == 1


def test_a_bad_stream_request_raises_at_the_first_event(client):
    stream = client.generate_stream("x", width=100, height=64)
    with pytest.raises(ks.InvalidArgument) as e:
        next(stream)
    assert e.value.field == "width"
