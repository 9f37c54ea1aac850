"""Inputs that reach a kernel: page ids, int64 narrowing, 2**31-key requests (issue 10, items 1 and 2).

The documented behaviour (flashinfer/utils.py, "Page tables and lengths that reach a kernel"):
- CPU page ids given to plan(): a negative id or one beyond int32 raises ValueError in plan(); the largest is
  compared with the cache's page count in run() (ValueError, no device sync).
- page ids already on the GPU: every kernel that reads through a page table bounds-checks each id; an invalid
  page is never read and its keys count as zeros (K = 0, V = 0). Device int64 ids outside [0, 2**31) become
  invalid pages (never a wrap onto another page). FLASHINFER_CHECK_INPUTS=1 makes run() check them (one sync)
  and raise ValueError naming the first invalid id.
- a request of more than MAX_KV_LEN (2**31 - 2**16) keys is refused by plan() with a ValueError naming it.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from flashinfer import prefill as prefill_mod
from flashinfer import utils
from flashinfer.jit import JITEnvironmentError
from reference import assert_close, attention, poisoned

MAX_KV_LEN = 2**31 - 2**16  # the documented limit (flashinfer.utils.MAX_KV_LEN)

# ------------------------------------------------------------------------------------------------ helpers


class Accepted(Exception):
    """plan() validated everything and reached its first host-to-device copy (CPU tests stop there)."""


@contextlib.contextmanager
def cpu_plan(monkeypatch):
    """Batch prefill plan() on the CPU up to its first device copy: the module, occupancy and SM count faked."""

    class FakeMod:  # (the batch prefill module's constants the planner reads)
        constants = {
            "query_tiles": 2,
            "query_tile_0": 64,
            "query_tile_1": 128,
            "kv_tile": 64,
            "work_fields": 5,
            "merge_fields": 4,
        }

    def stop(*args, **kwargs):
        raise Accepted

    monkeypatch.setattr(prefill_mod, "_module", lambda spec: FakeMod())
    monkeypatch.setattr(prefill_mod, "_occupancy", lambda *a: 2)
    monkeypatch.setattr(prefill_mod, "num_sms", lambda index: 132)
    monkeypatch.setattr(prefill_mod, "_device_capability", lambda index: (9, 0))  # (a Hopper: "auto" may take fa3_ws)
    monkeypatch.setattr(prefill_mod._BatchPrefillBase, "_to_device_int", stop)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)  # (no driver here)
    yield


def cpu_wrapper(cls, **kw):
    """A wrapper whose workspace is a fake CUDA tensor (metadata only): plan() validation runs on the CPU."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        ws = torch.empty(128 << 20, dtype=torch.uint8, device="cuda")
    return cls(ws, "NHD", **kw)


def paged_plan_args(kv_lens, page_size, indices=None, qo_lens=None):
    pages = [max(1, -(-n // page_size)) if n else 0 for n in kv_lens]
    indptr = [0]
    for p in pages:
        indptr.append(indptr[-1] + p)
    last = [n - (p - 1) * page_size if p else 0 for n, p in zip(kv_lens, pages)]
    qo_lens = qo_lens or [1] * len(kv_lens)
    qo = [0]
    for n in qo_lens:
        qo.append(qo[-1] + n)
    if indices is None:
        indices = torch.arange(indptr[-1], dtype=torch.int32)
    return (
        torch.tensor(qo, dtype=torch.int32),
        torch.tensor(indptr, dtype=torch.int32),
        indices,
        torch.tensor(last, dtype=torch.int32),
    )


# ------------------------------------------------------------------------------------------------ CPU


def test_page_ids_int32_refuses_what_it_cannot_narrow():
    ids, mx = utils.page_ids_int32(torch.tensor([3, 1, 7], dtype=torch.int64), 3, "ids")
    assert ids.dtype == torch.int32 and ids.tolist() == [3, 1, 7] and mx == 7
    with pytest.raises(ValueError, match=r"ids\[1\] = 2147483651 is not a page id"):
        utils.page_ids_int32(torch.tensor([0, 2**31 + 3], dtype=torch.int64), 2, "ids")
    with pytest.raises(ValueError, match=r"ids\[2\] = -1 is not a page id"):
        utils.page_ids_int32(torch.tensor([0, 1, -1], dtype=torch.int32), 3, "ids")
    # only the first `count` ids are the table's: a stale tail is not checked
    assert utils.page_ids_int32(torch.tensor([0, -5], dtype=torch.int32), 1, "ids")[1] == 0
    with pytest.raises(TypeError, match="int32 or int64"):
        utils.page_ids_int32(torch.tensor([0.0]), 1, "ids")


def test_int32_and_length_limits():
    assert utils.MAX_KV_LEN == MAX_KV_LEN
    utils.check_int32_values([0, 2**31 - 1], "x")
    with pytest.raises(ValueError, match=r"x\[1\] = 2147483648 does not fit int32"):
        utils.check_int32_values([0, 2**31], "x")
    utils.check_kv_lengths([MAX_KV_LEN])
    with pytest.raises(ValueError, match=r"request 1 has 2147483649 keys; at most"):
        utils.check_kv_lengths([5, 2**31 + 1])


def test_check_inputs_variable_is_strict(monkeypatch):
    monkeypatch.delenv("FLASHINFER_CHECK_INPUTS", raising=False)
    assert not utils.check_inputs_enabled()
    monkeypatch.setenv("FLASHINFER_CHECK_INPUTS", "1")
    assert utils.check_inputs_enabled()
    monkeypatch.setenv("FLASHINFER_CHECK_INPUTS", "2")
    with pytest.raises(JITEnvironmentError, match="FLASHINFER_CHECK_INPUTS"):
        utils.check_inputs_enabled()


def test_cache_bound_is_checked_from_the_host_max_without_a_sync():
    utils.check_page_ids_in_cache(None, 64, 63, "paged_kv_indices")
    with pytest.raises(ValueError, match="holds page id 100000 but paged_kv_cache has 64 pages"):
        utils.check_page_ids_in_cache(None, 64, 100000, "paged_kv_indices")


def test_paged_prefill_plan_checks_host_page_ids(monkeypatch):
    w = cpu_wrapper(prefill_mod.BatchPrefillWithPagedKVCacheWrapper)
    with cpu_plan(monkeypatch):
        qo, ip, idx, last = paged_plan_args([5, 40], 16)
        with pytest.raises(Accepted):
            w.plan(qo, ip, idx, last, 8, 2, 128, 16)
        bad = idx.clone()
        bad[2] = -3
        with pytest.raises(ValueError, match=r"paged_kv_indices\[2\] = -3 is not a page id"):
            w.plan(qo, ip, bad, last, 8, 2, 128, 16)
        # before: int64 ids were narrowed with .to(int32) and 2**31 + 3 arrived as -2147483645
        big = idx.to(torch.int64)
        big[1] = 2**31 + 3
        with pytest.raises(ValueError, match=r"paged_kv_indices\[1\] = 2147483651"):
            w.plan(qo, ip, big, last, 8, 2, 128, 16)


def test_prefill_plans_refuse_requests_past_the_32_bit_limit(monkeypatch):
    """Before: `value cannot be converted to type int32` (paged) or an overflowing kernel length."""
    w = cpu_wrapper(prefill_mod.BatchPrefillWithPagedKVCacheWrapper)
    ps = 1024
    pages = 2**31 // ps + 1  # 2**31 + 1024 - ps + 1 keys with a last page of 1 token
    with cpu_plan(monkeypatch):
        ip = torch.tensor([0, pages], dtype=torch.int32)
        idx = torch.zeros(pages, dtype=torch.int32)  # page 0 repeated
        with pytest.raises(ValueError, match=r"request 0 has 2147483649 keys; at most 2147418112"):
            w.plan(
                torch.tensor([0, 1], dtype=torch.int32), ip, idx, torch.tensor([1], dtype=torch.int32), 8, 2, 128, ps
            )
        r = cpu_wrapper(prefill_mod.BatchPrefillWithRaggedKVCacheWrapper)
        with pytest.raises(ValueError, match=r"kv_indptr\[1\] = 2147483648 does not fit int32"):
            r.plan(torch.tensor([0, 1]), torch.tensor([0, 2**31]), 8, 2, 128)
        with pytest.raises(ValueError, match=r"qo_indptr\[2\] = 4294967296 does not fit int32"):
            r.plan(torch.tensor([0, 1, 2**32]), torch.tensor([0, 1, 2]), 8, 2, 128)


def test_decode_planner_refuses_2_31_keys():
    """Before: at 2**31 + 1 keys the 32-bit planner scheduled nothing (output left uninitialised), at
    2**32 + 100 it attended to 100 keys."""
    from flashinfer._planning import paged_kv_lens
    from flashinfer.decode import host_schedule

    ps = 1024
    for keys in (2**31 + 1, 2**32 + 100, MAX_KV_LEN + 1):
        pages = -(-keys // ps)
        ip = torch.tensor([0, 3, 3 + pages], dtype=torch.int32)
        last = torch.tensor([ps, keys - (pages - 1) * ps], dtype=torch.int32)
        with pytest.raises(ValueError, match=r"code -8, at 1"):
            host_schedule(ip, last, ps, 8, 2, 132)
        assert int(paged_kv_lens(ip, last, ps)[1]) > MAX_KV_LEN  # (the lengths are int64: never wrapped)
    pages = MAX_KV_LEN // ps
    s = host_schedule(torch.tensor([0, pages], dtype=torch.int32), torch.tensor([ps], dtype=torch.int32), ps, 8, 2, 132)
    assert s["total_keys"] == MAX_KV_LEN


# ------------------------------------------------------------------------------------------------ GPU

NUM_PAGES = 64


def _paged_case(kv_lens, page_size, qo_lens, heads=(8, 2), dtype=torch.float16, seed=0):
    g = torch.Generator().manual_seed(seed)
    hq, hkv = heads
    cache = torch.randn(NUM_PAGES, 2, page_size, hkv, 128, generator=g).to(dtype).cuda()
    pages = [-(-n // page_size) for n in kv_lens]
    perm = torch.randperm(NUM_PAGES, generator=g)[: sum(pages)].to(torch.int32)
    qo, ip, _, last = paged_plan_args(kv_lens, page_size, qo_lens=qo_lens)
    q = torch.randn(int(qo[-1]), hq, 128, generator=g).to(dtype).cuda()
    return q, cache, qo, ip, perm, last


def _reference(q, cache, qo, ip, idx, last, page_size, causal=False):
    """Per request, float64; a page id outside the cache contributes zero keys (the documented output)."""
    outs = []
    idx = idx.cpu().to(torch.int64)
    for r in range(len(last)):
        ks, vs = [], []
        for j, p in enumerate(idx[int(ip[r]) : int(ip[r + 1])].tolist()):
            n = page_size if j < int(ip[r + 1]) - int(ip[r]) - 1 else int(last[r])
            if 0 <= p < cache.shape[0]:
                ks.append(cache[p, 0, :n])
                vs.append(cache[p, 1, :n])
            else:
                ks.append(torch.zeros_like(cache[0, 0, :n]))
                vs.append(torch.zeros_like(cache[0, 1, :n]))
        o, _ = attention(q[int(qo[r]) : int(qo[r + 1])], torch.cat(ks), torch.cat(vs), causal=causal)
        outs.append(o)
    return torch.cat(outs)


@pytest.mark.gpu
@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("causal", [False, True])
def test_paged_prefill_device_page_ids_out_of_cache_read_as_zero_keys(page_size, causal):
    """Before: one id of 100000 in a 64-page cache -> `unspecified launch failure` (a poisoned context)."""
    ws = torch.empty(128 << 20, dtype=torch.uint8, device="cuda")
    kv_lens, qo_lens = [3 * page_size + 1, 20 if page_size == 1 else 70, 5], [2, 17, 5]  # <= 64 pages
    q, cache, qo, ip, idx, last = _paged_case(kv_lens, page_size, qo_lens)
    bad = idx.clone()
    bad[1] = 100000
    bad[-1] = -7
    w = prefill_mod.BatchPrefillWithPagedKVCacheWrapper(ws, "NHD")
    w.plan(qo, ip, bad.cuda(), last, 8, 2, 128, page_size, causal=causal)
    out = poisoned(q.shape, q.dtype)
    w.run(q, cache, out=out)
    torch.cuda.synchronize()
    assert_close(out, _reference(q, cache, qo, ip, bad, last, page_size, causal))
    # int64 device ids beyond int32 never wrap onto a real page
    big = bad.to(torch.int64)
    big[0] = 2**32 + int(idx[0])
    w.plan(qo, ip, big.cuda(), last, 8, 2, 128, page_size, causal=causal)
    out = poisoned(q.shape, q.dtype)
    w.run(q, cache, out=out)
    torch.cuda.synchronize()
    ref_ids = bad.clone()
    ref_ids[0] = -1
    assert_close(out, _reference(q, cache, qo, ip, ref_ids, last, page_size, causal))


@pytest.mark.gpu
def test_paged_prefill_host_page_ids_checked_in_plan_and_run(monkeypatch):
    ws = torch.empty(128 << 20, dtype=torch.uint8, device="cuda")
    q, cache, qo, ip, idx, last = _paged_case([40, 9], 16, [3, 1])
    w = prefill_mod.BatchPrefillWithPagedKVCacheWrapper(ws, "NHD")
    bad = idx.clone()
    bad[2] = 100000
    w.plan(qo, ip, bad, last, 8, 2, 128, 16)
    with pytest.raises(ValueError, match="holds page id 100000 but paged_kv_cache has 64 pages"):
        w.run(q, cache)
    bad[2] = -1
    with pytest.raises(ValueError, match=r"paged_kv_indices\[2\] = -1"):
        w.plan(qo, ip, bad, last, 8, 2, 128, 16)
    # debug mode: device ids are checked in run() and the first invalid one is named
    bad[2] = 100000
    w.plan(qo, ip, bad.cuda(), last, 8, 2, 128, 16)
    monkeypatch.setenv("FLASHINFER_CHECK_INPUTS", "1")
    with pytest.raises(ValueError, match=r"paged_kv_indices\[2\] = 100000 is not a page of paged_kv_cache"):
        w.run(q, cache)
    torch.cuda.synchronize()


@pytest.mark.gpu
@pytest.mark.parametrize("use_tensor_cores,tma", [(False, False), (True, False), (False, True)])
def test_batch_decode_device_page_ids_out_of_cache_read_as_zero_keys(use_tensor_cores, tma, monkeypatch):
    """Before (tensor cores): `unspecified launch failure` with device ids; CUDA cores skipped them already. tma: the
    TMA decode kernel (32/8 heads, so that it serves them on Hopper) asks for such pages as page -1 (zeros)."""
    from flashinfer import BatchDecodeWithPagedKVCacheWrapper

    ws = torch.empty(128 << 20, dtype=torch.uint8, device="cuda")
    heads = (32, 8) if tma else (8, 2)
    q, cache, qo, ip, idx, last = _paged_case([40, 9, 100], 16, [1, 1, 1], heads=heads)
    bad = idx.clone()
    bad[1] = 100000
    bad[-1] = -2
    w = BatchDecodeWithPagedKVCacheWrapper(ws, "NHD", use_tensor_cores=use_tensor_cores)
    w._tma_decode = tma
    w.plan(ip, bad.cuda(), last, *heads, 128, 16)
    if tma:
        assert w.plan_stats["tma_kernel"] == int(torch.cuda.get_device_capability()[0] == 9)
    out = poisoned(q.shape, q.dtype)
    w.run(q, cache, out=out)
    torch.cuda.synchronize()
    assert_close(out, _reference(q, cache, qo, ip, bad, last, 16))
    monkeypatch.setenv("FLASHINFER_CHECK_INPUTS", "1")
    with pytest.raises(ValueError, match=r"\[1\] = 100000 is not a page of paged_kv_cache"):
        w.run(q, cache)
    torch.cuda.synchronize()


@pytest.mark.gpu
@pytest.mark.parametrize("use_tensor_cores", [False, True])
def test_batch_decode_plan_refuses_2_31_keys(use_tensor_cores):
    from flashinfer import BatchDecodeWithPagedKVCacheWrapper

    ws = torch.empty(128 << 20, dtype=torch.uint8, device="cuda")
    w = BatchDecodeWithPagedKVCacheWrapper(ws, "NHD", use_tensor_cores=use_tensor_cores)
    ps = 1024
    for keys in (2**31 + 1, 2**32 + 100):
        pages = -(-keys // ps)
        ip = torch.tensor([0, pages], dtype=torch.int32)
        last = torch.tensor([keys - (pages - 1) * ps], dtype=torch.int32)
        with pytest.raises(ValueError, match=f"request 0 has {keys} keys; at most"):
            w.plan(ip, torch.zeros(pages, dtype=torch.int32), last, 8, 2, 128, ps)
    torch.cuda.synchronize()


@pytest.mark.gpu
def test_paged_prefill_plan_refuses_2_31_keys():
    ws = torch.empty(128 << 20, dtype=torch.uint8, device="cuda")
    w = prefill_mod.BatchPrefillWithPagedKVCacheWrapper(ws, "NHD")
    ps = 1024
    pages = 2**31 // ps + 1
    with pytest.raises(ValueError, match="request 0 has 2147483649 keys; at most"):
        w.plan(
            torch.tensor([0, 1], dtype=torch.int32),
            torch.tensor([0, pages], dtype=torch.int32),
            torch.zeros(pages, dtype=torch.int32),
            torch.tensor([1], dtype=torch.int32),
            8,
            2,
            128,
            ps,
        )


@pytest.mark.gpu
@pytest.mark.parametrize("wgmma", [True, False])
def test_cascade_device_page_ids_out_of_cache_read_as_zero_keys(wgmma):
    """The shared level (wgmma kernel on Hopper, else batch prefill) and the last level (batch decode) with a
    device page id past the cache and a negative one: no CUDA error, and those pages count as zero keys."""
    import flashinfer
    from test_cascade import Levels, _check, _workspace

    unique = [1, 40, 300, 16]
    lv = Levels([[(len(unique), 2500)], [(1, n) for n in unique]], 16, 4, 128, torch.bfloat16, "NHD", spare=1)
    zero_page = int(torch.tensor(sorted(set(range(lv.cache.shape[0])) - set(torch.cat(lv.idx).tolist())))[0])
    lv.cache[zero_page].zero_()
    bad = [i.clone() for i in lv.idx]
    bad[0][7] = 100000
    bad[1][-1] = -3
    lv.idx[0][7] = zero_page  # the reference reads the zero page where the kernel skips the invalid one
    lv.idx[1][-1] = zero_page
    w = flashinfer.MultiLevelCascadeAttentionWrapper(2, _workspace(), "NHD")
    w._fallback = "never"
    w._shared_level_wgmma = wgmma
    w.plan(lv.qo, lv.kv, [b.cuda() for b in bad], lv.last, 32, 4, 128, 16, q_data_type=torch.bfloat16)
    q = torch.randn(len(unique), 32, 128, device="cuda").to(torch.bfloat16)
    _check(w, lv, q)
    torch.cuda.synchronize()


def test_cascade_levels_refuse_requests_past_the_32_bit_limit():
    from flashinfer.cascade import _check_levels

    ps = 1024
    pages = 2**31 // ps + 1
    qo = [torch.tensor([0, 1], dtype=torch.int32)] * 2
    kv = [torch.tensor([0, pages], dtype=torch.int32), torch.tensor([0, 1], dtype=torch.int32)]
    idx = [torch.zeros(pages, dtype=torch.int32), torch.zeros(1, dtype=torch.int32)]
    last = [torch.tensor([1], dtype=torch.int32)] * 2
    with pytest.raises(ValueError, match="level 0: request 0 has 2147483649 keys"):
        _check_levels(2, qo, kv, idx, last, ps)
