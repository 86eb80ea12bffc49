"""Fixtures of the pruning tests."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from pruning_helpers import prune_tiny  # noqa: E402


@pytest.fixture(scope="session")
def magnitude_w50x50(tiny_llama_dir, tmp_path_factory) -> Path:
    """The tiny Llama, magnitude W50% pruned for p_x 0.5 (pruning_helpers.FAST), pruned once for the
    session: read it, copy it, or write next to it, never into it."""
    return prune_tiny(tiny_llama_dir, tmp_path_factory.mktemp("x50") / "w50x50", activation_sparsity=0.5)
