"""Per-token op benchmark (issue 14): rmsnorm and fused_add_rmsnorm at hidden 4096/8192, silu_and_mul at
intermediate 14336, RoPE with a cos/sin cache in place (q 32 heads, k 8 heads, head_dim 128), for 1, 16, 256, 4096
and 32768 tokens, bf16. Columns: ours, the real FlashInfer (same script in its own process), torch.compile'd
PyTorch at 4096 tokens, our % of the measured copy bandwidth, host microseconds per call. Appends a dated table to
benchmarks/RESULTS.md.

    python benchmarks/bench_ops.py [--quick] [--no-reference] [--no-compile]

Device times: CUDA events around each call, L2 flushed before it, inputs rotated over more than L2 (common.py).
Host time: wall time of 200 back-to-back eager calls without synchronizing (the GPU queue never fills), per call.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REFERENCE_FLAG, copy_bandwidth_tbs, median_ms, run_reference, write_results  # noqa: E402

TOKENS = (1, 16, 256, 4096, 32768)
QUICK_TOKENS = (1, 256, 4096)
COMPILE_TOKENS = 4096
DTYPE = torch.bfloat16
ROPE_HEADS = (32, 8, 128)  # q heads, k heads, head_dim
ROPE_MAX_POS = 131072
SILU_D = 14336


def cases(tokens: Tuple[int, ...]) -> List[Tuple[str, int, int]]:
    """(op, size, tokens): size is the hidden size (norms), d (silu) or head_dim (rope)."""
    out = []
    for op, sizes in (
        ("rmsnorm", (4096, 8192)),
        ("fused_add_rmsnorm", (4096, 8192)),
        ("silu_and_mul", (SILU_D,)),
        ("rope_cos_sin_cache_inplace", (ROPE_HEADS[2],)),
    ):
        for size in sizes:
            for t in tokens:
                out.append((op, size, t))
    return out


def key(op: str, size: int, tokens: int) -> str:
    return f"{op}/{size}/{tokens}"


def _sets(bytes_per_set: int) -> int:
    """Input sets so that consecutive calls never share L2-resident data (with flush=True this is belt and
    braces), capped by memory."""
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 64 << 20) or (64 << 20)
    return max(1, min(16, math.ceil(4 * l2 / max(bytes_per_set, 1))))


def make_case(fi, op: str, size: int, tokens: int) -> Tuple[Callable[[int], object], int, int]:
    """Inputs and a call of the library `fi` (this project's flashinfer or the real one: same API). Returns
    (fn(i), number of input sets, bytes the op must move)."""
    dev = "cuda"
    if op in ("rmsnorm", "fused_add_rmsnorm"):
        per = tokens * size * 2
        n = _sets((4 if op == "fused_add_rmsnorm" else 2) * per)
        w = torch.randn(size, device=dev, dtype=DTYPE)
        xs = [torch.randn(tokens, size, device=dev, dtype=DTYPE) for _ in range(n)]
        if op == "rmsnorm":
            outs = [torch.empty_like(x) for x in xs]
            return (lambda i: fi.norm.rmsnorm(xs[i], w, out=outs[i])), n, 2 * per + size * 2
        rs = [torch.randn_like(x) for x in xs]
        return (lambda i: fi.norm.fused_add_rmsnorm(xs[i], rs[i], w)), n, 4 * per + size * 2
    if op == "silu_and_mul":
        per = tokens * size * 2
        n = _sets(3 * per)
        xs = [torch.randn(tokens, 2 * size, device=dev, dtype=DTYPE) for _ in range(n)]
        outs = [torch.empty(tokens, size, device=dev, dtype=DTYPE) for _ in range(n)]
        return (lambda i: fi.activation.silu_and_mul(xs[i], out=outs[i])), n, 3 * per
    hq, hk, d = ROPE_HEADS
    cache = _cos_sin_cache(ROPE_MAX_POS, d)
    qk = tokens * (hq + hk) * d * 2
    n = _sets(2 * qk)
    qs = [torch.randn(tokens, hq * d, device=dev, dtype=DTYPE) for _ in range(n)]
    ks = [torch.randn(tokens, hk * d, device=dev, dtype=DTYPE) for _ in range(n)]
    # A prefill's positions (consecutive); the cos/sin rows they read are part of the traffic.
    pos = [torch.arange(tokens, device=dev, dtype=torch.int64) % ROPE_MAX_POS for _ in range(n)]
    moved = 2 * qk + tokens * 8 + min(tokens, ROPE_MAX_POS) * d * 4
    return (lambda i: fi.rope.apply_rope_with_cos_sin_cache_inplace(pos[i], qs[i], ks[i], d, cache, True)), n, moved


def _cos_sin_cache(max_pos: int, rotary_dim: int) -> torch.Tensor:
    inv_freq = 1.0 / (1e4 ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32, device="cuda") / rotary_dim))
    freqs = torch.outer(torch.arange(max_pos, dtype=torch.float32, device="cuda"), inv_freq)
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1)


def host_us(fn: Callable[[int], object], n_sets: int, calls: int = 200) -> float:
    for i in range(10):
        fn(i % n_sets)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for i in range(calls):
        fn(i % n_sets)
    elapsed = time.perf_counter() - t
    torch.cuda.synchronize()
    return elapsed / calls * 1e6


def copy_us(moved: int) -> float:
    """Device time of a device-to-device copy of moved / 2 bytes (moved read + written), timed as the ops are:
    the ceiling for an op of this size, launch and ramp included."""
    half = max(moved // 2 // 16, 1)
    n = _sets(2 * 16 * half)
    srcs = [torch.empty(half, 4, dtype=torch.int32, device="cuda").random_() for _ in range(n)]
    dsts = [torch.empty_like(x) for x in srcs]
    return median_ms(lambda i: dsts[i].copy_(srcs[i]), n, warmup=10, iters=60, flush=True) * 1e3


def time_library(fi, tokens: Tuple[int, ...]) -> Dict[str, Dict[str, float]]:
    res = {}
    for op, size, t in cases(tokens):
        fn, n, moved = make_case(fi, op, size, t)
        ms = median_ms(fn, n, warmup=10, iters=60, flush=True)
        res[key(op, size, t)] = {"ms": ms, "bytes": moved, "host_us": host_us(fn, n)}
        del fn
        torch.cuda.empty_cache()
    return res


# ------------------------------------------------------------------------------------ torch.compile baselines


def _torch_rmsnorm(x, w, eps: float = 1e-6):
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * w.float()).to(x.dtype)


def _torch_fused_add_rmsnorm(x, r, w, eps: float = 1e-6):
    s = x.float() + r.float()
    return (s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + eps) * w.float()).to(x.dtype), s.to(x.dtype)


def _torch_silu_and_mul(x):
    d = x.shape[-1] // 2
    return (torch.nn.functional.silu(x[..., :d].float()) * x[..., d:].float()).to(x.dtype)


def _torch_rope(positions, query, key, cache, head_size: int = 128):
    """vLLM's forward_native (NeoX), returning the rotated query and key."""
    cos, sin = cache.index_select(0, positions).chunk(2, dim=-1)
    cos, sin = cos[:, None, :], sin[:, None, :]

    def rot(x):
        x = x.view(x.shape[0], -1, head_size).float()
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(1).to(query.dtype)

    return rot(query), rot(key)


def time_compiled(op: str, size: int, tokens: int) -> float:
    dev = "cuda"
    if op in ("rmsnorm", "fused_add_rmsnorm"):
        n = _sets((4 if op == "fused_add_rmsnorm" else 2) * tokens * size * 2)
        w = torch.randn(size, device=dev, dtype=DTYPE)
        xs = [torch.randn(tokens, size, device=dev, dtype=DTYPE) for _ in range(n)]
        if op == "rmsnorm":
            f = torch.compile(_torch_rmsnorm, dynamic=False)
            return median_ms(lambda i: f(xs[i], w), n, warmup=5, iters=60, flush=True)
        rs = [torch.randn_like(x) for x in xs]
        f = torch.compile(_torch_fused_add_rmsnorm, dynamic=False)
        return median_ms(lambda i: f(xs[i], rs[i], w), n, warmup=5, iters=60, flush=True)
    if op == "silu_and_mul":
        n = _sets(3 * tokens * size * 2)
        xs = [torch.randn(tokens, 2 * size, device=dev, dtype=DTYPE) for _ in range(n)]
        f = torch.compile(_torch_silu_and_mul, dynamic=False)
        return median_ms(lambda i: f(xs[i]), n, warmup=5, iters=60, flush=True)
    hq, hk, d = ROPE_HEADS
    cache = _cos_sin_cache(ROPE_MAX_POS, d)
    n = _sets(2 * tokens * (hq + hk) * d * 2)
    qs = [torch.randn(tokens, hq * d, device=dev, dtype=DTYPE) for _ in range(n)]
    ks = [torch.randn(tokens, hk * d, device=dev, dtype=DTYPE) for _ in range(n)]
    pos = torch.arange(tokens, device=dev, dtype=torch.int64)
    f = torch.compile(_torch_rope, dynamic=False)
    return median_ms(lambda i: f(pos, qs[i], ks[i], cache), n, warmup=5, iters=60, flush=True)


# ------------------------------------------------------------------------------------------------- main


def compile_ceiling_notes(compiled: Dict[str, float], ours: Dict[str, Dict[str, float]], copy_tbs: float) -> List[str]:
    """Per compiled case: the most any kernel could gain over torch.compile (moving the op's bytes at the copy
    bandwidth). Where torch.compile already runs near the copy bandwidth, a 2x speed-up over it is not physically
    reachable, and the table's ratio is the honest one."""
    notes = []
    for k, ms in sorted(compiled.items()):
        floor_ms = ours[k]["bytes"] / (copy_tbs * 1e12) * 1e3
        ceiling = ms / floor_ms
        verdict = (
            "2x over it is physically unreachable for a memory-bound kernel"
            if ceiling < 2
            else "2x over it is within reach"
        )
        notes.append(
            f"torch.compile ceiling {k}: it runs at {100 / ceiling:.0f}% of copy bandwidth, so a kernel at "
            f"100% would be {ceiling:.2f}x faster; {verdict}"
        )
    return notes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help=f"tokens {QUICK_TOKENS} only")
    ap.add_argument("--no-reference", action="store_true", help="skip the real FlashInfer")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines")
    ap.add_argument(
        REFERENCE_FLAG,
        dest="reference",
        action="store_true",
        help="(internal) time the real FlashInfer on PYTHONPATH and print one JSON line",
    )
    args = ap.parse_args()
    tokens = QUICK_TOKENS if args.quick else TOKENS

    if args.reference:
        import flashinfer  # the real one: run_reference puts only its site directory and benchmarks/ on the path
        import flashinfer.activation  # noqa: F401
        import flashinfer.norm  # noqa: F401
        import flashinfer.rope  # noqa: F401

        print(
            json.dumps({"version": getattr(flashinfer, "__version__", "?"), "cases": time_library(flashinfer, tokens)})
        )
        return

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import flashinfer

    copy_tbs = copy_bandwidth_tbs()
    t0 = time.perf_counter()
    ours = time_library(flashinfer, tokens)
    t_ours = time.perf_counter() - t0
    compiled: Dict[str, float] = {}
    if not args.no_compile:
        for op, size, t in cases(tokens):
            if t == COMPILE_TOKENS and size != 8192:  # one shape per op keeps the compile time down
                compiled[key(op, size, t)] = time_compiled(op, size, t)
    t_compile = time.perf_counter() - t0 - t_ours
    cp = {key(op, size, t): copy_us(ours[key(op, size, t)]["bytes"]) for op, size, t in cases(tokens)}
    ref = None if args.no_reference else run_reference(str(Path(__file__).resolve()), ["--quick"] if args.quick else [])
    ref_cases = (ref or {}).get("cases", {})

    header = [
        "op",
        "size",
        "tokens",
        "ours µs",
        "FlashInfer µs",
        "ours vs FI",
        "torch.compile µs",
        "ours vs compile",
        "% copy BW",
        "same-size copy µs",
        "% of same-size copy",
        "host µs ours",
        "host µs FI",
    ]
    rows = []
    for op, size, t in cases(tokens):
        k = key(op, size, t)
        o = ours[k]
        us = o["ms"] * 1e3
        bw = o["bytes"] / (o["ms"] * 1e-3) / 1e12
        r = ref_cases.get(k)
        c = compiled.get(k)
        rows.append(
            [
                op,
                size,
                t,
                f"{us:.2f}",
                f"{r['ms'] * 1e3:.2f}" if r else "-",
                f"{r['ms'] / o['ms']:.2f}x" if r else "-",
                f"{c * 1e3:.2f}" if c else "-",
                f"{c / o['ms']:.2f}x" if c else "-",
                f"{100 * bw / copy_tbs:.1f}%",
                f"{cp[k]:.2f}",
                f"{100 * cp[k] / us:.1f}%",
                f"{o['host_us']:.1f}",
                f"{r['host_us']:.1f}" if r else "-",
            ]
        )
    notes = [
        f"copy bandwidth (device-to-device copy, read + write): {copy_tbs:.2f} TB/s",
        "bf16; norms: weight (hidden) and eps 1e-6, out= given (rmsnorm), in place (fused add: input and residual "
        "read and written); silu_and_mul: [tokens, 2 x 14336] -> [tokens, 14336] with out=; RoPE: "
        "apply_rope_with_cos_sin_cache_inplace, q [tokens, 32 x 128], k [tokens, 8 x 128], NeoX, int64 positions "
        f"0..tokens-1, float32 cache of {ROPE_MAX_POS} rows",
        "bytes counted: everything the op must read and write once (norm weight; RoPE positions and the cos/sin "
        "rows read); % copy BW = bytes / time / copy bandwidth (of a 2 GiB copy); same-size copy: a "
        "device-to-device copy of the same bytes (half read, half written) timed the same way, launch and ramp "
        "included; % of same-size copy = its time / ours",
        "device times: median of 60 calls, CUDA events, L2 flushed before each call, inputs rotated beyond L2; "
        "host µs: wall time per eager call over 200 back-to-back calls (no sync inside)",
        "torch.compile: the same op in plain PyTorch (fp32 math, bf16 out; RoPE = vLLM's forward_native returning "
        "new q/k), torch.compile(dynamic=False), default mode, at 4096 tokens (norms at hidden 4096)",
        *compile_ceiling_notes(compiled, ours, copy_tbs),
        f"FlashInfer reference: {ref.get('version', '?') if ref else 'not run'} (its own process, same cases and helpers)",
        f"wall: ours {t_ours:.0f} s, torch.compile {t_compile:.0f} s",
    ]
    print(write_results("Per-token ops (bench_ops.py)", header, rows, notes))


if __name__ == "__main__":
    main()
