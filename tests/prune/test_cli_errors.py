"""Bad input: a clear message, a non-zero exit code, and nothing written."""
import pytest

from duoserve.cli import main


@pytest.fixture
def run(capsys):
    def _run(*argv):
        code = main(list(argv))
        return code, capsys.readouterr().err

    return _run


def prune_args(model, out, *extra):
    return ["prune", str(model), "-o", str(out), "--nsamples", "2", "--seqlen", "32", *extra]


@pytest.mark.parametrize("extra,message", [
    (["--method", "nope"], "unknown method 'nope'; valid methods: duogpt, lpnorm, magnitude, owanda, ria, sparsegpt, stochria, symwanda, wanda"),
    (["--sparsity", "1.0"], "outside [0, 1)"),
    (["--sparsity", "-0.2"], "outside [0, 1)"),
    (["--sparsity", "3:2"], "N:M needs 0 < N < M"),
    (["--sparsity", "half"], "neither a fraction"),
    (["--activation-sparsity", "1.0"], "--activation-sparsity 1.0 is outside [0, 1)"),
    (["--method", "wanda", "--damp", "0.1"], "--damp do(es) not apply to method 'wanda'"),
    (["--targets", "q_proj,foo"], "--targets foo"),
])
def test_prune_bad_arguments(run, tmp_path, tiny_llama_dir, extra, message):
    out = tmp_path / "out"
    code, err = run(*prune_args(tiny_llama_dir, out, *extra))
    assert code == 2
    assert message in err
    assert not out.exists() and not list(tmp_path.iterdir())


def test_missing_model_path(run, tmp_path):
    code, err = run(*prune_args(tmp_path / "no-such-model", tmp_path / "out"))
    assert code == 2 and "does not exist" in err


def test_unknown_hub_id_offline(run, tmp_path):
    code, err = run(*prune_args("nobody-xyz/not-a-model", tmp_path / "out"))
    assert code == 2 and "could not load model 'nobody-xyz/not-a-model'" in err


def test_unsupported_architecture(run, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from tiny_model import build_tokenizer

    folder = tmp_path / "gpt2"
    build_tokenizer(folder, 300)
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=300)).save_pretrained(folder)
    code, err = run(*prune_args(folder, tmp_path / "out"))
    assert code == 2 and "model type 'gpt2' is not supported" in err
    assert not (tmp_path / "out").exists()


def test_existing_output(run, tmp_path, tiny_llama_dir):
    out = tmp_path / "out"
    out.mkdir()
    code, err = run(*prune_args(tiny_llama_dir, out))
    assert code == 2 and "already exists; pass --overwrite" in err


def test_nm_incompatible_width(run, tmp_path, tiny_llama_dir):
    code, err = run(*prune_args(tiny_llama_dir, tmp_path / "out", "--method", "wanda", "--sparsity", "3:7"))
    assert code == 2 and "not a multiple of M = 7" in err


def test_eval_empty_and_short_files(run, tmp_path, tiny_llama_dir):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    code, err = run("eval", "ppl", str(tiny_llama_dir), "--data", str(empty), "--seqlen", "32")
    assert code == 2 and "is empty" in err
    short = tmp_path / "short.txt"
    short.write_text("just a few words")
    code, err = run("eval", "ppl", str(tiny_llama_dir), "--data", str(short), "--seqlen", "512")
    assert code == 2 and "fewer than one window of 512" in err


def test_eval_and_inspect_refuse_corrupted_checkpoint(run, tmp_path, tiny_llama_dir):
    out = tmp_path / "ck"
    assert run("prune", str(tiny_llama_dir), "--method", "magnitude", "-o", str(out))[0] == 0
    weights = next(out.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-10])
    for argv in (["inspect", str(out)], ["eval", "ppl", str(out), "--data", "wiki", "--seqlen", "32"]):
        code, err = run(*argv)
        assert code == 2 and "manifest" in err, err


def test_threshold_mode_needs_checkpoint(run, tiny_llama_dir):
    code, err = run("eval", "ppl", str(tiny_llama_dir), "--data", "wiki", "--seqlen", "32",
                    "--activation-mode", "threshold")
    assert code == 2 and "threshold mode needs a duoserve checkpoint" in err
