"""Linears that read the same input get the same activation threshold, bit for bit.

q/k/v read the layer's normed input and gate/up the MLP's; the server stacks a fused module's
shards into one op call only when their thresholds are equal (loaders/linear.py,
group_by_threshold). Calibration subsamples |x| when a linear sees more values than its cap; the
sample must be drawn once per input tensor, not once per linear, or the thresholds differ in the
last digits and vLLM's qkv_proj / gate_up_proj run as three and two calls. The cap here is far
below the tiny model's input sizes, so every quantile below comes from a subsample.
"""
import pytest
import torch
from transformers import AutoModelForCausalLM

from duoserve.format import DEFAULT_TARGETS
from duoserve.loaders.linear import Shard, group_by_threshold
from duoserve.prune.thresholds import SampleOncePerInput, calibrate_threshold_grid

SAME_INPUT = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj"))


@pytest.fixture(scope="module")
def calibration(tiny_llama_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, torch_dtype=torch.float32)
    windows = torch.randint(0, model.config.vocab_size, (4, 48), generator=torch.Generator().manual_seed(0))
    return calibrate_threshold_grid(model, windows, 0.5, DEFAULT_TARGETS, batch_size=2,
                                    max_values_per_linear=300)


def test_linears_reading_one_input_share_the_threshold_and_the_grid(calibration):
    layers = sorted({name.rsplit(".", 2)[0] for name in calibration.thresholds if ".mlp." not in name})
    assert len(layers) == 2
    for layer in layers:
        for names in SAME_INPUT:
            full = [f"{layer}.{n}" for n in names]
            assert len({calibration.thresholds[n] for n in full}) == 1, full
            assert all(calibration.grid_thresholds[n] == calibration.grid_thresholds[full[0]] for n in full), full
        # different inputs still get their own thresholds
        assert calibration.thresholds[f"{layer}.self_attn.q_proj"] != calibration.thresholds[f"{layer}.mlp.gate_proj"]


def test_the_server_then_runs_each_fused_module_as_one_call(calibration):
    for names, width in zip(SAME_INPUT, (64, 256)):
        shards = [Shard(f"model.layers.0.{n}", rows=width, cols=128, nnz=0, row_offset=width * i, value_offset=0)
                  for i, n in enumerate(names)]
        groups = group_by_threshold(shards, [calibration.thresholds[s.hf_name] for s in shards])
        assert len(groups) == 1 and groups[0].rows == width * len(names)


def test_a_sample_is_drawn_once_per_input_tensor():
    gen = torch.Generator().manual_seed(0)
    draw = SampleOncePerInput(10, gen)
    x, y = torch.randn(8, 16), torch.randn(8, 16)
    assert draw(x) is draw(x.reshape(-1, 16)) and draw(x).numel() == 10
    assert not torch.equal(draw(x), draw(y))
    first = draw(x)
    draw.clear()
    assert not torch.equal(first, draw(x))  # after clear() the next pass draws anew
