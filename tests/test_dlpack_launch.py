"""The per-token ops' "_dlpack" entry points (norm, activation, cos/sin-cache RoPE in place:
templates/include/flashinfer/host/dlpack.cuh), on a
machine without a GPU: which calls they accept and which they decline to the Python path.

CPU tensors are shown to the entry points as CUDA tensors through a shim of torch's DLPack table
(tests/_dlpack_shim.py). An accepted call goes on into the launcher, whose first CUDA call fails here (a CUDA error
code, never kDlpackDeclined = 2000); a declined one returns 2000 having launched nothing. The shim is refused
where a GPU is visible, so these tests skip there: on a GPU the same paths run for real in test_norm.py and
test_activation.py and test_rope.py (every eager call there goes through them first)."""

from __future__ import annotations

import pytest
import torch

from flashinfer import activation, norm, rope
from flashinfer.utils import dlpack_exchange_api

DECLINED = 2000

pytestmark = [
    pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-as-CUDA shim must not run where a GPU is visible"),
    pytest.mark.skipif(not dlpack_exchange_api(), reason="this torch has no DLPack C exchange table"),
]


@pytest.fixture(scope="module")
def table():
    from _dlpack_shim import shim_api

    return shim_api(dlpack_exchange_api())


def _bf16(*shape):
    return torch.randn(*shape, dtype=torch.bfloat16)


def _norm(table, fused, a, b, w, eps=1e-6, pdl=2):
    norm._module_for(torch.bfloat16, 16)
    e = norm._DLPACK[torch.bfloat16]
    fn = e.fused_add if fused else e.rmsnorm
    return fn(e.pack(table, id(a), id(b), id(w), eps, 0.0, pdl))


@pytest.mark.parametrize("fused", [False, True])
def test_norm_accepts_the_plain_cases(table, fused):
    x, w = _bf16(8, 256), _bf16(256)
    other = _bf16(8, 256)
    wide = _bf16(8, 512)
    q = _bf16(4, 8, 128)
    cases = [
        (x, other, w),  # 2-D
        (x, x, w) if not fused else (x, other, w),  # out = input (in place)
        (wide[:, :256], other, w),  # strided rows
        (q, _bf16(4, 8, 128), _bf16(128)),  # 3-D (QK-norm)
        (q.transpose(0, 1), _bf16(8, 4, 128), _bf16(128)),  # 3-D, heads-major strides
        (_bf16(1, 1), _bf16(1, 1), _bf16(1)),  # hidden 1
        (_bf16(3, 9000), _bf16(3, 9000), _bf16(9000)),  # unaligned beyond 8192: the launcher's own error
    ]
    for a, b, ww in cases:
        rc = _norm(table, fused, a, b, ww)
        assert rc not in (0, DECLINED), (a.shape, a.stride(), b.stride())


@pytest.mark.parametrize("fused", [False, True])
def test_norm_declines_what_the_python_path_must_check_or_copy(table, fused):
    x, w = _bf16(8, 256), _bf16(256)
    f16 = x.half()
    w_wide = _bf16(512)
    cases = [
        (f16, f16.clone(), w.half()),  # another module's dtype
        (x.float(), x.float(), w.float()),  # unsupported dtype
        (x, x.clone(), w.half()),  # weight dtype
        (x, x.clone(), w[:128]),  # weight size
        (x, x.clone(), w_wide[::2]),  # weight not contiguous
        (x, x[:4], w),  # other shape
        (x.t().contiguous().t(), x.clone(), w),  # last stride not 1
        (x, x.t().contiguous().t(), w),
        (x[0], x[1], w),  # 1-D
        (x[:0], x[:0], w),  # no rows
        (_bf16(2, 32776), _bf16(2, 32776), _bf16(32776)),  # hidden beyond max_hidden
        (x.view(2, 2, 2, 256), x.view(2, 2, 2, 256), w),  # 4-D
    ]
    for a, b, ww in cases:
        assert _norm(table, fused, a, b, ww) == DECLINED, (a.shape, a.dtype, b.shape, ww.shape)
    assert _norm(table, fused, x, x.clone(), w, eps=float("nan")) == DECLINED
    assert _norm(table, fused, x, x.clone(), w, eps=float("inf")) == DECLINED


def test_norm_not_a_tensor_raises_for_the_python_path(table):
    x, w = _bf16(8, 256), _bf16(256)
    not_a_tensor = [1.0]
    with pytest.raises(RuntimeError):
        _norm(table, False, x, not_a_tensor, w)


def _act(table, a, o, act="silu", pdl=2):
    activation._module_for(torch.bfloat16)
    launch, pack, codes = activation._DLPACK[torch.bfloat16]
    return launch(pack(table, id(a), id(o), codes[act], pdl))


def test_activation_accepts_the_plain_cases(table):
    g = _bf16(6, 4, 64)
    cases = [
        (_bf16(8, 64), _bf16(8, 32)),
        (g, _bf16(6, 4, 32)),  # 3-D
        (_bf16(8, 128)[:, :64], _bf16(8, 32)),  # strided rows
        (_bf16(64), _bf16(32)),  # 1-D: one row
        (_bf16(8, 2), _bf16(8, 64)[:, :1]),  # d = 1, out with any last stride
    ]
    for a, o in cases:
        for act in ("silu", "gelu", "gelu_tanh"):
            rc = _act(table, a, o, act)
            assert rc not in (0, DECLINED), (a.shape, a.stride(), o.shape, o.stride())


def test_activation_declines_what_the_python_path_must_check_or_copy(table):
    a = _bf16(8, 64)
    g = _bf16(6, 4, 64)
    cases = [
        (a.half(), _bf16(8, 32).half()),  # another module's dtype
        (a, _bf16(8, 32).half()),  # out dtype
        (a, _bf16(8, 64)),  # out's last dimension not half the input's
        (a, _bf16(4, 32)),  # rows differ
        (_bf16(8, 63), _bf16(8, 31)),  # odd
        (a[:, :0], _bf16(8, 0)),  # d = 0
        (a[:0], _bf16(0, 32)),  # no rows
        (a.t().contiguous().t(), _bf16(8, 32)),  # input's last stride not 1
        (a, _bf16(32, 8).t()),  # out's last stride not 1
        (g.transpose(0, 1), _bf16(4, 6, 32)),  # leading dimensions that do not collapse
        (a, _bf16(8, 32, 1)),  # rank differs
    ]
    for x, o in cases:
        assert _act(table, x, o) == DECLINED, (x.shape, x.stride(), o.shape, o.stride())


def _rope(table, pos, q, k, cache, head_size=128, interleave=0):
    rope._rope_module("bf16")
    launch, pack = rope._DLPACK[torch.bfloat16]
    return launch(pack(table, id(pos), id(q), id(k), id(cache), head_size, interleave))


def test_rope_cos_sin_cache_accepts_the_plain_cases(table):
    pos, pos32 = torch.arange(16), torch.arange(16, dtype=torch.int32)
    q, k = _bf16(16, 32 * 128), _bf16(16, 8 * 128)
    cache, half_cache = torch.randn(4096, 128), torch.randn(4096, 64)
    qk = _bf16(16, 40 * 128)
    cases = [
        (pos, q, k, cache),
        (pos32, q, k, cache),  # int32 positions
        (pos, q.view(16, 32, 128), k.view(16, 8, 128), cache),  # 3-D
        (pos, qk[:, : 32 * 128], qk[:, 32 * 128 :], cache),  # q and k views of one fused qkv-like buffer
        (pos, q, k, half_cache),  # partial rotary_dim
        (pos[:1], q[:1], k[:1], cache),  # one token
    ]
    for p, qq, kk, c in cases:
        for interleave in (0, 1):
            rc = _rope(table, p, qq, kk, c, interleave=interleave)
            assert rc not in (0, DECLINED), (p.dtype, qq.shape, qq.stride(), c.shape)


def test_rope_cos_sin_cache_declines_what_the_python_path_must_check_or_copy(table):
    pos = torch.arange(16)
    q, k = _bf16(16, 32 * 128), _bf16(16, 8 * 128)
    cache = torch.randn(4096, 128)
    wide_cache, wide_pos = torch.randn(4096, 256), torch.arange(32)
    q_t = _bf16(32 * 128, 16).t()
    cases = [
        (pos, q.half(), k.half(), cache),  # another module's dtype
        (pos, q, k.half(), cache),  # k dtype
        (pos.float(), q, k, cache),  # positions dtype
        (pos, q, k, cache.half()),  # cache dtype
        (pos[:8], q, k, cache),  # positions length
        (wide_pos[::2], q, k, cache),  # positions not contiguous
        (pos, q, k[:8], cache),  # k tokens
        (pos, q_t, k, cache),  # q's last stride not 1
        (pos, q, k, wide_cache[:, ::2]),  # cache's last stride not 1
        (pos, q, k, wide_cache),  # rotary_dim beyond head_size
        (pos, q, k, torch.randn(4096, 6)[:, :5]),  # odd rotary_dim
        (pos[:0], q[:0], k[:0], cache),  # no tokens
        (pos, q.view(16, 32, 1, 128), k, cache),  # 4-D
    ]
    for p, qq, kk, c in cases:
        assert _rope(table, p, qq, kk, c) == DECLINED, (p.dtype, p.shape, qq.shape, qq.stride(), kk.shape, c.shape)
    assert _rope(table, pos, q, k, cache, head_size=96) == DECLINED  # q's width not a multiple of head_size
    assert _rope(table, pos, q, k, cache, head_size=0) == DECLINED


def test_entry_points_keep_the_gil_and_share_one_table():
    """The _dlpack entries are bound with PyDLL's convention (the table's functions may set Python errors), the
    plain launchers keep releasing the GIL; FLASHINFER_DLPACK_LAUNCH=0 turns the fast path off."""
    import ctypes

    norm._module_for(torch.bfloat16, 16)
    mod = norm._norm_module("bf16").module
    fast, plain = mod.launcher("flashinfer_rmsnorm_dlpack"), mod.launcher("flashinfer_rmsnorm")
    assert fast.launcher.keeps_gil and not plain.launcher.keeps_gil
    assert type(fast.packed)._flags_ & ctypes._FUNCFLAG_PYTHONAPI
    assert not type(plain.packed)._flags_ & ctypes._FUNCFLAG_PYTHONAPI
    assert norm._DLPACK_API[0] == dlpack_exchange_api() != 0


def test_dlpack_launch_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("FLASHINFER_DLPACK_LAUNCH", "0")
    dlpack_exchange_api.cache_clear()
    try:
        assert dlpack_exchange_api() == 0
    finally:
        monkeypatch.delenv("FLASHINFER_DLPACK_LAUNCH")
        dlpack_exchange_api.cache_clear()
    assert dlpack_exchange_api() != 0
