"""Seeded fuzzing of the batch wrappers' plan()/run() (issue 10): random valid and invalid batch shapes, page
tables, lengths and options.

CPU (every CI run, no launches): plan() of BatchPrefillWith{Paged,Ragged}KVCacheWrapper (plain and CUDA-graph)
and of BatchDecodeWithPagedKVCacheWrapper's tensor-core path runs on CPU tensors up to its first device copy
(tests/test_input_checks.py: cpu_plan); the CUDA-core batch decode planner runs as a dry run (host_schedule).
A valid case must be accepted; an invalid one must raise ValueError, TypeError or NotImplementedError, never
anything else. (A last page of 0 tokens and causal batch prefill with more queries than keys are valid, as in
FlashInfer: tests/test_batch_decode.py and tests/test_prefill.py check their results.)

GPU (marked gpu): the same generator, run for real: a valid case matches the float64 reference (invalid page
ids on the device included: their keys count as zeros), an invalid one raises one of those exceptions, and
torch.cuda.synchronize() succeeds after every case (no CUDA error, ever).
"""

from __future__ import annotations

import dataclasses
import random
from typing import List, Optional

import pytest
import torch

from flashinfer import prefill as prefill_mod
from reference import assert_close, attention, poisoned
from test_input_checks import Accepted, cpu_plan, cpu_wrapper

PYTHON_ERRORS = (ValueError, TypeError, NotImplementedError)
CPU_CASES = 300
GPU_CASES = 120

# Invalid mutations: each makes a case that plan() (or run(), for the cache bound) must refuse.
MUTATIONS = (
    "indptr_not_from_zero",
    "indptr_decreasing",
    "last_page_len_over_page",
    "negative_page_id",
    "int64_page_id_past_int32",
    "indices_too_short",
    "qo_batch_mismatch",
    "float_indptr",
    "heads_not_multiple",
    "head_dim_unsupported",
    "page_size_zero",
    "indptr_2d",
    "indptr_past_int32",
    "kv_len_past_limit",
)


@dataclasses.dataclass
class Case:
    kind: str  # "paged" | "ragged" | "decode" | "decode_tc"
    graph: bool
    page_size: int
    qo_lens: List[int]
    kv_lens: List[int]
    num_qo_heads: int
    num_kv_heads: int
    head_dim: int
    causal: bool
    num_pages: int
    mutation: Optional[str]
    device_ids: bool
    bad_device_id: bool  # a device page id outside the cache (valid case: it reads as zero keys)


def make_case(rng: random.Random, kinds, valid: bool, head_dims=(64, 128, 256)) -> Case:
    kind = rng.choice(kinds)
    decode = kind.startswith("decode")
    batch = rng.randint(1, 6)
    page_size = rng.choice([1, 16]) if kind != "ragged" else 1
    kv_lens = [rng.choice([1, rng.randint(1, 40), rng.randint(1, 300)]) for _ in range(batch)]
    causal = rng.random() < 0.5 and not decode
    if decode:
        qo_lens = [1] * batch
    else:
        qo_lens = [rng.randint(1, min(kv, 64)) if causal else rng.randint(1, 64) for kv in kv_lens]
    hkv = rng.choice([1, 2, 4])
    pages = sum(-(-n // page_size) for n in kv_lens)
    c = Case(
        kind,
        rng.random() < 0.3 and kind != "decode",
        page_size,
        qo_lens,
        kv_lens,
        hkv * rng.choice([1, 4]),
        hkv,
        rng.choice(head_dims),
        causal,
        pages + rng.randint(0, 8),
        None,
        False,
        False,
    )
    if not valid:
        choices = [
            m
            for m in MUTATIONS
            if not (
                kind == "ragged"
                and m
                in (
                    "last_page_len_over_page",
                    "negative_page_id",
                    "int64_page_id_past_int32",
                    "indices_too_short",
                    "page_size_zero",
                    "kv_len_past_limit",
                )
            )
        ]
        if decode:
            choices = [m for m in choices if m != "qo_batch_mismatch"]
        c.mutation = rng.choice(choices)
    return c


def tables(c: Case, rng: random.Random):
    """Host arrays of the case (int32 CPU tensors), the mutation applied."""
    ps = c.page_size
    pages = [-(-n // ps) for n in c.kv_lens]
    kv_indptr = [0]
    for p in pages if c.kind != "ragged" else c.kv_lens:
        kv_indptr.append(kv_indptr[-1] + p)
    last = [n - (p - 1) * ps for n, p in zip(c.kv_lens, pages)]
    qo = [0]
    for n in c.qo_lens:
        qo.append(qo[-1] + n)
    ids = torch.tensor(rng.sample(range(c.num_pages), sum(pages)), dtype=torch.int32)
    args = dict(
        qo=torch.tensor(qo, dtype=torch.int32),
        kv=torch.tensor(kv_indptr, dtype=torch.int32),
        ids=ids,
        last=torch.tensor(last, dtype=torch.int32),
        page_size=ps,
        hq=c.num_qo_heads,
        hkv=c.num_kv_heads,
        d=c.head_dim,
        causal=c.causal,
    )
    m = c.mutation
    if m == "indptr_not_from_zero":
        args["kv"] = args["kv"] + 1
    elif m == "indptr_decreasing":
        k = args["kv"].clone()
        k[1] = -1
        args["kv"] = k
    elif m == "last_page_len_over_page":
        args["last"][-1] = ps + 1
    elif m == "negative_page_id":
        args["ids"][rng.randrange(len(ids))] = -rng.randint(1, 2**31)
    elif m == "int64_page_id_past_int32":
        ids64 = args["ids"].to(torch.int64)
        ids64[rng.randrange(len(ids))] = 2**31 + rng.randint(0, 2**33)
        args["ids"] = ids64
    elif m == "indices_too_short":
        args["ids"] = args["ids"][:-1]
    elif m == "qo_batch_mismatch":
        args["qo"] = args["qo"][:-1] if len(args["qo"]) > 2 else torch.tensor([0, 1, 2], dtype=torch.int32)
    elif m == "float_indptr":
        args["kv"] = args["kv"].float()
    elif m == "heads_not_multiple":
        args["hkv"] = max(2, args["hkv"])
        args["hq"] = args["hkv"] * 2 + 1
    elif m == "head_dim_unsupported":
        args["d"] = rng.choice([0, 48, 96, 100, 512])
    elif m == "page_size_zero":
        args["page_size"] = rng.choice([0, -16])
    elif m == "indptr_2d":
        args["kv"] = args["kv"].unsqueeze(0)
    elif m == "indptr_past_int32":
        args["kv"] = args["kv"].to(torch.int64) + torch.tensor([0] + [2**32] * (len(args["kv"]) - 1))
    elif m == "kv_len_past_limit":  # page 0 repeated: 2**31 + 1 keys in request 0
        big = 2**31 // 1024 + 1
        args.update(
            page_size=1024,
            kv=torch.tensor([0, big], dtype=torch.int32),
            last=torch.tensor([1], dtype=torch.int32),
            ids=torch.zeros(big, dtype=torch.int32),
            qo=torch.tensor([0, 1], dtype=torch.int32),
        )
    return args


# ------------------------------------------------------------------------------------------------ CPU


def _cpu_plan(c: Case, a) -> None:
    """plan() of the case on the CPU: returns if accepted (Accepted raised at the first device copy)."""
    from flashinfer._planning import paged_kv_lens
    from flashinfer.decode import host_schedule
    from flashinfer.utils import check_kv_lengths, host_int32

    try:
        if c.kind == "ragged":
            kw = {}
            if c.graph:
                kw = dict(
                    use_cuda_graph=True, qo_indptr_buf=_fake_int(len(a["qo"])), kv_indptr_buf=_fake_int(len(a["kv"]))
                )
            w = cpu_wrapper(prefill_mod.BatchPrefillWithRaggedKVCacheWrapper, **kw)
            if c.graph:
                w._int_buf = _fake_int(1)
            w.plan(a["qo"], a["kv"], a["hq"], a["hkv"], a["d"], causal=a["causal"])
        elif c.kind in ("paged", "decode_tc"):
            kw = {}
            if c.graph:
                n = max(len(a["qo"]), len(a["kv"]))
                kw = dict(
                    use_cuda_graph=True,
                    qo_indptr_buf=_fake_int(n),
                    paged_kv_indptr_buf=_fake_int(n),
                    paged_kv_indices_buf=_fake_int(max(1, a["ids"].numel())),
                    paged_kv_last_page_len_buf=_fake_int(n),
                )
            w = cpu_wrapper(prefill_mod.BatchPrefillWithPagedKVCacheWrapper, **kw)
            if c.graph:
                w._int_buf = _fake_int(1)  # (allocated on the device by the first graph plan)
            if c.kind == "decode_tc":  # the tensor-core decode path: its page-table checks, then this plan
                if (
                    isinstance(a["kv"], torch.Tensor)
                    and a["kv"].dim() == 1
                    and a["kv"].dtype in (torch.int32, torch.int64)
                ):
                    ip, lp = host_int32(a["kv"], "indptr"), host_int32(a["last"], "last_page_len")
                    if a["page_size"] > 0 and ip.numel() == lp.numel() + 1:
                        check_kv_lengths(paged_kv_lens(ip, lp, a["page_size"]).tolist())
            w.plan(a["qo"], a["kv"], a["ids"], a["last"], a["hq"], a["hkv"], a["d"], a["page_size"], causal=a["causal"])
        else:  # CUDA-core decode: the planner's dry run, and the host checks of page ids plan() makes
            ip, lp = host_int32(a["kv"], "indptr"), host_int32(a["last"], "last_page_len")
            if ip.numel() != lp.numel() + 1:
                raise ValueError("indptr must have batch_size + 1 elements")
            if a["ids"].numel() < int(ip[-1]):
                raise ValueError("indices shorter than indptr[-1]")
            host_int32(a["ids"], "indices")
            if int(a["ids"].min()) < 0:
                raise ValueError("negative page id")
            if a["page_size"] <= 0 or a["hkv"] <= 0 or a["hq"] % a["hkv"] or a["d"] not in (64, 128, 256):
                raise ValueError("bad configuration")
            host_schedule(ip, lp, a["page_size"], a["hq"], a["hkv"], 132)
            return
    except Accepted:
        return
    raise AssertionError("plan() neither accepted the case nor raised")


def _fake_int(n):
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        return torch.empty(max(n, 1), dtype=torch.int32, device="cuda")


@pytest.mark.parametrize("seed", range(3))
def test_fuzz_plan_on_the_cpu(monkeypatch, seed):
    rng = random.Random(1000 + seed)
    kinds = ("paged", "ragged", "decode", "decode_tc")
    counts = {"valid": 0, "invalid": 0}
    with cpu_plan(monkeypatch):
        for i in range(CPU_CASES // 3):
            valid = rng.random() < 0.5
            c = make_case(rng, kinds, valid)
            a = tables(c, rng)
            try:
                _cpu_plan(c, a)
            except PYTHON_ERRORS as e:
                assert not valid, f"case {i} (seed {seed}) is valid but plan() raised {type(e).__name__}: {e}\n{c}"
                counts["invalid"] += 1
                continue
            except Exception as e:  # noqa: BLE001 - anything else is the defect this test looks for
                raise AssertionError(
                    f"case {i} (seed {seed}): {type(e).__name__} is not a Python input error: {e}\n{c}"
                ) from e
            assert valid, f"case {i} (seed {seed}): plan() accepted the invalid case {c.mutation}\n{c}"
            counts["valid"] += 1
    assert counts["valid"] > 10 and counts["invalid"] > 10, counts


# ------------------------------------------------------------------------------------------------ GPU


def _reference(q, k_cache, v_cache, a, kind):
    """float64 attention per request; pages outside the cache count as zero keys."""
    qo, kv = a["qo"].tolist(), a["kv"].tolist()
    outs = []
    for r in range(len(qo) - 1):
        if kind == "ragged":
            k, v = k_cache[kv[r] : kv[r + 1]], v_cache[kv[r] : kv[r + 1]]
        else:
            ks, vs = [], []
            ids = a["ids"].tolist()[kv[r] : kv[r + 1]]
            for j, p in enumerate(ids):
                n = a["page_size"] if j < len(ids) - 1 else int(a["last"][r])
                ok = 0 <= p < k_cache.shape[0]
                ks.append(k_cache[p, :n] if ok else torch.zeros_like(k_cache[0, :n]))
                vs.append(v_cache[p, :n] if ok else torch.zeros_like(v_cache[0, :n]))
            k, v = torch.cat(ks), torch.cat(vs)
        o, _ = attention(q[qo[r] : qo[r + 1]], k, v, causal=a["causal"])
        outs.append(o)
    return torch.cat(outs)


@pytest.mark.gpu
@pytest.mark.parametrize("seed", range(4))
def test_fuzz_plan_and_run_on_the_gpu(seed):
    from flashinfer import BatchDecodeWithPagedKVCacheWrapper

    rng = random.Random(2000 + seed)
    ws = torch.empty(128 << 20, dtype=torch.uint8, device="cuda")
    for i in range(GPU_CASES // 4):
        valid = rng.random() < 0.6
        # specs in the test preset: f16 d128 (prefill, CUDA-core decode), bf16 d128 (tensor-core decode)
        c = make_case(rng, ("paged", "ragged", "decode", "decode_tc"), valid, head_dims=(128,))
        dtype = torch.bfloat16 if c.kind == "decode_tc" else torch.float16
        a = tables(c, rng)
        # ids on the device are bounded by the kernels, not refused: the id mutations stay on the host
        on_device = rng.random() < 0.5 and c.mutation != "negative_page_id"
        if valid and on_device and c.kind != "ragged" and a["ids"].numel() and rng.random() < 0.5:
            a["ids"][rng.randrange(a["ids"].numel())] = rng.choice([-5, c.num_pages, 100000])  # read as zero keys
        ids = a["ids"].cuda() if on_device and a["ids"].dtype == torch.int32 else a["ids"]
        where = f"case {i} (seed {seed}, {c.kind}, graph {c.graph}, mutation {c.mutation}, device ids {on_device})"
        try:
            if c.kind == "ragged":
                total = int(a["kv"][-1]) if a["kv"].dim() == 1 and a["kv"].numel() else 0
                total = total if 0 <= total <= 1 << 20 else 0  # (an invalid indptr: plan() refuses it)
                k = torch.randn(max(total, 1), c.num_kv_heads, 128, device="cuda").to(dtype)[:total]
                v = torch.randn_like(k)
                w = prefill_mod.BatchPrefillWithRaggedKVCacheWrapper(ws, "NHD")
                w.plan(a["qo"], a["kv"], a["hq"], a["hkv"], a["d"], causal=a["causal"], q_data_type=dtype)
                kc, vc = k, v
            else:
                ps = max(a["page_size"], 1)
                cache = torch.randn(c.num_pages, 2, ps, c.num_kv_heads, 128, device="cuda").to(dtype)
                kc, vc = cache[:, 0], cache[:, 1]  # for the reference; the wrappers take the 5-D cache
                if c.kind == "paged":
                    kw = {}
                    if c.graph:
                        n = max(len(a["qo"]), len(a["kv"])) if a["kv"].dim() == 1 else 8
                        kw = dict(
                            use_cuda_graph=True,
                            qo_indptr_buf=torch.empty(n, dtype=torch.int32, device="cuda"),
                            paged_kv_indptr_buf=torch.empty(n, dtype=torch.int32, device="cuda"),
                            paged_kv_indices_buf=torch.empty(
                                max(1, a["ids"].numel()), dtype=torch.int32, device="cuda"
                            ),
                            paged_kv_last_page_len_buf=torch.empty(n, dtype=torch.int32, device="cuda"),
                        )
                    w = prefill_mod.BatchPrefillWithPagedKVCacheWrapper(ws, "NHD", **kw)
                    w.plan(
                        a["qo"],
                        a["kv"],
                        ids,
                        a["last"],
                        a["hq"],
                        a["hkv"],
                        a["d"],
                        a["page_size"],
                        causal=a["causal"],
                        q_data_type=dtype,
                    )
                else:
                    w = BatchDecodeWithPagedKVCacheWrapper(ws, "NHD", use_tensor_cores=c.kind == "decode_tc")
                    w.plan(a["kv"], ids, a["last"], a["hq"], a["hkv"], a["d"], a["page_size"], q_data_type=dtype)
            nq = int(a["qo"][-1]) if c.kind != "decode" and c.kind != "decode_tc" else len(a["last"])
            q = torch.randn(nq, a["hq"], 128, device="cuda").to(dtype)
            out = poisoned(q.shape, dtype)
            if c.kind == "ragged":
                w.run(q, kc, vc, out=out)
            else:
                w.run(q, cache, out=out)
        except PYTHON_ERRORS as e:
            torch.cuda.synchronize()  # a refused case leaves the context healthy
            host_bad_id = not on_device and c.kind != "ragged" and bool((a["ids"] >= c.num_pages).any())
            assert not valid or host_bad_id, f"{where}: valid but raised {type(e).__name__}: {e}"
            continue
        torch.cuda.synchronize()
        assert valid, f"{where}: the invalid case was accepted"
        assert_close(out, _reference(q, kc, vc, a, c.kind), what=where)
