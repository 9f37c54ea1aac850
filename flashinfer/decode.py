"""Decode attention: one new query token per head attending to a request's whole KV cache.

``single_decode_with_kv_cache`` is a drop-in for FlashInfer's function of that name.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional, Tuple, Union

import torch

from . import jit
from ._spec_common import AttentionSpec
from .jit.abi import Launcher
from .jit.spec import register_family
from .prefill import decode_with_tensor_cores
from .utils import (
    DTYPE_SHORT,
    canonical_layout,
    canonical_pos_encoding,
    check_aligned,
    check_head_dim,
    check_kv,
    check_logit_options,
    check_out,
    check_qkv_dtypes,
    check_same_device,
    check_tensor,
    check_vector_rows,
    current_stream_ptr,
    num_sms,
    scalar,
)

# Chunks shorter than this cost more to merge than they gain in parallelism (matches kMinChunk in
# templates/include/flashinfer/decode.cuh). The split aims at a whole number of CTAs per SM (the launcher
# also stops at the resident slots, 4 per SM, and at _MAX_CHUNKS per KV head). Measured on an H200
# (benchmarks/probe_decode_chunks.py, 2026-11-22): tiles of 4+ query heads (groups of 3 and more) run best
# at 2 per SM (32q/8kv, kv_len 32768: 85.9% of copy bandwidth at 2, 82.3% at 3, 83.5% at 4; fewer partial
# states to merge), single-head tiles at 4 (32q/32kv: 102.3% at 4, 100.6% at 2).
_MIN_CHUNK = 256
_MAX_CHUNKS = 128


def _ctas_per_sm(group_size: int) -> int:
    return 2 if group_size >= 3 else 4


# RoPE positions are carried as floats in the kernel and must be exact.
_MAX_ROPE_POSITION = 1 << 24


@register_family
@dataclasses.dataclass(frozen=True)
class SingleDecodeSpec(AttentionSpec):
    """Compile-time configuration of the single-request decode kernel."""

    kv_layout: str = "NHD"
    pos_encoding_mode: str = "NONE"
    use_window: bool = False
    use_logits_soft_cap: bool = False

    family = "decode_single"
    template = "single_decode.cu.jinja"
    launchers = (
        Launcher(
            "flashinfer_single_decode",
            "const void* q, const void* k, const void* v, void* o, float* lse, float* workspace, "
            "int workspace_chunks, int num_qo_heads, int num_kv_heads, int kv_len, int64_t q_stride_h, "
            "int64_t k_stride_0, int64_t k_stride_1, int64_t v_stride_0, int64_t v_stride_1, int window_left, "
            "float logits_soft_cap, float sm_scale, float v_scale, float rope_scale, float rope_theta, "
            "int device, void* stream",
        ),
    )


_launchers: Dict[Tuple[Any, ...], Tuple[jit.JITModule, Any]] = {}


def _launcher(
    head_dim: int, dtype: str, kv_layout: str, pos_encoding_mode: str, use_window: bool, use_soft_cap: bool
) -> Tuple[jit.JITModule, Any]:
    """The module and its ctypes launcher for a configuration, memoized on a plain tuple (cheaper to hash
    than the spec on every call)."""
    key = (head_dim, dtype, kv_layout, pos_encoding_mode, use_window, use_soft_cap)
    hit = _launchers.get(key)
    if hit is None:
        spec = SingleDecodeSpec(head_dim, dtype, dtype, dtype, kv_layout, pos_encoding_mode, use_window, use_soft_cap)
        module = jit.load(spec)
        hit = _launchers[key] = (module, module.launcher("flashinfer_single_decode"))
    return hit


def _head_tile(group_size: int) -> int:
    """Query heads per CTA (decode_head_tile in decode.cuh)."""
    return 1 if group_size == 1 else 2 if group_size == 2 else 8 if group_size % 8 == 0 else 4


def _kv_span(kv_len: int, window_left: int) -> int:
    """Keys a query actually attends to: all of them, or the last window_left + 1."""
    return min(kv_len, window_left + 1) if window_left >= 0 else kv_len


def _run(
    q,
    k,
    v,
    kv_layout: str,
    pos_encoding_mode: str,
    window_left: int,
    soft_cap: float,
    sm_scale: float,
    v_scale: float,
    rope_scale: float,
    rope_theta: float,
    o: torch.Tensor,
    lse: Optional[torch.Tensor],
) -> None:
    """Launch on validated inputs (q [H, D] with unit last stride; k/v checked by check_vector_rows)."""
    num_qo_heads, head_dim = q.shape
    if kv_layout == "NHD":
        kv_len, num_kv_heads = k.shape[0], k.shape[1]
    else:
        num_kv_heads, kv_len = k.shape[0], k.shape[1]
    module, fn = _launcher(head_dim, DTYPE_SHORT[q.dtype], kv_layout, pos_encoding_mode, window_left >= 0, soft_cap > 0)
    if (k.data_ptr() | v.data_ptr()) & 15:
        check_aligned(k, "k")
        check_aligned(v, "v")
    device = q.device
    group = num_qo_heads // num_kv_heads
    head_tiles = -(-group // _head_tile(group))
    max_chunks = min(
        _MAX_CHUNKS,
        -(-_kv_span(kv_len, window_left) // _MIN_CHUNK),
        -(-_ctas_per_sm(group) * num_sms(device.index) // (num_kv_heads * head_tiles)),
    )
    workspace = None
    if max_chunks > 1:
        workspace = torch.empty(max_chunks * num_qo_heads * (head_dim + 1), dtype=torch.float32, device=device)
    rc = fn(
        q=q.data_ptr(),
        k=k.data_ptr(),
        v=v.data_ptr(),
        o=o.data_ptr(),
        lse=lse.data_ptr() if lse is not None else None,
        workspace=workspace.data_ptr() if workspace is not None else None,
        workspace_chunks=max_chunks,
        num_qo_heads=num_qo_heads,
        num_kv_heads=num_kv_heads,
        kv_len=kv_len,
        q_stride_h=q.stride(0),
        k_stride_0=k.stride(0),
        k_stride_1=k.stride(1),
        v_stride_0=v.stride(0),
        v_stride_1=v.stride(1),
        window_left=window_left,
        logits_soft_cap=soft_cap,
        sm_scale=sm_scale,
        v_scale=v_scale,
        rope_scale=rope_scale,
        rope_theta=rope_theta,
        device=device.index,
        stream=current_stream_ptr(device),
    )
    if rc:
        module.check(rc, f"single_decode_with_kv_cache ({module.spec.name()}) on {device}")


@torch.library.custom_op("flashinfer::single_decode", mutates_args=())
def _single_decode_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_layout: str,
    pos_encoding_mode: str,
    window_left: int,
    logits_soft_cap: float,
    sm_scale: float,
    v_scale: float,
    rope_scale: float,
    rope_theta: float,
    return_lse: bool,
) -> Tuple[torch.Tensor, torch.Tensor]:
    o = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty(q.shape[0] if return_lse else 0, dtype=torch.float32, device=q.device)
    _run(
        q,
        k,
        v,
        kv_layout,
        pos_encoding_mode,
        window_left,
        logits_soft_cap,
        sm_scale,
        v_scale,
        rope_scale,
        rope_theta,
        o,
        lse if return_lse else None,
    )
    return o, lse


@_single_decode_op.register_fake
def _single_decode_fake(
    q,
    k,
    v,
    kv_layout,
    pos_encoding_mode,
    window_left,
    logits_soft_cap,
    sm_scale,
    v_scale,
    rope_scale,
    rope_theta,
    return_lse,
):
    return q.new_empty(q.shape), q.new_empty((q.shape[0] if return_lse else 0,), dtype=torch.float32)


def single_decode_with_kv_cache(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_layout: str = "NHD",
    pos_encoding_mode: str = "NONE",
    use_tensor_cores: bool = False,
    q_scale: Optional[float] = None,
    k_scale: Optional[float] = None,
    v_scale: Optional[float] = None,
    window_left: int = -1,
    logits_soft_cap: Optional[float] = None,
    sm_scale: Optional[float] = None,
    rope_scale: Optional[float] = None,
    rope_theta: Optional[float] = None,
    return_lse: bool = False,
    *,
    out: Optional[torch.Tensor] = None,
    lse: Optional[torch.Tensor] = None,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Decode attention of one request: each query head attends to every key of the request.

    Args:
        q: ``[num_qo_heads, head_dim]``, float16 or bfloat16, on a CUDA device.
        k, v: ``[kv_len, num_kv_heads, head_dim]`` (``kv_layout="NHD"``) or ``[num_kv_heads, kv_len, head_dim]``
            (``"HND"``), q's dtype. Views are accepted when the last dimension is contiguous and the other
            strides are multiples of 16 bytes. ``num_qo_heads`` must be a multiple of ``num_kv_heads`` (any
            GQA group size); head_dim one of 64, 128, 256.
        pos_encoding_mode: ``"NONE"``, ``"ROPE_LLAMA"`` (RoPE applied on the fly: q at position kv_len-1,
            key i at position i, with ``rope_scale`` (default 1) and ``rope_theta`` (default 1e4)) or
            ``"ALIBI"`` (bias slope_h * (i - (kv_len - 1)) with the standard ALiBi slopes).
        use_tensor_cores: run on the tensor-core prefill kernel (the GQA group's heads packed as query rows), as
            FlashInfer does; same arguments, validation and result up to rounding.
        q_scale, k_scale: multiply the logits; v_scale multiplies the output.
        window_left: ``w >= 0`` attends only to the last ``w + 1`` keys; ``-1`` attends to all.
        logits_soft_cap: ``c > 0`` maps each scaled logit x to ``c * tanh(x / c)``; None or 0 disables.
        sm_scale: logit scale, default ``1 / sqrt(head_dim)``.
        return_lse: also return lse ``[num_qo_heads]`` float32, the base-2 log-sum-exp of the scaled logits.
        out, lse: optional preallocated outputs (contiguous, ``[num_qo_heads, head_dim]`` in q's dtype and
            ``[num_qo_heads]`` float32); an extension over FlashInfer's signature.

    Returns:
        o ``[num_qo_heads, head_dim]`` in q's dtype, or ``(o, lse)`` with ``return_lse=True``.
    """
    check_tensor(q, "q", 2)
    check_tensor(k, "k", 3)
    check_tensor(v, "v", 3)
    device = check_same_device([("q", q), ("k", k), ("v", v), ("out", out), ("lse", lse)])
    kv_layout = canonical_layout(kv_layout)
    pos_encoding_mode = canonical_pos_encoding(pos_encoding_mode)
    check_qkv_dtypes(q, k, v)
    num_qo_heads, head_dim = q.shape
    check_head_dim(head_dim)
    kv_len, num_kv_heads = check_kv(k, v, kv_layout, num_qo_heads, head_dim)
    if kv_len == 0:
        raise ValueError("kv_len is 0: decode needs at least one key")
    if kv_len >= 2**31:
        raise ValueError(f"kv_len {kv_len} exceeds the supported maximum 2**31 - 1")
    if pos_encoding_mode == "ROPE_LLAMA" and kv_len > _MAX_ROPE_POSITION:
        raise ValueError(f"ROPE_LLAMA supports kv_len up to {_MAX_ROPE_POSITION}, got {kv_len}")
    window_left, soft_cap, scale, r_scale, r_theta = check_logit_options(
        head_dim, pos_encoding_mode, window_left, logits_soft_cap, sm_scale, rope_scale, rope_theta
    )
    scale *= scalar(q_scale, "q_scale", 1.0) * scalar(k_scale, "k_scale", 1.0)
    out_scale = scalar(v_scale, "v_scale", 1.0)
    check_vector_rows(k, "k", 2)
    check_vector_rows(v, "v", 2)
    if q.stride(-1) != 1:
        q = q.contiguous()
    check_out(out, "out", (num_qo_heads, head_dim), q.dtype, device)
    check_out(lse, "lse", (num_qo_heads,), torch.float32, device)

    if use_tensor_cores:  # FlashInfer's routing: the tensor-core prefill kernel, GQA heads packed as query rows
        return decode_with_tensor_cores(
            q,
            k,
            v,
            kv_layout,
            pos_encoding_mode,
            window_left,
            soft_cap,
            scale,
            r_scale,
            r_theta,
            return_lse,
            v_scale=out_scale,
            out=out,
            lse=lse,
        )

    if torch.compiler.is_compiling():
        o, lse_t = _single_decode_op(
            q, k, v, kv_layout, pos_encoding_mode, window_left, soft_cap, scale, out_scale, r_scale, r_theta, return_lse
        )
        if out is not None:
            o = out.copy_(o)
        if return_lse and lse is not None:
            lse_t = lse.copy_(lse_t)
        return (o, lse_t) if return_lse else o

    o = out if out is not None else torch.empty((num_qo_heads, head_dim), dtype=q.dtype, device=device)
    if return_lse and lse is None:
        lse = torch.empty((num_qo_heads,), dtype=torch.float32, device=device)
    _run(
        q,
        k,
        v,
        kv_layout,
        pos_encoding_mode,
        window_left,
        soft_cap,
        scale,
        out_scale,
        r_scale,
        r_theta,
        o,
        lse if return_lse else None,
    )
    return (o, lse) if return_lse else o
