"""One module per method: a config dataclass and a registered factorize function."""

from . import (  # noqa: F401  (registration side effects)
    asvd,
    cur,
    dense_sparse,
    dictionary,
    fwsvd,
    kronecker,
    svd,
    svd_llm,
    svd_sparse,
)
from .asvd import AsvdConfig
from .base import (
    METHODS,
    MethodConfig,
    MethodSpec,
    get_method,
    register_method,
    register_structure,
    spec_for_config,
)
from .cur import CurConfig
from .dense_sparse import DenseSparseConfig
from .dictionary import DictionaryConfig
from .fwsvd import FwsvdConfig
from .kronecker import KroneckerConfig
from .svd import SvdConfig
from .svd_llm import SvdLlmConfig
from .svd_sparse import SvdSparseConfig

__all__ = [
    "METHODS",
    "AsvdConfig",
    "CurConfig",
    "DenseSparseConfig",
    "DictionaryConfig",
    "FwsvdConfig",
    "KroneckerConfig",
    "MethodConfig",
    "MethodSpec",
    "SvdConfig",
    "SvdLlmConfig",
    "SvdSparseConfig",
    "get_method",
    "register_method",
    "register_structure",
    "spec_for_config",
]
