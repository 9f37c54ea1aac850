"""Cascade (shared-prefix) decode and state-merge benchmark; appends dated tables to benchmarks/RESULTS.md.

    python benchmarks/bench_cascade.py [--quick] [--no-reference] [--fp8]

Batches of requests that share one prefix, each with its own tokens (bf16, 32 query / 8 KV heads, head_dim 128,
page_size 16, NHD, pages scattered): MultiLevelCascadeAttentionWrapper (2 levels) against plain batch decode over
the same pages (each request's prefix and own pages concatenated) and against the real FlashInfer's
MultiLevelCascadeAttentionWrapper on the same inputs (run in its own process, ``--flashinfer-reference``). Then
merge_state / merge_states (8 states) at 4096 x 32 x 128 against the measured copy bandwidth, and a short (16-token)
prefix, where plan() falls back to plain decode. ``--fp8``: the 64 x 32768 + 1024 case only, with a bf16 and an
e4m3 KV cache (same q, bf16): ours (every level on the fp8 batch kernels) and FlashInfer's at each.

Timing: CUDA events around each call with the L2 flushed before it (median of 100); "graph" columns replay CUDA
graphs of the graph-mode wrappers (inputs rotated over copies beyond L2 where they are small).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

REFERENCE = "--flashinfer-reference" in sys.argv
sys.path.insert(0, str(Path(__file__).resolve().parent))
if not REFERENCE:  # the reference process must import the real FlashInfer, not this repository's package
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import flashinfer  # noqa: E402
from common import REFERENCE_FLAG, copy_bandwidth_tbs, graph_ms, median_ms, run_reference, write_results  # noqa: E402

HQ, HKV, D, PS = 32, 8, 128, 16
DT = torch.bfloat16
TOKEN_BYTES = 2 * HKV * D * 2  # K and V of one token
MAIN = (64, 32768, 1024)
CASES = [MAIN, (8, 32768, 1024), (256, 32768, 1024), (64, 4096, 1024), (64, 131072, 1024)]
SHORT = (64, 16, 1024)
MERGE_SHAPE = (4096, 32, 128)
FP8 = torch.float8_e4m3fn
FP8_SCALES = dict(k_scale=0.5, v_scale=2.0)  # ours only (FlashInfer's cascade run() takes no scales): timing-neutral


def make_case(batch: int, prefix: int, unique: int, sets: int = 1, seed: int = 0, kv_dtype: torch.dtype = DT):
    """Inputs both processes build alike: caches (sets copies; an fp8 kv_dtype rounds the same random values), q
    per set (bf16), and the two levels' page tables (device tensors, as FlashInfer's examples pass them)."""
    torch.manual_seed(seed)
    pp, up = -(-prefix // PS), -(-unique // PS)
    num_pages = pp + batch * up
    perm = torch.randperm(num_pages).to(torch.int32)
    caches = [torch.randn(num_pages, 2, PS, HKV, D, device="cuda", dtype=DT).to(kv_dtype) for _ in range(sets)]
    qs = [torch.randn(batch, HQ, D, device="cuda", dtype=DT) for _ in range(sets)]
    cuda = lambda x: torch.tensor(x, dtype=torch.int32, device="cuda")  # noqa: E731
    levels = dict(
        qo=[cuda([0, batch]), torch.arange(batch + 1, dtype=torch.int32, device="cuda")],
        indptr=[cuda([0, pp]), torch.arange(batch + 1, dtype=torch.int32, device="cuda") * up],
        indices=[perm[:pp].cuda(), perm[pp:].cuda()],
        last=[cuda([prefix - (pp - 1) * PS]), cuda([unique - (up - 1) * PS] * batch)],
    )
    return caches, qs, levels


def sets_beyond_l2(batch, prefix, unique):
    kv = (prefix + batch * unique) * TOKEN_BYTES
    return max(1, min(8, math.ceil(512e6 / kv)))


def cascade_eager_ms(mod, levels, caches, qs, scales=None, **attrs):
    """scales: k_scale/v_scale for our run() (an fp8 cache); FlashInfer's takes none."""
    ws = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    w = mod.MultiLevelCascadeAttentionWrapper(2, ws, "NHD")
    for k, v in attrs.items():
        setattr(w, k, v)
    kv_dtype = caches[0].dtype
    w.plan(
        levels["qo"],
        levels["indptr"],
        levels["indices"],
        levels["last"],
        HQ,
        HKV,
        D,
        PS,
        q_data_type=DT,
        kv_data_type=kv_dtype,
    )
    outs = [torch.empty_like(q) for q in qs]

    def call(i):
        if hasattr(w, "plan_stats"):
            w.run(qs[i], caches[i], out=outs[i], **(scales or {}))
        else:  # FlashInfer's run takes no out= (nor scales)
            outs[i] = w.run(qs[i], caches[i])

    call(0)
    return median_ms(call, len(qs), flush=True), w, outs[0]


def host_us_per_run(w, q, cache, out, calls: int = 50) -> float:
    """Host time of one run() (Python and launches; the GPU queue never fills at this count): when it exceeds the
    device time, eager timings measure the host."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        w.run(q, cache, out=out)
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / calls * 1e6


def merge_timings(mod):
    torch.manual_seed(1)
    n, h, d = MERGE_SHAPE
    va, vb = (torch.randn(n, h, d, device="cuda", dtype=DT) for _ in range(2))
    sa, sb = (torch.randn(n, h, device="cuda") + 10 for _ in range(2))
    v8 = torch.randn(n, 8, h, d, device="cuda", dtype=DT)
    s8 = torch.randn(n, 8, h, device="cuda") + 10
    res = {
        "merge_state": median_ms(lambda i: mod.merge_state(va, sa, vb, sb), 1, flush=True),
        "merge_states_8": median_ms(lambda i: mod.merge_states(v8, s8), 1, flush=True),
    }
    va2, sa2 = va.clone(), sa.clone()
    res["merge_state_in_place"] = median_ms(lambda i: mod.merge_state_in_place(va2, sa2, vb, sb), 1, flush=True)
    return res


def reference_main(quick: bool, fp8: bool = False) -> None:
    """--flashinfer-reference: time the real FlashInfer on the same cases; print one JSON line. With fp8: the main
    case with a bf16 and an e4m3 cache (None where FlashInfer fails)."""
    out = {"version": getattr(flashinfer, "__version__", "?"), "cascade_ms": {}}
    if fp8:
        for name, kv_dtype in (("bf16", DT), ("e4m3", FP8)):
            caches, qs, levels = make_case(*MAIN, kv_dtype=kv_dtype)
            try:
                out["cascade_ms"][name], _, _ = cascade_eager_ms(flashinfer, levels, caches, qs)
            except Exception as e:  # noqa: BLE001 (a reference without this path leaves its column empty)
                print(f"[reference] {name}: {type(e).__name__}: {e}", file=sys.stderr)
                out["cascade_ms"][name] = None
            del caches
            torch.cuda.empty_cache()
        print(json.dumps(out))
        return
    for case in [MAIN] if quick else CASES:
        caches, qs, levels = make_case(*case)
        t, _, _ = cascade_eager_ms(flashinfer, levels, caches, qs)
        out["cascade_ms"]["x".join(map(str, case))] = t
        del caches
        torch.cuda.empty_cache()
    out["merge_ms"] = merge_timings(flashinfer)
    print(json.dumps(out))


def plain_decode(levels, batch, caches, qs, graph: bool, scales=None):
    """Plain batch decode over each request's prefix pages followed by its own pages (in the caches' dtype)."""
    pp = int(levels["indptr"][0][-1])
    up = int(levels["indptr"][1][1])
    shared = levels["indices"][0]
    unique = levels["indices"][1].view(batch, up)
    table = torch.cat([shared.expand(batch, pp), unique], 1).reshape(-1).contiguous()
    indptr = torch.arange(batch + 1, dtype=torch.int32) * (pp + up)
    last = levels["last"][1].cpu()
    ws = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    if graph:
        w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            ws,
            "NHD",
            use_cuda_graph=True,
            paged_kv_indptr_buffer=indptr.cuda(),
            paged_kv_indices_buffer=table.clone(),
            paged_kv_last_page_len_buffer=last.cuda(),
        )
    else:
        w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD")
    w.plan(indptr, table, last, HQ, HKV, D, PS, q_data_type=DT, kv_data_type=caches[0].dtype)
    outs = [torch.empty_like(q) for q in qs]

    def call(i):
        w.run(qs[i], caches[i], out=outs[i], **(scales or {}))

    call(0)
    return call, outs[0]


def cascade_graph_call(levels, batch, caches, qs):
    bufs = [[t.clone() for t in levels[k]] for k in ("qo", "indptr", "indices", "last")]
    ws = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    w = flashinfer.MultiLevelCascadeAttentionWrapper(
        2,
        ws,
        "NHD",
        use_cuda_graph=True,
        qo_indptr_buf_arr=bufs[0],
        paged_kv_indptr_buf_arr=bufs[1],
        paged_kv_indices_buf_arr=bufs[2],
        paged_kv_last_page_len_buf_arr=bufs[3],
    )
    w.plan(levels["qo"], levels["indptr"], levels["indices"], levels["last"], HQ, HKV, D, PS, q_data_type=DT)
    outs = [torch.empty_like(q) for q in qs]

    def call(i):
        w.run(qs[i], caches[i], out=outs[i])

    return call


def bench_case(case, ref_ms):
    batch, prefix, unique = case
    name = "x".join(map(str, case))
    sets = sets_beyond_l2(*case)
    caches, qs, levels = make_case(*case, sets=sets)
    t_casc, w, o_casc = cascade_eager_ms(flashinfer, levels, caches[:1], qs[:1])
    stats = w.plan_stats()
    plain_call, o_plain = plain_decode(levels, batch, caches, qs, graph=False)
    err = (o_casc.float() - o_plain.float()).abs().max().item()
    assert err < 3e-2, f"{name}: cascade and plain decode differ by {err}"
    t_plain = median_ms(plain_call, 1, flush=True)
    host_us = host_us_per_run(w, qs[0], caches[0], torch.empty_like(qs[0]))
    row = {
        "case": name,
        "cascade_ms": t_casc,
        "host_us": host_us,
        "plain_ms": t_plain,
        "path": stats["path"],
        "kernels": stats["kernels"],
        "overlap": stats.get("overlap_levels", False),
        "ref_ms": ref_ms.get(name) if ref_ms else None,
    }
    if case == MAIN:  # each level's alternative kernel: batch prefill (FlashInfer's route) for both
        row["prefill_last_ms"], _, _ = cascade_eager_ms(
            flashinfer, levels, caches[:1], qs[:1], _last_level_decode=False
        )
        row["prefill_shared_ms"], _, _ = cascade_eager_ms(
            flashinfer, levels, caches[:1], qs[:1], _shared_level_wgmma=False
        )
        # the other order of the levels than plan() chose: concurrent if it ran them in turn, else in turn
        row["other_order_ms"], _, _ = cascade_eager_ms(
            flashinfer, levels, caches[:1], qs[:1], _overlap_levels="never" if row["overlap"] else "always"
        )
    row["cascade_graph_ms"] = graph_ms(cascade_graph_call(levels, batch, caches, qs), sets)
    gcall, _ = plain_decode(levels, batch, caches, qs, graph=True)
    row["plain_graph_ms"] = graph_ms(gcall, sets)
    kv_plain = batch * (prefix + unique) * TOKEN_BYTES
    kv_casc = (prefix + batch * unique) * TOKEN_BYTES
    row["bytes_ratio"] = kv_plain / kv_casc
    del caches
    torch.cuda.empty_cache()
    return row


def fp8_main(no_reference: bool) -> None:
    """--fp8: the main case with a bf16 and an e4m3 KV cache."""
    ref = None if no_reference else run_reference(__file__, ["--fp8"])
    ref_ms = ref["cascade_ms"] if ref else {}
    batch, prefix, unique = MAIN
    rows, times = [], {}
    variants = (
        ("bf16", "bf16", DT, None, {}),
        ("e4m3", "e4m3", FP8, FP8_SCALES, {}),
        ("e4m3, shared level on batch prefill", "e4m3", FP8, FP8_SCALES, {"_shared_level_wgmma_fp8": False}),
    )
    for label, name, kv_dtype, scales, attrs in variants:
        sets = sets_beyond_l2(*MAIN)
        caches, qs, levels = make_case(*MAIN, sets=sets, kv_dtype=kv_dtype)
        t_casc, w, o_casc = cascade_eager_ms(flashinfer, levels, caches[:1], qs[:1], scales, **attrs)
        stats = w.plan_stats()
        plain_call, o_plain = plain_decode(levels, batch, caches, qs, graph=False, scales=scales)
        err = (o_casc.float() - o_plain.float()).abs().max().item()
        assert err < 3e-2 * (scales or {}).get("v_scale", 1.0), f"{name}: cascade and plain decode differ by {err}"
        t_plain = median_ms(plain_call, 1, flush=True)
        times.setdefault(name, t_casc)
        fi = ref_ms.get(name)
        token_bytes = 2 * HKV * D * caches[0].element_size()
        rows.append(
            [
                label,
                f"{t_casc * 1e3:.1f}",
                f"{t_plain * 1e3:.1f}",
                f"{t_plain / t_casc:.1f}x",
                "-" if fi is None else f"{fi * 1e3:.1f}",
                "-" if fi is None else f"{fi / t_casc:.2f}x",
                f"{(prefix + batch * unique) * token_bytes / 1e6:.1f}",
                ("+" if not stats.get("overlap_levels") else " || ").join(k for k, _ in stats["kernels"]),
            ]
        )
        print(json.dumps({"kv": label, "cascade_ms": t_casc, "plain_ms": t_plain, "ref_ms": fi, **stats}), flush=True)
        del caches
        torch.cuda.empty_cache()
    text = write_results(
        f"MultiLevelCascadeAttentionWrapper, fp8 (e4m3) vs bf16 KV cache, {batch} req x {prefix} prefix + {unique} own",
        [
            "KV cache",
            "cascade µs",
            "plain decode µs",
            "speedup",
            "FlashInfer µs",
            "vs FlashInfer",
            "cascade KV MB",
            "kernels",
        ],
        rows,
        [
            "bf16 q, 32 q / 8 kv heads, head_dim 128, page_size 16, NHD single-tensor cache, pages scattered; e4m3: the "
            f"same random values rounded, ours run with {FP8_SCALES} (FlashInfer's cascade run() takes no scales)",
            "kernels: the shared level on the Hopper wgmma kernel (shared_prefix_wgmma; fp8: K/V tiles widened in "
            "shared memory) or on batch prefill (fa2, _shared_level_wgmma_fp8=False), the unique level on batch "
            "decode; || = the two levels concurrently",
            f"e4m3 / bf16 cascade time: {times['e4m3'] / times['bf16']:.2f}",
            "FlashInfer: the real MultiLevelCascadeAttentionWrapper "
            f"({ref['version'] if ref else 'not run'}) in its own process, same inputs, same timing",
            "µs: CUDA events around run() (out= given), L2 flushed before each call, median of 100",
        ],
    )
    print(text)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="the 64 x 32768 case only")
    ap.add_argument("--no-reference", action="store_true", help="skip the real FlashInfer columns")
    ap.add_argument("--fp8", action="store_true", help="the 64 x 32768 case with an e4m3 and a bf16 KV cache only")
    ap.add_argument(REFERENCE_FLAG, action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.flashinfer_reference:
        reference_main(args.quick, args.fp8)
        return
    if args.fp8:
        fp8_main(args.no_reference)
        return
    ref = None if args.no_reference else run_reference(__file__, ["--quick"] if args.quick else [])
    ref_ms = ref["cascade_ms"] if ref else {}
    copy_tbs = copy_bandwidth_tbs()
    print(f"copy bandwidth {copy_tbs:.2f} TB/s (read+write)", flush=True)

    rows = []
    for case in [MAIN] if args.quick else CASES:
        r = bench_case(case, ref_ms)
        print(json.dumps(r), flush=True)
        speed = r["plain_ms"] / r["cascade_ms"]
        vs_ref = r["ref_ms"] / r["cascade_ms"] if r["ref_ms"] else None
        t1 = f"≥12x: {'met' if speed >= 12 else 'MISSED'}" if case == MAIN else ""
        t2 = (
            ""
            if case != MAIN
            else ("no reference" if vs_ref is None else f"≥1.05x: {'met' if vs_ref >= 1.05 else 'MISSED'}")
        )
        rows.append(
            [
                f"{case[0]} req x {case[1]} prefix + {case[2]} own",
                f"{r['cascade_ms'] * 1e3:.1f}",
                f"{r['plain_ms'] * 1e3:.1f}",
                f"{speed:.1f}x",
                t1,
                "-" if r["ref_ms"] is None else f"{r['ref_ms'] * 1e3:.1f}",
                "-" if vs_ref is None else f"{vs_ref:.2f}x",
                t2,
                f"{r['cascade_graph_ms'] * 1e3:.1f} / {r['plain_graph_ms'] * 1e3:.1f}",
                f"{r['bytes_ratio']:.1f}x",
                f"{r['host_us']:.0f}",
                ("+" if not r["overlap"] else " || ").join(k for k, _ in r["kernels"]),
                ""
                if "prefill_last_ms" not in r
                else f"{r['prefill_shared_ms'] * 1e3:.1f} / {r['prefill_last_ms'] * 1e3:.1f} / "
                f"{r['other_order_ms'] * 1e3:.1f}",
            ]
        )

    # Short prefix: plan() falls back to plain decode.
    caches, qs, levels = make_case(*SHORT)
    t_short, w, _ = cascade_eager_ms(flashinfer, levels, caches, qs)
    st = w.plan_stats()
    plain_call, _ = plain_decode(levels, SHORT[0], caches, qs, graph=False)
    t_plain_short = median_ms(plain_call, 1, flush=True)
    short_ratio = t_plain_short / t_short
    del caches
    torch.cuda.empty_cache()

    merge = merge_timings(flashinfer)
    ref_merge = ref["merge_ms"] if ref else {}
    n, h, d = MERGE_SHAPE
    v_bytes, s_bytes = n * h * d * 2, n * h * 4
    merge_bytes = {
        "merge_state": 3 * (v_bytes + s_bytes),
        "merge_state_in_place": 3 * (v_bytes + s_bytes),
        "merge_states_8": 9 * v_bytes + 9 * s_bytes,
    }
    mrows = []
    for op, ms in merge.items():
        pct = 100 * merge_bytes[op] / (ms * 1e-3) / 1e12 / copy_tbs
        rms = ref_merge.get(op)
        mrows.append(
            [
                op,
                f"{ms * 1e3:.1f}",
                f"{merge_bytes[op] / (ms * 1e-3) / 1e12:.2f}",
                f"{pct:.1f}%",
                f"≥80%: {'met' if pct >= 80 else 'MISSED'}",
                "-" if rms is None else f"{rms * 1e3:.1f}",
                "-" if rms is None else f"{rms / ms:.2f}x",
            ]
        )

    notes = [
        f"measured ceiling: device-to-device copy {copy_tbs:.2f} TB/s (read+write)",
        "bf16, 32 q / 8 kv heads, head_dim 128, page_size 16, NHD single-tensor cache, pages scattered (random "
        "permutation); level 0 = one request of all queries over the prefix pages, level 1 = each request's pages",
        "µs: CUDA events around run() (out= given), L2 flushed before each call, median of 100; plain = "
        "BatchDecodeWithPagedKVCacheWrapper over each request's prefix + own pages",
        "host µs/run: wall time of run() on the host (50 calls, no sync between); eager µs near it are host-bound",
        "graph: CUDA-graph replays of the use_cuda_graph wrappers (the cascade's prefill level then runs 64-row "
        "query tiles, a persistent grid)",
        "FlashInfer: the real MultiLevelCascadeAttentionWrapper "
        f"({ref['version'] if ref else 'not run'}) in its own process, same inputs, same timing",
        f"short prefix {SHORT[1]} tokens x {SHORT[0]} requests: plan() path {st['path']!r} ({st['reason']}); "
        f"{t_short * 1e3:.1f} µs vs plain decode {t_plain_short * 1e3:.1f} µs = {short_ratio:.2f}x "
        f"(target: no slower: {'met' if short_ratio >= 0.97 else 'MISSED'})",
        "kernels: the shared level on the Hopper wgmma kernel (shared_prefix_wgmma) or batch prefill, the unique "
        "level on batch decode; alternatives (main case): the shared level on batch prefill "
        "(_shared_level_wgmma=False) / the unique level on batch prefill (_last_level_decode=False, FlashInfer's "
        "route), each with the other level as chosen; other order: the levels in turn if plan() ran them "
        "concurrently (_overlap_levels='never'), else concurrently (_overlap_levels='always': the unique level on a "
        "side stream; kernels joined by ||)",
    ]
    text = write_results(
        "MultiLevelCascadeAttentionWrapper (shared-prefix decode), bf16, d128, 32q/8kv, page_size 16",
        [
            "batch",
            "cascade µs",
            "plain decode µs",
            "speedup",
            "target",
            "FlashInfer µs",
            "vs FlashInfer",
            "target",
            "graph µs cascade / plain",
            "KV bytes plain/cascade",
            "host µs/run",
            "kernels",
            "alt. µs: shared / unique on prefill / other order of levels",
        ],
        rows,
        notes,
    )
    print(text)
    text = write_results(
        f"merge_state / merge_states, bf16, {n} x {h} x {d}",
        ["op", "µs", "TB/s", "% of copy BW", "target", "FlashInfer µs", "FlashInfer / ours"],
        mrows,
        [
            f"measured ceiling: device-to-device copy {copy_tbs:.2f} TB/s (read+write)",
            "bytes: every v and lse read once and the output written once (merge_states: 8 states in, 1 out)",
            "CUDA events, L2 flushed before each call, median of 100",
        ],
    )
    print(text)


if __name__ == "__main__":
    main()
