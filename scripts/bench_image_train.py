"""Training samples/s of the image presets: the model step alone (one pre-made batch) against the full
step (index a batch from the resident uint8 dataset with get_batch, then the same model step).

A step is what `dp train` does per batch: draw the loss noise, forward, backward, AdamW, EMA. The
crop and the uint8 -> float conversion are inside the encoder, so both columns include them; the
difference between the columns is the data path alone (also timed by itself: get_batch ms). Runs on
the CPU, and on CUDA when present; --amp adds bf16-autocast rows (what train.amp=true does). Times
are medians over --steps steps after --warmup, so a busy machine's stalls do not dominate; the load
average is printed with the table. --crops times only the batched crop against alternatives.
--profile splits one preset's step into its parts (where the time goes), the trunk in both memory
layouts.

    .venv/bin/python scripts/bench_image_train.py --threads 1                 # both presets
    .venv/bin/python scripts/bench_image_train.py --presets pusht_diffusion_image --steps 2 --warmup 1
    .venv/bin/python scripts/bench_image_train.py --amp --crops
    .venv/bin/python scripts/bench_image_train.py --profile --presets pusht_diffusion_image_cpu --steps 15
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from diffusion_policy.config import load_config
from diffusion_policy.data.datasets import PushTDataset, make_pusht_datasets
from diffusion_policy.models.ema import EMAModel
from diffusion_policy.registry import policy_class
from diffusion_policy.training.loop import Dist, batch_indices, step_generator

DEFAULT_PATH = "../shared/data/pusht/pusht_cchi_v7_replay.zarr"
PRESETS = ["pusht_diffusion_image_cpu", "pusht_diffusion_image"]


def gflop_per_step(cfg, shape_meta) -> float:
    """Forward + backward FLOPs of one training batch, counted on the meta device (no compute)."""
    with torch.device("meta"):
        policy = policy_class(cfg.policy.name)(cfg.policy, shape_meta)
        b, p = cfg.train.batch_size, cfg.policy
        obs = {
            k: torch.empty((b, p.n_obs_steps, *s.shape), dtype=getattr(torch, s.dtype))
            for k, s in shape_meta.obs.items()
        }
        action = torch.empty(b, p.horizon, shape_meta.action_dim)
    policy.train()
    counter = FlopCounterMode(display=False)
    with counter:
        cond = policy.condition(obs)
        t = torch.zeros(b, dtype=torch.long, device="meta")
        out = policy.model(action, t, cond)
        out.sum().backward()
    return counter.get_total_flops() / 1e9


def time_steps(
    step: Callable[[int], None], warmup: int, steps: int, sync: Callable[[], None]
) -> list[float]:
    for i in range(warmup):
        step(i)
    sync()
    times = []
    for i in range(warmup, warmup + steps):
        t0 = time.perf_counter()
        step(i)
        sync()
        times.append(time.perf_counter() - t0)
    return times


def build(preset: str, ds: PushTDataset, device: str):
    """The preset's config, its policy (seed 0, normaliser fitted, train mode) and an EMA of it."""
    cfg = load_config(preset, ["train.device=" + device])
    torch.manual_seed(0)
    policy = policy_class(cfg.policy.name)(cfg.policy, ds.shape_meta)
    policy.fit_normalizer(ds.normalizer_data())
    policy.to(device).train()
    return (
        cfg,
        policy,
        EMAModel(policy, power=cfg.train.ema.power, max_decay=cfg.train.ema.max_decay),
    )


def bench(
    preset: str, ds: PushTDataset, device: str, amp: bool, warmup: int, steps: int
) -> dict[str, float]:
    cfg, policy, ema = build(preset, ds, device)
    opt = torch.optim.AdamW(
        policy.parameters(), lr=cfg.train.optim.lr, betas=tuple(cfg.train.optim.betas),
        weight_decay=cfg.train.optim.weight_decay, fused=device.startswith("cuda"),
    )  # fmt: skip
    bs = cfg.train.batch_size
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def model_step(batch: dict, i: int) -> None:
        batch = {**batch, **policy.sample_training_noise(bs, step_generator(0, i, device))}
        with torch.autocast(torch.device(device).type, torch.bfloat16, enabled=amp):
            loss = policy.compute_loss(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema.step(policy)

    def get(i: int) -> dict:
        return ds.get_batch(batch_indices(len(ds), bs, i, 0, Dist(), device))

    fixed = get(0)
    data = time_steps(get, warmup, 20, sync)  # the data path alone
    model_only = time_steps(lambda i: model_step(fixed, i), warmup, steps, sync)
    full = time_steps(lambda i: model_step(get(i), i), warmup, steps, sync)
    t_model, t_full = statistics.median(model_only), statistics.median(full)
    return {
        "batch": bs,
        "params_m": sum(p.numel() for p in policy.parameters()) / 1e6,
        "gflop": gflop_per_step(cfg, ds.shape_meta),
        "model_sps": bs / t_model,
        "full_sps": bs / t_full,
        "ms_model": 1e3 * t_model,
        "ms_full": 1e3 * t_full,
        "ms_data": 1e3 * statistics.median(data),
    }


def profile(preset: str, ds: PushTDataset, device: str, warmup: int, steps: int) -> list[tuple[str, float]]:  # fmt: skip
    """(part, median ms) of one training step of `preset`, each part timed alone on the same batch."""
    cfg, policy, ema = build(preset, ds, device)
    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.train.optim.lr)
    bs, to = cfg.train.batch_size, cfg.policy.n_obs_steps
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    batch = ds.get_batch(batch_indices(len(ds), bs, 0, 0, Dist(), device))
    noise = policy.sample_training_noise(bs, step_generator(0, 0, device))
    key, enc = next(iter(policy.obs_encoder.image_encoders.items()))
    frames = batch["obs"][key][:, :to].flatten(0, 1)  # (B * To, H, W, 3) uint8
    with torch.no_grad():
        img = enc.preprocess(frames)
        cond = policy.condition(policy.normalize_obs(batch["obs"]))
    contiguous = copy.deepcopy(enc).to(memory_format=torch.contiguous_format)
    img_contiguous = img.contiguous()
    action = policy.normalizer.normalize("action", batch["action"])
    noisy = policy.noise_scheduler.add_noise(action, noise["noise"], noise["timesteps"])

    def trunk(e: torch.nn.Module, x: torch.Tensor) -> None:
        e.zero_grad(set_to_none=True)
        torch.relu(e.proj(e.pool(e.backbone(x)))).sum().backward()

    def unet() -> None:
        policy.model.zero_grad(set_to_none=True)
        policy.model(noisy, noise["timesteps"], cond).sum().backward()

    def full() -> None:
        loss = policy.compute_loss({**batch, **noise})
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema.step(policy)

    def optimiser() -> None:
        opt.step()
        ema.step(policy)

    parts: dict[str, Callable[[], object]] = {
        "index the batch from the resident uint8 frames (get_batch)": lambda: ds.get_batch(
            batch_indices(len(ds), bs, 1, 0, Dist(), device)
        ),
        f"resize {tuple(frames.shape[1:3])} -> {enc.resize_shape}, random crop, to float (B * To frames)": lambda: (
            enc.preprocess(frames)
        ),  # fmt: skip
        "ResNet-18 trunk + spatial softmax + linear, forward + backward (channels-last, ours)": lambda: (
            trunk(enc, img)
        ),  # fmt: skip
        "the same, contiguous (NCHW) weights and input": lambda: trunk(contiguous, img_contiguous),
        "UNet forward + backward": unet,
        "AdamW + EMA update": optimiser,
        "the whole step (loss, backward, AdamW, EMA; data not included)": full,
    }
    out = []
    for name, fn in parts.items():
        grad = not name.startswith(("index", "resize"))
        with torch.set_grad_enabled(grad):
            ms = 1e3 * statistics.median(time_steps(lambda _, f=fn: f(), warmup, steps, sync))
        out.append((name, ms))
    return out


def bench_crops(device: str, n: int = 128, reps: int = 20) -> list[tuple[str, float]]:
    """ms from n uint8 (96, 96, 3) frames to the encoder's input: n random 84x84 crops as a
    contiguous float (n, 3, 84, 84) in [-1, 1]. The same conversion follows every crop variant."""
    from diffusion_policy.models.vision import crop_images, crop_offsets, to_unit_range

    x = torch.randint(0, 256, (n, 96, 96, 3), dtype=torch.uint8, device=device)
    off = crop_offsets(n, (96, 96), (84, 84), True, torch.device(device))
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    ar = torch.arange(84, device=device)
    rows, cols = off[:, 0, None] + ar, off[:, 1, None] + ar  # (n, 84) each

    def flat_index_select() -> torch.Tensor:  # one index per pixel of (n*96*96, 3)
        base = torch.arange(n, device=device)[:, None, None] * (96 * 96)
        flat = (base + rows[:, :, None] * 96 + cols[:, None, :]).reshape(-1)
        return x.reshape(-1, 3).index_select(0, flat).reshape(n, 84, 84, 3).permute(0, 3, 1, 2)

    def advanced() -> torch.Tensor:
        idx = torch.arange(n, device=device)[:, None, None]
        return x[idx, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)

    def loop() -> torch.Tensor:  # not allowed in the encoder: n slices and a host sync (tolist)
        crops = [x[k, a : a + 84, b : b + 84] for k, (a, b) in enumerate(off.tolist())]
        return torch.stack(crops).permute(0, 3, 1, 2)

    ways = {
        "unfold windows + one gather (ours)": lambda: crop_images(x, off, (84, 84)),
        "index_select, one index per pixel": flat_index_select,
        "advanced indexing x[n, rows, cols]": advanced,
        "per-sample Python slices + stack": loop,
    }
    ref = to_unit_range(crop_images(x, off, (84, 84)))
    out = []
    for name, crop in ways.items():
        assert torch.equal(to_unit_range(crop()), ref), name
        ms = 1e3 * statistics.median(
            time_steps(lambda _, f=crop: to_unit_range(f()), 2, reps, sync)
        )
        out.append((name, ms))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--path", default=DEFAULT_PATH)
    ap.add_argument("--presets", nargs="+", default=PRESETS)
    ap.add_argument("--devices", nargs="+", default=None, help="default: cpu, plus cuda if present")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per mode")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument(
        "--cpu-steps", type=int, default=None, help="timed steps on the CPU (default --steps)"
    )
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 = torch default")
    ap.add_argument("--amp", action="store_true", help="also time bf16 autocast (train.amp)")
    ap.add_argument("--crops", action="store_true", help="only time the batched crop variants")
    ap.add_argument(
        "--profile", action="store_true", help="split a step into its parts (per preset)"
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = args.devices or ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    names = [
        torch.cuda.get_device_name() if d.startswith("cuda") else f"CPU x{os.cpu_count()}"
        for d in devices
    ]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, load average {load:.1f}; "
          f"devices: {', '.join(names)}")  # fmt: skip
    if args.crops:
        print(
            "\n| device | 128 uint8 frames 96x96 -> float crops (128, 3, 84, 84) | ms |\n|---|---|---:|"
        )
        for device in devices:
            for name, ms in bench_crops(device):
                print(f"| {device} | {name} | {ms:.2f} |")
        return
    t = time.time()
    ds, _ = make_pusht_datasets(args.path, "pixels_agent_pos", 16, 2, 8)
    print(f"dataset: {len(ds)} train windows, frames uint8, loaded in {time.time() - t:.0f} s\n")
    if args.profile:
        for device in devices:
            ds.to(device)
            for preset in args.presets:
                steps = args.cpu_steps if device == "cpu" and args.cpu_steps else args.steps
                rows = profile(preset, ds, device, args.warmup, steps)
                whole = rows[-1][1]
                print(f"| {preset} on {device}, batch 64: part of a step | ms | share of the step |\n|---|---:|---:|")  # fmt: skip
                for name, ms in rows:
                    print(f"| {name} | {ms:.1f} | {100 * ms / whole:.0f} % |", flush=True)
                print()
        return
    print("| preset | device | autocast | batch | params | GFLOP/step | model step (samples/s) | full step (samples/s) | ms/step model / full | get_batch ms |")  # fmt: skip
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for device in devices:
        ds.to(device)
        for preset in args.presets:
            for amp in [False, True] if args.amp else [False]:
                steps = args.cpu_steps if device == "cpu" and args.cpu_steps else args.steps
                r = bench(preset, ds, device, amp, args.warmup, steps)
                print(
                    f"| {preset} | {device} | {'bf16' if amp else 'fp32'} | {r['batch']} | "
                    f"{r['params_m']:.1f} M | {r['gflop']:.0f} | {r['model_sps']:.1f} | {r['full_sps']:.1f} | "
                    f"{r['ms_model']:.0f} / {r['ms_full']:.0f} | {r['ms_data']:.2f} |",
                    flush=True,
                )
    ds.to("cpu")
    print(f"\nload average at the end {os.getloadavg()[0]:.1f}; medians of {args.steps} steps "
          f"(CPU: {args.cpu_steps or args.steps}) after {args.warmup} warm-up steps")  # fmt: skip


if __name__ == "__main__":
    main()
