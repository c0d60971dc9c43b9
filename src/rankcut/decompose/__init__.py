"""Pure tensor math for low-rank factorization: tensors in, factors out."""

from .spectrum import decay_exponent, effective_rank, energy_kept, is_low_rank
from .svd import (
    all_finite,
    check_rank,
    column_scaled_factors,
    split_factors,
    svd_factors,
    truncated_svd,
)
from .whitening import psd_cholesky, whitened_factors, whitened_spectrum

__all__ = [
    "all_finite",
    "check_rank",
    "column_scaled_factors",
    "decay_exponent",
    "effective_rank",
    "energy_kept",
    "is_low_rank",
    "psd_cholesky",
    "split_factors",
    "svd_factors",
    "truncated_svd",
    "whitened_factors",
    "whitened_spectrum",
]
