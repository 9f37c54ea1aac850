"""Paged KV cache helpers: append_paged_kv_cache (both layouts, both cache forms, streams, devices, bad input),
get_batch_indices_positions, get_seq_lens; and on the CPU, spec naming and a real build of the append module."""

from __future__ import annotations

import pytest
import torch

import flashinfer
from flashinfer.page import PageAppendSpec


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
        full = torch.randn(num_pages, 2, *shape[1:], device=device, dtype=dtype)
        return full, full[:, 0], full[:, 1]
    k = torch.randn(shape, device=device, dtype=dtype)
    v = torch.randn(shape, device=device, dtype=dtype)
    return (k, v), k, v


def _slot(t, layout, page, s):
    return t[page, s] if layout == "NHD" else t[page, :, s]


# ----------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("form", ["single", "tuple"])
@pytest.mark.parametrize("page_size", [1, 16, 64])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
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
    key = torch.randn(nnz, heads, dim, device="cuda", dtype=dtype)
    value = torch.randn(nnz, heads, dim, device="cuda", dtype=dtype)
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
            assert torch.equal(_slot(k_cache, layout, page, s), key[i]), (r, t)
            assert torch.equal(_slot(v_cache, layout, page, s), value[i]), (r, t)
            written[page, s] = True
            i += 1
    # Every other slot is untouched.
    for page in range(num_pages):
        for s in range(page_size):
            if not written[page, s]:
                assert torch.equal(_slot(k_cache, layout, page, s), _slot(k_before, layout, page, s))
                assert torch.equal(_slot(v_cache, layout, page, s), _slot(v_before, layout, page, s))


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
    assert len({s.name() for s in specs}) == len(specs) == 3 * 2
    assert PageAppendSpec(128, "bf16").name() == "page_append_kv-bf16_d128"
    s = PageAppendSpec(64, "f16")
    assert PageAppendSpec.from_json(s.to_json()) == s


def test_append_refuses_cpu_cache():
    cache = torch.zeros(4, 2, 16, 2, 64, dtype=torch.float16)
    key = torch.zeros(1, 2, 64, dtype=torch.float16)
    i = torch.zeros(1, dtype=torch.int32)
    with pytest.raises(ValueError, match="CUDA"):
        flashinfer.append_paged_kv_cache(key, key, i, i, cache, i, torch.tensor([0, 1], dtype=torch.int32), i)


def test_page_append_module_builds(tmp_path, monkeypatch):
    from flashinfer import jit

    monkeypatch.setenv("FLASHINFER_JIT_CACHE", str(tmp_path / "cache"))
    spec = PageAppendSpec(256, "f16")
    report = jit.ensure_built(spec)
    assert report.status == "built"
    assert jit.load(spec).fn("flashinfer_append_paged_kv") is not None
