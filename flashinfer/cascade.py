"""Cascade (shared-prefix) attention and attention-state merging: drop-ins for FlashInfer's ``flashinfer.cascade``.

An attention *state* of a query row over a set of keys is its output ``v`` (the softmax-weighted mean of the values)
and ``s``, the base-2 log-sum-exp of its scaled logits. Two states over disjoint key sets merge exactly into the state
over their union (weights ``exp2(s - max s)``); a state over no keys has ``s = -inf`` and merges to the other side.

* ``merge_state``, ``merge_state_in_place``, ``merge_states``: the merges, one JIT-compiled kernel family
  (``merge_state``, templates/include/flashinfer/attention/cascade.cuh) built on the merge primitive the split-KV decode and
  prefill kernels use (``StateAccumulator`` in attention/state.cuh).
* ``MultiLevelCascadeAttentionWrapper``: requests whose KV caches share prefixes. Level ``l`` has its own page table
  and groups the queries into requests (``qo_indptr_arr[l]``); the top level is typically one request holding every
  query of the batch against the shared prefix, so its KV is read once and its work runs on tensor cores (the
  queries packed as rows, the GQA group's heads too). Each level is a batch prefill over its own pages
  (``BatchPrefillWithPagedKVCacheWrapper``, on Hopper its warp-specialised fa3_ws kernel where it applies: 16-bit
  K/V, pages of a multiple of 8 slots, the KV range split over the GPU); a level of one request holding every query
  that fa3_ws does not take (an fp8 cache, pages it would gather row by row) runs on the wgmma prefill kernel
  (``cascade_shared`` family: paged KV, the KV range split over the GPU), and a last
  level of one query per request (decode) on the paged batch decode kernel, which reads the unique pages at close
  to copy bandwidth (the prefill kernel would spend its tensor cores on a 64-row tile for 1 x group rows). The
  level states are merged level by level. For a short shared prefix the merge costs more than it saves: plan() then falls back to plain
  batch decode over the concatenated page tables and says so in ``plan_stats()``. An fp8 KV cache (e4m3/e5m2, with
  per-tensor k_scale/v_scale at run()) runs on the same kernels, each reading fp8 (the wgmma kernel widens K/V tiles
  to 16 bits in shared memory), k_scale folded into every level's softmax scale and v_scale into its output.
* ``BatchDecodeWithSharedPrefixPagedKVCacheWrapper`` and ``BatchPrefillWithSharedPrefixPagedKVCacheWrapper``:
  FlashInfer's older API with the shared prefix in contiguous ``k_shared``/``v_shared`` tensors.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import math
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch

from . import jit
from ._spec_common import AttentionSpec
from .decode import BatchDecodeWithPagedKVCacheWrapper, _tma_decode_serves
from .jit.abi import Launcher
from .jit.spec import Spec, register_family
from .page import PagedKVCache, _unpack_paged_kv_cache
from .prefill import (
    BatchPrefillWithPagedKVCacheWrapper,
    _ws_auto_page_size,
    _ws_auto_tiles,
    single_prefill_with_kv_cache,
)
from .utils import (
    DTYPE_CUDA,
    DTYPE_SHORT,
    FP8_DTYPE_SHORT,
    KV_DTYPE_SHORT,
    aligned_rows,
    canonical_dtype,
    canonical_layout,
    canonical_pos_encoding,
    check_kv_lengths,
    check_out,
    check_page_ids_in_cache,
    check_same_device,
    current_stream_ptr,
    dtype_short,
    num_sms,
    page_ids_int32,
    plan_dtypes,
    scalar,
    tracing,
)

__all__ = [
    "CascadeSharedSpec",
    "MergeStateSpec",
    "merge_state",
    "merge_state_in_place",
    "merge_states",
    "MultiLevelCascadeAttentionWrapper",
    "BatchDecodeWithSharedPrefixPagedKVCacheWrapper",
    "BatchPrefillWithSharedPrefixPagedKVCacheWrapper",
]

# ============================================================================================== merge kernels

_MAX_MERGE_HEAD_DIM = 2048  # 8 * kMergeRowThreads in cascade.cuh: one row per block at most
_INT32_LIMIT = 2**31


@register_family
@dataclasses.dataclass(frozen=True)
class MergeStateSpec(Spec):
    """Compile-time configuration of the state-merge kernels: the 16-bit type of the states' ``v`` (and of the
    merged output). head_dim, the number of states and all strides are run-time values."""

    dtype_o: str = "bf16"

    family = "merge_state"
    template = "merge_state.cu.jinja"
    launchers = (
        Launcher(
            "flashinfer_merge_state",
            "const void* v_a, const float* s_a, const void* v_b, const float* s_b, void* v_out, float* s_out, "
            "const uint8_t* mask, int seq_len, int num_heads, int head_dim, int64_t va_stride_n, "
            "int64_t va_stride_h, int64_t sa_stride_n, int64_t sa_stride_h, int64_t vb_stride_n, "
            "int64_t vb_stride_h, int64_t sb_stride_n, int64_t sb_stride_h, int64_t vo_stride_n, "
            "int64_t vo_stride_h, int64_t so_stride_n, int64_t so_stride_h, int device, void* stream",
        ),
        Launcher(
            "flashinfer_merge_states",
            "const void* v, const float* s, void* v_out, float* s_out, int seq_len, int num_states, "
            "int num_heads, int head_dim, int64_t v_stride_n, int64_t v_stride_state, int64_t v_stride_h, "
            "int64_t s_stride_n, int64_t s_stride_state, int64_t s_stride_h, int64_t vo_stride_n, "
            "int64_t vo_stride_h, int64_t so_stride_n, int64_t so_stride_h, int device, void* stream",
        ),
    )

    def name(self) -> str:
        return f"{self.family}_o-{self.dtype_o}"

    def render_vars(self) -> Dict[str, Any]:
        return {"name": self.name(), "dtype_o": DTYPE_CUDA[self.dtype_o]}

    @classmethod
    def axes(cls) -> Dict[str, Tuple[Any, ...]]:
        return {"dtype_o": ("bf16", "f16")}

    def unsupported_reason(self) -> Optional[str]:
        if self.dtype_o not in DTYPE_CUDA:
            return f"dtype_o must be one of {sorted(DTYPE_CUDA)}, got {self.dtype_o!r}"
        return None


@functools.cache
def _merge_module(dtype: str) -> jit.JITModule:
    return jit.load(MergeStateSpec(dtype))


def _check_v(v: Any, name: str, ndim: int) -> torch.Tensor:
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(v).__name__}")
    if v.device.type != "cuda":
        raise ValueError(f"{name} is on {v.device}; the kernels run on CUDA devices only")
    if v.dim() != ndim:
        layout = "[seq_len, num_heads, head_dim]" if ndim == 3 else "[seq_len, num_states, num_heads, head_dim]"
        raise ValueError(f"{name} must be {ndim}-D {layout}, got shape {tuple(v.shape)}")
    dtype_short(v, name)
    head_dim = v.shape[-1]
    if head_dim % 8 != 0 or not 0 < head_dim <= _MAX_MERGE_HEAD_DIM:
        raise ValueError(
            f"{name}: head_dim {head_dim} must be a positive multiple of 8 (16-byte rows) up to {_MAX_MERGE_HEAD_DIM}"
        )
    return v


def _check_s(s: Any, name: str, shape: Tuple[int, ...], device: torch.device, convert: bool) -> torch.Tensor:
    if not isinstance(s, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(s).__name__}")
    if tuple(s.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {list(shape)} (the leading dims of its v), got {tuple(s.shape)}")
    if s.device != device:
        raise ValueError(f"all tensors must be on one device: the states' v is on {device} but {name} is on {s.device}")
    if s.dtype != torch.float32:
        if not convert or not s.dtype.is_floating_point:
            raise TypeError(
                f"{name} must be a float32 tensor (base-2 log-sum-exp), got {s.dtype}"
                + ("; an in-place merge updates it, so it cannot be converted" if not convert else "")
            )
        s = s.float()
    return s


def _rows_ready(v: torch.Tensor, leading: int) -> bool:
    """v's rows can be read with 16-byte vectors as they are (unit last stride, aligned row starts)."""
    if v.stride(-1) != 1 and v.shape[-1] > 1:
        return False
    if any(v.size(d) > 1 and v.stride(d) % 8 != 0 for d in range(leading)):
        return False
    return tracing() or v.data_ptr() % 16 == 0


def _vector_rows(v: torch.Tensor, leading: int) -> torch.Tensor:
    return v if _rows_ready(v, leading) else v.contiguous()


def _check_rows(seq_len: int, num_heads: int) -> None:
    if seq_len * num_heads >= _INT32_LIMIT:
        raise ValueError(f"seq_len * num_heads = {seq_len * num_heads} must stay below 2**31")


def _launch_pair(
    v_a: torch.Tensor,
    s_a: torch.Tensor,
    v_b: torch.Tensor,
    s_b: torch.Tensor,
    v_out: torch.Tensor,
    s_out: Optional[torch.Tensor],
    mask: Optional[torch.Tensor],
) -> None:
    """out = merge(a, b) on validated tensors ([seq, heads, dim] v with vector rows; out may alias a)."""
    seq_len, num_heads, head_dim = v_a.shape
    if seq_len == 0 or num_heads == 0:
        return
    device = v_a.device
    mod = _merge_module(dtype_short(v_a, "v"))
    rc = mod.fn("flashinfer_merge_state")(
        v_a.data_ptr(),
        s_a.data_ptr(),
        v_b.data_ptr(),
        s_b.data_ptr(),
        v_out.data_ptr(),
        s_out.data_ptr() if s_out is not None else None,
        mask.data_ptr() if mask is not None else None,
        seq_len,
        num_heads,
        head_dim,
        v_a.stride(0),
        v_a.stride(1),
        s_a.stride(0),
        s_a.stride(1),
        v_b.stride(0),
        v_b.stride(1),
        s_b.stride(0),
        s_b.stride(1),
        v_out.stride(0),
        v_out.stride(1),
        s_out.stride(0) if s_out is not None else 0,
        s_out.stride(1) if s_out is not None else 0,
        device.index,
        current_stream_ptr(device),
    )
    if rc:
        mod.check(rc, f"merge_state ({mod.spec.name()}) on {device}")


def _launch_states(v: torch.Tensor, s: torch.Tensor, v_out: torch.Tensor, s_out: torch.Tensor) -> None:
    seq_len, num_states, num_heads, head_dim = v.shape
    if seq_len == 0 or num_heads == 0:
        return
    device = v.device
    mod = _merge_module(dtype_short(v, "v"))
    rc = mod.fn("flashinfer_merge_states")(
        v.data_ptr(),
        s.data_ptr(),
        v_out.data_ptr(),
        s_out.data_ptr(),
        seq_len,
        num_states,
        num_heads,
        head_dim,
        v.stride(0),
        v.stride(1),
        v.stride(2),
        s.stride(0),
        s.stride(1),
        s.stride(2),
        v_out.stride(0),
        v_out.stride(1),
        s_out.stride(0),
        s_out.stride(1),
        device.index,
        current_stream_ptr(device),
    )
    if rc:
        mod.check(rc, f"merge_states ({mod.spec.name()}) on {device}")


def _check_pair(v_a, s_a, v_b, s_b, names: Tuple[str, str, str, str], convert_a: bool):
    """Validates two states of one shape and dtype; returns (v_b with vector rows, s_a, s_b)."""
    na, nsa, nb, nsb = names
    _check_v(v_a, na, 3)
    _check_v(v_b, nb, 3)
    device = check_same_device([(na, v_a), (nb, v_b)])
    if v_a.shape != v_b.shape:
        raise ValueError(f"{na} and {nb} must have the same shape, got {tuple(v_a.shape)} and {tuple(v_b.shape)}")
    if v_a.dtype != v_b.dtype:
        raise TypeError(f"{na} and {nb} must share a dtype, got {v_a.dtype} and {v_b.dtype}")
    seq_len, num_heads, _ = v_a.shape
    _check_rows(seq_len, num_heads)
    s_a = _check_s(s_a, nsa, (seq_len, num_heads), device, convert_a)
    s_b = _check_s(s_b, nsb, (seq_len, num_heads), device, True)
    return _vector_rows(v_b, 2), s_a, s_b


def _check_mask(mask: Any, seq_len: int, device: torch.device) -> Optional[torch.Tensor]:
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor of bool, got {type(mask).__name__}")
    if mask.dtype not in (torch.bool, torch.uint8):
        raise TypeError(f"mask must be a bool tensor (True: merge this position), got {mask.dtype}")
    if tuple(mask.shape) != (seq_len,):
        raise ValueError(f"mask must have shape [seq_len] = [{seq_len}], got {tuple(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"all tensors must be on one device: v is on {device} but mask is on {mask.device}")
    return mask if mask.is_contiguous() else mask.contiguous()


@torch.library.custom_op("flashinfer::merge_state", mutates_args=())
def _merge_state_op(
    v_a: torch.Tensor, s_a: torch.Tensor, v_b: torch.Tensor, s_b: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    v = torch.empty(v_a.shape, dtype=v_a.dtype, device=v_a.device)
    s = torch.empty(s_a.shape, dtype=torch.float32, device=s_a.device)
    _launch_pair(_vector_rows(v_a, 2), s_a, _vector_rows(v_b, 2), s_b, v, s, None)
    return v, s


@_merge_state_op.register_fake
def _merge_state_fake(v_a, s_a, v_b, s_b):
    return v_a.new_empty(v_a.shape), s_a.new_empty(s_a.shape, dtype=torch.float32)


@torch.library.custom_op("flashinfer::merge_state_in_place", mutates_args=("v", "s"))
def _merge_state_in_place_op(
    v: torch.Tensor, s: torch.Tensor, v_other: torch.Tensor, s_other: torch.Tensor, mask: Optional[torch.Tensor]
) -> None:
    _launch_pair(v, s, _vector_rows(v_other, 2), s_other, v, s, mask)


@_merge_state_in_place_op.register_fake
def _merge_state_in_place_fake(v, s, v_other, s_other, mask):
    return None


@torch.library.custom_op("flashinfer::merge_states", mutates_args=())
def _merge_states_op(v: torch.Tensor, s: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    seq_len, _, num_heads, head_dim = v.shape
    v_out = torch.empty((seq_len, num_heads, head_dim), dtype=v.dtype, device=v.device)
    s_out = torch.empty((seq_len, num_heads), dtype=torch.float32, device=v.device)
    _launch_states(_vector_rows(v, 3), s, v_out, s_out)
    return v_out, s_out


@_merge_states_op.register_fake
def _merge_states_fake(v, s):
    seq_len, _, num_heads, head_dim = v.shape
    return v.new_empty((seq_len, num_heads, head_dim)), s.new_empty((seq_len, num_heads), dtype=torch.float32)


def merge_state(
    v_a: torch.Tensor, s_a: torch.Tensor, v_b: torch.Tensor, s_b: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Merges the attention states of two disjoint key sets A and B into the state over A and B.

    Parameters
    ----------
    v_a : torch.Tensor
        Attention output over A, ``[seq_len, num_heads, head_dim]``, float16 or bfloat16 (head_dim a multiple of
        8). Views with a unit last stride and 16-byte aligned rows are read in place, others copied.
    s_a : torch.Tensor
        Base-2 log-sum-exp over A, ``[seq_len, num_heads]``, float32 (other float dtypes are converted); ``-inf``
        marks an empty state.
    v_b, s_b : torch.Tensor
        The same for B (same shape and dtype as ``v_a``).

    Returns
    -------
    v : torch.Tensor
        ``[seq_len, num_heads, head_dim]`` in ``v_a``'s dtype: ``(w_a v_a + w_b v_b) / (w_a + w_b)`` with
        ``w = exp2(s - max(s_a, s_b))``, computed in float32.
    s : torch.Tensor
        ``[seq_len, num_heads]`` float32: ``log2(exp2(s_a) + exp2(s_b))``.

    Notes
    -----
    A state with ``s = -inf`` contributes nothing: the result is the other state exactly. Where both are
    ``-inf`` the result is ``v = 0``, ``s = -inf`` (an attention over no keys), never NaN; FlashInfer's kernel
    returns NaN there.
    """
    v_b, s_a, s_b = _check_pair(v_a, s_a, v_b, s_b, ("v_a", "s_a", "v_b", "s_b"), True)
    if tracing():
        return _merge_state_op(v_a, s_a, v_b, s_b)
    v = torch.empty(v_a.shape, dtype=v_a.dtype, device=v_a.device)
    s = torch.empty(s_a.shape, dtype=torch.float32, device=v_a.device)
    _launch_pair(_vector_rows(v_a, 2), s_a, v_b, s_b, v, s, None)
    return v, s


def merge_state_in_place(
    v: torch.Tensor, s: torch.Tensor, v_other: torch.Tensor, s_other: torch.Tensor, mask: Optional[torch.Tensor] = None
) -> None:
    """Merges the state ``(v_other, s_other)`` into ``(v, s)``, in place.

    Parameters
    ----------
    v : torch.Tensor
        ``[seq_len, num_heads, head_dim]`` float16/bfloat16, updated in place; its last dimension must be
        contiguous and its rows 16-byte aligned (any view that satisfies this works).
    s : torch.Tensor
        ``[seq_len, num_heads]`` float32 (any strides), updated in place.
    v_other, s_other : torch.Tensor
        The state merged in (same shape and dtype as ``v``; ``s_other`` float32 or converted).
    mask : torch.Tensor, optional
        ``[seq_len]`` bool: positions where it is False keep their ``v`` and ``s`` untouched (for CUDA graphs
        whose batches vary); None merges every position.

    Notes
    -----
    ``-inf`` states merge as in :func:`merge_state`: an empty side leaves the other exactly, both empty give
    ``v = 0``, ``s = -inf``.
    """
    v_other, s, s_other = _check_pair(v, s, v_other, s_other, ("v", "s", "v_other", "s_other"), False)
    if not _rows_ready(v, 2):
        raise ValueError(
            f"v is updated in place, so it must be contiguous in head_dim with 16-byte aligned rows "
            f"(strides multiples of 8 elements); got strides {v.stride()}"
        )
    mask = _check_mask(mask, v.shape[0], v.device)
    if tracing():
        _merge_state_in_place_op(v, s, v_other, s_other, mask)
        return
    _launch_pair(v, s, v_other, s_other, v, s, mask)


def merge_states(v: torch.Tensor, s: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Merges ``num_states`` attention states of each position into one.

    Parameters
    ----------
    v : torch.Tensor
        ``[seq_len, num_states, num_heads, head_dim]`` float16/bfloat16 (head_dim a multiple of 8).
    s : torch.Tensor
        ``[seq_len, num_states, num_heads]`` float32 base-2 log-sum-exp (other float dtypes are converted).

    Returns
    -------
    v : torch.Tensor
        ``[seq_len, num_heads, head_dim]`` in ``v``'s dtype.
    s : torch.Tensor
        ``[seq_len, num_heads]`` float32.

    Notes
    -----
    Empty states (``-inf``) contribute nothing; a position with no non-empty state (or ``num_states == 0``)
    gets ``v = 0``, ``s = -inf``.
    """
    _check_v(v, "v", 4)
    seq_len, num_states, num_heads, head_dim = v.shape
    _check_rows(seq_len, num_heads)
    if num_states >= _INT32_LIMIT:
        raise ValueError(f"num_states {num_states} must stay below 2**31")
    s = _check_s(s, "s", (seq_len, num_states, num_heads), v.device, True)
    if tracing():
        return _merge_states_op(v, s)
    v_out = torch.empty((seq_len, num_heads, head_dim), dtype=v.dtype, device=v.device)
    s_out = torch.empty((seq_len, num_heads), dtype=torch.float32, device=v.device)
    _launch_states(_vector_rows(v, 3), s, v_out, s_out)
    return v_out, s_out


# ============================================================================== shared level on Hopper (wgmma)

_SHARED_MIN_CHUNK = 512  # keys: shorter KV chunks cost more to merge than they gain in parallelism


@register_family
@dataclasses.dataclass(frozen=True)
class CascadeSharedSpec(AttentionSpec):
    """Compile-time configuration of a cascade's shared level on Hopper: one request (every query of the batch)
    against a paged prefix on the wgmma prefill kernel (prefill_sm90.cuh with its PAGED and SPLIT options), its
    KV range split over the GPU. K/V in q's dtype or fp8 (e4m3/e5m2, widened in shared memory as the fa3 single
    prefill does). head_dim 128 only (the kernel's); the axis lists the others so that matrix flags apply, and
    they are dropped as unsupported (those levels run on batch prefill)."""

    family = "cascade_shared"
    template = "cascade_shared.cu.jinja"
    fp8_kv = True
    launchers = (
        Launcher(
            "flashinfer_cascade_shared_prefill",
            "const void* q, const void* k, const void* v, void* o, float* lse, float* workspace, "
            "const int* kv_indices, int qo_len, int kv_len, int num_qo_heads, int num_kv_heads, int page_size, "
            "int num_pages, "
            "int64_t q_stride_n, int64_t q_stride_h, int64_t stride_page, int64_t stride_n, int64_t stride_h, "
            "int num_chunks, int chunk_size, float sm_scale, float v_scale, int device, void* stream",
        ),
        Launcher("flashinfer_cascade_shared_occupancy", "int device, int* out"),
    )

    def render_vars(self) -> Dict[str, Any]:
        return {
            "name": self.name(),
            "head_dim": self.head_dim,
            "dtype_q": DTYPE_CUDA[self.dtype_q],
            "dtype_kv": DTYPE_CUDA[self.dtype_kv],
            "dtype_o": DTYPE_CUDA[self.dtype_o],
        }

    def unsupported_reason(self) -> Optional[str]:
        if self.head_dim != 128:
            return f"head_dim {self.head_dim}: the wgmma prefill kernel takes 128 (the level runs on batch prefill)"
        return super().unsupported_reason()

    def needs_sm90a(self) -> bool:
        return True


@functools.cache
def _is_hopper(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index) == (9, 0)


@functools.cache
def _shared_occupancy(spec: CascadeSharedSpec, device_index: int) -> int:
    mod = jit.load(spec)
    out = ctypes.c_int(0)
    rc = mod.launcher("flashinfer_cascade_shared_occupancy")(device=device_index, out=ctypes.addressof(out))
    if rc:
        mod.check(rc, f"{spec.name()}: occupancy query on cuda:{device_index}")
    return max(1, out.value)


class _SharedLevel:
    """A level of one request that holds every query (a cascade's shared prefix) on CascadeSharedSpec's kernel:
    plan() picks the KV split (one wave of CTAs), run() launches with the same arguments as the batch wrappers'."""

    def __init__(self, workspace: torch.Tensor, kv_layout: str) -> None:
        self._ws = workspace  # partial states of the split (the prefill levels' region: levels run in turn)
        self._kv_layout = kv_layout
        self._plan: Optional[Dict[str, Any]] = None

    def plan(
        self,
        level: _Level,
        num_qo_heads: int,
        num_kv_heads: int,
        head_dim: int,
        page_size: int,
        q_dtype: torch.dtype,
        kv_dtype: torch.dtype,
        sm_scale: Optional[float],
        device: torch.device,
        beside_decode: bool = False,
    ) -> None:
        """beside_decode: the level will run concurrently with the decode level, so its split takes one CTA per SM
        (the rest of each SM's registers and shared memory is left to the memory-bound decode CTAs) instead of
        every resident slot."""
        if num_qo_heads % num_kv_heads:
            raise ValueError(
                f"num_qo_heads ({num_qo_heads}) must be a positive multiple of num_kv_heads ({num_kv_heads})"
            )
        dq = DTYPE_SHORT[q_dtype]
        spec = CascadeSharedSpec(head_dim, dq, KV_DTYPE_SHORT[kv_dtype], dq)
        mod = jit.load(spec)
        consts = mod.constants
        total_q, kv_len = level.qo[-1], level.kv_lens[0]
        ctas = -(-total_q * (num_qo_heads // num_kv_heads) // consts["query_tile"]) * num_kv_heads
        slots = (1 if beside_decode else _shared_occupancy(spec, device.index)) * num_sms(device.index)
        chunks = max(1, min(slots // max(ctas, 1), -(-kv_len // _SHARED_MIN_CHUNK)))
        ws_floats = self._ws.numel() * self._ws.element_size() // 4
        while chunks > 1 and chunks * total_q * num_qo_heads * (head_dim + 1) > ws_floats:
            chunks = -(-chunks // 2)
        tile = consts["kv_tile"]
        per_chunk = -(-kv_len // chunks)
        chunk_size = -(-per_chunk // tile) * tile
        chunks = -(-kv_len // chunk_size)
        pages, max_index = page_ids_int32(
            level.indices[level.kv[0] : level.kv[1]], level.kv[1] - level.kv[0], "paged_kv_indices_arr[0]"
        )
        pages = pages.to(device=device, non_blocking=True)
        self._plan = dict(
            mod=mod,
            fn=mod.launcher("flashinfer_cascade_shared_prefill"),
            spec=spec,
            total_q=total_q,
            kv_len=kv_len,
            pages=pages.contiguous(),
            num_qo_heads=num_qo_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            page_size=page_size,
            kv_dtype=kv_dtype,
            chunks=chunks,
            chunk_size=chunk_size,
            max_index=max_index,
            sm_scale=scalar(sm_scale, "sm_scale", 1.0 / math.sqrt(head_dim)),
        )

    def run(
        self,
        q: torch.Tensor,
        paged_kv_cache: PagedKVCache,
        *,
        out: torch.Tensor,
        lse: Optional[torch.Tensor] = None,
        return_lse: bool = False,
        k_scale: float = 1.0,
        v_scale: float = 1.0,
    ):
        """k_scale multiplies the logits (folded into the softmax scale, so the lse is that of the scaled logits,
        as the batch wrappers'); v_scale the output: in the kernel's epilogue for fp8 K/V, after it for 16-bit."""
        pl = self._plan
        kv = _unpack_paged_kv_cache(paged_kv_cache, self._kv_layout, allow_fp8=True)
        if (kv.page_size, kv.num_kv_heads, kv.head_dim) != (pl["page_size"], pl["num_kv_heads"], pl["head_dim"]):
            raise ValueError(
                f"paged_kv_cache (kv_layout={self._kv_layout!r}) has page_size {kv.page_size}, "
                f"{kv.num_kv_heads} kv heads of dim {kv.head_dim}; the plan has {pl['page_size']}, "
                f"{pl['num_kv_heads']}, {pl['head_dim']}"
            )
        if kv.k.dtype != pl["kv_dtype"] or kv.k.device != q.device:
            raise ValueError(
                f"paged_kv_cache must be {pl['kv_dtype']} (the planned kv_data_type) on {q.device}, got "
                f"{kv.k.dtype} on {kv.k.device}"
            )
        fp8 = kv.k.dtype in FP8_DTYPE_SHORT
        check_page_ids_in_cache(pl["pages"], kv.num_pages, pl["max_index"], "paged_kv_indices_arr[0]")
        q = aligned_rows(q, 2)
        device = q.device
        rc = pl["fn"](
            q=q.data_ptr(),
            k=kv.k.data_ptr(),
            v=kv.v.data_ptr(),
            o=out.data_ptr(),
            lse=lse.data_ptr() if (return_lse and lse is not None) else None,
            workspace=self._ws.data_ptr(),
            kv_indices=pl["pages"].data_ptr(),
            qo_len=pl["total_q"],
            kv_len=pl["kv_len"],
            num_qo_heads=pl["num_qo_heads"],
            num_kv_heads=pl["num_kv_heads"],
            page_size=pl["page_size"],
            num_pages=kv.num_pages,
            q_stride_n=q.stride(0),
            q_stride_h=q.stride(1),
            stride_page=kv.stride_page,
            stride_n=kv.stride_n,
            stride_h=kv.stride_h,
            num_chunks=pl["chunks"],
            chunk_size=pl["chunk_size"],
            sm_scale=pl["sm_scale"] * k_scale,
            v_scale=v_scale if fp8 else 1.0,
            device=device.index,
            stream=current_stream_ptr(device),
        )
        if rc:
            pl["mod"].check(rc, f"cascade shared level ({pl['spec'].name()}) on {device}")
        if v_scale != 1.0 and not fp8:
            out.mul_(v_scale)
        return (out, lse) if return_lse else out


# ====================================================================================== level tables (host side)


class _Level(NamedTuple):
    """One level's page table, checked, with host copies of its small arrays."""

    qo: List[int]  # qo_indptr [requests + 1]
    kv: List[int]  # paged_kv_indptr [requests + 1]
    last: List[int]  # paged_kv_last_page_len [requests]
    indices: torch.Tensor  # paged_kv_indices (int32, CPU or device), [>= kv[-1]]
    kv_lens: List[int]  # tokens per request

    @property
    def qo_lens(self) -> List[int]:
        return [b - a for a, b in zip(self.qo, self.qo[1:])]

    @property
    def total_keys(self) -> int:
        return sum(self.kv_lens)


def _host_list(x: Any, name: str) -> List[int]:
    """A 1-D integer tensor (any device: a CUDA tensor costs a device-to-host copy) or sequence as a list."""
    if isinstance(x, torch.Tensor):
        if x.dim() != 1:
            raise ValueError(f"{name} must be 1-D, got shape {tuple(x.shape)}")
        if x.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{name} must be an int32 (or int64) tensor, got {x.dtype}")
        return x.tolist()
    if isinstance(x, (list, tuple)):
        return [int(v) for v in x]
    raise TypeError(f"{name} must be a 1-D integer tensor, got {type(x).__name__}")


def _check_levels(
    num_levels: int,
    qo_indptr_arr: Sequence,
    paged_kv_indptr_arr: Sequence,
    paged_kv_indices_arr: Sequence,
    paged_kv_last_page_len: Sequence,
    page_size: int,
) -> List[_Level]:
    """plan()'s structural checks of the per-level arrays; returns the levels with host copies."""
    arrays = (
        ("qo_indptr_arr", qo_indptr_arr),
        ("paged_kv_indptr_arr", paged_kv_indptr_arr),
        ("paged_kv_indices_arr", paged_kv_indices_arr),
        ("paged_kv_last_page_len", paged_kv_last_page_len),
    )
    for name, arr in arrays:
        if not isinstance(arr, (list, tuple)) or len(arr) != num_levels:
            got = len(arr) if isinstance(arr, (list, tuple)) else type(arr).__name__
            raise ValueError(f"{name} must be a list of {num_levels} tensors (one per level), got {got}")
    if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size <= 0:
        raise ValueError(f"page_size must be a positive int, got {page_size!r}")
    levels: List[_Level] = []
    total_q = None
    for l in range(num_levels):
        qo = _host_list(qo_indptr_arr[l], f"qo_indptr_arr[{l}]")
        kv = _host_list(paged_kv_indptr_arr[l], f"paged_kv_indptr_arr[{l}]")
        last = _host_list(paged_kv_last_page_len[l], f"paged_kv_last_page_len[{l}]")
        indices = paged_kv_indices_arr[l]
        for name, arr in ((f"qo_indptr_arr[{l}]", qo), (f"paged_kv_indptr_arr[{l}]", kv)):
            if len(arr) < 1 or arr[0] != 0 or any(b < a for a, b in zip(arr, arr[1:])):
                raise ValueError(
                    f"{name} must start at 0 and never decrease, got {arr[:8]}{'...' if len(arr) > 8 else ''}"
                )
        if len(kv) != len(qo):
            raise ValueError(
                f"level {l}: qo_indptr_arr[{l}] describes {len(qo) - 1} requests but paged_kv_indptr_arr[{l}] "
                f"describes {len(kv) - 1}"
            )
        if len(last) != len(kv) - 1:
            raise ValueError(
                f"paged_kv_last_page_len[{l}] has {len(last)} entries, expected {len(kv) - 1} (one per request)"
            )
        if total_q is None:
            total_q = qo[-1]
        elif qo[-1] != total_q:
            raise ValueError(
                f"every level holds all queries: qo_indptr_arr[{l}][-1] = {qo[-1]} but qo_indptr_arr[0][-1] = {total_q}"
            )
        if not isinstance(indices, torch.Tensor) or indices.dim() != 1:
            raise TypeError(f"paged_kv_indices_arr[{l}] must be a 1-D int32 tensor")
        if indices.dtype != torch.int32:
            raise TypeError(f"paged_kv_indices_arr[{l}] must be torch.int32, got {indices.dtype}")
        if indices.numel() < kv[-1]:
            raise ValueError(
                f"paged_kv_indices_arr[{l}] has {indices.numel()} page ids, paged_kv_indptr_arr[{l}][-1] says {kv[-1]}"
            )
        kv_lens = []
        for r, (a, b) in enumerate(zip(kv, kv[1:])):
            if b > a and not 1 <= last[r] <= page_size:
                raise ValueError(f"paged_kv_last_page_len[{l}][{r}] = {last[r]} must be in [1, page_size={page_size}]")
            kv_lens.append((b - a - 1) * page_size + last[r] if b > a else 0)
        check_kv_lengths(kv_lens, f"level {l}: request")
        levels.append(_Level(qo, kv, last, indices, kv_lens))
    return levels


def _decode_table(level: _Level) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """The last level as the batch decode kernel takes it (every request at least one page): a request without
    pages gets one token of page 0 and a False entry in the returned mask (its state is then dropped in the level
    merge). Returns (indptr, indices, last_page_len (CPU int32), indices on level.indices's device) and the mask
    [requests] (CPU bool), None when every request has pages."""
    kv = torch.tensor(level.kv, dtype=torch.int64)
    pages = kv[1:] - kv[:-1]
    has = pages > 0
    last = torch.tensor(level.last, dtype=torch.int32)
    nnz = level.kv[-1]
    if bool(has.all()):
        return kv.to(torch.int32), level.indices[:nnz], last, None
    new_pages = torch.where(has, pages, torch.ones_like(pages))
    indptr = torch.zeros(len(level.kv), dtype=torch.int64)
    indptr[1:] = torch.cumsum(new_pages, 0)
    req = torch.repeat_interleave(torch.arange(len(level.last)), new_pages)
    offset = torch.arange(int(indptr[-1])) - indptr[req]
    # positions into [indices[:nnz], 0]: the dummy slot reads the appended page id 0
    pos = torch.where(has[req], kv[req] + offset, torch.full_like(offset, nnz))
    src = torch.cat([level.indices[:nnz], torch.zeros(1, dtype=torch.int32, device=level.indices.device)])
    indices = src[pos.to(src.device)]
    last = torch.where(has, last, torch.ones_like(last))
    return indptr.to(torch.int32), indices, last, has


def _concatenated_table(
    levels: List[_Level], page_size: int, device: torch.device
) -> Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Decode-shaped batches: each query's pages across all levels, laid end to end, as one plain batch decode
    page table (indptr, indices on `device`, last_page_len), or None when that is not a valid table (a request
    with no pages at all, or a page before the last that is not full)."""
    last_level = levels[-1]
    batch = len(last_level.last)
    q = torch.arange(batch, dtype=torch.int64)
    counts, starts, lasts = [], [], []
    offset = 0
    for l, lv in enumerate(levels):
        kv = torch.tensor(lv.kv, dtype=torch.int64)
        req = torch.searchsorted(torch.tensor(lv.qo, dtype=torch.int64), q, right=True) - 1  # the request holding q
        pages = (kv[1:] - kv[:-1])[req]
        last = torch.tensor(lv.last, dtype=torch.int64)[req]
        if l < len(levels) - 1 and bool(((pages > 0) & (last != page_size)).any()):
            return None  # a partial page in the middle of a concatenation
        counts.append(pages)
        starts.append(kv[:-1][req] + offset)
        lasts.append(torch.where(pages > 0, last, torch.zeros_like(last)))
        offset += lv.kv[-1]
    counts_m = torch.stack(counts, 1)  # [batch, levels]
    total = counts_m.sum(1)
    if bool((total == 0).any()):
        return None
    # last page length of a request: that of its last level with pages
    lasts_m = torch.stack(lasts, 1)
    last_nonempty = (counts_m > 0).to(torch.int64).cumsum(1).argmax(1)
    last_page = lasts_m[q, last_nonempty].to(torch.int32)
    seg_counts = counts_m.reshape(-1)
    seg_starts = torch.stack(starts, 1).reshape(-1)
    seg = torch.repeat_interleave(torch.arange(seg_counts.numel()), seg_counts)
    seg_first = torch.zeros_like(seg_counts)
    seg_first[1:] = torch.cumsum(seg_counts, 0)[:-1]
    pos = seg_starts[seg] + torch.arange(seg.numel()) - seg_first[seg]
    src = torch.cat([lv.indices[: lv.kv[-1]].to(device) for lv in levels])
    indptr = torch.zeros(batch + 1, dtype=torch.int32)
    indptr[1:] = torch.cumsum(total, 0).to(torch.int32)
    return indptr, src[pos.to(device)], last_page


# Cost model of plan()'s fallback, per level above the last (device time, µs). Estimates from the H200 runs in
# benchmarks/RESULTS.md: copy bandwidth 4.27 TB/s, paged batch prefill (fa2) ~300 TFLOP/s on long KV, and about
# 10 µs for the extra kernels of a level (its prefill, the merge of its KV chunks, the level merge).
_HBM_BYTES_PER_US = 4.0e6
_TC_FLOPS_PER_US = 3.0e8
_LEVEL_OVERHEAD_US = 10.0
# A shared level planned beside the decode level gets one CTA per SM instead of two: assumed ~15% slower alone
# (the wgmma kernel's one-CTA-per-SM tiles measured 6-14% slower, prefill_sm90.cuh), so overlapping can pay only
# when the decode level's time exceeds that share of the shared level's. Measured on an H200 (32 q / 8 kv heads,
# d128, pages of 16, 1024 own tokens unless said; µs in turn -> side by side): it pays where the shared level is
# shorter than the decode level (1ca3aa3: 8 requests x 4096-token prefix 47 -> 33), and loses where it is longer,
# memory-bound or not (1ca3aa3: 8 x 32768 84 -> 92, 12 x 32768 92 -> 99, 8 x 32768 + 4096 own 110 -> 115, 4 x
# 32768 80 -> 88, 8 x 131072 222 -> 269; an e4m3 cache: 8 x 32768 83 -> 86, 64 x 32768 157 -> 173). (Before the
# decode and wgmma kernels' later changes, b0ae640 vs 7035a4a, a memory-bound shared level had paid: 8 x 32768
# 137 -> 100.)
_BESIDE_DECODE_SLOWDOWN = 0.15


def _cascade_estimate(
    levels: List[_Level], num_qo_heads: int, num_kv_heads: int, head_dim: int, elem_bytes: int
) -> Tuple[float, float]:
    """(µs plain batch decode spends reading the levels above the last, µs cascade spends on them)."""
    token_bytes = 2 * num_kv_heads * head_dim * elem_bytes
    plain = cascade = 0.0
    for lv in levels[:-1]:
        if lv.total_keys == 0:
            continue
        reads = sum(q * n for q, n in zip(lv.qo_lens, lv.kv_lens))  # each query reads its prefix again
        flops = 4.0 * reads * num_qo_heads * head_dim
        plain += reads * token_bytes / _HBM_BYTES_PER_US
        cascade += max(lv.total_keys * token_bytes / _HBM_BYTES_PER_US, flops / _TC_FLOPS_PER_US) + _LEVEL_OVERHEAD_US
    return plain, cascade


def _beside_costs(
    shared: _Level, last: _Level, num_qo_heads: int, num_kv_heads: int, head_dim: int, elem_bytes: int
) -> Tuple[float, float, float]:
    """(FLOPs of the shared level, µs it takes to read its K/V once, µs the decode level takes to read its own):
    what the rules for running the two side by side weigh."""
    token_bytes = 2 * num_kv_heads * head_dim * elem_bytes
    flops = 4.0 * sum(q * n for q, n in zip(shared.qo_lens, shared.kv_lens)) * num_qo_heads * head_dim
    memory_us = shared.total_keys * token_bytes / _HBM_BYTES_PER_US
    decode_us = last.total_keys * token_bytes / _HBM_BYTES_PER_US
    return flops, memory_us, decode_us


def _overlap_pays(
    shared: _Level, last: _Level, num_qo_heads: int, num_kv_heads: int, head_dim: int, elem_bytes: int
) -> bool:
    """Whether running the shared level on the wgmma kernel beside the decode level (one CTA per SM) beats running
    them in turn: the decode level is not negligible, and longer than the shared level (see
    _BESIDE_DECODE_SLOWDOWN for the measurements behind the rule)."""
    flops, memory_us, decode_us = _beside_costs(shared, last, num_qo_heads, num_kv_heads, head_dim, elem_bytes)
    shared_us = max(memory_us, flops / _TC_FLOPS_PER_US)
    return decode_us > _BESIDE_DECODE_SLOWDOWN * shared_us and decode_us > shared_us


# A shared level on fa3_ws beside the decode level: the persistent grid takes sms - n SMs and the decode level's
# CTAs the n left (no CTA of it fits beside an fa3_ws CTA). Both kernels are bound per SM (the shared level by its
# tensor cores, the decode level by the latency of its K/V ring: 3.75 TB/s on 132 SMs, and the same rate per SM on
# fewer), so running them side by side saves no SM time: it fills what each leaves idle (the last wave, the SMs
# beyond the shared level's pieces, the merges). Measured on an H200 (2666b71, 32/8 heads, d128, pages of 16; µs in
# turn -> side by side with n chosen below): 64 x 32768 + 1024 own 147-158 -> 138-148, 128 x 32768 290 -> 254,
# 256 x 32768 506-614 -> 463-480, 64 x 131072 400 -> 340-355; a memory-bound shared level lost (8 x 32768: 84 ->
# 91), as did n too small or too large for the split of the work (64 x 131072 with n = 64: 464).
_WS_FLOPS_PER_US = 4.9e8  # fa3_ws on a shared level: 64 x 32768 (34.4 GFLOP) in 69.8 µs on 128 CTAs


# The TMA decode kernel (decode level beside fa3_ws, batch_decode_tma.cuh, opt-in: _decode_level_tma) on n SMs draws
# up to ~90 GB/s an SM alone (benchmarks/probe_sm_bandwidth.cu) and measured 51 GB/s an SM beside fa3_ws (64 x 32768 + 1024, n =
# 48: 268 MB in 110 µs); fa3_ws beside it ran 1.23x slower than its SMs alone predict (125.3 µs on 84 CTAs against
# 66.9 on 128); both levels together at most _HBM_BYTES_PER_US.
_TMA_DECODE_BYTES_PER_SM_US = 5.1e4
_WS_BESIDE_TMA_SLOWDOWN = 1.23
_WS_CTAS_MEASURED = 128  # the CTAs of the _WS_FLOPS_PER_US measurement


def _ws_decode_share(
    shared: _Level,
    last: _Level,
    num_qo_heads: int,
    num_kv_heads: int,
    head_dim: int,
    elem_bytes: int,
    sms: int,
    tma: bool = False,
) -> int:
    """SMs to leave to the decode level beside a shared level on fa3_ws, or 0 to run them in turn, when the shared
    level is bound by its tensor cores and the decode level is not negligible beside it. On the cp.async decode
    kernel (its CTAs fill whatever SMs are free, also after fa3_ws ends): the levels' shares of the SM time, at most
    half the SMs. On the TMA decode kernel (``tma``: a grid of exactly n SMs): the n for which the later of the two
    levels ends first, each at its per-SM rate and both within the HBM bandwidth."""
    flops, memory_us, decode_us = _beside_costs(shared, last, num_qo_heads, num_kv_heads, head_dim, elem_bytes)
    shared_us = flops / _WS_FLOPS_PER_US
    if memory_us >= shared_us or decode_us <= _BESIDE_DECODE_SLOWDOWN * shared_us:
        return 0
    if not tma:
        return max(8, min(sms // 2, round(sms * decode_us / (shared_us + decode_us))))
    decode_bytes = decode_us * _HBM_BYTES_PER_US
    floor_us = memory_us + decode_us  # both levels' bytes at the HBM bandwidth

    def finish_us(n: int) -> float:
        ws_us = shared_us * _WS_CTAS_MEASURED / (sms - n) * _WS_BESIDE_TMA_SLOWDOWN
        return max(ws_us, decode_bytes / (n * _TMA_DECODE_BYTES_PER_SM_US), floor_us)

    return min(range(8, sms - 7), key=finish_us)


# =========================================================================================== multi-level cascade


def _int32_host(values: Sequence[int]) -> torch.Tensor:
    return torch.tensor(list(values), dtype=torch.int32)


def _is_capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


@dataclasses.dataclass
class _Step:
    """One level of a planned cascade run: its wrapper and, for a decode level with padded requests, the mask of
    the positions whose state is merged."""

    level: int
    wrapper: Union[BatchPrefillWithPagedKVCacheWrapper, BatchDecodeWithPagedKVCacheWrapper, _SharedLevel]
    mask: Optional[torch.Tensor] = None

    @property
    def kernel(self) -> str:
        if isinstance(self.wrapper, _SharedLevel):
            return "shared_prefix_wgmma"
        return "batch_decode" if isinstance(self.wrapper, BatchDecodeWithPagedKVCacheWrapper) else "batch_prefill"


@dataclasses.dataclass
class _CascadePlan:
    path: str  # "cascade" or "plain_decode"
    steps: List[_Step]
    total_q: int
    num_qo_heads: int
    head_dim: int
    q_dtype: torch.dtype
    stats: Dict[str, Any]
    overlap: bool = False  # steps = [shared level, decode level], run concurrently (see run())
    decode_first: bool = False  # overlap with the decode level on the TMA kernel's bounded grid: launched first


class MultiLevelCascadeAttentionWrapper:
    """Attention for batches whose requests share KV prefixes, the pages of every level in one paged cache.

    Level ``l`` groups the ``total_q`` queries into requests (``qo_indptr_arr[l]``) and gives each request its own
    pages (``paged_kv_indptr_arr[l]``, ``paged_kv_indices_arr[l]``, ``paged_kv_last_page_len[l]``); a query attends
    to the pages of its request at every level. Typically level 0 is one request holding every query against the
    shared prefix (``qo_indptr = [0, total_q]``) and the last level holds each request's own tokens. Each level runs
    as a batch prefill over its pages (the shared level's queries packed as rows on tensor cores, its KV read once),
    a decode-shaped last level (one query per request) on the paged batch decode kernel; the levels' states are
    merged with the merge_state kernel. With two levels, a shared prefix on the Hopper kernel (tensor-core bound)
    and a decode level (bandwidth bound) run concurrently: the second on a side stream joined back before the merge.
    A causal mask applies to the last level only, as in FlashInfer. An fp8 KV cache (``kv_data_type`` e4m3/e5m2 at
    plan(), ``k_scale``/``v_scale`` at run()) runs on the same kernels, which all read fp8.

    Parameters
    ----------
    num_levels : int
        Number of levels (>= 1).
    float_workspace_buffer : torch.Tensor
        CUDA buffer (e.g. 128 MB of uint8) on the device of the inputs: a quarter holds the decode level's
        schedule and partial states, the rest the prefill levels' partial states (levels run one after another
        and share it).
    kv_layout : str
        ``"NHD"`` or ``"HND"``, the layout of the paged cache.
    use_cuda_graph : bool
        Graph mode: ``run()`` may be captured in a CUDA graph and replayed after later ``plan()`` calls. The
        batch size and the kernel of each level are fixed by the first plan; each level's arrays are copied into
        the buffers below, which must then be given (one int32 device tensor per level each, sized for the largest
        plan).
    qo_indptr_buf_arr, paged_kv_indptr_buf_arr, paged_kv_indices_buf_arr, paged_kv_last_page_len_buf_arr : list
        Graph mode's per-level buffers.
    """

    # Not part of FlashInfer's API; for benchmarks and tests. _last_level_decode: run a decode-shaped last level on
    # the batch decode kernel (else on batch prefill, as FlashInfer does). _shared_level_wgmma: run a level of one
    # request holding every query on the Hopper wgmma kernel where it applies (else on batch prefill);
    # _shared_level_wgmma_fp8: that kernel also for an fp8 cache (else batch prefill, fa2); _shared_level_fa3_ws:
    # batch prefill instead wherever it runs the level on fa3_ws (see _shared_route). _fallback:
    # "auto" (cost model), "never", or "always" (whenever the page tables allow plain batch decode).
    # _overlap_levels: run a shared level on the wgmma kernel or on fa3_ws concurrently with the decode level:
    # "auto" (when the cost model says it pays), "always", or "never" (one after the other). _ws_decode_sms: the
    # SMs a shared level on fa3_ws leaves to the decode level beside it (its persistent grid takes the others; 0:
    # as the cost model says, _ws_decode_share()).
    _last_level_decode: bool = True
    _shared_level_wgmma: bool = True
    _shared_level_wgmma_fp8: bool = True
    _shared_level_fa3_ws: bool = True
    _fallback: str = "auto"
    _overlap_levels: str = "auto"
    _ws_decode_sms: int = 0
    # _decode_level_tma: a decode level beside a shared level on fa3_ws runs on the TMA decode kernel with a grid of
    # exactly the SMs left to it (batch_decode_tma.cuh), where that kernel serves the configuration. Off: measured on
    # an H200 (1676a5d, 32/8 heads, d128, pages of 16, + 1024 own tokens a request; µs, three rounds), the best n
    # beats the cp.async kernel beside fa3_ws by 1-6% (64 x 32768: 144 vs 147-148 at n = 48; 128 x 32768: 230 vs 245
    # at n = 32; 256 x 32768: 443-445 vs 449-451 at n = 32; 32 x 32768: 90 vs 90-97), loses at 64 x 16384 (116-118
    # vs 112-113), and a neighbouring n loses up to 10% (64 x 32768: 158-160 at n = 24, 40, 56): no rule found in
    # this session picks n reliably. Why so little: beside the decode stream fa3_ws slows far beyond its share of
    # SMs (64 x 32768: 66.9 µs on 128 CTAs alone, 125.3 on 84 beside the decode level, 102 expected from its SMs),
    # the two kernels contending for HBM and L2 (the shared level re-reads its K/V through L2 per query tile).
    _decode_level_tma: bool = False

    def __init__(
        self,
        num_levels: int,
        float_workspace_buffer: torch.Tensor,
        kv_layout: str = "NHD",
        use_cuda_graph: bool = False,
        qo_indptr_buf_arr: Optional[List[torch.Tensor]] = None,
        paged_kv_indptr_buf_arr: Optional[List[torch.Tensor]] = None,
        paged_kv_indices_buf_arr: Optional[List[torch.Tensor]] = None,
        paged_kv_last_page_len_buf_arr: Optional[List[torch.Tensor]] = None,
    ) -> None:
        if isinstance(num_levels, bool) or not isinstance(num_levels, int) or num_levels < 1:
            raise ValueError(f"num_levels must be a positive int, got {num_levels!r}")
        if not isinstance(float_workspace_buffer, torch.Tensor) or float_workspace_buffer.device.type != "cuda":
            raise ValueError(
                "float_workspace_buffer must be a CUDA tensor (e.g. torch.empty(128 << 20, "
                "dtype=torch.uint8, device='cuda'))"
            )
        if not float_workspace_buffer.is_contiguous():
            raise ValueError("float_workspace_buffer must be contiguous")
        self._num_levels = num_levels
        self._kv_layout = canonical_layout(kv_layout)
        self._use_cuda_graph = bool(use_cuda_graph)
        self._device = float_workspace_buffer.device
        bufs: List[Optional[List[torch.Tensor]]] = [
            qo_indptr_buf_arr,
            paged_kv_indptr_buf_arr,
            paged_kv_indices_buf_arr,
            paged_kv_last_page_len_buf_arr,
        ]
        names = (
            "qo_indptr_buf_arr",
            "paged_kv_indptr_buf_arr",
            "paged_kv_indices_buf_arr",
            "paged_kv_last_page_len_buf_arr",
        )
        if self._use_cuda_graph:
            for name, arr in zip(names, bufs):
                if not isinstance(arr, (list, tuple)) or len(arr) != num_levels:
                    raise ValueError(
                        f"use_cuda_graph=True needs {name}: a list of {num_levels} int32 device tensors (one per level)"
                    )
                for l, t in enumerate(arr):
                    if (
                        not isinstance(t, torch.Tensor)
                        or t.dim() != 1
                        or t.dtype != torch.int32
                        or t.device != self._device
                    ):
                        raise ValueError(f"{name}[{l}] must be a 1-D int32 tensor on {self._device}")
        else:
            for name, arr in zip(names, bufs):
                if arr is not None:
                    raise ValueError(f"{name} is for use_cuda_graph=True; pass None without CUDA graphs")
        self._bufs = bufs
        self._decode_ws, self._prefill_ws = self._split_workspace(float_workspace_buffer)
        self._prefill = [self._make_prefill(l) for l in range(num_levels)]
        self._shared: Dict[int, _SharedLevel] = {}  # levels on the Hopper shared-prefix kernel
        self._decode: Optional[BatchDecodeWithPagedKVCacheWrapper] = None  # the decode-shaped last level
        self._plain: Optional[BatchDecodeWithPagedKVCacheWrapper] = None  # the fallback
        self._graph_mask: Optional[torch.Tensor] = None
        self._graph_path: Optional[Tuple[Any, ...]] = None  # graph mode: what the first plan fixed
        self._graph_batch: Optional[int] = None
        self._plan: Optional[_CascadePlan] = None
        # Overlapped runs: (side stream of the decode level, fork event, join event), made on first use.
        self._side: Optional[Tuple[torch.cuda.Stream, torch.cuda.Event, torch.cuda.Event]] = None

    # --------------------------------------------------------------------------------------------- helpers

    @staticmethod
    def _split_workspace(buf: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(decode region, prefill region): the decode level's schedule lives in its region from plan() to run(),
        so the prefill levels' partial states must never overwrite it."""
        raw = buf.reshape(-1).view(torch.uint8)
        cut = raw.numel() // 4 // 256 * 256
        return raw[:cut], raw[cut:]

    def _make_prefill(self, level: int) -> BatchPrefillWithPagedKVCacheWrapper:
        if not self._use_cuda_graph:
            return BatchPrefillWithPagedKVCacheWrapper(self._prefill_ws, self._kv_layout)
        qo, kv, idx, last = (arr[level] for arr in self._bufs)
        return BatchPrefillWithPagedKVCacheWrapper(
            self._prefill_ws,
            self._kv_layout,
            use_cuda_graph=True,
            qo_indptr_buf=qo,
            paged_kv_indptr_buf=kv,
            paged_kv_indices_buf=idx,
            paged_kv_last_page_len_buf=last,
        )

    def _make_decode(self, batch: int, indices_capacity: int) -> BatchDecodeWithPagedKVCacheWrapper:
        if not self._use_cuda_graph:
            return BatchDecodeWithPagedKVCacheWrapper(self._decode_ws, self._kv_layout)
        dev = self._device
        return BatchDecodeWithPagedKVCacheWrapper(
            self._decode_ws,
            self._kv_layout,
            use_cuda_graph=True,
            paged_kv_indptr_buffer=torch.zeros(batch + 1, dtype=torch.int32, device=dev),
            paged_kv_indices_buffer=torch.zeros(indices_capacity, dtype=torch.int32, device=dev),
            paged_kv_last_page_len_buffer=torch.ones(batch, dtype=torch.int32, device=dev),
        )

    @property
    def is_cuda_graph_enabled(self) -> bool:
        return self._use_cuda_graph

    def reset_workspace_buffer(
        self, float_workspace_buffer: torch.Tensor, int_workspace_buffers: Optional[List[torch.Tensor]] = None
    ) -> None:
        """Moves the wrapper to a new float workspace (plan again before the next run). ``int_workspace_buffers``
        is accepted for FlashInfer compatibility: schedules live in the float workspace here."""
        if self._use_cuda_graph:
            raise RuntimeError(
                "reset_workspace_buffer: a CUDA-graph wrapper's workspace is fixed (captured graphs point at it)"
            )
        if not isinstance(float_workspace_buffer, torch.Tensor) or float_workspace_buffer.device != self._device:
            raise ValueError(f"the new float workspace must be a CUDA tensor on {self._device}")
        if not float_workspace_buffer.is_contiguous():
            raise ValueError("float_workspace_buffer must be contiguous")
        if int_workspace_buffers is not None and len(int_workspace_buffers) != self._num_levels:
            raise ValueError(f"int_workspace_buffers must hold one buffer per level ({self._num_levels})")
        self._decode_ws, self._prefill_ws = self._split_workspace(float_workspace_buffer)
        self._prefill = [self._make_prefill(l) for l in range(self._num_levels)]
        self._shared = {}
        self._decode = self._plain = None
        self._plan = None

    def prewarm_paged_kv_stride_variant(self, variant: str = "independent") -> None:
        """FlashInfer builds a kernel variant for K and V caches with different strides lazily; here every kernel
        takes independent K/V strides and plan() loads every module a run needs, so there is nothing to build."""
        if variant != "independent":
            raise ValueError(f"variant must be 'independent' (the only paged-KV stride variant), got {variant!r}")

    # --------------------------------------------------------------------------------------------- plan

    def plan(
        self,
        qo_indptr_arr: List[torch.Tensor],
        paged_kv_indptr_arr: List[torch.Tensor],
        paged_kv_indices_arr: List[torch.Tensor],
        paged_kv_last_page_len: List[torch.Tensor],
        num_qo_heads: int,
        num_kv_heads: int,
        head_dim: int,
        page_size: int,
        causal: bool = False,
        pos_encoding_mode: str = "NONE",
        use_fp16_qk_reduction: bool = False,
        sm_scale: Optional[float] = None,
        window_left: int = -1,
        logits_soft_cap: Optional[float] = None,
        rope_scale: Optional[float] = None,
        rope_theta: Optional[float] = None,
        q_data_type: Union[str, torch.dtype] = "float16",
        kv_data_type: Optional[Union[str, torch.dtype]] = None,
    ) -> None:
        """Schedules every level of a batch (once per batch shape; ``run()`` then only launches).

        Parameters
        ----------
        qo_indptr_arr : list of torch.Tensor
            Per level, ``[requests_l + 1]`` int32: request ``j`` of level ``l`` holds queries
            ``qo_indptr_arr[l][j]:qo_indptr_arr[l][j + 1]``; every level ends at the same ``total_q``.
        paged_kv_indptr_arr, paged_kv_indices_arr, paged_kv_last_page_len : list of torch.Tensor
            Per level, the page table of its requests: ``[requests_l + 1]``, ``[pages_l]`` and ``[requests_l]``
            int32 (last page lengths in ``1..page_size`` for requests with pages). A request may have no pages (an
            empty level for it). The small arrays are read on the host (CPU tensors avoid a device copy).
        num_qo_heads, num_kv_heads, head_dim, page_size : int
            Heads (``num_qo_heads`` a multiple of ``num_kv_heads``), head dimension (64, 128 or 256) and tokens
            per page.
        causal : bool
            Causal mask (aligned bottom-right) at the last level; the levels above are attended in full.
        pos_encoding_mode, use_fp16_qk_reduction, sm_scale, window_left, logits_soft_cap, rope_scale, rope_theta
            As for ``BatchPrefillWithPagedKVCacheWrapper.plan``, applied to every level on its own KV (positions
            and windows count from each level's first key, as in FlashInfer).
        q_data_type, kv_data_type : str or torch.dtype
            q (and the output): float16 (default) or bfloat16. kv (default q's): q's dtype, or an fp8 cache,
            torch.float8_e4m3fn or torch.float8_e5m2, dequantised by run()'s ``k_scale``/``v_scale`` (every level's
            kernel reads fp8: the Hopper shared-prefix kernel, batch prefill (fa2), batch decode). An fp8 q raises
            NotImplementedError naming the combination.

        Notes
        -----
        A decode-shaped batch (one query per request of the last level) whose levels above the last would cost
        more to attend separately than they save (a short shared prefix; see ``plan_stats()``) is planned as plain
        batch decode over the concatenated page tables instead, when those make a valid page table (no partial
        page before the last level) and positions do not matter (no position encoding or window). Not in graph
        mode, whose kernels are fixed by the first plan.
        """
        if _is_capturing():
            raise RuntimeError(
                "plan() cannot be captured in a CUDA graph: call it before capture/replay, then capture run()"
            )
        levels = _check_levels(
            self._num_levels,
            qo_indptr_arr,
            paged_kv_indptr_arr,
            paged_kv_indices_arr,
            paged_kv_last_page_len,
            page_size,
        )
        if not isinstance(causal, bool):
            raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
        for n, v in (("num_qo_heads", num_qo_heads), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{n} must be a positive int, got {v!r}")
        pos = canonical_pos_encoding(pos_encoding_mode)
        q_dtype, kv_dtype = plan_dtypes(q_data_type, kv_data_type, "MultiLevelCascadeAttentionWrapper.plan")
        for l, lv in enumerate(levels):
            if lv.indices.device.type == "cuda" and lv.indices.device != self._device:
                raise ValueError(
                    f"paged_kv_indices_arr[{l}] is on {lv.indices.device}, the workspace on {self._device}"
                )
        total_q = levels[0].qo[-1]
        last = levels[-1]
        decode_shape = len(last.qo_lens) > 0 and all(n == 1 for n in last.qo_lens)
        all_have_pages = all(b > a for a, b in zip(last.kv, last.kv[1:]))
        decode_last = (
            decode_shape
            and self._last_level_decode
            and not use_fp16_qk_reduction
            and (self._num_levels > 1 or (all_have_pages and not self._use_cuda_graph))
        )
        options = dict(
            pos_encoding_mode=pos,
            sm_scale=sm_scale,
            window_left=window_left,
            logits_soft_cap=logits_soft_cap,
            rope_scale=rope_scale,
            rope_theta=rope_theta,
            q_data_type=q_dtype,
            kv_data_type=kv_dtype,
        )
        elem = torch.finfo(kv_dtype).bits // 8
        plain_us, cascade_us = _cascade_estimate(levels, num_qo_heads, num_kv_heads, head_dim, elem)
        stats: Dict[str, Any] = {
            "num_levels": self._num_levels,
            "total_q": total_q,
            "decode_shape": decode_shape,
            "levels": [{"requests": len(lv.last), "pages": lv.kv[-1], "total_keys": lv.total_keys} for lv in levels],
            "estimated_plain_us": round(plain_us, 2),
            "estimated_cascade_us": round(cascade_us, 2),
            "kv_data_type": str(kv_dtype).replace("torch.", ""),
        }
        if kv_dtype in FP8_DTYPE_SHORT:
            stats["fp8_kv"] = (
                "every level's kernel reads the fp8 cache (shared_prefix_wgmma widens its K/V tiles in shared memory); "
                "run()'s k_scale scales each level's logits, v_scale each level's output"
            )

        if self._use_cuda_graph:
            frozen = (decode_last, num_qo_heads, num_kv_heads, head_dim, page_size, q_dtype, kv_dtype)
            if self._graph_path is not None and frozen != self._graph_path:
                raise ValueError(
                    f"a CUDA-graph wrapper keeps the kernels and shapes of its first plan (decode-shaped last level, "
                    f"heads, head_dim, page_size, q and kv dtypes): was {self._graph_path}, got {frozen}"
                )
            if decode_last and self._graph_batch is not None and len(last.last) != self._graph_batch:
                raise ValueError(
                    f"this CUDA-graph wrapper was planned for batch size {self._graph_batch}; the batch "
                    f"size is fixed in graph mode, got {len(last.last)}"
                )
            why_cascade = "graph mode keeps the kernels of its first plan (no fallback)"
        else:
            fallback, why_cascade = self._fallback_decision(decode_shape, pos, window_left, plain_us, cascade_us)
            if fallback is not None:
                table = _concatenated_table(levels, page_size, self._device)
                if table is not None:
                    self._plan_plain(
                        table,
                        stats,
                        fallback,
                        num_qo_heads,
                        num_kv_heads,
                        head_dim,
                        page_size,
                        options,
                        total_q,
                        q_dtype,
                    )
                    return
                why_cascade = (
                    f"plain decode would be cheaper ({fallback}), but the levels' page tables do not "
                    f"concatenate (a partial page above the last level, or a query without pages)"
                )

        steps: List[_Step] = []
        n_prefill = self._num_levels - 1 if decode_last else self._num_levels
        # Two levels, a shared prefix on tensor cores and the requests' own tokens on batch decode, may run side by
        # side: the first is bound by tensor-core throughput, the second by HBM latency (see _overlap_pays and
        # _ws_decode_share for when it pays on each kernel of the shared level).
        if self._overlap_levels not in ("auto", "always", "never"):
            raise ValueError(f"_overlap_levels must be 'auto', 'always' or 'never', got {self._overlap_levels!r}")
        level_scope = (head_dim, pos, window_left, logits_soft_cap, use_fp16_qk_reduction, q_dtype, kv_dtype, page_size)
        heads = (num_qo_heads // num_kv_heads, num_kv_heads)
        route0 = self._shared_route(0, levels[0], *level_scope, *heads)
        may_overlap = (
            self._overlap_levels != "never"
            and not self._use_cuda_graph
            and decode_last
            and n_prefill == 1
            and last.total_keys > 0
            and route0 is not None
        )
        sms = decode_sms = 0  # fa3_ws beside the decode level: the SMs its persistent grid leaves to the decode level
        if may_overlap and route0 == "fa3_ws":
            sms = num_sms(self._device.index)
            tma = self._decode_level_tma and _tma_decode_serves(
                head_dim, q_dtype, kv_dtype, num_qo_heads, num_kv_heads, page_size, pos
            )
            decode_sms = self._ws_decode_sms or _ws_decode_share(
                levels[0], last, num_qo_heads, num_kv_heads, head_dim, elem, sms, tma
            )
            if self._overlap_levels == "always" and decode_sms == 0:
                decode_sms = max(8, sms // 4)
            overlap = decode_sms > 0
        else:
            overlap = may_overlap and (
                self._overlap_levels == "always"
                or _overlap_pays(levels[0], last, num_qo_heads, num_kv_heads, head_dim, elem)
            )
        for l in range(n_prefill):
            lv = levels[l]
            if not self._use_cuda_graph and l > 0 and lv.total_keys == 0:
                continue  # an empty level adds nothing to the merge
            route = route0 if l == 0 else self._shared_route(l, lv, *level_scope, *heads)
            if route == "wgmma":
                runner = self._shared.setdefault(l, _SharedLevel(self._prefill_ws, self._kv_layout))
                runner.plan(
                    lv,
                    num_qo_heads,
                    num_kv_heads,
                    head_dim,
                    page_size,
                    q_dtype,
                    kv_dtype,
                    sm_scale,
                    self._device,
                    beside_decode=overlap,
                )
                steps.append(_Step(l, runner))
                continue
            # A single query per request sits at the bottom-right corner: the causal mask hides nothing from it.
            level_causal = causal and l == self._num_levels - 1 and any(n > 1 for n in lv.qo_lens)
            self._prefill[l]._max_ctas = sms - decode_sms if overlap and l == 0 and route == "fa3_ws" else 0
            self._prefill[l].plan(
                _int32_host(lv.qo),
                _int32_host(lv.kv),
                lv.indices,
                _int32_host(lv.last),
                num_qo_heads,
                num_kv_heads,
                head_dim,
                page_size,
                causal=level_causal,
                use_fp16_qk_reduction=use_fp16_qk_reduction,
                **options,
            )
            steps.append(_Step(l, self._prefill[l]))
        if decode_last and (self._use_cuda_graph or last.total_keys > 0 or not steps):
            beside = decode_sms if overlap and route0 == "fa3_ws" and self._decode_level_tma else 0
            steps.append(
                self._plan_decode_level(last, num_qo_heads, num_kv_heads, head_dim, page_size, options, beside)
            )
        if self._use_cuda_graph:
            self._graph_path = frozen
        overlap = (
            overlap
            and len(steps) == 2
            and (isinstance(steps[0].wrapper, _SharedLevel) or decode_sms > 0)
            and steps[1].wrapper is self._decode
        )
        stats.update(
            path="cascade",
            reason=why_cascade,
            kernels=[(s.kernel, s.level) for s in steps],
            overlap_levels=overlap,
            decode_sms=decode_sms if overlap else 0,
        )
        decode_first = overlap and decode_sms > 0 and self._decode.plan_stats["tma_kernel"] == 1
        stats.update(decode_tma=decode_first)
        self._plan = _CascadePlan(
            "cascade", steps, total_q, num_qo_heads, head_dim, q_dtype, stats, overlap, decode_first
        )

    begin_forward = plan

    def _shared_route(
        self,
        l: int,
        lv: _Level,
        head_dim: int,
        pos: str,
        window_left: Any,
        logits_soft_cap: Any,
        use_fp16_qk_reduction: bool,
        q_dtype: torch.dtype,
        kv_dtype: torch.dtype,
        page_size: int,
        group: int,
        num_kv_heads: int,
    ) -> Optional[str]:
        """Where a shared level l runs on Hopper: "wgmma" (the Hopper shared-prefix kernel), "fa3_ws" (batch prefill
        on its warp-specialised kernel) or None (batch prefill as any level). A shared level is one request holding
        every query, above the last level (never causal), in eager mode (the wgmma kernel's split is a launch
        argument), within the wgmma kernel's scope (K/V in q's dtype, or fp8 unless _shared_level_wgmma_fp8 is off).
        It goes to fa3_ws where batch prefill's "auto" would take it (16-bit K/V, pages it copies as TMA boxes,
        query tiles as _ws_auto_tiles wants them), which measured faster: H200, 64 requests x 32768-token prefix +
        1024 own, pages of 16, 32/8 heads, the whole cascade 186.2 µs with the level on the wgmma kernel, 148.0
        with it on batch prefill (1fd18d1)."""
        on_wgmma = (
            self._shared_level_wgmma
            and not self._use_cuda_graph
            and l < self._num_levels - 1
            and len(lv.kv_lens) == 1
            and lv.total_keys > 0
            and head_dim == 128
            and pos == "NONE"
            and window_left == -1
            and not logits_soft_cap
            and not use_fp16_qk_reduction
            and (q_dtype == kv_dtype or (kv_dtype in FP8_DTYPE_SHORT and self._shared_level_wgmma_fp8))
            and _is_hopper(self._device.index)
        )
        on_fa3_ws = (
            on_wgmma
            and self._shared_level_fa3_ws
            and q_dtype == kv_dtype
            and _ws_auto_page_size(page_size)
            and _ws_auto_tiles(lv.qo_lens, group, num_kv_heads, num_sms(self._device.index))
        )
        return "fa3_ws" if on_fa3_ws else ("wgmma" if on_wgmma else None)

    def _fallback_decision(
        self, decode_shape: bool, pos: str, window_left: int, plain_us: float, cascade_us: float
    ) -> Tuple[Optional[str], str]:
        """(why plain batch decode should run this plan, or None; why the cascade runs otherwise)."""
        if self._num_levels == 1:
            return None, "one level"
        if not decode_shape:
            return None, "prefill-shaped batch (the plain-decode fallback is for one query per request)"
        if pos != "NONE" or window_left >= 0:
            return None, (
                "position encoding or window: positions restart at every level of a cascade, so a "
                "concatenation would differ"
            )
        if self._fallback == "never":
            return None, "fallback disabled (_fallback='never')"
        if self._fallback == "always":
            return "forced (_fallback='always')", ""
        if cascade_us >= plain_us:
            return (
                f"short shared prefix: reading it again per query (~{plain_us:.1f} us) costs less than "
                f"attending it once and merging (~{cascade_us:.1f} us)"
            ), ""
        return None, (
            f"the levels above the last save more (~{plain_us:.1f} us of plain decode reads) than they "
            f"cost (~{cascade_us:.1f} us)"
        )

    def _plan_plain(
        self, table, stats, reason, num_qo_heads, num_kv_heads, head_dim, page_size, options, total_q, q_dtype
    ) -> None:
        indptr, indices, last = table
        if self._plain is None:
            self._plain = BatchDecodeWithPagedKVCacheWrapper(self._decode_ws, self._kv_layout)
        self._plain.plan(indptr, indices, last, num_qo_heads, num_kv_heads, head_dim, page_size, **options)
        stats.update(path="plain_decode", reason=reason, kernels=[("batch_decode", "all levels concatenated")])
        self._plan = _CascadePlan(
            "plain_decode", [_Step(-1, self._plain)], total_q, num_qo_heads, head_dim, q_dtype, stats
        )

    def _plan_decode_level(
        self, level: _Level, num_qo_heads, num_kv_heads, head_dim, page_size, options, beside_sms: int = 0
    ) -> _Step:
        """beside_sms > 0: the level runs concurrently with a shared level on fa3_ws that leaves it that many SMs:
        on the TMA decode kernel with a grid of that many CTAs (one an SM) where it serves the configuration."""
        indptr, indices, last, has = _decode_table(level)
        batch = len(level.last)
        if self._decode is None:
            capacity = self._bufs[2][-1].numel() + batch if self._use_cuda_graph else 0
            self._decode = self._make_decode(batch, capacity)
            if self._use_cuda_graph:
                self._graph_batch = batch
        self._decode._tma_decode = beside_sms > 0
        self._decode._max_ctas = beside_sms
        if self._use_cuda_graph:
            # The caller's buffers hold the level's arrays, as FlashInfer's graph mode leaves them.
            for buf, src in zip(
                (self._bufs[0][-1], self._bufs[1][-1], self._bufs[3][-1]), (level.qo, level.kv, level.last)
            ):
                if buf.numel() < len(src):
                    raise ValueError(f"a last-level buffer holds {buf.numel()} entries, the plan needs {len(src)}")
                buf[: len(src)].copy_(_int32_host(src), non_blocking=True)
            nnz = level.kv[-1]
            if self._bufs[2][-1].numel() < nnz:
                raise ValueError(
                    f"paged_kv_indices_buf_arr[-1] holds {self._bufs[2][-1].numel()} page ids, the plan needs {nnz}"
                )
            if nnz and level.indices.data_ptr() != self._bufs[2][-1].data_ptr():
                self._bufs[2][-1][:nnz].copy_(level.indices[:nnz], non_blocking=True)
        self._decode.plan(indptr, indices, last, num_qo_heads, num_kv_heads, head_dim, page_size, **options)
        mask = None
        if self._use_cuda_graph:
            if self._graph_mask is None:
                self._graph_mask = torch.ones(batch, dtype=torch.bool, device=self._device)
            host = has if has is not None else torch.ones(batch, dtype=torch.bool)
            self._graph_mask.copy_(host.pin_memory() if torch.cuda.is_available() else host, non_blocking=True)
            mask = self._graph_mask
        elif has is not None:
            mask = has.to(self._device, non_blocking=True)
        return _Step(len(self._prefill) - 1, self._decode, mask)

    def plan_stats(self) -> Dict[str, Any]:
        """The last plan: ``path`` ("cascade" or "plain_decode") and ``reason``, the kernel of each level run
        (``kernels``), per-level sizes, and the cost model's estimates (µs of device time) of the levels above the
        last: ``estimated_plain_us`` (read per query by plain decode) and ``estimated_cascade_us`` (attended once,
        plus the merge); ``overlap_levels``: whether the shared and the decode level run concurrently, and
        ``decode_sms``: the SMs a shared level on fa3_ws leaves to the decode level then (0 otherwise);
        ``kv_data_type``, and for an fp8 cache ``fp8_kv``: how the scales apply.

        Returns
        -------
        dict
            The statistics above (a copy).
        """
        if self._plan is None:
            raise RuntimeError("plan() has not been called")
        return dict(self._plan.stats)

    # --------------------------------------------------------------------------------------------- run

    def run(
        self,
        q: torch.Tensor,
        paged_kv_cache: PagedKVCache,
        *,
        k_scale: Optional[float] = None,
        v_scale: Optional[float] = None,
        out: Optional[torch.Tensor] = None,
        lse: Optional[torch.Tensor] = None,
        return_lse: bool = False,
    ):
        """Cascade attention over the planned levels.

        Parameters
        ----------
        q : torch.Tensor
            ``[total_q, num_qo_heads, head_dim]`` in the planned q_data_type.
        paged_kv_cache : torch.Tensor or (torch.Tensor, torch.Tensor)
            One tensor ``[num_pages, 2, page_size, num_kv_heads, head_dim]`` (NHD; HND swaps page_size and heads) or
            a tuple ``(k_cache, v_cache)`` of ``[num_pages, page_size, num_kv_heads, head_dim]``, in the planned
            kv_data_type (16-bit or fp8).
        k_scale, v_scale : float or torch.Tensor, optional
            Per-tensor dequantisation scales of an fp8 cache (they apply to a 16-bit one too), as the batch
            wrappers take them: k_scale multiplies every level's logits (folded into its softmax scale, so the
            levels' lse stay comparable), v_scale every level's output before the merge (merging is linear in v,
            so the merged output is scaled once). A Python number or a one-element CPU tensor. An extension over
            FlashInfer's signature, whose run() takes no scales (scale 1).
        out, lse : torch.Tensor, optional
            Preallocated outputs ``[total_q, num_qo_heads, head_dim]`` (q's dtype) and ``[total_q, num_qo_heads]``
            float32 (an extension over FlashInfer's signature).
        return_lse : bool
            Also return the base-2 log-sum-exp over all levels (of the scaled logits).

        Returns
        -------
        torch.Tensor or (torch.Tensor, torch.Tensor)
            o ``[total_q, num_qo_heads, head_dim]`` in q's dtype, or ``(o, lse)`` with ``return_lse=True``.
        """
        pl = self._plan
        if pl is None:
            raise RuntimeError("run() before plan(): call wrapper.plan(...) for this batch first")
        if not self._use_cuda_graph and _is_capturing():
            raise RuntimeError(
                "run() is being captured in a CUDA graph but this wrapper was built with "
                "use_cuda_graph=False: its schedules move with every plan(), so replays would compute "
                "garbage. Build it with use_cuda_graph=True and fixed buffers"
            )
        if not isinstance(q, torch.Tensor):
            raise TypeError(f"q must be a torch.Tensor, got {type(q).__name__}")
        if q.device != self._device:
            raise ValueError(
                f"all tensors must be on one device: the workspace is on {self._device} but q is on {q.device}"
            )
        scales = dict(k_scale=scalar(k_scale, "k_scale", 1.0), v_scale=scalar(v_scale, "v_scale", 1.0))
        if pl.path == "plain_decode":
            return pl.steps[0].wrapper.run(q, paged_kv_cache, out=out, lse=lse, return_lse=return_lse, **scales)
        shape = (pl.total_q, pl.num_qo_heads, pl.head_dim)
        if tuple(q.shape) != shape:
            raise ValueError(
                f"q must be [total_q, num_qo_heads, head_dim] = {list(shape)} as planned, got {tuple(q.shape)}"
            )
        if q.dtype != pl.q_dtype:
            raise TypeError(f"q dtype {q.dtype} does not match the planned q_data_type {pl.q_dtype}")
        check_out(out, "out", shape, q.dtype, self._device)
        check_out(lse, "lse", shape[:2], torch.float32, self._device)
        o = out if out is not None else torch.empty(shape, dtype=q.dtype, device=self._device)
        merging = len(pl.steps) > 1
        lse_buf = (
            lse
            if (return_lse and lse is not None)
            else (torch.empty(shape[:2], dtype=torch.float32, device=self._device) if (return_lse or merging) else None)
        )
        first = pl.steps[0]
        if pl.overlap and not tracing():
            self._run_overlapped(pl, q, paged_kv_cache, o, lse_buf, return_lse, scales)
            return (o, lse_buf) if return_lse else o
        first.wrapper.run(q, paged_kv_cache, out=o, lse=lse_buf, return_lse=lse_buf is not None, **scales)
        if merging:
            tmp_o = torch.empty_like(o)
            tmp_lse = torch.empty(shape[:2], dtype=torch.float32, device=self._device)
            for i, step in enumerate(pl.steps[1:], start=2):
                step.wrapper.run(q, paged_kv_cache, out=tmp_o, lse=tmp_lse, return_lse=True, **scales)
                keep_lse = return_lse or i < len(pl.steps)
                _launch_pair(o, lse_buf, tmp_o, tmp_lse, o, lse_buf if keep_lse else None, step.mask)
        return (o, lse_buf) if return_lse else o

    forward = run

    def _run_overlapped(
        self,
        pl: _CascadePlan,
        q: torch.Tensor,
        paged_kv_cache: PagedKVCache,
        o: torch.Tensor,
        lse: torch.Tensor,
        return_lse: bool,
        scales: Dict[str, float],
    ) -> None:
        """The shared level on the caller's stream, concurrently with the decode level on a side stream; then the
        merge on the caller's stream.

        The shared level is launched first and in the caller's stream order, so its CTAs (one per SM, as planned)
        are placed as soon as the preceding work ends; the decode level's wait on the fork event resolves a moment
        later, and its CTAs fill what each SM has left (were they first, they would take every SM and the levels
        would run one after the other). A decode level on the TMA kernel (pl.decode_first) has a grid of exactly
        the SMs left to it, one CTA each, and fa3_ws's persistent grid takes the rest: both fit in either order, so
        the decode level, whose launch costs the host less, goes first (measured in eager runs: the shared level's
        run() delays the second launch by ~35 us). The levels use separate workspace regions; the side stream's
        work is joined back into the caller's stream before the merge (and on an error), so the caller's
        allocations that it touches stay ordered."""
        shared, decode = pl.steps
        if self._side is None:
            self._side = (torch.cuda.Stream(device=self._device), torch.cuda.Event(), torch.cuda.Event())
        side, fork, join = self._side
        cur = torch.cuda.current_stream(self._device)
        fork.record(cur)
        side.wait_event(fork)
        tmp_o = torch.empty_like(o)
        tmp_lse = torch.empty_like(lse)
        try:
            if pl.decode_first:
                with torch.cuda.stream(side):
                    decode.wrapper.run(q, paged_kv_cache, out=tmp_o, lse=tmp_lse, return_lse=True, **scales)
            shared.wrapper.run(q, paged_kv_cache, out=o, lse=lse, return_lse=True, **scales)
            if not pl.decode_first:
                with torch.cuda.stream(side):
                    decode.wrapper.run(q, paged_kv_cache, out=tmp_o, lse=tmp_lse, return_lse=True, **scales)
        finally:
            join.record(side)
            cur.wait_event(join)
        _launch_pair(o, lse, tmp_o, tmp_lse, o, lse if return_lse else None, decode.mask)

    def end_forward(self) -> None:
        """Kept for FlashInfer 0.1/0.2 compatibility; nothing to release."""


# ============================================================================================ legacy shared-prefix


class BatchDecodeWithSharedPrefixPagedKVCacheWrapper:
    """Batch decode where every request shares one prefix held in contiguous ``k_shared``/``v_shared`` tensors and
    has its own tokens in a paged cache (FlashInfer's older API; ``MultiLevelCascadeAttentionWrapper`` is the
    general one). The shared part runs as one request of ``batch_size`` query rows on tensor cores, the unique part
    as paged batch decode; the two states are merged.

    Parameters
    ----------
    float_workspace_buffer : torch.Tensor
        CUDA buffer (e.g. 128 MB of uint8) for the batch decode's schedule and partial states.
    kv_layout : str
        ``"NHD"`` or ``"HND"``, of both the shared tensors and the paged cache.
    """

    def __init__(self, float_workspace_buffer: torch.Tensor, kv_layout: str = "NHD") -> None:
        self._kv_layout = canonical_layout(kv_layout)
        self._batch_decode_wrapper = BatchDecodeWithPagedKVCacheWrapper(float_workspace_buffer, self._kv_layout)

    def reset_workspace_buffer(self, float_workspace_buffer: torch.Tensor, int_workspace_buffer=None) -> None:
        self._batch_decode_wrapper.reset_workspace_buffer(float_workspace_buffer, int_workspace_buffer)

    def begin_forward(
        self,
        unique_kv_indptr: torch.Tensor,
        unique_kv_indices: torch.Tensor,
        unique_kv_last_page_len: torch.Tensor,
        num_qo_heads: int,
        num_kv_heads: int,
        head_dim: int,
        page_size: int,
        data_type: Union[str, torch.dtype] = "float16",
    ) -> None:
        """Plans the unique part.

        Parameters
        ----------
        unique_kv_indptr, unique_kv_indices, unique_kv_last_page_len : torch.Tensor
            ``[batch + 1]``, ``[>= unique_kv_indptr[-1]]``, ``[batch]`` int32: each request's unique pages (every
            request needs at least one).
        num_qo_heads, num_kv_heads, head_dim, page_size : int
            Heads, head dimension, tokens per page.
        data_type : str or torch.dtype
            The dtype of the unique cache: float16 or bfloat16 (q's too), or fp8 (torch.float8_e4m3fn,
            torch.float8_e5m2) with a float16 q, as FlashInfer plans it (its data_type then leaves q at the
            float16 default); forward() takes the scales.
        """
        kv_dtype = canonical_dtype(data_type, "data_type", allow_fp8=True)
        # FlashInfer's data_type fills only a None q_data_type, whose default is float16: taken for an fp8 cache;
        # a 16-bit data_type is q's too (f16 q against a bf16 cache would be a TypeError at run()).
        q_dtype = torch.float16 if kv_dtype in FP8_DTYPE_SHORT else kv_dtype
        self._batch_decode_wrapper.plan(
            unique_kv_indptr,
            unique_kv_indices,
            unique_kv_last_page_len,
            num_qo_heads,
            num_kv_heads,
            head_dim,
            page_size,
            pos_encoding_mode="NONE",
            q_data_type=q_dtype,
            kv_data_type=kv_dtype,
        )

    plan = begin_forward

    def end_forward(self) -> None:
        """Kept for FlashInfer compatibility; nothing to release."""

    def forward(
        self,
        q: torch.Tensor,
        k_shared: torch.Tensor,
        v_shared: torch.Tensor,
        unique_kv_cache: PagedKVCache,
        *,
        k_scale: Optional[float] = None,
        v_scale: Optional[float] = None,
    ) -> torch.Tensor:
        """Decode attention of every request against the shared prefix and its own pages.

        Parameters
        ----------
        q : torch.Tensor
            ``[batch_size, num_qo_heads, head_dim]`` in the planned q dtype.
        k_shared, v_shared : torch.Tensor
            The shared prefix, ``[shared_len, num_kv_heads, head_dim]`` (NHD) or ``[num_kv_heads, shared_len,
            head_dim]`` (HND), in q's dtype or fp8 (as ``single_prefill_with_kv_cache`` takes them).
        unique_kv_cache : torch.Tensor or (torch.Tensor, torch.Tensor)
            Each request's pages, as ``BatchDecodeWithPagedKVCacheWrapper.run`` takes them, in the planned dtype.
        k_scale, v_scale : float or torch.Tensor, optional
            Per-tensor dequantisation scales of fp8 K and V (of the shared prefix and of the unique cache alike),
            as the batch wrappers take them: k_scale multiplies the logits, v_scale the output. An extension over
            FlashInfer's signature (scale 1 there).

        Returns
        -------
        torch.Tensor
            o ``[batch_size, num_qo_heads, head_dim]`` in q's dtype.
        """
        o, s = single_prefill_with_kv_cache(
            q,
            k_shared,
            v_shared,
            causal=False,
            kv_layout=self._kv_layout,
            return_lse=True,
            k_scale=k_scale,
            v_scale=v_scale,
        )
        o_unique, s_unique = self._batch_decode_wrapper.run(
            q, unique_kv_cache, return_lse=True, k_scale=k_scale, v_scale=v_scale
        )
        merge_state_in_place(o, s, o_unique, s_unique)
        return o

    run = forward


class BatchPrefillWithSharedPrefixPagedKVCacheWrapper:
    """Batch prefill/append where every request shares one prefix held in contiguous ``k_shared``/``v_shared``
    tensors and has its own tokens in a paged cache (FlashInfer's older API). All queries attend to the shared
    prefix as one request on tensor cores (never causally: the prefix precedes them), then to their own pages
    (causal if asked); the two states are merged.

    Parameters
    ----------
    float_workspace_buffer : torch.Tensor
        CUDA buffer (e.g. 128 MB of uint8) for the batch prefill's partial states.
    kv_layout : str
        ``"NHD"`` or ``"HND"``, of both the shared tensors and the paged cache.
    """

    def __init__(self, float_workspace_buffer: torch.Tensor, kv_layout: str = "NHD") -> None:
        self._kv_layout = canonical_layout(kv_layout)
        self._batch_prefill_wrapper = BatchPrefillWithPagedKVCacheWrapper(float_workspace_buffer, self._kv_layout)
        self._args: Optional[Tuple[Any, ...]] = None
        self._planned: Optional[Tuple[Any, ...]] = None

    def reset_workspace_buffer(self, float_workspace_buffer: torch.Tensor, int_workspace_buffer=None) -> None:
        self._batch_prefill_wrapper.reset_workspace_buffer(float_workspace_buffer, int_workspace_buffer)
        self._planned = None

    def begin_forward(
        self,
        qo_indptr: torch.Tensor,
        paged_kv_indptr: torch.Tensor,
        paged_kv_indices: torch.Tensor,
        paged_kv_last_page_len: torch.Tensor,
        num_qo_heads: int,
        num_kv_heads: int,
        head_dim: int,
        page_size: int,
    ) -> None:
        """Records the batch: ``qo_indptr [batch + 1]`` and the unique pages' table (``paged_kv_indptr``,
        ``paged_kv_indices``, ``paged_kv_last_page_len``, int32), heads, head_dim, page_size. The schedule is made
        by the first ``forward`` (which knows ``causal`` and the dtype) and reused while those stay the same."""
        if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size <= 0:
            raise ValueError(f"page_size must be a positive int, got {page_size!r}")
        self._args = (
            qo_indptr,
            paged_kv_indptr,
            paged_kv_indices,
            paged_kv_last_page_len,
            num_qo_heads,
            num_kv_heads,
            head_dim,
            page_size,
        )
        self._planned = None

    plan = begin_forward

    def end_forward(self) -> None:
        """Kept for FlashInfer compatibility; nothing to release."""

    def forward(
        self,
        q: torch.Tensor,
        k_shared: torch.Tensor,
        v_shared: torch.Tensor,
        unique_kv_cache: PagedKVCache,
        causal: bool = False,
        use_fp16_qk_reduction: bool = False,
        sm_scale: Optional[float] = None,
        rope_scale: Optional[float] = None,
        rope_theta: Optional[float] = None,
        *,
        k_scale: Optional[float] = None,
        v_scale: Optional[float] = None,
    ) -> torch.Tensor:
        """Prefill/append attention of every request against the shared prefix and its own pages.

        Parameters
        ----------
        q : torch.Tensor
            ``[qo_indptr[-1], num_qo_heads, head_dim]``, float16 or bfloat16.
        k_shared, v_shared : torch.Tensor
            The shared prefix, ``[shared_len, num_kv_heads, head_dim]`` (NHD) or ``[num_kv_heads, shared_len,
            head_dim]`` (HND), in q's dtype or fp8 (as ``single_prefill_with_kv_cache`` takes them).
        unique_kv_cache : torch.Tensor or (torch.Tensor, torch.Tensor)
            Each request's pages, as ``BatchPrefillWithPagedKVCacheWrapper.run`` takes them: q's dtype or fp8
            (torch.float8_e4m3fn, torch.float8_e5m2; the schedule is made for the cache's dtype, which FlashInfer,
            planning float16 at begin_forward(), does not read).
        causal : bool
            Mask the unique part causally (aligned bottom-right: each request's unique KV must end with its
            queries); the shared prefix is always attended in full.
        use_fp16_qk_reduction, sm_scale, rope_scale, rope_theta : optional
            As ``single_prefill_with_kv_cache``, for both parts.
        k_scale, v_scale : float or torch.Tensor, optional
            Per-tensor dequantisation scales of fp8 K and V (of the shared prefix and of the unique cache alike),
            as the batch wrappers take them: k_scale multiplies the logits, v_scale the output. An extension over
            FlashInfer's signature (scale 1 there).

        Returns
        -------
        torch.Tensor
            o ``[qo_indptr[-1], num_qo_heads, head_dim]`` in q's dtype.
        """
        if self._args is None:
            raise RuntimeError("forward() before begin_forward()")
        if not isinstance(q, torch.Tensor):
            raise TypeError(f"q must be a torch.Tensor, got {type(q).__name__}")
        kv_dtype = _unpack_paged_kv_cache(unique_kv_cache, self._kv_layout, allow_fp8=True).k.dtype
        options = (causal, use_fp16_qk_reduction, sm_scale, rope_scale, rope_theta, q.dtype, kv_dtype)
        if options != self._planned:
            self._batch_prefill_wrapper.plan(
                *self._args,
                causal=causal,
                use_fp16_qk_reduction=use_fp16_qk_reduction,
                sm_scale=sm_scale,
                rope_scale=rope_scale,
                rope_theta=rope_theta,
                q_data_type=q.dtype,
                kv_data_type=kv_dtype,
            )
            self._planned = options
        o, s = single_prefill_with_kv_cache(
            q,
            k_shared,
            v_shared,
            causal=False,
            kv_layout=self._kv_layout,
            use_fp16_qk_reduction=use_fp16_qk_reduction,
            sm_scale=sm_scale,
            rope_scale=rope_scale,
            rope_theta=rope_theta,
            return_lse=True,
            k_scale=k_scale,
            v_scale=v_scale,
        )
        o_unique, s_unique = self._batch_prefill_wrapper.run(
            q, unique_kv_cache, return_lse=True, k_scale=k_scale, v_scale=v_scale
        )
        merge_state_in_place(o, s, o_unique, s_unique)
        return o

    run = forward
