"""Shared fixtures: tiny real models built locally; the hub is never contacted."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))

from tiny_model import build_tiny_llama  # noqa: E402


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A random 2-layer Llama HF folder (bf16, hidden 128, GQA 2/1, vocab 1024) with a tokenizer."""
    return build_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama")
