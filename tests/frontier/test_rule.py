"""The operating-point rule and its answer checks (duoserve.frontier.rule): pure Python, no model."""
from __future__ import annotations

import math

import pytest

from duoserve.frontier.rule import (LOOP_COVERAGE, MAX_PPL_RATIO, answer_problems, choose_operating_point, is_empty,
                                    is_looping, judge, longest_repeat)

GOOD = ["Sparse networks skip work: most weights are zero, so fewer multiplications are needed.",
        "The capital of France is Paris.",
        "Sleep well, eat vegetables and walk every day.",
        "A cat named Tom feared water. One day he slipped into a pond and paddled. He reached the shore. "
        "From then on he swam every morning."]
# What issue 30's first run printed: the system prompt, four times.
SYSTEM_LOOP = " ".join(["You are a helpful AI assistant named SmolLM, trained by Hugging Face, running in the world."] * 4)


def test_empty():
    for text in ("", "   ", "\n\n", "...", " - ! "):
        assert is_empty(text)
    for text in ("a", "Paris.", "42"):
        assert not is_empty(text)


def test_looping_examples():
    assert is_looping(SYSTEM_LOOP)
    assert is_looping("the the the the the the the the the the")
    assert is_looping("I am a bot. I am a bot. I am a bot. I")  # cut in the middle of a repeat
    for text in GOOD:
        assert not is_looping(text), text


def test_looping_threshold_is_more_than_half():
    # 'x y z' twice = 6 of 12 words: exactly half is not a loop; 9 of 12 (three times) is.
    half = "x y z x y z a b c d e f"
    assert longest_repeat(half)[2] == pytest.approx(0.5) and not is_looping(half)
    three = "x y z x y z x y z d e f"
    assert longest_repeat(three)[1:] == (3, pytest.approx(0.75)) and is_looping(three)
    assert LOOP_COVERAGE == 0.5


def test_short_answers_are_not_loops():
    assert not is_looping("yes yes")  # below LOOP_MIN_WORDS: only emptiness is judged
    assert not is_looping("Paris Paris Paris")


def test_repeats_do_not_overlap_and_case_is_ignored():
    gram, count, share = longest_repeat("A a a a a a a a")  # 8 x 'a'
    assert (gram, count, share) == (("a",), 8, 1.0)
    gram, count, share = longest_repeat("Go go GO go")
    assert gram == ("go",) and count == 4
    assert longest_repeat("one two three") == ((), 0, 0.0)


def test_answer_problems_names_each_failure():
    problems = answer_problems([GOOD[0], "", SYSTEM_LOOP])
    assert problems[0] == "answer 2: empty"
    assert problems[1].startswith("answer 3: looping (") and "x4" in problems[1]
    assert answer_problems(GOOD) == []


def row(ppl, w, px, tpot=None, answers=GOOD):
    return {"ppl": ppl, "weight_sparsity": w, "p_x": px, "tpot_s": tpot, "answers": answers}


def test_judge():
    assert judge(row(30.0, 0.5, 0.5), 20.0).ok  # exactly 1.5x passes
    v = judge(row(30.1, 0.5, 0.5), 20.0)
    assert not v.ok and not v.ppl_ok and v.answers_ok and "30.10 > 1.5 x dense 20.00" in v.reasons[0]
    v = judge(row(21.0, 0.5, 0.5, answers=GOOD[:3] + [SYSTEM_LOOP]), 20.0)
    assert not v.ok and v.ppl_ok and not v.answers_ok
    assert not judge(row(None, 0.5, 0.5), 20.0).ok
    assert not judge(row(21.0, 0.5, 0.5, answers=None), 20.0).ok
    assert not judge(row(math.nan, 0.5, 0.5), 20.0).ok
    assert MAX_PPL_RATIO == 1.5


def test_choose_fastest_passing_point_by_tpot():
    rows = [row(22.0, 0.4, 0.0, tpot=0.020),
            row(25.0, 0.4, 0.3, tpot=0.017),
            row(28.0, 0.5, 0.5, tpot=0.015, answers=GOOD[:3] + [""]),  # fastest, but an empty answer
            row(45.0, 0.6, 0.6, tpot=0.012)]  # faster still, PPL too high
    c = choose_operating_point(rows, dense_ppl=20.0)
    assert c.index == 1 and "17.0 ms" in c.reason
    # TPOT ties go to the lower perplexity.
    rows[0]["tpot_s"] = 0.017
    assert choose_operating_point(rows, 20.0).index == 0


def test_choose_by_proxy_without_speed_and_measured_speed_wins():
    rows = [row(22.0, 0.4, 0.0), row(25.0, 0.4, 0.3), row(29.0, 0.5, 0.3)]
    c = choose_operating_point(rows, 20.0)
    assert c.index == 2 and "no speed measured" in c.reason  # 0.5 x 0.7 = 0.35 products left
    rows[0]["tpot_s"] = 0.02  # one point measured: only measured points compete
    assert choose_operating_point(rows, 20.0).index == 0


def test_no_point_passes_and_bad_dense():
    c = choose_operating_point([row(90.0, 0.5, 0.5, tpot=0.01)], 20.0)
    assert c.index is None and "no sparse point" in c.reason
    assert choose_operating_point([], 20.0).index is None
    with pytest.raises(ValueError):
        choose_operating_point([row(20.0, 0.5, 0.5)], 0.0)
    # A looser bound lets it through.
    assert choose_operating_point([row(90.0, 0.5, 0.5, tpot=0.01)], 20.0, max_ratio=5.0).index == 0
