"""`dp serve` as its own process on loopback, against hostile clients with a well-behaved one beside.

Each test runs a good client in a thread (a bounded number of requests, each checked against the
answer it should get) while a hostile client does one thing the field report (issue 17, items
13-19) found to hurt; then checks what the hostile client got and that the good one lost nothing.
Every address is 127.0.0.1.
"""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import msgpack
import numpy as np
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from diffusion_policy.serving.client import _CONNECT_COMPAT, AuthError, PolicyClient
from diffusion_policy.serving.protocol import packb, unpackb

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, pusht_zarr) -> Path:
    from diffusion_policy.cli.main import main

    run = tmp_path_factory.mktemp("hostile") / "run"
    args = [f"task.dataset={pusht_zarr}", f"run_dir={run}", "wandb.mode=disabled"]
    assert main(["train", "smoke", *args, "train.eval_every=0"]) == 0
    return run


class DpServe:
    """A `dp serve` process on a free loopback port; its log is kept in `lines`."""

    def __init__(self, ckpt: Path, *args: str, env: dict | None = None):
        cmd = [sys.executable, "-m", "diffusion_policy.cli", "serve", str(ckpt), "--port", "0"]
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env or {})}
        self.proc = subprocess.Popen(
            [*cmd, "--threads", "1", *args], stderr=subprocess.PIPE, text=True, env=env
        )
        self.lines: list[str] = []
        self.url = None
        for line in self.proc.stderr:
            self.lines.append(line)
            if "serving on " in line:
                self.url = line.split("serving on ")[1].split()[0]
                break
        assert self.url and self.url.split("://")[1].startswith("127.0.0.1:"), "".join(self.lines)
        self.port = int(self.url.rsplit(":", 1)[1])
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()

    def _drain(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line)

    def wait_for_log(self, text: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not any(text in line for line in self.lines):
            assert time.monotonic() < deadline, f"no {text!r} in the log:\n" + "".join(self.lines)
            time.sleep(0.05)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(10)


def make_obs(i: int, batch: int | None = None) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1000 + i)
    shape = (2, 20) if batch is None else (batch, 2, 20)
    return {"keypoints": rng.uniform(50, 450, shape).astype(np.float32)}


class GoodClient:
    """A polite robot beside the hostile one: seeded requests, each answer checked for its id and
    for being the same as the first answer to that seed (so a mixed-up or lost reply fails)."""

    def __init__(self, url: str, n: int = 400, **kw):
        self.client = PolicyClient(url, timeout=30, **kw)
        self.n, self.done, self.errors, self.latencies = n, 0, [], []
        self.want = self.client.infer(make_obs(0), seed=0)["actions"]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        for i in range(self.n):
            if self._stop.is_set():
                break
            try:
                t = time.perf_counter()
                out = self.client.infer(make_obs(0), seed=0, request_id=f"good-{i}")
                self.latencies.append(time.perf_counter() - t)
                assert out["request_id"] == f"good-{i}"
                np.testing.assert_allclose(out["actions"], self.want, rtol=0, atol=2e-3)
                self.done += 1
            except BaseException as e:
                self.errors.append(e)

    def __enter__(self) -> GoodClient:
        self._thread.start()
        while self.done < 2 and not self.errors and self._thread.is_alive():
            time.sleep(0.01)  # it really runs before the hostile client starts
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(60)
        self.client.close()
        assert not self.errors, self.errors[:3]
        assert self.done >= 2


@pytest.fixture(scope="module")
def token_file(tmp_path_factory) -> Path:
    f = tmp_path_factory.mktemp("token") / "token"
    f.write_text("s3cret-token\n")
    return f


@pytest.fixture(scope="module")
def server(run_dir, token_file):
    srv = DpServe(run_dir, "--token-file", str(token_file))
    yield srv
    assert srv.stop() == 0


TOKEN = "s3cret-token"


def hostile_ws(url: str):
    ws = connect(
        url,
        compression=None,
        max_size=None,
        additional_headers={"Authorization": f"Api-Key {TOKEN}"},
        **_CONNECT_COMPAT,
    )
    unpackb(ws.recv(timeout=10))  # metadata
    return ws


# --- 13: frames of many objects --------------------------------------------------------------------


def test_a_frame_of_millions_of_empty_maps_is_refused_and_does_not_stall_others(server) -> None:
    n = 16 * 2**20 - 64  # just under the 16 MiB frame cap
    flat = b"\xdd" + n.to_bytes(4, "big") + b"\x80" * n  # array of n empty maps
    inner = b"\xdd" + (4000).to_bytes(4, "big") + b"\x80" * 4000
    nested = b"\xdd" + (4000).to_bytes(4, "big") + inner * 4000  # 16 M maps in arrays of 4000
    with GoodClient(server.url, token=TOKEN) as good, hostile_ws(server.url) as ws:
        for frame in (flat, nested, flat):
            ws.send(frame)
            reply = ws.recv(timeout=30)
            assert isinstance(reply, str) and "more than 4096 msgpack objects" in reply, reply[:200]
        done_before = good.done
        ws.send(packb({**make_obs(1), "seed": 1}))  # the hostile connection still works
        assert unpackb(ws.recv(timeout=30))["actions"].shape == (8, 2)
    assert good.done >= done_before
    assert max(good.latencies) < 5  # the old server froze every client for 8.8 s on one such frame


# --- 15: finite but absurd observations ------------------------------------------------------------


def test_an_absurd_observation_gets_an_error_never_non_finite_actions(server) -> None:
    with GoodClient(server.url, token=TOKEN), hostile_ws(server.url) as ws:
        for value in (3e38, -3e38, 1e9):
            ws.send(packb({"keypoints": np.full((2, 20), value, np.float32), "request_id": "x"}))
            reply = ws.recv(timeout=30)
            assert isinstance(reply, str), "actions for an absurd observation were sent"
            assert "request 'x': obs['keypoints'] spans" in reply and "training range" in reply
        # A batch with one absurd row: that request is refused as a whole, the next one answered.
        obs = make_obs(2, batch=3)
        obs["keypoints"][1] = 3e38
        ws.send(packb(obs))
        assert isinstance(ws.recv(timeout=30), str)
        ws.send(packb(make_obs(2, batch=3)))
        out = unpackb(ws.recv(timeout=30))
        assert np.isfinite(out["actions"]).all()


# --- 16: bounded error texts -----------------------------------------------------------------------


def test_error_texts_are_bounded_whatever_the_input(server) -> None:
    many_keys = {f"k{i}": 0 for i in range(600_000)}
    long_keys = {**make_obs(0), **{("x" * 1000) + str(i): 0 for i in range(1000)}}
    huge_id = {**make_obs(0), "request_id": "r" * 10_000_000}
    with GoodClient(server.url, token=TOKEN), hostile_ws(server.url) as ws:
        for msg, reason in (
            (many_keys, "more than 4096 msgpack objects"),
            (long_keys, "... 995 more"),
            (huge_id, "request_id must be a string of at most 256 characters"),
        ):
            ws.send(msgpack.packb(msg) if msg is many_keys else packb(msg))
            reply = ws.recv(timeout=30)
            assert isinstance(reply, str) and reason in reply, reply[:300]
            assert len(reply) < 1200 and "\n" not in reply
            assert "rrrrrrrrrr" not in reply  # the id is not echoed


# --- 18: the handshake -----------------------------------------------------------------------------


def raw_http(port: int, headers: list[str]) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(
            (
                f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
                + "".join(h + "\r\n" for h in headers)
                + "\r\n"
            ).encode()
        )
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        return data.decode(errors="replace")


def test_two_authorization_headers_get_a_clean_400(server) -> None:
    with GoodClient(server.url, token=TOKEN):
        head = raw_http(
            server.port, [f"Authorization: Api-Key {TOKEN}", "Authorization: Api-Key x"]
        )
        assert head.startswith("HTTP/1.1 400 "), head
    assert not any("Traceback" in line or "process_request failed" in line for line in server.lines)


def test_wrong_tokens_are_throttled_per_address_and_connected_clients_go_on(server) -> None:
    codes = []
    with GoodClient(server.url, token=TOKEN) as good:
        for _ in range(12):
            head = raw_http(server.port, ["Authorization: Api-Key guess"])
            codes.append(int(head.split()[1]))
        done = good.done
    assert codes[:5] == [401] * 5 and 429 in codes[5:], codes
    assert "Retry-After" in raw_http(server.port, ["Authorization: Api-Key guess"])
    with pytest.raises(AuthError, match="429"):
        PolicyClient(server.url, token="guess")
    assert done >= 2


def test_token_from_a_file_or_the_environment_and_help_warns_about_ps(run_dir, capsys) -> None:
    from diffusion_policy.cli.main import main

    # the module's server reads its token from --token-file; here the environment variable
    srv = DpServe(run_dir, "--no-warmup", env={"DP_SERVE_TOKEN": "from-env"})
    try:
        with pytest.raises(AuthError, match="401"):
            PolicyClient(srv.url)
        with PolicyClient(srv.url, token="from-env") as c:
            assert c.infer(make_obs(0), seed=0)["actions"].shape == (8, 2)
    finally:
        assert srv.stop() == 0
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    assert "ps" in capsys.readouterr().out.replace("\n", " ")
    assert main(["serve", str(run_dir), "--token-file", str(run_dir / "nope")]) == 2
    assert "--token-file" in capsys.readouterr().err


def test_tls_serves_wss(run_dir, tmp_path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    r = subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
         "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key),
         "-out", str(cert)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    if r.returncode != 0:
        pytest.skip(f"openssl cannot make a test certificate: {r.stderr[-200:]}")
    srv = DpServe(run_dir, "--no-warmup", "--tls-cert", str(cert), "--tls-key", str(key))
    try:
        assert srv.url.startswith("wss://127.0.0.1:")
        ctx = ssl.create_default_context(cafile=str(cert))
        with PolicyClient(srv.url, ssl_context=ctx) as c:
            assert c.infer(make_obs(0), seed=0)["actions"].shape == (8, 2)
    finally:
        assert srv.stop() == 0


# --- 19: connection bursts and idle connections ------------------------------------------------------


def test_a_burst_of_raw_tcp_connects_does_not_stall_or_break_others(server) -> None:
    with GoodClient(server.url, token=TOKEN) as good:
        for _ in range(1000):
            s = socket.create_connection(("127.0.0.1", server.port), timeout=10)
            s.close()
        time.sleep(0.2)
        done = good.done
    assert done >= 2 and max(good.latencies) < 5
    with PolicyClient(server.url, token=TOKEN) as c:  # still accepting
        assert c.infer(make_obs(0), seed=0)["actions"].shape == (8, 2)


def test_idle_connected_clients_do_not_hold_batches_open(run_dir) -> None:
    """With a 60 s batch wait, the old batcher waited for every idle connection on each request."""
    srv = DpServe(run_dir, "--no-warmup", "--batch-wait-ms", "60000")
    try:
        idle = [PolicyClient(srv.url) for _ in range(3)]
        time.sleep(2.5)  # longer than the server's active window (2 s): they are idle now
        with PolicyClient(srv.url, timeout=20) as c:
            for i in range(5):
                assert c.infer(make_obs(i), seed=i)["batch_size"] == 1
        for cl in idle:
            cl.close()
    finally:
        assert srv.stop() == 0


# --- 17: stopping --------------------------------------------------------------------------------


def test_sigterm_answers_the_requests_in_flight_then_closes(run_dir) -> None:
    srv = DpServe(run_dir, "--sampler", "ddpm", "--inference-steps", "100", "--no-warmup")
    sockets = [
        connect(srv.url, compression=None, max_size=None, **_CONNECT_COMPAT) for _ in range(4)
    ]
    try:
        for ws in sockets:
            unpackb(ws.recv(timeout=10))
        for i, ws in enumerate(sockets):  # seeded DDPM requests run one after another
            ws.send(packb({**make_obs(i, batch=32), "seed": i, "request_id": i}))
        time.sleep(0.3)  # received by the server, the first one in inference
        srv.proc.send_signal(signal.SIGTERM)
        for i, ws in enumerate(sockets):
            out = unpackb(ws.recv(timeout=60))  # a reply, not close 1001
            assert out["request_id"] == i and out["actions"].shape == (32, 8, 2)
            with pytest.raises(ConnectionClosed) as e:
                ws.recv(timeout=30)
            assert e.value.rcvd is not None and e.value.rcvd.code == 1001
        assert srv.proc.wait(30) == 0
    finally:
        for ws in sockets:
            ws.close()
        srv.stop()


def test_an_idle_stop_is_quick_even_with_half_open_connections(run_dir) -> None:
    srv = DpServe(run_dir, "--no-warmup")
    silent = socket.create_connection(("127.0.0.1", srv.port), timeout=10)  # never handshakes
    client = PolicyClient(srv.url)
    try:
        t = time.perf_counter()
        srv.proc.send_signal(signal.SIGTERM)
        assert srv.proc.wait(30) == 0
        # the old server waited out the 10 s opening-handshake timeout of the silent connection
        assert time.perf_counter() - t < 8
    finally:
        silent.close()
        client.close()
        srv.stop()


# --- 14 and the start-up log ------------------------------------------------------------------------


def test_startup_builds_a_few_sizes_after_listening_and_pads_batches(run_dir) -> None:
    import torch

    from diffusion_policy.checkpoint import load_policy

    srv = DpServe(run_dir, "--backend", "cpu", "--max-batch", "6")
    try:
        log = "".join(srv.lines)
        assert "warm-up: batch size 1 ready in" in log and "s after start" in log
        srv.wait_for_log("warm-up: all 4 batch sizes ready")  # 1, 2, 4 and 6
        text = "".join(srv.lines)
        assert text.index("serving on") < text.index("batch size 6 ready")
        policy = load_policy(run_dir)[0]
        policy.set_inference_backend("cpu")
        obs = make_obs(5, batch=3)  # padded to a built size (4) on the server
        with PolicyClient(srv.url) as c:
            out = c.infer(obs, seed=9)
        noise = torch.randn(policy.noise_shape(3), generator=torch.Generator().manual_seed(9))
        want = policy.predict_action_chunk(obs, noise=noise)["action"].numpy()
        np.testing.assert_allclose(out["actions"], want, rtol=0, atol=2e-3)
    finally:
        assert srv.stop() == 0


# --- 4: the checkpoint identity ----------------------------------------------------------------------


def test_dp_eval_refuses_a_server_that_serves_another_checkpoint(run_dir, capsys, tmp_path) -> None:
    from diffusion_policy.cli.main import main

    served = (run_dir / "checkpoints" / "latest").resolve()
    other = next(p for p in (run_dir / "checkpoints").glob("step_*") if p.resolve() != served)
    srv = DpServe(run_dir, "--no-warmup")
    try:
        meta = PolicyClient(srv.url).metadata
        assert len(meta["checkpoint"]["sha256"]) == 64
        assert meta["checkpoint"]["sampler"] == meta["sampler"] == "ddim"
        args = ["--episodes", "1", "--max-steps", "4", "--videos", "0"]
        assert main(["eval", str(other), "--server", srv.url, *args, "--out", str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert "serves another checkpoint" in err and str(served) in err and str(other) in err
    finally:
        assert srv.stop() == 0


# --- issue 14: the planning fields (prefix, delay, guidance, n_samples) ----------------------------


def test_planning_fields_are_checked_naming_the_field_and_guided_requests_are_answered(
    server, run_dir
) -> None:
    import torch

    from diffusion_policy.checkpoint import load_policy
    from diffusion_policy.policies.guidance import plan_chunk

    prefix = np.linspace(100, 300, 16, dtype=np.float32).reshape(8, 2)
    obs, batch = make_obs(3), make_obs(3, batch=3)
    nan = prefix.copy()
    nan[2, 1] = np.nan
    bad = [
        (
            {**obs, "prefix": prefix[:, :1]},
            "prefix has shape (8, 1), expected (P, Da) or (1, P, Da) with Da=2",
        ),
        ({**obs, "prefix": np.zeros((16, 2), np.float32)}, "P=16"),
        (
            {**obs, "prefix": prefix, "delay": 14},
            "delay=14: must be an int in [0, horizon - n_obs_steps = 14)",
        ),
        ({**obs, "prefix": prefix[:2], "delay": 3}, "need delay=3 <= P"),
        ({**obs, "prefix": prefix, "delay": "3"}, "delay='3'"),
        ({**obs, "prefix": prefix, "guidance": "magic"}, "guidance='magic'"),
        ({**obs, "prefix": prefix, "guidance": "bid", "n_samples": 1000}, "n_samples=1000"),
        ({**obs, "prefix": nan, "guidance": "rtc"}, "prefix contains NaN or Inf"),
        ({**obs, "prefix": [1.0, 2.0]}, "prefix must be a float array"),
        ({**batch, "prefix": np.zeros((2, 8, 2), np.float32)}, "expected (B=3, P, Da)"),
        ({**batch, "prefix": prefix}, "expected (B=3, P, Da)"),
    ]
    with GoodClient(server.url, token=TOKEN) as good, hostile_ws(server.url) as ws:
        for msg, reason in bad:
            ws.send(packb({**msg, "request_id": "p"}))
            reply = ws.recv(timeout=30)
            assert isinstance(reply, str) and reason in reply, (reason, reply[:300])
            assert reply.startswith("error: request 'p': ") and "\n" not in reply
        done_before = good.done
        ws.send(packb({**obs, "prefix": prefix, "delay": 2, "guidance": "rtc", "seed": 5}))
        rtc = unpackb(ws.recv(timeout=60))
        ws.send(
            packb(
                {
                    **batch,
                    "prefix": np.stack([prefix] * 3),
                    "delay": 1,
                    "guidance": "bid",
                    "n_samples": 4,
                }
            )
        )
        bid = unpackb(ws.recv(timeout=60))
    assert good.done >= done_before
    assert rtc["actions"].shape == (8, 2) and bid["actions"].shape == (3, 8, 2)
    policy = load_policy(run_dir / "checkpoints" / "latest")[0]
    want = plan_chunk(
        policy,
        {"keypoints": torch.from_numpy(obs["keypoints"][None])},
        generator=torch.Generator().manual_seed(5),
        prefix=torch.from_numpy(prefix[None]),
        delay=2,
        guidance="rtc",
    )["action_pred"][0].numpy()
    np.testing.assert_allclose(rtc["action_pred"], want, rtol=0, atol=2e-3)


def test_metadata_says_which_guidances_the_policy_supports(server) -> None:
    with PolicyClient(server.url, token=TOKEN) as client:
        m = client.metadata
    assert m["guidances"] == ["none", "rtc", "bid"] and m["max_samples"] == 64
