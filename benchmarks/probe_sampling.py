"""Development probe (issue 15): the top-k/top-p row transforms through the new row_select_kernel against the
previous radix kernel (row_op_kernel), in one process, about a minute on an H200.

    python benchmarks/probe_sampling.py [--iters N]

For top_p_renorm_probs (0.9), top_k_renorm_probs (50) and top_k_mask_logits (50) at batch 1, 32, 256 and vocab
128256, 256000 (float32, logits ~ 2 N(0, 1), probabilities their softmax), prints each kernel's median time (CUDA
events around single calls, L2 flushed before each, inputs rotated beyond the L2: benchmarks/common.py) and its
share of the copy bandwidth (bytes = the rows read once and written once), then checks the new kernel's output
against the old one (bit for bit) and a PyTorch reference (masks exactly, renormalized values to 2e-6), printing
MISMATCH lines for any difference. Appends nothing to RESULTS.md.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import flashinfer  # noqa: E402
from common import copy_bandwidth_tbs, median_ms  # noqa: E402
from flashinfer import sampling  # noqa: E402

VOCABS = (128256, 256000)
BATCHES = (1, 32, 256)
TOP_K, TOP_P = 50, 0.9
OPS = ("top_p_renorm_probs", "top_k_renorm_probs", "top_k_mask_logits")


def _sets(nbytes: int) -> int:
    return max(1, min(8, math.ceil(256e6 / nbytes)))


def _call(op: str, x: torch.Tensor) -> torch.Tensor:
    if op == "top_p_renorm_probs":
        return flashinfer.sampling.top_p_renorm_probs(x, TOP_P)
    if op == "top_k_renorm_probs":
        return flashinfer.sampling.top_k_renorm_probs(x, TOP_K)
    return flashinfer.sampling.top_k_mask_logits(x, TOP_K)


def _with(kernel: str, fn):
    old = sampling._ROW_KERNEL
    sampling._ROW_KERNEL = kernel
    try:
        return fn()
    finally:
        sampling._ROW_KERNEL = old


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
    new = _with("select", lambda: _call(op, x))
    old = _with("radix", lambda: _call(op, x))
    torch.cuda.synchronize()
    bad = 0
    diff = int((new.view(torch.int32) != old.view(torch.int32)).sum())
    if diff:
        bad += 1
        rows = int((new.view(torch.int32) != old.view(torch.int32)).any(-1).sum())
        print(f"MISMATCH {op} b{batch} v{vocab}: new != old in {diff} elements ({rows} rows)", flush=True)
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
    args = ap.parse_args()
    torch.manual_seed(0)
    copy_tbs = copy_bandwidth_tbs()
    print(f"{torch.cuda.get_device_name()}  copy bandwidth (read + write) {copy_tbs:.2f} TB/s", flush=True)
    print(
        f"{'op':<20} {'batch':>5} {'vocab':>7} {'old us':>9} {'new us':>9} {'old %bw':>8} {'new %bw':>8} {'speed-up':>8}"
    )
    failures = 0
    for vocab in VOCABS:
        for batch in BATCHES:
            n = _sets(batch * vocab * 4)
            g = torch.Generator("cuda").manual_seed(batch * 7 + vocab)
            logits = [torch.randn(batch, vocab, device="cuda", generator=g) * 2 for _ in range(n)]
            probs = [torch.softmax(x, -1) for x in logits]
            for op in OPS:
                xs = logits if op == "top_k_mask_logits" else probs
                failures += _check(op, batch, vocab, xs[0])
                t = {}
                for kernel in ("radix", "select"):
                    t[kernel] = _with(
                        kernel,
                        lambda: median_ms(lambda i: _call(op, xs[i]), n, warmup=3, iters=args.iters, flush=True),
                    )
                pct = {k: 100 * 2 * batch * vocab * 4 / (v * 1e-3) / 1e12 / copy_tbs for k, v in t.items()}
                print(
                    f"{op:<20} {batch:>5} {vocab:>7} {t['radix'] * 1e3:>9.1f} {t['select'] * 1e3:>9.1f} "
                    f"{pct['radix']:>7.0f}% {pct['select']:>7.0f}% {t['radix'] / t['select']:>7.2f}x",
                    flush=True,
                )
            del logits, probs
    print("checks:", "all outputs match" if failures == 0 else f"{failures} MISMATCHING CHECKS (see above)")


if __name__ == "__main__":
    main()
