"""Every DUOSERVE_* environment variable the code uses is in docs/configuration.md, and every
variable listed there is still used.

The code is every *.py, *.cpp, *.h, *.c and *.sh file of the repository outside .venv, .git and
docs; a name ending in `_` (as in `DUOSERVE_CPU_*`) is a family and must match a listed name.
Private names (`_DUOSERVE_...`: test hooks and values duoserve passes to its own processes) are
listed in the page's private table; a public name must not be used with the private prefix or the
other way round.
"""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "configuration.md"
SUFFIXES = {".py", ".cpp", ".h", ".c", ".sh"}
SKIP_DIRS = {".venv", ".git", "docs", "build", "node_modules", "__pycache__"}
NAME = re.compile(r"(?<![A-Za-z0-9_])_?DUOSERVE_[A-Z0-9_]*")
ROW = re.compile(r"^\| `(_?DUOSERVE_[A-Z0-9_]+)` \|")


def code_files() -> list[Path]:
    files = []
    for path in ROOT.rglob("*"):
        rel = path.relative_to(ROOT)
        if path.suffix in SUFFIXES and not SKIP_DIRS.intersection(rel.parts) and path.is_file() \
                and path != Path(__file__).resolve():
            files.append(path)
    return files


def used() -> dict[str, str]:
    """name -> the first file:line that uses it."""
    found: dict[str, str] = {}
    for path in sorted(code_files()):
        for i, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            for name in NAME.findall(line):
                found.setdefault(name, f"{path.relative_to(ROOT)}:{i}")
    return found


def listed() -> list[str]:
    return [m.group(1) for line in DOC.read_text().splitlines() if (m := ROW.match(line))]


def test_every_variable_used_is_documented():
    names = set(listed())
    missing = {}
    for name, where in used().items():
        if name.endswith("_"):  # a family, e.g. DUOSERVE_CPU_*
            ok = any(n.startswith(name) for n in names)
        else:
            ok = name in names
        if not ok:
            missing[name] = where
    assert not missing, f"used but not in {DOC.relative_to(ROOT)}: {missing}"


def test_every_documented_variable_is_used():
    in_code = {n for n in used() if not n.endswith("_")}
    stale = [n for n in listed() if n not in in_code]
    assert not stale, f"listed in {DOC.relative_to(ROOT)} but used nowhere in the code: {stale}"


def test_the_table_has_no_duplicates_and_private_names_are_in_the_private_table():
    names = listed()
    assert len(names) == len(set(names)) and len(names) > 10
    text = DOC.read_text()
    private_part = text[text.index("## Private"):]
    for name in names:
        assert (f"`{name}`" in private_part) == name.startswith("_"), name


def test_the_scan_finds_names_and_families():
    line = 'os.environ.get("DUOSERVE_CPU_DECODER"); `DUOSERVE_CPU_*`; FAULT = "_DUOSERVE_TEST_X"; MY_DUOSERVE_Y'
    assert NAME.findall(line) == ["DUOSERVE_CPU_DECODER", "DUOSERVE_CPU_", "_DUOSERVE_TEST_X"]
