"""Development aid (issue 14): device time of compile-time launch-shape variants of rmsnorm, fused_add_rmsnorm,
silu_and_mul and RoPE (apply_rope_with_cos_sin_cache_inplace) at bench_ops.py's shapes and with its timing (CUDA
events, L2 flushed before each call), so that one GPU run decides which variant to keep. Each variant is its
module built with -D flags (a knob added for the trial as a #define default at the top of
templates/include/flashinfer/ops/{norm,activation,rope}.cuh); every variant's output is checked against plain
PyTorch first. Prints tables (µs, best of the rounds' medians; the fastest variant of each row marked
*), then the real FlashInfer's times for the same cases (bench_ops.py's reference mode, its own process) unless
--no-reference. Records nothing.

The knobs of earlier trials were decided on an H200 and removed with their losing settings (the headers' comments
give the numbers); the variant tables below hold the defaults (and RoPE's FI_ROPE_FORMS alternatives, kept for the
tests of the generic form), so the probe times them against FlashInfer. To try a new setting, add its knob to the
header and a ``"name": ("-DKNOB=value",)`` entry here.

    python benchmarks/probe_ops.py [--ops norm,act,rope] [--rounds 3] [--no-reference]
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Tuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import bench_ops  # noqa: E402
import flashinfer  # noqa: E402
import flashinfer.activation as activation  # noqa: E402
import flashinfer.norm as norm  # noqa: E402
import flashinfer.rope as rope  # noqa: E402
from common import copy_bandwidth_tbs, median_ms, run_reference  # noqa: E402
from flashinfer import jit  # noqa: E402

TOKENS = (1, 16, 256, 4096, 32768)
DTYPE = torch.bfloat16

# variant name -> -D flags; the first of each family is the default build (no flags).
NORM_VARIANTS: Dict[str, Tuple[str, ...]] = {"default": ()}
ACT_VARIANTS: Dict[str, Tuple[str, ...]] = {"default": ()}
# FI_ROPE_FORMS (templates/include/flashinfer/ops/rope.cuh): 2 (the build) compile-time forms for one and several heads
# a thread, 1 for one head a thread only, 0 the generic form for every call.
ROPE_VARIANTS: Dict[str, Tuple[str, ...]] = {
    "forms2": (),
    "forms1": ("-DFI_ROPE_FORMS=1",),
    "forms0": ("-DFI_ROPE_FORMS=0",),
}


def variant_class(base: type, flags: Tuple[str, ...]) -> type:
    """A subclass of the spec ``base`` whose build adds ``flags`` (part of the cache key: its own module)."""

    @dataclasses.dataclass(frozen=True)
    class Variant(base):
        def extra_cuda_cflags(self):
            return tuple(base.extra_cuda_cflags(self)) + flags

    Variant.__name__ = f"{base.__name__}Variant"
    return Variant


class Family:
    """One op family's variants: builds them, and installs one as the module the public API calls."""

    def __init__(self, pymod, spec_attr: str, variants: Dict[str, Tuple[str, ...]]) -> None:
        self.pymod, self.spec_attr, self.variants = pymod, spec_attr, variants
        self.base = getattr(pymod, spec_attr)
        self.classes = {name: variant_class(self.base, flags) for name, flags in variants.items()}
        self.loaded: Dict[str, object] = {}

    def specs(self) -> List[object]:
        return [cls(dtype="bf16") for cls in self.classes.values()]

    def _construct(self, name: str) -> object:
        """The family's loaded-module object (``_NormModule`` etc.) of variant ``name``, built through the family's
        own constructor with the spec class swapped."""
        setattr(self.pymod, self.spec_attr, self.classes[name])
        try:
            if self.pymod is norm:
                return norm._NormModule("bf16")
            if self.pymod is activation:
                return activation._ActModule("bf16")
            return rope._RopeModule("bf16")
        finally:
            setattr(self.pymod, self.spec_attr, self.base)

    def install(self, name: str) -> None:
        obj = self.loaded.get(name)
        if obj is None:
            obj = self.loaded[name] = self._construct(name)
        if self.pymod is rope:
            rope._modules["bf16"] = obj
        else:
            self.pymod._MODULES[DTYPE] = obj


# ------------------------------------------------------------------------------------------- correctness


def _close(got: torch.Tensor, want: torch.Tensor) -> bool:
    return bool(torch.allclose(got.float(), want.float(), atol=3e-2, rtol=3e-2))


def check(op: str, size: int, tokens: int) -> bool:
    """The installed variant's result on fresh inputs against plain PyTorch (bench_ops' baselines)."""
    if op in ("rmsnorm", "fused_add_rmsnorm"):
        x = torch.randn(tokens, size, device="cuda", dtype=DTYPE)
        w = torch.randn(size, device="cuda", dtype=DTYPE)
        if op == "rmsnorm":
            return _close(flashinfer.norm.rmsnorm(x, w), bench_ops._torch_rmsnorm(x, w))
        r = torch.randn_like(x)
        want_out, want_res = bench_ops._torch_fused_add_rmsnorm(x, r, w)
        flashinfer.norm.fused_add_rmsnorm(x, r, w)
        return _close(x, want_out) and _close(r, want_res)
    if op == "silu_and_mul":
        x = torch.randn(tokens, 2 * size, device="cuda", dtype=DTYPE)
        return _close(flashinfer.activation.silu_and_mul(x), bench_ops._torch_silu_and_mul(x))
    hq, hk, d = bench_ops.ROPE_HEADS
    cache = bench_ops._cos_sin_cache(8192, d)
    q = torch.randn(tokens, hq * d, device="cuda", dtype=DTYPE)
    k = torch.randn(tokens, hk * d, device="cuda", dtype=DTYPE)
    pos = torch.randint(0, 8192, (tokens,), device="cuda", dtype=torch.int64)
    want_q, want_k = bench_ops._torch_rope(pos, q, k, cache, d)
    flashinfer.rope.apply_rope_with_cos_sin_cache_inplace(pos, q, k, d, cache, True)
    return _close(q, want_q) and _close(k, want_k)


# ------------------------------------------------------------------------------------------------- timing

OPS = {
    "norm": (("rmsnorm", (4096, 8192)), ("fused_add_rmsnorm", (4096, 8192))),
    "act": (("silu_and_mul", (bench_ops.SILU_D,)),),
    "rope": (("rope_cos_sin_cache_inplace", (bench_ops.ROPE_HEADS[2],)),),
}


Timings = Dict[Tuple[str, int, int], Dict[str, float]]  # (op, size, tokens) -> variant -> best ms


def time_family(fam: Family, ops, rounds: int) -> Tuple[Timings, Dict[Tuple[str, int, int], int]]:
    """Checks every variant, then times every case (inputs made once per case; the variants interleaved
    within each round). Returns the best median ms per case and variant, and the bytes each case moves."""
    names = list(fam.variants)
    # Every variant on shapes of every launch regime (257 rows: an odd count past the SM count in the one-chunk
    # shape, i.e. a last row pair of one row; 1001 rows: a partial last warp-per-row CTA) before timing.
    bad = []
    for name in names:
        fam.install(name)
        for op, sizes in ops:
            for size in sizes:
                for t in (1, 256, 257, 1001, 4096):
                    if not check(op, size, t):
                        bad.append(f"{name}: {op}/{size}/{t}")
    if bad:
        print("MISMATCH against PyTorch (these variants are wrong):", *bad, sep="\n  ")
    timings: Timings = {}
    moved_of = {}
    for op, sizes in ops:
        for size in sizes:
            for t in TOKENS:
                fn, n, moved = bench_ops.make_case(flashinfer, op, size, t)
                best: Dict[str, float] = {}
                for _ in range(rounds):
                    for name in names:
                        fam.install(name)
                        ms = median_ms(fn, n, warmup=5, iters=60, flush=True)
                        best[name] = min(best.get(name, ms), ms)
                del fn
                torch.cuda.empty_cache()
                timings[(op, size, t)] = best
                moved_of[(op, size, t)] = moved
    fam.install(names[0])
    return timings, moved_of


def print_table(title: str, header: List[str], rows: List[List[str]]) -> None:
    print(f"\n### {title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        print("| " + " | ".join(r) + " |")
    sys.stdout.flush()


def variant_rows(timings: Timings, moved_of, copy_tbs: float, fi: Dict[str, float]) -> List[List[str]]:
    """One row per case: each variant's µs and % of copy bandwidth (the fastest marked *); with FlashInfer's
    times (``fi``: bench_ops key -> ms), FlashInfer's µs and each variant's speed-up over it."""
    rows = []
    for (op, size, t), best in timings.items():
        fastest = min(best, key=best.get)
        ref = fi.get(bench_ops.key(op, size, t))
        row = [op, str(size), str(t)]
        for name, ms in best.items():
            bw = 100 * moved_of[(op, size, t)] / (ms * 1e-3) / 1e12 / copy_tbs
            vs = f", {ref / ms:.2f}x" if ref else ""
            row.append(f"{ms * 1e3:.2f}{'*' if name == fastest else ''} ({bw:.0f}%{vs})")
        if fi:
            row.append(f"{ref * 1e3:.2f}" if ref else "-")
        rows.append(row)
    return rows


def summary(timings: Timings) -> List[str]:
    """Per variant: the geometric mean of (its time / the default's) over all cases, over latency-bound cases
    (up to 256 tokens) and over bandwidth-bound ones (4096 tokens and up); below 1 is faster than the default."""
    names = list(next(iter(timings.values())))
    lines = []
    for name in names:
        parts = []
        for label, keep in (
            ("all", lambda t: True),
            ("<=256 tok", lambda t: t <= 256),
            (">=4096 tok", lambda t: t >= 4096),
        ):
            ratios = [best[name] / best[names[0]] for (_, _, t), best in timings.items() if keep(t)]
            gm = math.exp(sum(math.log(r) for r in ratios) / len(ratios)) if ratios else float("nan")
            parts.append(f"{label} {gm:.3f}")
        lines.append(f"{name}: " + ", ".join(parts))
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ops", default="norm,act,rope", help="comma-separated subset of norm, act, rope")
    ap.add_argument("--rounds", type=int, default=3, help="timing rounds (best median kept)")
    ap.add_argument("--no-reference", action="store_true", help="skip the real FlashInfer's times")
    ap.add_argument("--build-only", action="store_true", help="build and load every variant, time nothing")
    args = ap.parse_args()
    chosen = [o.strip() for o in args.ops.split(",") if o.strip()]
    families = {
        "norm": Family(norm, "NormSpec", NORM_VARIANTS),
        "act": Family(activation, "ActivationSpec", ACT_VARIANTS),
        "rope": Family(rope, "RopeSpec", ROPE_VARIANTS),
    }
    t0 = time.perf_counter()
    specs = [s for o in chosen for s in families[o].specs()]
    with ThreadPoolExecutor(min(len(specs), 16)) as pool:
        reports = list(pool.map(jit.ensure_built, specs))
    for spec, r in zip(specs, reports):
        log = Path(r.log_path).read_text() if getattr(r, "log_path", None) else ""
        spills = [ln.strip() for ln in log.splitlines() if "spill" in ln and not ln.strip().startswith("0 bytes")]
        print(type(spec).__name__, spec.extra_cuda_cflags(), r.status, spills or "no spills")
    print(f"built {len(specs)} modules in {time.perf_counter() - t0:.0f} s")
    if args.build_only:
        for o in chosen:
            for name in families[o].variants:
                families[o].install(name)
        print("built and loaded every variant (no timing)")
        return
    copy_tbs = copy_bandwidth_tbs()
    print(f"copy bandwidth {copy_tbs:.2f} TB/s; cells: best median µs over {args.rounds} rounds (% copy BW), * fastest")
    results = {}
    for o in chosen:
        fam = families[o]
        results[o] = time_family(fam, OPS[o], args.rounds)
        print_table(f"{o} variants", ["op", "size", "tokens", *fam.variants], variant_rows(*results[o], copy_tbs, {}))
        print(
            f"\n{o}: geometric mean of time / default's ({list(fam.variants)[0]}):", *summary(results[o][0]), sep="\n  "
        )
    print(f"\nours: {time.perf_counter() - t0:.0f} s")
    if args.no_reference:
        return
    ref = run_reference(str(Path(bench_ops.__file__).resolve()), [])
    fi = {k: v["ms"] for k, v in (ref or {}).get("cases", {}).items()}
    if fi:
        print(
            f"\nFlashInfer {ref.get('version', '?')} (bench_ops.py reference mode, its own process); cells: µs (% copy BW, "
            f"FlashInfer time / ours)"
        )
        for o in chosen:
            fam = families[o]
            rows = variant_rows(*results[o], copy_tbs, fi)
            print_table(f"{o} variants vs FlashInfer", ["op", "size", "tokens", *fam.variants, "FlashInfer µs"], rows)
    print(f"total: {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
