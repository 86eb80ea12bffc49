"""lm-eval's output -> per-task rows, the 5-task and 7-task averages, a text table and markdown.

Averages: `avg_acc` is the mean of `acc` over the tasks (lm-eval's plain accuracy; every task has
it). `avg_acc_norm` is the mean of `acc_norm` where the task has it (PIQA, HellaSwag, ARC-e/c,
OBQA) and `acc` where it does not (WinoGrande, BoolQ): the DuoGPT tables' dense LLaMA-3-8B
HellaSwag (79.1) and ARC-c (53.3) are acc_norm values, so that column is the one to hold against
the papers. An average is reported only when every task it covers was evaluated.
"""
from __future__ import annotations

import math
from typing import Any

from duoserve.evaluation.zeroshot.tasks import FIVE_TASKS, SEVEN_TASKS, TASKS

AVERAGES = {"avg5": FIVE_TASKS, "avg7": SEVEN_TASKS}


def _metric(task_results: dict[str, Any], name: str) -> float | None:
    # lm-eval keys metrics as "<metric>,<filter>"; zero-shot multiple choice uses the "none" filter.
    value = task_results.get(f"{name},none", task_results.get(name))
    return float(value) if isinstance(value, (int, float)) else None


def summarize(lm_eval_output: dict[str, Any], provenance: dict[str, dict[str, Any]],
              setup: dict[str, Any]) -> dict[str, Any]:
    """A JSON-ready summary: setup, per-task metrics with item counts, averages."""
    results = lm_eval_output["results"]
    n_samples = lm_eval_output.get("n-samples", {})
    tasks: dict[str, dict[str, Any]] = {}
    for name, info in provenance.items():
        r = results[name]
        row = {
            "acc": _metric(r, "acc"),
            "acc_stderr": _metric(r, "acc_stderr"),
            "acc_norm": _metric(r, "acc_norm") if TASKS[name].has_acc_norm else None,
            "acc_norm_stderr": _metric(r, "acc_norm_stderr") if TASKS[name].has_acc_norm else None,
            "n": int(n_samples.get(name, {}).get("effective", r.get("sample_len", 0))),
            "n_available": int(n_samples.get(name, {}).get("original", info["n_available"])),
        }
        row.update({k: info[k] for k in ("source", "split", "standard_split", "standard_n")})
        tasks[name] = row
    return {"setup": setup, "tasks": tasks, "averages": averages(tasks),
            "lm_eval_version": lm_eval_output.get("lm_eval_version") or _lm_eval_version()}


def _lm_eval_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("lm_eval")
    except Exception:  # noqa: BLE001 - a missing version only leaves a field empty
        return None


def averages(tasks: dict[str, dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """{'avg5': {'acc': .., 'acc_norm': ..}, 'avg7': {...}}; None where a covered task is missing."""
    out = {}
    for key, names in AVERAGES.items():
        if not all(n in tasks and tasks[n]["acc"] is not None for n in names):
            out[key] = {"acc": None, "acc_norm": None}
            continue
        acc = [tasks[n]["acc"] for n in names]
        norm = [tasks[n]["acc_norm"] if tasks[n]["acc_norm"] is not None else tasks[n]["acc"] for n in names]
        out[key] = {"acc": sum(acc) / len(acc), "acc_norm": sum(norm) / len(norm)}
    return out


def check_finite(summary: dict[str, Any]) -> list[str]:
    """Names of metrics that are NaN or infinite (a broken model or endpoint); empty when all fine."""
    bad = []
    for name, row in summary["tasks"].items():
        for k in ("acc", "acc_norm"):
            if row[k] is not None and not math.isfinite(row[k]):
                bad.append(f"{name}.{k}")
    return bad


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def format_table(summary: dict[str, Any]) -> str:
    """A plain-text table: one row per task (acc, stderr, acc_norm, stderr, n, split), then averages."""
    lines = [f"{'task':<14} {'acc':>7} {'±':>6} {'acc_norm':>8} {'±':>6} {'n':>6} {'of':>6}  split (source)"]
    for name, r in summary["tasks"].items():
        lines.append(f"{name:<14} {_pct(r['acc']):>7} {_pct(r['acc_stderr']):>6} {_pct(r['acc_norm']):>8} "
                     f"{_pct(r['acc_norm_stderr']):>6} {r['n']:>6} {r['n_available']:>6}  {r['split']} ({r['source']})")
    for key, names in AVERAGES.items():
        avg = summary["averages"][key]
        lines.append(f"{key + ' (' + str(len(names)) + ')':<14} {_pct(avg['acc']):>7} {'':>6} "
                     f"{_pct(avg['acc_norm']):>8}   (acc_norm column: acc_norm where the task has it, else acc)")
    return "\n".join(lines)


def markdown_rows(label: str, summary: dict[str, Any], metric: str = "acc") -> str:
    """One markdown table row: label, the seven tasks' `metric` (acc_norm falls back to acc), averages."""
    cells = [label]
    for name in SEVEN_TASKS:
        r = summary["tasks"].get(name)
        if r is None:
            cells.append("-")
        else:
            v = r[metric] if r.get(metric) is not None else r["acc"]
            cells.append(_pct(v))
    cells += [_pct(summary["averages"]["avg5"][metric]), _pct(summary["averages"]["avg7"][metric])]
    return "| " + " | ".join(cells) + " |"


def markdown_header() -> str:
    heads = ["configuration"] + [TASKS[n].label for n in SEVEN_TASKS] + ["Avg-5", "Avg-7"]
    return "| " + " | ".join(heads) + " |\n|" + "---|" * len(heads)


def compare_loglikelihoods(a: dict[str, Any], b: dict[str, Any]) -> dict[str, dict[str, float | int]]:
    """Item-by-item agreement of two summaries saved with per-item log-likelihoods (same items).

    Per task: items and requests compared, mean and max |LL_a - LL_b| (nats per request), and the
    fraction of items whose predicted choice (argmax of raw LL, lm-eval's `acc` rule) is the same.
    """
    out = {}
    for name, items_a in a.get("loglikelihoods", {}).items():
        items_b = b.get("loglikelihoods", {}).get(name)
        if not items_b:
            continue
        common = [k for k in items_a if k in items_b and len(items_a[k]) == len(items_b[k])]
        if not common:
            continue
        diffs = [abs(x - y) for k in common for x, y in zip(items_a[k], items_b[k])]
        same = sum(max(range(len(items_a[k])), key=items_a[k].__getitem__)
                   == max(range(len(items_b[k])), key=items_b[k].__getitem__) for k in common)
        out[name] = {"items": len(common), "requests": len(diffs), "mean_abs_diff": sum(diffs) / len(diffs),
                     "max_abs_diff": max(diffs), "same_prediction": same / len(common)}
    return out


def paired_accuracy_difference(a: dict[str, Any], b: dict[str, Any],
                               agreement: dict[str, dict[str, float | int]]) -> dict[str, dict[str, float]]:
    """acc(b) - acc(a) per task and for Avg-5 / Avg-7, with an upper bound on its paired standard error.

    Both runs scored the same items, so their accuracies are not independent: the difference of
    means of the per-item correctness d_i = c_b,i - c_a,i has standard error sqrt(Var(d) / n), and
    since |d_i| <= 1 only where the two predicted choices differ, Var(d) <= E[d^2] <= (1 - same).
    The bound sqrt((1 - same_prediction) / n) needs no gold labels (the saved log-likelihoods do not
    carry them); for an average over k tasks it is sqrt(sum of the tasks' squared bounds) / k.
    Differences within about two such bounds are within sampling noise of the items. `acc` only:
    acc_norm ranks by length-normalized LL, which the same-prediction count does not cover.
    """
    out: dict[str, dict[str, float]] = {}
    for name, r in agreement.items():
        acc_a, acc_b = a["tasks"].get(name, {}).get("acc"), b["tasks"].get(name, {}).get("acc")
        if acc_a is None or acc_b is None:
            continue
        out[name] = {"acc_diff": acc_b - acc_a, "paired_se_max": math.sqrt((1 - r["same_prediction"]) / r["items"])}
    for key, names in AVERAGES.items():
        if not all(n in out for n in names):
            continue
        diff = sum(out[n]["acc_diff"] for n in names) / len(names)
        bound = math.sqrt(sum(out[n]["paired_se_max"] ** 2 for n in names)) / len(names)
        out[key] = {"acc_diff": diff, "paired_se_max": bound}
    return out
