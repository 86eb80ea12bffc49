"""What the CPU *and the operating system* let this process run, beyond CPUID flags.

AMX (Intel Sapphire Rapids and later) keeps 8 KiB of tile data per thread. Linux (5.16+) enables
that state per process, on request: until a process calls
`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`, its first AMX instruction traps and the
kernel kills it with SIGILL. The CPUID flag `amx_tile` says nothing about that permission.

Why duoserve asks for it: vLLM's CPU attention uses AMX where the CPU has it, and relies on
someone having asked first. In a dense model that is oneDNN, whose first matmul (q/k/v, before any
attention) requests the state; with every linear on duoserve's kernel nothing asked, and the
worker died of SIGILL inside `cpu_attention_with_kv_cache` on its first request (found on an Intel
Xeon with AMX-BF16, 2026-12-06; docs/environment.md). So the vLLM plugin requests the state in
every vLLM process it loads into (loaders/plugin.py), and any AMX path of duoserve's own must
check `amx_tile_permitted()` rather than the CPUID flag.

The permission is process-wide (all threads), survives fork and is reset by exec: every spawned
vLLM process asks again when it loads the plugin.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import platform
from dataclasses import dataclass
from functools import lru_cache

log = logging.getLogger(__name__)

# linux/arch/x86/include/uapi/asm/prctl.h and the x86-64 syscall table
_SYS_ARCH_PRCTL = 158
_ARCH_GET_XCOMP_SUPP = 0x1021  # dynamic XSTATE features the kernel supports
_ARCH_GET_XCOMP_PERM = 0x1022  # ... this process may use
_ARCH_REQ_XCOMP_PERM = 0x1023  # ask for one
_XFEATURE_XTILEDATA = 18


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPUID flags Linux reports for the first CPU (/proc/cpuinfo); empty where there is none."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_has_amx() -> bool:
    """Whether the CPU reports AMX tiles (a CPUID fact; whether the process may use them is
    `amx_tile_permitted`)."""
    return "amx_tile" in cpu_flags()


def _x86_64_linux() -> bool:
    return platform.system() == "Linux" and platform.machine() in ("x86_64", "AMD64")


@lru_cache(maxsize=1)
def _libc():
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _xcomp_mask(code: int) -> int | None:
    """arch_prctl(code, &mask) -> mask, or None where the kernel refuses (pre-5.16: EINVAL)."""
    mask = ctypes.c_uint64(0)
    if _libc().syscall(_SYS_ARCH_PRCTL, code, ctypes.byref(mask)) != 0:
        return None
    return mask.value


def amx_tile_permitted() -> bool:
    """Whether this process may execute AMX instructions now (the OS granted XTILEDATA)."""
    if not (_x86_64_linux() and cpu_has_amx()):
        return False
    mask = _xcomp_mask(_ARCH_GET_XCOMP_PERM)
    return mask is not None and bool(mask >> _XFEATURE_XTILEDATA & 1)


@dataclass(frozen=True)
class AmxRequest:
    """The outcome of `request_amx_tile_state`: granted, and why not where it was not."""

    granted: bool
    reason: str


def request_amx_tile_state() -> AmxRequest:
    """Ask Linux for AMX tile state for this process, where the CPU has AMX; idempotent and cheap.

    Never raises: a refusal is returned (and logged by the caller) so that a host without AMX, or
    a kernel without dynamic XSTATE, serves as before.
    """
    if not _x86_64_linux():
        return AmxRequest(False, f"not x86-64 Linux ({platform.system()} {platform.machine()})")
    if not cpu_has_amx():
        return AmxRequest(False, "the CPU has no AMX (no amx_tile in /proc/cpuinfo)")
    supported = _xcomp_mask(_ARCH_GET_XCOMP_SUPP)
    if supported is None or not supported >> _XFEATURE_XTILEDATA & 1:
        return AmxRequest(False, "the Linux kernel does not offer AMX tile state (needs Linux 5.16+ with AMX support)")
    if amx_tile_permitted():
        return AmxRequest(True, "already granted")
    if _libc().syscall(_SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA) != 0:
        err = ctypes.get_errno()
        return AmxRequest(False, f"arch_prctl(ARCH_REQ_XCOMP_PERM, XTILEDATA) refused: "
                                 f"{errno.errorcode.get(err, err)} ({os.strerror(err)})")
    if not amx_tile_permitted():
        return AmxRequest(False, "arch_prctl(ARCH_REQ_XCOMP_PERM) returned 0 but the permission is not set")
    return AmxRequest(True, "granted")
