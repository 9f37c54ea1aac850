"""Cold starts: per kernel family, the cold compile of one representative module (empty cache, fresh
process, from the first call to its return), the warm load (cache hit, fresh process), the in-process
first-call split (key / manifest + sha256 / dlopen), and the prewarm of a preset (wall, modules/min).

    python benchmarks/bench_cold_start.py                      # all families, default preset, all cores
    python benchmarks/bench_cold_start.py --families decode_single --prewarm-shard 1/8

Every measurement runs in a subprocess against a private temporary cache, so nothing is shared with
the user's cache. With a GPU, the first call is the family's public API on small inputs (compile + load +
launch + sync) and the table is appended to benchmarks/RESULTS.md; without one, the first call is
``flashinfer.jit.load(spec)`` (compile + dlopen, nothing launched) and the table is only printed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# One representative (Llama-style bf16 d128) spec per family, as a Spec.to_json() fragment.
REPRESENTATIVE = {
    "decode_single": dict(
        head_dim=128,
        dtype_q="bf16",
        dtype_kv="bf16",
        dtype_o="bf16",
        kv_layout="NHD",
        pos_encoding_mode="NONE",
        use_window=False,
        use_logits_soft_cap=False,
    ),
    "decode_batch_paged": dict(
        head_dim=128,
        dtype_q="bf16",
        dtype_kv="bf16",
        dtype_o="bf16",
        kv_layout="NHD",
        pos_encoding_mode="NONE",
        use_logits_soft_cap=False,
    ),
    "page_append": dict(head_dim=128, dtype_kv="bf16"),
    "prefill_single": dict(
        head_dim=128,
        dtype_q="bf16",
        dtype_kv="bf16",
        dtype_o="bf16",
        mask_mode="causal",
        pos_encoding_mode="NONE",
        use_window=False,
        use_logits_soft_cap=False,
        use_fp16_qk_reduction=False,
    ),
    "prefill_batch": dict(
        head_dim=128,
        dtype_q="bf16",
        dtype_kv="bf16",
        dtype_o="bf16",
        kv_storage="paged",
        mask_mode="causal",
        pos_encoding_mode="NONE",
        use_window=False,
        use_logits_soft_cap=False,
        use_fp16_qk_reduction=False,
    ),
}

# Runs in the child: time the first call (GPU: the public API on small inputs; CPU: jit.load).
_CHILD = r"""
import json, sys, time, ctypes
t_import0 = time.perf_counter()
import torch
import flashinfer
from flashinfer import jit
from flashinfer.jit import cache, loader
from flashinfer.jit.spec import Spec
t_import = time.perf_counter() - t_import0
fam, frag, gpu = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3] == "1"
spec = Spec.from_json({"family": fam, **frag})

def first_call():
    if not gpu:
        return jit.load(spec)
    dev, bf = "cuda", torch.bfloat16
    if fam == "decode_single":
        q = torch.randn(32, 128, device=dev, dtype=bf); k = torch.randn(512, 8, 128, device=dev, dtype=bf)
        flashinfer.single_decode_with_kv_cache(q, k, k)
    elif fam == "prefill_single":
        q = torch.randn(64, 32, 128, device=dev, dtype=bf); k = torch.randn(512, 8, 128, device=dev, dtype=bf)
        flashinfer.single_prefill_with_kv_cache(q, k, k, causal=True)
    else:  # wrappers need plans; the module load is the cold part
        return jit.load(spec)
    torch.cuda.synchronize()

t0 = time.perf_counter()
first_call()
t_first = time.perf_counter() - t0
status = jit.load(spec).status

print("RESULT " + json.dumps({"first": t_first, "status": status, "import": t_import}))
"""

# Warm, in a fresh process with the cache hit: either the first jit.load (imports excluded), or the same
# work split into its parts (first cache_key incl. the templates digest; check_entry = stats + manifest +
# sha256 of the .so; the first ctypes.CDLL of the library).
_WARM = r"""
import json, sys, time, ctypes
import flashinfer
from flashinfer import jit
from flashinfer.jit import cache
from flashinfer.jit.spec import Spec
spec = Spec.from_json({"family": sys.argv[1], **json.loads(sys.argv[2])})
if sys.argv[3] == "split":
    t0 = time.perf_counter(); key = cache.cache_key(spec); t_key = time.perf_counter() - t0
    t0 = time.perf_counter(); so, man, reason = cache.check_entry(key, raise_insecure=True); t_check = time.perf_counter() - t0
    t0 = time.perf_counter(); ctypes.CDLL(str(so)); t_dlopen = time.perf_counter() - t0
    print("RESULT " + json.dumps({"key": t_key, "check": t_check, "dlopen": t_dlopen, "so_bytes": so.stat().st_size,
                                  "status": "cached" if so else reason}))
else:
    t0 = time.perf_counter(); m = jit.load(spec); t = time.perf_counter() - t0
    print("RESULT " + json.dumps({"load": t, "status": m.status}))
"""


def _child(code: str, argv, env) -> dict:
    r = subprocess.run([sys.executable, "-c", code, *argv], env=env, capture_output=True, text=True, cwd=REPO)
    for line in r.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    raise RuntimeError(f"child failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--families", default=",".join(REPRESENTATIVE))
    ap.add_argument("--warm-reps", type=int, default=5)
    ap.add_argument("--prewarm-preset", default="default")
    ap.add_argument("--prewarm-shard", default=None, help="only shard I/N of the preset (e.g. for a slow CPU box)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--no-prewarm", action="store_true")
    ap.add_argument("--no-write", action="store_true", help="do not append to RESULTS.md even with a GPU")
    args = ap.parse_args()

    import torch

    gpu = torch.cuda.is_available()
    fams = [f.strip() for f in args.families.split(",") if f.strip()]
    base_env = dict(os.environ)
    base_env["PYTHONPATH"] = str(REPO) + os.pathsep + base_env.get("PYTHONPATH", "")
    base_env.pop("FLASHINFER_DISABLE_JIT", None)
    if not gpu:
        base_env.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
    rows, notes = [], []
    mode = (
        "GPU: first call = public API on small inputs (compile+load+launch) for single decode/prefill, jit.load for the rest"
        if gpu
        else "CPU only (no GPU): first call = jit.load(spec), i.e. compile + dlopen; nothing launched"
    )
    print(f"# cold starts ({mode}); {os.cpu_count()} CPU cores", flush=True)
    hdr = [
        "family",
        "cold first call s",
        "warm load ms (new process, median)",
        "key ms",
        "manifest+sha256 ms",
        "dlopen ms",
        ".so KiB",
    ]
    for fam in fams:
        frag = REPRESENTATIVE[fam]
        with tempfile.TemporaryDirectory(prefix="fi_cold_") as d:
            env = dict(base_env, FLASHINFER_JIT_CACHE=str(Path(d) / "cache"))
            cold = _child(_CHILD, [fam, json.dumps(frag), "1" if gpu else "0"], env)
            assert cold["status"] == "built", cold
            warm = [_child(_WARM, [fam, json.dumps(frag), "load"], env) for _ in range(args.warm_reps)]
            assert all(w["status"] == "cached" for w in warm)
            wl = statistics.median(w["load"] for w in warm) * 1e3
            splits = [_child(_WARM, [fam, json.dumps(frag), "split"], env) for _ in range(args.warm_reps)]
            sp = {k: statistics.median(x[k] for x in splits) for k in ("key", "check", "dlopen")}
        row = [
            fam,
            f"{cold['first']:.1f}",
            f"{wl:.1f}",
            f"{sp['key'] * 1e3:.2f}",
            f"{sp['check'] * 1e3:.2f}",
            f"{sp['dlopen'] * 1e3:.2f}",
            f"{splits[0]['so_bytes'] / 1024:.0f}",
        ]
        rows.append(row)
        print(" | ".join(row), flush=True)

    prewarm_line = None
    if not args.no_prewarm:
        with tempfile.TemporaryDirectory(prefix="fi_prewarm_") as d:
            env = dict(base_env, FLASHINFER_JIT_CACHE=str(Path(d) / "cache"))
            rep = Path(d) / "r.json"
            cmd = [
                sys.executable,
                "-m",
                "flashinfer",
                "prewarm",
                "--preset",
                args.prewarm_preset,
                "--jobs",
                str(args.jobs),
                "--json",
                str(rep),
            ]
            if args.prewarm_shard:
                cmd += ["--shard", args.prewarm_shard]
            t0 = time.perf_counter()
            r = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
            wall = time.perf_counter() - t0
            data = json.loads(rep.read_text()) if rep.exists() else {}
            c = data.get("counts", {})
            n = c.get("built", 0)
            shard = f" shard {args.prewarm_shard}" if args.prewarm_shard else ""
            prewarm_line = (
                f"prewarm --preset {args.prewarm_preset}{shard} --jobs {args.jobs}: {n} modules built, "
                f"{c.get('failed', '?')} failed, wall {wall:.1f} s (command), "
                f"{60.0 * n / wall if wall else 0:.1f} modules/min, slowest "
                f"{(data.get('slowest') or {}).get('seconds', 0):.1f} s; exit {r.returncode}"
            )
            print(prewarm_line, flush=True)
            if r.returncode:
                print(r.stdout[-2000:], r.stderr[-2000:], file=sys.stderr)
        notes.append(prewarm_line)
    notes = [
        mode,
        f"{os.cpu_count()} CPU cores; warm load = first jit.load in a fresh process (imports excluded), "
        f"median of {args.warm_reps}; key / manifest+sha256 / dlopen = the parts of that first load, each timed "
        f"in a fresh process (key includes the once-per-process templates digest)",
    ] + notes
    print("| " + " | ".join(hdr) + " |")
    for r_ in rows:
        print("| " + " | ".join(r_) + " |")
    if gpu and not args.no_write:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from common import write_results

        write_results("Cold starts: compile, warm load, prewarm", hdr, rows, notes)
        print("appended to benchmarks/RESULTS.md")
    elif not gpu:
        print("no GPU: RESULTS.md not written (CPU numbers: compile and load only, nothing launched)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
