"""Per-kernel device times of single decode (split kernel and merge kernel) from torch.profiler, over a few
shapes, to see where time goes. A development aid; results are printed, not recorded."""

from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import flashinfer  # noqa: E402

SHAPES = [
    (32, 8, 32768),
    (32, 8, 65536),
    (32, 8, 131072),
    (8, 8, 32768),
    (32, 32, 32768),
    (32, 8, 8192),
    (32, 8, 2048),
    (64, 8, 32768),
    (32, 4, 32768),
]


def main() -> None:
    for hq, hkv, L in SHAPES:
        sets = max(1, min(16, int(512e6 // (4 * L * hkv * 128))))
        qs = [torch.randn(hq, 128, device="cuda", dtype=torch.bfloat16) for _ in range(sets)]
        ks = [torch.randn(L, hkv, 128, device="cuda", dtype=torch.bfloat16) for _ in range(sets)]
        vs = [torch.randn(L, hkv, 128, device="cuda", dtype=torch.bfloat16) for _ in range(sets)]
        out = torch.empty(hq, 128, device="cuda", dtype=torch.bfloat16)
        for i in range(5):
            flashinfer.single_decode_with_kv_cache(qs[i % sets], ks[i % sets], vs[i % sets], out=out)
        torch.cuda.synchronize()
        n = 40
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for i in range(n):
                flashinfer.single_decode_with_kv_cache(qs[i % sets], ks[i % sets], vs[i % sets], out=out)
            torch.cuda.synchronize()
        times = defaultdict(list)
        for e in prof.events():
            if e.device_type == torch.autograd.DeviceType.CUDA:
                name = "merge" if "merge" in e.name else ("decode" if "decode" in e.name else e.name[:30])
                times[name].append(e.device_time)
        nbytes = 4 * L * hkv * 128
        parts = []
        for k, v in times.items():
            v = sorted(v)
            med = v[len(v) // 2]
            extra = f" ({nbytes / (med * 1e-6) / 1e12:.2f} TB/s)" if k == "decode" else ""
            parts.append(f"{k}: {med:.1f} us x{len(v) // n}{extra}")
        print(f"{hq}q/{hkv}kv L={L}: " + ", ".join(parts), flush=True)
        del qs, ks, vs
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
