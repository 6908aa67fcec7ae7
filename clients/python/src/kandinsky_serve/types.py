"""The client's value types: results, stream events, model descriptions and call settings."""

from __future__ import annotations

import io
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, List, Optional, Tuple, Type, Union

from .errors import KandinskyError, Overloaded, Unavailable

if TYPE_CHECKING:  # Pillow is imported lazily (only when an image is decoded or encoded)
    from PIL import Image as PILImage

__all__ = [
    "GeneratedImage",
    "ImageResult",
    "Progress",
    "Preview",
    "Done",
    "Event",
    "ModelDescription",
    "Margins",
    "FusionItem",
    "TlsConfig",
    "RetryPolicy",
]


def decode_image(data: bytes) -> "PILImage.Image":
    """A PIL image of encoded bytes, fully loaded."""
    from PIL import Image

    im = Image.open(io.BytesIO(data))
    im.load()
    return im


@dataclass
class GeneratedImage:
    """One generated image: the encoded bytes as the server sent them (``data``, in
    ``format``), the seed that made it (the same seed and parameters give the same bytes), its
    index within the request and the model that served it (``None`` in a stream, where
    :class:`Done` names the model)."""

    data: bytes = field(repr=False)
    format: str
    width: int
    height: int
    seed: int
    index: int
    model: Optional[str] = None
    _image: Any = field(default=None, init=False, repr=False, compare=False)

    @property
    def image(self) -> "PILImage.Image":
        """The image, decoded with Pillow (once)."""
        if self._image is None:
            self._image = decode_image(self.data)
        return self._image

    def save(self, path: Union[str, "os.PathLike[str]"]) -> None:
        """Writes the encoded bytes as served (no re-encoding; name the file after
        ``format``)."""
        Path(path).write_bytes(self.data)


#: The name the stream's image event also goes by.
ImageResult = GeneratedImage


@dataclass(frozen=True)
class Progress:
    """A stage started or advanced: ``stage`` is ``"queued"``, ``"text_encoder"``,
    ``"prior"``, ``"denoiser"`` or ``"movq"``; ``step`` of ``total_steps`` (0 of 0 for stages
    without steps)."""

    stage: str
    step: int
    total_steps: int


@dataclass
class Preview:
    """Low-resolution previews after decoder step ``step``, one per requested image (only
    when ``preview_every`` is set)."""

    step: int
    images: List["PILImage.Image"] = field(repr=False)


@dataclass(frozen=True)
class Done:
    """The last event of a stream: every image was sent; ``model`` served the request."""

    model: str


Event = Union[Progress, Preview, GeneratedImage, Done]


@dataclass(frozen=True)
class ModelDescription:
    """A model the deployment serves (``Client.list_models``).

    ``family`` is e.g. ``"kandinsky_2_2"``; ``distilled`` marks a few-step student (no
    classifier-free guidance); the decoder schedule of the default quality is
    ``default_timesteps`` when not empty, else ``default_steps`` steps. ``tasks`` lists what
    the model can do (``"text_to_image"``, ``"inpaint"``, ...). ``takes_hint``: a ControlNet
    model, whose text-to-image and image-to-image requests need a ``hint``. ``raw`` is the
    protobuf message."""

    name: str
    family: str
    is_default: bool
    distilled: bool
    default_steps: int
    default_timesteps: Tuple[int, ...]
    tasks: Tuple[str, ...] = ()
    takes_hint: bool = False
    raw: Any = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class Margins:
    """Outpaint margins in pixels: the canvas grows by these on each side."""

    left: int = 0
    top: int = 0
    right: int = 0
    bottom: int = 0


@dataclass(frozen=True)
class FusionItem:
    """One weighted input of a fusion: a text or an image (PIL image, encoded bytes, or a
    ``pathlib.Path``)."""

    item: Any
    weight: float = 1.0


@dataclass(frozen=True)
class TlsConfig:
    """TLS to the gateway. ``ca``: PEM CA certificates (a path or the bytes) the server's
    certificate must chain to (``None``: the system roots); ``server_name``: the name to
    verify the certificate against, when it differs from the target's host; ``cert`` and
    ``key``: a client certificate and its key (paths or PEM bytes) for mutual TLS."""

    ca: Union[str, "os.PathLike[str]", bytes, None] = None
    server_name: Optional[str] = None
    cert: Union[str, "os.PathLike[str]", bytes, None] = None
    key: Union[str, "os.PathLike[str]", bytes, None] = None


@dataclass(frozen=True)
class RetryPolicy:
    """Which failures are tried again, how often and how long apart.

    Only calls without side effects are retried, and only on failures that say nothing
    happened: UNAVAILABLE (the gateway or a stage cannot be reached) and RESOURCE_EXHAUSTED
    ``overloaded`` (the server's queue is full). Wrong requests, a missing key, a passed
    deadline, a cancelled call or a server bug are never retried. A stream is retried only
    until its first event arrives. ``max_attempts`` counts the first try; attempt ``n`` (from
    1) waits ``min(max_backoff, initial_backoff * multiplier ** (n - 1))`` seconds, less up
    to ``jitter`` of it at random, before the next one; no wait outlasts the call's timeout
    (the last error is raised instead)."""

    max_attempts: int = 4
    initial_backoff: float = 0.25
    max_backoff: float = 4.0
    multiplier: float = 2.0
    jitter: float = 0.2
    retry_on: Tuple[Type[KandinskyError], ...] = (Unavailable, Overloaded)

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")
        if self.initial_backoff < 0 or self.max_backoff < 0 or self.multiplier < 1:
            raise ValueError("backoffs must be >= 0 and multiplier >= 1")
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"jitter must be in [0, 1], got {self.jitter}")

    @classmethod
    def none(cls) -> "RetryPolicy":
        """One attempt: every failure is raised at once."""
        return cls(max_attempts=1)

    @classmethod
    def of(cls, retries: Union[int, "RetryPolicy", None]) -> "RetryPolicy":
        """A policy of ``retries``: a policy as is, a number of retries after the first try
        (0 or ``False``: none), ``None``: the default policy."""
        if retries is None:
            return cls()
        if isinstance(retries, RetryPolicy):
            return retries
        if retries is False:
            return cls.none()
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ValueError(f"retries: a RetryPolicy or a number >= 0, got {retries!r}")
        return cls(max_attempts=retries + 1)

    def should_retry(self, error: KandinskyError, attempt: int) -> bool:
        """Whether ``error`` of try ``attempt`` (from 1) is tried again."""
        return attempt < self.max_attempts and isinstance(error, self.retry_on)

    def backoff(self, attempt: int) -> float:
        """Seconds to wait after try ``attempt`` (from 1) failed."""
        b = min(self.max_backoff, self.initial_backoff * self.multiplier ** (attempt - 1))
        return b * (1 - self.jitter * random.random())
