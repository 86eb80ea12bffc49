"""Per linear: how far a pruned checkpoint's outputs are from the dense model's, on the calibration
windows it was fitted on and on held-out calibration windows it never saw (issue 29).

For every target linear, with each model fed its own inputs (the pruned model's inputs sparsified
as at calibration: top-k at the checkpoint's p_x; --activation-mode threshold for the served rule),

    error = sum ||W' x^ - W0 x~||^2 / sum ||W0 x~||^2     (over the tokens of a set of windows)

x^ the pruned model's input to the linear, x~ the dense model's: DuoGPT's objective at residual
scale 1, i.e. how close each layer stays to the dense model. The ratio held-out / fit is the
generalization gap of the fit: a method whose fit windows look much better than new text
overfits its calibration statistics. The fit windows are the prune's own (the same source, count,
length and seed as `duoserve prune`'s defaults or the ones given); the held-out windows come from
the calibration source's held-out split (`c4-heldout`), which pruning never reads.

    python scripts/layer_generalization.py CKPT [--model gemma-3-270m] --nsamples 16 --seqlen 512 \\
        [--heldout-windows 16] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch


def accumulate(dense, pruned, targets: list[str], windows: torch.Tensor) -> dict[str, list[float]]:
    """{linear name: [sum squared error, sum squared dense output]} over the windows."""
    dense_mods = dict(dense.named_modules())
    pruned_mods = dict(pruned.named_modules())
    sums: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    reference: dict[str, torch.Tensor] = {}
    handles = []

    def keep(name):
        def hook(module, args, output):
            reference[name] = output.detach().float()
        return hook

    def compare(name):
        def hook(module, args, output):
            ref = reference.pop(name)
            sums[name][0] += float((output.float() - ref).pow(2).sum())
            sums[name][1] += float(ref.pow(2).sum())
        return hook

    for name in targets:
        handles.append(dense_mods[name].register_forward_hook(keep(name)))
        handles.append(pruned_mods[name].register_forward_hook(compare(name)))
    try:
        with torch.no_grad():
            for w in range(windows.shape[0]):
                print(f"  window {w + 1}/{windows.shape[0]}", file=sys.stderr, flush=True)
                batch = windows[w:w + 1]
                dense(input_ids=batch, use_cache=False)
                pruned(input_ids=batch, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return dict(sums)


def main() -> int:
    from duoserve.evaluation.perplexity import make_windows
    from duoserve.evaluation.texts import evaluation_text
    from duoserve.prune.architectures import bos_for, model_targets
    from duoserve.prune.data import calibration_windows
    from duoserve.prune.model_sources import load_model_and_tokenizer
    from duoserve.prune.pruned_models import load_pruned_model

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--model", default=None, help="the dense model the checkpoint was pruned from (default: the built-in)")
    p.add_argument("--nsamples", type=int, default=128, help="the prune's --nsamples (its fit windows)")
    p.add_argument("--seqlen", type=int, default=2048, help="the prune's --seqlen")
    p.add_argument("--seed", type=int, default=0, help="the prune's --seed")
    p.add_argument("--calib-data", default="c4")
    p.add_argument("--heldout-windows", type=int, default=None, help="held-out windows (default: as many as fit)")
    p.add_argument("--activation-mode", choices=("topk", "threshold"), default="topk")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    if not (args.checkpoint / "config.json").is_file():
        p.error(f"{args.checkpoint}: not a checkpoint folder (no config.json)")

    print("loading the dense and the pruned model", file=sys.stderr, flush=True)
    dense, tokenizer, _ = load_model_and_tokenizer(args.model, dtype="float32")
    pruned, _, ckpt = load_pruned_model(args.checkpoint, args.activation_mode, dtype="float32")
    if pruned.config.model_type != dense.config.model_type or \
            pruned.config.num_hidden_layers != dense.config.num_hidden_layers:
        p.error(f"{args.checkpoint} was not pruned from {args.model or 'the built-in model'} "
                f"({pruned.config.model_type} vs {dense.config.model_type}); pass --model")
    targets = sorted(model_targets(dense, tuple(ckpt.qconfig.targets)))
    bos = bos_for(dense, tokenizer)
    fit, fit_desc = calibration_windows(args.calib_data, tokenizer, args.nsamples, args.seqlen, args.seed, bos)
    text, held_desc = evaluation_text(f"{args.calib_data}-heldout")
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])
    held = make_windows(ids, args.seqlen, bos, args.heldout_windows or args.nsamples)
    print(f"fit: {fit_desc}\nheld out: {held_desc}, {held.shape[0]} x {args.seqlen}", file=sys.stderr)

    on_fit = accumulate(dense, pruned, targets, fit)
    on_held = accumulate(dense, pruned, targets, held)
    rows = []
    for name in targets:
        f = on_fit[name][0] / on_fit[name][1]
        h = on_held[name][0] / on_held[name][1]
        rows.append({"linear": name, "fit": f, "heldout": h, "ratio": h / f if f > 0 else float("inf")})
    layers: dict[int, list[dict]] = defaultdict(list)
    for r in rows:
        layers[int(r["linear"].split(".layers.")[1].split(".")[0])].append(r)
    print("| layer | fit error (mean of linears) | held-out error | held-out / fit |\n|---|---|---|---|")
    for i in sorted(layers):
        f = sum(r["fit"] for r in layers[i]) / len(layers[i])
        h = sum(r["heldout"] for r in layers[i]) / len(layers[i])
        print(f"| {i} | {f:.4f} | {h:.4f} | {h / f:.2f} |")
    kinds: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        kinds[r["linear"].rsplit(".", 1)[1]].append(r)
    print("\n| linear | fit error (mean over layers) | held-out error | held-out / fit |\n|---|---|---|---|")
    for kind, rs in sorted(kinds.items()):
        f = sum(r["fit"] for r in rs) / len(rs)
        h = sum(r["heldout"] for r in rs) / len(rs)
        print(f"| {kind} | {f:.4f} | {h:.4f} | {h / f:.2f} |")
    if args.json:
        args.json.write_text(json.dumps({"checkpoint": str(args.checkpoint), "fit": fit_desc, "heldout": held_desc,
                                         "activation_mode": args.activation_mode, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
