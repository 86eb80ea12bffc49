"""DSnoT / R^2-DSnoT refiners: exact sparsity, never a higher reconstruction error, the papers' rules."""
import pytest
import torch

from duoserve.prune.activation import sparsify_topk
from duoserve.prune.refiners import RefinedMethod, available_refiners, build_refiner
from duoserve.prune.refiners.prune_grow import PruneGrowSettings, RefineStats, prune_and_grow
from duoserve.prune.registry import build_options, get_method
from duoserve.prune.sparsity import SparsityTarget


def llm_like_inputs(t, k, seed=0):
    """Correlated inputs with a few outlier channels and non-zero channel means (as in LLMs)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k ** 0.5 + torch.eye(k)
    scale = 1 + 4 * (torch.rand(k, generator=g) < 0.05)
    mean = 0.5 * torch.randn(k, generator=g)
    return (torch.randn(t, k, generator=g) @ mix) * scale + mean  # [T, K]


def refine_with(method_name, refiner_name, w, x, target, p_x=0.0, x_dense=None, opts=None, ropts=None):
    cls = get_method(method_name)
    base = cls(SparsityTarget.parse(target), p_x, build_options(cls, opts or {}))
    method = RefinedMethod(base, build_refiner(refiner_name, ropts or {}))
    linear = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
    linear.weight.data = w.clone()
    base_obs = base.observer("mlp.up_proj", linear)
    obs = method.observer("mlp.up_proj", linear)
    dense_chunks = (x_dense if x_dense is not None else x).split(256)
    for chunk, dense_chunk in zip(x.split(256), dense_chunks):
        d = dense_chunk if base.needs_dense_stream else None
        base_obs.add_batch(chunk, d)
        obs.add_batch(chunk, d)
    return base_obs.prune(w.clone()), obs.prune(w.clone()), method.refiner


def sq_error(w_new, w, x_hat, x_target):
    """||W' X^ - W X~||_F^2 in float64, computed directly from the calibration batch."""
    return float(((x_hat.double() @ w_new.double().T - x_target.double() @ w.double().T) ** 2).sum())


def check_same_sparsity(base, refined, target):
    assert int((refined == 0).sum()) == int((base == 0).sum())
    assert torch.equal((refined == 0).sum(1), (base == 0).sum(1))  # swaps stay inside a row
    t = SparsityTarget.parse(target)
    if t.is_nm:
        n, k = refined.shape
        assert ((refined != 0).view(n, k // t.m, t.m).sum(-1) <= t.n).all()


def test_registry_lists_refiners():
    assert {"dsnot", "r2dsnot"} <= set(available_refiners())


@pytest.mark.parametrize("refiner", ["dsnot", "r2dsnot"])
@pytest.mark.parametrize("method", ["magnitude", "wanda", "ria", "sparsegpt"])
@pytest.mark.parametrize("target", ["0.6", "2:4"])
def test_refiners_keep_sparsity_and_never_increase_error(refiner, method, target):
    torch.manual_seed(0)
    w, x = torch.randn(48, 128), llm_like_inputs(2048, 128, seed=1)
    base, refined, ref = refine_with(method, refiner, w, x, target)
    check_same_sparsity(base, refined, target)
    assert sq_error(refined, w, x, x) <= sq_error(base, w, x, x) * (1 + 1e-9)
    assert ref.totals["swaps"] > 0 or method == "sparsegpt", ref.totals  # the refiner did something


@pytest.mark.parametrize("refiner", ["dsnot", "r2dsnot"])
@pytest.mark.parametrize("base_scale, refine_scale, expect", [(None, None, 0.5), (0.25, None, 0.25), (None, 1.0, 1.0)])
def test_refining_duogpt_uses_its_dual_sparse_objective(refiner, base_scale, refine_scale, expect):
    """After DuoGPT at p_x = 0.5: ||W' X^ - W (X^ + s (X~ - X^))|| (X^ sparsified pruned stream,
    X~ dense stream) never rises, s the refiner's residual scale: by default DuoGPT's own."""
    torch.manual_seed(1)
    x_dense = llm_like_inputs(2048, 128, seed=2)
    x = x_dense + 0.2 * torch.randn_like(x_dense)  # the pruned model's inputs drift from the dense ones
    w = torch.randn(40, 128)
    opts = {"damp": 0.1, "residual_scale": base_scale}
    base, refined, ref = refine_with("duogpt", refiner, w, x, "0.5", p_x=0.5, x_dense=x_dense, opts=opts,
                                     ropts={"update_threshold": 0.0, "residual_scale": refine_scale})
    check_same_sparsity(base, refined, "0.5")
    x_hat = sparsify_topk(x, 0.5)
    x_target = x_hat + expect * (x_dense - x_hat)
    assert sq_error(refined, w, x_hat, x_target) <= sq_error(base, w, x_hat, x_target) * (1 + 1e-9)
    assert ref.totals["active_rows"] > 0 and ref.totals["swaps"] > 0


def test_refiner_residual_scale_changes_the_result():
    """The refinement target's scale is not a no-op: following DuoGPT's 0.5 and aiming at the full
    dense stream pick different swaps."""
    torch.manual_seed(1)
    x_dense = llm_like_inputs(2048, 128, seed=2)
    x = x_dense + 0.2 * torch.randn_like(x_dense)
    w = torch.randn(40, 128)
    ropts = {"update_threshold": 0.0}
    _, half, _ = refine_with("duogpt", "r2dsnot", w, x, "0.5", p_x=0.5, x_dense=x_dense, ropts=ropts)
    _, full, _ = refine_with("duogpt", "r2dsnot", w, x, "0.5", p_x=0.5, x_dense=x_dense,
                             ropts={**ropts, "residual_scale": 1.0})
    assert not torch.equal(half, full)


def test_refining_with_activation_sparsity_without_dense_stream():
    torch.manual_seed(2)
    w, x = torch.randn(40, 128), llm_like_inputs(2048, 128, seed=3)
    base, refined, _ = refine_with("sparsegpt", "r2dsnot", w, x, "0.5", p_x=0.5, ropts={"update_threshold": 0.0})
    x_hat = sparsify_topk(x, 0.5)
    check_same_sparsity(base, refined, "0.5")
    assert sq_error(refined, w, x_hat, x) <= sq_error(base, w, x_hat, x) * (1 + 1e-9)


def test_r2dsnot_without_its_additions_is_dsnot():
    torch.manual_seed(3)
    w, x = torch.randn(32, 96), llm_like_inputs(1024, 96, seed=4)
    plain = dict(grow_relative=False, prune_relative=False, gamma1=0.0, gamma2=0.0, alpha=1.0)
    _, a, _ = refine_with("wanda", "dsnot", w, x, "0.6")
    _, b, _ = refine_with("wanda", "r2dsnot", w, x, "0.6", ropts=plain)
    assert torch.equal(a, b)
    _, c, _ = refine_with("wanda", "r2dsnot", w, x, "0.6")
    assert not torch.equal(a, c)  # the defaults (relative growing, gamma2, sqrt activation) do change it


def _stats(x):
    stats = RefineStats(x.shape[1], "cpu", 0.0, use_dense=False)
    for chunk in x.split(200):
        stats.add(chunk, None)
    return stats


def test_one_cycle_follows_the_dsnot_formulas():
    """max_cycles = 1, no guard: every active row swaps exactly the (i, j) the formulas pick."""
    torch.manual_seed(4)
    w, x = torch.randn(24, 64), llm_like_inputs(1000, 64, seed=5)
    xd = x.double()
    scores = w.abs() * x.norm(dim=0)
    pruned = w.masked_fill(scores < scores.median(dim=1, keepdim=True).values, 0.0)
    out, info = prune_and_grow(w, pruned, _stats(x), SparsityTarget(0.5),
                               PruneGrowSettings(max_cycles=1, update_threshold=0.1, guard=False))
    mu, var, rms = xd.mean(0), xd.var(0, unbiased=False), xd.pow(2).mean(0).sqrt()
    wd, pd = w.double(), pruned.double()
    swaps = 0
    for q in range(w.shape[0]):
        err = float((wd[q] - pd[q]) @ mu)
        s = 1.0 if err > 0 else -1.0
        if abs(err) <= 0.1:
            assert torch.equal(out[q], pruned[q])
            continue
        grow = [(s * wd[q, r] * mu[r] / var[r], r) for r in range(64) if pd[q, r] == 0 and s * wd[q, r] * mu[r] > 0]
        prune = [(pd[q, r].abs() * rms[r], r) for r in range(64) if pd[q, r] != 0 and s * pd[q, r] * mu[r] < 0]
        i, j = max(grow)[1], min(prune)[1]
        after = err - wd[q, i] * mu[i] + pd[q, j] * mu[j]
        expected = pruned[q].clone()
        if (after > 0) == (s > 0):
            expected[i], expected[j] = w[q, i], 0.0
            swaps += 1
        assert torch.equal(out[q], expected), q
    assert swaps == info["swaps"] > 0


def test_without_guard_mean_error_shrinks_per_row():
    """The papers' rule alone: |E[eps_q]| never grows in any row (it may raise the squared error)."""
    torch.manual_seed(5)
    w, x = torch.randn(32, 96), llm_like_inputs(1024, 96, seed=6)
    scores = w.abs() * x.norm(dim=0)
    pruned = w.masked_fill(scores < scores.quantile(0.6, dim=1, keepdim=True), 0.0)
    out, info = prune_and_grow(w, pruned, _stats(x), SparsityTarget(0.6), PruneGrowSettings(guard=False))
    mu = x.double().mean(0)
    before = ((w.double() - pruned.double()) @ mu).abs()
    after = ((w.double() - out.double()) @ mu).abs()
    assert info["swaps"] > 0
    assert (after <= before + 1e-9).all()
    assert int((out == 0).sum()) == int((pruned == 0).sum())


def test_refined_method_mirrors_the_base():
    base = get_method("magnitude")(SparsityTarget(0.5), 0.0)
    method = RefinedMethod(base, build_refiner("dsnot", {}))
    assert method.name == "magnitude" and method.needs_calibration and not method.needs_dense_stream
    duo = RefinedMethod(get_method("duogpt")(SparsityTarget(0.5), 0.5), build_refiner("r2dsnot", {"gamma2": 1e-3}))
    assert duo.needs_dense_stream and duo.activation_sparsity == 0.5
    assert duo.refiner.describe()["gamma2"] == 1e-3


def test_refiner_option_validation():
    from duoserve.errors import InputError

    with pytest.raises(InputError, match="unknown refiner 'nope'; valid refiners: dsnot, r2dsnot"):
        build_refiner("nope", {})
    with pytest.raises(InputError, match=r"--refine-gamma1 do\(es\) not apply to refiner 'dsnot'"):
        build_refiner("dsnot", {"gamma1": 0.1})
    with pytest.raises(InputError, match="gamma"):
        build_refiner("r2dsnot", {"gamma2": -1.0})
    with pytest.raises(InputError, match="residual_scale must be >= 0"):
        build_refiner("dsnot", {"residual_scale": -0.5})


FAST = dict(nsamples=4, seqlen=64, threshold_nsamples=2, batch_size=2)


def test_prune_model_records_method_and_refiner(tmp_path, tiny_llama_dir):
    from duoserve.format.io import load_checkpoint
    from duoserve.prune.api import PruneConfig, prune_model

    out = tmp_path / "ria-r2"
    summary = prune_model(PruneConfig(output=out, model=str(tiny_llama_dir), method="ria", sparsity="2:4",
                                      method_options={"alpha": 1.0}, refine="r2dsnot",
                                      refine_options={"gamma2": 1e-3, "prune_relative": None}, **FAST))
    ck = load_checkpoint(out)
    assert summary["sparsity"] == pytest.approx(0.5, abs=1e-6) and summary["refine"] == "r2dsnot"
    producer = ck.qconfig.producer
    assert producer["method"] == "ria" and producer["method_args"]["alpha"] == 1.0
    assert producer["refine"] == "r2dsnot"
    assert producer["refine_args"]["gamma2"] == 1e-3 and producer["refine_args"]["norm_p"] == 2.0
    for name, info in ck.qconfig.modules.items():
        w = ck.state_dict[name + ".weight"]
        assert ((w != 0).view(w.shape[0], -1, 4).sum(-1) <= 2).all(), name


def test_cli_refine_flags(tmp_path, tiny_llama_dir, capsys):
    from duoserve.cli import main
    from duoserve.format.io import load_checkpoint

    base = ["prune", str(tiny_llama_dir), "--nsamples", "2", "--seqlen", "32", "--batch-size", "2"]
    out = tmp_path / "ok"
    # DuoGPT + a refiner through the engine: the dense stream reaches the refiner's objective.
    assert main([*base, "-o", str(out), "--method", "duogpt", "--activation-sparsity", "0.5", "--threshold-nsamples",
                 "2", "--refine", "dsnot", "--refine-max-cycles", "5", "--no-refine-guard"]) == 0
    ck = load_checkpoint(out)
    producer = ck.qconfig.producer
    assert producer["method"] == "duogpt" and producer["refine"] == "dsnot"
    assert producer["refine_args"] == {"max_cycles": 5, "update_threshold": 0.1, "var_power": 1.0, "guard": False,
                                     "residual_scale": None}  # None: the base method's (DuoGPT: 0.25)
    assert ck.qconfig.global_sparsity == pytest.approx(0.5, abs=1e-6) and ck.qconfig.activation_sparsity.target == 0.5
    for extra, message in [(["--refine", "nope"], "unknown refiner 'nope'"),
                           (["--refine-gamma2", "0.1"], "--refine-gamma2 need(s) --refine NAME"),
                           (["--refine", "dsnot", "--refine-gamma2", "0.1"], "do(es) not apply to refiner 'dsnot'"),
                           (["--method", "ria", "--relative", "cols"], "relative must be one of")]:
        bad = tmp_path / "bad"
        capsys.readouterr()
        assert main([*base, "-o", str(bad), *extra]) == 2
        assert message in capsys.readouterr().err
        assert not bad.exists()
