"""Download, unpack and verify published demonstration stores against the manifests we ship.

Checksums are of the DECODED arrays, not of the files: the same data re-chunked, re-compressed or
converted from zarr v2 to v3 keeps its digest, while a flipped bit in any chunk changes it. Digest of
one array: sha256 over its C-contiguous bytes, then the text "|<dtype.str>|<shape, comma separated>".
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path

import numpy as np

from diffusion_policy.data.replay_buffer import ReplayBuffer, _members, _open_group
from diffusion_policy.errors import DataError

MANIFEST_DIR = Path(__file__).resolve().parents[2] / "datasets" / "manifests"
PUSHT_URL = "https://diffusion-policy.cs.columbia.edu/data/training/pusht.zip"
DOWNLOAD_TIMEOUT_S = 10.0
OFFLINE_HINT = (
    "download pusht.zip by hand from {url} and pass `--url /path/to/pusht.zip`, "
    "or run `dp data generate pusht` for offline demonstrations"
)


def array_digest(blocks, dtype: np.dtype, shape: tuple[int, ...]) -> str:
    """sha256 of an array given as C-contiguous blocks along axis 0 (so 2.8 GB never needs one copy)."""
    h = hashlib.sha256()
    for b in blocks:
        h.update(memoryview(np.ascontiguousarray(b)).cast("B"))
    h.update(f"|{np.dtype(dtype).str}|{','.join(str(int(s)) for s in shape)}".encode())
    return h.hexdigest()


def store_digests(path: str | Path) -> dict[str, dict]:
    """{"data/<key>" | "meta/episode_ends": {"shape", "dtype", "sha256"}} of every array in a store."""
    return buffer_digests(ReplayBuffer.open(path, "r"))


def buffer_digests(buf: ReplayBuffer) -> dict[str, dict]:
    """Digests of every array of a buffer (on disk: read block by block; in RAM: no copy)."""
    out = {}
    for k in sorted(buf.keys()):
        arr = buf[k]
        blocks = (b for _, b in buf.iter_blocks(k))
        out[f"data/{k}"] = {
            "shape": list(arr.shape),
            "dtype": np.dtype(arr.dtype).str,
            "sha256": array_digest(blocks, arr.dtype, arr.shape),
        }
    ends = buf.episode_ends
    out["meta/episode_ends"] = {
        "shape": list(ends.shape),
        "dtype": ends.dtype.str,
        "sha256": array_digest([ends], ends.dtype, ends.shape),
    }
    return out


def make_manifest(path: str | Path, name: str, url: str, rel_path: str) -> dict:
    buf = ReplayBuffer.open(path, "r")
    return {
        "name": name,
        "url": url,
        "path": rel_path,
        "n_episodes": buf.n_episodes,
        "n_steps": buf.n_steps,
        "digest": "sha256(C-contiguous bytes + '|' + dtype.str + '|' + comma-separated shape)",
        "arrays": store_digests(path),
    }


def load_manifest(name_or_path: str | Path) -> dict:
    p = Path(name_or_path)
    if p.suffix != ".json":
        p = MANIFEST_DIR / f"{name_or_path}.json"
    if not p.is_file():
        raise DataError(f"{p}: no such dataset manifest")
    return json.loads(p.read_text())


def verify(path: str | Path, manifest: dict) -> list[str]:
    """Problems (empty: match) comparing a store's decoded arrays with a manifest."""
    try:
        got = store_digests(path)
    except DataError as e:
        return [str(e)]
    problems = []
    for key, want in manifest["arrays"].items():
        have = got.get(key)
        if have is None:
            problems.append(f"{path}: missing key {key}")
        elif (have["shape"], have["dtype"]) != (list(want["shape"]), want["dtype"]):
            problems.append(
                f"{path}: {key}: {have['shape']} {have['dtype']} != manifest {want['shape']} {want['dtype']}"
            )
        elif have["sha256"] != want["sha256"]:
            problems.append(
                f"{path}: {key}: sha256 {have['sha256'][:12]}… != manifest {want['sha256'][:12]}…"
            )
    return problems


def _local_source(url: str) -> Path | None:
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme == "file":
        return Path(urllib.request.url2pathname(parsed.path))
    if parsed.scheme in ("http", "https", "ftp"):
        return None
    return Path(url)  # a plain path (a Windows drive letter parses as a one-letter scheme)


def _download(url: str, to: Path, timeout: float) -> Path:
    print(f"downloading {url} ...", flush=True)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r, open(to, "wb") as f:
            shutil.copyfileobj(r, f, length=1 << 20)
    except OSError as e:  # URLError, timeouts and HTTP errors are all OSErrors
        raise DataError(f"cannot download {url} ({e}); " + OFFLINE_HINT.format(url=url)) from e
    return to


def _extract(zip_path: Path, to: Path) -> None:
    try:
        with zipfile.ZipFile(zip_path) as z:
            root = to.resolve()
            for m in z.namelist():  # refuse members that would land outside `to` (zip slip)
                if not (root / m).resolve().is_relative_to(root):
                    raise DataError(f"{zip_path}: unsafe member path {m!r}")
            z.extractall(to)
    except zipfile.BadZipFile as e:
        raise DataError(f"{zip_path}: not a valid zip file ({e})") from e


def _find_store(root: Path, name: str) -> Path:
    """The replay-buffer store inside an unpacked archive: preferably the manifest's file name."""
    cands = [
        p
        for p in [root, *root.rglob("*")]
        if p.is_dir() and (p / "meta").is_dir() and (p / "data").is_dir()
    ]
    for p in cands:
        if p.name == name:
            return p
    if len(cands) == 1:
        return cands[0]
    raise DataError(
        f"{root}: expected one replay-buffer store ({name}) in the archive, found {len(cands)}"
    )


def fetch(
    manifest: str | Path = "pusht",
    dest: str | Path = "datasets",
    url: str | None = None,
    force: bool = False,
    timeout: float = DOWNLOAD_TIMEOUT_S,
) -> Path:
    """Get the store named by `manifest` into `dest/<manifest path>`, verified; returns its path.

    `url` may be http(s), file://, a local .zip or a local .zarr directory. An existing verified copy is
    kept. Nothing lands at the destination unless every array matches the manifest.
    """
    m = load_manifest(manifest)
    url = url or m["url"]
    target = Path(dest) / m["path"]
    if target.exists() and not force:
        problems = verify(target, m)
        if not problems:
            print(f"{target}: already present and verified")
            return target
        raise DataError(
            f"{target}: exists but does not match the manifest ({problems[0]}); rerun with --force to replace it"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".fetch-") as tmp:
        tmp = Path(tmp)
        src = _local_source(url)
        if src is None:
            src = _download(url, tmp / "download.zip", timeout)
        if not src.exists():
            raise DataError(f"{src}: no such file; " + OFFLINE_HINT.format(url=m["url"]))
        if src.is_dir():
            store = _find_store(src, Path(m["path"]).name)
        else:
            _extract(src, tmp / "unpacked")
            store = _find_store(tmp / "unpacked", Path(m["path"]).name)
        _members(store, _open_group(store))  # a clear error if it is not a replay buffer
        problems = verify(store, m)
        if problems:
            raise DataError(f"{url}: does not match manifest {m['name']}: " + "; ".join(problems))
        staged = tmp / "verified"
        shutil.copytree(store, staged) if src.is_dir() else shutil.move(store, staged)
        if target.exists():
            shutil.rmtree(target)
        staged.rename(target)
    print(
        f"{target}: verified against manifest {m['name']} ({m['n_episodes']} episodes, {m['n_steps']} steps)"
    )
    return target
