"""The client of the kandinsky-serve gateway (`kandinsky.v1.Gateway`)."""

from __future__ import annotations

import io
import os
import re
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import grpc

from .errors import DeadlineExceeded, InvalidArgument, KandinskyError
from .errors import from_rpc_error
from .types import (
    Done,
    Event,
    FusionItem,
    GeneratedImage,
    Margins,
    ModelDescription,
    Preview,
    Progress,
    RetryPolicy,
    TlsConfig,
    decode_image,
)

try:
    from ._pb import common_pb2, gateway_pb2, gateway_pb2_grpc
except ImportError as e:  # pragma: no cover - only from an uninstalled source tree
    raise ImportError(
        "kandinsky_serve: the generated gRPC stubs (kandinsky_serve._pb) are missing; install "
        "the package (`pip install ./clients/python`, or `pip install -e` for development) "
        "instead of importing it from the source tree"
    ) from e

__all__ = ["Client", "ImageInput", "DEFAULT_MAX_RECEIVE_BYTES", "DEFAULT_MAX_SEND_BYTES"]

#: Largest response accepted: up to the server's max images (default 4) of up to 2048x2048
#: PNG each, with room for a raised server limit.
DEFAULT_MAX_RECEIVE_BYTES = 256 << 20
#: Largest request sent: the gateway's default --max-message-bytes.
DEFAULT_MAX_SEND_BYTES = 64 << 20

#: An input image: a PIL image (sent as PNG), encoded PNG/JPEG/WebP bytes, or a file path.
ImageInput = Any

_Timeout = Optional[float]


# -- enums: short lower-case names <-> proto numbers --------------------------------------------


def _enum_prefix(enum: Any) -> str:
    """`SCHEDULER_` of enum Scheduler, `MODEL_FAMILY_` of ModelFamily."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", enum.name).upper() + "_"


def enum_name(enum: Any, number: int) -> str:
    """`"ddim"` of SCHEDULER_DDIM; the number as text when this client does not know it."""
    v = enum.values_by_number.get(number)
    if v is None:
        return str(number)
    prefix = _enum_prefix(enum)
    return (v.name[len(prefix) :] if v.name.startswith(prefix) else v.name).lower()


_ALIASES = {"jpg": "jpeg", "dpm_solver++": "dpm_solver_pp", "dpmsolver++": "dpm_solver_pp"}


def enum_number(enum: Any, value: Union[str, int], field: str) -> int:
    """The number of `value`: a short name in any case (`"ddim"`, `"DPM-Solver++"`), a full
    proto name (`"SCHEDULER_DDIM"`), or the number itself."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        key = value.strip().lower().replace("-", "_").replace(" ", "_")
        key = _ALIASES.get(key, key)
        for name in (_enum_prefix(enum) + key.upper(), value.strip().upper()):
            v = enum.values_by_name.get(name)
            if v is not None:
                return v.number
    allowed = ", ".join(repr(enum_name(enum, v.number)) for v in enum.values if v.number != 0)
    raise InvalidArgument(
        f"invalid `{field}`: {value!r}; allowed: {allowed}",
        field=field,
        message=f"{value!r}; allowed: {allowed}",
    )


# -- inputs --------------------------------------------------------------------------------------


def _bad(field: str, message: str) -> InvalidArgument:
    """A client-side error in the server's format (nothing was sent)."""
    return InvalidArgument(f"invalid `{field}`: {message}", field=field, message=message)


def encode_image(value: Any, field: str) -> bytes:
    """The bytes to send of an input image: encoded bytes as they are, a PIL image as PNG, a
    path's file content."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, (str, os.PathLike)):
        try:
            return Path(value).read_bytes()
        except OSError as e:
            raise _bad(field, f"cannot read {value!s}: {e.strerror or e}") from e
    save = getattr(value, "save", None)
    if callable(save) and hasattr(value, "mode"):  # a PIL image
        buf = io.BytesIO()
        try:
            value.save(buf, format="PNG")
        except (OSError, ValueError):
            buf = io.BytesIO()
            value.convert("RGBA" if "A" in value.mode else "RGB").save(buf, format="PNG")
        return buf.getvalue()
    raise _bad(
        field,
        f"a {type(value).__name__}; allowed: a PIL image, encoded PNG/JPEG/WebP bytes or a path",
    )


def _set(msg: Any, name: str, value: Any, field: str) -> None:
    """`msg.name = value`, a bad value (negative, out of range, wrong type) named by field."""
    try:
        setattr(msg, name, value)
    except (TypeError, ValueError) as e:
        raise _bad(field, f"{value!r}; {e}") from None


def _set_list(container: Any, values: Iterable[Any], field: str) -> None:
    try:
        container.extend(values)
    except (TypeError, ValueError) as e:
        raise _bad(field, f"{values!r}; {e}") from None


def _margins(value: Any) -> Margins:
    if isinstance(value, Margins):
        return value
    if isinstance(value, Mapping):
        unknown = set(value) - {"left", "top", "right", "bottom"}
        if unknown:
            raise _bad(
                "outpaint", f"unknown margins {sorted(unknown)}; allowed: left, top, right, bottom"
            )
        return Margins(**value)
    if isinstance(value, Sequence) and len(value) == 4:
        return Margins(*value)
    raise _bad(
        "outpaint", f"{value!r}; allowed: Margins(...), a dict or (left, top, right, bottom)"
    )


def _fusion_item(i: int, item: Any) -> Any:
    if not isinstance(item, FusionItem):
        if isinstance(item, tuple) and len(item) == 2:
            item = FusionItem(item[0], item[1])
        else:
            item = FusionItem(item)
    pb = gateway_pb2.FusionItem()
    _set(pb, "weight", item.weight, f"fusion.items[{i}].weight")
    if isinstance(item.item, str):
        pb.text = item.item
    else:
        pb.image = encode_image(item.item, f"fusion.items[{i}].image")
    return pb


def _uint_list(value: Union[int, Sequence[int]]) -> List[int]:
    return [value] if isinstance(value, int) else list(value)


# -- outputs -------------------------------------------------------------------------------------


def _image(pb: Any, model: Optional[str]) -> GeneratedImage:
    return GeneratedImage(
        data=pb.image.data,
        format=enum_name(common_pb2.ImageFormat.DESCRIPTOR, pb.image.format),
        width=pb.image.width,
        height=pb.image.height,
        seed=pb.seed,
        index=pb.index,
        model=model,
    )


def _event(ev: Any) -> Optional[Event]:
    kind = ev.WhichOneof("event")
    if kind == "progress":
        p = ev.progress
        return Progress(
            stage=enum_name(gateway_pb2.Stage.DESCRIPTOR, p.stage),
            step=p.step,
            total_steps=p.total_steps,
        )
    if kind == "preview":
        return Preview(
            step=ev.preview.step, images=[decode_image(i.data) for i in ev.preview.images]
        )
    if kind == "image":
        return _image(ev.image, None)
    if kind == "done":
        return Done(model=ev.done.model)
    return None  # an event newer than this client


def _tasks(m: Any) -> Tuple[str, ...]:
    """The tasks a ModelDescription lists, as lower-case names (`text_to_image`, ...)."""
    return tuple(enum_name(gateway_pb2.TaskKind.DESCRIPTOR, v) for v in m.tasks)


def _model(m: Any) -> ModelDescription:
    return ModelDescription(
        name=m.name,
        family=enum_name(common_pb2.ModelFamily.DESCRIPTOR, m.family),
        is_default=m.is_default,
        distilled=m.distilled,
        default_steps=m.default_steps,
        default_timesteps=tuple(m.default_timesteps),
        tasks=_tasks(m),
        takes_hint=m.takes_hint,
        raw=m,
    )


# -- the client ----------------------------------------------------------------------------------


def _read_pem(value: Any) -> Optional[bytes]:
    if value is None or isinstance(value, bytes):
        return value
    return Path(value).read_bytes()


class Client:
    """A connection to a kandinsky-serve gateway.

    ``target``: ``host:port`` (``http://`` plaintext, ``https://`` TLS with the system roots
    also accepted). ``api_key``: sent as ``authorization: Bearer <key>``. ``tls``: ``None``
    (plaintext), ``True`` (TLS, system roots) or a :class:`TlsConfig`. ``timeout``: the default
    deadline of every call in seconds (``None``: none); a call's own ``timeout=`` wins.
    ``retries``: a :class:`RetryPolicy`, or a number of retries (0: none); the default policy
    retries UNAVAILABLE and overload up to 3 times. Use it as a context manager, or call
    :meth:`close`.
    """

    def __init__(
        self,
        target: str,
        api_key: Optional[str] = None,
        tls: Union[None, bool, TlsConfig] = None,
        timeout: _Timeout = None,
        *,
        retries: Union[int, RetryPolicy, None] = None,
        max_receive_message_bytes: int = DEFAULT_MAX_RECEIVE_BYTES,
        max_send_message_bytes: int = DEFAULT_MAX_SEND_BYTES,
        metadata: Sequence[Tuple[str, str]] = (),
        options: Sequence[Tuple[str, Any]] = (),
    ) -> None:
        target = target.strip().rstrip("/")
        scheme, sep, rest = target.partition("://")
        if sep:
            if scheme == "https":
                tls = True if tls is None or tls is False else tls
            elif scheme == "http":
                if tls:
                    raise ValueError(f"target {target!r} says http:// but tls= is set")
            else:
                raise ValueError(f"target {target!r}: allowed schemes are http:// and https://")
            target = rest
        self.target = target
        self.timeout = timeout
        self.retries = RetryPolicy.of(retries)
        md = list(metadata)
        if api_key is not None:
            if not api_key or any(c.isspace() for c in api_key):
                raise ValueError("api_key must be non-empty and hold no white space")
            md.append(("authorization", f"Bearer {api_key}"))
        self._metadata = tuple(md)
        opts: List[Tuple[str, Any]] = [
            ("grpc.max_receive_message_length", max_receive_message_bytes),
            ("grpc.max_send_message_length", max_send_message_bytes),
            ("grpc.primary_user_agent", "kandinsky-serve-python"),
        ]
        if tls:
            cfg = tls if isinstance(tls, TlsConfig) else TlsConfig()
            creds = grpc.ssl_channel_credentials(
                root_certificates=_read_pem(cfg.ca),
                private_key=_read_pem(cfg.key),
                certificate_chain=_read_pem(cfg.cert),
            )
            if cfg.server_name:
                opts.append(("grpc.ssl_target_name_override", cfg.server_name))
            self._channel = grpc.secure_channel(target, creds, options=opts + list(options))
        else:
            self._channel = grpc.insecure_channel(target, options=opts + list(options))
        self._stub = gateway_pb2_grpc.GatewayStub(self._channel)

    def __repr__(self) -> str:
        return f"Client({self.target!r})"

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Closes the channel (calls in flight are cancelled)."""
        self._channel.close()

    # -- calls -----------------------------------------------------------------------------------

    def _deadline(self, timeout: _Timeout) -> Optional[float]:
        t = self.timeout if timeout is None else timeout
        return None if t is None else time.monotonic() + t

    @staticmethod
    def _left(deadline: Optional[float], attempt: int, last: Optional[KandinskyError]) -> _Timeout:
        if deadline is None:
            return None
        left = deadline - time.monotonic()
        if left <= 0:
            if last is not None:
                raise last
            raise DeadlineExceeded(
                "the call's timeout passed before it was sent", attempts=attempt - 1
            )
        return left

    def _policy(self, retries: Union[int, RetryPolicy, None]) -> RetryPolicy:
        return self.retries if retries is None else RetryPolicy.of(retries)

    @staticmethod
    def _wait(
        policy: RetryPolicy, err: KandinskyError, attempt: int, deadline: Optional[float]
    ) -> bool:
        """Sleeps before the next try and says True, or says False when ``err`` is final."""
        if not policy.should_retry(err, attempt):
            return False
        delay = policy.backoff(attempt)
        if deadline is not None and time.monotonic() + delay >= deadline:
            return False
        time.sleep(delay)
        return True

    def _unary(self, method: Any, request: Any, timeout: _Timeout, retries: Any) -> Any:
        policy = self._policy(retries)
        deadline = self._deadline(timeout)
        attempt, last = 0, None
        while True:
            attempt += 1
            left = self._left(deadline, attempt, last)
            try:
                return method(request, timeout=left, metadata=self._metadata)
            except grpc.RpcError as e:
                last = from_rpc_error(e, attempt)
                if not self._wait(policy, last, attempt, deadline):
                    raise last from e

    def _stream(self, request: Any, timeout: _Timeout, retries: Any) -> Iterator[Event]:
        policy = self._policy(retries)
        deadline = self._deadline(timeout)
        attempt, last = 0, None
        while True:
            attempt += 1
            left = self._left(deadline, attempt, last)
            call = self._stub.GenerateStream(request, timeout=left, metadata=self._metadata)
            received = False
            try:
                for ev in call:
                    received = True
                    out = _event(ev)
                    if out is not None:
                        yield out
                return
            except grpc.RpcError as e:
                last = from_rpc_error(e, attempt)
                # Once an event arrived the work is under way: a retry would redo it silently.
                if received or not self._wait(policy, last, attempt, deadline):
                    raise last from e
            finally:
                call.cancel()  # a no-op once done; stops the server's work if the caller left

    def generate(
        self,
        prompt: str = "",
        *,
        model: Optional[str] = None,
        negative_prompt: Optional[str] = None,
        width: Optional[int] = None,
        height: Optional[int] = None,
        num_images: Optional[int] = None,
        seeds: Union[int, Sequence[int], None] = None,
        prior_steps: Optional[int] = None,
        prior_guidance: Optional[float] = None,
        steps: Optional[int] = None,
        guidance: Optional[float] = None,
        scheduler: Union[str, int, None] = None,
        timesteps: Optional[Sequence[int]] = None,
        quality: Union[str, int, None] = None,
        temperature: Optional[Sequence[float]] = None,
        aesthetic_score: Optional[float] = None,
        image: Optional[ImageInput] = None,
        strength: Optional[float] = None,
        mask: Optional[ImageInput] = None,
        outpaint: Union[Margins, Mapping[str, int], Sequence[int], None] = None,
        variation: Optional[ImageInput] = None,
        fusion: Optional[Sequence[Any]] = None,
        hint: Optional[ImageInput] = None,
        output_format: Union[str, int, None] = None,
        output_quality: Optional[int] = None,
        timeout: _Timeout = None,
        retries: Union[int, RetryPolicy, None] = None,
    ) -> List[GeneratedImage]:
        """Generates images and returns them when all are done, in request order.

        Every sampling argument left ``None`` is left unset in the request: the server's
        default applies (512x512, 1 image, random seeds, the ``quality`` preset's steps...).

        The task follows from the inputs: none (text-to-image); ``image`` (image-to-image,
        keeping ``1 - strength`` of it); ``image`` + ``mask`` (inpaint the white part of the
        mask); ``image`` + ``outpaint=Margins(...)`` (extend the canvas); ``variation=image``
        (variations of an image; no prompt needed); ``fusion=[("a text", 0.5), (image, 0.5)]``
        (weighted mix; the prompt is ignored); ``hint`` (a ControlNet depth hint, for
        text-to-image and image-to-image). Images are PIL images (sent as PNG), encoded bytes or
        file paths; in ``fusion`` a ``str`` is a text, so pass a ``pathlib.Path`` for a file.

        ``seeds``: one per image (a single int for one image); the same seed and parameters
        give the same bytes. ``scheduler``: ``"ddpm"``, ``"ddim"``, ``"dpm_solver_pp"``,
        ``"lcm"``, ``"tcd"``, and for Kandinsky 2.0 ``"plms"`` (there ``"ddpm"`` is the official
        p-sampler). ``quality``: ``"draft"``, ``"balanced"``, ``"best"``.
        ``output_format``: ``"png"`` (default), ``"jpeg"``, ``"webp"`` with ``output_quality``
        1..100. ``timeout``: seconds, the call's gRPC deadline. aMUSEd models only:
        ``temperature=(start, end)`` (the token sampling temperature of the first and last step,
        default ``(2, 0)``) and ``aesthetic_score`` (micro-conditioning, default 6).

        Raises a :class:`~kandinsky_serve.KandinskyError` subclass on failure, e.g.
        :class:`~kandinsky_serve.InvalidArgument` naming the field.
        """
        request = self._request(**_args(locals()))
        response = self._unary(self._stub.Generate, request, timeout, retries)
        return [_image(img, response.model) for img in response.images]

    def generate_stream(
        self,
        prompt: str = "",
        *,
        preview_every: Optional[int] = None,
        timeout: _Timeout = None,
        retries: Union[int, RetryPolicy, None] = None,
        **kwargs: Any,
    ) -> Iterator[Event]:
        """Like :meth:`generate`, but yields events as the work goes: :class:`Progress` (a
        stage started or advanced), :class:`Preview` (every ``preview_every`` decoder steps,
        when set), one :class:`GeneratedImage` per image, and :class:`Done` last.

        The request is checked when this is called; the call starts at the first ``next()``.
        Closing the iterator early (``break``, ``.close()``) cancels the call. A failed stream
        is retried (per ``retries``) only until its first event.
        """
        unknown = set(kwargs) - set(_GENERATE_ARGS)
        if unknown:
            raise TypeError(f"generate_stream() got unexpected keyword arguments {sorted(unknown)}")
        request = self._request(prompt=prompt, **kwargs)
        if preview_every is not None:
            _set(request, "preview_every", preview_every, "preview_every")
        return self._stream(request, timeout, retries)

    def list_models(
        self, *, timeout: _Timeout = None, retries: Union[int, RetryPolicy, None] = None
    ) -> List[ModelDescription]:
        """The models this deployment serves (``is_default`` marks the one a request without
        ``model`` gets)."""
        response = self._unary(
            self._stub.ListModels, gateway_pb2.ListModelsRequest(), timeout, retries
        )
        return [_model(m) for m in response.models]

    # -- the request -----------------------------------------------------------------------------

    @staticmethod
    def _request(
        prompt: str = "",
        model: Optional[str] = None,
        negative_prompt: Optional[str] = None,
        width: Optional[int] = None,
        height: Optional[int] = None,
        num_images: Optional[int] = None,
        seeds: Union[int, Sequence[int], None] = None,
        prior_steps: Optional[int] = None,
        prior_guidance: Optional[float] = None,
        steps: Optional[int] = None,
        guidance: Optional[float] = None,
        scheduler: Union[str, int, None] = None,
        timesteps: Optional[Sequence[int]] = None,
        quality: Union[str, int, None] = None,
        temperature: Optional[Sequence[float]] = None,
        aesthetic_score: Optional[float] = None,
        image: Optional[ImageInput] = None,
        strength: Optional[float] = None,
        mask: Optional[ImageInput] = None,
        outpaint: Any = None,
        variation: Optional[ImageInput] = None,
        fusion: Optional[Sequence[Any]] = None,
        hint: Optional[ImageInput] = None,
        output_format: Union[str, int, None] = None,
        output_quality: Optional[int] = None,
    ) -> Any:
        req = gateway_pb2.GenerateRequest()
        _set(req, "prompt", prompt, "prompt")
        if model is not None:
            _set(req, "model", model, "model")
        if negative_prompt is not None:
            _set(req, "negative_prompt", negative_prompt, "negative_prompt")
        for name, value in (("width", width), ("height", height), ("num_images", num_images)):
            if value is not None:
                _set(req, name, value, name)
        if seeds is not None:
            _set_list(req.seeds, _uint_list(seeds), "seeds")
        if prior_steps is not None:
            _set(req.prior, "num_inference_steps", prior_steps, "prior.num_inference_steps")
        if prior_guidance is not None:
            _set(req.prior, "guidance_scale", prior_guidance, "prior.guidance_scale")
        if steps is not None:
            _set(req.decoder, "num_inference_steps", steps, "decoder.num_inference_steps")
        if guidance is not None:
            _set(req.decoder, "guidance_scale", guidance, "decoder.guidance_scale")
        if scheduler is not None:
            req.decoder.scheduler = enum_number(
                common_pb2.Scheduler.DESCRIPTOR, scheduler, "decoder.scheduler"
            )
        if timesteps is not None:
            _set_list(req.decoder.timesteps, list(timesteps), "decoder.timesteps")
        if quality is not None:
            req.quality = enum_number(gateway_pb2.Quality.DESCRIPTOR, quality, "quality")
        if temperature is not None:
            pair = list(temperature)
            if len(pair) != 2:
                raise _bad(
                    "decoder.masked_tokens.temperature_start",
                    f"{temperature!r}; allowed: a (start, end) pair",
                )
            masked = req.decoder.masked_tokens
            _set(masked, "temperature_start", pair[0], "decoder.masked_tokens.temperature_start")
            _set(masked, "temperature_end", pair[1], "decoder.masked_tokens.temperature_end")
        if aesthetic_score is not None:
            _set(
                req.decoder.masked_tokens,
                "aesthetic_score",
                aesthetic_score,
                "decoder.masked_tokens.aesthetic_score",
            )
        if output_format is not None:
            req.output.format = enum_number(
                common_pb2.ImageFormat.DESCRIPTOR, output_format, "output.format"
            )
        if output_quality is not None:
            _set(req.output, "quality", output_quality, "output.quality")
        _task(req, image, strength, mask, outpaint, variation, fusion, hint)
        return req


#: The request arguments `generate` and `generate_stream` share (those of `Client._request`).
_GENERATE_ARGS = Client._request.__code__.co_varnames[: Client._request.__code__.co_argcount]


def _args(local: Mapping[str, Any]) -> Mapping[str, Any]:
    """The request arguments among `generate`'s locals."""
    return {k: local[k] for k in _GENERATE_ARGS}


def _task(
    req: Any,
    image: Any,
    strength: Optional[float],
    mask: Any,
    outpaint: Any,
    variation: Any,
    fusion: Any,
    hint: Any,
) -> None:
    """Sets the request's task from the inputs given (see Client.generate)."""
    given = [
        n
        for n, v in (
            ("mask", mask),
            ("outpaint", outpaint),
            ("variation", variation),
            ("fusion", fusion),
        )
        if v is not None
    ]
    if len(given) > 1:
        raise _bad(given[1], f"{given[0]}= and {given[1]}= are different tasks; give one")
    task = given[0] if given else ("image_to_image" if image is not None else "text_to_image")
    if task in ("variation", "fusion") and image is not None:
        raise _bad("image", f"{task}= takes its own images; leave image= unset")
    if task in ("mask", "outpaint") and image is None:
        raise _bad(
            "image", f"{task}= needs the image= to {'inpaint' if task == 'mask' else 'outpaint'}"
        )
    if strength is not None and task != "image_to_image":
        raise _bad("strength", "applies to image-to-image only (image= without mask=/outpaint=)")
    if hint is not None and task not in ("text_to_image", "image_to_image"):
        raise _bad("hint", "a ControlNet hint applies to text-to-image and image-to-image only")

    if task == "text_to_image":
        target = req.text_to_image
        target.SetInParent()
    elif task == "image_to_image":
        target = req.image_to_image
        target.image = encode_image(image, "image_to_image.image")
        if strength is not None:
            _set(target, "strength", strength, "image_to_image.strength")
    elif task == "mask":
        req.inpaint.image = encode_image(image, "inpaint.image")
        req.inpaint.mask = encode_image(mask, "inpaint.mask")
    elif task == "outpaint":
        m = _margins(outpaint)
        req.outpaint.image = encode_image(image, "outpaint.image")
        for side in ("left", "top", "right", "bottom"):
            _set(req.outpaint, side, getattr(m, side), f"outpaint.{side}")
    elif task == "variation":
        req.variation.image = encode_image(variation, "variation.image")
    elif task == "fusion":
        if isinstance(fusion, (str, bytes)) or not isinstance(fusion, Sequence):
            raise _bad("fusion.items", "a list of items: texts, images or (item, weight) pairs")
        req.fusion.items.extend(_fusion_item(i, it) for i, it in enumerate(fusion))
    if hint is not None:
        target.hint = encode_image(hint, f"{task}.hint")
