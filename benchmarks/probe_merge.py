"""Development aid (issue 12): device time of compile-time variants of the pair merge (merge_state,
merge_state_in_place; the FI_MERGE_PAIR_* knobs at the top of templates/include/flashinfer/attention/cascade.cuh)
against the real FlashInfer, so that one GPU run decides which variant to keep. Each variant is its own module
built with -D flags; every variant's results are checked against a float64 PyTorch merge first (-inf states on
either side, NaN values in empty states, masks, strided views). Timing as bench_cascade.py's merge table: CUDA
events, L2 flushed before each call, input sets rotated beyond L2; best of the rounds' medians. % = bytes (every v
and lse read once, the output written once) over the measured copy bandwidth. Records nothing.

    python benchmarks/probe_merge.py [--rounds 3] [--variants default,t512,...] [--no-reference] [--build-only]

The real FlashInfer runs this script with --flashinfer-reference in its own process, started first so that its
JIT build overlaps ours; it times the same cases only after ours are done.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Dict, List, Tuple

REFERENCE = "--flashinfer-reference" in sys.argv
sys.path.insert(0, str(Path(__file__).resolve().parent))
if not REFERENCE:  # the reference process must import the real FlashInfer, not this repository's package
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import torch  # noqa: E402

import flashinfer  # noqa: E402
from common import REFERENCE_FLAG, copy_bandwidth_tbs, median_ms, reference_env  # noqa: E402

DTYPE = torch.bfloat16
SHAPES = ((4096, 32, 128), (1, 32, 128), (37, 8, 64))  # (seq_len, num_heads, head_dim)
OPS = ("merge_state", "merge_state_in_place", "in_place_mask", "merge_states_8")
NUM_STATES = 8

# variant name -> -D flags; the first is the default build (no flags).
VARIANTS: Dict[str, Tuple[str, ...]] = {
    "default": (),
    "t512": ("-DFI_MERGE_PAIR_THREADS=512",),
    "t1024": ("-DFI_MERGE_PAIR_THREADS=1024",),
    "rows2": ("-DFI_MERGE_PAIR_ROWS=2", "-DFI_MERGE_PAIR_OCCUPANCY=1024"),
    "stream": ("-DFI_MERGE_PAIR_STREAMING=1",),
    "no_flat": ("-DFI_MERGE_PAIR_FLAT=0",),
    "addr64": ("-DFI_MERGE_PAIR_INDEX32=0",),
    "no_seed": ("-DFI_MERGE_PAIR_SEED=0",),
    # near the previous kernel's shape: a resident grid looping over the rows, several rows in flight per thread
    # (4 rows spill at 64 registers here: the previous kernel recomputed each row's position after its barrier)
    "persist2": ("-DFI_MERGE_PAIR_WAVES=1", "-DFI_MERGE_PAIR_ROWS=2", "-DFI_MERGE_PAIR_OCCUPANCY=1024"),
}


def case_key(op: str, shape: Tuple[int, int, int]) -> str:
    return f"{op}/{'x'.join(map(str, shape))}"


def _sets(bytes_per_set: int) -> int:
    """Input sets so that consecutive calls never share L2-resident data (with the flush, belt and braces)."""
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 64 << 20) or (64 << 20)
    return max(2, min(8, math.ceil(2 * l2 / max(bytes_per_set, 1))))


def moved_bytes(op: str, shape: Tuple[int, int, int]) -> int:
    """Bytes the op must move: every v and lse read once, the output written once (and the mask read)."""
    n, h, d = shape
    state = n * h * (d * 2 + 4)
    if op == "merge_states_8":
        return (NUM_STATES + 1) * state
    return 3 * state + (n if op == "in_place_mask" else 0)


def make_case(fi, op: str, shape: Tuple[int, int, int], seed: int = 0) -> Tuple[Callable[[int], object], int]:
    """Inputs and a call of the library ``fi`` (this project's flashinfer or the real one: same API). Returns
    (fn(i), number of input sets)."""
    torch.manual_seed(seed)
    n, h, d = shape
    n_sets = _sets(moved_bytes(op, shape))

    def state(*lead):
        return torch.randn(*lead, h, d, device="cuda", dtype=DTYPE), torch.randn(*lead, h, device="cuda") * 4 + 10

    if op == "merge_states_8":
        sets = [state(n, NUM_STATES) for _ in range(n_sets)]
        return (lambda i: fi.merge_states(*sets[i])), n_sets
    sets = [(*state(n), *state(n)) for _ in range(n_sets)]
    if op == "merge_state":
        return (lambda i: fi.merge_state(*sets[i])), n_sets
    # In place: the state grows by one merge a call (s by at most 1), staying finite over any number of calls.
    mask = torch.ones(n, dtype=torch.bool, device="cuda") if op == "in_place_mask" else None
    return (lambda i: fi.merge_state_in_place(*sets[i], mask=mask)), n_sets


def time_cases(fi, cases, rounds: int, installs: Dict[str, Callable[[], None]]) -> Dict[str, Dict[str, float]]:
    """Best median ms per case key and variant (``installs``: variant -> makes it the one ``fi`` calls), the
    variants interleaved within each round."""
    out: Dict[str, Dict[str, float]] = {}
    for op, shape in cases:
        fn, n_sets = make_case(fi, op, shape)
        best: Dict[str, float] = {}
        for _ in range(rounds):
            for name, install in installs.items():
                install()
                ms = median_ms(fn, n_sets, warmup=5, iters=100, flush=True)
                best[name] = min(best.get(name, ms), ms)
        out[case_key(op, shape)] = best
        del fn
        torch.cuda.empty_cache()
    return out


def all_cases():
    return [(op, shape) for shape in SHAPES for op in OPS]


# ------------------------------------------------------------------------------------------- the reference


def reference_main(rounds: int) -> None:
    """--flashinfer-reference: builds the real FlashInfer's module, waits for a line on stdin (the caller's own
    timings done), times the same cases and prints one JSON line."""
    get_module = getattr(getattr(flashinfer, "cascade", None), "get_cascade_module", None)
    if get_module is not None:  # its JIT build, without launching anything while the caller times
        get_module()
    print("ready", flush=True)
    sys.stdin.readline()
    times = time_cases(flashinfer, all_cases(), rounds, {"fi": lambda: None})
    print(
        json.dumps({"version": getattr(flashinfer, "__version__", "?"), "ms": {k: v["fi"] for k, v in times.items()}})
    )


def start_reference(rounds: int):
    env = reference_env()
    if env is None:
        return None
    return subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), REFERENCE_FLAG, "--rounds", str(rounds)],
        env=env,
        cwd="/tmp",
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish_reference(proc) -> Dict[str, float]:
    if proc is None:
        return {}
    limit = float(os.environ.get("FI_REF_TIMEOUT", "300"))
    try:
        out, err = proc.communicate("go\n", timeout=limit)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        print(f"[reference] no answer within FI_REF_TIMEOUT={limit:.0f} s:\n{err[-3000:]}", file=sys.stderr)
        return {}
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        print(f"[reference] failed (exit {proc.returncode}):\n{err[-3000:]}", file=sys.stderr)
        return {}
    res = json.loads(lines[-1])
    print(f"FlashInfer {res.get('version', '?')} (its own process)")
    return res["ms"]


# ------------------------------------------------------------------------------------------- correctness


def _merge_ref(vs: torch.Tensor, ss: torch.Tensor):
    """float64 merge of states vs [..., k, H, D], ss [..., k, H] along the state dim (-inf: empty, its v unread)."""
    vs, ss = vs.double(), ss.double()
    empty = torch.isneginf(ss)
    m = ss.max(dim=-2, keepdim=True).values.nan_to_num(0.0, neginf=0.0)
    w = torch.where(empty, torch.zeros_like(ss), torch.exp2(ss - m))
    vs = torch.where(empty[..., None], torch.zeros_like(vs), vs)
    d = w.sum(dim=-2)
    o = (w[..., None] * vs).sum(dim=-3) / torch.where(d > 0, d, torch.ones_like(d))[..., None]
    s = torch.where(d > 0, m.squeeze(-2) + torch.log2(torch.where(d > 0, d, torch.ones_like(d))), float("-inf"))
    return o, s


def _close(v, s, ref_v, ref_s) -> bool:
    finite = torch.isfinite(ref_s)
    return bool(
        torch.allclose(v.double(), ref_v, atol=2e-2, rtol=2e-2)
        and torch.equal(torch.isfinite(s), finite)
        and torch.allclose(s[finite].double(), ref_s[finite], atol=1e-3, rtol=1e-4)
    )


def _states(shape, lead=()):
    """Random states, a fifth empty (s = -inf, v NaN there: an empty state's values must never be read)."""
    v = torch.randn(*lead, *shape, device="cuda").to(DTYPE)
    s = torch.randn(*lead, *shape[:-1], device="cuda") * 4 + 10
    s[torch.rand_like(s) < 0.2] = float("-inf")
    v[torch.isneginf(s)] = float("nan")
    return v, s


def check_variant() -> List[str]:
    """The installed variant on every path of the pair merge; returns what disagreed with the float64 merge."""
    bad = []
    for shape in ((1, 1, 8), (1, 32, 128), (37, 8, 64), (129, 7, 96), (300, 32, 128), (5, 3, 2048)):
        va, sa = _states(shape)
        vb, sb = _states(shape)
        sa[0, 0] = sb[0, 0] = float("-inf")
        ref_v, ref_s = _merge_ref(torch.stack([va, vb], -3), torch.stack([sa, sb], -2))
        if not _close(*flashinfer.merge_state(va, sa, vb, sb), ref_v, ref_s):
            bad.append(f"merge_state {shape}")
        # In place on views: v of evenly spaced rows (flat addressing), s contiguous or transposed (addressed by
        # position and head); with and without a mask.
        seq, heads, d = shape
        big = torch.randn(seq, heads, 2 * d, device="cuda").to(DTYPE)
        v = big[:, :, d:]
        for s_in in (torch.empty(seq, heads, device="cuda"), torch.empty(heads, seq, device="cuda").t()):
            for mask in (None, torch.rand(seq, device="cuda") < 0.6):
                v.copy_(va)
                s_in.copy_(sa)
                flashinfer.merge_state_in_place(v, s_in, vb, sb, mask=mask)
                keep = torch.ones(seq, dtype=torch.bool, device="cuda") if mask is None else mask
                untouched = torch.equal(v[~keep].view(torch.int16), va[~keep].view(torch.int16)) and torch.equal(
                    s_in[~keep], sa[~keep]
                )
                if not (_close(v[keep], s_in[keep], ref_v[keep], ref_s[keep]) and untouched):
                    bad.append(f"merge_state_in_place {shape}, s strides {s_in.stride()}, mask {mask is not None}")
    vs, ss = _states((37, 8, 64), (NUM_STATES,))
    vs, ss = vs.transpose(0, 1), ss.transpose(0, 1)
    if not _close(*flashinfer.merge_states(vs, ss), *_merge_ref(vs, ss)):
        bad.append("merge_states (37, 8, 8, 64)")
    return bad


# ------------------------------------------------------------------------------------------------- output


def print_table(times, fi: Dict[str, float], moved: Dict[str, int], copy_tbs: float) -> None:
    names = list(next(iter(times.values())))
    header = ["case", *names] + (["FlashInfer", "FlashInfer / default"] if fi else [])
    print("\n| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for key, best in times.items():
        fastest = min(best, key=best.get)
        pct = lambda ms: 100 * moved[key] / (ms * 1e-3) / 1e12 / copy_tbs  # noqa: E731
        row = [key] + [f"{ms * 1e3:.2f}{'*' if n == fastest else ''} ({pct(ms):.1f}%)" for n, ms in best.items()]
        if fi:
            ref = fi.get(key)
            row += [f"{ref * 1e3:.2f} ({pct(ref):.1f}%)", f"{ref / best[names[0]]:.3f}x"] if ref else ["-", "-"]
        print("| " + " | ".join(row) + " |")
    print("\ngeometric mean of time / default's, pair merges at 4096 x 32 x 128 and all cases:")
    big = "x".join(map(str, SHAPES[0]))
    for n in names:
        parts = []
        for label, keep in (("4096 pair", lambda k: big in k and "states" not in k), ("all", lambda k: True)):
            r = [b[n] / b[names[0]] for k, b in times.items() if keep(k)]
            parts.append(f"{label} {math.exp(sum(map(math.log, r)) / len(r)):.3f}")
        print(f"  {n}: " + ", ".join(parts))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3, help="timing rounds (best median kept)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ",".join(VARIANTS))
    ap.add_argument("--no-reference", action="store_true", help="skip the real FlashInfer's times")
    ap.add_argument("--build-only", action="store_true", help="build and load every variant, time nothing")
    ap.add_argument(REFERENCE_FLAG, action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if REFERENCE:
        reference_main(args.rounds)
        return
    import flashinfer.cascade as cascade
    from flashinfer import jit
    from probe_ops import variant_class

    t0 = time.perf_counter()
    ref = None if args.no_reference or args.build_only else start_reference(args.rounds)
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    specs = {n: variant_class(cascade.MergeStateSpec, VARIANTS[n])(dtype_o="bf16") for n in names}
    with ThreadPoolExecutor(min(len(specs), 16)) as pool:
        reports = dict(zip(specs, pool.map(jit.ensure_built, specs.values())))
    modules = {}
    for n, r in reports.items():
        log = Path(r.log_path).read_text() if getattr(r, "log_path", None) else ""
        regs = sorted({ln.split("Used ")[1].split(" registers")[0] for ln in log.splitlines() if "Used " in ln})
        spills = [ln.strip() for ln in log.splitlines() if "spill" in ln and not ln.strip().startswith("0 bytes")]
        print(f"{n}: {VARIANTS[n]} {r.status}, registers {regs}, {spills or 'no spills'}")
        modules[n] = jit.load(specs[n])
    print(f"built {len(specs)} modules in {time.perf_counter() - t0:.0f} s")
    if args.build_only:
        return

    def installer(name):
        def install():
            cascade._merge_module = lambda dtype: modules[name]

        return install

    installs = {n: installer(n) for n in names}
    bad = []
    for n, install in installs.items():
        install()
        bad += [f"{n}: {b}" for b in check_variant()]
    print("every variant agrees with the float64 merge" if not bad else "MISMATCH (these variants are wrong):")
    for b in bad:
        print("  " + b)
    copy_tbs = copy_bandwidth_tbs()
    times = time_cases(flashinfer, all_cases(), args.rounds, installs)
    moved = {case_key(op, shape): moved_bytes(op, shape) for op, shape in all_cases()}
    print(f"ours: {time.perf_counter() - t0:.0f} s")
    fi = finish_reference(ref)
    print(
        f"\ncopy bandwidth {copy_tbs:.2f} TB/s; cells: best median µs over {args.rounds} rounds (% of copy BW), * fastest"
    )
    print_table(times, fi, moved, copy_tbs)
    print(f"\ntotal: {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
