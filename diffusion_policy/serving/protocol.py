"""The wire format shared by our server, our client and the unmodified openpi client.

A websocket carries binary frames of msgpack; numpy values travel as maps (SERVER_PROTOCOL.md):

    ndarray: {b"__ndarray__": True, b"data": raw bytes, b"dtype": dtype.str, b"shape": [...]}
    scalar:  {b"__npgeneric__": True, b"data": python value, b"dtype": dtype.str}

Object, void and complex dtypes are refused both ways, and nothing is ever pickled, so a frame
from an untrusted peer can at worst fail to parse. A text frame is an error: one line of reason.

Session (one connection):
  1. server -> client: metadata (binary), see `PROTOCOL_VERSION` and `server.PolicyServer.metadata`.
  2. client -> server: request {obs_key: array, ..., "request_id"?: str | int, "seed"?: int}.
     One robot sends (To, ...) per key and gets actions (Ta, Da); a batch sends (B, To, ...) and gets
     (B, Ta, Da). Every key must use the same form.
  3. server -> client: reply {"actions", "action_pred", "infer_ms", "server_ms", "batch_size",
     "request_id"?} or a text frame "error: <reason>". Requests on one connection are answered in
     order, one at a time.

This module imports numpy and msgpack only: the client and robot code depend on it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np

DEFAULT_MAX_MESSAGE_BYTES = 16 * 2**20  # a batch of 32 requests of two 96x96 RGB frames is 1.8 MB


@dataclass
class ServeConfig:
    """Transport settings; the policy's own settings come from its checkpoint."""

    host: str = "127.0.0.1"
    port: int = 8000  # 0 = any free port (tests)
    token: str | None = None  # required as `Authorization: Api-Key <token>` when set
    max_batch: int = 32  # rows per forward pass
    batch_wait_ms: float = 2.0  # longest wait for more requests once one is queued
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    warmup: bool = True
    seed: int = 0  # the server generator, for requests without a seed


PROTOCOL_VERSION = 1
# Keys in a request that are not observations.
RESERVED_KEYS = ("request_id", "seed")
_REFUSED_KINDS = ("O", "V", "c")  # object, void (records, raw), complex
_MAX_NDIM = 32


class ProtocolError(ValueError):
    """A frame that is not valid msgpack-numpy, or a value that may not travel on the wire."""


def _check_dtype(dtype: np.dtype) -> None:
    if dtype.kind in _REFUSED_KINDS or dtype.fields is not None or dtype.subdtype is not None:
        raise ProtocolError(
            f"dtype {dtype.str!r} is not allowed (object, void and complex are refused)"
        )


def _encode(obj: Any) -> Any:
    """msgpack `default` hook: numpy arrays and scalars to their marker maps; anything else refused."""
    if isinstance(obj, np.ndarray):
        _check_dtype(obj.dtype)
        return {
            b"__ndarray__": True,
            b"data": np.ascontiguousarray(obj).tobytes(),
            b"dtype": obj.dtype.str,
            b"shape": list(obj.shape),
        }
    if isinstance(obj, np.generic):
        _check_dtype(obj.dtype)
        return {b"__npgeneric__": True, b"data": obj.item(), b"dtype": obj.dtype.str}
    raise TypeError(
        f"cannot send a value of type {type(obj).__name__} (use numpy arrays or scalars)"
    )


def _field(obj: dict, name: str) -> Any:
    """Marker maps use bytes keys (openpi); str keys are accepted from other implementations."""
    if name.encode() in obj:
        return obj[name.encode()]
    if name in obj:
        return obj[name]
    raise ProtocolError(f"numpy marker map lacks its {name!r} field")


def _parse_dtype(raw: Any) -> np.dtype:
    if isinstance(raw, bytes):
        raw = raw.decode("ascii", errors="replace")
    if not isinstance(raw, str):
        raise ProtocolError(f"dtype must be a string, got {type(raw).__name__}")
    try:
        dtype = np.dtype(raw)
    except TypeError:
        raise ProtocolError(f"unknown dtype {raw!r}") from None
    try:
        _check_dtype(dtype)
    except ProtocolError:
        raise ProtocolError(
            f"dtype {raw!r} is not allowed (object, void and complex are refused)"
        ) from None
    return dtype


def _decode(obj: dict) -> Any:
    """msgpack `object_hook`: marker maps back to numpy, checked before numpy sees the bytes."""
    if b"__ndarray__" in obj or "__ndarray__" in obj:
        dtype = _parse_dtype(_field(obj, "dtype"))
        shape = _field(obj, "shape")
        data = _field(obj, "data")
        if not isinstance(shape, list | tuple) or len(shape) > _MAX_NDIM:
            raise ProtocolError(f"ndarray shape must be a list of at most {_MAX_NDIM} ints")
        if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape):
            raise ProtocolError(f"ndarray shape {shape!r} must hold non-negative ints")
        if not isinstance(data, bytes):
            raise ProtocolError("ndarray data must be raw bytes")
        if len(data) != math.prod(shape) * dtype.itemsize:
            raise ProtocolError(
                f"ndarray data has {len(data)} bytes, but shape {list(shape)} of {dtype.str} needs "
                f"{math.prod(shape) * dtype.itemsize}"
            )
        return np.frombuffer(data, dtype=dtype).reshape(shape)
    if b"__npgeneric__" in obj or "__npgeneric__" in obj:
        dtype = _parse_dtype(_field(obj, "dtype"))
        try:
            return dtype.type(_field(obj, "data"))
        except (TypeError, ValueError, OverflowError) as e:
            raise ProtocolError(f"bad numpy scalar of dtype {dtype.str}: {e}") from None
    return obj


def _refuse_ext(code: int, data: bytes) -> Any:
    raise ProtocolError(f"msgpack extension type {code} is not allowed")


def packb(obj: Any) -> bytes:
    """Encode a message (dicts, lists, str, numbers, numpy arrays and scalars) to msgpack bytes."""
    try:
        return msgpack.packb(obj, default=_encode, use_bin_type=True)
    except ProtocolError:
        raise
    except (TypeError, ValueError, OverflowError) as e:
        raise ProtocolError(f"cannot encode message: {e}") from None


def unpackb(data: bytes) -> Any:
    """Decode msgpack bytes; raises ProtocolError (one line) on anything malformed or refused."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ProtocolError(f"expected a binary frame, got {type(data).__name__}")
    try:
        return msgpack.unpackb(
            data, object_hook=_decode, ext_hook=_refuse_ext, raw=False, strict_map_key=True
        )
    except ProtocolError:
        raise
    except msgpack.ExtraData:
        raise ProtocolError("frame holds trailing bytes after one msgpack message") from None
    except Exception as e:  # msgpack raises several types for malformed input
        raise ProtocolError(f"frame is not valid msgpack: {type(e).__name__}: {e}") from None


def error_text(reason: str) -> str:
    """The text frame for an error: one line, so logs and the openpi client show it whole."""
    line = " ".join(str(reason).split())
    return line if line.startswith("error:") else f"error: {line}"
