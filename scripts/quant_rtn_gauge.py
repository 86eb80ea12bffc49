"""Gauge for issue 31: quantize an existing bf16 duoserve checkpoint's kept weights to int4 (group
128) by round to nearest, with the scale at the group's max |w| (`amax`) or the best of 1, 0.95,
0.9, 0.85, 0.8 x max per group by squared error (`clip`), into a format-3 checkpoint with the same
thresholds; compare with `duoserve prune --quantize int4` (joint) by `duoserve eval ppl`.

    python scripts/quant_rtn_gauge.py BF16_CKPT OUT amax|clip
"""
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import torch

from duoserve.format.io import load_checkpoint, save_checkpoint
from duoserve.format.quant import expand_groups, fake_quantize, group_scales, half_range, MIN_SCALE
from duoserve.format.schema import WeightQuant

if len(sys.argv) != 4 or sys.argv[3] not in ("amax", "clip"):
    sys.exit(__doc__)
src, dst, clip = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "clip"
ck = load_checkpoint(src)
wq = WeightQuant(4, 128)
sd, scales = dict(ck.state_dict), {}
for name in ck.qconfig.modules:
    w = sd[name + ".weight"].float()
    best_s, best_e = None, None
    for f in ((1.0, 0.95, 0.9, 0.85, 0.8) if clip else (1.0,)):
        s = group_scales(w * f, 4, 128)  # amax * f / 7.5
        full = expand_groups(s.float(), w.shape[1], 128)
        e = ((fake_quantize(w, full, 4) - w) ** 2)
        e = torch.nn.functional.pad(e, (0, (-w.shape[1]) % 128)).view(w.shape[0], -1, 128).sum(-1)
        if best_s is None:
            best_s, best_e = s.clone(), e
        else:
            better = e < best_e
            best_s[better], best_e = s[better], torch.minimum(e, best_e)
    full = expand_groups(best_s.float(), w.shape[1], 128)
    sd[name + ".weight"] = fake_quantize(w, full, 4).to(sd[name + ".weight"].dtype)
    scales[name] = best_s
q = replace(ck.qconfig, weight_quant=wq, format_version=3)
def extras(folder):
    for f in src.iterdir():
        # the tokenizer and the chat template: without the template a served checkpoint refuses chat requests
        if f.name.startswith("tokenizer") or f.name in ("special_tokens_map.json", "generation_config.json",
                                                        "chat_template.jinja"):
            shutil.copy(f, folder / f.name)
save_checkpoint(dst, sd, ck.config, q, save_extras=extras, overwrite=True, quant_scales=scales)
print("wrote", dst)
