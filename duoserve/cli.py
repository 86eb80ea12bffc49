"""The `duoserve` command line.

Each subcommand lives in its own module that exposes `add_arguments(parser)` (cheap imports
only) and `run(args) -> int`; this file only dispatches, so `duoserve --help` loads neither
torch nor vLLM.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from duoserve import __version__
from duoserve.errors import DuoserveError

# name -> (module, one-line help)
SUBCOMMANDS = {
    "prune": ("duoserve.prune.cli", "prune a Hugging Face model into a duoserve checkpoint"),
    "eval": ("duoserve.evaluation.cli", "evaluate a model or checkpoint (ppl, zeroshot)"),
    "allocate": ("duoserve.prune.allocate_cli", "add a greedy per-linear activation-sparsity table to a checkpoint"),
    "inspect": ("duoserve.inspect_cli", "print a checkpoint's metadata and per-module sparsity; verify it"),
    "serve": ("duoserve.loaders.cli", "serve a checkpoint with vLLM behind the OpenAI-compatible API"),
    "bench": ("duoserve.loadtest.cli", "load-test dense vs dual-sparse servers and write a report"),
    "frontier": ("duoserve.frontier.cli", "prune a grid of sparsities, measure quality and served speed, pick the operating point"),
    "quickstart": ("duoserve.quickstart", "prune the built-in model, serve it and chat with it (README command 1)"),
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="duoserve", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"duoserve {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        # Import a subcommand's module only when it is the one asked for (or for its --help).
        if only == name:
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(only=command if command in SUBCOMMANDS else None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(importlib.import_module(SUBCOMMANDS[args.command][0]).run(args) or 0)
    except DuoserveError as e:
        print(f"duoserve {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"duoserve {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
