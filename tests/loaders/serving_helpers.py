"""Checkpoints and the in-process reference for the serving tests (no vLLM import here).

`make_checkpoint` runs the real pruner (duoserve.prune, magnitude, calibrated thresholds);
`ReferenceModel` is the real in-process evaluation (duoserve.prune.pruned_models.load_pruned_model):
greedy tokens from it in threshold mode are what vLLM with the duoserve plugin must produce.
"""
from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import torch

from duoserve.format.io import load_checkpoint, save_checkpoint

PROMPTS = [
    "The history of the city begins",
    "In 1998, the company announced that",
    "Water boils at a temperature of",
    "She opened the door and saw",
    "The main reason for the decline of",
]


def make_checkpoint(src: Path, out: Path, *, weight_sparsity: float = 0.5, act_sparsity: float = 0.5) -> Path:
    """`duoserve prune SRC --method magnitude` with calibrated thresholds (a small calibration)."""
    from duoserve.prune.api import PruneConfig, prune_model

    prune_model(PruneConfig(output=Path(out), model=str(src), method="magnitude", sparsity=str(weight_sparsity),
                            activation_sparsity=act_sparsity, nsamples=8, seqlen=64, threshold_nsamples=8,
                            weight_format="bitmask", overwrite=True))
    return Path(out)


def _copy_extras(src: Path):
    """save_extras for save_checkpoint: tokenizer, generation config, chat template of `src`."""
    skip = ("config.json", "README.md", "duoserve-manifest.json")

    def save(folder: Path) -> None:
        for f in src.iterdir():
            if f.is_file() and f.suffix not in (".safetensors",) and f.name not in skip:
                shutil.copy2(f, folder / f.name)
    return save


def as_dense_format(ckpt: Path, out: Path) -> Path:
    """The same checkpoint re-written in the dense weight format (zeros in place)."""
    loaded = load_checkpoint(ckpt)
    state = dict(loaded.state_dict)
    if loaded.config.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)  # as the pruner writes it
    return save_checkpoint(out, state, loaded.config, replace(loaded.qconfig, weight_format="dense"),
                           save_extras=_copy_extras(ckpt), overwrite=True)


class ReferenceModel:
    """transformers evaluation of a checkpoint (duoserve.prune.pruned_models.load_pruned_model) in
    activation mode "threshold" (what is served) or "off"."""

    def __init__(self, ckpt: Path, dtype: str = "bfloat16"):
        from duoserve.prune.pruned_models import load_pruned_model

        self.models = {mode: load_pruned_model(ckpt, activation_mode=mode, dtype=dtype)[0]
                       for mode in ("threshold", "off")}
        _, self.tokenizer, loaded = load_pruned_model(ckpt, activation_mode="off", dtype=dtype)
        self.thresholds = loaded.thresholds

    def greedy(self, prompt_ids: list[int], max_new_tokens: int, mode: str = "threshold") -> list[int]:
        ids = torch.tensor([prompt_ids])
        with torch.no_grad():
            out = self.models[mode].generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                             max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                                             pad_token_id=self.tokenizer.pad_token_id)
        return out[0, len(prompt_ids):].tolist()


def corrupt(src: Path, dst: Path, edit) -> Path:
    """Copy a checkpoint and apply `edit(folder)` (for the tests of refusals)."""
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    edit(dst)
    return dst


def rewrite_tensors(folder: Path, fn, *, refresh_manifest: bool = True) -> None:
    """Apply fn(dict name->tensor) to every safetensors file of `folder`."""
    from safetensors.torch import load_file, save_file

    from duoserve.format.manifest import write_manifest

    for f in sorted(folder.glob("*.safetensors")):
        tensors = load_file(str(f))
        fn(tensors)
        save_file(tensors, str(f), metadata={"format": "pt"})
    if refresh_manifest:
        write_manifest(folder)


def with_split_thresholds(ckpt: Path, out: Path) -> Path:
    """The same checkpoint with the k/v and up projections' thresholds moved off q's and gate's
    (x0.5, x1.5, x0.5), so that vLLM's fused qkv_proj and gate_up_proj run one op call per shard
    instead of one per fused layer."""
    loaded = load_checkpoint(ckpt)
    scale = {"self_attn.k_proj": 0.5, "self_attn.v_proj": 1.5, "mlp.up_proj": 0.5}
    modules = {name: replace(info, act_threshold=info.act_threshold * next(
                   (s for suffix, s in scale.items() if name.endswith(suffix)), 1.0))
               for name, info in loaded.qconfig.modules.items()}
    state = dict(loaded.state_dict)
    if loaded.config.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)  # as the pruner writes it
    return save_checkpoint(out, state, loaded.config, replace(loaded.qconfig, modules=modules),
                           save_extras=_copy_extras(ckpt), overwrite=True)


def served_greedy_tokens(extra_args: list[str], ckpt: Path, log: Path) -> dict[str, list[int]]:
    """Serve `ckpt` with `duoserve serve` (float32, eager, plus extra_args) and return the 12 greedy
    tokens it answers to each of PROMPTS (EOS ignored, so every answer has 12)."""
    import re

    from openai import OpenAI

    from process_helpers import duoserve_cli

    args = ["serve", str(ckpt), "--port", "0", "--api-key", "k", "--served-model-name", "tiny", *extra_args,
            "--enforce-eager", "--max-model-len", "256", "--log-file", str(log), "--dtype", "float32"]
    with duoserve_cli(args) as (proc, out):
        url = re.search(r"ready at (\S+)", out.wait_for("duoserve serve: ready at", 420)).group(1)
        client = OpenAI(base_url=url, api_key="k", timeout=120, max_retries=0)
        served = {}
        for text in PROMPTS:
            r = client.completions.create(model="tiny", prompt=text, max_tokens=12, temperature=0,
                                          extra_body={"ignore_eos": True, "return_token_ids": True})
            served[text] = list(r.choices[0].token_ids)
    return served
