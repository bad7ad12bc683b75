"""`dp report RUN`: one PNG from a run directory, with or without evaluations; one line otherwise."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from diffusion_policy.cli.main import main
from diffusion_policy.evaluation.run_log import _training_clock, read_run, video_frames


def _png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


@pytest.mark.real_data
def test_report_of_a_smoke_run(tmp_path, pusht_zarr, capsys):
    run = tmp_path / "run"
    assert main(["train", "smoke", f"task.dataset={pusht_zarr}", f"run_dir={run}"]) == 0
    assert (
        main(["eval", str(run), "--episodes", "1"]) == 0
    )  # dp eval's own result: not a curve point
    log = read_run(run)
    assert [p.step for p in log.evals] == [4]
    point = log.evals[0]
    saved = json.loads((run / "eval" / "step_00000004" / "metrics.json").read_text())
    assert (
        point.mean_score == saved["mean_score"]
        and point.mean_score_ci95 == saved["mean_score_ci95"]
    )
    assert point.success_rate_ci95 == saved["success_rate_ci95"] and point.wall_s > 0
    assert [v.name for v in point.videos] == ["seed_100000.mp4"]
    first, last = video_frames(point.videos[0])
    assert first.shape == last.shape == (96, 96, 3) and first.dtype == np.uint8
    assert {"train/loss", "val/loss", "train/lr"} <= {k for k, s in log.series.items() if len(s)}
    capsys.readouterr()
    assert main(["report", str(run)]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {run / 'report.png'}"
    width, height = _png_size(run / "report.png")
    assert width >= 1200 and height > 1000  # the curves and one row of video frames
    assert main(["report", str(run), "--out", str(tmp_path / "elsewhere" / "r.png")]) == 0
    assert _png_size(tmp_path / "elsewhere" / "r.png") == (width, height)


def _rows(start: float, steps: range, dt: float = 1.0) -> list[dict]:
    return [
        {"step": s, "time": start + i * dt, "train/loss": 1.0 / (s + 1), "train/lr": 1e-4,
         "time/elapsed_s": i * dt}
        for i, s in enumerate(steps)
    ]  # fmt: skip


def test_report_of_a_run_with_no_evaluation_yet(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    lines = [json.dumps(r) for r in _rows(1000.0, range(0, 20, 2))]
    (run / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 20, "ti')  # cut by a kill
    log = read_run(run)
    assert log.evals == [] and log.skipped_lines == 1 and len(log.series["train/loss"][0]) == 10
    assert main(["report", str(run)]) == 0
    assert _png_size(run / "report.png")[0] >= 1200
    (run / "metrics.jsonl").unlink()
    (run / "config.yaml").write_text("preset: smoke\n")  # a run that has not logged yet
    assert main(["report", str(run)]) == 0


def test_wall_time_is_the_training_clock_across_a_resume():
    """A resume a day later continues the wall-time axis where the first session stopped."""
    rows = _rows(1000.0, range(0, 5)) + [{"step": 4, "time": 1004.5, "eval/mean_score": 0.5}]
    rows += _rows(1000.0 + 86400, range(5, 8))
    clock = _training_clock(rows)
    assert [clock(r["time"]) for r in rows] == [0, 1, 2, 3, 4, 4.5, 4.5, 5.5, 6.5]


@pytest.mark.parametrize("kind", ["missing", "empty", "file", "checkpoint"])
def test_not_a_run_gets_one_line(tmp_path, kind, capsys):
    target = tmp_path / "x"
    if kind == "empty":
        target.mkdir()
    elif kind == "file":
        target.write_text("hello")
    elif kind == "checkpoint":
        target.mkdir()
        for name in ("config.yaml", "meta.json", "model.safetensors"):
            (target / name).write_text("")
    assert main(["report", str(target)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {target}") and "\n" not in err
    assert not (tmp_path / "x" / "report.png").exists()
