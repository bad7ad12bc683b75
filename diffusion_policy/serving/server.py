"""The policy server: a thin websocket transport around `policy.predict_action_chunk`.

Speaks the openpi protocol (see protocol.py), so the unmodified openpi client works. Design:

* The event loop only parses, validates and answers; inference runs in one worker thread, so a
  slow or stalled client never delays another.
* Requests that arrive together are micro-batched into one forward pass. The batcher dispatches
  at once when every open connection is waiting (no more requests can come), otherwise after at
  most `batch_wait_ms`; each request gets its own rows back.
* Sampling noise is per request, so batching does not change what a client gets: a request's
  optional `seed` fixes its rows' initial noise exactly as an in-process call with
  `generator=torch.Generator().manual_seed(seed)` draws it. DDIM (eta = 0) is deterministic given
  that noise, so seeded DDIM requests are batched freely. DDPM also draws noise at every step,
  so under DDPM (or a policy that takes no explicit noise) a seeded request runs alone with its own
  generator and unseeded ones are batched on the server's generator. Rows of a batch match the
  single-request result up to float32 rounding: batched CPU kernels are not bitwise invariant to
  batch size (about 1e-6 relative, measured in tests/test_serving.py).
* Binds 127.0.0.1 by default; `--token` requires `Authorization: Api-Key <token>` at the handshake
  (401 otherwise). `GET /healthz` answers 200 on the same port, without a token.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import hmac
import http
import inspect
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.protocol import State

from diffusion_policy.serving.protocol import (
    PROTOCOL_VERSION,
    RESERVED_KEYS,
    ProtocolError,
    ServeConfig,
    error_text,
    packb,
    unpackb,
)

log = logging.getLogger("dp.serve")


class RequestError(ValueError):
    """A request that parsed but does not fit the policy; the message names key, shape or dtype."""


@dataclass
class InferenceRequest:
    """One validated request: obs {key: (B, To, ...)}, B rows, answered as (Ta, Da) if not batched."""

    obs: dict[str, np.ndarray]
    rows: int
    batched: bool
    seed: int | None = None
    request_id: str | int | None = None
    received: float = 0.0  # perf_counter when the frame arrived


@dataclass
class InferenceResult:
    actions: np.ndarray  # (B, Ta, Da)
    action_pred: np.ndarray  # (B, T, Da)
    infer_ms: float  # the forward pass that produced these rows
    batch_size: int  # rows in that forward pass


# --- validation (event loop side, numpy only) ------------------------------------------------------


def parse_request(
    msg: Any, obs_meta: dict[str, dict[str, Any]], max_batch: int
) -> InferenceRequest:
    """Check a decoded request against the metadata's obs specs; raise RequestError naming the problem."""
    if not isinstance(msg, dict):
        raise RequestError(
            f"a request must be a map of observation arrays, got {type(msg).__name__}"
        )
    bad_keys = [k for k in msg if not isinstance(k, str)]
    if bad_keys:
        raise RequestError(f"request keys must be strings, got {bad_keys[:3]!r}")
    unknown = sorted(k for k in msg if k not in obs_meta and k not in RESERVED_KEYS)
    if unknown:
        raise RequestError(
            f"unknown request key(s) {unknown}; expected obs keys {list(obs_meta)} and optional {list(RESERVED_KEYS)}"
        )
    missing = [k for k in obs_meta if k not in msg]
    if missing:
        raise RequestError(f"observation is missing key(s) {missing} (expected {list(obs_meta)})")
    request_id = msg.get("request_id")
    if request_id is not None and not (
        isinstance(request_id, str)
        and len(request_id) <= 256
        or isinstance(request_id, int | np.integer)
        and not isinstance(request_id, bool)
    ):
        raise RequestError("request_id must be a string of at most 256 characters or an int")
    if isinstance(request_id, np.integer):
        request_id = int(request_id)
    seed = msg.get("seed")
    if seed is not None:
        if (
            isinstance(seed, bool)
            or not isinstance(seed, int | np.integer)
            or not 0 <= seed < 2**63
        ):
            raise RequestError(f"seed must be an int in [0, 2^63), got {seed!r}")
        seed = int(seed)
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
    if not 1 <= form[1] <= max_batch:
        raise RequestError(
            f"a batched request must hold 1..{max_batch} rows (--max-batch), got {form[1]}"
        )
    return InferenceRequest(obs, rows=form[1], batched=form[0], seed=seed, request_id=request_id)


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


# --- inference (worker thread, torch) --------------------------------------------------------------


class InferenceEngine:
    """Runs groups of requests through the policy with per-request noise (see the module doc)."""

    def __init__(self, policy: torch.nn.Module, seed: int = 0):
        self.policy = policy
        self.generator = torch.Generator().manual_seed(seed)
        self.takes_noise = "noise" in inspect.signature(policy.predict_action_chunk).parameters
        sampler = getattr(policy, "sampler", None)
        # DDIM's step is deterministic with the policy's eta = 0; DDPM's adds fresh noise each step.
        self.deterministic = self.takes_noise and type(sampler).__name__ == "DDIMScheduler"
        self.action_dim = int(policy.shape_meta.action_dim)

    def run(self, requests: list[InferenceRequest]) -> list[InferenceResult | BaseException]:
        """One call per batch; never raises, a failed group's requests get its exception."""
        if self.deterministic:
            groups = [requests]
        else:
            groups = [[r] for r in requests if r.seed is not None]
            unseeded = [r for r in requests if r.seed is None]
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
        shape = (req.rows, self.policy.config.horizon, self.action_dim)
        gen = self.generator if req.seed is None else torch.Generator().manual_seed(req.seed)
        return torch.randn(shape, generator=gen)

    def _forward(self, group: list[InferenceRequest]) -> list[InferenceResult]:
        t0 = time.perf_counter()
        obs = {k: np.concatenate([r.obs[k] for r in group]) for k in group[0].obs}
        if self.deterministic:
            noise = torch.cat([self._noise(r) for r in group])
            out = self.policy.predict_action_chunk(obs, noise=noise)
        else:
            seed = group[0].seed if len(group) == 1 else None
            gen = self.generator if seed is None else torch.Generator().manual_seed(seed)
            with torch.no_grad():
                out = self.policy.predict_action_chunk(obs, generator=gen)
        actions = out["action"].float().cpu().numpy()
        action_pred = out["action_pred"].float().cpu().numpy()
        infer_ms = (time.perf_counter() - t0) * 1e3
        rows = sum(r.rows for r in group)
        results, start = [], 0
        for r in group:
            sl = slice(start, start + r.rows)
            results.append(InferenceResult(actions[sl], action_pred[sl], infer_ms, rows))
            start += r.rows
        return results

    def warmup(self, obs_meta: dict[str, dict[str, Any]], max_rows: int = 1) -> float:
        """Forward passes on zeros (first-call allocations, lazy init); returns the batch-1 ms.

        A compiled sampling backend (a traced CPU kernel or a CUDA graph) is built once per batch
        size, so with one every size up to `max_rows` is built here rather than on a robot's request.
        """
        fast = getattr(self.policy, "inference_backend", "eager") != "eager" and self.deterministic
        ms = None
        for rows in range(1, (max_rows if fast else 1) + 1):
            obs = {k: np.zeros((rows, *v["shape"]), dtype=v["dtype"]) for k, v in obs_meta.items()}
            req = InferenceRequest(obs, rows=rows, batched=True, seed=0)
            result = self.run([req])[0]
            if isinstance(result, BaseException):
                raise result
            ms = result.infer_ms if ms is None else ms
        return ms


# --- batching and transport (event loop) ----------------------------------------------------------


@dataclass
class _Pending:
    request: InferenceRequest
    future: asyncio.Future = field(repr=False)
    alive: Callable[[], bool] = field(default=lambda: True, repr=False)


class MicroBatcher:
    """Collects queued requests into batches of at most `max_batch` rows for the worker thread."""

    def __init__(
        self,
        engine: InferenceEngine,
        executor: concurrent.futures.Executor,
        max_batch: int,
        wait_s: float,
    ):
        self.engine = engine
        self.executor = executor
        self.max_batch = max_batch
        self.wait_s = wait_s
        self.n_connections = 0  # each has at most one request outstanding
        self._queue: collections.deque[_Pending] = collections.deque()
        self._wakeup = asyncio.Event()

    async def submit(
        self, request: InferenceRequest, alive: Callable[[], bool] = lambda: True
    ) -> InferenceResult:
        """Queue one request; `alive()` False at dispatch time (its client left) skips its rows."""
        future = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(request, future, alive))
        self._wakeup.set()
        return await future

    def _queued_rows(self) -> int:
        return sum(p.request.rows for p in self._queue)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
            deadline = loop.time() + self.wait_s
            # More can come only from connections that are not already waiting.
            while (
                len(self._queue) < self.n_connections
                and self._queued_rows() < self.max_batch
                and (left := deadline - loop.time()) > 0
            ):
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), left)
                except TimeoutError:
                    break
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
            if not batch:
                continue
            try:
                results = await loop.run_in_executor(
                    self.executor, self.engine.run, [p.request for p in batch]
                )
            except Exception as e:  # the worker itself failed: answer, keep batching
                log.exception("inference worker failed")
                results = [RuntimeError(f"inference failed: {type(e).__name__}: {e}")] * len(batch)
            for p, res in zip(batch, results):
                if p.future.done():
                    continue
                if isinstance(res, BaseException):
                    p.future.set_exception(res)
                else:
                    p.future.set_result(res)


class PolicyServer:
    """Serves one policy; `serve_forever()` in a running loop, or `start_in_thread()` for tests."""

    def __init__(
        self,
        policy: torch.nn.Module,
        cfg: Any,
        config: ServeConfig,
        checkpoint_meta: dict | None = None,
    ):
        self.policy = policy
        self.config = config
        self.engine = InferenceEngine(policy, seed=config.seed)
        self.metadata = build_metadata(self.engine, cfg, config, checkpoint_meta or {})
        self._metadata_frame = packb(self.metadata)
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="dp-infer")
        self._server: Server | None = None
        self._batcher: MicroBatcher | None = None
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.port: int | None = None
        self.stats = collections.Counter()

    # -- handshake ------------------------------------------------------------------------------
    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        if request.path.split("?", 1)[0] == "/healthz":
            return connection.respond(http.HTTPStatus.OK, "ok\n")
        if self.config.token is not None:
            got = request.headers.get("Authorization", "")
            want = f"Api-Key {self.config.token}"
            if not hmac.compare_digest(got.encode(), want.encode()):
                self.stats["unauthorized"] += 1
                reason = "wrong token" if got else "missing token"
                return _plain_response(
                    http.HTTPStatus.UNAUTHORIZED,
                    f"{reason}: send the header 'Authorization: Api-Key <token>'\n",
                )
        return None

    # -- one connection -------------------------------------------------------------------------
    async def _handle(self, ws: ServerConnection) -> None:
        assert self._batcher is not None
        self._batcher.n_connections += 1
        try:
            await ws.send(self._metadata_frame)
            async for message in ws:
                reply = await self._answer(message, lambda: ws.state is State.OPEN)
                await ws.send(reply)
        except ConnectionClosed:
            pass
        finally:
            self._batcher.n_connections -= 1

    async def _answer(self, message: str | bytes, alive: Callable[[], bool]) -> str | bytes:
        """The reply frame for one message: binary result, or one line of text naming the error."""
        assert self._batcher is not None
        received = time.perf_counter()
        self.stats["requests"] += 1
        if isinstance(message, str):
            self.stats["errors"] += 1
            return error_text("text frames are not requests: send a binary msgpack frame")
        request_id = None
        try:
            msg = unpackb(message)
            if isinstance(msg, dict) and isinstance(msg.get("request_id"), str | int):
                request_id = msg["request_id"]
            request = parse_request(msg, self.metadata["obs"], self.config.max_batch)
            request.received = received
            result = await self._batcher.submit(request, alive)
        except (ProtocolError, RequestError, RuntimeError, ConnectionAbortedError) as e:
            self.stats["errors"] += 1
            prefix = f"request {request_id!r}: " if request_id is not None else ""
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

    # -- lifecycle ------------------------------------------------------------------------------
    async def serve_forever(self, ready: threading.Event | None = None) -> None:
        """Warm up, listen, and serve until `stop()`."""
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        if self.config.warmup:
            ms = await self._loop.run_in_executor(
                self._executor, self.engine.warmup, self.metadata["obs"], self.config.max_batch
            )
            log.info("warmup forward pass: %.1f ms", ms)
        self._batcher = MicroBatcher(
            self.engine, self._executor, self.config.max_batch, self.config.batch_wait_ms / 1e3
        )
        batcher_task = asyncio.create_task(self._batcher.run())
        try:
            async with serve(
                self._handle,
                self.config.host,
                self.config.port,
                process_request=self._process_request,
                compression=None,
                max_size=self.config.max_message_bytes,
                max_queue=4,  # request/reply: a polite client has one message in flight
                backlog=1024,  # 100+ robots may connect at once
                server_header=None,
            ) as server:
                self._server = server
                self.port = server.sockets[0].getsockname()[1]
                if ready is not None:
                    ready.set()
                await self._stop.wait()
        finally:
            batcher_task.cancel()
            self._executor.shutdown(wait=False, cancel_futures=True)

    def stop(self) -> None:
        """Thread-safe: ask `serve_forever` to close the listener and every connection."""
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)

    @property
    def url(self) -> str:
        host = self.config.host
        host = f"[{host}]" if ":" in host else host
        return f"ws://{host}:{self.port}"

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
        thread = getattr(self, "_thread", None)
        if thread is not None:
            thread.join(timeout)

    def __enter__(self) -> PolicyServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _plain_response(status: http.HTTPStatus, body: str) -> Response:
    data = body.encode()
    headers = Headers(
        [
            ("Content-Type", "text/plain; charset=utf-8"),
            ("Content-Length", str(len(data))),
            ("Connection", "close"),
        ]
    )
    return Response(status.value, status.phrase, headers, data)


def build_metadata(
    engine: InferenceEngine, cfg: Any, config: ServeConfig, ckpt_meta: dict
) -> dict[str, Any]:
    """The handshake frame: everything a client needs to build requests and pace a robot."""
    policy = engine.policy
    pc = policy.config
    sampler = getattr(policy, "sampler", None)
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
        "task": {"name": cfg.task.name, "env_id": cfg.task.env_id, "obs_type": cfg.task.obs_type},
        "sampler": type(sampler).__name__.removesuffix("Scheduler").lower() if sampler else None,
        "num_inference_steps": getattr(policy, "num_inference_steps", None),
        "seeded_requests_batched": engine.deterministic,
        "max_batch": config.max_batch,
        "max_message_bytes": config.max_message_bytes,
        "checkpoint_step": ckpt_meta.get("step"),
    }
