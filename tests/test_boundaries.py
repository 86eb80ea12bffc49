"""The folder boundaries of the design (README, "Layout"), enforced.

Every import of every module under kernels/, prune/, evaluation/, duoserve/format/, loadtest/ and
loaders/ is
read from its syntax tree: module-level and lazy (inside functions) imports, relative imports
resolved to absolute names, and importlib.import_module / __import__ with a constant name. No
module is executed, so the test needs neither vLLM nor a GPU.

    kernels          -> the standard library, torch, triton, numpy and itself (no vLLM, no duoserve.*)
    prune            -> never vLLM, duoserve.loaders, duoserve.loadtest or duoserve.evaluation
    evaluation       -> prune's model loading and data, format; never vLLM, duoserve.loaders,
                        duoserve.loadtest or duoserve.kernels (an endpoint is reached over HTTP)
    duoserve/format  -> a leaf: the standard library, torch, safetensors, numpy, itself and
                        duoserve.errors (the exception classes, which import nothing of duoserve)
    loadtest         -> talks to servers over HTTP: no vLLM, torch, transformers or
                        duoserve.loaders / prune / evaluation / kernels
    loaders          -> vLLM, kernels, format; never duoserve.prune, duoserve.evaluation or
                        duoserve.loadtest
    duoserve/frontier -> runs prune, eval and serve as commands: never vLLM, duoserve.loaders,
                        duoserve.evaluation or duoserve.kernels
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# folder (relative to the repository) -> the package it installs as
PACKAGES = {"kernels": "duoserve.kernels", "prune": "duoserve.prune", "evaluation": "duoserve.evaluation",
            "duoserve/format": "duoserve.format", "loadtest": "duoserve.loadtest", "loaders": "duoserve.loaders",
            "duoserve/frontier": "duoserve.frontier"}

# Either "allow": the only top-level names (and duoserve.* prefixes) a folder may import, the
# standard library always allowed; or "forbid": names it must not import.
RULES = {
    "kernels": {"allow": {"torch", "triton", "numpy", "duoserve.kernels"}},
    "duoserve/format": {"allow": {"torch", "safetensors", "numpy", "duoserve.format", "duoserve.errors"}},
    "prune": {"forbid": {"vllm", "duoserve.loaders", "duoserve.loadtest", "duoserve.evaluation"}},
    "evaluation": {"forbid": {"vllm", "duoserve.loaders", "duoserve.loadtest", "duoserve.kernels"}},
    "loadtest": {"forbid": {"vllm", "torch", "transformers", "duoserve.loaders", "duoserve.prune",
                            "duoserve.evaluation", "duoserve.kernels"}},
    "loaders": {"forbid": {"duoserve.prune", "duoserve.evaluation", "duoserve.loadtest"}},
    "duoserve/frontier": {"forbid": {"vllm", "duoserve.loaders", "duoserve.evaluation", "duoserve.kernels"}},
}


def module_name(folder: str, path: Path) -> tuple[str, bool]:
    """(dotted module name, is a package __init__) of a file under `folder`."""
    rel = path.relative_to(ROOT / folder).with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"]
    return ".".join([PACKAGES[folder], *parts]), path.name == "__init__.py"


def imports(path: Path, module: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file, at any depth."""
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module
            # `from duoserve import loaders` imports duoserve.loaders
            found += [(node.lineno, f"{name}.{a.name}") for a in node.names] if name == "duoserve" else \
                [(node.lineno, name)]
        elif isinstance(node, ast.Call):
            f = node.func
            callee = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
            if callee in ("import_module", "__import__") and node.args and \
                    isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                found.append((node.lineno, node.args[0].value))
    return found


def matches(name: str, prefixes: set[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def violations(folder: str) -> list[str]:
    rule, bad = RULES[folder], []
    for path in sorted((ROOT / folder).rglob("*.py")):
        module, is_package = module_name(folder, path)
        for line, name in imports(path, module, is_package):
            top = name.split(".")[0]
            if "allow" in rule:
                ok = top in sys.stdlib_module_names or matches(name, rule["allow"]) or top == "__future__"
                # `import duoserve` alone would load the package's __init__: allowed only as a name
                ok = ok and not (top == "duoserve" and not matches(name, rule["allow"]))
            else:
                ok = not matches(name, rule["forbid"])
            if not ok:
                bad.append(f"{path.relative_to(ROOT)}:{line}: imports {name}")
    return bad


@pytest.mark.parametrize("folder", sorted(RULES))
def test_folder_imports_stay_inside_its_boundary(folder):
    assert (ROOT / folder).is_dir()
    assert violations(folder) == [], f"{folder} crosses its boundary (see {Path(__file__).name})"


def test_every_installed_folder_has_rules():
    """A folder setup.py installs as duoserve.<name> (SUBPACKAGES) is checked here too."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    subpackages = next(ast.literal_eval(n.value) for n in ast.walk(tree) if isinstance(n, ast.Assign)
                       and any(getattr(t, "id", None) == "SUBPACKAGES" for t in n.targets))
    assert set(subpackages) <= set(RULES), f"no boundary rules for {sorted(set(subpackages) - set(RULES))}"


def test_errors_is_a_leaf():
    """duoserve/errors.py is what format (and every part) may share: it imports nothing of duoserve."""
    path = ROOT / "duoserve" / "errors.py"
    assert [n for _, n in imports(path, "duoserve.errors", False) if n.split(".")[0] == "duoserve"] == []


def test_the_check_sees_lazy_relative_and_dynamic_imports(tmp_path, monkeypatch):
    pkg = tmp_path / "kernels"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "sub" / "mod.py").write_text(
        "import torch\nfrom .. import layout\n"
        "def f():\n    from duoserve.loaders import vllm_compat\n"
        "def g():\n    import importlib\n    importlib.import_module('vllm')\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert violations("kernels") == ["kernels/sub/mod.py:4: imports duoserve.loaders",
                                     "kernels/sub/mod.py:7: imports vllm"]
    assert imports(pkg / "sub" / "mod.py", "duoserve.kernels.sub.mod", False)[1] == (2, "duoserve.kernels")
