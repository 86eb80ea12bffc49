"""Check a checkpoint folder before vLLM loads it: metadata, manifest and every tensor header.

Why before: vLLM allocates parameters first and then streams tensors into them. A tensor with no
parameter fails deep inside vLLM with a misleading AttributeError, a missing one is silently left
uninitialised (vLLM does not track loaded weights for quantized models), and a shape mismatch is a
bare assert. Reading only the safetensors headers (names, shapes, dtypes) costs milliseconds and
lets us name the file and tensor instead. No vLLM import here: the launcher runs this in the
parent process so `duoserve serve` fails in a second, not after vLLM's start-up.
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

from duoserve.errors import CheckpointError
from duoserve.format.io import read_quant_config
from duoserve.format.manifest import verify_manifest
from duoserve.format.schema import (
    BIAS_SUFFIX, BITMASK_SUFFIX, DENSE_SUFFIX, SCALES_SUFFIX, THRESHOLD_SUFFIX, VALUES_SUFFIX, QuantizationConfig,
    module_tensor_specs,
)

log = logging.getLogger(__name__)

_DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}
# Private: the launcher tells the vLLM processes it has checked the manifest (docs/configuration.md).
VERIFIED_ENV = "_DUOSERVE_MANIFEST_VERIFIED"
_validated: set[tuple] = set()  # folders already checked in this process, keyed by their files' stats


def folder_key(path: Path) -> tuple:
    """The folder and every file's size and mtime: changes whenever any file is replaced."""
    path = Path(path)
    return (str(path.resolve()), tuple(sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns)
                                              for f in path.iterdir() if f.is_file())))


def key_digest(key: tuple) -> str:
    return hashlib.sha256(repr(key).encode()).hexdigest()


def read_headers(path: Path) -> dict[str, tuple[Path, tuple[int, ...], str]]:
    """tensor name -> (file, shape, safetensors dtype string) over every *.safetensors file."""
    headers: dict[str, tuple[Path, tuple[int, ...], str]] = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt") as h:
                for name in h.keys():
                    if name in headers:
                        raise CheckpointError(f"tensor {name} appears in both {headers[name][0].name} and {f.name}")
                    sl = h.get_slice(name)
                    headers[name] = (f, tuple(sl.get_shape()), sl.get_dtype())
        except SafetensorError as e:
            raise CheckpointError(f"{f}: not a readable safetensors file ({e}); truncated or corrupted") from e
    if not headers:
        raise CheckpointError(f"{path}: no *.safetensors weight files")
    return headers


def expected_module_tensors(name: str, shape: tuple[int, int], nnz: int, q: QuantizationConfig) -> dict[str, tuple]:
    """The tensors one target module must have: name -> (shape, dtype or None for 'any float')."""
    return {name + spec.suffix: (spec.shape, spec.dtype)
            for spec in module_tensor_specs(q.weight_format, shape, nnz, q.weight_quant)}


def _model_state_shapes(hf_config: Any) -> dict[str, tuple[int, ...]] | None:
    """Names and shapes of the dense model's state dict, from its config on the meta device.

    Lets the check catch a missing or extra non-target tensor (norms, embeddings) too. Returns
    None when transformers cannot build the architecture (remote code): that part is skipped.
    """
    try:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        cfg = hf_config if not isinstance(hf_config, dict) else AutoConfig.for_model(**hf_config)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg)
        return {k: tuple(v.shape) for k, v in model.state_dict().items()}
    except Exception as e:  # an architecture transformers cannot instantiate offline
        log.warning("could not build %s on the meta device (%s: %s); skipping the non-target tensor check",
                    type(hf_config).__name__, type(e).__name__, e)
        return None


def _tied(cfg: Any) -> bool:
    if isinstance(cfg, dict):
        return bool(cfg.get("tie_word_embeddings", False))
    return bool(getattr(cfg, "tie_word_embeddings", False))


def validate_checkpoint(path: Path, hf_config: Any = None, *, verify_hashes: bool = True) -> QuantizationConfig:
    """Refuse a checkpoint vLLM would load wrongly; return its quantization config.

    Checks: quant_method/format_version/metadata (schema), the manifest (sha256 + size), every
    target module's tensors (present, shape, dtype), no tensor that no module explains, and, when
    the architecture can be built on the meta device, every non-target tensor's name and shape.
    """
    path = Path(path)
    config, q = read_quant_config(path)
    key = folder_key(path)
    if key in _validated:
        return q
    # The launcher verified the hashes in its own process and passes the folder's key on, so
    # vLLM's server process re-reads only the headers (hashing a 7B checkpoint twice costs ~10 s).
    if verify_hashes and os.environ.get(VERIFIED_ENV) != key_digest(key):
        verify_manifest(path)
    headers = read_headers(path)
    remaining = dict(headers)
    where = lambda name: f"{headers[name][0].name}: {name}"  # noqa: E731

    for module, info in q.modules.items():
        for name, (shape, dtype) in expected_module_tensors(module, info.shape, info.nnz, q).items():
            if name not in remaining:
                raise CheckpointError(f"{path}: tensor {name} is missing (quantization_config.modules lists "
                                      f"{module}, weight_format {q.weight_format})")
            _, got_shape, got_dtype = remaining.pop(name)
            if name.endswith(THRESHOLD_SUFFIX) and got_shape in ((), (1,)):
                got_shape = ()
            if got_shape != shape:
                raise CheckpointError(f"{where(name)} has shape {list(got_shape)}, expected {list(shape)} "
                                      f"(module shape {list(info.shape)}, nnz {info.nnz})")
            if dtype is not None and got_dtype != dtype:
                raise CheckpointError(f"{where(name)} has dtype {got_dtype}, expected {dtype}")
            if dtype is None and got_dtype != _DTYPES.get(q.dtype, got_dtype):
                raise CheckpointError(f"{where(name)} has dtype {got_dtype}, quantization_config.dtype is {q.dtype}")
        bias = module + BIAS_SUFFIX
        if bias in remaining:
            _, got_shape, _ = remaining.pop(bias)
            if got_shape != (info.shape[0],):
                raise CheckpointError(f"{where(bias)} has shape {list(got_shape)}, expected [{info.shape[0]}]")

    for name in remaining:
        module = name.rsplit(".", 1)[0]
        if name.endswith((BITMASK_SUFFIX, VALUES_SUFFIX, SCALES_SUFFIX, THRESHOLD_SUFFIX)):
            raise CheckpointError(f"unexpected tensor {where(name)}: module {module} is not in "
                                  "quantization_config.modules")
        if module in q.modules:
            raise CheckpointError(f"unexpected tensor {where(name)}: module {module} is stored in the "
                                  f"{q.weight_format} format, which has no such tensor")

    shapes = _model_state_shapes(hf_config if hf_config is not None else config)
    if shapes is not None:
        dense_names = {m + DENSE_SUFFIX for m in q.modules} | {m + BIAS_SUFFIX for m in q.modules}
        if _tied(hf_config if hf_config is not None else config):
            dense_names.add("lm_head.weight")  # the writer drops tied weights; vLLM ties them itself
        for name, (f, got_shape, _) in remaining.items():
            if name not in shapes:
                raise CheckpointError(f"unexpected tensor {f.name}: {name}: the model "
                                      f"({config.get('architectures', ['?'])[0]}) has no such weight")
            if shapes[name] != got_shape:
                raise CheckpointError(f"{f.name}: {name} has shape {list(got_shape)}, the model's config "
                                      f"gives {list(shapes[name])}")
        for name, shape in shapes.items():
            if name not in remaining and name not in dense_names and not name.endswith("rotary_emb.inv_freq"):
                raise CheckpointError(f"{path}: tensor {name} {list(shape)} is missing from the checkpoint")
        for module, info in q.modules.items():
            want = shapes.get(module + DENSE_SUFFIX)
            if want is not None and tuple(want) != tuple(info.shape):
                raise CheckpointError(f"quantization_config.modules[{module!r}].shape is {list(info.shape)}, "
                                      f"the model's config gives {list(want)}")
    for module, info in q.modules.items():
        if math.isnan(info.act_threshold):
            raise CheckpointError(f"{module}: act_threshold is NaN in quantization_config")
    _validated.add(key)
    log.info("duoserve checkpoint %s: format v%d %s, %d target linears, weight sparsity %.3f, "
             "activation rule %s (p_x %.2f): checks passed", path, q.format_version, q.weight_format,
             len(q.modules), q.global_sparsity, q.activation_sparsity.rule, q.activation_sparsity.target)
    return q


# Last name of the linears vLLM builds as row-parallel (input columns split across ranks) in the
# architectures duoserve prunes; every other target is column-parallel (output rows split).
ROW_PARALLEL = ("o_proj", "down_proj")


def tensor_parallel_problems(config: dict[str, Any], q: QuantizationConfig, tp: int) -> list[str]:
    """Why tensor-parallel size `tp` cannot split this checkpoint (empty: it can).

    vLLM splits attention by heads (KV heads too, or replicates each KV head on tp / num_kv_heads
    ranks when tp is a multiple of them) and duoserve cuts each target linear into whole rows
    (column-parallel) or whole columns (row-parallel), one block per rank.
    """
    problems = []
    heads = config.get("num_attention_heads")
    kv = config.get("num_key_value_heads") or heads
    if heads and heads % tp:
        problems.append(f"{heads} attention heads are not divisible by {tp}")
    if kv and (kv % tp if tp <= kv else tp % kv):
        problems.append(f"{kv} KV heads: {tp} neither divides them nor is a multiple of them")
    for name, info in q.modules.items():
        last = name.rsplit(".", 1)[-1]
        if last in ("k_proj", "v_proj"):
            continue  # split by KV heads (above)
        n, k = info.shape
        if last in ROW_PARALLEL and k % tp:
            problems.append(f"{name} has {k} input columns, not divisible by {tp}")
        elif last in ROW_PARALLEL and q.weight_quant is not None and (k // tp) % q.weight_quant.group_size:
            problems.append(f"{name}: {k // tp} input columns per rank would cut its quantization groups of "
                            f"{q.weight_quant.group_size}")
        elif last not in ROW_PARALLEL and n % tp:
            problems.append(f"{name} has {n} output rows, not divisible by {tp}")
    return problems


def check_tensor_parallel(path: Path, config: dict[str, Any], q: QuantizationConfig, tp: int) -> None:
    """Refuse (InputError) a tensor-parallel size that does not split the checkpoint, with the
    reason and the sizes that would (so that a user does not wait for vLLM's start-up to learn it)."""
    from duoserve.errors import InputError

    problems = tensor_parallel_problems(config, q, tp)
    if problems:
        fits = [t for t in range(1, 17) if not tensor_parallel_problems(config, q, t)]
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise InputError(f"--tensor-parallel-size {tp} cannot split {path}: {'; '.join(problems[:3])}{more}. "
                         f"Sizes up to 16 that split it: {', '.join(map(str, fits))}")
