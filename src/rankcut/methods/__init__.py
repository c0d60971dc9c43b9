"""One module per method: a config dataclass and a registered factorize function."""

from . import asvd, fwsvd, svd, svd_llm  # noqa: F401  (registration side effects)
from .asvd import AsvdConfig
from .base import METHODS, MethodConfig, MethodSpec, get_method, register_method, spec_for_config
from .fwsvd import FwsvdConfig
from .svd import SvdConfig
from .svd_llm import SvdLlmConfig

__all__ = [
    "METHODS",
    "AsvdConfig",
    "FwsvdConfig",
    "MethodConfig",
    "MethodSpec",
    "SvdConfig",
    "SvdLlmConfig",
    "get_method",
    "register_method",
    "spec_for_config",
]
