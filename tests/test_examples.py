"""The examples run as a user runs them (subprocesses): the paged continuous-batching engine and the
tensor-parallel example, each checking its own output against a reference (exit status 1 otherwise).

CPU: both with their PyTorch stand-ins for the kernels (scheduling, page tables, head split and gather, checks
against the float32 model on transformers SDPA), and the check itself failing on injected bugs. GPU: the real kernels; the batch-64 run reports decode-step time and the profiled
share of our kernels; the tensor-parallel run needs two GPUs and a fresh JIT cache (each module built once).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers", reason="the examples need transformers (pip install '.[transformers]')")

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def _env(**extra) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1",
               PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env.update(extra)
    return env


def _run(args, timeout: int, **env) -> subprocess.CompletedProcess:
    p = subprocess.run(args, cwd=ROOT, env=_env(**env), capture_output=True, text=True, timeout=timeout)
    print(p.stdout[-4000:])
    print(p.stderr[-4000:], file=sys.stderr)
    return p


def _torchrun(nproc: int, script: Path, *args: str, timeout: int, **env) -> subprocess.CompletedProcess:
    return _run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                 str(script), *args], timeout, **env)


# ------------------------------------------------------------------------------------------------- CPU runs


def test_generate_paged_cpu(tmp_path):
    out = tmp_path / "summary.json"
    p = _run([sys.executable, str(EXAMPLES / "generate_paged.py"), "--device", "cpu", "--size", "tiny",
              "--requests", "5", "--batch", "3", "--prompt-len", "3-20", "--new-tokens", "1-6", "--arrival", "2",
              "--page-size", "4", "--quiet", "--json", str(out)], timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    s = json.loads(out.read_text())
    assert s["checked"] == 5 and s["mismatches"] == 0
    assert s["generated_tokens"] >= s["requests"]  # at least one token each


@pytest.mark.parametrize("bug", ["softmax scale 10% too large", "decode step misses its own new key",
                                 "tokens handed to the wrong request"])
def test_generate_paged_check_catches_bugs(bug, tmp_path, monkeypatch, capsys):
    """The example's check (float32 reference, teacher forced) fails on a real bug in the attention or the
    scheduling, run in-process with a broken PyTorch stand-in."""
    monkeypatch.syspath_prepend(str(EXAMPLES))
    import generate_paged
    import paged_engine

    attend = paged_engine._attend
    if bug.startswith("softmax"):
        monkeypatch.setattr(paged_engine, "_attend", lambda q, k, v, s, w: attend(q, k, v, s * 1.1, w))
    elif bug.startswith("decode"):
        monkeypatch.setattr(paged_engine, "_attend", lambda q, k, v, s, w: attend(
            q, k[:-1], v[:-1], s, w) if q.shape[0] == 1 and k.shape[0] > 1 else attend(q, k, v, s, w))
    else:
        decode = paged_engine.Engine._decode

        def swapped(self, reqs):  # the first two running requests get each other's next token
            decode(self, reqs)
            if len(reqs) > 1:
                reqs[0].output[-1], reqs[1].output[-1] = reqs[1].output[-1], reqs[0].output[-1]

        monkeypatch.setattr(paged_engine.Engine, "_decode", swapped)
    out = tmp_path / "summary.json"
    rc = generate_paged.main(["--device", "cpu", "--size", "tiny", "--requests", "5", "--batch", "3", "--prompt-len",
                              "3-20", "--new-tokens", "4-8", "--arrival", "2", "--page-size", "4", "--quiet", "--json",
                              str(out)])
    s = json.loads(out.read_text())
    assert rc == 1 and s["mismatches"] > 0, (bug, s, capsys.readouterr().out[-2000:])


def test_tp_decode_cpu(tmp_path):
    out = tmp_path / "tp.json"
    p = _torchrun(2, EXAMPLES / "tp_decode.py", "--cpu", "--size", "tiny", "--requests", "3", "--batch", "2",
                  "--prompt-len", "3", "20", "--new-tokens", "4", "--json", str(out), timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    s = json.loads(out.read_text())
    assert s["ok"] and s["world_size"] == 2 and s["identical"] + s["near_tie_divergences"] == 3


# ------------------------------------------------------------------------------------------------- GPU runs


@pytest.mark.gpu
def test_generate_paged_gpu_small(tmp_path):
    out = tmp_path / "summary.json"
    p = _run([sys.executable, str(EXAMPLES / "generate_paged.py"), "--requests", "24", "--batch", "8",
              "--prompt-len", "1-300", "--new-tokens", "1-40", "--quiet", "--json", str(out)], timeout=900)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    s = json.loads(out.read_text())
    assert s["cuda_graph"] and s["checked"] == 24 and s["mismatches"] == 0


@pytest.mark.gpu
def test_generate_paged_gpu_batch64_profiled(tmp_path):
    out = tmp_path / "summary.json"
    p = _run([sys.executable, str(EXAMPLES / "generate_paged.py"), "--batch", "64", "--requests", "96",
              "--prompt-len", "16-512", "--new-tokens", "24-48", "--arrival", "32", "--profile", "5", "--quiet",
              "--json", str(out)], timeout=900)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    s = json.loads(out.read_text())
    assert s["checked"] == 96 and s["mismatches"] == 0
    assert s["decode_step_ms_at_max_batch"] is not None and s["decode_step_ms_at_max_batch"] > 0
    prof = s["profile"]
    assert isinstance(prof, dict), prof
    assert 0 < prof["ours_share_of_gpu"] < 1 and prof["ours_kernels_ms_per_step"]
    print(f"batch 64: decode step {s['decode_step_ms_at_max_batch']:.3f} ms, our kernels "
          f"{100 * prof['ours_share_of_gpu']:.1f}% of GPU time")


@pytest.mark.gpu
def test_tp_decode_two_gpus_fresh_cache(tmp_path):
    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs 2 GPUs (nvidia-h200-x2), found {torch.cuda.device_count()}")
    out = tmp_path / "tp.json"
    cache = tmp_path / "jit_cache"  # empty: both ranks need every module, exactly one builds each
    p = _torchrun(2, EXAMPLES / "tp_decode.py", "--json", str(out), timeout=1200, FLASHINFER_JIT_CACHE=str(cache))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    s = json.loads(out.read_text())
    assert s["ok"] and s["kernel_check"]["ok"] and not s["mismatches"]
    assert s["current_device_of_rank0"] == 0
    assert s["modules"] and all(len(ranks) == 1 for ranks in s["modules"].values()), s["modules"]
    assert not s["built_more_than_once"]
