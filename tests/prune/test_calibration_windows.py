"""Calibration windows: seeded draws of real text, BOS-prefixed for models that expect one."""
from __future__ import annotations

import types

import torch
from transformers import AutoTokenizer

from duoserve.evaluation.texts import evaluation_text
from duoserve.prune.architectures import bos_for
from duoserve.prune.data import calibration_windows


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


class _CountingTokenizer:
    """Every token of the stream is a distinct integer, so a window's tokens say where it lies."""
    eos_token_id = None

    def __init__(self):
        self.next = 0

    def __call__(self, text, add_special_tokens=False):
        n = len(text.split())
        ids = list(range(self.next, self.next + n))
        self.next += n
        return {"input_ids": ids}


def test_windows_never_share_text(tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text("\n".join("word " * 50 for _ in range(100)))  # 5,000 tokens
    for seed in range(5):
        windows, _ = calibration_windows(str(text), _CountingTokenizer(), 16, 64, seed=seed)
        tokens = windows.flatten().tolist()
        assert len(set(tokens)) == len(tokens)  # no token in two windows
        assert windows.shape == (16, 64) and (windows[:, 1:] - windows[:, :-1] == 1).all()  # contiguous text


def test_too_short_text_overlaps_with_a_warning(tmp_path, caplog):
    text = tmp_path / "calib.txt"
    text.write_text("word " * 100)
    with caplog.at_level("WARNING"):
        windows, _ = calibration_windows(str(text), _CountingTokenizer(), 4, 64, seed=0)
    assert windows.shape == (4, 64) and "windows overlap" in caplog.text


def test_calibration_never_reads_the_held_out_documents(monkeypatch):
    """Settings are chosen on `c4-heldout`: no token of it may be calibrated on, at any calibration size."""
    from duoserve.prune import data

    docs = [f"doc{i} " + "word " * 40 for i in range(40)]  # 41 tokens each
    monkeypatch.setattr(data, "_source_documents", lambda source: (docs, "fake c4"))
    fit, heldout = data.split_heldout(docs)
    assert len(heldout) == 10 and fit + heldout == docs
    text, desc = evaluation_text("c4-heldout")
    assert text == "\n\n".join(docs[30:]) and "held-out" in desc
    tokenizer = _CountingTokenizer()
    windows, desc = calibration_windows("c4", tokenizer, 40, 64, seed=0)  # asks for more than the fit split holds
    fit_tokens = sum(len(d.split()) for d in fit)
    assert int(windows.max()) < fit_tokens and "held out" in desc
