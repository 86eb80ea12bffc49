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
    disk, kernel = _bytes_per_weight(args.checkpoint, q)
    report["bytes_per_weight"] = {"on_disk": round(disk, 4), "kernel_layout": round(kernel, 4)}
    values = (f"{q.weight_quant.name} values, group {q.weight_quant.group_size}" if q.weight_quant is not None
              else f"{q.dtype} values")
    print(f"bytes per target weight: {disk:.3f} on disk, {kernel:.3f} in the kernel layout ({values}; "
          f"dense {q.dtype}: {_DTYPE_BYTES.get(q.dtype, 2):g})")
    _print_grid(q)
    alloc = q.activation_sparsity.allocation
    if alloc is not None:  # layer-adaptive p_x (duoserve allocate): which average p_x it covers, how spread
        report["activation_sparsity"]["allocation"] = alloc.to_dict()
        spread = ", ".join(f"{t:g}: {min(v[i] for v in alloc.modules.values()):.2f}-"
                           f"{max(v[i] for v in alloc.modules.values()):.2f}" for i, t in enumerate(alloc.targets))
        print(f"--allocation {alloc.method}: average p_x up to {alloc.targets[-1]:g} (per-linear p_x range at "
              f"each target: {spread})")
    width = max(len(m["module"]) for m in modules)
    print(f"{'module':{width}s}  {'shape':>12s}  {'sparsity':>8s}  {'threshold':>10s}")
    for m in modules:
        shape = "x".join(map(str, m["shape"]))
        print(f"{m['module']:{width}s}  {shape:>12s}  {m['sparsity']:8.4f}  {m['act_threshold']:10.5f}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


def _bytes_per_weight(path: Path, q) -> tuple[float, float]:
    """(on disk, in the kernel's runtime layout) bytes per target weight element.

    On disk: the target modules' weight tensors (safetensors headers). Kernel layout (built at load,
    kernels/layout.py and kernels/qlayout.py): per 128-row block and input column 16 bytes of
    bitmap and 4 of offset, the values (2 or 4 bytes, 1 for int8 codes, 1/2 for int4) plus 128 of
    padding, and with codes 2 bytes of scale per row, group and row block."""
    from safetensors import safe_open

    from duoserve.format.schema import module_tensor_specs

    disk = kernel = elements = 0
    wanted = {}
    for name, info in q.modules.items():
        n, k = info.shape
        elements += n * k
        for spec in module_tensor_specs(q.weight_format, info.shape, info.nnz, q.weight_quant):
            if spec.stacks != "shards":
                wanted[name + spec.suffix] = True
        nb = -(-n // 128)
        wq = q.weight_quant
        per_value = _DTYPE_BYTES.get(q.dtype, 2) if wq is None else wq.bits / 8
        kernel += nb * k * 20 + (info.nnz + 128) * per_value
        if wq is not None:
            kernel += nb * wq.groups(k) * 128 * 2
    for f in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            for t in h.keys():
                if t in wanted:
                    sl = h.get_slice(t)
                    count = 1
                    for d in sl.get_shape():
                        count *= d
                    disk += count * {"U8": 1, "F16": 2, "BF16": 2, "F32": 4}.get(sl.get_dtype(), 2)
    return disk / max(elements, 1), kernel / max(elements, 1)


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
