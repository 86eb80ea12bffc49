"""`duoserve eval ppl|zeroshot`: dispatches to the evaluation modules (imported lazily)."""
from __future__ import annotations

import argparse
import importlib

# name -> (module exposing add_arguments(parser) and run(args), help)
EVAL_COMMANDS = {
    "ppl": ("duoserve.evaluation.perplexity_cli", "perplexity of a model or checkpoint on held-out text"),
    "zeroshot": ("duoserve.evaluation.zeroshot.cli", "zero-shot accuracy with lm-evaluation-harness"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="eval_command", metavar="WHAT", required=True)
    # The evaluation modules import their heavy dependencies inside run(), so importing all
    # of them here stays cheap.
    for name, (module, help_text) in EVAL_COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(module).add_arguments(p)


def run(args: argparse.Namespace) -> int:
    return importlib.import_module(EVAL_COMMANDS[args.eval_command][0]).run(args)
