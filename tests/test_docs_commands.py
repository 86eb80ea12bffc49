"""The commands the docs show exist as written: subcommands, options, modules and scripts.

What is read: README.md and docs/*.md. In fenced code blocks (```bash, ```sh or unlabelled) and in
inline code spans, every command line that runs `duoserve` (also `.venv/bin/duoserve`),
`python -m MODULE` or `scripts/...`, after joining `\\` continuations and splitting at `&&`, `;`
and `|`, with leading `NAME=value` assignments skipped. Everything that names `scripts/...` or
`python -m duoserve...` anywhere in those pages and in the reports' markdown.

What is checked, without running anything:
- `duoserve SUB [SUBSUB]`: SUB (and SUBSUB where SUB has subcommands, as `eval ppl`) exists in the
  argparse tree of duoserve/cli.py, and every option (`--long`, `-s`) is one that parser defines,
  exactly (no abbreviations). `duoserve serve` passes options it does not know to vLLM, so there
  an unknown option must be one of vLLM's (read from vLLM's argument sources; unchecked when vLLM is
  not installed).
- `python -m MODULE`: the module's file exists (duoserve.<sub> maps to the repository's <sub>/
  folders as setup.py installs them) and every long option appears as a string literal in it or in
  a duoserve module it imports. The same for `python scripts/X.py` and `scripts/X`.
- `scripts/X`: the file exists, unless the same passage says it is in git history; a Python script
  binds every name it reads (a forgotten import is a NameError the reader meets first).
Placeholders (`CKPT`, `[MODEL]`, `...`, `{a|b}`) are fine: only names are checked, not values.
"""
from __future__ import annotations

import ast
import functools
import importlib.util
import re
import shlex
from pathlib import Path

import pytest

from duoserve.cli import SUBCOMMANDS, build_parser

ROOT = Path(__file__).resolve().parents[1]
SUBPACKAGES = ["prune", "evaluation", "kernels", "loaders", "loadtest"]  # setup.py's mapping
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
REPORT_PAGES = sorted((ROOT / "docs" / "reports").rglob("*.md"))
SHELL_FENCES = {"bash", "sh", "shell", "console", ""}
PYTHONS = {"python", "python3", ".venv/bin/python", "$PY"}
DUOSERVES = {"duoserve", ".venv/bin/duoserve"}
OPTION = re.compile(r"^--?[A-Za-z][A-Za-z0-9-]*$")


# --- what the docs say -------------------------------------------------------------------------

def code_lines(text: str) -> list[tuple[str, bool]]:
    """(line, in a fence) for the lines of shell fences (continuations joined) and inline code spans."""
    lines, fence, buf = [], None, ""
    for line in text.splitlines():
        m = re.match(r"^\s*```(\w*)", line)
        if m:
            fence = m.group(1) if fence is None else None
            continue
        if fence is None:
            lines.extend((span, False) for span in re.findall(r"`([^`\n]+)`", line))
            continue
        if fence not in SHELL_FENCES:
            continue
        stripped = line.strip()
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        lines.append((buf + stripped, True))
        buf = ""
    return lines


def split_words(line: str) -> list[str]:
    try:
        return shlex.split(line, comments=True)
    except ValueError:  # an unbalanced quote in prose: fall back to whitespace
        return line.split("#", 1)[0].split()


def commands(line: str) -> list[list[str]]:
    """The simple commands of a line: split at && ; | ||, assignments in front dropped."""
    out, cur = [], []
    for word in split_words(line) + ["&&"]:
        if word in {"&&", ";", "|", "||"}:
            while cur and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", cur[0]):
                cur.pop(0)
            if cur:
                out.append(cur)
            cur = []
        else:
            cur.append(word)
    return out


def clean(word: str) -> str:
    """A word without the synopsis brackets around it ([--json F] -> --json, F)."""
    return word.strip("[]{}(),")


def options(words: list[str]) -> list[str]:
    opts = []
    for w in map(clean, words):
        name = w.split("=", 1)[0]
        if OPTION.match(name) and not re.match(r"^-\d", name):
            opts.append(name)
    return opts


def doc_commands() -> list[tuple[str, list[str]]]:
    found = []
    for page in PAGES:
        for line, fenced in code_lines(page.read_text(encoding="utf-8")):
            for cmd in commands(line):
                # an inline `scripts/X` alone is a mention (test_named_scripts_and_modules_exist), not a command
                script = cmd[0].startswith("scripts/") and (fenced or len(cmd) > 1)
                if cmd[0] in DUOSERVES or (cmd[0] in PYTHONS and len(cmd) > 1) or script:
                    found.append((f"{page.relative_to(ROOT)}: {' '.join(cmd)}", cmd))
    return found


# --- what the code defines ---------------------------------------------------------------------

def duoserve_problems(cmd: list[str]) -> list[str]:
    words = [clean(w) for w in cmd[1:]]
    words = [w for w in words if w]
    sub = next((w for w in words if not w.startswith("-")), None)
    if sub is not None and "|" in sub:  # a synopsis of several subcommands: `duoserve serve|eval CKPT ...`
        at = words.index(sub)
        return [p for alt in sub.split("|") for p in duoserve_problems(cmd[:1] + words[:at] + [alt] + words[at + 1:])]
    if sub is None:
        return [o for o in options(words) if o not in build_parser()._option_string_actions]
    if sub not in SUBCOMMANDS:
        return [f"no subcommand {sub!r}"]
    top = build_parser(only=sub)
    chain = [top]
    parser = _subparsers(top)[sub]
    problems = [o for o in options(words[:words.index(sub)]) if o not in top._option_string_actions]
    rest = words[words.index(sub) + 1:]
    nested = _subparsers(parser)
    if nested:
        name = next((w for w in rest if not w.startswith("-")), None)
        if name is not None and name != "...":
            if name not in nested:
                return problems + [f"no subcommand {sub} {name!r} (have {sorted(nested)})"]
            chain.append(parser)
            parser = nested[name]
            rest = rest[rest.index(name) + 1:]
    for opt in options(rest):
        if opt in parser._option_string_actions:
            continue
        if sub == "serve" and vllm_accepts(opt) is not False:
            continue
        problems.append(f"`duoserve {sub}` has no option {opt}")
    return problems


def _subparsers(parser) -> dict:
    for action in parser._actions:
        if action.__class__.__name__ == "_SubParsersAction":
            return dict(action.choices)
    return {}


@functools.lru_cache(maxsize=1)
def _vllm_sources() -> str | None:
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        return None
    base = Path(list(spec.submodule_search_locations)[0])
    files = [base / "engine" / "arg_utils.py", *sorted((base / "entrypoints").rglob("*.py"))]
    return "\n".join(f.read_text(encoding="utf-8", errors="replace") for f in files if f.is_file())


def vllm_accepts(opt: str) -> bool | None:
    """Whether vLLM's serve options include opt; None when vLLM is not installed."""
    text = _vllm_sources()
    if text is None:
        return None
    return f'"{opt}"' in text or f"'{opt}'" in text


def module_file(name: str, runnable: bool = False) -> Path | None:
    """The file of module `name` (a package's __init__.py), without importing it. runnable: what
    `python -m name` runs, a module with a __main__ guard or a package's __main__.py; else None."""
    found = _module_file(name)
    if runnable and found is not None and found.name != "__main__.py":
        if found.name == "__init__.py" or "__main__" not in found.read_text(encoding="utf-8", errors="replace"):
            return None
    return found


def _module_file(name: str) -> Path | None:
    parts = name.split(".")
    if parts[0] != "duoserve":  # another package (vLLM): found by path, not imported
        spec = importlib.util.find_spec(parts[0])
        if spec is None or not spec.submodule_search_locations:
            return Path(spec.origin) if spec and spec.origin and len(parts) == 1 else None
        stem = Path(list(spec.submodule_search_locations)[0]).joinpath(*parts[1:])
        found = [f for f in (stem.with_suffix(".py"), stem / "__main__.py", stem / "__init__.py") if f.is_file()]
        return found[0] if found else None
    base = ROOT / parts[1] if len(parts) > 1 and parts[1] in SUBPACKAGES else ROOT / "duoserve"
    rest = parts[2:] if len(parts) > 1 and parts[1] in SUBPACKAGES else parts[1:]
    stem = base.joinpath(*rest) if rest else base
    for candidate in (stem.with_suffix(".py") if rest else None, stem / "__main__.py", stem / "__init__.py"):
        if candidate is not None and candidate.is_file():
            return candidate
    return None


@functools.lru_cache(maxsize=None)
def source_with_imports(path: Path) -> str:
    """The file's text plus that of every duoserve module it imports (one level)."""
    text = path.read_text(encoding="utf-8")
    try:
        tree = ast.parse(text)
    except SyntaxError:
        return text
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("duoserve"):
            names.append(node.module)
            names.extend(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            names.extend(a.name for a in node.names if a.name.startswith("duoserve"))
    extra = [module_file(n) for n in names]
    return "\n".join([text, *(f.read_text(encoding="utf-8") for f in extra if f is not None and f != path)])


def literal_problems(path: Path, words: list[str], what: str) -> list[str]:
    if path.suffix != ".py":
        return []
    text = source_with_imports(path)
    missing = []
    for opt in options(words):
        if not opt.startswith("--"):
            continue
        names = [opt] + ([opt.replace("--no-", "--", 1)] if opt.startswith("--no-") else [])
        if not any(f'"{n}"' in text or f"'{n}'" in text for n in names):
            missing.append(f"{what} has no option {opt}")
    return missing


def python_problems(cmd: list[str]) -> list[str]:
    args = cmd[1:]
    if args[0] == "-m":
        if len(args) < 2:
            return []
        path = module_file(args[1], runnable=True)
        if path is None:
            return [f"no module {args[1]} to run"]
        if args[1].split(".")[0] == "vllm":
            return [f"vLLM has no option {o}" for o in options(args[2:]) if vllm_accepts(o) is False]
        return literal_problems(path, args[2:], f"python -m {args[1]}")
    if args[0].startswith("scripts/"):
        return script_problems(args)
    return []


def script_problems(cmd: list[str]) -> list[str]:
    path = ROOT / clean(cmd[0])
    if not path.is_file():
        return [f"no file {cmd[0]}"]
    return literal_problems(path, cmd[1:], cmd[0])


# --- tests -------------------------------------------------------------------------------------

def test_the_reader_finds_commands_in_fences_and_code_spans():
    text = ("Run `duoserve inspect CKPT --json F` here.\n```bash\nA=1 duoserve prune M \\\n    --sparsity 0.5 "
            "-o out  # note\nscripts/install.sh && .venv/bin/duoserve quickstart\n```\n```python\nduoserve x\n```\n")
    cmds = [c for line, _ in code_lines(text) for c in commands(line)]
    assert ["duoserve", "inspect", "CKPT", "--json", "F"] in cmds
    assert ["duoserve", "prune", "M", "--sparsity", "0.5", "-o", "out"] in cmds
    assert ["scripts/install.sh"] in cmds and [".venv/bin/duoserve", "quickstart"] in cmds
    assert ["duoserve", "x"] not in cmds


def test_the_checker_catches_what_the_docs_could_get_wrong():
    assert duoserve_problems(["duoserve", "prune", "[MODEL]", "--method", "duogpt", "-o", "OUT"]) == []
    assert duoserve_problems(["duoserve", "eval", "ppl", "CKPT", "[--json", "F]"]) == []
    assert duoserve_problems(["duoserve", "prnue"]) == ["no subcommand 'prnue'"]
    assert duoserve_problems(["duoserve", "serve|eval", "ppl", "CKPT", "--activation-sparsity", "P"]) == []
    assert duoserve_problems(["duoserve", "eval", "perplexity"])[0].startswith("no subcommand eval 'perplexity'")
    assert duoserve_problems(["duoserve", "inspect", "CKPT", "--jsn", "F"]) == ["`duoserve inspect` has no option --jsn"]
    assert duoserve_problems(["duoserve", "inspect", "CKPT", "--js", "F"]) != []  # no abbreviations
    assert python_problems(["python", "-m", "duoserve.kernels.nope"]) == ["no module duoserve.kernels.nope to run"]
    assert python_problems(["python", "-m", "duoserve.format"]) == ["no module duoserve.format to run"]  # no __main__.py
    assert python_problems(["python", "-m", "duoserve.loadtest", "--dense", "M"]) == []
    assert python_problems(["python", "-m", "duoserve.kernels.bench", "--bar", "--nope"]) == \
        ["python -m duoserve.kernels.bench has no option --nope"]
    assert script_problems(["scripts/nope.sh"]) == ["no file scripts/nope.sh"]


def test_the_docs_show_commands():
    assert len(doc_commands()) > 50


@pytest.mark.parametrize("where,cmd", doc_commands(), ids=lambda v: v if isinstance(v, str) else "")
def test_doc_command_exists(where, cmd):
    if cmd[0] in DUOSERVES:
        problems = duoserve_problems(cmd)
    elif cmd[0] in PYTHONS:
        problems = python_problems(cmd)
    else:
        problems = script_problems(cmd)
    assert not problems, f"{where}: {problems}"


NAMED_SCRIPT = re.compile(r"(?<![\w./-])scripts/[\w.-]+\.(?:py|sh|cpp|c)\b")
NAMED_MODULE = re.compile(r"python3? -m (duoserve[\w.]*)")


@pytest.mark.parametrize("page", PAGES + REPORT_PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_named_scripts_and_modules_exist(page):
    text = page.read_text(encoding="utf-8")
    missing = []
    for m in NAMED_SCRIPT.finditer(text):
        if not (ROOT / m.group(0)).is_file() and "git history" not in text[m.end():m.end() + 160]:
            missing.append(m.group(0))
    missing += [m.group(1) for m in NAMED_MODULE.finditer(text) if module_file(m.group(1), runnable=True) is None]
    assert not missing, f"{page.relative_to(ROOT)} names what is not in the repository: {sorted(set(missing))}"


def unbound_names(source: str) -> set[str]:
    """Names a Python file reads that nothing in it binds (no import, assignment, def, parameter...)
    and that are not builtins: a NameError waiting for the line that reads them. Scope-blind, so it
    misses a name bound in one function and read in another, but not a forgotten import."""
    import builtins

    tree = ast.parse(source)
    bound = set(dir(builtins)) | {"__file__", "__name__", "__doc__", "__spec__", "__path__"}
    read = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            (read if isinstance(node.ctx, ast.Load) else bound).add(node.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            bound.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            bound.add(node.name)
        elif isinstance(node, (ast.Global, ast.Nonlocal)):
            bound.update(node.names)
        elif isinstance(node, (ast.MatchAs, ast.MatchStar)) and node.name:
            bound.add(node.name)
    return read - bound


def test_the_name_check_finds_a_forgotten_import():
    assert unbound_names("from pathlib import Path\nPath(sys.argv[1])\n") == {"sys"}
    assert unbound_names("import sys\ndef f(a):\n    return [b for b in a] + sys.argv\n") == set()


@pytest.mark.parametrize("script", sorted({m.group(0) for page in PAGES for m in NAMED_SCRIPT.finditer(
    page.read_text(encoding="utf-8")) if m.group(0).endswith(".py") and (ROOT / m.group(0)).is_file()}))
def test_python_scripts_the_docs_name_bind_every_name_they_read(script):
    assert not unbound_names((ROOT / script).read_text(encoding="utf-8")), script
