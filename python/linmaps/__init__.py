"""linmaps: fast forward and backward passes of linear and bilinear maps for NumPy.

Functional API: :func:`linear`, :func:`linear_backward`, :func:`bilinear`,
:func:`bilinear_backward`, :func:`bilinear_with_context`, and the all-pairs map
:func:`bilinear_pairs`, :func:`bilinear_pairs_backward`. Layers: :class:`Linear`,
:class:`Bilinear`, :class:`BilinearPairs`. Backends: ``"cpp"`` (compiled, Eigen + OpenMP, the
default when present) and ``"python"`` (pure NumPy, the fallback and the test oracle); see
:func:`get_backend`, :func:`set_backend`, :func:`use_backend` and ``LINMAPS_BACKEND``.
``ml_dtypes.bfloat16`` arrays and the float32 precision modes: :func:`fp32_precision`
(docs/bfloat16.md).
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError as _PackageNotFoundError
from importlib.metadata import version as _version

from ._api import (
    KEEP_BYTES_DEFAULT,
    BilinearContext,
    BilinearGrads,
    LinearGrads,
    bilinear,
    bilinear_backward,
    bilinear_with_context,
    linear,
    linear_backward,
)
from ._backend import (
    available_backends,
    get_backend,
    get_num_threads,
    set_backend,
    set_num_threads,
    share_blas_threads,
    use_backend,
)
from ._config import show_config
from ._layers import Bilinear, Linear, LoadError
from ._pairs import BilinearPairs, bilinear_pairs, bilinear_pairs_backward
from ._precision import fp32_precision, get_fp32_precision, set_fp32_precision

try:
    __version__ = _version("linmaps")
except _PackageNotFoundError:  # running from a source checkout that was never installed
    __version__ = "0+unknown"

__all__ = [
    "KEEP_BYTES_DEFAULT",
    "Bilinear",
    "BilinearContext",
    "BilinearGrads",
    "BilinearPairs",
    "Linear",
    "LinearGrads",
    "LoadError",
    "__version__",
    "available_backends",
    "bilinear",
    "bilinear_backward",
    "bilinear_pairs",
    "bilinear_pairs_backward",
    "bilinear_with_context",
    "fp32_precision",
    "get_backend",
    "get_fp32_precision",
    "get_num_threads",
    "linear",
    "linear_backward",
    "set_backend",
    "set_fp32_precision",
    "set_num_threads",
    "share_blas_threads",
    "show_config",
    "use_backend",
]
