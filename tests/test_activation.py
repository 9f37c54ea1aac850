"""Gated activations (flashinfer.activation): silu_and_mul, gelu_and_mul, gelu_tanh_and_mul against a float64
reference, over dtypes, sizes (16-byte vector and element-wise paths), odd row counts, 1-D/2-D/3-D and strided
inputs, out= (strided, non-collapsible), extreme values, PDL, CUDA graphs, streams and devices; on the CPU,
validation and a real module build."""

from __future__ import annotations

import pytest
import torch

import flashinfer
from _jit_checks import assert_no_unique_symbols, assert_register_only
from flashinfer.activation import ActivationSpec
from reference import TOLERANCES, act_and_mul, assert_close, poisoned

DTYPES = [torch.float16, torch.bfloat16]
ACTS = ["silu", "gelu", "gelu_tanh"]


def _fn(act):
    return {
        "silu": flashinfer.silu_and_mul,
        "gelu": flashinfer.gelu_and_mul,
        "gelu_tanh": flashinfer.gelu_tanh_and_mul,
    }[act]


def _check(act, x, out=None, **kw):
    ref = act_and_mul(x, act)
    y = _fn(act)(x, out=out, **kw)
    if out is not None:
        assert y is out
    assert y.shape == ref.shape and y.dtype == x.dtype
    assert_close(y, ref, what=f"{act} {tuple(x.shape)}")
    return y


# ---------------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("d", [8, 128, 1000, 4096, 11008, 14336])
def test_matches_reference(dtype, act, d):
    for rows in (1, 3, 127, 1031):
        x = 3 * torch.randn(rows, 2 * d, dtype=dtype, device="cuda")
        _check(act, x, out=poisoned((rows, d), dtype))
        _check(act, x)


@pytest.mark.gpu
@pytest.mark.parametrize("act", ACTS)
def test_large_batch_takes_the_full_gpu_path(act):
    """4096 x 14336: enough work for the most chunks per thread (the benchmark's shape)."""
    x = torch.randn(4096, 2 * 14336, dtype=torch.bfloat16, device="cuda")
    _check(act, x, out=poisoned((4096, 14336), torch.bfloat16))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("d", [1, 3, 4, 100, 2050])
def test_sizes_not_multiple_of_8(dtype, act, d):
    """The element-wise path (FlashInfer accepts d multiple of 4 only; any d works here)."""
    for rows in (1, 5, 64):
        x = torch.randn(rows, 2 * d, dtype=dtype, device="cuda")
        _check(act, x, out=poisoned((rows, d), dtype))


@pytest.mark.gpu
@pytest.mark.parametrize("act", ACTS)
def test_shapes_and_strides(act):
    d = 512
    x1 = torch.randn(2 * d, dtype=torch.bfloat16, device="cuda")
    _check(act, x1)  # 1-D: one row
    x3 = torch.randn(4, 7, 2 * d, dtype=torch.bfloat16, device="cuda")
    _check(act, x3, out=poisoned((4, 7, d), torch.bfloat16))
    big = torch.randn(33, 2 * d + 64, dtype=torch.bfloat16, device="cuda")
    _check(act, big[:, : 2 * d])  # row stride > 2d
    _check(act, big[:, 8 : 8 + 2 * d])  # offset, still 16-byte aligned
    _check(act, big[:, 1 : 1 + 2 * d])  # misaligned: element-wise path
    _check(act, big[:, : 2 * d].t().contiguous().t())  # last dimension strided: copied
    nc = torch.randn(4, 9, 2 * d, dtype=torch.bfloat16, device="cuda")[:, :7]  # leading dims do not collapse
    _check(act, nc)
    # out: a strided 2-D view, and a 3-D view whose leading dims do not collapse (written through a copy).
    out_big = poisoned((33, 2 * d), torch.bfloat16)
    _check(act, big[:, : 2 * d], out=out_big[:, d:])
    assert torch.isnan(out_big[:, :d]).all()
    out_nc = poisoned((4, 9, d), torch.bfloat16)
    _check(act, x3, out=out_nc[:, :7])
    assert torch.isnan(out_nc[:, 7:]).all()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [16, 14])
def test_silu_fast_division_edges(dtype, d):
    """silu divides by 1 + exp(-x) with __fdividef (a reciprocal and a multiply): a denominator past 2^126 (x near
    -88) or exp's overflow (x far below) gives -0 where the true value is below 1e-36; the largest finite x stays
    finite; x = +inf gives inf, x = -inf NaN (as IEEE's -inf / inf and the float64 reference), NaN stays NaN. d 16:
    the vector path, d 14: the element-wise one."""
    big = torch.finfo(dtype).max
    inf, nan = float("inf"), float("nan")
    vals = [-big, -1e4, -88.5, -88.0, -87.5, -87.0, -20.0, -1.0, 20.0, 88.0, 1e4, big, inf, -inf, nan, 0.5][:d]
    gate = torch.tensor(vals, dtype=torch.float64)
    x = torch.cat([gate, torch.ones_like(gate)])[None].to(device="cuda", dtype=dtype).repeat(3, 1)
    ref = act_and_mul(x, "silu")
    out = poisoned((3, d), dtype)
    flashinfer.silu_and_mul(x, out=out)
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=rtol, equal_nan=True)
    assert torch.equal(torch.isnan(out), torch.isnan(ref)) and torch.equal(torch.isinf(out), torch.isinf(ref))
    assert (out[:, :2] == 0).all()


@pytest.mark.gpu
@pytest.mark.parametrize("act", ACTS)
def test_extreme_values(act):
    """Large magnitudes stay finite where the reference is (silu's exp overflows to a clean -0)."""
    vals = torch.tensor([-100.0, -30.0, -5.0, -1e-3, 0.0, 1e-3, 5.0, 30.0, 100.0])
    a = vals.repeat(8)
    x = torch.cat([a, torch.full_like(a, 2.0)])[None].to(device="cuda", dtype=torch.float16).repeat(3, 1)
    y = _check(act, x)
    assert torch.isfinite(y).all()


@pytest.mark.gpu
def test_zero_sized():
    x = torch.empty(0, 256, dtype=torch.float16, device="cuda")
    assert flashinfer.silu_and_mul(x).shape == (0, 128)
    x = torch.empty(5, 0, dtype=torch.float16, device="cuda")
    assert flashinfer.gelu_and_mul(x).shape == (5, 0)


@pytest.mark.gpu
@pytest.mark.parametrize("enable_pdl", [None, True, False])
def test_enable_pdl(enable_pdl):
    x = torch.randn(64, 2 * 4096, dtype=torch.bfloat16, device="cuda")
    y = _check("silu", x, enable_pdl=enable_pdl)
    # Dependent launches back to back: the second reads what the first wrote.
    z = flashinfer.gelu_and_mul(y, enable_pdl=enable_pdl)
    assert_close(z, act_and_mul(y, "gelu"))


@pytest.mark.gpu
def test_cuda_graph_capture_and_replay():
    x = torch.randn(16, 2 * 14336, dtype=torch.bfloat16, device="cuda")
    out = torch.empty(16, 14336, dtype=torch.bfloat16, device="cuda")
    flashinfer.silu_and_mul(x, out=out)  # load the module outside the capture
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        flashinfer.silu_and_mul(x, out=out)
    for _ in range(2):
        x.copy_(torch.randn_like(x))
        out.fill_(float("nan"))
        g.replay()
        torch.cuda.synchronize()
        assert_close(out, act_and_mul(x, "silu"))


@pytest.mark.gpu
def test_runs_on_current_stream_of_tensor_device():
    x = torch.randn(256, 2 * 4096, dtype=torch.bfloat16, device="cuda")
    src = torch.randn_like(x)
    out = torch.empty(256, 4096, dtype=torch.bfloat16, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(20_000_000)  # a launch on another stream would read the stale input
        x.copy_(src)
        flashinfer.silu_and_mul(x, out=out)
    side.synchronize()
    assert_close(out, act_and_mul(src, "silu"))


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_second_device_while_first_is_current():
    torch.cuda.set_device(0)
    dev = torch.device("cuda:1")
    x = torch.randn(7, 2 * 1024, dtype=torch.float16, device=dev)
    for act in ACTS:
        y = _check(act, x)
        assert y.device == dev
    assert torch.cuda.current_device() == 0


@pytest.mark.gpu
def test_torch_compile_traces_the_custom_ops():
    def f(x):
        return flashinfer.silu_and_mul(x) + flashinfer.gelu_tanh_and_mul(x)

    x = torch.randn(9, 2 * 2048, dtype=torch.bfloat16, device="cuda")
    y = torch.compile(f, backend="aot_eager", fullgraph=True)(x)
    ref = act_and_mul(x, "silu").to(torch.bfloat16).double() + act_and_mul(x, "gelu_tanh").to(torch.bfloat16).double()
    assert_close(y, ref)


# ---------------------------------------------------------------------------------------------------- CPU


def test_cpu_tensors_are_refused_before_any_build():
    x = torch.randn(4, 256, dtype=torch.float16)
    for act in ACTS:
        with pytest.raises(ValueError, match="CUDA"):
            _fn(act)(x)
    with pytest.raises(TypeError, match="torch.Tensor"):
        flashinfer.silu_and_mul([1.0, 2.0])


def test_bad_input_raises_clear_errors(fake_cuda):
    x = torch.empty(4, 256, dtype=torch.float16, device="cuda")
    cases = [
        (lambda: flashinfer.silu_and_mul(x[:, :255]), ValueError, "even"),
        (lambda: flashinfer.silu_and_mul(x.float()), TypeError, "float16"),
        (
            lambda: flashinfer.silu_and_mul(x, out=torch.empty(4, 256, dtype=torch.float16, device="cuda")),
            ValueError,
            "out must be",
        ),
        (
            lambda: flashinfer.gelu_and_mul(x, out=torch.empty(4, 128, dtype=torch.bfloat16, device="cuda")),
            ValueError,
            "out must be",
        ),
        (
            lambda: flashinfer.gelu_and_mul(x, out=torch.empty(128, 4, dtype=torch.float16, device="cuda").t()),
            ValueError,
            "contiguous in its last dimension",
        ),
        (lambda: flashinfer.gelu_tanh_and_mul(x, enable_pdl=1), TypeError, "enable_pdl"),
    ]
    for fn, exc, match in cases:
        with pytest.raises(exc, match=match):
            fn()


def test_module_paths_match_flashinfer():
    import flashinfer.activation as activation

    for name in ("silu_and_mul", "gelu_and_mul", "gelu_tanh_and_mul"):
        assert getattr(activation, name) is getattr(flashinfer, name)


def test_activation_spec_names():
    specs = ActivationSpec.expand()
    assert [s.name() for s in specs] == ["activation_bf16", "activation_f16"]
    assert ActivationSpec.from_json(specs[0].to_json()) == specs[0]


def test_activation_module_builds(tmp_path, monkeypatch):
    """A real nvcc build of the f16 module: launcher, activation ids, no spills, no GNU unique symbols."""
    from flashinfer import jit

    monkeypatch.setenv("FLASHINFER_JIT_CACHE", str(tmp_path / "cache"))
    spec = ActivationSpec("f16")
    report = jit.ensure_built(spec)
    assert report.status == "built"
    mod = jit.load(spec)
    assert mod.fn("flashinfer_act_and_mul") is not None
    assert sorted(mod.constants[a] for a in ACTS) == [0, 1, 2]
    assert_register_only(report, kernels=6)  # 3 activations x (vector, element-wise)
    assert_no_unique_symbols(mod.path)
