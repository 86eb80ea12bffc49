"""Perplexity with the standard protocol (docs/evaluation.md): the evaluation text tokenized once,
cut into non-overlapping windows of `seqlen` tokens, mean next-token NLL over all predicted
tokens, exp. Models whose family expects a BOS at the start of every sequence (Gemma) get one
per window (the window then holds seqlen - 1 text tokens; duoserve.prune.architectures.bos_for).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from duoserve.errors import InputError


def make_windows(ids: torch.Tensor, seqlen: int, bos_id: int | None = None,
                 max_windows: int | None = None) -> torch.Tensor:
    """[n_windows, seqlen] from a 1-D token stream; BOS-prefixed windows when bos_id is given."""
    if seqlen < 2:
        raise InputError(f"--seqlen {seqlen} is too short to measure perplexity (need >= 2)")
    body = seqlen - 1 if bos_id is not None else seqlen
    if ids.numel() > 0 and bos_id is not None and int(ids[0]) == bos_id:
        ids = ids[1:]
    n = ids.numel() // body
    if n == 0:
        raise InputError(f"the evaluation text has {ids.numel()} tokens, fewer than one window of {seqlen}; "
                         "use a longer text or a smaller --seqlen")
    if max_windows is not None:
        n = min(n, max_windows)
    windows = ids[: n * body].view(n, body)
    if bos_id is not None:
        windows = torch.cat([torch.full((n, 1), bos_id, dtype=ids.dtype), windows], dim=1)
    return windows


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch_size: int = 1, desc: str = "perplexity") -> dict:
    """Perplexity over all windows, and each window's mean NLL (window_nll): two models evaluated on
    the same windows are compared by their per-window differences (paired_nll_difference), whose
    spread says whether a gap is larger than the text's own variation."""
    device = next(model.parameters()).device
    window_nll: list[float] = []
    for start in tqdm(range(0, windows.shape[0], batch_size), desc=desc, unit="batch"):
        batch = windows[start:start + batch_size].to(device)  # [b, T]
        logits = model(input_ids=batch, use_cache=False).logits.float()  # [b, T, V]
        nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="none")
        window_nll += nll.view(batch.shape[0], -1).mean(dim=1).tolist()
    total_tokens = windows.shape[0] * (windows.shape[1] - 1)
    mean = sum(window_nll) / len(window_nll)  # every window predicts the same number of tokens
    return {"ppl": math.exp(mean), "mean_nll": mean, "windows": int(windows.shape[0]), "tokens": total_tokens,
            "window_nll": window_nll}


def paired_nll_difference(a: list[float], b: list[float]) -> dict:
    """How much lower b's NLL is than a's on the same windows: the mean per-window difference
    (a - b), its standard error, and the perplexity ratio exp(b - a) with a ~95% interval
    (+-2 standard errors). Needs at least two windows, the same ones in the same order."""
    if len(a) != len(b) or len(a) < 2:
        raise ValueError(f"paired comparison needs the same windows (>= 2) on both sides, got {len(a)} and {len(b)}")
    d = [x - y for x, y in zip(a, b)]
    n = len(d)
    mean = sum(d) / n
    se = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1) / n)
    return {"windows": n, "mean": mean, "se": se, "ppl_ratio": math.exp(-mean),
            "ppl_ratio_interval": (math.exp(-mean - 2 * se), math.exp(-mean + 2 * se))}
