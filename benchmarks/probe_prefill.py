"""Development aid: single-prefill time (bf16, head_dim 128, 32 heads) for compile-time variants of the
kernels (fa2: FI_PREFILL_BK128, keys per KV tile; fa3: FI_FA3_BK; fa3_ws: FI_WS_PINGPONG, FI_WS_PRODUCER_REGS /
FI_WS_CONSUMER_REGS), beside SDPA's flash backend in the same run. Prints a table; records nothing."""

from __future__ import annotations

import dataclasses
import statistics
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import flashinfer  # noqa: E402
import flashinfer.prefill as prefill  # noqa: E402
from common import graph_ms  # noqa: E402
from flashinfer import jit  # noqa: E402

VARIANTS = {
    "fa2": ("fa2", ()),
    "fa3 bk128": ("fa3", ("-DFI_FA3_BK=128",)),
    "fa3 bk64": ("fa3", ("-DFI_FA3_BK=64",)),
    # the warp-specialised kernel (prefill_sm90_ws.cuh), as built and with its consumer warpgroups in ping-pong
    "fa3_ws": ("fa3_ws", ()),
    "fa3_ws pingpong": ("fa3_ws", ("-DFI_WS_PINGPONG=1",)),
}
CASES = [(8192, False), (16384, False), (8192, True), (2048, False), (2048, True)]


def variant_class(flags):
    base = prefill.SinglePrefillSpec

    @dataclasses.dataclass(frozen=True)
    class Variant(base):
        def extra_cuda_cflags(self):
            return tuple(base.extra_cuda_cflags(self)) + flags

    return Variant


def main() -> None:
    base = prefill.SinglePrefillSpec
    classes = {name: variant_class(flags) for name, (_, flags) in VARIANTS.items()}
    specs = [
        c(128, "bf16", "bf16", "bf16", mask_mode=m, backend=VARIANTS[name][0])
        for name, c in classes.items()
        for m in ("none", "causal")
    ]
    with ThreadPoolExecutor(len(specs)) as pool:
        reports = list(pool.map(jit.ensure_built, specs))
    for spec, r in zip(specs, reports):
        log = Path(r.log_path).read_text() if getattr(r, "log_path", None) else ""
        spill = [ln.strip() for ln in log.splitlines() if "spill" in ln and "prefill_kernel" not in ln]
        print(type(spec).__name__, spec.mask_mode, spec.extra_cuda_cflags(), spill[-3:] if spill else "(no log)")
    for L, causal in CASES:
        q, k, v = (torch.randn(L, 32, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        out = torch.empty_like(q)
        fl = 4 * L * L * 32 * 128 / (2 if causal else 1)
        ref = None
        res = {}
        for _ in range(3):
            for name, cls in classes.items():
                prefill.SinglePrefillSpec = cls
                be = VARIANTS[name][0]
                t = graph_ms(
                    lambda i: flashinfer.single_prefill_with_kv_cache(q, k, v, causal=causal, out=out, backend=be),
                    1,
                    reps=10,
                    calls_per_graph=4,
                )
                res.setdefault(name, []).append(t)
                if ref is None:
                    ref = out.float().clone()
                assert (out.float() - ref).abs().max().item() < 2e-2, name
            prefill.SinglePrefillSpec = base
            sq, sk, sv = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))

            def sdpa(i):
                with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                    F.scaled_dot_product_attention(sq, sk, sv, is_causal=causal)

            res.setdefault("sdpa flash", []).append(graph_ms(sdpa, 1, reps=10, calls_per_graph=4))
        print(f"L={L} causal={causal}:", flush=True)
        flash = statistics.median(res["sdpa flash"])
        for name, ts in res.items():
            t = statistics.median(ts)
            print(f"  {name:10s} {t:7.3f} ms {fl / t / 1e9:6.0f} TFLOP/s  vs flash {flash / t:.2f}x", flush=True)


if __name__ == "__main__":
    main()
