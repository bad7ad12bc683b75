"""Training throughput of `dp train` itself, per speed option, with loss curves compared.

Each variant runs the real training loop (`diffusion_policy.training.loop.train`) for --steps steps with
evaluation, validation and periodic checkpoints off, so a step is everything a real step is: batch
gather from the resident dataset, loss noise, forward, backward, AdamW, LR schedule and EMA. it/s is
read off metrics.jsonl between the first log after --warmup steps and the last one (so compiling,
capturing and cuDNN autotuning are excluded and reported separately as startup seconds).

Variants: eager | graph (CUDA graph of the whole step) | compile (torch.compile of the UNet), each
optionally +bf16 (autocast). Every variant uses the same seed, so their loss curves should agree;
the table gives the mean |loss - eager loss| over the logged windows, relative to the eager loss.

    python scripts/bench_train.py --device cuda --presets pusht_diffusion_state \
        --variants eager graph graph+bf16 --steps 300
    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_train.py --device cpu \
        --presets pusht_diffusion_state_cpu --variants eager --steps 40 --warmup 10
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from diffusion_policy.config import load_config
from diffusion_policy.training.loop import train

DEFAULT_DATA = "../shared/data/pusht/pusht_cchi_v7_replay.zarr"


def variant_overrides(variant: str) -> list[str]:
    parts = set(variant.split("+"))
    unknown = parts - {"eager", "graph", "compile", "bf16"}
    if unknown:
        raise SystemExit(f"unknown variant part(s) {sorted(unknown)} in {variant!r}")
    return [
        f"train.cuda_graph={'true' if 'graph' in parts else 'false'}",
        f"train.compile={'true' if 'compile' in parts else 'false'}",
        f"train.amp={'true' if 'bf16' in parts else 'false'}",
    ]


def dataset_for(preset: str, given: str | None) -> str:
    """--dataset, else the preset's own store; where that is not made yet but is the Push-T human
    store, the shared copy (so Push-T presets need no fetch and other tasks train on their own data)."""
    if given:
        return given
    own = load_config(preset).task.dataset
    if not Path(own).exists() and Path(own).name == Path(DEFAULT_DATA).name:
        return DEFAULT_DATA
    return own


def run_variant(preset: str, variant: str, args, run_dir: Path) -> dict:
    overrides = [
        f"task.dataset={dataset_for(preset, args.dataset)}", f"train.device={args.device}", f"run_dir={run_dir}",
        f"train.max_steps={args.steps}", "train.cadence.eval_every=0", "train.cadence.final_eval=false",
        "train.cadence.val_every=0", "train.cadence.checkpoint_every=0", f"train.cadence.log_every={args.log_every}",
        "train.progress=false", "wandb.mode=disabled", *args.override, *variant_overrides(variant),
    ]  # fmt: skip
    cfg = load_config(preset, overrides)
    t0 = time.time()
    train(cfg)
    wall = time.time() - t0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "train/loss" in r]
    first = next(r for r in rows if r["step"] >= args.warmup)
    last = rows[-1]
    its = (last["step"] - first["step"]) / max(last["time"] - first["time"], 1e-9)
    start_s = max(0.0, first["time"] - t0 - first["step"] / its)  # time before steady state
    return {
        "preset": preset,
        "variant": variant,
        "it_s": its,
        "samples_s": its * cfg.train.batch_size,
        "batch": cfg.train.batch_size,
        "startup_s": start_s,
        "wall_s": wall,
        "losses": {r["step"]: r["train/loss"] for r in rows},
        "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30
        if args.device.startswith("cuda")
        else None,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["pusht_diffusion_state"])
    ap.add_argument("--variants", nargs="+", default=["eager", "graph", "graph+bf16"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument(
        "--dataset", default=None, help=f"default: the preset's store ({DEFAULT_DATA} for Push-T's)"
    )
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--override", nargs="*", default=[], help="extra key=value config overrides")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--keep", default=None, help="keep the run dirs under this folder")
    args = ap.parse_args()
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_train_"))
    results = []
    for preset in args.presets:
        for variant in args.variants:
            run_dir = root / f"{preset}-{variant.replace('+', '_')}"
            shutil.rmtree(run_dir, ignore_errors=True)
            if args.device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            try:
                results.append(run_variant(preset, variant, args, run_dir))
            except Exception as e:  # report and go on with the other variants
                print(f"{preset} {variant}: FAILED {type(e).__name__}: {e}")
                results.append({"preset": preset, "variant": variant, "error": f"{type(e).__name__}: {e}"})  # fmt: skip
            print(json.dumps({k: v for k, v in results[-1].items() if k != "losses"}), flush=True)
            if not args.keep:
                shutil.rmtree(run_dir, ignore_errors=True)
    dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU x{torch.get_num_threads()} threads"  # fmt: skip
    print(f"\ndevice {dev}, torch {torch.__version__}, load average {os.getloadavg()[0]:.1f}")
    print(f"{'preset':<28} {'variant':<20} {'it/s':>8} {'samples/s':>10} {'vs eager':>8} {'startup s':>9} {'loss vs eager':>13} {'peak GB':>7}")  # fmt: skip
    for r in results:
        if "error" in r:
            print(f"{r['preset']:<28} {r['variant']:<20} {'failed: ' + r['error'][:80]}")
            continue
        base = next((b for b in results if b["preset"] == r["preset"] and b["variant"] == "eager" and "it_s" in b), None)  # fmt: skip
        speed = f"{r['it_s'] / base['it_s']:.2f}x" if base else "-"
        dloss = "-"
        if base and base is not r:
            common = [s for s in r["losses"] if s in base["losses"]]
            if common:
                rel = sum(
                    abs(r["losses"][s] - base["losses"][s]) / base["losses"][s] for s in common
                )
                dloss = f"{100 * rel / len(common):.2f}%"
        mem = f"{r['peak_mem_gb']:.1f}" if r.get("peak_mem_gb") is not None else "-"
        print(f"{r['preset']:<28} {r['variant']:<20} {r['it_s']:>8.1f} {r['samples_s']:>10.0f} {speed:>8} {r['startup_s']:>9.1f} {dloss:>13} {mem:>7}")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
