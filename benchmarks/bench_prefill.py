"""Prefill attention benchmark: flashinfer single and batch prefill against PyTorch SDPA with each backend
forced (flash, cuDNN, efficient) and the bf16 matmul rate, all in one run; appends dated tables to
benchmarks/RESULTS.md.

    python benchmarks/bench_prefill.py [--quick]
    python benchmarks/bench_prefill.py --fp8    # only the fp8 (e4m3) KV vs bf16 KV comparison (its own table)
    python benchmarks/bench_prefill.py --ws     # only the warp-specialised Hopper kernel (backend="fa3_ws"):
                                                # single prefill beside fa3 and SDPA cuDNN/flash, and ragged/paged
                                                # batch prefill beside fa2 and SDPA cuDNN (two tables)
    python benchmarks/bench_prefill.py --ws-batch   # only the fa3_ws batch table (ragged and paged)

FLOPs are counted as 4 * qo * kv * heads * head_dim, halved for causal (qo == kv). Times are device times
from CUDA-graph replays. Also measures the cold compile and warm load of the bf16 d128 causal module.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import flashinfer  # noqa: E402
from common import (  # noqa: E402
    bf16_matmul_tflops,
    first_call_times,
    flush_l2,
    graph_ms,
    median_ms,
    scattered_pages,
    write_results,
)

_FIRST_CALL = r"""
import json, time
t0 = time.perf_counter()
import torch, flashinfer
t1 = time.perf_counter()
q = torch.randn(512, 32, 128, device="cuda", dtype=torch.bfloat16)
k = torch.randn(512, 32, 128, device="cuda", dtype=torch.bfloat16)
torch.cuda.synchronize()
t2 = time.perf_counter()
flashinfer.single_prefill_with_kv_cache(q, k, k, causal=True)
torch.cuda.synchronize()
t3 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "first_call_s": t3 - t2}))
"""

SDPA_BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
}


def prefill_backend_of(L, hq, hkv, d, causal) -> str:
    """The kernel backend="auto" runs for this shape (fa3: Hopper wgmma, fa2: mma.sync)."""
    from flashinfer.prefill import _fa3_scope, _single_backend

    why = _fa3_scope(d, "bf16", "bf16", "bf16", "causal" if causal else "none", "NONE", False, False, False)
    return _single_backend("auto", why, torch.device("cuda", torch.cuda.current_device()), L * (hq // hkv), hkv)


def flops(qo, kv, heads, d, causal):
    f = 4 * qo * kv * heads * d
    return f / 2 if causal else f


def bench_single(L, hq, hkv, d, causal, n_sets=2):
    dtype = torch.bfloat16
    qs = [torch.randn(L, hq, d, device="cuda", dtype=dtype) for _ in range(n_sets)]
    ks = [torch.randn(L, hkv, d, device="cuda", dtype=dtype) for _ in range(n_sets)]
    vs = [torch.randn(L, hkv, d, device="cuda", dtype=dtype) for _ in range(n_sets)]
    outs = [torch.empty(L, hq, d, device="cuda", dtype=dtype) for _ in range(n_sets)]

    def ours(i):
        flashinfer.single_prefill_with_kv_cache(qs[i], ks[i], vs[i], causal=causal, out=outs[i])

    # Correctness guard against SDPA in float32 on a slice of heads (a wrong kernel's timing is worthless).
    ours(0)
    hs = min(hq, 4)
    g = hq // hkv
    ref = F.scaled_dot_product_attention(
        qs[0][:, :hs].transpose(0, 1).float(),
        ks[0][:, : -(-hs // g)].repeat_interleave(g, 1)[:, :hs].transpose(0, 1).float(),
        vs[0][:, : -(-hs // g)].repeat_interleave(g, 1)[:, :hs].transpose(0, 1).float(),
        is_causal=causal,
    )
    err = (outs[0][:, :hs].transpose(0, 1).float() - ref).abs().max().item()
    assert err < 3e-2, f"prefill output differs from SDPA by {err}"

    t = graph_ms(ours, n_sets, calls_per_graph=4)
    sq = [x.transpose(0, 1).unsqueeze(0) for x in qs]  # [1, H, L, D] views (SDPA's usual input)
    sk = [x.transpose(0, 1).unsqueeze(0) for x in ks]
    sv = [x.transpose(0, 1).unsqueeze(0) for x in vs]
    sdpa = {}
    for name, be in SDPA_BACKENDS.items():

        def run(i, be=be):
            with sdpa_kernel([be]):
                F.scaled_dot_product_attention(sq[i], sk[i], sv[i], is_causal=causal, enable_gqa=hq != hkv)

        try:
            run(0)
            torch.cuda.synchronize()
            sdpa[name] = graph_ms(run, n_sets, calls_per_graph=4)
        except Exception as e:  # backend not available for this shape (e.g. GQA on flash)
            sdpa[name] = None
            print(f"  sdpa {name}: unavailable ({type(e).__name__}: {str(e).splitlines()[0][:120]})", flush=True)
    del qs, ks, vs, outs, sq, sk, sv
    torch.cuda.empty_cache()
    return t, sdpa


def bench_batch(num_reqs, L, hq, hkv, d, page_size):
    """16 x 1024 causal: ragged and paged wrappers, plain (timed with events around each run(); a call is
    ~1 ms, far above its host time) and in CUDA-graph mode (graph replays); returns ms of each."""
    dtype = torch.bfloat16
    dev = "cuda"
    total = num_reqs * L
    indptr = torch.arange(0, total + 1, L, dtype=torch.int32)
    q = torch.randn(total, hq, d, device=dev, dtype=dtype)
    k = torch.randn(total, hkv, d, device=dev, dtype=dtype)
    v = torch.randn(total, hkv, d, device=dev, dtype=dtype)
    ws = torch.empty(256 << 20, dtype=torch.uint8, device=dev)
    ref = flashinfer.single_prefill_with_kv_cache(q[:L], k[:L], v[:L], causal=True).float()
    cache, perm, kv_indptr, last = scattered_pages(k, v, num_reqs, page_size)
    ind_dev = indptr.to(dev)
    res = {}
    for graph in (False, True):
        extra = dict(qo_indptr_buf=ind_dev.clone(), kv_indptr_buf=ind_dev.clone()) if graph else {}
        rag = flashinfer.BatchPrefillWithRaggedKVCacheWrapper(ws, "NHD", use_cuda_graph=graph, **extra)
        rag.plan(indptr, indptr, hq, hkv, d, causal=True, q_data_type=dtype)
        out = torch.empty_like(q)
        rag.run(q, k, v, out=out)
        assert (out[:L].float() - ref).abs().max().item() < 2e-2
        extra = (
            dict(
                qo_indptr_buf=ind_dev.clone(),
                paged_kv_indptr_buf=kv_indptr.to(dev),
                paged_kv_indices_buf=perm.to(dev),
                paged_kv_last_page_len_buf=last.to(dev),
            )
            if graph
            else {}
        )
        pw = flashinfer.BatchPrefillWithPagedKVCacheWrapper(ws, "NHD", use_cuda_graph=graph, **extra)
        pw.plan(indptr, kv_indptr, perm, last, hq, hkv, d, page_size, causal=True, q_data_type=dtype)
        out2 = torch.empty_like(q)
        pw.run(q, cache, out=out2)
        assert (out2.float() - out.float()).abs().max().item() < 2e-2
        tag = "_graph" if graph else ""
        if graph:  # plain wrappers refuse capture
            res["ragged" + tag] = graph_ms(lambda i: rag.run(q, k, v, out=out), 1, calls_per_graph=4)
            res["paged" + tag] = graph_ms(lambda i: pw.run(q, cache, out=out2), 1, calls_per_graph=4)
        else:
            res["ragged"] = median_ms(lambda i: rag.run(q, k, v, out=out), 1, iters=30)
            res["paged"] = median_ms(lambda i: pw.run(q, cache, out=out2), 1, iters=30)
    single = graph_ms(
        lambda i: [
            flashinfer.single_prefill_with_kv_cache(
                q[r * L : (r + 1) * L], k[r * L : (r + 1) * L], v[r * L : (r + 1) * L], causal=True
            )
            for r in range(num_reqs)
        ],
        1,
        calls_per_graph=1,
    )
    res["single_x16"] = single
    return res


FP8_TARGET = 0.90  # issue 13: prefill with an fp8 KV within 10% of the bf16 prefill's TFLOP/s
FP8_SCALES = (0.5, 0.5)  # k_scale, v_scale: the fp8 values are randn / scale


def _kv_pair(shape, kv_dtype, scale):
    """A K or V tensor in kv_dtype (bf16: randn; fp8: randn / scale rounded to it) and its dequantised float32."""
    if kv_dtype == torch.bfloat16:
        x = torch.randn(shape, device="cuda", dtype=kv_dtype)
        return x, x.float()
    x = (torch.randn(shape, device="cuda") / scale).to(kv_dtype)
    return x, x.float() * scale


def kernel_that_ran(call) -> str:
    """The backend of the single-prefill module that call() launched ("fa2", "fa3", "fa3_ws"): observed on the module
    lookup of the call itself (flashinfer.prefill._module), not predicted."""
    import flashinfer.prefill as fp

    seen = []
    lookup = fp._module

    def spy(spec):
        seen.append(spec.backend)
        return lookup(spec)

    fp._module = spy
    try:
        call()
    finally:
        fp._module = lookup
    assert len(set(seen)) == 1, seen  # (fa2 looks its module up again for its KV split)
    return seen[0]


def fp8_single_ms(L, hq, hkv, d, causal, kv_dtype, n_sets=2) -> tuple[float, str]:
    """Graph-timed single_prefill_with_kv_cache (backend "auto") with a bf16 q and a bf16 or fp8 KV (with
    FP8_SCALES), after a correctness guard against SDPA on the dequantised K/V (a slice of heads); and the kernel
    that "auto" ran (kernel_that_ran)."""
    fp8 = kv_dtype != torch.bfloat16
    k_scale, v_scale = FP8_SCALES if fp8 else (None, None)
    qs = [torch.randn(L, hq, d, device="cuda", dtype=torch.bfloat16) for _ in range(n_sets)]
    kp = [_kv_pair((L, hkv, d), kv_dtype, FP8_SCALES[0]) for _ in range(n_sets)]
    vp = [_kv_pair((L, hkv, d), kv_dtype, FP8_SCALES[1]) for _ in range(n_sets)]
    outs = [torch.empty(L, hq, d, device="cuda", dtype=torch.bfloat16) for _ in range(n_sets)]

    def ours(i):
        flashinfer.single_prefill_with_kv_cache(
            qs[i], kp[i][0], vp[i][0], causal=causal, k_scale=k_scale, v_scale=v_scale, out=outs[i]
        )

    kernel = kernel_that_ran(lambda: ours(0))
    hs, g = min(hq, 4), hq // hkv
    kv_heads = slice(0, -(-hs // g))
    ref = F.scaled_dot_product_attention(
        qs[0][:, :hs].transpose(0, 1).float(),
        kp[0][1][:, kv_heads].repeat_interleave(g, 1)[:, :hs].transpose(0, 1),
        vp[0][1][:, kv_heads].repeat_interleave(g, 1)[:, :hs].transpose(0, 1),
        is_causal=causal,
    )
    err = (outs[0][:, :hs].transpose(0, 1).float() - ref).abs().max().item()
    assert err < 3e-2 * (2 if fp8 else 1), f"prefill ({kv_dtype}) output differs from SDPA by {err}"
    t = graph_ms(ours, n_sets, calls_per_graph=4)
    del qs, kp, vp, outs
    torch.cuda.empty_cache()
    return t, kernel


def _fp8_batch_inputs(num_reqs, L, hq, hkv, d, kv_dtype):
    """num_reqs requests of L tokens each (keys = queries): (k_scale, v_scale, indptr, q, (k, k_ref), (v, v_ref)),
    the scales None for a bf16 KV."""
    k_scale, v_scale = FP8_SCALES if kv_dtype != torch.bfloat16 else (None, None)
    total = num_reqs * L
    indptr = torch.arange(0, total + 1, L, dtype=torch.int32)
    q = torch.randn(total, hq, d, device="cuda", dtype=torch.bfloat16)
    kp, vp = (_kv_pair((total, hkv, d), kv_dtype, scale) for scale in FP8_SCALES)
    return k_scale, v_scale, indptr, q, kp, vp


def _check_fp8_batch_out(what, out, q, k_ref, v_ref, rows, hkv, kv_dtype) -> None:
    """One request's (rows) first 4 query heads against causal SDPA on the dequantised K/V of its KV head 0."""
    g = q.shape[1] // hkv
    ref = F.scaled_dot_product_attention(
        q[rows, :4].transpose(0, 1).float(),
        k_ref[rows, :1].repeat_interleave(g, 1)[:, :4].transpose(0, 1),
        v_ref[rows, :1].repeat_interleave(g, 1)[:, :4].transpose(0, 1),
        is_causal=True,
    )
    err = (out[rows, :4].transpose(0, 1).float() - ref).abs().max().item()
    fp8 = kv_dtype != torch.bfloat16
    assert err < 3e-2 * (2 if fp8 else 1), f"{what} prefill ({kv_dtype}) output differs from SDPA by {err}"


def fp8_paged_ms(num_reqs, L, hq, hkv, d, page_size, kv_dtype) -> float:
    """BatchPrefillWithPagedKVCacheWrapper, num_reqs x L causal (each request's keys = its queries), bf16 q and a
    bf16 or fp8 page cache: median of event-timed run() calls (a call is ~1 ms, far above its host time)."""
    fp8 = kv_dtype != torch.bfloat16
    k_scale, v_scale, indptr, q, (k, k_ref), (v, v_ref) = _fp8_batch_inputs(num_reqs, L, hq, hkv, d, kv_dtype)
    as_stored = (lambda t: t.view(torch.uint8)) if fp8 else (lambda t: t)  # noqa: E731 (fp8 rows moved as bytes)
    cache, perm, kv_indptr, last = scattered_pages(as_stored(k), as_stored(v), num_reqs, page_size)
    cache = cache.view(kv_dtype) if fp8 else cache
    ws = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    w = flashinfer.BatchPrefillWithPagedKVCacheWrapper(ws, "NHD")
    w.plan(
        indptr,
        kv_indptr,
        perm,
        last,
        hq,
        hkv,
        d,
        page_size,
        causal=True,
        q_data_type=torch.bfloat16,
        kv_data_type=kv_dtype,
    )
    out = torch.empty_like(q)
    w.run(q, cache, k_scale=k_scale, v_scale=v_scale, out=out)
    _check_fp8_batch_out("paged", out, q, k_ref, v_ref, slice(0, L), hkv, kv_dtype)
    t = median_ms(lambda i: w.run(q, cache, k_scale=k_scale, v_scale=v_scale, out=out), 1, iters=30)
    del q, k, v, cache, ws
    torch.cuda.empty_cache()
    return t


def fp8_ragged_ms(num_reqs, L, hq, hkv, d, kv_dtype) -> float:
    """BatchPrefillWithRaggedKVCacheWrapper (backend "auto"), num_reqs x L causal, bf16 q and bf16 or fp8 K/V:
    median of event-timed run() calls."""
    k_scale, v_scale, indptr, q, (k, k_ref), (v, v_ref) = _fp8_batch_inputs(num_reqs, L, hq, hkv, d, kv_dtype)
    ws = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    w = flashinfer.BatchPrefillWithRaggedKVCacheWrapper(ws, "NHD")
    w.plan(indptr, indptr, hq, hkv, d, causal=True, q_data_type=torch.bfloat16, kv_data_type=kv_dtype)
    out = torch.empty_like(q)
    w.run(q, k, v, k_scale=k_scale, v_scale=v_scale, out=out)
    total = num_reqs * L  # the last request checked: a wrong request offset shows there
    _check_fp8_batch_out("ragged", out, q, k_ref, v_ref, slice(total - L, total), hkv, kv_dtype)
    t = median_ms(lambda i: w.run(q, k, v, k_scale=k_scale, v_scale=v_scale, out=out), 1, iters=30)
    del q, k, v, ws
    torch.cuda.empty_cache()
    return t


def fp8_main() -> None:
    """bf16 KV vs e4m3 KV (bf16 q and output), same run: single prefill 8192 (causal and not) and batch paged and
    ragged 16 x 1024 causal, head_dim 128, 32/8 heads; TFLOP/s and the issue's within-10% target."""
    e4m3 = torch.float8_e4m3fn
    rows = []
    cases = [("single 8192", (8192, 32, 8, 128, c), c) for c in (False, True)]
    cases.append(("paged 16 x 1024, page 16", (16, 1024, 32, 8, 128, 16), True))
    cases.append(("ragged 16 x 1024", (16, 1024, 32, 8, 128, 0), True))
    for name, shape, causal in cases:
        if name.startswith("single"):
            L, hq, hkv, d, _ = shape
            f = flops(L, L, hq, d, causal)
            (t16, k16), (t8, k8) = (fp8_single_ms(L, hq, hkv, d, causal, dt) for dt in (torch.bfloat16, e4m3))
        else:
            n, L, hq, hkv, d, ps = shape
            f = n * flops(L, L, hq, d, True)
            k16 = k8 = "fa2"  # (the batch wrappers have one kernel family)
            if name.startswith("paged"):
                t16, t8 = (fp8_paged_ms(n, L, hq, hkv, d, ps, dt) for dt in (torch.bfloat16, e4m3))
            else:
                t16, t8 = (fp8_ragged_ms(n, L, hq, hkv, d, dt) for dt in (torch.bfloat16, e4m3))
        backend = k16 if k16 == k8 else f"{k16} / {k8}"
        tf16, tf8 = f / t16 / 1e9, f / t8 / 1e9
        ratio = tf8 / tf16
        r = {
            "case": name,
            "causal": causal,
            "kernel_bf16": k16,
            "kernel_e4m3": k8,
            "ms_bf16": t16,
            "ms_e4m3": t8,
            "ratio": ratio,
        }
        print(json.dumps(r), flush=True)
        rows.append(
            [
                f"{name}{' causal' if causal else ''}",
                backend,
                f"{t16:.3f} ({tf16:.0f})",
                f"{t8:.3f} ({tf8:.0f})",
                f"{ratio:.2f}",
                f"≥{FP8_TARGET:.2f}: {'met' if ratio >= FP8_TARGET else 'MISSED'}",
            ]
        )
    text = write_results(
        "prefill with an fp8 e4m3 KV vs a bf16 KV (q/o bf16), d128, 32 q / 8 kv heads, NHD",
        [
            "case",
            "kernel (bf16 / e4m3 KV)",
            "bf16 KV ms (TFLOP/s)",
            "e4m3 KV ms (TFLOP/s)",
            "TFLOP/s e4m3 / bf16",
            "target",
        ],
        rows,
        [
            "FLOPs as the main table (4 qo kv heads d, halved for causal)",
            f"e4m3 with k_scale = {FP8_SCALES[0]}, v_scale = {FP8_SCALES[1]} (v_scale applied in the kernel's "
            "epilogue, with the softmax normalisation: no separate multiply)",
            "single: graph replays, backend 'auto' (the kernel column: the module each call launched, observed); "
            "paged: median of 30 event-timed run() calls",
        ],
    )
    print(text)


# Issue 11's single-prefill rows (bf16, d128): (L, q heads, kv heads, causal).
# (length, q heads, kv heads, causal, head_dim); at head_dim 64 the other kernel of ours is fa2 (fa3 takes 128).
WS_CASES = (
    [(L, 32, 32, c, 128) for L in (2048, 8192, 16384) for c in (False, True)]
    + [(8192, 32, 8, c, 128) for c in (False, True)]
    + [(8192, 32, 32, c, 64) for c in (False, True)]
)
WS_TARGET = 1.05  # issue 11: >= 1.05x the best of FlashInfer fa3 and cuDNN (here: of our fa3 and cuDNN)


def ws_single(L, hq, hkv, causal, d=128, n_sets=2) -> dict:
    """Graph-timed ms of single_prefill_with_kv_cache with backend "fa3" (fa2 at head_dim 64, under the key "fa3")
    and "fa3_ws", and SDPA cuDNN and flash, on the same inputs (bf16, NHD); fa3_ws's output checked against the
    other's and against SDPA (a slice of heads) first."""
    dtype = torch.bfloat16
    other = "fa3" if d == 128 else "fa2"
    qs = [torch.randn(L, hq, d, device="cuda", dtype=dtype) for _ in range(n_sets)]
    ks = [torch.randn(L, hkv, d, device="cuda", dtype=dtype) for _ in range(n_sets)]
    vs = [torch.randn(L, hkv, d, device="cuda", dtype=dtype) for _ in range(n_sets)]
    outs = {b: [torch.empty(L, hq, d, device="cuda", dtype=dtype) for _ in range(n_sets)] for b in ("fa3", "fa3_ws")}

    def ours(backend):
        def run(i):
            flashinfer.single_prefill_with_kv_cache(
                qs[i], ks[i], vs[i], causal=causal, backend=other if backend == "fa3" else backend, out=outs[backend][i]
            )

        return run

    ours("fa3")(0)
    ours("fa3_ws")(0)
    torch.cuda.synchronize()
    diff = (outs["fa3_ws"][0].float() - outs["fa3"][0].float()).abs().max().item()
    assert diff < 2e-2, f"fa3_ws differs from {other} by {diff}"
    hs, g = min(hq, 4), hq // hkv
    ref = F.scaled_dot_product_attention(
        qs[0][:, :hs].transpose(0, 1).float(),
        ks[0][:, : -(-hs // g)].repeat_interleave(g, 1)[:, :hs].transpose(0, 1).float(),
        vs[0][:, : -(-hs // g)].repeat_interleave(g, 1)[:, :hs].transpose(0, 1).float(),
        is_causal=causal,
    )
    err = (outs["fa3_ws"][0][:, :hs].transpose(0, 1).float() - ref).abs().max().item()
    assert err < 3e-2, f"fa3_ws output differs from SDPA by {err}"
    res = {b: graph_ms(ours(b), n_sets, calls_per_graph=4) for b in ("fa3", "fa3_ws")}
    sq = [x.transpose(0, 1).unsqueeze(0) for x in qs]
    sk = [x.transpose(0, 1).unsqueeze(0) for x in ks]
    sv = [x.transpose(0, 1).unsqueeze(0) for x in vs]
    for name in ("cudnn", "flash"):

        def run(i, be=SDPA_BACKENDS[name]):
            with sdpa_kernel([be]):
                F.scaled_dot_product_attention(sq[i], sk[i], sv[i], is_causal=causal, enable_gqa=hq != hkv)

        try:
            run(0)
            torch.cuda.synchronize()
            res[name] = graph_ms(run, n_sets, calls_per_graph=4)
        except Exception as e:  # backend not available for this shape
            res[name] = None
            print(f"  sdpa {name}: unavailable ({type(e).__name__}: {str(e).splitlines()[0][:120]})", flush=True)
    del qs, ks, vs, outs, sq, sk, sv
    torch.cuda.empty_cache()
    return res


# Ragged batch rows: (requests, length of each (queries = keys), q heads, kv heads), causal, bf16, d128.
# (requests, tokens each, q heads, kv heads, page size; 0: ragged K/V)
WS_BATCH_CASES = [(16, 1024, 32, 32, 0), (16, 1024, 32, 8, 0), (16, 1024, 32, 32, 16), (16, 1024, 32, 8, 16)]


def queued_ms(fn, calls: int = 4, iters: int = 20) -> float:
    """Device ms of one call of fn() for calls that cannot be captured in a CUDA graph (the plain batch wrappers):
    `calls` calls between two events, queued behind a ~0.1 ms sleep kernel so that the host's time to issue them
    is hidden (the GPU is still busy when they arrive), L2 flushed before; median over iters, per call."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        flush_l2()
        torch.cuda._sleep(200_000)
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(calls):
            fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / calls)
    times.sort()
    return times[len(times) // 2]


def ws_batch(n: int, L: int, hq: int, hkv: int, page_size: int = 0) -> dict:
    """ms of BatchPrefillWithRaggedKVCacheWrapper (page_size 0) or BatchPrefillWithPagedKVCacheWrapper (pages of
    page_size, scattered by a random permutation) with backend "fa3_ws" and "fa2", and of SDPA cuDNN on the same
    batch as a dense [n, H, L, D] batch (every request has L queries and L keys: the padded layout has no padding;
    for paged K/V no gather is timed), causal, bf16, d128, NHD. Checked first: fa3_ws against fa2, both against SDPA
    in float32 (first and last request, 4 heads), and SDPA cuDNN against fa2."""
    d, dtype = 128, torch.bfloat16
    total, g = n * L, hq // hkv
    indptr = torch.arange(0, total + 1, L, dtype=torch.int32)
    q = torch.randn(total, hq, d, device="cuda", dtype=dtype)
    k = torch.randn(total, hkv, d, device="cuda", dtype=dtype)
    v = torch.randn(total, hkv, d, device="cuda", dtype=dtype)
    if page_size:
        cache, perm, kv_indptr, last = scattered_pages(k, v, n, page_size)
    outs, runs = {}, {}
    for backend in ("fa3_ws", "fa2"):
        ws = torch.empty(64 << 20, dtype=torch.uint8, device="cuda")
        out = outs[backend] = torch.empty_like(q)
        if page_size:
            w = flashinfer.BatchPrefillWithPagedKVCacheWrapper(ws, "NHD", backend=backend)
            w.plan(indptr, kv_indptr, perm, last, hq, hkv, d, page_size, causal=True, q_data_type=dtype)
            runs[backend] = lambda w=w, out=out: w.run(q, cache, out=out)
        else:
            w = flashinfer.BatchPrefillWithRaggedKVCacheWrapper(ws, "NHD", backend=backend)
            w.plan(indptr, indptr, hq, hkv, d, causal=True, q_data_type=dtype)
            runs[backend] = lambda w=w, out=out: w.run(q, k, v, out=out)
        runs[backend]()
    torch.cuda.synchronize()
    # (bf16 outputs: a rounding apart at most; relative to the magnitude, as rows with few keys reach |o| ~ 4)
    torch.testing.assert_close(outs["fa3_ws"].float(), outs["fa2"].float(), atol=2e-2, rtol=1e-2)
    hs = min(hq, 4)
    for r in (0, n - 1):
        rows = slice(r * L, (r + 1) * L)
        ref = F.scaled_dot_product_attention(
            q[rows, :hs].transpose(0, 1).float(),
            k[rows, : -(-hs // g)].repeat_interleave(g, 1)[:, :hs].transpose(0, 1).float(),
            v[rows, : -(-hs // g)].repeat_interleave(g, 1)[:, :hs].transpose(0, 1).float(),
            is_causal=True,
        )
        for backend, out in outs.items():
            err = (out[rows, :hs].transpose(0, 1).float() - ref).abs().max().item()
            assert err < 3e-2, (
                f"{'paged' if page_size else 'ragged'} {backend}, request {r}: output differs from SDPA by {err}"
            )
    res = {b: queued_ms(runs[b]) for b in ("fa3_ws", "fa2")}
    # SDPA cuDNN on [n, H, L, D] views of the same tensors; GQA through enable_gqa, else K/V expanded to the q heads
    sq, sk, sv = (x.view(n, L, x.shape[1], d).transpose(1, 2) for x in (q, k, v))
    res["cudnn_note"] = ""

    def cudnn(kk, vv, gqa):
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            return F.scaled_dot_product_attention(sq, kk, vv, is_causal=True, enable_gqa=gqa)

    try:
        try:
            run = lambda: cudnn(sk, sv, hq != hkv)  # noqa: E731
            so = run()
        except RuntimeError:
            if hq == hkv:
                raise
            ek, ev = (x.repeat_interleave(g, 1) for x in (sk, sv))
            run = lambda: cudnn(ek, ev, False)  # noqa: E731
            so = run()
            res["cudnn_note"] = " (K/V expanded)"
        torch.cuda.synchronize()
        so = so.transpose(1, 2).reshape(total, hq, d).float()
        torch.testing.assert_close(so, outs["fa2"].float(), atol=2e-2, rtol=1e-2, msg="SDPA cuDNN vs fa2")
        res["cudnn"] = queued_ms(run)
    except RuntimeError as e:  # cuDNN not available for this shape or build
        res["cudnn"] = None
        print(f"  sdpa cudnn: unavailable ({type(e).__name__}: {str(e).splitlines()[0][:120]})", flush=True)
    del q, k, v, outs, runs, sq, sk, sv
    if page_size:
        del cache
    torch.cuda.empty_cache()
    return res


def ws_batch_main() -> None:
    """fa3_ws on ragged and paged batches beside fa2 and SDPA cuDNN: 16 x 1024 causal, 32/32 and 32/8 heads."""
    if torch.cuda.get_device_capability() != (9, 0):
        print("--ws-batch: the fa3_ws backend needs a Hopper (sm_90) GPU; nothing measured", flush=True)
        return
    rows = []
    for n, L, hq, hkv, ps in WS_BATCH_CASES:
        r = ws_batch(n, L, hq, hkv, ps)
        f = n * flops(L, L, hq, 128, True)
        tf = {b: (None if r[b] is None else f / (r[b] * 1e-3) / 1e12) for b in ("fa3_ws", "fa2", "cudnn")}
        shape = f"{f'paged (page {ps})' if ps else 'ragged'} {n} x {L} causal, {hq}/{hkv} d128"
        print(json.dumps({"shape": shape, **{f"{b}_ms": r[b] for b in ("fa3_ws", "fa2", "cudnn")}}), flush=True)
        cell = lambda b: "-" if r[b] is None else f"{r[b]:.3f} ({tf[b]:.0f})"  # noqa: E731
        rows.append(
            [
                shape,
                cell("fa3_ws"),
                cell("fa2"),
                cell("cudnn") + r["cudnn_note"],
                f"{tf['fa3_ws'] / tf['fa2']:.2f}x",
                "-" if tf["cudnn"] is None else f"{tf['fa3_ws'] / tf['cudnn']:.2f}x",
            ]
        )
    text = write_results(
        'Batch prefill (ragged and paged wrappers) backend="fa3_ws" vs "fa2" and SDPA cuDNN, bf16, NHD',
        ["batch", "fa3_ws ms (TFLOP/s)", "fa2", "SDPA cuDNN", "ws / fa2", "ws / cuDNN"],
        rows,
        [
            "FLOPs = requests·4·L·L·heads·head_dim / 2 (causal); device ms per call: 4 calls queued behind a sleep "
            "kernel between two events (the plain wrappers cannot be graph-captured), L2 flushed, median of 20",
            "SDPA cuDNN: the batch as [16, H, 1024, 128] views (equal lengths: the padded layout is the ragged one; "
            "for the paged rows the same dense K/V, no gather timed)",
            "paged: pages of 16 tokens scattered over the cache by a random permutation",
            "checked before timing: fa3_ws vs fa2 and cuDNN vs fa2 (atol 2e-2, rtol 1e-2), both ours vs SDPA float32 "
            "(first and last request, 4 heads, < 3e-2)",
        ],
    )
    print(text, flush=True)


def ws_main() -> None:
    """The warp-specialised Hopper kernel (fa3_ws) beside fa3 and SDPA cuDNN/flash on issue 11's single rows, then
    on ragged batches beside fa2 and SDPA cuDNN."""
    if torch.cuda.get_device_capability() != (9, 0):
        print("--ws: the fa3_ws backend needs a Hopper (sm_90) GPU; nothing measured", flush=True)
        return
    rows = []
    for L, hq, hkv, causal, d in WS_CASES:
        r = ws_single(L, hq, hkv, causal, d)
        f = flops(L, L, hq, d, causal)
        tf = {k: (None if v is None else f / (v * 1e-3) / 1e12) for k, v in r.items()}
        shape = f"{hq}/{hkv} d{d} L{L} {'causal' if causal else 'full'}"
        print(json.dumps({"shape": shape, **{f"{k}_ms": v for k, v in r.items()}}), flush=True)
        best = max(x for x in (tf["fa3"], tf["cudnn"]) if x is not None)
        cell = lambda k: "-" if r[k] is None else f"{r[k]:.3f} ({tf[k]:.0f})"  # noqa: E731
        rows.append(
            [
                shape,
                cell("fa3_ws"),
                cell("fa3"),
                cell("cudnn"),
                cell("flash"),
                f"{tf['fa3_ws'] / tf['fa3']:.2f}x",
                f"{tf['fa3_ws'] / best:.2f}x",
                f"≥{WS_TARGET:.2f}x: {'met' if tf['fa3_ws'] >= WS_TARGET * best else 'MISSED'}",
            ]
        )
    text = write_results(
        'single_prefill_with_kv_cache backend="fa3_ws" (warp-specialised TMA kernel) vs "fa3" and SDPA, bf16, NHD',
        [
            "shape",
            "fa3_ws ms (TFLOP/s)",
            "fa3 (d64: fa2)",
            "SDPA cuDNN",
            "SDPA flash",
            "ws / fa3",
            "ws / best",
            "target",
        ],
        rows,
        [
            "FLOPs = 4·qo·kv·heads·head_dim, halved for causal; CUDA-graph device times (ms), 2 input sets rotated",
            "best = the faster of our fa3 (d64: fa2) and SDPA cuDNN (FlashInfer's own fa3 runs in its own process: "
            "not here)",
            "fa3_ws checked against fa3 / fa2 (max abs diff < 2e-2) and SDPA in float32 (4 heads) before timing",
        ],
    )
    print(text, flush=True)
    ws_batch_main()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--batch-only", action="store_true", help="only the batch prefill table")
    ap.add_argument("--fp8", action="store_true", help="only the fp8 (e4m3) KV vs bf16 KV comparison")
    ap.add_argument("--ws", action="store_true", help='only backend="fa3_ws" (single and ragged batch tables)')
    ap.add_argument("--ws-batch", action="store_true", help='only backend="fa3_ws" on ragged batches vs fa2, cuDNN')
    args = ap.parse_args()
    if args.ws_batch:
        ws_batch_main()
        return
    if args.fp8:
        fp8_main()
        return
    if args.ws:
        ws_main()
        return
    mm = bf16_matmul_tflops()
    print(f"bf16 matmul {mm:.0f} TFLOP/s", flush=True)
    times = (
        {"cold": {"first_call_s": float("nan")}, "warm": {"first_call_s": float("nan"), "import_s": 0}}
        if args.batch_only
        else first_call_times(_FIRST_CALL)
    )
    print(
        f"first call: cold {times['cold']['first_call_s']:.2f} s, warm {1e3 * times['warm']['first_call_s']:.1f} ms",
        flush=True,
    )
    cases = [] if args.batch_only else [(L, 32, 32, 128, c) for L in (2048, 8192, 16384) for c in (False, True)]
    if not args.quick and not args.batch_only:
        cases += [
            (8192, 32, 8, 128, False),
            (8192, 32, 8, 128, True),
            (8192, 32, 32, 64, False),
            (8192, 32, 32, 64, True),
            (8192, 16, 16, 256, False),
            (8192, 16, 16, 256, True),
        ]
    rows = []
    for L, hq, hkv, d, causal in cases:
        t, sdpa = bench_single(L, hq, hkv, d, causal)
        tf = flops(L, L, hq, d, causal) / (t * 1e-3) / 1e12
        fl = sdpa.get("flash")
        kernel = prefill_backend_of(L, hq, hkv, d, causal)
        line = {
            "shape": f"{hq}/{hkv} d{d} L{L} {'causal' if causal else 'full'}",
            "kernel": kernel,
            "ms": t,
            "tflops": tf,
            "pct_mm": 100 * tf / mm,
            **{f"sdpa_{k}_ms": v for k, v in sdpa.items()},
        }
        print(json.dumps(line), flush=True)
        target = ""
        if d == 128 and hq == hkv == 32:
            ok = fl is not None and t <= fl
            target = f"≥ SDPA flash: {'met' if ok else 'MISSED'}"
            if not causal and L >= 8192:
                target += f"; ≥55% mm: {'met' if tf >= 0.55 * mm else 'MISSED'}"
        fmt = lambda x: "-" if x is None else f"{x:.3f} ({flops(L, L, hq, d, causal) / (x * 1e-3) / 1e12:.0f})"  # noqa: E731
        rows.append(
            [
                line["shape"],
                kernel,
                f"{t:.3f}",
                f"{tf:.0f}",
                f"{100 * tf / mm:.0f}%",
                fmt(sdpa.get("flash")),
                fmt(sdpa.get("cudnn")),
                fmt(sdpa.get("efficient")),
                "-" if fl is None else f"{fl / t:.2f}x",
                target,
            ]
        )
    notes = [
        f"bf16 matmul (8192^3, same run): {mm:.0f} TFLOP/s",
        "FLOPs = 4·qo·kv·heads·head_dim, halved for causal; times are CUDA-graph device times (ms)",
        "SDPA: [1, H, L, D] views, backend forced with torch.nn.attention.sdpa_kernel; cells: ms (TFLOP/s)",
        f"prefill module (bf16 d128 causal) first call in a fresh process: cold compile "
        f"{times['cold']['first_call_s']:.2f} s (empty cache, MAX_JOBS={os.environ.get('MAX_JOBS', 'unset')}), "
        f"warm {1e3 * times['warm']['first_call_s']:.1f} ms",
    ]
    text = (
        ""
        if not rows
        else write_results(
            'single_prefill_with_kv_cache (backend="auto"), bf16, NHD',
            [
                "shape",
                "kernel",
                "ms",
                "TFLOP/s",
                "% of mm",
                "SDPA flash",
                "SDPA cuDNN",
                "SDPA efficient",
                "vs flash",
                "target",
            ],
            rows,
            notes,
        )
    )
    print(text, flush=True)

    if hasattr(flashinfer, "BatchPrefillWithPagedKVCacheWrapper"):
        brows = []
        for hq, hkv in ((32, 32), (32, 8)):
            r = bench_batch(16, 1024, hq, hkv, 128, 16)
            f = 16 * flops(1024, 1024, hq, 128, True)
            print(json.dumps(r), flush=True)
            for name in ("ragged", "paged"):
                ratio = r[name] / r["single_x16"]
                brows.append(
                    [
                        f"16 x 1024 causal, {hq}/{hkv} d128, {name}" + (" (page 16)" if name == "paged" else ""),
                        f"{r[name]:.3f}",
                        f"{f / (r[name] * 1e-3) / 1e12:.0f}",
                        f"{r['single_x16']:.3f}",
                        f"{ratio:.2f}",
                        "met" if ratio <= 1.10 else "MISSED",
                        f"{r[name + '_graph']:.3f} ({r[name + '_graph'] / r['single_x16']:.2f})",
                    ]
                )
        text = write_results(
            "batch prefill (ragged / paged), bf16, NHD",
            [
                "case",
                "ms",
                "TFLOP/s",
                "16 x single ms",
                "batch / single",
                "within 10%",
                "graph-mode wrapper ms (/ single)",
            ],
            brows,
            [
                "same total work as 16 single_prefill_with_kv_cache(1024 causal) calls (graph-timed)",
                "ms: plain wrapper, CUDA events around each run() (128-row query tiles, one work item "
                "per CTA); graph-mode wrapper: graph replays (64-row tiles, persistent grid)",
            ],
        )
        print(text, flush=True)


if __name__ == "__main__":
    main()
