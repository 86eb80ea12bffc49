"""`duoserve quickstart`: the main job on the built-in default model, end to end (README command 1).

1. prune SmolLM2-135M-Instruct (packaged; no download) with DuoGPT to W40%, calibrated for
   activation sparsity 0.4, with a short calibration so it takes minutes on a laptop CPU (the
   documented tables use the papers' 128 x 2048);
2. serve the dense source model, then the checkpoint (vLLM + the duoserve plugin) at activation
   sparsity 0, one after the other on 127.0.0.1, and send each the same chat request with the
   official openai client (after one short warm-up request, so the first request's one-off costs
   stay out of both);
3. print the two answers side by side with each one's TTFT and decode tokens/s, measured in this run.

The default operating point (DuoGPT W0.4 pruned for X0.4, served at X0) is the one `duoserve
frontier` chose on SmolLM2-135M (docs/frontier.md): the fastest measured point with perplexity
<= 1.5x dense and a real greedy answer to each of four fixed prompts. W50% + X50%, the earlier
default, fails both (PPL 4.0x dense, all four answers empty).

The checkpoint is cached in the duoserve cache folder and reused by later runs. --no-dense skips
the dense server (a hub model that is not in the local cache is skipped too, with a note).
"""
from __future__ import annotations

import argparse
import logging
import math
import time
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_PROMPT = "Explain in three sentences why sparse neural networks can run faster."


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="model to prune (default: the built-in SmolLM2-135M-Instruct)")
    p.add_argument("--method", default="duogpt", help="pruning method (default duogpt)")
    # The defaults are the operating point `duoserve frontier` chose on SmolLM2-135M (module docstring).
    p.add_argument("--sparsity", default="0.4", help="weight sparsity (default 0.4)")
    p.add_argument("--activation-sparsity", type=float, default=0.4,
                   help="activation sparsity the checkpoint is pruned (calibrated) for (default 0.4)")
    p.add_argument("--serve-activation-sparsity", type=float, default=0.0, metavar="P_X",
                   help="activation sparsity to serve at, from the checkpoint's stored threshold grid (as "
                        "`duoserve serve --activation-sparsity`; default 0: the frontier's point; -1 = the one "
                        "it was pruned for)")
    p.add_argument("--nsamples", type=int, default=16, help="calibration windows (default 16: a quick run)")
    p.add_argument("--seqlen", type=int, default=512, help="calibration window length (default 512)")
    p.add_argument("--output", type=Path, default=None, help="checkpoint folder (default: in the duoserve cache)")
    p.add_argument("--reprune", action="store_true", help="prune again even if the checkpoint exists")
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--min-tokens", type=int, default=0,
                   help="hold the answer to at least this many tokens (vLLM's min_tokens: the end-of-answer "
                        "token is held back until then), e.g. to measure decode speed at a setting where the "
                        "pruned model stops at once; it hides an empty answer, so it is off by default (0)")
    p.add_argument("--no-dense", action="store_true",
                   help="skip the dense model's answer (saves one vLLM start, a minute or two)")
    p.add_argument("--keep-serving", action="store_true", help="leave the sparse server running until Ctrl-C")


def _serve_px(args) -> float | None:
    """The serve-time p_x, or None for the checkpoint's calibrated one (--serve-activation-sparsity -1)."""
    v = args.serve_activation_sparsity
    return None if v is not None and v == -1 else v


def _checkpoint_path(args) -> Path:
    from duoserve.prune.model_sources import cache_root

    if args.output is not None:
        return args.output
    name = f"quickstart-{args.method}-w{args.sparsity.replace(':', 'of')}-x{args.activation_sparsity:g}-n{args.nsamples}x{args.seqlen}"
    return cache_root() / "checkpoints" / name


def chat_once(url: str, api_key: str, model: str, prompt: str, max_tokens: int, min_tokens: int = 0) -> dict:
    """One streamed chat completion (greedy); returns the answer, token count, TTFT and decode
    tokens/s. min_tokens > 0 asks vLLM to hold back the end of the answer until that many tokens."""
    from openai import OpenAI

    client = OpenAI(base_url=url, api_key=api_key, timeout=600)
    t0 = time.perf_counter()
    first = None
    parts: list[str] = []
    usage = None
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0.0,
        stream=True, stream_options={"include_usage": True},
        extra_body={"min_tokens": min_tokens} if min_tokens > 0 else None)
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            if first is None:
                first = time.perf_counter()
            parts.append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            usage = chunk.usage
    end = time.perf_counter()
    tokens = usage.completion_tokens if usage else len(parts)
    first = first or end
    decode_rate = (tokens - 1) / (end - first) if tokens > 1 and end > first else float("nan")
    return {"answer": "".join(parts), "tokens": tokens, "ttft_s": first - t0, "e2e_s": end - t0,
            "decode_tokens_per_s": decode_rate, "tokens_per_s": tokens / (end - t0)}


def _dense_folder(model: str | None) -> tuple[Path | None, str]:
    """The dense source model as a local folder vLLM can serve, or (None, why not)."""
    from duoserve.prune.model_sources import resolve_model

    source = resolve_model(model)
    if (Path(source) / "config.json").is_file():
        return Path(source), source
    try:  # a hub id: serve its local snapshot if it has one (the prune downloaded it)
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(source, local_files_only=True)), source
    except Exception as e:  # not cached, or no hub library: the comparison is optional
        return None, f"{source} is not a local folder and not in the Hugging Face cache ({type(e).__name__})"


def _serve_and_ask(folder: Path, args, label: str, then=None, activation_sparsity: float | None = None) -> dict:
    """Start vLLM for `folder` (a checkpoint: at activation_sparsity, None = its calibrated p_x), warm
    it up, ask the prompt once (measured); then(srv, result) runs while the server is still up."""
    from duoserve.loaders.server import launch

    with launch(folder, port=0, activation_sparsity=activation_sparsity) as srv:
        srv.wait_ready(timeout=900)
        print(f"      {label}: serving {srv.model} at {srv.url}")
        # One short request first: the first one after start-up pays one-off costs (graph capture,
        # allocator growth) that would otherwise land in one model's TTFT and not the other's.
        chat_once(srv.url, srv.api_key, srv.model, args.prompt, 2)
        result = chat_once(srv.url, srv.api_key, srv.model, args.prompt, args.max_tokens, args.min_tokens)
        if then is not None:
            then(srv, result)
    return result


def _speed_line(label: str, r: dict) -> str:
    return (f"{label}: {r['tokens']} tokens in {r['e2e_s']:.2f} s: {r['tokens_per_s']:.1f} tokens/s overall, "
            f"{r['decode_tokens_per_s']:.1f} tokens/s decode, time to first token {r['ttft_s'] * 1000:.0f} ms")


def side_by_side(left: tuple[str, str], right: tuple[str, str], width: int = 100) -> str:
    """Two titled texts in two wrapped columns."""
    import itertools
    import textwrap

    col = (width - 3) // 2
    columns = []
    for title, text in (left, right):
        lines = [title, "-" * min(col, len(title))]
        for para in (text.strip() or "(empty answer)").splitlines() or [""]:
            lines += textwrap.wrap(para, col) or [""]
        columns.append(lines)
    return "\n".join(f"{a:<{col}} | {b}".rstrip() for a, b in itertools.zip_longest(*columns, fillvalue=""))


def _print_results(args, sparse: dict, dense: dict | None, ckpt: Path) -> None:
    from duoserve.format.io import read_quant_config

    q = read_quant_config(ckpt)[1]  # what was served (a reused --output may differ from the options)
    px = q.activation_sparsity.target if _serve_px(args) is None else _serve_px(args)
    label = f"sparse (W{round(q.global_sparsity, 2):g} + X{px:g})"
    if dense is None:
        print("\n" + sparse["answer"].strip() + "\n")
    else:
        print("\n" + side_by_side(("dense", dense["answer"]), (label, sparse["answer"])) + "\n")
    if args.min_tokens:
        print(f"(greedy decoding; answers are held to at least {args.min_tokens} tokens, --min-tokens, "
              f"so an empty or short answer does not show as such)")
    print(_speed_line("sparse", sparse))
    if dense is not None:
        print(_speed_line("dense ", dense))
        ratio = sparse["decode_tokens_per_s"] / dense["decode_tokens_per_s"]  # nan when one decoded < 2 tokens
        print(f"sparse / dense: decode {ratio:.2f}x, time to first token {sparse['ttft_s'] / dense['ttft_s']:.2f}x "
              f"(one request each, this machine, this run)" if math.isfinite(ratio) else
              "sparse / dense: decode not comparable (an answer had fewer than 2 tokens; raise --min-tokens)")


def run(args: argparse.Namespace) -> int:
    from duoserve.errors import InputError
    from duoserve.format.io import read_quant_config
    from duoserve.prune.api import PruneConfig, prune_model

    if args.max_tokens < 1 or not 0 <= args.min_tokens <= args.max_tokens:
        raise InputError(f"--max-tokens must be >= 1 and --min-tokens between 0 and --max-tokens, got "
                         f"--max-tokens {args.max_tokens} --min-tokens {args.min_tokens}")
    for flag, v in (("--activation-sparsity", args.activation_sparsity),
                    ("--serve-activation-sparsity", _serve_px(args))):
        if v is not None and not 0 <= v < 1:
            raise InputError(f"{flag} must be in [0, 1), got {v:g}")
    ckpt = _checkpoint_path(args)
    reuse = False
    if ckpt.is_dir() and not args.reprune:
        try:
            read_quant_config(ckpt)
            reuse = True
        except Exception as e:  # a broken cached checkpoint is rebuilt, not trusted
            log.warning("cached checkpoint %s is unusable (%s); pruning again", ckpt, e)
    if reuse:
        print(f"[1/3] reusing checkpoint {ckpt} (pass --reprune to prune again)")
    else:
        print(f"[1/3] pruning {args.model or 'SmolLM2-135M-Instruct (built-in)'} with {args.method}: "
              f"W{args.sparsity}, calibrated for X{args.activation_sparsity:g}, calibration {args.nsamples} x "
              f"{args.seqlen} tokens")
        prune_model(PruneConfig(output=ckpt, model=args.model, method=args.method, sparsity=args.sparsity,
                                activation_sparsity=args.activation_sparsity, nsamples=args.nsamples,
                                seqlen=args.seqlen, overwrite=ckpt.exists(),
                                resume=ckpt.with_name(ckpt.name + ".partial").exists() and not ckpt.exists()))
    dense_folder, why = (None, "--no-dense") if args.no_dense else _dense_folder(args.model)
    served = "its calibrated activation sparsity" if _serve_px(args) is None else f"activation sparsity {_serve_px(args):g}"
    print(f"[2/3] starting vLLM, {'the dense model, then ' if dense_folder else ''}the sparse one with the duoserve "
          f"plugin at {served} (each start takes a minute or two); chat request: {args.prompt!r}")
    dense = None
    if dense_folder is not None:
        dense = _serve_and_ask(dense_folder, args, "dense ")
    else:
        print(f"      no dense answer: {why}")

    def report(srv, sparse: dict) -> None:
        print("[3/3] the same prompt, greedy, answered by both" if dense else "[3/3] the answer")
        _print_results(args, sparse, dense, ckpt)
        if args.keep_serving:
            print(f"serving at {srv.url} (API key {srv.api_key}); Ctrl-C to stop")
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass

    _serve_and_ask(ckpt, args, "sparse", then=report, activation_sparsity=_serve_px(args))
    return 0
