"""Development aid: single-prefill time (bf16, head_dim 128, 32 heads) for compile-time variants of the
kernels (fa2: FI_PREFILL_BK128, keys per KV tile; fa3: FI_FA3_BK; fa3_ws: FI_WS_PINGPONG, FI_WS_PRODUCER_REGS /
FI_WS_CONSUMER_REGS, FI_WS_PRODUCER_SUSPEND_NS), beside SDPA's flash backend in the same
run (``--only=name,name``: a subset of the variants). Prints a table; records nothing.

``--paged``: fa3_ws paged batch prefill (PAGED_VARIANTS, each with its own -D flags) beside fa3_ws ragged and fa2
paged on the same 16 x 1024 causal batches (pages of 1, 8, 16, 32, 64).

``--d64``: the single-prefill variants at head_dim 64 (VARIANTS_D64: fa2 and fa3_ws).

``--ragged``: fa3_ws ragged batch prefill per RAGGED_VARIANTS (each with its own -D flags) on RAGGED_CASES (many
short work items: the cost at item boundaries), three interleaved rounds.

``--split``: fa3_ws against fa2 on batch prefills whose keys the planner splits (SPLIT_CASES).

``--fp8``: fa3_ws with fp8 K/V (bf16 q and o, 32 q / 8 KV heads, NHD; FP8_VARIANTS, each with its own -D flags)
against fa3_ws with bf16 K/V, on 8192 full, 8192 causal and 16384 full: TFLOP/s, the ratio to bf16 K/V, and each output's max abs error against SDPA on the
dequantised K/V (flagged WRONG past the tolerance 1e-2 + 2e-2 |ref|)."""

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
from common import graph_ms, scattered_pages  # noqa: E402
from flashinfer import jit  # noqa: E402

VARIANTS = {
    "fa2": ("fa2", ()),
    "fa3 bk128": ("fa3", ("-DFI_FA3_BK=128",)),
    "fa3 bk64": ("fa3", ("-DFI_FA3_BK=64",)),
    # the warp-specialised kernel (prefill_sm90_ws.cuh), as built and with its consumer warpgroups in ping-pong
    "fa3_ws": ("fa3_ws", ()),
    "fa3_ws pingpong": ("fa3_ws", ("-DFI_WS_PINGPONG=1",)),
    # its items in either order whatever the mask: every head's query tile n together, or one head at a time
    "fa3_ws heads inner": ("fa3_ws", ("-DFI_WS_HEAD_GROUP=1024",)),
    "fa3_ws head by head": ("fa3_ws", ("-DFI_WS_HEAD_GROUP=1",)),
    # every waiter spinning (the kernel before the producer's idle warps slept in their wait for the next Q slot)
    "fa3_ws spin": ("fa3_ws", ("-DFI_WS_PRODUCER_SUSPEND_NS=0",)),
    # an item's first K and V tiles issued after its Q has landed (the order before FI_WS_EARLY_KV0)
    "fa3_ws late kv0": ("fa3_ws", ("-DFI_WS_EARLY_KV0=0",)),
}
CASES = [(8192, False), (16384, False), (8192, True), (2048, False), (2048, True)]
# --d64: the same at head_dim 64 (fa3 has none: fa2 and fa3_ws variants)
VARIANTS_D64 = {
    "fa2": ("fa2", ()),
    "fa3_ws": ("fa3_ws", ()),
}
CASES_D64 = [(8192, False), (8192, True), (2048, False)]

# fa3_ws with fp8 K/V: name -> (K/V dtype, extra nvcc flags), timed in this order (the surest first: a variant that
# deadlocks traps after the 2 s wait bound every variant is built with, and the process's CUDA context is lost).
FP8_VARIANTS = {
    # (H200, 2026-11-30: the widening variants it compared, their compile-time knobs since removed, are in
    # benchmarks/RESULTS.md, device calls 2 and 3; a new variant is one entry with its -D flags)
    "bf16 kv": ("bf16", ()),
    "e4m3": ("e4m3", ()),
    "e5m2": ("e5m2", ()),
}
_FP8_PROBE_FLAGS = ("-DFI_WS_WAIT_TIMEOUT_NS=2000000000ull",)
FP8_CASES = [(8192, False), (8192, True), (16384, False)]


def variant_class(flags, base=None):
    """The spec class `base` (default: single prefill's) built with the extra nvcc flags `flags`."""
    base = base or prefill.SinglePrefillSpec

    @dataclasses.dataclass(frozen=True)
    class Variant(base):
        def extra_cuda_cflags(self):
            return tuple(base.extra_cuda_cflags(self)) + flags

    return Variant


def _built(specs) -> set:
    """Builds the specs in parallel and prints ptxas's spill report of each; returns the classes whose build failed
    (reported, not raised: the other variants are still timed)."""

    def build(spec):
        try:
            return jit.ensure_built(spec)
        except Exception as e:
            return e

    with ThreadPoolExecutor(min(len(specs), 16)) as pool:
        reports = list(pool.map(build, specs))
    failed = set()
    for spec, r in zip(specs, reports):
        if isinstance(r, Exception):
            print(spec.dtype_kv, spec.mask_mode, spec.extra_cuda_cflags(), "BUILD FAILED:", str(r)[-500:], flush=True)
            failed.add(type(spec))
            continue
        log = Path(r.log_path).read_text() if getattr(r, "log_path", None) else ""
        spill = [ln.strip() for ln in log.splitlines() if "spill" in ln and "prefill_kernel" not in ln]
        print(spec.dtype_kv, spec.mask_mode, spec.extra_cuda_cflags(), spill[-3:] if spill else "(no log)", flush=True)
    return failed


def fp8_main() -> None:
    """fa3_ws with fp8 K/V per widening variant against bf16 K/V (see the module docstring)."""
    base = prefill.SinglePrefillSpec
    classes = {name: variant_class(flags + _FP8_PROBE_FLAGS) for name, (_, flags) in FP8_VARIANTS.items()}
    failed = _built(
        [
            c(128, "bf16", FP8_VARIANTS[name][0], "bf16", mask_mode=m, backend="fa3_ws")
            for name, c in classes.items()
            for m in ("none", "causal")
        ]
    )
    classes = {name: c for name, c in classes.items() if c not in failed or name == "bf16 kv"}
    fp8 = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
    k_scale, v_scale = 0.5, 2.0  # powers of two: the dequantised K/V are exact in bf16
    for L, causal in FP8_CASES:
        torch.manual_seed(0)
        q = torch.randn(L, 32, 128, device="cuda", dtype=torch.bfloat16)
        kv32 = [torch.randn(L, 8, 128, device="cuda") * 2 for _ in range(2)]
        kv = {"bf16": [x.to(torch.bfloat16) for x in kv32]}
        kv.update({n: [x.to(t) for x in kv32] for n, t in fp8.items()})
        out = torch.empty_like(q)
        fl = 4 * L * L * 32 * 128 / (2 if causal else 1)
        refs = {}
        for n, (k, v) in kv.items():
            # SDPA (flash, bf16) on the dequantised K/V, GQA expanded: the reference of every variant of that dtype
            scale_k, scale_v = (1.0, 1.0) if n == "bf16" else (k_scale, v_scale)
            kd, vd = ((x.to(torch.bfloat16) * s).repeat_interleave(4, 1) for x, s in ((k, scale_k), (v, scale_v)))
            sq, sk, sv = (x.transpose(0, 1).unsqueeze(0) for x in (q, kd, vd))
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                refs[n] = F.scaled_dot_product_attention(sq, sk, sv, is_causal=causal)[0].transpose(0, 1).float()
            del kd, vd, sq, sk, sv
        print(f"L={L} causal={causal} (fa3_ws, bf16 q/o, 32/8 heads):", flush=True)
        t_bf16 = None
        # (each variant checked, then timed, then printed: what was measured before a failure stays on the screen;
        # bf16 K/V again at the end shows the clock's drift over the case)
        for name in list(classes) + ["bf16 kv"]:
            prefill.SinglePrefillSpec = classes[name]
            dkv = FP8_VARIANTS[name][0]
            k, v = kv[dkv]
            scales = {} if dkv == "bf16" else {"k_scale": k_scale, "v_scale": v_scale}
            try:
                out.fill_(float("nan"))
                flashinfer.single_prefill_with_kv_cache(q, k, v, causal=causal, out=out, backend="fa3_ws", **scales)
                diff = (out.float() - refs[dkv]).abs()
                err = diff.max().item()
                # the worst error in units of its tolerance, 1e-2 + 2e-2 |ref| (SDPA rounds P to bf16; NaN: inf)
                excess = torch.nan_to_num(diff / (1e-2 + 2e-2 * refs[dkv].abs()), nan=float("inf")).max().item()
                t = statistics.median(
                    graph_ms(
                        lambda i: flashinfer.single_prefill_with_kv_cache(
                            q, k, v, causal=causal, out=out, backend="fa3_ws", **scales
                        ),
                        1,
                        reps=10,
                        calls_per_graph=4,
                    )
                    for _ in range(3)
                )
            except Exception as e:  # (a launch failure: reported, and the next variants are still tried)
                print(f"  {name:28s} FAILED: {type(e).__name__}: {str(e)[:300]}", flush=True)
                continue
            finally:
                prefill.SinglePrefillSpec = base
            t_bf16 = t_bf16 or t
            flag = "" if excess <= 1 else f"   <-- WRONG ({excess:.1f} x the tolerance 1e-2 + 2e-2 |ref|)"
            print(
                f"  {name:28s} {t:7.3f} ms {fl / t / 1e9:6.0f} TFLOP/s  / bf16 kv {t_bf16 / t:.3f}"
                f"  max|err| {err:.2e}{flag}",
                flush=True,
            )


# Paged batch prefill on fa3_ws (its producer gathers the rows): name -> extra nvcc flags; each timed with the
# schedule request-major (prefill._WS_REQUEST_MAJOR) and heaviest first over the batch.
PAGED_VARIANTS = {
    "fa3_ws paged": (),
}
PAGED_CASES = [
    (16, 1024, 32, 32, 16),
    (16, 1024, 32, 8, 16),
    (16, 1024, 32, 8, 1),
    (16, 1024, 32, 8, 8),
    (16, 1024, 32, 8, 32),
    (16, 1024, 32, 8, 64),
]


def _time_runs(runs, out, flop, width, rounds=1) -> None:
    """Runs each of `runs` (name -> call writing `out`) once on a NaN-filled out and compares it with the first, then
    times them in `rounds` interleaved rounds; prints each one's median device ms queued behind a sleep
    (bench_prefill.queued_ms) and TFLOP/s of `flop`."""
    from bench_prefill import queued_ms

    ref, errs = None, {}
    for name, fn in runs.items():
        out.fill_(float("nan"))
        fn()
        torch.cuda.synchronize()
        if ref is None:
            ref = out.float().clone()
        errs[name] = (out.float() - ref).abs().max().item()
    times = {name: [] for name in runs}
    for _ in range(rounds):
        for name, fn in runs.items():
            times[name].append(queued_ms(fn))
    for name, ts in times.items():
        t = statistics.median(ts)
        each = f"  (rounds {', '.join(f'{x:.3f}' for x in ts)})" if rounds > 1 else ""
        print(
            f"  {name:{width}s} {t:7.3f} ms {flop / t / 1e9:6.0f} TFLOP/s  max|diff| vs first {errs[name]:.1e}{each}",
            flush=True,
        )


def paged_main() -> None:
    """fa3_ws paged batch prefill per variant beside fa3_ws ragged and fa2 paged on the same batch (16 x 1024
    causal, bf16, NHD, pages scattered): device ms per call queued behind a sleep (bench_prefill.queued_ms)."""

    base = prefill.BatchPrefillSpec
    classes = {name: variant_class(flags, base) for name, flags in PAGED_VARIANTS.items()}
    _built(
        [
            c(128, "bf16", "bf16", "bf16", kv_storage="paged", mask_mode="causal", backend="fa3_ws")
            for c in classes.values()
        ]
    )
    d, dt = 128, torch.bfloat16
    for n, L, hq, hkv, ps in PAGED_CASES:
        torch.manual_seed(0)
        total = n * L
        q = torch.randn(total, hq, d, device="cuda", dtype=dt)
        k, v = (torch.randn(total, hkv, d, device="cuda", dtype=dt) for _ in range(2))
        cache, perm, kv_indptr, last = scattered_pages(k, v, n, ps)
        qo = torch.arange(0, total + 1, L, dtype=torch.int32)
        ws = torch.empty(64 << 20, dtype=torch.uint8, device="cuda")
        fl = n * 4 * L * L * hq * d / 2
        out = torch.empty_like(q)
        runs = {}
        rag = flashinfer.BatchPrefillWithRaggedKVCacheWrapper(ws, "NHD", backend="fa3_ws")
        rag.plan(qo, qo, hq, hkv, d, causal=True, q_data_type=dt)
        runs["fa3_ws ragged (TMA), request-major"] = lambda: rag.run(q, k, v, out=out)
        fa2 = flashinfer.BatchPrefillWithPagedKVCacheWrapper(ws, "NHD", backend="fa2")
        fa2.plan(qo, kv_indptr, perm, last, hq, hkv, d, ps, causal=True, q_data_type=dt)
        runs["fa2 paged"] = lambda: fa2.run(q, cache, out=out)
        prefill._WS_REQUEST_MAJOR = False
        rag2 = flashinfer.BatchPrefillWithRaggedKVCacheWrapper(ws, "NHD", backend="fa3_ws")
        rag2.plan(qo, qo, hq, hkv, d, causal=True, q_data_type=dt)
        runs["fa3_ws ragged, heaviest first over the batch"] = lambda: rag2.run(q, k, v, out=out)
        for order in (True, False):
            prefill._WS_REQUEST_MAJOR = order
            for name, cls in classes.items():
                prefill.BatchPrefillSpec = cls
                try:
                    w = flashinfer.BatchPrefillWithPagedKVCacheWrapper(ws, "NHD", backend="fa3_ws")
                    w.plan(qo, kv_indptr, perm, last, hq, hkv, d, ps, causal=True, q_data_type=dt)
                finally:
                    prefill.BatchPrefillSpec = base
                label = name + ("" if order else ", heaviest first over the batch")
                runs[label] = lambda w=w: w.run(q, cache, out=out)
        prefill._WS_REQUEST_MAJOR = True
        print(f"paged {n} x {L} causal, {hq}/{hkv} heads, page {ps}:", flush=True)
        _time_runs(runs, out, fl, 72)
        del q, k, v, cache, out, ws
        torch.cuda.empty_cache()


# Ragged batch prefill on fa3_ws: name -> extra nvcc flags.
RAGGED_VARIANTS = {
    "fa3_ws": (),
    "fa3_ws late kv0": ("-DFI_WS_EARLY_KV0=0",),
}
# (requests, length, query heads, KV heads, causal)
RAGGED_CASES = [
    (16, 1024, 32, 32, True),
    (16, 1024, 32, 8, True),
    (64, 256, 32, 8, True),
    (16, 1024, 32, 8, False),
    (4, 4096, 32, 32, True),
]


def ragged_main() -> None:
    """fa3_ws ragged batch prefill per variant (bf16, d128, NHD): device ms per call queued behind a sleep
    (bench_prefill.queued_ms), medians of three interleaved rounds, outputs compared with the first variant's."""
    base = prefill.BatchPrefillSpec
    classes = {name: variant_class(flags, base) for name, flags in RAGGED_VARIANTS.items()}
    _built(
        [
            c(128, "bf16", "bf16", "bf16", mask_mode=m, backend="fa3_ws")
            for c in classes.values()
            for m in ("none", "causal")
        ]
    )
    d, dt = 128, torch.bfloat16
    for n, L, hq, hkv, causal in RAGGED_CASES:
        torch.manual_seed(0)
        q = torch.randn(n * L, hq, d, device="cuda", dtype=dt)
        k, v = (torch.randn(n * L, hkv, d, device="cuda", dtype=dt) for _ in range(2))
        qo = torch.arange(0, n * L + 1, L, dtype=torch.int32)
        ws = torch.empty(64 << 20, dtype=torch.uint8, device="cuda")
        fl = n * 4 * L * L * hq * d / (2 if causal else 1)
        out = torch.empty_like(q)
        runs = {}
        for name, cls in classes.items():
            prefill.BatchPrefillSpec = cls
            try:
                w = flashinfer.BatchPrefillWithRaggedKVCacheWrapper(ws, "NHD", backend="fa3_ws")
                w.plan(qo, qo, hq, hkv, d, causal=causal, q_data_type=dt)
            finally:
                prefill.BatchPrefillSpec = base
            runs[name] = lambda w=w: w.run(q, k, v, out=out)
        print(f"ragged {n} x {L} {'causal' if causal else 'full'}, {hq}/{hkv} heads:", flush=True)
        _time_runs(runs, out, fl, 24, rounds=3)
        del q, k, v, out, ws
        torch.cuda.empty_cache()


# (requests, qo_len, kv_len, query heads, KV heads, causal, page size or 0 for ragged): batches whose 128-row query
# tiles alone do not fill the GPU (the planner splits their keys), and one that does.
SPLIT_CASES = [
    (1, 256, 32768, 32, 8, True, 0),
    (1, 64, 32768, 32, 8, False, 0),
    (1, 64, 32768, 32, 8, False, 16),
    (2, 128, 16384, 32, 32, True, 0),
    (4, 512, 8192, 32, 8, True, 0),
    (8, 1, 4096, 32, 8, False, 16),
]


def split_main() -> None:
    """fa3_ws against fa2 on batches the planner splits (both split as the planner likes; fa3_ws also unsplit): device
    ms per call queued behind a sleep (bench_prefill.queued_ms), TFLOP/s of the visible work."""

    d, dt = 128, torch.bfloat16
    for n, qo_len, kv_len, hq, hkv, causal, ps in SPLIT_CASES:
        torch.manual_seed(0)
        q = torch.randn(n * qo_len, hq, d, device="cuda", dtype=dt)
        k, v = (torch.randn(n * kv_len, hkv, d, device="cuda", dtype=dt) for _ in range(2))
        qo = torch.arange(0, n * qo_len + 1, qo_len, dtype=torch.int32)
        kvp = torch.arange(0, n * kv_len + 1, kv_len, dtype=torch.int32)
        ws = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
        seen = qo_len * kv_len - (qo_len * (qo_len - 1) // 2 if causal else 0)
        fl = n * 4 * seen * hq * d
        out = torch.empty_like(q)
        runs = {}
        for backend, split_off in (("fa2", False), ("fa3_ws", False), ("fa3_ws", True)):
            if ps:
                cache, perm, kv_indptr, last = scattered_pages(k, v, n, ps)
                w = flashinfer.BatchPrefillWithPagedKVCacheWrapper(ws, "NHD", backend=backend)
                w.plan(
                    qo, kv_indptr, perm, last, hq, hkv, d, ps, causal=causal, q_data_type=dt, disable_split_kv=split_off
                )
                fn = lambda w=w, cache=cache: w.run(q, cache, out=out)  # noqa: E731
            else:
                w = flashinfer.BatchPrefillWithRaggedKVCacheWrapper(ws, "NHD", backend=backend)
                w.plan(qo, kvp, hq, hkv, d, causal=causal, q_data_type=dt, disable_split_kv=split_off)
                fn = lambda w=w: w.run(q, k, v, out=out)  # noqa: E731
            st = w.plan_stats
            runs[f"{backend}{' unsplit' if split_off else ''} ({st['pieces']} pieces, {st['merges']} merges)"] = fn
        storage = f"paged {ps}" if ps else "ragged"
        print(f"{storage} {n} x (qo {qo_len}, kv {kv_len}) {'causal' if causal else 'full'}, {hq}/{hkv}:", flush=True)
        _time_runs(runs, out, fl, 48)
        del q, k, v, out, ws
        torch.cuda.empty_cache()


def main() -> None:
    if "--split" in sys.argv[1:]:
        split_main()
        return
    if "--fp8" in sys.argv[1:]:
        fp8_main()
        return
    if "--paged" in sys.argv[1:]:
        paged_main()
        return
    if "--ragged" in sys.argv[1:]:
        ragged_main()
        return
    d64 = "--d64" in sys.argv[1:]
    variants, cases, d = (VARIANTS_D64, CASES_D64, 64) if d64 else (VARIANTS, CASES, 128)
    only = next((a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--only=")), "")
    if only:  # --only=name,name: a subset of the variants
        variants = {n: variants[n] for n in only.split(",")}
    base = prefill.SinglePrefillSpec
    classes = {name: variant_class(flags) for name, (_, flags) in variants.items()}
    specs = [
        c(d, "bf16", "bf16", "bf16", mask_mode=m, backend=variants[name][0])
        for name, c in classes.items()
        for m in ("none", "causal")
    ]
    with ThreadPoolExecutor(len(specs)) as pool:
        reports = list(pool.map(jit.ensure_built, specs))
    for spec, r in zip(specs, reports):
        log = Path(r.log_path).read_text() if getattr(r, "log_path", None) else ""
        spill = [ln.strip() for ln in log.splitlines() if "spill" in ln and "prefill_kernel" not in ln]
        print(type(spec).__name__, spec.mask_mode, spec.extra_cuda_cflags(), spill[-3:] if spill else "(no log)")
    for L, causal in cases:
        q, k, v = (torch.randn(L, 32, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        out = torch.empty_like(q)
        fl = 4 * L * L * 32 * d / (2 if causal else 1)
        ref = None
        res = {}
        for _ in range(3):
            for name, cls in classes.items():
                prefill.SinglePrefillSpec = cls
                be = variants[name][0]
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
        print(f"L={L} causal={causal} d{d}:", flush=True)
        flash = statistics.median(res["sdpa flash"])
        for name, ts in res.items():
            t = statistics.median(ts)
            print(f"  {name:10s} {t:7.3f} ms {fl / t / 1e9:6.0f} TFLOP/s  vs flash {flash / t:.2f}x", flush=True)


if __name__ == "__main__":
    main()
