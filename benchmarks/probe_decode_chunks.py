"""Development aid: single-decode time against the depth of the K/V ring (FI_DECODE_STAGES, a compile-time
knob) and the split-KV target of CTAs per SM (decode._ctas_per_sm; the launcher also stops at the resident
slots), to check the defaults. Prints a table; records nothing. --fp8: an e4m3 KV cache (bf16 q, k_scale = v_scale =
0.5), whose loop differs from the 16-bit one (tensor cores at every head tile, 64-key stages)."""

from __future__ import annotations

import dataclasses
import statistics
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import flashinfer  # noqa: E402
import flashinfer.decode as decode  # noqa: E402
from common import copy_bandwidth_tbs, graph_ms  # noqa: E402
from flashinfer import jit  # noqa: E402

STAGES = (3, 6)
CTAS_PER_SM = (1, 2, 3, 4)
SHAPES = [
    (32, 8, 32768),
    (32, 32, 32768),
    (32, 8, 8192),
    (32, 32, 8192),
    (32, 4, 32768),
    (32, 1, 32768),
    (64, 64, 8192),
    (8, 8, 32768),
]


def staged_spec_class(stages: int):
    base = decode.SingleDecodeSpec

    @dataclasses.dataclass(frozen=True)
    class Staged(base):
        def extra_cuda_cflags(self):
            return tuple(base.extra_cuda_cflags(self)) + (f"-DFI_DECODE_STAGES={stages}",)

    Staged.__name__ = f"SingleDecodeSpecStages{stages}"
    return Staged


def main() -> None:
    fp8 = "--fp8" in sys.argv[1:]
    kv_dtype, kv_short, kv_bytes = (torch.float8_e4m3fn, "e4m3", 1) if fp8 else (torch.bfloat16, "bf16", 2)
    scales = {"k_scale": 0.5, "v_scale": 0.5} if fp8 else {}
    classes = {s: staged_spec_class(s) for s in STAGES}
    default_rule = decode._ctas_per_sm
    with ThreadPoolExecutor(len(STAGES)) as pool:  # each build is an nvcc subprocess
        list(
            pool.map(
                lambda c: jit.load(c(128, "bf16", kv_short, "bf16", "NHD", "NONE", False, False)), classes.values()
            )
        )
    copy = copy_bandwidth_tbs()
    print(f"copy {copy:.2f} TB/s", flush=True)
    for hq, hkv, L in SHAPES:
        sets = max(1, int(512e6 // (2 * kv_bytes * L * hkv * 128)))
        qs = [torch.randn(hq, 128, device="cuda", dtype=torch.bfloat16) for _ in range(sets)]
        ks = [(torch.randn(L, hkv, 128, device="cuda") * 2).to(kv_dtype) for _ in range(sets)]
        vs = [(torch.randn(L, hkv, 128, device="cuda") * 2).to(kv_dtype) for _ in range(sets)]
        out = torch.empty(hq, 128, device="cuda", dtype=torch.bfloat16)
        ref = flashinfer.single_decode_with_kv_cache(qs[0], ks[0], vs[0], **scales).float()
        nbytes = 2 * kv_bytes * L * hkv * 128 + 4 * hq * 128
        results = {}
        for _ in range(3):  # interleaved rounds; the median of each variant is printed
            for stages, cls in classes.items():
                decode.SingleDecodeSpec = cls
                decode._single_kernels.clear()
                for cap in CTAS_PER_SM:
                    decode._ctas_per_sm = lambda group, cap=cap: cap
                    t = graph_ms(
                        lambda i: flashinfer.single_decode_with_kv_cache(qs[i], ks[i], vs[i], out=out, **scales), sets
                    )
                    results.setdefault((stages, cap), []).append(t)
                    o = flashinfer.single_decode_with_kv_cache(qs[0], ks[0], vs[0], **scales)
                    err = (o.float() - ref).abs().max().item()
                    assert err < 2e-2, (stages, cap, err)
        decode._ctas_per_sm = default_rule
        print(f"{hq}q/{hkv}kv L={L}:", flush=True)
        for (stages, cap), ts in results.items():
            t = statistics.median(ts)
            print(
                f"  stages {stages} CTAs/SM {cap}: {t * 1e3:6.1f} us {100 * nbytes / (t * 1e-3) / 1e12 / copy:5.1f}%",
                flush=True,
            )
        del qs, ks, vs
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
