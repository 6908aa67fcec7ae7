"""Typed errors: every failed call raises a subclass of :class:`KandinskyError`.

The gRPC status code decides the class; the server's message is kept whole in ``str(e)`` and
``e.details``. An INVALID_ARGUMENT from kandinsky-serve reads ``invalid `field`: explanation``;
:class:`InvalidArgument` carries that field (``e.field``) and the explanation (``e.message``),
taken from a ``google.rpc.BadRequest`` status detail when the server sends one.
"""

from __future__ import annotations

import re
from typing import Any, List, Optional, Sequence, Tuple

import grpc

__all__ = [
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
    "from_rpc_error",
]


class KandinskyError(Exception):
    """A failed call. ``code`` is the gRPC status code, ``details`` the server's whole message
    (also ``str(e)``), ``message`` the same (for :class:`InvalidArgument`: the explanation after
    the field name), ``attempts`` how many times the call was tried (see
    :class:`kandinsky_serve.RetryPolicy`)."""

    #: The status code a class stands for (also for errors the client raises itself).
    default_code: Optional[grpc.StatusCode] = None

    def __init__(
        self,
        message: str,
        *,
        code: Optional[grpc.StatusCode] = None,
        attempts: int = 1,
        details: Optional[str] = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.details = details if details is not None else message
        self.code = code if code is not None else self.default_code
        self.attempts = attempts

    def __str__(self) -> str:
        text = self.details
        if self.attempts > 1:
            text += f" (after {self.attempts} attempts)"
        return text

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.details!r})"


class InvalidArgument(KandinskyError, ValueError):
    """The request is wrong (INVALID_ARGUMENT); retrying the same request fails the same way.

    ``field`` is the request field the server named (e.g. ``"width"``,
    ``"image_to_image.strength"``, ``"fusion.items[1].weight"``) or ``None``; ``message`` says
    what is wrong and what is allowed (``str(e)`` is the server's whole message);
    ``violations`` lists every ``(field, description)`` a ``google.rpc.BadRequest`` detail
    reported."""

    default_code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(
        self,
        details: str,
        *,
        field: Optional[str] = None,
        message: Optional[str] = None,
        violations: Sequence[Tuple[str, str]] = (),
        code: Optional[grpc.StatusCode] = None,
        attempts: int = 1,
    ) -> None:
        self.violations: List[Tuple[str, str]] = list(violations)
        if field is None and message is None:
            if self.violations:
                field, message = self.violations[0]
            else:
                field, message = parse_invalid(details)
        super().__init__(
            message if message is not None else details,
            code=code,
            attempts=attempts,
            details=details,
        )
        self.field = field


class Unauthenticated(KandinskyError):
    """A missing or wrong API key (UNAUTHENTICATED)."""

    default_code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(KandinskyError):
    """PERMISSION_DENIED."""

    default_code = grpc.StatusCode.PERMISSION_DENIED


class Unavailable(KandinskyError):
    """The gateway (or a stage behind it) cannot be reached or is not ready (UNAVAILABLE).
    Retried by default."""

    default_code = grpc.StatusCode.UNAVAILABLE


class ResourceExhausted(KandinskyError):
    """RESOURCE_EXHAUSTED other than overload: a message over the size limit of the client or
    the server. Not retried (the same message is as large next time)."""

    default_code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Overloaded(ResourceExhausted):
    """The server's admission queue is full (RESOURCE_EXHAUSTED ``overloaded: ...``). Retried
    by default, with back-off."""


class DeadlineExceeded(KandinskyError):
    """The call's ``timeout`` passed (DEADLINE_EXCEEDED), or the server refused the request at
    once because its work would not finish in the time left. Never retried."""

    default_code = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(KandinskyError):
    """The call was cancelled (CANCELLED)."""

    default_code = grpc.StatusCode.CANCELLED


class Unimplemented(KandinskyError):
    """The server (or the protos this client was built from) does not offer this feature
    (UNIMPLEMENTED)."""

    default_code = grpc.StatusCode.UNIMPLEMENTED


class InternalError(KandinskyError):
    """A server bug or an unexpected model failure (INTERNAL, UNKNOWN, DATA_LOSS, ...)."""

    default_code = grpc.StatusCode.INTERNAL


_BY_CODE = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgument,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.CANCELLED: Cancelled,
    grpc.StatusCode.UNIMPLEMENTED: Unimplemented,
    grpc.StatusCode.INTERNAL: InternalError,
    grpc.StatusCode.UNKNOWN: InternalError,
    grpc.StatusCode.DATA_LOSS: InternalError,
}

_INVALID = re.compile(r"^invalid `(?P<field>[^`]*)`: (?P<description>.*)$", re.S)


def parse_invalid(message: str) -> Tuple[Optional[str], Optional[str]]:
    """``("width", "100; allowed: ...")`` of ``"invalid `width`: 100; allowed: ..."``;
    ``(None, None)`` when the message does not name a field."""
    m = _INVALID.match(message.strip())
    if not m:
        return None, None
    return m.group("field") or None, m.group("description")


def is_overload(message: str) -> bool:
    """Whether a RESOURCE_EXHAUSTED message is the server's admission refusal (kandinsky-serve
    prefixes it with ``overloaded:``), not a message-size limit."""
    return message.lstrip().lower().startswith("overloaded")


def error_class(code: Optional[grpc.StatusCode], message: str) -> type:
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return Overloaded if is_overload(message) else ResourceExhausted
    if code == grpc.StatusCode.OUT_OF_RANGE and "message length too large" in message:
        return ResourceExhausted  # tonic's message-size limit
    return _BY_CODE.get(code, KandinskyError)


def from_rpc_error(e: grpc.RpcError, attempts: int = 1) -> KandinskyError:
    """The typed error of a failed call."""
    code = e.code() if hasattr(e, "code") else None
    message = (e.details() if hasattr(e, "details") else None) or str(e)
    cls = error_class(code, message)
    if cls is InvalidArgument:
        err: KandinskyError = InvalidArgument(
            message, violations=_bad_request_violations(e), code=code, attempts=attempts
        )
    else:
        err = cls(message, code=code, attempts=attempts)
    err.__cause__ = e
    return err


# -- google.rpc.Status details, read without extra dependencies --------------------------------
#
# A server may attach a google.rpc.Status (trailer `grpc-status-details-bin`) whose details hold
# a google.rpc.BadRequest: field_violations { field = 1; description = 2 }. The few fields needed
# are decoded straight from the protobuf wire format.

_BAD_REQUEST = "type.googleapis.com/google.rpc.BadRequest"


def _varint(buf: bytes, i: int) -> Tuple[int, int]:
    shift = result = 0
    while True:
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, i
        shift += 7


def _fields(buf: bytes):
    """(field number, value) of each field of a message; length-delimited values as bytes."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 1:
            value, i = buf[i : i + 8], i + 8
        elif wire == 2:
            n, i = _varint(buf, i)
            value, i = buf[i : i + n], i + n
        elif wire == 5:
            value, i = buf[i : i + 4], i + 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        yield number, value


def _bad_request_violations(e: grpc.RpcError) -> List[Tuple[str, str]]:
    try:
        trailers = e.trailing_metadata() or ()
    except Exception:
        return []
    return bad_request_violations(trailers)


def bad_request_violations(trailers: Sequence[Tuple[str, Any]]) -> List[Tuple[str, str]]:
    """Every ``(field, description)`` of the google.rpc.BadRequest details in the
    ``grpc-status-details-bin`` trailer, if any."""
    out: List[Tuple[str, str]] = []
    for key, value in trailers:
        if key != "grpc-status-details-bin" or not isinstance(value, bytes):
            continue
        try:
            for number, detail in _fields(value):
                if number != 3:  # Status.details (repeated Any)
                    continue
                any_fields = dict(_fields(detail))
                if bytes(any_fields.get(1, b"")).decode() != _BAD_REQUEST:
                    continue
                for vnum, violation in _fields(any_fields.get(2, b"")):
                    if vnum != 1:  # BadRequest.field_violations
                        continue
                    v = dict(_fields(violation))
                    out.append((bytes(v.get(1, b"")).decode(), bytes(v.get(2, b"")).decode()))
        except (ValueError, IndexError, TypeError, UnicodeDecodeError):
            continue
    return out
