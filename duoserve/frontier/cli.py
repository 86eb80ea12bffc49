"""`duoserve frontier [MODEL]`: the quality/speed frontier of dual-sparse checkpoints, measured.

    duoserve frontier --methods duogpt,sparsegpt --sparsities 0.4,0.5,0.6 --serve-px 0,0.3,0.5 --work out/fr
    duoserve frontier --work out/fr --dry-run          # what would run, what is cached
    duoserve frontier --work out/fr --no-speed         # quality and in-process answers only (no vLLM)
    duoserve frontier --work out/fr --speed-for candidates  # serve only the points the rule can choose

Prunes each (method, weight sparsity, p_x pruned for) once with `duoserve prune`, evaluates each
checkpoint at every serve-time p_x (its stored threshold grid: no re-pruning) and the dense model
with `duoserve eval ppl` (and `duoserve eval zeroshot`), serves each point with `duoserve serve` for
batch-1 TPOT and N-user throughput, applies the operating-point rule (duoserve.frontier.rule) and
writes a markdown table, a Pareto plot and a JSON summary. Every step runs as a subprocess and
leaves a JSON result in --work that a rerun reuses; an interrupted prune resumes (`--resume`).
"""
from __future__ import annotations

import argparse
import logging
import shlex
import sys
import time
from pathlib import Path

from duoserve.frontier.rule import MAX_PPL_RATIO

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None,
                   help="model to prune: HF id, local folder, or a packaged model (default: the built-in "
                        "SmolLM2-135M-Instruct)")
    g = p.add_argument_group("grid")
    g.add_argument("--methods", default="duogpt,sparsegpt", help="pruning methods, comma-separated (default "
                   "duogpt,sparsegpt; `duoserve prune --help` lists them)")
    g.add_argument("--sparsities", default="0.4,0.5,0.6", help="weight sparsities in [0, 1), comma-separated "
                   "(default 0.4,0.5,0.6)")
    g.add_argument("--prune-px", default="same", metavar="P_X,...",
                   help="activation sparsities to prune (calibrate) each checkpoint for: 'same' = its weight "
                        "sparsity (default), or a list such as 0.3,0.5 (every sparsity x every value)")
    g.add_argument("--also-prune", default=None, metavar="P_W:P_X,...",
                   help="extra checkpoints beside the grid, for every method: weight sparsity P_W pruned for "
                        "activation sparsity P_X (e.g. 0.5:0.3 next to --prune-px same's W0.5 pruned for 0.5: "
                        "pruned-for against served-at without pruning every W twice)")
    g.add_argument("--serve-px", default="0,0.3,0.5", metavar="P_X,...",
                   help="activation sparsities to evaluate and serve each checkpoint at, from its stored "
                        "threshold grid (default 0,0.3,0.5; at most 0.9)")
    g.add_argument("--nsamples", type=int, default=128, help="calibration windows (default 128, prune's)")
    g.add_argument("--seqlen", type=int, default=2048, help="calibration window length (default 2048, prune's)")
    g = p.add_argument_group("quality")
    g.add_argument("--data", default="wikitext2", help="perplexity text, as `duoserve eval ppl --data` "
                   "(default wikitext2)")
    g.add_argument("--eval-seqlen", type=int, default=2048, help="perplexity window length (default 2048)")
    g.add_argument("--max-windows", type=int, default=None, help="evaluate the first N windows only (default: all)")
    g.add_argument("--eval-dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"],
                   help="evaluation dtype (default bfloat16: what vLLM serves)")
    g.add_argument("--zeroshot-tasks", default=None, metavar="TASKS",
                   help="also zero-shot accuracy on these tasks (e.g. piqa,arc_easy; default: none)")
    g.add_argument("--zeroshot-limit", type=int, default=200, help="items per zero-shot task (default 200)")
    g = p.add_argument_group("speed (each point served by `duoserve serve`, one at a time)")
    g.add_argument("--no-speed", action="store_true",
                   help="skip serving: no TPOT/throughput; the rule's answers come in-process and it ranks by "
                        "(1 - p_w)(1 - p_x) instead of TPOT")
    g.add_argument("--speed-for", choices=["all", "candidates"], default="all",
                   help="which points to serve: all (default), or candidates: the dense model and the points "
                        "that pass the rule in-process (PPL bound and in-process answers, computed for every "
                        "point first), the only ones the rule can choose; a vLLM start costs a minute or two, so "
                        "this cuts a large grid's speed phase to what decides the operating point")
    g.add_argument("--throughput-users", type=int, default=4, help="concurrent users of the throughput level "
                   "(default 4)")
    g.add_argument("--duration", type=float, default=30.0, help="seconds per load level (default 30)")
    g.add_argument("--max-tokens", type=int, default=64, help="output tokens per load request (default 64)")
    g.add_argument("--prompt-words", type=int, default=64, help="prompt words per load request (default 64)")
    g.add_argument("--max-model-len", type=int, default=1024, help="context length of the servers")
    g.add_argument("--enforce-eager", action="store_true", help="serve without torch.compile (faster start)")
    g.add_argument("--kv-cache-gib", type=float, default=None, help="CPU KV cache of the servers (GiB)")
    g = p.add_argument_group("the operating-point rule")
    g.add_argument("--max-ppl-ratio", type=float, default=None,
                   help="a point still answers only with PPL <= this x dense (default 1.5: duoserve.frontier.rule)")
    g.add_argument("--answer-tokens", type=int, default=64, help="greedy answer length for the rule (default 64)")
    g = p.add_argument_group("output")
    g.add_argument("--work", type=Path, default=Path("frontier"),
                   help="folder for checkpoints, logs and cached results (default ./frontier)")
    g.add_argument("--markdown", type=Path, default=None, help="table (default WORK/frontier.md)")
    g.add_argument("--plot", type=Path, default=None, help="Pareto plot PNG (default WORK/frontier.png)")
    g.add_argument("--json", type=Path, default=None, help="summary (default WORK/frontier.json)")
    g.add_argument("--dry-run", action="store_true", help="list the steps, cached or to run, and exit")
    g.add_argument("--cached-only", action="store_true",
                   help="run nothing: write the table from the cached results (missing ones shown as not run)")


def validate(args: argparse.Namespace, known_methods: list[str]):
    """The grid and settings, or InputError (exit code 2) before anything runs."""
    from duoserve.errors import InputError
    from duoserve.frontier.plan import build_grid
    from duoserve.frontier.rule import MAX_PPL_RATIO
    from duoserve.frontier.speed import SpeedSettings

    grid = build_grid(args.methods, args.sparsities, args.prune_px, args.serve_px, known_methods,
                      args.also_prune)
    positive = {"--nsamples": args.nsamples, "--seqlen": args.seqlen, "--eval-seqlen": args.eval_seqlen,
                "--throughput-users": args.throughput_users, "--max-tokens": args.max_tokens,
                "--prompt-words": args.prompt_words, "--answer-tokens": args.answer_tokens,
                "--max-model-len": args.max_model_len, "--zeroshot-limit": args.zeroshot_limit}
    if args.max_windows is not None:
        positive["--max-windows"] = args.max_windows
    for flag, value in positive.items():
        if value <= 0:
            raise InputError(f"{flag} must be positive, got {value}")
    if not args.duration > 0:
        raise InputError(f"--duration must be positive, got {args.duration}")
    if args.max_ppl_ratio is None:
        args.max_ppl_ratio = MAX_PPL_RATIO
    if not args.max_ppl_ratio >= 1:
        raise InputError(f"--max-ppl-ratio must be >= 1 (a multiple of dense), got {args.max_ppl_ratio}")
    if args.zeroshot_tasks is not None and not [t for t in args.zeroshot_tasks.split(",") if t.strip()]:
        raise InputError("--zeroshot-tasks is empty")
    if args.no_speed and args.speed_for != "all":
        raise InputError("--speed-for chooses which points to serve; --no-speed serves none")
    if args.dry_run and args.cached_only:
        raise InputError("--dry-run and --cached-only contradict each other; pick one")
    if args.work.exists() and not args.work.is_dir():
        raise InputError(f"--work {args.work} exists and is not a folder")
    speed = SpeedSettings(throughput_users=args.throughput_users, duration_s=args.duration,
                          max_tokens=args.max_tokens, prompt_words=args.prompt_words,
                          answer_tokens=args.answer_tokens, max_model_len=args.max_model_len,
                          enforce_eager=args.enforce_eager, kv_cache_gib=args.kv_cache_gib)
    return grid, speed


def command_line(args: argparse.Namespace) -> str:
    """The command that reproduces this run: MODEL and every option that differs from its default
    (rebuilt from the parsed options, so it is exact however the run was started)."""
    ref = argparse.ArgumentParser(add_help=False)
    add_arguments(ref)
    parts = ["duoserve", "frontier"] + ([shlex.quote(args.model)] if args.model else [])
    for action in ref._actions:  # argparse keeps no public list of a parser's options
        if not action.option_strings or action.dest in ("dry_run", "cached_only"):
            continue
        value = getattr(args, action.dest, action.default)
        if value == action.default or (action.dest == "max_ppl_ratio" and value == MAX_PPL_RATIO):
            continue
        if isinstance(action, argparse._StoreTrueAction):
            parts.append(action.option_strings[0])
        else:
            parts += [action.option_strings[0], shlex.quote(str(value))]
    return " ".join(parts)


def run(args: argparse.Namespace) -> int:
    from duoserve.frontier.report import write_outputs
    from duoserve.frontier.steps import Runner
    from duoserve.prune.registry import available_methods

    grid, speed = validate(args, sorted(available_methods()))
    runner = Runner(args, grid, speed)
    steps = runner.steps()
    if args.dry_run:
        print(runner.describe(steps))
        return 0
    args.work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    failed = runner.execute(steps)
    rows, choice = runner.rows()
    paths = write_outputs(args, grid, rows, choice, runner.not_run, command_line(args), time.time() - t0)
    print(f"wrote {', '.join(str(p) for p in paths)}")
    if failed:
        print(f"duoserve frontier: {len(failed)} step(s) failed (logs under {args.work / 'logs'}); the table "
              "holds the rest, and a rerun retries only what is missing:\n  " + "\n  ".join(failed),
              file=sys.stderr)
        return 1
    return 0
