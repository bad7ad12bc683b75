"""`dp data validate`: is a store sound, is it the published one, and what can it train?

Three checks, one decode of the data:
  1. The store itself (`replay_buffer.validate`): structure, chunk files (shards understood), every
     chunk decoded, values finite and of plausible magnitude, no low-dim outliers.
  2. A store named like a published one (its directory name is in datasets/manifests/) must match the
     shipped manifest's digests: v2 chunks carry no checksum, so a flipped byte can decode silently.
  3. The task's needs: which Push-T observation types this store can train (keys, dtypes, shapes),
     or, given a preset, whether the store has every source its declared task spec reads.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from diffusion_policy.data import pusht_format
from diffusion_policy.data.fetch import Digester, buffer_digests, compare_digests, known_manifest
from diffusion_policy.data.replay_buffer import ReplayBuffer, validate


@dataclass
class StoreReport:
    problems: list[str] = field(default_factory=list)  # empty: the store is fit for its use
    notes: list[str] = field(default_factory=list)  # what was checked and found, one line each


def check_store(
    path: str | os.PathLike,
    obs_type: str | None = None,
    task: str = "pusht",
    manifest: dict | None = None,
) -> StoreReport:
    """All problems of a store for `task` (and, if given, for training `obs_type`), plus notes.

    `manifest` overrides the shipped manifest looked up by the store's directory name.
    """
    if obs_type is not None:
        pusht_format.needed_keys(obs_type)  # an unknown obs type is a one-line error
    digester = Digester()
    problems = validate(path, visit=digester)
    if problems:
        return StoreReport(problems)
    buf = ReplayBuffer.open(path, "r", keys=[])  # validate checked every chunk file already
    report = StoreReport(notes=[f"store     {buf.n_episodes} episodes, {buf.n_steps} steps"])
    manifest = manifest or known_manifest(path)
    if manifest is not None:
        _check_manifest(report, buf, digester, manifest)
    if task == "pusht":
        _check_pusht(report, buf, obs_type)
    elif task != "none":
        _check_preset(report, buf, task)
    return report


def _check_preset(report: StoreReport, buf: ReplayBuffer, preset: str) -> None:
    """The store against a preset's declared task (task.obs and task.action), as training reads it."""
    from diffusion_policy.config import load_config
    from diffusion_policy.data.datasets import task_spec
    from diffusion_policy.data.task_spec import check_spec
    from diffusion_policy.errors import DataError

    cfg = load_config(preset)  # an unknown preset or a bad config is a ConfigError naming it
    try:
        shapes = check_spec(buf, task_spec(cfg.task))
    except DataError as e:
        report.problems.append(f"cannot    train {preset} (task {cfg.task.name}): {e}")
        return
    keys = ", ".join(f"{k} {list(v)}" for k, v in shapes.items())
    report.notes.append(f"trains    {preset} (task {cfg.task.name}): {keys}")


def _check_manifest(report: StoreReport, buf: ReplayBuffer, digester: Digester, m: dict) -> None:
    mismatch = compare_digests(buf.path, buffer_digests(buf, digester), m)
    if mismatch:
        report.problems += mismatch
        report.problems.append(
            f"{buf.path}: differs from the published dataset {m['name']!r} (shipped manifest); "
            f"restore it with `dp data fetch {m['name']} --force`"
        )
    else:
        report.notes.append(f"manifest  matches the published dataset {m['name']!r}")


def _check_pusht(report: StoreReport, buf: ReplayBuffer, obs_type: str | None) -> None:
    per_type = pusht_format.obs_type_problems(buf)
    ok = [t for t, ps in per_type.items() if not ps]
    report.notes.append(f"trains    Push-T obs types: {', '.join(ok) or 'none'}")
    for t, ps in per_type.items():
        if ps:
            report.notes.append(f"cannot    {t}: {'; '.join(ps)}")
    if obs_type is not None and per_type[obs_type]:
        report.problems.append(
            f"{buf.path}: cannot train Push-T obs_type {obs_type}: {'; '.join(per_type[obs_type])}"
        )
    elif obs_type is None and not ok:
        reasons = dict.fromkeys(p for ps in per_type.values() for p in ps)
        report.problems.append(
            f"{buf.path}: cannot train any Push-T obs type ({'; '.join(reasons)})"
        )
