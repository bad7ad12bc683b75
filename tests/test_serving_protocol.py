"""The msgpack-numpy wire format: round trips, the openpi marker maps, and refusals."""

from __future__ import annotations

import pickle

import msgpack
import numpy as np
import pytest

from diffusion_policy.serving.protocol import ProtocolError, error_text, packb, unpackb


@pytest.mark.parametrize(
    "dtype", ["<f4", "<f8", "<f2", "|u1", "<i4", "<i8", "<u2", "|b1", ">f4", "<U3"]
)
def test_array_round_trip_keeps_dtype_shape_and_values(dtype: str) -> None:
    rng = np.random.default_rng(0)
    if dtype == "<U3":
        x = np.array([["abc", "d"], ["", "xyz"]], dtype=dtype)
    else:
        x = (rng.uniform(0, 100, (2, 3, 4))).astype(dtype)
    y = unpackb(packb({"x": x}))["x"]
    assert y.dtype == x.dtype and y.shape == x.shape
    np.testing.assert_array_equal(y, x)


def test_scalars_empty_and_noncontiguous_arrays() -> None:
    x = np.arange(24, dtype=np.float32).reshape(4, 6)[:, ::2]  # not contiguous
    msg = {
        "a": x,
        "s": np.float32(1.5),
        "i": np.int64(-3),
        "e": np.zeros((0, 3)),
        "n": 7,
        "t": "hi",
    }
    out = unpackb(packb(msg))
    np.testing.assert_array_equal(out["a"], x)
    assert out["s"] == np.float32(1.5) and out["s"].dtype == np.float32
    assert out["i"] == -3 and out["i"].dtype == np.int64
    assert out["e"].shape == (0, 3)
    assert out["n"] == 7 and out["t"] == "hi"


def test_wire_layout_is_the_openpi_marker_map() -> None:
    """Byte-level facts from SERVER_PROTOCOL.md, decoded with plain msgpack (no hooks)."""
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    raw = msgpack.unpackb(packb({"x": x, "g": np.int16(5)}), raw=False)
    assert raw["x"] == {
        b"__ndarray__": True,
        b"data": x.tobytes(),
        b"dtype": "<f4",
        b"shape": [2, 3],
    }
    assert raw["g"] == {b"__npgeneric__": True, b"data": 5, b"dtype": "<i2"}


def test_decodes_what_an_openpi_style_packer_writes() -> None:
    """openpi packs shapes as tuples and uses bytes marker keys; build such a frame by hand."""

    def openpi_default(obj):
        if isinstance(obj, np.ndarray):
            return {
                b"__ndarray__": True,
                b"data": obj.tobytes(),
                b"dtype": obj.dtype.str,
                b"shape": obj.shape,
            }
        return obj

    x = np.linspace(0, 1, 10, dtype=np.float64).reshape(5, 2)
    out = unpackb(msgpack.packb({"obs": x, "seed": 3}, default=openpi_default))
    np.testing.assert_array_equal(out["obs"], x)
    assert out["seed"] == 3


@pytest.mark.parametrize(
    "value",
    [
        np.array([object()], dtype=object),
        np.array([1 + 2j]),
        np.zeros(2, dtype="V4"),
        np.complex64(1),
    ],
)
def test_packing_refuses_object_complex_and_void(value) -> None:
    with pytest.raises(ProtocolError, match="not allowed"):
        packb({"x": value})


def test_packing_refuses_arbitrary_objects() -> None:
    with pytest.raises(ProtocolError, match="cannot encode"):
        packb({"x": {1, 2}})


def _marker(dtype: str, shape: list, data: bytes) -> bytes:
    return msgpack.packb(
        {"x": {b"__ndarray__": True, b"data": data, b"dtype": dtype, b"shape": shape}}
    )


@pytest.mark.parametrize(
    ("frame", "match"),
    [
        (_marker("|O8", [1], b"\0" * 8), "not allowed"),
        (_marker("<c8", [1], b"\0" * 8), "not allowed"),
        (_marker("|V8", [1], b"\0" * 8), "not allowed"),
        (_marker("[('a', '<f4')]", [1], b"\0" * 4), "unknown dtype|not allowed"),
        (_marker("<f4", [3], b"\0" * 8), "needs 12"),
        (_marker("<f4", [-1], b""), "non-negative"),
        (_marker("<f4", [1] * 40, b"\0" * 4), "at most 32"),
        (_marker("nonsense", [1], b"\0"), "unknown dtype"),
        (
            msgpack.packb({"x": {b"__npgeneric__": True, b"data": "zz", b"dtype": "<f4"}}),
            "bad numpy scalar",
        ),
        (b"\xc1\xc1\xc1", "not valid msgpack"),
        (b"", "not valid msgpack"),
        (msgpack.packb({"a": 1}) + b"\x00", "trailing bytes"),
        (msgpack.packb({"a": msgpack.ExtType(5, b"xx")}), "extension type"),
        (msgpack.packb({1: 2}), "not valid msgpack"),  # int map keys are refused
    ],
)
def test_unpacking_refuses_malformed_frames(frame: bytes, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        unpackb(frame)


def test_a_pickle_payload_is_never_unpickled(tmp_path) -> None:
    """A pickle that would write a file if loaded must only fail to parse."""
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    payload = pickle.dumps(Evil())
    with pytest.raises(ProtocolError):
        unpackb(payload)
    # As an object array's bytes it is refused by dtype before numpy could touch it.
    with pytest.raises(ProtocolError, match="not allowed"):
        unpackb(_marker("|O8", [1], payload[:8]))
    assert not marker.exists()


def test_text_is_not_a_binary_frame() -> None:
    with pytest.raises(ProtocolError, match="binary"):
        unpackb("not bytes")  # type: ignore[arg-type]


def test_error_text_is_one_line() -> None:
    assert error_text("bad\nthing   here") == "error: bad thing here"
    assert error_text("error: x") == "error: x"


def test_object_budget_stops_frames_of_many_small_objects() -> None:
    from diffusion_policy.serving.protocol import MAX_REQUEST_OBJECTS

    n = MAX_REQUEST_OBJECTS
    request = packb({"keypoints": np.zeros((2, 20), np.float32), "seed": 1, "request_id": "a"})
    assert unpackb(request, max_objects=n)["seed"] == 1  # a real request is far below the budget
    flat = msgpack.packb([{}] * (n + 1))
    nested = msgpack.packb([[{}] * 1000] * 100)  # every container short, the total large
    wide = msgpack.packb({f"k{i}": 0 for i in range(n)})
    for frame in (flat, nested, wide):
        with pytest.raises(ProtocolError, match=f"more than {n} msgpack objects"):
            unpackb(frame, max_objects=n)
        unpackb(frame)  # without a budget (the client side) it decodes


def test_error_text_is_one_bounded_line() -> None:
    from diffusion_policy.serving.protocol import MAX_ERROR_CHARS

    text = error_text("bad\n" + "x" * 1_000_000)
    assert "\n" not in text and len(text) < MAX_ERROR_CHARS + 60 and "more characters" in text
