"""A stand-in for a GPU, to run the API layer's Python on a CPU-only machine: tensors that say they live on cuda:0
(CPU memory underneath) and modules whose launchers record their keyword arguments instead of launching.

``with fake_cuda() as rec:`` patches torch's device queries and flashinfer's module loading; inside it,
``cuda(t)`` makes a "device" tensor, every ``torch.*`` factory with ``device="cuda"`` makes one, and each launcher
call appends ``(symbol, kwargs)`` to ``rec.calls`` (after checking the keywords against the launcher's declaration,
as the real BoundLauncher does). Constants come from real builds of one module per (family, head_dim): a module's
constants do not depend on its other fields. What a kernel would compute is not simulated: outputs hold whatever
the caller's buffers held.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
from typing import Any, Dict, Iterator, List, Tuple

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

import flashinfer
from flashinfer import jit

_CUDA = torch.device("cuda", 0)


class FakeCudaTensor(torch.Tensor):
    """A CPU tensor that reports device cuda:0."""

    @property
    def device(self) -> torch.device:  # type: ignore[override]
        return _CUDA

    @property
    def is_cuda(self) -> bool:  # type: ignore[override]
        return True

    @property
    def is_cpu(self) -> bool:  # type: ignore[override]
        return False

    def get_device(self) -> int:  # type: ignore[override]
        return 0


def cuda(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a fake device tensor (same memory)."""
    return t.as_subclass(FakeCudaTensor) if not isinstance(t, FakeCudaTensor) else t


def _plain(t: Any) -> Any:
    return t.as_subclass(torch.Tensor) if isinstance(t, FakeCudaTensor) else t


def _is_cuda_device(d: Any) -> bool:
    try:
        return d is not None and not isinstance(d, torch.dtype) and torch.device(d).type == "cuda"
    except (TypeError, RuntimeError):
        return False


class _Mode(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        flat, _ = tree_flatten((args, kwargs))
        fake_in = any(isinstance(a, FakeCudaTensor) for a in flat)
        if func in (torch.Tensor.pin_memory, torch.Tensor.is_pinned):
            return args[0] if func is torch.Tensor.pin_memory else True
        if func is torch.Tensor.to or func is torch.Tensor.cuda or func is torch.Tensor.cpu:
            target = kwargs.pop("device", None)
            rest = []
            for a in args[1:]:
                if isinstance(a, (str, torch.device)) or (isinstance(a, int) and not isinstance(a, bool)):
                    target = a
                else:
                    rest.append(a)
            if func is torch.Tensor.cuda:
                target = "cuda"
            if func is torch.Tensor.cpu:
                target = "cpu"
            kwargs.pop("non_blocking", None)
            kwargs.pop("copy", None)
            src = _plain(args[0])
            out = src.to(*rest, **kwargs) if rest or kwargs else src
            if target is not None and _is_cuda_device(target):
                return cuda(out)
            if target is not None:  # to the CPU: a plain tensor (a copy, as from a device)
                return out.clone() if out is src else out
            return cuda(out) if fake_in else out
        to_cuda = False
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = "cpu"
            to_cuda = True
        kwargs.pop("pin_memory", None) if kwargs.get("pin_memory") else None
        args, kwargs = tree_map(_plain, (args, kwargs))
        out = func(*args, **kwargs)
        if to_cuda and func in (torch.empty, torch.empty_like, torch.empty_strided) and out.is_floating_point():
            out.fill_(1.0)  # deterministic "uninitialised" device memory, so that in-place scaling is visible
        if not (to_cuda or fake_in):
            return out
        if func in (torch.Tensor.data_ptr, torch.Tensor.__repr__) or not isinstance(out, (torch.Tensor, tuple, list)):
            return out
        return tree_map(lambda x: cuda(x) if isinstance(x, torch.Tensor) else x, out)


@dataclasses.dataclass
class Recorder:
    calls: List[Tuple[str, Dict[str, Any]]] = dataclasses.field(default_factory=list)
    loaded: List[Any] = dataclasses.field(default_factory=list)  # specs of the modules asked for

    def launches(self, symbol_part: str = "") -> List[Tuple[str, Dict[str, Any]]]:
        return [(s, k) for s, k in self.calls if symbol_part in s]

    def clear(self) -> None:
        self.calls.clear()


_CONSTANTS: Dict[Tuple[str, int], Dict[str, int]] = {}


def _representative(spec: Any) -> Any:
    """A spec of the same family and head_dim (and KV storage) whose real module gives the constants."""
    fields = {f.name for f in dataclasses.fields(spec)}
    kw = {"head_dim": spec.head_dim} if "head_dim" in fields else {}
    if "kv_storage" in fields:
        kw["kv_storage"] = spec.kv_storage
    if "backend" in fields and spec.backend in ("fa3", "fa3_ws"):
        kw.update(
            backend=spec.backend,
            mask_mode=spec.mask_mode,
            dtype_q=spec.dtype_q,
            dtype_kv=spec.dtype_kv,
            dtype_o=spec.dtype_o,
        )
    return type(spec)(**kw)


def _constants(spec: Any) -> Dict[str, int]:
    rep = _representative(spec)
    key = (rep.name(),)
    if key not in _CONSTANTS:
        _CONSTANTS[key] = dict(_REAL_LOAD(rep).constants)
    return _CONSTANTS[key]


_REAL_LOAD = jit.load


def _is_pointer(c_type: str) -> bool:
    return c_type.endswith("*") or c_type in ("cudaStream_t", "cudaEvent_t")


def _decode_head_tile(group: int) -> int:
    return 1 if group == 1 else 2 if group == 2 else 8 if group % 8 == 0 else 4


class _FakeLauncher:
    def __init__(self, module: _FakeModule, decl: Any) -> None:
        self.module, self.decl = module, decl
        self.launcher = decl

    def __call__(self, **kwargs: Any) -> Any:
        names = self.decl.names
        missing = [n for n in names if n not in kwargs]
        unknown = [n for n in kwargs if n not in names]
        if missing or unknown:
            raise TypeError(f"{self.decl.symbol}: missing arguments {missing}, unknown arguments {unknown}")
        recorded = dict(kwargs, _spec=self.module.spec)
        if self.decl.symbol in (
            "flashinfer_batch_decode_plan",
            "flashinfer_batch_decode_run",
            "flashinfer_batch_prefill",
        ):
            recorded.update(self.module.struct_args(self.decl.symbol, kwargs["args"]))  # a struct: its fields
        self.module.rec.calls.append((self.decl.symbol, recorded))
        return self.module.respond(self.decl.symbol, kwargs)

    def call(self, *args: Any) -> Any:
        """The positional call (BoundLauncher.call): arguments in declaration order."""
        if len(args) != len(self.decl.names):
            raise TypeError(f"{self.decl.symbol}: {len(args)} arguments, declared {len(self.decl.names)}")
        return self(**dict(zip(self.decl.names, args)))

    @property
    def raw(self):
        raise AssertionError("launchers are called with keywords or .call")


class _FakeModule:
    def __init__(self, spec: Any, rec: Recorder) -> None:
        self.spec, self.rec = spec, rec
        self._decl = {ln.symbol: ln for ln in spec.launchers}
        self._constants = None

    @property
    def constants(self) -> Dict[str, int]:
        if self._constants is None:
            self._constants = _constants(self.spec)
        return self._constants

    def launcher(self, symbol: str) -> _FakeLauncher:
        return _FakeLauncher(self, self._decl[symbol])

    def fn(self, symbol: str):
        raise AssertionError("launchers are called with keywords (module.launcher(symbol)(...))")

    def error_string(self, code: int) -> str:
        return f"fake error {code}"

    def check(self, code: int, what: str = "") -> None:
        if code:
            raise RuntimeError(f"{what}: fake CUDA error {code}")

    def struct_args(self, symbol: str, address: int) -> Dict[str, Any]:
        """The batch decode launcher's argument struct at ``address``, as ``args.<field>`` values (pointers:
        whether there is one)."""
        from flashinfer import prefill
        from flashinfer._planning import BATCH_PREFILL_ARGS, DECODE_PLAN_ARGS, DECODE_RUN_ARGS, DecodePlannerABI

        if symbol == "flashinfer_batch_prefill":
            fields, cls = BATCH_PREFILL_ARGS, prefill._args_type(self)
        else:
            abi = DecodePlannerABI.of(self)
            fields, cls = (
                (DECODE_PLAN_ARGS, abi.args_type) if symbol.endswith("_plan") else (DECODE_RUN_ARGS, abi.run_args_type)
            )
        a = cls.from_address(address)
        return {f"args.{n}": (bool(getattr(a, n)) if _is_pointer(t) else getattr(a, n)) for n, t in fields}

    def respond(self, symbol: str, kw: Dict[str, Any]) -> Any:
        if symbol == "flashinfer_batch_decode_plan_size":
            return 8192
        if symbol == "flashinfer_decode_head_tile":
            return _decode_head_tile(kw["group_size"])
        if symbol.endswith("_occupancy"):
            ctypes.c_int.from_address(kw["out"]).value = 2
            return 0
        if symbol == "flashinfer_event_create":
            ctypes.c_void_p.from_address(kw["out"]).value = 0x1000
            return 0
        if symbol == "flashinfer_batch_decode_plan":
            from flashinfer._planning import DecodePlannerABI

            c = self.constants
            a = DecodePlannerABI.of(self).args_type.from_address(kw["args"])
            batch, ps = a.batch, a.page_size
            ip = (ctypes.c_int * (batch + 1)).from_address(a.indptr)
            lp = (ctypes.c_int * batch).from_address(a.last_page_len)
            lens = [0 if ip[r + 1] == ip[r] else (ip[r + 1] - ip[r] - 1) * ps + lp[r] for r in range(batch)]
            info = (ctypes.c_int64 * c["info_len"]).from_address(kw["info"])
            info[c["info.max_keys"]] = max(lens)
            info[c["info.total_keys"]] = sum(lens)
            info[c["info.worker_capacity"]] = info[c["info.workers"]] = 1
            info[c["info.pieces"]] = batch
            info[c["info.max_index"]] = -1
            return 0
        return 0


@contextlib.contextmanager
def fake_cuda(monkeypatch) -> Iterator[Recorder]:
    """Patches torch's CUDA queries and flashinfer's module loading for the duration (see the module docstring)."""
    from flashinfer import _planning, decode, page, prefill, utils

    rec = Recorder()
    modules: Dict[Any, _FakeModule] = {}

    def load(spec):
        rec.loaded.append(spec)
        if spec not in modules:
            modules[spec] = _FakeModule(spec, rec)
        return modules[spec]

    caches = (
        decode._decode_module,
        prefill._module,
        prefill._occupancy,
        prefill._device_capability,
        prefill._args_type,
        page._append_fn,
        utils._capability,
        _planning.DecodePlannerABI.of,
    )
    for cache in caches:
        cache.cache_clear()
    decode._single_kernels.clear()
    monkeypatch.setattr(jit, "load", load)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    class _Stream:
        cuda_stream = 0

        def synchronize(self):
            rec.calls.append(("stream.synchronize", {}))

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: _Stream())
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    for mod in (decode, prefill, page, utils):
        if hasattr(mod, "current_stream_ptr"):
            monkeypatch.setattr(mod, "current_stream_ptr", lambda device: 0)
        if hasattr(mod, "current_stream_at"):
            monkeypatch.setattr(mod, "current_stream_at", lambda index: 0)
        if hasattr(mod, "num_sms"):
            monkeypatch.setattr(mod, "num_sms", lambda index: 132)
    with _Mode():
        try:
            yield rec
        finally:
            for cache in caches:
                cache.cache_clear()
            decode._single_kernels.clear()


def workspace(nbytes: int = 16 << 20) -> torch.Tensor:
    return cuda(torch.zeros(nbytes, dtype=torch.uint8))


__all__ = ["FakeCudaTensor", "Recorder", "cuda", "fake_cuda", "workspace", "flashinfer"]
