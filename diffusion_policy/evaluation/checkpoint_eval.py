"""What `dp eval CHECKPOINT` does, as library calls: check every option before anything runs,
load the checkpoint (or only its config, for a server), run one evaluation mode, and write the
results where checkpoint pruning never reaches.

A checkpoint inside a run is evaluated into RUN/eval/<checkpoint>-<seed_start>-<episodes>[-mode]/
(the training loop's own evaluations are RUN/eval/step_N/), a bare checkpoint into
<checkpoint>-eval-<seed_start>-<episodes>[-mode]/ beside it. The sampling seed defaults to the
checkpoint's train.seed, as in the training loop's evaluation, so a checkpoint scores the same both
ways. `EvalOptions` mirrors `dp eval`'s flags, and its errors name them.
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
        ):
            if value is not None and value < low:
                hint = " (0: all episodes in one wave)" if flag == "--n-envs" else ""
                raise UserError(f"{flag} {value}: must be at least {low}{hint}")
        if self.ensemble is not None and not math.isfinite(self.ensemble):
            raise UserError(f"--ensemble {self.ensemble}: must be a finite number")
        if self.server and (self.sampler or self.inference_steps or self.timestep_spacing):
            raise UserError(
                "--sampler/--inference-steps/--timestep-spacing apply in-process; pass them to `dp serve`"
            )

    @property
    def mode(self) -> str:
        """'', 'server', 'realtime' or 'realtime-server': names the output directory."""
        return "-".join(m for m in ("realtime" * self.realtime, "server" * bool(self.server)) if m)


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
    tail = f"{seed_start}-{episodes}" + (f"-{mode}" if mode else "")
    run = checkpoint.parent.parent
    if checkpoint.parent.name == "checkpoints" and (run / "config.yaml").is_file():
        return run / "eval" / f"{checkpoint.name}-{tail}"
    return checkpoint.parent / f"{checkpoint.name}-eval-{tail}"


def check_writable(out: Path) -> None:
    """Fail now, in one line, rather than after the rollouts: create `out` and write a probe file."""
    try:
        (out / "videos").mkdir(parents=True, exist_ok=True)
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
    ecfg = _eval_config(cfg.eval, opts)
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
    if opts.realtime:
        metrics = _realtime(policy, cfg, ecfg, out, opts, seed, info, str(checkpoint))
    elif opts.server:
        metrics = _through_server(cfg, ecfg, out, opts, seed, info, str(checkpoint))
    else:
        from diffusion_policy.evaluation.rollout import Actor, evaluate

        metrics = evaluate(Actor(policy, seed=seed), cfg.task, ecfg, out_dir=out, info=info)
    return metrics, out


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
    if not hasattr(policy, "set_sampler"):  # not a diffusion policy: nothing to choose
        return
    if opts.sampler or opts.inference_steps or opts.timestep_spacing:
        policy.set_sampler(opts.sampler, opts.inference_steps, opts.timestep_spacing)
    policy.set_inference_backend(opts.backend)


def _through_server(cfg, ecfg, out, opts, seed, info, checkpoint) -> dict[str, Any]:
    from diffusion_policy.evaluation.rollout import check_server, evaluate
    from diffusion_policy.serving.client import ClientError, PolicyClient, RemoteActor

    try:
        with PolicyClient(opts.server, token=opts.token) as client:
            check_server(client.metadata, cfg, checkpoint)
            actor = RemoteActor(client, seed=seed)
            return evaluate(actor, cfg.task, ecfg, out_dir=out, info=info)
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
            ensemble_decay=opts.ensemble,
            replan_every=opts.replan_every,
            info=info,
        )


def summary_lines(metrics: dict[str, Any], out: Path) -> list[str]:
    """What `dp eval` prints: the scores with their intervals, realtime timing, and where they are."""
    lo, hi = metrics["mean_score_ci95"]
    lines = [
        f"mean_score {metrics['mean_score']:.3f} [{lo:.3f}, {hi:.3f}]  "
        f"success_rate {metrics['success_rate']:.3f}  mean_final_coverage {metrics['mean_final_coverage']:.3f}  "
        f"({metrics['n_episodes']} episodes from seed {metrics['seed_start']}, {metrics['wall_time_s']:.0f} s)"
    ]
    if "realtime" in metrics:
        rt = metrics["realtime"]
        lines.append(
            f"realtime {rt['control_hz']:g} Hz, {rt['n_robots']} robots: plan latency p50 {rt['plan_latency_ms_p50']:.1f} ms "
            f"p99 {rt['plan_latency_ms_p99']:.1f} ms, {rt['plans']} plans, {rt['dropped_actions']} stale actions dropped, "
            f"{rt['hold_ticks']}/{rt['steps']} ticks held, {rt['late_ticks']} late ticks"
        )
    lines.append(f"wrote {out / 'metrics.json'}")
    return lines
