"""The duoserve linear method: load the on-disk format, repack for the kernel, run the custom op.

One vLLM linear layer holds one or more HF projections ("shards"): qkv_proj = q/k/v, gate_up_proj
= gate/up, any other target = itself. Each shard keeps its own activation threshold. Consecutive
shards with equal thresholds (the usual case: they read the same input) are packed as one matrix
and run as one op call; shards with different thresholds get their own call and the outputs are
concatenated along the last dim. Both are exact.

Loading (docs/checkpoint-format.md for the on-disk tensors): each layer registers one parameter per
on-disk tensor name so that vLLM's loader finds it (weight_bitmask + weight_values, or weight for
the dense format, and act_threshold fp32 [S], NaN until loaded), each with our own weight loader.
The weight parameters are empty placeholders: a shard's tensors are kept as they arrive, and once
all of a shard's weight tensors are in, the loader checks them against the metadata (shape, dtype,
popcount == nnz) and keeps only this rank's part (duoserve.loaders.sharding): the whole shard
without tensor parallelism, a block of output rows in a column-parallel layer, a block of input
columns in a row-parallel one. process_weights_after_loading refuses missing pieces, packs the
parts with duoserve.kernels and frees them. A serve-time activation sparsity replaces the loaded
thresholds with the ones DuoserveConfig selected from the checkpoint's grid.

Why cut at arrival (the tensor-parallel cost): a rank's value count depends on where the non-zeros
fall, which vLLM would need before reading a tensor; the format has per-module counts only, and a
format change was ruled out. Cutting as each shard completes keeps a rank's resident weights at its
own part (about 1/TP) plus, transiently, one shard's whole on-disk tensors and a few byte-sized
temporaries per bitmask byte. The load-time cost: every rank reads every tensor of the modules it
builds in full (as vLLM does for dense weights) and runs byte-wise popcounts over each shard's
bitmask (docs/serving.md, "Parallel serving", has the measured times).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch.nn import Parameter

from duoserve.errors import CheckpointError
from duoserve.format.bitmask import pad_bits_clear
from duoserve.format.quant import int4_pad_clear, unpack_codes
from duoserve.format.schema import (
    BITMASK_SUFFIX, THRESHOLD_SUFFIX, VALUES_SUFFIX, ModuleInfo, TensorSpec, WeightQuant, module_tensor_specs,
)
from duoserve.kernels import (
    dual_sparse_linear_op, dual_sparse_linear_q_op, kernel_backend, kernel_backend_q, pack_bitmask, pack_dense,
    pack_quantized,
)
from duoserve.loaders.sharding import RankSlice, rank_slice, row_value_offsets, slice_bitmask, slice_dense
from duoserve.loaders.vllm_compat import (
    LinearMethodBase, set_weight_attrs, shard_index, shard_parts, tp_rank_of, tp_size_of,
)

log = logging.getLogger(__name__)

# On-disk tensors whose dtype the format fixes (the others have the checkpoint's dtype).
_FIXED_DTYPES = {"U8": torch.uint8, "F16": torch.float16}


@dataclass(frozen=True)
class Shard:
    """One HF projection inside a vLLM layer."""

    hf_name: str  # e.g. model.layers.0.self_attn.k_proj
    rows: int  # N_s (output features)
    cols: int  # K (input features)
    nnz: int
    row_offset: int  # first row in the fused layer
    value_offset: int  # first value in the fused values tensor


@dataclass(frozen=True)
class Group:
    """Consecutive shards with the same threshold: packed together, one op call."""

    row_offset: int
    rows: int
    cols: int
    value_offset: int
    nnz: int
    threshold: float


def group_by_threshold(shards: list[Shard], thresholds: list[float]) -> list[Group]:
    """Merge runs of shards whose thresholds are equal (bit for bit).

    q/k/v (and gate/up) read the same input, so calibrations that measure the input give them
    the same threshold; one op call on the stacked weight is then exactly the per-shard result,
    with fewer calls, larger kernels and no concatenation. Different thresholds stay separate.
    """
    groups: list[Group] = []
    for s, t in zip(shards, thresholds):
        last = groups[-1] if groups else None
        if last is not None and last.threshold == t:
            groups[-1] = Group(last.row_offset, last.rows + s.rows, s.cols, last.value_offset, last.nnz + s.nnz, t)
        else:
            groups.append(Group(s.row_offset, s.rows, s.cols, s.value_offset, s.nnz, t))
    return groups


class LoadSummary:
    """One INFO line per model once all its duoserve layers are packed (not one per layer)."""

    def __init__(self):
        self.expected, self.layers, self.nbytes, self.elements = 0, 0, 0, 0
        self.tp = (0, 1)  # (rank, size) of this process's tensor-parallel group

    def add(self, nbytes: int, elements: int, device: torch.device, dtype: torch.dtype | None) -> None:
        self.layers += 1
        self.nbytes += nbytes
        self.elements += elements
        if self.layers == self.expected:
            rank = "" if self.tp[1] == 1 else f" on tensor-parallel rank {self.tp[0]} of {self.tp[1]} (its slices)"
            log.info("duoserve: %d linear layers repacked into the dual-sparse kernel layout%s "
                     "(%.1f MiB, %.3f bytes/weight); apply() runs torch.ops.duoserve.dual_sparse_linear: %s",
                     self.layers, rank, self.nbytes / 2**20, self.nbytes / max(self.elements, 1),
                     kernel_backend(device, dtype) if dtype is not None else kernel_backend_q(device))


def make_shards(names: list[str], infos: list[ModuleInfo]) -> list[Shard]:
    shards, row, val = [], 0, 0
    for name, info in zip(names, infos):
        n, k = info.shape
        shards.append(Shard(name, n, k, info.nnz, row, val))
        row += n
        val += info.nnz
    return shards


class DuoserveLinearMethod(LinearMethodBase):
    """create_weights (on-disk format) -> process_weights_after_loading (kernel layout) -> apply (op)."""

    def __init__(self, weight_format: str, shards: list[Shard], prefix: str, summary: LoadSummary | None = None,
                 serve_thresholds: list[float] | None = None, weight_quant: WeightQuant | None = None):
        self.weight_format = weight_format
        self.weight_quant = weight_quant  # format 3: int4/int8 codes + group scales (issue 31)
        self.shards = shards
        # Per shard, its on-disk tensors by parameter name (the format's one spec, format/schema.py).
        self.specs: list[dict[str, TensorSpec]] = [
            {spec.param: spec for spec in module_tensor_specs(weight_format, (s.rows, s.cols), s.nnz, weight_quant)}
            for s in shards]
        self.prefix = prefix
        self.summary = summary
        # One threshold per shard for a serve-time p_x other than the calibrated one (from the
        # metadata grid, duoserve.format.thresholds); None: the loaded act_threshold tensors.
        if serve_thresholds is not None and len(serve_thresholds) != len(shards):
            raise ValueError(f"{prefix}: {len(serve_thresholds)} serve-time thresholds for {len(shards)} shards")
        self.serve_thresholds = serve_thresholds
        if summary is not None:
            summary.expected += 1

    # -- creation --------------------------------------------------------------------------
    def create_weights(self, layer, input_size_per_partition, output_partition_sizes, input_size,
                       output_size, params_dtype, **extra_weight_attrs):
        extra_weight_attrs.pop("weight_loader", None)  # ours replaces the layer's
        names = ", ".join(s.hf_name for s in self.shards)
        if len(output_partition_sizes) != len(self.shards):
            raise CheckpointError(f"{names}: vLLM layer {self.prefix} has {len(output_partition_sizes)} output "
                                  f"partitions, the checkpoint {len(self.shards)} modules")
        # This rank's block of each shard (the whole shard without tensor parallelism).
        self.slices: list[RankSlice] = []
        for i, (s, n_loc) in enumerate(zip(self.shards, output_partition_sizes)):
            (row_part, row_parts), (col_part, col_parts) = shard_parts(layer, i)
            if (n_loc * row_parts, input_size_per_partition * col_parts) != (s.rows, s.cols):
                want = [(x.rows, x.cols) for x in self.shards]
                got = [(n * shard_parts(layer, j)[0][1], input_size_per_partition * col_parts)
                       for j, n in enumerate(output_partition_sizes)]
                raise CheckpointError(f"{names}: quantization_config.modules gives shapes {want}, the model's "
                                      f"config gives {got}; the checkpoint does not belong to this config")
            self.slices.append(rank_slice((s.rows, s.cols), (n_loc, input_size_per_partition), row_part, col_part))
        if self.summary is not None:
            self.summary.tp = (tp_rank_of(layer), tp_size_of(layer))
        for spec in self.specs[0].values():
            if spec.stacks == "shards":
                # NaN until loaded: a threshold the checkpoint lacks must not silently become 0 (= no sparsity).
                self._add(layer, spec.param, torch.full((len(self.shards),), math.nan, dtype=torch.float32))
            else:
                # A placeholder that vLLM's loader finds by name; the loader keeps each shard's part
                # itself (its value count is known only once the shard's bitmask is read).
                self._add(layer, spec.param, torch.empty(0, dtype=_FIXED_DTYPES.get(spec.dtype, params_dtype)))
        layer._duoserve_loaded = set()
        layer._duoserve_pending = {}  # shard -> {param name: whole on-disk tensor}, until the shard is complete
        layer._duoserve_parts = {}  # shard -> {param name: this rank's part}
        layer._duoserve_params_dtype = params_dtype

    def _add(self, layer, name: str, data: torch.Tensor) -> None:
        param = Parameter(data, requires_grad=False)
        layer.register_parameter(name, param)

        def loader(param, loaded_weight, shard_id=None, _name=name):
            self._load(layer, _name, param, loaded_weight, shard_id)

        set_weight_attrs(param, {"weight_loader": loader})

    # -- loading ---------------------------------------------------------------------------
    def _load(self, layer, name: str, param, loaded: torch.Tensor, shard_id) -> None:
        if shard_id is None and len(self.shards) > 1:
            raise CheckpointError(f"{self.prefix}.{name}: a fused tensor on disk is not part of the duoserve "
                                  "format; store the projections separately (q/k/v, gate/up)")
        i = shard_index(layer, shard_id)
        s, spec = self.shards[i], self.specs[i][name]
        tensor_name = s.hf_name + spec.suffix
        want = spec.shape
        if spec.stacks == "shards":  # a scalar per shard: the same on every rank (elementwise rule)
            want = (1,)
            loaded = loaded.reshape(-1) if loaded.numel() == 1 else loaded
        if tuple(loaded.shape) != want:
            raise CheckpointError(f"{tensor_name}: shape {list(loaded.shape)} in the checkpoint, expected "
                                  f"{list(want)} (from quantization_config.modules)")
        if spec.dtype in _FIXED_DTYPES and loaded.dtype != _FIXED_DTYPES[spec.dtype]:
            raise CheckpointError(f"{tensor_name}: dtype {loaded.dtype}, expected {_FIXED_DTYPES[spec.dtype]}")
        if spec.stacks == "shards":
            param.data[i:i + 1].copy_(loaded)
        else:
            dtype = _FIXED_DTYPES.get(spec.dtype, layer._duoserve_params_dtype)
            # Held whole only until the shard's other tensor arrives (the next one in file order).
            layer._duoserve_pending.setdefault(i, {})[name] = loaded.to(device=param.device, dtype=dtype)
            if all(n in layer._duoserve_pending[i] for n in self._weight_names()):
                layer._duoserve_parts[i] = self._cut(i, layer._duoserve_pending.pop(i))
        layer._duoserve_loaded.add((name, i))

    def _weight_names(self) -> list[str]:
        return [n for n, spec in self.specs[0].items() if spec.stacks != "shards"]

    def _cut(self, i: int, whole: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Check shard i's whole on-disk tensors and return this rank's part of them (own storage,
        so the whole tensors are freed when the caller drops them)."""
        s, sl = self.shards[i], self.slices[i]
        wq = self.weight_quant
        if wq is not None and not int4_pad_clear(whole["weight_values"], s.nnz, wq.bits):
            raise CheckpointError(f"tensor {s.hf_name}{VALUES_SUFFIX}: the unused high nibble of the last byte is set; "
                                  "the checkpoint is corrupted")
        if self.weight_format == "bitmask":
            bitmask, values = whole["weight_bitmask"], whole["weight_values"]
            if wq is not None:  # one code per byte from here on (int4 unpacked), sliced like values
                values = unpack_codes(values, s.nnz, wq.bits)
            offsets = row_value_offsets(bitmask)  # [N + 1]; offsets[-1] is the popcount
            if not pad_bits_clear(bitmask, s.cols) or int(offsets[-1]) != s.nnz:
                raise CheckpointError(f"tensor {s.hf_name}{BITMASK_SUFFIX}: {int(offsets[-1])} bits "
                                      f"set (pad bits clear: {pad_bits_clear(bitmask, s.cols)}), but nnz is "
                                      f"{s.nnz}; the checkpoint is corrupted")
            bm, vals = slice_bitmask(bitmask, values, (s.rows, s.cols), sl, offsets)
            part = {"weight_bitmask": bm.clone(), "weight_values": vals.clone()}
            if wq is not None:
                g0, g1 = sl.col_start // wq.group_size, -(-sl.col_end // wq.group_size)
                if sl.col_start % wq.group_size or (sl.col_end % wq.group_size and sl.col_end != s.cols):
                    raise CheckpointError(f"{s.hf_name}: tensor parallelism cuts its {s.cols} input columns at "
                                          f"{sl.col_start}..{sl.col_end}, inside a quantization group of "
                                          f"{wq.group_size}; choose a tensor-parallel size that keeps groups whole")
                part["weight_scales"] = whole["weight_scales"][sl.row_start:sl.row_end, g0:g1].clone()
            return part
        return {"weight": slice_dense(whole["weight"], sl).clone()}

    def _expected(self) -> list[str]:
        return list(self.specs[0])  # the parameter names: the same for every shard

    def process_weights_after_loading(self, layer) -> None:
        for name in self._expected():
            for i, s in enumerate(self.shards):
                if (name, i) not in layer._duoserve_loaded:
                    raise CheckpointError(f"tensor {s.hf_name}{self.specs[i][name].suffix} is missing from the checkpoint "
                                          f"(needed by vLLM layer {self.prefix})")
        thresholds = layer.act_threshold.data.cpu()
        for i, s in enumerate(self.shards):
            t = float(thresholds[i])
            if math.isnan(t) or t < 0:
                raise CheckpointError(f"tensor {s.hf_name}{THRESHOLD_SUFFIX} is {t} after loading (missing, NaN "
                                      "or negative); re-run threshold calibration")
        if self.serve_thresholds is not None:
            # The tensors were still required and checked above: the checkpoint stays whole.
            thresholds = torch.tensor(self.serve_thresholds, dtype=torch.float32)
        parts = [layer._duoserve_parts[i] for i in range(len(self.shards))]
        # This rank's shards, stacked in row order as the fused layer's output is.
        local, row, val = [], 0, 0
        for s, sl, p in zip(self.shards, self.slices, parts):
            n, k = sl.shape
            nnz = p["weight_values"].numel() if self.weight_format == "bitmask" else int(torch.count_nonzero(p["weight"]))
            local.append(Shard(s.hf_name, n, k, nnz, row, val))
            row, val = row + n, val + nnz
        self.groups = group_by_threshold(local, [float(t) for t in thresholds])
        packed = []
        for g in self.groups:
            # Shards are stacked in row order and their values are row-major, so a run of shards
            # is itself a valid (bitmask, values) encoding of the stacked [rows, K] matrix.
            members = [p for s, p in zip(local, parts) if g.row_offset <= s.row_offset < g.row_offset + g.rows]
            cat = lambda key: members[0][key] if len(members) == 1 else torch.cat([m[key] for m in members])  # noqa: E731
            if self.weight_quant is not None:
                packed.append(pack_quantized(cat("weight_bitmask"), cat("weight_values"), cat("weight_scales"),
                                             (g.rows, g.cols), self.weight_quant.bits, self.weight_quant.group_size))
            elif self.weight_format == "bitmask":
                packed.append(pack_bitmask(cat("weight_bitmask"), cat("weight_values"), (g.rows, g.cols)))
            else:
                packed.append(pack_dense(cat("weight")))
        device = layer.act_threshold.device
        # Free the on-disk form: only the kernel layout stays resident.
        for name in self._expected():
            delattr(layer, name)
        del layer._duoserve_parts, layer._duoserve_pending, parts
        # Registered as parameters (not hidden in a Python object) so that torch.compile lifts them
        # as graph inputs and module.to() / memory accounting see them.
        for j, (g, p) in enumerate(zip(self.groups, packed)):
            for key, t in p.tensors().items():
                layer.register_parameter(f"duoserve_g{j}_{key}", Parameter(t, requires_grad=False))
            layer.register_parameter(f"duoserve_g{j}_threshold",
                                     Parameter(torch.tensor(g.threshold, dtype=torch.float32, device=device),
                                               requires_grad=False))
        layer.duoserve_nbytes = sum(p.nbytes() for p in packed)
        del layer._duoserve_loaded
        log.debug("%s: %d shard(s) in %d op call(s), %d bytes, thresholds %s", self.prefix, len(self.shards),
                  len(self.groups), layer.duoserve_nbytes, [round(float(t), 5) for t in thresholds])
        if self.summary is not None:
            self.summary.add(layer.duoserve_nbytes, sum(s.rows * s.cols for s in local), device,
                             None if self.weight_quant is not None else packed[0].values.dtype)

    # -- forward ---------------------------------------------------------------------------
    def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        # No Python side effects here: under torch.compile this body is traced and the custom op
        # (duoserve::dual_sparse_linear, with a fake impl) is opaque; it picks decode vs prefill
        # kernels from the token count and the device. Called directly (not through
        # duoserve.kernels.dual_sparse_linear) to skip rebuilding a PackedWeight per call.
        x2 = x.reshape(-1, x.shape[-1])  # [T, K]
        outs = []
        for j, g in enumerate(self.groups):
            b = None if bias is None else bias[g.row_offset:g.row_offset + g.rows]
            if self.weight_quant is not None:
                outs.append(dual_sparse_linear_q_op(
                    x2, getattr(layer, f"duoserve_g{j}_bitmap"), getattr(layer, f"duoserve_g{j}_offsets"),
                    getattr(layer, f"duoserve_g{j}_codes"), getattr(layer, f"duoserve_g{j}_scales"),
                    getattr(layer, f"duoserve_g{j}_threshold"), b, g.rows, g.cols, self.weight_quant.bits,
                    self.weight_quant.group_size))  # [T, N_g]
                continue
            outs.append(dual_sparse_linear_op(
                x2, getattr(layer, f"duoserve_g{j}_bitmap"), getattr(layer, f"duoserve_g{j}_offsets"),
                getattr(layer, f"duoserve_g{j}_values"), getattr(layer, f"duoserve_g{j}_threshold"),
                b, g.rows, g.cols))  # [T, N_g]
        y = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)  # [T, sum N_s]
        return y.reshape(*x.shape[:-1], y.shape[-1])
