"""Building a host-compiled emulator of device code (tests/rope_emulator, tests/sampling_emulator): the sources
written to a scratch directory and compiled with g++ into a shared library, cached under the temp directory by the
hash of the sources and flags (so that a changed header rebuilds it), published with an atomic rename."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Dict, List, Optional

CUDA_HOME = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda"))


def available(header: str = "cuda_fp16.h") -> Optional[str]:
    """None when an emulator can be built here (g++ and the CUDA headers), else why not."""
    if shutil.which("g++") is None:
        return "no g++"
    if not (CUDA_HOME / "include" / header).exists():
        return f"no CUDA headers under {CUDA_HOME}"
    return None


def build(what: str, files: Dict[str, str], flags: List[str]) -> Path:
    """The shared library of ``files`` ({path under the build directory: text}; ``driver.cpp`` is compiled, the rest
    included) built with ``flags``; ``what`` names it in the cache and in a build error."""
    digest = hashlib.sha256(repr((sorted(files.items()), flags)).encode()).hexdigest()[:16]
    root = Path(tempfile.gettempdir()) / f"fi_{what}_emu_{os.getuid()}"
    so = root / f"lib{what}_emu_{digest}.so"
    if not so.exists():
        root.mkdir(parents=True, exist_ok=True)
        src = Path(tempfile.mkdtemp(dir=root))
        for name, text in files.items():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            (src / name).write_text(text)
        tmp = src / f"lib{what}_emu.so"
        cmd = ["g++", *flags, f"-I{src}", f"-I{CUDA_HOME / 'include'}", str(src / "driver.cpp"), "-o", str(tmp)]
        cmd += [f"-L{CUDA_HOME / 'lib64'}", "-lcudart"]
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode != 0:
            raise RuntimeError(f"building the {what} emulator failed:\n{p.stderr[-6000:]}")
        os.replace(tmp, so)
    return so
