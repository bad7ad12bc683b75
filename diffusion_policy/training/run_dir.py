"""The run directory: one run per directory, never two mixed, and a log that matches the checkpoints.

RUN/config.yaml      the run's config
RUN/metrics.jsonl    one JSON object per event, each with its "step"
RUN/checkpoints/     step_NNNNNNNN/ (the newest two), best_*/, latest -> step_...
RUN/eval/            the training loop's rollouts
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from diffusion_policy.config import Config
from diffusion_policy.errors import ConfigError

# what a run writes into its directory; --overwrite removes these and nothing else
RUN_FILES = ("config.yaml", "metrics.jsonl")
RUN_DIRS = ("checkpoints", "eval", "wandb")


def default_run_dir(cfg: Config) -> Path:
    if cfg.run_dir:
        return Path(cfg.run_dir)
    return Path("runs") / f"{cfg.preset}-{time.strftime('%Y%m%d-%H%M%S')}"


def holds_a_run(run_dir: Path) -> bool:
    return any((run_dir / n).exists() for n in (*RUN_FILES, "checkpoints"))


def check_fresh(run_dir: Path, overwrite: bool, flag: str = "--overwrite") -> Path:
    """Refuse a new run into a directory that holds one (naming --resume and `flag`), unless
    `overwrite`. Checked before anything is built or written, on every process."""
    if holds_a_run(run_dir) and not overwrite:
        raise ConfigError(
            f"run_dir {run_dir} already holds a run: continue it with `dp train --resume {run_dir}`, "
            f"or pass {flag} to delete it and start over"
        )
    return run_dir


def prepare_fresh(run_dir: Path, overwrite: bool, config_yaml: str) -> None:
    """Create the run directory with its config.yaml, first removing the old run's files (and
    only those) when `overwrite`. Done once the run is built, so a failed start deletes nothing."""
    if overwrite:
        for name in RUN_FILES:
            (run_dir / name).unlink(missing_ok=True)
        for name in RUN_DIRS:
            shutil.rmtree(run_dir / name, ignore_errors=True)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(config_yaml)
    except OSError as e:
        raise ConfigError(f"run_dir {run_dir}: cannot write there ({e.strerror or e})") from None


def resume_run_dir(path: str | Path) -> Path:
    """The run directory that `--resume PATH` names. A run's checkpoint directory (its latest, or
    checkpoints/latest itself) resolves to the run; any other checkpoint is refused, saying why."""
    p = Path(path)
    if p.name == "checkpoints" and (p.parent / "config.yaml").exists():
        return p.parent
    if (p / "checkpoints").is_dir() or not (p / "meta.json").exists():
        return p  # a run directory (or nothing: read_checkpoint_meta names what is missing)
    run = p.parent.parent
    latest = run / "checkpoints" / "latest"
    if p.parent.name != "checkpoints" or not (run / "config.yaml").exists():
        raise ConfigError(
            f"--resume {p}: this is a checkpoint outside a run directory; --resume takes the run "
            "directory (the one holding config.yaml and checkpoints/)"
        )
    if not latest.exists() or latest.resolve() != p.resolve():
        raise ConfigError(
            f"--resume {p}: not the latest checkpoint of run {run} (which resumes from "
            f"{latest.resolve().name if latest.exists() else 'nothing'}); give the run directory"
        )
    return run


def clean_partial_writes(ckpt_dir: Path) -> list[Path]:
    """Remove what killed checkpoint writes left: .tmp-* and .old-* entries (save_checkpoint's)."""
    removed = []
    for p in [*ckpt_dir.glob(".tmp-*"), *ckpt_dir.glob(".old-*")]:
        if p.is_symlink() or p.is_file():
            p.unlink()
        else:
            shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


def truncate_metrics(path: Path, step: int) -> int:
    """Drop the log lines after `step` (and a torn last line), atomically; returns how many went.

    A resumed run re-runs the steps after its checkpoint, so their old lines would appear twice."""
    if not path.exists():
        return 0
    lines = path.read_text().splitlines(keepends=True)
    keep = []
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and int(row.get("step", 0)) <= step:
            keep.append(line if line.endswith("\n") else line + "\n")
    if len(keep) < len(lines):
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(keep))
        os.replace(tmp, path)
    return len(lines) - len(keep)
