"""Decode attention: one new query token per head attending to a request's KV cache.

``single_decode_with_kv_cache``, ``BatchDecodeWithPagedKVCacheWrapper``,
``CUDAGraphBatchDecodeWithPagedKVCacheWrapper`` and ``fast_decode_plan`` are drop-ins for FlashInfer's names in
``flashinfer.decode`` (which also re-exports ``get_seq_lens``).

Batch decode: ``plan()`` runs on the CPU once per batch shape. The compiled planner (host code in the decode
module, templates/include/flashinfer/host/batch_decode_plan.cuh) reads host copies of the page table, cuts the
requests' keys into a balanced work list (long requests split so that the grid fills the GPU, partial
states merged afterwards) and sends it to the device workspace with one non-blocking copy from pinned
memory. ``run()`` only launches: no host sync, no decisions, no allocation when ``out``/``lse`` are given,
and in graph mode it is CUDA-graph capturable and replays correctly after re-plans. Eager ``run()`` calls
the launcher directly; under ``torch.compile`` it is traced through the custom op
``flashinfer::batch_decode_paged_run`` (with a fake implementation), which reaches the wrapper's current plan
by id. With ``use_tensor_cores=True`` the wrapper plans and runs through ``BatchPrefillWithPagedKVCacheWrapper``.

The attention options engines read on the wrapper (``_sm_scale``, ``_logits_soft_cap``, ``_window_left``,
``_pos_encoding_mode``, ``_rope_scale``, ``_rope_theta``) are what ``run()`` uses, as in FlashInfer: ``plan()``
sets them, the legacy ``forward()`` replaces them; a launch whose options differ from the plan's resolves
them again (another kernel variant when needed) without a new plan.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import itertools
import weakref
from typing import Any, ClassVar, Dict, Optional, Tuple, Union

import torch

from . import jit
from ._planning import (
    DECODE_PLAN_ARGS,
    DECODE_RUN_ARGS,
    BatchPlan,
    DecodePlannerABI,
    check_table_lengths,
    paged_kv_lens,
)
from ._spec_common import AttentionSpec
from .jit.abi import Launcher
from .jit.spec import register_family
from .page import PagedKV, PagedKVCache, _unpack_paged_kv_cache, get_seq_lens
from .prefill import BatchPrefillWithPagedKVCacheWrapper, decode_with_tensor_cores
from .utils import (
    DTYPE_SHORT,
    KV_DTYPE_SHORT,
    MAX_ROPE_POSITION,
    _get_range_buf,
    canonical_dtype,
    canonical_layout,
    canonical_pos_encoding,
    check_aligned,
    check_head_dim,
    check_kv,
    check_kv_dtypes,
    check_logit_options,
    check_out,
    check_page_ids_in_cache,
    check_same_device,
    check_tensor,
    check_vector_rows,
    cuda_bool,
    current_stream_at,
    current_stream_ptr,
    device_support_pdl,
    host_int32,
    not_supported,
    num_sms,
    plan_dtypes,
    scalar,
    tracing,
)

__all__ = [
    "BatchDecodePagedSpec",
    "BatchDecodeWithPagedKVCacheWrapper",
    "CUDAGraphBatchDecodeWithPagedKVCacheWrapper",
    "SingleDecodeSpec",
    "fast_decode_plan",
    "get_seq_lens",
    "single_decode_with_kv_cache",
]

# ------------------------------------------------------------------------------------------ single decode

# The KV split aims at a whole number of CTAs per SM (the launcher also stops at the resident slots and at
# _MAX_CHUNKS per KV head). Measured on an H200 (benchmarks/probe_decode_chunks.py, 2026-11-22): tiles of 4+
# query heads (groups of 3 and more) run best at 2 per SM (32q/8kv, kv_len 32768: 85.9% of copy bandwidth at
# 2, 82.3% at 3, 83.5% at 4; fewer partial states to merge), single-head tiles at 4 (32q/32kv: 102.3% at 4,
# 100.6% at 2).
_MAX_CHUNKS = 128


def _ctas_per_sm(group_size: int) -> int:
    return 2 if group_size >= 3 else 4


@register_family
@dataclasses.dataclass(frozen=True)
class SingleDecodeSpec(AttentionSpec):
    """Compile-time configuration of the single-request decode kernel (KV: q's dtype or fp8 e4m3/e5m2)."""

    fp8_kv = True

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
        Launcher("flashinfer_decode_head_tile", "int group_size"),
    )


class _SingleDecodeKernel:
    """A single decode module with what sizing its workspace needs: its launcher, the shortest chunk worth
    splitting off (``min_chunk``) and the query heads per CTA of each GQA group size (asked once)."""

    __slots__ = ("module", "run", "min_chunk", "_head_tile_fn", "_head_tiles")

    def __init__(self, module: jit.JITModule) -> None:
        self.module = module
        self.run = module.launcher("flashinfer_single_decode")
        self.min_chunk = module.constants["min_chunk"]
        self._head_tile_fn = module.launcher("flashinfer_decode_head_tile")
        self._head_tiles: Dict[int, int] = {}

    def head_tile(self, group_size: int) -> int:
        t = self._head_tiles.get(group_size)
        if t is None:
            t = self._head_tiles[group_size] = self._head_tile_fn(group_size=group_size)
        return t


_single_kernels: Dict[Tuple[Any, ...], _SingleDecodeKernel] = {}


def _single_kernel(
    head_dim: int,
    dtype: str,
    dtype_kv: str,
    kv_layout: str,
    pos_encoding_mode: str,
    use_window: bool,
    use_soft_cap: bool,
) -> _SingleDecodeKernel:
    """The kernel of a configuration, memoized on a plain tuple (cheaper to hash than the spec on every call)."""
    key = (head_dim, dtype, dtype_kv, kv_layout, pos_encoding_mode, use_window, use_soft_cap)
    hit = _single_kernels.get(key)
    if hit is None:
        spec = SingleDecodeSpec(
            head_dim, dtype, dtype_kv, dtype, kv_layout, pos_encoding_mode, use_window, use_soft_cap
        )
        hit = _single_kernels[key] = _SingleDecodeKernel(jit.load(spec))
    return hit


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
    kernel = _single_kernel(
        head_dim,
        DTYPE_SHORT[q.dtype],
        KV_DTYPE_SHORT[k.dtype],
        kv_layout,
        pos_encoding_mode,
        window_left >= 0,
        soft_cap > 0,
    )
    if (k.data_ptr() | v.data_ptr()) & 15:
        check_aligned(k, "k")
        check_aligned(v, "v")
    device = q.device
    group = num_qo_heads // num_kv_heads
    head_tiles = -(-group // kernel.head_tile(group))
    max_chunks = min(
        _MAX_CHUNKS,
        -(-_kv_span(kv_len, window_left) // kernel.min_chunk),
        -(-_ctas_per_sm(group) * num_sms(device.index) // (num_kv_heads * head_tiles)),
    )
    workspace = None
    if max_chunks > 1:
        workspace = torch.empty(max_chunks * num_qo_heads * (head_dim + 1), dtype=torch.float32, device=device)
    ks, vs = k.stride(), v.stride()
    index = device.index
    rc = kernel.run.call(  # positional, in the declaration's order (SingleDecodeSpec.launchers)
        q.data_ptr(),
        k.data_ptr(),
        v.data_ptr(),
        o.data_ptr(),
        lse.data_ptr() if lse is not None else 0,  # (0, not None: a null pointer packs as it is)
        workspace.data_ptr() if workspace is not None else 0,
        max_chunks,
        num_qo_heads,
        num_kv_heads,
        kv_len,
        q.stride(0),
        ks[0],
        ks[1],
        vs[0],
        vs[1],
        window_left,
        soft_cap,
        sm_scale,
        v_scale,
        rope_scale,
        rope_theta,
        index,
        current_stream_at(index),
    )
    if rc:
        kernel.module.check(rc, f"single_decode_with_kv_cache ({kernel.module.spec.name()}) on {device}")


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

    Parameters
    ----------
    q : torch.Tensor
        ``[num_qo_heads, head_dim]``, float16 or bfloat16, on a CUDA device.
    k, v : torch.Tensor
        ``[kv_len, num_kv_heads, head_dim]`` (``kv_layout="NHD"``) or ``[num_kv_heads, kv_len, head_dim]``
        (``"HND"``), ``kv_len >= 1``; q's dtype, or an fp8 cache (torch.float8_e4m3fn or torch.float8_e5m2, k and v
        the same one), dequantised by ``k_scale``/``v_scale``. Views are accepted when the last
        dimension is contiguous and the other strides are multiples of 16 bytes. ``num_qo_heads`` must be a
        multiple of ``num_kv_heads`` (any GQA group size); head_dim one of 64, 128, 256.
    kv_layout : str
        ``"NHD"`` or ``"HND"`` (or a ``TensorLayout``).
    pos_encoding_mode : str
        ``"NONE"``, ``"ROPE_LLAMA"`` (RoPE applied on the fly: q at position kv_len - 1, key i at position i,
        with ``rope_scale`` (default 1) and ``rope_theta`` (default 1e4)) or ``"ALIBI"`` (bias
        slope_h * (i - (kv_len - 1)) with the standard ALiBi slopes).
    use_tensor_cores : bool
        Run on the tensor-core prefill kernel (the GQA group's heads packed as query rows), as FlashInfer does;
        same arguments, validation and result up to rounding (an fp8 cache too).
    q_scale, k_scale : float or torch.Tensor, optional
        Multiply the logits (folded into the softmax scale, as FlashInfer does: k_scale dequantises an fp8 K).
        A Python number or a one-element CPU tensor; a CUDA tensor raises TypeError (reading it would sync).
    v_scale : float or torch.Tensor, optional
        Multiplies the output (dequantises an fp8 V), in the kernel; the same kinds of value.
    window_left : int
        ``w >= 0`` attends only to the last ``w + 1`` keys; ``-1`` attends to all.
    logits_soft_cap : float, optional
        ``c > 0`` maps each scaled logit x to ``c * tanh(x / c)``; None or 0 disables.
    sm_scale : float, optional
        Logit scale, default ``1 / sqrt(head_dim)``.
    rope_scale, rope_theta : float, optional
        RoPE interpolation scale (default 1) and base (default 1e4); used with ``"ROPE_LLAMA"`` only.
    return_lse : bool
        Also return lse ``[num_qo_heads]`` float32, the base-2 log-sum-exp of the scaled logits.
    out, lse : torch.Tensor, optional
        Preallocated outputs (contiguous, ``[num_qo_heads, head_dim]`` in q's dtype and ``[num_qo_heads]``
        float32; lse is written even with ``return_lse=False``); an extension over FlashInfer's signature.

    Returns
    -------
    torch.Tensor or (torch.Tensor, torch.Tensor)
        o ``[num_qo_heads, head_dim]`` in q's dtype, or ``(o, lse)`` with ``return_lse=True``.
    """
    check_tensor(q, "q", 2)
    check_tensor(k, "k", 3)
    check_tensor(v, "v", 3)
    device = check_same_device([("q", q), ("k", k), ("v", v), ("out", out), ("lse", lse)])
    kv_layout = canonical_layout(kv_layout)
    pos_encoding_mode = canonical_pos_encoding(pos_encoding_mode)
    check_kv_dtypes(q, k, v, "single_decode_with_kv_cache")
    num_qo_heads, head_dim = q.shape
    check_head_dim(head_dim)
    kv_len, num_kv_heads = check_kv(k, v, kv_layout, num_qo_heads, head_dim)
    if kv_len == 0:
        raise ValueError("kv_len is 0: decode needs at least one key")
    if kv_len >= 2**31:
        raise ValueError(f"kv_len {kv_len} exceeds the supported maximum 2**31 - 1")
    if pos_encoding_mode == "ROPE_LLAMA" and kv_len > MAX_ROPE_POSITION:
        raise ValueError(f"ROPE_LLAMA supports kv_len up to {MAX_ROPE_POSITION}, got {kv_len}")
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

    if tracing():
        o, lse_t = _single_decode_op(
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
            return_lse or lse is not None,
        )
        if out is not None:
            o = out.copy_(o)
        if lse is not None:
            lse_t = lse.copy_(lse_t)
        return (o, lse_t) if return_lse else o

    if out is not None:
        o = out
    elif q.stride(0) == head_dim:  # (empty_like: several times cheaper than torch.empty(shape, dtype=, device=))
        o = torch.empty_like(q)
    else:
        o = torch.empty_like(q, memory_format=torch.contiguous_format)
    if return_lse and lse is None:
        lse = torch.empty(num_qo_heads, dtype=torch.float32, device=device)
    _run(q, k, v, kv_layout, pos_encoding_mode, window_left, soft_cap, scale, out_scale, r_scale, r_theta, o, lse)
    return (o, lse) if return_lse else o


# ------------------------------------------------------------------------------------------- batch decode


@register_family
@dataclasses.dataclass(frozen=True)
class BatchDecodePagedSpec(AttentionSpec):
    """Compile-time configuration of the paged batch decode kernel (and its planner).

    page_size is a run-time value; a sliding window is applied by the planner (keys outside it are never
    scheduled) and, narrower, by run(); so it needs no variant of its own. KV: q's dtype or fp8 (e4m3/e5m2).
    ``tma_kernel``: the module also holds the opt-in TMA kernel (attention/batch_decode_tma.cuh; the wrapper's
    _tma_decode), which adds 1-3 s to a cold build, so default modules leave it out (named ``..._tma`` when in; not
    a prewarm axis).
    """

    fp8_kv = True

    kv_layout: str = "NHD"
    pos_encoding_mode: str = "NONE"
    use_logits_soft_cap: bool = False
    tma_kernel: bool = False

    own_axes: ClassVar[Dict[str, Tuple[Any, ...]]] = {"tma_kernel": (False,)}
    family = "decode_batch_paged"
    template = "batch_decode.cu.jinja"
    launchers = (
        Launcher("flashinfer_batch_decode_plan_size"),
        # args: a BatchDecodePlanArgs (flashinfer/_planning.py: DECODE_PLAN_ARGS, checked against the module)
        Launcher("flashinfer_batch_decode_plan", "const void* args, void* plan_out, int64_t* info"),
        Launcher(
            "flashinfer_batch_decode_schedule",
            "const int* indptr, const int* last_page_len, int batch, int page_size, int window_left, "
            "int num_qo_heads, int num_kv_heads, int slots, int fixed_workers, int no_split, void* out, "
            "int64_t out_bytes, void* plan_out, int64_t* info",
        ),
        # args: a BatchDecodeRunArgs (flashinfer/_planning.py: DECODE_RUN_ARGS, checked against the module)
        Launcher("flashinfer_batch_decode_run", "void* plan_blob, const void* args"),
        Launcher("flashinfer_event_create", "int device, void** out"),
        Launcher("flashinfer_event_destroy", "void* event", restype="void"),
    )

    def name(self) -> str:
        base = dataclasses.replace(self, tma_kernel=False)
        return AttentionSpec.name(base).rsplit("_", 1)[0] + ("_tma" if self.tma_kernel else "")

    def render_vars(self) -> Dict[str, Any]:
        # The argument structs' field names, for the template's export of their layout.
        return {
            **self.attention_vars(),
            "tma_kernel": cuda_bool(self.tma_kernel),
            "plan_args": [n for n, _ in DECODE_PLAN_ARGS],
            "run_args": [n for n, _ in DECODE_RUN_ARGS],
        }


@dataclasses.dataclass
class _DecodeModule:
    """A batch decode module's launchers and the layout of its planner's report."""

    module: jit.JITModule
    plan: Any
    run: Any
    blob_size: int
    abi: DecodePlannerABI


@functools.cache
def _decode_module(spec: BatchDecodePagedSpec) -> _DecodeModule:
    module = jit.load(spec)
    return _DecodeModule(
        module,
        module.launcher("flashinfer_batch_decode_plan"),
        module.launcher("flashinfer_batch_decode_run"),
        module.launcher("flashinfer_batch_decode_plan_size")(),
        DecodePlannerABI.of(module),
    )


@dataclasses.dataclass(frozen=True)
class _DecodeLaunch:
    """The run-time values of a launch, resolved from the wrapper's attention options."""

    run: Any  # the launcher of the kernel variant the options need
    module: jit.JITModule
    run_args_type: Any  # its BatchDecodeRunArgs ctypes struct
    sm_scale: float
    logits_soft_cap: float
    window_left: int
    rope_scale: float
    rope_theta: float


@dataclasses.dataclass(frozen=True)
class _DecodeConfig:
    """plan()'s per-configuration work, memoized per wrapper: canonical options, spec, first launch values."""

    q_dtype: torch.dtype
    kv_dtype: torch.dtype
    pos_encoding_mode: str
    window_left: int
    spec: BatchDecodePagedSpec
    frozen: Tuple[Any, ...]  # what a CUDA-graph wrapper keeps across plans
    fixed_chunk: int  # fixed_split_size in keys (tensor cores), 0: off
    no_split: bool
    launch: Optional[_DecodeLaunch]  # None with tensor cores
    module: Optional[_DecodeModule]  # the CUDA-core module (its planner), None with tensor cores
    options: Tuple[Any, ...]  # the wrapper attributes plan() sets, in _OPTION_ATTRS order
    logit_options: Tuple[Any, ...]  # (soft cap, sm_scale, rope_scale, rope_theta) as plan() received them


# The attention options of a decode wrapper, as FlashInfer names its attributes; run() uses their current values.
_OPTION_ATTRS = ("_pos_encoding_mode", "_window_left", "_logits_soft_cap", "_sm_scale", "_rope_scale", "_rope_theta")


# Live wrappers by a process-unique id: the torch.library op below reaches its wrapper's plan through it.
_LIVE_WRAPPERS: weakref.WeakValueDictionary[int, BatchDecodeWithPagedKVCacheWrapper] = weakref.WeakValueDictionary()
_WRAPPER_IDS = itertools.count(1)


class _CachedModulePlanner:
    """``wrapper._cached_module``: engines that plan CUDA-graph replays through FlashInfer's private module API
    (vLLM's ``fast_plan_decode`` calls ``_cached_module.plan(...)`` with the tensor-core planner's arguments and
    stores the result in ``_plan_info``) get a real plan of this wrapper from it."""

    def __init__(self, wrapper: BatchDecodeWithPagedKVCacheWrapper) -> None:
        self._wrapper = weakref.ref(wrapper)

    def plan(
        self,
        float_workspace_buffer: torch.Tensor,
        int_workspace_buffer: Any,
        pinned_workspace_buffer: Any,
        qo_indptr: torch.Tensor,
        kv_indptr: torch.Tensor,
        kv_lens: torch.Tensor,
        total_num_rows: int,
        batch_size: int,
        num_qo_heads: int,
        num_kv_heads: int,
        page_size: int,
        enable_cuda_graph: bool,
        head_dim_qk: int,
        head_dim_vo: int,
        causal: bool,
        window_left: int,
        fixed_split_size: int = -1,
        disable_split_kv: bool = False,
        num_colocated_ctas: int = 0,
    ) -> BatchPlan:
        """FlashInfer's tensor-core decode planner arguments (the host tables), planned by ``wrapper.plan()``
        with the wrapper's own buffers and its last plan's dtypes and options. Returns the new plan."""
        w = self._wrapper()
        if w is None or w._plan_info is None:
            raise RuntimeError("_cached_module.plan() needs a wrapper that plan() has run on")
        if not w._use_tensor_cores:
            raise NotImplementedError(
                "_cached_module.plan() takes FlashInfer's tensor-core planner arguments; this "
                "wrapper decodes on CUDA cores: call plan()"
            )
        for name, given, own in (
            ("float_workspace_buffer", float_workspace_buffer, w._float_workspace_buffer),
            ("int_workspace_buffer", int_workspace_buffer, w._int_workspace_buffer),
            ("pinned_workspace_buffer", pinned_workspace_buffer, w._pin_memory_int_workspace_buffer),
        ):
            if given is not own:
                raise ValueError(f"_cached_module.plan(): {name} must be the wrapper's own ({name[:-7]} attribute)")
        if causal or head_dim_vo != head_dim_qk or num_colocated_ctas:
            raise not_supported(
                "causal/head_dim_vo/num_colocated_ctas",
                (causal, head_dim_vo, num_colocated_ctas),
                "decode's values (False, head_dim_qk, 0)",
            )
        if bool(enable_cuda_graph) != w._use_cuda_graph:
            raise ValueError(
                f"enable_cuda_graph={enable_cuda_graph} but the wrapper has use_cuda_graph={w._use_cuda_graph}"
            )
        h_qo = host_int32(qo_indptr, "qo_indptr")
        if not torch.equal(h_qo, torch.arange(batch_size + 1, dtype=torch.int32)) or total_num_rows != batch_size:
            raise not_supported("qo_indptr", "several query rows per request", "one row per request (decode)")
        h_indptr = host_int32(kv_indptr, "kv_indptr")
        lens = host_int32(kv_lens, "kv_lens")[:batch_size]
        pages = h_indptr[1:] - h_indptr[:-1]
        last = torch.where(pages > 0, lens - (pages - 1).clamp(min=0) * page_size, torch.zeros_like(lens))
        p = w._plan_info
        indices = w._paged_kv_indices_buf if w._use_cuda_graph else w._indices_of_last_plan
        w.plan(
            h_indptr,
            indices,
            last,
            num_qo_heads,
            num_kv_heads,
            head_dim_qk,
            page_size,
            pos_encoding_mode=w._pos_encoding_mode,
            window_left=window_left,
            logits_soft_cap=w._logits_soft_cap,
            q_data_type=p.q_dtype,
            kv_data_type=p.kv_dtype,
            sm_scale=w._sm_scale,
            rope_scale=w._rope_scale,
            rope_theta=w._rope_theta,
            fixed_split_size=fixed_split_size,
            disable_split_kv=disable_split_kv,
        )
        return w._plan_info


def _tma_decode_serves(
    head_dim: int,
    q_dtype: torch.dtype,
    kv_dtype: torch.dtype,
    num_qo_heads: int,
    num_kv_heads: int,
    page_size: int,
    pos_encoding_mode: str = "NONE",
) -> bool:
    """Whether batch decode's TMA kernel serves this configuration on a Hopper GPU (the Python side of the module's
    use_tma(), templates/batch_decode.cu.jinja, which decides at plan()): 16-bit KV of q's dtype, head_dim 64 or
    128, KV heads a multiple of 8, GQA groups up to 8, pages a multiple of 16 tokens, no RoPE or ALiBi."""
    return (
        head_dim in (64, 128)
        and q_dtype == kv_dtype
        and q_dtype in (torch.float16, torch.bfloat16)
        and pos_encoding_mode == "NONE"
        and num_kv_heads % 8 == 0
        and num_qo_heads // num_kv_heads <= 8
        and page_size % 16 == 0
    )


class BatchDecodeWithPagedKVCacheWrapper:
    """Decode attention for a batch of requests whose KV caches live in a paged cache (FlashInfer's class).

    ``wrapper.plan(indptr, indices, last_page_len, num_qo_heads, num_kv_heads, head_dim, page_size)`` once per
    generation step (on the CPU; pass CPU index tensors to avoid a device-to-host copy), then
    ``wrapper.run(q, paged_kv_cache)`` for each layer.

    Parameters
    ----------
    float_workspace_buffer : torch.Tensor
        A contiguous CUDA tensor (e.g. 128 MB of uint8) holding the schedule and the partial states of split
        requests; the wrapper runs on its device.
    kv_layout : str
        ``"NHD"`` (pages ``[page_size, num_kv_heads, head_dim]``) or ``"HND"`` (``[num_kv_heads, page_size, head_dim]``).
    use_cuda_graph : bool
        Fixed buffers and batch size: ``run()`` may be captured in a CUDA graph and replayed after re-plans.
    use_tensor_cores : bool
        Plan and run on the tensor-core prefill kernel (one query row per request), as FlashInfer does.
    paged_kv_indptr_buffer, paged_kv_indices_buffer, paged_kv_last_page_len_buffer : torch.Tensor, optional
        Graph mode's fixed int32 device buffers: ``[batch_size + 1]``, ``[max_num_pages]``, ``[batch_size]``
        (batch_size is taken from the last one). plan() copies the page table into them.
    backend : str
        ``"auto"`` or ``"fa2"``; others raise NotImplementedError.
    jit_args : list, optional
        FlashInfer's custom-kernel arguments: not implemented (must be None).
    """

    # Not part of FlashInfer's API. _tma_decode: plan the CUDA-core route onto the TMA-fed Hopper kernel
    # (attention/batch_decode_tma.cuh, in the module variant that holds it) wherever it serves the configuration (16-bit KV, head_dim 64/128, KV heads a
    # multiple of 8, groups up to 8, pages a multiple of 16 tokens, no RoPE/ALiBi; plan_stats["tma_kernel"] says
    # which runs). Off by default: on a whole H200 the cp.async kernel is 3-15% faster (both near the read
    # bandwidth: 64 x 4096 keys 262 vs 271 us, 64 x 1024 69 vs 80 with its splits' merge); the TMA kernel draws
    # ~2x the bytes per SM, which is what pays where decode gets a share of the SMs only (the cascade's decode
    # level beside its shared level). _max_ctas > 0: the TMA kernel's grid on at most that many SMs.
    _tma_decode: bool = False
    _max_ctas: int = 0

    def __init__(
        self,
        float_workspace_buffer: torch.Tensor,
        kv_layout: str = "NHD",
        use_cuda_graph: bool = False,
        use_tensor_cores: bool = False,
        paged_kv_indptr_buffer: Optional[torch.Tensor] = None,
        paged_kv_indices_buffer: Optional[torch.Tensor] = None,
        paged_kv_last_page_len_buffer: Optional[torch.Tensor] = None,
        backend: str = "auto",
        jit_args: Optional[Any] = None,
    ) -> None:
        if jit_args is not None:
            raise not_supported("jit_args", "...", "None (the built-in kernels)")
        if not isinstance(backend, str) or backend.lower() not in ("auto", "fa2"):
            raise not_supported("backend", backend, "'auto', 'fa2'")
        if not isinstance(float_workspace_buffer, torch.Tensor) or float_workspace_buffer.device.type != "cuda":
            raise ValueError(
                "float_workspace_buffer must be a CUDA tensor (e.g. torch.empty(128 << 20, dtype=torch.uint8, device='cuda'))"
            )
        if not float_workspace_buffer.is_contiguous():
            raise ValueError("float_workspace_buffer must be contiguous")
        self._kv_layout = canonical_layout(kv_layout)
        self._use_cuda_graph = bool(use_cuda_graph)
        # use_tensor_cores: plan/run through BatchPrefillWithPagedKVCacheWrapper (one query row per request, the
        # GQA group's heads packed as rows), as FlashInfer does; made by the first plan().
        self._use_tensor_cores = bool(use_tensor_cores)
        self._backend = backend
        self._prefill: Optional[BatchPrefillWithPagedKVCacheWrapper] = None
        self._set_workspace(float_workspace_buffer)
        self._fixed_batch_size = 0
        self._fixed_workers = -1 if self._use_cuda_graph else 0
        self._frozen: Optional[Tuple] = None
        self._indptr_buf = paged_kv_indptr_buffer
        self._indices_buf = paged_kv_indices_buffer
        self._last_page_len_buf = paged_kv_last_page_len_buffer
        if not self._use_cuda_graph and any(
            t is not None for t in (paged_kv_indptr_buffer, paged_kv_indices_buffer, paged_kv_last_page_len_buffer)
        ):
            raise ValueError(
                "paged_kv_*_buffer are CUDA-graph mode's fixed buffers: pass use_cuda_graph=True with them "
                "(without it, plan() makes its own copies)"
            )
        if self._use_cuda_graph:
            for n, t in (
                ("paged_kv_indptr_buffer", paged_kv_indptr_buffer),
                ("paged_kv_indices_buffer", paged_kv_indices_buffer),
                ("paged_kv_last_page_len_buffer", paged_kv_last_page_len_buffer),
            ):
                if (
                    not isinstance(t, torch.Tensor)
                    or t.dim() != 1
                    or t.dtype != torch.int32
                    or t.device != self._device
                ):
                    raise ValueError(f"use_cuda_graph=True needs {n}: a 1-D int32 tensor on {self._device}")
            if not paged_kv_indices_buffer.is_contiguous():
                raise ValueError("paged_kv_indices_buffer must be contiguous")
            self._fixed_batch_size = paged_kv_last_page_len_buffer.numel()
            if paged_kv_indptr_buffer.numel() != self._fixed_batch_size + 1:
                raise ValueError(
                    f"paged_kv_indptr_buffer must hold batch_size + 1 = {self._fixed_batch_size + 1} elements "
                    f"(batch_size from paged_kv_last_page_len_buffer), got {paged_kv_indptr_buffer.numel()}"
                )
        self._pinned = [None, None]
        self._events = [None, None]
        self._event_free = None
        self._half = 0
        self._pdl_default: Optional[bool] = None  # run()'s enable_pdl=None: where the GPU supports PDL
        self._plan_args: Any = None  # the planner's BatchDecodePlanArgs, kept between plans
        self._run_args: Any = None  # the run launcher's BatchDecodeRunArgs, kept between runs
        self._plan_args_for: Optional[_DecodeConfig] = None  # the configuration its stable fields hold
        self._plan_info: Optional[BatchPlan] = None
        self._configs: Dict[Tuple[Any, ...], _DecodeConfig] = {}  # validated plan() configurations
        self._tables: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None  # last plan's page table
        self._device_tables: Optional[Tuple[torch.Tensor, ...]] = None
        self._indices_of_last_plan: Optional[torch.Tensor] = None
        for a in _OPTION_ATTRS:
            setattr(self, a, None)
        self._op_id = next(_WRAPPER_IDS)
        _LIVE_WRAPPERS[self._op_id] = self
        self._cached_module = _CachedModulePlanner(self)

    # ------------------------------------------------------------------------------------------ helpers

    def _set_workspace(self, buf: torch.Tensor, int_buf: Optional[torch.Tensor] = None) -> None:
        self._float_workspace_buffer = buf
        # FlashInfer's integer workspaces: the schedule lives in the float workspace here, so there are none (the
        # attributes exist for engines that pass them back to _cached_module.plan).
        self._int_workspace_buffer = int_buf
        self._pin_memory_int_workspace_buffer = None
        self._device = buf.device
        self._device_index = buf.device.index
        self.device = buf.device
        self._workspace_ptr = buf.data_ptr()
        self._workspace_bytes = buf.numel() * buf.element_size()

    def reset_workspace_buffer(
        self, float_workspace_buffer: torch.Tensor, int_workspace_buffer: Optional[torch.Tensor] = None
    ) -> None:
        """Replace the workspace (same device); the next run() needs a new plan().

        Parameters
        ----------
        float_workspace_buffer : torch.Tensor
            The new workspace, a contiguous CUDA tensor on the wrapper's device.
        int_workspace_buffer : torch.Tensor, optional
            FlashInfer's second (integer) workspace; this implementation keeps its schedule in the float
            workspace, so it must be None or a CUDA tensor on the same device (not used for anything else).
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
        if not float_workspace_buffer.is_contiguous():
            raise ValueError("float_workspace_buffer must be contiguous")
        self._set_workspace(float_workspace_buffer, int_workspace_buffer)
        self._plan_info = None
        self._prefill = None
        self._plan_args_for = None  # (the planner's arguments hold the old workspace)

    def _ensure_staging(self, module: jit.JITModule, nbytes: int) -> None:
        if self._events[0] is None:
            create = module.launcher("flashinfer_event_create")
            for i in range(2):
                ev = ctypes.c_void_p()
                rc = create(device=self._device.index, out=ctypes.addressof(ev))
                if rc:
                    module.check(rc, "creating the plan-copy events")
                self._events[i] = ev.value
            self._event_free = module.launcher("flashinfer_event_destroy")
        if self._pinned[0] is None or self._pinned[0].numel() < nbytes:
            size = max(nbytes, 64 << 10)
            size = 1 << (size - 1).bit_length()
            self._pinned = [torch.empty(size, dtype=torch.uint8, pin_memory=True) for _ in range(2)]

    def __del__(self) -> None:
        free = getattr(self, "_event_free", None)
        if free is not None:
            for ev in self._events:
                if ev:
                    try:
                        free(event=ev)
                    except Exception:  # interpreter shutdown
                        pass

    @property
    def is_cuda_graph_enabled(self) -> bool:
        """Whether the wrapper was built for CUDA graphs (fixed buffers and batch size)."""
        return self._use_cuda_graph

    @property
    def use_tensor_cores(self) -> bool:
        """Whether plan()/run() go through the tensor-core prefill kernel."""
        return self._use_tensor_cores

    @property
    def plan_stats(self) -> Dict[str, int]:
        """The last plan's schedule: workers, worker capacity, pieces, merges, partial states, total keys,
        workspace bytes."""
        if self._plan_info is None:
            raise RuntimeError("plan() has not been called")
        return self._plan_info.get_stats().as_dict()

    # FlashInfer's attributes for the page table of the last plan: graph mode's fixed buffers (which plan()
    # fills), else device copies made when first read (plan() itself needs none of them on the device).

    def _device_table(self, i: int) -> Optional[torch.Tensor]:
        if self._use_cuda_graph or self._tables is None:
            return (self._indptr_buf, self._indices_buf, self._last_page_len_buf)[i]
        if self._device_tables is None:
            self._device_tables = tuple(t.to(self._device) for t in self._tables)
        return self._device_tables[i]

    @property
    def _paged_kv_indptr_buf(self) -> Optional[torch.Tensor]:
        return self._device_table(0)

    @property
    def _paged_kv_indices_buf(self) -> Optional[torch.Tensor]:
        return self._device_table(1)

    @property
    def _paged_kv_last_page_len_buf(self) -> Optional[torch.Tensor]:
        return self._device_table(2)

    # ------------------------------------------------------------------------------------------ plan

    def _validate_config(
        self,
        num_qo_heads,
        num_kv_heads,
        head_dim,
        page_size,
        pos_encoding_mode,
        window_left,
        logits_soft_cap,
        q_data_type,
        kv_data_type,
        o_data_type,
        data_type,
        sm_scale,
        rope_scale,
        rope_theta,
        fixed_split_size,
        disable_split_kv,
    ) -> _DecodeConfig:
        """plan()'s per-configuration work: checks, canonical values, the spec and (CUDA cores) its module."""
        if data_type is not None:  # FlashInfer's rule: data_type fills only the dtypes left as None
            q_data_type = data_type if q_data_type is None else q_data_type
            kv_data_type = data_type if kv_data_type is None else kv_data_type
        q_dtype, kv_dtype = plan_dtypes(q_data_type, kv_data_type, "BatchDecodeWithPagedKVCacheWrapper.plan")
        if canonical_dtype(o_data_type, "o_data_type", q_dtype) != q_dtype:
            raise not_supported(
                "o_data_type", o_data_type, f"None or q_data_type ({q_dtype}): the output takes q's dtype"
            )
        for n, v in (
            ("num_qo_heads", num_qo_heads),
            ("num_kv_heads", num_kv_heads),
            ("head_dim", head_dim),
            ("page_size", page_size),
        ):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{n} must be a positive int, got {v!r}")
        check_head_dim(head_dim)
        if num_qo_heads % num_kv_heads:
            raise ValueError(f"num_qo_heads ({num_qo_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        if page_size > 2**16:
            raise ValueError(f"page_size {page_size} is too large")
        if fixed_split_size is not None and (
            isinstance(fixed_split_size, bool) or not isinstance(fixed_split_size, int)
        ):
            raise TypeError(f"fixed_split_size must be an int (pages) or None, got {fixed_split_size!r}")
        fixed = fixed_split_size if fixed_split_size is not None and fixed_split_size > 0 else 0
        if fixed and not self._use_tensor_cores:
            raise ValueError(
                "fixed_split_size is only supported by tensor core decode (use_tensor_cores=True), "
                "as in FlashInfer; use disable_split_kv=True for unsplit requests on CUDA cores"
            )
        pos = canonical_pos_encoding(pos_encoding_mode)
        window, soft_cap, scale, r_scale, r_theta = check_logit_options(
            head_dim, pos, window_left, logits_soft_cap, sm_scale, rope_scale, rope_theta, max_window=2**31 - 2
        )
        spec = BatchDecodePagedSpec(
            head_dim=head_dim,
            dtype_q=DTYPE_SHORT[q_dtype],
            dtype_kv=KV_DTYPE_SHORT[kv_dtype],
            dtype_o=DTYPE_SHORT[q_dtype],
            kv_layout=self._kv_layout,
            pos_encoding_mode=pos,
            use_logits_soft_cap=soft_cap > 0,
            tma_kernel=self._tma_decode
            and not self._use_tensor_cores
            and _tma_decode_serves(head_dim, q_dtype, kv_dtype, num_qo_heads, num_kv_heads, page_size, pos),
        )
        frozen = (spec, num_qo_heads, num_kv_heads, page_size)
        launch = dm = None
        if not self._use_tensor_cores:
            dm = _decode_module(spec)
            launch = _DecodeLaunch(dm.run, dm.module, dm.abi.run_args_type, scale, soft_cap, window, r_scale, r_theta)
        options = (
            pos_encoding_mode,
            window_left,
            0.0 if logits_soft_cap is None else logits_soft_cap,
            sm_scale,
            rope_scale,
            rope_theta,
        )
        return _DecodeConfig(
            q_dtype,
            kv_dtype,
            pos,
            window,
            spec,
            frozen,
            fixed * page_size,
            bool(disable_split_kv),
            launch,
            dm,
            options,
            (logits_soft_cap, sm_scale, rope_scale, rope_theta),
        )

    def plan(
        self,
        indptr: torch.Tensor,
        indices: torch.Tensor,
        last_page_len: torch.Tensor,
        num_qo_heads: int,
        num_kv_heads: int,
        head_dim: int,
        page_size: int,
        pos_encoding_mode: str = "NONE",
        window_left: int = -1,
        logits_soft_cap: Optional[float] = None,
        q_data_type: Optional[Union[str, torch.dtype]] = "float16",
        kv_data_type: Optional[Union[str, torch.dtype]] = None,
        o_data_type: Optional[Union[str, torch.dtype]] = None,
        data_type: Optional[Union[str, torch.dtype]] = None,
        sm_scale: Optional[float] = None,
        rope_scale: Optional[float] = None,
        rope_theta: Optional[float] = None,
        non_blocking: bool = True,
        block_tables: Optional[torch.Tensor] = None,
        seq_lens: Optional[torch.Tensor] = None,
        fixed_split_size: Optional[int] = None,
        disable_split_kv: bool = False,
        *,
        window_right: int = 0,
        q_len_per_req: int = 1,
    ) -> None:
        """Schedule a batch of requests for run().

        Parameters
        ----------
        indptr : torch.Tensor
            ``[batch_size + 1]`` int32: request r owns pages ``indices[indptr[r]:indptr[r + 1]]``. CPU tensors avoid
            a device-to-host copy.
        indices : torch.Tensor
            ``[>= indptr[-1]]`` int32 page ids, on the CPU or the wrapper's device.
        last_page_len : torch.Tensor
            ``[batch_size]`` int32: tokens in each request's last page, ``0..page_size``. A request without pages has
            no keys (its output is 0 and its lse -inf), whatever its last_page_len.
        num_qo_heads, num_kv_heads, head_dim, page_size : int
            Query heads (a multiple of num_kv_heads), KV heads, head dimension (64, 128, 256), tokens per page.
        pos_encoding_mode : str
            ``"NONE"``, ``"ROPE_LLAMA"`` or ``"ALIBI"`` (as single_decode_with_kv_cache).
        window_left : int
            ``w >= 0`` attends only to each request's last ``w + 1`` keys; ``-1`` to all.
        logits_soft_cap : float, optional
            ``c > 0``: logits become ``c * tanh(x / c)``.
        q_data_type, kv_data_type, o_data_type : str or torch.dtype, optional
            q and o: float16 or bfloat16 (q's default float16; o defaults to q's and must match it). kv (default
            q's): q's dtype, or an fp8 cache, torch.float8_e4m3fn or torch.float8_e5m2 (on tensor cores; on CUDA
            cores with RoPE or at head_dim 256), dequantised by run()'s ``k_scale``/``v_scale``. An fp8 q raises NotImplementedError.
        data_type : str or torch.dtype, optional
            Deprecated: fills q_data_type and kv_data_type where they are None (FlashInfer's rule).
        sm_scale : float, optional
            Logit scale (default ``1 / sqrt(head_dim)``).
        rope_scale, rope_theta : float, optional
            RoPE interpolation scale (default 1) and base (default 1e4).
        non_blocking : bool
            False: plan() returns only once its copies to the device have completed.
        block_tables : torch.Tensor, optional
            FlashInfer's trtllm-gen page table: not implemented (must be None).
        seq_lens : torch.Tensor, optional
            ``[batch_size]`` keys per request; accepted when it agrees with the page table.
        fixed_split_size : int, optional
            Tensor cores only (as in FlashInfer): split requests into chunks of exactly this many pages (batch-size
            invariant sums); None or <= 0: chosen per batch.
        disable_split_kv : bool
            Never split a request across CTAs (no merges; run-to-run identical sums).
        window_right : int
            FlashInfer's right window (keyword only): 0 (decode has no keys after the query).
        q_len_per_req : int
            Query tokens per request (keyword only): 1.
        """
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                "plan() cannot be captured in a CUDA graph: call it before capture/replay, then capture run()"
            )
        if block_tables is not None:
            raise not_supported("block_tables", "a tensor", "None (the paged table is indptr/indices/last_page_len)")
        if window_right != 0:
            raise not_supported("window_right", window_right, "0")
        if q_len_per_req != 1:
            raise not_supported("q_len_per_req", q_len_per_req, "1")
        # An engine plans every step with the same configuration: validate it and build its spec once.
        config_key = (
            num_qo_heads,
            num_kv_heads,
            head_dim,
            page_size,
            pos_encoding_mode,
            window_left,
            logits_soft_cap,
            q_data_type,
            kv_data_type,
            o_data_type,
            data_type,
            sm_scale,
            rope_scale,
            rope_theta,
            fixed_split_size,
            disable_split_kv,
        )
        try:
            config = self._configs.get(config_key)
        except TypeError:  # an unhashable argument: validate it (and fail) the long way
            config, config_key = None, None
        if config is None:
            config = (
                self._validate_config(*config_key)
                if config_key is not None
                else self._validate_config(
                    num_qo_heads,
                    num_kv_heads,
                    head_dim,
                    page_size,
                    pos_encoding_mode,
                    window_left,
                    logits_soft_cap,
                    q_data_type,
                    kv_data_type,
                    o_data_type,
                    data_type,
                    sm_scale,
                    rope_scale,
                    rope_theta,
                    fixed_split_size,
                    disable_split_kv,
                )
            )
            if config_key is not None:
                if len(self._configs) >= 16:
                    self._configs.clear()
                self._configs[config_key] = config
        spec = config.spec

        h_indptr = host_int32(indptr, "indptr")
        h_last = host_int32(last_page_len, "last_page_len")
        batch = h_last.numel()
        if batch == 0:
            raise ValueError("last_page_len is empty: the batch needs at least one request")
        if h_indptr.numel() != batch + 1:
            raise ValueError(
                f"indptr must have batch_size + 1 = {batch + 1} elements (batch_size from last_page_len), "
                f"got {h_indptr.numel()}"
            )
        if not isinstance(indices, torch.Tensor) or indices.dim() != 1:
            raise TypeError("indices must be a 1-D torch.Tensor of page ids")
        nnz = ctypes.c_int32.from_address(h_indptr.data_ptr() + 4 * batch).value  # indptr[-1], without a tensor op
        if indices.numel() < nnz:
            raise ValueError(f"indices has {indices.numel()} page ids, indptr[-1] says {nnz}")
        if self._use_cuda_graph and batch != self._fixed_batch_size:
            raise ValueError(
                f"this CUDA-graph wrapper was built for batch size {self._fixed_batch_size} (its buffers' "
                f"size), got {batch}; the batch size is fixed in graph mode"
            )
        if self._use_cuda_graph and self._frozen is not None and config.frozen != self._frozen:
            raise ValueError(
                "a CUDA-graph wrapper keeps its configuration across plans (captured graphs bake it in): "
                f"was {self._frozen[1:]} heads/page_size with {self._frozen[0].name()}, got "
                f"{config.frozen[1:]} with {spec.name()}"
            )
        if seq_lens is not None:
            check_table_lengths("seq_lens", seq_lens, paged_kv_lens(h_indptr, h_last, page_size))

        host_indices = 0
        device_indices = 0
        indices_ref = None
        max_index = -1
        if self._use_cuda_graph:
            buf = self._indices_buf
            if nnz > buf.numel():
                raise ValueError(f"paged_kv_indices_buffer holds {buf.numel()} page ids, the plan needs {nnz}")
            if indices.is_cpu:
                idx = indices[:nnz]
                if nnz and int(idx.min()) < 0:
                    raise ValueError("indices holds a negative page id")
                max_index = int(idx.max()) if nnz else -1
            elif indices.device != self._device:
                raise ValueError(f"indices is on {indices.device}, the workspace on {self._device}")
            if indices.dtype != torch.int32:
                raise TypeError(f"indices must be torch.int32, got {indices.dtype}")
            if nnz and indices.data_ptr() != buf.data_ptr():
                buf[:nnz].copy_(indices[:nnz], non_blocking=non_blocking)
            # FlashInfer's meaning: the buffers hold the current page table (engines often fill them in place).
            for given, host, dst in (
                (indptr, h_indptr, self._indptr_buf),
                (last_page_len, h_last, self._last_page_len_buf),
            ):
                if given.device != dst.device or given.data_ptr() != dst.data_ptr():
                    dst.copy_(host, non_blocking=non_blocking)
            device_indices = buf.data_ptr()
        elif indices.is_cpu:
            h_idx = (
                indices if indices.dtype == torch.int32 and indices.is_contiguous() else host_int32(indices, "indices")
            )
            host_indices = h_idx.data_ptr()
            indices_ref = h_idx
        else:
            if indices.get_device() != self._device_index:  # (cheaper than comparing torch.device objects)
                raise ValueError(f"indices is on {indices.device}, the workspace on {self._device}")
            if indices.dtype != torch.int32:
                raise TypeError(f"indices must be torch.int32, got {indices.dtype}")
            indices_ref = indices if indices.is_contiguous() else indices.contiguous()
            device_indices = indices_ref.data_ptr()
        self._tables = (h_indptr, indices_ref if indices_ref is not None else indices, h_last)
        self._device_tables = None
        self._indices_of_last_plan = indices

        if self._use_tensor_cores:
            kv_indices = (self._indices_buf if self._use_cuda_graph else indices_ref)[:nnz]
            self._plan_tensor_cores(
                config,
                h_indptr,
                h_last,
                kv_indices,
                max_index,
                batch,
                num_qo_heads,
                num_kv_heads,
                head_dim,
                page_size,
                non_blocking,
            )
        else:
            self._plan_cuda_cores(
                config,
                h_indptr,
                h_last,
                host_indices,
                device_indices,
                indices_ref,
                max_index,
                batch,
                nnz,
                num_qo_heads,
                num_kv_heads,
                head_dim,
                page_size,
            )
        # The attention options run() uses, with FlashInfer's meaning (a legacy forward() replaces them).
        (
            self._pos_encoding_mode,
            self._window_left,
            self._logits_soft_cap,
            self._sm_scale,
            self._rope_scale,
            self._rope_theta,
        ) = config.options
        self._cached_q_data_type = self._cached_o_data_type = config.q_dtype
        self._cached_kv_data_type = config.kv_dtype
        if self._use_cuda_graph and self._frozen is None:
            self._frozen = config.frozen
        if not non_blocking:
            torch.cuda.current_stream(self._device).synchronize()

    begin_forward = plan

    def _plan_cuda_cores(
        self,
        config: _DecodeConfig,
        h_indptr,
        h_last,
        host_indices,
        device_indices,
        indices_ref,
        max_index,
        batch,
        nnz,
        num_qo_heads,
        num_kv_heads,
        head_dim,
        page_size,
    ) -> None:
        """plan() on the CUDA-core kernel: the compiled planner writes the schedule to pinned memory and copies it
        to the workspace (one async copy, alternating between two staging buffers)."""
        dm = config.module
        abi = dm.abi
        old = self._plan_info
        # The blob is reused (it caches the RoPE table); a captured graph holds none of it (kernel parameters
        # are copied at launch).
        if old is not None and old.launch is not None and len(old.schedule[0]) >= dm.blob_size:
            schedule = old.schedule
        else:
            blob = ctypes.create_string_buffer(dm.blob_size)
            schedule = (blob, ctypes.addressof(blob))
        info = abi.new_info()  # (kept by the plan: plan_stats reads it)
        self._ensure_staging(dm.module, 64 << 10)
        a = self._plan_args
        if a is None or not isinstance(a, abi.args_type):
            a = self._plan_args = abi.args_type()
            self._plan_args_for = None
        if self._plan_args_for is not config:  # the fields that stay while the configuration does
            a.page_size, a.window_left, a.num_qo_heads, a.num_kv_heads = (
                page_size,
                config.window_left,
                num_qo_heads,
                num_kv_heads,
            )
            a.max_batch, a.indices_capacity, a.no_split = self._fixed_batch_size, 0, config.no_split
            a.workspace, a.workspace_bytes, a.device = self._workspace_ptr, self._workspace_bytes, self._device.index
            self._plan_args_for = config
        a.indptr, a.last_page_len, a.host_indices, a.device_indices = (
            h_indptr.data_ptr(),
            h_last.data_ptr(),
            host_indices,
            device_indices,
        )
        a.batch, a.nnz, a.fixed_workers = batch, nnz, self._fixed_workers
        a.max_ctas = self._max_ctas
        a.stream = current_stream_ptr(self._device)
        for _ in range(2):
            half = self._half = self._half ^ 1
            pinned = self._pinned[half]
            a.pinned, a.pinned_bytes, a.pinned_event = pinned.data_ptr(), pinned.numel(), self._events[half]
            rc = dm.plan(args=ctypes.addressof(a), plan_out=schedule[1], info=ctypes.addressof(info))
            if rc != abi.errors["pinned_too_small"]:
                break
            self._ensure_staging(dm.module, int(info[abi.info["pinned_bytes"]]))
        if rc:
            abi.raise_error(
                rc,
                info,
                dm.module,
                f"BatchDecodeWithPagedKVCacheWrapper.plan ({config.spec.name()}) on {self._device}",
                h_indptr,
                h_last,
                page_size,
                self._workspace_bytes,
            )
        at = abi.info
        if host_indices:
            max_index = info[at["max_index"]]
        if self._use_cuda_graph and self._fixed_workers < 0:
            self._fixed_workers = info[at["worker_capacity"]]
        if self._pdl_default is None:
            self._pdl_default = device_support_pdl(self._device)
        self._plan_info = BatchPlan(
            config.spec,
            dm.module,
            batch,
            batch,
            num_qo_heads,
            num_kv_heads,
            head_dim,
            page_size,
            config.q_dtype,
            config.kv_dtype,
            info[at["max_keys"]],
            functools.partial(abi.stats, info),
            schedule,
            config.options,
            config.launch,
            None,
            (indices_ref,),
            max_index,
            config.window_left,
            self._pdl_default,
        )
        self._plan_info.num_page_ids = nnz

    def _plan_tensor_cores(
        self,
        config: _DecodeConfig,
        h_indptr,
        h_last,
        kv_indices,
        max_index,
        batch,
        num_qo_heads,
        num_kv_heads,
        head_dim,
        page_size,
        non_blocking,
    ) -> None:
        """plan() of use_tensor_cores=True, on validated arguments: the same page-table checks and errors as the
        compiled planner, then BatchPrefillWithPagedKVCacheWrapper.plan with one query row per request."""
        lens = paged_kv_lens(h_indptr, h_last, page_size)  # (the compiled planner's checks and errors)
        if kv_indices.is_cpu and kv_indices.numel():
            negative = torch.nonzero(kv_indices < 0)
            if negative.numel():
                raise ValueError(f"indices[{int(negative[0, 0])}] is a negative page id")
            max_index = int(kv_indices.max())
        if self._prefill is None:
            graph = self._use_cuda_graph
            self._prefill = BatchPrefillWithPagedKVCacheWrapper(
                self._float_workspace_buffer,
                self._kv_layout,
                use_cuda_graph=graph,
                qo_indptr_buf=_get_range_buf(batch + 1, self._device).clone() if graph else None,
                paged_kv_indptr_buf=self._indptr_buf if graph else None,
                paged_kv_indices_buf=self._indices_buf if graph else None,
                paged_kv_last_page_len_buf=self._last_page_len_buf if graph else None,
            )
        pw = self._prefill
        if self._backend == "auto":
            self._backend = "fa2"  # FlashInfer's meaning: the backend "auto" resolved to
        soft_cap, sm_scale, rope_scale, rope_theta = config.logit_options
        pw.plan(
            _get_range_buf(batch + 1, "cpu"),
            h_indptr,
            kv_indices,
            h_last,
            num_qo_heads,
            num_kv_heads,
            head_dim,
            page_size,
            pos_encoding_mode=config.pos_encoding_mode,
            window_left=config.window_left,
            logits_soft_cap=soft_cap,
            sm_scale=sm_scale,
            rope_scale=rope_scale,
            rope_theta=rope_theta,
            q_data_type=config.q_dtype,
            kv_data_type=config.kv_dtype,
            non_blocking=non_blocking,
            fixed_split_size=config.fixed_chunk // page_size if config.fixed_chunk else None,
            disable_split_kv=config.no_split,
        )
        inner = pw._plan_info
        stats = dataclasses.replace(
            inner.get_stats(),
            total_keys=int(lens.clamp(max=config.window_left + 1).sum())
            if config.window_left >= 0
            else int(lens.sum()),
        )
        # The prefill kernel applies windows at run time: every key is in the plan (planned_window -1).
        self._plan_info = BatchPlan(
            config.spec,
            None,
            batch,
            batch,
            num_qo_heads,
            num_kv_heads,
            head_dim,
            page_size,
            config.q_dtype,
            config.kv_dtype,
            inner.max_kv_len,
            stats,
            pw,
            options_key=config.options,
            max_page_id=max_index,
        )

    # ------------------------------------------------------------------------------------------ run

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
        q_len_per_req: Optional[int] = None,
        skip_softmax_threshold_scale_factor: Optional[float] = None,
        kv_cache_sf: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
    ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        """Decode attention of the planned requests against their pages.

        Parameters
        ----------
        q : torch.Tensor
            ``[batch_size, num_qo_heads, head_dim]`` in the planned q dtype (the last dimension contiguous).
        paged_kv_cache : torch.Tensor or (torch.Tensor, torch.Tensor)
            ``[num_pages, 2, page_size, num_kv_heads, head_dim]`` (NHD; HND swaps page_size and num_kv_heads) or a
            tuple ``(k_cache, v_cache)`` of ``[num_pages, page_size, num_kv_heads, head_dim]``, in the planned
            kv_data_type.
        *args
            FlashInfer's extra arguments of custom (jit_args) kernels: not implemented (must be empty).
        q_scale, k_scale : float or torch.Tensor, optional
            Multiply the logits (folded into the softmax scale, as FlashInfer does: k_scale dequantises an fp8
            K). A Python number or a one-element CPU tensor; a CUDA tensor raises TypeError (reading it would
            synchronize the device).
        v_scale : float or torch.Tensor, optional
            Multiplies the output (dequantises an fp8 V), applied in the kernel; the same kinds of value.
        out : torch.Tensor, optional
            ``[batch_size, num_qo_heads, head_dim]`` contiguous, q's dtype: written and returned.
        lse : torch.Tensor, optional
            ``[batch_size, num_qo_heads]`` float32: written (also with ``return_lse=False``) and returned with
            ``return_lse=True``.
        return_lse : bool
            Also return the base-2 log-sum-exp of the scaled logits (-inf for a request without keys).
        enable_pdl : bool, optional
            Launch with programmatic dependent launch (overlaps the kernel's start with the previous kernel's
            tail); None: on where the GPU supports it (sm_90+).
        window_left : int, optional
            Must equal the wrapper's ``_window_left`` (FlashInfer plans the window); None uses it.
        sinks, skip_softmax_threshold_scale_factor, kv_cache_sf : optional
            Not implemented (must be None).
        q_len_per_req : int, optional
            Query tokens per request: 1 (or None).

        Returns
        -------
        torch.Tensor or (torch.Tensor, torch.Tensor)
            o ``[batch_size, num_qo_heads, head_dim]`` (q's dtype; 0 for a request without keys), or ``(o, lse)``.
        """
        p = self._plan_info
        if p is None:
            raise RuntimeError("run() before plan(): call wrapper.plan(...) for this batch first")
        if args:
            raise not_supported(
                "positional arguments after paged_kv_cache", len(args), "none (they feed jit_args kernels)"
            )
        if sinks is not None or skip_softmax_threshold_scale_factor is not None or kv_cache_sf is not None:
            name = (
                "sinks"
                if sinks is not None
                else "kv_cache_sf"
                if kv_cache_sf is not None
                else "skip_softmax_threshold_scale_factor"
            )
            raise not_supported(name, "a value", "None")
        if q_len_per_req not in (None, 1):
            raise not_supported("q_len_per_req", q_len_per_req, "1")
        if window_left is not None and window_left != self._window_left:
            raise ValueError(
                f"run(window_left={window_left}) differs from the wrapper's window_left "
                f"{self._window_left} (set by plan() or forward()): plan with that window"
            )
        compiling = tracing()
        if not self._use_cuda_graph and not compiling and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                "run() is being captured in a CUDA graph but this wrapper was built with use_cuda_graph=False: its "
                "schedule moves with every plan(), so replays would compute garbage. Build the wrapper with "
                "use_cuda_graph=True (fixed buffers) or use CUDAGraphBatchDecodeWithPagedKVCacheWrapper"
            )
        if not isinstance(q, torch.Tensor):
            raise TypeError(f"q must be a torch.Tensor, got {type(q).__name__}")
        if q.dim() != 3 or tuple(q.shape) != (p.batch_size, p.num_qo_heads, p.head_dim):
            raise ValueError(
                f"q must be [batch_size, num_qo_heads, head_dim] = {[p.batch_size, p.num_qo_heads, p.head_dim]} "
                f"as planned, got {tuple(q.shape)}"
            )
        if q.dtype != p.q_dtype:
            raise TypeError(f"q dtype {q.dtype} does not match the planned q_data_type {p.q_dtype}")
        if q.get_device() != self._device_index:
            raise ValueError(
                f"all tensors must be on one device: the workspace is on {self._device} but q is on {q.device}"
            )
        kv = _unpack_paged_kv_cache(paged_kv_cache, self._kv_layout, allow_fp8=True)
        if kv.k.get_device() != self._device_index:
            raise ValueError(
                f"all tensors must be on one device: the workspace is on {self._device} but "
                f"paged_kv_cache is on {kv.k.device}"
            )
        if kv.k.dtype != p.kv_dtype:
            raise TypeError(f"paged_kv_cache dtype {kv.k.dtype} does not match the planned kv_data_type {p.kv_dtype}")
        if (kv.page_size, kv.num_kv_heads, kv.head_dim) != (p.page_size, p.num_kv_heads, p.head_dim):
            raise ValueError(
                f"paged_kv_cache (kv_layout={self._kv_layout!r}) has page_size {kv.page_size}, {kv.num_kv_heads} kv heads "
                f"of dim {kv.head_dim}; the plan has page_size {p.page_size}, {p.num_kv_heads} kv heads of dim "
                f"{p.head_dim} (a cache in the other layout reads as the wrong shape)"
            )
        if self._kv_layout == "NHD" and kv.num_kv_heads > 1 and kv.stride_h != kv.head_dim:
            raise ValueError(
                f"NHD paged_kv_cache needs the heads of a token contiguous (head stride {kv.head_dim}), got {kv.stride_h}"
            )
        if self._kv_layout == "HND" and kv.page_size > 1 and kv.stride_n != kv.head_dim:
            raise ValueError(
                f"HND paged_kv_cache needs the tokens of a page contiguous (token stride {kv.head_dim}), got {kv.stride_n}"
            )
        if p.max_page_id >= kv.num_pages:
            raise ValueError(f"kv_indices holds page id {p.max_page_id} but paged_kv_cache has {kv.num_pages} pages")
        tensor_cores = isinstance(p.schedule, BatchPrefillWithPagedKVCacheWrapper)
        if not tensor_cores:  # (tensor cores: the prefill wrapper's _run_kv checks)
            ids = p.keep[0] if p.keep and p.keep[0] is not None else self._indices_buf
            check_page_ids_in_cache(ids, kv.num_pages, p.max_page_id, "indices", p.num_page_ids)
        if q.stride(-1) != 1:
            q = q.contiguous()
        check_out(out, "out", (p.batch_size, p.num_qo_heads, p.head_dim), p.q_dtype, self._device)
        check_out(lse, "lse", (p.batch_size, p.num_qo_heads), torch.float32, self._device)
        scale_mult = scalar(q_scale, "q_scale", 1.0) * scalar(k_scale, "k_scale", 1.0)
        out_scale = scalar(v_scale, "v_scale", 1.0)
        if enable_pdl is not None and not isinstance(enable_pdl, bool):
            raise TypeError(f"enable_pdl must be a bool or None, got {enable_pdl!r}")
        if compiling:  # traced: through the custom op (its fake implementation gives the shapes)
            pdl = -1 if enable_pdl is None else int(enable_pdl)
            o, lse_t = _batch_decode_op(
                q, kv.k, kv.v, self._op_id, scale_mult, out_scale, return_lse or lse is not None, pdl
            )
            if out is not None:
                o = out.copy_(o)
            if lse is not None:
                lse_t = lse.copy_(lse_t)
            return (o, lse_t) if return_lse else o
        if out is None:  # (sizes as separate ints: a tuple argument costs the factory call more)
            out = torch.empty(p.batch_size, p.num_qo_heads, p.head_dim, dtype=p.q_dtype, device=self._device)
        if return_lse and lse is None:
            lse = torch.empty(p.batch_size, p.num_qo_heads, dtype=torch.float32, device=self._device)
        self._launch(p, q, kv, out, lse, scale_mult, out_scale, enable_pdl)
        return (out, lse) if return_lse else out

    run_return_lse = functools.partialmethod(run, return_lse=True)

    def _resolve_options(self, p: BatchPlan, key: Tuple[Any, ...]) -> None:
        """Launch values for the wrapper's current attention options (set by forward() or by hand), on the
        planned schedule: another kernel variant for another position encoding or soft cap; a window only
        within the planned keys."""
        if p.resolved is None:
            p.resolved = {}
        hit = p.resolved.get(key)
        if hit is None:
            pos_attr, window_attr, soft_attr, scale_attr, rs_attr, rt_attr = key
            pos = canonical_pos_encoding(pos_attr)
            window, soft_cap, scale, r_scale, r_theta = check_logit_options(
                p.head_dim, pos, window_attr, soft_attr, scale_attr, rs_attr, rt_attr, max_window=2**31 - 2
            )
            if (
                p.planned_window >= 0
                and (window < 0 or window > p.planned_window)
                and p.max_kv_len > p.planned_window + 1
            ):
                raise ValueError(
                    f"window_left={window_attr} is wider than the planned window ({p.planned_window}), "
                    "whose keys alone were scheduled: plan() with the wider window"
                )
            if pos == "ROPE_LLAMA" and p.max_kv_len > MAX_ROPE_POSITION:
                raise ValueError(f"ROPE_LLAMA supports kv_len up to {MAX_ROPE_POSITION}")
            if p.launch is None and isinstance(p.schedule, BatchPrefillWithPagedKVCacheWrapper):
                hit = (pos, window, soft_cap, scale, r_scale, r_theta)  # pushed to the prefill wrapper at launch
            else:
                dm = _decode_module(
                    dataclasses.replace(p.spec, pos_encoding_mode=pos, use_logits_soft_cap=soft_cap > 0)
                )
                hit = _DecodeLaunch(dm.run, dm.module, dm.abi.run_args_type, scale, soft_cap, window, r_scale, r_theta)
            if len(p.resolved) >= 8:
                p.resolved.clear()
            p.resolved[key] = hit
        if isinstance(hit, _DecodeLaunch):
            p.launch = hit
        else:
            pw = p.schedule
            (
                pw._pos_encoding_mode,
                pw._window_left,
                pw._logits_soft_cap,
                pw._sm_scale,
                pw._rope_scale,
                pw._rope_theta,
            ) = hit
        p.options_key = key

    def _launch(
        self,
        p: BatchPlan,
        q: torch.Tensor,
        kv: PagedKV,
        out: torch.Tensor,
        lse: Optional[torch.Tensor],
        scale_mult: float,
        out_scale: float,
        enable_pdl: Optional[bool],
    ) -> None:
        """Launch on validated inputs (q [batch, heads, dim] with unit last stride), with the wrapper's current
        attention options."""
        key = (
            self._pos_encoding_mode,
            self._window_left,
            self._logits_soft_cap,
            self._sm_scale,
            self._rope_scale,
            self._rope_theta,
        )
        if key != p.options_key:
            self._resolve_options(p, key)
        if p.launch is None:  # tensor cores: the prefill wrapper's plan
            strides = (kv.stride_page, kv.stride_n, kv.stride_h) * 2
            p.schedule._run_kv(q, kv.k, kv.v, strides, out, lse, lse is not None, scale_mult, out_scale, enable_pdl)
            return
        L = p.launch
        a = self._run_args
        if a is None or not isinstance(a, L.run_args_type):
            a = self._run_args = L.run_args_type()
            a.device = self._device_index
        a.q, a.q_stride_b, a.q_stride_h, a.k, a.v = (
            q.data_ptr(),
            q.stride(0),
            q.stride(1),
            kv.k.data_ptr(),
            kv.v.data_ptr(),
        )
        a.stride_page, a.stride_n, a.stride_h, a.num_pages = kv.stride_page, kv.stride_n, kv.stride_h, kv.num_pages
        a.o, a.lse = out.data_ptr(), lse.data_ptr() if lse is not None else None
        a.sm_scale, a.logits_soft_cap, a.v_scale = L.sm_scale * scale_mult, L.logits_soft_cap, out_scale
        a.rope_scale, a.rope_theta, a.window_left = L.rope_scale, L.rope_theta, L.window_left
        a.enable_pdl = p.pdl if enable_pdl is None else enable_pdl
        a.stream = current_stream_ptr(self._device)
        rc = L.run(plan_blob=p.schedule[1], args=ctypes.addressof(a))
        if rc:
            L.module.check(rc, f"BatchDecodeWithPagedKVCacheWrapper.run ({L.module.spec.name()}) on {self._device}")

    # ------------------------------------------------------------------------------------------ legacy API

    def forward(
        self,
        q: torch.Tensor,
        paged_kv_cache: PagedKVCache,
        pos_encoding_mode: str = "NONE",
        q_scale: Optional[float] = None,
        k_scale: Optional[float] = None,
        v_scale: Optional[float] = None,
        window_left: int = -1,
        logits_soft_cap: Optional[float] = None,
        sm_scale: Optional[float] = None,
        rope_scale: Optional[float] = None,
        rope_theta: Optional[float] = None,
    ) -> torch.Tensor:
        """Deprecated FlashInfer spelling of run(): the attention options given here (defaults included) replace
        the wrapper's (``_pos_encoding_mode``, ``_window_left``, ``_logits_soft_cap``, ``_sm_scale``,
        ``_rope_scale``, ``_rope_theta``) for this and later runs, as in FlashInfer, without a new plan.

        Parameters
        ----------
        q : torch.Tensor
            ``[batch_size, num_qo_heads, head_dim]``.
        paged_kv_cache : torch.Tensor or (torch.Tensor, torch.Tensor)
            As :meth:`run`.
        pos_encoding_mode, window_left, logits_soft_cap, sm_scale, rope_scale, rope_theta
            As :meth:`plan`; another position encoding or soft cap runs another kernel variant. On CUDA cores
            the plan scheduled only its window's keys: a wider window raises ValueError (plan with it).
        q_scale, k_scale, v_scale : float, optional
            As :meth:`run`.

        Returns
        -------
        torch.Tensor
            o ``[batch_size, num_qo_heads, head_dim]``.
        """
        self._set_options(pos_encoding_mode, window_left, logits_soft_cap, sm_scale, rope_scale, rope_theta)
        return self.run(q, paged_kv_cache, q_scale=q_scale, k_scale=k_scale, v_scale=v_scale)

    def forward_return_lse(
        self,
        q: torch.Tensor,
        paged_kv_cache: PagedKVCache,
        pos_encoding_mode: str = "NONE",
        q_scale: Optional[float] = None,
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
        q, paged_kv_cache, pos_encoding_mode, q_scale, k_scale, v_scale, window_left, logits_soft_cap, sm_scale,
        rope_scale, rope_theta
            As :meth:`forward`.

        Returns
        -------
        (torch.Tensor, torch.Tensor)
            o ``[batch_size, num_qo_heads, head_dim]`` and lse ``[batch_size, num_qo_heads]`` float32 (base 2).
        """
        self._set_options(pos_encoding_mode, window_left, logits_soft_cap, sm_scale, rope_scale, rope_theta)
        return self.run(q, paged_kv_cache, q_scale=q_scale, k_scale=k_scale, v_scale=v_scale, return_lse=True)

    def _set_options(self, pos_encoding_mode, window_left, logits_soft_cap, sm_scale, rope_scale, rope_theta) -> None:
        if self._plan_info is None:
            raise RuntimeError("forward() before plan()/begin_forward()")
        (
            self._pos_encoding_mode,
            self._window_left,
            self._logits_soft_cap,
            self._sm_scale,
            self._rope_scale,
            self._rope_theta,
        ) = (pos_encoding_mode, window_left, logits_soft_cap, sm_scale, rope_scale, rope_theta)

    def end_forward(self) -> None:
        """Deprecated and a no-op, as in FlashInfer."""


class CUDAGraphBatchDecodeWithPagedKVCacheWrapper(BatchDecodeWithPagedKVCacheWrapper):
    """The graph-mode wrapper: fixed buffers and batch size; ``run()`` may be captured and replayed after
    re-plans with new lengths.

    Parameters
    ----------
    workspace_buffer : torch.Tensor
        As ``float_workspace_buffer`` of :class:`BatchDecodeWithPagedKVCacheWrapper`.
    indptr_buffer, indices_buffer, last_page_len_buffer : torch.Tensor
        int32 device buffers ``[batch_size + 1]``, ``[max_num_pages]``, ``[batch_size]``.
    kv_layout : str
        ``"NHD"`` or ``"HND"``.
    use_tensor_cores : bool
        As in the base class.
    """

    def __init__(
        self,
        workspace_buffer: torch.Tensor,
        indptr_buffer: torch.Tensor,
        indices_buffer: torch.Tensor,
        last_page_len_buffer: torch.Tensor,
        kv_layout: str = "NHD",
        use_tensor_cores: bool = False,
    ) -> None:
        super().__init__(
            workspace_buffer,
            kv_layout,
            use_cuda_graph=True,
            use_tensor_cores=use_tensor_cores,
            paged_kv_indptr_buffer=indptr_buffer,
            paged_kv_indices_buffer=indices_buffer,
            paged_kv_last_page_len_buffer=last_page_len_buffer,
        )


@torch.library.custom_op("flashinfer::batch_decode_paged_run", mutates_args=())
def _batch_decode_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    wrapper_id: int,
    scale_mult: float,
    v_scale: float,
    return_lse: bool,
    enable_pdl: int,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """run() of a live wrapper (by its id) with its current plan, on K/V views of the paged cache
    (enable_pdl: -1 for the default, else 0/1)."""
    w = _LIVE_WRAPPERS.get(wrapper_id)
    p = w._plan_info if w is not None else None
    if p is None:
        raise RuntimeError("batch decode: the wrapper this call was traced with is gone or has no plan")
    if tuple(q.shape) != (p.batch_size, p.num_qo_heads, p.head_dim):
        raise ValueError(
            f"q must be [batch_size, num_qo_heads, head_dim] = {[p.batch_size, p.num_qo_heads, p.head_dim]} "
            f"as planned, got {tuple(q.shape)}"
        )
    kv = _unpack_paged_kv_cache((k, v), w._kv_layout, allow_fp8=True)
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((q.shape[0], q.shape[1]) if return_lse else (0,), dtype=torch.float32, device=q.device)
    w._launch(
        p, q, kv, o, lse if return_lse else None, scale_mult, v_scale, None if enable_pdl < 0 else bool(enable_pdl)
    )
    return o, lse


@_batch_decode_op.register_fake
def _batch_decode_fake(q, k, v, wrapper_id, scale_mult, v_scale, return_lse, enable_pdl):
    return q.new_empty(q.shape), q.new_empty((q.shape[0], q.shape[1]) if return_lse else (0,), dtype=torch.float32)


def host_schedule(
    indptr: torch.Tensor,
    last_page_len: torch.Tensor,
    page_size: int,
    num_qo_heads: int,
    num_kv_heads: int,
    slots: int,
    window_left: int = -1,
    fixed_workers: int = 0,
    disable_split_kv: bool = False,
    spec: Any = None,
) -> Dict[str, Any]:
    """The decode planner alone, on the host (no GPU needed; for tests and inspection): the work list plan()
    would send for a GPU with ``slots`` resident CTAs.

    Returns a dict: ``workers`` (per worker, its pieces ``(request, begin, end, partial slot or -1)``),
    ``merges`` (``(request, first slot, count)``), ``workers_used``, ``worker_capacity``, ``pieces``,
    ``partial_states``, ``total_keys``."""
    module = jit.load(spec or BatchDecodePagedSpec())
    abi = DecodePlannerABI.of(module)
    ip, lp = host_int32(indptr, "indptr"), host_int32(last_page_len, "last_page_len")
    blob = ctypes.create_string_buffer(module.launcher("flashinfer_batch_decode_plan_size")())
    info = abi.new_info()
    out = torch.zeros(1 << 20, dtype=torch.int32)
    rc = module.launcher("flashinfer_batch_decode_schedule")(
        indptr=ip.data_ptr(),
        last_page_len=lp.data_ptr(),
        batch=lp.numel(),
        page_size=page_size,
        window_left=window_left,
        num_qo_heads=num_qo_heads,
        num_kv_heads=num_kv_heads,
        slots=slots,
        fixed_workers=fixed_workers,
        no_split=int(disable_split_kv),
        out=out.data_ptr(),
        out_bytes=out.numel() * 4,
        plan_out=ctypes.addressof(blob),
        info=ctypes.addressof(info),
    )
    if rc:
        raise ValueError(f"schedule failed: {module.error_string(rc)} (code {rc}, at {info[abi.info['bad_position']]})")
    o = out.tolist()
    at = {k: int(info[v]) for k, v in abi.info.items()}
    workers = []
    for w in range(at["worker_capacity"]):
        workers.append(
            [
                (o[at["piece_req"] + i], o[at["piece_begin"] + i], o[at["piece_end"] + i], o[at["piece_slot"] + i])
                for i in range(o[at["worker_indptr"] + w], o[at["worker_indptr"] + w + 1])
            ]
        )
    merges = [(o[at["merge_req"] + m], o[at["merge_begin"] + m], o[at["merge_count"] + m]) for m in range(o[0])]
    return {
        "workers": workers,
        "merges": merges,
        "workers_used": at["workers"],
        "worker_capacity": at["worker_capacity"],
        "pieces": at["pieces"],
        "partial_states": at["partial_states"],
        "total_keys": at["total_keys"],
    }


def fast_decode_plan(
    self: BatchDecodeWithPagedKVCacheWrapper,
    indptr: torch.Tensor,
    indices: torch.Tensor,
    last_page_len: torch.Tensor,
    num_qo_heads: int,
    num_kv_heads: int,
    head_dim: int,
    page_size: int,
    pos_encoding_mode: str = "NONE",
    window_left: int = -1,
    logits_soft_cap: Optional[float] = None,
    q_data_type: Optional[Union[str, torch.dtype]] = None,
    kv_data_type: Optional[Union[str, torch.dtype]] = None,
    data_type: Optional[Union[str, torch.dtype]] = None,
    sm_scale: Optional[float] = None,
    rope_scale: Optional[float] = None,
    rope_theta: Optional[float] = None,
    non_blocking: bool = True,
    fixed_split_size: Optional[int] = None,
    disable_split_kv: bool = False,
    q_len_per_req: int = 1,
    global_override_indptr_cpu: Optional[torch.Tensor] = None,
) -> None:
    """FlashInfer's ``fast_decode_plan``: ``wrapper.plan()`` for engines that install it as
    ``wrapper.begin_forward = functools.partial(fast_decode_plan, wrapper)`` around CUDA-graph replays.

    Its page table is usually already in the wrapper's graph buffers (indices written in place): plan() then
    copies nothing.

    Parameters
    ----------
    self : BatchDecodeWithPagedKVCacheWrapper
        The wrapper to plan.
    indptr, indices, last_page_len : torch.Tensor
        ``[batch_size + 1]``, ``[>= indptr[-1]]``, ``[batch_size]`` int32, as :meth:`BatchDecodeWithPagedKVCacheWrapper.plan`;
        with ``page_size == 1`` a device ``last_page_len`` is taken as all ones (FlashInfer's shortcut: not read back).
    num_qo_heads, num_kv_heads, head_dim, page_size, pos_encoding_mode, window_left, logits_soft_cap
        As plan().
    q_data_type, kv_data_type, data_type : str or torch.dtype, optional
        As plan(), except that ``q_data_type`` None means float16 unless ``data_type`` gives it.
    sm_scale, rope_scale, rope_theta, non_blocking, fixed_split_size, disable_split_kv, q_len_per_req
        As plan().
    global_override_indptr_cpu : torch.Tensor, optional
        ``[>= batch_size + 1]`` int32 on the CPU: indptr's values, saving its device-to-host copy.
    """
    if global_override_indptr_cpu is not None:
        indptr = global_override_indptr_cpu[: len(last_page_len) + 1]
    if page_size == 1 and not last_page_len.is_cpu:
        n = len(last_page_len)
        if n not in _ONES:
            _ONES[n] = torch.ones(n, dtype=torch.int32)
        last_page_len = _ONES[n]
    if q_data_type is None and data_type is None:
        q_data_type = "float16"
    self.plan(
        indptr,
        indices,
        last_page_len,
        num_qo_heads,
        num_kv_heads,
        head_dim,
        page_size,
        pos_encoding_mode=pos_encoding_mode,
        window_left=window_left,
        logits_soft_cap=logits_soft_cap,
        q_data_type=q_data_type,
        kv_data_type=kv_data_type,
        data_type=data_type,
        sm_scale=sm_scale,
        rope_scale=rope_scale,
        rope_theta=rope_theta,
        non_blocking=non_blocking,
        fixed_split_size=fixed_split_size,
        disable_split_kv=disable_split_kv,
        q_len_per_req=q_len_per_req,
    )


_ONES: Dict[int, torch.Tensor] = {}


def trtllm_batch_decode_with_kv_cache(*args: Any, **kwargs: Any) -> torch.Tensor:
    """FlashInfer's TensorRT-LLM decode kernel (Blackwell): not implemented here; importable so that engines'
    backends load, and raises NotImplementedError when called."""
    raise NotImplementedError(
        "trtllm_batch_decode_with_kv_cache (the trtllm-gen backend) is not implemented; use "
        f"BatchDecodeWithPagedKVCacheWrapper (got {len(args)} positional, {sorted(kwargs)} keyword arguments)"
    )
