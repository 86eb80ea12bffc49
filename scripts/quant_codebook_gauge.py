"""Gauge for issue 31: would another int4 grid (a codebook per linear, or a zero point per group)
beat the format's symmetric uniform one inside the joint prune + quantize?

Runs `duoserve prune` (the arguments after the mode, without --quantize) with the OBS methods'
solve patched to quantize jointly to int4, group 128, on a 16-level table: `uniform` is the
format's grid (c - 7.5) * scale, the same path as `--quantize int4`; `lloyd` fits, per linear, 16
levels to the float solve's kept weights in units of their group scale (a 1-D k-means weighted by
diag(H), the weight of a column's error in the objective, started from the uniform grid), then runs
the joint solve and the scale refit on those levels; `asymmetric` puts each group's 16 uniform levels
from its smallest to its largest kept weight (min + c * scale, min stored per group: +2/G bytes per
weight), and the refit scales the levels and the offset together. The checkpoint holds the
dequantized values as bf16 (the format stores neither), so it is evaluated like any bf16 checkpoint:

    python scripts/quant_codebook_gauge.py lloyd smollm2-135m --method duogpt --sparsity 0.5 \
        --activation-sparsity 0.5 --nsamples 16 --seqlen 512 -o OUT
    duoserve eval ppl OUT --activation-mode threshold --max-windows 10 --dtype bfloat16
"""
import sys

import torch

import duoserve.prune.methods.sparsegpt as sparsegpt
import duoserve.prune.obs as obs
from duoserve.format.quant import expand_groups, group_scales
from duoserve.format.schema import WeightQuant

QUANT = WeightQuant(4, 128)
UNIFORM = torch.arange(16, dtype=torch.float32) - 7.5


def lloyd_levels(u: torch.Tensor, weight: torch.Tensor, iterations: int = 30) -> torch.Tensor:
    """16 sorted levels minimising sum weight * (u - nearest level)^2 (Lloyd's algorithm)."""
    levels = UNIFORM.clone()
    for _ in range(iterations):
        nearest = torch.bucketize(u, (levels[1:] + levels[:-1]) / 2)
        total = torch.zeros(16).index_add_(0, nearest, u * weight)
        mass = torch.zeros(16).index_add_(0, nearest, weight)
        levels = torch.sort(torch.where(mass > 0, total / mass.clamp_min(1e-30), levels)).values
    return levels


class TableScales(obs._GroupScales):
    """The joint solve's rounding onto a table of levels (in units of the group scale)."""

    def __init__(self, quant, scales, perm, levels):
        super().__init__(quant, scales, perm)
        self.levels, self.bounds = levels, (levels[1:] + levels[:-1]) / 2

    def quantize(self, w, col):
        s = self.scales[:, self.col_group[col]]
        q = self.levels[torch.bucketize(w / s, self.bounds)] * s
        return torch.where(w != 0, q, torch.zeros_like(q))


class OffsetScales(obs._GroupScales):
    """The joint solve's rounding onto per-group asymmetric grids: low + c * scale, c in [0, 16)."""

    def __init__(self, quant, scales, perm, lows):
        super().__init__(quant, scales, perm)
        self.lows = lows.float()  # [N, ceil(K/G)] (float16 values)

    def quantize(self, w, col):
        g = self.col_group[col]
        s, low = self.scales[:, g], self.lows[:, g]
        c = torch.round((w - low) / s).clamp_(0, 15)
        q = low + c * s
        # a grid may have a level at 0: a kept weight there takes the neighbouring level on its side
        # (the format's "non-zero iff kept")
        aside = low + torch.where(w > q, c + 1, c - 1).clamp_(0, 15) * s
        q = torch.where(q == 0, aside, q)
        return torch.where(w != 0, q, torch.zeros_like(q))


def asymmetric_grid(floating: torch.Tensor, kept: torch.Tensor):
    """Per row and group: (scale = (max - min) / 15, low = min) over the kept weights, as float16."""
    n, k = floating.shape
    pad = (-k) % QUANT.group_size
    inf = torch.tensor(float("inf"))
    hi = torch.nn.functional.pad(torch.where(kept, floating, -inf), (0, pad), value=-float("inf"))
    lo = torch.nn.functional.pad(torch.where(kept, floating, inf), (0, pad), value=float("inf"))
    hi, lo = hi.view(n, -1, QUANT.group_size).amax(-1), lo.view(n, -1, QUANT.group_size).amin(-1)
    empty = ~torch.isfinite(lo)
    lo, hi = torch.where(empty, 0.0, lo), torch.where(empty, 0.0, hi)
    scales = ((hi - lo) / 15).to(torch.float16).clamp_min(obs.MIN_SCALE)
    return scales, lo.to(torch.float16)


def make_joint_solve(mode: str, float_solve):
    @torch.no_grad()
    def joint_solve(weight, stats, target, settings, mask=None, quant=None):
        if quant is not None:
            sys.exit("run the gauge without --quantize: it quantizes itself")
        weight, stats, settings = obs.ridge_residual_first(weight, stats, settings)
        floating = float_solve(weight, stats, target, settings, mask=mask)
        kept = floating != 0
        if mode == "asymmetric":
            scales, lows = asymmetric_grid(floating, kept)
            grid = OffsetScales(QUANT, scales, None, lows)
        else:
            scales = group_scales(floating, QUANT.bits, QUANT.group_size, kept)
            levels = UNIFORM
            if mode == "lloyd":
                units = (floating / expand_groups(scales.float(), weight.shape[1], QUANT.group_size))[kept]
                importance = stats.H.diagonal().float().clamp_min(0).expand_as(floating)[kept] + 1e-12
                levels = lloyd_levels(units, importance)
            grid = TableScales(QUANT, scales, None, levels)
        rounded = obs._obs_solve(weight, stats, target, settings, mask if mask is not None else ~kept, grid)
        # the refit reads each kept weight's level as W / scale, so it refits any table of levels
        return obs.refit_scales(rounded, scales, weight, stats, settings, QUANT)[0]
    return joint_solve


if __name__ == "__main__":
    if len(sys.argv) < 3 or sys.argv[1] not in ("uniform", "lloyd", "asymmetric"):
        sys.exit(__doc__)
    sparsegpt.obs_prune = make_joint_solve(sys.argv[1], obs.obs_prune)
    from duoserve.cli import main
    sys.exit(main(["prune", *sys.argv[2:]]))
