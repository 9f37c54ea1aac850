"""Development aid: where the host time of the hot calls goes (single decode eager call, paged batch decode
plan() and run()), as cProfile's top functions by own time, plus the plain per-call time. Prints; records
nothing."""

from __future__ import annotations

import cProfile
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import flashinfer  # noqa: E402


def per_call_us(fn, n: int = 2000) -> float:
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n * 1e6


def profile(name: str, fn, n: int = 2000) -> None:
    print(f"== {name}: {per_call_us(fn):.1f} us/call", flush=True)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(n):
        fn()
    prof.disable()
    torch.cuda.synchronize()
    pstats.Stats(prof).sort_stats("tottime").print_stats(14)


def main() -> None:
    q = torch.randn(32, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(512, 8, 128, device="cuda", dtype=torch.bfloat16)
    out = torch.empty_like(q)
    profile("single_decode_with_kv_cache (out=)", lambda: flashinfer.single_decode_with_kv_cache(q, k, k, out=out))

    batch, pages = 256, 4096 // 16
    indptr = torch.arange(batch + 1, dtype=torch.int32) * pages
    last = torch.full((batch,), 16, dtype=torch.int32)
    indices = torch.randperm(batch * pages, dtype=torch.int32, device="cuda")
    w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(torch.empty(256 << 20, dtype=torch.uint8, device="cuda"))

    def plan():
        w.plan(indptr, indices, last, 32, 8, 128, 16, q_data_type=torch.bfloat16)

    def synced_plan():  # as the benchmark measures it: nothing of earlier plans in flight
        torch.cuda.synchronize()
        t = time.perf_counter()
        plan()
        return time.perf_counter() - t

    plan()
    ts = sorted(synced_plan() for _ in range(500))
    print(f"== plan() after a sync: median {ts[250] * 1e6:.1f} us, p10 {ts[50] * 1e6:.1f}, p90 {ts[450] * 1e6:.1f}")
    profile("plan() back to back", plan, 1000)
    cache = torch.randn(batch * pages, 2, 16, 8, 128, device="cuda", dtype=torch.bfloat16)
    qb = torch.randn(batch, 32, 128, device="cuda", dtype=torch.bfloat16)
    ob = torch.empty_like(qb)
    plan()
    profile("run(out=)", lambda: w.run(qb, cache, out=ob), 300)


if __name__ == "__main__":
    main()
