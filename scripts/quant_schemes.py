"""Which quantization grid for the kept weights of a pruned model (issue 31; docs/checkpoint-format.md).

    python scripts/quant_schemes.py ~/.cache/duoserve/models/SmolLM2-135M-Instruct-from-gguf-q4_1

Prunes every decoder projection of a HF folder's safetensors by 50% magnitude per row, rounds the
kept values to nearest with groups of 128 input columns and prints, for int4 and int8, the relative
squared error over the kept values of three grids: symmetric with a zero level (levels -8..7 or
-128..127, scale amax / 7 or / 127), symmetric without a zero level (duoserve's: (c - 2^(b-1) + 1/2)
* scale, scale amax / 7.5 or / 127.5) and asymmetric min/max (an fp16 minimum and step per group).
Scales rounded to float16 in every case.
"""
import torch, glob, sys
from safetensors.torch import load_file
folder = sys.argv[1]
sd = {}
for f in glob.glob(folder + "/*.safetensors"): sd.update(load_file(f))
names = [k for k in sd if k.endswith("proj.weight") and "layers" in k]
G = 128
def groups(w, G):
    n, k = w.shape
    pad = (-k) % G
    return torch.nn.functional.pad(w, (0, pad)).view(n, -1, G)
def sym_zero(v, m, qmax):  # levels -qmax-1..qmax, scale amax/qmax
    a = (v.abs() * m).amax(-1, keepdim=True); s = (a / qmax).half().float().clamp_min(2**-14)
    return (v / s).round().clamp(-qmax - 1, qmax) * s
def sym_nz(v, m, qmax):  # 2(qmax+1) levels (c - qmax - .5)*s, no zero level
    a = (v.abs() * m).amax(-1, keepdim=True); s = (a / (qmax + 0.5)).half().float().clamp_min(2**-14)
    return ((v / s - 0.5).round().clamp(-qmax - 1, qmax) + 0.5) * s
def asym(v, m, qmax):  # min/max over kept values, zero point as fp16 min: w = lo + c*step
    big = torch.finfo(v.dtype).max
    lo = torch.where(m, v, torch.full_like(v, big)).amin(-1, keepdim=True)
    hi = torch.where(m, v, torch.full_like(v, -big)).amax(-1, keepdim=True)
    lo = torch.where(m.any(-1, keepdim=True), lo, torch.zeros_like(lo)); hi = torch.where(m.any(-1, keepdim=True), hi, torch.zeros_like(hi))
    L = 2 * qmax + 1
    step = ((hi - lo) / L).half().float().clamp_min(2**-14); lo = lo.half().float()
    return lo + ((v - lo) / step).round().clamp(0, L) * step
for bits, qmax in ((4, 7), (8, 127)):
    tot = {k: 0.0 for k in ("sym_zero", "sym_nz", "asym")}; ref = 0.0
    for nm in names:
        w = sd[nm].float()
        # 50% per-row magnitude prune
        thr = w.abs().kthvalue(w.shape[1] // 2, dim=1, keepdim=True).values
        keep = w.abs() > thr
        v = groups(w * keep, G); m = groups(keep.float(), G).bool()
        ref += float((v * m).pow(2).sum())
        for name, fn in (("sym_zero", sym_zero), ("sym_nz", sym_nz), ("asym", asym)):
            q = fn(v, m, qmax)
            tot[name] += float(((q - v) * m).pow(2).sum())
    print(folder.split("/")[-1], f"int{bits}", {k: f"{v / ref:.3e}" for k, v in tot.items()}, "(relative squared error over kept values)")
