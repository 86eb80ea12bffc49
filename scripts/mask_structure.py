#!/usr/bin/env python
"""How evenly do data-free scores spread the zeros over rows and columns? (docs/symmetric.md)

SymWanda's weight variant (Cor. 3.4) scored 3649.53 on SmolLM2-135M at 50%, far worse than
magnitude (402.94) and RI (RIA with alpha 0, 146.31). This script checks the suspected cause: with
layer-wide selection, |W_jk| (||W_j:||_2 + ||W_:k||_2) can zero whole input channels or output
rows. It needs no calibration data, so it reads only the weights and prints, per score:

- the largest fraction of any output row (a row of our [out, in] tensor) that is pruned,
- how many output rows / input columns lose at least 95% (near-dead) and 100% of their weights,
- per projection kind (q/k/v/o/gate/up/down): how unevenly the zeros fall over rows and columns.

Masks come from the library's own score and selection functions, as `duoserve prune` builds them
for `ria --alpha 0` and `symwanda --variant weight`. "magnitude" here is |W| under the same
selection, the baseline for the comparison (the `magnitude` method selects per output row, which
`--scope row` reproduces).

    python scripts/mask_structure.py                      # built-in SmolLM2-135M, 50%
    python scripts/mask_structure.py --sparsity 0.6 --scope row
"""
from __future__ import annotations

import argparse
import re
from collections import defaultdict
from pathlib import Path

import torch

from duoserve.errors import InputError
from duoserve.prune.methods.symmetric_scores import ria_scores, symwanda_scores
from duoserve.prune.models import default_model_dir
from duoserve.prune.sparsity import SparsityTarget, select_prune_mask

SCORES = {
    "magnitude": lambda w: w.abs().double(),  # |W| (the method's score; its selection is per row)
    "ri": lambda w: ria_scores(w, None, alpha=0.0),  # RIA's relative importance with alpha 0
    "symwanda-weight": lambda w: symwanda_scores(w, None, None, "weight"),
}
NEAR_DEAD = 0.95


def linear_weights(model_dir):
    """(name, [out, in] float32 weight) of every decoder linear, read from the safetensors."""
    from safetensors import safe_open

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise SystemExit(f"{model_dir} has no *.safetensors")
    for f in files:
        with safe_open(str(f), "pt") as st:
            for name in sorted(st.keys()):
                if re.search(r"layers\.\d+\..*_proj\.weight$", name):
                    yield name, st.get_tensor(name).float()


def structure(weight: torch.Tensor, score: str, target: SparsityTarget, scope: str) -> dict:
    mask = select_prune_mask(SCORES[score](weight), target, per="all" if scope == "layer" else "row")
    row_frac = mask.double().mean(dim=1)  # [out] pruned share of each output row
    col_frac = mask.double().mean(dim=0)  # [in]  pruned share of each input column
    return {"rows": len(row_frac), "cols": len(col_frac), "max_row": float(row_frac.max()),
            "row_spread": float(row_frac.std()), "col_spread": float(col_frac.std()),
            "rows_near": int((row_frac >= NEAR_DEAD).sum()), "rows_dead": int((row_frac == 1).sum()),
            "cols_near": int((col_frac >= NEAR_DEAD).sum()), "cols_dead": int((col_frac == 1).sum())}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="HF folder (default: the built-in SmolLM2-135M-Instruct)")
    p.add_argument("--sparsity", default="0.5", help="fraction (0.5) or N:M (2:4)")
    p.add_argument("--scope", choices=("layer", "row"), default="layer",
                   help="select over the whole layer (RIA's code, the methods' default) or per output row")
    p.add_argument("--scores", default=",".join(SCORES), help=f"comma-separated, from {', '.join(SCORES)}")
    args = p.parse_args(argv)
    scores = [s.strip() for s in args.scores.split(",") if s.strip()]
    bad = [s for s in scores if s not in SCORES]
    if bad or not scores:
        raise SystemExit(f"unknown score(s) {', '.join(bad) or '(none given)'}; choose from {', '.join(SCORES)}")
    try:
        target = SparsityTarget.parse(args.sparsity)
        model_dir = Path(args.model) if args.model else default_model_dir()
    except InputError as e:
        raise SystemExit(f"error: {e}") from None
    if not model_dir.is_dir():
        raise SystemExit(f"error: {model_dir} is not a folder; pass an HF model folder with *.safetensors")

    totals = {s: defaultdict(float) for s in scores}
    by_kind = {s: defaultdict(lambda: defaultdict(float)) for s in scores}  # score -> q_proj... -> sums
    n_linears = 0
    for name, weight in linear_weights(model_dir):
        n_linears += 1
        kind = name.split(".")[-2]
        for s in scores:
            st = structure(weight, s, target, args.scope)
            for t in (totals[s], by_kind[s][kind]):
                t["max_row"] = max(t["max_row"], st["max_row"])
                t["n"] += 1
                for k in ("rows", "cols", "rows_near", "rows_dead", "cols_near", "cols_dead", "row_spread",
                          "col_spread"):
                    t[k] += st[k]
    print(f"model {model_dir.name}, {n_linears} linears, sparsity {target}, {args.scope}-wide selection; "
          f"near-dead = at least {NEAR_DEAD:.0%} of the line pruned\n")
    print("| score | max pruned share of a row | rows near-dead / dead | input columns near-dead / dead |")
    print("|---|---|---|---|")
    for s in scores:
        t = totals[s]
        print(f"| {s} | {t['max_row']:.1%} | {int(t['rows_near'])} / {int(t['rows_dead'])} of {int(t['rows'])} "
              f"({t['rows_near'] / t['rows']:.1%}) | {int(t['cols_near'])} / {int(t['cols_dead'])} of "
              f"{int(t['cols'])} ({t['cols_near'] / t['cols']:.1%}) |")
    kinds = sorted({k for s in scores for k in by_kind[s]})
    print("\nPer projection: spread (standard deviation over the lines, averaged over layers) of the pruned "
          "share of each output row / input column, and near-dead rows / columns:\n")
    print("| projection | " + " | ".join(scores) + " |")
    print("|---|" + "---|" * len(scores))
    for kind in kinds:
        cells = []
        for s in scores:
            t = by_kind[s][kind]
            cells.append(f"{t['row_spread'] / t['n']:.3f} / {t['col_spread'] / t['n']:.3f}; "
                         f"{int(t['rows_near'])} / {int(t['cols_near'])}")
        print(f"| {kind} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
