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


def test_inherit_list_merges_a_recipe_and_a_task_in_order(tmp_path):
    # configs/tasks/NAME holds a task alone; a preset combines it with any policy's recipe
    cfg = load_config("blockpush_ibc_state_cpu")
    ibc = load_config("pusht_ibc_state_cpu")
    assert cfg.policy == ibc.policy and cfg.task.name == "blockpush" and cfg.eval.max_steps == 350
    assert cfg.task.env_id == "BlockPushMultimodal-v0" and list(cfg.task.obs) == ["state"]
    later = tmp_path / "later.yaml"  # later parents win over earlier ones, the file over both
    later.write_text("inherit: [smoke, tasks/blockpush]\ntrain:\n  batch_size: 3\n")
    cfg = load_config(str(later))
    assert cfg.task.name == "blockpush" and cfg.eval.max_steps == 350 and cfg.eval.n_envs == 2
    assert cfg.train.batch_size == 3 and cfg.policy.unet.down_dims == [16, 32]
    bad = tmp_path / "bad.yaml"
    bad.write_text("inherit: [smoke, tasks/nope]\n")
    with pytest.raises(ConfigError, match="unknown preset 'tasks/nope'"):
        load_config(str(bad))


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


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["train.lr=-1e-4"], "train.optim.lr=-0.0001: must be > 0"),
        (["train.optim.weight_decay=-1"], "train.optim.weight_decay=-1.0: must be >= 0"),
        (["train.lr_scheduler=cosine_annealing"], "train.optim.lr_scheduler='cosine_annealing'"),
        (["train.device=tpu"], "train.device='tpu'"),
        (["train.device=cuda:x"], "train.device='cuda:x'"),
        (["train.cadence.log_every=0"], "train.cadence.log_every=0"),
        (["train.time_limit_min=0"], "train.time_limit_min=0"),
        (["train.ema.max_decay=1.5"], "train.ema.max_decay=1.5"),
        (["policy.unet.kernel_size=4"], "policy.unet.kernel_size=4: must be odd"),
        (["eval.n_episodes=0"], "eval.n_episodes=0"),
        (["eval.max_steps=0"], "eval.max_steps=0"),
        (["eval.max_steps=-1"], "eval.max_steps=-1"),
        (["eval.n_envs=-2"], "eval.n_envs=-2"),
        (["eval.n_videos=-1"], "eval.n_videos=-1"),
        (["eval.video_size=0"], "eval.video_size=0"),
        (["eval.worker_timeout_s=0"], "eval.worker_timeout_s=0"),
        (["eval.num_inference_steps=0"], "eval.num_inference_steps=0"),
    ],
)
def test_bad_values_are_one_line_errors_at_load(overrides, needle):
    """Issue 17 item 7: found when the config loads, not at the first step or after training."""
    with pytest.raises(ConfigError) as e:
        load_config("smoke", overrides)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_lr_scheduler_names_are_diffusers():
    from diffusers.optimization import SchedulerType

    from diffusion_policy.config import lr_scheduler_names

    assert lr_scheduler_names() == [s.value for s in SchedulerType]
    for name in lr_scheduler_names():
        assert load_config("smoke", [f"train.optim.lr_scheduler={name}"]).train.optim.lr_scheduler == name  # fmt: skip


def test_flat_train_keys_of_old_configs_and_commands_still_work(tmp_path):
    """The sectioned form (train.optim.lr) is canonical; the flat keys written before it are read
    at their new place, in YAML files, saved configs and command-line overrides alike."""
    cfg = load_config(
        "smoke",
        ["train.lr=3e-4", "train.time_limit_min=30", "train.use_ema=false", "train.eval_every=7"],
    )
    t = cfg.train
    assert (t.optim.lr, t.time_limit_min, t.ema.enabled, t.cadence.eval_every) == (
        3e-4,
        30,
        False,
        7,
    )
    old = tmp_path / "old.yaml"
    old.write_text(
        "inherit: smoke\ntrain:\n  lr: 2.0e-4\n  ema_power: 0.5\n  log_every: 3\n  keep_best: 1\n"
    )
    t = load_config(str(old)).train
    assert (t.optim.lr, t.ema.power, t.cadence.log_every, t.cadence.keep_best) == (2e-4, 0.5, 3, 1)
    assert load_config(str(old), ["train.optim.lr=5e-5"]).train.optim.lr == 5e-5
    # a flat child key overrides its sectioned parent; both forms in one file are refused
    assert load_config("pusht_diffusion_state_cpu", ["train.lr=1e-3"]).train.optim.lr == 1e-3
    both = tmp_path / "both.yaml"
    both.write_text("inherit: smoke\ntrain:\n  lr: 1.0e-4\n  optim:\n    lr: 2.0e-4\n")
    with pytest.raises(ConfigError, match="give only train.optim.lr"):
        load_config(str(both))
    # resume: flat names of safe and unsafe keys are judged at their new place
    assert apply_resume_overrides(cfg, ["train.time_limit_min=5"]).train.time_limit_min == 5
    with pytest.raises(ConfigError, match=r"cannot override \['train.grad_clip_norm'\]"):
        apply_resume_overrides(cfg, ["train.grad_clip_norm=1.0"])
    with pytest.raises(ConfigError, match=r"cannot override \['train.optim.lr'\]"):
        apply_resume_overrides(cfg, ["train.optim.lr=1.0"])


def test_a_file_or_directory_named_like_a_preset_does_not_shadow_it(tmp_path, monkeypatch):
    """Issue 17 item 8: `run_dir=smoke` creates ./smoke, and `dp train smoke` must still work."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "smoke").mkdir()
    (tmp_path / "smoke_ibc").write_text("not: [yaml")
    assert load_config("smoke").policy.unet.down_dims == [16, 32]
    assert load_config("smoke_ibc").policy.name == "ibc"
    # a YAML file is still a preset file: by its suffix, or as an existing non-preset name
    (tmp_path / "mine.yaml").write_text("inherit: smoke\ntrain:\n  batch_size: 3\n")
    (tmp_path / "mine").write_text("inherit: smoke\ntrain:\n  batch_size: 5\n")
    assert load_config("mine.yaml").train.batch_size == 3
    assert load_config("mine").train.batch_size == 5
    assert load_config("./mine").train.batch_size == 5
    (tmp_path / "adir").mkdir()
    with pytest.raises(ConfigError, match="unknown preset 'adir'"):
        load_config("adir")


def test_declared_task_round_trips_and_old_task_sections_load():
    """A declared task survives a checkpoint's config.yaml; an old one (obs_type, no obs) still loads."""
    from diffusion_policy.config import config_from_nodes, config_from_yaml, config_to_yaml

    node = {"task": {"env_id": None, "env_kwargs": {"obs_type": "keypoints"},
                     "obs": {"cam": {"kind": "rgb", "crop": [8, 8]}, "s": {"source": ["a", "b[0:2]"], "normalize": "identity"}},
                     "action": {"source": ["act"], "dim": 7}}}  # fmt: skip
    cfg = config_from_nodes([node])
    again = config_from_yaml(config_to_yaml(cfg))
    assert again.task == cfg.task and again.task.obs["s"].source == ["a", "b[0:2]"]
    old = config_from_nodes(
        [{"task": {"name": "pusht", "env_id": "PushT-v0", "obs_type": "state"}}]
    )
    assert old.task.obs == {} and not old.task.declared and old.task.action.source == ["action"]
