"""The CUDA-graphed training step (diffusion_policy/training/graph.py): same run as the eager step.

The equivalence tests need CUDA and skip without it (CI has no GPU; they ran on a lent H100, see
docs/BENCHMARKS.md). What does not need a GPU runs everywhere: the EMA and the selection logic.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

from diffusion_policy.config import load_config
from diffusion_policy.errors import ConfigError
from diffusion_policy.models.ema import EMAModel
from diffusion_policy.training.loop import Dist, _use_cuda_graph, train

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_ema_apply_with_a_tensor_weight_equals_step():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    a, b = EMAModel(model), EMAModel(model)
    for _ in range(5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        a.step(model)
        b.apply(model, torch.tensor(1.0 - b.next_decay()))
    for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values(), strict=True):
        torch.testing.assert_close(x, y)
    assert a.optimization_step == b.optimization_step == 5 and a.decay == b.decay


def test_graph_selection():
    from diffusion_policy.registry import policy_class

    cfg = load_config("smoke", [])
    policy = policy_class("diffusion")(cfg.policy, _meta())
    assert not _use_cuda_graph(cfg, policy, "cpu", Dist())  # auto: off without CUDA
    on = load_config("smoke", ["train.cuda_graph=true"])
    with pytest.raises(ConfigError, match="cannot be graphed: it needs CUDA"):
        _use_cuda_graph(on, policy, "cpu", Dist())
    ibc_cfg = load_config("smoke_ibc", ["train.cuda_graph=true"])
    ibc = policy_class("ibc")(ibc_cfg.policy, _meta())
    with pytest.raises(ConfigError, match="not marked graph_safe"):
        _use_cuda_graph(ibc_cfg, ibc, "cuda", Dist())
    with pytest.raises(ConfigError, match="multi-process"):
        _use_cuda_graph(on, policy, "cuda", Dist(rank=0, world=2))


def _meta():
    from diffusion_policy.shapes import ObsSpec, ShapeMeta

    return ShapeMeta(obs={"keypoints": ObsSpec((20,), "float32", "low_dim")}, action_dim=2)


def _run(tmp_path, name: str, pusht_zarr, extra: list[str]) -> tuple[list[float], dict]:
    cfg = load_config(
        "smoke",
        [f"task.dataset={pusht_zarr}", f"run_dir={tmp_path / name}", "train.device=cuda",
         "train.max_steps=40", "train.log_every=5", "train.eval_every=0", "train.final_eval=false",
         "train.val_every=0", "train.progress=false", "train.grad_clip_norm=1.0", *extra],
    )  # fmt: skip
    train(cfg)
    rows = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    from safetensors.torch import load_file

    weights = load_file(tmp_path / name / "checkpoints" / "latest" / "model.safetensors")
    return losses, weights


@cuda
@pytest.mark.parametrize(
    "extra",
    [[], ["task.obs_type=pixels_agent_pos", "policy.encoder.resnet_width=16"]],
    ids=["state", "image"],
)
def test_graphed_run_equals_eager_run(tmp_path, pusht_zarr, extra):
    torch.backends.cudnn.deterministic = True
    eager = _run(tmp_path, "eager", pusht_zarr, ["train.cuda_graph=false", *extra])
    graph = _run(tmp_path, "graph", pusht_zarr, ["train.cuda_graph=true", *extra])
    # same batches, noise, crops, lr schedule and EMA: the curves agree to float noise. The image
    # run's weights differ by up to 5e-4 after 40 Adam steps (measured on an H100): cuDNN's
    # convolution backward sums in a different order in a graph, and Adam scales tiny gradients up.
    atol = 2e-3 if extra else 1e-4
    torch.testing.assert_close(torch.tensor(graph[0]), torch.tensor(eager[0]), rtol=1e-3, atol=atol)
    for k in eager[1]:
        torch.testing.assert_close(graph[1][k], eager[1][k], rtol=1e-3, atol=atol)


@cuda
def test_graphed_run_resumes_bit_for_bit(tmp_path, pusht_zarr):
    from diffusion_policy.checkpoint import read_checkpoint_meta

    full = _run(tmp_path, "full", pusht_zarr, ["train.cuda_graph=true"])
    _run(tmp_path, "part", pusht_zarr, ["train.cuda_graph=true", "train.stop_at_step=20"])
    _, cfg, _ = read_checkpoint_meta(tmp_path / "part")
    cfg = copy.deepcopy(cfg)
    cfg.train.stop_at_step = None
    train(cfg, resume=tmp_path / "part")
    from safetensors.torch import load_file

    resumed = load_file(tmp_path / "part" / "checkpoints" / "latest" / "model.safetensors")
    for k in full[1]:
        torch.testing.assert_close(resumed[k], full[1][k], rtol=1e-4, atol=1e-5)


class _FakeStream:
    def wait_stream(self, other):
        pass


class _FakeGraph:
    """Stands in for torch.cuda.CUDAGraph on the CPU: 'capture' runs the step (a real capture runs
    nothing, and GraphedTrainStep restores the state afterwards either way); replay runs it again."""

    step = None

    def replay(self):
        s = _FakeGraph.step
        s.optimizer.zero_grad(set_to_none=True)  # a replayed backward overwrites, never accumulates
        s.loss.copy_(s._step())


@pytest.mark.parametrize("image", [False, True], ids=["state", "image"])
def test_graphed_step_logic_on_cpu_equals_eager(monkeypatch, image, one_thread):
    """Snapshot/restore around warm-up and capture, the crop draws, the EMA weight and the static
    buffers: checked on the CPU with the graph faked, so a GPU-less CI still exercises them."""
    import contextlib

    from diffusion_policy.registry import policy_class
    from diffusion_policy.shapes import ObsSpec, ShapeMeta
    from diffusion_policy.training.graph import GraphedTrainStep
    from diffusion_policy.training.step import Learner, train_step

    monkeypatch.setattr(torch.cuda, "Stream", lambda: _FakeStream())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: _FakeStream())
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "graph", lambda g: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", _FakeGraph)
    over = ["task.obs_type=pixels_agent_pos", "policy.encoder.resnet_width=16"] if image else []
    cfg = load_config("smoke", over)
    if image:
        meta = ShapeMeta(
            obs={"pixels": ObsSpec((96, 96, 3), "uint8", "rgb"), "agent_pos": ObsSpec((2,), "float32", "low_dim")},
            action_dim=2,
        )  # fmt: skip
    else:
        meta = _meta()

    def batch(i: int) -> dict:
        g = torch.Generator().manual_seed(i)
        obs = (
            {"pixels": torch.randint(0, 256, (4, 2, 96, 96, 3), dtype=torch.uint8, generator=g),
             "agent_pos": torch.rand(4, 2, 2, generator=g) * 512}
            if image else {"keypoints": torch.rand(4, 2, 20, generator=g) * 512}
        )  # fmt: skip
        return {"obs": obs, "action": torch.rand(4, 16, 2, generator=g) * 512,
                **policy.sample_training_noise(4, g)}  # fmt: skip

    runs = []
    for graphed in (False, True):
        torch.manual_seed(0)
        policy = policy_class("diffusion")(cfg.policy, meta)
        low = {k: torch.rand(50, s.shape[0]).numpy() * 512 for k, s in meta.obs.items() if s.kind == "low_dim"}  # fmt: skip
        policy.fit_normalizer({**low, "action": torch.rand(50, 2).numpy() * 512})
        policy.train()
        ema = EMAModel(policy)
        opt = torch.optim.AdamW(policy.parameters(), lr=torch.tensor(1e-3))
        learner = Learner(policy, policy, opt, None, ema, amp=False, grad_clip_norm=1.0)
        torch.manual_seed(123)  # the crops' CPU generator: both runs must draw the same crops
        losses, step = [], None
        for i in range(4):
            b = batch(i)
            if graphed:
                if step is None:
                    step = GraphedTrainStep(learner, b, train_step)
                    _FakeGraph.step = step
                losses.append(float(step(b)))
            else:
                loss = policy(b)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
                opt.step()
                ema.step(policy)
                losses.append(float(loss.detach()))
        runs.append((losses, ema.model.state_dict(), policy.state_dict()))
    (l0, e0, p0), (l1, e1, p1) = runs
    assert l0 == pytest.approx(l1, rel=1e-5)
    for k in p0:
        torch.testing.assert_close(p1[k], p0[k], rtol=1e-5, atol=1e-6)
    for k in e0:
        torch.testing.assert_close(e1[k], e0[k], rtol=1e-5, atol=1e-6)
