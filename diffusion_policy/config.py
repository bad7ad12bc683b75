"""Typed configs: dataclass defaults <- preset YAML <- command-line `key.sub=value` overrides.

Presets in `configs/` hold only overrides. A preset may name another with `inherit: NAME`.
The `policy` section is typed by the config class that `registry.POLICIES[policy.name]` gives,
so every key is checked against a schema and every error names the offending key.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from diffusion_policy.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
DEFAULT_PRESET = "pusht_diffusion_state"


NORMALIZE_MODES = (
    "minmax",
    "identity",
)  # low-dim and action normalisation; rgb is fixed [0, 255] -> [-1, 1]
PUSHT_OBS_TYPES = ("state", "keypoints", "pixels_agent_pos")


def _check_hw(where: str, v: list[int] | None) -> None:
    if v is not None and (len(v) != 2 or min(v) < 1):
        raise ConfigError(f"{where}={list(v)}: expected [height, width] >= 1")


@dataclass
class ObsKeyConfig:
    """One policy observation key, built per frame from store keys (see data/task_spec.py)."""

    kind: str = "low_dim"  # low_dim | rgb
    source: list[str] = field(
        default_factory=list
    )  # store keys, "key[a:b]" for columns; [] = [the key's name]
    shape: list[int] | None = (
        None  # the per-frame shape the store must give; null = whatever it has
    )
    normalize: str | None = (
        None  # low_dim: minmax (default) | identity; rgb: always [0, 255] -> [-1, 1]
    )
    resize: list[int] | None = (
        None  # rgb: resize to [H, W] first (null: policy.encoder.resize_shape)
    )
    crop: list[int] | None = (
        None  # rgb: crop [h, w], random in training, center in eval (null: policy.encoder.crop_shape)
    )

    def check(self, where: str) -> None:
        """One ConfigError naming `where` (task.obs.KEY) and the first bad field."""
        if self.kind not in ("low_dim", "rgb"):
            raise ConfigError(f"{where}.kind={self.kind!r}: expected low_dim or rgb")
        if self.kind == "rgb":
            if len(self.source) > 1:
                raise ConfigError(
                    f"{where}.source={list(self.source)}: an rgb key has exactly one source"
                )
            if self.normalize not in (None, "fixed"):
                raise ConfigError(
                    f"{where}.normalize={self.normalize!r}: rgb is always [0, 255] -> [-1, 1]; leave it out"
                )
        else:
            for name in ("resize", "crop"):
                if getattr(self, name) is not None:
                    raise ConfigError(f"{where}.{name}: only rgb keys are resized or cropped")
            if self.normalize is not None and self.normalize not in NORMALIZE_MODES:
                raise ConfigError(
                    f"{where}.normalize={self.normalize!r}: expected minmax or identity"
                )
        _check_hw(f"{where}.resize", self.resize)
        _check_hw(f"{where}.crop", self.crop)
        if (
            self.resize
            and self.crop
            and (self.crop[0] > self.resize[0] or self.crop[1] > self.resize[1])
        ):
            raise ConfigError(
                f"{where}.crop={list(self.crop)} must fit inside {where}.resize={list(self.resize)}"
            )
        if self.shape is not None and (not self.shape or min(self.shape) < 1):
            raise ConfigError(f"{where}.shape={list(self.shape)}: expected positive sizes")


@dataclass
class ActionConfig:
    """The action the policy predicts: store keys concatenated per frame, like a low-dim observation."""

    source: list[str] = field(default_factory=lambda: ["action"])
    dim: int | None = None  # the action size the store must give; null = whatever it has
    normalize: str = "minmax"  # minmax | identity

    def check(self) -> None:
        if not self.source:
            raise ConfigError("task.action.source is empty: name the store key(s) of the action")
        if self.normalize not in NORMALIZE_MODES:
            raise ConfigError(
                f"task.action.normalize={self.normalize!r}: expected minmax or identity"
            )
        if self.dim is not None and self.dim < 1:
            raise ConfigError(f"task.action.dim={self.dim}: must be >= 1 or null")


@dataclass
class TaskConfig:
    """What the policy observes and where its demonstrations are.

    `obs` declares each observation key (kind, store sources, normalisation, per-camera resize/crop);
    when it is empty, `obs_type` is Push-T's shorthand for its declared spec (data/pusht_format.py).
    """

    name: str = "pusht"
    env_id: str | None = "PushT-v0"  # a gymnasium id for rollouts; null: no simulator
    env_kwargs: dict[str, Any] = field(default_factory=dict)  # passed to gymnasium.make
    obs_type: str = "keypoints"  # Push-T shorthand, used when obs is empty: state | keypoints | pixels_agent_pos
    dataset: str = (
        "datasets/pusht/pusht_cchi_v7_replay.zarr"  # relative paths resolve from the working dir
    )
    control_hz: float = 10.0
    obs: dict[str, ObsKeyConfig] = field(default_factory=dict)
    action: ActionConfig = field(default_factory=ActionConfig)

    def __post_init__(self) -> None:
        if self.obs_type not in PUSHT_OBS_TYPES:
            raise ConfigError(
                f"task.obs_type={self.obs_type!r}: expected one of state, keypoints, pixels_agent_pos"
            )
        if not self.control_hz > 0:
            raise ConfigError(f"task.control_hz={self.control_hz}: must be > 0")
        for key, spec in self.obs.items():
            spec.check(f"task.obs.{key}")
        self.action.check()

    @property
    def declared(self) -> bool:
        """True when the task lists its observations (else it is the Push-T obs_type shorthand)."""
        return bool(self.obs)


@dataclass
class DataConfig:
    """Which episodes train and validate."""

    val_ratio: float = 0.02  # fraction of episodes held out (the original's split)
    split_seed: int = 42
    max_train_episodes: int | None = 90  # the paper trains on 90 of the 206 Push-T episodes
    val_episodes: str = "heldout"  # heldout: the split-off episodes; complement: every non-training episode (original)
    # where the frames live: true = every frame on the training device, batches indexed there;
    # false = every frame in host RAM, each batch copied to the device; disk = camera frames stay in
    # the store, each batch read from its chunks ahead of the step (stores larger than memory);
    # auto = true while the frames fit in half the free memory (RAM, and the GPU's), else false or disk
    resident: bool | str = "auto"

    def __post_init__(self) -> None:
        if not 0.0 <= self.val_ratio < 1.0:
            raise ConfigError(f"data.val_ratio={self.val_ratio}: must be in [0, 1)")
        if self.val_episodes not in ("heldout", "complement"):
            raise ConfigError(
                f"data.val_episodes={self.val_episodes!r}: expected heldout or complement"
            )
        if isinstance(self.resident, str) and self.resident.lower() in ("true", "false"):
            self.resident = self.resident.lower() == "true"
        if not isinstance(self.resident, bool) and self.resident not in ("auto", "disk"):
            raise ConfigError(
                f"data.resident={self.resident!r}: expected auto, true, false or disk"
            )
        if self.max_train_episodes is not None and self.max_train_episodes < 1:
            raise ConfigError(
                f"data.max_train_episodes={self.max_train_episodes}: must be >= 1 or null"
            )


def lr_scheduler_names() -> list[str]:
    """diffusers' scheduler names. Loading a config imports diffusers anyway (the policies' samplers
    are its schedulers), after which this import costs nothing (measured: +0.00 s after load_config)."""
    from diffusers.optimization import SchedulerType

    return [s.value for s in SchedulerType]


DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def _at_least(section: str, obj: Any, names: tuple[str, ...], low: float, nullable=False) -> None:
    """One ConfigError naming the first field below `low` (None passes where `nullable`)."""
    for name in names:
        value = getattr(obj, name)
        if value is None and nullable:
            continue
        if value is None or value < low:
            raise ConfigError(f"{section}.{name}={value}: must be >= {low}")


@dataclass
class OptimConfig:
    """AdamW, its learning-rate schedule and gradient clipping."""

    lr: float = 1.0e-4
    betas: list[float] = field(default_factory=lambda: [0.95, 0.999])
    eps: float = 1.0e-8
    weight_decay: float = 1.0e-6
    lr_scheduler: str = "cosine"  # a diffusers.optimization scheduler name
    lr_warmup_steps: int = 500
    grad_clip_norm: float | None = None  # clip the gradient's global norm; null = no clipping

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ConfigError(f"train.optim.lr={self.lr}: must be > 0")
        if not self.eps > 0:
            raise ConfigError(f"train.optim.eps={self.eps}: must be > 0")
        _at_least("train.optim", self, ("weight_decay", "lr_warmup_steps"), 0)
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"train.optim.betas={self.betas}: expected two values in [0, 1)")
        if self.lr_scheduler not in (names := lr_scheduler_names()):
            raise ConfigError(
                f"train.optim.lr_scheduler={self.lr_scheduler!r}: expected one of {', '.join(names)}"
            )
        if self.grad_clip_norm is not None and not self.grad_clip_norm > 0:
            raise ConfigError(
                f"train.optim.grad_clip_norm={self.grad_clip_norm}: must be > 0 or null"
            )


@dataclass
class EMAConfig:
    """The weight average that is deployed (models/ema.py: the paper's power warm-up)."""

    enabled: bool = True
    power: float = 0.75
    max_decay: float = 0.9999

    def __post_init__(self) -> None:
        if not self.power > 0:
            raise ConfigError(f"train.ema.power={self.power}: must be > 0")
        if not 0.0 <= self.max_decay <= 1.0:
            raise ConfigError(f"train.ema.max_decay={self.max_decay}: must be in [0, 1]")


@dataclass
class CadenceConfig:
    """How often to log, validate, evaluate and checkpoint (in optimizer steps; 0 = never)."""

    log_every: int = 50
    val_every: int = 2000
    eval_every: int = 10000  # rollout evaluation during training; 0 disables
    eval_first: bool = False  # also evaluate before the first step
    final_eval: bool = True  # evaluate when training ends, even with eval_every = 0
    checkpoint_every: int = 10000  # the last step is always checkpointed
    keep_best: int = 3  # best-k checkpoints by eval mean_score; 0 keeps none

    def __post_init__(self) -> None:
        _at_least("train.cadence", self, ("log_every",), 1)
        _at_least(
            "train.cadence", self, ("val_every", "eval_every", "checkpoint_every", "keep_best"), 0
        )


@dataclass
class TrainConfig:
    """The run: seed, device, batch, its length, and one section per helper (optim, ema, cadence)."""

    seed: int = 42
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    batch_size: int = 256
    num_epochs: int = 5000  # the paper's length; max_steps, when set, wins
    max_steps: int | None = None  # the schedule's length (the lr schedule ends here)
    time_limit_min: float | None = None  # stop (and checkpoint) after this much wall time
    stop_at_step: int | None = None  # stop (and checkpoint) here without changing the schedule
    # time-budgeted run: the lr schedule and the stopping point follow the fraction of this many
    # minutes of wall time used (max_steps, if set, stays an upper bound), so the schedule ends in
    # the budget on any machine; not bit-for-bit reproducible across machines by nature
    budget_min: float | None = None
    budget_eval_min: float | None = None  # reserved for the final evaluation; null = estimated
    amp: bool = False  # bf16 autocast of the training forward pass; weights and optimiser stay fp32
    # capture the whole step (forward, backward, AdamW, EMA) in a CUDA graph and replay it:
    # null = on where it applies (CUDA, one process, a graph_safe policy), else off
    cuda_graph: bool | None = None
    compile: bool = False  # torch.compile the denoiser (fused kernels; minutes of compiling first)
    num_threads: int = 0  # torch intra-op threads on CPU; 0 = the measured default (threads.py)
    progress: bool = True
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    cadence: CadenceConfig = field(default_factory=CadenceConfig)

    def __post_init__(self) -> None:
        if not DEVICE_PATTERN.fullmatch(self.device):
            raise ConfigError(
                f"train.device={self.device!r}: expected auto, cpu, cuda, cuda:N or mps"
            )
        _at_least("train", self, ("batch_size", "num_epochs"), 1)
        _at_least("train", self, ("num_threads",), 0)
        _at_least("train", self, ("max_steps", "stop_at_step"), 1, nullable=True)
        for key in ("time_limit_min", "budget_min"):
            value = getattr(self, key)
            if value is not None and not value > 0:
                raise ConfigError(f"train.{key}={value}: must be > 0 or null")
        if self.budget_eval_min is not None and not 0 <= self.budget_eval_min < (
            self.budget_min or float("inf")
        ):
            raise ConfigError(
                f"train.budget_eval_min={self.budget_eval_min}: must be >= 0 and less than train.budget_min"
            )


# The flat train.* keys of configs written before the sections (old checkpoints and run
# directories, old commands): read as their new place. The sectioned form is canonical.
LEGACY_TRAIN_KEYS = {
    **{k: f"optim.{k}" for k in ("lr", "betas", "eps", "weight_decay", "lr_scheduler")},
    **{k: f"optim.{k}" for k in ("lr_warmup_steps", "grad_clip_norm")},
    "use_ema": "ema.enabled",
    "ema_power": "ema.power",
    "ema_max_decay": "ema.max_decay",
    **{k: f"cadence.{k}" for k in ("log_every", "val_every", "eval_every", "checkpoint_every")},
    **{k: f"cadence.{k}" for k in ("eval_first", "final_eval", "keep_best")},
}


def canonical_key(key: str) -> str:
    """`train.lr` -> `train.optim.lr`; every other key is returned as it is."""
    section, _, rest = key.partition(".")
    head, dot, tail = rest.partition(".")
    if section == "train" and head in LEGACY_TRAIN_KEYS:
        return f"train.{LEGACY_TRAIN_KEYS[head]}{dot}{tail}"
    return key


_ABSENT = object()


def _upgrade(node: DictConfig) -> DictConfig:
    """Move a mapping's flat legacy train.* keys to their sections (a no-op on new configs)."""
    train = node.get("train") if isinstance(node, DictConfig) else None
    if not isinstance(train, DictConfig):
        return node
    for old, new in LEGACY_TRAIN_KEYS.items():
        if old not in train:
            continue
        if OmegaConf.select(train, new, default=_ABSENT) is not _ABSENT:
            raise ConfigError(
                f"train.{old} and train.{new} are the same key: give only train.{new}"
            )
        value = train.pop(old)
        OmegaConf.update(train, new, value, force_add=True)
    return node


@dataclass
class EvalConfig:
    """Rollouts as the paper measured them: max reward per episode, averaged over test seeds."""

    n_episodes: int = 50
    seed_start: int = 100000  # the paper's test seeds are 100000..100049
    max_steps: int = 300
    n_envs: int = 0  # envs (and policy batch) per wave; 0 = all episodes in one wave
    vector: str = (
        "auto"  # async (a process per env) | sync (in-process) | auto: async with >= 8 CPUs
    )
    n_videos: int = 4
    video_size: int = 96
    num_inference_steps: int | None = None  # override the policy's sampler steps at eval
    worker_timeout_s: float = 120.0

    def __post_init__(self) -> None:
        if self.vector not in ("async", "sync", "auto"):
            raise ConfigError(f"eval.vector={self.vector!r}: expected async, sync or auto")
        _at_least("eval", self, ("n_episodes", "max_steps", "video_size"), 1)
        _at_least("eval", self, ("n_envs", "n_videos", "seed_start"), 0)
        _at_least("eval", self, ("num_inference_steps",), 1, nullable=True)
        if self.video_size > 4096:
            raise ConfigError(f"eval.video_size={self.video_size}: must be <= 4096")
        if not self.worker_timeout_s > 0:
            raise ConfigError(f"eval.worker_timeout_s={self.worker_timeout_s}: must be > 0")


@dataclass
class WandbConfig:
    """Weights & Biases logging; offline by default and never required."""

    mode: str = "offline"  # online | offline | disabled
    project: str = "diffusion_policy"
    entity: str | None = None

    def __post_init__(self) -> None:
        if self.mode not in ("online", "offline", "disabled"):
            raise ConfigError(f"wandb.mode={self.mode!r}: expected online, offline or disabled")


@dataclass
class Config:
    """Everything a run needs; saved as the run's (and every checkpoint's) config.yaml."""

    preset: str = DEFAULT_PRESET
    task: TaskConfig = field(default_factory=TaskConfig)
    data: DataConfig = field(default_factory=DataConfig)
    policy: Any = None  # the dataclass registered under policy.name
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    run_dir: str | None = None  # default: runs/<preset>-<timestamp>


def _preset_path(preset: str) -> Path:
    """A name in configs/ is a preset, whatever the working directory holds (`./smoke` or
    `./smoke/` do not shadow it); a name ending in .yaml/.yml, or an existing file, is a YAML file."""
    p = Path(preset)
    if p.suffix in (".yaml", ".yml"):
        if not p.is_file():
            raise ConfigError(f"preset file {preset!r} does not exist")
        return p
    named = CONFIG_DIR / f"{preset}.yaml"
    if named.is_file() and (p.name == preset or p.parts[0] == "tasks"):  # tasks/NAME: a task alone
        return named
    if p.is_file():
        return p
    known = sorted(q.stem for q in CONFIG_DIR.glob("*.yaml"))
    raise ConfigError(
        f"unknown preset {preset!r} (known: {', '.join(known)}; or give a path to a .yaml file)"
    )


def _load_preset(preset: str, seen: tuple[str, ...] = ()) -> DictConfig:
    path = _preset_path(preset)
    if str(path) in seen:
        raise ConfigError(f"preset {preset!r}: inherit cycle through {' -> '.join(seen)}")
    try:
        node = OmegaConf.load(path)
    except Exception as e:  # yaml syntax errors
        raise ConfigError(f"preset {path}: cannot parse YAML: {_one_line(e)}") from None
    if not isinstance(node, DictConfig):
        raise ConfigError(f"preset {path}: expected a mapping at the top level")
    node = _upgrade(node)  # before the merge, so a flat child key overrides a sectioned parent
    parent = node.pop("inherit", None)
    # `inherit: [a, b]` merges a, then b, then this file: a policy recipe and a task compose
    # without copying either (blockpush_ibc_state_cpu is pusht_ibc_state_cpu's recipe on blockpush).
    parents = list(parent) if isinstance(parent, ListConfig) else [] if parent is None else [parent]
    if parents:
        trail = (*seen, str(path))
        node = OmegaConf.merge(*(_load_preset(str(p), trail) for p in parents), node)
    return node


def _one_line(e: BaseException) -> str:
    """A YAML parser's message (several indented lines) as one line."""
    return " ".join(str(e).split())


def _explain(e: OmegaConfBaseException, where: str) -> ConfigError:
    key = getattr(e, "full_key", None) or ""
    msg = str(e).splitlines()[0]
    return ConfigError(f"{where}: {('key ' + repr(key) + ': ') if key else ''}{msg}")


def _schema(policy_name: str) -> DictConfig:
    from diffusion_policy.registry import policy_config_class

    schema = OmegaConf.structured(Config)
    schema.policy = OmegaConf.structured(policy_config_class(policy_name))
    return schema


def load_config(preset: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """defaults <- preset <- overrides, validated. Raises ConfigError naming the bad key or value."""
    preset = preset or DEFAULT_PRESET
    user = _load_preset(preset)
    return config_from_nodes([user, _dotlist(overrides)], preset=str(preset))


def _dotlist(overrides: list[str] | tuple[str, ...]) -> DictConfig:
    """`key.sub=value` strings as one mapping, legacy keys at their new place."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value (e.g. train.batch_size=64)")
    items = [f"{canonical_key(k)}={v}" for k, v in (o.split("=", 1) for o in overrides)]
    try:
        return OmegaConf.from_dotlist(items)
    except OmegaConfBaseException as e:
        raise _explain(e, "overrides") from None


def config_from_nodes(nodes: list[Any], preset: str | None = None) -> Config:
    """Merge plain mappings onto the schema of the policy they name and build the typed Config."""
    name = "diffusion"
    for node in nodes:
        pol = OmegaConf.select(
            OmegaConf.create(node) if not isinstance(node, DictConfig) else node, "policy.name"
        )
        if pol is not None:
            name = str(pol)
    cfg = _schema(name)
    for i, node in enumerate(nodes):
        where = "preset" if i == 0 else "overrides"
        try:
            cfg = OmegaConf.merge(cfg, _upgrade(OmegaConf.create(node)))
        except OmegaConfBaseException as e:
            raise _explain(e, where) from None
    if preset is not None:
        cfg.preset = Path(preset).stem if preset.endswith((".yaml", ".yml")) else preset
    try:
        obj = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        raise _explain(e, "config") from None
    assert isinstance(obj, Config)
    return obj


# Keys a resumed run may change: they do not alter the optimisation, so the run stays bit-for-bit.
RESUME_SAFE_PREFIXES = (
    "train.stop_at_step",
    "train.time_limit_min",
    "train.progress",
    "train.device",
    "train.num_threads",
    "eval.",
    "wandb.",
)


def apply_resume_overrides(cfg: Config, overrides: list[str] | tuple[str, ...]) -> Config:
    """Apply overrides that a resumed run may change; refuse the rest, naming them."""
    keys = [o.split("=", 1)[0] for o in overrides]
    bad = [k for k in keys if not canonical_key(k).startswith(RESUME_SAFE_PREFIXES)]
    if bad:
        raise ConfigError(
            f"--resume keeps the saved config; cannot override {bad} (allowed: {', '.join(RESUME_SAFE_PREFIXES)})"
        )
    return config_from_nodes([OmegaConf.structured(cfg), _dotlist(overrides)])


def config_to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def config_from_yaml(text_or_path: str | Path) -> Config:
    """Rebuild a saved config (a checkpoint's config.yaml) with full validation."""
    p = Path(text_or_path)
    try:
        node = OmegaConf.load(p) if p.exists() else OmegaConf.create(str(text_or_path))
    except Exception as e:
        raise ConfigError(f"cannot read config {text_or_path}: {_one_line(e)}") from None
    return config_from_nodes([node])


def to_dict(obj: Any) -> dict:
    """A dataclass (config) as plain python, for logging."""
    return dataclasses.asdict(obj)
