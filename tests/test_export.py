"""dp export: the ONNX and TorchScript files of the whole sampling loop match the eager policy."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

from diffusion_policy.checkpoint import save_checkpoint
from diffusion_policy.cli.main import main
from diffusion_policy.config import Config
from diffusion_policy.export import ExportError, check_export, export_policy
from diffusion_policy.models.encoders import EncoderConfig
from diffusion_policy.policies.diffusion import DiffusionConfig, DiffusionPolicy
from diffusion_policy.policies.ibc import IBCConfig, IBCPolicy
from diffusion_policy.shapes import ObsSpec, ShapeMeta

pytestmark = pytest.mark.usefixtures("one_thread")
ort = pytest.importorskip("onnxruntime")

STATE = ShapeMeta(obs={"keypoints": ObsSpec((20,), "float32", "low_dim")}, action_dim=2)
IMAGE = ShapeMeta(  # small frames, resized (antialiased) then cropped, like the CPU image preset
    obs={
        "pixels": ObsSpec((40, 40, 3), "uint8", "rgb"),
        "agent_pos": ObsSpec((2,), "float32", "low_dim"),
    },
    action_dim=2,
)
TINY_IMAGE_ENCODER = EncoderConfig(
    resnet_width=16, crop_shape=[28, 28], resize_shape=[32, 32], num_keypoints=8
)


def make_policy(shape_meta: ShapeMeta) -> DiffusionPolicy:
    cfg = DiffusionConfig.tiny()
    if shape_meta is IMAGE:
        cfg.encoder = TINY_IMAGE_ENCODER
    torch.manual_seed(0)
    policy = DiffusionPolicy(cfg, shape_meta)
    rng = np.random.default_rng(0)
    low_dim = [k for k, s in shape_meta.obs.items() if s.kind == "low_dim"]
    policy.fit_normalizer(
        {k: rng.uniform(0, 512, (200, shape_meta.obs[k].shape[0])) for k in low_dim}
        | {"action": rng.uniform(0, 512, (200, 2))}
    )
    return policy.eval()


@pytest.fixture(scope="module")
def state_policy() -> DiffusionPolicy:
    return make_policy(STATE)


@pytest.fixture(scope="module")
def image_policy() -> DiffusionPolicy:
    return make_policy(IMAGE)


def session(path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


# --- ONNX ------------------------------------------------------------------------------------------


def test_onnx_state_policy_matches_at_any_batch(state_policy, tmp_path):
    out = tmp_path / "state.onnx"
    sidecar = export_policy(state_policy, out, "onnx", num_steps=3)
    assert sidecar["exporter"].startswith("torch.onnx.export(dynamo=False)")  # auto: legacy here
    check = check_export(out, sidecar, state_policy)
    assert check["batch_sizes"] == [1, 3] and check["max_abs_error"] < 1e-3
    sess = session(out)
    ins = {i.name: i for i in sess.get_inputs()}
    assert list(ins) == ["keypoints", "noise"] and [o.name for o in sess.get_outputs()] == [
        "action",
        "action_pred",
    ]
    assert ins["keypoints"].type == "tensor(float)" and ins["keypoints"].shape == ["B", 2, 20]


def test_onnx_image_policy_matches_at_any_batch(image_policy, tmp_path):
    """Image policies go through the dynamo exporter: antialiased resize, uint8 HWC input."""
    out = tmp_path / "image.onnx"
    sidecar = export_policy(image_policy, out, "onnx", num_steps=1)  # the slowest export here
    assert sidecar["exporter"].startswith("torch.onnx.export(dynamo=True)")
    assert sidecar["inputs"][0] == {
        "name": "pixels",
        "shape": ["B", 2, 40, 40, 3],
        "dtype": "uint8",
        "kind": "rgb",
    }
    check = check_export(out, sidecar, image_policy)
    assert check["batch_sizes"] == [1, 3] and check["max_abs_error"] < 1e-3
    ins = session(out).get_inputs()
    assert [i.name for i in ins] == ["pixels", "agent_pos", "noise"]
    assert ins[0].type == "tensor(uint8)" and ins[0].shape[1:] == [2, 40, 40, 3]


# --- TorchScript -----------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("which", ["state", "image"])
def test_torchscript_matches_at_any_batch(which, state_policy, image_policy, tmp_path):
    """The default TorchScript layout (packed); the reference one is tested at a fixed batch below."""
    policy = state_policy if which == "state" else image_policy
    out = tmp_path / "policy.pt"
    sidecar = export_policy(policy, out, "torchscript", num_steps=2)
    assert sidecar["layout"] == "packed" and sidecar["batch_size"] == "dynamic"
    check = check_export(out, sidecar, policy)
    assert check["max_abs_error"] < 1e-3
    module = torch.jit.load(str(out))  # libtorch's view: positional inputs, a tuple out
    b = 2
    xs = [
        torch.zeros(b, *i["shape"][1:], dtype=getattr(torch, i["dtype"])) for i in sidecar["inputs"]
    ]
    action, action_pred = module(*xs)
    assert action.shape == (b, 8, 2) and action_pred.shape == (b, 16, 2)


def test_sidecar_describes_a_fixed_batch_export(state_policy, tmp_path):
    out = tmp_path / "fixed.pt"
    export_policy(
        state_policy,
        out,
        "torchscript",
        num_steps=2,
        timestep_spacing="trailing",
        layout="reference",
        batch_size=4,
    )
    sidecar = json.loads((tmp_path / "fixed.pt.json").read_text())
    assert sidecar["file"] == "fixed.pt" and sidecar["format"] == "torchscript"
    assert sidecar["batch_size"] == 4
    assert sidecar["inputs"] == [
        {"name": "keypoints", "shape": [4, 2, 20], "dtype": "float32", "kind": "low_dim"},
        {"name": "noise", "shape": [4, 16, 2], "dtype": "float32", "kind": "noise"},
    ]
    assert sidecar["outputs"][0] == {"name": "action", "shape": [4, 8, 2], "dtype": "float32"}
    assert (sidecar["n_obs_steps"], sidecar["n_action_steps"], sidecar["horizon"]) == (2, 8, 16)
    assert sidecar["executed_slice"] == [1, 9]
    assert (sidecar["sampler"], sidecar["num_inference_steps"]) == ("ddim", 2)
    assert sidecar["timestep_spacing"] == "trailing" and sidecar["layout"] == "reference"
    check = check_export(out, sidecar, state_policy)
    assert check["batch_sizes"] == [4] and check["max_abs_error"] < 1e-3


def test_check_fails_when_the_file_and_policy_disagree(tmp_path):
    policy = make_policy(STATE)
    out = tmp_path / "p.pt"
    sidecar = export_policy(policy, out, "torchscript", num_steps=2)
    policy.normalizer.action__offset += 0.5  # the policy moved on after the export
    with pytest.raises(ExportError, match="does not match the policy: max abs error"):
        check_export(out, sidecar, policy)


# --- the command -----------------------------------------------------------------------------------


def save(tmp_path, policy_cfg, policy, shape_meta=STATE):
    path = tmp_path / "ckpt"
    save_checkpoint(path, Config(preset="test", policy=policy_cfg), shape_meta, policy)
    return path


def test_cli_exports_and_checks_a_checkpoint(tmp_path, capsys):
    policy = make_policy(STATE)
    ckpt = save(tmp_path, policy.config, policy)
    out = tmp_path / "deploy" / "policy.onnx"
    rc = main(
        ["export", str(ckpt), "--out", str(out), "--inference-steps", "2", "--batch-size", "1"]
        + ["--check"]
    )
    text = capsys.readouterr().out
    assert rc == 0 and "max abs error" in text and "input  keypoints: (1, 2, 20) float32" in text
    sidecar = json.loads(out.with_name("policy.onnx.json").read_text())
    assert sidecar["check"]["max_abs_error"] < 1e-3 and sidecar["checkpoint"] == str(ckpt)
    assert sidecar["batch_size"] == 1 and sidecar["layout"] == "reference"


def error_line(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def test_cli_errors_are_one_line(tmp_path, capsys, monkeypatch):
    out = ["--out", str(tmp_path / "x.onnx")]
    assert "does not exist" in error_line(capsys, ["export", str(tmp_path / "nope"), *out])

    ibc_cfg = IBCConfig.tiny()
    ibc = save(tmp_path / "ibc", ibc_cfg, IBCPolicy(ibc_cfg, STATE))
    assert "supports diffusion policies only" in error_line(capsys, ["export", str(ibc), *out])

    policy = make_policy(STATE)
    ckpt = save(tmp_path, policy.config, policy)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    err = error_line(capsys, ["export", str(ckpt), *out, "--check"])
    assert "needs onnxruntime" in err and "pip install" in err
    assert not (tmp_path / "x.onnx").exists()  # it failed before exporting anything

    legacy = ["--onnx-exporter", "legacy", "--layout", "packed"]
    assert "use --onnx-exporter dynamo" in error_line(capsys, ["export", str(ckpt), *out, *legacy])
    assert "must be >= 1" in error_line(capsys, ["export", str(ckpt), *out, "--batch-size", "0"])
