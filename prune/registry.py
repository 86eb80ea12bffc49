"""The method registry: one file per algorithm in prune/methods/, one registered name each.

A method only observes statistics and solves (SparseGPT's add_batch / fasterprune split); the
sequential engine (prune/engine.py) owns hooks, devices, calibration streams and layer order.

To add a method: create prune/methods/<name>.py with a `PruningMethod` subclass decorated with
`@register("<name>")`, an `Options` dataclass for its hyperparameters (they become CLI flags),
and a `LinearObserver` that accumulates what it needs in `add_batch` and returns the pruned
weight from `prune`. Nothing else changes.
"""
from __future__ import annotations

import abc
import dataclasses
import importlib
import pkgutil
from typing import Any, ClassVar

import torch

from duoserve.errors import InputError
from duoserve.prune.sparsity import SparsityTarget

_REGISTRY: dict[str, type["PruningMethod"]] = {}


class LinearObserver(abc.ABC):
    """Statistics of one target linear's calibration inputs, then its pruning solve."""

    def add_batch(self, x: torch.Tensor, x_dense: torch.Tensor | None) -> None:
        """x: [T, K] fp32 input of this linear in the pruned model (before activation sparsity);
        x_dense: [T, K] the same tokens' input in the dense model (only if needs_dense_stream)."""

    @abc.abstractmethod
    def prune(self, weight: torch.Tensor):
        """weight: [N, K] fp32 -> the pruned (and possibly updated) weight, zeros where pruned.

        A method with joint_quantization returns (weight, scales) when its `quantize` is set: the
        kept weights dequantized from their codes and the scales [N, ceil(K/G)] (the engine rounds
        the others' results to the nearest level itself, duoserve.format.quant)."""


@dataclasses.dataclass(frozen=True)
class NoOptions:
    pass


class PruningMethod(abc.ABC):
    """Base class of registered methods. Subclasses set the class attributes below."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    needs_calibration: ClassVar[bool] = True
    needs_dense_stream: ClassVar[bool] = False
    # True: quantizes the kept weights inside its own solve when `quantize` is set (OBS methods);
    # False: the engine rounds its result to the nearest level (round to nearest, RTN).
    joint_quantization: ClassVar[bool] = False
    Options: ClassVar[type] = NoOptions
    # Values stored as int4/int8 (duoserve prune --quantize), set by the caller; None: float values.
    quantize = None

    def __init__(self, target: SparsityTarget, activation_sparsity: float = 0.0, options: Any = None):
        self.target = target
        self.activation_sparsity = activation_sparsity
        self.options = options if options is not None else self.Options()

    @abc.abstractmethod
    def observer(self, name: str, linear: torch.nn.Linear) -> LinearObserver:
        """A fresh observer for one target linear of the layer being pruned."""

    def describe(self) -> dict[str, Any]:
        """Hyperparameters recorded in the checkpoint metadata."""
        return dataclasses.asdict(self.options)


def register(name: str):
    def wrap(cls: type[PruningMethod]) -> type[PruningMethod]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"pruning method {name!r} registered twice")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def _load_builtin_methods() -> None:
    from duoserve.prune import methods

    for info in pkgutil.iter_modules(methods.__path__):
        importlib.import_module(f"{methods.__name__}.{info.name}")


def available_methods() -> dict[str, type[PruningMethod]]:
    _load_builtin_methods()
    return dict(sorted(_REGISTRY.items()))


def get_method(name: str) -> type[PruningMethod]:
    methods = available_methods()
    if name not in methods:
        raise InputError(f"unknown method {name!r}; valid methods: {', '.join(methods)}")
    return methods[name]


def build_options(method: type, given: dict[str, Any], kind: str = "method", flag_prefix: str = "") -> Any:
    """Options of a registered class (a method, or a refiner: `kind`) from user values (None = not
    given); rejects options it lacks, naming the CLI flags (`--<flag_prefix><option>`)."""
    fields = {f.name for f in dataclasses.fields(method.Options)}
    unknown = sorted(k for k, v in given.items() if v is not None and k not in fields)
    if unknown:
        flags = ", ".join("--" + flag_prefix + k.replace("_", "-") for k in unknown)
        raise InputError(f"{flags} do(es) not apply to {kind} {method.name!r} "
                         f"(its options: {', '.join(sorted(fields)) or 'none'})")
    try:
        return method.Options(**{k: v for k, v in given.items() if v is not None and k in fields})
    except (TypeError, ValueError) as e:
        raise InputError(f"{kind} {method.name!r}: {e}") from e
