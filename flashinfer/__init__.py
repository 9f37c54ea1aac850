"""flashinfer: JIT-compiled attention kernels for LLM serving, API-compatible with FlashInfer."""

from ._version import __version__

from . import jit
from .batch_decode import (
    BatchDecodePagedSpec,
    BatchDecodeWithPagedKVCacheWrapper,
    CUDAGraphBatchDecodeWithPagedKVCacheWrapper,
)
from .cascade import (
    BatchDecodeWithSharedPrefixPagedKVCacheWrapper,
    BatchPrefillWithSharedPrefixPagedKVCacheWrapper,
    CascadeSharedSpec,
    MergeStateSpec,
    MultiLevelCascadeAttentionWrapper,
    merge_state,
    merge_state_in_place,
    merge_states,
)
from .decode import SingleDecodeSpec, single_decode_with_kv_cache
from .prefill import (
    BatchPrefillSpec,
    BatchPrefillWithPagedKVCacheWrapper,
    BatchPrefillWithRaggedKVCacheWrapper,
    SinglePrefillSpec,
    single_prefill_with_kv_cache,
    single_prefill_with_kv_cache_return_lse,
)
from .quantization import packbits, segment_packbits
from .page import PageAppendSpec, append_paged_kv_cache, get_batch_indices_positions, get_seq_lens
from .utils import PosEncodingMode, TensorLayout

__all__ = [
    "BatchDecodePagedSpec",
    "BatchDecodeWithSharedPrefixPagedKVCacheWrapper",
    "BatchPrefillWithSharedPrefixPagedKVCacheWrapper",
    "CascadeSharedSpec",
    "MergeStateSpec",
    "MultiLevelCascadeAttentionWrapper",
    "merge_state",
    "merge_state_in_place",
    "merge_states",
    "BatchPrefillSpec",
    "BatchPrefillWithPagedKVCacheWrapper",
    "BatchPrefillWithRaggedKVCacheWrapper",
    "BatchDecodeWithPagedKVCacheWrapper",
    "CUDAGraphBatchDecodeWithPagedKVCacheWrapper",
    "PageAppendSpec",
    "append_paged_kv_cache",
    "get_batch_indices_positions",
    "get_seq_lens",
    "PosEncodingMode",
    "SingleDecodeSpec",
    "SinglePrefillSpec",
    "TensorLayout",
    "__version__",
    "jit",
    "packbits",
    "segment_packbits",
    "single_decode_with_kv_cache",
    "single_prefill_with_kv_cache",
    "single_prefill_with_kv_cache_return_lse",
]
