"""Pruned models in-process: a duoserve checkpoint loaded back as a transformers model (or a dense
model from model_sources.py), with activation sparsity applied as configured. What evaluation
(duoserve.evaluation) and the tests run; the dense models that pruning starts from come from
model_sources.py.

`load_pruned_model(path)` validates the checkpoint, rebuilds the transformers model with exactly
the pruned weights, and installs activation sparsity on the target linears:
- "threshold": x * (|x| > t) with the checkpoint's per-linear thresholds (what is served);
- "topk": per token, the p_x smallest-|x| inputs zeroed (the papers' evaluation rule);
- "off": dense activations.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from duoserve.errors import InputError
from duoserve.format.io import LoadedCheckpoint, load_checkpoint, read_quant_config
from duoserve.format.schema import is_duoserve_checkpoint
from duoserve.format.thresholds import describe_selection, select_thresholds
from duoserve.prune.activation import ACTIVATION_MODES, ActivationSparsity
from duoserve.prune.architectures import model_targets

log = logging.getLogger(__name__)


def default_activation_mode(ckpt: LoadedCheckpoint) -> str:
    return "threshold" if ckpt.qconfig.activation_sparsity.rule == "threshold" else "off"


def install_activation_sparsity(model, mode: str, *, targets, p: float = 0.0,
                                thresholds: dict[str, float] | None = None, record: bool = True):
    """Attach sparsity hooks to the model's target linears (kept as model.duoserve_sparsity)."""
    if mode not in ACTIVATION_MODES:
        raise InputError(f"activation mode {mode!r} is not one of {', '.join(ACTIVATION_MODES)}")
    if mode == "off":
        model.duoserve_sparsity = None
        return None
    modules = model_targets(model, tuple(targets))
    if mode == "threshold":
        missing = sorted(set(modules) - set(thresholds or {}))
        if missing:
            raise InputError(f"threshold mode needs a threshold for every target; missing {missing[0]} "
                             f"(and {len(missing) - 1} more)")
    if mode == "topk" and not 0 < p < 1:
        raise InputError(f"topk activation sparsity needs 0 < p_x < 1, got {p}")
    sparsity = ActivationSparsity(modules, mode, p=p, thresholds=thresholds, record=record).__enter__()
    model.duoserve_sparsity = sparsity
    return sparsity


def load_pruned_model(path: str | Path, activation_mode: str | None = None, dtype: str = "float32",
                      activation_sparsity: float | None = None, verify: bool = True, allocation: str = "uniform"):
    """(model, tokenizer, LoadedCheckpoint) for a duoserve checkpoint folder.

    activation_mode None = threshold mode when activation_sparsity is given, else the checkpoint's
    own rule (threshold if it has thresholds, else off). activation_sparsity overrides p_x (default:
    the checkpoint's target): in "threshold" mode the thresholds come from the checkpoint's grid as
    `duoserve serve --activation-sparsity` selects them (duoserve.format.thresholds); in "topk" mode
    it is the fraction dropped per token. allocation "greedy": activation_sparsity (default: the
    target) is the average p_x, each linear's own p_x from the checkpoint's allocation table.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if allocation != "uniform":
        if activation_mode not in (None, "threshold"):
            raise InputError(f"--allocation {allocation} selects per-linear thresholds; it needs "
                             f"--activation-mode threshold, not {activation_mode}")
        q0 = read_quant_config(Path(path))[1]
        if activation_sparsity is None:
            activation_sparsity = q0.activation_sparsity.target
        select_thresholds(q0, activation_sparsity, path, allocation)  # fail before loading
    elif activation_mode in (None, "threshold") and activation_sparsity is not None:
        select_thresholds(read_quant_config(Path(path))[1], activation_sparsity, path)  # fail before loading
    ckpt = load_checkpoint(Path(path), verify=verify)
    config = AutoConfig.for_model(**{k: v for k, v in ckpt.config.items() if k != "transformers_version"})
    torch_dtype = getattr(torch, dtype)
    model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    state = {k: v.to(torch_dtype) if v.is_floating_point() else v for k, v in ckpt.state_dict.items()}
    result = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    missing = sorted(set(result.missing_keys) - tied)
    if missing or result.unexpected_keys:
        raise InputError(f"{path}: the checkpoint's tensors do not match a {type(model).__name__}: "
                         f"missing {missing[:3]}, unexpected {result.unexpected_keys[:3]}")
    if tied:
        model.tie_weights()
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    q = ckpt.qconfig
    mode = activation_mode or ("threshold" if activation_sparsity is not None else default_activation_mode(ckpt))
    p = q.activation_sparsity.target if activation_sparsity is None else activation_sparsity
    thresholds = ckpt.thresholds  # the act_threshold tensors: exactly what vLLM loads at the default p_x
    if allocation != "uniform":
        thresholds = select_thresholds(q, p, path, allocation)
        log.info("%s: %s", path, describe_selection(q, p, allocation))
    elif mode == "threshold" and activation_sparsity is not None and not (
            p == q.activation_sparsity.target and q.activation_sparsity.rule == "threshold"):
        thresholds = select_thresholds(q, p, path)  # raises InputError for a p_x the checkpoint lacks
        log.info("%s: %s", path, describe_selection(q, p))
    elif mode == "threshold" and q.activation_sparsity.rule != "threshold":
        log.warning("%s has no calibrated thresholds (activation sparsity was off when pruned): "
                    "threshold mode keeps every non-zero input%s", path,
                    "" if q.activation_sparsity.grid is None else "; pass --activation-sparsity P to use its grid")
    install_activation_sparsity(model, mode, targets=q.targets, p=p, thresholds=thresholds)
    return model, tokenizer, ckpt


def load_any_model(path_or_id: str | None, activation_mode: str | None = None, dtype: str = "float32",
                   activation_sparsity: float | None = None, allocation: str = "uniform"):
    """A duoserve checkpoint via load_pruned_model, or a dense HF model (optionally with top-k
    activation sparsity for dense-weight baselines). Returns (model, tokenizer, ckpt_or_None)."""
    if path_or_id is not None and is_duoserve_checkpoint(path_or_id):
        return load_pruned_model(path_or_id, activation_mode, dtype, activation_sparsity, allocation=allocation)
    if allocation != "uniform":
        raise InputError(f"--allocation {allocation} needs a duoserve checkpoint with an allocation table; "
                         f"{path_or_id or 'the default model'} is a dense model")
    from duoserve.format import DEFAULT_TARGETS
    from duoserve.prune.model_sources import load_model_and_tokenizer

    model, tokenizer, _ = load_model_and_tokenizer(path_or_id, dtype=dtype)
    mode = activation_mode or "off"
    if mode == "threshold":
        raise InputError("threshold mode needs a duoserve checkpoint with calibrated thresholds; "
                         "for a dense model use --activation-mode topk --activation-sparsity P")
    install_activation_sparsity(model, mode, targets=DEFAULT_TARGETS, p=activation_sparsity or 0.0)
    return model, tokenizer, None
