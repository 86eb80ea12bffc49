"""Calibration windows: seeded draws of real text, BOS-prefixed for models that expect one."""
from __future__ import annotations

import types

import torch
from transformers import AutoTokenizer

from duoserve.prune.data import calibration_windows
from duoserve.prune.perplexity import bos_for


def test_windows_start_with_bos_when_the_model_expects_one(tmp_path, tiny_llama_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    text = tmp_path / "calib.txt"
    text.write_text("\n".join(f"document {i} says something about topic {i % 7} and more words" for i in range(200)))
    plain, _ = calibration_windows(str(text), tokenizer, 6, 32, seed=3)
    with_bos, desc = calibration_windows(str(text), tokenizer, 6, 32, seed=3, bos_id=5)
    assert with_bos.shape == plain.shape == (6, 32)
    assert (with_bos[:, 0] == 5).all() and "BOS-prefixed" in desc
    assert torch.equal(with_bos[:, 1:], plain[:, :-1])  # the same draw, one text token shorter


def test_gemma_models_get_a_bos_and_llama_models_do_not():
    tokenizer = types.SimpleNamespace(bos_token_id=2)
    gemma = types.SimpleNamespace(config=types.SimpleNamespace(model_type="gemma3_text"))
    llama = types.SimpleNamespace(config=types.SimpleNamespace(model_type="llama"))
    assert bos_for(gemma, tokenizer) == 2 and bos_for(llama, tokenizer) is None
