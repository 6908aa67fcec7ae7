"""API keys, TLS, overload and a restart, against kd-gateways of their own in front of the test
stack's stages."""

from __future__ import annotations

import threading

import pytest

import kandinsky_serve as ks
from conftest import API_KEY, FAST, Gateway, free_port


def test_a_missing_or_wrong_api_key_is_unauthenticated(keyed_gateway):
    for key in (None, "wrong-key"):
        with ks.Client(keyed_gateway.target, api_key=key) as kd:
            with pytest.raises(ks.Unauthenticated) as e:
                kd.generate("a cat", **FAST)
            assert e.value.attempts == 1  # never retried


def test_the_api_key_is_sent_as_a_bearer_token(keyed_gateway):
    with ks.Client(keyed_gateway.target, api_key=API_KEY) as kd:
        [img] = kd.generate("a cat", seeds=1, **FAST)
        assert img.image.size == (64, 64)
        assert [m.name for m in kd.list_models()] == ["kandinsky-2-2"]


def test_overload_is_typed_and_retried(keyed_gateway):
    """The keyed gateway admits one request and queues none: a second one while the first
    runs is refused with RESOURCE_EXHAUSTED, which the default policy retries."""
    started, finished = threading.Event(), threading.Event()
    errors = []

    def long_request():
        try:
            with ks.Client(keyed_gateway.target, api_key=API_KEY) as kd:
                for _ in kd.generate_stream(
                    "a long one", seeds=1, **{**FAST, "width": 128, "height": 128, "steps": 60}
                ):
                    started.set()
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)
        finally:
            started.set()
            finished.set()

    t = threading.Thread(target=long_request)
    t.start()
    try:
        assert started.wait(30)
        with ks.Client(keyed_gateway.target, api_key=API_KEY) as kd:
            with pytest.raises(ks.Overloaded) as e:
                kd.generate("refused", retries=0, **FAST)
            assert isinstance(e.value, ks.ResourceExhausted)
            assert not finished.is_set(), "the long request ended too early for this test"
            patient = ks.RetryPolicy(max_attempts=100, initial_backoff=0.05, max_backoff=0.2)
            [img] = kd.generate("admitted later", retries=patient, timeout=60, **FAST)
            assert img.image.size == (64, 64)
            assert finished.is_set()
    finally:
        t.join(60)
    assert not errors, errors


def test_tls_with_a_private_ca_and_server_name(tls_gateway):
    tls = ks.TlsConfig(ca=tls_gateway.certs / "ca.pem", server_name="kd.test")
    with ks.Client(tls_gateway.target, api_key=API_KEY, tls=tls) as kd:
        [img] = kd.generate("a cat", seeds=1, **FAST)
        assert img.image.size == (64, 64)
    pem = (tls_gateway.certs / "ca.pem").read_bytes()
    with ks.Client(
        f"https://{tls_gateway.target}",
        api_key=API_KEY,
        tls=ks.TlsConfig(ca=pem, server_name="kd.test"),
    ) as kd:
        assert kd.list_models()


def test_tls_failures_are_unavailable(tls_gateway):
    # Plaintext to a TLS port; the system roots do not know the test CA; the wrong name.
    for tls in (None, True, ks.TlsConfig(ca=tls_gateway.certs / "ca.pem")):
        with ks.Client(tls_gateway.target, api_key=API_KEY, tls=tls, retries=0) as kd:
            with pytest.raises(ks.Unavailable):
                kd.list_models(timeout=10)


def test_a_gateway_that_comes_up_late_is_retried(stack):
    """UNAVAILABLE (nothing listens yet, then a gateway still connecting its stages) is
    retried until the gateway serves."""
    if len(stack.stage_urls()) != 4:
        pytest.skip("could not find the stages of `kd up` in /proc")
    port = free_port()
    started = []
    timer = threading.Timer(0.5, lambda: started.append(Gateway("late", stack, [], port=port)))
    policy = ks.RetryPolicy(max_attempts=20, initial_backoff=0.1, max_backoff=0.5)
    with ks.Client(f"127.0.0.1:{port}", retries=policy, timeout=30) as kd:
        with pytest.raises(ks.Unavailable):
            kd.list_models(retries=0)
        timer.start()
        try:
            [img] = kd.generate("a cat", seeds=1, **FAST)
            assert img.image.size == (64, 64)
        finally:
            timer.join()
            for gw in started:
                gw.stop()
