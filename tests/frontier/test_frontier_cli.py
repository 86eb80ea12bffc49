"""`duoserve frontier` without models: argument errors, --dry-run, the work-folder cache and resume
logic, and the outputs, with each step's command replaced by a fake that writes what the real one
would (tests/frontier/test_frontier_tiny.py runs the real commands on a tiny model)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from duoserve import workcache
from duoserve.cli import main
from duoserve.frontier import steps as frontier_steps
from duoserve.frontier.rule import is_looping

GOOD = ["Sparse networks skip work, so they run faster on memory-bound hardware.", "Paris is the capital.",
        "Sleep, eat well, move.", "The cat swam across the lake and was proud of it."]
LOOP = " ".join(["I am SmolLM, a helpful assistant."] * 4)


def _value(cmd, flag, default=None):
    return cmd[cmd.index(flag) + 1] if flag in cmd else default


def fake_ppl(ckpt: str | None, px: float) -> float:
    """Dense 20; a checkpoint: 20 x (1 + w) x (1 + px), w from its name."""
    if ckpt is None:
        return 20.0
    w = float(re.search(r"-w([0-9.]+)-", ckpt).group(1))
    return 20.0 * (1 + w) * (1 + px)


class FakeCommands:
    """Stands in for workcache.run_logged: records each command and writes its outputs."""

    def __init__(self, fail_on: str | None = None):
        self.calls: list[list[str]] = []
        self.fail_on = fail_on

    def __call__(self, cmd, log: Path, env=None) -> float:
        self.calls.append(list(cmd))
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text("fake\n")
        if self.fail_on and self.fail_on in " ".join(cmd):
            raise workcache.StepFailed(f"command failed with exit code 1 (log {log})")
        if "prune" in cmd:
            out = Path(_value(cmd, "-o"))
            out.mkdir(parents=True, exist_ok=True)
            (out / "config.json").write_text(json.dumps({"quantization_config": {"producer": {"source_model": "x"}}}))
            Path(_value(cmd, "--json")).write_text(json.dumps(
                {"sparsity": float(_value(cmd, "--sparsity")), "prune_seconds": 1.0, "peak_rss_mib": 10.0}))
        elif "ppl" in cmd:
            target = cmd[cmd.index("ppl") + 1]
            ckpt = None if target.startswith("--") else target
            px = float(_value(cmd, "--activation-sparsity", 0))
            label = "pruned" if ckpt else "model"
            Path(_value(cmd, "--json")).write_text(json.dumps(
                {"data": "fake text", "seqlen": int(_value(cmd, "--seqlen")), "windows": 2, "dtype": "bfloat16",
                 label: {"ppl": fake_ppl(ckpt, px)}}))
        elif "duoserve.frontier.answers" in cmd:
            px = float(_value(cmd, "--activation-sparsity", 0))
            Path(_value(cmd, "--json")).write_text(json.dumps(
                {"prompts": [], "answers": GOOD if px < 0.5 else GOOD[:3] + [LOOP]}))
        else:
            raise AssertionError(f"unexpected command {cmd}")
        return 0.1


@pytest.fixture
def fake(monkeypatch):
    f = FakeCommands()
    monkeypatch.setattr(frontier_steps, "run_logged", f)
    return f


GRID = ["--methods", "duogpt,sparsegpt", "--sparsities", "0.2,0.5", "--serve-px", "0,0.3,0.5"]


def frontier(work: Path, *extra: str) -> int:
    return main(["frontier", "--work", str(work), *GRID, "--no-speed", *extra])


@pytest.mark.parametrize("argv, message", [
    (["--methods", "duogpt,nope"], "unknown method 'nope'"),
    (["--methods", "duogpt,duogpt"], "lists a method twice"),
    (["--methods", ","], "needs at least one method"),
    (["--sparsities", "0.5,1"], "--sparsities: 1 is outside [0, 1)"),
    (["--sparsities", "-0.1"], "outside [0, 1)"),
    (["--sparsities", "half"], "'half' is not a number"),
    (["--sparsities", ""], "--sparsities needs at least one value"),
    (["--serve-px", "0,1.0"], "--serve-px: 1.0 is outside [0, 1)"),
    (["--serve-px", "0.95"], "above 0.9, the top of the threshold grid"),
    (["--prune-px", "1.5"], "--prune-px: 1.5 is outside [0, 1)"),
    (["--prune-px", "0.3,0.3"], "lists a value twice"),
    (["--max-windows", "0"], "--max-windows must be positive"),
    (["--duration", "0"], "--duration must be positive"),
    (["--max-ppl-ratio", "0.9"], "--max-ppl-ratio must be >= 1"),
    (["--dry-run", "--cached-only"], "contradict"),
    (["--also-prune", "0.5"], "'0.5' is not P_W:P_X"),
    (["--also-prune", "0.5:0.95"], "above 0.9"),
    (["--also-prune", "0.5:0.3,0.5:0.3"], "lists a pair twice"),
    (["--speed-for", "candidates", "--no-speed"], "--no-speed serves none"),
])
def test_bad_input_exits_2_and_writes_nothing(tmp_path, capsys, argv, message):
    work = tmp_path / "work"
    assert main(["frontier", "--work", str(work), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("duoserve frontier: error: ") and message in err, err
    assert not work.exists()


def test_dry_run_lists_steps_and_runs_nothing(tmp_path, capsys, fake):
    work = tmp_path / "work"
    assert frontier(work, "--dry-run") == 0
    out = capsys.readouterr().out
    # 4 checkpoints (2 methods x 2 sparsities, pruned for p_x = p_w), 1 + 4 x 3 points, ppl + answers each.
    assert "30 steps" in out and "4 checkpoints, 13 points" in out
    assert out.count("] to run") == 30 and "--activation-sparsity 0.3" in out and "--resume" not in out
    assert not fake.calls and not work.exists()


def test_run_caches_every_step_and_a_rerun_reuses_them(tmp_path, capsys, fake):
    work = tmp_path / "work"
    assert frontier(work) == 0
    assert len(fake.calls) == 30
    assert sum("prune" in c for c in fake.calls) == 4  # each checkpoint pruned once for all its serve-time p_x
    summary = json.loads((work / "frontier.json").read_text())
    rows = summary["rows"]
    assert rows[0]["dense"] and rows[0]["ppl"] == 20.0 and len(rows) == 13
    # PPL bound 1.5 x 20 = 30: p_x 0 at W0.2 (24) and W0.5 (30, on the bound); 0.3 fails on PPL (31.2),
    # and the fake's answers loop at 0.5.
    passing = [r["point"] for r in rows[1:] if r["still_answers"]]
    assert passing == [f"{m} W{w} X0 (pruned for X{w})" for m in ("duogpt", "sparsegpt") for w in ("0.2", "0.5")]
    # No speed: the fewest products (1 - p_w)(1 - p_x) win; equal proxy and PPL: the first.
    assert summary["choice"]["point"] == "duogpt W0.5 X0 (pruned for X0.5)"
    looped = next(r for r in rows if r["point"] == "duogpt W0.2 X0.5 (pruned for X0.2)")
    assert not looped["still_answers"] and any("looping" in x for x in looped["rule_reasons"])
    md = (work / "frontier.md").read_text()
    assert "**duogpt W0.5 X0 (pruned for X0.5)** (chosen)" in md and "2 windows of 2048 tokens" in md
    assert "Operating point: duogpt W0.5 X0" in md and "answer 4: looping" in md
    assert f"`duoserve frontier --sparsities 0.2,0.5 --no-speed --work {work}`" in md  # defaults left out
    assert (work / "frontier.png").stat().st_size > 1000

    calls = len(fake.calls)
    capsys.readouterr()
    assert frontier(work) == 0  # everything cached: nothing runs
    assert len(fake.calls) == calls
    out = capsys.readouterr().out
    assert out.count(": cached") == 30

    # A lost result runs again, alone.
    next(work.glob("ppl-*sparsegpt-w0.5-*px0.3-*.json")).unlink()
    assert frontier(work) == 0
    assert len(fake.calls) == calls + 1 and "ppl" in fake.calls[-1] and "0.3" in fake.calls[-1]


def test_interrupted_prune_resumes_and_finished_prune_is_reused(tmp_path, capsys, fake):
    work = tmp_path / "work"
    grid = ["--methods", "duogpt", "--sparsities", "0.5,0.2", "--serve-px", "0"]
    runner_argv = ["frontier", "--work", str(work), *grid, "--no-speed"]
    key5 = "default-duogpt-w0.5-x0.5-n128x2048"
    key2 = "default-duogpt-w0.2-x0.2-n128x2048"
    work.mkdir()
    (work / f"ckpt-{key5}.partial").mkdir()  # a prune killed halfway
    finished = work / f"ckpt-{key2}"  # a prune that finished but whose result was never stored
    finished.mkdir()
    (finished / "config.json").write_text("{}")
    (work / "logs").mkdir()
    (work / "logs" / f"prune-{key2}.summary.json").write_text(json.dumps({"sparsity": 0.2, "prune_seconds": 5.0}))
    assert main([*runner_argv, "--dry-run"]) == 0
    assert "] resume  prune    duogpt W0.5" in capsys.readouterr().out
    assert main(runner_argv) == 0
    prunes = [c for c in fake.calls if "prune" in c]
    assert len(prunes) == 1 and "--resume" in prunes[0] and key5 in " ".join(prunes[0])
    assert json.loads((work / f"prune-{key2}.json").read_text())["reused"] is True


def test_checkpoint_without_summary_is_pruned_again(tmp_path):
    ckpt = tmp_path / "ckpt"
    assert workcache.prune_flags(ckpt, tmp_path / "s.json") == []
    (tmp_path / "ckpt.partial").mkdir()
    assert workcache.prune_flags(ckpt, tmp_path / "s.json") == ["--resume"]
    ckpt.mkdir()
    assert workcache.prune_flags(ckpt, tmp_path / "s.json") == ["--overwrite"]


def test_failed_steps_are_reported_and_the_others_still_run(tmp_path, capsys, monkeypatch):
    fake = FakeCommands(fail_on="--activation-sparsity 0.3")
    monkeypatch.setattr(frontier_steps, "run_logged", fake)
    work = tmp_path / "work"
    assert frontier(work) == 1
    err = capsys.readouterr().err
    assert "command failed with exit code 1" in err and "8 step(s) failed" in err  # 4 ppl + 4 answers at 0.3
    assert len(list(work.glob("prune-*.json"))) == 4 and len(list(work.glob("ppl-*.json"))) == 9
    assert "ppl      duogpt W0.2 X0.3 (pruned for X0.2) (failed)" in (work / "frontier.md").read_text()

    # A failed prune skips its checkpoint's points (they cannot run) and nothing else.
    fake = FakeCommands(fail_on="prune --method sparsegpt --sparsity 0.5")
    monkeypatch.setattr(frontier_steps, "run_logged", fake)
    work2 = tmp_path / "work2"
    assert frontier(work2) == 1
    assert len(fake.calls) == 30 - 6  # its 3 ppl and 3 answers steps are skipped
    assert "(its prune failed)" in (work2 / "frontier.md").read_text()

    # --cached-only renders what there is and lists the rest as not run.
    fake = FakeCommands()
    monkeypatch.setattr(frontier_steps, "run_logged", fake)
    assert frontier(work, "--cached-only") == 0 and not fake.calls
    md = (work / "frontier.md").read_text()
    assert "Not run or failed (no cached result):" in md and "ppl      duogpt W0.2 X0.3" in md
    # The failed steps' results are missing: a rerun runs exactly those.
    assert frontier(work) == 0
    assert len(fake.calls) == 8 and all("0.3" in c for c in fake.calls)


def test_speed_rows_rank_by_tpot_and_mark_dense(tmp_path, monkeypatch, fake):
    """The speed path with the served measurement replaced (no vLLM): TPOT decides among passing points."""
    from duoserve.frontier import speed

    def measure(folder, label, serve_px, settings, out_dir):
        px = serve_px or 0.0
        w = 0.0 if label == "dense" else float(re.search(r"-w([0-9.]+)-", str(folder)).group(1))
        tpot = 0.020 * (1 - 0.4 * w) * (1 - 0.2 * px)
        return {"tpot_s": tpot, "ttft_s": 0.1, "throughput": 1 / tpot * 3, "throughput_users": settings.throughput_users,
                "levels": {}, "answers": GOOD, "answers_from": "endpoint (chat, greedy)", "measured_at": "now",
                "host": speed.host()}

    monkeypatch.setattr(speed, "measure", measure)
    monkeypatch.setattr(frontier_steps.Runner, "dense_folder", lambda self: tmp_path / "dense")
    work = tmp_path / "work"
    argv = ["frontier", "--work", str(work), "--methods", "duogpt", "--sparsities", "0.2,0.4", "--serve-px", "0,0.2"]
    assert main(argv) == 0
    summary = json.loads((work / "frontier.json").read_text())
    # PPL <= 30: W0.2 X0 (24), W0.2 X0.2 (28.8); W0.4 X0 (28) -> fastest TPOT of these: W0.4 X0.
    assert summary["choice"]["point"] == "duogpt W0.4 X0 (pruned for X0.4)"
    md = (work / "frontier.md").read_text()
    assert "TPOT b1 ms" in md and "tok/s 4 users" in md and "| dense | dense | 0 | - | 0 | 20.00 | 20.0 | 150.0 | yes | ok | dense |" in md
    assert not any("duoserve.frontier.answers" in c for c in fake.calls)  # answers came from the endpoint


def test_workcache_atomic_and_cached_only(tmp_path):
    path = tmp_path / "r.json"
    path.write_text('{"half": ')  # a torn file from an older writer counts as missing
    assert workcache.read_json(path) is None
    with pytest.raises(workcache.NotCached):
        workcache.cached(path, lambda: {"x": 1}, cached_only=True)
    assert workcache.cached(path, lambda: {"x": 1}) == {"x": 1}
    assert workcache.cached(path, lambda: {"x": 2}) == {"x": 1}
    assert not list(tmp_path.glob(".*.tmp"))
    log = tmp_path / "logs" / "x.log"
    with pytest.raises(workcache.StepFailed, match="exit code 3"):
        workcache.run_logged(["sh", "-c", "echo boom; exit 3"], log)
    assert "boom" in log.read_text()
    assert workcache.slug("2:4") == "2of4" and workcache.slug("/a/b c") == "a_b_c"


def test_fake_loop_is_a_loop():
    assert is_looping(LOOP) and not any(is_looping(a) for a in GOOD)


def test_also_prune_adds_checkpoints_beside_the_grid(tmp_path, capsys, fake):
    """--also-prune 0.5:0.3: W0.5 pruned for 0.3 next to the grid's W0.5 pruned for 0.5 (issue 30's
    pruned-for vs served-at question), for each method, without pruning every W twice."""
    work = tmp_path / "work"
    argv = ["frontier", "--work", str(work), "--methods", "duogpt", "--sparsities", "0.2,0.5", "--serve-px", "0,0.3",
            "--no-speed", "--also-prune", "0.5:0.3,0.2:0.2"]  # 0.2:0.2 is already in the grid
    assert main(argv) == 0
    rows = json.loads((work / "frontier.json").read_text())["rows"]
    assert [r["point"] for r in rows] == ["dense"] + [f"duogpt W{w} X{px} (pruned for X{pf})" for w, pf in
                                                     (("0.2", "0.2"), ("0.5", "0.3"), ("0.5", "0.5"))
                                                     for px in ("0", "0.3")]
    assert sum("prune" in c for c in fake.calls) == 3
    assert any("--sparsity" in c and _value(c, "--sparsity") == "0.5" and _value(c, "--activation-sparsity") == "0.3"
               for c in fake.calls if "prune" in c)


def test_speed_for_candidates_serves_only_points_the_rule_can_choose(tmp_path, monkeypatch, fake):
    from duoserve.frontier import speed

    served = []

    def measure(folder, label, serve_px, settings, out_dir):
        served.append((label, Path(folder).name, serve_px))
        return {"tpot_s": 0.01, "ttft_s": 0.1, "throughput": 300.0, "throughput_users": settings.throughput_users,
                "levels": {}, "answers": GOOD, "answers_from": "endpoint (chat, greedy)", "measured_at": "now",
                "host": speed.host()}

    monkeypatch.setattr(speed, "measure", measure)
    monkeypatch.setattr(frontier_steps.Runner, "dense_folder", lambda self: tmp_path / "dense")
    work = tmp_path / "work"
    argv = ["frontier", "--work", str(work), "--methods", "duogpt", "--sparsities", "0,0.4", "--serve-px", "0,0.2,0.5",
            "--speed-for", "candidates"]
    assert main(argv) == 0
    # PPL <= 30 and in-process answers ok (the fake loops at 0.5): W0 X0 (20), W0 X0.2 (24), W0.4 X0 (28);
    # W0 X0.5 (30) is within the bound but loops in-process; W0.4 X0.2 (33.6) and W0.4 X0.5 fail on PPL.
    assert [(lab, px) for lab, _, px in served] == [("dense", None), ("sparse", 0.0), ("sparse", 0.2), ("sparse", 0.0)]
    rows = json.loads((work / "frontier.json").read_text())["rows"]
    by = {r["point"]: r for r in rows}
    assert by["duogpt W0.4 X0.2 (pruned for X0.4)"].get("tpot_s") is None
    assert "answers" not in by["duogpt W0.4 X0.2 (pruned for X0.4)"]  # over the PPL bound: no answers asked
    assert by["duogpt W0 X0.5 (pruned for X0)"]["answers_from"].startswith("in-process")
    assert by["duogpt W0 X0 (pruned for X0)"]["answers_from"].startswith("endpoint")
    assert by["duogpt W0 X0 (pruned for X0)"]["answers_in_process"] == GOOD
    md = (work / "frontier.md").read_text()
    assert "not served, --speed-for candidates: PPL 33.60 > 1.5 x dense 20.00)" in md
    assert "answers  duogpt W0.4 X0.2 (pruned for X0.4) (not run, --speed-for candidates: PPL 33.60" in md
    assert "source per line" in md and "[in-process]" in md and "[endpoint]" in md
    # A rerun reuses every result: nothing is pruned, evaluated or served again.
    served.clear()
    n = len(fake.calls)
    assert main(argv) == 0 and not served and len(fake.calls) == n
