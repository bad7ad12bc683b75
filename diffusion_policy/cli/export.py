"""`dp export RUN --out FILE`: the whole sampling loop as one ONNX or TorchScript file."""

from __future__ import annotations

import argparse

from diffusion_policy.cli.options import add_spacing_argument
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
    from diffusion_policy.export import export_checkpoint

    if args.batch_size is not None and args.batch_size < 1:
        raise UserError(f"--batch-size={args.batch_size}: must be >= 1")
    if args.tolerance < 0:
        raise UserError(f"--tolerance={args.tolerance}: must be >= 0")
    export_checkpoint(
        args.checkpoint, args.out, args.format, steps=args.inference_steps,
        spacing=args.timestep_spacing, layout=args.layout, batch_size=args.batch_size,
        onnx_exporter=args.onnx_exporter, check=args.check, tolerance=args.tolerance,
    )  # fmt: skip
    return 0
