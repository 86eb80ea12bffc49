"""Every relative link in the docs points at a file that is in the repository, and no doc or script
names a folder of this machine outside it (/work/..., ../shared/...).

The docs are README.md, CHANGELOG.md, docs/*.md and every markdown file under docs/reports. A link is
a markdown `[text](target)` outside fenced code blocks; web addresses (`https:`, `mailto:` ...)
and in-page anchors (`#...`) are not checked. Reports keep their README, plots and summary tables
only (raw output is ignored by .gitignore), so a link to a raw file fails here on a fresh clone:
the target must be committed, not merely present in this working tree.
"""
from __future__ import annotations

import re
import functools
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def doc_files() -> list[Path]:
    return [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md")),
            *sorted((ROOT / "docs" / "reports").rglob("*.md"))]


@functools.lru_cache(maxsize=1)
def committed_or_added() -> frozenset[Path] | None:
    """The files git tracks (with what is staged); None outside a git checkout."""
    try:
        out = subprocess.run(["git", "ls-files", "--cached"], cwd=ROOT, capture_output=True, text=True,
                             timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    files = {(ROOT / line).resolve() for line in out.splitlines()}
    return frozenset(files | {parent for f in files for parent in f.parents})


def relative_links(path: Path) -> list[str]:
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    targets = []
    for match in LINK.finditer(text):
        target = match.group(1).split("#", 1)[0]
        if target and not re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target):
            targets.append(target)
    return targets


def test_the_checker_reads_links_and_skips_code_and_addresses(tmp_path):
    page = tmp_path / "p.md"
    page.write_text("[a](x.md) [b](https://e.org) [c](#top) [d](y.md#s \"t\")\n```\n[e](z.md)\n```\n")
    assert relative_links(page) == ["x.md", "y.md"]


@pytest.mark.parametrize("doc", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(doc):
    tracked = committed_or_added()
    missing = []
    for target in relative_links(doc):
        resolved = (doc.parent / target).resolve()
        if not resolved.exists() or (tracked is not None and resolved not in tracked):
            missing.append(target)
    assert not missing, f"{doc.relative_to(ROOT)} links to files not in the repository: {missing}"


OUTSIDE = re.compile(r"(?<![\w.])(/work/|\.\./shared/|/home/\w+/)")


def outside_checked_files() -> list[Path]:
    """README, CHANGELOG, docs/*.md, and the code: scripts and every package folder (report READMEs
    have their own, stricter check below; a report's raw tables and JSON keep the paths they ran with)."""
    code = [p for folder in ("scripts", "duoserve", "prune", "evaluation", "kernels", "loaders", "loadtest", "tests")
            for p in sorted((ROOT / folder).rglob("*"))
            if p.is_file() and p.suffix in {".py", ".sh", ".c", ".cpp", ".h", ".md"} and "__pycache__" not in p.parts
            and p != Path(__file__).resolve()]
    return [*doc_files()[:2], *sorted((ROOT / "docs").glob("*.md")), *code]


@pytest.mark.parametrize("path", outside_checked_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_path_outside_the_repository(path):
    """A reader's machine has none of this machine's folders: name a placeholder (PATH/...) instead."""
    text = path.read_text(encoding="utf-8", errors="replace")
    found = [text[max(m.start() - 30, 0):m.end() + 30].replace("\n", " ") for m in OUTSIDE.finditer(text)]
    assert not found, f"{path.relative_to(ROOT)}: {found}"


# A report's README shows the commands that made it: this machine's home, cache and temporary
# folders mean nothing to a reader, who gets a placeholder that says what the path is (CKPT, DENSE,
# BIN ...). /tmp/ is allowed in scripts (they build probes there), not in what a report tells you to run.
REPORT_OUTSIDE = re.compile(r"(?<![\w.])(/work/|\.\./shared/|/home/\w+/|/root/|/tmp/)")


@pytest.mark.parametrize("path", sorted((ROOT / "docs" / "reports").rglob("README.md")),
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_report_readmes_name_no_path_of_this_machine(path):
    text = path.read_text(encoding="utf-8", errors="replace")
    found = [text[max(m.start() - 30, 0):m.end() + 30].replace("\n", " ") for m in REPORT_OUTSIDE.finditer(text)]
    assert not found, f"{path.relative_to(ROOT)}: {found}"
