"""flashinfer: JIT-compiled attention kernels for LLM serving, API-compatible with FlashInfer.

Every name FlashInfer's top level exports for the operations implemented here is exported here too, from the
same modules (``flashinfer.decode``, ``flashinfer.prefill``, ``flashinfer.page``, ``flashinfer.quantization``,
``flashinfer.utils``). ``__version__`` tells which FlashInfer API level this implements (see _version.py).
"""

from ._version import __version__, __flashinfer_api_version__

from . import jit
from .decode import (
    BatchDecodePagedSpec,
    BatchDecodeWithPagedKVCacheWrapper,
    CUDAGraphBatchDecodeWithPagedKVCacheWrapper,
    SingleDecodeSpec,
    fast_decode_plan,
    single_decode_with_kv_cache,
)
from .page import PageAppendSpec, append_paged_kv_cache, get_batch_indices_positions, get_seq_lens
from .prefill import (
    BatchPrefillSpec,
    BatchPrefillWithPagedKVCacheWrapper,
    BatchPrefillWithRaggedKVCacheWrapper,
    SinglePrefillSpec,
    single_prefill_with_kv_cache,
    single_prefill_with_kv_cache_return_lse,
)
from .quantization import packbits, segment_packbits
from .utils import MaskMode, PosEncodingMode, TensorLayout

__all__ = [
    "BatchDecodePagedSpec",
    "BatchDecodeWithPagedKVCacheWrapper",
    "BatchPrefillSpec",
    "BatchPrefillWithPagedKVCacheWrapper",
    "BatchPrefillWithRaggedKVCacheWrapper",
    "CUDAGraphBatchDecodeWithPagedKVCacheWrapper",
    "MaskMode",
    "PageAppendSpec",
    "PosEncodingMode",
    "SingleDecodeSpec",
    "SinglePrefillSpec",
    "TensorLayout",
    "__flashinfer_api_version__",
    "__version__",
    "append_paged_kv_cache",
    "fast_decode_plan",
    "get_batch_indices_positions",
    "get_seq_lens",
    "jit",
    "packbits",
    "segment_packbits",
    "single_decode_with_kv_cache",
    "single_prefill_with_kv_cache",
    "single_prefill_with_kv_cache_return_lse",
]
