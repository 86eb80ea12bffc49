"""The frontier's grid, validated, and the points it measures.

A *checkpoint* is (method, weight sparsity p_w, p_x it was pruned for); a *point* is a checkpoint
served at one activation sparsity (its stored threshold grid makes every serve-time p_x free of
re-pruning), or the dense model. Keys name the cached results in the work folder: each holds
every setting that changes that result, so a rerun with other settings computes anew beside the
old results instead of reusing them.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from duoserve.errors import InputError
from duoserve.workcache import slug

# The threshold grid a checkpoint stores (docs/checkpoint-format.md): p_x 0 to 0.9.
GRID_TOP = 0.9


def parse_fractions(text: str, option: str, *, top: float | None = None) -> tuple[float, ...]:
    """'0.4,0.5' -> (0.4, 0.5): each in [0, 1) (and <= top when given), sorted, duplicates refused."""
    values = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        try:
            v = float(part)
        except ValueError:
            raise InputError(f"{option}: {part!r} is not a number (expected comma-separated fractions "
                             "such as 0.4,0.5)") from None
        if not 0 <= v < 1:
            raise InputError(f"{option}: {part} is outside [0, 1)")
        if top is not None and v > top + 1e-9:
            raise InputError(f"{option}: {part} is above {top:g}, the top of the threshold grid a checkpoint "
                             f"stores (prune for it instead)")
        values.append(v)
    if not values:
        raise InputError(f"{option} needs at least one value")
    if len(set(values)) != len(values):
        raise InputError(f"{option}: {text!r} lists a value twice")
    return tuple(sorted(values))


def parse_methods(text: str, known: list[str]) -> tuple[str, ...]:
    methods = [m.strip() for m in str(text).split(",") if m.strip()]
    if not methods:
        raise InputError("--methods needs at least one method")
    unknown = [m for m in methods if m not in known]
    if unknown:
        raise InputError(f"--methods: unknown method {', '.join(map(repr, unknown))}; "
                         f"choose from {', '.join(sorted(known))}")
    if len(set(methods)) != len(methods):
        raise InputError(f"--methods: {text!r} lists a method twice")
    return tuple(methods)


def model_key(model: str | None) -> str:
    """A short name for the model in cache keys: 'default', or the folder/id's last part plus a
    hash of the whole string (two folders both called 'model' do not share results)."""
    if model is None:
        return "default"
    digest = hashlib.sha1(model.encode()).hexdigest()[:6]
    return f"{slug(Path(model.rstrip('/')).name)}-{digest}"


@dataclass(frozen=True)
class Checkpoint:
    method: str
    weight_sparsity: float
    pruned_px: float

    def key(self, model: str | None, nsamples: int, seqlen: int) -> str:
        return (f"{model_key(model)}-{self.method}-w{self.weight_sparsity:g}-x{self.pruned_px:g}"
                f"-n{nsamples}x{seqlen}")

    @property
    def label(self) -> str:
        return f"{self.method} W{self.weight_sparsity:g} (pruned for X{self.pruned_px:g})"


@dataclass(frozen=True)
class Point:
    """The dense model (checkpoint None) or a checkpoint served at p_x."""

    checkpoint: Checkpoint | None
    p_x: float = 0.0

    @property
    def dense(self) -> bool:
        return self.checkpoint is None

    @property
    def label(self) -> str:
        if self.checkpoint is None:
            return "dense"
        c = self.checkpoint
        return f"{c.method} W{c.weight_sparsity:g} X{self.p_x:g} (pruned for X{c.pruned_px:g})"


@dataclass(frozen=True)
class Grid:
    methods: tuple[str, ...]
    sparsities: tuple[float, ...]
    prune_px: tuple[float, ...] | None  # None: each checkpoint is pruned for p_x = its weight sparsity
    serve_px: tuple[float, ...]
    # (p_w, p_x pruned for) pairs pruned beside the grid, for every method (--also-prune)
    also_prune: tuple[tuple[float, float], ...] = ()
    checkpoints: tuple[Checkpoint, ...] = field(init=False)

    def __post_init__(self):
        ckpts = []
        for method in self.methods:
            for w in self.sparsities:
                for px in (self.prune_px if self.prune_px is not None else (w,)):
                    if px > GRID_TOP + 1e-9:
                        raise InputError(f"cannot prune for p_x {px:g} with --prune-px same: above the grid top "
                                         f"{GRID_TOP:g}")
                    ckpts.append(Checkpoint(method, w, px))
            ckpts += [Checkpoint(method, w, px) for w, px in self.also_prune
                      if Checkpoint(method, w, px) not in ckpts]
        # Method by method (in --methods order), then by p_w and the p_x pruned for: the table reads
        # W0.5 pruned for 0.3 next to W0.5 pruned for 0.5.
        order = {m: i for i, m in enumerate(self.methods)}
        ckpts.sort(key=lambda c: (order[c.method], c.weight_sparsity, c.pruned_px))
        object.__setattr__(self, "checkpoints", tuple(ckpts))

    def points(self) -> list[Point]:
        """Dense first, then each checkpoint at each serve-time p_x."""
        return [Point(None)] + [Point(c, px) for c in self.checkpoints for px in self.serve_px]


def parse_pairs(text: str | None, option: str) -> tuple[tuple[float, float], ...]:
    """'0.5:0.3,0.4:0.2' -> ((0.4, 0.2), (0.5, 0.3)): (p_w, p_x pruned for) pairs, each a fraction in
    [0, 1) and p_x at most the grid top; None or '' -> ()."""
    if text is None or not str(text).strip():
        return ()
    pairs = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        if part.count(":") != 1:
            raise InputError(f"{option}: {part!r} is not P_W:P_X (e.g. 0.5:0.3: weight sparsity 0.5 pruned for "
                             "activation sparsity 0.3)")
        w, px = part.split(":")
        pairs.append((parse_fractions(w, option)[0], parse_fractions(px, option, top=GRID_TOP)[0]))
    if len(set(pairs)) != len(pairs):
        raise InputError(f"{option}: {text!r} lists a pair twice")
    return tuple(sorted(pairs))


def build_grid(methods: str, sparsities: str, prune_px: str, serve_px: str, known_methods: list[str],
               also_prune: str | None = None) -> Grid:
    """The grid from the command-line strings; InputError (exit code 2) for anything unusable."""
    return Grid(methods=parse_methods(methods, known_methods),
                sparsities=parse_fractions(sparsities, "--sparsities"),
                prune_px=None if str(prune_px).strip() == "same" else parse_fractions(prune_px, "--prune-px",
                                                                                    top=GRID_TOP),
                serve_px=parse_fractions(serve_px, "--serve-px", top=GRID_TOP),
                also_prune=parse_pairs(also_prune, "--also-prune"))
