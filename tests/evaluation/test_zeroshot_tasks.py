"""Offline task wiring, task-list parsing, averages and bad input for `duoserve eval zeroshot`."""
from __future__ import annotations

import math

import pytest

from duoserve.cli import main
from duoserve.errors import InputError
from duoserve.evaluation.zeroshot import results, tasks


def test_parse_task_list():
    assert tasks.parse_task_list("all") == list(tasks.SEVEN_TASKS)
    assert tasks.parse_task_list(" PIQA, boolq,piqa ") == ["piqa", "boolq"]
    with pytest.raises(InputError, match="valid tasks: piqa, hellaswag"):
        tasks.parse_task_list("piqa,mmlu")
    with pytest.raises(InputError, match="empty"):
        tasks.parse_task_list(" , ")


def test_unknown_task_cli_lists_valid_ones(capsys):
    assert main(["eval", "zeroshot", "--tasks", "piqa,lambada"]) == 2
    err = capsys.readouterr().err
    assert "unknown task(s) lambada" in err and "arc_challenge" in err and "Traceback" not in err


def test_bad_limit_cli(capsys):
    assert main(["eval", "zeroshot", "--tasks", "piqa", "--limit", "0"]) == 2
    assert "--limit must be a positive" in capsys.readouterr().err


def test_missing_offline_data_is_a_clear_error(tmp_path):
    with pytest.raises(InputError, match=r"offline data for task piqa is missing: .*piqa/plain_text/validation"):
        tasks.build_tasks(["piqa"], data="offline", root=tmp_path)


def test_bad_endpoint_url_is_a_clear_error(capsys):
    assert main(["eval", "zeroshot", "--tasks", "piqa", "--endpoint", "127.0.0.1:9"]) == 2
    assert "must be an http(s) URL" in capsys.readouterr().err


def test_unreachable_endpoint_is_a_clear_error(capsys):
    # port 9 (discard) on loopback: nothing listens there
    assert main(["eval", "zeroshot", "--tasks", "piqa", "--endpoint", "http://127.0.0.1:9"]) == 2
    assert "no OpenAI-compatible server answers" in capsys.readouterr().err


def test_offline_data_matches_lm_eval_tasks():
    """Every offline task builds from lm-eval's own config, with the documented item counts and fields."""
    built, provenance, _ = tasks.build_tasks(list(tasks.SEVEN_TASKS), data="offline")
    for name, task in zip(tasks.SEVEN_TASKS, built):
        spec = tasks.TASKS[name]
        assert provenance[name]["n_available"] == spec.offline_n, name
        assert provenance[name]["split"] == "validation"
        docs = task.eval_docs
        doc = docs[0]
        choices = task.doc_to_choice(doc)
        target = task.doc_to_target(doc)
        assert isinstance(choices, list) and len(choices) >= 2, name
        if task.multiple_input:  # WinoGrande: the choices are contexts, the target is the shared ending
            assert isinstance(task.doc_to_text(doc), int) and isinstance(target, str), name
        else:
            assert isinstance(target, int) and 0 <= target < len(choices), name
            assert isinstance(task.doc_to_text(doc), str), name
        metrics = {m["metric"] for m in task.config.metric_list}
        assert ("acc_norm" in metrics) == spec.has_acc_norm, name
    # the standard 0-shot prompts (lm-eval's YAML), not a re-implementation
    piqa = built[0]
    assert piqa.doc_to_text(piqa.eval_docs[0]).startswith("Question: ") and piqa.config.dataset_path == "baber/piqa"
    boolq = built[tasks.SEVEN_TASKS.index("boolq")]
    assert boolq.doc_to_choice(boolq.eval_docs[0]) == ["no", "yes"]
    labels = [boolq.doc_to_target(d) for d in boolq.eval_docs]
    assert set(labels) == {0, 1} and sum(labels) == 2033  # google/boolq validation: 2033 'True' of 3270


def _row(acc, acc_norm=None):
    return {"acc": acc, "acc_norm": acc_norm}


def test_averages_from_known_numbers():
    per_task = {"piqa": _row(0.6, 0.62), "hellaswag": _row(0.3, 0.4), "winogrande": _row(0.5),
                "arc_easy": _row(0.5, 0.45), "arc_challenge": _row(0.2, 0.25), "openbookqa": _row(0.1, 0.3),
                "boolq": _row(0.7)}
    avg = results.averages(per_task)
    assert math.isclose(avg["avg5"]["acc"], (0.6 + 0.3 + 0.5 + 0.5 + 0.2) / 5)
    assert math.isclose(avg["avg5"]["acc_norm"], (0.62 + 0.4 + 0.5 + 0.45 + 0.25) / 5)
    assert math.isclose(avg["avg7"]["acc"], (0.6 + 0.3 + 0.5 + 0.5 + 0.2 + 0.1 + 0.7) / 7)
    assert math.isclose(avg["avg7"]["acc_norm"], (0.62 + 0.4 + 0.5 + 0.45 + 0.25 + 0.3 + 0.7) / 7)
    del per_task["boolq"]  # an average over a missing task is not reported
    avg = results.averages(per_task)
    assert avg["avg7"] == {"acc": None, "acc_norm": None} and avg["avg5"]["acc"] is not None


def test_summarize_reads_lm_eval_output():
    out = {"results": {"piqa": {"acc,none": 0.75, "acc_stderr,none": 0.1, "acc_norm,none": 0.7,
                                "acc_norm_stderr,none": 0.11, "sample_len": 20},
                       "winogrande": {"acc,none": 0.5, "acc_stderr,none": 0.12, "sample_len": 20}},
           "n-samples": {"piqa": {"original": 1838, "effective": 20}, "winogrande": {"original": 1267, "effective": 20}}}
    prov = {n: {"source": "x", "split": "validation", "standard_split": "validation", "standard_n": 1,
                "n_available": 0} for n in ("piqa", "winogrande")}
    s = results.summarize(out, prov, {"limit": 20})
    assert s["tasks"]["piqa"]["acc_norm"] == 0.7 and s["tasks"]["piqa"]["n"] == 20
    assert s["tasks"]["piqa"]["n_available"] == 1838
    assert s["tasks"]["winogrande"]["acc_norm"] is None
    assert results.check_finite(s) == []
    s["tasks"]["piqa"]["acc"] = float("nan")
    assert results.check_finite(s) == ["piqa.acc"]
    assert "piqa" in results.format_table(s)


def test_compare_loglikelihoods():
    a = {"loglikelihoods": {"piqa": {"0": [-1.0, -2.0], "1": [-3.0, -1.0]}}}
    b = {"loglikelihoods": {"piqa": {"0": [-1.1, -2.0], "1": [-0.5, -1.0]}}}
    r = results.compare_loglikelihoods(a, b)["piqa"]
    assert r["items"] == 2 and r["requests"] == 4 and r["same_prediction"] == 0.5
    assert math.isclose(r["max_abs_diff"], 2.5) and math.isclose(r["mean_abs_diff"], (0.1 + 2.5) / 4)


def test_paired_accuracy_difference_bounds_the_standard_error():
    import random

    rng = random.Random(0)
    tasks = results.FIVE_TASKS
    n = 400
    gold = {t: [rng.randrange(2) for _ in range(n)] for t in tasks}
    # b flips its prediction on ~20% of the items of a; both sets of "log-likelihoods" encode the choice
    pred_a = {t: [rng.randrange(2) for _ in range(n)] for t in tasks}
    pred_b = {t: [p if rng.random() > 0.2 else 1 - p for p in pred_a[t]] for t in tasks}

    def run(pred):
        lls = {t: {str(i): [0.0, -1.0] if p == 0 else [-1.0, 0.0] for i, p in enumerate(pred[t])} for t in tasks}
        accs = {t: {"acc": sum(p == g for p, g in zip(pred[t], gold[t])) / n} for t in tasks}
        return {"loglikelihoods": lls, "tasks": accs}

    a, b = run(pred_a), run(pred_b)
    agreement = results.compare_loglikelihoods(a, b)
    diff = results.paired_accuracy_difference(a, b, agreement)
    for t in tasks:
        d = [(pb == g) - (pa == g) for pa, pb, g in zip(pred_a[t], pred_b[t], gold[t])]
        mean = sum(d) / n
        exact_se = math.sqrt((sum(x * x for x in d) / n - mean ** 2) / n)
        assert math.isclose(diff[t]["acc_diff"], mean)
        assert exact_se <= diff[t]["paired_se_max"] <= 1.2 * exact_se + 1e-12  # the bound, and not a loose one here
    assert math.isclose(diff["avg5"]["acc_diff"], sum(diff[t]["acc_diff"] for t in tasks) / 5)
    assert "avg7" not in diff  # OBQA and BoolQ were not compared


def test_normalize_endpoint():
    from duoserve.evaluation.zeroshot.run import normalize_endpoint

    for url in ("http://127.0.0.1:8000", "http://127.0.0.1:8000/", "http://127.0.0.1:8000/v1",
                "http://127.0.0.1:8000/v1/completions"):
        assert normalize_endpoint(url) == "http://127.0.0.1:8000/v1/completions"
    with pytest.raises(InputError):
        normalize_endpoint("localhost:8000")


def test_tokenizer_adds_bos(tiny_llama_dir, tmp_path):
    """The endpoint path adds BOS exactly when the tokenizer does (as HFLM does in-process)."""
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    from duoserve.evaluation.zeroshot.run import tokenizer_adds_bos

    assert tokenizer_adds_bos(str(tiny_llama_dir)) is False
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    bos = tok.bos_token
    tok._tokenizer.post_processor = TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B",
                                                       special_tokens=[(bos, tok.bos_token_id)])
    tok.save_pretrained(tmp_path)
    assert tokenizer_adds_bos(str(tmp_path)) is True


def test_hub_data_unreachable_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(InputError, match="--data offline"):
        tasks.build_tasks(["piqa"], data="hub")
