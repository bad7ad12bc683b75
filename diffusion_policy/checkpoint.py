"""Checkpoints as directories: config.yaml + meta.json + model.safetensors (+ train_state/ for resume).

`model.safetensors` holds the deployable weights (the EMA model when EMA is on), the normaliser
included, so `dp eval` and `dp serve` need nothing but the directory. Nothing is pickled: the
resume state is tensors and plain numbers loaded with `weights_only=True`. Writes go to a temp
directory renamed into place, and `latest` is a symlink swapped atomically, so a crash or a full
disk mid-write never leaves a corrupt `latest`.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from diffusion_policy.config import Config, config_from_yaml, config_to_yaml
from diffusion_policy.errors import CheckpointError, UserError
from diffusion_policy.shapes import ShapeMeta

FORMAT_VERSION = 1
# what save_checkpoint writes into a checkpoint directory, and all that remove_checkpoint deletes
CHECKPOINT_ENTRIES = ("config.yaml", "meta.json", "model.safetensors", "train_state")


def _state_for_safetensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}


def save_checkpoint(
    path: Path,
    cfg: Config,
    shape_meta: ShapeMeta,
    policy: torch.nn.Module,
    meta: dict[str, Any] | None = None,
    train_state: dict[str, Any] | None = None,
    raw_policy: torch.nn.Module | None = None,
) -> Path:
    """Write a complete checkpoint directory at `path` atomically (replacing any previous one).

    A failed write (disk full, no permission) leaves the previous checkpoint as it was and raises
    one CheckpointError naming the path and the reason."""
    path = Path(path)
    tmp = path.parent / f".tmp-{path.name}-{uuid.uuid4().hex[:8]}"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        _write_files(tmp, cfg, shape_meta, policy, meta, train_state, raw_policy)
        old = None
        if path.exists():
            old = path.parent / f".old-{path.name}-{uuid.uuid4().hex[:8]}"
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:  # what someone else put in the old directory moves over
            for entry in old.iterdir():
                if entry.name not in CHECKPOINT_ENTRIES:
                    os.replace(entry, path / entry.name)
            shutil.rmtree(old, ignore_errors=True)
    except (OSError, RuntimeError, SafetensorError) as e:
        reason = _write_failure(e, path.parent)
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(
            f"cannot write checkpoint {path}: {reason} (earlier checkpoints are intact)"
        ) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _write_files(
    tmp: Path,
    cfg: Config,
    shape_meta: ShapeMeta,
    policy: torch.nn.Module,
    meta: dict[str, Any] | None,
    train_state: dict[str, Any] | None,
    raw_policy: torch.nn.Module | None,
) -> None:
    (tmp / "config.yaml").write_text(config_to_yaml(cfg))
    info = {
        "format_version": FORMAT_VERSION,
        "policy": cfg.policy.name,
        "shape_meta": shape_meta.to_dict(),
        **(meta or {}),
    }
    (tmp / "meta.json").write_text(json.dumps(info, indent=2))
    save_file(_state_for_safetensors(policy), str(tmp / "model.safetensors"))
    if train_state is not None:
        (tmp / "train_state").mkdir()
        if raw_policy is not None:
            save_file(
                _state_for_safetensors(raw_policy),
                str(tmp / "train_state" / "raw_model.safetensors"),
            )
        torch.save(train_state, tmp / "train_state" / "state.pt")
    _share_and_sync(tmp)


def _write_failure(e: BaseException, where: Path) -> str:
    """Why a write failed, in words: safetensors and torch.save hide ENOSPC in their messages."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    try:
        if shutil.disk_usage(where).free < 16 * 2**20:
            return "no space left on device"
    except OSError:
        pass
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _umask() -> int:
    """The process umask, read without changing it where Linux shows it."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _share_and_sync(d: Path) -> None:
    """The files get the user's normal permissions (safetensors writes 0600), then reach the disk."""
    mode = 0o666 & ~_umask()
    for f in d.rglob("*"):
        if f.is_file():
            os.chmod(f, mode)
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def remove_checkpoint(path: Path) -> None:
    """Delete what save_checkpoint wrote at `path`; the directory goes only if nothing else is in
    it (an evaluation someone saved inside stays)."""
    for name in CHECKPOINT_ENTRIES:
        p = path / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    try:
        path.rmdir()
    except OSError:
        pass


def point_symlink(link: Path, target: Path) -> None:
    """Atomically make `link` point at `target` (relative)."""
    tmp = link.parent / f".tmp-link-{uuid.uuid4().hex[:8]}"
    os.symlink(os.path.relpath(target, link.parent), tmp)
    os.replace(tmp, link)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint dir, or a run dir (-> its latest checkpoint)."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    if (p / "checkpoints" / "latest").exists():
        p = p / "checkpoints" / "latest"
    elif (p / "latest").exists():
        p = p / "latest"
    for name in ("config.yaml", "meta.json", "model.safetensors"):
        if not (p / name).exists():
            raise CheckpointError(f"{p} is not a checkpoint: {name} is missing")
    return p.resolve()


def read_checkpoint_meta(path: str | Path) -> tuple[Path, Config, dict[str, Any]]:
    p = resolve_checkpoint(path)
    try:
        meta = json.loads((p / "meta.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{p}/meta.json is unreadable: {e}") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{p}: checkpoint format {meta.get('format_version')} is not supported (expected {FORMAT_VERSION})"
        )
    try:
        cfg = config_from_yaml(p / "config.yaml")
    except UserError as e:
        raise CheckpointError(f"{p}/config.yaml: {e}") from None
    return p, cfg, meta


def load_state(module: torch.nn.Module, file: Path) -> None:
    """Strict load with a readable error for a checkpoint of another policy or configuration."""
    try:
        state = load_file(str(file))
    except Exception as e:
        raise CheckpointError(f"{file} is corrupt or unreadable: {e}") from None
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensors (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} tensors (e.g. {unexpected[:3]})")
        if wrong:
            parts.append(
                f"shape mismatch for {wrong[:3]}: {[(tuple(state[k].shape), tuple(own[k].shape)) for k in wrong[:3]]}"
            )
        raise CheckpointError(f"{file} does not match this policy/config: " + "; ".join(parts))
    module.load_state_dict(state)


def load_policy(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[torch.nn.Module, Config, dict[str, Any]]:
    """Rebuild the policy a checkpoint was trained as, from the checkpoint alone."""
    from diffusion_policy.registry import policy_class

    p, cfg, meta = read_checkpoint_meta(path)
    if meta.get("policy") != cfg.policy.name:
        raise CheckpointError(
            f"{p}: meta.json says policy {meta.get('policy')!r} but config.yaml says {cfg.policy.name!r}"
        )
    shape_meta = ShapeMeta.from_dict(meta["shape_meta"])
    policy = policy_class(cfg.policy.name)(cfg.policy, shape_meta)
    load_state(policy, p / "model.safetensors")
    return policy.to(device).eval(), cfg, meta
