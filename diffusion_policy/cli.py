"""The `dp` command. Each subcommand lives in its own module with `add_arguments(parser)` and `run(args)`."""

from __future__ import annotations

import argparse
import importlib
import sys

from diffusion_policy.errors import UserError

# name -> (module, one-line help). Modules are imported only for the command that runs.
COMMANDS: dict[str, tuple[str, str]] = {
    "train": (
        "diffusion_policy.training",
        "train a policy from a preset: dp train PRESET [key=value ...]",
    ),
    "eval": ("diffusion_policy.evaluation", "evaluate a checkpoint with simulated rollouts"),
    "data": (
        "diffusion_policy.data.cli",
        "inspect, validate, fetch, generate and record demonstration stores",
    ),
    "serve": (
        "diffusion_policy.serving.server",
        "serve a checkpoint to robot controllers over websockets",
    ),
    "distill": (
        "diffusion_policy.distill",
        "distill a trained diffusion policy into a 1- or 2-step sampler",
    ),
    "export": (
        "diffusion_policy.export",
        "export a diffusion policy's sampling loop as one ONNX or TorchScript file",
    ),
    "sim": ("diffusion_policy.sim_cli", "replay, render or play Push-T episodes"),
    "quickstart": ("diffusion_policy.quickstart", "get data, train the CPU preset and evaluate it"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="dp", description="Diffusion Policy tools.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        parser.parse_args(argv[:1] or ["--help"])
        return 2
    module = importlib.import_module(COMMANDS[argv[0]][0])
    cmd_parser = argparse.ArgumentParser(prog=f"dp {argv[0]}", description=COMMANDS[argv[0]][1])
    module.add_arguments(cmd_parser)
    args = cmd_parser.parse_args(argv[1:])
    try:
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except UserError as e:  # bad input: one clear line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
