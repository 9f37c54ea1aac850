"""Engines' FlashInfer call sequences, replayed against float64 references (GPU).

Each test follows one engine backend's calls (argument order, keywords, buffers, CUDA-graph capture with padded
batches, re-plans between replays), as read in its source; the engine code itself is not imported:

* vLLM: vllm/v1/attention/backends/flashinfer.py (``FlashInferMetadataBuilder.build``, ``fast_plan_decode``,
  ``FlashInferImpl.forward``);
* SGLang: python/sglang/srt/layers/attention/flashinfer_backend.py (``FlashInferIndicesUpdaterDecode`` /
  ``FlashInferIndicesUpdaterPrefill.call_begin_forward``, ``forward_decode``, ``forward_extend``, the CUDA-graph
  wrappers with ``fast_decode_plan``).
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch

import flashinfer
from flashinfer.decode import _get_range_buf
from reference import LSE_TOL, assert_close, attention, poisoned

HQ, HKV, D = 32, 8, 128
DTYPE = torch.bfloat16
SCALE = 1.0 / math.sqrt(D)


def _workspace():
    return torch.zeros(256 << 20, dtype=torch.uint8, device="cuda")


def _reference_paged(q, cache, page_ids, lens, qo_lens=None, causal=False, **kw):
    """Per request: its keys gathered from an NHD ``[pages, 2, page_size, HKV, D]`` cache; float64 attention."""
    outs, lses = [], []
    qo_lens = qo_lens or [1] * len(lens)
    start = 0
    for ids, n, m in zip(page_ids, lens, qo_lens):
        k = cache[ids.long(), 0].reshape(-1, HKV, D)[:n]
        v = cache[ids.long(), 1].reshape(-1, HKV, D)[:n]
        o, l = attention(q[start : start + m], k, v, causal=causal, **kw)
        outs.append(o)
        lses.append(l)
        start += m
    return torch.cat(outs), torch.cat(lses)


# ------------------------------------------------------------------------------------------------- vLLM


class _VllmBuilder:
    """The parts of vLLM's FlashInferMetadataBuilder that talk to FlashInfer: persistent page-table buffers,
    one decode wrapper per CUDA-graph batch size (tensor cores on), one prefill wrapper, and its
    fast_plan_decode (the first call of a graph wrapper is a plain plan() with FlashInfer 0.6's 22 positional
    arguments; later ones write the device buffers and call ``_cached_module.plan`` with the host tables)."""

    def __init__(self, page_size, max_reqs, max_pages, window_left=-1, logits_soft_cap=None):
        self.page_size, self.window_left, self.logits_soft_cap = page_size, window_left, logits_soft_cap
        self.workspace = _workspace()
        self.paged_kv_indptr = torch.zeros(max_reqs + 1, dtype=torch.int32, device="cuda")
        self.paged_kv_indices = torch.zeros(max_pages, dtype=torch.int32, device="cuda")
        self.paged_kv_last_page_len = torch.zeros(max_reqs, dtype=torch.int32, device="cuda")
        self.paged_kv_indptr_cpu = torch.zeros(max_reqs + 1, dtype=torch.int32)
        self.paged_kv_last_page_len_cpu = torch.zeros(max_reqs, dtype=torch.int32)
        self.graph_wrappers = {}
        self.decode_wrapper = None
        self.prefill_wrapper = flashinfer.BatchPrefillWithPagedKVCacheWrapper(self.workspace, "NHD")

    def decode_wrapper_for(self, batch, use_cudagraph):
        w = self.graph_wrappers.get(batch) if use_cudagraph else self.decode_wrapper
        if w is None:
            w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
                self.workspace,
                "NHD",
                use_cuda_graph=use_cudagraph,
                paged_kv_indptr_buffer=self.paged_kv_indptr[: batch + 1] if use_cudagraph else None,
                paged_kv_indices_buffer=self.paged_kv_indices if use_cudagraph else None,
                paged_kv_last_page_len_buffer=self.paged_kv_last_page_len[:batch] if use_cudagraph else None,
                use_tensor_cores=True,
            )
            if use_cudagraph:
                self.graph_wrappers[batch] = w
            else:
                self.decode_wrapper = w
        return w

    def build(self, seq_lens, block_table, num_decodes, qo_indptr_cpu, padded_batch=None):
        """build(): page table from seq_lens and the block table; prefill plan for requests num_decodes..; decode
        plan (padded to padded_batch for a CUDA graph)."""
        ps = self.page_size
        n = len(seq_lens)
        seq_lens_np = np.asarray(seq_lens)
        num_blocks = (seq_lens_np + ps - 1) // ps
        self.paged_kv_indptr_cpu[1 : n + 1] = torch.from_numpy(np.cumsum(num_blocks).astype(np.int32))
        self.paged_kv_indptr[: n + 1].copy_(self.paged_kv_indptr_cpu[: n + 1], non_blocking=True)
        nnz = int(self.paged_kv_indptr_cpu[n])
        for r in range(n):  # (vLLM's _copy_page_indices_kernel)
            a, b = int(self.paged_kv_indptr_cpu[r]), int(self.paged_kv_indptr_cpu[r + 1])
            self.paged_kv_indices[a:b] = block_table[r, : b - a]
        last = seq_lens_np % ps
        self.paged_kv_last_page_len_cpu[:n] = torch.from_numpy(np.where(last == 0, ps, last).astype(np.int32))
        paged_kv_indices = self.paged_kv_indices[:nnz]
        num_prefills = n - num_decodes
        if num_prefills:
            start = num_decodes
            qo = qo_indptr_cpu[start:] - qo_indptr_cpu[start]
            self.prefill_wrapper.plan(
                qo,
                self.paged_kv_indptr_cpu[start : n + 1],
                paged_kv_indices,
                self.paged_kv_last_page_len_cpu[start:n],
                HQ,
                HKV,
                D,
                ps,
                causal=True,
                sm_scale=SCALE,
                window_left=self.window_left,
                logits_soft_cap=self.logits_soft_cap,
                q_data_type=DTYPE,
                kv_data_type=DTYPE,
                fixed_split_size=-1,
                disable_split_kv=False,
            )
        decode = None
        if num_decodes:
            batch = num_decodes
            use_cudagraph = padded_batch is not None and num_prefills == 0
            if use_cudagraph:
                batch = padded_batch
                self.paged_kv_indptr_cpu[1 + num_decodes : 1 + batch] = self.paged_kv_indptr_cpu[num_decodes]
                self.paged_kv_last_page_len_cpu[num_decodes:batch] = 1  # padding: no pages, last_page_len 1
            decode = self.decode_wrapper_for(batch, use_cudagraph)
            seq_lens_cpu = torch.zeros(batch, dtype=torch.int32)
            seq_lens_cpu[:num_decodes] = torch.tensor(seq_lens[:num_decodes], dtype=torch.int32)
            self.fast_plan_decode(
                decode,
                self.paged_kv_indptr_cpu[: batch + 1],
                paged_kv_indices,
                self.paged_kv_last_page_len_cpu[:batch],
                seq_lens_cpu,
                HQ,
                HKV,
                D,
                ps,
                pos_encoding_mode="NONE",
                sm_scale=SCALE,
                window_left=self.window_left,
                logits_soft_cap=self.logits_soft_cap,
                q_data_type=DTYPE,
                kv_data_type=DTYPE,
                fixed_split_size=-1,
                disable_split_kv=False,
            )
        return decode

    @staticmethod
    def fast_plan_decode(
        w,
        indptr_cpu,
        indices,
        last_page_len_cpu,
        seq_lens_cpu,
        num_qo_heads,
        num_kv_heads,
        head_dim,
        page_size,
        pos_encoding_mode="NONE",
        window_left=-1,
        logits_soft_cap=None,
        q_data_type="float16",
        kv_data_type=None,
        o_data_type=None,
        data_type=None,
        sm_scale=None,
        rope_scale=None,
        rope_theta=None,
        non_blocking=True,
        fixed_split_size=-1,
        disable_split_kv=False,
    ):
        if not w.is_cuda_graph_enabled or getattr(w, "vllm_first_call", True):
            w.plan(
                indptr_cpu,
                indices,
                last_page_len_cpu,
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
                non_blocking,
                None,
                None,
                fixed_split_size,
                disable_split_kv,
            )
            w.vllm_first_call = False
            return
        batch = len(last_page_len_cpu)
        assert batch == w._fixed_batch_size and len(indices) <= len(w._paged_kv_indices_buf)
        w._paged_kv_indptr_buf.copy_(indptr_cpu, non_blocking=True)
        w._paged_kv_last_page_len_buf.copy_(last_page_len_cpu, non_blocking=True)
        args = [
            w._float_workspace_buffer,
            w._int_workspace_buffer,
            w._pin_memory_int_workspace_buffer,
            _get_range_buf(batch + 1, "cpu"),
            indptr_cpu,
            seq_lens_cpu,
            batch,
            batch,
            num_qo_heads,
            num_kv_heads,
            page_size,
            w.is_cuda_graph_enabled,
            head_dim,
            head_dim,
            False,
            window_left,
        ]
        if w._backend == "fa2":
            args += [fixed_split_size, disable_split_kv, 0]
        w._plan_info = w._cached_module.plan(*args)
        w._pos_encoding_mode, w._window_left = pos_encoding_mode, window_left
        w._logits_soft_cap = 0.0 if logits_soft_cap is None else logits_soft_cap
        w._sm_scale, w._rope_scale, w._rope_theta = sm_scale, rope_scale, rope_theta


def _vllm_forward(builder, decode, query, kv_cache, output, num_decode_tokens, k_scale=1.0, v_scale=1.0):
    """FlashInferImpl.forward's FlashInfer part: the wrappers' attributes checked, then run() with out=."""
    if query.shape[0] > num_decode_tokens:
        w = builder.prefill_wrapper
        assert w._causal and w._window_left == builder.window_left
        assert w._logits_soft_cap == (builder.logits_soft_cap or 0.0) and w._sm_scale == SCALE
        w.run(query[num_decode_tokens:], kv_cache, k_scale=k_scale, v_scale=v_scale, out=output[num_decode_tokens:])
    if num_decode_tokens:
        assert decode._window_left == builder.window_left
        assert decode._logits_soft_cap == (builder.logits_soft_cap or 0.0) and decode._sm_scale == SCALE
        decode.run(
            query[:num_decode_tokens], kv_cache, k_scale=k_scale, v_scale=v_scale, out=output[:num_decode_tokens]
        )
    return output


@pytest.mark.gpu
@pytest.mark.parametrize("window_left,soft_cap", [(-1, None), (255, 30.0)])
def test_vllm_mixed_batch_decodes_then_prefills(window_left, soft_cap):
    """vllm/v1/attention/backends/flashinfer.py: one step with 3 decodes at the front and 2 prefills (chunked
    prefill: queries appended to cached keys) at the back; the prefill wrapper planned with causal=True and
    FlashInfer 0.6's keywords, the decode wrapper (tensor cores) through fast_plan_decode's positional plan()."""
    ps, num_pages = 16, 2000
    seq_lens = [700, 33, 5000, 1200, 300]
    q_lens = [1, 1, 1, 400, 300]
    b = _VllmBuilder(ps, 8, num_pages, window_left, soft_cap)
    cache = torch.randn(num_pages, 2, ps, HKV, D, device="cuda", dtype=DTYPE)
    block_table = torch.randperm(num_pages, dtype=torch.int32).reshape(5, -1).cuda()
    qo_indptr = torch.tensor([0, *np.cumsum(q_lens)], dtype=torch.int32)
    decode = b.build(seq_lens, block_table, 3, qo_indptr)
    query = torch.randn(int(qo_indptr[-1]), HQ, D, device="cuda", dtype=DTYPE)
    output = poisoned(query.shape, DTYPE)
    _vllm_forward(b, decode, query, cache, output, 3, v_scale=0.5)
    pages = [block_table[r, : (n + ps - 1) // ps].cpu() for r, n in enumerate(seq_lens)]
    ref, _ = _reference_paged(
        query,
        cache,
        pages,
        seq_lens,
        q_lens,
        causal=True,
        window_left=window_left,
        logits_soft_cap=soft_cap or 0.0,
        v_scale=0.5,
    )
    assert_close(output, ref)


@pytest.mark.gpu
def test_vllm_full_cudagraph_decode_with_padded_batches():
    """vllm/v1/attention/backends/flashinfer.py: full CUDA-graph decode. A wrapper per padded batch size built on
    slices of persistent buffers; the padding requests get no pages and last_page_len 1; the graph is captured
    after the first (plain) plan; later steps go through fast_plan_decode's ``_cached_module.plan`` and replay."""
    ps, num_pages, padded = 16, 3000, 8
    b = _VllmBuilder(ps, 16, num_pages)
    cache = torch.randn(num_pages, 2, ps, HKV, D, device="cuda", dtype=DTYPE)
    query = torch.randn(padded, HQ, D, device="cuda", dtype=DTYPE)
    output = torch.empty(padded, HQ, D, device="cuda", dtype=DTYPE)
    steps = [[100, 17, 4096, 1, 2000], [33000, 5, 7], [16, 32, 48, 64, 80, 96, 112], [1]]
    graph = None
    for step, seq_lens in enumerate(steps):
        n = len(seq_lens)
        block_table = torch.randint(0, num_pages, (n, 2100), dtype=torch.int32, device="cuda")
        decode = b.build(seq_lens, block_table, n, torch.arange(n + 1, dtype=torch.int32), padded_batch=padded)
        query.copy_(torch.randn_like(query))
        if graph is None:
            _vllm_forward(b, decode, query, cache, output, padded)  # warm-up
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                _vllm_forward(b, decode, query, cache, output, padded)
        assert decode is b.graph_wrappers[padded]
        output.fill_(float("nan"))
        graph.replay()
        pages = [block_table[r, : (m + ps - 1) // ps].cpu() for r, m in enumerate(seq_lens)]
        ref, _ = _reference_paged(query[:n], cache, pages, seq_lens)
        assert_close(output[:n], ref, what=f"step {step}")
        assert torch.equal(output[n:], torch.zeros_like(output[n:])), "padding requests: output 0"


# ------------------------------------------------------------------------------------------------ SGLang


class _SglangBackend:
    """The parts of SGLang's FlashInferAttnBackend that talk to FlashInfer (page_size 1, a token pool as the
    paged cache): kv_indptr buffers, last_page_len ones, decode wrappers (CUDA graph ones made per batch size,
    their begin_forward replaced by fast_decode_plan after the first plan), the ragged and paged prefill
    wrappers (backend="fa2")."""

    def __init__(self, pool_size, max_bs, use_tensor_cores):
        self.workspace = _workspace()
        self.kv_indptr = torch.zeros(max_bs + 1, dtype=torch.int32, device="cuda")
        self.kv_last_page_len = torch.ones(max_bs, dtype=torch.int32, device="cuda")
        self.qo_indptr = torch.zeros(max_bs + 1, dtype=torch.int32, device="cuda")
        self.use_tensor_cores = use_tensor_cores
        self.decode_wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            self.workspace, "NHD", backend="fa2", use_tensor_cores=use_tensor_cores
        )
        self.prefill_wrapper_ragged = flashinfer.BatchPrefillWithRaggedKVCacheWrapper(
            self.workspace, "NHD", backend="auto"
        )
        self.prefill_wrapper_paged = flashinfer.BatchPrefillWithPagedKVCacheWrapper(
            self.workspace, "NHD", backend="fa2"
        )
        self.cuda_graph_kv_indices = torch.zeros(max_bs * pool_size, dtype=torch.int32, device="cuda")
        self.graph_wrappers = {}
        k = torch.randn(pool_size, 1, HKV, D, device="cuda", dtype=DTYPE)
        self.kv_buffer = (k, torch.randn_like(k))  # page_size 1: a token slot per page

    def graph_wrapper(self, bs):
        if bs not in self.graph_wrappers:
            self.graph_wrappers[bs] = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
                self.workspace,
                "NHD",
                backend="fa2",
                use_cuda_graph=True,
                use_tensor_cores=self.use_tensor_cores,
                paged_kv_indptr_buffer=self.kv_indptr[: bs + 1],
                paged_kv_indices_buffer=self.cuda_graph_kv_indices,
                paged_kv_last_page_len_buffer=self.kv_last_page_len[:bs],
            )
        return self.graph_wrappers[bs]

    def call_begin_forward_decode(self, wrapper, token_slots, seq_lens):
        """FlashInferIndicesUpdaterDecode.call_begin_forward: device indptr and indices, written in place."""
        bs = len(seq_lens)
        lens = torch.tensor(seq_lens, dtype=torch.int32, device="cuda")
        self.kv_indptr[1 : bs + 1] = torch.cumsum(lens, dim=0)
        kv_indptr = self.kv_indptr[: bs + 1]
        kv_indices = (
            wrapper._paged_kv_indices_buf
            if wrapper.is_cuda_graph_enabled
            else torch.empty(sum(seq_lens), dtype=torch.int32, device="cuda")
        )
        kv_indices[: sum(seq_lens)] = torch.cat(token_slots)
        indptr_cpu = torch.zeros(bs + 1, dtype=torch.int32)
        indptr_cpu[1:] = torch.cumsum(torch.tensor(seq_lens, dtype=torch.int32), dim=0)
        fast = hasattr(wrapper.begin_forward, "func") and wrapper.begin_forward.func == flashinfer.fast_decode_plan
        extra = {"global_override_indptr_cpu": indptr_cpu} if fast else {}
        wrapper.begin_forward(
            kv_indptr,
            kv_indices,
            self.kv_last_page_len[:bs],
            HQ,
            HKV,
            D,
            1,
            data_type=DTYPE,
            q_data_type=DTYPE,
            non_blocking=True,
            fixed_split_size=None,
            disable_split_kv=False,
            **extra,
        )

    def forward_decode(self, wrapper, q, logit_cap=0.0, k_scale=1.0, v_scale=1.0):
        return wrapper.forward(
            q.contiguous().view(-1, HQ, D),
            self.kv_buffer,
            sm_scale=SCALE,
            logits_soft_cap=logit_cap,
            k_scale=k_scale,
            v_scale=v_scale,
        )


@pytest.mark.gpu
@pytest.mark.parametrize("use_tensor_cores", [False, True])
def test_sglang_decode_eager(use_tensor_cores):
    """python/sglang/srt/layers/attention/flashinfer_backend.py: begin_forward with device kv_indptr/kv_indices,
    page_size 1, data_type (the KV dtype) and q_data_type as keywords; forward() with sm_scale, logits_soft_cap,
    k_scale, v_scale (the options the plan did not get)."""
    be = _SglangBackend(pool_size=20000, max_bs=16, use_tensor_cores=use_tensor_cores)
    seq_lens = [1, 700, 5000, 33, 9000]
    slots = [torch.randperm(20000, device="cuda")[:n].to(torch.int32) for n in seq_lens]
    be.call_begin_forward_decode(be.decode_wrapper, slots, seq_lens)
    q = torch.randn(len(seq_lens), HQ * D, device="cuda", dtype=DTYPE)
    o = be.forward_decode(be.decode_wrapper, q, logit_cap=30.0, k_scale=0.5, v_scale=2.0)
    k, v = be.kv_buffer
    ref = torch.cat(
        [
            attention(
                q[r : r + 1].view(1, HQ, D),
                k[s.long(), 0],
                v[s.long(), 0],
                sm_scale=SCALE * 0.5,
                logits_soft_cap=30.0,
                v_scale=2.0,
            )[0]
            for r, s in enumerate(slots)
        ]
    )
    assert_close(o, ref)


@pytest.mark.gpu
@pytest.mark.parametrize("use_tensor_cores", [False, True])
def test_sglang_cuda_graph_decode_with_fast_decode_plan(use_tensor_cores):
    """python/sglang/srt/layers/attention/flashinfer_backend.py: the CUDA-graph decode wrapper of a batch size
    (buffers sliced from the backend's), planned once with begin_forward, then ``begin_forward =
    functools.partial(fast_decode_plan, wrapper)``; forward() captured in a graph; each replay re-planned through
    fast_decode_plan with the indices written into the wrapper's buffer and ``global_override_indptr_cpu``. The
    padding requests have the seq_len fill value 1."""
    be = _SglangBackend(pool_size=40000, max_bs=8, use_tensor_cores=use_tensor_cores)
    bs = 8
    w = be.graph_wrapper(bs)
    q = torch.randn(bs, HQ * D, device="cuda", dtype=DTYPE)
    out = torch.empty(bs, HQ, D, device="cuda", dtype=DTYPE)

    def slots_for(lens):
        return [torch.randperm(40000, device="cuda")[:n].to(torch.int32) for n in lens]

    lens = [5, 100, 1, 1, 1, 1, 1, 1]
    slots = slots_for(lens)
    be.call_begin_forward_decode(w, slots, lens)  # capture: the original begin_forward
    w.begin_forward = functools.partial(flashinfer.fast_decode_plan, w)
    out.copy_(be.forward_decode(w, q))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out.copy_(be.forward_decode(w, q))
    k, v = be.kv_buffer
    for step_lens in ([3000, 7, 20000, 1, 1, 1, 1, 1], [1] * 8, [4096] * 6 + [1, 1], lens):
        slots = slots_for(step_lens)
        be.call_begin_forward_decode(w, slots, step_lens)
        q.copy_(torch.randn_like(q))
        out.fill_(float("nan"))
        graph.replay()
        ref = torch.cat(
            [
                attention(q[r : r + 1].view(1, HQ, D), k[s.long(), 0], v[s.long(), 0], sm_scale=SCALE)[0]
                for r, s in enumerate(slots)
            ]
        )
        assert_close(out, ref, what=str(step_lens))


def _merge_base2(o1, s1, o2, s2):
    """Two attention states (o, base-2 lse) over disjoint keys merged (what SGLang's merge_state computes)."""
    m = torch.maximum(s1, s2)
    m = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
    w1, w2 = torch.exp2(s1.double() - m), torch.exp2(s2.double() - m)
    return (o1.double() * w1[..., None] + o2.double() * w2[..., None]) / (w1 + w2)[..., None]


@pytest.mark.gpu
@pytest.mark.parametrize("path", ["ragged_no_prefix", "ragged_and_paged", "paged_only"])
def test_sglang_extend(path):
    """python/sglang/srt/layers/attention/flashinfer_backend.py, forward_extend: the ragged wrapper planned with
    begin_forward(qo_indptr, qo_indptr, ...) and the paged one with begin_forward(..., q_data_type,
    kv_data_type, custom_mask=None, non_blocking, fixed_split_size, prefix_len_ptr=None, ...): planned without
    causal; causal=True given to forward() (which FlashInfer applies: it used to be dropped here). With a cached
    prefix: ragged causal over the new tokens + paged non-causal over the prefix, merged by lse."""
    be = _SglangBackend(pool_size=30000, max_bs=8, use_tensor_cores=False)
    prefix_lens = [0, 0, 0] if path == "ragged_no_prefix" else [500, 0, 3000]
    extend_lens = [300, 17, 800]
    seq_lens = [p + e for p, e in zip(prefix_lens, extend_lens)]
    bs = 3
    k_pool, v_pool = be.kv_buffer
    slots = [torch.randperm(30000, device="cuda")[:n].to(torch.int32) for n in seq_lens]
    q = torch.randn(sum(extend_lens), HQ, D, device="cuda", dtype=DTYPE)
    k_new = torch.cat([k_pool[s[p:].long(), 0] for s, p in zip(slots, prefix_lens)])
    v_new = torch.cat([v_pool[s[p:].long(), 0] for s, p in zip(slots, prefix_lens)])
    use_ragged = path != "paged_only"
    paged_lens = prefix_lens if use_ragged else seq_lens
    be.kv_indptr[1 : bs + 1] = torch.cumsum(torch.tensor(paged_lens, dtype=torch.int32, device="cuda"), 0)
    kv_indices = torch.empty(sum(paged_lens) + 256, dtype=torch.int32, device="cuda")
    kv_indices[: sum(paged_lens)] = torch.cat([s[:n] for s, n in zip(slots, paged_lens)])
    be.qo_indptr[1 : bs + 1] = torch.cumsum(torch.tensor(extend_lens, dtype=torch.int32, device="cuda"), 0)
    qo_indptr, kv_indptr = be.qo_indptr[: bs + 1], be.kv_indptr[: bs + 1]
    if use_ragged:
        be.prefill_wrapper_ragged.begin_forward(qo_indptr, qo_indptr, HQ, HKV, D, q_data_type=DTYPE)
    be.prefill_wrapper_paged.begin_forward(
        qo_indptr,
        kv_indptr,
        kv_indices,
        be.kv_last_page_len[:bs],
        HQ,
        HKV,
        D,
        1,
        q_data_type=DTYPE,
        kv_data_type=DTYPE,
        custom_mask=None,
        non_blocking=True,
        fixed_split_size=None,
        prefix_len_ptr=None,
        token_pos_in_items_ptr=None,
        token_pos_in_items_len=0,
        max_item_len_ptr=None,
    )
    if path == "ragged_no_prefix":
        o = be.prefill_wrapper_ragged.forward(q, k_new, v_new, causal=True, sm_scale=SCALE, logits_soft_cap=0.0)
    elif path == "ragged_and_paged":
        o1, s1 = be.prefill_wrapper_ragged.forward_return_lse(
            q, k_new, v_new, causal=True, sm_scale=SCALE, window_left=-1, logits_soft_cap=0.0
        )
        o2, s2 = be.prefill_wrapper_paged.forward_return_lse(
            q, be.kv_buffer, causal=False, sm_scale=SCALE, window_left=-1, logits_soft_cap=0.0
        )
        o = _merge_base2(o1, s1, o2, s2)
    else:
        o = be.prefill_wrapper_paged.forward(
            q, be.kv_buffer, causal=True, sm_scale=SCALE, window_left=-1, logits_soft_cap=0.0, k_scale=1.0, v_scale=1.0
        )
    refs, start = [], 0
    for s, e in zip(slots, extend_lens):
        o_ref, _ = attention(
            q[start : start + e], k_pool[s.long(), 0], v_pool[s.long(), 0], causal=True, sm_scale=SCALE
        )
        refs.append(o_ref)
        start += e
    ref = torch.cat(refs)
    if path == "ragged_and_paged":
        torch.testing.assert_close(o, ref, atol=2e-2, rtol=2e-2)  # two bf16 outputs merged in float64
    else:
        assert_close(o, ref)


def test_engines_import_what_they_import():
    """The FlashInfer names these backends import at module load (the names implemented here)."""
    from flashinfer import (  # noqa: F401
        BatchDecodeWithPagedKVCacheWrapper,
        BatchPrefillWithPagedKVCacheWrapper,
        BatchPrefillWithRaggedKVCacheWrapper,
        fast_decode_plan,
    )
    from flashinfer.decode import _get_range_buf, trtllm_batch_decode_with_kv_cache  # noqa: F401
    from flashinfer.prefill import trtllm_batch_context_with_kv_cache  # noqa: F401
    from flashinfer.utils import FP4Tensor

    with pytest.raises(NotImplementedError, match="FP4Tensor"):
        FP4Tensor(data=None)
    with pytest.raises(NotImplementedError, match="trtllm"):
        trtllm_batch_decode_with_kv_cache(query=None)
    assert LSE_TOL  # (the module's shared tolerances are imported for the reference checks above)
