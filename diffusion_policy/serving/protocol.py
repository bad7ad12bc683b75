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
     (B, Ta, Da). Every key must use the same form. Latency-aware planning (issue 14) adds, all
     optional: "prefix": (P, Da) or (B, P, Da) float, the executing plan's actions from the newest
     observation's tick on; "delay": int d (0 <= d <= P, d < horizon - n_obs_steps), the actions
     that execute before this chunk arrives; "guidance": "none" | "rtc" | "bid" (the metadata's
     "guidances" says which this policy supports); "n_samples": int, bid's candidates per row.
  3. server -> client: reply {"actions", "action_pred", "infer_ms", "server_ms", "batch_size",
     "request_id"?} or a text frame "error: <reason>". Requests on one connection are answered in
     order, one at a time.

This module imports numpy and msgpack only: the client and robot code depend on it.
"""

from __future__ import annotations

import functools
import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
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
    # a connection that sent a request this recently may send another soon: only such connections
    # hold a batch open (idle ones never make the others wait)
    active_window_s: float = 2.0
    drain_timeout_s: float = (
        60.0  # a stop answers queued and running requests for at most this long
    )
    auth_free_tries: int = 5  # wrong tokens from one address before it must back off
    auth_backoff_s: float = 1.0  # then 1, 2, 4 ... s (at most 60) between tries, else HTTP 429
    tls_cert: str | None = None  # PEM certificate chain: serve wss:// (with tls_key)
    tls_key: str | None = None


PROTOCOL_VERSION = 1
# A request is a few keys whose arrays travel as raw bytes: about 100 msgpack objects. The server
# refuses frames of more, so a small frame of many tiny objects cannot cost seconds or gigabytes.
MAX_REQUEST_OBJECTS = 4096
MAX_ERROR_CHARS = 500  # error texts never echo unbounded input
# Keys in a request that are not observations.
RESERVED_KEYS = ("request_id", "seed", "prefix", "delay", "guidance", "n_samples")
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


class _ObjectBudget:
    """msgpack hooks that count the objects decoded so far and stop the decode past a limit."""

    def __init__(self, limit: int):
        self.limit = limit
        self.left = limit

    def _spend(self, n: int) -> None:
        self.left -= n
        if self.left < 0:
            raise ProtocolError(f"frame holds more than {self.limit} msgpack objects")

    def map(self, obj: dict) -> Any:
        self._spend(2 * len(obj))
        return _decode(obj)

    def list(self, obj: list) -> list:
        self._spend(len(obj))
        return obj


def unpackb(data: bytes, max_objects: int | None = None) -> Any:
    """Decode msgpack bytes; raises ProtocolError (one line) on anything malformed or refused.

    `max_objects` bounds the objects (map keys and values, array items) the frame may hold; the
    decode stops as soon as it is exceeded, before building the rest.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ProtocolError(f"expected a binary frame, got {type(data).__name__}")
    hooks: dict[str, Any] = {"object_hook": _decode}
    if max_objects is not None:
        budget = _ObjectBudget(max_objects)
        hooks = dict(
            object_hook=budget.map,
            list_hook=budget.list,
            max_array_len=max_objects,
            max_map_len=max_objects // 2,
        )
    try:
        return msgpack.unpackb(data, ext_hook=_refuse_ext, raw=False, strict_map_key=True, **hooks)
    except ProtocolError:
        raise
    except msgpack.ExtraData:
        raise ProtocolError("frame holds trailing bytes after one msgpack message") from None
    except ValueError as e:
        if max_objects is not None and "exceeds max_" in str(e):  # a container's declared length
            raise ProtocolError(f"frame holds more than {max_objects} msgpack objects") from None
        raise ProtocolError(f"frame is not valid msgpack: ValueError: {e}") from None
    except Exception as e:  # msgpack raises several types for malformed input
        raise ProtocolError(f"frame is not valid msgpack: {type(e).__name__}: {e}") from None


def shorten(text: str, limit: int = MAX_ERROR_CHARS) -> str:
    """`text` cut to `limit` characters, saying how much was left out."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text) - limit} more characters)"


def error_text(reason: str) -> str:
    """The text frame for an error: one bounded line, so logs and the openpi client show it whole."""
    line = " ".join(shorten(str(reason), 4 * MAX_ERROR_CHARS).split())
    line = shorten(line)
    return line if line.startswith("error:") else f"error: {line}"


def checkpoint_digest(checkpoint_dir: str | Path) -> str:
    """sha256 of a checkpoint's weights (model.safetensors): the identity a server announces and
    `dp eval --server` compares against its own checkpoint (cached while the file is unchanged)."""
    file = Path(checkpoint_dir).resolve() / "model.safetensors"
    st = file.stat()
    return _file_sha256(str(file), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=8)
def _file_sha256(path: str, mtime_ns: int, size: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
