"""Choose DuoGPT's default residual fit and scale from held-out calibration text only (issue 29).

Reads the per-window NLLs that `scripts/prune_table.py residual-default|residual-fit --data c4-heldout`
left under each --work folder (one folder per model), for each candidate (a residual fit: obs, ridge or
ridge-upstream, the ridge fit of dX's upstream part only; and a scale: 0 = no residual, then 0.25, 0.5)
at each level that has all of them, and applies the one-standard-error rule: among the candidates whose
held-out NLL, averaged over every (model, level) cell, is within one standard error of the best one's
(the paired per-window differences give the error), take the simplest (the smallest scale: the least
fitted to the calibration windows; between fits at one scale, the lower NLL). Evaluation text
(WikiText-2) is refused: a default chosen there would be tuned on what it is judged on.

    python scripts/prune_table.py residual-default --work out/abl/smol --nsamples 16 --seqlen 512 \\
        --max-windows 10 --modes threshold --only 0.5            # prune the candidates
    python scripts/prune_table.py residual-default --work out/abl/smol ... --data c4-heldout --no-prune
    python scripts/residual_default.py --work out/abl/smol --work out/abl/gemma   # both fits' ladders
    python scripts/residual_default.py --fit obs --work ...  # one fit's ladder only
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from duoserve.evaluation.perplexity import paired_nll_difference  # noqa: E402
from prune_table import SUITES, config_key  # noqa: E402  (the suites name the candidates and their cache keys)

SUITES_OF_FIT = {"obs": "residual-default", "ridge": "residual-fit", "ridge-upstream": "residual-upstream-fit"}
# The DuoGPTOptions each fit stands for (the default in the code must match the chosen one's).
FIT_OPTIONS = {"obs": {"residual_fit": "obs"}, "ridge": {"residual_fit": "ridge", "residual_dropped": 1.0},
               "ridge-upstream": {"residual_fit": "ridge", "residual_dropped": 0.0}}
HELDOUT_DATA = "c4_heldout"  # prune_table's cache suffix for --data c4-heldout
HELDOUT_MARK = "held-out"  # what the eval JSON's data description says for that split (prune/data.py)


class NotHeldOut(ValueError):
    pass


@dataclass(frozen=True, order=True)
class Candidate:
    """A default the rule can choose: a residual fit (DuoGPTOptions.residual_fit) and scale."""
    scale: float
    fit: str

    def label(self) -> str:
        return f"{self.fit} {self.scale:g}"

    @classmethod
    def parse(cls, text: str | float, fit: str = "obs") -> "Candidate":
        """'ridge 0.25', or a bare scale (the evidence files before fits were compared) of `fit`."""
        parts = str(text).split()
        return cls(float(parts[-1]), parts[0] if len(parts) == 2 else fit)


@dataclass(frozen=True)
class Cell:
    """One model at one level: each candidate's per-window NLLs on the same held-out windows."""
    model: str
    level: str
    window_nll: dict[Candidate, list[float]]


def candidates(fits: str | list[str] = "obs") -> list[tuple[str, float, Candidate, str]]:
    """(level, p_x, candidate, cache key) of every candidate of the fits' ladders. The ridge fit at
    scale 0 is SparseGPT by construction (prune/obs.py), so its rung 0 is the SparseGPT checkpoint."""
    out = []
    for fit in ([fits] if isinstance(fits, str) else fits):
        if fit == "ridge":
            levels = sorted({(c[1], c[2]) for c in SUITES["residual-fit"]})
            out += [(level, p_x, Candidate(0.0, fit), config_key("sparsegpt", level, p_x, {})) for level, p_x in levels]
        for method, level, p_x, options in SUITES[SUITES_OF_FIT[fit]]:
            out.append((level, p_x, Candidate(float(options["residual_scale"]), fit),
                        config_key(method, level, p_x, options)))
    return out


def ladder_levels(ladder) -> list[tuple[str, float]]:
    """The levels at which every fit of the ladder has all of its scales (the rule's cells)."""
    full = {fit: {c[2] for c in ladder if c[2].fit == fit} for fit in {c[2].fit for c in ladder}}
    return sorted(lp for lp in {(c[0], c[1]) for c in ladder}
                  if all({c[2] for c in ladder if (c[0], c[1]) == lp and c[2].fit == fit} == cands
                         for fit, cands in full.items()))


def eval_path(work: Path, key: str) -> Path:
    return work / f"eval-{key}-threshold-{HELDOUT_DATA}.json"


def read_window_nll(path: Path) -> list[float]:
    data = json.loads(path.read_text())
    if HELDOUT_MARK not in data.get("data", ""):
        raise NotHeldOut(f"{path}: evaluated on {data.get('data')!r}, not the held-out calibration split; "
                         f"evaluate with --data c4-heldout")
    result = data.get("pruned") or data.get("model")
    if "window_nll" not in result:
        raise ValueError(f"{path}: no per-window NLLs (evaluated before they were recorded); delete the cached "
                         f"result-eval-*-{HELDOUT_DATA}.json beside it and evaluate again")
    return result["window_nll"]


def load_cells(works: list[Path], fits: str | list[str] = "obs") -> tuple[list[Cell], list[str]]:
    """Every (model, level) with all candidates evaluated on held-out text, and what is missing."""
    cells, missing = [], []
    ladder = candidates(fits)
    for work in works:
        for level, p_x in ladder_levels(ladder):
            found, absent = {}, []
            for _, _, cand, key in (c for c in ladder if (c[0], c[1]) == (level, p_x)):
                path = eval_path(work, key)
                if path.is_file():
                    found[cand] = read_window_nll(path)
                else:
                    absent.append(path.name)
            if absent and found:
                missing.append(f"{work.name} at {level}: {', '.join(absent)}")
            if not absent:
                cells.append(Cell(work.name, level, found))
    return cells, missing


def cells_from_json(data: dict) -> list[Cell]:
    """The cells a --json file holds (its evidence), to rerun the rule on."""
    return [Cell(c["model"], c["level"], {Candidate.parse(k, data.get("fit", "obs")): v
                                          for k, v in c["window_nll"].items()}) for c in data["cells"]]


def choose(cells: list[Cell]) -> dict:
    """The one-standard-error rule over the cells' averaged held-out NLL (module docstring)."""
    if not cells:
        raise ValueError("no (model, level) has every candidate evaluated on held-out calibration text")
    cands = sorted(cells[0].window_nll)
    if any(sorted(c.window_nll) != cands for c in cells):
        raise ValueError("cells differ in their candidates")

    def mean_nll(cand):  # each cell weighs the same, whatever its window count
        return sum(sum(c.window_nll[cand]) / len(c.window_nll[cand]) for c in cells) / len(cells)

    best = min(cands, key=mean_nll)
    rows = {}
    for cand in cands:
        # paired per-window differences against the best, per cell (evaluation.perplexity)
        diffs = []
        for c in cells:
            try:
                diffs.append(paired_nll_difference(c.window_nll[cand], c.window_nll[best]))
            except ValueError as e:
                raise ValueError(f"{c.model} at {c.level}: {e}") from None
        gap = sum(d["mean"] for d in diffs) / len(cells)
        se = math.sqrt(sum(d["se"] ** 2 for d in diffs)) / len(cells)
        rows[cand] = {"mean_nll": mean_nll(cand), "gap_to_best": gap, "se": se,
                      "ppl_ratio_to_best": math.exp(gap), "within_1se": gap <= se}
    chosen = min((c for c in cands if rows[c]["within_1se"]), key=lambda c: (c.scale, rows[c]["mean_nll"]))
    return {"best": best, "chosen": chosen, "rows": rows,
            "cells": [f"{c.model} at {c.level} ({len(c.window_nll[best])} windows)" for c in cells]}


def render(result: dict, cells: list[Cell]) -> str:
    head = "| candidate (fit, residual scale) | " + " | ".join(f"{c.model} W{c.level}" for c in cells) + \
           " | mean NLL gap to best (± 1 SE) | PPL ratio to best | within 1 SE |"
    lines = [head, "|" + "---|" * (len(cells) + 4)]
    for cand, row in sorted(result["rows"].items()):
        ppl = [f"{math.exp(sum(c.window_nll[cand]) / len(c.window_nll[cand])):.2f}" for c in cells]
        mark = " (chosen)" if cand == result["chosen"] else ""
        zero = " (= SparseGPT)" if cand == Candidate(0.0, "ridge") else ""
        lines.append(f"| {cand.label()}{zero}{mark} | " + " | ".join(ppl) +
                     f" | {row['gap_to_best']:+.4f} ± {row['se']:.4f} | {row['ppl_ratio_to_best']:.3f} | "
                     f"{'yes' if row['within_1se'] else 'no'} |")
    return "\n".join(lines)


def parse_fits(text: str) -> list[str]:
    fits = [f.strip() for f in text.split(",") if f.strip()]
    bad = [f for f in fits if f not in SUITES_OF_FIT]
    if not fits or bad:
        raise argparse.ArgumentTypeError(f"{text!r}: fits are {', '.join(sorted(SUITES_OF_FIT))}, comma-separated")
    return fits


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, action="append", required=True,
                   help="a prune_table work folder (one per model); repeat for each model")
    # both fits by default: the committed choice (docs/reports/duogpt-residual-2026-12-07) is over both
    p.add_argument("--fit", type=parse_fits, default=["obs", "ridge"],
                   help="the residual fits whose ladders are compared, comma-separated: obs, ridge or obs,ridge "
                        "(ridge: rung 0 is the SparseGPT checkpoint)")
    p.add_argument("--json", type=Path, help="write the choice and its numbers here")
    args = p.parse_args()
    for work in args.work:
        if not work.is_dir():
            p.error(f"--work {work}: no such folder (run scripts/prune_table.py "
                    f"{' / '.join(SUITES_OF_FIT[f] for f in args.fit)} --work {work} first)")
    try:
        cells, missing = load_cells(args.work, args.fit)
        result = choose(cells)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(render(result, cells))
    print(f"\nbest on held-out calibration text: {result['best'].label()}; chosen by the one-standard-error rule: "
          f"{result['chosen'].label()} (cells: {'; '.join(result['cells'])})")
    if missing:
        print("incomplete (left out): " + "; ".join(missing))
    if args.json:  # the evidence with the choice: tests/prune/test_residual_default_script.py reruns the rule on it
        cells_out = [{"model": c.model, "level": c.level, "window_nll": {k.label(): v for k, v in c.window_nll.items()}}
                     for c in cells]
        out = {"best": result["best"].label(), "chosen": result["chosen"].label(),
               "rows": {k.label(): v for k, v in result["rows"].items()}, "cells": cells_out, "fits": args.fit}
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
