"""Checks of a real module build shared by the families' build tests: ptxas's register report (kept in the build
log) and the library's dynamic symbol table."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Dict, List, Optional


def assert_register_only(report, kernels: Optional[int] = None) -> List[str]:
    """Every kernel of the build ``report`` (``jit.ensure_built``'s) has no stack frame and no spills; with
    ``kernels``, the log reports exactly that many. Returns ptxas's lines, one per kernel."""
    frames = [line.strip() for line in Path(report.log_path).read_text().splitlines() if "bytes stack frame" in line]
    assert frames, "no ptxas resource report in the build log"
    if kernels is not None:
        assert len(frames) == kernels, frames
    assert all(line.startswith("0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads") for line in frames), (
        frames
    )
    return frames


def assert_no_unique_symbols(library: Path) -> None:
    """The library exports no STB_GNU_UNIQUE symbol (``nm`` type ``u``: such a symbol pins the library in the
    process, so a rebuilt module could never be loaded in its place). Skipped where ``nm`` is absent."""
    nm = shutil.which("nm")
    if nm:
        dyn = subprocess.run([nm, "-D", "--defined-only", str(library)], capture_output=True, text=True).stdout
        assert " u " not in dyn, dyn


def sass_of(library: Path) -> Optional[str]:
    """``cuobjdump -sass`` of a library (the toolkit's, on PATH or under CUDA_HOME, or triton's bundled one), or
    None where no cuobjdump is found (the machine-code checks are then skipped)."""
    import os

    candidates = [
        shutil.which("cuobjdump"),
        os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "cuobjdump"),
    ]
    try:
        import triton

        candidates.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))
    except ImportError:
        pass
    tool = next((c for c in candidates if c and os.path.isfile(c) and os.access(c, os.X_OK)), None)
    if tool is None:
        return None
    return subprocess.run([tool, "-sass", str(library)], capture_output=True, text=True, check=True).stdout


def sass_functions(sass: str) -> Dict[str, str]:
    """The kernels of a ``cuobjdump -sass`` listing: mangled name -> its instructions' text."""
    out: Dict[str, List[str]] = {}
    cur: Optional[List[str]] = None
    for line in sass.splitlines():
        if "Function : " in line:
            cur = out.setdefault(line.split("Function : ", 1)[1].strip(), [])
        elif cur is not None:
            cur.append(line)
    return {k: "\n".join(v) for k, v in out.items()}
