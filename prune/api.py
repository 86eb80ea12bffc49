"""`prune_model`: model + method + data -> a duoserve checkpoint (the library entry of `duoserve prune`).

Everything the user can get wrong is validated before the model is loaded, so bad input fails in
a second and leaves nothing behind. The checkpoint is written atomically at the very end; until
then the run lives in `OUT.partial/` and can be resumed.

Its steps are callable on their own, for tools that prune many configurations of one loaded model
without writing checkpoints (scripts/symmetric_table.py): `build_method(cfg)`, `seed_everything`,
and `prune_loaded(model, tokenizer, cfg, method, device)` (calibration windows, the sequential
engine, activation thresholds).
"""
from __future__ import annotations

import json
import logging
import random
import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from duoserve import __version__
from duoserve.errors import InputError
from duoserve.format import DEFAULT_IGNORE, DEFAULT_TARGETS, ActivationSparsity, QuantizationConfig
from duoserve.format.schema import DEFAULT_QUANT_GROUP, QUANT_GROUP_MULTIPLE, WeightQuant
from duoserve.format.io import build_quant_config, save_checkpoint
from duoserve.format.manifest import check_output_folder
from duoserve.prune.allocation import (
    DEFAULT_ALLOCATION_NSAMPLES, DEFAULT_ALLOCATION_SEQLEN, DEFAULT_ALLOCATION_TARGETS,
)
from duoserve.prune.architectures import bos_for, decoder_layers, model_targets
from duoserve.prune.data import calibration_windows
from duoserve.prune.engine import SCALES_ATTR, EngineSettings, SequentialEngine
from duoserve.prune.model_sources import load_model_and_tokenizer
from duoserve.prune.refiners import RefinedMethod, build_refiner
from duoserve.prune.registry import build_options, get_method
from duoserve.prune.sparsity import SparsityTarget, check_nm_compatible
from duoserve.prune.thresholds import ThresholdCalibration, calibrate_threshold_grid
from duoserve.prune.workdir import WorkDir

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PruneConfig:
    output: Path
    model: str | None = None
    method: str = "sparsegpt"
    sparsity: str = "0.5"
    activation_sparsity: float = 0.0
    method_options: dict[str, Any] = field(default_factory=dict)
    refine: str | None = None  # a refiner run after the method (prune/refiners/), e.g. "r2dsnot"
    refine_options: dict[str, Any] = field(default_factory=dict)
    calib_data: str = "c4"
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0
    threshold_nsamples: int = 16
    targets: tuple[str, ...] = DEFAULT_TARGETS
    weight_format: str = "bitmask"
    allocation: str = "uniform"  # "greedy": also store a layer-adaptive p_x table (prune/allocation.py)
    allocation_targets: tuple[float, ...] = DEFAULT_ALLOCATION_TARGETS
    allocation_nsamples: int = DEFAULT_ALLOCATION_NSAMPLES
    allocation_seqlen: int = DEFAULT_ALLOCATION_SEQLEN
    quantize: str | None = None  # "int4" / "int8": kept weights stored as codes + group scales (issue 31)
    group_size: int | None = None  # with quantize: input columns per scale (default 128)
    batch_size: int = 4
    device: str = "auto"
    overwrite: bool = False
    resume: bool = False

    def __post_init__(self):
        if not 0.0 <= self.activation_sparsity < 1.0:
            raise InputError(f"--activation-sparsity {self.activation_sparsity} is outside [0, 1)")
        if self.nsamples <= 0 or self.seqlen <= 0 or self.threshold_nsamples <= 0:
            raise InputError("--nsamples, --seqlen and --threshold-nsamples must be positive")
        if self.weight_format not in ("bitmask", "dense"):
            raise InputError(f"--weight-format {self.weight_format!r} is not 'bitmask' or 'dense'")
        self.weight_quant  # noqa: B018 - validates --quantize / --group-size
        if self.allocation not in ("uniform", "greedy"):
            raise InputError(f"--allocation {self.allocation!r} is not uniform or greedy")
        if self.allocation == "greedy":
            from duoserve.format.schema import px_grid
            from duoserve.prune.allocation import check_targets

            check_targets(self.allocation_targets, px_grid(self.activation_sparsity))
            if self.allocation_nsamples <= 0 or self.allocation_seqlen < 8:
                raise InputError("--allocation-nsamples must be positive and --allocation-seqlen at least 8")
        unknown = sorted(set(self.targets) - set(DEFAULT_TARGETS))
        if unknown or not self.targets:
            raise InputError(f"--targets {','.join(unknown) or '(empty)'}: choose among {','.join(DEFAULT_TARGETS)}")

    @property
    def weight_quant(self) -> WeightQuant | None:
        """--quantize / --group-size as the checkpoint's weight_quant (InputError when invalid)."""
        if self.quantize is None:
            if self.group_size is not None:
                raise InputError("--group-size needs --quantize int4|int8")
            return None
        bits = {"int4": 4, "int8": 8}.get(self.quantize)
        if bits is None:
            raise InputError(f"--quantize {self.quantize!r} is not int4 or int8")
        if self.weight_format != "bitmask":
            raise InputError(f"--quantize {self.quantize} stores codes and scales, which only the bitmask weight "
                             f"format holds; drop --weight-format {self.weight_format}")
        group = DEFAULT_QUANT_GROUP if self.group_size is None else self.group_size
        if group <= 0 or group % QUANT_GROUP_MULTIPLE:
            raise InputError(f"--group-size {group}: need a positive multiple of {QUANT_GROUP_MULTIPLE} (a group is "
                             f"whole bitmask bytes), e.g. {DEFAULT_QUANT_GROUP}")
        return WeightQuant(bits, group)

    @property
    def workdir_path(self) -> Path:
        return self.output.with_name(self.output.name + ".partial")


def _device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"--device {name}: no CUDA device is available")
    return name


def _tied_free_state_dict(model) -> dict[str, torch.Tensor]:
    """The state dict without tied copies (lm_head sharing the embedding is stored once)."""
    out, seen = {}, set()
    for name, tensor in model.state_dict().items():
        key = (tensor.data_ptr(), tuple(tensor.shape))
        if key in seen:
            continue
        seen.add(key)
        out[name] = tensor
    return out


@dataclass
class PruneRun:
    """What prune_loaded did to the model (pruned in place)."""
    layer_logs: list[dict]  # per layer, from the sequential engine (duoserve-prune-log.json)
    calibration: ThresholdCalibration | None  # None when not asked for (calibrate_thresholds=False)
    calib_desc: str | None  # the calibration windows' description; None without calibration data
    prune_seconds: float  # the engine's run


def build_method(cfg: PruneConfig):
    """(method, refiner or None, SparsityTarget) from the config: the method wrapped with its refiner."""
    method_cls = get_method(cfg.method)
    target = SparsityTarget.parse(cfg.sparsity)
    options = build_options(method_cls, cfg.method_options)
    method = method_cls(target, cfg.activation_sparsity, options)
    refiner = None
    if cfg.refine:
        refiner = build_refiner(cfg.refine, cfg.refine_options)
        method = RefinedMethod(method, refiner)  # the engine sees one method; see prune/refiners
    elif any(v is not None for v in cfg.refine_options.values()):
        given = ", ".join("--refine-" + k.replace("_", "-") for k, v in cfg.refine_options.items() if v is not None)
        raise InputError(f"{given} need(s) --refine NAME")
    # OBS methods (joint_quantization) round inside their solve; the engine rounds the others' results,
    # and a refined method's: a refiner moves weights after the base's solve.
    method.quantize = cfg.weight_quant
    return method, refiner, target


def seed_everything(seed: int, device: str) -> None:
    """Seeds torch and random; on CUDA, TF32 off so that calibration math runs in true fp32."""
    torch.manual_seed(seed)
    random.seed(seed)
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False


def prune_loaded(model, tokenizer, cfg: PruneConfig, method, device: str, workdir: WorkDir | None = None, *,
                 windows: torch.Tensor | None = None, threshold_windows: torch.Tensor | None = None,
                 calibrate_thresholds: bool = True) -> PruneRun:
    """Prune a loaded model in place with `method` (from build_method) and calibrate its thresholds.

    Draws the calibration windows (seed cfg.seed) and the threshold windows (seed cfg.seed + 1)
    unless given (a caller pruning many configurations draws them once); with a workdir, a method
    that calibrates starts or resumes it and the threshold calibration is saved there.
    calibrate_thresholds=False skips the threshold grid (nothing to serve: an in-memory comparison
    without activation sparsity).
    """
    needs_data = method.needs_calibration or cfg.activation_sparsity > 0
    desc = None
    if needs_data and windows is None:
        windows, desc = calibration_windows(cfg.calib_data, tokenizer, cfg.nsamples, cfg.seqlen, cfg.seed,
                                            bos_for(model, tokenizer))
        log.info("calibration data: %s", desc)
    workdir = workdir if method.needs_calibration else None
    if workdir is not None:
        workdir.start(resume=cfg.resume, overwrite=cfg.overwrite)
    engine_settings = EngineSettings(batch_size=cfg.batch_size, device=device)
    engine = SequentialEngine(model, method, cfg.targets, engine_settings, workdir)
    t_prune = time.time()
    layer_logs = engine.run(windows)
    prune_seconds = time.time() - t_prune
    refiner = getattr(method, "refiner", None)
    if refiner is not None and getattr(refiner, "totals", None):
        log.info("%s: %s", refiner.name, ", ".join(f"{k} {v}" for k, v in refiner.totals.items()))

    calibration = workdir.threshold_calibration if workdir is not None else None
    if calibration is None and calibrate_thresholds:
        # A separate draw (seed + 1) so thresholds are not fit on the pruning windows only. Also at
        # p_x = 0: the grid lets the checkpoint be served with activation sparsity later.
        if threshold_windows is None:
            threshold_windows, _ = calibration_windows(cfg.calib_data, tokenizer, cfg.threshold_nsamples,
                                                       cfg.seqlen, cfg.seed + 1, bos_for(model, tokenizer))
        calibration = calibrate_threshold_grid(model, threshold_windows, cfg.activation_sparsity, cfg.targets,
                                               batch_size=cfg.batch_size, device=device, seed=cfg.seed)
        if workdir is not None:
            workdir.save_threshold_calibration(calibration)
    return PruneRun(layer_logs, calibration, desc, prune_seconds)


def prune_model(cfg: PruneConfig) -> dict[str, Any]:
    """Run a prune; returns a summary dict (also written into the checkpoint's metadata)."""
    t_start = time.time()
    method, refiner, target = build_method(cfg)
    check_output_folder(cfg.output, cfg.overwrite)
    if cfg.resume and cfg.overwrite:
        raise InputError("--resume and --overwrite contradict each other; pick one")
    device = _device(cfg.device)
    seed_everything(cfg.seed, device)

    model, tokenizer, source = load_model_and_tokenizer(cfg.model)
    decoder_layers(model)  # refuses unsupported architectures
    targets = model_targets(model, cfg.targets)
    for name, linear in targets.items():
        check_nm_compatible(target, linear.in_features, name)
    log.info("pruning %s with %s%s: weight sparsity %s, activation sparsity %g, %d target linears",
             source, method.name, f" + {refiner.name}" if refiner else "", target, cfg.activation_sparsity,
             len(targets))

    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()
                if k not in ("overwrite", "resume", "output", "device", "batch_size")
                and not k.startswith("allocation")}  # the allocation runs after the prune: resumable either way
    workdir = WorkDir(cfg.workdir_path, settings)
    needs_data = method.needs_calibration or cfg.activation_sparsity > 0
    run = prune_loaded(model, tokenizer, cfg, method, device, workdir)
    layer_logs, calibration, desc, prune_seconds = run.layer_logs, run.calibration, run.calib_desc, run.prune_seconds

    state_dict = _tied_free_state_dict(model)
    dtype_name = str(next(iter(targets.values())).weight.dtype).replace("torch.", "")
    base = QuantizationConfig(
        weight_format=cfg.weight_format, weight_quant=cfg.weight_quant, dtype=dtype_name, modules={},
        targets=cfg.targets, ignore=DEFAULT_IGNORE,
        sparsity_structure=target.structure,
        activation_sparsity=ActivationSparsity(
            rule="threshold" if cfg.activation_sparsity > 0 else "none", target=cfg.activation_sparsity,
            calibration={"data": cfg.calib_data, "nsamples": cfg.threshold_nsamples, "seqlen": cfg.seqlen,
                         "seed": cfg.seed + 1}, grid=calibration.grid),
        producer={"name": "duoserve", "version": __version__, "method": method.name,
                  "method_args": method.describe(), "refine": refiner.name if refiner else None,
                  "refine_args": refiner.describe() if refiner else None, "weight_sparsity_target": str(target),
                  "calib_data": desc, "nsamples": cfg.nsamples if needs_data else 0, "seqlen": cfg.seqlen,
                  "seed": cfg.seed, "source_model": source},
    )
    qconfig = build_quant_config(state_dict, calibration.thresholds, base, calibration.grid_thresholds)
    if cfg.allocation == "greedy":
        from duoserve.prune.allocation import ALLOCATION_SEED_OFFSET, with_greedy_allocation

        qconfig = with_greedy_allocation(model, tokenizer, qconfig, calib_data=cfg.calib_data,
                                         seed=cfg.seed + ALLOCATION_SEED_OFFSET, targets=cfg.allocation_targets,
                                         nsamples=cfg.allocation_nsamples, seqlen=cfg.allocation_seqlen,
                                         batch_size=cfg.batch_size, device=device)
    hf_config = json.loads(model.config.to_json_string())
    theta = (hf_config.get("rope_parameters") or {}).get("rope_theta")
    if theta is not None:
        hf_config.setdefault("rope_theta", theta)  # some vLLM versions read only the top-level key

    def save_extras(folder: Path) -> None:
        tokenizer.save_pretrained(folder)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(folder)
        (folder / "duoserve-prune-log.json").write_text(json.dumps(layer_logs, indent=1) + "\n")

    scales = None
    if cfg.weight_quant is not None:  # each pruned linear holds its scales (prune/engine.py)
        scales = {name: getattr(m, SCALES_ATTR) for name, m in model.named_modules() if name in qconfig.modules}
    save_checkpoint(cfg.output, state_dict, hf_config, qconfig, save_extras=save_extras, overwrite=cfg.overwrite,
                    quant_scales=scales)
    workdir.remove()
    summary = {"output": str(cfg.output), "method": method.name, "refine": cfg.refine,
               "sparsity": qconfig.global_sparsity,
               "structure": target.structure, "activation_sparsity": cfg.activation_sparsity,
               "prune_seconds": round(prune_seconds, 1), "total_seconds": round(time.time() - t_start, 1),
               # ru_maxrss is in KiB on Linux: the peak resident memory of this process so far
               "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if device.startswith("cuda"):
        summary["peak_cuda_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    log.info("wrote %s (realized weight sparsity %.4f) in %.1f s", cfg.output, qconfig.global_sparsity,
             summary["total_seconds"])
    return summary
