"""flashinfer: JIT-compiled attention kernels for LLM serving, API-compatible with FlashInfer."""

__version__ = "0.1.0"

from . import jit
from .decode import SingleDecodeSpec, single_decode_with_kv_cache
from .utils import PosEncodingMode, TensorLayout

__all__ = [
    "PosEncodingMode",
    "SingleDecodeSpec",
    "TensorLayout",
    "__version__",
    "jit",
    "single_decode_with_kv_cache",
]
