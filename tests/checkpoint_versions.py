"""Older checkpoint formats for compatibility tests, made from a current checkpoint."""
from __future__ import annotations

import json
import shutil
from pathlib import Path


def as_format_v1(src: Path, dst: Path) -> Path:
    """A copy of `src` as a format-1 checkpoint (what duoserve wrote before threshold grids): the
    same tensors and metadata without `activation_sparsity.grid` and `modules[*].act_threshold_grid`,
    format_version 1, a fresh manifest."""
    from duoserve.format.manifest import write_manifest

    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    q = cfg["quantization_config"]
    q["format_version"] = 1
    q["activation_sparsity"].pop("grid", None)
    for module in q["modules"].values():
        module.pop("act_threshold_grid", None)
    (dst / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    write_manifest(dst)
    return dst
