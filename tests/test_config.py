"""Config loading: presets, overrides, validation and error messages that name the key."""

from __future__ import annotations

import pytest

from diffusion_policy.config import (
    CONFIG_DIR,
    apply_resume_overrides,
    config_from_yaml,
    config_to_yaml,
    load_config,
)
from diffusion_policy.errors import ConfigError


@pytest.mark.parametrize("preset", sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
def test_every_preset_loads_and_round_trips(preset):
    cfg = load_config(preset)
    assert cfg.preset == preset
    again = config_from_yaml(config_to_yaml(cfg))
    assert again == cfg


def test_paper_state_preset_is_the_default():
    cfg = load_config()
    assert cfg.preset == "pusht_diffusion_state"
    assert cfg.task.obs_type == "keypoints"
    assert (
        cfg.train.batch_size == 256
        and cfg.train.optim.lr == 1e-4
        and cfg.train.optim.betas == [0.95, 0.999]
    )
    assert (
        cfg.train.optim.weight_decay == 1e-6
        and cfg.train.optim.lr_warmup_steps == 500
        and cfg.train.ema.enabled
    )
    assert (
        cfg.data.max_train_episodes == 90
        and cfg.data.val_ratio == 0.02
        and cfg.data.split_seed == 42
    )
    p = cfg.policy
    assert (p.horizon, p.n_obs_steps, p.n_action_steps) == (16, 2, 8)
    assert (
        p.unet.down_dims == [256, 512, 1024]
        and p.unet.kernel_size == 5
        and p.unet.diffusion_step_embed_dim == 256
    )
    assert p.noise.num_train_timesteps == 100 and p.noise.beta_schedule == "squaredcos_cap_v2"


def test_overrides_are_typed():
    cfg = load_config(
        "smoke", ["train.batch_size=7", "policy.unet.down_dims=[8,16]", "eval.vector=async"]
    )
    assert (
        cfg.train.batch_size == 7
        and cfg.policy.unet.down_dims == [8, 16]
        and cfg.eval.vector == "async"
    )


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["train.batchsize=3"], "train.batchsize"),
        (["policy.unet.nope=1"], "policy.unet.nope"),
        (["train.batch_size=abc"], "train.batch_size"),
        (["train.batch_size"], "key=value"),
        (["policy.name=nonexistent"], "unknown policy 'nonexistent'"),
        (["task.obs_type=lidar"], "task.obs_type"),
        (["policy.horizon=10", "policy.unet.down_dims=[8,16,32]"], "divisible"),
        (["policy.n_action_steps=16"], "exceeds horizon"),
        (["eval.vector=threads"], "eval.vector"),
        (["policy.unet.down_dims=[12,32]"], "not divisible by n_groups"),
        (["wandb.mode=sometimes"], "wandb.mode"),
    ],
)
def test_bad_overrides_name_the_key(overrides, needle):
    with pytest.raises(ConfigError, match=None) as e:
        load_config("smoke", overrides)
    assert needle in str(e.value)


def test_bad_preset_names_it(tmp_path):
    with pytest.raises(ConfigError, match="unknown preset 'nope'.*smoke"):
        load_config("nope")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  batch_size: [1, 2\n")
    with pytest.raises(ConfigError, match="cannot parse YAML"):
        load_config(str(bad))
    typo = tmp_path / "typo.yaml"
    typo.write_text("inherit: smoke\ntrain:\n  lr_warmup: 3\n")
    with pytest.raises(ConfigError, match="train.lr_warmup"):
        load_config(str(typo))


def test_inherit_chain(tmp_path):
    child = tmp_path / "child.yaml"
    child.write_text("inherit: smoke\ntrain:\n  batch_size: 5\n")
    cfg = load_config(str(child))
    assert cfg.train.batch_size == 5 and cfg.policy.unet.down_dims == [16, 32]


def test_resume_overrides_only_safe_keys():
    cfg = load_config("smoke")
    assert (
        apply_resume_overrides(
            cfg, ["train.stop_at_step=9", "eval.n_episodes=3"]
        ).train.stop_at_step
        == 9
    )
    with pytest.raises(ConfigError, match="train.lr"):
        apply_resume_overrides(cfg, ["train.lr=1.0"])
