"""The tiny Llama pruned fast, for the tests that need a checkpoint with activation thresholds."""
from __future__ import annotations

from pathlib import Path

from duoserve.prune.api import PruneConfig, prune_model

# Few short windows; 8 for the thresholds so that each p_x of the grid is calibrated on enough tokens.
FAST = dict(nsamples=4, seqlen=64, threshold_nsamples=8, batch_size=2)


def prune_tiny(model_dir: Path, out: Path, **config) -> Path:
    """Magnitude pruning of model_dir into out with FAST (config overrides or adds PruneConfig fields)."""
    prune_model(PruneConfig(output=out, model=str(model_dir), **{"method": "magnitude", **FAST, **config}))
    return out
