"""The launchers' packed entry points (flashinfer/jit/abi.py): every ``int`` launcher is also exported as
``<symbol>_packed(const void* block)`` taking its arguments in one block that Python packs with ``struct``. CPU
tests: the block layout against ctypes' model of the same C struct for every launcher of every family, and one
real build whose host-only launcher echoes what it received through each calling path."""

from __future__ import annotations

import ctypes
import dataclasses
import struct
from typing import Any, Dict

import pytest

import flashinfer  # noqa: F401  (registers the built-in families)
from flashinfer import jit
from flashinfer.jit import loader as jloader
from flashinfer.jit.abi import Launcher, _ctype, packed_entries
from flashinfer.jit.probe import ProbeSpec


def _all_launchers():
    out = []
    for family, cls in sorted(jit.spec_families().items()):
        if cls.__module__.startswith("flashinfer."):
            out.extend((family, ln) for ln in cls.launchers)
    return out


@pytest.mark.parametrize("family,ln", _all_launchers(), ids=lambda x: x if isinstance(x, str) else x.symbol)
def test_block_layout_matches_the_c_struct(family, ln):
    """The packed block is laid out as the C compiler lays out a struct of the parameters (ctypes.Structure models
    that layout): same size, and every field reads back what was packed."""
    if ln.packing is None:
        assert ln.restype != "int" or not ln.names
        return
    fields = [(n, _ctype(t)) for n, t in zip(ln.names, ln.c_types)]
    Args = type("Args", (ctypes.Structure,), {"_fields_": fields})
    assert ln.packing.size == ctypes.sizeof(Args)
    values = []
    for i, (_, ct) in enumerate(fields):
        if ct in (ctypes.c_float, ctypes.c_double):
            values.append(0.5 + i)
        elif ct is ctypes.c_void_p:
            values.append(0x10000 * (i + 1) + 8)
        else:
            values.append(-(i + 1) if ct in (ctypes.c_int, ctypes.c_int64) else i + 1)
    got = Args.from_buffer_copy(ln.packing.pack(*values))
    assert [getattr(got, n) for n, _ in fields] == values


def test_packed_entries_render_one_entry_per_int_launcher():
    decl = Launcher("flashinfer_x", "const void* a, int n, float s")
    src = packed_entries([decl, Launcher("flashinfer_y", restype="double")])
    assert src.count("_packed(const void* packed)") == 1
    assert "return flashinfer_x(a.a, a.n, a.s);" in src
    assert decl.packing.format == "@Pif0P"


# ------------------------------------------------------------------------------------------------ a real build

ECHO = Launcher("flashinfer_test_echo", "int a, int64_t b, uint64_t c, float d, double e, const void* p, int64_t* out")


@dataclasses.dataclass(frozen=True)
class EchoProbeSpec(ProbeSpec):
    """The probe module plus a host-only launcher that writes back its arguments (not a registered family)."""

    family = "probe_echo_test"
    launchers = ProbeSpec.launchers + (ECHO,)

    def name(self) -> str:
        return f"probe_echo_{self.dtype}_c{self.constant}"

    def render_vars(self) -> Dict[str, Any]:
        v = dict(super().render_vars())
        v["extra_code"] = (
            f"{ECHO.prototype()} {{\n"
            "  out[0] = a; out[1] = b; out[2] = static_cast<int64_t>(c >> 1);\n"
            "  out[3] = static_cast<int64_t>(d * 4); out[4] = static_cast<int64_t>(e * 8);\n"
            "  out[5] = static_cast<int64_t>(reinterpret_cast<uintptr_t>(p));\n"
            "  return a + 1;\n}\n"
        )
        return v


@pytest.fixture(scope="module")
def echo_module(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("FLASHINFER_JIT_CACHE", str(tmp_path_factory.mktemp("packed") / "cache"))
    mp.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    mp.delenv("FLASHINFER_DISABLE_JIT", raising=False)
    jloader._forget()
    try:
        yield jit.load(EchoProbeSpec())
    finally:
        jloader._forget()
        mp.undo()


def _echo(fn, *args):
    out = (ctypes.c_int64 * 6)()
    rc = fn(*args, ctypes.addressof(out))
    return rc, list(out)


def test_packed_call_passes_every_argument(echo_module):
    b = echo_module.launcher("flashinfer_test_echo")
    assert b.packed is not None and b.call is not b.raw
    args = (-7, -(2**40), 2**63 + 6, 1.25, 2.5, 0x12345670)
    expect = (-6, [-7, -(2**40), (2**63 + 6) >> 1, 5, 20, 0x12345670])
    assert _echo(b.call, *args) == expect
    assert _echo(b.raw, *args) == expect  # the plain ctypes call agrees
    out = (ctypes.c_int64 * 6)()
    names = dict(zip(ECHO.names, (*args, ctypes.addressof(out))))
    assert b(**names) == -6 and list(out) == expect[1]  # keywords take the same path


def test_packed_call_takes_none_as_a_null_pointer(echo_module):
    b = echo_module.launcher("flashinfer_test_echo")
    assert _echo(b.call, 1, 2, 3, 0.5, 0.25, None) == (2, [1, 2, 1, 2, 2, 0])


def test_values_the_block_cannot_hold_take_the_ctypes_call(echo_module):
    """An int beyond its field (ctypes narrows it) or a float beyond float32 (ctypes makes it inf): the same result
    as the plain call, never an error the plain call would not raise."""
    b = echo_module.launcher("flashinfer_test_echo")
    assert _echo(b.call, 2**31 + 5, 2, 3, 0.5, 0.25, 0) == _echo(b.raw, 2**31 + 5, 2, 3, 0.5, 0.25, 0)
    # (inf * 4 cast to int64 is undefined in C: compare the return codes, which the launcher computes from a)
    assert _echo(b.call, 1, 2, 3, 1e300, 0.25, 0)[0] == _echo(b.raw, 1, 2, 3, 1e300, 0.25, 0)[0] == 2
    with pytest.raises(ctypes.ArgumentError):
        b.call(1.5, 2, 3, 0.5, 0.25, 0, 0)  # a float for an int: refused by ctypes, as before


def test_wrong_argument_count_and_names_raise(echo_module):
    b = echo_module.launcher("flashinfer_test_echo")
    with pytest.raises(TypeError):
        b.call(1, 2, 3)
    with pytest.raises(TypeError, match="missing arguments"):
        b(a=1)


def test_block_size_mismatch_fails_at_bind(echo_module):
    bad = Launcher(ECHO.symbol, ECHO.params)
    bad.packing = struct.Struct("@iq")
    with pytest.raises(RuntimeError, match="disagree"):
        bad.bind(echo_module.lib)


def test_common_exports_keep_the_plain_call(echo_module):
    """flashinfer_module_constants has no packed entry (called once per module): the positional call is ctypes'."""
    b = echo_module.launcher("flashinfer_module_constants")
    assert b.packed is None and b.call is b.raw
    assert echo_module.constants["constant"] == 1
