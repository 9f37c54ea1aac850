"""Development aid (issue 12): the cascade's levels in turn and side by side, for the decode level on the cp.async
kernel ("auto") and on the TMA decode kernel with a grid of n SMs (``_decode_level_tma``, ``_ws_decode_sms``), with a
torch.profiler timeline of each kernel's start and duration for a few settings of the main case. Shapes as
bench_cascade.py (bf16, 32/8 heads, d128, pages of 16, NHD, + 1024 own tokens a request); timing as its eager column
(CUDA events, L2 flushed before each call, median of 100; three rounds). Prints; records nothing.

    python benchmarks/probe_cascade.py [--main] [--n 24,32,40,48] [--no-timeline]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import bench_cascade as bc  # noqa: E402
import flashinfer  # noqa: E402
from common import flush_l2  # noqa: E402


def timeline(w, qs, caches, label: str) -> None:
    """Kernel starts and durations (µs) of the last of three runs, each after an L2 flush (a reduction kernel)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for i in range(3):
            flush_l2()
            w.run(qs[i % len(qs)], caches[i % len(qs)])
        torch.cuda.synchronize()
    evs = sorted((e for e in prof.events() if e.device_type.name == "CUDA"), key=lambda e: e.time_range.start)
    last_flush = max(i for i, e in enumerate(evs) if "reduce_kernel" in e.name)
    run = evs[last_flush + 1 :]
    t0 = run[0].time_range.start
    print(f"  timeline {label}:")
    for e in run:
        start, length = e.time_range.start - t0, e.time_range.end - e.time_range.start
        print(f"    {start:7.1f} +{length:6.1f}  {e.name[:80]}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--main", action="store_true", help="the 64 x 32768 case only")
    ap.add_argument("--n", default="24,32,40,48,56,64", help="SMs left to the TMA decode level")
    ap.add_argument("--no-timeline", action="store_true")
    args = ap.parse_args()
    ns = [int(x) for x in args.n.split(",") if x]
    cases = [bc.MAIN] if args.main else [bc.MAIN, (128, 32768, 1024), (32, 32768, 1024), (64, 16384, 1024)]
    for batch, prefix, unique in cases:
        caches, qs, levels = bc.make_case(batch, prefix, unique, bc.sets_beyond_l2(batch, prefix, unique))
        print(f"=== {batch} x {prefix} + {unique}", flush=True)
        configs = [("in turn", {"_overlap_levels": "never"}), ("auto", {})]
        configs += [
            (f"tma n={n}", {"_overlap_levels": "always", "_ws_decode_sms": n, "_decode_level_tma": True}) for n in ns
        ]
        for label, attrs in configs:
            ts = []
            for _ in range(3):
                ms, w, _ = bc.cascade_eager_ms(flashinfer, levels, caches, qs, **attrs)
                ts.append(ms * 1e3)
            st = w.plan_stats()
            print(
                f"  {label:10s}: " + " / ".join(f"{t:.1f}" for t in ts) + f" µs  overlap={st.get('overlap_levels')}"
                f" decode_sms={st.get('decode_sms')} decode_tma={st.get('decode_tma')}",
                flush=True,
            )
            if not args.no_timeline and (batch, prefix, unique) == bc.MAIN and label in ("in turn", "auto", "tma n=48"):
                timeline(w, qs, caches, label)


if __name__ == "__main__":
    main()
