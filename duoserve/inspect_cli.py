"""`duoserve inspect CKPT`: metadata, per-module realized sparsity and thresholds, the threshold
grid (format 2: the p_x the checkpoint can be served at), manifest check."""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", type=Path, help="a duoserve checkpoint folder")
    p.add_argument("--no-verify", action="store_true", help="skip the sha256 manifest check (faster on big models)")
    p.add_argument("--json", type=Path, help="write the report as JSON")


def run(args: argparse.Namespace) -> int:
    from duoserve.format.io import load_checkpoint

    ckpt = load_checkpoint(args.checkpoint, verify=not args.no_verify)  # raises on any inconsistency
    q = ckpt.qconfig
    files = {p.name: p.stat().st_size for p in sorted(args.checkpoint.glob("*.safetensors"))}
    modules = []
    for name, info in q.modules.items():
        weight = ckpt.state_dict[name + ".weight"]
        modules.append({"module": name, "shape": list(info.shape), "nnz": info.nnz,
                        "sparsity": round(1 - int((weight != 0).sum()) / weight.numel(), 6),
                        "act_threshold": ckpt.thresholds[name]})
        if info.act_threshold_grid is not None:
            modules[-1]["act_threshold_grid"] = list(info.act_threshold_grid)
    target_params = sum(m["shape"][0] * m["shape"][1] for m in modules)
    report = {
        "checkpoint": str(args.checkpoint), "format_version": q.format_version, "weight_format": q.weight_format,
        "dtype": q.dtype, "structure": q.sparsity_structure, "global_sparsity": q.global_sparsity,
        "activation_sparsity": {"rule": q.activation_sparsity.rule, "target": q.activation_sparsity.target,
                                "grid": None if q.activation_sparsity.grid is None else list(q.activation_sparsity.grid)},
        "producer": q.producer, "targets": list(q.targets), "ignore": list(q.ignore),
        "manifest": "skipped" if args.no_verify else "verified",
        "weight_files_bytes": files, "target_parameters": target_params, "modules": modules,
    }
    p = q.producer
    print(f"{args.checkpoint}: duoserve format v{q.format_version}, {q.weight_format} weights ({q.dtype}), "
          f"manifest {report['manifest']}")
    print(f"method {p.get('method')} {p.get('method_args', {})}; weight sparsity {q.global_sparsity:.4f} "
          f"({q.sparsity_structure}); activation sparsity {q.activation_sparsity.rule} p_x={q.activation_sparsity.target}")
    print(f"source {p.get('source_model')}; calibration {p.get('calib_data')}; seed {p.get('seed')}")
    print(f"weight files: {sum(files.values()) / 2**20:.1f} MiB for {target_params / 1e6:.2f} M target parameters")
    _print_grid(q)
    width = max(len(m["module"]) for m in modules)
    print(f"{'module':{width}s}  {'shape':>12s}  {'sparsity':>8s}  {'threshold':>10s}")
    for m in modules:
        shape = "x".join(map(str, m["shape"]))
        print(f"{m['module']:{width}s}  {shape:>12s}  {m['sparsity']:8.4f}  {m['act_threshold']:10.5f}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


def _print_grid(q) -> None:
    """The serve-time p_x choices: the grid and the median threshold over modules at its points."""
    from duoserve.format.thresholds import offered

    grid = q.activation_sparsity.grid
    print(f"serve-time activation sparsity (--activation-sparsity): {offered(q)}")
    if grid is None:
        return
    shown = grid[::2] if len(grid) > 10 else grid  # every other point keeps the line short
    medians = []
    for p in shown:
        i = grid.index(p)
        values = sorted(m.act_threshold_grid[i] for m in q.modules.values())
        medians.append(values[len(values) // 2])
    print("  p_x             " + " ".join(f"{p:7.2f}" for p in shown))
    print("  median thresh.  " + " ".join(f"{t:7.4f}" for t in medians))
