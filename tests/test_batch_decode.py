"""BatchDecodeWithPagedKVCacheWrapper against a float64 reference that gathers each request's pages
(independent of our kernels); graph mode; fp8 (e4m3/e5m2) KV caches with their scales; bad input. On the CPU:
the planner's schedule (coverage, balance, merges), spec naming, validation before any build (fake CUDA tensors)."""

from __future__ import annotations

import pytest
import torch

import flashinfer
from flashinfer.decode import BatchDecodePagedSpec, _tma_decode_serves, host_schedule
from reference import LSE_TOL, TOLERANCES, assert_close, attention, poisoned

LENS = [1, 15, 16, 17, 1000, 4096, 33000]
FP8 = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
DTYPES = {"f16": torch.float16, "bf16": torch.bfloat16}
# The fp8 KV specs the GPU tests load (tests/prewarm_test.toml lists them): e4m3 with bf16 q and e5m2 with f16 q at
# every head_dim and layout; the crossed pairs; RoPE, and ALiBi with soft cap (bf16/e4m3 d128 NHD).
FP8_BATCH_SPECS = [
    BatchDecodePagedSpec(d, dq, dkv, dq, layout, "NONE", False)
    for dq, dkv in (("bf16", "e4m3"), ("f16", "e5m2"))
    for d in (64, 128, 256)
    for layout in ("NHD", "HND")
] + [
    BatchDecodePagedSpec(128, "f16", "e4m3", "f16", "NHD", "NONE", False),
    BatchDecodePagedSpec(128, "bf16", "e5m2", "bf16", "NHD", "NONE", False),
    BatchDecodePagedSpec(128, "bf16", "e4m3", "bf16", "NHD", "ROPE_LLAMA", False),
    BatchDecodePagedSpec(128, "bf16", "e4m3", "bf16", "NHD", "ALIBI", True),
]


def _make(lens, page_size, num_kv_heads, head_dim, dtype, layout, form, spare_pages=3, k_scale=1.0, v_scale=1.0):
    """A paged cache of random K/V for requests of ``lens`` keys over a random permutation of the pages: (cache,
    k, v, indptr, indices, last_page_len), k/v the cache's K/V as the reference takes them. An fp8 ``dtype`` stores
    random values / scale rounded to fp8 (as an engine does); its k/v are then those same fp8 values dequantised
    (``.double() * scale``), so that quantisation error is never mistaken for kernel error."""
    pages = [(n + page_size - 1) // page_size for n in lens]
    num_pages = sum(pages) + spare_pages
    perm = torch.randperm(num_pages)[: sum(pages)].to(torch.int32)
    indptr = torch.tensor([0] + torch.tensor(pages).cumsum(0).tolist(), dtype=torch.int32)
    last = torch.tensor([n - (p - 1) * page_size for n, p in zip(lens, pages)], dtype=torch.int32)
    shape = (
        (num_pages, page_size, num_kv_heads, head_dim)
        if layout == "NHD"
        else (num_pages, num_kv_heads, page_size, head_dim)
    )
    if dtype in FP8.values():
        k8 = (torch.randn(shape, device="cuda") / k_scale).to(dtype)
        v8 = (torch.randn(shape, device="cuda") / v_scale).to(dtype)
        if form == "single":
            cache = torch.empty(num_pages, 2, *shape[1:], device="cuda", dtype=dtype)
            cache[:, 0].copy_(k8)
            cache[:, 1].copy_(v8)
        else:
            cache = (k8, v8)
        return cache, k8.double() * k_scale, v8.double() * v_scale, indptr, perm, last
    if form == "single":
        cache = torch.randn(num_pages, 2, *shape[1:], device="cuda", dtype=dtype)
        k, v = cache[:, 0], cache[:, 1]
    else:
        k = torch.randn(shape, device="cuda", dtype=dtype)
        v = torch.randn(shape, device="cuda", dtype=dtype)
        cache = (k, v)
    return cache, k, v, indptr, perm, last


def _gather(t, layout, page_ids, n):
    """A request's keys [n, heads, dim] (NHD) from its pages."""
    x = t[page_ids.long().to(t.device)]
    if layout == "HND":
        x = x.transpose(1, 2)
    return x.reshape(-1, x.shape[-2], x.shape[-1])[:n]


def _reference(q, k, v, layout, indptr, indices, lens, **kw):
    outs, lses = [], []
    for r, n in enumerate(lens):
        ids = indices[indptr[r] : indptr[r + 1]]
        o, l = attention(q[r : r + 1], _gather(k, layout, ids, n), _gather(v, layout, ids, n), **kw)
        outs.append(o[0])
        lses.append(l[0])
    return torch.stack(outs), torch.stack(lses)


def tma_expected(head_dim, dtype, kv_dtype, num_qo_heads, num_kv_heads, page_size, pos="NONE"):
    """Whether plan() puts this configuration on the TMA-fed Hopper kernel (attention/batch_decode_tma.cuh): the
    module's own rule, and the Python predicate the cascade's cost model uses, must agree."""
    return torch.cuda.get_device_capability()[0] == 9 and _tma_decode_serves(
        head_dim, dtype, kv_dtype, num_qo_heads, num_kv_heads, page_size, pos
    )


def _workspace(mb=128):
    return torch.empty(mb << 20, dtype=torch.uint8, device="cuda")


def _run_case(
    lens,
    page_size=16,
    num_qo_heads=8,
    num_kv_heads=2,
    head_dim=128,
    dtype=torch.bfloat16,
    layout="NHD",
    form="tuple",
    pos="NONE",
    window_left=-1,
    soft_cap=None,
    device_indices=False,
    q_noncontig=False,
    rope_scale=None,
    rope_theta=None,
    use_tensor_cores=False,
    kv_dtype=None,
    k_scale=None,
    v_scale=None,
    tma=None,
):
    """Plan and run one batch (NaN-poisoned outputs) against the reference. ``kv_dtype`` (default q's ``dtype``)
    may be fp8, dequantised by ``k_scale``/``v_scale``: the reference then takes the dequantised values, and what
    separates the two is what the 16-bit path leaves too (the output's rounding to q's dtype, float32
    accumulation; the tensor-core tiles round the probabilities and a bfloat16 q to float16, inside the dtype
    tolerances). ``tma``: True/False sets the wrapper's ``_tma_decode`` and checks which kernel the plan chose on a
    Hopper GPU (the TMA kernel exactly where it serves the configuration, see tma_expected)."""
    kv_dtype = kv_dtype or dtype
    cache, k, v, indptr, indices, last = _make(
        lens, page_size, num_kv_heads, head_dim, kv_dtype, layout, form, k_scale=k_scale or 1.0, v_scale=v_scale or 1.0
    )
    if q_noncontig:
        q = torch.randn(len(lens), num_qo_heads, 2 * head_dim, device="cuda", dtype=dtype)[:, :, head_dim:]
    else:
        q = torch.randn(len(lens), num_qo_heads, head_dim, device="cuda", dtype=dtype)
    w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(_workspace(), layout, use_tensor_cores=use_tensor_cores)
    if tma is not None:
        w._tma_decode = tma
    w.plan(
        indptr,
        indices.cuda() if device_indices else indices,
        last,
        num_qo_heads,
        num_kv_heads,
        head_dim,
        page_size,
        pos_encoding_mode=pos,
        window_left=window_left,
        logits_soft_cap=soft_cap,
        q_data_type=dtype,
        kv_data_type=kv_dtype,
        rope_scale=rope_scale,
        rope_theta=rope_theta,
    )
    if tma is not None and not use_tensor_cores:
        expected = tma and tma_expected(head_dim, dtype, kv_dtype, num_qo_heads, num_kv_heads, page_size, pos)
        assert w.plan_stats["tma_kernel"] == int(expected)
    out = poisoned((len(lens), num_qo_heads, head_dim), dtype)
    lse = poisoned((len(lens), num_qo_heads), torch.float32)
    o, l = w.run(q, cache, out=out, lse=lse, return_lse=True, k_scale=k_scale, v_scale=v_scale)
    assert o is out and l is lse
    kw = {"pos_encoding_mode": pos, "window_left": window_left, "logits_soft_cap": soft_cap or 0.0}
    if rope_scale is not None:
        kw.update(rope_scale=rope_scale, rope_theta=rope_theta)
    ref_o, ref_lse = _reference(q, k, v, layout, indptr, indices, lens, **kw)
    assert not torch.isnan(l).any(), "lse: NaN (unwritten)"
    if use_tensor_cores and pos == "ROPE_LLAMA":
        # the prefill kernel rounds RoPE-rotated q/k back to 16 bits in shared memory (as FlashInfer does): one
        # more input rounding than the float64 reference, so twice the dtype tolerance (lse: the dtype's)
        atol, rtol = TOLERANCES[dtype]
        assert not torch.isnan(o).any(), "o: NaN"
        torch.testing.assert_close(o.double(), ref_o, atol=2 * atol, rtol=2 * rtol)
        torch.testing.assert_close(l.double(), ref_lse, atol=atol, rtol=rtol)
    else:
        assert_close(o, ref_o, what="o")
        torch.testing.assert_close(l.double(), ref_lse, atol=LSE_TOL[0], rtol=LSE_TOL[1])
    return w


# ----------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 7, 64, 257])
@pytest.mark.parametrize("page_size", [1, 16, 64])
@pytest.mark.parametrize("layout,form", [("NHD", "tuple"), ("HND", "single"), ("NHD", "single"), ("HND", "tuple")])
def test_batch_decode_mixed_lengths(batch, page_size, layout, form):
    if batch == 257 and page_size == 1 and form == "single":
        pytest.skip("covered by the tuple form (keeps the suite short)")
    lens = [LENS[(i * 3 + batch) % len(LENS)] for i in range(batch)]
    if batch == 1:
        lens = [33000]
    _run_case(lens, page_size=page_size, layout=layout, form=form, device_indices=batch % 2 == 1)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "spec",
    [
        s
        for s in BatchDecodePagedSpec.expand(head_dim=(64, 128, 256), kv_layout=("NHD",), dtype_kv=("bf16", "f16"))
        if s.unsupported_reason() is None
    ],
    ids=lambda s: s.name(),
)
def test_batch_decode_spec_matrix(spec):
    dtype = {"f16": torch.float16, "bf16": torch.bfloat16}[spec.dtype_q]
    kw = {}
    if spec.pos_encoding_mode == "ROPE_LLAMA":
        kw.update(rope_scale=2.0, rope_theta=5e5)
    _run_case(
        [17, 4096, 1, 1000, 33000],
        page_size=16,
        head_dim=spec.head_dim,
        dtype=dtype,
        layout=spec.kv_layout,
        pos=spec.pos_encoding_mode,
        soft_cap=1.5 if spec.use_logits_soft_cap else None,
        **kw,
    )


@pytest.mark.gpu
@pytest.mark.parametrize("spec", FP8_BATCH_SPECS, ids=lambda s: s.name())
def test_batch_decode_fp8_matrix(spec):
    """Both fp8 formats at every head_dim and layout: GQA groups 1, 4, 8 and 5 (a partial tile of 4), page sizes
    1, 16 and 64, both cache forms, host and device page ids, lengths of one key, ending mid-page and long enough
    to split over the GPU; k_scale/v_scale != 1."""
    lens = [1, 15, 16, 17, 1000, 4096, 33000, 5]
    kw = {"rope_scale": 2.0, "rope_theta": 5e5} if spec.pos_encoding_mode == "ROPE_LLAMA" else {}
    for i, (page_size, group, form) in enumerate(
        [(1, 1, "tuple"), (16, 4, "single"), (16, 8, "tuple"), (64, 5, "single")]
    ):
        _run_case(
            lens[i:] + lens[:i],
            page_size=page_size,
            num_qo_heads=2 * group,
            num_kv_heads=2,
            head_dim=spec.head_dim,
            dtype=DTYPES[spec.dtype_q],
            kv_dtype=FP8[spec.dtype_kv],
            layout=spec.kv_layout,
            form=form,
            pos=spec.pos_encoding_mode,
            soft_cap=1.5 if spec.use_logits_soft_cap else None,
            device_indices=i == 2,
            k_scale=(0.5, 1.25)[i % 2],
            v_scale=(1.75, 0.375)[i % 2],
            **kw,
        )


@pytest.mark.gpu
@pytest.mark.parametrize(
    "pos,window_left,soft_cap", [("NONE", 15, None), ("ROPE_LLAMA", 1000, None), ("ALIBI", 0, 30.0), ("ALIBI", -1, 1.5)]
)
def test_batch_decode_fp8_window_and_options(pos, window_left, soft_cap):
    _run_case(
        [1, 16, 17, 1000, 4096, 5000],
        page_size=16,
        num_qo_heads=8,
        num_kv_heads=2,
        pos=pos,
        window_left=window_left,
        soft_cap=soft_cap,
        kv_dtype=torch.float8_e4m3fn,
        k_scale=0.75,
        v_scale=1.5,
    )


@pytest.mark.gpu
@pytest.mark.parametrize("group", [1, 2, 3])
@pytest.mark.parametrize("pos,window_left,soft_cap", [("NONE", 40, None), ("ALIBI", 300, 1.5)])
def test_batch_decode_fp8_small_groups_on_tensor_cores(group, pos, window_left, soft_cap):
    """fp8 tiles of 1 and 2 query heads (and 4 with one spare head) run on tensor cores with the scores transposed
    (keys as the mma rows, heads as its columns): per-head ALiBi slopes, soft cap and a window that starts mid-tile,
    lengths that end mid-tile and 64-key stages, against the float64 reference on the dequantised K/V."""
    _run_case(
        [1, 16, 17, 63, 65, 1000, 4097],
        page_size=16,
        num_qo_heads=2 * group,
        num_kv_heads=2,
        pos=pos,
        window_left=window_left,
        soft_cap=soft_cap,
        kv_dtype=torch.float8_e4m3fn,
        k_scale=1.25,
        v_scale=0.625,
    )


@pytest.mark.gpu
@pytest.mark.parametrize(
    "q_dtype,kv_dtype",
    [(torch.bfloat16, torch.float8_e4m3fn), (torch.float16, torch.float8_e5m2)],
    ids=["e4m3", "e5m2"],
)
def test_fp8_graph_mode_replays_after_replan(q_dtype, kv_dtype):
    """An fp8 cache in graph mode (GQA 32/8, the serving shape): run() with k_scale/v_scale captured once, replayed
    after re-plans with new lengths (the scales are launch values, kept by the graph)."""
    batch, hq, hkv, d, ps, max_pages = 6, 32, 8, 128, 16, 4000
    k_scale, v_scale = 0.5, 2.0
    bufs = (
        torch.empty(batch + 1, dtype=torch.int32, device="cuda"),
        torch.empty(max_pages, dtype=torch.int32, device="cuda"),
        torch.empty(batch, dtype=torch.int32, device="cuda"),
    )
    w = flashinfer.CUDAGraphBatchDecodeWithPagedKVCacheWrapper(_workspace(), *bufs)
    k8 = (torch.randn(max_pages, ps, hkv, d, device="cuda") / k_scale).to(kv_dtype)
    v8 = (torch.randn(max_pages, ps, hkv, d, device="cuda") / v_scale).to(kv_dtype)
    k_ref, v_ref = k8.double() * k_scale, v8.double() * v_scale
    q = torch.randn(batch, hq, d, device="cuda", dtype=q_dtype)
    out = torch.empty(batch, hq, d, device="cuda", dtype=q_dtype)
    lse = torch.empty(batch, hq, device="cuda", dtype=torch.float32)

    def table(lens):
        pages = [(n + ps - 1) // ps for n in lens]
        indptr = torch.tensor([0] + torch.tensor(pages).cumsum(0).tolist(), dtype=torch.int32)
        last = torch.tensor([n - (p - 1) * ps if p else 1 for n, p in zip(lens, pages)], dtype=torch.int32)
        return indptr, torch.randperm(max_pages)[: sum(pages)].to(torch.int32), last

    def run():
        w.run(q, (k8, v8), out=out, lse=lse, return_lse=True, k_scale=k_scale, v_scale=v_scale)

    plans = [[1, 17, 4096, 100, 33000, 5], [30000, 2, 0, 2, 2, 2], [500] * 6, [16, 16, 1, 40000, 7, 900]]
    w.plan(*table(plans[0]), hq, hkv, d, ps, q_data_type=q_dtype, kv_data_type=kv_dtype)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        run()  # warm-up outside capture (modules loaded)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        run()
    for i, lens in enumerate(plans):
        indptr, indices, last = table(lens)
        w.plan(
            indptr,
            indices.cuda() if i % 2 else indices,
            last,
            hq,
            hkv,
            d,
            ps,
            q_data_type=q_dtype,
            kv_data_type=kv_dtype,
        )
        q.copy_(torch.randn_like(q))
        out.fill_(float("nan"))
        lse.fill_(float("nan"))
        g.replay()
        for r, n in enumerate(lens):
            if n == 0:
                assert torch.equal(out[r], torch.zeros_like(out[r])) and torch.isneginf(lse[r]).all()
                continue
            ids = indices[indptr[r] : indptr[r + 1]]
            ref, ref_lse = attention(q[r : r + 1], _gather(k_ref, "NHD", ids, n), _gather(v_ref, "NHD", ids, n))
            assert_close(out[r], ref[0], what=f"replay {i}, request {r}")
            torch.testing.assert_close(lse[r].double(), ref_lse[0], atol=LSE_TOL[0], rtol=LSE_TOL[1])


@pytest.mark.gpu
@pytest.mark.parametrize("pos", ["NONE", "ROPE_LLAMA", "ALIBI"])
@pytest.mark.parametrize("window_left", [0, 15, 1000])
def test_batch_decode_window(pos, window_left):
    _run_case(
        [1, 16, 17, 1000, 4096, 5000], page_size=16, pos=pos, window_left=window_left, layout="HND", form="single"
    )


@pytest.mark.gpu
@pytest.mark.parametrize("group", [1, 4, 7, 8, 16])
def test_batch_decode_gqa_groups(group):
    _run_case([15, 1000, 4096, 17], num_kv_heads=2, num_qo_heads=2 * group, page_size=16)


# The TMA-fed Hopper kernel: every key count modulo its 16-key stages (and pieces split across the GPU: 33000),
# pages of 16/32/64 tokens, both layouts and cache forms, groups 1..8, 8 and 16 KV heads; against the reference and,
# with _tma_decode False, the same cases on the cp.async kernel.
TMA_LENS = [1, 15, 16, 17, 31, 100, 1000, 4097, 33000]


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", ["f16", "bf16"])
@pytest.mark.parametrize(
    "layout,form,page_size", [("NHD", "tuple", 16), ("HND", "single", 16), ("NHD", "single", 32), ("HND", "tuple", 64)]
)
@pytest.mark.parametrize("num_qo_heads,num_kv_heads", [(8, 8), (32, 8), (64, 8), (48, 16)])
@pytest.mark.parametrize("tma", [True, False])
def test_batch_decode_tma_matrix(head_dim, dtype, layout, form, page_size, num_qo_heads, num_kv_heads, tma):
    _run_case(TMA_LENS, page_size, num_qo_heads, num_kv_heads, head_dim, DTYPES[dtype], layout, form, tma=tma)


@pytest.mark.gpu
@pytest.mark.parametrize("window_left,soft_cap", [(0, None), (15, 30.0), (1000, None), (-1, 5.0)])
@pytest.mark.parametrize("device_indices", [False, True])
def test_batch_decode_tma_window_soft_cap(window_left, soft_cap, device_indices):
    _run_case(
        TMA_LENS,
        16,
        32,
        8,
        128,
        torch.bfloat16,
        "NHD",
        "tuple",
        window_left=window_left,
        soft_cap=soft_cap,
        device_indices=device_indices,
        tma=True,
    )


@pytest.mark.gpu
@pytest.mark.parametrize(
    "num_qo_heads,num_kv_heads,page_size,head_dim",
    [(128, 8, 16, 128), (8, 1, 16, 128), (32, 8, 8, 128), (32, 8, 16, 256)],
)
def test_batch_decode_tma_falls_back_outside_its_configurations(num_qo_heads, num_kv_heads, page_size, head_dim):
    # groups of 16, fewer than 8 KV heads, pages of 8, head_dim 256: the cp.async kernel (plan_stats says which)
    _run_case([17, 1000, 4097], page_size, num_qo_heads, num_kv_heads, head_dim, torch.bfloat16, tma=True)


@pytest.mark.gpu
@pytest.mark.parametrize("tma", [True, False])
def test_batch_decode_tma_noncontiguous_q(tma):
    # q with a head stride of its own (and an odd batch stride), on both kernels
    lens = [100, 3000, 1]
    cache, k, v, indptr, indices, last = _make(lens, 16, 8, 128, torch.float16, "NHD", "tuple")
    q = torch.randn(3, 33, 256, device="cuda", dtype=torch.float16)[:, 1:, 64:192]
    w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(_workspace(), "NHD")
    w._tma_decode = tma
    w.plan(indptr, indices, last, 32, 8, 128, 16, q_data_type=torch.float16)
    assert w.plan_stats["tma_kernel"] == int(tma and tma_expected(128, torch.float16, torch.float16, 32, 8, 16))
    o, l = w.run(q, cache, return_lse=True)
    ref, ref_lse = _reference(q, k, v, "NHD", indptr, indices, lens)
    assert_close(o, ref)
    torch.testing.assert_close(l.double(), ref_lse, atol=LSE_TOL[0], rtol=LSE_TOL[1])


@pytest.mark.gpu
@pytest.mark.parametrize("use_tensor_cores", [False, True])
def test_batch_decode_noncontiguous_q_scales_defaults_and_aliases(use_tensor_cores):
    lens = [100, 3000]
    cache, k, v, indptr, indices, last = _make(lens, 16, 4, 128, torch.float16, "NHD", "tuple")
    q = torch.randn(2, 16, 256, device="cuda", dtype=torch.float16)[:, :, 64:192]
    assert not q.is_contiguous()
    w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(_workspace(), "NHD", use_tensor_cores=use_tensor_cores)
    w.begin_forward(indptr, indices, last, 16, 4, 128, 16, data_type=torch.float16, sm_scale=0.05)
    o = w.run(q, cache, q_scale=2.0, v_scale=0.5)
    ref, ref_lse = _reference(q, k, v, "NHD", indptr, indices, lens, sm_scale=0.1, v_scale=0.5)
    assert_close(o, ref)
    o2, l2 = w.run_return_lse(q, cache, q_scale=2.0, v_scale=0.5)
    assert torch.equal(o, o2)
    torch.testing.assert_close(l2.double(), ref_lse, atol=LSE_TOL[0], rtol=LSE_TOL[1])
    o3 = w.forward(q, cache, sm_scale=0.05, q_scale=2.0, v_scale=0.5)
    assert torch.equal(o, o3)
    w.end_forward()


@pytest.mark.gpu
@pytest.mark.parametrize("use_tensor_cores", [False, True])
@pytest.mark.parametrize("use_class", [False, True])
@pytest.mark.parametrize("hq,hkv", [(8, 2), (32, 8)])  # (32, 8): the TMA kernel on Hopper
def test_graph_mode_replays_after_replan(use_class, use_tensor_cores, hq, hkv):
    batch, d, ps = 6, 128, 16
    max_pages = 4000
    indptr_buf = torch.empty(batch + 1, dtype=torch.int32, device="cuda")
    indices_buf = torch.empty(max_pages, dtype=torch.int32, device="cuda")
    last_buf = torch.empty(batch, dtype=torch.int32, device="cuda")
    if use_class:
        w = flashinfer.CUDAGraphBatchDecodeWithPagedKVCacheWrapper(
            _workspace(), indptr_buf, indices_buf, last_buf, use_tensor_cores=use_tensor_cores
        )
    else:
        w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            _workspace(),
            "NHD",
            use_cuda_graph=True,
            use_tensor_cores=use_tensor_cores,
            paged_kv_indptr_buffer=indptr_buf,
            paged_kv_indices_buffer=indices_buf,
            paged_kv_last_page_len_buffer=last_buf,
        )
    w._tma_decode = True  # (used where it serves the configuration: 32/8 heads on Hopper)
    k = torch.randn(max_pages, ps, hkv, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    q = torch.randn(batch, hq, d, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(batch, hq, d, device="cuda", dtype=torch.bfloat16)
    lse = torch.empty(batch, hq, device="cuda", dtype=torch.float32)

    def table(lens):
        pages = [(n + ps - 1) // ps for n in lens]
        indptr = torch.tensor([0] + torch.tensor(pages).cumsum(0).tolist(), dtype=torch.int32)
        last = torch.tensor([n - (p - 1) * ps for n, p in zip(lens, pages)], dtype=torch.int32)
        return indptr, torch.randperm(max_pages)[: sum(pages)].to(torch.int32), last

    plans = [[1, 17, 4096, 100, 33000, 5], [30000, 2, 2, 2, 2, 2], [500] * 6, [16, 16, 1, 40000, 7, 900]]
    indptr, indices, last = table(plans[0])
    w.plan(indptr, indices, last, hq, hkv, d, ps, q_data_type=torch.bfloat16)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        w.run(q, (k, v), out=out, lse=lse, return_lse=True)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        w.run(q, (k, v), out=out, lse=lse, return_lse=True)
    for i, lens in enumerate(plans):
        indptr, indices, last = table(lens)
        w.plan(indptr, indices.cuda() if i % 2 else indices, last, hq, hkv, d, ps, q_data_type=torch.bfloat16)
        q.copy_(torch.randn_like(q))
        out.fill_(float("nan"))
        lse.fill_(float("nan"))
        g.replay()
        ref, ref_lse = _reference(q, k, v, "NHD", indptr, indices, lens)
        assert_close(out, ref, what=f"replay {i}")
        torch.testing.assert_close(lse.double(), ref_lse, atol=LSE_TOL[0], rtol=LSE_TOL[1])
    with pytest.raises(ValueError, match="batch size"):
        w.plan(*table([5] * 5), hq, hkv, d, ps, q_data_type=torch.bfloat16)
    with pytest.raises(ValueError, match="keeps its configuration"):
        w.plan(*table([5] * 6), hq, hkv, d, 8, q_data_type=torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("use_tensor_cores", [False, True])
def test_capturing_a_non_graph_wrapper_raises(use_tensor_cores):
    cache, k, v, indptr, indices, last = _make([100, 200], 16, 2, 128, torch.bfloat16, "NHD", "tuple")
    w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(_workspace(), "NHD", use_tensor_cores=use_tensor_cores)
    w.plan(indptr, indices, last, 8, 2, 128, 16, q_data_type=torch.bfloat16)
    q = torch.randn(2, 8, 128, device="cuda", dtype=torch.bfloat16)
    out = torch.empty_like(q)
    g = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="use_cuda_graph"):
        with torch.cuda.graph(g):
            w.run(q, cache, out=out)


@pytest.mark.gpu
@pytest.mark.parametrize("use_tensor_cores", [False, True])
def test_plan_and_run_bad_input(use_tensor_cores):
    cache, k, v, indptr, indices, last = _make([100, 200], 16, 2, 128, torch.bfloat16, "NHD", "tuple")
    q = torch.randn(2, 8, 128, device="cuda", dtype=torch.bfloat16)
    if not use_tensor_cores:  # (the prefill schedule splits no request here: it needs no workspace)
        w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(torch.empty(1024, dtype=torch.uint8, device="cuda"), "NHD")
        with pytest.raises(ValueError, match="needs .* bytes"):
            w.plan(indptr, indices, last, 8, 2, 128, 16, q_data_type=torch.bfloat16)
    w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(_workspace(), "NHD", use_tensor_cores=use_tensor_cores)
    with pytest.raises(RuntimeError, match="before plan"):
        w.run(q, cache)
    bad_last = last.clone()
    bad_last[1] = 17
    with pytest.raises(ValueError, match="outside 0..page_size"):
        w.plan(indptr, indices, bad_last, 8, 2, 128, 16, q_data_type=torch.bfloat16)
    bad_last[1] = -1
    with pytest.raises(ValueError, match="outside 0..page_size"):
        w.plan(indptr, indices, bad_last, 8, 2, 128, 16, q_data_type=torch.bfloat16)
    with pytest.raises(ValueError, match="never decrease"):
        w.plan(torch.tensor([0, 7, 3], dtype=torch.int32), indices, last, 8, 2, 128, 16, q_data_type=torch.bfloat16)
    bad_idx = indices.clone()
    bad_idx[3] = -4
    with pytest.raises(ValueError, match="negative"):
        w.plan(indptr, bad_idx, last, 8, 2, 128, 16, q_data_type=torch.bfloat16)
    with pytest.raises(ValueError, match="multiple"):
        w.plan(indptr, indices, last, 6, 4, 128, 16, q_data_type=torch.bfloat16)
    with pytest.raises(ValueError, match="head_dim"):
        w.plan(indptr, indices, last, 8, 2, 96, 16, q_data_type=torch.bfloat16)
    w.plan(indptr, indices, last, 8, 2, 128, 16, q_data_type=torch.bfloat16)
    with pytest.raises(ValueError, match="as planned"):
        w.run(q[:1], cache)
    with pytest.raises(TypeError, match="q dtype"):
        w.run(q.half(), cache)
    with pytest.raises(TypeError, match="kv_data_type"):
        w.run(q, (cache[0].half(), cache[1].half()))
    hnd = (cache[0].transpose(1, 2).contiguous(), cache[1].transpose(1, 2).contiguous())
    with pytest.raises(ValueError, match="page_size"):
        w.run(q, hnd)  # an HND cache read as NHD has the wrong geometry
    with pytest.raises(ValueError, match="pages"):
        w.run(q, (cache[0][:5], cache[1][:5]))  # page ids beyond the cache
    with pytest.raises(ValueError, match="one device"):
        w.run(q.cpu(), cache)
    with pytest.raises(ValueError, match="out must be"):
        w.run(q, cache, out=torch.empty(2, 8, 64, device="cuda", dtype=torch.bfloat16))
    torch.cuda.synchronize()


@pytest.mark.gpu
@pytest.mark.parametrize("use_tensor_cores", [False, True])
@pytest.mark.parametrize("graph", [False, True])
@pytest.mark.parametrize("hq,hkv", [(8, 2), (32, 8)])  # (32, 8): the TMA kernel on Hopper
def test_requests_without_keys_give_zero_and_minus_inf(use_tensor_cores, graph, hq, hkv):
    """Engines pad CUDA-graph batches with requests of no pages (indptr repeated, last_page_len 1 as vLLM writes
    it, or anything: it is not read); a request whose one page has last_page_len 0 has no key either. Their output
    is 0 and lse -inf (as FlashInfer's kernels give), the others are unaffected; in graph mode across re-plans and
    replays too."""
    d, ps, batch, num_pages = 128, 16, 6, 2600
    k = torch.randn(num_pages, ps, hkv, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    q = torch.randn(batch, hq, d, device="cuda", dtype=torch.bfloat16)

    def table(lens, pad_last, empty_page_request=None):
        pages = [(n + ps - 1) // ps for n in lens]
        last = [n - (p - 1) * ps if p else pad_last for n, p in zip(lens, pages)]
        if empty_page_request is not None:  # one page holding no token
            pages[empty_page_request], last[empty_page_request] = 1, 0
        indptr = torch.tensor([0] + torch.tensor(pages).cumsum(0).tolist(), dtype=torch.int32)
        return (
            indptr,
            torch.randperm(num_pages)[: int(indptr[-1])].to(torch.int32),
            torch.tensor(last, dtype=torch.int32),
        )

    plans = [
        ([700, 0, 33000, 0, 5, 0], 1, None),
        ([0, 0, 16, 4000, 0, 0], 16, 1),
        ([0] * 6, 1, None),
        ([17, 0, 1, 2, 3, 4096], 0, 1),
    ]
    if graph:
        bufs = (
            torch.empty(batch + 1, dtype=torch.int32, device="cuda"),
            torch.empty(num_pages, dtype=torch.int32, device="cuda"),
            torch.empty(batch, dtype=torch.int32, device="cuda"),
        )
        w = flashinfer.CUDAGraphBatchDecodeWithPagedKVCacheWrapper(
            _workspace(), *bufs, use_tensor_cores=use_tensor_cores
        )
    else:
        w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(_workspace(), use_tensor_cores=use_tensor_cores)
    w._tma_decode = True  # (used where it serves the configuration: 32/8 heads on Hopper)
    out = torch.empty(batch, hq, d, device="cuda", dtype=torch.bfloat16)
    lse = torch.empty(batch, hq, device="cuda", dtype=torch.float32)
    g = None
    for lens, pad_last, empty_page_request in plans:
        indptr, indices, last = table(lens, pad_last, empty_page_request)
        w.plan(indptr, indices, last, hq, hkv, d, ps, q_data_type=torch.bfloat16)
        if graph and g is None:
            w.run(q, (k, v), out=out, lse=lse, return_lse=True)  # warm-up: modules loaded before capture
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                w.run(q, (k, v), out=out, lse=lse, return_lse=True)
        out.fill_(float("nan"))
        lse.fill_(float("nan"))
        if graph:
            g.replay()
        else:
            w.run(q, (k, v), out=out, lse=lse, return_lse=True)
        for r, n in enumerate(lens):
            if n == 0:
                assert torch.equal(out[r], torch.zeros_like(out[r])), f"request {r} without keys: output not 0"
                assert torch.isneginf(lse[r]).all(), f"request {r} without keys: lse not -inf"
            else:
                ids = indices[indptr[r] : indptr[r + 1]]
                ref, ref_lse = attention(q[r : r + 1], _gather(k, "NHD", ids, n), _gather(v, "NHD", ids, n))
                assert_close(out[r], ref[0], what=f"request {r}")
                torch.testing.assert_close(lse[r].double(), ref_lse[0], atol=LSE_TOL[0], rtol=LSE_TOL[1])


@pytest.mark.gpu
@pytest.mark.parametrize("use_tensor_cores", [False, True])
def test_forward_applies_its_options_without_a_new_plan(use_tensor_cores):
    """The legacy forward() replaces the wrapper's attention options for this and later runs (FlashInfer's
    meaning): another scale, soft cap (another kernel variant), a window within the planned keys and ALiBi, with
    the plan untouched; run() then keeps them, and the next plan() restores the plan's."""
    lens = [100, 3000, 17, 33000]
    cache, k, v, indptr, indices, last = _make(lens, 16, 2, 128, torch.bfloat16, "NHD", "tuple")
    q = torch.randn(len(lens), 8, 128, device="cuda", dtype=torch.bfloat16)
    w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(_workspace(), "NHD", use_tensor_cores=use_tensor_cores)
    w.plan(indptr, indices, last, 8, 2, 128, 16, q_data_type=torch.bfloat16)
    plan = w._plan_info
    for kw in (
        {"sm_scale": 0.05},
        {"logits_soft_cap": 2.0, "sm_scale": 0.2},
        {"window_left": 70},
        {"pos_encoding_mode": "ALIBI"},
        {},
    ):
        o = w.forward(q, cache, **kw)
        assert w._plan_info is plan, "forward() planned again"
        ref_kw = {
            "sm_scale": kw.get("sm_scale"),
            "logits_soft_cap": kw.get("logits_soft_cap") or 0.0,
            "window_left": kw.get("window_left", -1),
            "pos_encoding_mode": kw.get("pos_encoding_mode", "NONE"),
        }
        ref, _ = _reference(q, k, v, "NHD", indptr, indices, lens, **ref_kw)
        assert_close(o, ref, what=str(kw))
        if kw:
            assert_close(w.run(q, cache), ref, what=f"run() after forward({kw})")
    assert w._sm_scale is None and w._logits_soft_cap is None and w._window_left == -1
    w.plan(indptr, indices, last, 8, 2, 128, 16, q_data_type=torch.bfloat16, window_left=10)
    if use_tensor_cores:  # the prefill kernel applies windows at run time: forward()'s default -1 attends to all
        ref, _ = _reference(q, k, v, "NHD", indptr, indices, lens)
        assert_close(w.forward(q, cache), ref, what="window -1 after a windowed plan")
    else:  # the CUDA-core plan scheduled only the window's keys: a wider window needs a new plan
        with pytest.raises(ValueError, match="wider than the planned window"):
            w.forward(q, cache)
    with pytest.raises(ValueError, match="window_left"):
        w.run(q, cache, window_left=3)


@pytest.mark.gpu
@pytest.mark.parametrize("use_tensor_cores", [False, True])
def test_forward_inside_graph_capture_then_replays_after_replan(use_tensor_cores):
    """SGLang's decode step: forward(q, cache, sm_scale=..., logits_soft_cap=...) captured in a CUDA graph (no
    plan inside the capture), replayed after new plans."""
    batch, hq, hkv, d, ps = 4, 8, 2, 128, 16
    bufs = (
        torch.empty(batch + 1, dtype=torch.int32, device="cuda"),
        torch.empty(3000, dtype=torch.int32, device="cuda"),
        torch.empty(batch, dtype=torch.int32, device="cuda"),
    )
    w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
        _workspace(),
        "NHD",
        use_cuda_graph=True,
        use_tensor_cores=use_tensor_cores,
        paged_kv_indptr_buffer=bufs[0],
        paged_kv_indices_buffer=bufs[1],
        paged_kv_last_page_len_buffer=bufs[2],
    )
    k = torch.randn(3000, ps, hkv, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    q = torch.randn(batch, hq, d, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(batch, hq, d, device="cuda", dtype=torch.bfloat16)

    def table(lens):
        pages = [(n + ps - 1) // ps for n in lens]
        indptr = torch.tensor([0] + torch.tensor(pages).cumsum(0).tolist(), dtype=torch.int32)
        last = torch.tensor([n - (p - 1) * ps if p else 1 for n, p in zip(lens, pages)], dtype=torch.int32)
        return indptr, torch.randperm(3000)[: int(indptr[-1])].to(torch.int32), last

    def step():
        out.copy_(w.forward(q, (k, v), sm_scale=0.07, logits_soft_cap=30.0))

    lens0 = [100, 2000, 0, 7]
    w.plan(*table(lens0), hq, hkv, d, ps, q_data_type=torch.bfloat16, logits_soft_cap=30.0)
    step()  # warm-up outside capture
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        step()
    for lens in ([9, 20000, 1, 0], [0, 0, 0, 40000], lens0):
        indptr, indices, last = table(lens)
        w.plan(indptr, indices, last, hq, hkv, d, ps, q_data_type=torch.bfloat16, logits_soft_cap=30.0)
        out.fill_(float("nan"))
        g.replay()
        ref, _ = _reference(q, k, v, "NHD", indptr, indices, lens, sm_scale=0.07, logits_soft_cap=30.0)
        assert_close(out, ref, what=str(lens))


@pytest.mark.gpu
def test_split_control_pdl_and_lse_without_return_lse():
    """disable_split_kv (CUDA cores) and fixed_split_size (tensor cores) make a request's result independent of
    the rest of the batch (bitwise); enable_pdl on or off computes the same; lse given without return_lse is
    written."""
    lens = [33000, 50, 4000]
    cache, k, v, indptr, indices, last = _make(lens, 16, 2, 128, torch.bfloat16, "NHD", "tuple")
    q = torch.randn(3, 8, 128, device="cuda", dtype=torch.bfloat16)
    ref, ref_lse = _reference(q, k, v, "NHD", indptr, indices, lens)
    for tc, kw in (
        (False, {"disable_split_kv": True}),
        (True, {"fixed_split_size": 64}),
        (True, {"disable_split_kv": True}),
    ):
        w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(_workspace(), "NHD", use_tensor_cores=tc)
        w.plan(indptr, indices, last, 8, 2, 128, 16, q_data_type=torch.bfloat16, **kw)
        o_all = w.run(q, cache)
        assert_close(o_all, ref, what=str(kw))
        if not tc:
            assert w.plan_stats["merges"] == 0
        w.plan(indptr[:2], indices, last[:1], 8, 2, 128, 16, q_data_type=torch.bfloat16, **kw)
        o_one = w.run(q[:1], cache)
        assert torch.equal(o_one[0], o_all[0]), f"{kw}: request 0 depends on the rest of the batch"
    w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(_workspace(), "NHD")
    w.plan(indptr, indices, last, 8, 2, 128, 16, q_data_type=torch.bfloat16)
    o_pdl = w.run(q, cache, enable_pdl=True)
    lse = poisoned((3, 8), torch.float32)
    o_no = w.run(q, cache, enable_pdl=False, lse=lse)
    assert torch.equal(o_pdl, o_no) and isinstance(o_no, torch.Tensor)
    torch.testing.assert_close(lse.double(), ref_lse, atol=LSE_TOL[0], rtol=LSE_TOL[1])


# ------------------------------------------------------------------- GPU: use_tensor_cores=True (prefill kernel)

# BatchPrefillSpec modules these load (prefill_batch_paged, mask none, fp16 QK reduction off): d64 bf16, d128 f16,
# d256 bf16 with pos NONE and no window/soft cap (in `--preset test`), and d128 bf16 with every pos, window and
# soft cap (12 modules, not in `--preset test` as of this change).
TC_CASES = [
    (torch.bfloat16, 64, "NONE"),
    (torch.float16, 128, "NONE"),
    (torch.bfloat16, 256, "NONE"),
    (torch.bfloat16, 128, "NONE"),
    (torch.bfloat16, 128, "ROPE_LLAMA"),
    (torch.bfloat16, 128, "ALIBI"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,head_dim,pos", TC_CASES, ids=lambda x: str(x).replace("torch.", ""))
@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_batch_decode_tensor_cores_matrix(dtype, head_dim, pos, layout):
    lens = [1, 15, 16, 17, 1000, 4096, 33000, 5]
    for i, (page_size, group) in enumerate([(1, 1), (16, 4), (16, 8)]):
        kw = {"rope_scale": 2.0, "rope_theta": 5e5} if pos == "ROPE_LLAMA" and i == 1 else {}
        _run_case(
            lens[i:] + lens[:i],
            page_size=page_size,
            num_qo_heads=2 * group,
            num_kv_heads=2,
            head_dim=head_dim,
            dtype=dtype,
            layout=layout,
            form="single" if i % 2 else "tuple",
            pos=pos,
            device_indices=i == 2,
            use_tensor_cores=True,
            **kw,
        )


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize(
    "pos,window_left,soft_cap", [("NONE", 15, None), ("ROPE_LLAMA", 1000, None), ("ALIBI", -1, 1.5), ("NONE", 0, 30.0)]
)
def test_batch_decode_tensor_cores_window_and_soft_cap(layout, pos, window_left, soft_cap):
    _run_case(
        [1, 16, 17, 1000, 4096, 5000],
        page_size=16,
        num_qo_heads=8,
        num_kv_heads=2,
        pos=pos,
        window_left=window_left,
        soft_cap=soft_cap,
        layout=layout,
        use_tensor_cores=True,
    )


@pytest.mark.gpu
@pytest.mark.parametrize("use_tensor_cores", [False, True])
def test_batch_decode_torch_compile_traces_the_custom_op(use_tensor_cores):
    lens = [17, 3000, 1]
    cache, k, v, indptr, indices, last = _make(lens, 16, 2, 128, torch.bfloat16, "NHD", "single")
    w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(_workspace(), "NHD", use_tensor_cores=use_tensor_cores)
    w.plan(indptr, indices, last, 8, 2, 128, 16, q_data_type=torch.bfloat16)
    q = torch.randn(3, 8, 128, device="cuda", dtype=torch.bfloat16)

    def f(q, cache):
        o, lse = w.run(q, cache, v_scale=0.5, return_lse=True)
        return o * 4, lse

    o, lse = torch.compile(f, backend="aot_eager", fullgraph=True)(q, cache)
    ref, ref_lse = _reference(q, k, v, "NHD", indptr, indices, lens)
    assert_close(o, 2 * ref)
    torch.testing.assert_close(lse.double(), ref_lse, atol=LSE_TOL[0], rtol=LSE_TOL[1])
    # with preallocated outputs, and q_scale
    out = poisoned((3, 8, 128), torch.bfloat16)

    def g(q, cache, out):
        return w.run(q, cache, q_scale=2.0, out=out)

    o2 = torch.compile(g, backend="aot_eager", fullgraph=True)(q, cache, out)
    ref2, _ = _reference(q, k, v, "NHD", indptr, indices, lens, sm_scale=2.0 / 128**0.5)
    assert_close(out, ref2)
    assert_close(o2, ref2)


# ----------------------------------------------------------------------------------------------- CPU


def _table(lens, ps):
    pages = [(n + ps - 1) // ps for n in lens]
    indptr = torch.tensor([0] + torch.tensor(pages).cumsum(0).tolist(), dtype=torch.int32)
    last = torch.tensor([n - (p - 1) * ps if p else 1 for n, p in zip(lens, pages)], dtype=torch.int32)
    return indptr, last


def _check_schedule(lens, ps, window_left=-1, slots=396, hq=32, hkv=8, fixed_workers=0, disable_split_kv=False):
    indptr, last = _table(lens, ps)
    s = host_schedule(
        indptr,
        last,
        ps,
        hq,
        hkv,
        slots,
        window_left=window_left,
        fixed_workers=fixed_workers,
        disable_split_kv=disable_split_kv,
    )
    cover = {r: [] for r in range(len(lens))}
    slots_seen = []
    loads = []
    for w in s["workers"]:
        loads.append(sum(e - b for _, b, e, _ in w) + 32 * len(w))
        for r, b, e, slot in w:
            assert b < e or (b == e == 0 and lens[r] == 0)  # an empty request: one empty piece
            cover[r].append((b, e, slot))
    for r, n in enumerate(lens):
        start = max(0, n - 1 - window_left) if window_left >= 0 else 0
        pieces = sorted(cover[r])
        assert pieces[0][0] == start and pieces[-1][1] == n, (r, pieces)
        for (b0, e0, _), (b1, _, _) in zip(pieces, pieces[1:]):
            assert e0 == b1, (r, pieces)  # contiguous, no overlap
        if len(pieces) == 1:
            assert pieces[0][2] == -1  # a whole request writes its output directly
        else:
            slots_r = [p[2] for p in pieces]
            slots_seen += slots_r
            assert (r, min(slots_r), len(pieces)) in s["merges"]
            assert slots_r == list(range(min(slots_r), min(slots_r) + len(pieces)))
    assert sorted(slots_seen) == list(range(len(slots_seen)))
    assert len(s["workers"]) == s["worker_capacity"]
    return s, [x for x in loads if x]


def test_schedule_splits_one_long_request_over_the_whole_gpu():
    s, loads = _check_schedule([33000], 16)
    assert s["workers_used"] == 49  # 396 resident CTAs / 8 kv heads
    assert max(loads) - min(loads) <= 64


def test_schedule_balances_a_skewed_batch():
    s, loads = _check_schedule([32768] + [512] * 127, 16)
    assert s["workers_used"] == 49
    assert max(loads) <= 1.05 * sum(loads) / len(loads)
    assert len(s["merges"]) <= 48


def test_schedule_large_uniform_batch_has_few_splits():
    s, loads = _check_schedule([1024] * 256, 16)
    assert max(loads) <= 1.03 * sum(loads) / len(loads)
    assert s["pieces"] <= 256 + 49


def test_schedule_small_work_uses_fewer_workers_and_windows():
    s, _ = _check_schedule([1, 15, 16, 17], 16)
    assert s["workers_used"] <= 2 and not s["merges"]  # no request is split
    _check_schedule([1, 15, 16, 17, 1000, 4096, 33000] * 9, 1, window_left=700)
    _check_schedule([1, 15, 16, 17, 1000, 4096, 33000], 64, window_left=0)


def test_schedule_graph_mode_keeps_the_worker_count():
    s, _ = _check_schedule([5, 5], 16, fixed_workers=49)
    assert s["worker_capacity"] == 49 and s["workers_used"] == 1


def test_schedule_rejects_bad_tables():
    indptr, last = _table([10, 20], 16)
    with pytest.raises(ValueError, match="code -3"):
        host_schedule(indptr, torch.tensor([10, 17], dtype=torch.int32), 16, 8, 2, 132)
    with pytest.raises(ValueError, match="code -3"):
        host_schedule(indptr, torch.tensor([10, -1], dtype=torch.int32), 16, 8, 2, 132)
    with pytest.raises(ValueError, match="code -1"):
        host_schedule(torch.tensor([0, 2, 1], dtype=torch.int32), last, 16, 8, 2, 132)
    with pytest.raises(ValueError, match="code -1"):
        host_schedule(torch.tensor([1, 2, 3], dtype=torch.int32), last, 16, 8, 2, 132)


def test_schedule_gives_requests_without_keys_one_empty_piece():
    """Engines pad CUDA-graph batches with requests of no pages (any last_page_len, as FlashInfer reads it) and
    a request may have a page with last_page_len 0: each gets one empty piece (output 0, lse -inf), written
    directly; the others are scheduled as usual."""
    lens = [0, 700, 0, 33000, 0]
    s, _ = _check_schedule(lens, 16)
    empties = [(r, b, e, slot) for w in s["workers"] for r, b, e, slot in w if lens[r] == 0]
    assert sorted(empties) == [(0, 0, 0, -1), (2, 0, 0, -1), (4, 0, 0, -1)]
    assert s["total_keys"] == 33700
    # A page whose last_page_len is 0: (pages - 1) * page_size keys; here none at all.
    indptr = torch.tensor([0, 1, 3], dtype=torch.int32)
    s = host_schedule(indptr, torch.tensor([0, 0], dtype=torch.int32), 16, 8, 2, 132)
    assert s["total_keys"] == 16
    pieces = sorted(p for w in s["workers"] for p in w)
    assert pieces[0] == (0, 0, 0, -1) and pieces[-1][2] == 16
    # Padding requests of the usual form: no pages, last_page_len 1 (vLLM) or page_size.
    for pad_last in (1, 16):
        s = host_schedule(
            torch.tensor([0, 2, 2, 2], dtype=torch.int32),
            torch.tensor([5, pad_last, pad_last], dtype=torch.int32),
            16,
            8,
            2,
            132,
        )
        assert s["total_keys"] == 21 and s["pieces"] == 3


def test_schedule_without_splits_keeps_every_request_whole():
    lens = [33000, 512, 4096, 1, 0, 700]
    s, _ = _check_schedule(lens, 16, disable_split_kv=True)
    assert s["merges"] == [] and s["partial_states"] == 0 and s["pieces"] == len(lens)
    assert _check_schedule(lens, 16)[0]["merges"]  # (the same batch is split otherwise)


def test_batch_decode_spec_names():
    specs = BatchDecodePagedSpec.expand()
    # head_dim x q x kv (bf16, f16, e4m3, e5m2) x o x layout x pos x soft cap
    assert len({s.name() for s in specs}) == len(specs) == 3 * 2 * 4 * 2 * 2 * 3 * 2
    s = BatchDecodePagedSpec(128, "bf16", "bf16", "bf16", "NHD", "NONE", False)
    assert s.name() == "decode_batch_paged_q-bf16_kv-bf16_o-bf16_d128_nhd_pos-none_softcap-off"
    assert BatchDecodePagedSpec.from_json(s.to_json()) == s
    assert len([x for x in specs if x.unsupported_reason() is None and x.dtype_kv == x.dtype_q]) == 3 * 2 * 2 * 3 * 2


def test_fp8_batch_spec_names():
    s = BatchDecodePagedSpec(128, "bf16", "e4m3", "bf16", "NHD", "NONE", False)
    assert s.name() == "decode_batch_paged_q-bf16_kv-e4m3_o-bf16_d128_nhd_pos-none_softcap-off"
    assert s.unsupported_reason() is None and BatchDecodePagedSpec.from_json(s.to_json()) == s
    fp8 = [x for x in BatchDecodePagedSpec.expand(dtype_kv=("e4m3", "e5m2")) if x.unsupported_reason() is None]
    assert len(fp8) == 3 * 2 * 2 * 2 * 3 * 2 and {x.name() for x in FP8_BATCH_SPECS} <= {x.name() for x in fp8}
    assert "kv must be q's 16-bit dtype or fp8" in BatchDecodePagedSpec(128, "bf16", "f16", "bf16").unsupported_reason()


def _fp8_setup():
    from fake_cuda import cuda

    lens = [20, 0, 3000]
    pages = [(n + 15) // 16 for n in lens]
    indptr = torch.tensor([0, *torch.tensor(pages).cumsum(0).tolist()], dtype=torch.int32)
    last = torch.tensor([n - (p - 1) * 16 if p else 1 for n, p in zip(lens, pages)], dtype=torch.int32)
    indices = torch.arange(int(indptr[-1]), dtype=torch.int32)
    q = cuda(torch.randn(3, 8, 128).to(torch.bfloat16))
    cache = cuda(torch.randn(int(indptr[-1]) + 2, 2, 16, 2, 128).to(torch.float8_e4m3fn))
    return indptr, indices, last, q, cache


def test_fp8_plan_and_run_launch_with_folded_scales(monkeypatch):
    """kv_data_type fp8 plans the fp8 module; run()'s k_scale folds into the logit scale and v_scale reaches the
    kernel as its output scale (FlashInfer's meaning), plain and through forward(); data_type fills only a None
    kv_data_type (FlashInfer's rule)."""
    from fake_cuda import fake_cuda, workspace

    with fake_cuda(monkeypatch) as rec:
        indptr, indices, last, q, cache = _fp8_setup()
        w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace())
        w.plan(indptr, indices, last, 8, 2, 128, 16, q_data_type=torch.bfloat16, kv_data_type="e4m3", sm_scale=0.2)
        assert w._cached_kv_data_type == torch.float8_e4m3fn and w._cached_q_data_type == torch.bfloat16
        w.run(q, cache, q_scale=0.5, k_scale=torch.tensor(0.25), v_scale=torch.tensor([3.0]))
        w.forward(q, cache, sm_scale=0.2, k_scale=0.25, v_scale=3.0)
        runs = rec.launches("flashinfer_batch_decode_run")
        assert len(runs) == 2 and all(kw["_spec"].dtype_kv == "e4m3" for _, kw in runs)
        assert runs[0][1]["args.sm_scale"] == pytest.approx(0.2 * 0.5 * 0.25)
        assert runs[1][1]["args.sm_scale"] == pytest.approx(0.2 * 0.25)
        assert all(kw["args.v_scale"] == pytest.approx(3.0) for _, kw in runs)
        w.plan(indptr, indices, last, 8, 2, 128, 16, q_data_type="bfloat16", data_type=torch.float8_e5m2)
        assert w._cached_kv_data_type == torch.float8_e5m2 and w._cached_q_data_type == torch.bfloat16
        assert w._plan_info.spec.dtype_kv == "e5m2"


def test_fp8_plan_and_run_errors_name_the_combination(monkeypatch):
    from fake_cuda import cuda, fake_cuda, workspace

    with fake_cuda(monkeypatch):
        indptr, indices, last, q, cache = _fp8_setup()
        e4 = torch.float8_e4m3fn
        w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace())
        with pytest.raises(NotImplementedError, match="q torch.float8_e4m3fn with KV torch.float8_e4m3fn"):
            w.plan(indptr, indices, last, 8, 2, 128, 16, q_data_type=e4, kv_data_type=e4)
        with pytest.raises(NotImplementedError, match="q torch.float8_e5m2 with KV"):
            w.plan(indptr, indices, last, 8, 2, 128, 16, q_data_type=None, data_type=torch.float8_e5m2)
        with pytest.raises(TypeError, match="the KV dtype must be q.s .* or fp8"):
            w.plan(indptr, indices, last, 8, 2, 128, 16, q_data_type=torch.bfloat16, kv_data_type=torch.float16)
        with pytest.raises(TypeError, match="float8_e4m3fn, torch.float8_e5m2"):
            w.plan(indptr, indices, last, 8, 2, 128, 16, q_data_type=torch.bfloat16, kv_data_type=torch.float32)
        tc = flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace(), use_tensor_cores=True)
        with pytest.raises(NotImplementedError, match="q torch.float8_e4m3fn with KV"):
            tc.plan(indptr, indices, last, 8, 2, 128, 16, q_data_type=e4, kv_data_type=e4)
        w.plan(indptr, indices, last, 8, 2, 128, 16, q_data_type=torch.bfloat16, kv_data_type=e4)
        with pytest.raises(TypeError, match="planned kv_data_type torch.float8_e4m3fn"):
            w.run(q, cuda(torch.randn(cache.shape).to(torch.bfloat16)))
        with pytest.raises(TypeError, match="planned kv_data_type"):
            w.run(q, cuda(torch.randn(cache.shape).to(torch.float8_e5m2)))
        with pytest.raises(TypeError, match="k_scale is a tensor on cuda"):
            w.run(q, cache, k_scale=cuda(torch.ones(1)))
        with pytest.raises(ValueError, match="multiple of 16 elements"):
            w.run(q, cuda(torch.randn(cache.shape[0], 2, 16, 2, 136).to(e4))[..., :128])
        # the 16-bit paths refuse an fp8 cache, naming those that read it
        with pytest.raises(TypeError, match="fp8 KV caches are read by"):
            flashinfer.page.unpack_paged_kv_cache(cache, "NHD")


def test_wrapper_refuses_cpu_workspace():
    with pytest.raises(ValueError, match="CUDA tensor"):
        flashinfer.BatchDecodeWithPagedKVCacheWrapper(torch.empty(1024, dtype=torch.uint8))


def test_run_op_is_registered_with_a_fake_implementation():
    """torch.compile traces run() through flashinfer::batch_decode_paged_run; its fake gives the output shapes."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(3, 8, 128, dtype=torch.bfloat16)
        k = torch.empty(10, 16, 2, 128, dtype=torch.bfloat16)
        o, lse = torch.ops.flashinfer.batch_decode_paged_run(q, k, k, 1, 1.0, 1.0, True, -1)
        assert o.shape == q.shape and o.dtype == q.dtype and lse.shape == (3, 8) and lse.dtype == torch.float32
        _, no_lse = torch.ops.flashinfer.batch_decode_paged_run(q, k, k, 1, 1.0, 1.0, False, -1)
        assert no_lse.shape == (0,)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_batch_decode_on_second_device_while_first_is_current():
    torch.cuda.set_device(0)
    dev = torch.device("cuda:1")
    lens, page_size = [700, 33, 4096], 16
    pages = [(n + page_size - 1) // page_size for n in lens]
    indptr = torch.tensor([0] + torch.tensor(pages).cumsum(0).tolist(), dtype=torch.int32)
    last = torch.tensor([n - (p - 1) * page_size for n, p in zip(lens, pages)], dtype=torch.int32)
    indices = torch.randperm(sum(pages) + 5)[: sum(pages)].to(torch.int32)
    k = torch.randn(sum(pages) + 5, page_size, 2, 128, device=dev, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    q = torch.randn(len(lens), 16, 128, device=dev, dtype=torch.bfloat16)
    w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(torch.empty(32 << 20, dtype=torch.uint8, device=dev))
    w.plan(indptr, indices.to(dev), last, 16, 2, 128, page_size, q_data_type=torch.bfloat16)
    o = w.run(q, (k, v))
    assert o.device == dev and torch.cuda.current_device() == 0
    for r, n in enumerate(lens):
        ids = indices[indptr[r] : indptr[r + 1]]
        ref, _ = attention(q[r][None], _gather(k, "NHD", ids, n), _gather(v, "NHD", ids, n))
        assert_close(o[r], ref[0])
