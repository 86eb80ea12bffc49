#!/usr/bin/env python
"""Reproduce the symmetric-pruning table (docs/reports/symmetric-smollm2/README.md, read in docs/symmetric.md and
docs/results.md): the symmetric-pruning family on SmolLM2-135M (or --model).

Every configuration is pruned in the same process by the steps of `prune_model` (duoserve.prune.api:
build_method, seed_everything, prune_loaded: the calibration windows, the sequential engine that
`duoserve prune` runs, the thresholds), on a copy of the model loaded once, and for p_x > 0
evaluated in threshold mode, as `duoserve eval ppl CKPT` does on the checkpoint. Skipping the
checkpoint write/read saves most of the per-row time; `--check-cli` reruns one row through
`prune_model` + `load_any_model` and reports both numbers.

Each result is cached as WORK/results/<key>.json (written atomically), so an interrupted run
resumes where it stopped; rows run in priority tiers, so a partial table already answers the
main questions. The markdown goes between the table markers of --markdown.

    python scripts/symmetric_table.py --device cuda
    python scripts/symmetric_table.py --report-only
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import re
import statistics
import time
from pathlib import Path

SPARSITIES = ("0.5", "0.6", "2:4")
REFINES = (None, "dsnot", "r2dsnot")
SYMWANDA = ("sum", "squared", "weight", "relative")
START, END = "<!-- symmetric-table:start -->", "<!-- symmetric-table:end -->"
log = logging.getLogger("symmetric_table")


# DuoGPT's Algorithm 1 as printed (the library default before 2026-11-26; docs/pruning.md "The
# residual term"): kept as its own rows so that the table shows what the correction changed
DUOGPT_AS_PRINTED = {"residual_target": "running", "residual_scale": 1.0}
# A refiner aiming at the full dense stream after DuoGPT (the refiners' behaviour before they
# followed the base's --residual-scale, 2026-11-26)
FULL_RESIDUAL = {"residual_scale": 1.0}


def row(method, sparsity, tier, opts=None, refine=None, p_x=0.0, ropts=None):
    opts, ropts = opts or {}, ropts or {}
    parts = [method] + [f"{k}-{v}" for k, v in sorted(opts.items())] + [sparsity.replace(":", "of"), refine or "base"]
    parts += [f"{k}-{v}" for k, v in sorted(ropts.items())]
    if p_x:
        parts.append(f"px{p_x:g}")
    return {"key": "_".join(parts).replace(".", "p"), "method": method, "opts": opts, "sparsity": sparsity,
            "refine": refine, "refine_opts": ropts, "p_x": p_x, "tier": tier}


def grid() -> list[dict]:
    """All configurations, tier 1 first (docs/reports/symmetric-smollm2 lists the rows not run)."""
    rows = []
    seeds = [{"sample_seed": s} for s in (0, 1, 2)]
    for sp in SPARSITIES:  # tier 1: the paper's headline comparisons
        for refine in REFINES:
            rows += [row("wanda", sp, 1, refine=refine), row("ria", sp, 1, refine=refine)]
        rows += [row("stochria", sp, 1, o) for o in seeds]
    rows += [row("duogpt", "0.5", 1, refine=r, p_x=0.5) for r in REFINES]
    rows += [row("duogpt", "0.5", 1, DUOGPT_AS_PRINTED, refine=r, p_x=0.5) for r in REFINES]
    # The refiners follow DuoGPT's residual scale (0.5) by default; scale 1 = aim at the full dense stream
    rows += [row("duogpt", "0.5", 1, refine=r, p_x=0.5, ropts=FULL_RESIDUAL) for r in REFINES[1:]]
    # Threshold 0: every row may swap (at 0.1 only ~1% of rows are active after DuoGPT's defaults)
    rows += [row("duogpt", "0.5", 1, refine=r, p_x=0.5, ropts={"update_threshold": 0.0}) for r in REFINES[1:]]
    for sp in SPARSITIES:  # tier 2: SymWanda variants, magnitude; RIA ablations at 50%
        rows += [row("magnitude", sp, 2), row("owanda", sp, 2)]
        rows += [row("symwanda", sp, 2, {"variant": v}) for v in SYMWANDA]
    rows += [row("ria", "0.5", 2, {"alpha": a}) for a in (0.0, 1.0, 2.0)]
    rows += [row("ria", "0.5", 2, {"relative": r}) for r in ("col", "row")]
    rows += [row(m, "0.6", 2, refine="r2dsnot", ropts={"update_threshold": 0.0}) for m in ("wanda", "ria")]
    # RIA choosing per output row, as Wanda does: tests the explanation that layer-wide selection is
    # what makes RIA lose to Wanda on this model at 50-60% (docs/results.md, "Symmetric family")
    rows += [row("ria", sp, 2, {"mask_scope": "row"}) for sp in ("0.5", "0.6")]
    for sp in SPARSITIES:  # tier 3: refiners on stochRIA (3 seeds) and SymWanda (sum)
        for refine in REFINES[1:]:
            rows += [row("stochria", sp, 3, o, refine) for o in seeds]
            rows.append(row("symwanda", sp, 3, {"variant": "sum"}, refine))
    for refine in REFINES[1:]:  # tier 4: the other variants refined at 60%, l_p at 50%
        rows += [row("owanda", "0.6", 4, refine=refine), row("magnitude", "0.6", 4, refine=refine)]
        rows += [row("symwanda", "0.6", 4, {"variant": v}, refine) for v in SYMWANDA[1:]]
    rows += [row("lpnorm", "0.5", 4, {"norm_p": p}) for p in (2.0, 3.0, 4.0, math.inf)]
    rows += [row("lpnorm", "0.5", 4, {"strategy": s}) for s in ("s2", "s3", "s4")]
    for sp in ("0.5", "2:4"):  # tier 5: the rest of "each with and without" refinement
        for refine in REFINES[1:]:
            rows.append(row("owanda", sp, 5, refine=refine))
            rows += [row("symwanda", sp, 5, {"variant": v}, refine) for v in SYMWANDA[1:]]
    return rows


class Runner:
    def __init__(self, args):
        import torch

        from duoserve.evaluation.perplexity import make_windows
        from duoserve.evaluation.texts import evaluation_tokens
        from duoserve.prune.architectures import bos_for
        from duoserve.prune.data import calibration_windows
        from duoserve.prune.model_sources import default_model_dir, load_model_and_tokenizer

        self.args = args
        self.torch = torch
        self.device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.startswith("cuda"):
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
        self.model_source = str(args.model or default_model_dir())
        self.model, self.tokenizer, _ = load_model_and_tokenizer(self.model_source)
        bos = bos_for(self.model, self.tokenizer)
        self.windows, self.calib_desc = calibration_windows(args.calib_data, self.tokenizer, args.nsamples,
                                                            args.seqlen, args.seed, bos)
        self.thr_windows, _ = calibration_windows(args.calib_data, self.tokenizer, args.threshold_nsamples,
                                                  args.seqlen, args.seed + 1, bos)
        ids, self.eval_desc = evaluation_tokens(args.data, self.tokenizer)
        self.eval_windows = make_windows(ids, args.eval_seqlen, bos_for(self.model, self.tokenizer), args.max_windows)

    def perplexity(self, model) -> float:
        from duoserve.evaluation.perplexity import perplexity

        model.to(device=self.device, dtype=self.torch.float32)
        return perplexity(model, self.eval_windows, batch_size=self.args.eval_batch_size)["ppl"]

    def dense(self) -> dict:
        model = copy.deepcopy(self.model)
        return {"ppl": self.perplexity(model)}

    def prune_config(self, cfg: dict, output: Path):
        """The PruneConfig of a row: what `duoserve prune` would be given for it."""
        from duoserve.prune.api import PruneConfig

        return PruneConfig(output=output, model=self.model_source, method=cfg["method"], sparsity=cfg["sparsity"],
                           activation_sparsity=cfg["p_x"], method_options=cfg["opts"], refine=cfg["refine"],
                           refine_options=cfg.get("refine_opts") or {}, calib_data=self.args.calib_data,
                           nsamples=self.args.nsamples, seqlen=self.args.seqlen,
                           threshold_nsamples=self.args.threshold_nsamples, seed=self.args.seed,
                           device=self.device, overwrite=True)

    def run(self, cfg: dict) -> dict:
        from duoserve.format import DEFAULT_TARGETS
        from duoserve.prune.api import build_method, prune_loaded, seed_everything
        from duoserve.prune.architectures import model_targets
        from duoserve.prune.pruned_models import install_activation_sparsity

        pcfg = self.prune_config(cfg, self.args.work / "unused")  # nothing is written
        seed_everything(pcfg.seed, self.device)  # as prune_model does
        method, refiner, _ = build_method(pcfg)
        model = copy.deepcopy(self.model)
        # thresholds on a separate draw, evaluated in threshold mode (prune_model, eval ppl)
        result = prune_loaded(model, self.tokenizer, pcfg, method, self.device, windows=self.windows,
                              threshold_windows=self.thr_windows, calibrate_thresholds=cfg["p_x"] > 0)
        linears = model_targets(model, DEFAULT_TARGETS).values()
        zeros = sum(int((m.weight == 0).sum()) for m in linears)
        total = sum(m.weight.numel() for m in linears)
        if cfg["p_x"] > 0:
            install_activation_sparsity(model, "threshold", targets=DEFAULT_TARGETS,
                                        thresholds=result.calibration.thresholds)
        ppl = self.perplexity(model)
        # None for methods that never see calibration inputs (magnitude): the engine measures no error
        errors = [e["reconstruction_error"] for e in result.layer_logs if e["reconstruction_error"] is not None]
        out = {"ppl": ppl, "weight_sparsity": zeros / total, "prune_seconds": round(result.prune_seconds, 1),
               "mean_layer_error": statistics.fmean(errors) if errors else None,
               "method_args": method.describe(), "refine_args": refiner.describe() if refiner else None}
        if refiner is not None:
            out["refine_totals"] = dict(refiner.totals)
        return out

    def check_cli(self, cfg: dict, work: Path) -> dict:
        """The same row through prune_model -> checkpoint -> load_any_model (the CLI path)."""
        from duoserve.prune.api import prune_model
        from duoserve.prune.pruned_models import load_any_model

        out = work / "ckpt-check"
        prune_model(self.prune_config(cfg, out))
        model, _, _ = load_any_model(str(out))
        return {"ppl_cli": self.perplexity(model)}


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "reports" / "symmetric-smollm2",
                   help="cache folder (results/*.json); the default is the committed cache of the report")
    p.add_argument("--model", default=None, help="HF folder or id (default: the built-in SmolLM2-135M)")
    p.add_argument("--calib-data", default="c4")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--threshold-nsamples", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default="wikitext2",
                   help="evaluation text: a source name (wikitext2: the hub, else $DUOSERVE_WIKITEXT2) or a file")
    p.add_argument("--eval-seqlen", type=int, default=2048)
    p.add_argument("--max-windows", type=int, default=40)
    p.add_argument("--eval-batch-size", type=int, default=1)
    p.add_argument("--device", default="auto")
    p.add_argument("--tiers", default="1,2,3,4,5", help="comma-separated tiers to run (default all)")
    p.add_argument("--only", default=None, help="run only the configurations whose key matches this regex")
    p.add_argument("--deadline", type=float, default=None, help="stop starting rows after this many seconds")
    p.add_argument("--check-cli", action="store_true", help="also run one row through prune_model + checkpoint")
    p.add_argument("--report-only", action="store_true", help="only render the markdown from the cache")
    p.add_argument("--markdown", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "reports" / "symmetric-smollm2" / "README.md")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("duoserve.prune.engine", "duoserve.prune.api", "duoserve.prune.thresholds"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    results = args.work / "results"
    results.mkdir(parents=True, exist_ok=True)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                if k in ("model", "calib_data", "nsamples", "seqlen", "threshold_nsamples", "seed", "data",
                         "eval_seqlen", "max_windows")}
    if not args.report_only:
        t_start = time.time()
        tiers = {int(t) for t in args.tiers.split(",")}
        todo = [c for c in grid() if c["tier"] in tiers and not (results / f"{c['key']}.json").exists()
                and (args.only is None or re.search(args.only, c["key"]))]
        log.info("%d configurations to run", len(todo))
        runner = Runner(args)
        settings.update(calib=runner.calib_desc, eval=runner.eval_desc, device=runner.device)
        if not (results / "dense.json").exists():
            write_json(results / "dense.json", {**runner.dense(), "settings": settings})
        for n, cfg in enumerate(todo):
            if args.deadline is not None and time.time() - t_start > args.deadline:
                log.info("deadline reached; %d configurations left for the next run", len(todo) - n)
                break
            t0 = time.time()
            result = {**cfg, **runner.run(cfg), "seconds": round(time.time() - t0, 1), "settings": settings}
            write_json(results / f"{cfg['key']}.json", result)
            log.info("[%d/%d] %s: ppl %.3f (%.0f s)", n + 1, len(todo), cfg["key"], result["ppl"], result["seconds"])
        if args.check_cli and not (results / "check_cli.json").exists():
            cfg = row("wanda", "0.5", 0)
            write_json(results / "check_cli.json", {**cfg, **runner.check_cli(cfg, args.work)})
    render(results, args.markdown)
    return 0


# ---------------------------------------------------------------------------------------------
def _load(results: Path) -> dict[str, dict]:
    return {f.stem: json.loads(f.read_text()) for f in results.glob("*.json")}


def _cell(res: dict, method: str, sp: str, opts=None, refine=None, p_x=0.0, ropts=None) -> str:
    if method == "stochria":  # mean +- sample std over the three sampling seeds
        runs = [res[k] for k in (row(method, sp, 0, {**(opts or {}), "sample_seed": s}, refine, p_x)["key"]
                                 for s in (0, 1, 2)) if k in res]
        if not runs:
            return "n/r"
        vals = [r["ppl"] for r in runs]
        # a dagger if any seed ran on another device than the dense reference
        mark = max((_other_device_mark(res, r) for r in runs), key=len)
        if len(vals) == 1:
            return f"{vals[0]:.2f} (n=1){mark}"
        spread = f"{statistics.fmean(vals):.2f} ± {statistics.stdev(vals):.2f}"
        return spread + ("" if len(vals) == 3 else f" (n={len(vals)})") + mark
    r = res.get(row(method, sp, 0, opts, refine, p_x, ropts)["key"])
    return f"{r['ppl']:.2f}{_other_device_mark(res, r)}" if r else "n/r"


def _other_device_mark(res: dict, r: dict) -> str:
    """A dagger on rows run on another device than the dense reference (see the table's note)."""
    dense_device = res.get("dense", {}).get("settings", {}).get("device")
    return " †" if dense_device and r.get("settings", {}).get("device") != dense_device else ""


MAIN_ROWS = [("Magnitude", "magnitude", None), ("Wanda", "wanda", None), ("RIA (alpha 0.5)", "ria", None),
             ("stochRIA (beta 0.1, 3 seeds)", "stochria", None), ("OWanda", "owanda", None),
             ("SymWanda sum (Lemma 3.1)", "symwanda", {"variant": "sum"}),
             ("SymWanda squared (App. B)", "symwanda", {"variant": "squared"}),
             ("SymWanda weight (Cor. 3.4)", "symwanda", {"variant": "weight"}),
             ("SymWanda relative (Lemma 3.7)", "symwanda", {"variant": "relative"})]


def tables(res: dict) -> str:
    dense = res.get("dense", {})
    st = dense.get("settings", {})
    out = [f"Settings: model `{st.get('model') or 'built-in SmolLM2-135M-Instruct'}`; calibration {st.get('calib', '?')};"
           f" evaluation {re.sub(r'[^ (]*/', '', st.get('eval', '?'))} at seqlen {st.get('eval_seqlen')}, first {st.get('max_windows')} "
           f"windows, fp32; device {st.get('device')}.",
           "", f"Dense: **{dense['ppl']:.2f}**" if dense else "Dense: n/r", "",
           "WikiText-2 perplexity (lower is better); n/r = not run; † = run on "
           "another device than the dense reference (same settings and code; each row's device is in its "
           "results/*.json).", ""]
    head = "| method | " + " | ".join(f"{sp} {name}" for sp in SPARSITIES for name in ("base", "+DSnoT", "+R²-DSnoT"))
    out += [head + " |", "|---" * (1 + 3 * len(SPARSITIES)) + "|"]
    for label, method, opts in MAIN_ROWS:
        cells = [_cell(res, method, sp, opts, r) for sp in SPARSITIES for r in REFINES]
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    out += ["", "DuoGPT at W50% + X50% (activation sparsity by calibrated thresholds at evaluation):", "",
            "| method | base | +DSnoT | +R²-DSnoT |", "|---|---|---|---|",
            "| DuoGPT (residual on the dense weights, scale 0.5: the default when it ran) | "
            + " | ".join(_cell(res, "duogpt", "0.5", None, r, 0.5) for r in REFINES) + " |",
            "| the same, refiner aiming at the full dense stream (--refine-residual-scale 1) | n/a | "
            + " | ".join(_cell(res, "duogpt", "0.5", None, r, 0.5, FULL_RESIDUAL) for r in REFINES[1:]) + " |",
            "| the same, refiner with update threshold 0 (--refine-update-threshold 0) | n/a | "
            + " | ".join(_cell(res, "duogpt", "0.5", None, r, 0.5, {"update_threshold": 0.0}) for r in REFINES[1:])
            + " |",
            "| DuoGPT, Algorithm 1 as printed (residual_target running, scale 1) | "
            + " | ".join(_cell(res, "duogpt", "0.5", DUOGPT_AS_PRINTED, r, 0.5) for r in REFINES) + " |", ""]
    out += ["Ablations at 50% unstructured (no refinement):", "", "| variant | PPL |", "|---|---|"]
    abl = [("Wanda (RIA's alpha = 1, no relative term, per row)", "wanda", None),
           ("RIA alpha = 0 (RI only)", "ria", {"alpha": 0.0}), ("RIA alpha = 0.5", "ria", None),
           ("RIA alpha = 1", "ria", {"alpha": 1.0}), ("RIA alpha = 2", "ria", {"alpha": 2.0}),
           ("Col-Sum (alpha 0.5)", "ria", {"relative": "col"}), ("Row-Sum (alpha 0.5)", "ria", {"relative": "row"})]
    abl += [(f"l_p S1, p = {p}", "lpnorm", {"norm_p": float(p)}) for p in (2, 3, 4)]
    abl += [("l_p S1, p = inf", "lpnorm", {"norm_p": math.inf})]
    abl += [(f"l_p {s.upper()}, p = 1", "lpnorm", {"strategy": s}) for s in ("s2", "s3", "s4")]
    out += [f"| {label} | {_cell(res, m, '0.5', o)} |" for label, m, o in abl]
    out += ["", "Mask scope: RIA (alpha 0.5) selecting over the whole layer (its default, as RIA's code) or per "
            "output row (`--mask-scope row`, as Wanda does):", "", "| method | 0.5 | 0.6 |", "|---|---|---|"]
    out += [f"| {label} | " + " | ".join(_cell(res, m, sp, o) for sp in ("0.5", "0.6")) + " |"
            for label, m, o in (("Wanda (per row)", "wanda", None), ("RIA, layer-wide", "ria", None),
                                ("RIA, per row", "ria", {"mask_scope": "row"}))]
    out += ["", "R²-DSnoT at 60% with the update threshold 0 instead of 0.1 (every row refines up to 50 swaps):", "",
            "| base | threshold 0.1 | threshold 0 |", "|---|---|---|"]
    out += [f"| {m} | {_cell(res, m, '0.6', None, 'r2dsnot')} | "
            f"{_cell(res, m, '0.6', None, 'r2dsnot', 0.0, {'update_threshold': 0.0})} |" for m in ("wanda", "ria")]
    out += ["", "Refiner activity over all 210 linears: rows whose |E[eps]| started above the threshold, swaps "
            "accepted, swaps DSnoT's rule proposed but the guard rejected, and the mean over layers of the "
            "engine's relative reconstruction error (2 calibration batches) without and with refinement:", "",
            "| run | active rows | swaps | rejected by guard | layer error base -> refined | PPL base -> refined |",
            "|---|---|---|---|---|---|"]
    for key in sorted(res):
        r = res[key]
        t = r.get("refine_totals")
        if not t:
            continue
        base = res.get(row(r["method"], r["sparsity"], 0, r["opts"], None, r["p_x"])["key"], {})
        def fmt(e):
            return "n/a" if e is None else f"{e:.4f}"
        err = f"{fmt(base['mean_layer_error']) if base else 'n/r'} -> {fmt(r['mean_layer_error'])}"
        ppl = f"{base['ppl']:.2f} -> {r['ppl']:.2f}" if base else f"n/r -> {r['ppl']:.2f}"
        out.append(f"| {key} | {t['active_rows']}/{t['rows']} | {t['swaps']} | {t['rejected_by_guard']} | {err} | {ppl} |")
    if "check_cli" in res:
        c = res["check_cli"]
        same = res.get(c["key"], {}).get("ppl")
        out += ["", f"CLI-path check ({c['key']} through prune_model + checkpoint + load): PPL {c['ppl_cli']:.4f}"
                f" vs in-process {same:.4f}" if same else ""]
    keys = [r["key"] for r in grid()]
    missing = [k for k in keys if k not in res]
    if missing:  # computed, so the count in the docs cannot go stale
        out += ["", f"<details><summary>Rows of the grid not run yet: {len(missing)} of {len(keys)}</summary>", "",
                ", ".join(f"`{k}`" for k in missing), "", "</details>"]
    return "\n".join(out) + "\n"


def render(results: Path, markdown: Path) -> None:
    text = tables(_load(results))
    doc = markdown.read_text() if markdown.exists() else f"# Symmetric pruning\n\n{START}\n{END}\n"
    if START not in doc or END not in doc:
        doc += f"\n{START}\n{END}\n"
    head, rest = doc.split(START, 1)
    markdown.write_text(head + START + "\n" + text + END + rest.split(END, 1)[1])
    log.info("wrote %s", markdown)


if __name__ == "__main__":
    raise SystemExit(main())
