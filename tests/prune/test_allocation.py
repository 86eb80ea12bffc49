"""Layer-adaptive activation sparsity: TEAL's greedy allocation (prune/allocation.py) and
`duoserve allocate` (prune/allocate_cli.py) on the tiny Llama.

The table meets every target exactly (K*N-weighted mean, in every block), is monotone in the
target and one search path serves every target; it beats the uniform rule on its own calibration
objective; served on held-out text it realizes about its average; it is computed from the
calibration source's fit split only; it round-trips through the metadata, an in-place update is
atomic; old checkpoints still load and refuse what they cannot do; bad input is an error.
"""
import json
import shutil
import subprocess
import sys

import pytest

from checkpoint_versions import as_format_v1
from duoserve.errors import InputError
from duoserve.format.io import load_checkpoint, read_quant_config
from duoserve.format.manifest import verify_manifest
from duoserve.prune.allocate_cli import allocate_checkpoint
from duoserve.prune.api import PruneConfig
from duoserve.prune.pruned_models import load_pruned_model
from pruning_helpers import prune_tiny

ALLOC = dict(nsamples=2, seqlen=32)
TARGETS = (0.2, 0.4, 0.6)


@pytest.fixture(scope="module")
def ckpt(magnitude_w50x50):
    return magnitude_w50x50


@pytest.fixture(scope="module")
def greedy(ckpt):
    out = ckpt.with_name("w50x50-greedy")
    allocate_checkpoint(ckpt, out, targets=TARGETS, **ALLOC)
    return out


def _sizes(q):
    return {n: m.shape[0] * m.shape[1] for n, m in q.modules.items()}


def test_every_target_is_met_in_every_block(greedy):
    q = read_quant_config(greedy)[1]
    alloc, size = q.activation_sparsity.allocation, _sizes(q)
    assert alloc.method == "greedy" and alloc.targets == TARGETS
    for i, t in enumerate(TARGETS):
        for layer in ("model.layers.0.", "model.layers.1."):
            names = [n for n in q.modules if n.startswith(layer)]
            mean = sum(size[n] * alloc.modules[n][i] for n in names) / sum(size[n] for n in names)
            assert mean == pytest.approx(t, abs=1e-5), (layer, t)
    ps = [p for v in alloc.modules.values() for p in v]
    assert min(ps) < 0.2 and max(ps) > 0.6  # adaptive: not the uniform rule


def test_tables_are_monotone_and_one_path_serves_every_target(ckpt, greedy, tmp_path):
    alloc = read_quant_config(greedy)[1].activation_sparsity.allocation
    assert all(list(v) == sorted(v) for v in alloc.modules.values())
    allocate_checkpoint(ckpt, tmp_path / "one", targets=(0.4,), **ALLOC)
    alone = read_quant_config(tmp_path / "one")[1].activation_sparsity.allocation
    assert {n: v[0] for n, v in alone.modules.items()} == {n: v[1] for n, v in alloc.modules.items()}


def test_greedy_beats_uniform_on_its_calibration_objective(greedy):
    info = read_quant_config(greedy)[1].activation_sparsity.allocation.info
    for t, (g, u) in info["block_error_greedy_vs_uniform"].items():
        assert g < u, (t, g, u)
    assert info["calibration"]["data"] == "c4" and "held out" in info["calibration"]["description"]


def test_served_average_is_realized_on_held_out_text(greedy):
    from duoserve.evaluation.perplexity import make_windows, perplexity
    from duoserve.evaluation.texts import evaluation_tokens

    model, tokenizer, loaded = load_pruned_model(greedy, activation_sparsity=0.4, allocation="greedy")
    ids, _ = evaluation_tokens("wiki", tokenizer)  # Wikipedia: not the C4 calibration text
    result = perplexity(model, make_windows(ids, 64, max_windows=8))
    assert result["ppl"] < float("inf")
    realized, size = model.duoserve_sparsity.realized(), _sizes(loaded.qconfig)
    weighted = sum(realized[n] * size[n] for n in realized) / sum(size.values())
    assert abs(weighted - 0.4) < 0.04, realized
    uniform, _, _ = load_pruned_model(greedy, activation_sparsity=0.4)
    assert uniform.duoserve_sparsity.thresholds != model.duoserve_sparsity.thresholds


def test_only_the_calibration_fit_split_is_read(ckpt, tmp_path, monkeypatch):
    import duoserve.evaluation.texts as texts
    import duoserve.prune.data as data

    sources = []
    real = data.calibration_text

    def spy(source):
        sources.append(source)
        return real(source)

    def forbidden(*args, **kwargs):
        raise AssertionError("the allocation read evaluation or held-out text")

    monkeypatch.setattr(data, "calibration_text", spy)
    monkeypatch.setattr(data, "heldout_calibration_text", forbidden)
    monkeypatch.setattr(texts, "evaluation_tokens", forbidden)
    monkeypatch.setattr(texts, "heldout_calibration_text", forbidden)
    allocate_checkpoint(ckpt, tmp_path / "out", targets=(0.5,), **ALLOC)
    assert sources == ["c4"]


def test_in_place_update_roundtrips_and_a_failure_leaves_the_checkpoint_as_it_was(ckpt, tmp_path, monkeypatch):
    import duoserve.format.io as io

    copy = tmp_path / "ckpt"
    shutil.copytree(ckpt, copy)
    before = (copy / "config.json").read_bytes()
    monkeypatch.setattr(io, "write_manifest", lambda folder: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        allocate_checkpoint(copy, None, targets=(0.5,), **ALLOC)
    assert (copy / "config.json").read_bytes() == before
    verify_manifest(copy)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary folder left
    monkeypatch.undo()
    allocate_checkpoint(copy, None, targets=(0.5,), **ALLOC)
    loaded = load_checkpoint(copy)  # manifest and tensors verified
    q = loaded.qconfig
    assert q.activation_sparsity.allocation.targets == (0.5,)
    cfg = json.loads((copy / "config.json").read_text())["quantization_config"]
    assert type(q).from_dict(cfg) == q
    assert q.modules == load_checkpoint(ckpt).qconfig.modules  # nothing else changed


def test_old_checkpoints_load_and_refuse_greedy_clearly(ckpt, tmp_path):
    v1 = as_format_v1(ckpt, tmp_path / "v1")
    with pytest.raises(InputError, match="no threshold grid to allocate from"):
        allocate_checkpoint(v1, tmp_path / "x", targets=(0.5,), **ALLOC)
    model, _, _ = load_pruned_model(v1)  # loads, at its own p_x
    assert model.duoserve_sparsity.mode == "threshold"
    for path in (v1, ckpt):
        with pytest.raises(InputError, match="no allocation table.*duoserve allocate"):
            load_pruned_model(path, activation_sparsity=0.5, allocation="greedy")


@pytest.mark.parametrize("targets,match", [((0.0,), "outside \\(0, 1\\)"), ((1.0, 0.5), "outside \\(0, 1\\)"),
                                           ((0.95,), "above the checkpoint's largest calibrated p_x 0.9"),
                                           ((), "at least one")])
def test_bad_targets_are_refused_before_loading(ckpt, tmp_path, targets, match):
    with pytest.raises(InputError, match=match):
        allocate_checkpoint(ckpt, tmp_path / "x", targets=targets, **ALLOC)
    assert not (tmp_path / "x").exists()


def test_cli_errors_exit_2(ckpt, greedy, tmp_path):
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "duoserve.cli", *args], capture_output=True, text=True,
                              timeout=300)

    cases = [(("allocate", str(ckpt), "-o", str(tmp_path / "x"), "--allocation-targets", "0.5,1.5"), "outside (0, 1)"),
             (("allocate", str(ckpt), "-o", str(greedy)), "already exists"),
             (("eval", "ppl", str(ckpt), "--allocation", "greedy", "--data", "wiki", "--max-windows", "1",
               "--seqlen", "32", "--no-dense"), "no allocation table"),
             (("eval", "ppl", str(greedy), "--allocation", "greedy", "--activation-sparsity", "0.7", "--data", "wiki",
               "--max-windows", "1", "--seqlen", "32", "--no-dense"), "covers average p_x up to 0.6")]
    for args, message in cases:
        proc = cli(*args)
        assert proc.returncode == 2, (args, proc.stderr[-2000:])
        assert message in proc.stderr and "Traceback" not in proc.stderr, (args, proc.stderr[-2000:])


def test_prune_time_allocation_equals_allocating_the_checkpoint_later(tiny_llama_dir, ckpt, tmp_path):
    """`duoserve prune --allocation greedy` and `duoserve allocate` on the same prune: same windows
    (calibration seed + 2, fit split), same weights and grid, so the same table."""
    out = tmp_path / "pruned-greedy"
    prune_tiny(tiny_llama_dir, out, activation_sparsity=0.5, allocation="greedy", allocation_targets=TARGETS,
               allocation_nsamples=2, allocation_seqlen=32)
    at_prune = read_quant_config(out)[1].activation_sparsity.allocation
    allocate_checkpoint(ckpt, tmp_path / "later", targets=TARGETS, **ALLOC)
    later = read_quant_config(tmp_path / "later")[1].activation_sparsity.allocation
    assert at_prune.targets == later.targets
    for name, ps in later.modules.items():
        assert at_prune.modules[name] == pytest.approx(ps, abs=1e-6), name


@pytest.mark.parametrize("kwargs,match", [(dict(allocation="best"), "not uniform or greedy"),
                                          (dict(allocation="greedy", allocation_targets=(0.95,)), "above"),
                                          (dict(allocation="greedy", allocation_nsamples=0), "must be positive")])
def test_prune_refuses_bad_allocation_options_before_loading(tmp_path, kwargs, match):
    with pytest.raises(InputError, match=match):
        PruneConfig(output=tmp_path / "x", model="/nonexistent", activation_sparsity=0.5, **kwargs)


def test_inspect_shows_the_table(greedy, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "duoserve.cli", "inspect", str(greedy), "--json",
                           str(tmp_path / "r.json")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--allocation greedy: average p_x up to 0.6" in proc.stdout
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["activation_sparsity"]["allocation"]["targets"] == list(TARGETS)
