"""vLLM quantization config `duoserve`: reads and validates `config.json["quantization_config"]`.

vLLM builds this from the checkpoint's config.json (quant_method "duoserve" selects it), asks it
for a method per layer (get_quant_method) and calls maybe_update_config with the model folder,
where we run the header-level checkpoint validation (duoserve.loaders.validate) before any tensor
is read. A serve-time activation sparsity (`$DUOSERVE_ACTIVATION_SPARSITY`, which `duoserve serve
--activation-sparsity P` sets for the vLLM processes) selects each module's threshold from the
checkpoint's grid here; the linear method uses it instead of the loaded `act_threshold`.
`$DUOSERVE_ACTIVATION_ALLOCATION=greedy` (`--allocation greedy`) takes each module's p_x from the
checkpoint's allocation table at that average instead (duoserve.format.thresholds).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from duoserve.errors import CheckpointError
from duoserve.format.schema import QUANT_METHOD, QuantizationConfig as CheckpointQuantConfig
from duoserve.format.thresholds import (
    SERVE_ACTIVATION_SPARSITY_ENV, SERVE_ALLOCATION_ENV, check_allocation, describe_selection,
    parse_activation_sparsity, select_thresholds,
)
from duoserve.loaders.linear import DuoserveLinearMethod, LoadSummary, make_shards
from duoserve.loaders.validate import validate_checkpoint
from duoserve.loaders.vllm_compat import LinearBase, QuantizationConfig, UnquantizedLinearMethod

log = logging.getLogger(__name__)


def hf_shard_names(prefix: str, packed_modules_mapping: dict[str, list[str]]) -> list[str]:
    """vLLM layer prefix -> the HF module names it holds.

    model.layers.0.self_attn.qkv_proj -> [...q_proj, ...k_proj, ...v_proj] (through the model's
    packed_modules_mapping); an unfused layer maps to itself.
    """
    parent, _, last = prefix.rpartition(".")
    parts = packed_modules_mapping.get(last)
    if not parts:
        return [prefix]
    return [f"{parent}.{p}" if parent else p for p in parts]


class DuoserveConfig(QuantizationConfig):
    """The checkpoint's quantization_config (validated by duoserve.format.schema) for vLLM."""

    def __init__(self, checkpoint_config: CheckpointQuantConfig, activation_sparsity: float | None = None,
                 allocation: str = "uniform"):
        super().__init__()
        self.checkpoint_config = checkpoint_config
        self._vllm_to_hf: dict[str, str] = {}  # module renames a model's hf_to_vllm_mapper applies
        self._summary = LoadSummary()
        # Serve-time p_x (duoserve serve --activation-sparsity, through the environment so that every
        # vLLM process sees it). None or the calibrated p_x: the act_threshold tensors as loaded.
        self.activation_sparsity = activation_sparsity
        self._serve_thresholds: dict[str, float] | None = None
        act = checkpoint_config.activation_sparsity
        self.allocation = check_allocation(allocation, SERVE_ALLOCATION_ENV)
        if allocation != "uniform" and activation_sparsity is None:
            activation_sparsity = self.activation_sparsity = act.target
        if activation_sparsity is not None:
            # Raises InputError for a p_x the checkpoint cannot offer (the launcher checked it first).
            selected = select_thresholds(checkpoint_config, activation_sparsity, allocation=allocation)
            if allocation != "uniform" or not (activation_sparsity == act.target and act.rule == "threshold"):
                self._serve_thresholds = selected
            log.info("duoserve: serving at %s", describe_selection(checkpoint_config, activation_sparsity, allocation))

    def __repr__(self) -> str:
        q = self.checkpoint_config
        served = "" if self.activation_sparsity is None else f", served_activation_sparsity={self.activation_sparsity}"
        return (f"DuoserveConfig(format_version={q.format_version}, weight_format={q.weight_format}, "
                f"modules={len(q.modules)}, global_sparsity={q.global_sparsity}, "
                f"activation={q.activation_sparsity.rule}:{q.activation_sparsity.target}{served})")

    @classmethod
    def get_name(cls) -> str:
        return QUANT_METHOD

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.bfloat16, torch.float16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        return 70  # Volta: what Triton supports; CPU has no capability and skips the check

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # everything is in config.json["quantization_config"]

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "DuoserveConfig":
        # Raises CheckpointError naming the field (unknown format_version first).
        env = os.environ.get(SERVE_ACTIVATION_SPARSITY_ENV)
        px = parse_activation_sparsity(env, SERVE_ACTIVATION_SPARSITY_ENV) if env else None
        return cls(CheckpointQuantConfig.from_dict(config), px, os.environ.get(SERVE_ALLOCATION_ENV) or "uniform")

    def apply_vllm_mapper(self, hf_to_vllm_mapper) -> None:
        """Remember module renames (HF name -> vLLM prefix) so get_quant_method can look up HF names."""
        for name in self.checkpoint_config.modules:
            mapped = hf_to_vllm_mapper.map_name(name + ".weight")
            if mapped and mapped != name + ".weight":
                self._vllm_to_hf[mapped[: -len(".weight")]] = name

    def maybe_update_config(self, model_name: str, hf_config=None, revision=None) -> None:
        folder = Path(model_name)
        if folder.is_dir():
            validate_checkpoint(folder, hf_config)
        else:
            # A hub id: vLLM downloads later; the in-loader checks still name any bad tensor.
            log.info("duoserve: %s is not a local folder; header checks skipped, load-time checks apply",
                     model_name)

    def get_quant_method(self, layer, prefix: str):
        if not isinstance(layer, LinearBase):
            return None  # embeddings, lm_head, attention: dense, handled by vLLM
        modules = self.checkpoint_config.modules
        names = [self._vllm_to_hf.get(n, n) for n in hf_shard_names(prefix, self.packed_modules_mapping)]
        listed = [n in modules for n in names]
        if not any(listed):
            return UnquantizedLinearMethod()
        if not all(listed):
            raise CheckpointError(f"vLLM fuses {', '.join(names)} into {prefix}, but quantization_config.modules "
                                  f"lists only {[n for n in names if n in modules]}; prune all of them or none")
        serve = None if self._serve_thresholds is None else [self._serve_thresholds[n] for n in names]
        return DuoserveLinearMethod(self.checkpoint_config.weight_format,
                                    make_shards(names, [modules[n] for n in names]), prefix, self._summary,
                                    serve_thresholds=serve, weight_quant=self.checkpoint_config.weight_quant)
