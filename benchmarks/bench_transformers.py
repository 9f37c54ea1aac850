"""Tokens per second of one transformers model on our attention backend vs PyTorch SDPA (its default dispatch and
forced to its FlashAttention-2 kernel), plus our paged continuous-batching engine; appends to RESULTS.md.

    python benchmarks/bench_transformers.py [--quick] [--time-budget SECONDS]

The model is a random one with an 8B-like attention geometry (32 query heads, 8 KV heads, head_dim 128, hidden
4096; 8 layers, vocab 32000: examples/hf_common.py "bench") in bf16, so that no download is needed. For each
backend: ``model.generate`` greedy (transformers' DynamicCache, no padding) timed end to end, decode tokens per
second = batch * new tokens / (generate time - prefill time), and the prefill forward alone (CUDA events). The
engine row is examples/generate_paged.py at batch up to 64 (paged KV cache, CUDA-graph decode steps).

No ``--flashinfer-reference`` mode: FlashInfer ships no transformers backend to compare with.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT))
from common import write_results  # noqa: E402

import hf_common  # noqa: E402

import flashinfer.integrations.transformers as fi_tf  # noqa: E402


def _backends():
    """name -> (attn_implementation, context manager factory)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return {
        "ours (fi_attention)": (fi_tf.DEFAULT_NAME, contextlib.nullcontext),
        "SDPA (default dispatch)": ("sdpa", contextlib.nullcontext),
        "SDPA forced to FLASH_ATTENTION": ("sdpa", lambda: sdpa_kernel([SDPBackend.FLASH_ATTENTION])),
    }


def _prefill_ms(model, ids, reps: int) -> float:
    times = []
    with torch.no_grad():
        model(ids)  # warm-up (module loads, allocator)
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            model(ids)
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
    return statistics.median(times)


def _generate_s(model, ids, new_tokens: int, reps: int) -> float:
    kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0, eos_token_id=None)
    times = []
    with torch.no_grad():
        model.generate(ids, max_new_tokens=4, min_new_tokens=4, **kw)  # warm-up
        for _ in range(reps):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kw)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    assert out.shape[1] == ids.shape[1] + new_tokens
    return statistics.median(times)


def _error(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"n/a: {type(e).__name__}: {lines[0][:100] if lines else ''}"


def _engine_row(n_req: int) -> list:
    """examples/generate_paged.py on the same geometry (its own copy of the random weights)."""
    import generate_paged

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "engine.json"
        rc = generate_paged.main(["--size", "bench", "--requests", str(n_req), "--batch", "64", "--prompt-len",
                                  "128-512", "--new-tokens", "64-128", "--arrival", "16", "--check", "0", "--quiet",
                                  "--json", str(out)])
        if rc != 0 or not out.exists():
            raise RuntimeError(f"generate_paged.py exited with status {rc}")
        engine = json.loads(out.read_text())
    step = engine["decode_step_ms_at_max_batch"]
    return [f"ours: paged engine ({n_req} requests, batch <= 64)", "<= 64", "128-512", "64-128", "-",
            f"{engine['tokens_per_s']:.0f}",
            f"{engine['decode_tokens_per_s']:.0f}" + (f" ({step:.2f} ms/step at 64)" if step else "")]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer cases and repetitions")
    ap.add_argument("--time-budget", type=float, default=75.0,
                    help="seconds; rows not started within it are reported as skipped (default 75)")
    args = ap.parse_args()
    t_start = time.perf_counter()
    cases = [(1, 512, 128), (8, 2048, 64)] if not args.quick else [(1, 512, 32)]
    reps = 2 if not args.quick else 1
    n_req = 128 if not args.quick else 32
    header = ["backend", "batch", "prompt", "new", "prefill ms", "overall tok/s", "decode tok/s"]
    rows, tok_s = [], {}

    def over_budget() -> bool:
        return time.perf_counter() - t_start > args.time_budget

    # Every failure is a row of the table, never an exception out of the benchmark (the GPU run goes on).
    model = cfg = None
    try:
        fi_tf.register()
        cfg = hf_common.make_config("llama", "bench")
        model = hf_common.random_model(cfg, torch.bfloat16, "cuda", attn_implementation=fi_tf.DEFAULT_NAME)
    except Exception as e:  # noqa: BLE001
        rows.append(["model setup", "-", "-", "-", "-", "-", _error(e)])
    g = torch.Generator().manual_seed(0)
    for batch, prompt, new in cases if model is not None else []:
        ids = torch.randint(3, cfg.vocab_size, (batch, prompt), generator=g).to("cuda")
        for name, (impl, ctx) in _backends().items():
            if over_budget():
                rows.append([name, batch, prompt, new, "-", "-", f"skipped: over the {args.time_budget:.0f} s budget"])
                continue
            try:
                model.set_attn_implementation(impl)
                with ctx():
                    pre = _prefill_ms(model, ids, reps=3)
                    total = _generate_s(model, ids, new, reps)
            except Exception as e:  # noqa: BLE001 - e.g. a forced SDPA kernel that refuses these inputs
                rows.append([name, batch, prompt, new, "n/a", "n/a", _error(e)])
                print(rows[-1], flush=True)
                torch.cuda.synchronize()
                continue
            decode = batch * new / max(total - pre / 1e3, 1e-9)
            tok_s[(name, batch, prompt)] = decode
            rows.append([name, batch, prompt, new, f"{pre:.2f}", f"{batch * new / total:.0f}", f"{decode:.0f}"])
            print(rows[-1], flush=True)
    del model
    torch.cuda.empty_cache()

    # Our engine on the same weights: continuous batching, paged KV cache, CUDA-graph decode steps.
    engine_name = f"ours: paged engine ({n_req} requests, batch <= 64)"
    if over_budget():
        rows.append([engine_name, "<= 64", "128-512", "64-128", "-", "-",
                     f"skipped: over the {args.time_budget:.0f} s budget"])
    else:
        try:
            rows.append(_engine_row(n_req))
        except Exception as e:  # noqa: BLE001
            rows.append([engine_name, "<= 64", "128-512", "64-128", "-", "-", _error(e)])
        print(rows[-1], flush=True)
    notes = [
        "random bf16 model, 8B-like attention (32 q heads, 8 KV heads, head_dim 128, hidden 4096), 8 layers, vocab 32000",
        "generate rows: transformers greedy generate, batch without padding, DynamicCache; prefill = one forward "
        "of the prompt (CUDA events, median of 3); overall tok/s = batch*new / generate time; decode tok/s excludes "
        "the prefill time",
        "engine row: examples/generate_paged.py (requests arriving 16 per step, 64 running at most; LM head in "
        "float32)",
        f"total benchmark time {time.perf_counter() - t_start:.0f} s",
    ]
    for (name, batch, prompt), v in tok_s.items():
        if name.startswith("ours"):
            base = tok_s.get(("SDPA (default dispatch)", batch, prompt))
            if base:
                notes.append(f"decode speed-up vs SDPA default at batch {batch}, prompt {prompt}: {v / base:.2f}x")
    text = write_results("transformers backend: tokens/s vs SDPA (bench_transformers.py)", header, rows, notes)
    print(text)


if __name__ == "__main__":
    main()
