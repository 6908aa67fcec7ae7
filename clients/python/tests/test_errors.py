"""Failures as typed exceptions, timeouts and the retry policy."""

from __future__ import annotations

import time

import grpc
import pytest

import kandinsky_serve as ks
from conftest import FAST, free_port


@pytest.mark.parametrize(
    "args, field",
    [
        (dict(width=100), "width"),
        (dict(height=4096), "height"),
        (dict(num_images=5), "num_images"),  # the gateway's default --max-images is 4
        (dict(num_images=0), "num_images"),  # 0 is an error; None leaves it unset (1)
        (dict(num_images=2, seeds=[1]), "seeds"),
        (dict(steps=0), "decoder.num_inference_steps"),
        (dict(prior_steps=0), "prior.num_inference_steps"),
        (dict(output_quality=101), "output.quality"),
        (dict(model="no-such-model"), "model"),
    ],
)
def test_invalid_arguments_name_the_field(client, args, field):
    with pytest.raises(ks.InvalidArgument) as e:
        client.generate("a cat", **{**FAST, **args})
    err = e.value
    assert err.field == field, str(err)
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert str(err).startswith(f"invalid `{field}`: ")
    assert err.message == str(err)[len(f"invalid `{field}`: ") :]
    assert err.attempts == 1
    assert isinstance(err, ks.KandinskyError) and isinstance(err, ValueError)


def test_an_empty_prompt_is_refused(client):
    with pytest.raises(ks.InvalidArgument) as e:
        client.generate("   ", **FAST)
    assert e.value.field == "prompt"
    assert e.value.message == "must not be empty"


def test_width_error_message_says_what_is_allowed(client):
    with pytest.raises(ks.InvalidArgument) as e:
        client.generate("a cat", width=100)
    assert e.value.field == "width"
    assert e.value.message.startswith("100; allowed: a multiple of 64")


def test_values_protobuf_cannot_hold_are_refused_before_sending(client):
    with pytest.raises(ks.InvalidArgument) as e:
        client.generate("a cat", width=-64)
    assert e.value.field == "width"
    with pytest.raises(ks.InvalidArgument) as e:
        client.generate("a cat", scheduler="euler")
    assert e.value.field == "decoder.scheduler" and "'ddim'" in e.value.message
    with pytest.raises(ks.InvalidArgument) as e:
        client.generate("a cat", output_format="gif")
    assert e.value.field == "output.format"


def test_a_timeout_surfaces_as_deadline_exceeded(client):
    # 512x512 at the default 50 steps takes far longer than 1 s on a CPU.
    start = time.monotonic()
    with pytest.raises(ks.DeadlineExceeded) as e:
        client.generate("a cat", timeout=1.0)
    assert time.monotonic() - start < 5
    assert e.value.attempts == 1  # never retried
    assert e.value.code == grpc.StatusCode.DEADLINE_EXCEEDED


def test_a_timeout_during_the_work_surfaces_as_deadline_exceeded(client):
    with pytest.raises(ks.DeadlineExceeded):
        client.generate(
            "a cat", timeout=0.3, seeds=1, **{**FAST, "width": 256, "height": 256, "steps": 200}
        )


def test_a_stream_timeout_surfaces_as_deadline_exceeded(client):
    events = []
    with pytest.raises(ks.DeadlineExceeded):
        for ev in client.generate_stream("a cat", timeout=1.0, seeds=1, **{**FAST, "steps": 1000}):
            events.append(ev)


def test_an_unreachable_server_is_retried_then_unavailable():
    policy = ks.RetryPolicy(max_attempts=3, initial_backoff=0.1, multiplier=2, jitter=0)
    with ks.Client(f"127.0.0.1:{free_port()}", retries=policy) as kd:
        start = time.monotonic()
        with pytest.raises(ks.Unavailable) as e:
            kd.list_models()
        assert e.value.attempts == 3
        assert time.monotonic() - start >= 0.3  # waited 0.1 + 0.2 s between the tries
        with pytest.raises(ks.Unavailable) as e:
            list(kd.generate_stream("a cat", retries=1))
        assert e.value.attempts == 2
        with pytest.raises(ks.Unavailable) as e:
            kd.generate("a cat", retries=0)
        assert e.value.attempts == 1


def test_retries_never_outlast_the_timeout():
    policy = ks.RetryPolicy(max_attempts=10, initial_backoff=1.0)
    with ks.Client(f"127.0.0.1:{free_port()}", retries=policy, timeout=0.5) as kd:
        start = time.monotonic()
        with pytest.raises(ks.Unavailable):
            kd.generate("a cat")
        assert time.monotonic() - start < 1.0


def test_the_retry_policy_is_checked():
    assert ks.RetryPolicy.of(0).max_attempts == 1
    assert ks.RetryPolicy.of(2).max_attempts == 3
    assert ks.RetryPolicy.of(None) == ks.RetryPolicy()
    with pytest.raises(ValueError):
        ks.RetryPolicy.of(-1)
    with pytest.raises(ValueError):
        ks.RetryPolicy(max_attempts=0)
    p = ks.RetryPolicy()
    assert p.should_retry(ks.Unavailable("x"), 1)
    assert p.should_retry(ks.Overloaded("overloaded: full"), 1)
    assert not p.should_retry(ks.Unavailable("x"), p.max_attempts)
    for final in (
        ks.InvalidArgument("invalid `width`: 1"),
        ks.DeadlineExceeded("x"),
        ks.Unauthenticated("x"),
        ks.ResourceExhausted("message too large"),
        ks.InternalError("x"),
        ks.Cancelled("x"),
    ):
        assert not p.should_retry(final, 1), final


def _ld(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field (lengths < 128 here)."""
    return bytes([number << 3 | 2, len(payload)]) + payload


def test_bad_request_details_are_preferred_to_the_message():
    # google.rpc.Status{code: 3, details: [Any{BadRequest{field_violations: [...]}}]}, as a
    # server that attaches details sends it in the grpc-status-details-bin trailer.
    violation = _ld(1, b"decoder.guidance_scale") + _ld(2, b"1000; allowed: 0..=100")
    bad_request = _ld(1, violation)
    detail = _ld(1, b"type.googleapis.com/google.rpc.BadRequest") + _ld(2, bad_request)
    status = bytes([0x08, 3]) + _ld(2, b"invalid") + _ld(3, detail)
    trailers = [("date", "now"), ("grpc-status-details-bin", status)]
    violations = ks.errors.bad_request_violations(trailers)
    assert violations == [("decoder.guidance_scale", "1000; allowed: 0..=100")]
    err = ks.InvalidArgument("invalid `x`: y", violations=violations)
    assert (err.field, err.message) == ("decoder.guidance_scale", "1000; allowed: 0..=100")
    assert ks.errors.bad_request_violations([("grpc-status-details-bin", b"\xff\xff")]) == []
