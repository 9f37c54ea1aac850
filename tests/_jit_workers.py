"""Subprocess entry points and test-only specs for tests/test_jit.py.

Run as ``python tests/_jit_workers.py COMMAND ARGS...`` (with the repo root on PYTHONPATH). Each command
prints one JSON line on stdout as its last line.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import Any, Dict


def _probe_spec_cls():
    from flashinfer.jit.probe import ProbeSpec

    return ProbeSpec


def make_broken_spec_cls():
    """A ProbeSpec variant (NOT registered as a family) whose template stamps code that does not compile."""
    ProbeSpec = _probe_spec_cls()

    @dataclasses.dataclass(frozen=True)
    class BrokenProbeSpec(ProbeSpec):
        family = "probe_broken_test"

        def name(self) -> str:
            return f"probe_broken_{self.dtype}_c{self.constant}"

        def render_vars(self) -> Dict[str, Any]:
            v = dict(super().render_vars())
            v["extra_code"] = "static int flashinfer_this_does_not_compile = undefined_identifier_xyz;"
            return v

    return BrokenProbeSpec


def make_missing_var_spec_cls():
    """A ProbeSpec variant whose render_vars lack a variable the template uses (StrictUndefined must catch it)."""
    ProbeSpec = _probe_spec_cls()

    @dataclasses.dataclass(frozen=True)
    class MissingVarProbeSpec(ProbeSpec):
        family = "probe_missing_var_test"

        def name(self) -> str:
            return f"probe_missingvar_{self.dtype}_c{self.constant}"

        def render_vars(self) -> Dict[str, Any]:
            v = dict(super().render_vars())
            del v["dtype_c"]
            return v

    return MissingVarProbeSpec


def _emit(obj: Dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def cmd_keys(specs_json: str) -> None:
    """Print the cache keys of a JSON list of spec dicts."""
    import flashinfer  # noqa: F401  (registers families)
    from flashinfer import jit

    try:
        import flashinfer.decode  # noqa: F401
    except ImportError:
        pass
    specs = [jit.Spec.from_json(d) for d in json.loads(specs_json)]
    _emit({"keys": [jit.cache_key(s) for s in specs], "names": [s.name() for s in specs]})


def cmd_race(spec_json: str, ready_dir: str, go_file: str) -> None:
    """Import everything, say ready, wait for the go file, then load the spec."""
    import torch  # noqa: F401

    import flashinfer  # noqa: F401
    from flashinfer import jit

    spec = jit.Spec.from_json(json.loads(spec_json))
    with open(os.path.join(ready_dir, f"{os.getpid()}.ready"), "w"):
        pass
    deadline = time.time() + 120
    while not os.path.exists(go_file):
        if time.time() > deadline:
            raise SystemExit("never got the go signal")
        time.sleep(0.005)
    t0 = time.time()
    m = jit.load(spec)
    const = m.fn("flashinfer_probe_constant")()
    _emit({"pid": os.getpid(), "status": m.status, "key": m.key, "constant": const, "seconds": time.time() - t0})


def cmd_build(spec_json: str) -> None:
    """ensure_built the spec (the kill test SIGKILLs this midway)."""
    import flashinfer  # noqa: F401
    from flashinfer import jit

    rep = jit.ensure_built(jit.Spec.from_json(json.loads(spec_json)))
    _emit({"status": rep.status, "key": rep.key, "seconds": rep.seconds})


def cmd_warm(spec_json: str) -> None:
    """Time a warm load in a fresh process after `import torch`, forbidding subprocesses and rendering."""
    import subprocess

    t_imp = time.perf_counter()
    import torch  # noqa: F401

    t_torch = time.perf_counter()
    import flashinfer  # noqa: F401
    from flashinfer import jit
    from flashinfer.jit import templating as render_mod

    t_fi = time.perf_counter()
    calls = []

    class _NoPopen:
        def __init__(self, *a, **k):
            calls.append(a[0] if a else k.get("args"))
            raise AssertionError(f"subprocess on the warm path: {a!r}")

    def _no_render(*a, **k):
        calls.append("render")
        raise AssertionError("render on the warm path")

    subprocess.Popen = _NoPopen  # type: ignore[misc]
    render_mod.render = _no_render  # type: ignore[assignment]
    import flashinfer.jit.build as build_mod

    build_mod.render = _no_render  # type: ignore[assignment]
    spec = jit.Spec.from_json(json.loads(spec_json))
    t0 = time.perf_counter()
    m = jit.load(spec)
    t1 = time.perf_counter()
    const = m.fn("flashinfer_probe_constant")()
    t2 = time.perf_counter()
    m2 = jit.load(spec)
    t3 = time.perf_counter()
    _emit(
        {
            "status": m.status,
            "constant": const,
            "warm_load_ms": 1e3 * (t1 - t0),
            "first_call_ms": 1e3 * (t2 - t1),
            "memo_us": 1e6 * (t3 - t2),
            "same": m2 is m,
            "import_torch_s": t_torch - t_imp,
            "import_flashinfer_ms": 1e3 * (t_fi - t_torch),
            "forbidden_calls": [str(c) for c in calls],
            "jinja2_imported": "jinja2" in sys.modules,
        }
    )


def main(argv) -> None:
    cmd, *args = argv
    {"keys": cmd_keys, "race": cmd_race, "build": cmd_build, "warm": cmd_warm}[cmd](*args)


if __name__ == "__main__":
    main(sys.argv[1:])
