"""Serve a transformers model with this library's kernels: continuous batching on a paged KV cache.

Requests arrive over time (``--arrival`` per step), join the running batch when they fit, and leave when done;
new requests are prefilled together with ``BatchPrefillWithPagedKVCacheWrapper`` (their K/V written by
``append_paged_kv_cache``), running ones advance one token per step through a CUDA graph of the whole model step
around ``CUDAGraphBatchDecodeWithPagedKVCacheWrapper``. At the end every request is checked against the same
weights in float32 on transformers' SDPA backend, the request alone, teacher forced (the reference scores our
tokens, so every step is checked): at each step our final hidden state must be within bf16 noise of the
reference's, and our token must be the reference's argmax or within a near-tie of it on the reference's float32
logits (bounds stated and justified in examples/hf_common.py; divergences are reported). Throughput is printed.

Runs offline: a random Llama-style model with trained-like weights by default (examples/hf_common.py), or a local
checkpoint directory with ``--model DIR``.

    python examples/generate_paged.py                                   # 32 requests, batch up to 16
    python examples/generate_paged.py --batch 64 --requests 128 --profile 10
    python examples/generate_paged.py --model ~/models/Llama-3.2-1B --batch 32
    python examples/generate_paged.py --device cpu --size tiny          # the scheduler on the CPU (PyTorch stand-ins)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hf_common  # noqa: E402
import paged_engine  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _range(text: str):
    lo, _, hi = text.partition("-")
    lo, hi = int(lo), int(hi or lo)
    if not 1 <= lo <= hi:
        raise argparse.ArgumentTypeError(f"expected N or MIN-MAX with 1 <= MIN <= MAX, got {text!r}")
    return lo, hi


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="local checkpoint directory (config.json + safetensors); default: a random model")
    p.add_argument("--arch", choices=hf_common.ARCHS, default="llama", help="random model: Llama or Mistral style")
    p.add_argument("--size", choices=["tiny", "small", "bench"], default="small", help="random model size")
    p.add_argument("--sliding-window", type=int, help="random Mistral-style model: window (default 64)")
    p.add_argument("--requests", type=int, default=32, help="number of requests (default 32)")
    p.add_argument("--batch", type=int, default=16, help="most requests running at once (default 16)")
    p.add_argument("--prompt-len", type=_range, default=(16, 256), help="prompt lengths MIN-MAX (default 16-256)")
    p.add_argument("--new-tokens", type=_range, default=(16, 64), help="tokens to generate MIN-MAX (default 16-64)")
    p.add_argument("--arrival", type=int, default=4, help="requests arriving per step (0: all at once; default 4)")
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--max-prefill-tokens", type=int, default=8192, help="prompt tokens prefilled per step at most")
    p.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (cpu: PyTorch stand-ins for the kernels)")
    p.add_argument("--dtype", choices=list(DTYPES), help="default bf16 on CUDA, fp32 on the CPU")
    p.add_argument("--no-cuda-graph", action="store_true", help="run decode steps eagerly")
    p.add_argument("--check", type=int, default=-1, help="requests checked against float32 SDPA (default all; 0: none)")
    p.add_argument("--profile", type=int, default=0, metavar="STEPS",
                   help="profile this many decode steps at full batch (torch.profiler): share of GPU time in our kernels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the summary here as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def build_model(args, device: torch.device, dtype: torch.dtype):
    if args.model:
        return hf_common.load_model(args.model, dtype, device)
    config = hf_common.make_config(args.arch, args.size, sliding_window=args.sliding_window)
    return hf_common.random_model(config, dtype, device, seed=args.seed)


def make_requests(args, vocab_size: int):
    prompts = hf_common.random_prompts(args.requests, vocab_size, *args.prompt_len, seed=args.seed + 1)
    g = torch.Generator().manual_seed(args.seed + 2)
    lo, hi = args.new_tokens
    news = torch.randint(lo, hi + 1, (args.requests,), generator=g).tolist()
    per_step = args.arrival or args.requests
    return [paged_engine.Request(i, p, n, arrival_step=i // per_step) for i, (p, n) in enumerate(zip(prompts, news))]


class _Profiler:
    """Profiles ``steps`` decode steps once the batch is full: GPU time in this library's kernels (their names live
    in the ``flashinfer`` C++ namespace) against all GPU time of those steps. The profiled steps run without their
    CUDA graphs (same kernels, each visible to the profiler) and are not counted in the step-time statistics."""

    def __init__(self, steps: int, batch: int) -> None:
        self.steps, self.batch, self.seen, self.prof, self.result = steps, batch, 0, None, None

    def __call__(self, engine, n: int) -> None:
        """Called before each decode step (batch n) is launched."""
        if self.result is not None:
            return
        if self.prof is None:
            if n < self.batch:
                return
            self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                           torch.profiler.ProfilerActivity.CUDA])
            self.prof.start()
            engine.eager_decode = True
            self.t0 = time.perf_counter()
        elif n < self.batch or self.seen >= self.steps:  # stop before this step runs
            self.finish(engine)
            return
        self.seen += 1

    def finish(self, engine) -> None:
        if self.prof is None or self.result is not None:
            return
        torch.cuda.synchronize()
        wall = time.perf_counter() - self.t0
        self.prof.stop()
        engine.eager_decode = False
        self.result = self._summarize(wall, max(self.seen, 1))

    def _summarize(self, wall: float, steps: int) -> dict:
        ours = total = 0.0
        per_kernel = {}
        for e in self.prof.events():
            if e.device_type != torch.autograd.DeviceType.CUDA:
                continue
            t = getattr(e, "device_time_total", None)
            t = e.cuda_time_total if t is None else t
            total += t
            if "flashinfer" in e.name:
                ours += t
                short = e.name.split("(")[0].split("<")[0].replace("void ", "").replace("flashinfer::", "")
                per_kernel[short] = per_kernel.get(short, 0.0) + t
        return {"steps": steps, "eager_wall_ms_per_step": 1e3 * wall / steps, "gpu_ms_per_step": total / 1e3 / steps,
                "ours_ms_per_step": ours / 1e3 / steps, "ours_share_of_gpu": ours / total if total else 0.0,
                "ours_kernels_ms_per_step": {k: v / 1e3 / steps for k, v in sorted(per_kernel.items())}}


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            print("no CUDA device: run with --device cpu for the PyTorch stand-ins", file=sys.stderr)
            return 2
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        import flashinfer as ops
    else:
        ops = paged_engine.TorchPagedOps
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    torch.manual_seed(args.seed)

    model = build_model(args, device, dtype)
    runner = paged_engine.ModelRunner(model)
    requests = make_requests(args, runner.vocab_size)
    longest = max(len(r.prompt) + r.max_new_tokens for r in requests)
    pages_per_request = -(-longest // args.page_size)
    num_pages = args.batch * pages_per_request + 1
    t_setup = time.perf_counter()
    engine = paged_engine.Engine(runner, ops, args.batch, args.page_size, num_pages,
                                 max_prefill_tokens=args.max_prefill_tokens, use_graph=not args.no_cuda_graph)
    setup_s = time.perf_counter() - t_setup
    profiler = _Profiler(args.profile, args.batch) if args.profile and device.type == "cuda" else None
    engine.on_decode_step = profiler
    engine.record_hidden = bool(args.check)
    engine.submit(requests)
    total_new = sum(r.max_new_tokens for r in requests)

    bar = None
    if not args.quiet:
        try:
            from tqdm import tqdm

            bar = tqdm(total=total_new, unit="tok", desc="generating", file=sys.stderr)
        except ImportError:
            pass
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    done_tokens = 0
    while not engine.idle():
        engine.step()
        now = sum(len(r.output) for r in engine.running) + sum(len(r.output) for r in engine.finished)
        if bar is not None:
            bar.update(now - done_tokens)
            bar.set_postfix(running=len(engine.running), waiting=len(engine.waiting), refresh=False)
        done_tokens = now
    wall = time.perf_counter() - t0
    if bar is not None:
        bar.close()
    if profiler is not None:
        profiler.finish(engine)

    st = engine.stats
    full = engine.decode_times.get(args.batch, [])
    summary = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "model": args.model or f"random {args.arch} ({args.size})",
        "dtype": str(dtype).replace("torch.", ""), "requests": args.requests, "max_batch": args.batch,
        "cuda_graph": device.type == "cuda" and not args.no_cuda_graph, "steps": engine.step_count,
        "generated_tokens": done_tokens, "prefill_tokens": int(st["prefill_tokens"]), "wall_s": wall,
        "setup_s": setup_s, "tokens_per_s": done_tokens / wall,
        "decode_tokens_per_s": st["decode_tokens"] / st["decode_s"] if st["decode_s"] else 0.0,
        "decode_step_ms_median": {n: 1e3 * statistics.median(v) for n, v in sorted(engine.decode_times.items())},
        "decode_step_ms_at_max_batch": 1e3 * statistics.median(full) if full else None,
        "prefill_s": st["prefill_s"],
    }
    if profiler is not None:
        summary["profile"] = profiler.result or f"never reached {args.profile} decode steps at batch {args.batch}"

    print(f"{summary['generated_tokens']} tokens for {args.requests} requests in {wall:.2f} s on {summary['device']}: "
          f"{summary['tokens_per_s']:.0f} tok/s overall, {summary['decode_tokens_per_s']:.0f} tok/s in decode steps "
          f"({engine.step_count} steps; graphs/setup {setup_s:.1f} s)")
    if full:
        print(f"decode step at batch {args.batch}: {summary['decode_step_ms_at_max_batch']:.3f} ms median "
              f"over {len(full)} steps (plan + graph replay + argmax readback)")
    if isinstance(summary.get("profile"), dict):
        p = summary["profile"]
        kernels = ", ".join(f"{k} {v:.3f}" for k, v in p["ours_kernels_ms_per_step"].items())
        print(f"profile ({p['steps']} steps at batch {args.batch}): {p['gpu_ms_per_step']:.3f} ms GPU per step, "
              f"{p['ours_ms_per_step']:.3f} ms in our kernels = {100 * p['ours_share_of_gpu']:.1f}% ({kernels})")

    failures = 0
    if args.check:
        checked = sorted(engine.finished, key=lambda r: r.rid)
        if args.check > 0:
            checked = checked[: args.check]
        # The reference: the same weights in float32 on transformers' SDPA, scoring our tokens (teacher forced).
        ref = hf_common.float32_reference(model)
        tol = hf_common.HIDDEN_REL_TOL[dtype]
        near_ties = identical = 0
        worst = 0.0
        for r in checked:
            ref_hidden = hf_common.teacher_forced_hidden(ref, r.prompt, r.output)
            m = hf_common.check_sequence(r.output, torch.stack(r.hidden), ref_hidden, runner.lm_head_f32, tol)
            worst = max(worst, m.hidden_rel_err)
            identical += m.identical and m.ok
            near_ties += not m.identical and m.ok
            if not m.ok or not m.identical:
                print(f"  request {r.rid} (prompt {len(r.prompt)}, {r.max_new_tokens} new): {m.describe()}")
            failures += not m.ok
        del ref
        summary.update(checked=len(checked), identical=identical, near_tie_divergences=near_ties, mismatches=failures,
                       max_hidden_rel_err=worst, hidden_rel_tol=tol)
        verdict = "OK" if not failures else "FAILED"
        print(f"check vs transformers SDPA in float32 (teacher forced, every step): {identical}/{len(checked)} "
              f"requests chose the reference's argmax at every token, {near_ties} differ only at near-ties, "
              f"{failures} mismatched; largest hidden-state error {worst:.3g} (bound {tol:.3g}): {verdict}")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2, default=str))
    return 1 if failures else 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
