"""The policy server end to end: our client and the unmodified openpi client against in-process
inference, micro-batching, bad input and faults, token, health, and `dp eval --server/--realtime`.

Servers run in a thread of this process on a free loopback port; each loads its own copy of the
policy (the sampler keeps per-call state, so two threads must not share one).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import msgpack
import numpy as np
import pytest
import torch
from websockets.sync.client import connect

from diffusion_policy.checkpoint import load_policy
from diffusion_policy.serving.client import (
    AuthError,
    InferenceTimeout,
    MessageTooBig,
    PolicyClient,
    RemoteActor,
    ServerError,
    ServerUnavailable,
)
from diffusion_policy.serving.protocol import packb, unpackb
from diffusion_policy.serving.server import PolicyServer, ServeConfig

REPO = Path(__file__).resolve().parents[1]
OPENPI_PYTHON = REPO / ".venv-openpi" / "bin" / "python"
# Batched CPU kernels are not bitwise invariant to batch size; rows of a micro-batch match the
# unbatched answer to float32 rounding (measured: at most 4e-4 px on actions of ~100-500 px).
BATCH_ATOL = 2e-3


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Two threads (server worker, test) on a shared 2-core box: avoid OpenMP oversubscription."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, pusht_zarr) -> Path:
    from diffusion_policy.cli.main import main

    run_dir = tmp_path_factory.mktemp("serving") / "run"
    args = [f"task.dataset={pusht_zarr}", f"run_dir={run_dir}", "wandb.mode=disabled"]
    assert main(["train", "smoke", *args, "train.eval_every=0"]) == 0
    return run_dir / "checkpoints" / "latest"


def start_server(ckpt: Path, sampler: str | None = None, **overrides) -> PolicyServer:
    policy, cfg, meta = load_policy(ckpt)
    if sampler:
        policy.set_sampler(sampler)
    config = ServeConfig(**{"port": 0, **overrides})
    return PolicyServer(policy, cfg, config, meta, checkpoint_dir=ckpt).start_in_thread()


@pytest.fixture(scope="module")
def server(ckpt):
    srv = start_server(ckpt, max_message_bytes=64 * 1024)
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def ref_policy(ckpt):
    return load_policy(ckpt)[0]


def make_obs(i: int, batch: int | None = None) -> dict[str, np.ndarray]:
    """Distinct keypoint observations (To=2, 20) in the Push-T pixel range."""
    rng = np.random.default_rng(1000 + i)
    shape = (2, 20) if batch is None else (batch, 2, 20)
    return {"keypoints": rng.uniform(50, 450, shape).astype(np.float32)}


def in_process(policy, obs: dict[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
    """What `policy.predict_action_chunk` gives for a (To, ...) or (B, To, ...) obs with this seed."""
    single = obs["keypoints"].ndim == 2
    batch = {k: v[None] if single else v for k, v in obs.items()}
    with torch.no_grad():
        out = policy.predict_action_chunk(batch, generator=torch.Generator().manual_seed(seed))
    return {k: v[0].numpy() if single else v.numpy() for k, v in out.items()}


# --- round trips ---------------------------------------------------------------------------------


def test_metadata_describes_the_policy(server, ref_policy) -> None:
    with PolicyClient(server.url) as client:
        m = client.metadata
    assert m["protocol_version"] == 1 and m["policy_type"] == "diffusion"
    assert m["obs"] == {"keypoints": {"shape": [2, 20], "dtype": "float32", "kind": "low_dim"}}
    assert (m["action_dim"], m["horizon"], m["n_obs_steps"], m["n_action_steps"]) == (2, 16, 2, 8)
    assert m["control_hz"] == 10.0 and m["sampler"] == "ddim" and m["num_inference_steps"] == 4


def test_round_trip_equals_in_process_inference_exactly(server, ref_policy) -> None:
    with PolicyClient(server.url) as client:
        for i in range(3):
            obs = make_obs(i)
            out = client.infer(obs, seed=i, request_id=f"r{i}")
            want = in_process(ref_policy, obs, seed=i)
            assert out["actions"].shape == (8, 2) and out["action_pred"].shape == (16, 2)
            np.testing.assert_array_equal(out["actions"], want["action"])
            np.testing.assert_array_equal(out["action_pred"], want["action_pred"])
            assert out["request_id"] == f"r{i}" and out["batch_size"] == 1
            assert 0 < out["infer_ms"] <= out["server_ms"]
        # A batched request (B, To, ...) gets (B, Ta, Da), equal to in-process with the same B.
        obs = make_obs(7, batch=3)
        out = client.infer(obs, seed=11)
        want = in_process(ref_policy, obs, seed=11)
        assert out["actions"].shape == (3, 8, 2)
        np.testing.assert_array_equal(out["actions"], want["action"])
        # float64 observations are accepted and cast like in-process inference casts them.
        out64 = client.infer({"keypoints": make_obs(0)["keypoints"].astype(np.float64)}, seed=0)
        np.testing.assert_array_equal(
            out64["actions"], in_process(ref_policy, make_obs(0), 0)["action"]
        )
        # Without a seed the server's own generator draws the noise: answers differ per call.
        a, b = client.infer(make_obs(0)), client.infer(make_obs(0))
        assert not np.array_equal(a["actions"], b["actions"])


def test_concurrent_clients_are_micro_batched_and_each_gets_its_own_rows(ckpt, ref_policy) -> None:
    """8 robots sending together share forward passes, and each gets what in-process gives it."""
    n = 8
    # A long wait: the batcher still dispatches as soon as all 8 connections have a request queued.
    srv = start_server(ckpt, batch_wait_ms=5000)
    barrier = threading.Barrier(n)
    replies: dict[int, list[dict]] = {}
    errors: list[BaseException] = []

    def robot(i: int) -> None:
        try:
            with PolicyClient(srv.url) as client:
                barrier.wait(10)
                replies[i] = [
                    client.infer(make_obs(i), seed=100 * i + r, request_id=f"{i}-{r}")
                    for r in range(3)
                ]
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=robot, args=(i,)) for i in range(n)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        srv.close()
    assert not errors, errors
    answers = []
    for i in range(n):
        for r, out in enumerate(replies[i]):
            assert out["request_id"] == f"{i}-{r}"  # in order, none lost
            assert out["batch_size"] == n  # all 8 in one forward pass
            want = in_process(ref_policy, make_obs(i), seed=100 * i + r)
            np.testing.assert_allclose(out["actions"], want["action"], rtol=0, atol=BATCH_ATOL)
            np.testing.assert_allclose(
                out["action_pred"], want["action_pred"], rtol=0, atol=BATCH_ATOL
            )
            answers.append(out["actions"])
    # The tolerance is far below the gap between clients' answers: swapped rows would fail.
    gaps = [np.abs(a - b).max() for j, a in enumerate(answers) for b in answers[j + 1 :]]
    assert min(gaps) > 100 * BATCH_ATOL


def test_ddpm_seeded_requests_run_alone_and_equal_in_process(ckpt) -> None:
    """DDPM draws noise at every step: a seeded request gets its own forward pass and generator."""
    srv = start_server(ckpt, sampler="ddpm", batch_wait_ms=2000)
    ref = load_policy(ckpt)[0]
    ref.set_sampler("ddpm")
    out: dict[int, dict] = {}
    barrier = threading.Barrier(2)

    def robot(i: int) -> None:
        with PolicyClient(srv.url) as client:
            barrier.wait(10)
            out[i] = client.infer(make_obs(i), seed=i)

    try:
        assert srv.metadata["sampler"] == "ddpm" and not srv.metadata["seeded_requests_batched"]
        threads = [threading.Thread(target=robot, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        srv.close()
    for i in range(2):
        assert out[i]["batch_size"] == 1
        np.testing.assert_array_equal(
            out[i]["actions"], in_process(ref, make_obs(i), seed=i)["action"]
        )


# --- bad input -----------------------------------------------------------------------------------


def _marker(dtype: str, shape: list, data: bytes) -> dict:
    return {b"__ndarray__": True, b"data": data, b"dtype": dtype, b"shape": shape}


def _nan_obs() -> dict:
    x = make_obs(0)["keypoints"].copy()
    x[1, 3] = np.nan
    return {"keypoints": x}


def _inf_obs() -> dict:
    x = make_obs(0)["keypoints"].astype(np.float64)
    x[0, 0] = 1e300  # finite in float64, Inf once cast to float32
    return {"keypoints": x}


BAD_REQUESTS = {
    "garbage bytes": (b"\xc1\x00garbage", "not valid msgpack"),
    "text frame": ("hello", "text frames are not requests"),
    "not a map": (packb([1, 2, 3]), "must be a map"),
    "missing key": (packb({"seed": 1}), "missing key(s) ['keypoints']"),
    "unknown key": (
        packb({**make_obs(0), "keypoint": make_obs(0)["keypoints"]}),
        "unknown request key(s) ['keypoint']",
    ),
    "wrong shape": (
        packb({"keypoints": np.zeros((2, 19), np.float32)}),
        "has shape (2, 19), expected (2, 20)",
    ),
    "wrong To": (packb({"keypoints": np.zeros((3, 20), np.float32)}), "has shape (3, 20)"),
    "wrong dtype": (
        packb({"keypoints": np.zeros((2, 20), bool)}),
        "has dtype bool, expected float32",
    ),
    "string dtype": (packb({"keypoints": np.full((2, 20), "a")}), "has dtype <U1"),
    "not an array": (packb({"keypoints": [[0.0] * 20] * 2}), "must be a numpy array, got list"),
    "NaN": (packb(_nan_obs()), "contains NaN or Inf"),
    "Inf": (packb(_inf_obs()), "contains NaN or Inf"),
    "object array": (
        msgpack.packb({"keypoints": _marker("|O8", [2, 20], b"\0" * 320)}),
        "'|O8' is not allowed",
    ),
    "complex array": (
        msgpack.packb({"keypoints": _marker("<c8", [2, 20], b"\0" * 320)}),
        "'<c8' is not allowed",
    ),
    "short data": (msgpack.packb({"keypoints": _marker("<f4", [2, 20], b"\0" * 16)}), "needs 160"),
    "bad seed": (packb({**make_obs(0), "seed": -1}), "seed must be an int"),
    "bool seed": (packb({**make_obs(0), "seed": True}), "seed must be an int"),
    "batch too big": (packb(make_obs(0, batch=40)), "1..32 rows"),
    "empty batch": (packb({"keypoints": np.zeros((0, 2, 20), np.float32)}), "1..32 rows"),
}


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
def test_bad_request_gets_one_line_error_and_connection_stays_usable(
    server, ref_policy, name
) -> None:
    frame, reason = BAD_REQUESTS[name]
    with connect(server.url, compression=None, max_size=None) as ws:
        unpackb(ws.recv(timeout=10))  # metadata
        ws.send(frame)
        reply = ws.recv(timeout=10)
        assert isinstance(reply, str), f"expected a text error frame, got {reply!r}"
        assert reply.startswith("error: ") and "\n" not in reply
        assert reason in reply, reply
        # Same connection, a good request: answered normally.
        ws.send(packb({**make_obs(1), "seed": 3, "request_id": 9}))
        out = unpackb(ws.recv(timeout=10))
        np.testing.assert_array_equal(
            out["actions"], in_process(ref_policy, make_obs(1), 3)["action"]
        )
        assert out["request_id"] == 9


def test_errors_name_the_request_id_and_our_client_raises_server_error(server) -> None:
    with PolicyClient(server.url) as client:
        with pytest.raises(ServerError, match=r"request 'abc': .*contains NaN or Inf"):
            client.infer(_nan_obs(), request_id="abc")
        assert client.infer(make_obs(0), seed=0)["actions"].shape == (8, 2)


def test_oversize_message_is_refused_by_close_1009_and_others_keep_working(server) -> None:
    big = {"keypoints": np.zeros((20, 2, 20), np.float32), "pad": np.zeros(100_000, np.uint8)}
    with PolicyClient(server.url) as other, PolicyClient(server.url) as client:
        with pytest.raises(MessageTooBig, match=r"exceeds limit of 65536 bytes"):
            client.infer(big)
        assert other.infer(make_obs(0), seed=0)["batch_size"] == 1
        # The refused client reconnects on its next call.
        assert client.infer(make_obs(0), seed=0)["actions"].shape == (8, 2)


# --- faults --------------------------------------------------------------------------------------


def raw_websocket(port: int) -> socket.socket:
    """A hand-made websocket handshake, so a test can send broken or partial frames."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    key = base64.b64encode(os.urandom(16)).decode()
    s.sendall(
        (
            f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    buf = b""
    while b"\r\n\r\n" not in buf:
        buf += s.recv(4096)
    assert b" 101 " in buf.split(b"\r\n", 1)[0], buf
    return s


def masked_frame(payload: bytes, announce: int | None = None) -> bytes:
    """A client binary frame; `announce` lies about the length to leave the frame unfinished."""
    n = len(payload) if announce is None else announce
    head = bytes([0x82]) + (
        bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + n.to_bytes(2, "big")
    )
    mask = os.urandom(4)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def test_clients_that_vanish_mid_request_or_stall_do_not_disturb_others(server, ref_policy) -> None:
    # Three clients send a full request and drop the TCP connection before the answer.
    for i in range(3):
        s = raw_websocket(server.port)
        s.sendall(masked_frame(packb({**make_obs(i), "seed": i})))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()  # RST
    # One stalls in the middle of a frame, one opens TCP and never handshakes, one never reads.
    stalled = raw_websocket(server.port)
    stalled.sendall(masked_frame(b"\x81" * 10, announce=1000)[:20])
    silent = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    deaf = raw_websocket(server.port)
    deaf.sendall(masked_frame(packb({**make_obs(0), "seed": 0})) * 3)
    try:
        with PolicyClient(server.url, timeout=10) as client:
            for i in range(5):
                t = time.perf_counter()
                out = client.infer(make_obs(i), seed=i)
                assert time.perf_counter() - t < 5
                want = in_process(ref_policy, make_obs(i), i)["action"]  # maybe batched with "deaf"
                np.testing.assert_allclose(out["actions"], want, rtol=0, atol=BATCH_ATOL)
    finally:
        for s in (stalled, silent, deaf):
            s.close()


def test_hundred_clients_connecting_at_once_all_get_their_answers(server, ref_policy) -> None:
    n, variants = 100, 5
    refs = {v: in_process(ref_policy, make_obs(v), seed=v)["action"] for v in range(variants)}

    async def one(i: int) -> tuple[int, dict]:
        from websockets.asyncio.client import connect as aconnect

        async with aconnect(server.url, compression=None, max_size=None, open_timeout=30) as ws:
            unpackb(await ws.recv())
            await ws.send(packb({**make_obs(i % variants), "seed": i % variants, "request_id": i}))
            return i, unpackb(await asyncio.wait_for(ws.recv(), 30))

    async def all_at_once() -> list[tuple[int, dict]]:
        return await asyncio.gather(*(one(i) for i in range(n)))

    t = time.perf_counter()
    results = asyncio.run(all_at_once())
    elapsed = time.perf_counter() - t
    assert len(results) == n and elapsed < 30
    for i, out in results:
        assert out["request_id"] == i
        np.testing.assert_allclose(out["actions"], refs[i % variants], rtol=0, atol=BATCH_ATOL)
    assert max(out["batch_size"] for _, out in results) > 1  # they were batched


def test_client_reconnects_and_times_out(ckpt) -> None:
    # Nothing listening: a bounded wait, then a clear error.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t = time.perf_counter()
    with pytest.raises(ServerUnavailable, match="cannot connect"):
        PolicyClient(f"ws://127.0.0.1:{port}", connect_timeout=0.5)
    assert time.perf_counter() - t < 5
    # A server restarted on the same port: the client reconnects and resends.
    srv = start_server(ckpt, warmup=False)
    port = srv.port
    client = PolicyClient(srv.url)
    client.infer(make_obs(0), seed=0)
    srv.close()
    srv = start_server(ckpt, warmup=False, port=port)
    try:
        assert client.infer(make_obs(0), seed=0)["actions"].shape == (8, 2)
        assert client.reconnects == 1
    finally:
        client.close()
        srv.close()


def test_client_times_out_on_a_server_that_never_answers() -> None:
    from websockets.sync.server import serve

    def mute(ws) -> None:
        ws.send(packb({"n_obs_steps": 2}))
        for _ in ws:  # read requests, never answer
            pass

    with serve(mute, "127.0.0.1", 0) as srv:
        thread = threading.Thread(target=srv.serve_forever, daemon=True)
        thread.start()
        port = srv.socket.getsockname()[1]
        client = PolicyClient(f"ws://127.0.0.1:{port}", timeout=0.3)
        with pytest.raises(InferenceTimeout, match="within 0.3 s"):
            client.infer(make_obs(0))
        client.close()
        srv.shutdown()
    thread.join(5)


# --- token and health ----------------------------------------------------------------------------


def test_token_is_checked_at_the_handshake_and_healthz_is_open(ckpt, ref_policy) -> None:
    srv = start_server(ckpt, token="s3cret", warmup=False)
    try:
        with pytest.raises(AuthError, match="401.*missing token"):
            PolicyClient(srv.url)
        with pytest.raises(AuthError, match="401.*wrong token"):
            PolicyClient(srv.url, token="guess")
        with PolicyClient(srv.url, token="s3cret") as client:
            out = client.infer(make_obs(0), seed=0)
        np.testing.assert_array_equal(
            out["actions"], in_process(ref_policy, make_obs(0), 0)["action"]
        )
        with urllib.request.urlopen(f"http://127.0.0.1:{srv.port}/healthz", timeout=10) as r:
            assert r.status == 200 and r.read() == b"ok\n"
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(f"http://127.0.0.1:{srv.port}/", timeout=10)
        assert e.value.code == 401
        e.value.close()  # else the server waits out its close timeout for this socket
        assert srv.stats["unauthorized"] == 3
    finally:
        srv.close()


def test_server_binds_loopback_by_default() -> None:
    assert ServeConfig().host == "127.0.0.1"


# --- the client stays light ----------------------------------------------------------------------


def test_client_and_chunking_import_no_torch() -> None:
    code = (
        "import sys; import diffusion_policy.serving.client, diffusion_policy.chunking, "
        "diffusion_policy.serving.protocol; "
        "bad = [m for m in ('torch', 'diffusers', 'gymnasium') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


# --- dp eval through the server ------------------------------------------------------------------


class SeededActor:
    """In-process twin of RemoteActor: call i uses seed + i."""

    def __init__(self, policy, seed: int = 0):
        self.policy, self.seed, self.calls = policy, seed, 0
        self.n_obs_steps = policy.config.n_obs_steps

    def __call__(self, obs):
        out = in_process(self.policy, obs, self.seed + self.calls)["action"]
        self.calls += 1
        return out


def test_eval_through_the_server_equals_in_process_per_seed(server, ref_policy, ckpt) -> None:
    from dataclasses import replace

    from diffusion_policy.checkpoint import read_checkpoint_meta
    from diffusion_policy.evaluation.rollout import evaluate

    _, cfg, _ = read_checkpoint_meta(ckpt)
    ecfg = replace(cfg.eval, n_episodes=2, max_steps=12, n_envs=2, vector="sync", n_videos=0)
    local = evaluate(SeededActor(ref_policy, seed=5), cfg.task, ecfg, progress=False)
    with PolicyClient(server.url) as client:
        remote = evaluate(RemoteActor(client, seed=5), cfg.task, ecfg, progress=False)
    assert remote["per_seed"] == local["per_seed"]


class SeededPlanner(SeededActor):
    """In-process twin of RemoteActor.plan: call i plans with seed + i through guidance.plan_chunk."""

    def __init__(self, policy, seed: int = 0):
        super().__init__(policy, seed)
        self.horizon, self.n_action_steps = policy.config.horizon, policy.config.n_action_steps

    def plan(self, obs, prefix=None, delay=0, guidance="none", n_samples=16):
        from diffusion_policy.policies.guidance import plan_chunk

        gen = torch.Generator().manual_seed(self.seed + self.calls)
        self.calls += 1
        p = None if prefix is None else torch.as_tensor(prefix, dtype=torch.float32)
        with torch.no_grad():
            out = plan_chunk(self.policy, obs, generator=gen, prefix=p, delay=delay,
                             guidance=guidance, n_samples=n_samples)  # fmt: skip
        return out["action_pred"][:, self.n_obs_steps - 1 :].numpy()


@pytest.mark.parametrize("strategy", ["rtc", "bid"])
def test_delayed_rtc_and_bid_through_the_server_equal_in_process_per_seed(
    server, ref_policy, ckpt, strategy
) -> None:
    """The executing prefix, the delay and the guidance cross the wire: a delayed evaluation through
    `dp serve` plans exactly what the in-process planner does, and differs from plain async."""
    from dataclasses import replace

    from diffusion_policy.checkpoint import read_checkpoint_meta
    from diffusion_policy.evaluation.rollout import evaluate
    from diffusion_policy.execution import ExecutionSpec

    _, cfg, _ = read_checkpoint_meta(ckpt)
    ecfg = replace(cfg.eval, n_episodes=2, max_steps=20, n_envs=2, vector="sync", n_videos=0)
    spec = ExecutionSpec(strategy=strategy, delay=2, n_samples=3)
    local = evaluate(
        SeededPlanner(ref_policy, seed=5), cfg.task, ecfg, progress=False, execution=spec
    )
    with PolicyClient(server.url) as client:
        remote = evaluate(
            RemoteActor(client, seed=5), cfg.task, ecfg, progress=False, execution=spec
        )
    assert remote["per_seed"] == local["per_seed"] and remote["smoothness"] == local["smoothness"]
    plain = evaluate(
        SeededPlanner(ref_policy, seed=5), cfg.task, ecfg, progress=False,
        execution=ExecutionSpec(strategy="async", delay=2),
    )  # fmt: skip
    assert plain["smoothness"] != local["smoothness"]  # the guidance changed what was executed


def test_dp_eval_cli_with_server_and_realtime(server, ckpt, tmp_path) -> None:
    from diffusion_policy.cli.main import main

    out = tmp_path / "rt"
    args = ["eval", str(ckpt), "--server", server.url, "--realtime", "--episodes", "2"]
    assert main([*args, "--max-steps", "20", "--videos", "0", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    rt = metrics["realtime"]
    assert metrics["n_episodes"] == 2 and rt["n_robots"] == 2 and rt["steps"] == 40
    assert rt["plans"] >= 4 and rt["plan_latency_ms_p50"] > 0
    # The in-process realtime path too.
    assert (
        main(
            [
                "eval",
                str(ckpt),
                "--realtime",
                "--episodes",
                "1",
                "--max-steps",
                "5",
                "--videos",
                "0",
                "--out",
                str(tmp_path / "rt2"),
            ]
        )
        == 0
    )


def test_dp_serve_command_serves_and_stops_on_sigterm(ckpt) -> None:
    dp = shutil.which("dp", path=str(Path(sys.executable).parent)) or "dp"
    proc = subprocess.Popen(
        [dp, "serve", str(ckpt), "--port", "0", "--threads", "1", "--inference-steps", "2"],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url = None
        deadline = time.monotonic() + 120
        lines = []
        while url is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            lines.append(line)
            if "serving on " in line:
                url = line.split("serving on ")[1].split()[0]
        assert url and url.startswith("ws://127.0.0.1:"), "".join(lines)
        with PolicyClient(url) as client:
            assert client.metadata["num_inference_steps"] == 2
            assert client.infer(make_obs(0))["actions"].shape == (8, 2)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        proc.stderr.close()


def test_dp_serve_rejects_bad_arguments_in_one_line(ckpt, capsys) -> None:
    from diffusion_policy.cli.main import main

    assert main(["serve", str(ckpt), "--max-batch", "0"]) == 2
    assert "--max-batch=0" in capsys.readouterr().err
    assert main(["serve", str(ckpt.parent / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


# --- the unmodified openpi client ----------------------------------------------------------------

OPENPI_SCRIPT = r"""
import json, sys
import numpy as np
from openpi_client.websocket_client_policy import WebsocketClientPolicy

url, token, obs_file, out_file = sys.argv[1:5]
policy = WebsocketClientPolicy(host=url, api_key=token or None)
meta = policy.get_server_metadata()
obs = np.load(obs_file)
first = policy.infer({"keypoints": obs, "seed": 7})
try:
    policy.infer({"keypoints": obs[:, :5]})
    error = None
except RuntimeError as e:
    error = str(e)
second = policy.infer({"keypoints": obs, "seed": 8, "request_id": "openpi-2"})
np.savez(out_file, a1=first["actions"], p1=first["action_pred"], a2=second["actions"])
print(json.dumps({"meta": meta, "error": error, "rid": second["request_id"], "numpy": np.__version__,
                  "keys": sorted(first)}))
"""


def openpi_python() -> Path:
    if not OPENPI_PYTHON.exists():
        reason_file = REPO / ".venv-openpi.failed"
        why = reason_file.read_text().strip()[-300:] if reason_file.exists() else "not created"
        pytest.skip(
            f"openpi-client venv {OPENPI_PYTHON.parent.parent} is missing ({why}); "
            "run scripts/setup_openpi_venv.sh (needs PyPI)"
        )
    return OPENPI_PYTHON


def test_unmodified_openpi_client_round_trip_equals_in_process(ckpt, ref_policy, tmp_path) -> None:
    python = openpi_python()
    srv = start_server(ckpt, token="tok")
    try:
        obs = make_obs(3)["keypoints"]
        np.save(tmp_path / "obs.npy", obs)
        script = tmp_path / "openpi_round_trip.py"
        script.write_text(OPENPI_SCRIPT)
        r = subprocess.run(
            [
                str(python),
                str(script),
                srv.url,
                "tok",
                str(tmp_path / "obs.npy"),
                str(tmp_path / "out.npz"),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert r.returncode == 0, r.stdout + r.stderr
        report = json.loads(r.stdout.strip().splitlines()[-1])
        assert report["numpy"].startswith("1.")  # really the numpy<2 client
        got = np.load(tmp_path / "out.npz")
        want7 = in_process(ref_policy, {"keypoints": obs}, seed=7)
        np.testing.assert_array_equal(got["a1"], want7["action"])
        np.testing.assert_array_equal(got["p1"], want7["action_pred"])
        np.testing.assert_array_equal(
            got["a2"], in_process(ref_policy, {"keypoints": obs}, seed=8)["action"]
        )
        assert report["meta"]["obs"]["keypoints"]["shape"] == [2, 20]
        assert report["meta"]["n_action_steps"] == 8
        assert (
            "has shape (2, 5), expected (2, 20)" in report["error"]
        )  # RuntimeError, then it carried on
        assert report["rid"] == "openpi-2"
        assert {"actions", "action_pred", "infer_ms", "server_ms"} <= set(report["keys"])
        # Without the token the openpi client is turned away at the handshake.
        r = subprocess.run(
            [
                str(python),
                str(script),
                srv.url,
                "",
                str(tmp_path / "obs.npy"),
                str(tmp_path / "x.npz"),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert r.returncode != 0 and "401" in r.stderr
    finally:
        srv.close()


def test_non_finite_actions_are_never_sent(ckpt) -> None:
    """A broken checkpoint (a NaN weight) answers a plausible observation with an error line."""
    policy, cfg, meta = load_policy(ckpt)
    with torch.no_grad():
        next(policy.model.parameters()).fill_(float("nan"))
    srv = PolicyServer(policy, cfg, ServeConfig(port=0, warmup=False), meta).start_in_thread()
    try:
        with PolicyClient(srv.url) as client:
            with pytest.raises(ServerError, match="not finite.*within the training range"):
                client.infer(make_obs(0), seed=0)
    finally:
        srv.close()


def test_policy_contract_states_what_the_server_needs(ckpt) -> None:
    from diffusion_policy.policies.ibc import IBCConfig, IBCPolicy

    policy = load_policy(ckpt)[0]
    assert policy.noise_shape(3) == (3, 16, 2) and policy.deterministic_given_noise()
    assert "cpu" in policy.inference_backends() and not policy.builds_per_batch_size()
    policy.set_inference_backend("cpu")
    assert policy.builds_per_batch_size() and policy.prepare_concurrently()
    policy.set_sampler("ddpm")
    assert not policy.deterministic_given_noise() and not policy.builds_per_batch_size()
    assert policy.sampler_settings()["sampler"] == "ddpm"
    ibc = IBCPolicy(IBCConfig.tiny(), policy.shape_meta)
    assert ibc.noise_shape(1) is None and not ibc.deterministic_given_noise()
    with pytest.raises(ValueError, match="takes no initial noise"):
        ibc.predict_action_chunk(make_obs(0, batch=1), noise=torch.zeros(1))


def test_bench_server_compares_like_with_like(ckpt) -> None:
    """The in-process baseline and the served policy use the same sampler, steps and backend."""
    import argparse
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_server", REPO / "scripts/bench_server.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = argparse.Namespace(
        checkpoint=str(ckpt), threads=1, sampler="ddim", inference_steps=3, backend="fused",
        max_batch=4, batch_wait_ms=2.0,
    )  # fmt: skip
    cmd = bench.server_command(args)
    assert (
        cmd[cmd.index("--backend") + 1] == "fused"
        and cmd[cmd.index("--inference-steps") + 1] == "3"
    )
    policy = bench.bench_policy(str(ckpt), "ddim", 3, "fused")
    assert policy.sampler_settings() == {
        "sampler": "ddim", "num_inference_steps": 3, "timestep_spacing": "leading", "backend": "fused",
    }  # fmt: skip
    assert len(bench.in_process_latency(str(ckpt), "ddim", 3, 1, n=2, backend="fused")) == 2
