"""`duoserve allocate CKPT`: add a layer-adaptive (greedy) activation-sparsity table to a checkpoint.

Runs TEAL's block-wise greedy allocation (duoserve.prune.allocation) on the pruned model with its
own threshold grid, on windows of the checkpoint's calibration source (for a named source such
as c4, only the documents pruning may calibrate on: never the held-out split, never evaluation
text), and writes the table into `activation_sparsity.allocation` of the checkpoint's metadata,
in place or into a copy (-o), atomically. The weights and thresholds are not touched. Then
`duoserve serve|eval ... --activation-sparsity P --allocation greedy` uses it.
"""
from __future__ import annotations

import argparse
import json
import logging
from dataclasses import replace
from pathlib import Path

log = logging.getLogger(__name__)


def parse_targets(text: str) -> tuple[float, ...]:
    from duoserve.errors import InputError

    try:
        return tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise InputError(f"--allocation-targets {text!r}: give comma-separated average p_x, e.g. 0.3,0.5") from None


def add_targets_options(p: argparse.ArgumentParser, prefix: str = "") -> None:
    """The allocation's own options (shared with `duoserve prune --allocation greedy`)."""
    from duoserve.prune.allocation import (
        DEFAULT_ALLOCATION_NSAMPLES, DEFAULT_ALLOCATION_SEQLEN, DEFAULT_ALLOCATION_TARGETS,
    )

    p.add_argument("--allocation-targets", type=parse_targets, default=DEFAULT_ALLOCATION_TARGETS, metavar="P,P,...",
                   help="average p_x to store a per-linear table for; serving interpolates between them "
                        f"(default {','.join(f'{t:g}' for t in DEFAULT_ALLOCATION_TARGETS)})")
    p.add_argument("--allocation-nsamples", type=int, default=DEFAULT_ALLOCATION_NSAMPLES,
                   help=f"calibration windows the greedy search measures on (default {DEFAULT_ALLOCATION_NSAMPLES})")
    p.add_argument("--allocation-seqlen", type=int, default=DEFAULT_ALLOCATION_SEQLEN,
                   help=f"tokens per window (default {DEFAULT_ALLOCATION_SEQLEN})")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", type=Path, help="a duoserve checkpoint with a threshold grid (format 2)")
    p.add_argument("-o", "--output", type=Path, default=None,
                   help="write a copy with the table here (default: update CHECKPOINT in place, atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output folder")
    add_targets_options(p)
    p.add_argument("--calib-data", default=None,
                   help="calibration source (default: the one the checkpoint's thresholds were calibrated on)")
    p.add_argument("--seed", type=int, default=None,
                   help="window seed (default: the thresholds' calibration seed + 1, a draw of its own)")
    p.add_argument("--batch-size", type=int, default=4, help="windows per forward pass (default 4)")
    p.add_argument("--exhaustive", action="store_true",
                   help="measure every candidate at every step (TEAL) instead of the lazy greedy (slower)")


def allocate_checkpoint(path: Path, output: Path | None = None, *, targets, nsamples: int, seqlen: int,
                        calib_data: str | None = None, seed: int | None = None, batch_size: int = 4,
                        lazy: bool = True, overwrite: bool = False) -> dict:
    """Compute the greedy table for checkpoint `path` and write it (see the module docstring)."""
    import torch

    from duoserve.errors import InputError
    from duoserve.format.io import read_quant_config, update_quant_config
    from duoserve.prune.allocation import check_targets, with_greedy_allocation
    from duoserve.prune.pruned_models import load_pruned_model

    path = Path(path)
    _, q = read_quant_config(path)
    act = q.activation_sparsity
    if act.grid is None:
        raise InputError(f"{path} (format v{q.format_version}) has no threshold grid to allocate from; re-prune it "
                         "with this duoserve (`duoserve prune ... --allocation greedy`)")
    targets = check_targets(targets, act.grid)
    if nsamples <= 0 or seqlen < 8:
        raise InputError("--allocation-nsamples must be positive and --allocation-seqlen at least 8")
    if output is not None and output.resolve() != path.resolve() and output.exists() and not overwrite:
        raise InputError(f"output folder {output} already exists; pass --overwrite to replace it")
    source = calib_data or act.calibration.get("data") or "c4"
    seed = int(act.calibration.get("seed", 1)) + 1 if seed is None else seed  # prune seed + 2
    torch.manual_seed(seed)
    model, tokenizer, ckpt = load_pruned_model(path, activation_mode="off")
    new_q = with_greedy_allocation(model, tokenizer, q, calib_data=source, seed=seed, targets=targets,
                                   nsamples=nsamples, seqlen=seqlen, batch_size=batch_size, lazy=lazy)
    alloc = new_q.activation_sparsity.allocation
    written = update_quant_config(path, new_q, output, overwrite=overwrite)
    return {"checkpoint": str(written), "targets": list(alloc.targets), "seconds": alloc.info["seconds"],
            "block_forwards": alloc.info["block_forwards"],
            "block_error_greedy_vs_uniform": alloc.info.get("block_error_greedy_vs_uniform")}


def run(args: argparse.Namespace) -> int:
    summary = allocate_checkpoint(args.checkpoint, args.output, targets=args.allocation_targets,
                                  nsamples=args.allocation_nsamples, seqlen=args.allocation_seqlen,
                                  calib_data=args.calib_data, seed=args.seed, batch_size=args.batch_size,
                                  lazy=not args.exhaustive, overwrite=args.overwrite)
    print(json.dumps(summary, indent=2))
    return 0
