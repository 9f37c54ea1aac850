"""Batch planning, for every batch wrapper: the one shape a plan has (:class:`BatchPlan`), and the two planners
side by side: the paged batch decode planner (compiled C++, ``batch_decode_plan`` in
templates/include/flashinfer/host/batch_decode_plan.cuh, driven by flashinfer/decode.py: the wrapper's plan()
and ``host_schedule``) and the batch prefill
planner (Python, :func:`schedule_prefill`; its schedule goes to the device as one int32 buffer laid out by
:class:`PrefillScheduleLayout`).

Tile sizes, the decode planner's info array and error codes, and the prefill schedule's field counts are read
from the modules (``module.constants``): Python keeps no copy of them.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .utils import MAX_KV_LEN, host_int32, workspace_too_small

# Keys the prefill planner never splits further: a KV chunk shorter than this costs more to merge than it
# gains in parallelism (a scheduling policy, not a kernel constant).
PREFILL_MIN_CHUNK = 512


# ------------------------------------------------------------------------------------------- the plan shape


@dataclasses.dataclass
class PlanStats:
    """The schedule a plan chose (``wrapper.plan_stats``): CTAs' worth of work, pieces of requests, merges of
    split requests, partial states in the workspace, keys attended to and workspace bytes used; ``tma_kernel``: 1
    where batch decode runs on its TMA-fed Hopper kernel."""

    workers: int
    worker_capacity: int
    pieces: int
    merges: int
    partial_states: int
    total_keys: int
    workspace_bytes: int
    tma_kernel: int = 0

    def as_dict(self) -> Dict[str, int]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class BatchPlan:
    """What ``plan()`` leaves for ``run()``, in every batch wrapper (``wrapper._plan_info``).

    ``spec``/``module`` are the planned kernel variant; ``schedule`` is the launcher's schedule (decode: the
    C ``BatchDecodePlan`` bytes; prefill: a :class:`PrefillSchedule`). ``options_key`` is the wrapper's
    attention options (``_sm_scale``, ``_window_left``...) ``launch`` was resolved for: a legacy ``forward()``
    that changes them makes the next launch resolve them again, without a new plan.
    """

    spec: Any
    module: Any
    batch_size: int
    total_q: int  # rows of q: batch_size for decode, qo_indptr[-1] for prefill
    num_qo_heads: int
    num_kv_heads: int
    head_dim: int
    page_size: int
    q_dtype: torch.dtype
    kv_dtype: torch.dtype
    max_kv_len: int  # longest request (keys), for checks of run-time options (window, RoPE range)
    stats: Any  # PlanStats, or a zero-argument callable making it (the decode planner's report, read when asked)
    schedule: Any
    options_key: Tuple[Any, ...] = ()
    launch: Any = None  # the resolved launch values for options_key (family-specific)
    resolved: Optional[Dict[Tuple[Any, ...], Any]] = None  # options key -> launch values, made when first needed
    keep: Tuple[Any, ...] = ()  # tensors the device schedule points into (kept alive)
    max_page_id: int = -1  # paged KV: largest page id when known on the host, else -1
    planned_window: int = -1  # the window_left the schedule was made for (-1: every key scheduled)
    pdl: Optional[bool] = None  # run()'s enable_pdl default
    total_kv: int = 0  # ragged KV: rows of k/v
    num_page_ids: int = 0  # paged KV: page ids the plan reads (the device table's first entries)

    def get_stats(self) -> PlanStats:
        if not isinstance(self.stats, PlanStats):
            self.stats = self.stats()
        return self.stats


def check_table_lengths(name: str, given: Any, expected: torch.Tensor) -> None:
    """``seq_lens``-style arguments restate what the index tables imply: accepted when they agree."""
    g = host_int32(given.reshape(-1) if isinstance(given, torch.Tensor) else given, name)
    if g.numel() != expected.numel() or not torch.equal(g, expected.to(torch.int32)):
        raise ValueError(
            f"{name} {g.tolist()[:8]}... disagrees with the lengths the index tables give "
            f"({expected.tolist()[:8]}...); pass the same lengths or leave {name}=None"
        )


# ------------------------------------------------------------------------------- batch decode (C++ planner)


def bad_indptr(h_indptr: torch.Tensor, at: int) -> ValueError:
    return ValueError(
        f"indptr must start at 0 and never decrease; indptr[{at}] = {int(h_indptr[at])}"
        + (f" < indptr[{at - 1}] = {int(h_indptr[at - 1])}" if at > 0 else "")
    )


def bad_last_page_len(h_last: torch.Tensor, at: int, page_size: int) -> ValueError:
    return ValueError(
        f"last_page_len[{at}] = {int(h_last[at])} is outside 0..page_size ({page_size}) for a request "
        f"with pages (more would read past its last page)"
    )


def paged_kv_lens(h_indptr: torch.Tensor, h_last: torch.Tensor, page_size: int) -> torch.Tensor:
    """Keys per request of a host page table, with the decode planner's checks (raised as its errors): 0 for a
    request without pages (whatever its last_page_len), else ``(pages - 1) * page_size + last_page_len`` with
    last_page_len in ``0..page_size``. int64 (repeated page ids can sum past 2**31 keys: never wrapped)."""
    pages = (h_indptr[1:] - h_indptr[:-1]).to(torch.int64)
    if int(h_indptr[0]) != 0:
        raise bad_indptr(h_indptr, 0)
    bad = torch.nonzero(pages < 0)
    if bad.numel():
        raise bad_indptr(h_indptr, int(bad[0, 0]) + 1)
    bad = torch.nonzero((pages > 0) & ((h_last < 0) | (h_last > page_size)))
    if bad.numel():
        raise bad_last_page_len(h_last, int(bad[0, 0]), page_size)
    return torch.where(pages > 0, (pages - 1) * page_size + h_last.to(torch.int64), torch.zeros_like(pages))


# The hot launchers (batch decode plan and run, batch prefill) take their arguments as one C struct each, which a
# wrapper keeps and fills field by field: cheaper than 20 to 40 call arguments per call (plan() must stay
# < 30 us, run() adds no host time). Here are their fields' names and C types, in order: BatchDecodePlanArgs
# (templates/include/flashinfer/host/batch_decode_plan.cuh) and BatchDecodeRunArgs (attention/batch_decode.cuh), BatchPrefillArgs stamped into
# templates/batch_prefill.cu.jinja from BATCH_PREFILL_ARGS itself. Each template exports its structs' field
# offsets and sizes (by these names), and the ctypes struct built from a list is checked against them
# (c_struct): a layout change in C++ cannot go unnoticed.
DECODE_PLAN_ARGS = (
    ("indptr", "const int*"),
    ("last_page_len", "const int*"),
    ("host_indices", "const int*"),
    ("device_indices", "const int*"),
    ("batch", "int"),
    ("nnz", "int"),
    ("page_size", "int"),
    ("window_left", "int"),
    ("num_qo_heads", "int"),
    ("num_kv_heads", "int"),
    ("head_dim", "int"),
    ("fixed_workers", "int"),
    ("max_batch", "int"),
    ("indices_capacity", "int"),
    ("no_split", "bool"),
    ("max_ctas", "int"),
    ("pinned", "void*"),
    ("pinned_bytes", "int64_t"),
    ("workspace", "void*"),
    ("workspace_bytes", "int64_t"),
    ("device", "int"),
    ("stream", "cudaStream_t"),
    ("pinned_event", "cudaEvent_t"),
)
DECODE_RUN_ARGS = (
    ("q", "const void*"),
    ("q_stride_b", "int64_t"),
    ("q_stride_h", "int64_t"),
    ("k", "const void*"),
    ("v", "const void*"),
    ("stride_page", "int64_t"),
    ("stride_n", "int64_t"),
    ("stride_h", "int64_t"),
    ("num_pages", "int"),
    ("o", "void*"),
    ("lse", "float*"),
    ("sm_scale", "float"),
    ("logits_soft_cap", "float"),
    ("v_scale", "float"),
    ("rope_scale", "float"),
    ("rope_theta", "float"),
    ("window_left", "int"),
    ("enable_pdl", "bool"),
    ("device", "int"),
    ("stream", "cudaStream_t"),
)
BATCH_PREFILL_ARGS = (
    # fixed by plan()
    ("tile_q", "int"),
    ("qo_indptr", "const int*"),
    ("kv_indptr", "const int*"),
    ("kv_indices", "const int*"),
    ("kv_last_page_len", "const int*"),
    ("mask", "const uint8_t*"),
    ("mask_indptr", "const int*"),
    ("work", "const int*"),
    ("num_work", "const int*"),
    ("merge", "const int*"),
    ("num_merge", "const int*"),
    ("work_capacity", "int"),
    ("merge_capacity", "int"),
    ("grid_x", "int"),
    ("merge_grid_x", "int"),
    ("num_qo_heads", "int"),
    ("num_kv_heads", "int"),
    ("page_size", "int"),
    ("device", "int"),
    ("kv_rows", "int"),  # ragged: token rows of k and v (kv_indptr[-1]; the fa3_ws kernel's tensor maps span them)
    ("max_ctas", "int"),  # fa3_ws: CTAs of its persistent grid at most (0: one per SM); fa2 takes one CTA a piece
    # set by each run()
    ("num_pages", "int"),  # paged: pages of the cache given to run(); ids outside [0, num_pages) are never read
    ("q", "const void*"),
    ("k", "const void*"),
    ("v", "const void*"),
    ("o", "void*"),
    ("lse", "float*"),
    ("partial_o", "float*"),
    ("partial_lse", "float*"),
    ("q_stride_n", "int64_t"),
    ("q_stride_h", "int64_t"),
    ("k_stride_page", "int64_t"),
    ("k_stride_n", "int64_t"),
    ("k_stride_h", "int64_t"),
    ("v_stride_page", "int64_t"),
    ("v_stride_n", "int64_t"),
    ("v_stride_h", "int64_t"),
    ("window_left", "int"),
    ("logits_soft_cap", "float"),
    ("sm_scale", "float"),
    ("v_scale", "float"),  # fp8 KV: multiplies the output in the kernel's epilogue (16-bit KV: 1)
    ("rope_scale", "float"),
    ("rope_theta", "float"),
    ("enable_pdl", "bool"),
    ("stream", "void*"),
)
_SCALARS = {"int": ctypes.c_int, "int64_t": ctypes.c_int64, "bool": ctypes.c_bool, "float": ctypes.c_float}


def _field_ctype(c_type: str) -> Any:
    if c_type.endswith("*") or c_type in ("cudaStream_t", "cudaEvent_t"):
        return ctypes.c_void_p
    return _SCALARS[c_type]


def c_struct(name: str, fields: Sequence[Tuple[str, str]], constants: Dict[str, int], prefix: str) -> Any:
    """A ctypes Structure of ``fields`` ((name, C type) pairs), checked against the offsets and size a module
    exports as ``<prefix>.<field>`` / ``<prefix>.size``."""
    cls = type(name, (ctypes.Structure,), {"_fields_": [(n, _field_ctype(t)) for n, t in fields]})
    layout = {n: getattr(cls, n).offset for n, _ in fields}
    exported = {
        k[len(prefix) + 1 :]: v for k, v in constants.items() if k.startswith(prefix + ".") and k != prefix + ".size"
    }
    if layout != exported or ctypes.sizeof(cls) != constants[prefix + ".size"]:
        raise RuntimeError(
            f"{name}: the module's layout {exported} (size {constants[prefix + '.size']}) differs from "
            f"the declared one {layout} (size {ctypes.sizeof(cls)})"
        )
    return cls


@dataclasses.dataclass(frozen=True)
class DecodePlannerABI:
    """The compiled decode planner's interface as the module exports it (``FI_MODULE_CONSTANTS`` of
    templates/batch_decode.cu.jinja): its argument struct, where it reports what (its int64 info array) and its
    error codes."""

    info_len: int
    info: Dict[str, int]  # field -> position in the info array
    errors: Dict[str, int]  # name -> code
    info_type: Any  # ctypes int64 array type of the info array
    args_type: Any  # ctypes Structure of BatchDecodePlanArgs
    run_args_type: Any  # ctypes Structure of BatchDecodeRunArgs

    def new_info(self) -> Any:
        return self.info_type()

    @staticmethod
    @functools.cache
    def of(module: Any) -> DecodePlannerABI:
        c = module.constants
        return DecodePlannerABI(
            c["info_len"],
            {k[5:]: v for k, v in c.items() if k.startswith("info.")},
            {k[6:]: v for k, v in c.items() if k.startswith("error.")},
            ctypes.c_int64 * c["info_len"],
            c_struct("BatchDecodePlanArgs", DECODE_PLAN_ARGS, c, "plan_args"),
            c_struct("BatchDecodeRunArgs", DECODE_RUN_ARGS, c, "run_args"),
        )

    def stats(self, info: Any) -> PlanStats:
        i = self.info
        return PlanStats(
            workers=int(info[i["workers"]]),
            worker_capacity=int(info[i["worker_capacity"]]),
            pieces=int(info[i["pieces"]]),
            merges=int(info[i["merges"]]),
            partial_states=int(info[i["partial_states"]]),
            total_keys=int(info[i["total_keys"]]),
            workspace_bytes=int(info[i["workspace_bytes"]]),
            tma_kernel=int(info[i["tma"]]),
        )

    def raise_error(
        self,
        rc: int,
        info: Any,
        module: Any,
        what: str,
        h_indptr: torch.Tensor,
        h_last: torch.Tensor,
        page_size: int,
        workspace_bytes: int,
    ) -> None:
        """The planner's error ``rc`` as the exception a caller can act on."""
        at = int(info[self.info["bad_position"]])
        e = self.errors
        if rc == e["bad_indptr"]:
            raise bad_indptr(h_indptr, at)
        if rc == e["bad_last_page_len"]:
            raise bad_last_page_len(h_last, at, page_size)
        if rc == e["workspace_too_small"]:
            raise workspace_too_small(workspace_bytes, int(info[self.info["workspace_bytes"]]))
        if rc == e["negative_index"]:
            raise ValueError(f"indices[{at}] is a negative page id")
        if rc == e["capacity"]:
            raise ValueError("batch or page count above the CUDA-graph wrapper's fixed capacity")
        if rc == e["kv_too_long"]:
            raise ValueError(
                f"request {at} has {int(info[self.info['total_keys']])} keys; at most {MAX_KV_LEN} (2**31 - 2**16) "
                f"keys per request are supported (token positions are 32-bit in the kernels)"
            )
        module.check(rc, what)


# ------------------------------------------------------------------------------ batch prefill (Python planner)


@dataclasses.dataclass(frozen=True)
class PrefillScheduleLayout:
    """The device schedule of a batch prefill plan: one int32 buffer ``[num_work, num_merge,
    work[work_fields][work_capacity], merge[merge_fields][merge_capacity]]``. Offsets in int32 elements; the
    field counts come from the module (``work_fields``/``merge_fields``)."""

    work_capacity: int
    merge_capacity: int
    work_fields: int
    merge_fields: int

    num_work = 0
    num_merge = 1
    work = 2

    @property
    def merge(self) -> int:
        return self.work + self.work_fields * self.work_capacity

    @property
    def total(self) -> int:
        return self.merge + self.merge_fields * self.merge_capacity

    def pack(self, work: Sequence[Tuple[int, ...]], merge: Sequence[Tuple[int, ...]]) -> List[int]:
        """The buffer's contents: counts, then each field of every item (structure of arrays)."""
        flat = [0] * self.total
        flat[self.num_work], flat[self.num_merge] = len(work), len(merge)
        for base, cap, nf, rows in (
            (self.work, self.work_capacity, self.work_fields, work),
            (self.merge, self.merge_capacity, self.merge_fields, merge),
        ):
            for f in range(nf):
                flat[base + f * cap : base + f * cap + len(rows)] = [row[f] for row in rows]
        return flat


@dataclasses.dataclass
class PrefillSchedule:
    """A batch prefill plan's launch schedule: query tile, work items and merges on the device, the grid."""

    tile_q: int
    layout: PrefillScheduleLayout
    buffer: torch.Tensor  # int32 [layout.total] on the device
    grid_x: int
    merge_grid_x: int
    num_work: int
    num_merge: int
    qo_indptr: torch.Tensor  # device int32
    kv_indptr: torch.Tensor  # device int32 (ragged: token offsets; paged: page offsets)
    kv_indices: Optional[torch.Tensor]  # paged: device int32 page ids
    kv_last_page_len: Optional[torch.Tensor]  # paged: device int32
    mask: Optional[torch.Tensor]  # packed custom mask bits (uint8), per request from a byte boundary
    mask_indptr: Optional[torch.Tensor]  # device int32 byte offsets of the requests' masks
    has_mask: bool
    args: Any = None  # the launcher's BatchPrefillArgs: the plan's fields filled here, each run() sets the rest


def prefill_query_tiles(module: Any) -> Tuple[int, ...]:
    """Query-tile sizes (packed rows) the batch prefill module instantiates, smallest first."""
    c = module.constants
    return tuple(sorted(c[f"query_tile_{i}"] for i in range(c["query_tiles"])))


def _whole_waves_chunk(
    chunk: int, big: int, kv_tile: int, items: Callable[[int], int], num_kv_heads: int, target: int
) -> int:
    """The KV chunk length near ``chunk`` that finishes soonest when the split items run in waves of ``target``
    CTAs (``items(c)`` work items per KV head): a split that leaves a few CTAs over a whole wave (e.g. 272 of 264
    slots) runs a second wave for them alone, nearly doubling the time. Estimated time: waves x chunk length;
    ties go to fewer items (less to merge)."""
    n0 = -(-big // chunk)
    floor_c = -(-PREFILL_MIN_CHUNK // kv_tile) * kv_tile
    best = None
    for n in range(max(1, n0 // 2), 2 * n0 + 1):
        per = -(-big // n)  # keys per chunk, n chunks
        c = max(floor_c, -(-per // kv_tile) * kv_tile)
        k = items(c)
        key = (-(-k * num_kv_heads // target) * min(c, big), k)
        if best is None or key < best[0]:
            best = (key, c)
    return best[1] if best is not None else chunk


def schedule_prefill(
    qo_lens: Sequence[int],
    kv_lens: Sequence[int],
    group: int,
    num_kv_heads: int,
    head_dim: int,
    tiles: Sequence[int],
    kv_tile: int,
    occupancy: Callable[[int], int],
    sms: int,
    causal: bool,
    workspace_floats: int,
    num_qo_heads: int,
    fixed_chunk: int = 0,
    split_kv: bool = True,
    request_major: bool = False,
) -> Tuple[int, List[Tuple[int, ...]], List[Tuple[int, ...]], int]:
    """The batch prefill planner: ``(query tile, work items, merge rows, partial rows)``.

    Work items are ``(request, query tile, kv begin, kv end, partial row or -1)``, heaviest first; merge rows
    ``(token, first partial row, chunks, row stride)``. Long requests' keys are cut into chunks when the query
    tiles alone cannot fill the GPU (``occupancy(tile) * sms`` resident CTAs): the largest chunk (a multiple
    of ``kv_tile``) that still gives every resident CTA a work item, grown until the partial states fit the
    workspace. ``fixed_chunk > 0`` cuts every request into chunks of exactly that many keys instead;
    ``split_kv=False`` never cuts. ``request_major=True`` (the persistent fa3_ws kernel) keeps each request's items
    together, requests heaviest first and each request's items heaviest first: the items running at once then
    share a few requests' K/V in L2 instead of each reading its own request's.
    """
    total_rows = sum(q * group for q in qo_lens)
    nonempty = sum(1 for q in qo_lens if q > 0)
    tile = tiles[-1] if nonempty == 0 or total_rows / max(nonempty, 1) > tiles[0] else tiles[0]
    qtiles = [-(-q * group // tile) for q in qo_lens]
    target = occupancy(tile) * sms  # CTAs that run at once
    ctas = sum(qtiles) * num_kv_heads
    big = max(kv_lens) if kv_lens else 0
    chunk = max(big, 1)
    if not split_kv:
        pass
    elif fixed_chunk > 0:
        chunk = fixed_chunk
    elif ctas * 2 <= target and big >= 2 * PREFILL_MIN_CHUNK:
        want = -(-target // num_kv_heads)

        def items(c: int) -> int:
            return sum(t * max(1, -(-kv // c)) for t, kv in zip(qtiles, kv_lens))

        lo_c, hi_c = PREFILL_MIN_CHUNK, big
        if items(lo_c) >= want:
            while hi_c - lo_c > kv_tile:  # the largest chunk that still gives `want` items
                mid = (lo_c + hi_c) // 2
                if items(mid) >= want:
                    lo_c = mid
                else:
                    hi_c = mid
        chunk = -(-lo_c // kv_tile) * kv_tile
        chunk = _whole_waves_chunk(chunk, big, kv_tile, items, num_kv_heads, target)

        def partial_rows(c: int) -> int:
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
    if request_major:
        load: Dict[int, int] = {}
        for w in work:
            load[w[1]] = load.get(w[1], 0) + w[0]
        work.sort(key=lambda w: (-load[w[1]], w[1], -w[0]))
    else:
        work.sort(key=lambda w: -w[0])
    return tile, [w[1:] for w in work], merge, part
