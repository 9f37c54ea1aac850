"""flashinfer: JIT-compiled attention kernels for LLM serving, API-compatible with FlashInfer."""

from ._version import __version__

from . import activation, jit, norm, rope
from .activation import ActivationSpec, gelu_and_mul, gelu_tanh_and_mul, silu_and_mul
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
from .norm import NormSpec, fused_add_rmsnorm, gemma_fused_add_rmsnorm, gemma_rmsnorm, rmsnorm
from .page import PageAppendSpec, append_paged_kv_cache, get_batch_indices_positions, get_seq_lens
from .rope import (
    RopeSpec,
    apply_llama31_rope,
    apply_llama31_rope_inplace,
    apply_llama31_rope_pos_ids,
    apply_llama31_rope_pos_ids_inplace,
    apply_rope,
    apply_rope_inplace,
    apply_rope_pos_ids,
    apply_rope_pos_ids_inplace,
    apply_rope_with_cos_sin_cache,
    apply_rope_with_cos_sin_cache_inplace,
)
from .utils import PosEncodingMode, TensorLayout

__all__ = [
    "ActivationSpec",
    "NormSpec",
    "RopeSpec",
    "activation",
    "apply_llama31_rope",
    "apply_llama31_rope_inplace",
    "apply_llama31_rope_pos_ids",
    "apply_llama31_rope_pos_ids_inplace",
    "apply_rope",
    "apply_rope_inplace",
    "apply_rope_pos_ids",
    "apply_rope_pos_ids_inplace",
    "apply_rope_with_cos_sin_cache",
    "apply_rope_with_cos_sin_cache_inplace",
    "fused_add_rmsnorm",
    "gelu_and_mul",
    "gelu_tanh_and_mul",
    "gemma_fused_add_rmsnorm",
    "gemma_rmsnorm",
    "norm",
    "rmsnorm",
    "rope",
    "silu_and_mul",
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
