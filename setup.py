"""Build script: maps the top-level folders into the `duoserve` namespace and builds the CPU kernel.

The folders `prune/`, `evaluation/`, `kernels/`, `loaders/` and `loadtest/` are installed as
`duoserve.prune`, `duoserve.evaluation`, `duoserve.kernels`, ... because their bare names are taken on PyPI (and transformers imports a
package called `kernels` when one is installed).
"""
from pathlib import Path

from setuptools import setup

SUBPACKAGES = ["prune", "evaluation", "kernels", "loaders", "loadtest"]
ROOT = Path(__file__).parent


def _find_packages():
    packages, package_dir = ["duoserve"], {"duoserve": "duoserve"}
    for folder in ["duoserve", *SUBPACKAGES]:
        for init in sorted((ROOT / folder).rglob("__init__.py")):
            rel = init.parent.relative_to(ROOT)
            parts = rel.parts if folder == "duoserve" else ("duoserve", *rel.parts)
            name = ".".join(parts)
            if name not in packages:
                packages.append(name)
                package_dir[name] = str(rel)
    return packages, package_dir


def _extensions():
    """The native CPU kernel (kernels/csrc), built with torch's extension tooling.

    Needs torch importable at build time: scripts/install.sh installs with --no-build-isolation.
    The binary targets baseline x86-64: AVX-512 code is enabled per function (target attributes)
    and chosen at run time, so no -march=native. DUOSERVE_SKIP_CPU_KERNEL=1 skips the build (a
    machine without a compiler; the GPU image): duoserve.kernels then falls back to the reference
    on CPU with one logged warning.
    """
    import os

    sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "kernels" / "csrc").glob("*.cpp"))
    if not sources or os.environ.get("DUOSERVE_SKIP_CPU_KERNEL") == "1":
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:  # torch not installed yet: nothing to build against
        return [], {}

    # the .cpp includes one header per concern (one translation unit): rebuild when any changes
    headers = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "kernels" / "csrc").glob("*.h"))
    ext = CppExtension(
        "duoserve.kernels._cpu_kernels",
        sources,
        depends=headers,
        extra_compile_args=["-O3", "-fopenmp", "-std=c++17"],
        extra_link_args=["-fopenmp"],
    )
    return [ext], {"build_ext": BuildExtension}


packages, package_dir = _find_packages()
ext_modules, cmdclass = _extensions()
setup(packages=packages, package_dir=package_dir, ext_modules=ext_modules, cmdclass=cmdclass)
