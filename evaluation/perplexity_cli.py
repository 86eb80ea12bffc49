"""`duoserve eval ppl`: perplexity of a checkpoint (with its activation sparsity) and of its dense source."""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from duoserve.evaluation.cli import add_activation_arguments

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None,
                   help="duoserve checkpoint, HF folder or id (default: the built-in SmolLM2-135M-Instruct)")
    p.add_argument("--data", default="wikitext2",
                   help="wikitext2 (HF, or a local copy), wiki (packaged sample), c4, c4-heldout (the calibration "
                        "documents pruning never calibrates on: for choosing settings), or a text file (default wikitext2)")
    p.add_argument("--seqlen", type=int, default=2048, help="window length in tokens (default 2048)")
    add_activation_arguments(p)
    p.add_argument("--allocation", choices=["uniform", "greedy"], default="uniform",
                   help="uniform: every linear at --activation-sparsity (default); greedy: --activation-sparsity is "
                        "the K*N-weighted average, each linear's p_x from the checkpoint's greedy allocation table "
                        "(`duoserve allocate`; interpolated between its targets)")
    p.add_argument("--no-dense", action="store_true", help="skip the dense source model's perplexity")
    p.add_argument("--max-windows", type=int, default=None, help="evaluate only the first N windows (quick checks)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="compute dtype (default float32)")
    p.add_argument("--json", type=Path, help="write the results to this JSON file")


def _summarize_realized(model) -> dict | None:
    sparsity = getattr(model, "duoserve_sparsity", None)
    if sparsity is None:
        return None
    realized = sparsity.realized()
    values = list(realized.values())
    # weighted by each linear's K*N: the average the kernels' skipped weight columns follow
    size = {n: m.in_features * m.out_features for n, m in sparsity.modules.items() if n in realized}
    weighted = sum(realized[n] * k for n, k in size.items()) / sum(size.values())
    return {"mean": sum(values) / len(values), "weighted_mean": weighted, "min": min(values), "max": max(values),
            "per_module": realized}


def run(args: argparse.Namespace) -> int:
    import torch

    from duoserve.errors import InputError
    from duoserve.evaluation.texts import evaluation_tokens
    from duoserve.prune.pruned_models import load_any_model
    from duoserve.evaluation.perplexity import make_windows, perplexity
    from duoserve.prune.architectures import bos_for

    if args.activation_sparsity is not None and not 0 <= args.activation_sparsity < 1:
        raise InputError(f"--activation-sparsity {args.activation_sparsity} is outside [0, 1)")
    if args.max_windows is not None and args.max_windows <= 0:
        raise InputError("--max-windows must be positive")
    torch.manual_seed(0)
    model, tokenizer, ckpt = load_any_model(args.model, args.activation_mode, args.dtype, args.activation_sparsity,
                                            allocation=args.allocation)
    ids, data_desc = evaluation_tokens(args.data, tokenizer)
    windows = make_windows(ids, args.seqlen, bos_for(model, tokenizer), args.max_windows)
    log.info("evaluating on %s: %d windows x %d tokens", data_desc, windows.shape[0], args.seqlen)

    mode = "off" if getattr(model, "duoserve_sparsity", None) is None else model.duoserve_sparsity.mode
    results = {"model": args.model or "default", "data": data_desc, "seqlen": args.seqlen,
               "windows": int(windows.shape[0]), "dtype": args.dtype, "activation_mode": mode}
    if ckpt is not None and mode == "threshold":  # the p_x whose thresholds were used
        results["activation_sparsity"] = (ckpt.qconfig.activation_sparsity.target if args.activation_sparsity is None
                                          else args.activation_sparsity)
        results["allocation"] = args.allocation
    label = "pruned" if ckpt is not None else "model"
    results[label] = perplexity(model, windows, args.batch_size, desc=label)
    realized = _summarize_realized(model)
    if realized is not None:
        results[label]["activation_sparsity_realized"] = realized
    if ckpt is not None:
        results["checkpoint"] = {"method": ckpt.qconfig.producer.get("method"),
                                 "weight_sparsity": ckpt.qconfig.global_sparsity,
                                 "structure": ckpt.qconfig.sparsity_structure,
                                 "activation_sparsity_target": ckpt.qconfig.activation_sparsity.target}
        source = ckpt.qconfig.producer.get("source_model")
        del model
        if not args.no_dense:
            if source and (Path(source).exists() or not source.startswith("/")):
                dense, _, _ = load_any_model(source, "off", args.dtype)
                results["dense"] = perplexity(dense, windows, args.batch_size, desc="dense")
                results["dense"]["model"] = source
            else:
                log.warning("dense source model %s is not available; skipping the dense perplexity", source)

    lines = [f"data: {data_desc}, seqlen {args.seqlen}, {windows.shape[0]} windows, {args.dtype}"]
    if "dense" in results:
        lines.append(f"dense  PPL: {results['dense']['ppl']:.3f}")
    at = f" at p_x {results['activation_sparsity']:g}" if "activation_sparsity" in results else ""
    at += " (greedy allocation: the K*N-weighted average)" if args.allocation == "greedy" else ""
    lines.append(f"{label:6s} PPL: {results[label]['ppl']:.3f}  (activation sparsity: {mode}{at})")
    if realized is not None:
        lines.append(f"realized activation sparsity per linear: mean {realized['mean']:.3f} "
                     f"(K*N-weighted {realized['weighted_mean']:.3f}), "
                     f"min {realized['min']:.3f}, max {realized['max']:.3f}")
    print("\n".join(lines))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0
