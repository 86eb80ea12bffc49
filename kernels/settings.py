"""Integer settings of the kernels read from the environment (DUOSERVE_CPU_*, DUOSERVE_GPU_*): one
parser, so every bad value is refused the same way, naming the variable (docs/configuration.md lists them)."""
from __future__ import annotations

import os


def env_int(name: str, default: int | None = None, minimum: int | None = None) -> int | None:
    """The integer in $name, or `default` when it is unset; text that is not an integer, or one
    below `minimum`, raises ValueError naming the variable."""
    text = os.environ.get(name)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or (minimum is not None and value < minimum):
        bound = "" if minimum is None else f" >= {minimum}"
        raise ValueError(f"{name} must be an integer{bound} (see docs/configuration.md), got {text!r}")
    return value


KERNEL_CHOICES = ("native", "reference")


def kernel_choice() -> str:
    """DUOSERVE_KERNEL: "native" (the default: the native CPU extension where it is built, Triton on
    CUDA) or "reference" (the pure-torch reference everywhere; the CPU extension is not even
    loaded). The one runtime switch of the kernels; anything else raises ValueError naming it."""
    text = os.environ.get("DUOSERVE_KERNEL", "") or "native"
    if text not in KERNEL_CHOICES:
        raise ValueError(f"DUOSERVE_KERNEL must be one of {', '.join(KERNEL_CHOICES)} (see docs/configuration.md), "
                         f"got {text!r}")
    return text
