#!/usr/bin/env python
"""How evenly do data-free scores spread the zeros over rows and columns? (docs/results.md, "Symmetric family")

SymWanda's weight variant (Cor. 3.4) scored 3649.53 on SmolLM2-135M at 50%, far worse than
magnitude (402.94) and RI (RIA with alpha 0, 146.31). This script checks the suspected cause: with
layer-wide selection, |W_jk| (||W_j:||_2 + ||W_:k||_2) can zero whole input channels or output
rows. It needs no calibration data, so it loads the model's weights only and prints, per score:

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
from collections import defaultdict
from pathlib import Path

import torch

from duoserve.errors import InputError
from duoserve.prune.methods.symmetric_scores import ria_scores, symwanda_scores
from duoserve.prune.sparsity import SparsityTarget, select_prune_mask

SCORES = {
    "magnitude": lambda w: w.abs().double(),  # |W| (the method's score; its selection is per row)
    "ri": lambda w: ria_scores(w, None, alpha=0.0),  # RIA's relative importance with alpha 0
    "symwanda-weight": lambda w: symwanda_scores(w, None, None, "weight"),
}
NEAR_DEAD = 0.95


def target_weights(model: str | None):
    """(name, [out, in] float32 weight) of every linear `duoserve prune` targets, and the model's source."""
    from duoserve.format import DEFAULT_TARGETS
    from duoserve.prune.architectures import model_targets
    from duoserve.prune.model_sources import load_model_and_tokenizer

    loaded, _, source = load_model_and_tokenizer(model)
    return [(name, linear.weight.detach().float()) for name, linear in model_targets(loaded, DEFAULT_TARGETS).items()], source


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
    p.add_argument("--model", default=None, help="HF folder or id (default: the built-in SmolLM2-135M-Instruct)")
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
        weights, source = target_weights(args.model)
    except InputError as e:
        raise SystemExit(f"error: {e}") from None

    # score -> projection kind (q_proj, ...) -> sums over its layers; the model totals add the kinds up.
    by_kind = {s: defaultdict(lambda: defaultdict(float)) for s in scores}
    for name, weight in weights:
        for s in scores:
            t = by_kind[s][name.rsplit(".", 1)[-1]]
            st = structure(weight, s, target, args.scope)
            t["max_row"] = max(t["max_row"], st.pop("max_row"))
            t["n"] += 1
            for k, v in st.items():
                t[k] += v
    print(f"model {Path(source).name}, {len(weights)} linears, sparsity {target}, {args.scope}-wide selection; "
          f"near-dead = at least {NEAR_DEAD:.0%} of the line pruned\n")
    print("| score | max pruned share of a row | rows near-dead / dead | input columns near-dead / dead |")
    print("|---|---|---|---|")
    for s in scores:
        kinds = by_kind[s].values()
        t = {k: sum(x[k] for x in kinds) for k in ("rows", "cols", "rows_near", "rows_dead", "cols_near", "cols_dead")}
        print(f"| {s} | {max(x['max_row'] for x in kinds):.1%} | {int(t['rows_near'])} / {int(t['rows_dead'])} of "
              f"{int(t['rows'])} ({t['rows_near'] / t['rows']:.1%}) | {int(t['cols_near'])} / {int(t['cols_dead'])} "
              f"of {int(t['cols'])} ({t['cols_near'] / t['cols']:.1%}) |")
    print("\nPer projection: spread (standard deviation over the lines, averaged over layers) of the pruned "
          "share of each output row / input column, and near-dead rows / columns:\n")
    print("| projection | " + " | ".join(scores) + " |")
    print("|---|" + "---|" * len(scores))
    for kind in sorted(by_kind[scores[0]]):
        cells = []
        for s in scores:
            t = by_kind[s][kind]
            cells.append(f"{t['row_spread'] / t['n']:.3f} / {t['col_spread'] / t['n']:.3f}; "
                         f"{int(t['rows_near'])} / {int(t['cols_near'])}")
        print(f"| {kind} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
