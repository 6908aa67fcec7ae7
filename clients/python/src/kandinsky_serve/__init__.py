"""Python client of kandinsky-serve: Kandinsky text-to-image over gRPC.

from kandinsky_serve import Client

with Client("localhost:50051") as kd:
    [img] = kd.generate("a red cat, 4k photo", width=512, height=512, seeds=42)
    img.image.save("cat.png")
"""

from .client import Client
from .errors import (
    Cancelled,
    DeadlineExceeded,
    InternalError,
    InvalidArgument,
    KandinskyError,
    Overloaded,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    Unimplemented,
)
from .types import (
    Done,
    Event,
    FusionItem,
    GeneratedImage,
    ImageResult,
    Margins,
    ModelDescription,
    Preview,
    Progress,
    RetryPolicy,
    TlsConfig,
)

try:
    from importlib.metadata import PackageNotFoundError, version

    __version__ = version("kandinsky_serve")
except PackageNotFoundError:  # pragma: no cover
    __version__ = "0+unknown"

__all__ = [
    "Client",
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
    "KandinskyError",
    "InvalidArgument",
    "Unauthenticated",
    "PermissionDenied",
    "Unavailable",
    "ResourceExhausted",
    "Overloaded",
    "DeadlineExceeded",
    "Cancelled",
    "Unimplemented",
    "InternalError",
]
