"""flashinfer: JIT-compiled attention kernels for LLM serving, API-compatible with FlashInfer."""

from ._version import __version__

from . import jit
from .batch_decode import (
    BatchDecodePagedSpec,
    BatchDecodeWithPagedKVCacheWrapper,
    CUDAGraphBatchDecodeWithPagedKVCacheWrapper,
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
from . import sampling
from .sampling import (
    SamplingSpec,
    chain_speculative_sampling,
    min_p_sampling_from_probs,
    sampling_from_logits,
    sampling_from_probs,
    softmax,
    top_k_mask_logits,
    top_k_renorm_probs,
    top_k_sampling_from_probs,
    top_k_top_p_sampling_from_logits,
    top_k_top_p_sampling_from_probs,
    top_p_renorm_probs,
    top_p_sampling_from_probs,
)
from .utils import PosEncodingMode, TensorLayout

__all__ = [
    "BatchDecodePagedSpec",
    "BatchPrefillSpec",
    "BatchPrefillWithPagedKVCacheWrapper",
    "BatchPrefillWithRaggedKVCacheWrapper",
    "BatchDecodeWithPagedKVCacheWrapper",
    "CUDAGraphBatchDecodeWithPagedKVCacheWrapper",
    "PageAppendSpec",
    "append_paged_kv_cache",
    "chain_speculative_sampling",
    "get_batch_indices_positions",
    "get_seq_lens",
    "PosEncodingMode",
    "SamplingSpec",
    "SingleDecodeSpec",
    "SinglePrefillSpec",
    "TensorLayout",
    "__version__",
    "jit",
    "min_p_sampling_from_probs",
    "packbits",
    "sampling",
    "sampling_from_logits",
    "sampling_from_probs",
    "segment_packbits",
    "single_decode_with_kv_cache",
    "single_prefill_with_kv_cache",
    "single_prefill_with_kv_cache_return_lse",
    "softmax",
    "top_k_mask_logits",
    "top_k_renorm_probs",
    "top_k_sampling_from_probs",
    "top_k_top_p_sampling_from_logits",
    "top_k_top_p_sampling_from_probs",
    "top_p_renorm_probs",
    "top_p_sampling_from_probs",
]
