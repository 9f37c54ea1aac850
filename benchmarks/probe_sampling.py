"""Development probe (issue 15): the top-k/top-p row transforms through row_select_kernel, its compile-time variants
(the FI_SEL_* knobs at the top of the row-select section of templates/include/flashinfer/ops/sampling.cuh, each
built as its own module) and the previous radix kernel (row_op_kernel), in one process: the variants' builds (in
parallel) and then about a minute on an H200.

    python benchmarks/probe_sampling.py [--iters N] [--variants default,base,...]

For top_p_renorm_probs (0.9), top_k_renorm_probs (50), top_k_mask_logits (50) and the sampler
top_k_top_p_sampling_from_logits (50, 0.9; its share of bandwidth counts a write it does not do) at batch 1, 32, 128,
256 and vocab 128256, 256000 (float32, logits ~ 2 N(0, 1), probabilities their softmax), prints each kernel's median time (CUDA
events around single calls, L2 flushed before each, inputs rotated beyond the L2: benchmarks/common.py) and its
share of the copy bandwidth (bytes = the rows read once and written once), then checks every variant's output
against the radix kernel's (bit for bit) and the default's against a PyTorch reference (masks exactly, renormalized
values to 2e-6), printing MISMATCH lines for any difference. Appends nothing to RESULTS.md.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, Tuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import flashinfer  # noqa: E402
from common import copy_bandwidth_tbs, median_ms  # noqa: E402
from flashinfer import sampling  # noqa: E402

VOCABS = (128256, 256000)
BATCHES = (1, 32, 128, 256)
TOP_K, TOP_P = 50, 0.9
OPS = ("top_p_renorm_probs", "top_k_renorm_probs", "top_k_mask_logits", "top_k_top_p_sampling_from_logits")
SAMPLER = "top_k_top_p_sampling_from_logits"  # (its top-k filter is the streamed route's; no radix form)

# row_select_kernel variant -> -D flags; "default" is the module the library builds (no flags), "base" the kernel
# before the FI_SEL_* changes (one branch per histogram element, a division behind a branch per kept element).
VARIANTS: Dict[str, Tuple[str, ...]] = {
    "default": (),
    "base": (
        "-DFI_SEL_FLAT_HISTOGRAM=0",
        "-DFI_SEL_DIV=0",
        "-DFI_SEL_MAX_BITS=0",
        "-DFI_SEL_MASK_CMP=0",
        "-DFI_SEL_MASK_KEY=0",
    ),
    "no_flat": ("-DFI_SEL_FLAT_HISTOGRAM=0",),
    "div0": ("-DFI_SEL_DIV=0",),
    "max_keys": ("-DFI_SEL_MAX_BITS=0",),
    "mask_keys": ("-DFI_SEL_MASK_CMP=0", "-DFI_SEL_MASK_KEY=0"),
    # 16 CTAs a row (32 KB slices) and three CTAs an SM (80 registers): 24 warps an SM instead of 16
    "c16_3": ("-DFI_SEL_MIN_CLUSTER=16", "-DFI_SEL_MIN_BLOCKS=3"),
    # scalar top-k <= 128 on the cached slices (row_select_kernel) instead of streamed rows written without a re-read
    "cached_topk": ("-DFI_ROW_STREAM_TOPK_ROWS=1073741824",),
    # the streamed route taken apart (wrong results, timing only): no neutral stores; the filter's pass alone; the
    # pass and topk_collect
    "st_nostore": ("-DFI_ROW_STREAM_PROBE=1",),
    "st_filter": ("-DFI_ROW_STREAM_PROBE=2",),
    "st_collect": ("-DFI_ROW_STREAM_PROBE=3",),
    # the streamed top-k route at every batch (the library streams from FI_ROW_STREAM_TOPK_ROWS rows)
    "stream_all": ("-DFI_ROW_STREAM_TOPK_ROWS=1",),
    # the single-pass top-k filter with each warp on its own threshold (not the CTA's largest)
    "own_theta": ("-DFI_TOPK_SHARED_THETA=0",),
}


def _load_variants(names) -> Dict[str, object]:
    """{variant: a sampling._Module of float32 rows built with the variant's flags} (built in parallel)."""
    from flashinfer import jit
    from probe_ops import variant_class

    specs = {n: variant_class(sampling.SamplingSpec, VARIANTS[n])(dtype="f32") for n in names}
    t0 = time.perf_counter()
    with ThreadPoolExecutor(min(len(specs), 8)) as pool:
        reports = dict(zip(specs, pool.map(jit.ensure_built, specs.values())))
    mods = {}
    for n, spec in specs.items():
        r = reports[n]
        log = Path(r.log_path).read_text() if getattr(r, "log_path", None) else ""
        regs = [ln.split("Used ")[1].split(" registers")[0] for ln in log.splitlines() if "Used " in ln]
        print(f"{n}: {VARIANTS[n]} {r.status}, registers of its kernels {regs}", flush=True)
        m = object.__new__(sampling._Module)  # the library's module wrapper around this variant's build
        m.module = jit.load(spec)
        m.sample = m.module.launcher("flashinfer_sampling_sample")
        m.row_op = m.module.launcher("flashinfer_sampling_row_op")
        m.chain = m.module.launcher("flashinfer_sampling_chain_speculative")
        m.c = m.module.constants
        mods[n] = m
    print(f"built {len(specs)} modules in {time.perf_counter() - t0:.0f} s", flush=True)
    return mods


def _sets(nbytes: int) -> int:
    return max(1, min(8, math.ceil(256e6 / nbytes)))


def _call(op: str, x: torch.Tensor) -> torch.Tensor:
    if op == "top_p_renorm_probs":
        return flashinfer.sampling.top_p_renorm_probs(x, TOP_P)
    if op == "top_k_renorm_probs":
        return flashinfer.sampling.top_k_renorm_probs(x, TOP_K)
    if op == SAMPLER:
        return flashinfer.sampling.top_k_top_p_sampling_from_logits(x, TOP_K, TOP_P, seed=1234, offset=0)
    return flashinfer.sampling.top_k_mask_logits(x, TOP_K)


_MODS: Dict[str, object] = {}


def _with(kernel: str, fn):
    """fn() with the row transforms on `kernel`: "radix" (row_op_kernel of the default build) or a variant name."""
    old_kernel, old_mod = sampling._ROW_KERNEL, sampling._modules.get("f32")
    sampling._ROW_KERNEL = "radix" if kernel == "radix" else "select"
    sampling._modules["f32"] = _MODS["default" if kernel == "radix" else kernel]
    try:
        return fn()
    finally:
        sampling._ROW_KERNEL = old_kernel
        if old_mod is None:
            sampling._modules.pop("f32", None)
        else:
            sampling._modules["f32"] = old_mod


def _reference(op: str, x: torch.Tensor) -> torch.Tensor:
    """Float64 PyTorch reference: kept = values >= the k-th largest (ties kept) / the shortest descending head
    holding top_p of the mass."""
    xd = x.double()
    if op == "top_p_renorm_probs":
        s, _ = xd.sort(-1, descending=True)
        cum = s.cumsum(-1)
        idx = torch.searchsorted(cum, (TOP_P * cum[:, -1:]).contiguous())
        tau = s.gather(1, idx.clamp(max=s.size(1) - 1))
        kept = xd >= tau
        w = torch.where(kept, xd, torch.zeros_like(xd))
        return w / w.sum(-1, keepdim=True)
    kth = xd.topk(TOP_K, -1).values[:, -1:]
    kept = xd >= kth
    if op == "top_k_mask_logits":
        return torch.where(kept, xd, torch.full_like(xd, float("-inf")))
    w = torch.where(kept, xd, torch.zeros_like(xd))
    return w / w.sum(-1, keepdim=True)


def _check(op: str, batch: int, vocab: int, x: torch.Tensor) -> int:
    if op == SAMPLER:  # the same seed: every variant samples the same tokens
        old = _with("default", lambda: _call(op, x))
        bad = 0
        for name in _MODS:
            diff = int((_with(name, lambda: _call(op, x)) != old).sum())
            if diff:
                bad += 1
                print(f"MISMATCH {op} b{batch} v{vocab}: {name} != default in {diff} rows", flush=True)
        return bad
    old = _with("radix", lambda: _call(op, x))
    bad = 0
    for name in _MODS:
        out = _with(name, lambda: _call(op, x))
        torch.cuda.synchronize()
        diff = int((out.view(torch.int32) != old.view(torch.int32)).sum())
        if diff:
            bad += 1
            rows = int((out.view(torch.int32) != old.view(torch.int32)).any(-1).sum())
            print(f"MISMATCH {op} b{batch} v{vocab}: {name} != radix in {diff} elements ({rows} rows)", flush=True)
    new = _with("default", lambda: _call(op, x))
    ref = _reference(op, x)
    kept_new = (new > float("-inf")) if op == "top_k_mask_logits" else (new > 0)
    kept_ref = (ref > float("-inf")) if op == "top_k_mask_logits" else (ref > 0)
    support = int((kept_new != kept_ref).sum())
    if support:
        bad += 1
        rows = int((kept_new != kept_ref).any(-1).sum())
        print(f"MISMATCH {op} b{batch} v{vocab}: kept set != torch reference in {support} elements ({rows} rows)")
    if op == "top_k_mask_logits":
        vals = int((new.double() != ref)[kept_ref].sum())
    else:
        vals = int(((new.double() - ref).abs() > 2e-6 * ref.abs() + 1e-12).sum())
    if vals:
        bad += 1
        print(f"MISMATCH {op} b{batch} v{vocab}: {vals} values differ from the torch reference beyond tolerance")
    return bad


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ",".join(VARIANTS))
    args = ap.parse_args()
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    if "default" not in names:
        names.insert(0, "default")
    _MODS.update(_load_variants(names))
    kernels = ["radix", *names]
    torch.manual_seed(0)
    copy_tbs = copy_bandwidth_tbs()
    print(f"{torch.cuda.get_device_name()}  copy bandwidth (read + write) {copy_tbs:.2f} TB/s", flush=True)
    print("cells: median us (% of the copy bandwidth); speed-up: radix / default")
    print(f"{'op':<20} {'batch':>5} {'vocab':>7} " + " ".join(f"{k:>14}" for k in kernels) + f" {'speed-up':>8}")
    failures = 0
    for vocab in VOCABS:
        for batch in BATCHES:
            n = _sets(batch * vocab * 4)
            g = torch.Generator("cuda").manual_seed(batch * 7 + vocab)
            logits = [torch.randn(batch, vocab, device="cuda", generator=g) * 2 for _ in range(n)]
            probs = [torch.softmax(x, -1) for x in logits]
            for op in OPS:
                xs = logits if op in ("top_k_mask_logits", SAMPLER) else probs
                failures += _check(op, batch, vocab, xs[0])
                t = {}
                for kernel in kernels:
                    t[kernel] = _with(
                        kernel,
                        lambda: median_ms(lambda i: _call(op, xs[i]), n, warmup=3, iters=args.iters, flush=True),
                    )
                pct = {k: 100 * 2 * batch * vocab * 4 / (v * 1e-3) / 1e12 / copy_tbs for k, v in t.items()}
                cells = " ".join(f"{t[k] * 1e3:>7.1f} ({pct[k]:>3.0f}%)" for k in kernels)
                print(f"{op:<20} {batch:>5} {vocab:>7} {cells} {t['radix'] / t['default']:>7.2f}x", flush=True)
            del logits, probs
    print("checks:", "all outputs match" if failures == 0 else f"{failures} MISMATCHING CHECKS (see above)")


if __name__ == "__main__":
    main()
