#!/usr/bin/env python
"""One layer of the built-in model: does DuoGPT's residual correction generalize beyond its calibration tokens?

Captures the inputs of three linears of one decoder layer of the dense model on WikiText-2
windows, sparsifies them per token (top-k, p_x) as the pruned stream would see them, prunes each
linear with SparseGPT's solver (residual off) and with DuoGPT's residual at several scales and both
targets (prune/obs.py), and prints the relative objective ||W' X^ - W X~||^2 / ||W X~||^2 on the
calibration tokens and on held-out tokens of the same text. Here dX is activation sparsity alone
(what the first layers see); deeper layers also carry the upstream pruning error.

    python scripts/duogpt_layer_check.py --layer 10 --cal-windows 8 --val-windows 8
    python scripts/duogpt_layer_check.py --layer 10 --cal-windows 96 --val-windows 8

A large gap between calibration and held-out objective means the K x K residual regression
overfits the calibration tokens (docs/pruning.md, "The residual term").
"""
from __future__ import annotations

import argparse

import torch

from duoserve.prune.activation import sparsify_topk
from duoserve.prune.data import evaluation_tokens
from duoserve.prune.models import load_model_and_tokenizer
from duoserve.prune.obs import HessianStats, ObsSettings, obs_prune
from duoserve.prune.sparsity import SparsityTarget
from duoserve.prune.streams import InputRecorder

LINEARS = ("self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj")
SETTINGS = [("sparsegpt (no residual)", 0.0, "running"), ("residual 0.5, original", 0.5, "original"),
            ("residual 1, original", 1.0, "original"), ("residual 0.5, running", 0.5, "running"),
            ("residual 1, running (as printed)", 1.0, "running")]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layer", type=int, default=10)
    p.add_argument("--cal-windows", type=int, default=8)
    p.add_argument("--val-windows", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--sparsity", type=float, default=0.5, help="p_w = p_x")
    p.add_argument("--damp", type=float, default=0.1)
    p.add_argument("--data", default="../shared/data/wikitext-2-raw-test.raw")
    args = p.parse_args()

    model, tokenizer, _ = load_model_and_tokenizer(None, dtype="float32")
    ids, _ = evaluation_tokens(args.data, tokenizer)
    n = args.cal_windows + args.val_windows
    if ids.numel() < n * args.seqlen:
        raise SystemExit(f"{args.data}: {ids.numel()} tokens, need {n * args.seqlen}")
    windows = ids[: n * args.seqlen].view(n, args.seqlen)
    layer = model.model.layers[args.layer]
    captured = {name: [] for name in LINEARS}
    linears = {name: layer.get_submodule(name) for name in LINEARS}
    with torch.no_grad(), InputRecorder(linears, lambda name, x: captured[name].append(x), stop_when_done=False):
        for w in windows:
            model(w[None])

    n_cal = args.cal_windows * args.seqlen
    target = SparsityTarget(args.sparsity)
    print(f"layer {args.layer}, p_w = p_x = {args.sparsity}, {n_cal} calibration tokens, "
          f"{args.val_windows * args.seqlen} held-out tokens; relative objective (calibration / held-out)")
    for name in LINEARS:
        x_dense = torch.cat(captured[name])  # [T, K]
        x_hat = sparsify_topk(x_dense, args.sparsity)
        weight = linears[name].weight.detach().float()
        stats = HessianStats(x_dense.shape[1], True, "cpu")
        for s in range(0, n_cal, 512):
            stats.add(x_hat[s:min(s + 512, n_cal)], x_dense[s:min(s + 512, n_cal)])
        out_dense = x_dense @ weight.T

        def objective(w_new, rows):
            return float(((x_hat[rows] @ w_new.T - out_dense[rows]) ** 2).sum() / (out_dense[rows] ** 2).sum())

        print(f"{name} (K = {x_dense.shape[1]})")
        for label, scale, residual_target in SETTINGS:
            settings = ObsSettings(128, args.damp, True, scale, residual_target)
            w_new = obs_prune(weight, stats, target, settings)
            print(f"  {label:34s} {objective(w_new, slice(0, n_cal)):.4f} / {objective(w_new, slice(n_cal, None)):.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
