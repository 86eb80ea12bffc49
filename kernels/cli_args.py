"""argparse types shared by the kernels' command-line tools (bench, bench_decode, check).

Each turns a bad value into an argparse error (the usage line, what was wrong and what is
accepted, exit status 2) before any work starts, instead of a traceback minutes into a run or a
silently meaningless sweep (p_w = 1.5, a negative cache size).
"""
from __future__ import annotations

import argparse
from typing import Callable

import torch


def _number(text: str, kind: type, what: str):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None


def positive_int(text: str) -> int:
    value = _number(text, int, "an integer")
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def non_negative_float(text: str) -> float:
    value = _number(text, float, "a number")
    if not value >= 0:  # NaN too
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def fraction(text: str) -> float:
    value = _number(text, float, "a number")
    if not 0.0 <= value <= 1.0:  # NaN too
        raise argparse.ArgumentTypeError(f"must be a fraction in [0, 1], got {text}")
    return value


def _comma_list(text: str, item: Callable[[str], object]) -> list:
    parts = [p.strip() for p in text.split(",")]
    if not all(parts):
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated values, e.g. 0,0.5")
    return [item(p) for p in parts]


def fractions(text: str) -> list[float]:
    """'0,0.3,0.5' -> [0.0, 0.3, 0.5], each in [0, 1]."""
    return _comma_list(text, fraction)


def positive_ints(text: str) -> list[int]:
    """'1,2,4' -> [1, 2, 4], each >= 1."""
    return _comma_list(text, positive_int)


def shape_list(groups: dict[str, list[tuple[int, int]]]) -> Callable[[str], list[tuple[int, int]]]:
    """A type for '--shapes': comma-separated group names (keys of `groups`) or NxK (out x in)."""
    def parse(text: str) -> list[tuple[int, int]]:
        shapes: list[tuple[int, int]] = []
        for part in _comma_list(text, str):
            if part in groups:
                shapes += groups[part]
                continue
            dims = part.lower().split("x")
            if len(dims) != 2 or not all(d.isdigit() and int(d) > 0 for d in dims):
                raise argparse.ArgumentTypeError(
                    f"{part!r} is neither a shape group ({', '.join(sorted(groups))}) nor NxK with "
                    "positive integers (out x in, e.g. 4096x11008)")
            shapes.append((int(dims[0]), int(dims[1])))
        return shapes
    return parse


def device(text: str) -> torch.device:
    """'cpu', 'cuda' or 'cuda:N', checked against what this torch can use."""
    try:
        dev = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device: use cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"{text!r}: the kernels run on cpu or cuda")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(
                f"{text!r}: this torch sees no CUDA device (torch {torch.__version__}, "
                f"CUDA build: {torch.version.cuda or 'none'}); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(
                f"{text!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    return dev
