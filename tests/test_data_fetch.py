"""`dp data fetch`: local zip, file:// URL and .zarr directory sources, manifest checks, offline message."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

from diffusion_policy.cli.main import main
from diffusion_policy.data.fetch import buffer_digests, fetch, load_manifest, make_manifest
from diffusion_policy.data.replay_buffer import ReplayBuffer
from diffusion_policy.errors import DataError


@pytest.fixture
def tiny(tmp_path: Path) -> tuple[Path, Path, Path]:
    """(store, zip of it laid out like pusht.zip, manifest)."""
    buf = ReplayBuffer.create_empty()
    for i, n in enumerate((4, 6)):
        buf.add_episode(
            {
                "action": np.full((n, 2), i, np.float32),
                "state": np.arange(n * 5, dtype=np.float32).reshape(n, 5),
            }
        )
    store = buf.save(tmp_path / "src" / "pusht" / "pusht_cchi_v7_replay.zarr", zarr_format=2)
    zpath = tmp_path / "pusht.zip"
    with zipfile.ZipFile(zpath, "w") as z:
        for p in sorted(store.rglob("*")):
            z.write(p, p.relative_to(tmp_path / "src"))
    manifest = tmp_path / "tiny.json"
    manifest.write_text(
        json.dumps(
            make_manifest(
                store, "tiny", "http://127.0.0.1:9/x.zip", "pusht/pusht_cchi_v7_replay.zarr"
            )
        )
    )
    return store, zpath, manifest


def test_fetch_local_zip_and_file_url(tiny, tmp_path: Path):
    store, zpath, manifest = tiny
    out = fetch(manifest, dest=tmp_path / "a", url=str(zpath))
    assert out == tmp_path / "a" / "pusht" / "pusht_cchi_v7_replay.zarr"
    np.testing.assert_array_equal(
        ReplayBuffer.load(out)["state"], ReplayBuffer.load(store)["state"]
    )
    dest = tmp_path / "b"
    argv = [
        "data",
        "fetch",
        "pusht",
        "--dest",
        str(dest),
        "--url",
        zpath.as_uri(),
        "--manifest",
        str(manifest),
    ]
    assert main(argv) == 0
    assert main(argv) == 0  # second time: already present and verified
    assert fetch(manifest, dest=tmp_path / "c", url=str(store)).exists()  # a .zarr directory


def test_fetch_rejects_mismatch(tiny, tmp_path: Path):
    store, zpath, manifest = tiny
    m = json.loads(manifest.read_text())
    m["arrays"]["data/state"]["sha256"] = "0" * 64
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(m))
    with pytest.raises(DataError, match="data/state: sha256"):
        fetch(bad, dest=tmp_path / "d", url=str(zpath))
    assert not (
        tmp_path / "d" / "pusht" / "pusht_cchi_v7_replay.zarr"
    ).exists()  # nothing lands unverified
    not_zip = tmp_path / "x.zip"
    not_zip.write_text("hello")
    with pytest.raises(DataError, match="not a valid zip"):
        fetch(manifest, dest=tmp_path / "e", url=str(not_zip))


def test_offline_fails_fast_with_instructions(tiny, tmp_path: Path, capsys):
    _, _, manifest = tiny  # its url is a closed local port: no real network is touched
    with pytest.raises(DataError, match="--url /path/to/pusht.zip.*dp data generate pusht"):
        fetch(manifest, dest=tmp_path, timeout=2)
    assert (
        main(
            ["data", "fetch", "pusht", "--dest", str(tmp_path), "--url", str(tmp_path / "none.zip")]
        )
        == 2
    )
    assert "no such file" in capsys.readouterr().err


@pytest.mark.real_data
def test_manifest_matches_real_store(pusht_images: ReplayBuffer):
    m = load_manifest("pusht")
    assert (m["n_episodes"], m["n_steps"]) == (206, 25650)
    assert buffer_digests(pusht_images) == m["arrays"]


def test_shipped_manifest_is_tracked():
    assert load_manifest("pusht")["path"] == "pusht/pusht_cchi_v7_replay.zarr"


def test_download_shows_progress(tiny, tmp_path: Path, capsys):
    """The archive is served over http on loopback: the bar counts its bytes to 100%."""
    import functools
    import http.server
    import threading

    _, zpath, manifest = tiny
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(zpath.parent))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/{zpath.name}"
        assert main(["data", "fetch", "pusht", "--dest", str(tmp_path / "h"), "--url", url,
                     "--manifest", str(manifest)]) == 0  # fmt: skip
    finally:
        server.shutdown()
        server.server_close()
    captured = capsys.readouterr()
    assert f"downloading {url}" in captured.out
    assert f"{zpath.name}: 100%" in captured.err  # tqdm's bar: name, percent, bytes, rate
