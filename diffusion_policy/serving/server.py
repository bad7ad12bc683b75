"""The policy server: a thin websocket transport around `policy.predict_action_chunk`.

Speaks the openpi protocol (see protocol.py), so the unmodified openpi client works. Design:

* The event loop only reads, dispatches and answers. Frames larger than `INLINE_PARSE_BYTES` are
  decoded in a thread pool, and every frame's object count is bounded (protocol.MAX_REQUEST_OBJECTS),
  so no frame stalls the loop. Inference runs in one worker thread.
* Requests that arrive together are micro-batched into one forward pass. The batcher waits (at most
  `batch_wait_ms`) only while a connection that sent a request in the last `active_window_s` and
  is not already waiting may send another; idle connections never hold a batch open.
* Everything the server knows about the policy comes from the policy contract (policies/base.py):
  the noise shape, whether a chunk is deterministic given its noise, whether the backend builds per
  batch size and how to prepare one. Sampling noise is per request, so batching does not change what
  a client gets: a request's optional `seed` fixes its rows' initial noise exactly as an in-process
  call with `generator=torch.Generator().manual_seed(seed)` draws it. When the chunk is
  deterministic given that noise (DDIM), seeded requests are batched freely; otherwise (DDPM, IBC) a
  seeded request runs alone with its own generator and unseeded ones are batched on the server's
  generator. A guided request (a prefix with guidance rtc or bid, see policies/guidance.py) runs
  alone through `guidance.plan_chunk`, on its seed's generator or the server's; requests with
  guidance "none" batch as before (their prefix is checked, then unused). Rows of a batch match the single-request result up to float32 rounding: batched CPU
  kernels are not bitwise invariant to batch size (about 1e-6 relative, tests/test_serving.py).
* A backend that builds per batch size (a traced CPU kernel, a CUDA graph) gets a few sizes, the
  powers of two up to `max_batch` and `max_batch` itself, and each batch is padded up to the next
  built one. Batch 1 is built before listening; when the policy allows it, the rest are built in
  the background while the server already answers (larger batches run in built-size pieces
  meanwhile), each logged as it becomes ready.
* Never sends non-finite actions: a request whose rows come out NaN or Inf gets an error naming the
  observation key that lies outside the training range.
* A stop (SIGTERM) stops accepting, answers every request received before it, then closes.
* Binds 127.0.0.1 by default; a token requires `Authorization: Api-Key <token>` at the handshake
  (401; 400 for several Authorization headers; 429 for an address that keeps guessing).
  `GET /healthz` answers 200 on the same port, without a token. Optional TLS (wss://).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import hmac
import http
import logging
import math
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode
from websockets.http11 import Request, Response
from websockets.protocol import State

from diffusion_policy.errors import ConfigError, UserError
from diffusion_policy.policies.guidance import (
    PlanLimits,
    check_plan_fields,
    plan_chunk,
)
from diffusion_policy.serving.protocol import (
    MAX_REQUEST_OBJECTS,
    PROTOCOL_VERSION,
    RESERVED_KEYS,
    ProtocolError,
    ServeConfig,
    checkpoint_digest,
    error_text,
    packb,
    shorten,
    unpackb,
)
from diffusion_policy.threads import adapt_threads

log = logging.getLogger("dp.serve")
INLINE_PARSE_BYTES = 64 * 1024  # at most MAX_REQUEST_OBJECTS objects in 64 KiB: microseconds
# An observation further than this many training ranges outside its range is in other units or
# broken (a keypoint 50,000 px off a 500 px workspace); the policy's answer to it means nothing.
MAX_OBS_EXCESS = 100.0
SERVE_MAX_SAMPLES = 64  # bid candidates per row a request may ask for (rows x this in one pass)


class RequestError(ValueError):
    """A request that parsed but does not fit the policy; the message names key, shape or dtype."""

    request_id: str | int | None = None


@dataclass
class InferenceRequest:
    """One validated request: obs {key: (B, To, ...)}, B rows, answered as (Ta, Da) if not batched."""

    obs: dict[str, np.ndarray]
    rows: int
    batched: bool
    seed: int | None = None
    request_id: str | int | None = None
    received: float = 0.0  # perf_counter when the frame arrived
    prefix: np.ndarray | None = None  # (B, P, Da) float32, the executing plan's actions
    delay: int = 0
    guidance: str = "none"
    n_samples: int = 16

    @property
    def guided(self) -> bool:
        """Whether this request needs guidance.plan_chunk (so runs alone)."""
        return self.guidance != "none" and self.prefix is not None and self.prefix.shape[1] > 0


@dataclass
class InferenceResult:
    actions: np.ndarray  # (B, Ta, Da)
    action_pred: np.ndarray  # (B, T, Da)
    infer_ms: float  # the forward pass that produced these rows
    batch_size: int  # rows in that forward pass


# --- validation (numpy only) -----------------------------------------------------------------------


def _names(keys: list, limit: int = 5) -> str:
    """At most `limit` keys, each repr cut short, and how many more there were."""
    shown = ", ".join(shorten(repr(k), 40) for k in keys[:limit])
    return f"[{shown}{f', ... {len(keys) - limit} more' if len(keys) > limit else ''}]"


def _valid_request_id(rid: Any) -> str | int | None:
    if isinstance(rid, str) and len(rid) <= 256:
        return rid
    if isinstance(rid, int | np.integer) and not isinstance(rid, bool):
        return int(rid)
    return None


def parse_request(
    msg: Any,
    obs_meta: dict[str, dict[str, Any]],
    max_batch: int,
    obs_ranges: dict[str, tuple[float, float]] | None = None,
    plan: PlanLimits | None = None,
) -> InferenceRequest:
    """Check a decoded request against the metadata's obs specs; raise RequestError naming the problem.

    `plan`: what the planning fields (prefix, delay, guidance, n_samples) are checked against;
    None refuses them.

    `obs_ranges` (training min, max per low-dim key): values more than MAX_OBS_EXCESS spans outside
    are refused as absurd (other units, a corrupt sensor), before they reach the policy.
    """
    if not isinstance(msg, dict):
        raise RequestError(
            f"a request must be a map of observation arrays, got {type(msg).__name__}"
        )
    bad_keys = [k for k in msg if not isinstance(k, str)]
    if bad_keys:
        raise RequestError(f"request keys must be strings, got {_names(bad_keys, 3)}")
    unknown = sorted(k for k in msg if k not in obs_meta and k not in RESERVED_KEYS)
    if unknown:
        raise RequestError(
            f"unknown request key(s) {_names(unknown)}; expected obs keys {list(obs_meta)} and optional {list(RESERVED_KEYS)}"
        )
    missing = [k for k in obs_meta if k not in msg]
    if missing:
        raise RequestError(f"observation is missing key(s) {missing} (expected {list(obs_meta)})")
    request_id = _valid_request_id(msg.get("request_id"))
    if request_id is None and msg.get("request_id") is not None:
        raise RequestError("request_id must be a string of at most 256 characters or an int")
    seed = msg.get("seed")
    if seed is not None:
        if (
            isinstance(seed, bool)
            or not isinstance(seed, int | np.integer)
            or not 0 <= seed < 2**63
        ):
            raise RequestError(f"seed must be an int in [0, 2^63), got {shorten(repr(seed), 40)}")
        seed = int(seed)
    obs, rows, batched = _parse_obs(msg, obs_meta)
    if not 1 <= rows <= max_batch:
        raise RequestError(
            f"a batched request must hold 1..{max_batch} rows (--max-batch), got {rows}"
        )
    for key, (lo, hi) in (obs_ranges or {}).items():
        excess = range_excess(obs[key], lo, hi)
        if excess > MAX_OBS_EXCESS:
            raise RequestError(
                f"obs[{key!r}] spans [{float(obs[key].min()):.4g}, {float(obs[key].max()):.4g}], "
                f"{excess:.3g} times its training range [{lo:.4g}, {hi:.4g}] outside it: "
                "check its units and scaling"
            )
    req = InferenceRequest(obs, rows=rows, batched=batched, seed=seed, request_id=request_id)
    return _parse_plan(msg, req, plan)


def _parse_plan(msg: dict, req: InferenceRequest, plan: PlanLimits | None) -> InferenceRequest:
    """The optional planning fields, checked (guidance.check_plan_fields) into `req`."""
    fields = ("prefix", "delay", "guidance", "n_samples")
    if not any(k in msg for k in fields):
        return req
    if plan is None:
        raise RequestError(f"this server takes no planning fields {list(fields)}")
    prefix = msg.get("prefix")
    if prefix is not None:
        if not isinstance(prefix, np.ndarray) or prefix.dtype.kind not in "fiu":
            kind = prefix.dtype if isinstance(prefix, np.ndarray) else type(prefix).__name__
            raise RequestError(f"prefix must be a float array (P, Da) or (B, P, Da), got {kind}")
        if prefix.ndim == 2 and not req.batched:
            prefix = prefix[None]
        with np.errstate(over="ignore"):
            prefix = prefix.astype(np.float32)
        if not np.isfinite(prefix).all():
            raise RequestError("prefix contains NaN or Inf")
    want = "(P, Da) or (1, P, Da)" if not req.batched else f"(B={req.rows}, P, Da)"
    req.prefix = prefix
    req.delay, req.guidance = msg.get("delay", 0), msg.get("guidance", "none")
    req.n_samples = msg.get("n_samples", 16)
    try:
        shape = None if prefix is None else prefix.shape
        check_plan_fields(plan, req.rows, shape, req.delay, req.guidance, req.n_samples)
    except ConfigError as e:
        text = str(e)
        if text.startswith("prefix has shape"):
            text = (
                f"prefix has shape {msg['prefix'].shape}, expected {want} with Da={plan.action_dim}"
            )
        raise RequestError(text) from None
    req.delay, req.n_samples = int(req.delay), int(req.n_samples)
    return req


def range_excess(x: np.ndarray, lo: float, hi: float) -> float:
    """How far x reaches outside [lo, hi], in multiples of hi - lo (0 inside)."""
    return max(lo - float(x.min()), float(x.max()) - hi, 0.0) / max(hi - lo, 1e-6)


def _parse_obs(
    msg: dict, obs_meta: dict[str, dict[str, Any]]
) -> tuple[dict[str, np.ndarray], int, bool]:
    obs: dict[str, np.ndarray] = {}
    form: tuple[bool, int] | None = None
    for key, spec in obs_meta.items():
        x = msg[key]
        if not isinstance(x, np.ndarray):
            raise RequestError(f"obs[{key!r}] must be a numpy array, got {type(x).__name__}")
        want = tuple(spec["shape"])  # (To, ...)
        if x.shape == want:
            this = (False, 1)
            x = x[None]
        elif x.ndim == len(want) + 1 and x.shape[1:] == want:
            this = (True, x.shape[0])
        else:
            raise RequestError(
                f"obs[{key!r}] has shape {x.shape}, expected {want} (one robot) or (B, {', '.join(map(str, want))}) {spec['dtype']}"
            )
        if form is not None and this != form:
            raise RequestError(
                f"obs[{key!r}] has shape {x.shape}, but another key is "
                + (f"batched with B={form[1]}" if form[0] else "unbatched (To, ...)")
            )
        form = this
        obs[key] = _check_values(key, x, spec)
    assert form is not None
    return obs, form[1], form[0]


def _check_values(key: str, x: np.ndarray, spec: dict[str, Any]) -> np.ndarray:
    if spec["kind"] == "rgb":
        if x.dtype != np.uint8:
            raise RequestError(f"obs[{key!r}] has dtype {x.dtype}, expected uint8 HWC images")
        return x
    if x.dtype.kind not in "fiu":
        raise RequestError(f"obs[{key!r}] has dtype {x.dtype}, expected {spec['dtype']}")
    with np.errstate(over="ignore"):  # float64 beyond float32's range becomes Inf, refused below
        x = x.astype(np.float32)
    if not np.isfinite(x).all():
        raise RequestError(f"obs[{key!r}] contains NaN or Inf")
    return x


def decode_request(
    message: str | bytes,
    obs_meta: dict[str, dict[str, Any]],
    max_batch: int,
    obs_ranges: dict[str, tuple[float, float]] | None = None,
    plan: PlanLimits | None = None,
) -> InferenceRequest:
    """One frame -> a validated request; ProtocolError or RequestError (with the request's id when
    it has a valid one) naming the problem. Bounded work for any frame: runs on any thread."""
    if isinstance(message, str):
        raise ProtocolError("text frames are not requests: send a binary msgpack frame")
    msg = unpackb(message, max_objects=MAX_REQUEST_OBJECTS)
    try:
        return parse_request(msg, obs_meta, max_batch, obs_ranges, plan)
    except RequestError as e:
        e.request_id = _valid_request_id(msg.get("request_id")) if isinstance(msg, dict) else None
        raise


# --- inference (worker thread, torch) --------------------------------------------------------------


def built_batch_sizes(max_batch: int) -> list[int]:
    """The batch sizes a per-size backend builds: powers of two up to max_batch, and max_batch."""
    sizes = [2**i for i in range(max_batch.bit_length()) if 2**i <= max_batch]
    return sorted({*sizes, max_batch})


def _pad_rows(x: np.ndarray | torch.Tensor, rows: int):
    """x (n, ...) -> (rows, ...) by repeating its last row (rows are independent, see the contract)."""
    extra = rows - x.shape[0]
    if extra == 0:
        return x
    if isinstance(x, torch.Tensor):
        return torch.cat([x, x[-1:].expand(extra, *x.shape[1:])])
    return np.concatenate([x, np.repeat(x[-1:], extra, axis=0)])


class NonFiniteActions(RuntimeError):
    """The policy's chunk for a request holds NaN or Inf; never sent as actions."""


class InferenceEngine:
    """Runs groups of requests through the policy with per-request noise (see the module doc)."""

    def __init__(self, policy: torch.nn.Module, seed: int = 0, max_batch: int = 32):
        self.policy = policy
        self.generator = torch.Generator().manual_seed(seed)
        self.deterministic = (
            policy.noise_shape(1) is not None and policy.deterministic_given_noise()
        )
        self.per_size = self.deterministic and policy.builds_per_batch_size()
        self.sizes = built_batch_sizes(max_batch) if self.per_size else []
        self.ready: set[int] = set(self.sizes)  # until warm-up says otherwise: built on first use
        self.obs_ranges = policy.observation_ranges()
        self.plan_limits = PlanLimits.of(policy, SERVE_MAX_SAMPLES)

    def run(self, requests: list[InferenceRequest]) -> list[InferenceResult | BaseException]:
        """One call per batch; never raises, a failed group's requests get its exception."""
        groups = [[r] for r in requests if r.guided]
        plain = [r for r in requests if not r.guided]
        if self.deterministic:
            groups += [plain] if plain else []
        else:
            groups += [[r] for r in plain if r.seed is not None]
            unseeded = [r for r in plain if r.seed is None]
            if unseeded:
                groups.append(unseeded)
        out: dict[int, InferenceResult | BaseException] = {}
        for group in groups:
            try:
                results = self._forward(group)
            except Exception as e:  # e.g. out of memory: answer, keep serving
                log.exception("inference failed")
                results = [RuntimeError(f"inference failed: {type(e).__name__}: {e}")] * len(group)
            out.update({id(r): res for r, res in zip(group, results)})
        return [out[id(r)] for r in requests]

    def _noise(self, req: InferenceRequest) -> torch.Tensor:
        gen = self.generator if req.seed is None else torch.Generator().manual_seed(req.seed)
        return torch.randn(self.policy.noise_shape(req.rows), generator=gen)

    def _pieces(self, n: int) -> list[tuple[int, int]]:
        """(rows, built size) pieces covering n rows with the sizes built so far."""
        ready = sorted(self.ready)
        out = []
        while n > 0:
            size = next((s for s in ready if s >= n), ready[-1])
            out.append((min(size, n), size))
            n -= out[-1][0]
        return out

    def _predict(
        self, obs: dict[str, np.ndarray], noise: torch.Tensor | None, gen: torch.Generator | None
    ) -> tuple[np.ndarray, np.ndarray]:
        adapt_threads()  # in the inference thread, whose torch thread count it sets
        with torch.no_grad():
            out = self.policy.predict_action_chunk(obs, generator=gen, noise=noise)
        return out["action"].float().cpu().numpy(), out["action_pred"].float().cpu().numpy()

    def _forward_noise(
        self, obs: dict[str, np.ndarray], noise: torch.Tensor
    ) -> tuple[np.ndarray, np.ndarray]:
        if not self.per_size:
            return self._predict(obs, noise, None)
        parts, start = [], 0
        for rows, size in self._pieces(len(noise)):
            sl = slice(start, start + rows)
            piece = {k: _pad_rows(v[sl], size) for k, v in obs.items()}
            a, p = self._predict(piece, _pad_rows(noise[sl], size), None)
            parts.append((a[:rows], p[:rows]))
            start += rows
        return np.concatenate([a for a, _ in parts]), np.concatenate([p for _, p in parts])

    def _forward(self, group: list[InferenceRequest]) -> list[InferenceResult | BaseException]:
        t0 = time.perf_counter()
        obs = {k: np.concatenate([r.obs[k] for r in group]) for k in group[0].obs}
        if group[0].guided:
            actions, action_pred = self._plan(group[0])
        elif self.deterministic:
            actions, action_pred = self._forward_noise(
                obs, torch.cat([self._noise(r) for r in group])
            )
        else:
            seed = group[0].seed if len(group) == 1 else None
            gen = self.generator if seed is None else torch.Generator().manual_seed(seed)
            actions, action_pred = self._predict(obs, None, gen)
        infer_ms = (time.perf_counter() - t0) * 1e3
        rows = sum(r.rows for r in group)
        results: list[InferenceResult | BaseException] = []
        start = 0
        for r in group:
            sl = slice(start, start + r.rows)
            start += r.rows
            if np.isfinite(actions[sl]).all() and np.isfinite(action_pred[sl]).all():
                results.append(InferenceResult(actions[sl], action_pred[sl], infer_ms, rows))
            else:
                results.append(NonFiniteActions(self.explain_non_finite(r)))
        return results

    def _plan(self, req: InferenceRequest) -> tuple[np.ndarray, np.ndarray]:
        """A guided request alone (rtc runs the eager loop whatever the backend)."""
        gen = self.generator if req.seed is None else torch.Generator().manual_seed(req.seed)
        assert req.prefix is not None
        out = plan_chunk(
            self.policy,
            req.obs,
            generator=gen,
            prefix=torch.from_numpy(req.prefix),
            delay=req.delay,
            guidance=req.guidance,
            n_samples=req.n_samples,
        )
        return out["action"].float().cpu().numpy(), out["action_pred"].float().cpu().numpy()

    def explain_non_finite(self, req: InferenceRequest) -> str:
        """Why a chunk came out NaN/Inf: the obs key farthest outside its training range, if any."""
        worst, excess = None, 0.0
        for key, (lo, hi) in self.obs_ranges.items():
            e = range_excess(req.obs[key], lo, hi)
            if e > excess:
                worst, excess = key, e
        head = "the policy's actions for this observation are not finite (NaN or Inf); "
        if worst is None:
            return (
                head
                + "its observation lies within the training range: the checkpoint may be broken"
            )
        x, (lo, hi) = req.obs[worst], self.obs_ranges[worst]
        return (
            head
            + f"obs[{worst!r}] spans [{float(x.min()):.4g}, {float(x.max()):.4g}] but the policy "
            f"was trained on [{lo:.4g}, {hi:.4g}]: check its units and scaling"
        )

    def prepare(self, rows: int) -> float:
        """Build and warm up batch size `rows` (policy.prepare_inference); returns the seconds."""
        t0 = time.perf_counter()
        self.policy.prepare_inference(rows)
        self.ready.add(rows)
        return time.perf_counter() - t0


# --- batching and transport (event loop) ----------------------------------------------------------


@dataclass
class _Pending:
    request: InferenceRequest
    future: asyncio.Future = field(repr=False)
    conn: int = 0
    alive: Callable[[], bool] = field(default=lambda: True, repr=False)


class MicroBatcher:
    """Collects queued requests into batches of at most `max_batch` rows for the worker thread."""

    def __init__(
        self,
        engine: InferenceEngine,
        executor: concurrent.futures.Executor,
        max_batch: int,
        wait_s: float,
        active_window_s: float = 2.0,
    ):
        self.engine = engine
        self.executor = executor
        self.max_batch = max_batch
        self.wait_s = wait_s
        self.active_window_s = active_window_s
        self.last_request: dict[int, float] = {}  # open connection -> loop time of its last request
        self._busy: set[int] = set()  # connections with a request queued or running
        self._queue: collections.deque[_Pending] = collections.deque()
        self._wakeup = asyncio.Event()
        self.running = 0  # requests in the forward pass now

    def opened(self, conn: int) -> None:
        # a robot sends its first request right after connecting: count the connect as activity
        self.last_request[conn] = asyncio.get_running_loop().time()

    def closed(self, conn: int) -> None:
        self.last_request.pop(conn, None)

    async def submit(
        self, request: InferenceRequest, conn: int = 0, alive: Callable[[], bool] = lambda: True
    ) -> InferenceResult:
        """Queue one request; `alive()` False at dispatch time (its client left) skips its rows."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self.last_request[conn] = loop.time()
        self._busy.add(conn)
        self._queue.append(_Pending(request, future, conn, alive))
        self._wakeup.set()
        try:
            return await future
        finally:
            self._busy.discard(conn)

    def _queued_rows(self) -> int:
        return sum(p.request.rows for p in self._queue)

    def more_expected(self, now: float) -> bool:
        """Whether a connection that is not waiting sent a request recently (so may send again)."""
        since = now - self.active_window_s
        return any(t > since and c not in self._busy for c, t in self.last_request.items())

    def idle(self) -> bool:
        return not self._queue and not self.running

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
            deadline = loop.time() + self.wait_s
            while (
                self._queued_rows() < self.max_batch
                and (left := deadline - loop.time()) > 0
                and self.more_expected(loop.time())
            ):
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), left)
                except TimeoutError:
                    break
            batch = self._take()
            if batch:
                await self._dispatch(batch)

    def _take(self) -> list[_Pending]:
        batch, rows = [], 0
        while self._queue and rows + self._queue[0].request.rows <= self.max_batch:
            p = self._queue.popleft()
            if p.future.done():
                continue
            if not p.alive():  # its client went away while it waited
                p.future.set_exception(ConnectionAbortedError("client disconnected"))
                continue
            batch.append(p)
            rows += p.request.rows
        return batch

    async def _dispatch(self, batch: list[_Pending]) -> None:
        loop = asyncio.get_running_loop()
        self.running = len(batch)
        try:
            results = await loop.run_in_executor(
                self.executor, self.engine.run, [p.request for p in batch]
            )
        except Exception as e:  # the worker itself failed: answer, keep batching
            log.exception("inference worker failed")
            results = [RuntimeError(f"inference failed: {type(e).__name__}: {e}")] * len(batch)
        finally:
            self.running = 0
        for p, res in zip(batch, results):
            self._busy.discard(p.conn)  # its reply is on the way: it may send again soon
            if p.future.done():
                continue
            if isinstance(res, BaseException):
                p.future.set_exception(res)
            else:
                p.future.set_result(res)


class AuthThrottle:
    """Per-address backoff for wrong tokens: `free_tries` wrong tries, then each next one only
    after base * 2^k seconds (at most 60) since the last, else HTTP 429. A right token resets it."""

    def __init__(self, free_tries: int = 5, base_s: float = 1.0, cap_s: float = 60.0):
        self.free_tries, self.base_s, self.cap_s = free_tries, base_s, cap_s
        self._failures: dict[str, tuple[int, float]] = {}  # address -> (count, time of the last)

    def _backoff(self, count: int) -> float:
        over = count - self.free_tries
        return 0.0 if over < 0 else min(self.base_s * 2**over, self.cap_s)

    def retry_after(self, addr: str, now: float) -> float:
        """Seconds until `addr` may try again (0: now)."""
        count, last = self._failures.get(addr, (0, 0.0))
        return max(0.0, last + self._backoff(count) - now)

    def failed(self, addr: str, now: float) -> None:
        if len(self._failures) > 10_000:  # forget addresses that have been quiet for long
            self._failures = {
                a: v for a, v in self._failures.items() if now - v[1] < 2 * self.cap_s
            }
        count, _ = self._failures.get(addr, (0, 0.0))
        self._failures[addr] = (count + 1, now)

    def succeeded(self, addr: str) -> None:
        self._failures.pop(addr, None)


class PolicyServer:
    """Serves one policy; `serve_forever()` in a running loop, or `start_in_thread()` for tests."""

    def __init__(
        self,
        policy: torch.nn.Module,
        cfg: Any,
        config: ServeConfig,
        checkpoint_meta: dict | None = None,
        checkpoint_dir: str | Path | None = None,
    ):
        """`checkpoint_dir`: where the weights came from; their sha256 goes in the metadata."""
        self.policy = policy
        self.config = config
        self.engine = InferenceEngine(policy, seed=config.seed, max_batch=config.max_batch)
        ident = None
        if checkpoint_dir is not None:
            ident = {"sha256": checkpoint_digest(checkpoint_dir), "path": str(checkpoint_dir)}
        self.metadata = build_metadata(self.engine, cfg, config, checkpoint_meta or {}, ident)
        self._metadata_frame = packb(self.metadata)
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="dp-infer")
        self._parse_pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="dp-parse")
        self._auth = AuthThrottle(config.auth_free_tries, config.auth_backoff_s)
        self._ssl = _ssl_context(config)
        self._server: Server | None = None
        self._batcher: MicroBatcher | None = None
        self._stop: asyncio.Event | None = None
        self._stopped_at: float | None = None  # perf_counter of the stop request
        self._answering = 0  # messages received and not yet answered
        self._loop: asyncio.AbstractEventLoop | None = None
        self._warmup: threading.Thread | None = None
        self.port: int | None = None
        self.stats = collections.Counter()

    # -- handshake ------------------------------------------------------------------------------
    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        if request.path.split("?", 1)[0] == "/healthz":
            return connection.respond(http.HTTPStatus.OK, "ok\n")
        if self.config.token is None:
            return None
        values = request.headers.get_all("Authorization")
        if len(values) > 1:
            self.stats["unauthorized"] += 1
            return _plain_response(
                http.HTTPStatus.BAD_REQUEST,
                f"{len(values)} Authorization headers: send exactly one 'Authorization: Api-Key <token>'\n",
            )
        addr = str(connection.remote_address[0]) if connection.remote_address else "?"
        now = time.monotonic()
        wait = self._auth.retry_after(addr, now)
        if wait > 0:
            self.stats["throttled"] += 1
            return _plain_response(
                http.HTTPStatus.TOO_MANY_REQUESTS,
                f"too many wrong tokens from {addr}: retry in {wait:.1f} s\n",
                [("Retry-After", str(math.ceil(wait)))],
            )
        got = values[0] if values else ""
        want = f"Api-Key {self.config.token}"
        if hmac.compare_digest(got.encode(), want.encode()):
            self._auth.succeeded(addr)
            return None
        self._auth.failed(addr, now)
        self.stats["unauthorized"] += 1
        reason = "wrong token" if got else "missing token"
        return _plain_response(
            http.HTTPStatus.UNAUTHORIZED,
            f"{reason}: send the header 'Authorization: Api-Key <token>'\n",
        )

    # -- one connection -------------------------------------------------------------------------
    async def _handle(self, ws: ServerConnection) -> None:
        assert self._batcher is not None
        conn = id(ws)
        self._batcher.opened(conn)
        try:
            await ws.send(self._metadata_frame)
            async for message in ws:
                if self._stopped_at is not None:  # arrived after the stop: the client retries
                    await ws.close(CloseCode.GOING_AWAY, "server is shutting down")
                    break
                self._answering += 1
                try:
                    reply = await self._answer(message, conn, lambda: ws.state is State.OPEN)
                    await ws.send(reply)
                finally:
                    self._answering -= 1
        except ConnectionClosed:
            pass
        finally:
            self._batcher.closed(conn)

    async def _answer(
        self, message: str | bytes, conn: int, alive: Callable[[], bool]
    ) -> str | bytes:
        """The reply frame for one message: binary result, or one line of text naming the error."""
        assert self._batcher is not None and self._loop is not None
        received = time.perf_counter()
        self.stats["requests"] += 1
        engine = self.engine
        args = (
            message,
            self.metadata["obs"],
            self.config.max_batch,
            engine.obs_ranges,
            engine.plan_limits,
        )
        request: InferenceRequest | None = None
        try:
            if len(message) <= INLINE_PARSE_BYTES:
                request = decode_request(*args)
            else:  # a large frame is decoded beside the loop, which keeps answering others
                request = await self._loop.run_in_executor(self._parse_pool, decode_request, *args)
            request.received = received
            result = await self._batcher.submit(request, conn, alive)
        except (ProtocolError, RequestError, RuntimeError, ConnectionAbortedError) as e:
            self.stats["errors"] += 1
            rid = request.request_id if request is not None else getattr(e, "request_id", None)
            prefix = f"request {shorten(repr(rid), 260)}: " if rid is not None else ""
            return error_text(prefix + str(e))
        unbatch = (lambda a: a) if request.batched else (lambda a: a[0])
        reply: dict[str, Any] = {
            "actions": unbatch(result.actions),
            "action_pred": unbatch(result.action_pred),
            "infer_ms": result.infer_ms,
            "batch_size": result.batch_size,
        }
        if request.request_id is not None:
            reply["request_id"] = request.request_id
        reply["server_ms"] = (time.perf_counter() - received) * 1e3
        return packb(reply)

    # -- warm-up ------------------------------------------------------------------------------------
    async def _warm_up(self) -> None:
        """Prepare batch 1 before listening; the other built sizes now, or in the background."""
        assert self._loop is not None
        engine, t0 = self.engine, time.perf_counter()
        rest = engine.sizes[1:]
        engine.ready = set()
        s = await self._loop.run_in_executor(self._executor, engine.prepare, 1)
        log.info("warm-up: batch size 1 ready in %.1f s", s)
        if not rest:
            return
        if not self.policy.prepare_concurrently():
            for rows in rest:
                s = await self._loop.run_in_executor(self._executor, engine.prepare, rows)
                log.info("warm-up: batch size %d ready in %.1f s", rows, s)
            log.info(
                "warm-up: %d batch sizes in %.1f s", len(engine.sizes), time.perf_counter() - t0
            )
            return
        log.info(
            "warm-up: building batch sizes %s in the background; until each is ready, larger "
            "batches run as several smaller passes",
            rest,
        )
        # not a daemon: killing a thread inside a trace aborts the process; a stop waits for it
        self._warmup = threading.Thread(target=self._build_rest, args=(rest, t0), name="dp-warmup")
        self._warmup.start()

    def _build_rest(self, sizes: list[int], t0: float) -> None:
        try:
            for rows in sizes:
                if self._stopped_at is not None:
                    log.info("warm-up: stopped before batch size %d", rows)
                    return
                s = self.engine.prepare(rows)
                log.info("warm-up: batch size %d ready in %.1f s", rows, s)
            log.info(
                "warm-up: all %d batch sizes ready, %.1f s after start",
                len(self.engine.sizes),
                time.perf_counter() - t0,
            )
        except Exception:  # a failed build leaves that size unbuilt; smaller pieces still serve
            log.exception("warm-up failed")

    # -- lifecycle ------------------------------------------------------------------------------
    async def serve_forever(self, ready: threading.Event | None = None) -> None:
        """Warm up, listen, and serve until `stop()`; then answer what was received and close."""
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        if self.config.warmup:
            await self._warm_up()
        self._batcher = MicroBatcher(
            self.engine,
            self._executor,
            self.config.max_batch,
            self.config.batch_wait_ms / 1e3,
            self.config.active_window_s,
        )
        batcher_task = asyncio.create_task(self._batcher.run())
        try:
            server = await serve(
                self._handle,
                self.config.host,
                self.config.port,
                process_request=self._process_request,
                compression=None,
                max_size=self.config.max_message_bytes,
                max_queue=4,  # request/reply: a polite client has one message in flight
                backlog=128,  # 100+ robots may connect at once; asyncio accepts this many per turn
                server_header=None,
                close_timeout=2.0,
                ssl=self._ssl,
            )
            self._server = server
            self.port = server.sockets[0].getsockname()[1]
            if ready is not None:
                ready.set()
            await self._stop.wait()
            await self._shutdown(server)
        finally:
            batcher_task.cancel()
            if self._warmup is not None and self._warmup.is_alive():
                log.info("stopping: waiting for the batch size being built")
                await asyncio.to_thread(self._warmup.join)
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._parse_pool.shutdown(wait=False, cancel_futures=True)

    async def _shutdown(self, server: Server) -> None:
        """Stop accepting, answer what was received before the stop (bounded), then close."""
        assert self._batcher is not None
        server.server.close()  # no new connections; handshakes in progress get 503
        deadline = time.monotonic() + self.config.drain_timeout_s
        if self._answering:
            log.info("stopping: answering %d request(s) received before the stop", self._answering)
        while (self._answering or not self._batcher.idle()) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        server.close(close_connections=True)
        try:
            await asyncio.wait_for(server.wait_closed(), 3.0)
        except TimeoutError:  # handshakes that never finish (slow-loris): do not wait them out
            for task in list(server.handler_tasks):
                task.cancel()

    def stop(self) -> None:
        """Thread-safe: ask `serve_forever` to answer what it has, close, and return."""
        if self._stopped_at is None:
            self._stopped_at = time.perf_counter()
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)

    @property
    def url(self) -> str:
        host = self.config.host
        host = f"[{host}]" if ":" in host else host
        scheme = "wss" if self.config.tls_cert else "ws"
        return f"{scheme}://{host}:{self.port}"

    def start_in_thread(self, timeout: float = 60.0) -> PolicyServer:
        """Serve from a daemon thread (tests, benchmarks); returns once the port is bound."""
        ready = threading.Event()
        errors: list[BaseException] = []

        def main() -> None:
            try:
                asyncio.run(self.serve_forever(ready))
            except BaseException as e:  # surfaced to the starting thread
                errors.append(e)
                ready.set()

        self._thread = threading.Thread(target=main, name="dp-serve", daemon=True)
        self._thread.start()
        if not ready.wait(timeout):
            raise RuntimeError(f"server did not start within {timeout} s")
        if errors:
            raise errors[0]
        return self

    def close(self, timeout: float = 10.0) -> None:
        self.stop()
        for thread in (getattr(self, "_thread", None), self._warmup):
            if thread is not None:
                thread.join(timeout)

    def __enter__(self) -> PolicyServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _ssl_context(config: ServeConfig) -> ssl.SSLContext | None:
    if not config.tls_cert:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.load_cert_chain(config.tls_cert, config.tls_key)
    except (OSError, ssl.SSLError) as e:
        raise UserError(f"--tls-cert/--tls-key: cannot load them: {e}") from None
    return ctx


def _plain_response(
    status: http.HTTPStatus, body: str, extra: list[tuple[str, str]] | None = None
) -> Response:
    data = body.encode()
    headers = Headers(
        [
            ("Content-Type", "text/plain; charset=utf-8"),
            ("Content-Length", str(len(data))),
            ("Connection", "close"),
            *(extra or []),
        ]
    )
    return Response(status.value, status.phrase, headers, data)


def obs_type_of(task: Any) -> str | None:
    """The Push-T obs_type a task observes, or None for a declared task (`task.obs`)."""
    return None if task.obs else task.obs_type


def build_metadata(
    engine: InferenceEngine,
    cfg: Any,
    config: ServeConfig,
    ckpt_meta: dict,
    checkpoint_id: dict | None = None,
) -> dict[str, Any]:
    """The handshake frame: everything a client needs to build requests, pace a robot and know
    which checkpoint answers (`checkpoint`: its weights' sha256 and the sampler settings)."""
    policy = engine.policy
    pc = policy.config
    settings = policy.sampler_settings()
    return {
        "protocol": "diffusion_policy",
        "protocol_version": PROTOCOL_VERSION,
        "policy_type": cfg.policy.name,
        "obs": {
            k: {"shape": [pc.n_obs_steps, *s.shape], "dtype": s.dtype, "kind": s.kind}
            for k, s in policy.shape_meta.obs.items()
        },
        "action_dim": int(policy.shape_meta.action_dim),
        "horizon": int(pc.horizon),
        "n_obs_steps": int(pc.n_obs_steps),
        "n_action_steps": int(pc.n_action_steps),
        "control_hz": float(cfg.task.control_hz),
        # obs_type is the Push-T shorthand; a declared task's observations are the "obs" above
        "task": {
            "name": cfg.task.name,
            "env_id": cfg.task.env_id,
            "obs_type": obs_type_of(cfg.task),
        },
        "sampler": settings.get("sampler"),
        "num_inference_steps": settings.get("num_inference_steps"),
        "seeded_requests_batched": engine.deterministic,
        # latency-aware planning (request fields prefix, delay, guidance, n_samples)
        "guidances": list(engine.plan_limits.guidances),
        "max_samples": engine.plan_limits.max_samples,
        "max_batch": config.max_batch,
        "max_message_bytes": config.max_message_bytes,
        "checkpoint_step": ckpt_meta.get("step"),
        "checkpoint": {**(checkpoint_id or {}), "step": ckpt_meta.get("step"), **settings},
    }
