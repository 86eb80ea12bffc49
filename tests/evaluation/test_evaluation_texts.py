"""Evaluation texts: wikitext2 offline reads exactly the file $DUOSERVE_WIKITEXT2 names, nothing found by search."""
from __future__ import annotations

import pytest

from duoserve.errors import InputError
from duoserve.evaluation.texts import evaluation_text


def _raw_copy(folder):
    path = folder / "wikitext-2-raw-test.raw"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b" = Title = \r\n\r\n Some text of the article .\r\n")
    return path


def test_wikitext2_offline_reads_the_file_the_variable_names(tmp_path, monkeypatch):
    monkeypatch.setenv("DUOSERVE_WIKITEXT2", str(_raw_copy(tmp_path)))
    text, desc = evaluation_text("wikitext2")
    assert text == " = Title = \n\n\n\n Some text of the article ." and "wikitext-2 raw test" in desc


def test_wikitext2_offline_without_the_variable_fails_even_with_a_copy_beside_the_working_directory(tmp_path,
                                                                                                     monkeypatch):
    monkeypatch.delenv("DUOSERVE_WIKITEXT2", raising=False)
    _raw_copy(tmp_path / "shared" / "data")
    _raw_copy(tmp_path / "repo" / "shared" / "data")
    monkeypatch.chdir(tmp_path / "repo")
    with pytest.raises(InputError, match="DUOSERVE_WIKITEXT2 is not set.*--data PATH"):
        evaluation_text("wikitext2")


def test_a_variable_naming_no_file_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("DUOSERVE_WIKITEXT2", str(tmp_path / "missing.raw"))
    with pytest.raises(InputError, match="missing.raw is not a file"):
        evaluation_text("wikitext2")


def test_a_path_is_read_as_given(tmp_path):
    text, desc = evaluation_text(str(_raw_copy(tmp_path)))
    assert "Some text" in text and desc.endswith("wikitext-2-raw-test.raw")
