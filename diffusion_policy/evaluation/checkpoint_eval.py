"""What `dp eval CHECKPOINT` does, as library calls: check every option before anything runs,
load the checkpoint (or only its config, for a server), run one evaluation mode, and write the
results where checkpoint pruning never reaches.

A checkpoint inside a run is evaluated into RUN/eval/<checkpoint>-<seed_start>-<episodes>[-mode]/
(the training loop's own evaluations are RUN/eval/step_N/), a bare checkpoint into
<checkpoint>-eval-<seed_start>-<episodes>[-mode]/ beside it. The sampling seed defaults to the
checkpoint's train.seed, as in the training loop's evaluation, so a checkpoint scores the same both
ways. `EvalOptions` mirrors `dp eval`'s flags, and its errors name them.

A checkpoint whose task has no simulator (task.env_id null), or any checkpoint with --offline or
--dataset, is evaluated offline instead (evaluation/offline.py): on the run's held-out episodes, or
on every episode of the --dataset store, into <checkpoint>-offline[-<episodes>][-<store>]/.
"""

from __future__ import annotations

import math
import os
import tempfile
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from diffusion_policy.errors import UserError


@dataclass(frozen=True)
class EvalOptions:
    """What may differ from the checkpoint's own eval settings; None keeps the checkpoint's."""

    episodes: int | None = None
    seed_start: int | None = None
    max_steps: int | None = None
    n_envs: int | None = None  # 0: all episodes in one wave
    videos: int | None = None
    sync: bool = False
    device: str = "cpu"
    out: str | Path | None = None
    seed: int | None = None  # sampling noise; None: the checkpoint's train.seed
    sampler: str | None = None
    inference_steps: int | None = None
    timestep_spacing: str | None = None
    backend: str = "auto"
    server: str | None = None
    token: str | None = None
    realtime: bool = False
    robots: int | None = None
    ensemble: float | None = None
    replan_every: int | None = None
    offline: bool = False  # validate on demonstrations even where the task has an env
    dataset: str | Path | None = None  # offline: every episode of this store, not the held-out ones
    delay: int | None = None  # simulated inference delay in control steps (None: 0)
    strategy: str | None = None  # execution strategy (None: sync; realtime: async)
    n_action_steps: int | None = None  # actions executed per plan (None: the checkpoint's)
    bid_samples: int | None = None
    ensemble_decay: float | None = None
    rtc_beta: float | None = None  # rtc: the clip on the guidance weight (None: the paper's 5)

    def __post_init__(self) -> None:
        for flag, value, low in (
            ("--episodes", self.episodes, 1),
            ("--max-steps", self.max_steps, 1),
            ("--n-envs", self.n_envs, 0),
            ("--videos", self.videos, 0),
            ("--seed-start", self.seed_start, 0),
            ("--inference-steps", self.inference_steps, 1),
            ("--robots", self.robots, 1),
            ("--replan-every", self.replan_every, 1),
            ("--delay", self.delay, 0),
            ("--n-action-steps", self.n_action_steps, 1),
            ("--bid-samples", self.bid_samples, 1),
        ):
            if value is not None and value < low:
                hint = " (0: all episodes in one wave)" if flag == "--n-envs" else ""
                raise UserError(f"{flag} {value}: must be at least {low}{hint}")
        for flag, x in (("--ensemble", self.ensemble), ("--ensemble-decay", self.ensemble_decay)):
            if x is not None and not math.isfinite(x):
                raise UserError(f"{flag} {x}: must be a finite number")
        if self.rtc_beta is not None and not (math.isfinite(self.rtc_beta) and self.rtc_beta > 0):
            raise UserError(f"--rtc-beta {self.rtc_beta}: must be a finite number > 0")
        self._check_execution()
        if self.server and (self.sampler or self.inference_steps or self.timestep_spacing):
            raise UserError(
                "--sampler/--inference-steps/--timestep-spacing apply in-process; pass them to `dp serve`"
            )

    def _check_execution(self) -> None:
        from diffusion_policy.execution import STRATEGY_NAMES

        if self.strategy is not None and self.strategy not in STRATEGY_NAMES:
            raise UserError(f"--strategy {self.strategy!r}: expected one of {', '.join(STRATEGY_NAMES)}")  # fmt: skip
        if self.realtime and (self.delay is not None or self.n_action_steps is not None):
            flag = "--delay" if self.delay is not None else "--n-action-steps"
            raise UserError(f"{flag} simulates latency in the controlled-delay evaluation; --realtime measures it on the wall clock: give one of them")  # fmt: skip
        if self.realtime and self.ensemble is not None and self.strategy not in (None, "ensemble"):
            raise UserError(f"--ensemble is the ensemble strategy's decay; it does not apply to --strategy {self.strategy}")  # fmt: skip
        for flag, value, owner in (("--bid-samples", self.bid_samples, "bid"), ("--ensemble-decay", self.ensemble_decay, "ensemble"), ("--rtc-beta", self.rtc_beta, "rtc")):  # fmt: skip
            if value is not None and self.strategy != owner:
                raise UserError(f"{flag} applies to --strategy {owner}, not {self.strategy or 'the default'}")  # fmt: skip

    def execution_spec(self) -> Any:
        """The controlled-delay evaluation these options ask for (execution.ExecutionSpec)."""
        from diffusion_policy.execution import ExecutionSpec

        given = {"strategy": self.strategy, "delay": self.delay, "n_action_steps": self.n_action_steps,
                 "n_samples": self.bid_samples, "ensemble_decay": self.ensemble_decay}  # fmt: skip
        return ExecutionSpec(**{k: v for k, v in given.items() if v is not None})

    @property
    def execution_tag(self) -> str:
        """'' for the default synchronous evaluation, else e.g. 'rtc-d4', 'bid-d2-ta12-n8'."""
        spec = self.execution_spec()
        if self.realtime:
            return self.strategy or ""
        if (spec.strategy, spec.delay, spec.n_action_steps) == ("sync", 0, None):
            return ""
        tag = f"{spec.strategy}-d{spec.delay}" + (f"-ta{spec.n_action_steps}" if spec.n_action_steps else "")  # fmt: skip
        tag += f"-n{self.bid_samples}" if self.bid_samples else ""
        tag += f"-b{self.rtc_beta:g}" if self.rtc_beta is not None else ""
        return tag + (f"-m{self.ensemble_decay:g}" if self.ensemble_decay is not None else "")

    @property
    def mode(self) -> str:
        """'', 'server', 'realtime', 'realtime-server', with the execution tag ('async-d4-server'):
        names the output directory."""
        parts = ("realtime" * self.realtime, self.execution_tag, "server" * bool(self.server))
        return "-".join(m for m in parts if m)


def check_device(device: str) -> None:
    """Refuse a device this machine does not have, before a checkpoint is loaded onto it."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise UserError(f"--device {device!r} is not a device: {e}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {device}: CUDA is not available on this machine; use cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(
                f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {device}: MPS is not available on this machine; use cpu")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"--device {device}: expected cpu, cuda, cuda:N or mps")


def default_out_dir(checkpoint: Path, seed_start: int, episodes: int, mode: str = "") -> Path:
    """RUN/eval/<name>-<seed_start>-<episodes>[-mode] for a checkpoint of a run, else beside it."""
    return _beside(checkpoint, f"{seed_start}-{episodes}" + (f"-{mode}" if mode else ""))


def _beside(checkpoint: Path, tail: str) -> Path:
    run = checkpoint.parent.parent
    if checkpoint.parent.name == "checkpoints" and (run / "config.yaml").is_file():
        return run / "eval" / f"{checkpoint.name}-{tail}"
    return checkpoint.parent / f"{checkpoint.name}-eval-{tail}"


def check_writable(out: Path, videos: bool = True) -> None:
    """Fail now, in one line, rather than after the rollouts: create `out` and write a probe file."""
    try:
        (out / "videos" if videos else out).mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=out, prefix=".write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"cannot write evaluation results to {out}: {os_reason(e)}") from None


def os_reason(e: OSError) -> str:
    """Why a write failed, in words: mkdir on a file says only 'File exists'."""
    if isinstance(e, FileExistsError):
        return f"{e.filename} is a file, not a directory"
    return f"{e.strerror or e}" + (f" ({e.filename})" if e.filename else "")


def evaluate_checkpoint(checkpoint: str | Path, opts: EvalOptions) -> tuple[dict[str, Any], Path]:
    """Evaluate a checkpoint (or a run's latest) as `opts` says; returns the metrics and their dir."""
    from diffusion_policy.checkpoint import load_policy, read_checkpoint_meta

    if not opts.server:
        check_device(opts.device)
    path, cfg, _ = read_checkpoint_meta(checkpoint)
    if opts.offline or opts.dataset or not cfg.task.env_id:
        return _offline(path, cfg, opts)
    ecfg = _eval_config(cfg.eval, opts)
    if not opts.realtime:
        _check_delay(cfg.policy, opts)
    mode = opts.mode
    out = (
        Path(opts.out)
        if opts.out
        else default_out_dir(path, ecfg.seed_start, ecfg.n_episodes, mode)
    )
    check_writable(out)
    policy = None
    if not opts.server:
        policy, cfg, _ = load_policy(path, device=opts.device)
        _apply_sampler(policy, opts)
    seed = cfg.train.seed if opts.seed is None else opts.seed
    info = {"checkpoint": str(path), "sampling_seed": seed, "mode": mode or "in-process"}
    spec = opts.execution_spec()
    if opts.realtime:
        metrics = _realtime(policy, cfg, ecfg, out, opts, seed, info, str(checkpoint))
    elif opts.server:
        metrics = _through_server(cfg, ecfg, out, opts, seed, info, str(checkpoint))
    else:
        from diffusion_policy.evaluation.rollout import Actor, evaluate

        actor = Actor(policy, seed=seed, rtc_beta=opts.rtc_beta)
        metrics = evaluate(actor, cfg.task, ecfg, out_dir=out, info=info, execution=spec)
    return metrics, out


def _check_delay(policy_cfg: Any, opts: EvalOptions) -> None:
    """--delay and --n-action-steps against the checkpoint's horizon, before anything loads."""
    from diffusion_policy.execution import check_delay

    spec = opts.execution_spec()
    n_action_steps = spec.n_action_steps or policy_cfg.n_action_steps
    check_delay(spec.delay, n_action_steps, policy_cfg.horizon, policy_cfg.n_obs_steps)


# flags that only rollouts use, with the EvalOptions field each sets
_ROLLOUT_ONLY = {
    "--seed-start": "seed_start", "--max-steps": "max_steps", "--n-envs": "n_envs",
    "--videos": "videos", "--sync": "sync", "--server": "server", "--realtime": "realtime",
    "--robots": "robots", "--ensemble": "ensemble", "--replan-every": "replan_every",
    "--delay": "delay", "--strategy": "strategy", "--n-action-steps": "n_action_steps",
    "--bid-samples": "bid_samples", "--ensemble-decay": "ensemble_decay",
}  # fmt: skip


def _offline(path: Path, cfg: Any, opts: EvalOptions) -> tuple[dict[str, Any], Path]:
    """The held-out episodes (or --dataset's), scored and plotted as the training loop scores them."""
    from diffusion_policy.checkpoint import load_policy
    from diffusion_policy.evaluation.offline import evaluate_offline

    given = [
        flag  # `is`, not `in`: --seed-start 0 is given, though 0 == False
        for flag, name in _ROLLOUT_ONLY.items()
        if getattr(opts, name) is not None and getattr(opts, name) is not False
    ]
    if given:
        why = (
            "has no simulator (task.env_id is null)"
            if not cfg.task.env_id
            else "is evaluated offline"
        )
        raise UserError(
            f"{given[0]} applies to rollouts, but this checkpoint's task {why}; offline evaluation "
            "takes --episodes, --dataset, --seed, --device, --out and the sampler flags"
        )  # fmt: skip
    tail = "offline" + (f"-{opts.episodes}" if opts.episodes else "")
    tail += f"-{Path(opts.dataset).stem}" if opts.dataset else ""
    policy, cfg, _ = load_policy(path, device=opts.device)
    _apply_sampler(policy, opts)
    ds = _offline_episodes(cfg, policy, opts)
    out = Path(opts.out) if opts.out else _beside(path, tail)
    check_writable(out, videos=False)
    seed = cfg.train.seed if opts.seed is None else opts.seed
    info = {"checkpoint": str(path), "sampling_seed": seed, "mode": "offline",
            "dataset": str(opts.dataset or cfg.task.dataset)}  # fmt: skip
    metrics = evaluate_offline(
        policy, ds, batch_size=cfg.train.batch_size, seed=seed, device=opts.device, out=out,
        title=f"{path.parent.parent.name}/{path.parent.name}/{path.name}: predicted vs demonstrated actions",
        hz=cfg.task.control_hz, info=info,
    )  # fmt: skip
    return metrics, out


def _offline_episodes(cfg: Any, policy: Any, opts: EvalOptions) -> Any:
    """The run's held-out episodes (the first --episodes of them), or all of --dataset's."""
    from diffusion_policy.evaluation.offline import held_out_episodes, only_episodes
    from diffusion_policy.training.build import load_datasets

    if opts.dataset:
        data = replace(cfg.data, val_ratio=0.0, max_train_episodes=None)
        cfg = replace(cfg, task=replace(cfg.task, dataset=str(opts.dataset)), data=data)
        ds, _, _ = load_datasets(cfg, opts.device)
        _check_same_shapes(ds.shape_meta, policy.shape_meta, opts.dataset)
    else:
        _, ds, _ = load_datasets(cfg, opts.device)
        if ds is None:
            raise UserError(
                f"the run held out no episodes (data.val_ratio={cfg.data.val_ratio}): give --dataset "
                "STORE to evaluate on other demonstrations, or train with data.val_ratio > 0"
            )
    episodes = held_out_episodes(ds)
    if opts.episodes is not None and opts.episodes > len(episodes):
        where = f"{opts.dataset} holds" if opts.dataset else "the run held out"
        raise UserError(f"--episodes {opts.episodes}: {where} only {len(episodes)} episodes")
    return only_episodes(ds, episodes[: opts.episodes]) if opts.episodes else ds


def _check_same_shapes(got: Any, want: Any, store: str | Path) -> None:
    for key, spec in want.obs.items():
        have = got.obs.get(key)
        if have is None or tuple(have.shape) != tuple(spec.shape):
            shape = "is absent" if have is None else f"has shape {tuple(have.shape)}"
            raise UserError(f"--dataset {store}: observation {key!r} {shape}; the checkpoint expects {tuple(spec.shape)}")  # fmt: skip
    if got.action_dim != want.action_dim:
        raise UserError(f"--dataset {store}: actions have {got.action_dim} dimensions; the checkpoint's have {want.action_dim}")  # fmt: skip


# EvalOptions field -> EvalConfig field it overrides
_OVERRIDES = {
    "episodes": "n_episodes",
    "seed_start": "seed_start",
    "max_steps": "max_steps",
    "n_envs": "n_envs",
    "videos": "n_videos",
}


def _eval_config(ecfg: Any, opts: EvalOptions) -> Any:
    given = {key: getattr(opts, name) for name, key in _OVERRIDES.items()}
    if opts.sync:
        given["vector"] = "sync"
    return replace(ecfg, **{k: v for k, v in given.items() if v is not None})


def _apply_sampler(policy: Any, opts: EvalOptions) -> None:
    """The sampler flags of `opts`, through the policy contract (as `dp serve` applies its own)."""
    policy.configure_sampler(
        opts.sampler, opts.inference_steps, opts.timestep_spacing, opts.backend
    )


def _through_server(cfg, ecfg, out, opts, seed, info, checkpoint) -> dict[str, Any]:
    from diffusion_policy.evaluation.rollout import check_server, evaluate
    from diffusion_policy.serving.client import ClientError, PolicyClient, RemoteActor

    try:
        with PolicyClient(opts.server, token=opts.token) as client:
            check_server(client.metadata, cfg, checkpoint)
            actor = RemoteActor(client, seed=seed)
            spec = opts.execution_spec()
            return evaluate(actor, cfg.task, ecfg, out_dir=out, info=info, execution=spec)
    except ClientError as e:  # server down, refused token, bad request: one line
        raise UserError(f"policy server {opts.server}: {e}") from None


def _realtime(policy, cfg, ecfg, out, opts, seed, info, checkpoint) -> dict[str, Any]:
    """Each robot plans through its own server connection, or through the in-process policy."""
    import itertools

    from diffusion_policy.evaluation.realtime import (
        evaluate_realtime,
        local_planners,
        server_planners,
    )
    from diffusion_policy.evaluation.rollout import check_server

    seeds = itertools.count(seed)
    with ExitStack() as stack:
        if opts.server:
            check = lambda meta: check_server(meta, cfg, checkpoint)  # noqa: E731
            planners = server_planners(opts.server, opts.token, check, seeds, stack)
        else:
            planners = local_planners(policy, seeds)
        return evaluate_realtime(
            planners,
            cfg.policy.n_obs_steps,
            cfg.task,
            ecfg,
            out,
            n_robots=opts.robots or ecfg.n_envs or min(ecfg.n_episodes, 8),
            strategy=_realtime_strategy(opts),
            replan_every=opts.replan_every,
            info=info,
        )


def _realtime_strategy(opts: EvalOptions) -> Any:
    """--strategy for the wall-clock controller: async by default, ensemble with --ensemble M."""
    from diffusion_policy.execution import DEFAULT_ENSEMBLE_DECAY, make_strategy

    name = opts.strategy or ("ensemble" if opts.ensemble is not None else "async")
    decay = next((m for m in (opts.ensemble, opts.ensemble_decay) if m is not None), None)
    return make_strategy(
        name,
        ensemble_decay=DEFAULT_ENSEMBLE_DECAY if decay is None else decay,
        n_samples=opts.bid_samples or 16,
    )


def summary_lines(metrics: dict[str, Any], out: Path) -> list[str]:
    """What `dp eval` prints: the scores with their intervals, realtime timing, and where they are."""
    if metrics.get("mode") == "offline":
        return _offline_lines(metrics, out)
    lo, hi = metrics["mean_score_ci95"]
    extra = "".join(
        f"  {k} {metrics[k]:.3f}"
        for k in ("mean_final_coverage", "p1_rate", "p2_rate")
        if k in metrics
    )
    lines = [
        f"mean_score {metrics['mean_score']:.3f} [{lo:.3f}, {hi:.3f}]  "
        f"success_rate {metrics['success_rate']:.3f}{extra}  "
        f"({metrics['n_episodes']} episodes from seed {metrics['seed_start']}, {metrics['wall_time_s']:.0f} s)"
    ]
    if "mode_frequencies" in metrics:
        modes = ", ".join(f"{m} {f:.2f}" for m, f in metrics["mode_frequencies"].items())
        lines.append(f"modes reached: {modes}")
    if "realtime" in metrics:
        rt = metrics["realtime"]
        lines.append(
            f"realtime {rt['control_hz']:g} Hz, {rt['n_robots']} robots: plan latency p50 {rt['plan_latency_ms_p50']:.1f} ms "
            f"p99 {rt['plan_latency_ms_p99']:.1f} ms, {rt['plans']} plans, {rt['dropped_actions']} stale actions dropped, "
            f"{rt['hold_ticks']}/{rt['steps']} ticks held, {rt['late_ticks']} late ticks"
        )
    if "smoothness" in metrics:
        lines.append(smoothness_line(metrics.get("execution", {}), metrics["smoothness"]))
    lines.append(f"wrote {out / 'metrics.json'}")
    return lines


def smoothness_line(ex: dict[str, Any], sm: dict[str, Any]) -> str:
    """'rtc d=4 Ta=8: seam jump mean 3.1 p95 9.0 (95 seams), inside mean 2.0 p95 5.2, 0 stale dropped'."""
    num = lambda x: "n/a" if x is None else f"{x:.3g}"  # noqa: E731
    delay = "wall clock" if ex.get("delay") is None else f"d={ex['delay']}"
    ta = f" Ta={ex['n_action_steps']}" if ex.get("n_action_steps") else ""
    head = f"{ex.get('strategy', '?')} {delay}{ta}: " if ex else ""
    holds = f", {sm['hold_ticks']} ticks held" if sm.get("hold_ticks") else ""
    return (
        f"{head}seam jump mean {num(sm['seam_jump_mean'])} p95 {num(sm['seam_jump_p95'])} "
        f"({sm['n_seam']} seams), inside chunks mean {num(sm['inside_jump_mean'])} "
        f"p95 {num(sm['inside_jump_p95'])}, {sm['dropped_actions']} stale actions dropped{holds}"
    )


def _offline_lines(m: dict[str, Any], out: Path) -> list[str]:
    dims = lambda xs: "[" + ", ".join(f"{x:.4g}" for x in xs) + "]"  # noqa: E731
    return [
        f"offline: {len(m['episodes'])} episodes of {m['dataset']}, {m['windows']} windows, sampling seed {m['sampling_seed']}",
        f"loss {m['loss']:.4f}  action_mse {m['action_mse']:.4g} per dim {dims(m['action_mse_per_dim'])}  normalised {m['action_mse_norm']:.4g}",
        f"horizon_mse {m['horizon_mse']:.4g} per dim {dims(m['horizon_mse_per_dim'])}  normalised {m['horizon_mse_norm']:.4g}",
        f"wrote {out / 'metrics.json'} and {out / m['plot']}",
    ]  # fmt: skip
