"""Checks of a real module build shared by the families' build tests: ptxas's register report (kept in the build
log) and the library's dynamic symbol table."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import List, Optional


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
