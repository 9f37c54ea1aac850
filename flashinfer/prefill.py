"""Prefill attention on tensor cores: a request's new query tokens attend to its KV (single or batched).

``single_prefill_with_kv_cache``, ``BatchPrefillWithRaggedKVCacheWrapper`` and
``BatchPrefillWithPagedKVCacheWrapper`` are drop-ins for FlashInfer's names. Two kernels: ``"fa2"``
(templates/include/flashinfer/prefill.cuh; mma.sync m16n8k16, ldmatrix from swizzled shared memory, cp.async
double buffering, fp32 online softmax; every feature, sm_80+) and ``"fa3"`` (prefill_sm90.cuh; Hopper wgmma,
single-request prefill at head_dim 128 without masks beyond causal or logit transforms).
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import math
from typing import Any, Dict, Optional, Tuple, Union

import torch

from . import jit
from ._spec_common import AttentionSpec
from .jit.abi import Launcher
from .jit.spec import Spec, register_family
from .quantization import packbits, segment_packbits
from .utils import (
    aligned_rows,
    canonical_layout,
    canonical_pos_encoding,
    check_head_dim,
    INT32_MAX,
    check_int32_values,
    check_kv_lengths,
    check_page_ids_in_cache,
    page_ids_int32,
    check_kv,
    check_logit_options,
    check_qkv_dtypes,
    check_out,
    check_same_device,
    check_tensor,
    check_vector_rows,
    cuda_bool,
    current_stream_ptr,
    dtype_short,
    num_sms,
    scalar,
    workspace_too_small,
)

MASK_MODES = ("none", "causal", "custom")
_MASK_CUDA = {"none": "kNone", "causal": "kCausal", "custom": "kCustom"}
# Implemented backends; "auto" picks the first. A Hopper wgmma/TMA backend ("fa3") slots in here.
BACKENDS = ("fa2", "fa3")  # fa2: mma.sync (sm_80+); fa3: Hopper wgmma (sm_90a), single prefill within _fa3_scope
# KV chunks shorter than this cost more to merge than they gain in parallelism.
_MIN_CHUNK = 512
_MAX_CHUNKS = 64
# RoPE positions are carried as floats in the kernel and must be exact.
_MAX_ROPE_POSITION = 1 << 24
_INT32_MAX = 2**31 - 1


def _mq(head_dim: int) -> int:
    """16-row MMA tiles per warp (4 warps): query tiles of 128 packed rows, 64 for head_dim 256."""
    return 1 if head_dim >= 256 else 2


def _kv_tile(head_dim: int) -> int:
    return 32 if head_dim >= 256 else 64  # BK of PrefillTraits


def _resolve_backend(backend: str) -> str:
    """The canonical backend argument: "auto" (chosen per call), "fa2" or "fa3"."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    b = backend.lower()
    if b == "auto" or b in BACKENDS:
        return b
    if b in ("cudnn", "trtllm-gen", "cutlass"):
        raise NotImplementedError(
            f"prefill backend {backend!r} is not implemented; available: 'auto', {', '.join(map(repr, BACKENDS))}"
        )
    raise ValueError(f"backend must be 'auto' or one of {list(BACKENDS)}, got {backend!r}")


def _fa3_scope(head_dim: int, dtype_q: str, dtype_kv: str, dtype_o: str, mask_mode: str, pos_encoding_mode: str,
               use_window: bool, use_logits_soft_cap: bool, use_fp16_qk_reduction: bool) -> Optional[str]:
    """Why the fa3 (wgmma) kernel cannot run a configuration, or None when it can."""
    if head_dim != 128:
        return f"head_dim {head_dim} (fa3 takes 128)"
    if not (dtype_q == dtype_kv == dtype_o and dtype_q in ("f16", "bf16")):
        return "mixed dtypes (fa3 takes one of float16/bfloat16 for q, k, v and output)"
    if mask_mode not in ("none", "causal"):
        return f"mask_mode {mask_mode!r} (fa3 takes no mask or causal)"
    if pos_encoding_mode != "NONE" or use_window or use_logits_soft_cap or use_fp16_qk_reduction:
        return "position encoding, sliding window, soft cap or fp16 QK reduction (fa3 takes none of them)"
    return None


_FA3_QUERY_TILE = 128  # packed query rows per CTA of the fa3 kernel (Fa3Traits::BQ in prefill_sm90.cuh)


@functools.lru_cache(maxsize=None)
def _device_capability(index: int) -> Tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def _single_backend(backend: str, why_not_fa3: Optional[str], device: torch.device, qo_rows: int,
                    num_kv_heads: int) -> str:
    """The kernel of a single-prefill call. "auto": fa3 on Hopper where it applies and its 128-row query tiles
    alone fill the GPU (it has no KV split); fa2 otherwise (short queries, other GPUs, other features)."""
    if backend == "fa2":
        return "fa2"
    on_hopper = _device_capability(device.index) == (9, 0)
    if backend == "fa3":
        if why_not_fa3 is not None:
            raise ValueError(f"backend='fa3' cannot run this call: {why_not_fa3}; use backend='fa2' or 'auto'")
        if not on_hopper:
            major, minor = _device_capability(device.index)
            raise ValueError(f"backend='fa3' needs a Hopper GPU (sm_90); {device} is sm_{major}{minor}")
        return "fa3"
    if why_not_fa3 is None and on_hopper and -(-qo_rows // _FA3_QUERY_TILE) * num_kv_heads >= num_sms(device.index):
        return "fa3"
    return "fa2"


class _PrefillSpecBase(AttentionSpec):
    own_axes = {"mask_mode": MASK_MODES, "backend": BACKENDS, "kv_storage": ("paged", "ragged")}

    def attention_vars(self) -> Dict[str, Any]:
        return {**super().attention_vars(), "mask_mode": _MASK_CUDA[self.mask_mode]}

    def unsupported_reason(self) -> Optional[str]:
        reason = super().unsupported_reason()
        if reason is not None:
            return reason
        if self.use_fp16_qk_reduction and self.dtype_q != "f16":
            return "use_fp16_qk_reduction needs float16 q/k (tensor cores accumulate in fp16 only for fp16 inputs)"
        if self.mask_mode not in MASK_MODES:
            return f"mask_mode {self.mask_mode!r} is not one of {MASK_MODES}"
        if self.backend not in BACKENDS:
            return f"backend {self.backend!r} is not implemented"
        if self.backend == "fa3":
            if self.family != "prefill_single":
                return "the fa3 backend covers single-request prefill only"
            why = _fa3_scope(self.head_dim, self.dtype_q, self.dtype_kv, self.dtype_o, self.mask_mode,
                             self.pos_encoding_mode, self.use_window, self.use_logits_soft_cap,
                             self.use_fp16_qk_reduction)
            if why is not None:
                return f"outside the fa3 backend's scope: {why}"
        return None

    def needs_sm90a(self) -> bool:
        return self.backend == "fa3"


@register_family
@dataclasses.dataclass(frozen=True)
class SinglePrefillSpec(_PrefillSpecBase):
    """Compile-time configuration of the single-request prefill kernel (the KV layout is a run-time stride)."""

    mask_mode: str = "none"
    pos_encoding_mode: str = "NONE"
    use_window: bool = False
    use_logits_soft_cap: bool = False
    use_fp16_qk_reduction: bool = False
    backend: str = "fa2"

    family = "prefill_single"
    template = "single_prefill.cu.jinja"
    launchers = (
        Launcher("flashinfer_single_prefill",
                 "const void* q, const void* k, const void* v, void* o, float* lse, float* workspace, "
                 "const uint8_t* mask, int qo_len, int kv_len, int num_qo_heads, int num_kv_heads, int64_t q_stride_n, "
                 "int64_t q_stride_h, int64_t k_stride_n, int64_t k_stride_h, int64_t v_stride_n, int64_t v_stride_h, "
                 "int num_chunks, int chunk_size, int window_left, float logits_soft_cap, float sm_scale, "
                 "float rope_scale, float rope_theta, int device, void* stream"),
        Launcher("flashinfer_single_prefill_occupancy", "int device, int* out"),
    )

    def render_vars(self) -> Dict[str, Any]:
        return {**self.attention_vars(), "mq": _mq(self.head_dim), "backend": self.backend}


@functools.lru_cache(maxsize=None)
def _module(spec: Spec) -> jit.JITModule:
    return jit.load(spec)


@functools.lru_cache(maxsize=None)
def _occupancy(spec: Spec, symbol: str, device_index: int, *extra: int) -> int:
    mod = _module(spec)
    out = ctypes.c_int(0)
    rc = mod.fn(symbol)(*extra, device_index, ctypes.addressof(out))
    if rc:
        mod.check(rc, f"{spec.name()}: occupancy query on cuda:{device_index}")
    return max(1, out.value)


# --------------------------------------------------------------------------------------------- validation


@dataclasses.dataclass
class _Opts:
    mask_mode: str
    pos_encoding_mode: str
    window_left: int
    soft_cap: float
    sm_scale: float
    rope_scale: float
    rope_theta: float
    use_fp16_qk_reduction: bool
    backend: str


def _check_options(head_dim: int, causal: bool, pos_encoding_mode, window_left, logits_soft_cap, sm_scale,
                   rope_scale, rope_theta, use_fp16_qk_reduction, backend, has_mask: bool) -> _Opts:
    check_head_dim(head_dim)
    pos = canonical_pos_encoding(pos_encoding_mode)
    window_left, soft_cap, scale, r_scale, r_theta = check_logit_options(
        head_dim, pos, window_left, logits_soft_cap, sm_scale, rope_scale, rope_theta, max_window=_INT32_MAX)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    mask_mode = "custom" if has_mask else ("causal" if causal else "none")
    return _Opts(mask_mode, pos, window_left, soft_cap, scale, r_scale, r_theta, bool(use_fp16_qk_reduction),
                 _resolve_backend(backend))


def _check_fp16qk(opts: _Opts, dq: str) -> None:
    if opts.use_fp16_qk_reduction and dq != "f16":
        raise ValueError("use_fp16_qk_reduction=True needs float16 q/k/v (fp16 accumulation); got bfloat16")


def _packed_mask(custom_mask, packed_custom_mask, rows: int, cols: int, device) -> Optional[torch.Tensor]:
    """Validates a single request's mask ([rows, cols] bool, or its flat bits packed) -> packed uint8 bits."""
    if packed_custom_mask is not None:
        m = packed_custom_mask
        if not isinstance(m, torch.Tensor):
            raise TypeError("packed_custom_mask must be a torch.Tensor of uint8")
        if m.dtype != torch.uint8:
            raise TypeError(f"packed_custom_mask must be uint8 (from flashinfer.packbits), got {m.dtype}")
        need = (rows * cols + 7) // 8
        if m.dim() != 1 or m.numel() != need:
            raise ValueError(
                f"packed_custom_mask must be 1-D with ceil(qo_len * kv_len / 8) = {need} bytes, got shape {tuple(m.shape)}"
            )
        if m.device != device:
            raise ValueError(f"all tensors must be on one device: q is on {device} but packed_custom_mask is on {m.device}")
        return m.contiguous()
    if custom_mask is None:
        return None
    m = custom_mask
    if not isinstance(m, torch.Tensor):
        raise TypeError("custom_mask must be a torch.Tensor of bool")
    if m.dtype != torch.bool:
        raise TypeError(f"custom_mask must be a bool tensor (True: attend), got {m.dtype}")
    if m.numel() != rows * cols or (m.dim() == 2 and tuple(m.shape) != (rows, cols)) or m.dim() > 2:
        raise ValueError(f"custom_mask must have shape [qo_len, kv_len] = [{rows}, {cols}] (or be its flattening), "
                         f"got {tuple(m.shape)}")
    if m.device != device:
        raise ValueError(f"all tensors must be on one device: q is on {device} but custom_mask is on {m.device}")
    return packbits(m.reshape(-1), bitorder="little")


# ------------------------------------------------------------------------------------------ single prefill


def _single_chunks(spec: SinglePrefillSpec, device: torch.device, qo_len: int, kv_len: int, group: int,
                   num_kv_heads: int) -> Tuple[int, int]:
    """(num_chunks, chunk_size): split the KV range when the query tiles alone cannot fill the GPU."""
    bk = _kv_tile(spec.head_dim)
    ctas = -(-qo_len * group // (64 * _mq(spec.head_dim))) * num_kv_heads
    slots = _occupancy(spec, "flashinfer_single_prefill_occupancy", device.index) * num_sms(device.index)
    chunks = 1
    if ctas * 2 <= slots and kv_len >= 2 * _MIN_CHUNK:
        chunks = min(_MAX_CHUNKS, -(-slots // ctas), kv_len // _MIN_CHUNK)
    chunk = -(-kv_len // max(chunks, 1))
    chunk = max(bk, -(-chunk // bk) * bk)
    return max(1, -(-kv_len // chunk)), chunk


def _single_run(q, k, v, mask, kv_layout: str, opts: _Opts, o: torch.Tensor, lse: Optional[torch.Tensor]) -> None:
    qo_len, num_qo_heads, head_dim = q.shape
    if kv_layout == "NHD":
        kv_len, num_kv_heads = k.shape[0], k.shape[1]
        k_sn, k_sh, v_sn, v_sh = k.stride(0), k.stride(1), v.stride(0), v.stride(1)
    else:
        num_kv_heads, kv_len = k.shape[0], k.shape[1]
        k_sn, k_sh, v_sn, v_sh = k.stride(1), k.stride(0), v.stride(1), v.stride(0)
    if qo_len == 0:
        return
    dq, dk = dtype_short(q, "q"), dtype_short(k, "k")
    device = q.device
    group = num_qo_heads // num_kv_heads
    why_not_fa3 = _fa3_scope(head_dim, dq, dk, dq, opts.mask_mode, opts.pos_encoding_mode, opts.window_left >= 0,
                             opts.soft_cap > 0, opts.use_fp16_qk_reduction)
    backend = _single_backend(opts.backend, why_not_fa3, device, qo_len * group, num_kv_heads)
    spec = SinglePrefillSpec(
        head_dim=head_dim, dtype_q=dq, dtype_kv=dk, dtype_o=dq, mask_mode=opts.mask_mode,
        pos_encoding_mode=opts.pos_encoding_mode, use_window=opts.window_left >= 0,
        use_logits_soft_cap=opts.soft_cap > 0, use_fp16_qk_reduction=opts.use_fp16_qk_reduction,
        backend=backend,
    )
    mod = _module(spec)
    if backend == "fa3":
        num_chunks, chunk_size = 1, kv_len
    else:
        num_chunks, chunk_size = _single_chunks(spec, device, qo_len, kv_len, group, num_kv_heads)
    workspace = None
    if num_chunks > 1:
        workspace = torch.empty(num_chunks * qo_len * num_qo_heads * (head_dim + 1), dtype=torch.float32, device=device)
    rc = mod.fn("flashinfer_single_prefill")(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), o.data_ptr(), lse.data_ptr() if lse is not None else None,
        workspace.data_ptr() if workspace is not None else None, mask.data_ptr() if mask is not None else None,
        qo_len, kv_len, num_qo_heads, num_kv_heads, q.stride(0), q.stride(1), k_sn, k_sh, v_sn, v_sh,
        num_chunks, chunk_size, opts.window_left, opts.soft_cap, opts.sm_scale, opts.rope_scale, opts.rope_theta,
        device.index, current_stream_ptr(device),
    )
    if rc:
        mod.check(rc, f"single_prefill_with_kv_cache ({spec.name()}) on {device}")


@torch.library.custom_op("flashinfer::single_prefill", mutates_args=())
def _single_prefill_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
                       kv_layout: str, mask_mode: str, pos_encoding_mode: str, window_left: int,
                       logits_soft_cap: float, sm_scale: float, rope_scale: float, rope_theta: float,
                       use_fp16_qk_reduction: bool, backend: str, return_lse: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((q.shape[0], q.shape[1]) if return_lse else (0,), dtype=torch.float32, device=q.device)
    opts = _Opts(mask_mode, pos_encoding_mode, window_left, logits_soft_cap, sm_scale, rope_scale, rope_theta,
                 use_fp16_qk_reduction, backend)
    _single_run(q, k, v, mask, kv_layout, opts, o, lse if return_lse else None)
    return o, lse


@_single_prefill_op.register_fake
def _single_prefill_fake(q, k, v, mask, kv_layout, mask_mode, pos_encoding_mode, window_left, logits_soft_cap,
                         sm_scale, rope_scale, rope_theta, use_fp16_qk_reduction, backend, return_lse):
    return q.new_empty(q.shape), q.new_empty((q.shape[0], q.shape[1]) if return_lse else (0,), dtype=torch.float32)


def single_prefill_with_kv_cache(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    custom_mask: Optional[torch.Tensor] = None,
    packed_custom_mask: Optional[torch.Tensor] = None,
    causal: bool = False,
    kv_layout: str = "NHD",
    pos_encoding_mode: str = "NONE",
    use_fp16_qk_reduction: bool = False,
    sm_scale: Optional[float] = None,
    window_left: int = -1,
    logits_soft_cap: Optional[float] = None,
    rope_scale: Optional[float] = None,
    rope_theta: Optional[float] = None,
    backend: str = "auto",
    return_lse: bool = False,
    *,
    out: Optional[torch.Tensor] = None,
    lse: Optional[torch.Tensor] = None,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Prefill attention of one request: qo_len new query tokens against kv_len keys on tensor cores.

    Args:
        q: ``[qo_len, num_qo_heads, head_dim]``, float16 or bfloat16, on a CUDA device.
        k, v: ``[kv_len, num_kv_heads, head_dim]`` (``kv_layout="NHD"``) or ``[num_kv_heads, kv_len, head_dim]``
            (``"HND"``), q's dtype. Views are accepted when the last dimension is contiguous and the other strides
            are multiples of 16 bytes. ``num_qo_heads`` a multiple of ``num_kv_heads``; head_dim 64, 128 or 256.
        custom_mask: bool ``[qo_len, kv_len]`` (True: attend), or ``packed_custom_mask``: its flattening packed by
            ``flashinfer.packbits(..., bitorder="little")``. A custom mask replaces ``causal``.
        causal: query i attends to keys ``j <= kv_len - qo_len + i`` (aligned bottom-right); needs qo_len <= kv_len.
        pos_encoding_mode: ``"NONE"``, ``"ROPE_LLAMA"`` (RoPE on the fly: query i at position kv_len - qo_len + i,
            key j at j) or ``"ALIBI"``.
        use_fp16_qk_reduction: accumulate q.k in fp16 (float16 inputs only): faster, less accurate.
        sm_scale: logit scale, default ``1 / sqrt(head_dim)``. window_left: ``w >= 0`` attends only to keys
            ``j >= pos(i) - w``. logits_soft_cap: ``c > 0`` maps each scaled logit x to ``c * tanh(x / c)``.
        backend: ``"auto"``, ``"fa2"`` (mma.sync tensor cores, any sm_80+ GPU) or ``"fa3"`` (Hopper wgmma; head_dim
            128, float16/bfloat16, no mask or causal, no position encoding, window, soft cap or fp16 QK reduction).
            ``"auto"`` takes fa3 on Hopper when the call is within its scope and has enough query tiles to fill
            the GPU, fa2 otherwise.
        return_lse: also return lse ``[qo_len, num_qo_heads]`` float32, base-2 log-sum-exp of the scaled logits.
        out, lse: optional preallocated outputs (contiguous); an extension over FlashInfer's signature.

    Returns:
        o ``[qo_len, num_qo_heads, head_dim]`` in q's dtype, or ``(o, lse)`` with ``return_lse=True``.
    """
    check_tensor(q, "q", 3)
    check_tensor(k, "k", 3)
    check_tensor(v, "v", 3)
    device = check_same_device([("q", q), ("k", k), ("v", v), ("custom_mask", custom_mask),
                                ("packed_custom_mask", packed_custom_mask), ("out", out), ("lse", lse)])
    kv_layout = canonical_layout(kv_layout)
    dq = check_qkv_dtypes(q, k, v)
    qo_len, num_qo_heads, head_dim = q.shape
    has_mask = custom_mask is not None or packed_custom_mask is not None
    opts = _check_options(head_dim, causal, pos_encoding_mode, window_left, logits_soft_cap, sm_scale, rope_scale,
                          rope_theta, use_fp16_qk_reduction, backend, has_mask)
    _check_fp16qk(opts, dq)
    kv_len, num_kv_heads = check_kv(k, v, kv_layout, num_qo_heads, head_dim)
    if opts.mask_mode == "causal" and qo_len > kv_len:
        raise ValueError(f"causal=True needs qo_len <= kv_len (the mask is aligned bottom-right); got qo_len={qo_len}, "
                         f"kv_len={kv_len}")
    if max(kv_len, qo_len * (num_qo_heads // num_kv_heads)) > _INT32_MAX // 2:
        raise ValueError(f"sequence too long: qo_len {qo_len} x group, kv_len {kv_len} must stay below 2**30")
    if opts.pos_encoding_mode == "ROPE_LLAMA" and kv_len > _MAX_ROPE_POSITION:
        raise ValueError(f"ROPE_LLAMA supports kv_len up to {_MAX_ROPE_POSITION}, got {kv_len}")
    mask = _packed_mask(custom_mask, packed_custom_mask, qo_len, kv_len, device)
    if q.stride(-1) != 1:
        q = q.contiguous()
    check_vector_rows(q, "q", 2)
    check_vector_rows(k, "k", 2)
    check_vector_rows(v, "v", 2)
    check_out(out, "out", (qo_len, num_qo_heads, head_dim), q.dtype, device)
    check_out(lse, "lse", (qo_len, num_qo_heads), torch.float32, device)

    if torch.compiler.is_compiling():
        o, lse_t = _single_prefill_op(q, k, v, mask, kv_layout, opts.mask_mode, opts.pos_encoding_mode,
                                      opts.window_left, opts.soft_cap, opts.sm_scale, opts.rope_scale,
                                      opts.rope_theta, opts.use_fp16_qk_reduction, opts.backend, return_lse)
        if out is not None:
            o = out.copy_(o)
        if return_lse and lse is not None:
            lse_t = lse.copy_(lse_t)
        return (o, lse_t) if return_lse else o

    o = out if out is not None else torch.empty((qo_len, num_qo_heads, head_dim), dtype=q.dtype, device=device)
    if return_lse and lse is None:
        lse = torch.empty((qo_len, num_qo_heads), dtype=torch.float32, device=device)
    _single_run(q, k, v, mask, kv_layout, opts, o, lse if return_lse else None)
    return (o, lse) if return_lse else o


def single_prefill_with_kv_cache_return_lse(*args, **kwargs) -> Tuple[torch.Tensor, torch.Tensor]:
    """``single_prefill_with_kv_cache(..., return_lse=True)``."""
    kwargs["return_lse"] = True
    return single_prefill_with_kv_cache(*args, **kwargs)


# ------------------------------------------------------------------------------------------- batch prefill


def _batch_tiles(head_dim: int) -> Tuple[int, ...]:
    """Query-tile sizes (packed rows) instantiated per batch module; plan() picks one per batch: 64 rows for
    short requests, 128 (as the single-request kernel) for long ones outside graph mode (the 128-row kernel
    takes one work item per CTA, so its grid is not fixed; see batch_prefill_kernel). head_dim 256 stays at
    64 rows: a 128-row tile's accumulators do not fit in registers."""
    return (64,) if head_dim >= 256 else (64, 128)


@register_family
@dataclasses.dataclass(frozen=True)
class BatchPrefillSpec(_PrefillSpecBase):
    """Compile-time configuration of the batch prefill kernel over ragged or paged KV."""

    kv_storage: str = "paged"
    mask_mode: str = "none"
    pos_encoding_mode: str = "NONE"
    use_window: bool = False
    use_logits_soft_cap: bool = False
    use_fp16_qk_reduction: bool = False
    backend: str = "fa2"

    family = "prefill_batch"
    template = "batch_prefill.cu.jinja"
    launchers = (
        Launcher("flashinfer_batch_prefill",
                 "int tile_q, const void* q, const void* k, const void* v, void* o, float* lse, float* partial_o, "
                 "float* partial_lse, const uint8_t* mask, const int* mask_indptr, const int* qo_indptr, "
                 "const int* kv_indptr, const int* kv_indices, const int* kv_last_page_len, const int* work, "
                 "int work_capacity, const int* num_work, const int* merge, int merge_capacity, const int* num_merge, "
                 "int grid_x, int merge_grid_x, int num_qo_heads, int num_kv_heads, int page_size, int num_pages, "
                 "int64_t q_stride_n, "
                 "int64_t q_stride_h, int64_t k_stride_page, int64_t k_stride_n, int64_t k_stride_h, "
                 "int64_t v_stride_page, int64_t v_stride_n, int64_t v_stride_h, int window_left, "
                 "float logits_soft_cap, float sm_scale, float rope_scale, float rope_theta, int device, void* stream"),
        Launcher("flashinfer_batch_prefill_occupancy", "int tile_q, int device, int* out"),
    )

    name_prefix = ("kv_storage",)

    def render_vars(self) -> Dict[str, Any]:
        return {**self.attention_vars(), "paged": cuda_bool(self.kv_storage == "paged"),
                "mqs": [t // 64 for t in _batch_tiles(self.head_dim)]}

    def unsupported_reason(self) -> Optional[str]:
        if self.kv_storage not in ("paged", "ragged"):
            return f"kv_storage must be 'paged' or 'ragged', got {self.kv_storage!r}"
        return super().unsupported_reason()


# Fixed schedule capacities of CUDA-graph wrappers (the kernel reads the live counts from device memory).
_GRAPH_WORK_CAPACITY = 1 << 16
_GRAPH_MERGE_CAPACITY = 1 << 17


def _host_ints(x, name: str) -> list:
    if isinstance(x, torch.Tensor):
        if x.dim() != 1:
            raise ValueError(f"{name} must be 1-D, got shape {tuple(x.shape)}")
        if x.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{name} must be int32 or int64, got {x.dtype}")
        return x.tolist()  # a CUDA tensor costs a sync here: pass CPU tensors to plan()
    return [int(v) for v in x]


def _dtype_arg(x, default: torch.dtype, name: str) -> torch.dtype:
    if x is None:
        return default
    if isinstance(x, str):
        x = getattr(torch, x, None)
    if x not in (torch.float16, torch.bfloat16):
        raise TypeError(f"{name} must be torch.float16 or torch.bfloat16 (or their names), got {x!r}")
    return x


def _whole_waves_chunk(chunk: int, big: int, bk: int, items, num_kv_heads: int, target: int) -> int:
    """The KV chunk length near ``chunk`` that finishes soonest when the split items run in waves of ``target``
    CTAs (``items(c)`` work items per KV head): a split that leaves a few CTAs over a whole wave (e.g. 272 of 264
    slots) runs a second wave for them alone, nearly doubling the time. Estimated time: waves x chunk length;
    ties go to fewer items (less to merge)."""
    n0 = -(-big // chunk)
    floor_c = -(-_MIN_CHUNK // bk) * bk
    best = None
    for n in range(max(1, n0 // 2), 2 * n0 + 1):
        c = max(floor_c, -(-(-(-big // n)) // bk) * bk)
        k = items(c)
        key = (-(-k * num_kv_heads // target) * min(c, big), k)
        if best is None or key < best[0]:
            best = (key, c)
    return best[1] if best is not None else chunk


def _plan_schedule(qo_lens, kv_lens, group, num_kv_heads, head_dim, tiles, occ_of, sms, causal, workspace_floats,
                   num_qo_heads):
    """Work items (request, q tile, kv begin, kv end, partial row) and merge rows, heaviest first."""
    total_rows = sum(q * group for q in qo_lens)
    nonempty = sum(1 for q in qo_lens if q > 0)
    tile = tiles[-1] if nonempty == 0 or total_rows / max(nonempty, 1) > tiles[0] else tiles[0]
    qtiles = [-(-q * group // tile) for q in qo_lens]
    target = occ_of(tile) * sms  # CTAs that run at once
    ctas = sum(qtiles) * num_kv_heads
    bk = _kv_tile(head_dim)
    big = max(kv_lens) if kv_lens else 0
    chunk = max(big, 1)
    if ctas * 2 <= target and big >= 2 * _MIN_CHUNK:
        want = -(-target // num_kv_heads)

        def items(c):
            return sum(t * max(1, -(-kv // c)) for t, kv in zip(qtiles, kv_lens))

        lo_c, hi_c = _MIN_CHUNK, big
        if items(lo_c) >= want:
            while hi_c - lo_c > bk:  # the largest chunk that still gives `want` items
                mid = (lo_c + hi_c) // 2
                if items(mid) >= want:
                    lo_c = mid
                else:
                    hi_c = mid
        chunk = -(-lo_c // bk) * bk
        chunk = _whole_waves_chunk(chunk, big, bk, items, num_kv_heads, target)

        def partial_rows(c):
            return sum(q * -(-kv // c) for q, kv in zip(qo_lens, kv_lens) if kv > c)

        while chunk < big and partial_rows(chunk) * num_qo_heads * (head_dim + 1) > workspace_floats:
            chunk *= 2
        chunk = min(chunk, big)
    work, merge = [], []
    part = 0
    qo_start = 0
    for r, (q, kv) in enumerate(zip(qo_lens, kv_lens)):
        if q == 0:
            continue
        nch = max(1, -(-kv // chunk))
        base = part if nch > 1 else -1
        for t in range(qtiles[r]):
            rows_end = min((t + 1) * tile, q * group)
            tok_max = (rows_end - 1) // group
            limit = kv - q + tok_max + 1 if causal else kv
            for c in range(nch):
                kb, ke = c * chunk, min(kv, (c + 1) * chunk)
                cost = max(0, min(ke, limit) - kb) * (rows_end - t * tile) + 64
                work.append((cost, r, t, kb, ke, base + c * q if nch > 1 else -1))
        if nch > 1:
            for tok in range(q):
                merge.append((qo_start + tok, part + tok, nch, q))
            part += nch * q
        qo_start += q
    work.sort(key=lambda w: -w[0])
    return tile, [w[1:] for w in work], merge, part


class _BatchPrefillBase:
    _storage = ""

    def __init__(self, float_workspace_buffer: torch.Tensor, kv_layout: str = "NHD", use_cuda_graph: bool = False,
                 backend: str = "auto") -> None:
        if _resolve_backend(backend) == "fa3":
            raise ValueError("the fa3 backend covers single_prefill_with_kv_cache only; batch prefill runs on fa2 "
                             "(backend='auto' or 'fa2')")
        self._backend = "fa2"
        if not isinstance(float_workspace_buffer, torch.Tensor) or float_workspace_buffer.device.type != "cuda":
            raise ValueError("float_workspace_buffer must be a CUDA tensor (e.g. 128 MB of uint8)")
        self._ws = float_workspace_buffer
        self._device = float_workspace_buffer.device
        self._kv_layout = canonical_layout(kv_layout)
        self._use_cuda_graph = bool(use_cuda_graph)
        self._plan = None
        self._int_buf = None
        self._grid_x = None
        self._merge_grid_x = None

    @property
    def is_cuda_graph_enabled(self) -> bool:
        return self._use_cuda_graph

    def reset_workspace_buffer(self, float_workspace_buffer: torch.Tensor, int_workspace_buffer=None) -> None:
        self._ws = float_workspace_buffer

    def _to_device_int(self, values, buf: Optional[torch.Tensor], name: str, non_blocking: bool) -> torch.Tensor:
        host = torch.tensor(values if values else [0], dtype=torch.int32)
        if host.device.type == "cpu" and torch.cuda.is_available():
            host = host.pin_memory()
        if buf is None:
            return host.to(self._device, non_blocking=non_blocking)
        if buf.numel() < host.numel() or buf.dtype != torch.int32 or buf.device != self._device:
            raise ValueError(f"{name} buffer must be int32 on {self._device} with at least {host.numel()} elements")
        buf[: host.numel()].copy_(host, non_blocking=non_blocking)
        return buf

    def _plan_common(self, qo_indptr, kv_lens, num_qo_heads, num_kv_heads, head_dim_qk, head_dim_vo, custom_mask,
                     packed_custom_mask, causal, pos_encoding_mode, use_fp16_qk_reduction, sm_scale, window_left,
                     logits_soft_cap, rope_scale, rope_theta, q_data_type, kv_data_type, non_blocking, extra_lens):
        qo = _host_ints(qo_indptr, "qo_indptr")
        check_int32_values(qo, "qo_indptr")
        check_kv_lengths(kv_lens)
        if len(qo) < 1 or qo[0] != 0 or any(b < a for a, b in zip(qo, qo[1:])):
            raise ValueError("qo_indptr must start at 0 and be non-decreasing")
        batch = len(qo) - 1
        if len(kv_lens) != batch:
            raise ValueError(f"qo_indptr describes {batch} requests but the KV indptr describes {len(kv_lens)} "
                             f"(their lengths must match)")
        if head_dim_vo is not None and head_dim_vo != head_dim_qk:
            raise ValueError(f"head_dim_vo ({head_dim_vo}) must equal head_dim_qk ({head_dim_qk})")
        if not isinstance(num_qo_heads, int) or not isinstance(num_kv_heads, int) or num_kv_heads <= 0 or \
                num_qo_heads % num_kv_heads != 0:
            raise ValueError(f"num_qo_heads ({num_qo_heads}) must be a positive multiple of num_kv_heads ({num_kv_heads})")
        qo_lens = [b - a for a, b in zip(qo, qo[1:])]
        has_mask = custom_mask is not None or packed_custom_mask is not None
        opts = _check_options(head_dim_qk, causal, pos_encoding_mode, window_left, logits_soft_cap, sm_scale,
                              rope_scale, rope_theta, use_fp16_qk_reduction, self._backend, has_mask)
        q_dtype = _dtype_arg(q_data_type, torch.float16, "q_data_type")
        kv_dtype = _dtype_arg(kv_data_type, q_dtype, "kv_data_type")
        if kv_dtype != q_dtype:
            raise TypeError(f"kv_data_type {kv_dtype} must equal q_data_type {q_dtype}")
        _check_fp16qk(opts, "f16" if q_dtype == torch.float16 else "bf16")
        if opts.mask_mode == "causal":
            bad = [i for i, (a, b) in enumerate(zip(qo_lens, kv_lens)) if a > b]
            if bad:
                raise ValueError(f"causal=True needs qo_len <= kv_len for every request (bottom-right alignment); "
                                 f"request {bad[0]} has qo_len {qo_lens[bad[0]]} > kv_len {kv_lens[bad[0]]}")
        if opts.pos_encoding_mode == "ROPE_LLAMA" and kv_lens and max(kv_lens) > _MAX_ROPE_POSITION:
            raise ValueError(f"ROPE_LLAMA supports kv_len up to {_MAX_ROPE_POSITION}")
        dq = "f16" if q_dtype == torch.float16 else "bf16"
        spec = BatchPrefillSpec(head_dim=head_dim_qk, dtype_q=dq, dtype_kv=dq, dtype_o=dq, kv_storage=self._storage,
                                mask_mode=opts.mask_mode, pos_encoding_mode=opts.pos_encoding_mode,
                                use_window=opts.window_left >= 0, use_logits_soft_cap=opts.soft_cap > 0,
                                use_fp16_qk_reduction=opts.use_fp16_qk_reduction, backend=opts.backend)
        dev = self._device
        group = num_qo_heads // num_kv_heads
        mod = _module(spec)
        occ_of = lambda tile: _occupancy(spec, "flashinfer_batch_prefill_occupancy", dev.index, tile)  # noqa: E731
        ws_floats = self._ws.numel() * self._ws.element_size() // 4
        tile, work, merge, part_rows = _plan_schedule(qo_lens, kv_lens, group, num_kv_heads, head_dim_qk,
                                                      _batch_tiles(head_dim_qk)[:1] if self._use_cuda_graph
                                                      else _batch_tiles(head_dim_qk), occ_of, num_sms(dev.index),
                                                      opts.mask_mode == "causal", ws_floats, num_qo_heads)
        if part_rows * num_qo_heads * (head_dim_qk + 1) > ws_floats:
            raise workspace_too_small(self._ws.numel() * self._ws.element_size(),
                                      part_rows * num_qo_heads * (head_dim_qk + 1) * 4)
        # Custom masks: per request qo_len x kv_len bits, each request starting on a byte.
        mask_t = mask_indptr = None
        if has_mask:
            sizes = [a * b for a, b in zip(qo_lens, kv_lens)]
            nbytes = [(s + 7) // 8 for s in sizes]
            offs = [0]
            for n in nbytes:
                offs.append(offs[-1] + n)
            if packed_custom_mask is not None:
                m = packed_custom_mask
                if not isinstance(m, torch.Tensor) or m.dtype != torch.uint8:
                    raise TypeError("packed_custom_mask must be a uint8 tensor (from flashinfer.segment_packbits)")
                if m.dim() != 1 or m.numel() != offs[-1]:
                    raise ValueError(f"packed_custom_mask must hold sum(ceil(qo_len * kv_len / 8)) = {offs[-1]} bytes, "
                                     f"got {m.numel()}")
                mask_t = m.to(dev)
            else:
                m = custom_mask
                if not isinstance(m, torch.Tensor) or m.dtype != torch.bool:
                    raise TypeError("custom_mask must be a bool tensor (flattened per-request qo_len x kv_len masks)")
                if m.numel() != sum(sizes):
                    raise ValueError(f"custom_mask must hold sum(qo_len * kv_len) = {sum(sizes)} elements, got {m.numel()}")
                seg = [0]
                for s_ in sizes:
                    seg.append(seg[-1] + s_)
                mask_t, _ = segment_packbits(m.reshape(-1).to(dev), torch.tensor(seg, dtype=torch.int64),
                                             bitorder="little")
            if mask_t.numel() == 0:
                mask_t = torch.zeros(1, dtype=torch.uint8, device=dev)
            if offs[-1] > INT32_MAX // 8:  # the kernel addresses mask bits with 32-bit offsets
                raise ValueError(f"the custom mask holds {offs[-1]} bytes; at most {INT32_MAX // 8} are supported")
            mask_indptr = self._to_device_int(offs, None, "mask_indptr", non_blocking)
        # Schedule -> one int32 buffer: [num_work, num_merge, work[5][cap_w], merge[4][cap_m]]
        if self._use_cuda_graph:
            cap_w, cap_m = _GRAPH_WORK_CAPACITY, _GRAPH_MERGE_CAPACITY
            if len(work) > cap_w or len(merge) > cap_m:
                raise ValueError(f"batch too large for the CUDA-graph schedule capacity ({len(work)} > {cap_w} work "
                                 f"items or {len(merge)} > {cap_m} merge rows)")
        else:
            cap_w, cap_m = max(1, len(work)), max(1, len(merge))
        flat = [len(work), len(merge)] + [0] * (5 * cap_w + 4 * cap_m)
        for i, w in enumerate(work):
            for f in range(5):
                flat[2 + f * cap_w + i] = w[f]
        mb = 2 + 5 * cap_w
        for i, mrow in enumerate(merge):
            for f in range(4):
                flat[mb + f * cap_m + i] = mrow[f]
        if self._use_cuda_graph and self._int_buf is None:
            self._int_buf = torch.empty(len(flat), dtype=torch.int32, device=dev)
        ibuf = self._to_device_int(flat, self._int_buf if self._use_cuda_graph else None, "schedule", non_blocking)
        slots = occ_of(tile) * num_sms(dev.index)
        if self._use_cuda_graph:
            if self._grid_x is None:
                self._grid_x = max(1, -(-slots // num_kv_heads))
                self._merge_grid_x = 4 * num_sms(dev.index)
            grid_x, merge_grid_x = self._grid_x, self._merge_grid_x
        else:
            grid_x, merge_grid_x = len(work), len(merge)
        qo_dev = self._to_device_int(qo, self._qo_indptr_buf, "qo_indptr", non_blocking)
        self._plan = dict(spec=spec, mod=mod, opts=opts, tile=tile, qo=qo, qo_dev=qo_dev, total_q=qo[-1],
                          num_qo_heads=num_qo_heads, num_kv_heads=num_kv_heads, head_dim=head_dim_qk,
                          q_dtype=q_dtype, ibuf=ibuf, cap_w=cap_w, cap_m=cap_m, grid_x=grid_x,
                          merge_grid_x=merge_grid_x, part_rows=part_rows, mask=mask_t, mask_indptr=mask_indptr,
                          num_work=len(work), num_merge=len(merge))
        return self._plan

    def _launch(self, q, k, v, strides, kv_indptr_dev, kv_indices_dev, last_dev, page_size, out, lse, return_lse,
                sm_scale_mult: float = 1.0, num_pages: int = 0):
        pl = self._plan
        if pl is None:
            raise RuntimeError("call plan() before run()")
        if torch.cuda.is_current_stream_capturing() and not self._use_cuda_graph:
            raise RuntimeError("this wrapper was not built for CUDA graphs (use_cuda_graph=False): its plan() "
                               "buffers move between plans, so a captured run() would replay stale schedules; "
                               "construct it with use_cuda_graph=True and fixed buffers")
        check_tensor(q, "q", 3)
        device = check_same_device([("q", q), ("k", k), ("v", v), ("out", out), ("lse", lse)])
        if device != self._device:
            raise ValueError(f"q is on {device} but the wrapper's workspace is on {self._device}")
        if q.dtype != pl["q_dtype"] or k.dtype != q.dtype or v.dtype != q.dtype:
            raise TypeError(f"q/k/v dtypes {q.dtype}/{k.dtype}/{v.dtype} differ from the planned {pl['q_dtype']}")
        exp_q = (pl["total_q"], pl["num_qo_heads"], pl["head_dim"])
        if tuple(q.shape) != exp_q:
            raise ValueError(f"q must have shape [qo_indptr[-1], num_qo_heads, head_dim] = {list(exp_q)}, "
                             f"got {tuple(q.shape)}")
        if q.stride(-1) != 1:
            q = q.contiguous()
        check_vector_rows(q, "q", 2)
        check_out(out, "out", exp_q, q.dtype, device)
        check_out(lse, "lse", exp_q[:2], torch.float32, device)
        o = out if out is not None else torch.empty(exp_q, dtype=q.dtype, device=device)
        if return_lse and lse is None:
            lse = torch.empty(exp_q[:2], dtype=torch.float32, device=device)
        if pl["total_q"] == 0:
            return (o, lse) if return_lse else o
        opts = pl["opts"]
        ws = self._ws
        ws_f = ws.data_ptr()
        # partial lse at a fixed place (the workspace's tail), so a graph captured under one plan stays valid under
        # the next: plan() guarantees part_rows * heads * (head_dim + 1) floats fit, so the two never overlap.
        ws_floats = ws.numel() * ws.element_size() // 4
        part_lse = ws_f + 4 * (ws_floats - ws_floats // (pl["head_dim"] + 1))
        ib = pl["ibuf"].data_ptr()
        cap_w, cap_m = pl["cap_w"], pl["cap_m"]
        mod = pl["mod"]
        rc = mod.fn("flashinfer_batch_prefill")(
            pl["tile"], q.data_ptr(), k.data_ptr(), v.data_ptr(), o.data_ptr(),
            lse.data_ptr() if (return_lse and lse is not None) else None, ws_f, part_lse,
            pl["mask"].data_ptr() if pl["mask"] is not None else None,
            pl["mask_indptr"].data_ptr() if pl["mask_indptr"] is not None else None,
            pl["qo_dev"].data_ptr(), kv_indptr_dev.data_ptr(),
            kv_indices_dev.data_ptr() if kv_indices_dev is not None else None,
            last_dev.data_ptr() if last_dev is not None else None,
            ib + 8, cap_w, ib, ib + 8 + 5 * cap_w * 4, cap_m, ib + 4,
            pl["grid_x"], pl["merge_grid_x"], pl["num_qo_heads"], pl["num_kv_heads"], page_size,
            num_pages, q.stride(0), q.stride(1), *strides,
            opts.window_left, opts.soft_cap, opts.sm_scale * sm_scale_mult, opts.rope_scale, opts.rope_theta,
            device.index, current_stream_ptr(device),
        )
        if rc:
            mod.check(rc, f"batch prefill ({pl['spec'].name()}) on {device}")
        return (o, lse) if return_lse else o

    # Legacy names.
    def begin_forward(self, *args, **kwargs):
        return self.plan(*args, **kwargs)

    def end_forward(self) -> None:
        pass

    def forward(self, *args, return_lse: bool = False, out=None, lse=None, **ignored):
        return self.run(*args, out=out, lse=lse, return_lse=return_lse)

    def forward_return_lse(self, *args, **kwargs):
        kwargs.pop("return_lse", None)
        return self.forward(*args, return_lse=True, **kwargs)

    def run_return_lse(self, *args, **kwargs):
        kwargs["return_lse"] = True
        return self.run(*args, **kwargs)


class BatchPrefillWithRaggedKVCacheWrapper(_BatchPrefillBase):
    """Batch prefill where request r's keys/values are rows kv_indptr[r]:kv_indptr[r+1] of k/v
    (``[total_kv, num_kv_heads, head_dim]`` for NHD, ``[num_kv_heads, total_kv, head_dim]`` for HND)."""

    _storage = "ragged"

    def __init__(self, float_workspace_buffer: torch.Tensor, kv_layout: str = "NHD", use_cuda_graph: bool = False,
                 qo_indptr_buf: Optional[torch.Tensor] = None, kv_indptr_buf: Optional[torch.Tensor] = None,
                 custom_mask_buf: Optional[torch.Tensor] = None, mask_indptr_buf: Optional[torch.Tensor] = None,
                 backend: str = "auto", jit_args=None) -> None:
        super().__init__(float_workspace_buffer, kv_layout, use_cuda_graph, backend)
        if use_cuda_graph and (qo_indptr_buf is None or kv_indptr_buf is None):
            raise ValueError("use_cuda_graph=True needs fixed qo_indptr_buf and kv_indptr_buf (int32, batch_size + 1)")
        self._qo_indptr_buf = qo_indptr_buf
        self._kv_indptr_buf = kv_indptr_buf

    def plan(self, qo_indptr, kv_indptr, num_qo_heads: int, num_kv_heads: int, head_dim_qk: int,
             head_dim_vo: Optional[int] = None, custom_mask=None, packed_custom_mask=None, causal: bool = False,
             pos_encoding_mode: str = "NONE", use_fp16_qk_reduction: bool = False, window_left: int = -1,
             logits_soft_cap: Optional[float] = None, sm_scale: Optional[float] = None,
             rope_scale: Optional[float] = None, rope_theta: Optional[float] = None, q_data_type="float16",
             kv_data_type=None, non_blocking: bool = True) -> None:
        kv = _host_ints(kv_indptr, "kv_indptr")
        check_int32_values(kv, "kv_indptr")
        if len(kv) < 1 or kv[0] != 0 or any(b < a for a, b in zip(kv, kv[1:])):
            raise ValueError("kv_indptr must start at 0 and be non-decreasing")
        kv_lens = [b - a for a, b in zip(kv, kv[1:])]
        pl = self._plan_common(qo_indptr, kv_lens, num_qo_heads, num_kv_heads, head_dim_qk, head_dim_vo, custom_mask,
                               packed_custom_mask, causal, pos_encoding_mode, use_fp16_qk_reduction, sm_scale,
                               window_left, logits_soft_cap, rope_scale, rope_theta, q_data_type, kv_data_type,
                               non_blocking, None)
        pl["kv_dev"] = self._to_device_int(kv, self._kv_indptr_buf, "kv_indptr", non_blocking)
        pl["total_kv"] = kv[-1]

    begin_forward = plan

    def run(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, out: Optional[torch.Tensor] = None,
            lse: Optional[torch.Tensor] = None, return_lse: bool = False):
        pl = self._plan
        if pl is None:
            raise RuntimeError("call plan() before run()")
        check_tensor(k, "k", 3)
        check_tensor(v, "v", 3)
        if k.shape != v.shape:
            raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
        if self._kv_layout == "NHD":
            exp = (pl["total_kv"], pl["num_kv_heads"], pl["head_dim"])
            strides = (0, k.stride(0), k.stride(1), 0, v.stride(0), v.stride(1))
        else:
            exp = (pl["num_kv_heads"], pl["total_kv"], pl["head_dim"])
            strides = (0, k.stride(1), k.stride(0), 0, v.stride(1), v.stride(0))
        if tuple(k.shape) != exp:
            raise ValueError(f"k must have shape {list(exp)} ({self._kv_layout}), got {tuple(k.shape)}")
        check_vector_rows(k, "k", 2)
        check_vector_rows(v, "v", 2)
        return self._launch(q, k, v, strides, pl["kv_dev"], None, None, 1, out, lse, return_lse)


def _unpack_paged_cache(paged_kv_cache, kv_layout: str):
    if isinstance(paged_kv_cache, (tuple, list)):
        if len(paged_kv_cache) != 2:
            raise ValueError("paged_kv_cache tuple must be (k_cache, v_cache)")
        k, v = paged_kv_cache
        check_tensor(k, "k_cache", 4)
        check_tensor(v, "v_cache", 4)
    else:
        check_tensor(paged_kv_cache, "paged_kv_cache", 5)
        if paged_kv_cache.shape[1] != 2:
            raise ValueError(f"paged_kv_cache must be [num_pages, 2, ...], got {tuple(paged_kv_cache.shape)}")
        k, v = paged_kv_cache[:, 0], paged_kv_cache[:, 1]
    if k.shape != v.shape:
        raise ValueError(f"k and v caches must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if kv_layout == "NHD":  # [pages, page_size, heads, dim]
        page_size, heads = k.shape[1], k.shape[2]
        strides = (k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2))
    else:  # [pages, heads, page_size, dim]
        page_size, heads = k.shape[2], k.shape[1]
        strides = (k.stride(0), k.stride(2), k.stride(1), v.stride(0), v.stride(2), v.stride(1))
    return k, v, page_size, heads, strides


class BatchPrefillWithPagedKVCacheWrapper(_BatchPrefillBase):
    """Batch prefill over a paged KV cache: request r's pages are paged_kv_indices[paged_kv_indptr[r]:...],
    its last page holding paged_kv_last_page_len[r] tokens. The cache is one tensor ``[num_pages, 2, page_size,
    num_kv_heads, head_dim]`` (NHD; HND swaps page_size and heads) or a tuple (k_cache, v_cache)."""

    _storage = "paged"

    def __init__(self, float_workspace_buffer: torch.Tensor, kv_layout: str = "NHD", use_cuda_graph: bool = False,
                 qo_indptr_buf: Optional[torch.Tensor] = None, paged_kv_indptr_buf: Optional[torch.Tensor] = None,
                 paged_kv_indices_buf: Optional[torch.Tensor] = None,
                 paged_kv_last_page_len_buf: Optional[torch.Tensor] = None,
                 custom_mask_buf: Optional[torch.Tensor] = None, mask_indptr_buf: Optional[torch.Tensor] = None,
                 backend: str = "auto", jit_args=None) -> None:
        super().__init__(float_workspace_buffer, kv_layout, use_cuda_graph, backend)
        if use_cuda_graph and any(b is None for b in (qo_indptr_buf, paged_kv_indptr_buf, paged_kv_indices_buf,
                                                      paged_kv_last_page_len_buf)):
            raise ValueError("use_cuda_graph=True needs fixed qo_indptr_buf, paged_kv_indptr_buf, "
                             "paged_kv_indices_buf and paged_kv_last_page_len_buf (int32 device tensors)")
        self._qo_indptr_buf = qo_indptr_buf
        self._kv_indptr_buf = paged_kv_indptr_buf
        self._kv_indices_buf = paged_kv_indices_buf
        self._last_buf = paged_kv_last_page_len_buf

    def plan(self, qo_indptr, paged_kv_indptr, paged_kv_indices, paged_kv_last_page_len, num_qo_heads: int,
             num_kv_heads: int, head_dim_qk: int, page_size: int, head_dim_vo: Optional[int] = None,
             custom_mask=None, packed_custom_mask=None, causal: bool = False, pos_encoding_mode: str = "NONE",
             use_fp16_qk_reduction: bool = False, sm_scale: Optional[float] = None, window_left: int = -1,
             logits_soft_cap: Optional[float] = None, rope_scale: Optional[float] = None,
             rope_theta: Optional[float] = None, q_data_type="float16", kv_data_type=None,
             non_blocking: bool = True) -> None:
        ind = _host_ints(paged_kv_indptr, "paged_kv_indptr")
        last = _host_ints(paged_kv_last_page_len, "paged_kv_last_page_len")
        check_int32_values(ind, "paged_kv_indptr")
        check_int32_values(last, "paged_kv_last_page_len")
        if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size <= 0:
            raise ValueError(f"page_size must be a positive int, got {page_size!r}")
        if len(ind) < 1 or ind[0] != 0 or any(b < a for a, b in zip(ind, ind[1:])):
            raise ValueError("paged_kv_indptr must start at 0 and be non-decreasing")
        if len(last) != len(ind) - 1:
            raise ValueError(f"paged_kv_last_page_len has {len(last)} entries, expected {len(ind) - 1} "
                             f"(one per request of paged_kv_indptr)")
        kv_lens = []
        for r, (a, b) in enumerate(zip(ind, ind[1:])):
            if b > a and not (1 <= last[r] <= page_size):
                raise ValueError(f"paged_kv_last_page_len[{r}] = {last[r]} must be in [1, page_size={page_size}]")
            kv_lens.append((b - a - 1) * page_size + last[r] if b > a else 0)
        if not isinstance(paged_kv_indices, torch.Tensor) or paged_kv_indices.dim() != 1:
            raise ValueError("paged_kv_indices must be a 1-D int32 tensor")
        if paged_kv_indices.numel() < ind[-1]:
            raise ValueError(f"paged_kv_indices has {paged_kv_indices.numel()} entries, paged_kv_indptr needs {ind[-1]}")
        # CPU ids: negatives and int32 overflow fail here, the largest is compared with the cache in run();
        # device ids: bounded by the kernel (FLASHINFER_CHECK_INPUTS=1 checks them in run()).
        idx, max_index = page_ids_int32(paged_kv_indices, ind[-1], "paged_kv_indices")
        pl = self._plan_common(qo_indptr, kv_lens, num_qo_heads, num_kv_heads, head_dim_qk, head_dim_vo, custom_mask,
                               packed_custom_mask, causal, pos_encoding_mode, use_fp16_qk_reduction, sm_scale,
                               window_left, logits_soft_cap, rope_scale, rope_theta, q_data_type, kv_data_type,
                               non_blocking, None)
        pl["kv_dev"] = self._to_device_int(ind, self._kv_indptr_buf, "paged_kv_indptr", non_blocking)
        if self._kv_indices_buf is not None:
            if self._kv_indices_buf.numel() < idx.numel():
                raise ValueError("paged_kv_indices_buf is smaller than paged_kv_indices")
            if idx.numel() and idx.data_ptr() != self._kv_indices_buf.data_ptr():  # (already there: no self-copy)
                self._kv_indices_buf[: idx.numel()].copy_(idx, non_blocking=non_blocking)
            pl["indices_dev"] = self._kv_indices_buf
        else:
            pl["indices_dev"] = idx.to(self._device, non_blocking=non_blocking) if idx.numel() else \
                torch.zeros(1, dtype=torch.int32, device=self._device)
        pl["last_dev"] = self._to_device_int(last, self._last_buf, "paged_kv_last_page_len", non_blocking)
        pl["page_size"] = page_size
        pl["max_index"] = max_index
        pl["nnz_pages"] = ind[-1]

    begin_forward = plan

    def run(self, q: torch.Tensor, paged_kv_cache, *, out: Optional[torch.Tensor] = None,
            lse: Optional[torch.Tensor] = None, return_lse: bool = False):
        pl = self._plan
        if pl is None:
            raise RuntimeError("call plan() before run()")
        k, v, page_size, heads, strides = _unpack_paged_cache(paged_kv_cache, self._kv_layout)
        if page_size != pl["page_size"] or heads != pl["num_kv_heads"] or k.shape[-1] != pl["head_dim"]:
            raise ValueError(f"paged_kv_cache page_size/heads/head_dim ({page_size}, {heads}, {k.shape[-1]}) differ "
                             f"from the plan ({pl['page_size']}, {pl['num_kv_heads']}, {pl['head_dim']}) for "
                             f"kv_layout {self._kv_layout}")
        check_vector_rows(k, "k_cache", 3)
        check_vector_rows(v, "v_cache", 3)
        return self._run_kv(q, k, v, strides, out, lse, return_lse)

    def _run_kv(self, q, k, v, strides, out, lse, return_lse, sm_scale_mult: float = 1.0):
        """run() on a validated cache taken apart: K/V views and their (page, token, head) strides twice."""
        pl = self._plan
        num_pages = k.shape[0]
        check_page_ids_in_cache(pl["indices_dev"][: pl["nnz_pages"]], num_pages, pl["max_index"], "paged_kv_indices")
        return self._launch(q, k, v, strides, pl["kv_dev"], pl["indices_dev"], pl["last_dev"], pl["page_size"], out,
                            lse, return_lse, sm_scale_mult, num_pages)


# Legacy FlashInfer aliases (the CUDA-graph variants are the same classes with use_cuda_graph=True).
BatchPrefillWithPagedKVCacheWrapper.forward.__doc__ = "Legacy alias of run()."


def decode_with_tensor_cores(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_layout: str = "NHD",
                             pos_encoding_mode: str = "NONE", window_left: int = -1,
                             logits_soft_cap: Optional[float] = None, sm_scale: Optional[float] = None,
                             rope_scale: Optional[float] = None, rope_theta: Optional[float] = None,
                             return_lse: bool = False, *, q_scale: Optional[float] = None,
                             k_scale: Optional[float] = None, v_scale: Optional[float] = None,
                             out: Optional[torch.Tensor] = None, lse: Optional[torch.Tensor] = None):
    """Single-request decode (q ``[num_qo_heads, head_dim]``) through the tensor-core prefill kernel, the GQA
    group's heads packed as query rows (what FlashInfer does for ``use_tensor_cores=True``).

    q_scale and k_scale fold into the logit scale, v_scale multiplies the output; ``out`` ``[num_qo_heads,
    head_dim]`` and ``lse`` ``[num_qo_heads]`` (float32) are optional preallocated outputs. Returns o, or
    ``(o, lse)`` with ``return_lse=True``."""
    check_tensor(q, "q", 2)
    scale = scalar(sm_scale, "sm_scale", 1.0 / math.sqrt(q.shape[1]))
    scale *= scalar(q_scale, "q_scale", 1.0) * scalar(k_scale, "k_scale", 1.0)
    out_scale = scalar(v_scale, "v_scale", 1.0)
    check_out(out, "out", tuple(q.shape), q.dtype, q.device)
    check_out(lse, "lse", (q.shape[0],), torch.float32, q.device)
    q = aligned_rows(q, 1)  # the prefill kernel loads q rows with 16-byte vectors; decode accepts any view
    res = single_prefill_with_kv_cache(q.unsqueeze(0), k, v, kv_layout=kv_layout, pos_encoding_mode=pos_encoding_mode,
                                       window_left=window_left, logits_soft_cap=logits_soft_cap, sm_scale=scale,
                                       rope_scale=rope_scale, rope_theta=rope_theta, return_lse=return_lse,
                                       out=None if out is None else out.unsqueeze(0),
                                       lse=None if lse is None else lse.unsqueeze(0))
    o3, lse2 = res if return_lse else (res, None)
    o = out if out is not None else o3[0]
    if out_scale != 1.0:
        o.mul_(out_scale)
    if not return_lse:
        return o
    return o, (lse if lse is not None else lse2[0])
