"""Prefill attention on tensor cores: a request's new query tokens attend to its KV (single or batched).

``single_prefill_with_kv_cache``, ``single_prefill_with_kv_cache_return_lse``,
``BatchPrefillWithRaggedKVCacheWrapper`` and ``BatchPrefillWithPagedKVCacheWrapper`` are drop-ins for FlashInfer's
names in ``flashinfer.prefill``. Kernels: ``"fa2"`` (templates/include/flashinfer/attention/prefill.cuh; mma.sync
m16n8k16, ldmatrix from swizzled shared memory, cp.async double buffering, fp32 online softmax; every feature,
sm_80+) and ``"fa3"`` (prefill_sm90.cuh; Hopper wgmma, single-request prefill at head_dim 128 without masks
beyond causal or logit transforms); ``"fa3_ws"`` (prefill_sm90_ws.cuh; fa3's scope, single prefill with 16-bit or fp8
K/V (widened by its producer), where "auto" prefers it to fa3, and
``BatchPrefillWithRaggedKVCacheWrapper`` with 16-bit K/V, opt-in) is the warp-specialised Hopper kernel: TMA producer warpgroup, two wgmma consumer warpgroups,
persistent grid.

The batch wrappers plan in Python (flashinfer/_planning.py: ``schedule_prefill``) and keep FlashInfer's
attention options on the wrapper (``_causal``, ``_sm_scale``, ``_window_left``, ``_logits_soft_cap``,
``_pos_encoding_mode``, ``_use_fp16_qk_reduction``, ``_rope_scale``, ``_rope_theta``): ``plan()`` sets them, the
legacy ``forward()`` replaces them, and ``run()`` launches the kernel variant they ask for, on the planned
schedule, without a new plan.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import itertools
import math
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

from . import jit
from ._planning import (
    BATCH_PREFILL_ARGS,
    BatchPlan,
    PlanStats,
    PrefillSchedule,
    PrefillScheduleLayout,
    c_struct,
    check_table_lengths,
    prefill_query_tiles,
    schedule_prefill,
)
from ._spec_common import FP8_KV_DTYPES, AttentionSpec
from .jit.abi import Launcher
from .jit.spec import Spec, register_family
from .page import PagedKVCache, _unpack_paged_kv_cache
from .quantization import packbits, segment_packbits
from .utils import (
    INT32_MAX,
    KV_DTYPE_SHORT,
    MAX_ROPE_POSITION,
    aligned_rows,
    canonical_dtype,
    canonical_layout,
    canonical_pos_encoding,
    check_head_dim,
    check_kv,
    check_kv_dtypes,
    check_kv_lengths,
    check_logit_options,
    check_out,
    check_page_ids_in_cache,
    check_same_device,
    check_tensor,
    check_vector_rows,
    cuda_bool,
    current_stream_ptr,
    dtype_short,
    host_int32,
    not_supported,
    num_sms,
    page_ids_int32,
    plan_dtypes,
    scalar,
    tracing,
    workspace_too_small,
)

__all__ = [
    "BatchPrefillSpec",
    "BatchPrefillWithPagedKVCacheWrapper",
    "BatchPrefillWithRaggedKVCacheWrapper",
    "SinglePrefillSpec",
    "single_prefill_with_kv_cache",
    "single_prefill_with_kv_cache_return_lse",
]

MASK_MODES = ("none", "causal", "custom")
_MASK_CUDA = {"none": "kNone", "causal": "kCausal", "custom": "kCustom"}
# Implemented backends; "auto" picks per call.
BACKENDS = ("fa2", "fa3")  # fa2: mma.sync (sm_80+); fa3: Hopper wgmma (sm_90a), single prefill within _fa3_scope
# fa3_ws: the warp-specialised Hopper kernel (prefill_sm90_ws.cuh: TMA producer, two wgmma consumer warpgroups,
# persistent grid), single prefill and ragged and paged batch prefill within _fa3_scope. For single prefill "auto" takes
# it wherever it would take fa3 and fa3_ws applies: 1.06-1.46x fa3's speed on every row of bench_prefill --ws
# (H200, 2026-11-30, 32/32 and 32/8 heads, 2048-16384 tokens, full and causal), all its GPU tests passing. For
# batch prefill "auto" takes it where it applies (paged: pages it copies as TMA boxes) and its query
# tiles fill the GPU or are at least half full (keys then split; see _auto_fa3_ws: 1.3-1.9x fa2 on every measured
# batch but decode-like ones, which are equal). fp8 K/V (single prefill): its producer
# widens the TMA-copied fp8 tiles through registers, e4m3/bf16 TFLOP/s 1.02-1.04 (H200, 8192 full and causal,
# 16384 full, 32/8 heads; fa3, which widens under its own wgmmas, measured 0.66 of fa3_ws bf16 on 8192 causal), and
# "auto" takes it for fp8 as for 16-bit K/V (its GPU test matrix passed: 127 tests, tile edges, HND, e5m2, f16 q).
SINGLE_BACKENDS = BACKENDS + ("fa3_ws",)
# KV chunks of a single prefill shorter than this cost more to merge than they gain in parallelism.
_MIN_CHUNK = 512
_MAX_CHUNKS = 64


def _mq(head_dim: int) -> int:
    """16-row MMA tiles per warp of the single-prefill kernel (a choice stamped into the template): query tiles
    of 128 packed rows, 64 for head_dim 256 (a 128-row tile's accumulators do not fit in registers there)."""
    return 1 if head_dim >= 256 else 2


def _resolve_backend(backend: str) -> str:
    """The canonical backend argument: "auto" (chosen per call), "fa2" or "fa3"."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    b = backend.lower()
    if b == "auto" or b in SINGLE_BACKENDS:
        return b
    if b in ("cudnn", "trtllm-gen", "cutlass", "cute-dsl"):
        raise NotImplementedError(
            f"prefill backend {backend!r} is not implemented; available: 'auto', {', '.join(map(repr, BACKENDS))}"
        )
    raise ValueError(f"backend must be 'auto' or one of {list(BACKENDS)}, got {backend!r}")


# Head dims of the Hopper kernels (fa3_ws at 64: one 64-column TMA box a tile, O in 32 accumulators; "auto" takes it
# there as at 128: H200, 32/32 heads, 8192 tokens, bench_prefill --ws, full 421-431 TFLOP/s against fa2's 295, causal
# 391-399 against 261, cuDNN 461-468 / 432-441).
_HOPPER_HEAD_DIMS = {"fa3": (128,), "fa3_ws": (128, 64)}


def _fa3_scope(
    head_dim: int,
    dtype_q: str,
    dtype_kv: str,
    dtype_o: str,
    mask_mode: str,
    pos_encoding_mode: str,
    use_window: bool,
    use_logits_soft_cap: bool,
    use_fp16_qk_reduction: bool,
    backend: str = "fa3",
) -> Optional[str]:
    """Why a Hopper kernel cannot run a configuration, or None when it can. fa3 and fa3_ws (``backend``, named in
    the reason) share one scope: head_dim 128 (fa3_ws also 64, 16-bit K/V), k and v in q's dtype or fp8 (fa3 widens
    fp8 under its wgmmas, fa3_ws's producer widens the tiles TMA copies), no mask or causal, no logit transforms."""
    if head_dim not in _HOPPER_HEAD_DIMS[backend]:
        return f"head_dim {head_dim} ({backend} takes {' or '.join(map(str, _HOPPER_HEAD_DIMS[backend]))})"
    if not (dtype_q == dtype_o and dtype_q in ("f16", "bf16") and dtype_kv in (dtype_q,) + FP8_KV_DTYPES):
        return f"mixed dtypes ({backend} takes one of float16/bfloat16 for q and output, k and v in it or fp8)"
    if dtype_kv in FP8_KV_DTYPES and head_dim != 128:
        return f"fp8 K/V at head_dim {head_dim} ({backend} reads fp8 K/V at head_dim 128)"
    if mask_mode not in ("none", "causal"):
        return f"mask_mode {mask_mode!r} ({backend} takes no mask or causal)"
    if pos_encoding_mode != "NONE" or use_window or use_logits_soft_cap or use_fp16_qk_reduction:
        return f"position encoding, sliding window, soft cap or fp16 QK reduction ({backend} takes none of them)"
    return None


def _tma_kv_refusal(k: torch.Tensor, v: torch.Tensor) -> Optional[str]:
    """Why fa3_ws cannot read k and v through TMA tensor maps, or None: a zero stride along the first two
    dimensions (an expanded view) is not one a tensor map describes. (16-byte aligned rows are checked for every
    backend.)"""
    for name, t in (("k", k), ("v", v)):
        shape, stride = t.shape, t.stride()
        if (shape[0] > 1 and stride[0] == 0) or (shape[1] > 1 and stride[1] == 0):
            return f"{name} has a zero stride {stride} (fa3_ws reads K/V with TMA)"
    return None


# Packed query rows per CTA that "auto" assumes of the fa3 kernel when deciding whether its tiles alone fill
# the GPU, before loading its module (which reports the real value, checked when it runs).
_FA3_QUERY_TILE = 128


def _ws_auto_tiles(qo_lens: Sequence[int], group: int, num_kv_heads: int, sms: int) -> bool:
    """Whether a batch's 128-row query tiles suit fa3_ws on "auto": they fill the GPU's `sms` SMs, or they are at
    least half full (the planner then splits long requests' keys to fill it). Measurements: _auto_fa3_ws."""
    tiles = sum(-(-q * group // _FA3_QUERY_TILE) for q in qo_lens)
    half_full = 2 * sum(qo_lens) * group >= tiles * _FA3_QUERY_TILE
    return tiles * num_kv_heads >= sms or half_full


def _ws_auto_page_size(page_size: int) -> bool:
    """Whether "auto" takes fa3_ws for a paged batch with this page size: the kernel copies its pages as TMA boxes
    (a multiple of 8 slots that divides the 128-key tile, or a multiple of it: sm90_ws_page_rows); other sizes are
    gathered row by row, which measured slower than fa2 (see _auto_fa3_ws)."""
    return page_size % 8 == 0 and (128 % page_size == 0 or page_size % 128 == 0)


@functools.cache
def _device_capability(index: int) -> Tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def _single_backend(
    backend: str,
    why_not_fa3: Optional[str],
    device: torch.device,
    qo_rows: int,
    num_kv_heads: int,
    why_not_fa3_ws: Optional[str] = None,
) -> str:
    """The kernel of a single-prefill call. "auto" on Hopper where the query tiles alone fill the GPU (neither
    Hopper kernel splits a single request's keys): fa3_ws where it applies (16-bit or fp8 K/V read by TMA; head_dim
    128, or 64 with 16-bit K/V), else fa3 where it applies (expanded views); fa2 otherwise (short queries, other
    GPUs, other features)."""
    if backend == "fa2":
        return "fa2"
    on_hopper = _device_capability(device.index) == (9, 0)
    if backend == "fa3_ws":
        if why_not_fa3_ws is not None:
            raise ValueError(f"backend='fa3_ws' cannot run this call: {why_not_fa3_ws}; use backend='fa2' or 'auto'")
        if not on_hopper:
            major, minor = _device_capability(device.index)
            raise ValueError(f"backend='fa3_ws' needs a Hopper GPU (sm_90); {device} is sm_{major}{minor}")
        return "fa3_ws"
    if backend == "fa3":
        if why_not_fa3 is not None:
            raise ValueError(f"backend='fa3' cannot run this call: {why_not_fa3}; use backend='fa2' or 'auto'")
        if not on_hopper:
            major, minor = _device_capability(device.index)
            raise ValueError(f"backend='fa3' needs a Hopper GPU (sm_90); {device} is sm_{major}{minor}")
        return "fa3"
    if on_hopper and -(-qo_rows // _FA3_QUERY_TILE) * num_kv_heads >= num_sms(device.index):
        if why_not_fa3_ws is None:
            return "fa3_ws"
        if why_not_fa3 is None:
            return "fa3"
    return "fa2"


class _PrefillSpecBase(AttentionSpec):
    own_axes = {"mask_mode": MASK_MODES, "backend": BACKENDS, "kv_storage": ("paged", "ragged")}
    # fp8 K/V: fa2 converts its MMA fragments in registers (widening tiles in shared memory with RoPE), fa3 widens
    # tiles in shared memory under its wgmmas, fa3_ws in its producer warpgroup (prefill.cuh, prefill_sm90.cuh,
    # prefill_sm90_ws.cuh); v_scale applied in the epilogue
    fp8_kv = True

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
        if self.backend not in self.own_axes["backend"]:
            return f"backend {self.backend!r} is not implemented"
        if self.backend == "fa3" and self.family != "prefill_single":
            return "the fa3 backend covers single-request prefill only"
        if self.backend in ("fa3", "fa3_ws"):
            why = _fa3_scope(
                self.head_dim,
                self.dtype_q,
                self.dtype_kv,
                self.dtype_o,
                self.mask_mode,
                self.pos_encoding_mode,
                self.use_window,
                self.use_logits_soft_cap,
                self.use_fp16_qk_reduction,
                self.backend,
            )
            if why is not None:
                return f"outside the {self.backend} backend's scope: {why}"
        return None

    def needs_sm90a(self) -> bool:
        return self.backend in ("fa3", "fa3_ws")


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

    own_axes = {**_PrefillSpecBase.own_axes, "backend": SINGLE_BACKENDS}
    family = "prefill_single"
    template = "single_prefill.cu.jinja"
    launchers = (
        Launcher(
            "flashinfer_single_prefill",
            "const void* q, const void* k, const void* v, void* o, float* lse, float* workspace, "
            "const uint8_t* mask, int qo_len, int kv_len, int num_qo_heads, int num_kv_heads, int64_t q_stride_n, "
            "int64_t q_stride_h, int64_t k_stride_n, int64_t k_stride_h, int64_t v_stride_n, int64_t v_stride_h, "
            "int num_chunks, int chunk_size, int window_left, float logits_soft_cap, float sm_scale, "
            "float v_scale, float rope_scale, float rope_theta, int device, void* stream",
        ),
        Launcher("flashinfer_single_prefill_occupancy", "int device, int* out"),
    )

    def render_vars(self) -> Dict[str, Any]:
        return {**self.attention_vars(), "mq": _mq(self.head_dim), "backend": self.backend}


@functools.cache
def _module(spec: Spec) -> jit.JITModule:
    return jit.load(spec)


@functools.cache
def _occupancy(spec: Spec, device_index: int, tile_q: int = 0) -> int:
    """CTAs per SM of a prefill module's kernel (the batch module's for query tile ``tile_q``)."""
    mod = _module(spec)
    out = ctypes.c_int(0)
    if isinstance(spec, SinglePrefillSpec):
        rc = mod.launcher("flashinfer_single_prefill_occupancy")(device=device_index, out=ctypes.addressof(out))
    else:
        rc = mod.launcher("flashinfer_batch_prefill_occupancy")(
            tile_q=tile_q, device=device_index, out=ctypes.addressof(out)
        )
    if rc:
        mod.check(rc, f"{spec.name()}: occupancy query on cuda:{device_index}")
    return max(1, out.value)


# --------------------------------------------------------------------------------------------- validation


@dataclasses.dataclass(frozen=True)
class _Opts:
    """Canonical attention options of a prefill call."""

    mask_mode: str
    pos_encoding_mode: str
    window_left: int
    soft_cap: float
    sm_scale: float
    rope_scale: float
    rope_theta: float
    use_fp16_qk_reduction: bool
    backend: str


def _check_options(
    head_dim: int,
    causal: bool,
    pos_encoding_mode,
    window_left,
    logits_soft_cap,
    sm_scale,
    rope_scale,
    rope_theta,
    use_fp16_qk_reduction,
    backend,
    has_mask: bool,
) -> _Opts:
    check_head_dim(head_dim)
    pos = canonical_pos_encoding(pos_encoding_mode)
    window_left, soft_cap, scale, r_scale, r_theta = check_logit_options(
        head_dim, pos, window_left, logits_soft_cap, sm_scale, rope_scale, rope_theta, max_window=INT32_MAX
    )
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if not isinstance(use_fp16_qk_reduction, bool):
        raise TypeError(f"use_fp16_qk_reduction must be a bool, got {type(use_fp16_qk_reduction).__name__}")
    mask_mode = "custom" if has_mask else ("causal" if causal else "none")
    return _Opts(
        mask_mode, pos, window_left, soft_cap, scale, r_scale, r_theta, use_fp16_qk_reduction, _resolve_backend(backend)
    )


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
            raise ValueError(
                f"all tensors must be on one device: q is on {device} but packed_custom_mask is on {m.device}"
            )
        return m.contiguous()
    if custom_mask is None:
        return None
    m = custom_mask
    if not isinstance(m, torch.Tensor):
        raise TypeError("custom_mask must be a torch.Tensor of bool")
    if m.dtype != torch.bool:
        raise TypeError(f"custom_mask must be a bool tensor (True: attend), got {m.dtype}")
    if m.numel() != rows * cols or (m.dim() == 2 and tuple(m.shape) != (rows, cols)) or m.dim() > 2:
        raise ValueError(
            f"custom_mask must have shape [qo_len, kv_len] = [{rows}, {cols}] (or be its flattening), "
            f"got {tuple(m.shape)}"
        )
    if m.device != device:
        raise ValueError(f"all tensors must be on one device: q is on {device} but custom_mask is on {m.device}")
    return packbits(m.reshape(-1), bitorder="little")


# ------------------------------------------------------------------------------------------ single prefill


def _single_chunks(
    spec: SinglePrefillSpec, device: torch.device, qo_len: int, kv_len: int, group: int, num_kv_heads: int
) -> Tuple[int, int]:
    """(num_chunks, chunk_size): split the KV range when the query tiles alone cannot fill the GPU."""
    c = _module(spec).constants
    bk = c["kv_tile"]
    ctas = -(-qo_len * group // c["query_tile"]) * num_kv_heads
    slots = _occupancy(spec, device.index) * num_sms(device.index)
    chunks = 1
    if ctas * 2 <= slots and kv_len >= 2 * _MIN_CHUNK:
        chunks = min(_MAX_CHUNKS, -(-slots // ctas), kv_len // _MIN_CHUNK)
    chunk = -(-kv_len // max(chunks, 1))
    chunk = max(bk, -(-chunk // bk) * bk)
    return max(1, -(-kv_len // chunk)), chunk


def _single_run(
    q, k, v, mask, kv_layout: str, opts: _Opts, o: torch.Tensor, lse: Optional[torch.Tensor], v_scale: float = 1.0
) -> None:
    """Launches the single-request kernel into o (and lse); the output is multiplied by v_scale (an fp8 kernel
    does it in its epilogue, with the softmax normalisation; a 16-bit one keeps its machine code and the
    multiplication runs after it)."""
    qo_len, num_qo_heads, head_dim = q.shape
    if kv_layout == "NHD":
        kv_len, num_kv_heads = k.shape[0], k.shape[1]
        k_sn, k_sh, v_sn, v_sh = k.stride(0), k.stride(1), v.stride(0), v.stride(1)
    else:
        num_kv_heads, kv_len = k.shape[0], k.shape[1]
        k_sn, k_sh, v_sn, v_sh = k.stride(1), k.stride(0), v.stride(1), v.stride(0)
    if qo_len == 0:
        return
    dq, dk = dtype_short(q, "q"), dtype_short(k, "k", allow_fp8=True)
    device = q.device
    group = num_qo_heads // num_kv_heads
    scope = (opts.mask_mode, opts.pos_encoding_mode, opts.window_left >= 0, opts.soft_cap > 0)
    why_not_fa3 = _fa3_scope(head_dim, dq, dk, dq, *scope, opts.use_fp16_qk_reduction, "fa3")
    why_not_fa3_ws = _fa3_scope(head_dim, dq, dk, dq, *scope, opts.use_fp16_qk_reduction, "fa3_ws")
    if why_not_fa3_ws is None and opts.backend in ("fa3_ws", "auto"):
        why_not_fa3_ws = _tma_kv_refusal(k, v)  # ("auto" then takes fa3)
    backend = _single_backend(opts.backend, why_not_fa3, device, qo_len * group, num_kv_heads, why_not_fa3_ws)
    spec = SinglePrefillSpec(
        head_dim=head_dim,
        dtype_q=dq,
        dtype_kv=dk,
        dtype_o=dq,
        mask_mode=opts.mask_mode,
        pos_encoding_mode=opts.pos_encoding_mode,
        use_window=opts.window_left >= 0,
        use_logits_soft_cap=opts.soft_cap > 0,
        use_fp16_qk_reduction=opts.use_fp16_qk_reduction,
        backend=backend,
    )
    mod = _module(spec)
    fp8 = dk in FP8_KV_DTYPES
    if backend in ("fa3", "fa3_ws"):
        num_chunks, chunk_size = 1, kv_len
    else:
        num_chunks, chunk_size = _single_chunks(spec, device, qo_len, kv_len, group, num_kv_heads)
    workspace = None
    if num_chunks > 1:
        workspace = torch.empty(num_chunks * qo_len * num_qo_heads * (head_dim + 1), dtype=torch.float32, device=device)
    rc = mod.launcher("flashinfer_single_prefill")(
        q=q.data_ptr(),
        k=k.data_ptr(),
        v=v.data_ptr(),
        o=o.data_ptr(),
        lse=lse.data_ptr() if lse is not None else None,
        workspace=workspace.data_ptr() if workspace is not None else None,
        mask=mask.data_ptr() if mask is not None else None,
        qo_len=qo_len,
        kv_len=kv_len,
        num_qo_heads=num_qo_heads,
        num_kv_heads=num_kv_heads,
        q_stride_n=q.stride(0),
        q_stride_h=q.stride(1),
        k_stride_n=k_sn,
        k_stride_h=k_sh,
        v_stride_n=v_sn,
        v_stride_h=v_sh,
        num_chunks=num_chunks,
        chunk_size=chunk_size,
        window_left=opts.window_left,
        logits_soft_cap=opts.soft_cap,
        sm_scale=opts.sm_scale,
        v_scale=v_scale if fp8 else 1.0,
        rope_scale=opts.rope_scale,
        rope_theta=opts.rope_theta,
        device=device.index,
        stream=current_stream_ptr(device),
    )
    if rc:
        mod.check(rc, f"single_prefill_with_kv_cache ({spec.name()}) on {device}")
    if v_scale != 1.0 and not fp8:
        o.mul_(v_scale)


@torch.library.custom_op("flashinfer::single_prefill", mutates_args=())
def _single_prefill_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: Optional[torch.Tensor],
    kv_layout: str,
    mask_mode: str,
    pos_encoding_mode: str,
    window_left: int,
    logits_soft_cap: float,
    sm_scale: float,
    rope_scale: float,
    rope_theta: float,
    use_fp16_qk_reduction: bool,
    backend: str,
    return_lse: bool,
    v_scale: float = 1.0,
) -> Tuple[torch.Tensor, torch.Tensor]:
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((q.shape[0], q.shape[1]) if return_lse else (0,), dtype=torch.float32, device=q.device)
    opts = _Opts(
        mask_mode,
        pos_encoding_mode,
        window_left,
        logits_soft_cap,
        sm_scale,
        rope_scale,
        rope_theta,
        use_fp16_qk_reduction,
        backend,
    )
    _single_run(q, k, v, mask, kv_layout, opts, o, lse if return_lse else None, v_scale)
    return o, lse


@_single_prefill_op.register_fake
def _single_prefill_fake(
    q,
    k,
    v,
    mask,
    kv_layout,
    mask_mode,
    pos_encoding_mode,
    window_left,
    logits_soft_cap,
    sm_scale,
    rope_scale,
    rope_theta,
    use_fp16_qk_reduction,
    backend,
    return_lse,
    v_scale=1.0,
):
    return q.new_empty(q.shape), q.new_empty((q.shape[0], q.shape[1]) if return_lse else (0,), dtype=torch.float32)


def single_prefill_with_kv_cache(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale_q: Optional[torch.Tensor] = None,
    scale_k: Optional[torch.Tensor] = None,
    scale_v: Optional[torch.Tensor] = None,
    o_dtype: Optional[torch.dtype] = None,
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
    kv_cache_sf: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
    k_scale: Optional[float] = None,
    v_scale: Optional[float] = None,
    *,
    out: Optional[torch.Tensor] = None,
    lse: Optional[torch.Tensor] = None,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Prefill attention of one request: qo_len new query tokens against kv_len keys on tensor cores.

    Parameters
    ----------
    q : torch.Tensor
        ``[qo_len, num_qo_heads, head_dim]``, float16 or bfloat16, on a CUDA device.
    k, v : torch.Tensor
        ``[kv_len, num_kv_heads, head_dim]`` (``kv_layout="NHD"``) or ``[num_kv_heads, kv_len, head_dim]`` (``"HND"``),
        q's dtype, or an fp8 cache (torch.float8_e4m3fn or torch.float8_e5m2, k and v the same one; the kernel
        computes in float16 then, rounding a bfloat16 q to it: exact for magnitudes from 2**-14 to 65504, larger
        ones clamp to 65504), dequantised by ``k_scale``/``v_scale``. Views are accepted when the
        last dimension is contiguous and the other strides are multiples of 16 bytes. ``num_qo_heads`` a multiple
        of ``num_kv_heads``; head_dim 64, 128 or 256. An fp8 q raises NotImplementedError.
    scale_q, scale_k, scale_v : torch.Tensor, optional
        FlashInfer's fp8 per-head scale tensors: not implemented (must be None; per-tensor scales go in
        k_scale/v_scale).
    o_dtype : torch.dtype, optional
        The output dtype: None or q's dtype.
    custom_mask : torch.Tensor, optional
        bool ``[qo_len, kv_len]`` (True: attend). A custom mask replaces ``causal``.
    packed_custom_mask : torch.Tensor, optional
        The flattened mask packed by ``flashinfer.packbits(..., bitorder="little")``; instead of custom_mask.
    causal : bool
        Query i attends to keys ``j <= kv_len - qo_len + i`` (aligned bottom-right); needs qo_len <= kv_len.
    kv_layout : str
        ``"NHD"`` or ``"HND"``.
    pos_encoding_mode : str
        ``"NONE"``, ``"ROPE_LLAMA"`` (RoPE on the fly: query i at position kv_len - qo_len + i, key j at j) or
        ``"ALIBI"``.
    use_fp16_qk_reduction : bool
        Accumulate q.k in fp16 (float16 inputs only): faster, less accurate.
    sm_scale : float, optional
        Logit scale, default ``1 / sqrt(head_dim)``.
    window_left : int
        ``w >= 0`` attends only to keys ``j >= pos(i) - w``; -1: no window.
    logits_soft_cap : float, optional
        ``c > 0`` maps each scaled logit x to ``c * tanh(x / c)``.
    rope_scale, rope_theta : float, optional
        RoPE constants (defaults 1 and 1e4).
    backend : str
        ``"auto"``, ``"fa2"`` (mma.sync tensor cores, any sm_80+ GPU) or ``"fa3"`` (Hopper wgmma; head_dim 128,
        float16/bfloat16, no mask or causal, no position encoding, window, soft cap or fp16 QK reduction).
        ``"auto"`` takes a Hopper kernel when the call is within fa3's scope and has enough query tiles to fill
        the GPU (fa3_ws where it applies to 16-bit K/V, else fa3), fa2 otherwise. ``"fa3_ws"`` (an extension over FlashInfer's
        values): the warp-specialised Hopper kernel (TMA loads by a producer warpgroup, two wgmma consumer
        warpgroups, persistent grid); fa3's scope (fp8 K/V included) without zero strides.
    return_lse : bool
        Also return lse ``[qo_len, num_qo_heads]`` float32, base-2 log-sum-exp of the scaled logits.
    kv_cache_sf : (torch.Tensor, torch.Tensor), optional
        FlashInfer's NVFP4 KV scale factors: not implemented (must be None).
    k_scale, v_scale : float or torch.Tensor, optional
        k_scale multiplies the logits (folded into the softmax scale, as FlashInfer does: it dequantises an fp8
        K), v_scale the output (it dequantises an fp8 V). A Python number or a one-element CPU tensor; a CUDA
        tensor raises TypeError (reading it would synchronize the device).
    out, lse : torch.Tensor, optional
        Preallocated outputs (contiguous; lse is written even with ``return_lse=False``); an extension over
        FlashInfer's signature.

    Returns
    -------
    torch.Tensor or (torch.Tensor, torch.Tensor)
        o ``[qo_len, num_qo_heads, head_dim]`` in q's dtype, or ``(o, lse)`` with ``return_lse=True``.
    """
    for name, t in (("scale_q", scale_q), ("scale_k", scale_k), ("scale_v", scale_v), ("kv_cache_sf", kv_cache_sf)):
        if t is not None:
            raise not_supported(
                name, "a tensor", "None (per-head scale tensors; k_scale/v_scale take per-tensor scales)"
            )
    check_tensor(q, "q", 3)
    check_tensor(k, "k", 3)
    check_tensor(v, "v", 3)
    device = check_same_device(
        [
            ("q", q),
            ("k", k),
            ("v", v),
            ("custom_mask", custom_mask),
            ("packed_custom_mask", packed_custom_mask),
            ("out", out),
            ("lse", lse),
        ]
    )
    kv_layout = canonical_layout(kv_layout)
    dq, _ = check_kv_dtypes(q, k, v, "single_prefill_with_kv_cache")
    if canonical_dtype(o_dtype, "o_dtype", q.dtype) != q.dtype:
        raise not_supported("o_dtype", o_dtype, f"None or q's dtype ({q.dtype})")
    qo_len, num_qo_heads, head_dim = q.shape
    has_mask = custom_mask is not None or packed_custom_mask is not None
    opts = _check_options(
        head_dim,
        causal,
        pos_encoding_mode,
        window_left,
        logits_soft_cap,
        sm_scale,
        rope_scale,
        rope_theta,
        use_fp16_qk_reduction,
        backend,
        has_mask,
    )
    logit_mult = scalar(k_scale, "k_scale", 1.0)
    out_scale = scalar(v_scale, "v_scale", 1.0)
    if logit_mult != 1.0:
        opts = dataclasses.replace(opts, sm_scale=opts.sm_scale * logit_mult)
    _check_fp16qk(opts, dq)
    kv_len, num_kv_heads = check_kv(k, v, kv_layout, num_qo_heads, head_dim)
    if opts.mask_mode == "causal" and qo_len > kv_len:
        raise ValueError(
            f"causal=True needs qo_len <= kv_len (the mask is aligned bottom-right); got qo_len={qo_len}, "
            f"kv_len={kv_len}"
        )
    if max(kv_len, qo_len * (num_qo_heads // num_kv_heads)) > INT32_MAX // 2:
        raise ValueError(f"sequence too long: qo_len {qo_len} x group, kv_len {kv_len} must stay below 2**30")
    if opts.pos_encoding_mode == "ROPE_LLAMA" and kv_len > MAX_ROPE_POSITION:
        raise ValueError(f"ROPE_LLAMA supports kv_len up to {MAX_ROPE_POSITION}, got {kv_len}")
    mask = _packed_mask(custom_mask, packed_custom_mask, qo_len, kv_len, device)
    if q.stride(-1) != 1:
        q = q.contiguous()
    check_vector_rows(q, "q", 2)
    check_vector_rows(k, "k", 2)
    check_vector_rows(v, "v", 2)
    check_out(out, "out", (qo_len, num_qo_heads, head_dim), q.dtype, device)
    check_out(lse, "lse", (qo_len, num_qo_heads), torch.float32, device)

    if tracing():
        o, lse_t = _single_prefill_op(
            q,
            k,
            v,
            mask,
            kv_layout,
            opts.mask_mode,
            opts.pos_encoding_mode,
            opts.window_left,
            opts.soft_cap,
            opts.sm_scale,
            opts.rope_scale,
            opts.rope_theta,
            opts.use_fp16_qk_reduction,
            opts.backend,
            return_lse or lse is not None,
            out_scale,
        )
        if out is not None:
            o = out.copy_(o)
        if lse is not None:
            lse_t = lse.copy_(lse_t)
        return (o, lse_t) if return_lse else o

    o = out if out is not None else torch.empty((qo_len, num_qo_heads, head_dim), dtype=q.dtype, device=device)
    if return_lse and lse is None:
        lse = torch.empty((qo_len, num_qo_heads), dtype=torch.float32, device=device)
    _single_run(q, k, v, mask, kv_layout, opts, o, lse, out_scale)
    return (o, lse) if return_lse else o


single_prefill_with_kv_cache_return_lse = functools.partial(single_prefill_with_kv_cache, return_lse=True)
single_prefill_with_kv_cache_return_lse.__doc__ = "``single_prefill_with_kv_cache(..., return_lse=True)``."


# ------------------------------------------------------------------------------------------- batch prefill


def _batch_tiles(head_dim: int) -> Tuple[int, ...]:
    """MMA row tiles per warp (16 rows each, 4 warps) instantiated per batch module: query tiles of 64 rows for
    short requests, 128 (as the single-request kernel) for long ones outside graph mode (the 128-row kernel
    takes one work item per CTA, so its grid is not fixed; see batch_prefill_kernel). head_dim 256 stays at
    64 rows: a 128-row tile's accumulators do not fit in registers."""
    return (1,) if head_dim >= 256 else (1, 2)


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

    own_axes = {**_PrefillSpecBase.own_axes, "backend": SINGLE_BACKENDS}
    family = "prefill_batch"
    template = "batch_prefill.cu.jinja"
    launchers = (
        # args: a BatchPrefillArgs (flashinfer/_planning.py: BATCH_PREFILL_ARGS, stamped into the template)
        Launcher("flashinfer_batch_prefill", "const void* args"),
        Launcher("flashinfer_batch_prefill_occupancy", "int tile_q, int device, int* out"),
    )

    name_prefix = ("kv_storage",)

    def render_vars(self) -> Dict[str, Any]:
        return {
            **self.attention_vars(),
            "paged": cuda_bool(self.kv_storage == "paged"),
            "mqs": list(_batch_tiles(self.head_dim)),
            "args": list(BATCH_PREFILL_ARGS),
            "backend": self.backend,
        }

    def unsupported_reason(self) -> Optional[str]:
        if self.kv_storage not in ("paged", "ragged"):
            return f"kv_storage must be 'paged' or 'ragged', got {self.kv_storage!r}"
        if self.backend == "fa3_ws" and self.dtype_kv in FP8_KV_DTYPES:
            return f"kv dtype {self.dtype_kv}: fa3_ws batch prefill takes k and v in q's dtype, no fp8 (fa2 reads fp8)"
        return super().unsupported_reason()


# fa3_ws batches: each request's work items together in the schedule (schedule_prefill's request_major), so that
# the persistent grid's CTAs work on few requests at a time and share their K/V in L2. (False: heaviest first over
# the whole batch, as fa2; benchmarks/probe_prefill.py --paged times both.)
_WS_REQUEST_MAJOR = True

# Fixed schedule capacities of CUDA-graph wrappers (the kernel reads the live counts from device memory).
_GRAPH_WORK_CAPACITY = 1 << 16
_GRAPH_MERGE_CAPACITY = 1 << 17

# The attention options of a prefill wrapper, as FlashInfer names its attributes; run() uses their current values.
_OPTION_ATTRS = (
    "_causal",
    "_pos_encoding_mode",
    "_use_fp16_qk_reduction",
    "_window_left",
    "_logits_soft_cap",
    "_sm_scale",
    "_rope_scale",
    "_rope_theta",
)


@functools.cache
def _args_type(module: jit.JITModule) -> Any:
    """The module's BatchPrefillArgs as a ctypes struct (checked against the layout it exports)."""
    return c_struct("BatchPrefillArgs", BATCH_PREFILL_ARGS, module.constants, "args")


@dataclasses.dataclass(frozen=True)
class _PrefillLaunch:
    """The run-time values of a batch prefill launch, resolved from the wrapper's attention options."""

    run: Any  # the launcher of the kernel variant
    module: jit.JITModule
    args_type: Any  # its BatchPrefillArgs ctypes struct
    window_left: int
    soft_cap: float
    sm_scale: float
    rope_scale: float
    rope_theta: float


def _launch_of(spec: BatchPrefillSpec, opts: _Opts) -> _PrefillLaunch:
    mod = _module(spec)
    return _PrefillLaunch(
        mod.launcher("flashinfer_batch_prefill"),
        mod,
        _args_type(mod),
        opts.window_left,
        opts.soft_cap,
        opts.sm_scale,
        opts.rope_scale,
        opts.rope_theta,
    )


def _check_fa3_ws_batch(spec: BatchPrefillSpec, device: torch.device) -> None:
    """Refuses (ValueError, with the reason) a batch plan or option change that the fa3_ws kernel cannot run."""
    why = spec.unsupported_reason()
    if why is not None:
        raise ValueError(f"backend='fa3_ws' cannot run this batch: {why}; use backend='fa2' or 'auto'")
    if _device_capability(device.index) != (9, 0):
        major, minor = _device_capability(device.index)
        raise ValueError(f"backend='fa3_ws' needs a Hopper GPU (sm_90); {device} is sm_{major}{minor}")


def _unsupported_plan_args(**named: Any) -> None:
    """FlashInfer plan() arguments of features not implemented here: refused unless left at their defaults."""
    for name, value in named.items():
        if value is not None and not (name == "token_pos_in_items_len" and value == 0):
            raise not_supported(
                name,
                value if not isinstance(value, torch.Tensor) else "a tensor",
                "its default (multi-item scoring, block tables and separate v/o offsets are not implemented)",
            )


class _BatchPrefillBase:
    """What the ragged and paged batch prefill wrappers share: the workspace, graph-mode buffers, the plan
    (through the Python planner) and the launch."""

    _storage = ""
    # Not part of FlashInfer's API: on fa3_ws, the SMs a plan schedules for and the persistent grid's CTAs at most
    # (0: every SM). The cascade bounds its shared level so that the decode level runs on the SMs left
    # (MultiLevelCascadeAttentionWrapper._run_overlapped). fa2 launches one CTA a piece and ignores it.
    _max_ctas: int = 0

    def __init__(
        self,
        float_workspace_buffer: torch.Tensor,
        kv_layout: str,
        use_cuda_graph: bool,
        qo_indptr_buf: Optional[torch.Tensor],
        custom_mask_buf: Optional[torch.Tensor],
        mask_indptr_buf: Optional[torch.Tensor],
        backend: str,
        jit_args: Any,
        jit_kwargs: Any,
    ) -> None:
        if jit_args is not None or jit_kwargs is not None:
            raise not_supported(
                "jit_args" if jit_args is not None else "jit_kwargs", "...", "None (the built-in kernels)"
            )
        b = _resolve_backend(backend)
        if b == "fa3":
            raise ValueError(
                "the fa3 backend covers single_prefill_with_kv_cache only; batch prefill runs on fa2 "
                "(backend='auto' or 'fa2')"
            )
        if b == "fa3_ws" and use_cuda_graph:
            raise ValueError(
                "backend='fa3_ws' has no CUDA-graph mode (its persistent grid and item count come from each plan on "
                "the host, and ragged K/V's TMA descriptors hold each run's address and row count); use "
                "use_cuda_graph=False, or backend='fa2' for graphs"
            )
        # "auto": fa2, or fa3_ws for a ragged batch, or a paged one with pages it copies as TMA boxes, that it runs
        # and whose query tiles fill a Hopper GPU or are half full (plan() decides, _auto_fa3_ws); fa3_ws by name
        # for any batch.
        self._backend = "fa3_ws" if b == "fa3_ws" else "fa2"
        self._auto = b == "auto"
        if not isinstance(float_workspace_buffer, torch.Tensor) or float_workspace_buffer.device.type != "cuda":
            raise ValueError("float_workspace_buffer must be a CUDA tensor (e.g. 128 MB of uint8)")
        self._float_workspace_buffer = float_workspace_buffer
        self._int_workspace_buffer: Optional[torch.Tensor] = None  # FlashInfer's second workspace: none needed here
        self._device = self.device = float_workspace_buffer.device
        self._kv_layout = canonical_layout(kv_layout)
        self._use_cuda_graph = bool(use_cuda_graph)
        for n, t in (
            ("qo_indptr_buf", qo_indptr_buf),
            ("custom_mask_buf", custom_mask_buf),
            ("mask_indptr_buf", mask_indptr_buf),
        ):
            if t is not None and not self._use_cuda_graph:
                raise ValueError(
                    f"{n} is one of CUDA-graph mode's fixed buffers: pass use_cuda_graph=True with it "
                    "(without it, plan() makes its own copies)"
                )
            if t is not None and (not isinstance(t, torch.Tensor) or t.device != self._device or t.dim() != 1):
                raise ValueError(f"{n} must be a 1-D tensor on {self._device}")
        if custom_mask_buf is not None and custom_mask_buf.dtype != torch.uint8:
            raise TypeError(f"custom_mask_buf must be uint8 (packed mask bits), got {custom_mask_buf.dtype}")
        # Graph mode's fixed buffers (plan() refills them; captured launches read them). FlashInfer's attributes
        # of the same names (_qo_indptr_buf, ...) hold the last plan's device tables in either mode.
        self._fixed_qo_indptr = qo_indptr_buf if self._use_cuda_graph else None
        self._qo_indptr_buf = qo_indptr_buf
        self._custom_mask_buf = custom_mask_buf
        self._mask_indptr_buf = mask_indptr_buf
        self._fixed_batch_size = qo_indptr_buf.numel() - 1 if use_cuda_graph and qo_indptr_buf is not None else 0
        self._plan_info: Optional[BatchPlan] = None
        self._schedule_buf: Optional[torch.Tensor] = None  # graph mode: the fixed schedule buffer
        self._grid: Optional[Tuple[int, int]] = None  # graph mode: (grid_x, merge_grid_x), fixed at the first plan
        self._frozen_spec: Optional[BatchPrefillSpec] = None
        for a in _OPTION_ATTRS:
            setattr(self, a, None)

    @property
    def is_cuda_graph_enabled(self) -> bool:
        """Whether the wrapper was built for CUDA graphs (fixed buffers)."""
        return self._use_cuda_graph

    @property
    def plan_stats(self) -> Dict[str, int]:
        """The last plan's schedule: work items (pieces), merges, partial states, total keys, workspace bytes."""
        if self._plan_info is None:
            raise RuntimeError("plan() has not been called")
        return self._plan_info.get_stats().as_dict()

    def reset_workspace_buffer(
        self, float_workspace_buffer: torch.Tensor, int_workspace_buffer: Optional[torch.Tensor] = None
    ) -> None:
        """Replace the workspace (same device); the next run() needs a new plan().

        Parameters
        ----------
        float_workspace_buffer : torch.Tensor
            The new workspace, a contiguous CUDA tensor on the wrapper's device.
        int_workspace_buffer : torch.Tensor, optional
            FlashInfer's second (integer) workspace: None or a tensor on the same device (this implementation
            keeps its schedule elsewhere).
        """
        if self._use_cuda_graph:
            raise RuntimeError(
                "reset_workspace_buffer: a CUDA-graph wrapper's workspace is fixed (captured graphs point at it)"
            )
        for n, t in (
            ("float_workspace_buffer", float_workspace_buffer),
            ("int_workspace_buffer", int_workspace_buffer),
        ):
            if t is not None and (not isinstance(t, torch.Tensor) or t.device != self._device):
                raise ValueError(f"{n} must be a tensor on {self._device}")
        self._float_workspace_buffer = float_workspace_buffer
        self._int_workspace_buffer = int_workspace_buffer
        self._plan_info = None

    def _to_device_int(
        self, values: Sequence[int], buf: Optional[torch.Tensor], name: str, non_blocking: bool
    ) -> torch.Tensor:
        host = torch.tensor(values if len(values) else [0], dtype=torch.int32)
        if torch.cuda.is_available():
            host = host.pin_memory()
        if buf is None:
            return host.to(self._device, non_blocking=non_blocking)
        if buf.numel() < host.numel() or buf.dtype != torch.int32 or buf.device != self._device:
            raise ValueError(f"{name} buffer must be int32 on {self._device} with at least {host.numel()} elements")
        buf[: host.numel()].copy_(host, non_blocking=non_blocking)
        return buf

    def _mask_tensors(
        self, custom_mask, packed_custom_mask, qo_lens, kv_lens, non_blocking
    ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """Custom masks, per request qo_len x kv_len bits from a byte boundary: (packed bits, byte offsets) on
        the device (graph mode: in the wrapper's fixed custom_mask_buf / mask_indptr_buf)."""
        if custom_mask is None and packed_custom_mask is None:
            return None, None
        sizes = [a * b for a, b in zip(qo_lens, kv_lens)]
        offs = [0, *itertools.accumulate((s + 7) // 8 for s in sizes)]
        if offs[-1] > INT32_MAX // 8:  # the kernel addresses mask bits with 32-bit offsets
            raise ValueError(f"the custom mask holds {offs[-1]} bytes; at most {INT32_MAX // 8} are supported")
        dev = self._device
        if packed_custom_mask is not None:
            m = packed_custom_mask
            if not isinstance(m, torch.Tensor) or m.dtype != torch.uint8:
                raise TypeError("packed_custom_mask must be a uint8 tensor (from flashinfer.segment_packbits)")
            if m.dim() != 1 or m.numel() != offs[-1]:
                raise ValueError(
                    f"packed_custom_mask must hold sum(ceil(qo_len * kv_len / 8)) = {offs[-1]} bytes, got {m.numel()}"
                )
            mask_t = m.to(dev)
        else:
            m = custom_mask
            if not isinstance(m, torch.Tensor) or m.dtype != torch.bool:
                raise TypeError("custom_mask must be a bool tensor (flattened per-request qo_len x kv_len masks)")
            if m.numel() != sum(sizes):
                raise ValueError(f"custom_mask must hold sum(qo_len * kv_len) = {sum(sizes)} elements, got {m.numel()}")
            seg = torch.tensor([0, *itertools.accumulate(sizes)], dtype=torch.int64)
            mask_t, _ = segment_packbits(m.reshape(-1).to(dev), seg, bitorder="little")
        if self._use_cuda_graph:
            # A captured run() reads the mask through fixed addresses: the caller's buffers, refilled here (never
            # reallocated, so a replay after a re-plan reads live memory).
            if self._custom_mask_buf is None or self._mask_indptr_buf is None:
                raise ValueError(
                    "a custom mask in CUDA-graph mode needs the wrapper's custom_mask_buf and "
                    "mask_indptr_buf (fixed device buffers)"
                )
            if mask_t.numel() > self._custom_mask_buf.numel():
                raise ValueError(
                    f"custom_mask_buf holds {self._custom_mask_buf.numel()} bytes, the packed mask needs "
                    f"{mask_t.numel()}"
                )
            self._custom_mask_buf[: mask_t.numel()].copy_(mask_t, non_blocking=non_blocking)
            return self._custom_mask_buf, self._to_device_int(offs, self._mask_indptr_buf, "mask_indptr", non_blocking)
        if mask_t.numel() == 0:
            mask_t = torch.zeros(1, dtype=torch.uint8, device=dev)
        return mask_t, self._to_device_int(offs, None, "mask_indptr", non_blocking)

    def _plan_common(
        self,
        qo_indptr,
        kv_lens: List[int],
        num_qo_heads,
        num_kv_heads,
        head_dim_qk,
        head_dim_vo,
        custom_mask,
        packed_custom_mask,
        causal,
        pos_encoding_mode,
        use_fp16_qk_reduction,
        sm_scale,
        window_left,
        logits_soft_cap,
        rope_scale,
        rope_theta,
        q_data_type,
        kv_data_type,
        o_data_type,
        non_blocking,
        seq_lens_q,
        max_token_per_sequence,
        max_sequence_kv,
        fixed_chunk: int,
        disable_split_kv: bool,
        page_size: int,
        kv_tables: Callable[[], Dict[str, torch.Tensor]],
        max_page_id: int,
    ) -> BatchPlan:
        """plan() of both wrappers once the KV side is known as per-request lengths: checks, the kernel
        variant, the schedule (to the device) and the attention options."""
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                "plan() cannot be captured in a CUDA graph: call it before capture/replay, then capture run()"
            )
        h_qo = host_int32(qo_indptr, "qo_indptr")
        qo = h_qo.tolist()
        if len(qo) < 1 or qo[0] != 0 or any(b < a for a, b in zip(qo, qo[1:])):
            raise ValueError("qo_indptr must start at 0 and be non-decreasing")
        batch = len(qo) - 1
        if len(kv_lens) != batch:
            raise ValueError(
                f"qo_indptr describes {batch} requests but the KV indptr describes {len(kv_lens)} "
                f"(their lengths must match)"
            )
        if head_dim_vo is not None and head_dim_vo != head_dim_qk:
            raise not_supported("head_dim_vo", head_dim_vo, f"None or head_dim_qk ({head_dim_qk})")
        if (
            isinstance(num_qo_heads, bool)
            or not isinstance(num_qo_heads, int)
            or isinstance(num_kv_heads, bool)
            or not isinstance(num_kv_heads, int)
            or num_kv_heads <= 0
            or num_qo_heads <= 0
            or num_qo_heads % num_kv_heads != 0
        ):
            raise ValueError(
                f"num_qo_heads ({num_qo_heads}) must be a positive multiple of num_kv_heads ({num_kv_heads})"
            )
        check_kv_lengths(kv_lens)
        qo_lens = [b - a for a, b in zip(qo, qo[1:])]
        if seq_lens_q is not None:
            check_table_lengths("seq_lens_q", seq_lens_q, h_qo[1:] - h_qo[:-1])
        for name, bound, lens in (
            ("max_token_per_sequence", max_token_per_sequence, qo_lens),
            ("max_sequence_kv", max_sequence_kv, kv_lens),
        ):
            if bound is not None and lens and max(lens) > bound:
                raise ValueError(f"{name}={bound} is below the batch's longest request ({max(lens)})")
        has_mask = custom_mask is not None or packed_custom_mask is not None
        opts = _check_options(
            head_dim_qk,
            causal,
            pos_encoding_mode,
            window_left,
            logits_soft_cap,
            sm_scale,
            rope_scale,
            rope_theta,
            use_fp16_qk_reduction,
            self._backend,
            has_mask,
        )
        q_dtype, kv_dtype = plan_dtypes(q_data_type, kv_data_type, f"{type(self).__name__}.plan")
        if canonical_dtype(o_data_type, "o_data_type", q_dtype) != q_dtype:
            raise not_supported("o_data_type", o_data_type, f"None or q_data_type ({q_dtype})")
        dq = "f16" if q_dtype == torch.float16 else "bf16"
        _check_fp16qk(opts, dq)
        max_kv = max(kv_lens) if kv_lens else 0
        if opts.pos_encoding_mode == "ROPE_LLAMA" and max_kv > MAX_ROPE_POSITION:
            raise ValueError(f"ROPE_LLAMA supports kv_len up to {MAX_ROPE_POSITION}")
        spec = BatchPrefillSpec(
            head_dim=head_dim_qk,
            dtype_q=dq,
            dtype_kv=KV_DTYPE_SHORT[kv_dtype],
            dtype_o=dq,
            kv_storage=self._storage,
            mask_mode=opts.mask_mode,
            pos_encoding_mode=opts.pos_encoding_mode,
            use_window=opts.window_left >= 0,
            use_logits_soft_cap=opts.soft_cap > 0,
            use_fp16_qk_reduction=opts.use_fp16_qk_reduction,
            backend=opts.backend,
        )
        spec = (
            self._auto_fa3_ws(spec, qo_lens, num_qo_heads // num_kv_heads, num_kv_heads, fixed_chunk, page_size) or spec
        )
        if spec.backend == "fa3_ws":
            _check_fa3_ws_batch(spec, self._device)
        if self._use_cuda_graph and self._frozen_spec is not None and spec != self._frozen_spec:
            raise ValueError(
                "a CUDA-graph wrapper keeps its kernel variant across plans (captured graphs bake it in): "
                f"was {self._frozen_spec.name()}, got {spec.name()}"
            )
        dev = self._device
        group = num_qo_heads // num_kv_heads
        mod = _module(spec)
        tiles = prefill_query_tiles(mod)
        sms = num_sms(dev.index)
        max_ctas = min(sms, self._max_ctas) if spec.backend == "fa3_ws" and self._max_ctas > 0 else 0
        ws = self._float_workspace_buffer
        ws_floats = ws.numel() * ws.element_size() // 4
        tile, work, merge, part_rows = schedule_prefill(
            qo_lens,
            kv_lens,
            group,
            num_kv_heads,
            head_dim_qk,
            tiles[:1] if self._use_cuda_graph else tiles,
            mod.constants["kv_tile"],
            lambda t: _occupancy(spec, dev.index, t),
            max_ctas or sms,
            opts.mask_mode == "causal",
            ws_floats,
            num_qo_heads,
            fixed_chunk=fixed_chunk,
            split_kv=not disable_split_kv,
            request_major=spec.backend == "fa3_ws" and _WS_REQUEST_MAJOR,
        )
        if part_rows * num_qo_heads * (head_dim_qk + 1) > ws_floats:
            raise workspace_too_small(ws.numel() * ws.element_size(), part_rows * num_qo_heads * (head_dim_qk + 1) * 4)
        if self._use_cuda_graph:
            cap_w, cap_m = _GRAPH_WORK_CAPACITY, _GRAPH_MERGE_CAPACITY
            if len(work) > cap_w or len(merge) > cap_m:
                raise ValueError(
                    f"batch too large for the CUDA-graph schedule capacity ({len(work)} > {cap_w} work "
                    f"items or {len(merge)} > {cap_m} merge rows)"
                )
        else:
            cap_w, cap_m = max(1, len(work)), max(1, len(merge))
        layout = PrefillScheduleLayout(cap_w, cap_m, mod.constants["work_fields"], mod.constants["merge_fields"])
        # Device copies from here on: every check has passed.
        mask_t, mask_indptr = self._mask_tensors(custom_mask, packed_custom_mask, qo_lens, kv_lens, non_blocking)
        sched_buf = self._to_device_int(layout.pack(work, merge), self._schedule_buf, "schedule", non_blocking)
        if self._use_cuda_graph:
            self._schedule_buf = sched_buf  # (fixed capacity: every later plan refills this buffer)
        if self._use_cuda_graph:
            if self._grid is None:
                slots = _occupancy(spec, dev.index, tile) * num_sms(dev.index)
                self._grid = (max(1, -(-slots // num_kv_heads)), 4 * num_sms(dev.index))
            grid_x, merge_grid_x = self._grid
            self._frozen_spec = spec
        else:
            grid_x, merge_grid_x = len(work), len(merge)
        qo_dev = self._qo_indptr_buf = self._to_device_int(qo, self._fixed_qo_indptr, "qo_indptr", non_blocking)
        kv_tables = kv_tables()
        schedule = PrefillSchedule(
            tile,
            layout,
            sched_buf,
            grid_x,
            merge_grid_x,
            len(work),
            len(merge),
            qo_dev,
            kv_tables["kv_indptr"],
            kv_tables.get("kv_indices"),
            kv_tables.get("kv_last_page_len"),
            mask_t,
            mask_indptr,
            has_mask,
        )
        # The launcher's arguments that stay for this plan. (Every batch prefill module has the same
        # BatchPrefillArgs, stamped from one declaration: the struct also serves the variants forward() picks.)
        a = schedule.args = _args_type(mod)()
        sched = sched_buf.data_ptr()
        ptr = lambda t: t.data_ptr() if t is not None else None  # noqa: E731
        a.tile_q, a.qo_indptr, a.kv_indptr = tile, qo_dev.data_ptr(), schedule.kv_indptr.data_ptr()
        a.kv_indices, a.kv_last_page_len = ptr(schedule.kv_indices), ptr(schedule.kv_last_page_len)
        a.mask, a.mask_indptr = ptr(mask_t), ptr(mask_indptr)
        a.work, a.num_work = sched + 4 * layout.work, sched + 4 * layout.num_work
        a.merge, a.num_merge = sched + 4 * layout.merge, sched + 4 * layout.num_merge
        a.work_capacity, a.merge_capacity, a.grid_x, a.merge_grid_x = cap_w, cap_m, grid_x, merge_grid_x
        a.num_qo_heads, a.num_kv_heads, a.page_size, a.device = num_qo_heads, num_kv_heads, page_size, dev.index
        a.max_ctas = max_ctas
        stats = PlanStats(
            workers=grid_x,
            worker_capacity=grid_x,
            pieces=len(work),
            merges=len(merge),
            partial_states=part_rows,
            total_keys=sum(kv_lens),
            workspace_bytes=part_rows * num_qo_heads * (head_dim_qk + 1) * 4,
        )
        # The attention options run() uses, with FlashInfer's meaning (a legacy forward() replaces them).
        self._causal, self._pos_encoding_mode, self._use_fp16_qk_reduction = (
            causal,
            pos_encoding_mode,
            use_fp16_qk_reduction,
        )
        self._window_left, self._sm_scale, self._rope_scale, self._rope_theta = (
            window_left,
            sm_scale,
            rope_scale,
            rope_theta,
        )
        self._logits_soft_cap = 0.0 if logits_soft_cap is None else logits_soft_cap
        self._cached_q_data_type = self._cached_o_data_type = q_dtype
        self._cached_kv_data_type = kv_dtype
        plan = BatchPlan(
            spec,
            mod,
            batch,
            qo[-1],
            num_qo_heads,
            num_kv_heads,
            head_dim_qk,
            page_size,
            q_dtype,
            kv_dtype,
            max_kv,
            stats,
            schedule,
            options_key=self._options_key(),
            launch=_launch_of(spec, opts),
            max_page_id=max_page_id,
        )
        self._plan_info = plan
        if not non_blocking:
            torch.cuda.current_stream(dev).synchronize()
        return plan

    def _auto_fa3_ws(
        self,
        spec: BatchPrefillSpec,
        qo_lens: List[int],
        group: int,
        num_kv_heads: int,
        fixed_chunk: int,
        page_size: int,
    ) -> Optional[BatchPrefillSpec]:
        """The fa3_ws spec when "auto" runs this batch on it, else None: a Hopper GPU, the kernel's scope, no CUDA
        graphs, no fixed split size (a batch-invariant plan must not change kernels with the batch), ragged K/V or
        pages the kernel copies as TMA boxes (_ws_auto_page_size), and 128-row query tiles that either fill the GPU
        or are at least half full (the planner then splits long requests' keys to fill it, as for fa2).
        H200, TFLOP/s: 16 x 1024 causal, 32/32 and 32/8 heads: ragged 364-384 against fa2's 246-266; pages of 8
        349, of 16 339-366, of 32 375, of 64 377 against fa2's 211-228; pages of 1 (row gather) 206, against fa2's
        224, stay on fa2 (bench_prefill --ws-batch, probe_prefill --paged). Split batches
        (probe_prefill --split), 32/8 heads: 1 x (256 queries, 32768 keys) causal 618 against 334; 1 x (64, 32768)
        full 490 against 286, pages of 16 340 against 245; 32/32, 2 x (128, 16384) causal 464 against 316;
        8 x (1, 4096), pages of 16 (tiles 3% full): 0.058 against 0.057 ms."""
        if not self._auto or self._use_cuda_graph or fixed_chunk > 0:
            return None
        if self._storage == "paged" and not _ws_auto_page_size(page_size):
            return None
        ws = dataclasses.replace(spec, backend="fa3_ws")
        if ws.unsupported_reason() is not None or _device_capability(self._device.index) != (9, 0):
            return None
        return ws if _ws_auto_tiles(qo_lens, group, num_kv_heads, num_sms(self._device.index)) else None

    def _options_key(self) -> Tuple[Any, ...]:
        return (
            self._causal,
            self._pos_encoding_mode,
            self._use_fp16_qk_reduction,
            self._window_left,
            self._logits_soft_cap,
            self._sm_scale,
            self._rope_scale,
            self._rope_theta,
        )

    def _resolve_options(self, p: BatchPlan, key: Tuple[Any, ...]) -> None:
        """Launch values for the wrapper's current attention options (set by forward() or by hand), on the
        planned schedule: the kernel variant they need (mask, position encoding, window, soft cap, fp16 QK)."""
        if p.resolved is None:
            p.resolved = {}
        hit = p.resolved.get(key)
        if hit is None:
            causal, pos, fp16qk, window, soft_cap, sm_scale, rope_scale, rope_theta = key
            opts = _check_options(
                p.head_dim,
                causal,
                pos,
                window,
                soft_cap,
                sm_scale,
                rope_scale,
                rope_theta,
                fp16qk,
                self._backend,
                p.schedule.has_mask,
            )
            _check_fp16qk(opts, p.spec.dtype_q)
            if opts.pos_encoding_mode == "ROPE_LLAMA" and p.max_kv_len > MAX_ROPE_POSITION:
                raise ValueError(f"ROPE_LLAMA supports kv_len up to {MAX_ROPE_POSITION}")
            spec = dataclasses.replace(
                p.spec,
                mask_mode=opts.mask_mode,
                pos_encoding_mode=opts.pos_encoding_mode,
                use_window=opts.window_left >= 0,
                use_logits_soft_cap=opts.soft_cap > 0,
                use_fp16_qk_reduction=opts.use_fp16_qk_reduction,
            )
            if spec.backend == "fa3_ws" and self._auto and spec.unsupported_reason() is not None:
                # (its schedule, 128-row tiles and chunks, is fa2's too)
                spec = dataclasses.replace(spec, backend="fa2")
            if spec.backend == "fa3_ws":
                _check_fa3_ws_batch(spec, self._device)
            hit = _launch_of(spec, opts)
            if len(p.resolved) >= 8:
                p.resolved.clear()
            p.resolved[key] = hit
        p.launch = hit
        p.options_key = key

    def _launch(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        strides: Tuple[int, ...],
        out: Optional[torch.Tensor],
        lse: Optional[torch.Tensor],
        return_lse: bool,
        scale_mult: float,
        out_scale: float,
        enable_pdl: Optional[bool],
        on_fa2: bool = False,
    ):
        """Launch on a validated KV side: K/V base tensors and their (page, token, head) strides twice. on_fa2:
        the planned fa3_ws schedule launched on the fa2 kernel instead (an "auto" plan's K/V that TMA cannot
        read)."""
        p = self._plan_info
        if p is None:
            raise RuntimeError("call plan() before run()")
        if torch.cuda.is_current_stream_capturing() and not self._use_cuda_graph:  # (lse, when given, is written)
            raise RuntimeError(
                "this wrapper was not built for CUDA graphs (use_cuda_graph=False): its plan() "
                "buffers move between plans, so a captured run() would replay stale schedules; "
                "construct it with use_cuda_graph=True and fixed buffers"
            )
        check_tensor(q, "q", 3)
        device = check_same_device([("q", q), ("k", k), ("v", v), ("out", out), ("lse", lse)])
        if device != self._device:
            raise ValueError(f"q is on {device} but the wrapper's workspace is on {self._device}")
        if q.dtype != p.q_dtype or k.dtype != p.kv_dtype or v.dtype != p.kv_dtype:
            raise TypeError(
                f"q/k/v dtypes {q.dtype}/{k.dtype}/{v.dtype} differ from the planned q_data_type {p.q_dtype} and "
                f"kv_data_type {p.kv_dtype}"
            )
        exp_q = (p.total_q, p.num_qo_heads, p.head_dim)
        if tuple(q.shape) != exp_q:
            raise ValueError(
                f"q must have shape [qo_indptr[-1], num_qo_heads, head_dim] = {list(exp_q)}, got {tuple(q.shape)}"
            )
        if enable_pdl is not None and not isinstance(enable_pdl, bool):
            raise TypeError(f"enable_pdl must be a bool or None, got {enable_pdl!r}")
        q = aligned_rows(q, 2)
        check_out(out, "out", exp_q, q.dtype, device)
        check_out(lse, "lse", exp_q[:2], torch.float32, device)
        o = out if out is not None else torch.empty(exp_q, dtype=q.dtype, device=device)
        if return_lse and lse is None:
            lse = torch.empty(exp_q[:2], dtype=torch.float32, device=device)
        if p.total_q == 0:
            return (o, lse) if return_lse else o
        key = self._options_key()
        if key != p.options_key:
            self._resolve_options(p, key)
        L = p.launch
        if on_fa2:
            mod = _module(dataclasses.replace(L.module.spec, backend="fa2"))
            L = dataclasses.replace(L, run=mod.launcher("flashinfer_batch_prefill"), module=mod)
        a = p.schedule.args
        ws = self._float_workspace_buffer
        ws_f = ws.data_ptr()
        # Partial lse at a fixed place (the workspace's tail), so a graph captured under one plan stays valid under
        # the next: plan() guarantees part_rows * heads * (head_dim + 1) floats fit, so the two never overlap.
        ws_floats = ws.numel() * ws.element_size() // 4
        a.q, a.k, a.v, a.o = q.data_ptr(), k.data_ptr(), v.data_ptr(), o.data_ptr()
        a.lse = lse.data_ptr() if lse is not None else None
        a.partial_o, a.partial_lse = ws_f, ws_f + 4 * (ws_floats - ws_floats // (p.head_dim + 1))
        a.q_stride_n, a.q_stride_h = q.stride(0), q.stride(1)
        a.k_stride_page, a.k_stride_n, a.k_stride_h, a.v_stride_page, a.v_stride_n, a.v_stride_h = strides
        a.window_left, a.logits_soft_cap, a.sm_scale = L.window_left, L.soft_cap, L.sm_scale * scale_mult
        # v_scale: an fp8 kernel multiplies its output in the epilogue; a 16-bit one (machine code unchanged) after.
        fp8_kv = L.module.spec.dtype_kv in FP8_KV_DTYPES
        a.v_scale = out_scale if fp8_kv else 1.0
        a.rope_scale, a.rope_theta, a.enable_pdl = L.rope_scale, L.rope_theta, bool(enable_pdl)
        a.stream = current_stream_ptr(device)
        rc = L.run(args=ctypes.addressof(a))
        if rc:
            L.module.check(rc, f"batch prefill ({L.module.spec.name()}) on {device}")
        if out_scale != 1.0 and not fp8_kv:
            o.mul_(out_scale)
        return (o, lse) if return_lse else o

    def _set_options(
        self,
        causal,
        pos_encoding_mode,
        use_fp16_qk_reduction,
        window_left,
        logits_soft_cap,
        sm_scale,
        rope_scale,
        rope_theta,
    ) -> None:
        if self._plan_info is None:
            raise RuntimeError("forward() before plan()/begin_forward()")
        (
            self._causal,
            self._pos_encoding_mode,
            self._use_fp16_qk_reduction,
            self._window_left,
            self._logits_soft_cap,
            self._sm_scale,
            self._rope_scale,
            self._rope_theta,
        ) = (
            causal,
            pos_encoding_mode,
            use_fp16_qk_reduction,
            window_left,
            logits_soft_cap,
            sm_scale,
            rope_scale,
            rope_theta,
        )

    def end_forward(self) -> None:
        """Deprecated and a no-op, as in FlashInfer."""


def _check_run_extras(args: Tuple[Any, ...], **named: Any) -> None:
    """run() arguments of FlashInfer features not implemented here: refused unless left at their defaults."""
    if args:
        raise not_supported("positional arguments after the KV", len(args), "none (they feed jit_args kernels)")
    for name, value in named.items():
        if value is not None:
            raise not_supported(name, value if not isinstance(value, torch.Tensor) else "a tensor", "None")


class BatchPrefillWithRaggedKVCacheWrapper(_BatchPrefillBase):
    """Batch prefill where request r's keys/values are rows ``kv_indptr[r]:kv_indptr[r+1]`` of k/v
    (``[total_kv, num_kv_heads, head_dim]`` for NHD, ``[num_kv_heads, total_kv, head_dim]`` for HND).

    Parameters
    ----------
    float_workspace_buffer : torch.Tensor
        A CUDA tensor (e.g. 128 MB of uint8) for the partial states of split requests.
    kv_layout : str
        ``"NHD"`` or ``"HND"``.
    use_cuda_graph : bool
        Fixed buffers: run() may be captured and replayed after re-plans (the kernel variant stays fixed).
    qo_indptr_buf, kv_indptr_buf : torch.Tensor, optional
        Graph mode's fixed int32 device buffers ``[batch_size + 1]`` (required then).
    custom_mask_buf, mask_indptr_buf : torch.Tensor, optional
        Graph mode's fixed buffers for custom masks: uint8 packed bits and int32 ``[batch_size + 1]`` byte offsets.
    backend : str
        ``"auto"``, ``"fa2"`` (mma.sync tensor cores, every feature) or ``"fa3_ws"`` (an extension over
        FlashInfer's values): the warp-specialised Hopper kernel (sm_90; TMA loads, wgmma, persistent grid) for
        head_dim 128, k/v/o in q's float16/bfloat16, no mask or causal, no position encoding, window, soft cap or
        fp16 QK reduction, no CUDA graphs; asked for by name, plan() refuses other batches with a ValueError naming
        the reason. As fa2, it splits long requests' keys into chunks when the batch's query tiles alone cannot
        fill the GPU (or by ``fixed_split_size``), their partial states merged by a second kernel. A KV tile
        that runs past a request reads the next request's rows (masked: their scores are dropped, a probability
        of exactly 0 multiplies their values), so k and v must hold finite values in every row. ``"auto"`` plans
        fa3_ws on a Hopper GPU for a batch in its scope whose 128-row query tiles (per KV head) fill the GPU or are
        at least half full (without CUDA graphs or ``fixed_split_size``: a batch-invariant plan keeps one kernel),
        fa2 otherwise; an option set later (forward()) outside fa3_ws's scope, or K/V views TMA cannot read (a zero
        stride), run that plan on fa2.
    jit_args, jit_kwargs : optional
        FlashInfer's custom-kernel arguments: not implemented (must be None).
    """

    _storage = "ragged"

    def __init__(
        self,
        float_workspace_buffer: torch.Tensor,
        kv_layout: str = "NHD",
        use_cuda_graph: bool = False,
        qo_indptr_buf: Optional[torch.Tensor] = None,
        kv_indptr_buf: Optional[torch.Tensor] = None,
        custom_mask_buf: Optional[torch.Tensor] = None,
        mask_indptr_buf: Optional[torch.Tensor] = None,
        backend: str = "auto",
        jit_args: Optional[List[Any]] = None,
        jit_kwargs: Optional[Dict[str, Any]] = None,
    ) -> None:
        super().__init__(
            float_workspace_buffer,
            kv_layout,
            use_cuda_graph,
            qo_indptr_buf,
            custom_mask_buf,
            mask_indptr_buf,
            backend,
            jit_args,
            jit_kwargs,
        )
        if use_cuda_graph and (qo_indptr_buf is None or kv_indptr_buf is None):
            raise ValueError("use_cuda_graph=True needs fixed qo_indptr_buf and kv_indptr_buf (int32, batch_size + 1)")
        if not use_cuda_graph and kv_indptr_buf is not None:
            raise ValueError(
                "kv_indptr_buf is one of CUDA-graph mode's fixed buffers: pass use_cuda_graph=True with it"
            )
        self._fixed_kv_indptr = kv_indptr_buf if use_cuda_graph else None
        self._kv_indptr_buf = kv_indptr_buf

    def plan(
        self,
        qo_indptr: torch.Tensor,
        kv_indptr: torch.Tensor,
        num_qo_heads: int,
        num_kv_heads: int,
        head_dim_qk: int,
        head_dim_vo: Optional[int] = None,
        custom_mask: Optional[torch.Tensor] = None,
        packed_custom_mask: Optional[torch.Tensor] = None,
        causal: bool = False,
        pos_encoding_mode: str = "NONE",
        use_fp16_qk_reduction: bool = False,
        window_left: int = -1,
        logits_soft_cap: Optional[float] = None,
        sm_scale: Optional[float] = None,
        rope_scale: Optional[float] = None,
        rope_theta: Optional[float] = None,
        q_data_type: Union[str, torch.dtype] = "float16",
        kv_data_type: Optional[Union[str, torch.dtype]] = None,
        o_data_type: Optional[Union[str, torch.dtype]] = None,
        non_blocking: bool = True,
        prefix_len_ptr: Optional[torch.Tensor] = None,
        token_pos_in_items_ptr: Optional[torch.Tensor] = None,
        token_pos_in_items_len: int = 0,
        max_item_len_ptr: Optional[torch.Tensor] = None,
        fixed_split_size: Optional[int] = None,
        disable_split_kv: bool = False,
        seq_lens: Optional[torch.Tensor] = None,
        seq_lens_q: Optional[torch.Tensor] = None,
        max_token_per_sequence: Optional[int] = None,
        max_sequence_kv: Optional[int] = None,
        v_indptr: Optional[torch.Tensor] = None,
        o_indptr: Optional[torch.Tensor] = None,
    ) -> None:
        """Schedule a batch for run().

        Parameters
        ----------
        qo_indptr : torch.Tensor
            ``[batch_size + 1]`` int32/int64: request r's queries are rows ``qo_indptr[r]:qo_indptr[r+1]`` of q.
        kv_indptr : torch.Tensor
            ``[batch_size + 1]``: request r's keys are rows ``kv_indptr[r]:kv_indptr[r+1]`` of k/v (a request may
            have none: its output is 0 and its lse -inf).
        num_qo_heads, num_kv_heads : int
            Query heads (a multiple of num_kv_heads) and KV heads.
        head_dim_qk : int
            64, 128 or 256.
        head_dim_vo : int, optional
            None or head_dim_qk.
        custom_mask : torch.Tensor, optional
            bool, the requests' ``[qo_len, kv_len]`` masks flattened and concatenated (True: attend). Replaces
            ``causal``.
        packed_custom_mask : torch.Tensor, optional
            uint8, each request's mask bits packed from a byte boundary (``segment_packbits(...,
            bitorder="little")``); instead of custom_mask.
        causal : bool
            Query row i of a request attends to keys ``j <= i + kv_len - qo_len``; with qo_len > kv_len the first
            rows see no key (output 0, lse -inf), as in FlashInfer.
        pos_encoding_mode : str
            ``"NONE"``, ``"ROPE_LLAMA"`` or ``"ALIBI"``.
        use_fp16_qk_reduction : bool
            Accumulate q.k in fp16 (float16 only).
        window_left : int
            ``w >= 0``: query at position p attends to keys ``j >= p - w``; -1 no window.
        logits_soft_cap, sm_scale, rope_scale, rope_theta : float, optional
            As single_prefill_with_kv_cache.
        q_data_type, kv_data_type, o_data_type : str or torch.dtype, optional
            q and o: float16 or bfloat16 (q's default float16; o defaults to q's and must match it). kv (default
            q's): q's dtype, or an fp8 cache, torch.float8_e4m3fn or torch.float8_e5m2, dequantised by run()'s
            ``k_scale``/``v_scale``. An fp8 q raises NotImplementedError.
        non_blocking : bool
            False: plan() returns once its copies to the device have completed.
        prefix_len_ptr, token_pos_in_items_ptr, token_pos_in_items_len, max_item_len_ptr : optional
            FlashInfer's multi-item scoring: not implemented (defaults only).
        fixed_split_size : int, optional
            Cut every request's keys into chunks of exactly this many (batch-size invariant sums); None/<= 0:
            chosen per batch.
        disable_split_kv : bool
            Never cut a request's keys across CTAs.
        seq_lens, seq_lens_q : torch.Tensor, optional
            ``[batch_size]`` KV and query lengths: accepted when they agree with kv_indptr and qo_indptr.
        max_token_per_sequence, max_sequence_kv : int, optional
            Upper bounds of the query and KV lengths: checked.
        v_indptr, o_indptr : torch.Tensor, optional
            Separate value/output offsets: not implemented (must be None).
        """
        _unsupported_plan_args(
            prefix_len_ptr=prefix_len_ptr,
            token_pos_in_items_ptr=token_pos_in_items_ptr,
            token_pos_in_items_len=token_pos_in_items_len,
            max_item_len_ptr=max_item_len_ptr,
            v_indptr=v_indptr,
            o_indptr=o_indptr,
        )
        h_kv = host_int32(kv_indptr, "kv_indptr")
        kv = h_kv.tolist()
        if len(kv) < 1 or kv[0] != 0 or any(b < a for a, b in zip(kv, kv[1:])):
            raise ValueError("kv_indptr must start at 0 and be non-decreasing")
        kv_lens = [b - a for a, b in zip(kv, kv[1:])]
        if seq_lens is not None:
            check_table_lengths("seq_lens", seq_lens, h_kv[1:] - h_kv[:-1])
        fixed = fixed_split_size if isinstance(fixed_split_size, int) and fixed_split_size > 0 else 0

        def tables() -> Dict[str, torch.Tensor]:  # (to the device once every check has passed)
            return {"kv_indptr": self._to_device_int(kv, self._fixed_kv_indptr, "kv_indptr", non_blocking)}

        plan = self._plan_common(
            qo_indptr,
            kv_lens,
            num_qo_heads,
            num_kv_heads,
            head_dim_qk,
            head_dim_vo,
            custom_mask,
            packed_custom_mask,
            causal,
            pos_encoding_mode,
            use_fp16_qk_reduction,
            sm_scale,
            window_left,
            logits_soft_cap,
            rope_scale,
            rope_theta,
            q_data_type,
            kv_data_type,
            o_data_type,
            non_blocking,
            seq_lens_q,
            max_token_per_sequence,
            max_sequence_kv,
            fixed,
            disable_split_kv,
            1,
            tables,
            -1,
        )
        plan.total_kv = kv[-1]  # rows of k/v run() expects
        plan.schedule.args.kv_rows = kv[-1]
        self._kv_indptr_buf = plan.schedule.kv_indptr

    begin_forward = plan

    def run(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *args: Any,
        q_scale: Optional[float] = None,
        k_scale: Optional[float] = None,
        v_scale: Optional[float] = None,
        o_scale: Optional[float] = None,
        out: Optional[torch.Tensor] = None,
        lse: Optional[torch.Tensor] = None,
        return_lse: bool = False,
        enable_pdl: Optional[bool] = None,
        kv_cache_sf: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
    ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        """Batch prefill of the planned requests.

        Parameters
        ----------
        q : torch.Tensor
            ``[qo_indptr[-1], num_qo_heads, head_dim]`` in the planned dtype.
        k, v : torch.Tensor
            ``[kv_indptr[-1], num_kv_heads, head_dim]`` (NHD) or ``[num_kv_heads, kv_indptr[-1], head_dim]`` (HND),
            in the planned kv_data_type.
        *args
            FlashInfer's jit_args kernel arguments: not implemented (must be empty).
        q_scale, k_scale : float or torch.Tensor, optional
            Multiply the logits (folded into the softmax scale: k_scale dequantises an fp8 K). A Python number or
            a one-element CPU tensor; a CUDA tensor raises TypeError (reading it would synchronize the device).
        v_scale : float or torch.Tensor, optional
            Multiplies the output (dequantises an fp8 V); the same kinds of value.
        o_scale : float, optional
            FlashInfer's fp8 output scale: not implemented (must be None).
        out, lse : torch.Tensor, optional
            Preallocated ``[qo_indptr[-1], num_qo_heads, head_dim]`` (q's dtype) and ``[qo_indptr[-1], num_qo_heads]``
            float32 (with return_lse).
        return_lse : bool
            Also return the base-2 log-sum-exp (-inf for rows without a visible key).
        enable_pdl : bool, optional
            Launch with programmatic dependent launch (sm_90+); None: off.
        kv_cache_sf : (torch.Tensor, torch.Tensor), optional
            NVFP4 KV scale factors: not implemented (must be None).

        Returns
        -------
        torch.Tensor or (torch.Tensor, torch.Tensor)
            o ``[qo_indptr[-1], num_qo_heads, head_dim]``, or ``(o, lse)``.
        """
        _check_run_extras(args, o_scale=o_scale, kv_cache_sf=kv_cache_sf)
        p = self._plan_info
        if p is None:
            raise RuntimeError("call plan() before run()")
        check_tensor(k, "k", 3)
        check_tensor(v, "v", 3)
        if k.shape != v.shape:
            raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
        if self._kv_layout == "NHD":
            exp = (p.total_kv, p.num_kv_heads, p.head_dim)
            strides = (0, k.stride(0), k.stride(1), 0, v.stride(0), v.stride(1))
        else:
            exp = (p.num_kv_heads, p.total_kv, p.head_dim)
            strides = (0, k.stride(1), k.stride(0), 0, v.stride(1), v.stride(0))
        if tuple(k.shape) != exp:
            raise ValueError(f"k must have shape {list(exp)} ({self._kv_layout}), got {tuple(k.shape)}")
        check_vector_rows(k, "k", 2)
        check_vector_rows(v, "v", 2)
        fa2 = False
        if p.spec.backend == "fa3_ws":
            why = _tma_kv_refusal(k, v)
            if why is not None and not self._auto:
                raise ValueError(why)
            fa2 = why is not None  # ("auto": this call on fa2, whose kernel reads any strides)
        scale_mult = scalar(q_scale, "q_scale", 1.0) * scalar(k_scale, "k_scale", 1.0)
        return self._launch(
            q, k, v, strides, out, lse, return_lse, scale_mult, scalar(v_scale, "v_scale", 1.0), enable_pdl, fa2
        )

    run_return_lse = functools.partialmethod(run, return_lse=True)

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        causal: bool = False,
        pos_encoding_mode: str = "NONE",
        use_fp16_qk_reduction: bool = False,
        window_left: int = -1,
        logits_soft_cap: Optional[float] = None,
        sm_scale: Optional[float] = None,
        rope_scale: Optional[float] = None,
        rope_theta: Optional[float] = None,
    ) -> torch.Tensor:
        """Deprecated FlashInfer spelling of run(): the attention options given here (defaults included) replace
        the wrapper's (``_causal``, ``_pos_encoding_mode``, ``_use_fp16_qk_reduction``, ``_window_left``,
        ``_logits_soft_cap``, ``_sm_scale``, ``_rope_scale``, ``_rope_theta``) for this and later runs, as in
        FlashInfer, without a new plan (the kernel variant they need runs on the planned schedule).

        Parameters
        ----------
        q, k, v : torch.Tensor
            As :meth:`run`.
        causal, pos_encoding_mode, use_fp16_qk_reduction, window_left, logits_soft_cap, sm_scale, rope_scale, rope_theta
            As :meth:`plan` (causal has no effect when the plan has a custom mask, as in FlashInfer).

        Returns
        -------
        torch.Tensor
            o ``[qo_indptr[-1], num_qo_heads, head_dim]``.
        """
        self._set_options(
            causal,
            pos_encoding_mode,
            use_fp16_qk_reduction,
            window_left,
            logits_soft_cap,
            sm_scale,
            rope_scale,
            rope_theta,
        )
        return self.run(q, k, v)

    def forward_return_lse(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        causal: bool = False,
        pos_encoding_mode: str = "NONE",
        use_fp16_qk_reduction: bool = False,
        window_left: int = -1,
        logits_soft_cap: Optional[float] = None,
        sm_scale: Optional[float] = None,
        rope_scale: Optional[float] = None,
        rope_theta: Optional[float] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """:meth:`forward` that also returns the log-sum-exp.

        Parameters
        ----------
        q, k, v, causal, pos_encoding_mode, use_fp16_qk_reduction, window_left, logits_soft_cap, sm_scale,
        rope_scale, rope_theta
            As :meth:`forward`.

        Returns
        -------
        (torch.Tensor, torch.Tensor)
            o ``[qo_indptr[-1], num_qo_heads, head_dim]`` and lse ``[qo_indptr[-1], num_qo_heads]`` float32 (base 2).
        """
        self._set_options(
            causal,
            pos_encoding_mode,
            use_fp16_qk_reduction,
            window_left,
            logits_soft_cap,
            sm_scale,
            rope_scale,
            rope_theta,
        )
        return self.run(q, k, v, return_lse=True)


class BatchPrefillWithPagedKVCacheWrapper(_BatchPrefillBase):
    """Batch prefill over a paged KV cache: request r's pages are ``paged_kv_indices[paged_kv_indptr[r]:...]``,
    its last page holding ``paged_kv_last_page_len[r]`` tokens. The cache is one tensor ``[num_pages, 2,
    page_size, num_kv_heads, head_dim]`` (NHD; HND swaps page_size and heads) or a tuple (k_cache, v_cache).

    Parameters
    ----------
    float_workspace_buffer : torch.Tensor
        A CUDA tensor (e.g. 128 MB of uint8) for the partial states of split requests.
    kv_layout : str
        ``"NHD"`` or ``"HND"``.
    use_cuda_graph : bool
        Fixed buffers: run() may be captured and replayed after re-plans (the kernel variant stays fixed).
    qo_indptr_buf, paged_kv_indptr_buf, paged_kv_indices_buf, paged_kv_last_page_len_buf : torch.Tensor, optional
        Graph mode's fixed int32 device buffers (required then): ``[batch_size + 1]``, ``[batch_size + 1]``,
        ``[max_num_pages]``, ``[batch_size]``.
    custom_mask_buf, mask_indptr_buf : torch.Tensor, optional
        Graph mode's fixed buffers for custom masks: uint8 packed bits and int32 ``[batch_size + 1]`` byte offsets.
    backend : str
        ``"auto"``, ``"fa2"`` (mma.sync tensor cores, every feature) or ``"fa3_ws"`` (an extension over
        FlashInfer's values): the warp-specialised Hopper kernel (sm_90; wgmma, persistent grid, any page size:
        pages of 8, 16, 32, 64, 128 or a multiple of 128 slots copied as TMA boxes, other sizes gathered row by row
        by its producer warpgroup) for head_dim 128, k/v/o in q's float16/bfloat16 (no fp8 cache), no mask or
        causal, no position encoding, window, soft cap or fp16 QK reduction, no CUDA graphs; plan() refuses other
        batches with a ValueError naming the reason. As fa2, it splits long requests' keys into chunks when the
        batch's query tiles alone cannot fill the GPU (or by ``fixed_split_size``), their partial states merged by
        a second kernel. Slots past a request's last token are never read (zero-filled), so they may hold
        anything. ``"auto"`` plans fa3_ws on a Hopper GPU for a batch in its scope with pages of 8, 16, 32, 64,
        128 or a multiple of 128 slots whose 128-row query tiles (per KV head) fill the GPU or are at least half
        full (without CUDA graphs or ``fixed_split_size``), fa2 otherwise; an option set later (forward()) outside
        fa3_ws's scope runs that plan on fa2.
    jit_args, jit_kwargs : optional
        FlashInfer's custom-kernel arguments: not implemented (must be None).
    """

    _storage = "paged"

    def __init__(
        self,
        float_workspace_buffer: torch.Tensor,
        kv_layout: str = "NHD",
        use_cuda_graph: bool = False,
        qo_indptr_buf: Optional[torch.Tensor] = None,
        paged_kv_indptr_buf: Optional[torch.Tensor] = None,
        paged_kv_indices_buf: Optional[torch.Tensor] = None,
        paged_kv_last_page_len_buf: Optional[torch.Tensor] = None,
        custom_mask_buf: Optional[torch.Tensor] = None,
        mask_indptr_buf: Optional[torch.Tensor] = None,
        backend: str = "auto",
        jit_args: Optional[List[Any]] = None,
        jit_kwargs: Optional[Dict[str, Any]] = None,
    ) -> None:
        super().__init__(
            float_workspace_buffer,
            kv_layout,
            use_cuda_graph,
            qo_indptr_buf,
            custom_mask_buf,
            mask_indptr_buf,
            backend,
            jit_args,
            jit_kwargs,
        )
        if use_cuda_graph and any(
            b is None for b in (qo_indptr_buf, paged_kv_indptr_buf, paged_kv_indices_buf, paged_kv_last_page_len_buf)
        ):
            raise ValueError(
                "use_cuda_graph=True needs fixed qo_indptr_buf, paged_kv_indptr_buf, "
                "paged_kv_indices_buf and paged_kv_last_page_len_buf (int32 device tensors)"
            )
        if not use_cuda_graph and any(
            b is not None for b in (paged_kv_indptr_buf, paged_kv_indices_buf, paged_kv_last_page_len_buf)
        ):
            raise ValueError("paged_kv_*_buf are CUDA-graph mode's fixed buffers: pass use_cuda_graph=True with them")
        graph = self._use_cuda_graph
        self._fixed_tables = (
            (paged_kv_indptr_buf, paged_kv_indices_buf, paged_kv_last_page_len_buf) if graph else (None, None, None)
        )
        self._paged_kv_indptr_buf = paged_kv_indptr_buf
        self._paged_kv_indices_buf = paged_kv_indices_buf
        self._paged_kv_last_page_len_buf = paged_kv_last_page_len_buf

    def plan(
        self,
        qo_indptr: torch.Tensor,
        paged_kv_indptr: torch.Tensor,
        paged_kv_indices: torch.Tensor,
        paged_kv_last_page_len: torch.Tensor,
        num_qo_heads: int,
        num_kv_heads: int,
        head_dim_qk: int,
        page_size: int,
        head_dim_vo: Optional[int] = None,
        custom_mask: Optional[torch.Tensor] = None,
        packed_custom_mask: Optional[torch.Tensor] = None,
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
        o_data_type: Optional[Union[str, torch.dtype]] = None,
        non_blocking: bool = True,
        prefix_len_ptr: Optional[torch.Tensor] = None,
        token_pos_in_items_ptr: Optional[torch.Tensor] = None,
        token_pos_in_items_len: int = 0,
        max_item_len_ptr: Optional[torch.Tensor] = None,
        seq_lens: Optional[torch.Tensor] = None,
        seq_lens_q: Optional[torch.Tensor] = None,
        block_tables: Optional[torch.Tensor] = None,
        max_token_per_sequence: Optional[int] = None,
        max_sequence_kv: Optional[int] = None,
        fixed_split_size: Optional[int] = None,
        disable_split_kv: bool = False,
    ) -> None:
        """Schedule a batch for run().

        Parameters
        ----------
        qo_indptr : torch.Tensor
            ``[batch_size + 1]``: request r's queries are rows ``qo_indptr[r]:qo_indptr[r+1]`` of q.
        paged_kv_indptr : torch.Tensor
            ``[batch_size + 1]`` int32, non-decreasing (it may start past 0): request r owns pages
            ``paged_kv_indices[paged_kv_indptr[r]:paged_kv_indptr[r + 1]]``.
        paged_kv_indices : torch.Tensor
            ``[>= paged_kv_indptr[-1]]`` int32 page ids (CPU or the wrapper's device).
        paged_kv_last_page_len : torch.Tensor
            ``[batch_size]`` int32, tokens in each request's last page (``0..page_size``); a request without pages
            has no keys (output 0, lse -inf), whatever its last_page_len.
        num_qo_heads, num_kv_heads, head_dim_qk, page_size : int
            Query heads (a multiple of num_kv_heads), KV heads, head dimension (64, 128, 256), tokens per page.
        head_dim_vo : int, optional
            None or head_dim_qk.
        custom_mask, packed_custom_mask, causal, pos_encoding_mode, use_fp16_qk_reduction : optional
            As :meth:`BatchPrefillWithRaggedKVCacheWrapper.plan`.
        sm_scale, window_left, logits_soft_cap, rope_scale, rope_theta : optional
            As single_prefill_with_kv_cache.
        q_data_type, kv_data_type, o_data_type : str or torch.dtype, optional
            q and o: float16 or bfloat16 (q's default float16; o defaults to q's and must match it). kv (default
            q's): q's dtype, or an fp8 cache, torch.float8_e4m3fn or torch.float8_e5m2, dequantised by run()'s
            ``k_scale``/``v_scale``. An fp8 q raises NotImplementedError.
        non_blocking : bool
            False: plan() returns once its copies to the device have completed.
        prefix_len_ptr, token_pos_in_items_ptr, token_pos_in_items_len, max_item_len_ptr : optional
            FlashInfer's multi-item scoring: not implemented (defaults only).
        seq_lens, seq_lens_q : torch.Tensor, optional
            ``[batch_size]`` KV and query lengths: accepted when they agree with the page table and qo_indptr.
        block_tables : torch.Tensor, optional
            FlashInfer's trtllm-gen page table: not implemented (must be None).
        max_token_per_sequence, max_sequence_kv : int, optional
            Upper bounds of the query and KV lengths: checked.
        fixed_split_size : int, optional
            Cut every request's keys into chunks of exactly this many pages; None/<= 0: chosen per batch.
        disable_split_kv : bool
            Never cut a request's keys across CTAs.
        """
        _unsupported_plan_args(
            prefix_len_ptr=prefix_len_ptr,
            token_pos_in_items_ptr=token_pos_in_items_ptr,
            token_pos_in_items_len=token_pos_in_items_len,
            max_item_len_ptr=max_item_len_ptr,
            block_tables=block_tables,
        )
        if isinstance(page_size, bool) or not isinstance(page_size, int) or not 0 < page_size <= 2**16:
            raise ValueError(f"page_size must be a positive int up to 65536, got {page_size!r}")
        h_ind = host_int32(paged_kv_indptr, "paged_kv_indptr")
        h_last = host_int32(paged_kv_last_page_len, "paged_kv_last_page_len")
        ind, last = h_ind.tolist(), h_last.tolist()
        # (It may start past 0, as vLLM's does for the prefills after its decodes: offsets into paged_kv_indices.)
        if len(ind) < 1 or ind[0] < 0 or any(b < a for a, b in zip(ind, ind[1:])):
            raise ValueError("paged_kv_indptr must be non-negative and non-decreasing")
        if len(last) != len(ind) - 1:
            raise ValueError(
                f"paged_kv_last_page_len has {len(last)} entries, expected {len(ind) - 1} "
                f"(one per request of paged_kv_indptr)"
            )
        kv_lens = []
        for r, (a, b) in enumerate(zip(ind, ind[1:])):
            # More than page_size would read past the request's pages; a request without pages has no keys.
            if b > a and not (0 <= last[r] <= page_size):
                raise ValueError(f"paged_kv_last_page_len[{r}] = {last[r]} is outside 0..page_size ({page_size})")
            kv_lens.append((b - a - 1) * page_size + last[r] if b > a else 0)
        if seq_lens is not None:
            check_table_lengths("seq_lens", seq_lens, torch.tensor(kv_lens, dtype=torch.int32))
        if not isinstance(paged_kv_indices, torch.Tensor) or paged_kv_indices.dim() != 1:
            raise ValueError("paged_kv_indices must be a 1-D int32 tensor")
        if paged_kv_indices.numel() < ind[-1]:
            raise ValueError(
                f"paged_kv_indices has {paged_kv_indices.numel()} entries, paged_kv_indptr needs {ind[-1]}"
            )
        if paged_kv_indices.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"paged_kv_indices must be int32, got {paged_kv_indices.dtype}")
        # (The kernel reads entries indptr[r]:indptr[r + 1] of these.) CPU ids: negatives and int32 overflow fail
        # here, the largest is compared with the cache in run(); device ids: bounded by the kernel
        # (FLASHINFER_CHECK_INPUTS=1 checks them in run()).
        idx, max_page_id = page_ids_int32(paged_kv_indices, ind[-1], "paged_kv_indices")
        fixed_indptr, fixed_indices, fixed_last = self._fixed_tables
        if fixed_indices is not None and fixed_indices.numel() < idx.numel():
            raise ValueError("paged_kv_indices_buf is smaller than paged_kv_indices")

        def tables() -> Dict[str, torch.Tensor]:  # (to the device once every check has passed)
            if fixed_indices is not None:
                if idx.numel() and (idx.device != fixed_indices.device or idx.data_ptr() != fixed_indices.data_ptr()):
                    fixed_indices[: idx.numel()].copy_(idx, non_blocking=non_blocking)  # (no self-copy)
                indices_dev = fixed_indices
            else:
                indices_dev = (
                    idx.to(self._device, non_blocking=non_blocking)
                    if idx.numel()
                    else torch.zeros(1, dtype=torch.int32, device=self._device)
                )
            return {
                "kv_indptr": self._to_device_int(ind, fixed_indptr, "paged_kv_indptr", non_blocking),
                "kv_indices": indices_dev,
                "kv_last_page_len": self._to_device_int(last, fixed_last, "paged_kv_last_page_len", non_blocking),
            }

        fixed = fixed_split_size * page_size if isinstance(fixed_split_size, int) and fixed_split_size > 0 else 0
        self._plan_common(
            qo_indptr,
            kv_lens,
            num_qo_heads,
            num_kv_heads,
            head_dim_qk,
            head_dim_vo,
            custom_mask,
            packed_custom_mask,
            causal,
            pos_encoding_mode,
            use_fp16_qk_reduction,
            sm_scale,
            window_left,
            logits_soft_cap,
            rope_scale,
            rope_theta,
            q_data_type,
            kv_data_type,
            o_data_type,
            non_blocking,
            seq_lens_q,
            max_token_per_sequence,
            max_sequence_kv,
            fixed,
            disable_split_kv,
            page_size,
            tables,
            max_page_id,
        )
        p = self._plan_info
        p.num_page_ids = idx.numel()
        # FlashInfer's attributes: the device page table of the last plan (graph mode: the fixed buffers).
        s = p.schedule
        self._paged_kv_indptr_buf, self._paged_kv_indices_buf, self._paged_kv_last_page_len_buf = (
            s.kv_indptr,
            s.kv_indices,
            s.kv_last_page_len,
        )

    begin_forward = plan

    def run(
        self,
        q: torch.Tensor,
        paged_kv_cache: PagedKVCache,
        *args: Any,
        q_scale: Optional[float] = None,
        k_scale: Optional[float] = None,
        v_scale: Optional[float] = None,
        out: Optional[torch.Tensor] = None,
        lse: Optional[torch.Tensor] = None,
        return_lse: bool = False,
        enable_pdl: Optional[bool] = None,
        window_left: Optional[int] = None,
        sinks: Optional[torch.Tensor] = None,
        kv_cache_sf: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
        skip_softmax_threshold_scale_factor: Optional[float] = None,
        use_fp16_softmax: Optional[bool] = None,
        uses_spcompress: Optional[bool] = None,
    ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        """Batch prefill of the planned requests against their pages.

        Parameters
        ----------
        q : torch.Tensor
            ``[qo_indptr[-1], num_qo_heads, head_dim]`` in the planned dtype.
        paged_kv_cache : torch.Tensor or (torch.Tensor, torch.Tensor)
            ``[num_pages, 2, page_size, num_kv_heads, head_dim]`` (NHD; HND swaps page_size and num_kv_heads) or a
            tuple ``(k_cache, v_cache)`` of ``[num_pages, page_size, num_kv_heads, head_dim]``, in the planned
            kv_data_type (16-bit or fp8).
        *args
            FlashInfer's jit_args kernel arguments: not implemented (must be empty).
        q_scale, k_scale : float or torch.Tensor, optional
            Multiply the logits (folded into the softmax scale: k_scale dequantises an fp8 K). A Python number or
            a one-element CPU tensor; a CUDA tensor raises TypeError (reading it would synchronize the device).
        v_scale : float or torch.Tensor, optional
            Multiplies the output (dequantises an fp8 V); the same kinds of value.
        out, lse : torch.Tensor, optional
            Preallocated ``[qo_indptr[-1], num_qo_heads, head_dim]`` (q's dtype) and ``[qo_indptr[-1], num_qo_heads]``
            float32 (with return_lse).
        return_lse : bool
            Also return the base-2 log-sum-exp (-inf for rows without a visible key).
        enable_pdl : bool, optional
            Launch with programmatic dependent launch (sm_90+); None: off.
        window_left : int, optional
            Must equal the wrapper's ``_window_left`` (FlashInfer plans the window); None uses it.
        sinks, kv_cache_sf, skip_softmax_threshold_scale_factor : optional
            Not implemented (must be None).
        use_fp16_softmax, uses_spcompress : bool, optional
            Other backends' variants: None or False (fp32 softmax, no compression).

        Returns
        -------
        torch.Tensor or (torch.Tensor, torch.Tensor)
            o ``[qo_indptr[-1], num_qo_heads, head_dim]``, or ``(o, lse)``.
        """
        _check_run_extras(
            args,
            sinks=sinks,
            kv_cache_sf=kv_cache_sf,
            skip_softmax_threshold_scale_factor=skip_softmax_threshold_scale_factor,
            use_fp16_softmax=use_fp16_softmax or None,
            uses_spcompress=uses_spcompress or None,
        )
        p = self._plan_info
        if p is None:
            raise RuntimeError("call plan() before run()")
        if window_left is not None and window_left != self._window_left:
            raise ValueError(
                f"run(window_left={window_left}) differs from the wrapper's window_left "
                f"{self._window_left} (set by plan() or forward()): plan with that window"
            )
        kv = _unpack_paged_kv_cache(paged_kv_cache, self._kv_layout, allow_fp8=True)
        if (kv.page_size, kv.num_kv_heads, kv.head_dim) != (p.page_size, p.num_kv_heads, p.head_dim):
            raise ValueError(
                f"paged_kv_cache page_size/heads/head_dim ({kv.page_size}, {kv.num_kv_heads}, "
                f"{kv.head_dim}) differ from the plan ({p.page_size}, {p.num_kv_heads}, {p.head_dim}) "
                f"for kv_layout {self._kv_layout}"
            )
        if p.max_page_id >= kv.num_pages:
            raise ValueError(
                f"paged_kv_indices holds page id {p.max_page_id} but paged_kv_cache has {kv.num_pages} pages"
            )
        check_vector_rows(kv.k, "k_cache", 3)
        check_vector_rows(kv.v, "v_cache", 3)
        scale_mult = scalar(q_scale, "q_scale", 1.0) * scalar(k_scale, "k_scale", 1.0)
        return self._run_kv(
            q,
            kv.k,
            kv.v,
            (kv.stride_page, kv.stride_n, kv.stride_h) * 2,
            out,
            lse,
            return_lse,
            scale_mult,
            scalar(v_scale, "v_scale", 1.0),
            enable_pdl,
        )

    run_return_lse = functools.partialmethod(run, return_lse=True)

    def _run_kv(
        self,
        q,
        k,
        v,
        strides,
        out,
        lse,
        return_lse,
        scale_mult: float = 1.0,
        out_scale: float = 1.0,
        enable_pdl: Optional[bool] = None,
    ):
        """run() on a validated cache taken apart: K/V views ``[num_pages, ...]`` and their (page, token, head)
        strides twice (also the tensor-core path of batch decode)."""
        p = self._plan_info
        if p is None:
            raise RuntimeError("call plan() before run()")
        num_pages = k.shape[0]
        sched = p.schedule
        check_page_ids_in_cache(sched.kv_indices, num_pages, p.max_page_id, "paged_kv_indices", p.num_page_ids)
        sched.args.num_pages = num_pages  # the kernel never reads a page id outside [0, num_pages)
        return self._launch(q, k, v, strides, out, lse, return_lse, scale_mult, out_scale, enable_pdl)

    def forward(
        self,
        q: torch.Tensor,
        paged_kv_cache: PagedKVCache,
        causal: bool = False,
        pos_encoding_mode: str = "NONE",
        use_fp16_qk_reduction: bool = False,
        k_scale: Optional[float] = None,
        v_scale: Optional[float] = None,
        window_left: int = -1,
        logits_soft_cap: Optional[float] = None,
        sm_scale: Optional[float] = None,
        rope_scale: Optional[float] = None,
        rope_theta: Optional[float] = None,
    ) -> torch.Tensor:
        """Deprecated FlashInfer spelling of run(): the attention options given here (defaults included) replace
        the wrapper's (``_causal``, ``_pos_encoding_mode``, ``_use_fp16_qk_reduction``, ``_window_left``,
        ``_logits_soft_cap``, ``_sm_scale``, ``_rope_scale``, ``_rope_theta``) for this and later runs, as in
        FlashInfer, without a new plan (the kernel variant they need runs on the planned schedule).

        Parameters
        ----------
        q, paged_kv_cache : torch.Tensor
            As :meth:`run`.
        causal, pos_encoding_mode, use_fp16_qk_reduction, window_left, logits_soft_cap, sm_scale, rope_scale, rope_theta
            As :meth:`plan` (causal has no effect when the plan has a custom mask, as in FlashInfer).
        k_scale, v_scale : float, optional
            As :meth:`run`.

        Returns
        -------
        torch.Tensor
            o ``[qo_indptr[-1], num_qo_heads, head_dim]``.
        """
        self._set_options(
            causal,
            pos_encoding_mode,
            use_fp16_qk_reduction,
            window_left,
            logits_soft_cap,
            sm_scale,
            rope_scale,
            rope_theta,
        )
        return self.run(q, paged_kv_cache, k_scale=k_scale, v_scale=v_scale)

    def forward_return_lse(
        self,
        q: torch.Tensor,
        paged_kv_cache: PagedKVCache,
        causal: bool = False,
        pos_encoding_mode: str = "NONE",
        use_fp16_qk_reduction: bool = False,
        k_scale: Optional[float] = None,
        v_scale: Optional[float] = None,
        window_left: int = -1,
        logits_soft_cap: Optional[float] = None,
        sm_scale: Optional[float] = None,
        rope_scale: Optional[float] = None,
        rope_theta: Optional[float] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """:meth:`forward` that also returns the log-sum-exp.

        Parameters
        ----------
        q, paged_kv_cache, causal, pos_encoding_mode, use_fp16_qk_reduction, k_scale, v_scale, window_left, logits_soft_cap, sm_scale,
        rope_scale, rope_theta
            As :meth:`forward`.

        Returns
        -------
        (torch.Tensor, torch.Tensor)
            o ``[qo_indptr[-1], num_qo_heads, head_dim]`` and lse ``[qo_indptr[-1], num_qo_heads]`` float32 (base 2).
        """
        self._set_options(
            causal,
            pos_encoding_mode,
            use_fp16_qk_reduction,
            window_left,
            logits_soft_cap,
            sm_scale,
            rope_scale,
            rope_theta,
        )
        return self.run(q, paged_kv_cache, k_scale=k_scale, v_scale=v_scale, return_lse=True)


def decode_with_tensor_cores(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_layout: str = "NHD",
    pos_encoding_mode: str = "NONE",
    window_left: int = -1,
    logits_soft_cap: Optional[float] = None,
    sm_scale: Optional[float] = None,
    rope_scale: Optional[float] = None,
    rope_theta: Optional[float] = None,
    return_lse: bool = False,
    *,
    q_scale: Optional[float] = None,
    k_scale: Optional[float] = None,
    v_scale: Optional[float] = None,
    out: Optional[torch.Tensor] = None,
    lse: Optional[torch.Tensor] = None,
):
    """Single-request decode through the tensor-core prefill kernel, the GQA group's heads packed as query rows
    (what FlashInfer does for ``use_tensor_cores=True``).

    Parameters
    ----------
    q : torch.Tensor
        ``[num_qo_heads, head_dim]``. k, v : torch.Tensor -- as single_decode_with_kv_cache.
    kv_layout, pos_encoding_mode, window_left, logits_soft_cap, sm_scale, rope_scale, rope_theta, return_lse
        As single_decode_with_kv_cache.
    q_scale, k_scale : float, optional
        Fold into the logit scale. v_scale : float, optional -- multiplies the output.
    out, lse : torch.Tensor, optional
        ``[num_qo_heads, head_dim]`` and ``[num_qo_heads]`` float32 preallocated outputs.

    Returns
    -------
    torch.Tensor or (torch.Tensor, torch.Tensor)
        o ``[num_qo_heads, head_dim]``, or ``(o, lse)`` with ``return_lse=True``.
    """
    check_tensor(q, "q", 2)
    scale = scalar(sm_scale, "sm_scale", 1.0 / math.sqrt(q.shape[1]))
    scale *= scalar(q_scale, "q_scale", 1.0) * scalar(k_scale, "k_scale", 1.0)
    check_out(out, "out", tuple(q.shape), q.dtype, q.device)
    check_out(lse, "lse", (q.shape[0],), torch.float32, q.device)
    q = aligned_rows(q, 1)  # the prefill kernel loads q rows with 16-byte vectors; decode accepts any view
    res = single_prefill_with_kv_cache(
        q.unsqueeze(0),
        k,
        v,
        kv_layout=kv_layout,
        pos_encoding_mode=pos_encoding_mode,
        window_left=window_left,
        logits_soft_cap=logits_soft_cap,
        sm_scale=scale,
        rope_scale=rope_scale,
        rope_theta=rope_theta,
        return_lse=return_lse,
        v_scale=v_scale,
        out=None if out is None else out.unsqueeze(0),
        lse=None if lse is None else lse.unsqueeze(0),
    )
    o3, lse2 = res if return_lse else (res, None)
    o = out if out is not None else o3[0]
    if not return_lse:
        return o
    return o, (lse if lse is not None else lse2[0])


def trtllm_batch_context_with_kv_cache(*args: Any, **kwargs: Any) -> torch.Tensor:
    """FlashInfer's TensorRT-LLM context kernel (Blackwell): not implemented here; importable so that engines'
    backends load, and raises NotImplementedError when called."""
    raise NotImplementedError(
        "trtllm_batch_context_with_kv_cache (the trtllm-gen backend) is not implemented; use "
        f"BatchPrefillWithPagedKVCacheWrapper (got {len(args)} positional, {sorted(kwargs)} keyword arguments)"
    )
