"""A light client for `dp serve` (and any openpi-protocol server): numpy, msgpack and websockets only.

    with PolicyClient("ws://127.0.0.1:8000") as client:
        client.metadata["obs"]                  # {key: {"shape": [To, ...], "dtype", "kind"}}
        out = client.infer({"keypoints": obs})  # obs (To, 20) -> out["actions"] (Ta, Da)

A robot's control loop (PUSHT_SPEC §9 timing: stale actions dropped, inference in the background):

    from diffusion_policy.chunking import RealtimeController
    meta = client.metadata
    dt = 1.0 / meta["control_hz"]
    ctrl = RealtimeController(lambda o: client.infer(o)["actions"], meta["n_obs_steps"], dt)
    t0 = ctrl.reset(read_obs())                      # waits for the first chunk
    for i in itertools.count():
        sleep_until(t0 + i * dt)
        action = ctrl.step(read_obs() if i else None, t0 + i * dt)
        if action is not None:                       # None: nothing due, keep the last command
            robot.command(action)

Robots importing this must not pay for torch; tests/test_serving.py checks that importing it does
not import torch.
"""

from __future__ import annotations

import inspect
import itertools
import ssl
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
from websockets.exceptions import ConnectionClosed, InvalidStatus, InvalidURI
from websockets.frames import CloseCode
from websockets.sync.client import ClientConnection, connect

from diffusion_policy.serving.protocol import packb, unpackb

# websockets >= 15 would route through an HTTP(S)_PROXY from the environment, and >= 17.1 wants
# `legacy=True` for a connection held outside a `with` block; older versions know neither keyword.
_CONNECT_PARAMS = inspect.signature(connect).parameters
_CONNECT_COMPAT = {k: v for k, v in (("proxy", None), ("legacy", True)) if k in _CONNECT_PARAMS}


class ClientError(RuntimeError):
    """Base of every error this client raises."""


class ServerError(ClientError):
    """The server refused the request (a text frame); the connection stays usable."""


class AuthError(ClientError):
    """The server rejected our token (HTTP 401 at the handshake); retrying will not help."""


class MessageTooBig(ClientError):
    """The server closed the connection because our request exceeded its size cap (close 1009)."""


class ServerUnavailable(ClientError):
    """No connection could be made or kept within the time allowed."""


class InferenceTimeout(ClientError, TimeoutError):
    """No reply within `timeout`; the connection is dropped so a late reply cannot be mistaken."""


class PolicyClient:
    """Synchronous client: one request in flight, answers in order, reconnects with backoff.

    `timeout` bounds one reply; `connect_timeout` bounds all connection attempts together (the
    server may still be loading). A dropped connection is re-opened once and the request resent;
    inference has no side effects, and the echoed `request_id` rules out a mixed-up answer.
    """

    def __init__(
        self,
        url: str = "ws://127.0.0.1:8000",
        token: str | None = None,
        timeout: float = 10.0,
        connect_timeout: float = 30.0,
        backoff: tuple[float, float] = (0.05, 2.0),
        max_reply_bytes: int | None = 64 * 2**20,
        ssl_context: ssl.SSLContext | None = None,
    ):
        """`ssl_context`: for a wss:// server whose certificate the system does not trust."""
        self.url = url
        self.ssl_context = ssl_context
        self.token = token
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.backoff = backoff
        self.max_reply_bytes = max_reply_bytes
        self._ws: ClientConnection | None = None
        self._ids = itertools.count()
        self.metadata: dict[str, Any] = {}
        self.reconnects = 0
        self._connect()

    # -- connection -------------------------------------------------------------------------------
    def _connect(self) -> None:
        deadline = time.monotonic() + self.connect_timeout
        delay, last = self.backoff[0], None
        headers = {"Authorization": f"Api-Key {self.token}"} if self.token else None
        while True:
            left = deadline - time.monotonic()
            try:
                ws = connect(
                    self.url,
                    additional_headers=headers,
                    compression=None,
                    max_size=self.max_reply_bytes,
                    open_timeout=max(0.1, min(self.timeout, left)),
                    close_timeout=1.0,
                    **({"ssl": self.ssl_context} if self.ssl_context is not None else {}),
                    **_CONNECT_COMPAT,
                )
            except InvalidStatus as e:
                status = e.response.status_code
                body = e.response.body.decode(errors="replace").strip() if e.response.body else ""
                if status in (400, 401, 403, 429):
                    raise AuthError(f"{self.url}: HTTP {status}: {body}") from None
                last = f"HTTP {status} {body}"
            except InvalidURI as e:
                raise ClientError(f"bad server url {self.url!r}: {e}") from None
            except (OSError, TimeoutError, ConnectionClosed) as e:
                last = f"{type(e).__name__}: {e}"
            else:
                try:
                    first = ws.recv(timeout=max(0.1, min(self.timeout, left)))
                    if isinstance(first, str):
                        raise ServerError(f"server sent text instead of metadata: {first}")
                    self.metadata = unpackb(first)
                except (TimeoutError, ConnectionClosed) as e:
                    ws.close()
                    last = f"no metadata: {type(e).__name__}: {e}"
                else:
                    self._ws = ws
                    return
            if time.monotonic() + delay > deadline:
                raise ServerUnavailable(
                    f"cannot connect to {self.url} within {self.connect_timeout} s (last: {last})"
                )
            time.sleep(delay)
            delay = min(delay * 2, self.backoff[1])

    def _drop(self) -> None:
        if self._ws is not None:
            try:
                self._ws.close()
            except Exception:
                pass
            self._ws = None

    def close(self) -> None:
        self._drop()

    def __enter__(self) -> PolicyClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- inference --------------------------------------------------------------------------------
    def infer(
        self,
        obs: Mapping[str, np.ndarray],
        seed: int | None = None,
        request_id: str | int | None = None,
        **plan: Any,
    ) -> dict[str, Any]:
        """obs {key: (To, ...)} (or (B, To, ...)) -> {"actions", "action_pred", "infer_ms", ...}.

        `seed` fixes the sampling noise of this request's rows (same answer as in-process with
        `torch.Generator().manual_seed(seed)`, see server.py). `plan`: the latency-aware fields
        (prefix (P, Da) or (B, P, Da), delay, guidance, n_samples; execution.PlanRequest.kwargs).
        """
        msg: dict[str, Any] = dict(obs)
        for key, value in plan.items():
            msg[key] = np.asarray(value, dtype=np.float32) if key == "prefix" else value
        msg["request_id"] = next(self._ids) if request_id is None else request_id
        if seed is not None:
            msg["seed"] = int(seed)
        data = packb(msg)
        for attempt in range(2):
            if self._ws is None:
                self._connect()
                self.reconnects += attempt
            assert self._ws is not None
            try:
                self._ws.send(data)
                reply = self._ws.recv(timeout=self.timeout)
            except TimeoutError:
                self._drop()
                raise InferenceTimeout(
                    f"no reply from {self.url} within {self.timeout} s"
                ) from None
            except (ConnectionClosed, OSError) as e:
                self._drop()
                rcvd = getattr(e, "rcvd", None)
                if rcvd is not None and rcvd.code == CloseCode.MESSAGE_TOO_BIG:
                    raise MessageTooBig(
                        f"request of {len(data)} bytes refused by {self.url}: {rcvd.reason}"
                    ) from None
                if attempt == 1:
                    raise ServerUnavailable(
                        f"connection to {self.url} lost twice during one request: {e}"
                    ) from None
                continue
            if isinstance(reply, str):
                raise ServerError(reply)
            out = unpackb(reply)
            if out.get("request_id") != msg["request_id"]:
                self._drop()
                raise ClientError(
                    f"reply for request {out.get('request_id')!r} while waiting for {msg['request_id']!r}"
                )
            return out
        raise AssertionError("unreachable")


class RemoteActor:
    """`evaluation.evaluate`'s actor interface over a server: obs (B, To, ...) -> actions (B, Ta, Da),
    or with `plan` the future (B, F, Da) given the executing prefix.

    Call i sends `seed = seed + i`, so a rerun on the same server repeats its noise.
    """

    def __init__(self, client: PolicyClient, seed: int = 0):
        self.client = client
        meta = client.metadata
        self.n_obs_steps = int(meta["n_obs_steps"])
        self.horizon = int(meta["horizon"]) if "horizon" in meta else None
        self.n_action_steps = int(meta["n_action_steps"]) if "n_action_steps" in meta else None
        self.seed = seed
        self.calls = 0

    def __call__(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        return self._infer(obs, "actions", {})

    def plan(
        self,
        obs: dict[str, np.ndarray],
        prefix: np.ndarray | None = None,
        delay: int = 0,
        guidance: str = "none",
        n_samples: int = 16,
    ) -> np.ndarray:
        """As evaluation.rollout.Actor.plan, on the server (the request's prefix/delay/guidance)."""
        fields: dict[str, Any] = {}
        if prefix is not None:
            fields = {"prefix": prefix, "delay": int(delay), "guidance": guidance}
            fields["n_samples"] = int(n_samples)
        return self._infer(obs, "action_pred", fields)[:, self.n_obs_steps - 1 :]

    def _infer(self, obs: dict[str, np.ndarray], key: str, fields: dict[str, Any]) -> np.ndarray:
        # the server caps rows per request (metadata max_batch): send larger batches in slices
        rows = len(next(iter(obs.values())))
        step = int(self.client.metadata.get("max_batch") or rows)
        parts = []
        for i in range(0, rows, step):
            part = {k: v[i : i + step] for k, v in obs.items()}
            extra = dict(fields)
            if "prefix" in extra:
                extra["prefix"] = np.asarray(extra["prefix"])[i : i + step]
            out = self.client.infer(part, seed=self.seed + self.calls, **extra)
            self.calls += 1
            parts.append(np.asarray(out[key]))
        return np.concatenate(parts)
