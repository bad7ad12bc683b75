"""robomimic HDF5 -> replay-buffer zarr store (`dp data convert robomimic FILE.hdf5 --out STORE.zarr`).

robomimic's documented layout (docs/datasets/overview.md; written by its dataset_states_to_obs.py):
`data` (attributes `total`, `env_args` JSON) holds `demo_N` groups (attribute `num_samples`), each with
`actions` (N, Da), `obs/<key>` and `next_obs/<key>` (low-dim float arrays, uint8 HWC images),
`rewards`, `dones` and optionally `states`; `mask/<filter key>` lists demo names (bytes) for subsets
such as train/valid. We keep what a policy trains on: `data/<obs key>` for each chosen obs key
(uint8 stays uint8, everything else becomes float32) and `data/action` (float32), one episode per
demo in robomimic's own order (by N: demo_2 before demo_10). The episode is the obs at t with the
action taken at t, the same pairing as the Push-T stores.

Demos are read and appended one at a time, so a file larger than memory converts; the store is
written under a temporary name beside --out and renamed at the end, so a failed conversion leaves
no half store behind.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from diffusion_policy.errors import DataError, UserError

ACTION_KEY = "action"
_DEMO = re.compile(r"demo_(\d+)")


@dataclass
class ConvertSummary:
    out: Path
    n_episodes: int = 0
    n_steps: int = 0
    keys: dict[str, tuple[tuple[int, ...], str]] = field(
        default_factory=dict
    )  # key -> shape, dtype


def _open_hdf5(src: Path) -> Any:
    try:
        import h5py
    except ImportError:
        raise UserError("reading robomimic files needs h5py: pip install h5py") from None

    if not src.is_file():
        raise DataError(f"{src}: no such file")
    if not h5py.is_hdf5(str(src)):
        raise DataError(f"{src}: not an HDF5 file (robomimic datasets are .hdf5)")
    try:
        return h5py.File(str(src), "r")
    except OSError as e:
        raise DataError(f"{src}: cannot open as HDF5 ({e})") from e


def _demo_names(src: Path, f: Any, filter_key: str | None) -> list[str]:
    """The demos to convert, in robomimic's order (by number), optionally those of one filter key."""
    if "data" not in f:
        raise DataError(
            f"{src}: no group data/ (not a robomimic dataset: expected data/demo_N/actions and obs/)"
        )
    demos = [k for k in f["data"] if _DEMO.fullmatch(k)]
    if not demos:
        raise DataError(f"{src}: data/ holds no demo_N groups")
    if filter_key is not None:
        masks = sorted(f["mask"]) if "mask" in f else []
        if filter_key not in masks:
            have = ", ".join(masks) if masks else "none: the file has no mask/ group"
            raise DataError(f"{src}: unknown filter key {filter_key!r} (have: {have})")
        chosen = [b.decode() if isinstance(b, bytes) else str(b) for b in f["mask"][filter_key][()]]
        missing = sorted(set(chosen) - set(demos))
        if missing:
            raise DataError(
                f"{src}: mask/{filter_key} names {len(missing)} demo(s) not in data/, first {missing[0]}"
            )
        if not chosen:
            raise DataError(f"{src}: mask/{filter_key} selects no demos")
        demos = list(dict.fromkeys(chosen))
    return sorted(demos, key=lambda d: int(_DEMO.fullmatch(d).group(1)))


def _store_dtype(x: np.ndarray) -> np.dtype:
    return np.dtype(np.uint8) if x.dtype == np.uint8 else np.dtype(np.float32)


def _read_demo(src: Path, demo: Any, keys: Sequence[str]) -> dict[str, np.ndarray]:
    """One demo as {store key: array}, with every problem one line naming the demo and key."""
    where = f"{src}: {demo.name.lstrip('/')}"
    if "actions" not in demo:
        raise DataError(f"{where}: no actions dataset")
    if "obs" not in demo:
        raise DataError(f"{where}: no obs group")
    actions = np.asarray(demo["actions"][()])
    if actions.ndim != 2 or len(actions) == 0:
        raise DataError(f"{where}/actions: shape {actions.shape}, expected (N > 0, action dim)")
    n_samples = demo.attrs.get("num_samples")
    if n_samples is not None and int(n_samples) != len(actions):
        raise DataError(
            f"{where}: attribute num_samples = {int(n_samples)} but actions has {len(actions)} rows"
        )
    obs = demo["obs"]
    episode = {}
    for k in keys:
        if k not in obs:
            raise DataError(f"{where}/obs: no key {k!r} (have: {', '.join(sorted(obs))})")
        x = np.asarray(obs[k][()])
        if x.ndim == 0 or len(x) != len(actions):
            raise DataError(
                f"{where}/obs/{k}: {len(x) if x.ndim else 0} frames but actions has {len(actions)}"
            )
        episode[k] = x.astype(_store_dtype(x), copy=False)
    episode[ACTION_KEY] = actions.astype(np.float32, copy=False)
    return episode


def _obs_keys(src: Path, f: Any, first: str, keys: Sequence[str] | None) -> list[str]:
    """The chosen obs keys (default: every key of the first demo, sorted)."""
    obs = f["data"][first].get("obs")
    have = sorted(obs) if obs is not None else []
    chosen = list(keys) if keys else have
    if ACTION_KEY in chosen:
        raise DataError(f"{src}: obs key {ACTION_KEY!r} would clash with the store's action key")
    if not chosen and obs is not None:
        raise DataError(f"{src}: data/{first}/obs holds no keys")
    return chosen


def _env_attrs(f: Any) -> dict[str, Any]:
    raw = f["data"].attrs.get("env_args")
    if raw is None:
        return {}
    text = raw.decode() if isinstance(raw, bytes) else str(raw)
    try:
        return {"env_args": json.loads(text)}
    except json.JSONDecodeError:
        return {"env_args": text}


def convert_robomimic(
    src: str | Path,
    out: str | Path,
    filter_key: str | None = None,
    keys: Sequence[str] | None = None,
) -> ConvertSummary:
    """Convert one robomimic HDF5 file to a new replay-buffer store at `out` (refuses to overwrite)."""
    import zarr

    from diffusion_policy.data.replay_buffer import ReplayBuffer

    src, out = Path(src), Path(out)
    if out.exists():
        raise DataError(f"{out}: already exists; remove it or pick another --out")
    with _open_hdf5(src) as f:
        demos = _demo_names(src, f, filter_key)
        chosen = _obs_keys(src, f, demos[0], keys)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
        try:
            store = tmp / "store.zarr"
            buf = ReplayBuffer.create(store)
            for name in demos:
                episode = _read_demo(src, f["data"][name], chosen)
                try:
                    buf.add_episode(episode)
                except DataError as e:  # a dtype/shape change or a NaN, named by the writer
                    raise DataError(
                        f"{src}: data/{name}: {str(e).replace(f'{store}: ', '')}"
                    ) from e
            attrs = {"source": "robomimic", "file": src.name, "filter_key": filter_key}
            zarr.open_group(str(store), mode="a").attrs.update({**attrs, **_env_attrs(f)})
            store.rename(out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    done = ReplayBuffer.open(out, "r")
    summary = ConvertSummary(out, done.n_episodes, done.n_steps)
    for k in done.keys():
        summary.keys[k] = (tuple(done[k].shape[1:]), str(np.dtype(done[k].dtype)))
    return summary
