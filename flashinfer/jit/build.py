"""Building one module: render into a private temp dir, build with ``torch.utils.cpp_extension.load``
(ninja: nvcc compile, c++ link), publish atomically.

The caller (``loader``) holds the key's file lock. The steps:

1. render the spec's template into ``<root>/tmp/<key>.<host>.<pid>.<rand>/``;
2. ``torch.utils.cpp_extension.load(name=<key ident>_<nonce>, sources=[rendered .cu files],
   build_directory=<that temp dir>, is_python_module=False, with_cuda=True, verbose=True, ...)``:
   torch writes ``build.ninja`` there and runs ``ninja -v`` (``MAX_JOBS`` parallel jobs), which compiles
   every ``.cu`` with nvcc and links ``<key ident>_<nonce>.so``. The flags are ours (``env.nvcc_flags``:
   ``-O3 -std=c++17 -lineinfo --resource-usage ... -gencode ...``, ``env.link_flags``); see ``env`` for
   what torch adds. All output of torch, ninja and the compilers goes to ``<root>/logs/<key>.log``
   (and to stderr after the build with FLASHINFER_JIT_VERBOSE=1): file descriptors 1 and 2 are
   redirected to the log around the call (see :func:`_output_to`);
3. rename the library to ``lib<key ident>.so``, remove an invalid old entry of the key (if any),
   ``os.rename`` the temp dir to ``<root>/<key>/``;
4. write ``manifest.json`` last (temp file + ``os.replace``).

A process killed at any point leaves at most a temp dir (its builder lock is then free: removed by the
next ``cleanup_tmp`` in any process, container or host sharing the cache) or an entry without manifest,
which is never loaded. A failure (compile or link error, disk full, permission) removes the temp dir or
the half-published entry before it raises: ``JITBuildError`` for the compiler (quoting the first
meaningful error line of the log, a linker's own message included), ``JITCacheError`` for the cache.

With ``shared`` (``ensure_built(spec, shared=True)`` or FLASHINFER_JIT_CACHE_SHARED=1) the entry and its
log are made readable by everyone (dirs and libraries 0755, files 0644); by default they are private
to the builder's umask. Never writable by group or others either way.

The library name is unique per build attempt, so torch's in-process ``JIT_EXTENSION_VERSIONER`` never
treats a build as already done (it would skip ninja for a name/sources/flags it has seen), and
``build_directory`` is a fresh private dir, so ninja always builds from scratch; freshness is decided by
our cache key alone. ``load`` also takes torch's own lock file (``<temp dir>/lock``, harmless: private
dir) and, with ``is_python_module=False``, loads the library into this process
(``torch.ops.load_library`` -> ``ctypes.CDLL``, RTLD_LOCAL, from the temp path). For ``load()`` that is
the module about to be used anyway: the loader's ``ctypes.CDLL(<entry>/lib<ident>.so)`` then gets the
same handle (glibc matches the renamed file by device and inode). ``ensure_built()`` (prewarm workers)
does not use it: the library just stays mapped in the worker until it exits (no CUDA context is
created, nothing runs), which costs nothing and does not stop the entry from being cleared or replaced.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Iterator, List, Optional

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


# What a build log's error lines look like, most telling first. A compile error names the source line
# ("x.cu(5): error: ...", "x.cu:1:2: fatal error: ...", "nvcc fatal : ..."); a link error is the
# linker's own message ("/usr/bin/ld: cannot find -lc10_cuda: ...", "undefined reference to ...");
# system failures ("No space left on device", "Killed" by the OOM killer) may come from any tool. The
# summary lines that follow them ("collect2: error: ld returned 1 exit status", ninja's "FAILED:" and
# "build stopped", torch's "Error building extension") say only that something failed: used last.
_COMPILER_ERROR_RE = re.compile(
    r"(:\s*(fatal\s+)?error\b|\berror\s*:|^error\b|#error|^\S*nvcc fatal\s*:|^\S*ptxas fatal\s*:|\bfatal\s*:)", re.I)
_LINKER_RE = re.compile(
    r"(^(\S*/)?(ld|ld\.gold|ld\.lld|lld|ld\.bfd|collect2)(\.exe)?:\s*(?!error: ld returned)"
    r"|undefined reference to|cannot find -l|multiple definition of)")
_SYSTEM_RE = re.compile(
    r"(No space left on device|Disk quota exceeded|Read-only file system|Permission denied|"
    r"Cannot allocate memory|out of memory|\bKilled\b|Segmentation fault|Too many open files)", re.I)
_SUMMARY_RE = re.compile(
    r"(collect2:\s*error:\s*ld returned|^FAILED:|^ninja: build stopped|ninja: error: |"
    r"Error building extension|subprocess\.CalledProcessError|^RuntimeError:|^Traceback|exit status)", re.I)
_ERROR_RE = re.compile(r"(\berror\b|\bError\b|\bERROR\b)")
# Command echo lines: ours ("$ ", "# ") and ninja -v's ("[1/2] /usr/local/cuda/bin/nvcc ...").
_ECHO_RE = re.compile(r"^(\$ |# |\[\d+/\d+\] )")


def first_error_line(text: str) -> Optional[str]:
    """The first meaningful error line of a build log: a compiler error, else the linker's own message
    (not collect2's "ld returned 1 exit status"), else a system error (disk full, permission, killed),
    else any line mentioning an error; summary lines (collect2, ninja's FAILED:, torch's "Error building
    extension") only when nothing else is there. Command echo lines are skipped."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not _ECHO_RE.match(ln)]
    meaningful = [ln for ln in lines if not _SUMMARY_RE.search(ln)]
    for rx in (_COMPILER_ERROR_RE, _LINKER_RE, _SYSTEM_RE, _ERROR_RE):
        for ln in meaningful:
            if rx.search(ln):
                return ln
    for ln in lines:
        if _ERROR_RE.search(ln) or _SYSTEM_RE.search(ln):
            return ln
    return None


class _Log:
    """The build log (append mode, so that output written to it through other descriptors interleaves)."""

    def __init__(self, path: Path, echo: bool, shared: bool = False) -> None:
        self.path = path
        self.echo = echo
        try:
            os.unlink(path)  # the previous build's log of this key (never write through a planted link)
        except FileNotFoundError:
            pass
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        if shared:
            os.fchmod(fd, 0o644)  # whatever the umask
        self.f = os.fdopen(fd, "a", encoding="utf-8", errors="replace")

    def write(self, text: str) -> None:
        self.f.write(text)
        self.f.flush()
        if self.echo:
            sys.stderr.write(text)
            sys.stderr.flush()

    def close(self) -> None:
        self.f.close()


# torch's load() (and ninja, nvcc, ptxas under it) write to the process's file descriptors 1 and 2,
# which are process-wide: one redirected build at a time per process. Builds of other keys in other
# threads of this process wait here (other processes, e.g. prewarm workers, build in parallel), and
# anything else this process writes to stdout/stderr during a build lands in that build's log.
_OUTPUT_LOCK = threading.Lock()


def _flush_std() -> None:
    for s in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            if s is not None:
                s.flush()
        except Exception:
            pass


@contextlib.contextmanager
def _output_to(path: Path) -> Iterator[int]:
    """Redirect file descriptors 1 and 2 (this process and its children) to ``path`` (appending).

    Measured against the alternative (running load() in a child Python process, whose output a pipe
    would catch without touching ours): dup2 costs microseconds, a child costs an ``import torch``
    (1.5-2 s here) per build.
    """
    with _OUTPUT_LOCK:
        _flush_std()
        fd = os.open(str(path), os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        saved: List[Optional[int]] = []
        try:
            for target in (1, 2):
                try:
                    saved.append(os.dup(target))
                except OSError:  # descriptor closed (daemon): close it again afterwards
                    saved.append(None)
            try:
                for target in (1, 2):
                    os.dup2(fd, target)
                yield fd
            finally:
                _flush_std()
                for target, old in zip((1, 2), saved):
                    if old is None:
                        try:
                            os.close(target)
                        except OSError:
                            pass
                    else:
                        os.dup2(old, target)
        finally:
            for old in saved:
                if old is not None:
                    os.close(old)
            os.close(fd)


def _extension_name(key: str) -> str:
    """A fresh library name per build attempt: ``<key ident>_<8 hex>``."""
    return key.replace("-", "_") + "_" + uuid.uuid4().hex[:8]


@contextlib.contextmanager
def _cpp_extension(home: Path):
    """``torch.utils.cpp_extension`` (imported lazily: the warm path never imports it), told our toolkit
    for the duration of one build. Its module-level CUDA_HOME (read from the environment when it was
    imported) is what it joins nvcc's and the CUDA libraries' paths with; it is restored afterwards, and
    ``os.environ`` is never touched. Callers hold ``_OUTPUT_LOCK`` (one build at a time per process)."""
    import torch.utils.cpp_extension as ce

    saved = ce.CUDA_HOME
    ce.CUDA_HOME = str(home)
    try:
        yield ce
    finally:
        ce.CUDA_HOME = saved


def build_into(spec, key: str, root: Path, shared: Optional[bool] = None) -> BuildReport:
    """Build ``spec`` (key ``key``) and publish it under ``root``. Caller holds the key's lock.

    ``shared`` (default FLASHINFER_JIT_CACHE_SHARED): make the entry and its log readable by everyone.
    Raises JITBuildError (compiler/linker), CUDAToolkitNotFoundError, or JITCacheError (the cache could
    not be written: disk full, permission); every failure leaves nothing half-written behind."""
    shared = env.shared_cache() if shared is None else shared
    try:
        return _build_into(spec, key, root, shared)
    except OSError as e:  # our own file operations (the compiler's failures are JITBuildErrors)
        from .errors import JITCacheError

        where = Path(os.fsdecode(e.filename)) if getattr(e, "filename", None) else root
        raise JITCacheError(
            f"building {spec.name()} (key {key}) failed writing {where}: {e.strerror or e} "
            f"({env.why_not_writable(where.parent, e)}); nothing was published"
        ) from e


def _build_into(spec, key: str, root: Path, shared: bool) -> BuildReport:
    t0 = time.time()
    name = spec.name()
    home = env.find_cuda_home()
    compile_flags = env.compile_flags(spec)  # as in the key (incl. -ccbin $CC, which torch adds itself)
    link_flags = env.link_flags(spec)
    cuda_cflags = env.nvcc_flags(spec)
    threads = env.nvcc_threads()
    if threads:
        cuda_cflags += ["--threads", str(threads)]
    lib_dir = env.cuda_lib_dir()
    ldflags = link_flags + [f"-Wl,-rpath,{lib_dir}"]
    inc = env.include_dir()

    env.ensure_dir(root / "tmp")
    env.ensure_dir(root / "logs", shared=shared)
    cache.cleanup_tmp(root)
    lpath = cache.log_path(key, root)
    log = _Log(lpath, env.jit_verbose(), shared)
    tmp = None
    edir = None  # set while a renamed entry has no manifest yet
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
        cu_files = []
        for fname, text in sources.items():
            (tmp / fname).write_text(text)
            if fname.endswith(".cu"):
                cu_files.append(str(tmp / fname))
        if not cu_files:
            raise JITBuildError(f"{name}: template rendered no .cu source", spec_name=name, key=key)
        ext_name = _extension_name(key)
        load_kwargs = dict(
            name=ext_name,
            sources=cu_files,
            extra_cuda_cflags=cuda_cflags,
            extra_include_paths=[str(inc)],
            extra_ldflags=list(ldflags),  # torch appends its -L/-l flags to this list
            build_directory=str(tmp),
            is_python_module=False,
            with_cuda=True,
            verbose=True,
        )
        log.write(
            "$ torch.utils.cpp_extension.load("
            + ", ".join(f"{k}={v!r}" for k, v in load_kwargs.items())
            + f")  # CC={os.environ.get('CC', '')!r} CXX={env.cxx_compiler()!r} MAX_JOBS={os.environ.get('MAX_JOBS', '')!r}\n"
        )
        failure: Optional[BaseException] = None
        echo_from = log.f.tell()
        with _output_to(lpath):
            try:
                with _cpp_extension(home) as ce:
                    ce.load(**load_kwargs)
            except Exception as e:  # compile/link errors: RuntimeError("Error building extension ...")
                failure = e
        if log.echo:  # the compiler output went to the log only: show it now
            with open(lpath, "r", encoding="utf-8", errors="replace") as f:
                f.seek(echo_from)
                sys.stderr.write(f.read())
                sys.stderr.flush()
        built = tmp / f"{ext_name}.so"
        if failure is None and not built.is_file():
            failure = RuntimeError(f"torch.utils.cpp_extension.load produced no {built.name}")
        if failure is not None:
            log.write(f"# torch.utils.cpp_extension.load failed: {failure.__class__.__name__}: {failure}\n")
            log.close()
            text = lpath.read_text(errors="replace")
            first = first_error_line(text)
            if first:  # nvcc names the source by its absolute path in the (removed) build dir
                first = first.replace(str(tmp) + os.sep, "")
            else:
                msg = str(failure).strip()
                first = f"{failure.__class__.__name__}: {msg.splitlines()[0] if msg else '(no message)'}"
            raise JITBuildError(
                f"building {name} (key {key}) failed: {first}\n  full compiler log: {lpath}",
                spec_name=name, key=key, log_path=str(lpath), first_error=first,
            ) from failure
        so_name = cache.lib_name(key)
        os.rename(built, tmp / so_name)
        try:
            os.unlink(tmp / "lock")  # torch's FileLock file, released by now
        except OSError:
            pass
        seconds = time.time() - t0
        log.write(f"# built in {seconds:.2f} s\n")
        log.close()
        (tmp / "build.log").write_bytes(lpath.read_bytes())
        if shared:
            cache.make_shared_tree(tmp)
        cache.harden(tmp / so_name)  # no group/other write bits, whatever the umask (loads refuse those)
        cache.harden(tmp)
        so_sha = cache.sha256_file(tmp / so_name)

        # Publish: move a stale/invalid entry out of the way, rename, then write the manifest last.
        edir = cache.entry_dir(key, root)
        cache.discard_dir(edir, root)
        cache.release_tmp_dir(tmp, remove=False)  # drops the builder lock file: not part of the entry
        os.rename(tmp, edir)
        tmp = None
        manifest = {
            "key": key,
            "recipe": env.RECIPE_VERSION,
            "name": name,
            "spec": spec.to_json(),
            "select": cache.selector_digest(spec),  # found by this on hosts without a toolkit
            "archs": [f"{cc}{'+ptx' if ptx else ''}" for cc, ptx in env.target_archs()],
            "template": spec.template,
            "sources": sorted(sources),
            "so": so_name,
            "so_sha256": so_sha,
            "flags": {"nvcc": compile_flags, "link": link_flags, "cxx": env.cxx_compiler()},
            "torch_load": {"name": ext_name, "extra_ldflags": load_kwargs["extra_ldflags"]},  # incl. torch's
            "versions": env.versions(),
            "templates_sha256": cache.templates_digest(),
            "cuda_home": str(home),
            "build_seconds": round(seconds, 3),
            "created": time.time(),
            "log_path": str(lpath),
            "builder": {"pid": os.getpid(), "python": sys.version.split()[0]},
            "shared": shared,
        }
        cache.write_json_atomic(edir / cache.MANIFEST, manifest)
        published, edir = edir, None
        return BuildReport(spec, key, "built", seconds, published, lpath)
    finally:
        if not log.f.closed:
            log.close()
        if tmp is not None:
            cache.release_tmp_dir(tmp, remove=True)
        if edir is not None:  # renamed into place but no manifest (write failed): never leave it there
            cache.discard_dir(edir, root)
