"""Development aid: single-decode time against the cap on split-KV chunks (the launcher fills every resident
CTA slot up to this cap), to check the chunking heuristic. Prints a table; records nothing."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import copy_bandwidth_tbs, graph_ms  # noqa: E402

import flashinfer  # noqa: E402
import flashinfer.decode as decode  # noqa: E402


def main() -> None:
    copy = copy_bandwidth_tbs()
    print(f"copy {copy:.2f} TB/s")
    for hq, hkv, L in [(32, 8, 32768), (32, 32, 32768), (32, 8, 8192)]:
        sets = max(1, int(512e6 // (4 * L * hkv * 128)))
        qs = [torch.randn(hq, 128, device="cuda", dtype=torch.bfloat16) for _ in range(sets)]
        ks = [torch.randn(L, hkv, 128, device="cuda", dtype=torch.bfloat16) for _ in range(sets)]
        vs = [torch.randn(L, hkv, 128, device="cuda", dtype=torch.bfloat16) for _ in range(sets)]
        out = torch.empty(hq, 128, device="cuda", dtype=torch.bfloat16)
        nbytes = 4 * L * hkv * 128 + 4 * hq * 128
        row = []
        for cap in (128, 66, 48, 33, 24, 16):
            decode._MAX_CHUNKS = cap
            t = graph_ms(lambda i: flashinfer.single_decode_with_kv_cache(qs[i], ks[i], vs[i], out=out), sets)
            row.append(f"cap {cap}: {t * 1e3:.1f} us ({100 * nbytes / (t * 1e-3) / 1e12 / copy:.1f}%)")
        decode._MAX_CHUNKS = 128
        print(f"{hq}q/{hkv}kv L={L}: " + ", ".join(row), flush=True)
        del qs, ks, vs
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
