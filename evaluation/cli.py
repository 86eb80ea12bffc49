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


def add_activation_arguments(p) -> None:
    """--activation-mode and --activation-sparsity (a parser or argument group): how an in-process
    model's activation sparsity is applied, the same in `eval ppl` and `eval zeroshot`."""
    p.add_argument("--activation-mode", choices=["topk", "threshold", "off"], default=None,
                   help="activation sparsity at evaluation (default: the checkpoint's own; off for dense models)")
    p.add_argument("--activation-sparsity", type=float, default=None, metavar="P_X",
                   help="p_x in [0, 1): for a checkpoint, its thresholds at this p_x (from its calibrated grid, "
                        "interpolated between grid points; 0 = off); with --activation-mode topk, the fraction "
                        "of each token's inputs dropped (default: the checkpoint's target)")


def run(args: argparse.Namespace) -> int:
    return importlib.import_module(EVAL_COMMANDS[args.eval_command][0]).run(args)
