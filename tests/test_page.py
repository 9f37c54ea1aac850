"""Paged KV cache helpers: append_paged_kv_cache (both layouts, both cache forms, 16-bit and fp8 caches, streams,
devices, bad input; an fp8 append read back by batch decode), get_batch_indices_positions, get_seq_lens; and on
the CPU, spec naming, fp8 validation (fake CUDA tensors) and real builds of the append module."""

from __future__ import annotations

import pytest
import torch

import flashinfer
from flashinfer.page import PageAppendSpec
from reference import LSE_TOL, assert_close, attention, poisoned

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def _random(shape, dtype, device="cuda"):
    """Random values in ``dtype`` (fp8: float values rounded to it; torch has no fp8 randn)."""
    return torch.randn(shape, device=device).to(dtype)


def _bits(t):
    """What equality compares: the bytes of an fp8 tensor (exact copies), the tensor itself otherwise."""
    return t.view(torch.uint8) if t.element_size() == 1 else t


def _table(lens, page_size, num_pages, device, generator=None):
    """A CSR page table over a random permutation of the pages: (indptr, indices, last_page_len) int32."""
    pages = [(n + page_size - 1) // page_size for n in lens]
    perm = torch.randperm(num_pages, generator=generator)[: sum(pages)]
    indptr = torch.tensor([0] + torch.tensor(pages).cumsum(0).tolist(), dtype=torch.int32)
    last = torch.tensor([n - (p - 1) * page_size for n, p in zip(lens, pages)], dtype=torch.int32)
    return indptr.to(device), perm.to(torch.int32).to(device), last.to(device)


def _cache(num_pages, page_size, heads, dim, dtype, layout, form, device="cuda"):
    shape = (num_pages, page_size, heads, dim) if layout == "NHD" else (num_pages, heads, page_size, dim)
    if form == "single":
        full = _random((num_pages, 2, *shape[1:]), dtype, device)
        return full, full[:, 0], full[:, 1]
    k = _random(shape, dtype, device)
    v = _random(shape, dtype, device)
    return (k, v), k, v


def _slot(t, layout, page, s):
    return t[page, s] if layout == "NHD" else t[page, :, s]


# ----------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("form", ["single", "tuple"])
@pytest.mark.parametrize("page_size", [1, 16, 64])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, *FP8_DTYPES], ids=str)
def test_append_lands_where_the_page_table_says(layout, form, page_size, dtype):
    heads, dim = 4, 128
    old_lens = [0, 5, 16, 100, 1]
    new_lens = [3, 11, 1, 40, 64]
    seq_lens = [o + n for o, n in zip(old_lens, new_lens)]
    num_pages = sum((n + page_size - 1) // page_size for n in seq_lens) + 7
    indptr, indices, last = _table(seq_lens, page_size, num_pages, "cuda")
    cache, k_cache, v_cache = _cache(num_pages, page_size, heads, dim, dtype, layout, form)
    k_before, v_before = k_cache.clone(), v_cache.clone()
    nnz = sum(new_lens)
    key = _random((nnz, heads, dim), dtype)  # (fp8: already quantised, as FlashInfer expects)
    value = _random((nnz, heads, dim), dtype)
    append_indptr = torch.tensor([0] + torch.tensor(new_lens).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    sl = flashinfer.get_seq_lens(indptr, last, page_size)
    assert sl.tolist() == seq_lens
    bi, pos = flashinfer.get_batch_indices_positions(append_indptr, sl, nnz)
    flashinfer.append_paged_kv_cache(key, value, bi, pos, cache, indices, indptr, last, kv_layout=layout)
    torch.cuda.synchronize()
    written = torch.zeros(num_pages, page_size, dtype=torch.bool)
    ip, idx = indptr.tolist(), indices.tolist()
    i = 0
    for r, (o, n) in enumerate(zip(old_lens, new_lens)):
        for t in range(o, o + n):
            page = idx[ip[r] + t // page_size]
            s = t % page_size
            assert torch.equal(_bits(_slot(k_cache, layout, page, s)), _bits(key[i])), (r, t)
            assert torch.equal(_bits(_slot(v_cache, layout, page, s)), _bits(value[i])), (r, t)
            written[page, s] = True
            i += 1
    # Every other slot is untouched.
    for page in range(num_pages):
        for s in range(page_size):
            if not written[page, s]:
                assert torch.equal(_bits(_slot(k_cache, layout, page, s)), _bits(_slot(k_before, layout, page, s)))
                assert torch.equal(_bits(_slot(v_cache, layout, page, s)), _bits(_slot(v_before, layout, page, s)))


@pytest.mark.gpu
@pytest.mark.parametrize("kv_dtype", FP8_DTYPES, ids=str)
def test_append_fp8_then_decode_reads_it(kv_dtype):
    """An engine's fp8 decode step: the new tokens' K/V quantised (x / scale), appended to the fp8 cache, then batch
    decode with k_scale/v_scale, against the reference on the cache's dequantised values (the same fp8 bytes)."""
    page_size, hq, hkv, d, k_scale, v_scale = 16, 32, 8, 128, 0.5, 1.5
    old_lens, new_lens = [0, 15, 16, 4000], [1, 1, 1, 1]
    seq_lens = [o + n for o, n in zip(old_lens, new_lens)]
    num_pages = sum((n + page_size - 1) // page_size for n in seq_lens) + 3
    indptr, indices, last = _table(seq_lens, page_size, num_pages, "cuda")
    cache, k_cache, v_cache = _cache(num_pages, page_size, hkv, d, kv_dtype, "NHD", "tuple")
    nnz = sum(new_lens)
    key = (torch.randn(nnz, hkv, d, device="cuda") / k_scale).to(kv_dtype)
    value = (torch.randn(nnz, hkv, d, device="cuda") / v_scale).to(kv_dtype)
    append_indptr = torch.tensor([0] + torch.tensor(new_lens).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    bi, pos = flashinfer.get_batch_indices_positions(
        append_indptr, flashinfer.get_seq_lens(indptr, last, page_size), nnz
    )
    flashinfer.append_paged_kv_cache(key, value, bi, pos, cache, indices, indptr, last)
    q = torch.randn(len(seq_lens), hq, d, device="cuda", dtype=torch.bfloat16)
    w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(torch.empty(64 << 20, dtype=torch.uint8, device="cuda"))
    w.plan(indptr.cpu(), indices, last.cpu(), hq, hkv, d, page_size, q_data_type=torch.bfloat16, kv_data_type=kv_dtype)
    out = poisoned((len(seq_lens), hq, d), torch.bfloat16)
    lse = poisoned((len(seq_lens), hq), torch.float32)
    w.run(q, cache, k_scale=k_scale, v_scale=v_scale, out=out, lse=lse)
    k_ref, v_ref = k_cache.double() * k_scale, v_cache.double() * v_scale
    ip = indptr.tolist()
    for r, n in enumerate(seq_lens):
        ids = indices[ip[r] : ip[r + 1]].long()
        ref, ref_lse = attention(q[r : r + 1], k_ref[ids].reshape(-1, hkv, d)[:n], v_ref[ids].reshape(-1, hkv, d)[:n])
        assert torch.equal(_bits(k_cache[int(ids[-1]), (n - 1) % page_size]), _bits(key[r]))  # the appended token
        assert_close(out[r], ref[0], what=f"request {r}")
        torch.testing.assert_close(lse[r].double(), ref_lse[0], atol=LSE_TOL[0], rtol=LSE_TOL[1])


@pytest.mark.gpu
def test_append_runs_on_current_stream_of_tensor_device():
    page_size, heads, dim = 16, 8, 128
    indptr, indices, last = _table([300], page_size, 40, "cuda")
    cache, k_cache, v_cache = _cache(40, page_size, heads, dim, torch.bfloat16, "NHD", "tuple")
    key = torch.randn(300, heads, dim, device="cuda", dtype=torch.bfloat16)
    src = torch.randn_like(key)
    bi = torch.zeros(300, dtype=torch.int32, device="cuda")
    pos = torch.arange(300, dtype=torch.int32, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(20_000_000)  # a launch on another stream would copy the stale key
        key.copy_(src)
        flashinfer.append_paged_kv_cache(key, key, bi, pos, cache, indices, indptr, last)
    side.synchronize()
    ip = indices.tolist()
    for t in (0, 17, 299):
        assert torch.equal(k_cache[ip[t // page_size], t % page_size], src[t])


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_append_on_second_device_while_first_is_current():
    torch.cuda.set_device(0)
    dev = torch.device("cuda:1")
    indptr, indices, last = _table([50, 7], 16, 10, dev)
    cache, k_cache, _ = _cache(10, 16, 2, 64, torch.float16, "HND", "single", device=dev)
    key = torch.randn(57, 2, 64, device=dev, dtype=torch.float16)
    sl = flashinfer.get_seq_lens(indptr, last, 16)
    bi, pos = flashinfer.get_batch_indices_positions(torch.tensor([0, 50, 57], dtype=torch.int32, device=dev), sl, 57)
    flashinfer.append_paged_kv_cache(key, key, bi, pos, cache, indices, indptr, last, kv_layout="HND")
    torch.cuda.synchronize(dev)
    assert torch.equal(k_cache[indices[3].item(), :, 49 % 16], key[49])
    assert torch.cuda.current_device() == 0


@pytest.mark.gpu
def test_append_skips_entries_outside_the_page_table():
    indptr, indices, last = _table([16], 16, 4, "cuda")
    cache, k_cache, v_cache = _cache(4, 16, 2, 64, torch.float16, "NHD", "tuple")
    before = k_cache.clone()
    key = torch.randn(3, 2, 64, device="cuda", dtype=torch.float16)
    bi = torch.tensor([5, 0, -1], dtype=torch.int32, device="cuda")  # request out of range
    pos = torch.tensor([0, 16, 0], dtype=torch.int32, device="cuda")  # position beyond its pages
    flashinfer.append_paged_kv_cache(key, key, bi, pos, cache, indices, indptr, last)
    torch.cuda.synchronize()
    assert torch.equal(k_cache, before)


@pytest.mark.gpu
def test_append_bad_input_raises():
    indptr, indices, last = _table([16], 16, 4, "cuda")
    cache, _, _ = _cache(4, 16, 2, 64, torch.float16, "NHD", "tuple")
    key = torch.randn(3, 2, 64, device="cuda", dtype=torch.float16)
    bi = torch.zeros(3, dtype=torch.int32, device="cuda")
    pos = torch.arange(3, dtype=torch.int32, device="cuda")
    with pytest.raises(TypeError, match="int32"):
        flashinfer.append_paged_kv_cache(key, key, bi.long(), pos, cache, indices, indptr, last)
    with pytest.raises(TypeError, match="dtype"):
        flashinfer.append_paged_kv_cache(key.bfloat16(), key.bfloat16(), bi, pos, cache, indices, indptr, last)
    with pytest.raises(ValueError, match="heads"):
        flashinfer.append_paged_kv_cache(key[:, :1], key[:, :1], bi, pos, cache, indices, indptr, last)
    with pytest.raises(ValueError, match="elements"):
        flashinfer.append_paged_kv_cache(key, key, bi[:2], pos, cache, indices, indptr, last)
    with pytest.raises(ValueError, match="one device"):
        flashinfer.append_paged_kv_cache(key, key, bi.cpu(), pos, cache, indices, indptr, last)
    with pytest.raises(ValueError, match="5-D"):
        flashinfer.append_paged_kv_cache(key, key, bi, pos, cache[0], indices, indptr, last)
    torch.cuda.synchronize()


# ----------------------------------------------------------------------------------------------- CPU


def test_get_seq_lens_and_batch_indices_positions_on_cpu():
    indptr = torch.tensor([0, 1, 4, 4, 6], dtype=torch.int32)
    last = torch.tensor([3, 16, 1, 2], dtype=torch.int32)
    # FlashInfer's formula: a request with no pages counts its last_page_len (the kernels give it no keys)
    assert flashinfer.get_seq_lens(indptr, last, 16).tolist() == [3, 16 * 2 + 16, 1, 16 + 2]
    append_indptr = torch.tensor([0, 2, 2, 5], dtype=torch.int32)
    seq_lens = torch.tensor([10, 4, 3], dtype=torch.int32)
    bi, pos = flashinfer.get_batch_indices_positions(append_indptr, seq_lens, 5)
    assert bi.dtype == pos.dtype == torch.int32
    assert bi.tolist() == [0, 0, 2, 2, 2]
    assert pos.tolist() == [8, 9, 0, 1, 2]
    out_bi, out_pos = torch.full((5,), -7, dtype=torch.int32), torch.full((5,), -7, dtype=torch.int32)
    bi2, pos2 = flashinfer.get_batch_indices_positions(append_indptr, seq_lens, 5, out_bi, out_pos)
    assert bi2 is out_bi and pos2 is out_pos and bi2.tolist() == bi.tolist() and pos2.tolist() == pos.tolist()
    with pytest.raises(ValueError, match="positions"):
        flashinfer.get_batch_indices_positions(append_indptr, seq_lens, 5, positions=torch.zeros(4, dtype=torch.int32))


def test_page_append_spec_names():
    specs = PageAppendSpec.expand()
    assert len({s.name() for s in specs}) == len(specs) == 3 * 4  # head dims x (bf16, f16, e4m3, e5m2)
    assert PageAppendSpec(128, "bf16").name() == "page_append_kv-bf16_d128"
    assert PageAppendSpec(128, "e4m3").name() == "page_append_kv-e4m3_d128"
    assert PageAppendSpec(64, "e5m2").render_vars()["dtype_kv"] == "__nv_fp8_e5m2"
    s = PageAppendSpec(64, "f16")
    assert PageAppendSpec.from_json(s.to_json()) == s


def test_fp8_append_launches_the_fp8_module_and_refuses_unquantised_input(monkeypatch):
    from fake_cuda import cuda, fake_cuda

    with fake_cuda(monkeypatch) as rec:
        i32 = lambda *v: cuda(torch.tensor(v, dtype=torch.int32))  # noqa: E731
        cache = cuda(_random((4, 2, 16, 2, 128), torch.float8_e4m3fn, "cpu"))
        key = cuda(_random((3, 2, 128), torch.float8_e4m3fn, "cpu"))
        table = (i32(0, 0, 0), i32(0, 1, 2), cache, i32(1, 2), i32(0, 2), i32(3))
        flashinfer.append_paged_kv_cache(key, key, *table)
        ((_, kw),) = rec.launches("flashinfer_append_paged_kv")
        assert kw["_spec"] == PageAppendSpec(128, "e4m3") and kw["stride_n"] == 2 * 128
        with pytest.raises(TypeError, match="already quantised"):
            flashinfer.append_paged_kv_cache(key.bfloat16(), key.bfloat16(), *table)
        with pytest.raises(TypeError, match="already quantised"):
            flashinfer.append_paged_kv_cache(key.to(torch.float8_e5m2), key.to(torch.float8_e5m2), *table)
        odd = cuda(_random((4, 2, 16, 2, 136), torch.float8_e4m3fn, "cpu"))[..., :128]
        with pytest.raises(ValueError, match="multiple of 16 elements"):
            flashinfer.append_paged_kv_cache(key, key, *table[:2], odd, *table[3:])


def test_append_refuses_cpu_cache():
    cache = torch.zeros(4, 2, 16, 2, 64, dtype=torch.float16)
    key = torch.zeros(1, 2, 64, dtype=torch.float16)
    i = torch.zeros(1, dtype=torch.int32)
    with pytest.raises(ValueError, match="CUDA"):
        flashinfer.append_paged_kv_cache(key, key, i, i, cache, i, torch.tensor([0, 1], dtype=torch.int32), i)


@pytest.mark.parametrize("spec", [PageAppendSpec(256, "f16"), PageAppendSpec(64, "e5m2")], ids=lambda s: s.name())
def test_page_append_module_builds(spec, tmp_path, monkeypatch):
    from flashinfer import jit

    monkeypatch.setenv("FLASHINFER_JIT_CACHE", str(tmp_path / "cache"))
    report = jit.ensure_built(spec)
    assert report.status == "built"
    assert jit.load(spec).fn("flashinfer_append_paged_kv") is not None
