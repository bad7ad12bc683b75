"""DP-T, the time-series diffusion transformer backbone of DiffusionPolicy: the original's size and
optimiser grouping, its attention masks, sampling on every backend, and the one training loop,
checkpoints, resume, export and serving with it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from diffusion_policy.checkpoint import load_policy
from diffusion_policy.cli.main import main
from diffusion_policy.config import load_config
from diffusion_policy.errors import ConfigError
from diffusion_policy.export import ExportError, check_export, export_policy
from diffusion_policy.models.encoders import EncoderConfig
from diffusion_policy.models.transformer import TransformerForDiffusion
from diffusion_policy.policies.diffusion import DiffusionConfig, DiffusionPolicy
from diffusion_policy.shapes import ObsSpec, ShapeMeta

pytestmark = pytest.mark.usefixtures("one_thread")

STATE = ShapeMeta(obs={"keypoints": ObsSpec((20,), "float32", "low_dim")}, action_dim=2)
# The original's count for its Push-T low-dim DP-T (train_diffusion_transformer_lowdim_pusht_workspace
# .yaml: input_dim 2, cond_dim 20, horizon 16, n_obs_steps 2, 8 layers, 4 heads, 256 wide, causal,
# time and obs as cond, n_cond_layers 0). Obtained by building real-stanford/diffusion_policy's
# TransformerForDiffusion (HEAD of its repository) in a scratch copy and summing p.numel() over its
# parameters; its get_optim_groups splits them into 8,919,040 decayed and 46,082 not decayed.
ORIGINAL_PUSHT_LOWDIM_PARAMS = 8_965_122
ORIGINAL_DECAYED, ORIGINAL_NOT_DECAYED = 8_919_040, 46_082
# the smoke preset with a tiny transformer
TINY = [
    "policy.backbone=transformer",
    "policy.transformer.n_layer=2",
    "policy.transformer.n_head=2",
    "policy.transformer.n_emb=16",
]
BASE = ["train.progress=false", "wandb.mode=disabled", "eval.n_videos=0", "train.final_eval=false"]


def tiny_policy(seed: int = 0, **overrides) -> DiffusionPolicy:
    cfg = DiffusionConfig.tiny("transformer")
    for k, v in overrides.items():
        setattr(cfg.transformer, k, v)
    torch.manual_seed(seed)
    policy = DiffusionPolicy(cfg, STATE)
    for p in policy.model.parameters():  # trained-looking weights: every path carries signal
        p.data.add_(torch.randn_like(p) * 0.05)
    rng = np.random.default_rng(seed)
    policy.fit_normalizer(
        {"keypoints": rng.uniform(0, 512, (200, 20)), "action": rng.uniform(0, 512, (200, 2))}
    )
    return policy.eval()


def obs(b: int, seed: int = 1) -> dict[str, torch.Tensor]:
    return {"keypoints": torch.rand(b, 2, 20, generator=torch.Generator().manual_seed(seed)) * 512}


# --- the original's model ------------------------------------------------------------------------


def test_pusht_lowdim_preset_has_the_originals_parameter_count_and_decay_split():
    cfg = load_config("pusht_diffusion_transformer_state")
    policy = DiffusionPolicy(cfg.policy, STATE)
    n = sum(p.numel() for p in policy.parameters())
    print(f"DP-T Push-T low-dim: {n:,} parameters (original: {ORIGINAL_PUSHT_LOWDIM_PARAMS:,})")
    assert n == ORIGINAL_PUSHT_LOWDIM_PARAMS
    decay, no_decay = policy.optim_groups(cfg.train.optim.weight_decay)
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)
    assert sum(p.numel() for p in decay["params"]) == ORIGINAL_DECAYED
    assert sum(p.numel() for p in no_decay["params"]) == ORIGINAL_NOT_DECAYED
    assert (cfg.policy.horizon, cfg.policy.n_obs_steps, cfg.policy.n_action_steps) == (16, 2, 8)
    assert cfg.train.optim.betas == [0.9, 0.95] and cfg.train.optim.lr == 1e-4


def test_no_decay_on_biases_norms_and_embeddings_and_the_unet_keeps_one_group():
    cfg = DiffusionConfig.tiny("transformer")
    cfg.encoder = EncoderConfig(low_dim="mlp")  # an encoder with parameters gets its own group
    policy = DiffusionPolicy(cfg, STATE)
    groups = policy.optim_groups(1e-3)
    names = {id(p): n for n, p in policy.named_parameters()}
    decayed = {names[id(p)] for p in groups[0]["params"]}
    not_decayed = {names[id(p)] for p in groups[1]["params"]}
    assert [g["weight_decay"] for g in groups] == [1e-3, 0.0, 1e-6]
    assert {names[id(p)] for p in groups[2]["params"]} == {
        n for n in names.values() if n.startswith("obs_encoder.")
    }
    modules = dict(policy.named_modules())
    for name in not_decayed:
        owner = modules[name.rpartition(".")[0]]
        assert name.endswith("bias") or name.endswith("pos_emb") or isinstance(owner, nn.LayerNorm)
    for name in decayed:
        owner = modules[name.rpartition(".")[0]]
        assert name.endswith("weight") and isinstance(owner, (nn.Linear, nn.MultiheadAttention))
    assert {"model.pos_emb", "model.cond_pos_emb", "model.ln_f.weight"} <= not_decayed
    assert len(decayed) + len(not_decayed) + len(groups[2]["params"]) == len(names)
    unet = DiffusionPolicy(DiffusionConfig.tiny(), STATE)
    (group,) = unet.optim_groups(1e-6)
    assert group["weight_decay"] == 1e-6 and group["params"] == list(unet.parameters())


@pytest.mark.parametrize("causal", [True, False])
def test_an_action_token_depends_on_no_later_action_nor_later_observation(causal):
    torch.manual_seed(0)
    m = TransformerForDiffusion(2, 5, horizon=6, n_obs_steps=3, n_layer=2, n_head=2, n_emb=16,
                                p_drop_attn=0.0, causal_attn=causal).eval()  # fmt: skip
    for p in m.parameters():
        p.data.add_(torch.randn_like(p) * 0.1)
    x, cond, t = torch.randn(1, 6, 2), torch.randn(1, 3, 5), torch.tensor([7])
    ref = m(x, t, cond)
    later = x.clone()
    later[:, 4:] += 1.0  # change action tokens 4 and 5
    moved = (m(later, t, cond) - ref).abs().amax(-1)[0]  # per action token
    assert (moved[4:] > 0).all() and bool((moved[:4] == 0).all()) == causal
    newest = cond.clone()
    newest[:, 2] += 1.0  # the third observation step: seen by action tokens 2.. only
    moved = (m(x, t, newest) - ref).abs().amax(-1)[0]
    assert (moved[2:] > 0).all() and bool((moved[:2] == 0).all()) == causal


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="policy.backbone='mlp'"):
        load_config("smoke", ["policy.backbone=mlp"])
    with pytest.raises(ConfigError, match="n_emb=30 must be divisible by n_head=4"):
        load_config("smoke", [*TINY, "policy.transformer.n_head=4", "policy.transformer.n_emb=30"])
    # the UNet's horizon rule does not apply to the transformer
    assert load_config("smoke", [*TINY, "policy.horizon=10"]).policy.horizon == 10


# --- sampling ------------------------------------------------------------------------------------


def test_ddpm_and_ddim_sample_and_every_backend_equals_eager():
    policy, o = tiny_policy(), obs(3)
    g = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    policy.set_sampler("ddpm", 10)
    a, b = (policy.predict_action_chunk(o, generator=g())["action"] for _ in range(2))
    assert a.shape == (3, 8, 2) and torch.isfinite(a).all() and torch.equal(a, b)
    assert not policy.deterministic_given_noise()
    policy.set_sampler("ddim", 4)
    noise = torch.randn(policy.noise_shape(3), generator=g())
    ref = policy.predict_action_chunk(o, noise=noise)["action_pred"]
    assert ref.shape == (3, 16, 2) and not torch.allclose(ref, a.new_zeros(()))
    assert set(policy.inference_backends()) >= {"eager", "fused", "cpu", "auto"}
    for backend in ("fused", "cpu"):
        policy.set_inference_backend(backend)
        for _ in range(2):  # a trace is built at the first call
            out = policy.predict_action_chunk(o, noise=noise)["action_pred"]
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-4)
    with pytest.raises(ConfigError, match="cuda_graph needs the policy on a CUDA device"):
        policy.set_inference_backend("cuda_graph")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_backend_equals_eager_on_the_gpu():
    policy = tiny_policy().cuda()
    policy.set_sampler("ddim", 4)
    o = {k: v.cuda() for k, v in obs(2).items()}
    noise = torch.randn(policy.noise_shape(2), device="cuda")
    ref = policy.predict_action_chunk(o, noise=noise)["action_pred"]
    policy.set_inference_backend("cuda_graph")
    for _ in range(2):
        out = policy.predict_action_chunk(o, noise=noise)["action_pred"]
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-3)


# --- the one training loop -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(pusht_zarr, tmp_path_factory) -> dict[str, Path]:
    """The tiny DP-T trained 4 steps straight, and the same run stopped at 2 and resumed."""
    root = tmp_path_factory.mktemp("dpt")
    common = ["smoke", f"task.dataset={pusht_zarr}", *BASE, *TINY, "train.eval_every=0"]
    straight, split = root / "straight", root / "split"
    assert main(["train", *common, f"run_dir={straight}"]) == 0
    assert main(["train", *common, f"run_dir={split}", "train.stop_at_step=2"]) == 0
    assert main(["train", "--resume", str(split), "train.stop_at_step=null"]) == 0
    return {
        "straight": straight / "checkpoints" / "latest",
        "split": split / "checkpoints" / "latest",
    }


def test_trains_through_the_loop_and_resumes_bit_for_bit(runs):
    a, b = runs["straight"], runs["split"]
    assert json.loads((a / "meta.json").read_text())["step"] == 4
    for name in ("train_state/raw_model.safetensors", "model.safetensors"):
        wa, wb = load_file(str(a / name)), load_file(str(b / name))
        assert wa.keys() == wb.keys() and any(k.startswith("model.decoder.") for k in wa)
        assert all(torch.equal(wa[k], wb[k]) for k in wa), name
    state = torch.load(a / "train_state" / "state.pt", weights_only=True)
    assert [g["weight_decay"] for g in state["optimizer"]["param_groups"]] == [1e-6, 0.0]


def test_checkpoint_round_trips(runs):
    policy, cfg, _ = load_policy(runs["straight"])
    assert cfg.policy.backbone == "transformer" and isinstance(
        policy.model, TransformerForDiffusion
    )
    saved = load_file(str(runs["straight"] / "model.safetensors"))
    state = policy.state_dict()
    assert saved.keys() == state.keys() and all(torch.equal(saved[k], state[k]) for k in saved)
    again, _, _ = load_policy(runs["straight"])
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    o = obs(2)
    assert torch.equal(
        policy.predict_action_chunk(o, generator=g())["action"],
        again.predict_action_chunk(o, generator=g())["action"],
    )


# --- export and serving --------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")
def test_exports_to_torchscript_in_the_reference_layout_and_refuses_packed(tmp_path):
    policy = tiny_policy()
    with pytest.raises(ExportError, match="the packed layout is the UNet's"):
        export_policy(policy, tmp_path / "p.pt", "torchscript", num_steps=2, layout="packed")
    out = tmp_path / "dpt.pt"
    sidecar = export_policy(policy, out, "torchscript", num_steps=2)
    assert sidecar["layout"] == "reference" and sidecar["batch_size"] == "dynamic"
    assert check_export(out, sidecar, policy)["max_abs_error"] < 1e-3


def test_onnx_export_matches(tmp_path):
    pytest.importorskip("onnxruntime")
    policy = tiny_policy()
    out = tmp_path / "dpt.onnx"
    sidecar = export_policy(policy, out, "onnx", num_steps=2)
    assert check_export(out, sidecar, policy)["max_abs_error"] < 1e-3


def test_served_chunks_equal_in_process(runs):
    from diffusion_policy.serving.client import PolicyClient
    from diffusion_policy.serving.server import PolicyServer, ServeConfig

    policy, cfg, meta = load_policy(runs["straight"])
    ref, _, _ = load_policy(runs["straight"])
    server = PolicyServer(policy, cfg, ServeConfig(port=0), meta, checkpoint_dir=runs["straight"])
    server = server.start_in_thread()
    try:
        with PolicyClient(server.url) as client:
            o = {"keypoints": np.random.default_rng(0).uniform(50, 450, (2, 20)).astype(np.float32)}
            out = client.infer(o, seed=4)
        with torch.no_grad():
            want = ref.predict_action_chunk(
                {"keypoints": o["keypoints"][None]}, generator=torch.Generator().manual_seed(4)
            )
        np.testing.assert_array_equal(out["actions"], want["action"][0].numpy())
        np.testing.assert_array_equal(out["action_pred"], want["action_pred"][0].numpy())
    finally:
        server.close()
