"""`duoserve prune`: arguments (built from the method registry) -> duoserve.prune.api.prune_model."""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from duoserve.format import DEFAULT_TARGETS


def _option_fields(registry: dict) -> dict[str, tuple[dataclasses.Field, list[str]]]:
    """Every option of every registered method (or refiner), merged by name (same name = same
    meaning), with the names of those that have it."""
    fields: dict[str, tuple[dataclasses.Field, list[str]]] = {}
    for name, cls in registry.items():
        for f in dataclasses.fields(cls.Options):
            fields.setdefault(f.name, (f, []))[1].append(name)
    return fields


def _add_option_flags(group, fields, prefix: str, dest_prefix: str) -> None:
    """One flag per dataclass option: --<prefix><name>, a BooleanOptionalAction for bools."""
    for name, (f, owners) in fields.items():
        flag = "--" + prefix + name.replace("_", "-")
        help_text = f"{f.metadata.get('help', '')} [{', '.join(owners)}]"
        if "bool" in str(f.type):
            group.add_argument(flag, dest=f"{dest_prefix}{name}", action=argparse.BooleanOptionalAction, default=None,
                               help=help_text)
        else:
            kind = {"int": int, "float": float}.get(str(f.type).split(" ")[0], str)
            group.add_argument(flag, dest=f"{dest_prefix}{name}", type=kind, default=None, metavar=name.upper(),
                               help=help_text)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from duoserve.prune.refiners import available_refiners
    from duoserve.prune.registry import available_methods

    methods = available_methods()
    refiners = available_refiners()
    p.add_argument("model", nargs="?", default=None,
                   help="Hugging Face id, local HF folder, or a packaged model: smollm2-135m (the default) or gemma-3-270m (docs/pruning.md)")
    p.add_argument("--method", default="sparsegpt", metavar="NAME",
                   help="pruning method: " + "; ".join(f"{n} ({c.summary})" for n, c in methods.items()))
    p.add_argument("--refine", default=None, metavar="NAME",
                   help="training-free refiner run after the method: " + "; ".join(
                       f"{n} ({c.summary})" for n, c in refiners.items()) + " (default: none)")
    p.add_argument("--sparsity", default="0.5", help="weight sparsity: a fraction in [0, 1) or N:M such as 2:4 (default 0.5)")
    p.add_argument("--activation-sparsity", type=float, default=0.0, metavar="P_X",
                   help="activation sparsity p_x in [0, 1): calibrate with it and store per-linear thresholds (default 0)")
    p.add_argument("-o", "--output", required=True, type=Path, help="checkpoint folder to write")
    p.add_argument("--calib-data", default="c4", help="c4 (HF allenai/c4, or the packaged C4 sample offline) or a .txt/.jsonl file")
    p.add_argument("--nsamples", type=int, default=128, help="calibration windows (default 128)")
    p.add_argument("--seqlen", type=int, default=2048, help="tokens per calibration window (default 2048)")
    p.add_argument("--seed", type=int, default=0, help="seed for window sampling (default 0)")
    p.add_argument("--threshold-nsamples", type=int, default=16,
                   help="windows for activation-threshold calibration (default 16)")
    p.add_argument("--targets", default=",".join(DEFAULT_TARGETS),
                   help="comma-separated projections to prune and sparsify (default: all seven)")
    p.add_argument("--weight-format", choices=["bitmask", "dense"], default="bitmask",
                   help="on-disk weights: bitmask + packed values (default) or dense with zeros")
    p.add_argument("--quantize", default=None, metavar="int4|int8",
                   help="store the kept weights as int4 or int8 codes with a float16 scale per group of input "
                        "columns (checkpoint format 3); sparsegpt and duogpt round inside their solve (GPTQ-style "
                        "error feedback; --sparsity 0 is GPTQ), other methods round to nearest (default: off)")
    p.add_argument("--group-size", type=int, default=None, metavar="G",
                   help="with --quantize: input columns per scale, a positive multiple of 8 (default 128)")
    p.add_argument("--allocation", choices=["uniform", "greedy"], default="uniform",
                   help="greedy: also store a layer-adaptive activation-sparsity table (TEAL's greedy allocation "
                        "on calibration windows; serve it with --allocation greedy); uniform: no table (default; "
                        "`duoserve allocate CKPT` adds one later)")
    from duoserve.prune.allocate_cli import add_targets_options

    add_targets_options(p)
    p.add_argument("--batch-size", type=int, default=4, help="calibration windows per forward pass")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1 ...")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from OUTPUT.partial")
    p.add_argument("--json", type=Path, help="also write the run summary to this file")
    group = p.add_argument_group("method options (each applies to the methods named in brackets)")
    _add_option_flags(group, _option_fields(methods), "", "opt_")
    group = p.add_argument_group("refiner options (with --refine; each applies to the refiners named in brackets)")
    _add_option_flags(group, _option_fields(refiners), "refine-", "ropt_")


def run(args: argparse.Namespace) -> int:
    from duoserve.prune.api import PruneConfig, prune_model

    options = {k[len("opt_"):]: v for k, v in vars(args).items() if k.startswith("opt_")}
    refine_options = {k[len("ropt_"):]: v for k, v in vars(args).items() if k.startswith("ropt_")}
    cfg = PruneConfig(
        output=args.output, model=args.model, method=args.method, sparsity=args.sparsity,
        activation_sparsity=args.activation_sparsity, method_options=options, refine=args.refine,
        refine_options=refine_options, calib_data=args.calib_data,
        nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed, threshold_nsamples=args.threshold_nsamples,
        targets=tuple(t.strip() for t in args.targets.split(",") if t.strip()), weight_format=args.weight_format,
        quantize=args.quantize, group_size=args.group_size,
        batch_size=args.batch_size, device=args.device, overwrite=args.overwrite, resume=args.resume,
        allocation=args.allocation, allocation_targets=args.allocation_targets,
        allocation_nsamples=args.allocation_nsamples, allocation_seqlen=args.allocation_seqlen,
    )
    summary = prune_model(cfg)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0
