"""What a benchmark table says about the machine it ran on: the CPU model and the native kernel's
state (decoders, panel walk, AMX, prefetch, walk-all policy), or the GPU."""
from __future__ import annotations

import os
import platform

import torch

from . import cpu


def cpu_model() -> str:
    """'AMD EPYC (family 26, model 2)' from /proc/cpuinfo: the family tells Zen 4 (25) from Zen 5
    (26), which matters here (the decoders' costs differ); the architecture name elsewhere."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
                if not line.strip():
                    break  # the first processor is enough
    except OSError:
        pass
    if "model name" not in fields:
        return platform.processor() or platform.machine()
    return f"{fields['model name']} (family {fields.get('cpu family', '?')}, model {fields.get('model', '?')})"


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    kernel = f"kernel ISA {cpu.isa()}"
    if cpu.available():
        d16, d32 = cpu.decoder(torch.bfloat16), cpu.decoder(torch.float32)
        kernel += f", decoder {d16}" if d16 == d32 else f", decoders bf16 {d16} / fp32 {d32}"
        if cpu.tiled_bf16_in_fp32():
            kernel += ", tiled path multiplies bf16 in fp32"
        if cpu.panel_walk_tokens():
            kernel += ", bf16 panel walk at {}-{} tokens".format(*cpu.panel_walk_tokens())
        amx, why = cpu.amx()
        kernel += (f", AMX tiles from {cpu.amx_min_tokens()} tokens" if amx == "tiles" else f", AMX {amx} ({why})")
        mode = cpu.prefetch_mode(torch.bfloat16)
        kernel += f", prefetch {mode}" if mode != "off" else ", no software prefetch"
        max_inactive, min_span = cpu.walk_all()
        requested = cpu.walk_all_requested()
        policy = ("skips inactive columns" if max_inactive <= 0 else
                  f"walks all columns when < {max_inactive:g} inactive and spans > {min_span:g} B"
                  + (" (requested)" if requested else ""))
        if mode.startswith("stream") and not requested and max_inactive > 0:
            policy = "skips inactive columns where it streams, else " + policy  # it reads their lines anyway
        kernel += ", " + policy
        measured = cpu.walk_all_calibration()
        if measured:
            kernel += " (skipping a random half of 128-B spans measured {:.2f}x walking all)".format(
                measured["skip_over_walk_all"])
    return (f"{cpu_model()} ({os.cpu_count()} cores, {torch.get_num_threads()} thread(s), {kernel}), "
            f"torch {torch.__version__}")
