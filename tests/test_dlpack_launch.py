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

import flashinfer
from flashinfer import activation, norm, rope
from flashinfer.utils import dlpack_exchange_api
from reference import act_and_mul, assert_close, poisoned
from reference import rmsnorm as rmsnorm_ref
from reference import rope as rope_ref

DECLINED = 2000

needs_table = pytest.mark.skipif(not dlpack_exchange_api(), reason="this torch has no DLPack C exchange table")


@pytest.fixture(scope="module")
def table():
    if torch.cuda.is_available():
        pytest.skip("the CPU-as-CUDA shim must not run where a GPU is visible (the GPU tests below run there)")
    if not dlpack_exchange_api():
        pytest.skip("this torch has no DLPack C exchange table")
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


def test_norm_not_a_tensor_raises_for_the_python_path(table):  # (GIL held: ctypes raises the table's error)
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


@needs_table
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


@needs_table
def test_dlpack_launch_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("FLASHINFER_DLPACK_LAUNCH", "0")
    dlpack_exchange_api.cache_clear()
    try:
        assert dlpack_exchange_api() == 0
    finally:
        monkeypatch.delenv("FLASHINFER_DLPACK_LAUNCH")
        dlpack_exchange_api.cache_clear()
    assert dlpack_exchange_api() != 0


# ---------------------------------------------------------------------------------------------------- GPU


@pytest.fixture
def python_path_forbidden(monkeypatch):
    """Every op's full Python path raises: a call passes only if its _dlpack entry point launched it. The modules
    are loaded first (the first call of a dtype takes the Python path, which registers the entry points)."""
    for dtype in (torch.float16, torch.bfloat16):
        x = torch.randn(2, 64, dtype=dtype, device="cuda")
        flashinfer.rmsnorm(x, x[0])
        flashinfer.silu_and_mul(x)
        flashinfer.apply_rope_with_cos_sin_cache_inplace(
            torch.arange(2, device="cuda"), x.clone(), x.clone(), 64, torch.randn(4, 64, device="cuda")
        )

    def forbidden(*args, **kwargs):
        raise AssertionError("the Python path ran: the _dlpack entry point declined a plain call")

    monkeypatch.setattr(norm, "_rmsnorm_checked", forbidden)
    monkeypatch.setattr(norm, "_fused_add_rmsnorm_checked", forbidden)
    monkeypatch.setattr(activation, "_act_and_mul_checked", forbidden)
    monkeypatch.setattr(rope, "_rope_cos_sin_cache", forbidden)


@pytest.mark.gpu
@needs_table
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_norms_launch_from_the_tensors(python_path_forbidden, dtype):
    def rand(*shape):
        return torch.randn(*shape, dtype=dtype, device="cuda")

    wide = rand(33, 2 * 4096)
    for x in (rand(7, 4096), rand(1, 128), wide[:, 4096:], rand(5, 8, 128), rand(3, 1000)):
        hidden = x.shape[-1]
        w = rand(hidden)
        for gemma, fn in ((0.0, flashinfer.rmsnorm), (1.0, flashinfer.gemma_rmsnorm)):
            assert_close(fn(x, w), rmsnorm_ref(x, w, 1e-6, gemma), what=f"{fn.__name__} {tuple(x.shape)}")
            out = poisoned(x.shape, dtype)
            assert fn(x, w, 1e-5, out, enable_pdl=False) is out
            assert_close(out, rmsnorm_ref(x, w, 1e-5, gemma), what=f"{fn.__name__} out= {tuple(x.shape)}")
        for gemma, fn in ((0.0, flashinfer.fused_add_rmsnorm), (1.0, flashinfer.gemma_fused_add_rmsnorm)):
            inp, res = x.clone(), rand(*x.shape)
            total = inp.double() + res.double()
            fn(inp, res, w, enable_pdl=True)
            assert_close(res, total, what=f"{fn.__name__} residual {tuple(x.shape)}")
            assert_close(inp, rmsnorm_ref(total, w, 1e-6, gemma), what=f"{fn.__name__} {tuple(x.shape)}")


@pytest.mark.gpu
@needs_table
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_activations_launch_from_the_tensors(python_path_forbidden, dtype):
    def rand(*shape):
        return torch.randn(*shape, dtype=dtype, device="cuda")

    wide = rand(9, 4 * 1024)
    for x in (rand(7, 2 * 1024), rand(2 * 300), rand(3, 5, 2 * 256), wide[:, : 2 * 1024]):
        for act, fn in (
            ("silu", flashinfer.silu_and_mul),
            ("gelu", flashinfer.gelu_and_mul),
            ("gelu_tanh", flashinfer.gelu_tanh_and_mul),
        ):
            assert_close(fn(x), act_and_mul(x, act), what=f"{act} {tuple(x.shape)}")
            out = poisoned((*x.shape[:-1], x.shape[-1] // 2), dtype)
            assert fn(x, out=out, enable_pdl=False) is out
            assert_close(out, act_and_mul(x, act), what=f"{act} out= {tuple(x.shape)}")


@pytest.mark.gpu
@needs_table
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_rope_cos_sin_cache_inplace_launches_from_the_tensors(python_path_forbidden, dtype):
    head_size, nnz = 128, 37
    for rotary_dim, three_d, pos_dtype, is_neox in ((128, False, torch.int64, True), (64, True, torch.int32, False)):
        cache = torch.randn(512, rotary_dim, device="cuda")
        positions = torch.randint(0, 512, (nnz,), device="cuda", dtype=pos_dtype)
        q = torch.randn(nnz, 8 * head_size, dtype=dtype, device="cuda")
        k = torch.randn(nnz, 2 * head_size, dtype=dtype, device="cuda")
        rows = cache[positions.long()].double().cpu()
        half = rotary_dim // 2
        q_ref = rope_ref(q.view(nnz, 8, head_size), rows[:, :half], rows[:, half:], not is_neox).view(q.shape)
        k_ref = rope_ref(k.view(nnz, 2, head_size), rows[:, :half], rows[:, half:], not is_neox).view(k.shape)
        qq = q.view(nnz, 8, head_size) if three_d else q
        kk = k.view(nnz, 2, head_size) if three_d else k
        flashinfer.apply_rope_with_cos_sin_cache_inplace(positions, qq, kk, head_size, cache, is_neox)
        assert_close(q, q_ref, what=f"q rotary {rotary_dim}")
        assert_close(k, k_ref, what=f"k rotary {rotary_dim}")
    rope.check_cos_sin_cache_positions()
