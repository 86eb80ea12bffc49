"""Training-free refiners applied after any pruning method (`duoserve prune --refine NAME`).

A refiner changes the mask that a base method produced, keeping its sparsity exactly (DSnoT's
prune-and-grow swaps one weight for another in the same row, and the same N:M group). It needs the
layer's calibration statistics, so it observes the same batches as the base method.

The engine needs no special case: `RefinedMethod` wraps the base method and looks like one to the
engine (prune/registry.py); its observers feed every batch to both the base observer and the
refiner's, then call `refine(dense, pruned)` on the base's result. One file per refiner in this
folder, registered with `@register_refiner(NAME)`; its `Options` dataclass becomes
`--refine-<option>` flags in the CLI.
"""
from __future__ import annotations

import abc
import dataclasses
import importlib
import pkgutil
from typing import Any, ClassVar

import torch

from duoserve.errors import InputError
from duoserve.prune.registry import LinearObserver, NoOptions, PruningMethod, build_options

_REFINERS: dict[str, type["Refiner"]] = {}


class RefineObserver(abc.ABC):
    """Statistics for one target linear, then the refinement of the base method's result."""

    def add_batch(self, x: torch.Tensor, x_dense: torch.Tensor | None) -> None:
        """Same arguments as LinearObserver.add_batch."""

    @abc.abstractmethod
    def refine(self, dense: torch.Tensor, pruned: torch.Tensor) -> torch.Tensor:
        """dense: [N, K] fp32 weight before pruning; pruned: the base method's result -> refined weight."""


class Refiner(abc.ABC):
    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions

    def __init__(self, options: Any = None):
        self.options = options if options is not None else self.Options()

    @abc.abstractmethod
    def observer(self, method: PruningMethod, name: str, linear: torch.nn.Linear) -> RefineObserver:
        """A fresh refine observer for one target linear pruned by `method`."""

    def describe(self) -> dict[str, Any]:
        return dataclasses.asdict(self.options)


def register_refiner(name: str):
    def wrap(cls: type[Refiner]) -> type[Refiner]:
        if name in _REFINERS and _REFINERS[name] is not cls:
            raise ValueError(f"refiner {name!r} registered twice")
        cls.name = name
        _REFINERS[name] = cls
        return cls

    return wrap


def available_refiners() -> dict[str, type[Refiner]]:
    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")
    return dict(sorted(_REFINERS.items()))


def get_refiner(name: str) -> type[Refiner]:
    refiners = available_refiners()
    if name not in refiners:
        raise InputError(f"unknown refiner {name!r}; valid refiners: {', '.join(refiners)}")
    return refiners[name]


def build_refiner(name: str, given: dict[str, Any]) -> Refiner:
    cls = get_refiner(name)
    return cls(build_options(cls, given, kind="refiner", flag_prefix="refine-"))


class _RefinedObserver(LinearObserver):
    def __init__(self, base: LinearObserver, refine: RefineObserver):
        self.base, self.refine_obs = base, refine

    def add_batch(self, x, x_dense):
        self.base.add_batch(x, x_dense)
        self.refine_obs.add_batch(x, x_dense)

    def prune(self, weight):
        dense = weight.clone()
        return self.refine_obs.refine(dense, self.base.prune(weight))


class RefinedMethod(PruningMethod):
    """A base method followed by a refiner, presented to the engine as one method.

    Mirrors the base's target, activation sparsity, options, name and dense-stream need; always
    needs calibration (a refiner reads the inputs' statistics even after magnitude pruning).
    """

    def __init__(self, base: PruningMethod, refiner: Refiner):  # noqa: D107 - no super(): mirrors base
        self.base, self.refiner = base, refiner
        self.target, self.activation_sparsity, self.options = base.target, base.activation_sparsity, base.options
        self.name = base.name
        self.summary = f"{base.summary}, then {refiner.name}"
        self.needs_calibration = True
        self.needs_dense_stream = base.needs_dense_stream

    def observer(self, name, linear):
        return _RefinedObserver(self.base.observer(name, linear), self.refiner.observer(self.base, name, linear))

    def describe(self):
        return self.base.describe()
