"""Building one module: render into a private temp dir, compile with nvcc, link, publish atomically.

The caller (``loader``) holds the key's file lock. The steps:

1. render the spec's template into ``<root>/tmp/<key>.<host>.<pid>.<rand>/``;
2. compile every ``.cu`` with nvcc (``MAX_JOBS`` in parallel), link ``lib<ident>.so``; the commands and
   their full output go to ``<root>/logs/<key>.log`` (and to stderr with FLASHINFER_JIT_VERBOSE=1);
3. remove an invalid old entry of the key (if any), ``os.rename`` the temp dir to ``<root>/<key>/``;
4. write ``manifest.json`` last (temp file + ``os.replace``).

A process killed at any point leaves at most a temp dir (removed later by ``cleanup_tmp``) or an entry
without manifest, which is never loaded.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Optional, Tuple

from . import cache, env
from .errors import JITBuildError
from .templating import render


@dataclasses.dataclass
class BuildReport:
    spec: object
    key: str
    status: str  # "built" | "cached"
    seconds: float  # build time, 0 if cached
    entry_dir: Path
    log_path: Optional[Path]


_ERROR_RE = re.compile(r"(\berror\b|\bError\b|\bERROR\b)")
_STRONG_ERROR_RE = re.compile(r"(:\s*(fatal\s+)?error\b|\berror\s*:|^error\b|#error)", re.I)


def first_error_line(text: str) -> Optional[str]:
    """The first compiler error line of a log (command echo lines, starting with ``$ ``, are skipped)."""
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("$ ") and not ln.startswith("# ")]
    for rx in (_STRONG_ERROR_RE, _ERROR_RE):
        for ln in lines:
            if rx.search(ln):
                return ln.strip()
    return None


class _Log:
    def __init__(self, path: Path, echo: bool) -> None:
        self.path = path
        self.echo = echo
        self.f = open(path, "w", encoding="utf-8", errors="replace")

    def write(self, text: str) -> None:
        self.f.write(text)
        self.f.flush()
        if self.echo:
            sys.stderr.write(text)
            sys.stderr.flush()

    def close(self) -> None:
        self.f.close()


def _run(cmd: List[str], cwd: Path) -> Tuple[int, str]:
    try:
        p = subprocess.run(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace")
    except OSError as e:
        return 127, f"failed to run {cmd[0]}: {e}\n"
    return p.returncode, p.stdout


def build_into(spec, key: str, root: Path) -> BuildReport:
    """Build ``spec`` (key ``key``) and publish it under ``root``. Caller holds the key's lock."""
    t0 = time.time()
    name = spec.name()
    home = env.find_cuda_home()
    nvcc = str(home / "bin" / "nvcc")
    compile_flags = env.compile_flags(spec)
    link_flags = env.link_flags(spec)
    lib_dir = env.cuda_lib_dir()
    inc = env.include_dir()

    for sub in ("tmp", "logs"):
        env.ensure_dir(root / sub)
    cache.cleanup_tmp(root)
    lpath = cache.log_path(key, root)
    log = _Log(lpath, env.jit_verbose())
    tmp = None
    try:
        log.write(
            f"# flashinfer.jit build of {name}\n# key: {key}\n# cuda_home: {home}\n"
            f"# started: {time.strftime('%Y-%m-%d %H:%M:%S')} pid {os.getpid()}\n"
        )
        tmp = cache.new_tmp_dir(key, root)
        log.write(f"# build dir: {tmp}\n")
        try:
            sources = render(spec)
        except Exception as e:
            log.write(f"render error: {e.__class__.__name__}: {e}\n")
            raise JITBuildError(
                f"rendering templates/{spec.template} for {name} (key {key}) failed: "
                f"{e.__class__.__name__}: {e}. Log: {lpath}",
                spec_name=name, key=key, log_path=str(lpath), first_error=f"{e.__class__.__name__}: {e}",
            ) from e
        objects = []
        cmds = []
        for fname, text in sources.items():
            (tmp / fname).write_text(text)
            if fname.endswith(".cu"):
                obj = fname[: -len(".cu")] + ".o"
                cmd = [nvcc, "-c", fname, "-o", obj, f"-I{inc}"] + compile_flags
                threads = env.nvcc_threads()
                if threads:
                    cmd += ["--threads", str(threads)]
                objects.append(obj)
                cmds.append(cmd)
        if not cmds:
            raise JITBuildError(f"{name}: template rendered no .cu source", spec_name=name, key=key)
        so_name = cache.lib_name(key)

        def compile_one(cmd):
            return cmd, _run(cmd, tmp)

        jobs = min(len(cmds), env.max_jobs() or os.cpu_count() or 1)
        failures = []
        if jobs <= 1:
            results = [compile_one(c) for c in cmds]
        else:
            with concurrent.futures.ThreadPoolExecutor(jobs) as ex:
                results = list(ex.map(compile_one, cmds))
        for cmd, (rc, out) in results:
            log.write("$ " + shlex.join(cmd) + "\n" + out)
            if rc != 0:
                failures.append((cmd, rc))
        if not failures:
            link = [nvcc, "-o", so_name] + objects + link_flags + [f"-L{lib_dir}", f"-Xlinker=-rpath,{lib_dir}"]
            cc = env.host_compiler()
            if cc:
                link = [link[0], "-ccbin", cc] + link[1:]
            rc, out = _run(link, tmp)
            log.write("$ " + shlex.join(link) + "\n" + out)
            if rc != 0:
                failures.append((link, rc))
        if failures:
            log.close()
            text = lpath.read_text(errors="replace")
            first = first_error_line(text) or f"{os.path.basename(failures[0][0][0])} exited with status {failures[0][1]}"
            raise JITBuildError(
                f"building {name} (key {key}) failed: {first}\n  full compiler log: {lpath}",
                spec_name=name, key=key, log_path=str(lpath), first_error=first,
            )
        seconds = time.time() - t0
        log.write(f"# built in {seconds:.2f} s\n")
        log.close()
        try:
            (tmp / "build.log").write_bytes(lpath.read_bytes())
        except OSError:
            pass
        so_sha = cache.sha256_file(tmp / so_name)

        # Publish: move a stale/invalid entry out of the way, rename, then write the manifest last.
        edir = cache.entry_dir(key, root)
        cache.discard_dir(edir, root)
        os.rename(tmp, edir)
        tmp = None
        manifest = {
            "key": key,
            "recipe": env.RECIPE_VERSION,
            "name": name,
            "spec": spec.to_json(),
            "template": spec.template,
            "sources": sorted(sources),
            "so": so_name,
            "so_sha256": so_sha,
            "flags": {"nvcc": compile_flags, "link": link_flags},
            "versions": env.versions(),
            "cuda_home": str(home),
            "build_seconds": round(seconds, 3),
            "created": time.time(),
            "log_path": str(lpath),
            "builder": {"pid": os.getpid(), "python": sys.version.split()[0]},
        }
        cache.write_json_atomic(edir / cache.MANIFEST, manifest)
        return BuildReport(spec, key, "built", seconds, edir, lpath)
    finally:
        if not log.f.closed:
            log.close()
        if tmp is not None:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
