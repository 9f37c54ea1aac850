"""Batch decode attention over a paged KV cache: ``BatchDecodeWithPagedKVCacheWrapper`` and
``CUDAGraphBatchDecodeWithPagedKVCacheWrapper``, drop-ins for FlashInfer's classes of those names.

``plan()`` runs on the CPU once per batch shape: the compiled planner (host code in the decode module) reads
host copies of the page table, cuts the requests' keys into a balanced work list (long requests split so that
the grid fills the GPU, partial states merged afterwards) and sends it to the device workspace with one
non-blocking copy from pinned memory. ``run()`` only launches: no host sync, no decisions, no allocation when
``out``/``lse`` are given, and in graph mode it is CUDA-graph capturable and replays correctly after re-plans.
Eager ``run()`` calls the launcher directly; under ``torch.compile`` it is traced through the custom op
``flashinfer::batch_decode_paged_run`` (with a fake implementation), which reaches the wrapper's current plan by id.
With ``use_tensor_cores=True`` the wrapper plans and runs through ``BatchPrefillWithPagedKVCacheWrapper`` instead.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import itertools
import weakref
from typing import Any, Dict, Optional, Tuple, Union

import torch

from . import jit
from ._spec_common import AttentionSpec
from .jit.abi import Launcher
from .jit.spec import register_family
from .page import PagedKV, PagedKVCache, unpack_paged_kv_cache
from .prefill import BatchPrefillWithPagedKVCacheWrapper
from .utils import (
    DTYPE_SHORT,
    aligned_rows,
    canonical_layout,
    canonical_pos_encoding,
    check_head_dim,
    check_logit_options,
    MAX_KV_LEN,
    check_inputs_enabled,
    check_out,
    check_page_ids_in_cache,
    current_stream_ptr,
    scalar,
    workspace_too_small,
)

# RoPE positions are carried as floats in the kernel and must be exact.
_MAX_ROPE_POSITION = 1 << 24
_PLAN_ARG_NAMES = ("indptr", "indices", "last_page_len", "num_qo_heads", "num_kv_heads", "head_dim", "page_size",
                   "pos_encoding_mode", "window_left", "logits_soft_cap", "q_data_type", "kv_data_type", "data_type",
                   "sm_scale", "rope_scale", "rope_theta", "non_blocking")
_INFO_LEN = 18  # kPlanInfoLen in batch_decode.cuh


@register_family
@dataclasses.dataclass(frozen=True)
class BatchDecodePagedSpec(AttentionSpec):
    """Compile-time configuration of the paged batch decode kernel (and its planner).

    page_size is a run-time value; a sliding window is applied by the planner (keys outside it are never
    scheduled), so it needs no variant of its own.
    """

    kv_layout: str = "NHD"
    pos_encoding_mode: str = "NONE"
    use_logits_soft_cap: bool = False

    family = "decode_batch_paged"
    template = "batch_decode.cu.jinja"
    launchers = (
        Launcher("flashinfer_batch_decode_plan_size"),
        Launcher("flashinfer_batch_decode_plan",
                 "const int* indptr, const int* last_page_len, const int* host_indices, const int* device_indices, "
                 "int batch, int nnz, int page_size, int window_left, int num_qo_heads, int num_kv_heads, "
                 "int fixed_workers, int max_batch, int indices_capacity, float logits_soft_cap, float sm_scale, "
                 "float rope_scale, float rope_theta, void* pinned, int64_t pinned_bytes, void* workspace, "
                 "int64_t workspace_bytes, int device, void* stream, void* pinned_event, void* plan_out, int64_t* info"),
        Launcher("flashinfer_batch_decode_schedule",
                 "const int* indptr, const int* last_page_len, int batch, int page_size, int window_left, "
                 "int num_qo_heads, int num_kv_heads, int slots, int fixed_workers, void* out, int64_t out_bytes, "
                 "void* plan_out, int64_t* info"),
        Launcher("flashinfer_batch_decode_run",
                 "const void* plan_blob, const void* q, int64_t q_stride_b, int64_t q_stride_h, const void* k, "
                 "const void* v, int64_t stride_page, int64_t stride_n, int64_t stride_h, int num_pages, void* o, "
                 "float* lse, float scale_mult, float v_scale, int device, void* stream"),
        Launcher("flashinfer_event_create", "int device, void** out"),
        Launcher("flashinfer_event_destroy", "void* event", restype="void"),
    )



@functools.lru_cache(maxsize=None)
def _module(spec: BatchDecodePagedSpec):
    module = jit.load(spec)
    return (module, module.fn("flashinfer_batch_decode_plan"), module.fn("flashinfer_batch_decode_run"),
            module.fn("flashinfer_batch_decode_plan_size")())


_DTYPE_NAMES = {"float16": torch.float16, "half": torch.float16, "f16": torch.float16, "fp16": torch.float16,
                "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def _canonical_dtype(x: Any, name: str) -> torch.dtype:
    if isinstance(x, torch.dtype):
        dt = x
    elif isinstance(x, str) and x.lower().replace("torch.", "") in _DTYPE_NAMES:
        dt = _DTYPE_NAMES[x.lower().replace("torch.", "")]
    else:
        raise TypeError(f"{name} must be torch.float16/torch.bfloat16 or its name, got {x!r}")
    if dt not in DTYPE_SHORT:
        raise TypeError(f"{name} {dt} is not supported; supported: torch.float16, torch.bfloat16")
    return dt


def _host_int32(t: Any, name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(t.shape)}")
    if t.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be an integer tensor (torch.int32), got {t.dtype}")
    if t.device.type != "cpu":
        t = t.to("cpu")  # one device-to-host copy (pass CPU tensors to avoid it)
    if t.dtype != torch.int32:
        if t.numel() and (int(t.max()) >= 2**31 or int(t.min()) < -(2**31)):
            raise ValueError(f"{name} values exceed int32")
        t = t.to(torch.int32)
    return t if t.is_contiguous() else t.contiguous()


@dataclasses.dataclass
class _Plan:
    spec: BatchDecodePagedSpec
    module: Any
    run_fn: Any
    blob: Any  # ctypes buffer holding the C BatchDecodePlan
    blob_ptr: int
    batch: int
    num_qo_heads: int
    num_kv_heads: int
    head_dim: int
    page_size: int
    q_dtype: torch.dtype
    kv_dtype: torch.dtype
    max_index: int  # largest page id when known on the host, else -1
    nnz: int
    indices_ref: Optional[torch.Tensor]  # keeps caller's device indices alive
    stats: Any  # dict, or the compiled planner's info words (see plan_stats)
    plan_args: Tuple[Any, ...]  # plan()'s arguments in _PLAN_ARG_NAMES order, for forward()'s re-plans
    prefill: Optional[BatchPrefillWithPagedKVCacheWrapper] = None  # use_tensor_cores: plans and runs instead


def _check_page_table(h_indptr: torch.Tensor, h_last: torch.Tensor, page_size: int,
                      window_left: int) -> Tuple[int, int, int]:
    """The compiled planner's page-table checks, on the host: (its error code or 0, the position it names, keys
    the requests attend to). For the tensor-core path, whose errors must read the same."""
    ip, lp = h_indptr.tolist(), h_last.tolist()
    if ip[0] != 0:
        return -1, 0, 0
    keys = 0
    for r in range(len(lp)):
        pages = ip[r + 1] - ip[r]
        if pages < 0:
            return -1, r + 1, 0
        if pages == 0:
            return -2, r, 0
        if not 1 <= lp[r] <= page_size:
            return -3, r, 0
        n = (pages - 1) * page_size + lp[r]
        if n > MAX_KV_LEN:
            return -8, r, 0
        keys += min(n, window_left + 1) if window_left >= 0 else n
    return 0, 0, keys


# Live wrappers by a process-unique id: the torch.library op below reaches its wrapper's plan through it.
_LIVE_WRAPPERS: "weakref.WeakValueDictionary[int, BatchDecodeWithPagedKVCacheWrapper]" = weakref.WeakValueDictionary()
_WRAPPER_IDS = itertools.count(1)


class BatchDecodeWithPagedKVCacheWrapper:
    """Decode attention for a batch of requests whose KV caches live in a paged cache.

    ``wrapper.plan(kv_indptr, kv_indices, kv_last_page_len, num_qo_heads, num_kv_heads, head_dim, page_size)``
    once per generation step (on the CPU; pass CPU index tensors to avoid a device-to-host copy), then
    ``wrapper.run(q, paged_kv_cache)`` for each layer. ``float_workspace_buffer`` (a CUDA tensor, e.g.
    128 MB of uint8) holds the schedule and the partial states of split requests.
    """

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
        if not isinstance(float_workspace_buffer, torch.Tensor) or float_workspace_buffer.device.type != "cuda":
            raise ValueError("float_workspace_buffer must be a CUDA tensor (e.g. torch.empty(128 << 20, dtype=torch.uint8, device='cuda'))")
        if not float_workspace_buffer.is_contiguous():
            raise ValueError("float_workspace_buffer must be contiguous")
        self._kv_layout = canonical_layout(kv_layout)
        self._use_cuda_graph = bool(use_cuda_graph)
        # use_tensor_cores: plan/run through BatchPrefillWithPagedKVCacheWrapper (one query row per request, the
        # GQA group's heads packed as rows), as FlashInfer does; made by the first plan().
        self._use_tensor_cores = bool(use_tensor_cores)
        self._prefill: Optional[BatchPrefillWithPagedKVCacheWrapper] = None
        self._set_workspace(float_workspace_buffer)
        self._fixed_batch: Optional[int] = None
        self._fixed_workers = -1 if self._use_cuda_graph else 0
        self._frozen: Optional[Tuple] = None
        self._indptr_buf = paged_kv_indptr_buffer
        self._indices_buf = paged_kv_indices_buffer
        self._last_page_len_buf = paged_kv_last_page_len_buffer
        if self._use_cuda_graph:
            for n, t in (("paged_kv_indptr_buffer", paged_kv_indptr_buffer),
                         ("paged_kv_indices_buffer", paged_kv_indices_buffer),
                         ("paged_kv_last_page_len_buffer", paged_kv_last_page_len_buffer)):
                if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.dtype != torch.int32 or t.device != self._device:
                    raise ValueError(f"use_cuda_graph=True needs {n}: a 1-D int32 tensor on {self._device}")
            if not paged_kv_indices_buffer.is_contiguous():
                raise ValueError("paged_kv_indices_buffer must be contiguous")
            self._fixed_batch = paged_kv_last_page_len_buffer.numel()
            if paged_kv_indptr_buffer.numel() != self._fixed_batch + 1:
                raise ValueError(f"paged_kv_indptr_buffer must hold batch_size + 1 = {self._fixed_batch + 1} elements "
                                 f"(batch_size from paged_kv_last_page_len_buffer), got {paged_kv_indptr_buffer.numel()}")
        self._pinned = [None, None]
        self._events = [None, None]
        self._event_free = None
        self._half = 0
        self._info = (ctypes.c_int64 * _INFO_LEN)()
        self._info_ptr = ctypes.addressof(self._info)
        self._plan: Optional[_Plan] = None
        self._configs: Dict[Tuple[Any, ...], Tuple[Any, ...]] = {}  # validated plan() configurations
        self._op_id = next(_WRAPPER_IDS)
        _LIVE_WRAPPERS[self._op_id] = self

    # ------------------------------------------------------------------------------------------ helpers

    def _set_workspace(self, buf: torch.Tensor) -> None:
        self._workspace = buf
        self._device = buf.device
        self._workspace_ptr = buf.data_ptr()
        self._workspace_bytes = buf.numel() * buf.element_size()

    def reset_workspace_buffer(self, float_workspace_buffer: torch.Tensor, int_workspace_buffer: Optional[torch.Tensor] = None) -> None:
        if self._use_cuda_graph:
            raise RuntimeError("reset_workspace_buffer: a CUDA-graph wrapper's workspace is fixed (captured graphs point at it)")
        if float_workspace_buffer.device != self._device:
            raise ValueError(f"the new workspace must stay on {self._device}")
        self._set_workspace(float_workspace_buffer)
        self._plan = None
        self._prefill = None

    def _ensure_staging(self, module, nbytes: int) -> None:
        if self._events[0] is None:
            fn = module.fn("flashinfer_event_create")
            for i in range(2):
                ev = ctypes.c_void_p()
                rc = fn(self._device.index, ctypes.byref(ev))
                if rc:
                    module.check(rc, "creating the plan-copy events")
                self._events[i] = ev.value
            self._event_free = module.fn("flashinfer_event_destroy")
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
                        free(ev)
                    except Exception:  # interpreter shutdown
                        pass

    @property
    def is_cuda_graph_enabled(self) -> bool:
        return self._use_cuda_graph

    @property
    def plan_stats(self) -> Dict[str, int]:
        """The last plan's schedule: workers, pieces, merges, partial states, total keys, workspace bytes."""
        if self._plan is None:
            raise RuntimeError("plan() has not been called")
        stats = self._plan.stats
        if isinstance(stats, dict):
            return dict(stats)
        return {"workers": stats[1], "worker_capacity": stats[9], "pieces": stats[2], "merges": stats[3],
                "partial_states": stats[5], "total_keys": stats[6], "workspace_bytes": stats[0]}

    # ------------------------------------------------------------------------------------------ plan

    def _validate_config(self, num_qo_heads, num_kv_heads, head_dim, page_size, pos_encoding_mode, window_left,
                         logits_soft_cap, q_data_type, kv_data_type, data_type, sm_scale, rope_scale, rope_theta):
        """plan()'s per-configuration work: checks, canonical values, the spec and (CUDA cores) its module."""
        if data_type is not None:
            q_data_type = kv_data_type = data_type
        q_dtype = _canonical_dtype(q_data_type, "q_data_type")
        kv_dtype = _canonical_dtype(kv_data_type, "kv_data_type") if kv_data_type is not None else q_dtype
        if kv_dtype != q_dtype:
            raise TypeError(f"q_data_type {q_dtype} and kv_data_type {kv_dtype} must match (float16 or bfloat16)")
        for n, v in (("num_qo_heads", num_qo_heads), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim),
                     ("page_size", page_size)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{n} must be a positive int, got {v!r}")
        check_head_dim(head_dim)
        if num_qo_heads % num_kv_heads:
            raise ValueError(f"num_qo_heads ({num_qo_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        if page_size > 2**16:
            raise ValueError(f"page_size {page_size} is too large")
        pos = canonical_pos_encoding(pos_encoding_mode)
        window_left, soft_cap, scale, r_scale, r_theta = check_logit_options(
            head_dim, pos, window_left, logits_soft_cap, sm_scale, rope_scale, rope_theta, max_window=2**31 - 2)
        spec = BatchDecodePagedSpec(head_dim=head_dim, dtype_q=DTYPE_SHORT[q_dtype], dtype_kv=DTYPE_SHORT[kv_dtype],
                                    dtype_o=DTYPE_SHORT[q_dtype], kv_layout=self._kv_layout, pos_encoding_mode=pos,
                                    use_logits_soft_cap=soft_cap > 0)
        frozen = (spec, num_qo_heads, num_kv_heads, page_size)
        if self._use_tensor_cores:
            frozen += (window_left,)  # a launch argument of the prefill kernel (the decode planner applies it)
        return q_dtype, kv_dtype, pos, window_left, soft_cap, scale, r_scale, r_theta, spec, frozen

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
        q_data_type: Union[str, torch.dtype] = "float16",
        kv_data_type: Optional[Union[str, torch.dtype]] = None,
        data_type: Optional[Union[str, torch.dtype]] = None,
        sm_scale: Optional[float] = None,
        rope_scale: Optional[float] = None,
        rope_theta: Optional[float] = None,
        non_blocking: bool = True,
    ) -> None:
        """Schedules a batch: ``indptr [batch + 1]``, ``indices [nnz_pages]``, ``last_page_len [batch]`` (int32,
        CPU or this device). See FlashInfer's ``BatchDecodeWithPagedKVCacheWrapper.plan`` for the arguments;
        ``data_type`` (deprecated) sets both q and kv dtypes."""
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError("plan() cannot be captured in a CUDA graph: call it before capture/replay, then capture run()")
        plan_args = (indptr, indices, last_page_len, num_qo_heads, num_kv_heads, head_dim, page_size, pos_encoding_mode,
                     window_left, logits_soft_cap, q_data_type, kv_data_type, data_type, sm_scale, rope_scale,
                     rope_theta, non_blocking)
        # An engine plans every step with the same configuration: validate it and build its spec once.
        config_key = plan_args[3:16]
        try:
            config = self._configs.get(config_key)
        except TypeError:  # an unhashable argument: validate it (and fail) the long way
            config, config_key = None, None
        if config is None:
            config = self._validate_config(*plan_args[3:16])
            if config_key is not None:
                if len(self._configs) >= 16:
                    self._configs.clear()
                self._configs[config_key] = config
        q_dtype, kv_dtype, pos, window_left, soft_cap, scale, r_scale, r_theta, spec, frozen = config

        h_indptr = _host_int32(indptr, "indptr")
        h_last = _host_int32(last_page_len, "last_page_len")
        batch = h_last.numel()
        if batch == 0:
            raise ValueError("last_page_len is empty: the batch needs at least one request")
        if h_indptr.numel() != batch + 1:
            raise ValueError(f"indptr must have batch_size + 1 = {batch + 1} elements (batch_size from last_page_len), "
                             f"got {h_indptr.numel()}")
        if not isinstance(indices, torch.Tensor) or indices.dim() != 1:
            raise TypeError("indices must be a 1-D torch.Tensor of page ids")
        nnz = ctypes.c_int32.from_address(h_indptr.data_ptr() + 4 * batch).value  # indptr[-1], without a tensor op
        if indices.numel() < nnz:
            raise ValueError(f"indices has {indices.numel()} page ids, indptr[-1] says {nnz}")
        if self._fixed_batch is not None and batch != self._fixed_batch:
            raise ValueError(f"this CUDA-graph wrapper was built for batch size {self._fixed_batch} (its buffers' size), "
                             f"got {batch}; the batch size is fixed in graph mode")

        if self._use_cuda_graph and self._frozen is not None and frozen != self._frozen:
            raise ValueError("a CUDA-graph wrapper keeps its configuration across plans (captured graphs bake it in): "
                             f"was {self._frozen[1:]} heads/page_size with {self._frozen[0].name()}, got {frozen[1:]} "
                             f"with {spec.name()}")
        if not self._use_tensor_cores:
            module, plan_fn, run_fn, blob_size = _module(spec)

        host_indices = 0
        device_indices = 0
        indices_ref = None
        max_index = -1
        if self._use_cuda_graph:
            buf = self._indices_buf
            if nnz > buf.numel():
                raise ValueError(f"paged_kv_indices_buffer holds {buf.numel()} page ids, the plan needs {nnz}")
            if indices.device.type == "cpu":
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
            device_indices = buf.data_ptr()
        elif indices.device.type == "cpu":
            h_idx = indices if indices.dtype == torch.int32 and indices.is_contiguous() else _host_int32(indices, "indices")
            host_indices = h_idx.data_ptr()
        else:
            if indices.device != self._device:
                raise ValueError(f"indices is on {indices.device}, the workspace on {self._device}")
            if indices.dtype != torch.int32:
                raise TypeError(f"indices must be torch.int32, got {indices.dtype}")
            indices_ref = indices if indices.is_contiguous() else indices.contiguous()
            device_indices = indices_ref.data_ptr()

        if self._use_tensor_cores:
            kv_indices = (self._indices_buf if self._use_cuda_graph else h_idx if host_indices else indices_ref)[:nnz]
            self._plan_tensor_cores(spec, frozen, h_indptr, h_last, kv_indices, bool(host_indices), max_index, batch,
                                    nnz, num_qo_heads, num_kv_heads, head_dim, page_size, pos, window_left, soft_cap,
                                    scale, r_scale, r_theta, q_dtype, kv_dtype, non_blocking, plan_args)
            return

        blob = self._plan.blob if self._plan is not None and len(self._plan.blob) >= blob_size else ctypes.create_string_buffer(blob_size)
        info = self._info
        stream = current_stream_ptr(self._device)
        self._ensure_staging(module, 64 << 10)
        for _ in range(2):
            half = self._half = self._half ^ 1
            pinned = self._pinned[half]
            rc = plan_fn(
                h_indptr.data_ptr(), h_last.data_ptr(), host_indices, device_indices, batch, nnz, page_size,
                window_left, num_qo_heads, num_kv_heads, self._fixed_workers, self._fixed_batch or 0, 0,
                soft_cap, scale, r_scale, r_theta, pinned.data_ptr(), pinned.numel(), self._workspace_ptr,
                self._workspace_bytes, self._device.index, stream, self._events[half], ctypes.addressof(blob),
                self._info_ptr,
            )
            if rc != -5:
                break
            self._ensure_staging(module, int(info[8]))
        if rc:
            self._plan_error(rc, int(info[7]), int(info[0]), module, h_indptr, h_last, page_size)
        if host_indices:
            max_index = int(info[4])
        if self._use_cuda_graph and self._fixed_workers < 0:
            self._fixed_workers = int(info[9])
            self._frozen = frozen
        stats = info[:10]  # turned into a dict by plan_stats()
        self._plan = _Plan(spec, module, run_fn, blob, ctypes.addressof(blob), batch, num_qo_heads, num_kv_heads,
                           head_dim, page_size, q_dtype, kv_dtype, max_index, nnz, indices_ref, stats, plan_args)

    def _plan_tensor_cores(self, spec, frozen, h_indptr, h_last, kv_indices, host_indices, max_index, batch, nnz,
                           num_qo_heads, num_kv_heads, head_dim, page_size, pos, window_left, soft_cap, scale, r_scale,
                           r_theta, q_dtype, kv_dtype, non_blocking, plan_args) -> None:
        """plan() of use_tensor_cores=True, on validated arguments: the same page-table checks and errors as the
        compiled planner, then BatchPrefillWithPagedKVCacheWrapper.plan with one query row per request."""
        rc, at, keys = _check_page_table(h_indptr, h_last, page_size, window_left)
        if rc:
            self._plan_error(rc, at, 0, None, h_indptr, h_last, page_size)
        if host_indices and nnz:
            negative = torch.nonzero(kv_indices < 0)
            if negative.numel():
                self._plan_error(-6, int(negative[0, 0]), 0, None, h_indptr, h_last, page_size)
            max_index = int(kv_indices.max())
        if self._prefill is None:
            graph = self._use_cuda_graph
            self._prefill = BatchPrefillWithPagedKVCacheWrapper(
                self._workspace, self._kv_layout, use_cuda_graph=graph,
                qo_indptr_buf=torch.empty(batch + 1, dtype=torch.int32, device=self._device) if graph else None,
                paged_kv_indptr_buf=self._indptr_buf if graph else None,
                paged_kv_indices_buf=self._indices_buf if graph else None,
                paged_kv_last_page_len_buf=self._last_page_len_buf if graph else None)
        pw = self._prefill
        pw.plan(torch.arange(batch + 1, dtype=torch.int32), h_indptr, kv_indices, h_last, num_qo_heads, num_kv_heads,
                head_dim, page_size, pos_encoding_mode=pos, window_left=window_left,
                logits_soft_cap=soft_cap if soft_cap > 0 else None, sm_scale=scale, rope_scale=r_scale,
                rope_theta=r_theta, q_data_type=q_dtype, kv_data_type=kv_dtype, non_blocking=non_blocking)
        if self._use_cuda_graph:
            self._frozen = frozen
        pl = pw._plan
        stats = {"workers": pl["grid_x"], "worker_capacity": pl["grid_x"], "pieces": pl["num_work"],
                 "merges": pl["num_merge"], "partial_states": pl["part_rows"], "total_keys": keys,
                 "workspace_bytes": pl["part_rows"] * num_qo_heads * (head_dim + 1) * 4}
        self._plan = _Plan(spec, None, None, None, 0, batch, num_qo_heads, num_kv_heads, head_dim, page_size, q_dtype,
                           kv_dtype, max_index, nnz, None, stats, plan_args, prefill=pw)

    def _plan_error(self, rc: int, at: int, need_bytes: int, module, h_indptr, h_last, page_size) -> None:
        if rc == -1:
            raise ValueError(f"indptr must start at 0 and never decrease; indptr[{at}] = {int(h_indptr[at])}"
                             + (f" < indptr[{at - 1}] = {int(h_indptr[at - 1])}" if at > 0 else ""))
        if rc == -2:
            raise ValueError(f"request {at} has no pages (indptr[{at}] == indptr[{at + 1}]); every request needs >= 1 page")
        if rc == -3:
            raise ValueError(f"last_page_len[{at}] = {int(h_last[at])} is outside 1..page_size ({page_size})")
        if rc == -4:
            raise workspace_too_small(self._workspace_bytes, need_bytes)
        if rc == -6:
            raise ValueError(f"indices[{at}] is a negative page id")
        if rc == -7:
            raise ValueError("batch or page count above the CUDA-graph wrapper's fixed capacity")
        if rc == -8:
            keys = (int(h_indptr[at + 1]) - int(h_indptr[at]) - 1) * page_size + int(h_last[at])
            raise ValueError(f"request {at} has {keys} keys; at most {MAX_KV_LEN} (2**31 - 2**16) keys per request are "
                             f"supported (token positions are 32-bit in the kernels)")
        module.check(rc, f"BatchDecodeWithPagedKVCacheWrapper.plan ({module.spec.name()}) on {self._device}")

    begin_forward = plan

    # ------------------------------------------------------------------------------------------ run

    def run(
        self,
        q: torch.Tensor,
        paged_kv_cache: PagedKVCache,
        *,
        q_scale: Optional[float] = None,
        k_scale: Optional[float] = None,
        v_scale: Optional[float] = None,
        out: Optional[torch.Tensor] = None,
        lse: Optional[torch.Tensor] = None,
        return_lse: bool = False,
        enable_pdl: Optional[bool] = None,
    ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        """Decode attention of ``q [batch, num_qo_heads, head_dim]`` against the planned requests' pages of
        ``paged_kv_cache``. Returns o ``[batch, num_qo_heads, head_dim]`` (q's dtype), or ``(o, lse)`` with
        ``return_lse=True`` (lse ``[batch, num_qo_heads]`` float32, base-2 log-sum-exp of the scaled logits)."""
        p = self._plan
        if p is None:
            raise RuntimeError("run() before plan(): call wrapper.plan(...) for this batch first")
        compiling = torch.compiler.is_compiling()
        if not self._use_cuda_graph and not compiling and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                "run() is being captured in a CUDA graph but this wrapper was built with use_cuda_graph=False: its "
                "schedule moves with every plan(), so replays would compute garbage. Build the wrapper with "
                "use_cuda_graph=True (fixed buffers) or use CUDAGraphBatchDecodeWithPagedKVCacheWrapper")
        if not isinstance(q, torch.Tensor):
            raise TypeError(f"q must be a torch.Tensor, got {type(q).__name__}")
        if q.dim() != 3 or tuple(q.shape) != (p.batch, p.num_qo_heads, p.head_dim):
            raise ValueError(f"q must be [batch_size, num_qo_heads, head_dim] = {[p.batch, p.num_qo_heads, p.head_dim]} "
                             f"as planned, got {tuple(q.shape)}")
        if q.dtype != p.q_dtype:
            raise TypeError(f"q dtype {q.dtype} does not match the planned q_data_type {p.q_dtype}")
        if q.device != self._device:
            raise ValueError(f"all tensors must be on one device: the workspace is on {self._device} but q is on {q.device}")
        kv = unpack_paged_kv_cache(paged_kv_cache, self._kv_layout)
        if kv.k.device != self._device:
            raise ValueError(f"all tensors must be on one device: the workspace is on {self._device} but "
                             f"paged_kv_cache is on {kv.k.device}")
        if kv.k.dtype != p.kv_dtype:
            raise TypeError(f"paged_kv_cache dtype {kv.k.dtype} does not match the planned kv_data_type {p.kv_dtype}")
        if (kv.page_size, kv.num_kv_heads, kv.head_dim) != (p.page_size, p.num_kv_heads, p.head_dim):
            raise ValueError(
                f"paged_kv_cache (kv_layout={self._kv_layout!r}) has page_size {kv.page_size}, {kv.num_kv_heads} kv heads "
                f"of dim {kv.head_dim}; the plan has page_size {p.page_size}, {p.num_kv_heads} kv heads of dim "
                f"{p.head_dim} (a cache in the other layout reads as the wrong shape)")
        if self._kv_layout == "NHD" and kv.num_kv_heads > 1 and kv.stride_h != kv.head_dim:
            raise ValueError(f"NHD paged_kv_cache needs the heads of a token contiguous (head stride {kv.head_dim}), got {kv.stride_h}")
        if self._kv_layout == "HND" and kv.page_size > 1 and kv.stride_n != kv.head_dim:
            raise ValueError(f"HND paged_kv_cache needs the tokens of a page contiguous (token stride {kv.head_dim}), got {kv.stride_n}")
        if p.max_index >= kv.num_pages:
            raise ValueError(f"kv_indices holds page id {p.max_index} but paged_kv_cache has {kv.num_pages} pages")
        if p.prefill is None and p.max_index < 0 and check_inputs_enabled():  # device ids (tensor cores: in _run_kv)
            ids = p.indices_ref if p.indices_ref is not None else self._indices_buf
            check_page_ids_in_cache(ids[: p.nnz], kv.num_pages, -1, "indices")
        if q.stride(-1) != 1:
            q = q.contiguous()
        check_out(out, "out", (p.batch, p.num_qo_heads, p.head_dim), p.q_dtype, self._device)
        check_out(lse, "lse", (p.batch, p.num_qo_heads), torch.float32, self._device)
        scale_mult = scalar(q_scale, "q_scale", 1.0) * scalar(k_scale, "k_scale", 1.0)
        out_scale = scalar(v_scale, "v_scale", 1.0)
        if compiling:  # traced: through the custom op (its fake implementation gives the shapes)
            o, lse_t = _batch_decode_op(q, kv.k, kv.v, self._op_id, scale_mult, out_scale, return_lse)
            if out is not None:
                o = out.copy_(o)
            if return_lse and lse is not None:
                lse_t = lse.copy_(lse_t)
            return (o, lse_t) if return_lse else o
        if out is None:
            out = torch.empty((p.batch, p.num_qo_heads, p.head_dim), dtype=p.q_dtype, device=self._device)
        if return_lse and lse is None:
            lse = torch.empty((p.batch, p.num_qo_heads), dtype=torch.float32, device=self._device)
        self._launch(p, q, kv, out, lse if return_lse else None, scale_mult, out_scale)
        return (out, lse) if return_lse else out

    def _launch(self, p: _Plan, q: torch.Tensor, kv: PagedKV, out: torch.Tensor, lse: Optional[torch.Tensor],
                scale_mult: float, out_scale: float) -> None:
        """Launch on validated inputs (q [batch, heads, dim] with unit last stride)."""
        if p.prefill is not None:
            strides = (kv.stride_page, kv.stride_n, kv.stride_h) * 2
            p.prefill._run_kv(aligned_rows(q, 2), kv.k, kv.v, strides, out, lse, lse is not None, scale_mult)
            if out_scale != 1.0:
                out.mul_(out_scale)
            return
        rc = p.run_fn(
            p.blob_ptr, q.data_ptr(), q.stride(0), q.stride(1), kv.k.data_ptr(), kv.v.data_ptr(), kv.stride_page,
            kv.stride_n, kv.stride_h, kv.num_pages, out.data_ptr(), lse.data_ptr() if lse is not None else None,
            scale_mult, out_scale, self._device.index, current_stream_ptr(self._device),
        )
        if rc:
            p.module.check(rc, f"BatchDecodeWithPagedKVCacheWrapper.run ({p.spec.name()}) on {self._device}")

    def run_return_lse(self, q: torch.Tensor, paged_kv_cache: PagedKVCache, q_scale: Optional[float] = None,
                       k_scale: Optional[float] = None, v_scale: Optional[float] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.run(q, paged_kv_cache, q_scale=q_scale, k_scale=k_scale, v_scale=v_scale, return_lse=True)

    def forward(self, q: torch.Tensor, paged_kv_cache: PagedKVCache, pos_encoding_mode: str = "NONE",
                q_scale: Optional[float] = None, k_scale: Optional[float] = None, v_scale: Optional[float] = None,
                logits_soft_cap: Optional[float] = None, sm_scale: Optional[float] = None,
                rope_scale: Optional[float] = None, rope_theta: Optional[float] = None) -> torch.Tensor:
        """Deprecated FlashInfer spelling: re-plans when the attention options differ from the plan's, then runs."""
        self._replan_if_changed(pos_encoding_mode, logits_soft_cap, sm_scale, rope_scale, rope_theta)
        return self.run(q, paged_kv_cache, q_scale=q_scale, k_scale=k_scale, v_scale=v_scale)

    def forward_return_lse(self, q: torch.Tensor, paged_kv_cache: PagedKVCache, pos_encoding_mode: str = "NONE",
                           q_scale: Optional[float] = None, k_scale: Optional[float] = None,
                           v_scale: Optional[float] = None, logits_soft_cap: Optional[float] = None,
                           sm_scale: Optional[float] = None, rope_scale: Optional[float] = None,
                           rope_theta: Optional[float] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        self._replan_if_changed(pos_encoding_mode, logits_soft_cap, sm_scale, rope_scale, rope_theta)
        return self.run(q, paged_kv_cache, q_scale=q_scale, k_scale=k_scale, v_scale=v_scale, return_lse=True)

    def _replan_if_changed(self, pos_encoding_mode, logits_soft_cap, sm_scale, rope_scale, rope_theta) -> None:
        if self._plan is None:
            raise RuntimeError("forward() before plan()/begin_forward()")
        args = dict(zip(_PLAN_ARG_NAMES, self._plan.plan_args))
        new = dict(pos_encoding_mode=pos_encoding_mode, logits_soft_cap=logits_soft_cap, sm_scale=sm_scale,
                   rope_scale=rope_scale, rope_theta=rope_theta)
        if any(args[k] != v for k, v in new.items()):
            args.update(new)
            self.plan(**args)

    def end_forward(self) -> None:
        """Kept for FlashInfer compatibility; nothing to release."""


class CUDAGraphBatchDecodeWithPagedKVCacheWrapper(BatchDecodeWithPagedKVCacheWrapper):
    """The graph-mode wrapper: fixed buffers and batch size; ``run()`` may be captured and replayed after
    re-plans with new lengths."""

    def __init__(self, workspace_buffer: torch.Tensor, indptr_buffer: torch.Tensor, indices_buffer: torch.Tensor,
                 last_page_len_buffer: torch.Tensor, kv_layout: str = "NHD", use_tensor_cores: bool = False) -> None:
        super().__init__(workspace_buffer, kv_layout, use_cuda_graph=True, use_tensor_cores=use_tensor_cores,
                         paged_kv_indptr_buffer=indptr_buffer, paged_kv_indices_buffer=indices_buffer,
                         paged_kv_last_page_len_buffer=last_page_len_buffer)


@torch.library.custom_op("flashinfer::batch_decode_paged_run", mutates_args=())
def _batch_decode_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, wrapper_id: int, scale_mult: float,
                     v_scale: float, return_lse: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """run() of a live wrapper (by its id) with its current plan, on K/V views of the paged cache."""
    w = _LIVE_WRAPPERS.get(wrapper_id)
    p = w._plan if w is not None else None
    if p is None:
        raise RuntimeError("batch decode: the wrapper this call was traced with is gone or has no plan")
    if tuple(q.shape) != (p.batch, p.num_qo_heads, p.head_dim):
        raise ValueError(f"q must be [batch_size, num_qo_heads, head_dim] = {[p.batch, p.num_qo_heads, p.head_dim]} "
                         f"as planned, got {tuple(q.shape)}")
    kv = unpack_paged_kv_cache((k, v), w._kv_layout)
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((q.shape[0], q.shape[1]) if return_lse else (0,), dtype=torch.float32, device=q.device)
    w._launch(p, q, kv, o, lse if return_lse else None, scale_mult, v_scale)
    return o, lse


@_batch_decode_op.register_fake
def _batch_decode_fake(q, k, v, wrapper_id, scale_mult, v_scale, return_lse):
    return q.new_empty(q.shape), q.new_empty((q.shape[0], q.shape[1]) if return_lse else (0,), dtype=torch.float32)


def host_schedule(indptr: torch.Tensor, last_page_len: torch.Tensor, page_size: int, num_qo_heads: int,
                  num_kv_heads: int, slots: int, window_left: int = -1, fixed_workers: int = 0,
                  spec: Optional[BatchDecodePagedSpec] = None) -> Dict[str, Any]:
    """The planner alone, on the host (no GPU needed; for tests and inspection): the work list plan() would
    send for a GPU with ``slots`` resident CTAs. Returns per-worker lists of pieces (request, begin, end,
    partial slot or -1) and the merges (request, first slot, count)."""
    spec = spec or BatchDecodePagedSpec()
    module = jit.load(spec)
    fn = module.fn("flashinfer_batch_decode_schedule")
    ip, lp = _host_int32(indptr, "indptr"), _host_int32(last_page_len, "last_page_len")
    batch = lp.numel()
    blob = ctypes.create_string_buffer(module.fn("flashinfer_batch_decode_plan_size")())
    info = (ctypes.c_int64 * _INFO_LEN)()
    out = torch.zeros(1 << 20, dtype=torch.int32)
    rc = fn(ip.data_ptr(), lp.data_ptr(), batch, page_size, window_left, num_qo_heads, num_kv_heads, slots,
            fixed_workers, out.data_ptr(), out.numel() * 4, ctypes.addressof(blob), ctypes.addressof(info))
    if rc:
        raise ValueError(f"schedule failed: {module.error_string(rc)} (code {rc}, at {info[7]})")
    o = out.tolist()
    wi, pr, pb, pe, ps, mr, mb, mc = (int(x) for x in info[10:18])
    capacity = int(info[9])
    workers = []
    for w in range(capacity):
        workers.append([(o[pr + i], o[pb + i], o[pe + i], o[ps + i]) for i in range(o[wi + w], o[wi + w + 1])])
    merges = [(o[mr + m], o[mb + m], o[mc + m]) for m in range(o[0])]
    return {"workers": workers, "merges": merges, "workers_used": int(info[1]), "worker_capacity": capacity,
            "pieces": int(info[2]), "partial_states": int(info[5]), "total_keys": int(info[6])}
