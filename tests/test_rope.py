"""RoPE (flashinfer.rope) against a float64 reference: every function (ragged indptr/offsets, pos_ids, Llama 3.1,
cos/sin cache; in place and out of place), NeoX and interleaved pairs, partial rotary dims, scale/theta, head
sizes of the 16-byte vector and element-wise paths, different q/k head counts, strided q/k views of a packed qkv,
positions outside the cos/sin cache, NaN-poisoned outputs, CUDA graphs, streams and devices, every kernel form
(FI_ROPE_FORMS modules); on the CPU, validation, a real module build and every kernel form run by the host
emulator (tests/rope_emulator)."""

from __future__ import annotations

import itertools

import pytest
import torch

import _rope_emu
import flashinfer
import flashinfer.rope as rope_mod
from _jit_checks import assert_no_unique_symbols, assert_register_only
from flashinfer.rope import RopeSpec
from reference import assert_close, rope_cos_sin, rope_frequencies
from reference import rope as rope_ref

DTYPES = [torch.float16, torch.bfloat16]
LLAMA31_DEFAULT = (1.0, 4.0, 8192.0)


@pytest.fixture
def nan_outputs(monkeypatch):
    """Out-of-place outputs are allocated inside the library (empty_like): make them NaN so that any element the
    kernel fails to write fails the check."""
    real = torch.empty_like

    def poisoned_empty_like(t, *args, **kwargs):
        out = real(t, *args, **kwargs)
        if out.is_floating_point():
            out.fill_(float("nan"))
        return out

    monkeypatch.setattr(torch, "empty_like", poisoned_empty_like)


def _packed_qk(nnz, hq, hk, d, dtype, device="cuda"):
    """q, k as strided views of one packed qkv buffer (as engines hold them), plus the buffer."""
    qkv = torch.randn(nnz, (hq + 2 * hk) * d, dtype=dtype, device=device)
    q = qkv[:, : hq * d].view(nnz, hq, d)
    k = qkv[:, hq * d : (hq + hk) * d].view(nnz, hk, d)
    return q, k, qkv


def _ragged(lens, nnz_extra=0, idtype=torch.int32, device="cuda"):
    """indptr/offsets of requests with the given lengths, their per-token positions (-1: no request)."""
    indptr = [0]
    for n in lens:
        indptr.append(indptr[-1] + n)
    offsets = torch.randint(0, 5000, (len(lens),)).tolist()
    pos = []
    for n, o in zip(lens, offsets):
        pos += list(range(o, o + n))
    pos += [-1] * nnz_extra
    return (
        torch.tensor(indptr, dtype=idtype, device=device),
        torch.tensor(offsets, dtype=idtype, device=device),
        torch.tensor(pos, dtype=torch.int64),
    )


def _expected(x, positions, freqs, interleave):
    """Reference rotation; tokens at position -1 (outside every request) stay as they are."""
    cos, sin = rope_cos_sin(positions.clamp(min=0), freqs)
    ref = rope_ref(x, cos, sin, interleave)
    uncovered = (positions < 0).to(x.device)
    ref[uncovered] = x[uncovered].double()
    return ref


def _run_table(fn_name, q, k, positions_or_ragged, rotary_dim, interleave, in_place, **kw):
    """Calls one of the 8 on-the-fly functions; returns (q_rope, k_rope)."""
    fn = getattr(flashinfer, fn_name + ("_inplace" if in_place else ""))
    args = positions_or_ragged
    res = fn(q, k, *args, rotary_dim=rotary_dim, interleave=interleave, **kw)
    if in_place:
        assert res is None
        return q, k
    q_rope, k_rope = res
    assert q_rope.shape == q.shape and k_rope.shape == k.shape and q_rope.dtype == q.dtype
    return q_rope, k_rope


# (head_dim, rotary_dim): full and partial rotary on the vector path (rotary_dim % 16 == 0), NeoX halves of 8
# elements (48), element-wise NeoX pairs (40, 20: not multiples of 16) and head sizes off the power-of-two grid.
HEADS = [(64, 64), (128, 128), (128, 64), (256, 256), (256, 128), (64, 48), (64, 40), (80, 32), (72, 20)]


# ---------------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim,rotary_dim", HEADS, ids=lambda v: str(v))
@pytest.mark.parametrize("interleave", [False, True])
@pytest.mark.parametrize("in_place", [False, True])
def test_pos_ids_matches_reference(dtype, head_dim, rotary_dim, interleave, in_place, nan_outputs):
    freqs = rope_frequencies(rotary_dim, 1.0, 1e4)
    for nnz, hq, hk in ((1, 1, 1), (3, 4, 2), (127, 32, 8)):
        q, k, _ = _packed_qk(nnz, hq, hk, head_dim, dtype)
        pos = torch.randint(0, 100_000, (nnz,), device="cuda")
        ref_q, ref_k = _expected(q, pos.cpu(), freqs, interleave), _expected(k, pos.cpu(), freqs, interleave)
        for idtype in (torch.int32, torch.int64):
            qi, ki = (q.clone(), k.clone()) if in_place else (q, k)
            q_rope, k_rope = _run_table(
                "apply_rope_pos_ids", qi, ki, (pos.to(idtype),), rotary_dim, interleave, in_place
            )
            assert_close(q_rope, ref_q, what=f"q nnz={nnz} {idtype}")
            assert_close(k_rope, ref_k, what=f"k nnz={nnz} {idtype}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleave", [False, True])
@pytest.mark.parametrize("in_place", [False, True])
@pytest.mark.parametrize("idtype", [torch.int32, torch.int64])
def test_ragged_indptr_offsets(dtype, interleave, in_place, idtype, nan_outputs):
    """Requests of lengths 0, 1, 5, 0, 17, 127 (empty ones included) and 3 tokens past the last request, which
    pass through unrotated; apply_rope_pos_ids at the same positions agrees."""
    lens = [0, 1, 5, 0, 17, 127]
    indptr, offsets, pos = _ragged(lens, nnz_extra=3, idtype=idtype)
    nnz = pos.numel()
    q, k, _ = _packed_qk(nnz, 8, 2, 128, dtype)
    freqs = rope_frequencies(64, 1.0, 1e4)
    ref_q, ref_k = _expected(q, pos, freqs, interleave), _expected(k, pos, freqs, interleave)
    qi, ki = (q.clone(), k.clone()) if in_place else (q, k)
    q_rope, k_rope = _run_table("apply_rope", qi, ki, (indptr, offsets), 64, interleave, in_place)
    assert_close(q_rope, ref_q, what="q")
    assert_close(k_rope, ref_k, what="k")
    covered = pos >= 0
    qp, kp = flashinfer.apply_rope_pos_ids(
        q[covered], k[covered], pos[covered].cuda(), rotary_dim=64, interleave=interleave
    )
    torch.testing.assert_close(qp, q_rope[covered], atol=0, rtol=0)
    torch.testing.assert_close(kp, k_rope[covered], atol=0, rtol=0)


@pytest.mark.gpu
def test_single_request_batch_and_empty_batch():
    q, k, _ = _packed_qk(9, 2, 2, 64, torch.bfloat16)
    indptr = torch.tensor([0, 9], dtype=torch.int32, device="cuda")
    offsets = torch.tensor([100], dtype=torch.int32, device="cuda")
    q_rope, k_rope = flashinfer.apply_rope(q, k, indptr, offsets)
    freqs = rope_frequencies(64)
    pos = torch.arange(100, 109)
    assert_close(q_rope, _expected(q, pos, freqs, False))
    # batch_size 0: no token belongs to a request, all pass through
    q_rope, k_rope = flashinfer.apply_rope(
        q, k, torch.zeros(1, dtype=torch.int32, device="cuda"), torch.zeros(0, dtype=torch.int32, device="cuda")
    )
    assert torch.equal(q_rope, q) and torch.equal(k_rope, k)


@pytest.mark.gpu
@pytest.mark.parametrize("rope_scale,rope_theta", [(1.0, 1e4), (2.0, 1e4), (1.0, 1e6), (4.0, 5e5)])
def test_rope_scale_and_theta(rope_scale, rope_theta):
    q, k, _ = _packed_qk(33, 4, 4, 128, torch.float16)
    pos = torch.randint(0, 50_000, (33,), device="cuda")
    freqs = rope_frequencies(128, rope_scale, rope_theta)
    q_rope, k_rope = flashinfer.apply_rope_pos_ids(q, k, pos, rope_scale=rope_scale, rope_theta=rope_theta)
    assert_close(q_rope, _expected(q, pos.cpu(), freqs, False))
    assert_close(k_rope, _expected(k, pos.cpu(), freqs, False))


@pytest.mark.gpu
def test_large_positions_keep_their_accuracy():
    """Positions up to 2**24 - 1: the angle is reduced in double-float half-turns, still within the dtype's
    rounding of the float64 reference (a float32 angle would be off by ~1 radian there)."""
    q, k, _ = _packed_qk(64, 2, 1, 128, torch.float16)
    pos = torch.cat(
        [torch.tensor([2**24 - 1, 2**24 - 2, 10_000_000, 1_000_003]), torch.randint(0, 2**24, (60,))]
    ).cuda()
    freqs = rope_frequencies(128, 1.0, 1e4)
    q_rope, k_rope = flashinfer.apply_rope_pos_ids(q, k, pos)
    assert_close(q_rope, _expected(q, pos.cpu(), freqs, False))
    assert_close(k_rope, _expected(k, pos.cpu(), freqs, False))


# Llama 3.1 parameter sets: the defaults (frequencies in all three bands); a large scale; a narrow band (one or
# two frequencies inside it); every frequency scaled (old_context_len 1: all wavelengths above it); every
# frequency kept (huge old_context_len); rope_scale 1.
LLAMA31_CASES = [
    dict(),
    dict(rope_scale=32.0, rope_theta=5e5, low_freq_factor=1.0, high_freq_factor=4.0, old_context_len=8192),
    dict(rope_scale=8.0, rope_theta=1e4, low_freq_factor=2.0, high_freq_factor=2.5, old_context_len=1024),
    dict(rope_scale=8.0, rope_theta=5e5, low_freq_factor=1.0, high_freq_factor=4.0, old_context_len=1),
    dict(rope_scale=8.0, rope_theta=5e5, low_freq_factor=1.0, high_freq_factor=4.0, old_context_len=10**12),
    dict(rope_scale=1.0, rope_theta=5e5, low_freq_factor=1.0, high_freq_factor=4.0, old_context_len=8192),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", range(len(LLAMA31_CASES)))
@pytest.mark.parametrize("interleave", [False, True])
@pytest.mark.parametrize("rotary_dim", [128, 64])
def test_llama31_matches_meta_scaling(case, interleave, rotary_dim, nan_outputs):
    kw = LLAMA31_CASES[case]
    scale, theta = kw.get("rope_scale", 8.0), kw.get("rope_theta", 5e5)
    llama = (kw.get("low_freq_factor", 1.0), kw.get("high_freq_factor", 4.0), kw.get("old_context_len", 8192))
    freqs = rope_frequencies(rotary_dim, scale, theta, llama)
    nnz = 77
    q, k, _ = _packed_qk(nnz, 8, 2, 128, torch.bfloat16)
    pos = torch.randint(0, 200_000, (nnz,), device="cuda")
    ref_q, ref_k = _expected(q, pos.cpu(), freqs, interleave), _expected(k, pos.cpu(), freqs, interleave)
    for in_place in (False, True):
        qi, ki = (q.clone(), k.clone()) if in_place else (q, k)
        q_rope, k_rope = _run_table(
            "apply_llama31_rope_pos_ids", qi, ki, (pos,), rotary_dim, interleave, in_place, **kw
        )
        assert_close(q_rope, ref_q, what=f"llama31 pos_ids in_place={in_place}")
        assert_close(k_rope, ref_k)
    indptr = torch.tensor([0, 30, nnz], dtype=torch.int32, device="cuda")
    offsets = torch.tensor([1000, 64_000], dtype=torch.int32, device="cuda")
    rpos = torch.cat([torch.arange(1000, 1030), torch.arange(64_000, 64_000 + nnz - 30)])
    q_rope, k_rope = _run_table("apply_llama31_rope", q, k, (indptr, offsets), rotary_dim, interleave, False, **kw)
    assert_close(q_rope, _expected(q, rpos, freqs, interleave), what="llama31 ragged")
    assert_close(k_rope, _expected(k, rpos, freqs, interleave))


@pytest.mark.gpu
def test_llama31_with_rope_scale_1_is_plain_rope():
    q, k, _ = _packed_qk(20, 4, 4, 128, torch.bfloat16)
    pos = torch.randint(0, 10_000, (20,), device="cuda")
    ref = _expected(q, pos.cpu(), rope_frequencies(128, 1.0, 5e5), False)
    a, _ = flashinfer.apply_llama31_rope_pos_ids(q, k, pos, rope_scale=1.0, rope_theta=5e5)
    b, _ = flashinfer.apply_rope_pos_ids(q, k, pos, rope_theta=5e5)
    assert_close(a, ref, what="llama31 at scale 1")
    assert_close(b, ref, what="plain")


@pytest.mark.gpu
def test_in_place_on_packed_qkv_leaves_v_alone():
    nnz, hq, hk, d = 50, 8, 2, 128
    q, k, qkv = _packed_qk(nnz, hq, hk, d, torch.bfloat16)
    before = qkv.clone()
    pos = torch.randint(0, 4096, (nnz,), device="cuda")
    freqs = rope_frequencies(64)
    ref_q, ref_k = _expected(q, pos.cpu(), freqs, False), _expected(k, pos.cpu(), freqs, False)
    flashinfer.apply_rope_pos_ids_inplace(q, k, pos, rotary_dim=64)
    assert_close(q, ref_q)
    assert_close(k, ref_k)
    assert torch.equal(qkv[:, (hq + hk) * d :], before[:, (hq + hk) * d :]), "v was written"
    # the pass-through half of each head is bit-identical
    assert torch.equal(q[..., 64:], before[:, : hq * d].view(nnz, hq, d)[..., 64:])


# ---------------------------------------------------------------------------------- cos/sin cache (vLLM)


def _cos_sin_cache(max_pos, rotary_dim, base, device="cuda"):
    """vLLM's RotaryEmbedding cache: float32 [max_pos, rotary_dim], cos then sin."""
    inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32, device=device) / rotary_dim))
    t = torch.arange(max_pos, dtype=torch.float32, device=device)
    freqs = torch.outer(t, inv_freq)
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1)


def _cache_reference(x2d, positions, cache, head_size, is_neox):
    """Reference for a (nnz, heads * head_size) tensor, with the cache's own cos/sin values."""
    nnz = x2d.shape[0]
    half = cache.shape[1] // 2
    rows = cache[positions.long()].double().cpu()
    ref = rope_ref(x2d.view(nnz, -1, head_size), rows[:, :half], rows[:, half:], not is_neox)
    return ref.view(x2d.shape)


# FlashInfer's test cases (head_size, rotary_dim, max_position, base, is_neox, nnz, q heads, k heads) and Llama.
CACHE_CASES = [
    (64, 64, 32, 8000, True, 32 * 32, 1, 1),
    (256, 128, 4096, 10000, True, 2 * 512, 4, 2),
    (64, 32, 2048, 8432, True, 2 * 199, 4, 1),
    (64, 64, 32, 8000, False, 32 * 32, 1, 1),
    (256, 128, 4096, 9231, False, 3 * 231, 4, 2),
    (192, 128, 4096, 9231, True, 3 * 231, 3, 2),
    (80, 64, 1024, 10000, False, 4 * 64, 2, 2),
    (112, 64, 2048, 12000, True, 5 * 77, 2, 1),
    (160, 96, 8192, 10000, False, 2 * 128, 6, 3),
    (128, 128, 131072, 500000, True, 1, 32, 8),
    (128, 128, 131072, 500000, True, 127, 32, 8),
    (80, 20, 4096, 10000, True, 33, 4, 4),  # rotary_dim 20: element-wise pairs
    # Enough work for several heads a thread (on an H200: 4 heads; 12 heads in 3 unrolled batches).
    (128, 128, 131072, 500000, True, 4096, 32, 8),
    (128, 128, 131072, 500000, False, 12000, 28, 8),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CACHE_CASES, ids=lambda c: f"hs{c[0]}-rot{c[1]}-neox{int(c[4])}-n{c[5]}")
@pytest.mark.parametrize("in_place", [True, False])
def test_cos_sin_cache_matches_reference(dtype, case, in_place, nan_outputs):
    head_size, rotary_dim, max_pos, base, is_neox, nnz, hq, hk = case
    cache = _cos_sin_cache(max_pos, rotary_dim, base)
    positions = torch.randint(0, max_pos, (nnz,), device="cuda")  # int64, as vLLM passes them
    qkv = torch.randn(nnz, (hq + 2 * hk) * head_size, dtype=dtype, device="cuda")
    query, key = qkv[:, : hq * head_size], qkv[:, hq * head_size : (hq + hk) * head_size]
    ref_q = _cache_reference(query, positions, cache, head_size, is_neox)
    ref_k = _cache_reference(key, positions, cache, head_size, is_neox)
    if in_place:
        v_before = qkv[:, (hq + hk) * head_size :].clone()
        assert (
            flashinfer.apply_rope_with_cos_sin_cache_inplace(positions, query, key, head_size, cache, is_neox=is_neox)
            is None
        )
        q_out, k_out = query, key
        assert torch.equal(qkv[:, (hq + hk) * head_size :], v_before)
    else:
        q_out, k_out = flashinfer.apply_rope_with_cos_sin_cache(positions, query, key, head_size, cache, is_neox)
        assert q_out.shape == query.shape and k_out.shape == key.shape
    assert_close(q_out, ref_q, what="query")
    assert_close(k_out, ref_k, what="key")
    rope_mod.check_cos_sin_cache_positions()  # no position was out of range


@pytest.mark.gpu
@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("pad", [0, 1, 2])
def test_cos_sin_cache_with_padded_or_offset_rows(is_neox, pad):
    """Cache rows whose stride is not a multiple of 4 floats, or that start off 16 bytes (a column slice):
    the kernel reads them element by element instead of as float4."""
    nnz, hq, hk, d, max_pos = 37, 4, 2, 128, 512
    full = _cos_sin_cache(max_pos, d + 2 * pad, 1e4) if pad else _cos_sin_cache(max_pos, d, 1e4)
    # pad 1: rows of 130 floats (stride 2 mod 4); pad 2: a slice starting 1 float in (pointer off 16 bytes).
    cache = full[:, :d] if pad == 1 else full[:, 1 : d + 1] if pad == 2 else full[1:]
    assert cache.stride(1) == 1
    positions = torch.randint(0, cache.shape[0], (nnz,), device="cuda")
    query = torch.randn(nnz, hq * d, dtype=torch.bfloat16, device="cuda")
    key = torch.randn(nnz, hk * d, dtype=torch.bfloat16, device="cuda")
    ref_q = _cache_reference(query, positions, cache, d, is_neox)
    ref_k = _cache_reference(key, positions, cache, d, is_neox)
    q_out, k_out = flashinfer.apply_rope_with_cos_sin_cache(positions, query, key, d, cache, is_neox)
    assert_close(q_out, ref_q, what="query")
    assert_close(k_out, ref_k, what="key")


# ------------------------------------------------------------------------------- kernel forms (FI_ROPE_FORMS)


@pytest.fixture(params=[0, 1, 2], ids=lambda f: f"forms{f}")
def rope_forms(request, monkeypatch):
    """The bf16 module built with -DFI_ROPE_FORMS=<param> installed as the one the API calls (its eager fast path
    too): 0 the generic kernel for every call, 1 the compile-time one-head forms for small launches, 2 (the default
    build) the several-heads forms specialised too. Yields the knob's value."""
    forms = request.param
    if forms != 2:
        import dataclasses

        from flashinfer import jit

        @dataclasses.dataclass(frozen=True)
        class FormsSpec(RopeSpec):
            def extra_cuda_cflags(self):
                return tuple(RopeSpec.extra_cuda_cflags(self)) + (f"-DFI_ROPE_FORMS={forms}",)

        jit.ensure_built(FormsSpec(dtype="bf16"))
        monkeypatch.setattr(rope_mod, "RopeSpec", FormsSpec)
        module = rope_mod._RopeModule("bf16")
        monkeypatch.setitem(rope_mod._modules, "bf16", module)
        monkeypatch.setattr(rope_mod, "RopeSpec", RopeSpec)
        if torch.bfloat16 in rope_mod._DLPACK:  # the eager fast path launches from the module under test as well
            entry = module.module.launcher("flashinfer_rope_cos_sin_cache_inplace_dlpack")
            monkeypatch.setitem(rope_mod._DLPACK, torch.bfloat16, (entry.packed, entry.launcher.packing.pack))
    yield forms
    rope_mod.check_cos_sin_cache_positions()  # nothing left recorded in this module


# (head_size, rotary_dim, is_neox, nnz, q heads, k heads, in_place, positions' dtype, packed qkv): one token and odd
# counts (one head a thread: the one-head forms), 4096 tokens (several heads a thread), full and partial rotary dims
# in and out of place (out of place copies the rest), NeoX and interleaved, int32 and int64 positions, q/k strided
# views of a packed qkv, and element-wise pairs (rotary_dim 40: the generic scalar form).
FORM_CASES = [
    (128, 128, True, 1, 32, 8, True, torch.int64, True),
    (128, 128, False, 1, 32, 8, False, torch.int32, False),
    (128, 64, True, 1, 4, 2, False, torch.int64, True),
    (128, 64, True, 33, 4, 2, False, torch.int64, True),
    (128, 64, False, 33, 4, 2, True, torch.int32, True),
    (256, 128, False, 1001, 4, 2, False, torch.int64, False),
    (64, 64, True, 255, 1, 1, False, torch.int32, True),
    (128, 128, True, 4096, 32, 8, True, torch.int64, False),
    (128, 64, False, 4096, 32, 8, False, torch.int32, True),
    (128, 128, True, 4095, 32, 8, False, torch.int64, True),
    (64, 40, True, 7, 2, 1, False, torch.int64, True),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", FORM_CASES, ids=lambda c: f"hs{c[0]}-rot{c[1]}-neox{int(c[2])}-n{c[3]}-ip{int(c[6])}")
def test_every_kernel_form_with_cos_sin_cache(rope_forms, case, nan_outputs):
    head_size, rotary_dim, is_neox, nnz, hq, hk, in_place, idtype, packed = case
    cache = _cos_sin_cache(8192, rotary_dim, 1e4)
    positions = torch.randint(0, 8192, (nnz,), device="cuda", dtype=idtype)
    width = (hq + 2 * hk if packed else hq + hk) * head_size
    qkv = torch.randn(nnz, width, dtype=torch.bfloat16, device="cuda")
    query, key = qkv[:, : hq * head_size], qkv[:, hq * head_size : (hq + hk) * head_size]
    ref_q = _cache_reference(query, positions, cache, head_size, is_neox)
    ref_k = _cache_reference(key, positions, cache, head_size, is_neox)
    if in_place:
        rest = qkv[:, (hq + hk) * head_size :].clone()
        flashinfer.apply_rope_with_cos_sin_cache_inplace(positions, query, key, head_size, cache, is_neox=is_neox)
        q_out, k_out = query, key
        assert torch.equal(qkv[:, (hq + hk) * head_size :], rest), "v was written"
    else:
        q_out, k_out = flashinfer.apply_rope_with_cos_sin_cache(positions, query, key, head_size, cache, is_neox)
    assert_close(q_out, ref_q, what="query")
    assert_close(k_out, ref_k, what="key")


@pytest.mark.gpu
@pytest.mark.parametrize("nnz", [1, 40, 4096])
def test_every_kernel_form_marks_positions_outside_the_cache(rope_forms, nnz):
    """A token past the cache (and one at -1) becomes NaN, the others are right, and the call is recorded."""
    cache = _cos_sin_cache(1024, 128, 1e4)
    pos = torch.randint(0, 1024, (nnz,), device="cuda")
    bad = [0] if nnz == 1 else [nnz // 2, nnz - 1]
    pos[bad[0]] = 1024
    if len(bad) > 1:
        pos[bad[1]] = -1
    query = torch.randn(nnz, 32 * 128, dtype=torch.bfloat16, device="cuda")
    key = torch.randn(nnz, 8 * 128, dtype=torch.bfloat16, device="cuda")
    q0 = query.clone()
    flashinfer.apply_rope_with_cos_sin_cache_inplace(pos, query, key, 128, cache)
    torch.cuda.synchronize()
    good = torch.ones(nnz, dtype=torch.bool)
    good[bad] = False
    if good.any():
        assert_close(query[good], _cache_reference(q0[good], pos[good], cache, 128, True), what="valid tokens")
    assert torch.isnan(query[bad]).all() and torch.isnan(key[bad]).all()
    with pytest.raises(ValueError, match="lies outside the cos_sin_cache of 1024 rows"):
        rope_mod.check_cos_sin_cache_positions()


@pytest.mark.gpu
@pytest.mark.parametrize("interleave", [False, True])
@pytest.mark.parametrize("in_place", [False, True])
def test_every_kernel_form_with_frequency_table(rope_forms, interleave, in_place, nan_outputs):
    """pos_ids (int32, int64) and ragged batches, partial rotary (out of place: the rest copied), one token and
    several heads a thread."""
    freqs = rope_frequencies(64, 1.0, 1e4)
    for nnz, hq, hk in ((1, 32, 8), (37, 4, 2), (4096, 32, 8)):
        q, k, _ = _packed_qk(nnz, hq, hk, 128, torch.bfloat16)
        pos = torch.randint(0, 100_000, (nnz,), device="cuda")
        ref_q, ref_k = _expected(q, pos.cpu(), freqs, interleave), _expected(k, pos.cpu(), freqs, interleave)
        for idtype in (torch.int32, torch.int64):
            qi, ki = (q.clone(), k.clone()) if in_place else (q, k)
            q_rope, k_rope = _run_table("apply_rope_pos_ids", qi, ki, (pos.to(idtype),), 64, interleave, in_place)
            assert_close(q_rope, ref_q, what=f"q nnz={nnz} {idtype}")
            assert_close(k_rope, ref_k, what=f"k nnz={nnz} {idtype}")
    indptr, offsets, pos = _ragged([0, 1, 5, 0, 17], nnz_extra=3)
    q, k, _ = _packed_qk(pos.numel(), 8, 2, 128, torch.bfloat16)
    ref_q, ref_k = _expected(q, pos, freqs, interleave), _expected(k, pos, freqs, interleave)
    qi, ki = (q.clone(), k.clone()) if in_place else (q, k)
    q_rope, k_rope = _run_table("apply_rope", qi, ki, (indptr, offsets), 64, interleave, in_place)
    assert_close(q_rope, ref_q, what="ragged q")
    assert_close(k_rope, ref_k, what="ragged k")


@pytest.mark.gpu
def test_cos_sin_cache_int32_positions_3d_inputs_and_no_key():
    cache = _cos_sin_cache(4096, 128, 1e4)
    pos = torch.randint(0, 4096, (19,), device="cuda", dtype=torch.int32)
    q = torch.randn(19, 4, 128, dtype=torch.bfloat16, device="cuda")
    k = torch.randn(19, 2, 128, dtype=torch.bfloat16, device="cuda")
    ref_q = _cache_reference(q.view(19, -1), pos, cache, 128, True).view(q.shape)
    ref_k = _cache_reference(k.view(19, -1), pos, cache, 128, True).view(k.shape)
    q_out, k_out = flashinfer.apply_rope_with_cos_sin_cache(pos, q, k, 128, cache)
    assert q_out.shape == q.shape
    assert_close(q_out, ref_q)
    assert_close(k_out, ref_k)
    q_out, k_none = flashinfer.apply_rope_with_cos_sin_cache(pos, q, None, 128, cache)
    assert k_none is None
    assert_close(q_out, ref_q)


@pytest.mark.gpu
def test_positions_outside_the_cache_raise(monkeypatch):
    """Out-of-range positions are never read: their tokens become NaN (the others are right), the next call
    raises ValueError naming the position, and FLASHINFER_ROPE_CHECK_POSITIONS checks before launching."""
    rope_mod.check_cos_sin_cache_positions()  # start clean
    cache = _cos_sin_cache(1024, 64, 1e4)
    for bad in (1024, 5000, -1):
        pos = torch.randint(0, 1024, (40,), device="cuda")
        pos[17] = bad
        query = torch.randn(40, 4 * 64, dtype=torch.bfloat16, device="cuda")
        key = torch.randn(40, 64, dtype=torch.bfloat16, device="cuda")
        q0 = query.clone()
        flashinfer.apply_rope_with_cos_sin_cache_inplace(pos, query, key, 64, cache)
        torch.cuda.synchronize()
        good = torch.ones(40, dtype=torch.bool)
        good[17] = False
        ref = _cache_reference(q0[good], pos[good], cache, 64, True)
        assert_close(query[good], ref, what="tokens with valid positions")
        assert torch.isnan(query[17]).all() and torch.isnan(key[17]).all()
        with pytest.raises(ValueError, match=f"position {bad} lies outside the cos_sin_cache of 1024 rows"):
            flashinfer.apply_rope_with_cos_sin_cache_inplace(pos[:1], query[:1], key[:1], 64, cache)
        flashinfer.apply_rope_with_cos_sin_cache(pos[:3].clamp(0, 1023), q0[:3], key[:3], 64, cache)  # reported once
    # The explicit check (an extension) reports without another call.
    pos = torch.full((3,), 2048, device="cuda")
    flashinfer.apply_rope_with_cos_sin_cache(pos, q0[:3], key[:3], 64, cache)
    torch.cuda.synchronize()
    with pytest.raises(ValueError, match="position 2048"):
        rope_mod.check_cos_sin_cache_positions()
    rope_mod.check_cos_sin_cache_positions()
    # Debug mode: checked on the host before the launch; the inputs are untouched.
    monkeypatch.setattr(rope_mod, "_CHECK_POSITIONS", True)
    q1 = q0[:3].clone()
    with pytest.raises(ValueError, match="position 2048"):
        flashinfer.apply_rope_with_cos_sin_cache_inplace(pos, q1, key[:3].clone(), 64, cache)
    assert torch.equal(q1, q0[:3])


@pytest.mark.gpu
def test_zero_tokens():
    q = torch.empty(0, 4, 64, dtype=torch.float16, device="cuda")
    pos = torch.empty(0, dtype=torch.int32, device="cuda")
    q_rope, k_rope = flashinfer.apply_rope_pos_ids(q, q, pos)
    assert q_rope.shape == (0, 4, 64)
    flashinfer.apply_rope_pos_ids_inplace(q, q, pos)
    cache = _cos_sin_cache(16, 64, 1e4)
    out = flashinfer.apply_rope_with_cos_sin_cache(pos, q.view(0, 256), q.view(0, 256), 64, cache)
    assert out[0].shape == (0, 256)


@pytest.mark.gpu
def test_cuda_graph_capture_and_replay():
    cache = _cos_sin_cache(8192, 128, 5e5)
    nnz = 64
    query = torch.randn(nnz, 32 * 128, dtype=torch.bfloat16, device="cuda")
    key = torch.randn(nnz, 8 * 128, dtype=torch.bfloat16, device="cuda")
    pos = torch.randint(0, 8192, (nnz,), device="cuda")
    q3, k3 = query.view(nnz, 32, 128), key.view(nnz, 8, 128)
    flashinfer.apply_rope_with_cos_sin_cache_inplace(pos, query, key, 128, cache)  # load outside the capture
    flashinfer.apply_llama31_rope_pos_ids_inplace(q3, k3, pos)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        flashinfer.apply_rope_with_cos_sin_cache_inplace(pos, query, key, 128, cache)
        flashinfer.apply_llama31_rope_pos_ids_inplace(q3, k3, pos)
    freqs = rope_frequencies(128, 8.0, 5e5, LLAMA31_DEFAULT)
    for _ in range(2):
        query.copy_(torch.randn_like(query))
        key.copy_(torch.randn_like(key))
        pos.copy_(torch.randint(0, 8192, (nnz,), device="cuda"))
        q0, k0, p0 = query.clone(), key.clone(), pos.cpu()
        g.replay()
        torch.cuda.synchronize()
        mid_q = _cache_reference(q0, p0, cache, 128, True).to(torch.bfloat16).view(nnz, 32, 128)
        assert_close(q3, _expected(mid_q, p0, freqs, False), what="graph replay q")
        mid_k = _cache_reference(k0, p0, cache, 128, True).to(torch.bfloat16).view(nnz, 8, 128)
        assert_close(k3, _expected(mid_k, p0, freqs, False), what="graph replay k")


@pytest.mark.gpu
def test_runs_on_current_stream_of_tensor_device():
    cache = _cos_sin_cache(4096, 128, 1e4)
    query = torch.randn(512, 32 * 128, dtype=torch.bfloat16, device="cuda")
    key = torch.randn(512, 8 * 128, dtype=torch.bfloat16, device="cuda")
    src_q = torch.randn_like(query)
    pos = torch.randint(0, 4096, (512,), device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(20_000_000)  # a launch on another stream would rotate the stale query
        query.copy_(src_q)
        flashinfer.apply_rope_with_cos_sin_cache_inplace(pos, query, key, 128, cache)
    side.synchronize()
    assert_close(query, _cache_reference(src_q, pos, cache, 128, True))


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_second_device_while_first_is_current():
    torch.cuda.set_device(0)
    dev = torch.device("cuda:1")
    cache = _cos_sin_cache(2048, 64, 1e4, device=dev)
    pos = torch.randint(0, 2048, (21,), device=dev)
    query = torch.randn(21, 4 * 64, dtype=torch.float16, device=dev)
    key = torch.randn(21, 2 * 64, dtype=torch.float16, device=dev)
    ref_q = _cache_reference(query, pos, cache, 64, False)
    flashinfer.apply_rope_with_cos_sin_cache_inplace(pos, query, key, 64, cache, is_neox=False)
    assert_close(query, ref_q)
    q, k, _ = _packed_qk(21, 4, 2, 64, torch.float16, device=dev)
    q_rope, _ = flashinfer.apply_rope_pos_ids(q, k, pos)
    assert q_rope.device == dev
    assert_close(q_rope, _expected(q, pos.cpu(), rope_frequencies(64), False))
    rope_mod.check_cos_sin_cache_positions()
    assert torch.cuda.current_device() == 0


@pytest.mark.gpu
def test_torch_compile_traces_the_custom_ops():
    cache = _cos_sin_cache(4096, 128, 1e4)

    def vllm_style(positions, query, key):
        flashinfer.apply_rope_with_cos_sin_cache_inplace(positions, query, key, 128, cache)
        return query * 1, key

    def out_of_place(q, k, pos):
        q_rope, k_rope = flashinfer.apply_llama31_rope_pos_ids(q, k, pos, rotary_dim=64, interleave=True)
        return q_rope + 0, k_rope

    pos = torch.randint(0, 4096, (17,), device="cuda")
    query = torch.randn(17, 8 * 128, dtype=torch.bfloat16, device="cuda")
    key = torch.randn(17, 2 * 128, dtype=torch.bfloat16, device="cuda")
    ref_q = _cache_reference(query, pos, cache, 128, True)
    ref_k = _cache_reference(key, pos, cache, 128, True)
    q_out, _ = torch.compile(vllm_style, backend="aot_eager", fullgraph=True)(pos, query, key)
    assert_close(q_out, ref_q)
    assert_close(query, ref_q, what="query mutated through the compiled graph")
    assert_close(key, ref_k, what="key mutated through the compiled graph")

    q, k, _ = _packed_qk(17, 4, 2, 128, torch.bfloat16)
    freqs = rope_frequencies(64, 8.0, 5e5, LLAMA31_DEFAULT)
    q_rope, k_rope = torch.compile(out_of_place, backend="aot_eager", fullgraph=True)(q, k, pos)
    assert_close(q_rope, _expected(q, pos.cpu(), freqs, True))
    assert_close(k_rope, _expected(k, pos.cpu(), freqs, True))


@pytest.mark.gpu
def test_rotary_dim_limit_of_the_on_the_fly_frequencies():
    wide = torch.randn(2, 1, 512, dtype=torch.float16, device="cuda")
    pos = torch.arange(2, device="cuda")
    with pytest.raises(ValueError, match="exceeds 256"):
        flashinfer.apply_rope_pos_ids(wide, wide, pos, rotary_dim=512)
    # the cos/sin cache form takes it
    cache = _cos_sin_cache(8, 512, 1e4)
    q_out, _ = flashinfer.apply_rope_with_cos_sin_cache(pos, wide.view(2, 512), wide.view(2, 512), 512, cache)
    assert_close(q_out, _cache_reference(wide.view(2, 512), pos, cache, 512, True))


# ---------------------------------------------------------------------------------------------------- CPU


def test_cpu_tensors_are_refused_before_any_build():
    q = torch.randn(4, 2, 64, dtype=torch.float16)
    pos = torch.arange(4)
    with pytest.raises(ValueError, match="CUDA"):
        flashinfer.apply_rope_pos_ids(q, q, pos)
    with pytest.raises(ValueError, match="CUDA"):
        flashinfer.apply_rope_with_cos_sin_cache_inplace(pos, q.view(4, -1), q.view(4, -1), 64, torch.zeros(8, 64))
    with pytest.raises(TypeError, match="torch.Tensor"):
        flashinfer.apply_rope_inplace([1.0], q, pos, pos)


def test_bad_input_raises_clear_errors(fake_cuda):
    q, k, _ = _packed_qk(8, 4, 2, 64, torch.float16)
    pos = torch.arange(8, device="cuda")
    cache = torch.empty(64, 64, dtype=torch.float32, device="cuda")
    cases = [
        (lambda: flashinfer.apply_rope_pos_ids(q, k, pos, rotary_dim=63), ValueError, "even"),
        (lambda: flashinfer.apply_rope_pos_ids(q, k, pos, rotary_dim=128), ValueError, r"\[2, head_dim=64\]"),
        (lambda: flashinfer.apply_rope_pos_ids(q, k.bfloat16(), pos), TypeError, "share one dtype"),
        (lambda: flashinfer.apply_rope_pos_ids(q, k[:4], pos), ValueError, "same nnz"),
        (lambda: flashinfer.apply_rope_pos_ids(q, k, pos[:5]), ValueError, "pos_ids must have 8"),
        (lambda: flashinfer.apply_rope_pos_ids(q, k, pos.float()), TypeError, "int32 or torch.int64"),
        (lambda: flashinfer.apply_rope_pos_ids(q[0], k, pos), ValueError, "3-D"),
        (lambda: flashinfer.apply_rope_pos_ids(q, k, pos, rope_theta=0), ValueError, "rope_theta must be > 0"),
        (lambda: flashinfer.apply_rope(q, k, pos[:3].int(), pos[:1].int()), ValueError, "offsets must have 2"),
        (
            lambda: flashinfer.apply_llama31_rope_pos_ids(q, k, pos, low_freq_factor=4, high_freq_factor=4),
            ValueError,
            "must exceed low_freq_factor",
        ),
        (
            lambda: flashinfer.apply_rope_pos_ids_inplace(q.transpose(1, 2).contiguous().transpose(1, 2), k, pos),
            ValueError,
            "in place",
        ),
        (
            lambda: flashinfer.apply_rope_with_cos_sin_cache(pos, q.view(8, -1), k.reshape(8, -1), 64, cache.half()),
            ValueError,
            "cos_sin_cache should be float32",
        ),
        (
            lambda: flashinfer.apply_rope_with_cos_sin_cache(pos, q.reshape(8, -1), k.reshape(8, -1), 48, cache),
            ValueError,
            "head_size=48",
        ),
        (
            lambda: flashinfer.apply_rope_with_cos_sin_cache(pos, q.reshape(8, -1), k.reshape(8, -1), 32, cache),
            ValueError,
            r"\[2, head_size=32\]",
        ),
        (
            lambda: flashinfer.apply_rope_with_cos_sin_cache(pos[:3], q.reshape(8, -1), k.reshape(8, -1), 64, cache),
            ValueError,
            "positions must have 8",
        ),
    ]
    for fn, exc, match in cases:
        with pytest.raises(exc, match=match):
            fn()


def test_module_paths_match_flashinfer():
    import flashinfer.rope as rope

    for name in rope.__all__:
        if name.startswith("apply_"):
            assert getattr(rope, name) is getattr(flashinfer, name)
    assert len([n for n in rope.__all__ if n.startswith("apply_")]) == 10


def _emu_case(lib, head_dim, rotary_dim, interleave, nnz, in_place, idtype, packed, form, bad=(), pad=0):
    """One launch_rope on the host emulator against the float64 reference. form: "cache" (with positions
    ``bad`` = [(token, position)] outside it, and ``pad`` 1/2: rows not 16-byte aligned), "pos_ids" or "ragged"."""
    hq, hk, d = 8, 4, head_dim
    qkv = torch.randn(nnz, (hq + (2 * hk if packed else hk)) * d, dtype=torch.bfloat16)
    q, k = qkv[:, : hq * d].view(nnz, hq, d), qkv[:, hq * d : (hq + hk) * d].view(nnz, hk, d)
    before = qkv.clone()
    q_out, k_out = (q, k) if in_place else (torch.full_like(q, float("nan")), torch.full_like(k, float("nan")))
    what = f"d{d} rot{rotary_dim} il{int(interleave)} nnz{nnz} ip{int(in_place)} {idtype} {form} pad{pad}"
    if form == "cache":
        full = _cos_sin_cache(512, rotary_dim + 2 * pad, 1e4, device="cpu")
        cache = full[:, :rotary_dim] if pad == 1 else full[:, 1 : rotary_dim + 1] if pad == 2 else full
        pos = torch.randint(0, 512, (nnz,), dtype=idtype)
        for i, b in bad:
            pos[i] = b
        half = rotary_dim // 2
        rows = cache[pos.clamp(0, 511).long()].double()
        cos, sin, covered = rows[:, :half], rows[:, half:], torch.ones(nnz, dtype=torch.bool)
        record = _rope_emu.rope(lib, q, k, q_out, k_out, interleave, rotary_dim, pos_ids=pos, cache=cache)
    else:
        if form == "ragged":
            indptr, offsets, pos = _ragged([0, 1, 5, 0, 17, nnz - 26], nnz_extra=3, idtype=idtype, device="cpu")
            record = _rope_emu.rope(lib, q, k, q_out, k_out, interleave, rotary_dim, ragged=(indptr, offsets))
        else:
            pos = torch.randint(0, 100_000, (nnz,))
            record = _rope_emu.rope(lib, q, k, q_out, k_out, interleave, rotary_dim, pos_ids=pos.to(idtype))
        cos, sin = rope_cos_sin(pos.clamp(min=0), rope_frequencies(rotary_dim, 1.0, 1e4))
        covered = pos >= 0
    good = covered.clone()
    for i, _ in bad:
        good[i] = False
    x = before[:, : (hq + hk) * d].view(nnz, hq + hk, d)
    ref = rope_ref(x, cos, sin, interleave)
    ref[~covered] = x[~covered].double()
    out = torch.cat([q_out, k_out], dim=1)
    assert_close(out[good], ref[good], what=what)
    if bad:
        assert torch.isnan(out[~good][..., :rotary_dim].float()).all(), what
        assert record[0] == 1 and record[1] in [b for _, b in bad] and record[2] == 512, (what, record)
    else:
        assert record[0] == 0, (what, record)
    assert torch.equal(qkv[:, (hq + hk) * d :], before[:, (hq + hk) * d :]), f"{what}: v was written"


@pytest.mark.skipif(_rope_emu.available() is not None, reason=str(_rope_emu.available()))
@pytest.mark.parametrize("knobs", ["FI_ROPE_FORMS=0", "FI_ROPE_FORMS=1", "FI_ROPE_FORMS=2"])
def test_kernel_forms_on_the_host(knobs):
    """rope.cuh's kernels and launch_rope built with -D<knobs> for the CPU (tests/rope_emulator), on every
    form against the float64 reference: cos/sin cache, pos_ids and ragged positions; NeoX and interleaved; in place,
    out of place, out of place copying the rest (partial rotary); int32/int64 positions; strided q/k; the scalar
    path (rotary_dim 40); unaligned cache rows; positions outside the cache (NaN, recorded); one head a thread (an
    H200's 132 SMs) and several (the same batches sized for one SM). Every kernel the build holds is launched (but
    the generic vector form of the frequency table where FI_ROPE_FORMS=2 leaves it only offsets past 32 bits)."""
    torch.manual_seed(0)
    lib = _rope_emu.lib(knobs)
    lib.emu_reset()
    for sms, nnz in ((132, 33), (1, 100)):
        lib.emu_set_sms(sms)
        idtypes = itertools.cycle((torch.int64, torch.int32))
        for (d, rot), interleave, in_place in itertools.product(((128, 128), (128, 64)), (False, True), (True, False)):
            for form in ("cache", "pos_ids", "ragged"):
                _emu_case(lib, d, rot, interleave, nnz, in_place, next(idtypes), in_place, form)
        for form in ("cache", "pos_ids"):
            _emu_case(lib, 64, 40, False, nnz, False, torch.int64, True, form)
        _emu_case(lib, 128, 128, False, nnz, False, torch.int64, False, "cache", pad=2)
        _emu_case(lib, 128, 128, False, nnz, True, torch.int64, True, "cache", bad=[(nnz // 2, 512), (nnz - 1, -1)])
        _emu_case(lib, 128, 64, True, 1, False, torch.int32, True, "cache", bad=[(0, 100_000)])
    # generic (vector, scalar) x (cache, table); FI_ROPE_FORMS 1: + 18 one-head forms, 2: + 36 (one or several heads)
    expected = {"FI_ROPE_FORMS=0": 4, "FI_ROPE_FORMS=1": 22, "FI_ROPE_FORMS=2": 39}
    assert lib.emu_kernels_launched() == expected[knobs]


def test_rope_spec_names():
    specs = RopeSpec.expand()
    assert [s.name() for s in specs] == ["rope_bf16", "rope_f16"]
    assert RopeSpec.from_json(specs[1].to_json()) == specs[1]


def test_rope_module_builds(tmp_path, monkeypatch):
    """A real nvcc build of the f16 module: launchers, constants, error texts, no spills, no GNU unique symbols."""
    from flashinfer import jit

    monkeypatch.setenv("FLASHINFER_JIT_CACHE", str(tmp_path / "cache"))
    spec = RopeSpec("f16")
    report = jit.ensure_built(spec)
    assert report.status == "built"
    mod = jit.load(spec)
    for symbol in ("flashinfer_rope", "flashinfer_rope_cos_sin_cache", "flashinfer_rope_position_error_record"):
        assert mod.fn(symbol) is not None
    assert mod.constants["max_rotary_dim"] == 256
    assert "strides" in mod.error_string(1101)
    # The generic form: (vector, element-wise) x (frequency table, cos/sin cache); the specialised vector forms:
    # (NeoX, interleave) x (in place, out of place, out of place copying the rest) x (cos/sin cache, frequency
    # table from pos_ids, frequency table ragged) x (one head a thread, several).
    assert_register_only(report, kernels=4 + 2 * 3 * 3 * 2)
    assert_no_unique_symbols(mod.path)
