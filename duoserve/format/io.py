"""Writing and reading duoserve checkpoints (docs/checkpoint-format.md).

The writer takes a dense, pruned state dict (HF names, zeros in place) and writes the bitmask or
dense format; the reader validates everything the format says a reader must reject and returns
the dense state dict again, bit-exact.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from duoserve.errors import CheckpointError
from duoserve.format.bitmask import (
    bitmask_popcount, decode_bitmask, encode_bitmask, pad_bits_clear,
)
from duoserve.format.manifest import atomic_folder, verify_manifest, write_manifest
from duoserve.format.quant import codes_from_dense, decode_quantized, int4_pad_clear, pack_codes
from duoserve.format.schema import (
    BITMASK_SHARD_PATTERN, BITMASK_SUFFIX, DENSE_INDEX_NAME, DENSE_SHARD_PATTERN, DENSE_SINGLE_NAME, MANIFEST_NAME,
    DENSE_SUFFIX, SCALES_SUFFIX, THRESHOLD_SUFFIX, VALUES_SUFFIX, ModuleInfo, QuantizationConfig, is_target,
    module_tensor_specs,
)

MAX_SHARD_BYTES = 2 << 30

_README = """# duoserve checkpoint

Pruned by duoserve ({method}, weight sparsity {sparsity:.3f}, {structure}; activation
sparsity: {act}). Weight format: `{weight_format}` (docs/checkpoint-format.md, version {version}).

- Serve: `duoserve serve {name}` or `vllm serve {name}` with duoserve installed.
{px_note}- Evaluate: `duoserve eval ppl {name}`; inspect: `duoserve inspect {name}`.
- Load in Python: `duoserve.prune.pruned_models.load_pruned_model("{name}")`.
{plain_note}
"""


def target_modules(state_dict: dict[str, torch.Tensor], targets) -> list[str]:
    """Module names (without `.weight`) of the target linears in a state dict, in its order."""
    return [k[: -len(DENSE_SUFFIX)] for k, v in state_dict.items()
            if k.endswith(DENSE_SUFFIX) and v.dim() == 2 and is_target(k[: -len(DENSE_SUFFIX)], targets)]


def build_quant_config(state_dict, thresholds: dict[str, float], base: QuantizationConfig,
                       grid_thresholds: dict[str, list[float]] | None = None) -> QuantizationConfig:
    """Fill `modules` and `global_sparsity` of `base` from the pruned weights and thresholds.

    grid_thresholds: module -> thresholds at base.activation_sparsity.grid (format 2), or None.
    """
    if (grid_thresholds is None) != (base.activation_sparsity.grid is None):
        raise ValueError("grid_thresholds and activation_sparsity.grid come together")
    modules, total, nonzero = {}, 0, 0
    for name in target_modules(state_dict, base.targets):
        w = state_dict[name + DENSE_SUFFIX]
        nnz = int((w != 0).sum())
        grid = None
        if grid_thresholds is not None:
            if name not in grid_thresholds:
                raise CheckpointError(f"no calibrated threshold grid for target linear {name}")
            grid = tuple(float(t) for t in grid_thresholds[name])
        modules[name] = ModuleInfo(tuple(w.shape), nnz, float(thresholds.get(name, 0.0)), grid)
        total += w.numel()
        nonzero += nnz
    if not modules:
        raise CheckpointError(f"no target linears ({', '.join(base.targets)}) found in the model's weights")
    return replace(base, modules=modules, global_sparsity=round(1.0 - nonzero / total, 6))


def _encode_tensors(state_dict, qconfig: QuantizationConfig,
                    quant_scales: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    wq = qconfig.weight_quant
    if (wq is None) != (quant_scales is None):
        raise ValueError("quant_scales and quantization_config.weight_quant come together")
    for key, value in state_dict.items():
        module = key[: -len(DENSE_SUFFIX)] if key.endswith(DENSE_SUFFIX) else None
        if module in qconfig.modules:
            if wq is not None:
                if module not in quant_scales:
                    raise CheckpointError(f"no quantization scales for target linear {module}")
                scales = quant_scales[module].to(torch.float16).contiguous()
                bitmask, _ = encode_bitmask(value)
                codes = codes_from_dense(value, scales, wq, module + DENSE_SUFFIX)  # exact, or raises
                out[module + BITMASK_SUFFIX] = bitmask
                out[module + VALUES_SUFFIX] = pack_codes(codes, wq.bits)
                out[module + SCALES_SUFFIX] = scales
            elif qconfig.weight_format == "bitmask":
                bitmask, values = encode_bitmask(value)
                out[module + BITMASK_SUFFIX], out[module + VALUES_SUFFIX] = bitmask, values
            else:
                out[key] = value.contiguous()
            thr = qconfig.modules[module].act_threshold
            out[module + THRESHOLD_SUFFIX] = torch.tensor(thr, dtype=torch.float32)
        else:
            out[key] = value.contiguous()
    return out


def _shard(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards, current, size = [], {}, 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = t
        size += nbytes
    shards.append(current)
    return shards


def save_checkpoint(
    out: Path,
    state_dict: dict[str, torch.Tensor],
    hf_config: dict[str, Any],
    qconfig: QuantizationConfig,
    *,
    save_extras: Callable[[Path], None] | None = None,
    overwrite: bool = False,
    max_shard_bytes: int = MAX_SHARD_BYTES,
    quant_scales: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write a checkpoint folder atomically. `qconfig.modules` must already be filled.

    state_dict: dense pruned weights under HF names (tied weights removed by the caller).
    hf_config: the model's config.json as a dict (quantization_config is added here).
    save_extras(folder): writes tokenizer and generation config into the folder.
    quant_scales: with qconfig.weight_quant, module -> its scales [N, ceil(K/G)]; the target weights
    in state_dict are then the dequantized ones (duoserve.format.quant), whose codes are recovered.
    """
    out = Path(out)
    tensors = _encode_tensors(state_dict, qconfig, quant_scales)
    shards = _shard(tensors, max_shard_bytes)
    with atomic_folder(out, overwrite=overwrite) as tmp:
        config = dict(hf_config)
        config["quantization_config"] = qconfig.to_dict()
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if qconfig.weight_format == "bitmask":
            names = [BITMASK_SHARD_PATTERN.format(index=i + 1, count=len(shards)) for i in range(len(shards))]
        elif len(shards) == 1:
            names = [DENSE_SINGLE_NAME]
        else:
            names = [DENSE_SHARD_PATTERN.format(index=i + 1, count=len(shards)) for i in range(len(shards))]
        for name, shard in zip(names, shards):
            save_file(shard, str(tmp / name), metadata={"format": "pt", "producer": "duoserve"})
        if qconfig.weight_format == "dense" and len(shards) > 1:
            weight_map = {t: n for n, s in zip(names, shards) for t in s}
            index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                     "weight_map": weight_map}
            (tmp / DENSE_INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        if save_extras is not None:
            save_extras(tmp)
        _write_readme(tmp, out.name, qconfig)
        write_manifest(tmp)
    return out


def _write_readme(folder: Path, name: str, q: QuantizationConfig) -> None:
    act = (f"p_x = {q.activation_sparsity.target} ({q.activation_sparsity.rule})"
           if q.activation_sparsity.rule != "none" else "off")
    plain = ("- Plain `transformers` loads this folder (zeros in place, no activation sparsity)."
             if q.weight_format == "dense" else
             "- Plain `transformers.from_pretrained` refuses this folder on purpose (its weights are "
             "bitmask-packed); use duoserve, or re-prune with `--weight-format dense`.")
    grid = q.activation_sparsity.grid
    px_note = ("" if grid is None else
               f"- Another activation sparsity, no re-pruning: `duoserve serve {name} --activation-sparsity P` "
               f"(also `duoserve eval`), any P in [0, {grid[-1]:g}]: thresholds are stored for {len(grid)} values "
               f"of p_x from 0 to {grid[-1]:g} and interpolated between them.\n")
    (folder / "README.md").write_text(_README.format(
        method=q.producer.get("method", "?"), sparsity=q.global_sparsity, structure=q.sparsity_structure,
        act=act, weight_format=q.weight_format + (
            "" if q.weight_quant is None else f", {q.weight_quant.name} values, group {q.weight_quant.group_size}"),
        version=q.format_version, name=name, plain_note=plain,
        px_note=px_note))


def update_quant_config(src: Path, qconfig: QuantizationConfig, out: Path | None = None,
                        overwrite: bool = False) -> Path:
    """Write `qconfig` as the quantization_config of checkpoint `src`, in place (out None) or into a
    copy at `out`, atomically: the new folder (files hard-linked in place, copied to another
    folder; new config.json and manifest) replaces the target in one rename, so a failure leaves it
    as it was. For metadata-only additions such as an allocation table; the tensors must not change."""
    import os
    import shutil

    src = Path(src)
    target = src if out is None else Path(out)
    in_place = target.resolve() == src.resolve()
    verify_manifest(src)  # never re-sign a corrupted checkpoint
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = qconfig.to_dict()
    with atomic_folder(target, overwrite=in_place or overwrite) as tmp:
        for f in sorted(src.iterdir()):
            if f.name in ("config.json", MANIFEST_NAME):
                continue
            dst = tmp / f.name
            if f.is_dir():
                shutil.copytree(f, dst)
            elif in_place:
                try:
                    os.link(f, dst)  # the old folder is removed after the swap: no shared writes
                except OSError:
                    shutil.copy2(f, dst)
            else:
                shutil.copy2(f, dst)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        write_manifest(tmp)
    return target


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------
@dataclass
class LoadedCheckpoint:
    path: Path
    config: dict[str, Any]  # config.json without quantization_config
    qconfig: QuantizationConfig
    state_dict: dict[str, torch.Tensor]  # dense HF names, pruned weights with zeros in place
    thresholds: dict[str, float]  # module -> activation threshold (from the tensors)


def read_quant_config(path: Path) -> tuple[dict[str, Any], QuantizationConfig]:
    path = Path(path)
    cfg_path = path / "config.json"
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a folder")
    if not cfg_path.is_file():
        raise CheckpointError(f"{path}: no config.json; not a Hugging Face / duoserve checkpoint")
    try:
        config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_path}: not valid JSON ({e})") from e
    if "quantization_config" not in config:
        raise CheckpointError(f"{cfg_path}: no quantization_config; {path} is not a duoserve checkpoint "
                              "(a dense model? pass it to `duoserve prune` first)")
    qconfig = QuantizationConfig.from_dict(config.pop("quantization_config"))
    return config, qconfig


def _read_safetensors(path: Path) -> dict[str, tuple[Path, Any]]:
    """tensor name -> (file, lazy handle) over every *.safetensors file of the folder."""
    found: dict[str, Path] = {}
    for f in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt") as h:
                for name in h.keys():
                    if name in found:
                        raise CheckpointError(f"tensor {name} appears in both {found[name].name} and {f.name}")
                    found[name] = f
        except SafetensorError as e:
            raise CheckpointError(f"{f}: not a readable safetensors file ({e}); the file is truncated or corrupted") from e
    if not found:
        raise CheckpointError(f"{path}: no *.safetensors weight files")
    return found


def load_checkpoint(path: Path, verify: bool = True) -> LoadedCheckpoint:
    """Validate and read a checkpoint into a dense state dict (bit-exact with what was pruned)."""
    path = Path(path)
    config, q = read_quant_config(path)
    if verify:
        verify_manifest(path)
    where = _read_safetensors(path)
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(set(where.values())):
        try:
            with safe_open(str(f), framework="pt") as h:
                for name in h.keys():
                    tensors[name] = h.get_tensor(name)
        except SafetensorError as e:
            raise CheckpointError(f"{f}: failed to read tensors ({e}); the file is truncated or corrupted") from e

    def take(name: str) -> torch.Tensor:
        if name not in tensors:
            raise CheckpointError(f"{path}: tensor {name} is missing (the metadata lists module "
                                  f"{name.rsplit('.', 1)[0]})")
        return tensors.pop(name)

    state_dict: dict[str, torch.Tensor] = {}
    thresholds: dict[str, float] = {}
    for module, info in q.modules.items():
        n, k = info.shape
        got: dict[str, torch.Tensor] = {}
        for spec in module_tensor_specs(q.weight_format, info.shape, info.nnz, q.weight_quant):
            t = take(module + spec.suffix)
            wrong_shape = t.numel() != 1 if spec.shape == () else tuple(t.shape) != spec.shape
            if wrong_shape or (spec.dtype in _TORCH_DTYPES and t.dtype != _TORCH_DTYPES[spec.dtype]):
                raise CheckpointError(f"{module + spec.suffix}: shape {tuple(t.shape)} {t.dtype}, expected "
                                      f"{spec.shape} {spec.dtype or q.dtype} for weight shape {info.shape} "
                                      f"with {info.nnz} non-zeros (quantization_config.modules)")
            got[spec.suffix] = t
        if q.weight_format == "bitmask":
            bitmask, values = got[BITMASK_SUFFIX], got[VALUES_SUFFIX]
            if not pad_bits_clear(bitmask, k):
                raise CheckpointError(f"{module + BITMASK_SUFFIX}: bits set beyond column {k - 1} (corrupted)")
            if bitmask_popcount(bitmask) != info.nnz:
                raise CheckpointError(f"{module + BITMASK_SUFFIX}: {bitmask_popcount(bitmask)} bits set, "
                                      f"but {info.nnz} values stored")
            if q.weight_quant is not None:
                weight = _decode_quantized(module, bitmask, values, got[SCALES_SUFFIX], q, info)
            else:
                weight = decode_bitmask(bitmask, values, (n, k))
        else:
            weight = got[DENSE_SUFFIX]
        state_dict[module + DENSE_SUFFIX] = weight
        thr = got[THRESHOLD_SUFFIX]
        t = float(thr.float())
        if math.isnan(t) or t < 0:
            raise CheckpointError(f"{module + THRESHOLD_SUFFIX}: threshold {t} is NaN or negative; "
                                  "re-run threshold calibration (duoserve prune ... --activation-sparsity P)")
        if not math.isclose(t, info.act_threshold, rel_tol=1e-6, abs_tol=1e-12):
            raise CheckpointError(f"{module + THRESHOLD_SUFFIX}: tensor says {t}, metadata says {info.act_threshold}")
        thresholds[module] = t
    for name in list(tensors):
        if name.endswith((BITMASK_SUFFIX, VALUES_SUFFIX, SCALES_SUFFIX, THRESHOLD_SUFFIX)):
            raise CheckpointError(f"{path}: tensor {name} belongs to no module of quantization_config.modules")
        if name in state_dict:
            raise CheckpointError(f"{path}: unexpected tensor {name}: module {name.rsplit('.', 1)[0]} is stored "
                                  f"in the {q.weight_format} format")
        state_dict[name] = tensors.pop(name)
    return LoadedCheckpoint(path, config, q, state_dict, thresholds)


_TORCH_DTYPES = {"U8": torch.uint8, "F16": torch.float16}  # fixed-dtype tensors checked on read


def _decode_quantized(module: str, bitmask, packed, scales, q: QuantizationConfig, info: ModuleInfo) -> torch.Tensor:
    """Format 3: codes + scales -> the dense dequantized weight in the checkpoint's dtype."""
    from duoserve.format.bitmask import bitmask_to_bool

    wq = q.weight_quant
    if not int4_pad_clear(packed, info.nnz, wq.bits):
        raise CheckpointError(f"{module + VALUES_SUFFIX}: the unused high nibble of the last byte is set (corrupted)")
    s = scales.float()
    if not bool(torch.isfinite(s).all()) or bool((s <= 0).any()):
        raise CheckpointError(f"{module + SCALES_SUFFIX}: a scale is not a finite number > 0")
    dtype = getattr(torch, q.dtype, None)
    if not isinstance(dtype, torch.dtype):
        raise CheckpointError(f"quantization_config.dtype {q.dtype!r} is not a torch dtype")
    return decode_quantized(bitmask_to_bool(bitmask, info.shape[1]), packed, scales, wq, dtype)
