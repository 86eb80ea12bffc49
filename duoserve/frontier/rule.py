"""The operating-point rule: the fastest measured point at which the sparse model still answers.

A point (a checkpoint served at one activation sparsity p_x) *still answers* when both hold:

1. **Perplexity within MAX_PPL_RATIO of dense**, measured with the same evaluation (WikiText-2,
   the same windows, the same dtype) in the same run: ppl(point) <= MAX_PPL_RATIO * ppl(dense).
2. **Every fixed prompt gets a real greedy answer**: none of its greedy answers is empty
   (`is_empty`) or looping (`is_looping`).

Among the points that pass, the fastest is the one with the lowest batch-1 TPOT from the served
endpoint (what a single user feels, and what the quickstart prints); ties go to the lower
perplexity. Without speed measurements (`duoserve frontier --no-speed`) the rule ranks by a
stated proxy instead, the fraction of weight x activation products left,
(1 - p_w) * (1 - p_x) (smaller = faster), and says so in its reason.

Why 1.5x. The pruning papers treat 50% unstructured SparseGPT/Wanda on LLaMA-7B/13B as usable
models: their WikiText-2 perplexity rises 1.2-1.3x (LLaMA-7B 5.68 -> 7.22 SparseGPT, 7.26 Wanda;
LLaMA-2-7B 5.12 -> 6.51 / 6.42), while 2:4 at the same size (about 2x: 11.0-11.5) is where they
report clear degradation. 1.5x sits between the two: a loss the literature still ships, with
margin for the noise of a few evaluation windows. It is a bound on the text model, not a proof of
coherent chat, which is why the answers are checked too. The empty/looping check is what caught
issue 30's first run (the system prompt repeated four times; an empty answer in-process).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

# A point's perplexity may be at most this multiple of dense's (module docstring: why 1.5).
MAX_PPL_RATIO = 1.5
# An answer loops when one n-gram's non-overlapping repeats cover more than this share of its words.
LOOP_COVERAGE = 0.5
# Answers shorter than this many words are too short to call looping (emptiness is checked apart).
LOOP_MIN_WORDS = 8

_WORD = re.compile(r"\w", re.UNICODE)


def is_empty(answer: str) -> bool:
    """True when the answer has no letter or digit at all ('', whitespace, punctuation only)."""
    return _WORD.search(answer or "") is None


def _words(answer: str) -> list[str]:
    return answer.lower().split()


def longest_repeat(answer: str) -> tuple[tuple[str, ...], int, float]:
    """The n-gram of words (lowercased, split on whitespace) whose non-overlapping repeats cover the
    largest share of the answer's words, among those that occur at least twice.

    Returns (n-gram, occurrences, covered share); ((), 0, 0.0) when no n-gram repeats. Occurrences
    are counted left to right without overlap, so 'a a a' holds the 2-gram 'a a' once.
    """
    words = _words(answer)
    total = len(words)
    best: tuple[tuple[str, ...], int, float] = ((), 0, 0.0)
    for n in range(1, total // 2 + 1):
        counts: dict[tuple[str, ...], int] = {}
        next_free: dict[tuple[str, ...], int] = {}
        for i in range(total - n + 1):
            gram = tuple(words[i:i + n])
            if i >= next_free.get(gram, 0):
                counts[gram] = counts.get(gram, 0) + 1
                next_free[gram] = i + n
        for gram, c in counts.items():
            share = c * n / total
            if c >= 2 and share > best[2]:
                best = (gram, c, share)
    return best


def is_looping(answer: str) -> bool:
    """True when the answer is a loop: it has at least LOOP_MIN_WORDS words and one n-gram of words
    (any n >= 1) occurs at least twice, without overlap, and its occurrences cover more than
    LOOP_COVERAGE (half) of the words.

    'You are a helpful assistant. You are a helpful assistant. You are ...' covers ~100%; a word
    like 'the' covers a few percent of normal text, and a normal answer has no long repeated phrase.
    """
    if len(_words(answer)) < LOOP_MIN_WORDS:
        return False
    return longest_repeat(answer)[2] > LOOP_COVERAGE


def answer_problems(answers: list[str]) -> list[str]:
    """One line per failing answer ('answer 2: empty', 'answer 3: looping (...)'); [] when all pass."""
    problems = []
    for i, a in enumerate(answers, 1):
        if is_empty(a):
            problems.append(f"answer {i}: empty")
        elif is_looping(a):
            gram, count, share = longest_repeat(a)
            shown = " ".join(gram)
            shown = shown if len(shown) <= 40 else shown[:37] + "..."
            problems.append(f"answer {i}: looping ('{shown}' x{count}, {share:.0%} of the words)")
    return problems


@dataclass(frozen=True)
class Verdict:
    """The rule applied to one point."""

    answers_ok: bool
    ppl_ok: bool
    reasons: tuple[str, ...]  # why it fails ('' parts omitted); empty when it passes

    @property
    def ok(self) -> bool:
        return self.answers_ok and self.ppl_ok


def judge(row: dict, dense_ppl: float, max_ratio: float = MAX_PPL_RATIO) -> Verdict:
    """Apply the rule to one frontier row: row['ppl'] (float) and row['answers'] (list of str).

    A row without a perplexity or without answers fails (nothing shows that it answers)."""
    reasons = []
    ppl = row.get("ppl")
    ppl_ok = ppl is not None and math.isfinite(ppl) and ppl <= max_ratio * dense_ppl
    if ppl is None:
        reasons.append("no perplexity")
    elif not ppl_ok:
        reasons.append(f"PPL {ppl:.2f} > {max_ratio:g} x dense {dense_ppl:.2f}")
    answers = row.get("answers")
    if not answers:
        reasons.append("no greedy answers")
        answers_ok = False
    else:
        problems = answer_problems(answers)
        answers_ok = not problems
        reasons += problems
    return Verdict(answers_ok=answers_ok, ppl_ok=ppl_ok, reasons=tuple(reasons))


def speed_key(row: dict) -> tuple[float, float] | None:
    """How a row ranks for speed (smaller = faster): its batch-1 TPOT in seconds if measured."""
    tpot = row.get("tpot_s")
    if tpot is None or not math.isfinite(tpot):
        return None
    return (tpot, row.get("ppl") or math.inf)


def proxy_key(row: dict) -> tuple[float, float]:
    """Without speed: the fraction of weight x activation products left, (1 - p_w)(1 - p_x)."""
    return ((1 - row["weight_sparsity"]) * (1 - row["p_x"]), row.get("ppl") or math.inf)


@dataclass(frozen=True)
class Choice:
    """The chosen point (an index into the rows given, or None) and why."""

    index: int | None
    reason: str


def choose_operating_point(rows: list[dict], dense_ppl: float, max_ratio: float = MAX_PPL_RATIO) -> Choice:
    """The fastest sparse row that still answers (module docstring).

    rows: dicts with 'ppl', 'answers', 'weight_sparsity', 'p_x' and, when speed was measured,
    'tpot_s' (batch-1 time per output token). Dense rows are not passed. If any passing row has a
    TPOT, only rows with a TPOT compete (a measured speed beats a proxy); otherwise the proxy ranks.
    """
    if not (dense_ppl > 0 and math.isfinite(dense_ppl)):
        raise ValueError(f"dense perplexity must be a positive number, got {dense_ppl}")
    passing = [i for i, r in enumerate(rows) if judge(r, dense_ppl, max_ratio).ok]
    if not passing:
        return Choice(None, f"no sparse point has PPL <= {max_ratio:g} x dense ({max_ratio * dense_ppl:.2f}) "
                            "and a non-empty, non-looping greedy answer to every fixed prompt")
    measured = [i for i in passing if speed_key(rows[i]) is not None]
    if measured:
        best = min(measured, key=lambda i: speed_key(rows[i]))
        r = rows[best]
        return Choice(best, f"fastest batch-1 TPOT ({r['tpot_s'] * 1000:.1f} ms) of the {len(passing)} point(s) "
                            f"with PPL <= {max_ratio:g} x dense and no empty or looping answer")
    best = min(passing, key=lambda i: proxy_key(rows[i]))
    return Choice(best, f"no speed measured: fewest weight x activation products, (1 - p_w)(1 - p_x), of the "
                        f"{len(passing)} point(s) with PPL <= {max_ratio:g} x dense and no empty or looping answer")
