"""`dp export RUN --out FILE`: the whole sampling loop as one ONNX or TorchScript file."""

from __future__ import annotations

import argparse

from diffusion_policy.cli.sampler_options import add_spacing_argument
from diffusion_policy.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from diffusion_policy.export import DEFAULT_TOLERANCE, FORMATS, LAYOUTS, ONNX_EXPORTERS

    parser.add_argument(
        "checkpoint", help="checkpoint directory, or a run directory (its latest checkpoint)"
    )
    parser.add_argument("--format", choices=FORMATS, default="onnx", help="default onnx")
    parser.add_argument("--out", required=True, help="file to write; FILE.json describes it")
    parser.add_argument(
        "--inference-steps",
        type=int,
        default=None,
        help="DDIM steps K unrolled into the file (default: the checkpoint's DDIM steps, or 10 "
        "when it samples with DDPM)",
    )
    add_spacing_argument(parser, "which timesteps the K steps visit (default: the checkpoint's)")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="fix the batch axis at B (default: a dynamic batch axis)",
    )
    parser.add_argument(
        "--layout",
        choices=LAYOUTS,
        default="auto",
        help="reference (the UNet's Conv1d) or packed (time-major GEMMs); auto: reference for "
        "onnx, packed for torchscript, the faster of each at batch 1 on a CPU",
    )
    parser.add_argument(
        "--onnx-exporter",
        choices=ONNX_EXPORTERS,
        default="auto",
        help="legacy (fast; low-dim policies, reference layout) or dynamo (everything, slower); "
        "auto picks legacy where it works",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="run the file against the eager policy on random obs, print the max abs error and "
        "batch-1 latency, and fail above --tolerance",
    )
    parser.add_argument(
        "--tolerance",
        type=float,
        default=DEFAULT_TOLERANCE,
        help="largest max abs error --check accepts, as a fraction of the action range (default "
        f"{DEFAULT_TOLERANCE:g}: 0.01 px on Push-T)",
    )


def run(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from diffusion_policy.checkpoint import load_policy, read_checkpoint_meta
    from diffusion_policy.export import (
        ExportError,
        check_export,
        export_policy,
        import_onnxruntime,
        load_runner,
        measure_latency,
        random_inputs,
        require_onnx_exporter,
        resolve_layout,
        resolve_onnx_exporter,
        torch_threads,
        write_sidecar,
    )

    if args.batch_size is not None and args.batch_size < 1:
        raise UserError(f"--batch-size={args.batch_size}: must be >= 1")
    if args.tolerance < 0:
        raise UserError(f"--tolerance={args.tolerance}: must be >= 0")
    path, cfg, _ = read_checkpoint_meta(args.checkpoint)
    if cfg.policy.name != "diffusion":
        raise ExportError(
            f"dp export supports diffusion policies only; {path} holds a {cfg.policy.name!r} "
            "policy, whose sampler has no fixed-step graph to export"
        )
    if args.check and args.format == "onnx":
        import_onnxruntime()  # fail now, not after the export
    policy, cfg, _ = load_policy(path)
    noise = cfg.policy.noise
    steps = args.inference_steps
    if steps is None:
        steps = noise.num_inference_steps if noise.sampler == "ddim" else 10
    layout = resolve_layout(args.format, args.layout)
    how = "torch.jit.trace"
    if args.format == "onnx":
        exporter = resolve_onnx_exporter(policy, layout, args.onnx_exporter)
        require_onnx_exporter(exporter)
        how = f"the {exporter} ONNX exporter" + (
            " (a minute or more)" if exporter == "dynamo" else ""
        )
    batch = args.batch_size or "dynamic"
    print(
        f"exporting {path}: DDIM-{steps} "
        f"({args.timestep_spacing or noise.timestep_spacing}), {layout} layout, batch {batch}, "
        f"with {how}",
        flush=True,
    )
    start = time.perf_counter()
    sidecar = export_policy(
        policy,
        args.out,
        args.format,
        steps,
        args.timestep_spacing,
        layout,
        args.batch_size,
        args.onnx_exporter,
        checkpoint=str(path),
    )
    out = Path(args.out)
    size = out.stat().st_size / 2**20
    print(f"wrote {out} ({size:.1f} MiB) and {out}.json in {time.perf_counter() - start:.1f} s")
    for i in sidecar["inputs"]:
        print(f"  input  {i['name']}: {tuple(i['shape'])} {i['dtype']}")
    for o in sidecar["outputs"]:
        print(f"  output {o['name']}: {tuple(o['shape'])} {o['dtype']}")
    if args.check:
        runner = load_runner(out, sidecar)
        result = check_export(out, sidecar, policy, args.tolerance, runner)
        b1 = sidecar["batch_size"] if isinstance(sidecar["batch_size"], int) else 1
        with torch_threads(1):
            result["latency"] = measure_latency(
                runner, [x.numpy() for x in random_inputs(policy, b1)]
            )
        sidecar["check"] = result
        write_sidecar(out, sidecar)
        print(
            f"check: max abs error {result['max_abs_error']:.2e} action units against the eager "
            f"policy at batch {', '.join(map(str, result['batch_sizes']))} (allowed "
            f"{result['max_abs_error_allowed']:.2g}); batch {b1} takes "
            f"{result['latency']['median_ms']:.1f} ms "
            f"(median of {result['latency']['runs']}, 1 thread)"
        )
    return 0
