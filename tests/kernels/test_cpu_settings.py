"""The CPU kernel's settings and the choices they make: the decoder (measured or forced), the cutover
between the walk and the tiled path, the walk-all policy, the software prefetch, the instruction
set, and their environment variables (bad text stops the import with a message naming the
variable). The products under every setting: test_cpu_kernel.py checks them against fp32 dense."""
import pytest
import torch
from cpu_paths import DTYPES, needs_ext, spmspv_path, tiled_path

from duoserve.kernels import cpu, dual_sparse_linear
from duoserve.kernels.cpu_features import cpu_flags
from duoserve.kernels.check import Case, make_inputs, run_cases


@needs_ext
def test_isa_follows_the_cpu_flags():
    """The AVX-512 decoders need VBMI2 or VPOPCNTDQ + BITALG on top of F/BW/VL; the AVX2 decoder
    AVX2 + FMA (a Zen 3 host found this test expecting only avx512 or scalar)."""
    flags = cpu_flags()
    avx512 = {"avx512f", "avx512bw", "avx512vl"} <= flags and (
        "avx512_vbmi2" in flags or {"avx512_vpopcntdq", "avx512_bitalg"} <= flags)
    expected = "avx512" if avx512 else "avx2" if {"avx2", "fma"} <= flags else "scalar"
    assert cpu.isa() == expected


@needs_ext
def test_cutover_follows_the_decoder():
    """The scalar loop pays a full walk for each pass of 3 tokens, so 4+ tokens go tiled; the SIMD
    decoders walk up to 12 (the AVX2 one against a tiled path that multiplies in fp32 on its CPUs)."""
    assert cpu.sparse_max_tokens() == (3 if cpu.decoder(torch.bfloat16) == "scalar" else 12)
    try:
        for name, most in (("avx2", 12), ("scalar", 3), ("permute", 12), ("expand", 12)):
            if name in cpu.available_decoders():
                cpu.set_decoder(name)
                assert cpu.sparse_max_tokens(torch.bfloat16) == most, name
        cpu.set_sparse_max_tokens(5)
        assert cpu.sparse_max_tokens(torch.bfloat16) == cpu.sparse_max_tokens(torch.float32) == 5
        with pytest.raises(RuntimeError, match="must be >= 0"):
            cpu.set_sparse_max_tokens(-2)
    finally:
        cpu.set_decoder(None)
        cpu.set_sparse_max_tokens(None)
    assert cpu.sparse_max_tokens() == (3 if cpu.decoder(torch.bfloat16) == "scalar" else 12)


@needs_ext
def test_decoder_choice_and_errors():
    assert "scalar" in cpu.available_decoders()
    for dtype in DTYPES:
        assert cpu.decoder(dtype) in cpu.available_decoders()
    with pytest.raises(RuntimeError, match="unknown decoder 'fast'"):
        cpu.set_decoder("fast")
    with pytest.raises(ValueError, match="bf16 and fp32"):
        cpu.decoder(torch.float16)
    cpu.set_decoder("scalar")
    try:
        assert cpu.decoder(torch.bfloat16) == "scalar"
    finally:
        cpu.set_decoder(None)
    assert cpu.decoder() != "scalar" or cpu.isa() == "scalar"


@needs_ext
def test_walk_policy_is_measured_and_settable():
    policies = cpu.walk_all_policies()
    skip_short, walk_short = policies["skip_short_spans"], policies["walk_short_spans"]
    assert skip_short == (0.6, 144.0) and walk_short == (0.75, 112.0)  # what the docs describe
    measured = cpu.walk_all_calibration()
    if cpu.decoder() == "scalar":
        assert measured is None and cpu.walk_all() == skip_short
    else:
        # the decision follows the measurement: walk 128-byte spans when skipping half costs > 1.1x
        assert measured["probe_mib"] >= 64 and measured["skip_ms"] > 0 and measured["walk_all_ms"] > 0
        expected = walk_short if measured["skip_over_walk_all"] > 1.1 else skip_short
        assert measured["policy"] == expected and cpu.walk_all() == expected
        assert cpu.walk_all_calibration() == measured  # once per process
    assert not cpu.walk_all_requested()
    cpu.set_walk_all(*skip_short)
    assert cpu.walk_all_requested()  # a set policy applies even where the walk streams
    try:
        # bf16 at p_w 0.5 packs 128 bytes of values per (row block, column): skip; p_w 0: 256
        assert not cpu.walks_all_columns(100, 1000, 128.0)
        assert cpu.walks_all_columns(100, 1000, 256.0) and cpu.walks_all_columns(599, 1000, 256.0)
        assert not cpu.walks_all_columns(600, 1000, 256.0)  # from 60% inactive skipping wins
        assert not cpu.walks_all_columns(0, 1000, 256.0)  # nothing to skip: the walk is the same
        cpu.set_walk_all(*walk_short)
        assert cpu.walks_all_columns(500, 1000, 128.0) and cpu.walks_all_columns(700, 1000, 128.0)
        assert not cpu.walks_all_columns(500, 1000, 77.0) and not cpu.walks_all_columns(750, 1000, 128.0)
        cpu.set_walk_all(0.0, 0.0)
        assert cpu.walk_all() == (0.0, 0.0) and not cpu.walks_all_columns(1, 1000, 512.0)
        cpu.set_walk_all(2.0, 0.0)
        assert cpu.walks_all_columns(999, 1000, 1.0)
        with pytest.raises(RuntimeError, match="must be >= 0"):
            cpu.set_walk_all(-1.0, 0.0)
        with pytest.raises(ValueError, match="needs both"):
            cpu.set_walk_all(0.5)
    finally:
        cpu.set_walk_all(None)
    assert cpu.walk_all() == (measured["policy"] if measured else skip_short)
    assert not cpu.walk_all_requested()


def test_walk_all_environment_text_is_checked():
    import os
    import subprocess
    import sys
    code = ("from duoserve.kernels import cpu; cpu.walk_all(); m = cpu.walk_all_calibration(); "
            "print(cpu.walk_all(), (m['policy'] if m else cpu.walk_all_policies()['skip_short_spans'])[0])")
    env = dict(os.environ, DUOSERVE_CPU_WALK_ALL_MIN_SPAN="0")
    env.pop("DUOSERVE_CPU_WALK_ALL_MAX_INACTIVE", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    if cpu.available():  # the unset half keeps the measured value
        assert out.returncode == 0, out.stderr
        policy, measured_max_inactive = out.stdout.strip().rsplit(" ", 1)
        assert policy == f"({measured_max_inactive}, 0.0)", out.stdout
    for name, bad in (("DUOSERVE_CPU_WALK_ALL_MAX_INACTIVE", "half"), ("DUOSERVE_CPU_WALK_ALL_MIN_SPAN", "-5"),
                      ("DUOSERVE_CPU_WALK_ALL_MAX_INACTIVE", "nan")):
        out = subprocess.run([sys.executable, "-c", code], env=dict(env, **{name: bad}), capture_output=True,
                             text=True, timeout=120)
        assert out.returncode != 0 and f"{name} must be a number >= 0" in out.stderr, out.stderr


@needs_ext
@pytest.mark.parametrize("ahead,lines,stream", [(0, 0, 0), (0, 3, 4096), (1, 0, 0), (5, 1, 0), (1000, 3, 0),
                                                (48, 3, 64), (48, 3, 1 << 30), (48, 3, -1)])
def test_prefetch_settings_give_the_same_products(ahead, lines, stream):
    """Column prefetch distances shorter than, around and past a row block's active columns (the
    prefetch then reaches into the next row block, or past the last one), exact-lines mode, the
    stream prefetch one line ahead and past the end of the values, each walk's default, and off."""
    saved = cpu.prefetch()
    assert saved == cpu.DEFAULT_PREFETCH == (48, 3, -1)
    cpu.set_prefetch(ahead, lines, stream)
    try:
        cases = [Case(n, k, t, 0.5, 0.5, dt) for n, k, t in ((971, 77, 1), (300, 33, 2), (129, 300, 5))
                 for dt in DTYPES]
        failures = run_cases(dual_sparse_linear, cases, "cpu")
        assert not failures, "\n".join(failures)
    finally:
        cpu.set_prefetch(*saved)
    with pytest.raises(RuntimeError, match="must be >= 0"):
        cpu.set_prefetch(-1, 3)
    with pytest.raises(RuntimeError, match="stream prefetch distance must be -1"):
        cpu.set_prefetch(48, 3, -2)


@needs_ext
def test_prefetch_mode_names_what_the_walk_does():
    """The default: the stream for the AVX2 walk, columns for the AVX-512 ones; forced either way."""
    saved = cpu.prefetch()
    try:
        for dtype in DTYPES:
            walk = cpu.decoder(dtype)
            expected = {"avx2": "stream 4096 B (columns below 25% active)", "scalar": "off"}.get(walk, "columns 48/3")
            assert cpu.prefetch_mode(dtype) == expected, walk
            cpu.set_prefetch(16, 0, 0)
            assert cpu.prefetch_mode(dtype) == ("off" if walk == "scalar" else "columns 16/exact")
            cpu.set_prefetch(48, 3, 2048)
            assert cpu.prefetch_mode(dtype) == ("off" if walk == "scalar" else "stream 2048 B")
            cpu.set_prefetch(0, 3, 2048)
            assert cpu.prefetch_mode(dtype) == "off"
            cpu.set_prefetch(*saved)
    finally:
        cpu.set_prefetch(*saved)
    with pytest.raises(ValueError, match="runs bf16 and fp32"):
        cpu.prefetch_mode(torch.float16)


@needs_ext
def test_built_walk_functions_contain_software_prefetch():
    """GCC 12 deleted every call of an out-of-line prefetch helper as a dead call to a pure function
    (so the kernel ran without software prefetch until 2026-11-27, see prefetch_column): check the
    built binary itself, every spMspV block function (and the panel walk's L2 prefetch)."""
    import shutil
    import subprocess
    from duoserve.kernels import _cpu_kernels
    if shutil.which("objdump") is None:
        pytest.skip("objdump (binutils) is not installed")
    listing = subprocess.run(["objdump", "-d", "-C", "--no-show-raw-insn", _cpu_kernels.__file__],
                             capture_output=True, text=True, check=True, timeout=120).stdout
    functions = {}
    name = None
    for line in listing.splitlines():
        if line.endswith(">:"):
            name = line.split("<", 1)[1][:-2]
            functions[name] = []
        elif name is not None:
            functions[name].append(line)
    walks = {n: body for n, body in functions.items() if "::block_" in n and "scalar" not in n}
    assert len(walks) >= 12, sorted(functions)[:20]
    missing = [n for n, body in walks.items() if not any("prefetcht0" in line for line in body)]
    assert not missing, f"no software prefetch in: {missing}"
    # the panel walk also fetches the next chunk into L2 while it multiplies (where the CPU has it)
    panel = [body for n, body in walks.items() if "block_bf16_dot_panel" in n]
    assert len(panel) == 1
    assert any("prefetcht1" in line for line in panel[0]), "the panel walk lost its multiply-phase prefetch"


def test_prefetch_environment_text_is_checked():
    import subprocess
    import sys
    assert cpu.parse_prefetch("48,3") == (48, 3, 0)
    assert cpu.parse_prefetch("stream,2048") == (48, 3, 2048)
    code = "from duoserve.kernels import cpu; print(cpu.prefetch())"
    env = dict(__import__("os").environ, DUOSERVE_CPU_PREFETCH="0,0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    if cpu.available():
        assert out.returncode == 0 and out.stdout.strip() == "(0, 0, 0)", out.stderr
    env["DUOSERVE_CPU_PREFETCH"] = "48"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "DUOSERVE_CPU_PREFETCH must be AHEAD,LINES" in out.stderr
    for bad in ("48", "a,b", "-1,3", "1,2,3", "stream,0", "stream,-5", "stream,x"):
        with pytest.raises(ValueError, match="DUOSERVE_CPU_PREFETCH must be AHEAD,LINES"):
            cpu.parse_prefetch(bad)


@needs_ext
def test_decoder_environment_variable():
    import subprocess
    import sys
    code = "from duoserve.kernels import cpu; import torch; print(cpu.decoder(), cpu.decoder(torch.float32))"
    env = dict(__import__("os").environ, DUOSERVE_CPU_DECODER="scalar")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["scalar", "scalar"]
    env["DUOSERVE_CPU_DECODER"] = "fastest"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "unknown decoder 'fastest'" in out.stderr


@needs_ext
def test_bf16_cutover_follows_the_panel_walk():
    """The public op sends bf16 batches up to the panel's maximum to the walk (tiled above), fp32
    batches above sparse_max_tokens to the tiled path; both agree with fp32 dense."""
    from duoserve.kernels import pack_dense
    x, w, thr, bias = make_inputs(Case(200, 300, 20, 0.5, 0.5, torch.bfloat16), "cpu")
    p = pack_dense(w)
    walk = spmspv_path(False)(x, p, thr, bias)
    tiled = tiled_path(x, p, thr, bias)
    out = dual_sparse_linear(x, p, thr, bias)
    panel = cpu.panel_walk_tokens() is not None
    assert torch.equal(out, walk if panel else tiled)
    saved_dot = cpu.bf16_dot_request()
    cpu.set_bf16_dot_tokens(7, 16)
    try:
        assert torch.equal(dual_sparse_linear(x, p, thr, bias), tiled)
        assert cpu.panel_walk_tokens() == ((7, 16) if panel else None)
        cpu.set_bf16_dot_tokens(0)
        assert cpu.panel_walk_tokens() is None
    finally:
        cpu.set_bf16_dot_tokens(*saved_dot)


def test_integer_settings_in_the_environment_are_checked():
    """Bad text names its variable, an out-of-range value is refused by the extension's setter: both
    stop the import (duoserve.kernels loads the extension) with a clear message."""
    import os
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if not k.startswith("DUOSERVE_CPU_")}
    code = "from duoserve.kernels import cpu; print(cpu.available() and cpu.slices_max_tokens())"

    def run(**settings):
        return subprocess.run([sys.executable, "-c", code], env=dict(env, **settings), capture_output=True,
                              text=True, timeout=120)

    out = run(DUOSERVE_CPU_SLICES_MAX_TOKENS="seven")
    assert out.returncode != 0 and "DUOSERVE_CPU_SLICES_MAX_TOKENS must be an integer" in out.stderr, out.stderr
    if not cpu.available():
        return
    out = run(DUOSERVE_CPU_BF16_DOT_MAX_TOKENS="4")  # below the default minimum, 5
    assert out.returncode != 0 and "1 <= min_tokens <= max_tokens" in out.stderr, out.stderr
    out = run(DUOSERVE_CPU_BF16_DOT_MAX_TOKENS="x")
    assert out.returncode != 0 and "DUOSERVE_CPU_BF16_DOT_MAX_TOKENS must be an integer" in out.stderr, out.stderr
    out = run(DUOSERVE_CPU_SLICES_MAX_TOKENS="6")
    assert out.returncode == 0 and out.stdout.strip() == "6", out.stderr
