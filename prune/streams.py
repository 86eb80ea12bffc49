"""Calibration streams: the hidden states entering each decoder layer, and how to run one layer.

`capture_layer_inputs` runs the model's embedding on every calibration batch with each decoder
layer replaced by a recorder that passes its input through unchanged. That yields the inputs of
layer 0 for every batch and, for every layer, the keyword arguments the model would pass it
(attention masks, rotary embeddings, ...: Gemma3 uses different ones per layer type), without
running any real layer. The final norm raises to skip the LM head.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from duoserve.prune.architectures import decoder_layers


class StopForward(Exception):
    """Raised by a hook to end a forward pass early once the needed inputs are recorded."""


class _LayerRecorder(nn.Module):
    def __init__(self, index: int, streams: "Streams"):
        super().__init__()
        self.index, self.streams = index, streams

    def forward(self, hidden_states, *args, **kwargs):
        if self.index == 0:
            self.streams.batches.append(hidden_states.detach())
        if self.index not in self.streams.layer_kwargs:
            kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value", "use_cache")}
            self.streams.layer_kwargs[self.index] = kwargs
        return hidden_states


@dataclass
class Streams:
    """Per-batch hidden states [b, T, d] entering the current layer, and per-layer kwargs."""

    batches: list[torch.Tensor] = field(default_factory=list)
    layer_kwargs: dict[int, dict[str, Any]] = field(default_factory=dict)


def _move(obj, device, dtype):
    if isinstance(obj, torch.Tensor):
        return obj.to(device=device, dtype=dtype if obj.is_floating_point() else None)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_move(o, device, dtype) for o in obj)
    if isinstance(obj, dict):
        return {k: _move(v, device, dtype) for k, v in obj.items()}
    return obj


@torch.no_grad()
def batch_size_dividing(n: int, requested: int) -> int:
    """The largest batch size <= requested that divides n: all batches must share a shape (the
    captured masks and rotary tables are per batch shape)."""
    b = max(1, min(requested, n))
    while n % b:
        b -= 1
    return b


def capture_layer_inputs(model: nn.Module, windows: torch.Tensor, batch_size: int, device, dtype) -> Streams:
    """Inputs of decoder layer 0 for every batch of `windows` [S, T], plus each layer's kwargs.

    Batches hold batch_size_dividing(S, batch_size) windows each."""
    batch_size = batch_size_dividing(windows.shape[0], batch_size)
    layers = decoder_layers(model)
    streams = Streams()
    originals = list(layers)
    for i in range(len(layers)):
        layers[i] = _LayerRecorder(i, streams)

    def stop(*_):
        raise StopForward

    def to_calibration_dtype(module, args, output):
        # Cast right after the embedding so rotary tables and masks are built in `dtype` too.
        return output.to(dtype)

    handle = model.model.norm.register_forward_pre_hook(stop)
    embed_handle = model.model.embed_tokens.register_forward_hook(to_calibration_dtype)
    try:
        for start in range(0, windows.shape[0], batch_size):
            batch = windows[start:start + batch_size].to(model.device)
            try:
                model(input_ids=batch, use_cache=False)
            except StopForward:
                pass
    finally:
        handle.remove()
        embed_handle.remove()
        for i, layer in enumerate(originals):
            layers[i] = layer
    streams.batches = [_move(b, device, dtype) for b in streams.batches]
    streams.layer_kwargs = {i: _move(kw, device, dtype) for i, kw in streams.layer_kwargs.items()}
    return streams


def run_layer(layer: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    """One decoder layer forward; transformers 5 returns a tensor, older versions a tuple."""
    out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


class InputRecorder:
    """Forward pre-hooks that hand each linear's input [T, K] to a callback, and can stop the
    forward pass once every watched linear has run (so a group's inputs cost only the part of
    the layer before it)."""

    def __init__(self, linears: dict[str, nn.Linear], callback, stop_when_done: bool = True):
        self.linears, self.callback, self.stop_when_done = linears, callback, stop_when_done
        self._seen: set[str] = set()
        self._handles = []

    def _hook(self, name):
        def pre_hook(module, args):
            x = args[0]
            self.callback(name, x.reshape(-1, x.shape[-1]))
            self._seen.add(name)
            if self.stop_when_done and self._seen == set(self.linears):
                raise StopForward

        return pre_hook

    def run(self, layer: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any]) -> None:
        self._seen.clear()
        try:
            run_layer(layer, hidden, kwargs)
        except StopForward:
            pass

    def __enter__(self):
        # prepend: record the input before any activation-sparsity pre-hook rewrites it
        for name, linear in self.linears.items():
            self._handles.append(linear.register_forward_pre_hook(self._hook(name), prepend=True))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
