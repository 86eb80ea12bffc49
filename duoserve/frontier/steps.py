"""The frontier's steps: prune, perplexity, zero-shot, serve (speed + answers) or in-process answers.

Each step is a public `duoserve` command in a subprocess (the speed step: `duoserve serve`, driven
through duoserve.loadtest) whose result lands as one JSON file in the work folder
(duoserve.workcache): `prune-KEY.json`, `ppl-KEY.json`, ... A rerun reuses every finished result,
and a prune that was interrupted continues from its `.partial` folder with `duoserve prune --resume`.
"""
from __future__ import annotations

import json
import logging
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from duoserve.frontier.plan import Checkpoint, Grid, Point, model_key
from duoserve.workcache import DUOSERVE, NotCached, cached, prune_flags, read_json, run_logged, slug

log = logging.getLogger(__name__)


@dataclass
class Step:
    kind: str  # prune | ppl | zeroshot | speed | answers
    subject: Checkpoint | Point
    result: Path  # the cached JSON
    command: list[str]  # shown by --dry-run (speed: the serve command, load comes from loadtest)
    compute: Callable[[], dict]
    # Evaluated when the step is due and not cached: a reason not to run it, or None (--speed-for).
    skip: Callable[[], str | None] | None = None

    @property
    def label(self) -> str:
        return f"{self.kind:8s} {self.subject.label}"


class Runner:
    def __init__(self, args, grid: Grid, speed):
        self.args, self.grid, self.speed_settings = args, grid, speed
        self.work: Path = args.work
        self.not_run: list[str] = []
        self._results: dict[tuple[str, object], dict] = {}

    # -- names ---------------------------------------------------------------------------------
    def ckpt_key(self, c: Checkpoint) -> str:
        return c.key(self.args.model, self.args.nsamples, self.args.seqlen)

    def ckpt_path(self, c: Checkpoint) -> Path:
        return self.work / f"ckpt-{self.ckpt_key(c)}"

    def point_key(self, p: Point) -> str:
        base = f"dense-{model_key(self.args.model)}" if p.dense else f"{self.ckpt_key(p.checkpoint)}-px{p.p_x:g}"
        return base

    def target(self, p: Point) -> list[str]:
        """The positional MODEL of `duoserve eval` for a point, and its activation-sparsity flag."""
        if p.dense:
            return [self.args.model] if self.args.model else []
        return [str(self.ckpt_path(p.checkpoint)), "--activation-sparsity", f"{p.p_x:g}"]

    # -- the steps -----------------------------------------------------------------------------
    def steps(self) -> list[Step]:
        a, points = self.args, self.grid.points()
        steps = [self._prune(c) for c in self.grid.checkpoints]
        steps += [self._ppl(p) for p in points]
        if a.zeroshot_tasks:
            steps += [self._zeroshot(p) for p in points]
        if a.no_speed or a.speed_for == "candidates":
            steps += [self._answers(p) for p in points]
        if not a.no_speed:
            steps += [self._speed(p) for p in points]
        return steps

    def over_ppl_bound(self, p: Point) -> str | None:
        """'PPL x > bound' when p's perplexity is known and over the rule's bound, else None."""
        dense_ppl = (self._results.get(("ppl", Point(None))) or {}).get("ppl")
        ppl = (self._results.get(("ppl", p)) or {}).get("ppl")
        if p.dense or not dense_ppl or ppl is None or ppl <= self.args.max_ppl_ratio * dense_ppl:
            return None
        return f"PPL {ppl:.2f} > {self.args.max_ppl_ratio:g} x dense {dense_ppl:.2f}"

    def not_a_candidate(self, p: Point) -> str | None:
        """Why the rule cannot choose p on what is measured in-process (its perplexity against dense's,
        its in-process answers), or None when it can (--speed-for candidates serves only those)."""
        from duoserve.frontier.rule import judge

        if p.dense:
            return None
        if self.over_ppl_bound(p):
            return self.over_ppl_bound(p)
        dense_ppl = (self._results.get(("ppl", Point(None))) or {}).get("ppl")
        if not dense_ppl:
            return "no dense perplexity to compare with"
        row = {"ppl": (self._results.get(("ppl", p)) or {}).get("ppl"),
               "answers": (self._results.get(("answers", p)) or {}).get("answers")}
        v = judge(row, dense_ppl, self.args.max_ppl_ratio)
        return None if v.ok else "; ".join(v.reasons)

    def _prune(self, c: Checkpoint) -> Step:
        a, key, ckpt = self.args, self.ckpt_key(c), self.ckpt_path(c)
        summary = self.work / "logs" / f"prune-{key}.summary.json"
        cmd = [*DUOSERVE, "prune", *([a.model] if a.model else []), "--method", c.method,
               "--sparsity", f"{c.weight_sparsity:g}", "--activation-sparsity", f"{c.pruned_px:g}",
               "--nsamples", str(a.nsamples), "--seqlen", str(a.seqlen), "-o", str(ckpt), "--json", str(summary)]

        def compute():
            done = read_json(summary)
            if done is not None and (ckpt / "config.json").is_file():  # finished, but its result was not stored
                return {**done, "reused": True}
            seconds = run_logged(cmd + prune_flags(ckpt, summary), self.work / "logs" / f"prune-{key}.log")
            return {**json.loads(summary.read_text()), "wall_seconds": round(seconds, 1)}

        return Step("prune", c, self.work / f"prune-{key}.json", cmd, compute)

    def _ppl(self, p: Point) -> Step:
        a = self.args
        key = f"{self.point_key(p)}-{slug(Path(a.data).name)}-s{a.eval_seqlen}-w{a.max_windows or 'all'}-{a.eval_dtype}"
        out = self.work / "logs" / f"ppl-{key}.eval.json"
        cmd = [*DUOSERVE, "eval", "ppl", *self.target(p), "--data", a.data, "--seqlen", str(a.eval_seqlen),
               "--no-dense", "--dtype", a.eval_dtype, "--json", str(out)]
        if a.max_windows:
            cmd += ["--max-windows", str(a.max_windows)]

        def compute():
            seconds = run_logged(cmd, self.work / "logs" / f"ppl-{key}.log")
            data = json.loads(out.read_text())
            r = data.get("pruned") or data["model"]
            return {"ppl": r["ppl"], "windows": data["windows"], "seqlen": data["seqlen"], "data": data["data"],
                    "dtype": data["dtype"], "seconds": round(seconds, 1),
                    "realized_px": (r.get("activation_sparsity_realized") or {}).get("mean")}

        return Step("ppl", p, self.work / f"ppl-{key}.json", cmd, compute)

    def _zeroshot(self, p: Point) -> Step:
        a = self.args
        tasks = ",".join(t.strip() for t in a.zeroshot_tasks.split(",") if t.strip())
        key = f"{self.point_key(p)}-{slug(tasks)}-l{a.zeroshot_limit}"
        out = self.work / "logs" / f"zeroshot-{key}.eval.json"
        cmd = [*DUOSERVE, "eval", "zeroshot", *self.target(p), "--tasks", tasks, "--limit", str(a.zeroshot_limit),
               "--json", str(out)]

        def compute():
            seconds = run_logged(cmd, self.work / "logs" / f"zeroshot-{key}.log")
            data = json.loads(out.read_text())
            accs = {name: row["acc"] for name, row in data["tasks"].items()}
            valid = [v for v in accs.values() if v is not None]
            return {"tasks": accs, "mean_acc": sum(valid) / len(valid) if valid else None, "limit": a.zeroshot_limit,
                    "n": {name: row["n"] for name, row in data["tasks"].items()}, "seconds": round(seconds, 1)}

        return Step("zeroshot", p, self.work / f"zeroshot-{key}.json", cmd, compute)

    def _answers(self, p: Point) -> Step:
        a = self.args
        key = f"{self.point_key(p)}-a{a.answer_tokens}-{a.eval_dtype}"
        out = self.work / "logs" / f"answers-{key}.out.json"
        cmd = [sys.executable, "-m", "duoserve.frontier.answers", *self.target(p), "--max-tokens",
               str(a.answer_tokens), "--dtype", a.eval_dtype, "--json", str(out)]

        def compute():
            seconds = run_logged(cmd, self.work / "logs" / f"answers-{key}.log")
            return {**json.loads(out.read_text()), "answers_from": f"in-process ({a.eval_dtype}, greedy)",
                    "seconds": round(seconds, 1)}

        # --speed-for candidates: the in-process answers only decide which points to serve, and a point over
        # the PPL bound is out whatever it answers (a --no-speed run answers for every point).
        skip = ((lambda: self.over_ppl_bound(p)) if not a.no_speed and getattr(a, "speed_for", "all") == "candidates"
                else None)
        return Step("answers", p, self.work / f"answers-{key}.json", cmd, compute, skip)

    def _speed(self, p: Point) -> Step:
        key = f"{self.point_key(p)}-{self.speed_settings.key()}"
        px = None if p.dense else p.p_x
        shown = [*DUOSERVE, "serve", "DENSE_FOLDER" if p.dense else str(self.ckpt_path(p.checkpoint)),
                 *([] if px is None else ["--activation-sparsity", f"{px:g}"])]

        def compute():
            from duoserve.frontier.speed import measure

            folder = self.dense_folder() if p.dense else self.ckpt_path(p.checkpoint)
            return measure(folder, "dense" if p.dense else "sparse", px, self.speed_settings,
                           self.work / "logs" / f"speed-{key}")

        skip = ((lambda: self.not_a_candidate(p)) if getattr(self.args, "speed_for", "all") == "candidates"
                else None)
        return Step("speed", p, self.work / f"speed-{key}.json", shown, compute, skip)

    def dense_folder(self) -> Path:
        """The dense model as a folder `duoserve serve` can start: MODEL if it is one, else the source
        folder a pruned checkpoint records (the built-in model's converted copy), else the quickstart's
        lookup (a hub id's local snapshot)."""
        if self.args.model and (Path(self.args.model) / "config.json").is_file():
            return Path(self.args.model)
        for c in self.grid.checkpoints:
            try:
                producer = json.loads((self.ckpt_path(c) / "config.json").read_text())["quantization_config"]["producer"]
            except (OSError, ValueError, KeyError):
                continue
            source = producer.get("source_model")
            if source and (Path(source) / "config.json").is_file():
                return Path(source)
        from duoserve.errors import InputError
        from duoserve.quickstart import _dense_folder

        folder, why = _dense_folder(self.args.model)
        if folder is None:
            raise InputError(f"cannot serve the dense model: {why}")
        return folder

    # -- running -------------------------------------------------------------------------------
    def status(self, step: Step) -> str:
        if read_json(step.result) is not None:
            return "cached"
        if step.kind == "prune":
            ckpt = self.ckpt_path(step.subject)
            if ckpt.with_name(ckpt.name + ".partial").exists() and not ckpt.exists():
                return "resume"
        return "to run"

    def describe(self, steps: list[Step]) -> str:
        counts: dict[str, int] = {}
        lines = [f"duoserve frontier: {len(steps)} steps in {self.work} "
                 f"({len(self.grid.checkpoints)} checkpoints, {len(self.grid.points())} points incl. dense)"]
        for i, s in enumerate(steps, 1):
            st = self.status(s)
            counts[st] = counts.get(st, 0) + 1
            lines.append(f"[{i:>3}/{len(steps)}] {st:7s} {s.label}")
            if st != "cached":
                extra = prune_flags(self.ckpt_path(s.subject), Path()) if s.kind == "prune" else []
                lines.append("          $ " + " ".join(s.command + extra)
                             + ("" if not s.skip or s.subject.dense else "   (only if it passes the rule in-process)"
                                if s.kind == "speed" else "   (only if its PPL is within the bound)"))
        lines.append("; ".join(f"{n} {k}" for k, n in counts.items()))
        return "\n".join(lines)

    def execute(self, steps: list[Step]) -> list[str]:
        """Run (or read) every step; returns the failures. A failed step does not stop the others
        (one server that fails to start leaves the rest of a long run measured), except the points of
        a checkpoint whose prune failed, which are skipped."""
        import time

        from duoserve.errors import DuoserveError

        failed: list[str] = []
        broken: set[Checkpoint] = set()
        for i, s in enumerate(steps, 1):
            st = self.status(s)
            ckpt = s.subject if s.kind == "prune" else s.subject.checkpoint
            if ckpt in broken:
                self.not_run.append(f"{s.label.strip()} (its prune failed)")
                continue
            if st != "cached" and self.args.cached_only:
                self.not_run.append(s.label.strip())
                continue
            why = s.skip() if st != "cached" and s.skip is not None else None
            if why:
                done = "not served" if s.kind == "speed" else "not run"
                print(f"[{i:>3}/{len(steps)}] {s.label}: {done}: the rule cannot choose it ({why})", flush=True)
                self.not_run.append(f"{s.label.strip()} ({done}, --speed-for candidates: {why})")
                continue
            print(f"[{i:>3}/{len(steps)}] {s.label}: {'cached' if st == 'cached' else st + ' ...'}", flush=True)
            t0 = time.time()
            try:
                result = cached(s.result, s.compute, self.args.cached_only)
            except NotCached:
                self.not_run.append(s.label.strip())
                continue
            except DuoserveError as e:
                print(f"[{i:>3}/{len(steps)}] {s.label}: FAILED: {e}", file=sys.stderr, flush=True)
                failed.append(f"{s.label.strip()}: {str(e).splitlines()[0]}")
                self.not_run.append(f"{s.label.strip()} (failed)")
                if s.kind == "prune":
                    broken.add(s.subject)
                continue
            self._results[(s.kind, s.subject)] = result
            if st != "cached":
                print(f"[{i:>3}/{len(steps)}] {s.label}: done in {time.time() - t0:.0f} s{summary_of(s.kind, result)}",
                      flush=True)
        return failed

    def rows(self):
        """One row per point (dense first) with what was measured, and the rule's choice."""
        from duoserve.frontier.rule import choose_operating_point, judge

        rows = []
        for p in self.grid.points():
            r = {"point": p.label, "dense": p.dense, "method": "dense" if p.dense else p.checkpoint.method,
                 "weight_sparsity": 0.0 if p.dense else p.checkpoint.weight_sparsity,
                 "pruned_px": None if p.dense else p.checkpoint.pruned_px, "p_x": p.p_x}
            if not p.dense:
                r["checkpoint"] = str(self.ckpt_path(p.checkpoint))
                pr = self._results.get(("prune", p.checkpoint))
                if pr:
                    r["realized_weight_sparsity"] = pr.get("sparsity")
                    r["prune_seconds"] = pr.get("prune_seconds")
            ppl = self._results.get(("ppl", p))
            if ppl:
                r.update(ppl=ppl["ppl"], ppl_windows=ppl["windows"], ppl_data=ppl["data"],
                         ppl_seqlen=ppl["seqlen"], realized_px=ppl.get("realized_px"))
            zs = self._results.get(("zeroshot", p))
            if zs:
                r.update(zeroshot_acc=zs["mean_acc"], zeroshot_tasks=zs["tasks"], zeroshot_limit=zs["limit"])
            an = self._results.get(("answers", p))
            if an:
                r.update(answers=an["answers"], answers_from=an["answers_from"])
            sp = self._results.get(("speed", p))
            if sp:  # a served point is judged on what the endpoint answered (--speed-for candidates: both kept)
                if an:
                    r["answers_in_process"] = an["answers"]
                r.update(tpot_s=sp["tpot_s"], ttft_s=sp["ttft_s"], throughput=sp["throughput"],
                         throughput_users=sp["throughput_users"], answers=sp["answers"],
                         answers_from=sp["answers_from"], host=sp["host"], measured_at=sp["measured_at"],
                         load=[x for lv in sp.get("levels", {}).values()
                               for x in (lv.get("load_before"), lv.get("load_after")) if x is not None])
            rows.append(r)
        dense = rows[0]
        choice = None
        if dense.get("ppl"):
            sparse = rows[1:]
            for r in sparse:
                v = judge(r, dense["ppl"], self.args.max_ppl_ratio)
                r["still_answers"], r["rule_reasons"] = v.ok, list(v.reasons)
            c = choose_operating_point(sparse, dense["ppl"], self.args.max_ppl_ratio)
            choice = {"index": None if c.index is None else c.index + 1, "reason": c.reason,
                      "point": None if c.index is None else sparse[c.index]["point"]}
            if c.index is not None:
                chosen = sparse[c.index]
                chosen["chosen"] = True
                choice["serve_command"] = f"duoserve serve {chosen['checkpoint']} --activation-sparsity {chosen['p_x']:g}"
        mark_pareto(rows)
        return rows, choice


def mark_pareto(rows: list[dict]) -> None:
    """row['pareto'] = True for rows no other row beats on both PPL (lower) and batch-1 TPOT (lower);
    without TPOTs, on PPL and (1 - p_w)(1 - p_x)."""
    def speed(r):
        if r.get("tpot_s") is not None:
            return r["tpot_s"]
        return None if any(x.get("tpot_s") for x in rows) else (1 - r["weight_sparsity"]) * (1 - r["p_x"])

    pts = [(i, r["ppl"], speed(r)) for i, r in enumerate(rows)
           if r.get("ppl") is not None and math.isfinite(r["ppl"]) and speed(r) is not None]
    for i, q, s in pts:
        rows[i]["pareto"] = not any((q2 <= q and s2 <= s) and (q2 < q or s2 < s) for _, q2, s2 in pts)


def summary_of(kind: str, r: dict) -> str:
    if kind == "ppl":
        return f": PPL {r['ppl']:.2f} ({r['windows']} windows)"
    if kind == "speed" and r.get("tpot_s"):
        return f": TPOT {r['tpot_s'] * 1000:.1f} ms, {r['throughput']:.1f} tok/s at {r['throughput_users']} users"
    if kind == "zeroshot" and r.get("mean_acc") is not None:
        return f": mean acc {r['mean_acc']:.3f}"
    return ""
