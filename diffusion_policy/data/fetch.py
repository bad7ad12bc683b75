"""Download, unpack and verify published demonstration stores against the manifests we ship.

Checksums are of the DECODED arrays, not of the files: the same data re-chunked, re-compressed or
converted from zarr v2 to v3 keeps its digest, while a flipped bit in any chunk changes it. Digest of
one array: sha256 over its C-contiguous bytes, then the text "|<dtype.str>|<shape, comma separated>".
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import tempfile
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path
from typing import Any

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


class Digester:
    """sha256 digests of arrays fed as C-contiguous blocks along axis 0, in order (so 2.8 GB never
    needs one copy, and `dp data validate` digests the blocks it decodes anyway)."""

    def __init__(self) -> None:
        self._sha: dict[str, Any] = {}

    def __call__(self, key: str, block: np.ndarray) -> None:
        sha = self._sha.setdefault(key, hashlib.sha256())
        sha.update(memoryview(np.ascontiguousarray(block)).cast("B"))

    def digest(self, key: str, dtype: np.dtype, shape: tuple[int, ...]) -> dict:
        """{"shape", "dtype", "sha256"} of one array fed so far (the manifest's entry format)."""
        sha = self._sha.get(key, hashlib.sha256()).copy()
        sha.update(f"|{np.dtype(dtype).str}|{','.join(str(int(s)) for s in shape)}".encode())
        return {"shape": list(shape), "dtype": np.dtype(dtype).str, "sha256": sha.hexdigest()}


def store_digests(path: str | Path) -> dict[str, dict]:
    """{"data/<key>" | "meta/episode_ends": {"shape", "dtype", "sha256"}} of every array in a store."""
    return buffer_digests(ReplayBuffer.open(path, "r"))


def buffer_digests(buf: ReplayBuffer, digester: Digester | None = None) -> dict[str, dict]:
    """Digests of every array of a buffer (on disk: read block by block; in RAM: no copy).

    With a `digester` that has already seen every data key's blocks, nothing is read again.
    """
    if digester is None:
        digester = Digester()
        for k in buf.keys():
            for _, b in buf.iter_blocks(k):
                digester(k, b)
    out = {}
    for k in sorted(buf.keys()):
        out[f"data/{k}"] = digester.digest(k, buf[k].dtype, tuple(buf[k].shape))
    ends = buf.episode_ends
    ends_digester = Digester()
    ends_digester("meta/episode_ends", ends)
    out["meta/episode_ends"] = ends_digester.digest("meta/episode_ends", ends.dtype, ends.shape)
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
        "arrays": buffer_digests(buf),
    }


def load_manifest(name_or_path: str | Path) -> dict:
    p = Path(name_or_path)
    if p.suffix != ".json":
        p = MANIFEST_DIR / f"{name_or_path}.json"
    if not p.is_file():
        raise DataError(f"{p}: no such dataset manifest")
    return json.loads(p.read_text())


def known_manifest(path: str | Path) -> dict | None:
    """The shipped manifest of a published store with this directory name (e.g. pusht_cchi_v7_replay.zarr)."""
    for f in sorted(MANIFEST_DIR.glob("*.json")):
        m = json.loads(f.read_text())
        if Path(m["path"]).name == Path(path).name:
            return m
    return None


def verify(path: str | Path, manifest: dict) -> list[str]:
    """Problems (empty: match) comparing a store's decoded arrays with a manifest."""
    try:
        got = store_digests(path)
    except DataError as e:
        return [str(e)]
    return compare_digests(path, got, manifest)


def compare_digests(path: str | Path, got: dict[str, dict], manifest: dict) -> list[str]:
    """Problems (empty: match) comparing digests (`buffer_digests`) with a manifest's."""
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
    """Stream `url` to `to` with a progress bar on stderr (bytes, rate, time left when the size is known)."""
    from tqdm import tqdm

    print(f"downloading {url}", flush=True)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r, open(to, "wb") as f:
            total = int(r.headers.get("Content-Length") or 0) or None
            with tqdm(
                total=total,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=Path(urllib.parse.urlparse(url).path).name or to.name,
                file=sys.stderr,
            ) as bar:
                while chunk := r.read(1 << 20):
                    f.write(chunk)
                    bar.update(len(chunk))
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
