"""The `dp` command: one file per verb in this package, each with `add_arguments(parser)` and `run(args)`.

A verb's module imports the library only inside `run`, so `dp VERB --help` never loads torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from diffusion_policy.errors import UserError

# verb -> one-line help; the verb's module is diffusion_policy.cli.<verb>, imported only when it runs
COMMANDS: dict[str, str] = {
    "train": "train a policy from a preset: dp train PRESET [key=value ...]",
    "eval": "evaluate a checkpoint with simulated rollouts",
    "data": "inspect, validate, fetch, generate and record demonstration stores",
    "serve": "serve a checkpoint to robot controllers over websockets",
    "distill": "distill a trained diffusion policy into a 1- or 2-step sampler",
    "export": "export a diffusion policy's sampling loop as one ONNX or TorchScript file",
    "sim": "replay, render or play Push-T episodes",
    "report": "draw a run directory (losses, learning rate, eval scores, videos) as one PNG",
    "quickstart": "get data, train the CPU preset and evaluate it",
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="dp", description="Diffusion Policy tools.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        parser.parse_args(argv[:1] or ["--help"])
        return 2
    module = importlib.import_module(f"diffusion_policy.cli.{argv[0]}")
    cmd_parser = argparse.ArgumentParser(prog=f"dp {argv[0]}", description=COMMANDS[argv[0]])
    module.add_arguments(cmd_parser)
    args = cmd_parser.parse_args(argv[1:])
    try:
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except UserError as e:  # bad input: one clear line, no traceback
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
