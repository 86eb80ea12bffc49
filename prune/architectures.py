"""Which models the sequential engine can prune, and where their target linears are.

Llama-family decoder-only models (Llama, Mistral, Qwen2/3, Gemma3 text) share the layout
`model.model.layers[i].{self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj}`. Inside a layer the
linears are pruned in SparseGPT's "true sequential" order, each group seeing the inputs produced
by the already-pruned groups before it.
"""
from __future__ import annotations

from torch import nn

from duoserve.errors import InputError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")

# True-sequential order inside a decoder layer (projection names).
SEQUENTIAL_GROUPS = (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",))


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    model_type = getattr(model.config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise InputError(f"model type {model_type!r} is not supported by the pruning engine "
                         f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise InputError(f"{type(model).__name__} has no model.layers decoder stack; cannot prune it layer by layer")
    return layers


def layer_targets(layer: nn.Module, targets: tuple[str, ...]) -> dict[str, nn.Linear]:
    """Relative name (e.g. 'self_attn.q_proj') -> linear, for every target projection of a layer."""
    found = {name: m for name, m in layer.named_modules()
             if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in targets}
    missing = sorted(set(targets) - {n.rsplit(".", 1)[-1] for n in found})
    if missing:
        raise InputError(f"decoder layer {type(layer).__name__} has no linear named {', '.join(missing)}; "
                         "choose --targets among its projections")
    return found


def sequential_groups(found: dict[str, nn.Linear]) -> list[list[str]]:
    """The layer's target linears grouped in true-sequential order."""
    groups = []
    for group in SEQUENTIAL_GROUPS:
        names = [n for n in found if n.rsplit(".", 1)[-1] in group]
        if names:
            groups.append(names)
    return groups


def model_targets(model: nn.Module, targets: tuple[str, ...]) -> dict[str, nn.Linear]:
    """Full module name -> linear for every target of every decoder layer."""
    layers = decoder_layers(model)
    prefix = next(name for name, m in model.named_modules() if m is layers)
    out = {}
    for i, layer in enumerate(layers):
        for rel, linear in layer_targets(layer, targets).items():
            out[f"{prefix}.{i}.{rel}"] = linear
    return out


def bos_for(model: nn.Module, tokenizer) -> int | None:
    """The BOS id when the model's family expects one at the start of every sequence (Gemma), else None.

    Calibration windows (duoserve.prune.data) and perplexity windows (duoserve.evaluation) then
    start with it, as serving does.
    """
    model_type = getattr(model.config, "model_type", "")
    return tokenizer.bos_token_id if model_type.startswith("gemma") else None
