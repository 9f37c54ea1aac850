"""Building many modules ahead of time, in parallel worker processes: :func:`prewarm`.

Workers share the cache and its per-key locks with every other process, so two prewarms (or a prewarm and a
program loading a module) racing on one cache build each module once. Nothing is loaded into the calling
process; modules already cached are confirmed here without starting a worker.

``flashinfer.jit.prewarm`` is this module's :func:`prewarm` (the CLI's ``prewarm`` command is a thin layer
over it).
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import multiprocessing
import os
import re
import time
from typing import Any, Callable, Dict, Iterable, List, Optional

from . import cache
from .loader import ensure_built

__all__ = ["PrewarmReport", "PrewarmResult", "prewarm"]

# Statuses of one result: "built" (compiled by this prewarm), "cached" (a valid entry was already there),
# "failed" (error says why), "unsupported" (spec.unsupported_reason(); not attempted).
STATUSES = ("built", "cached", "failed", "unsupported")


@dataclasses.dataclass
class PrewarmResult:
    """What happened to one spec.

    Attributes
    ----------
    spec : Spec
        The spec.
    status : str
        One of ``"built"``, ``"cached"``, ``"failed"``, ``"unsupported"``.
    key : str or None
        Its cache key (None when it could not be computed, or the spec is unsupported).
    seconds : float or None
        Wall seconds the build took ("built"; also "failed" when known); 0 for "cached".
    entry_dir : str or None
        The cache entry directory ("built", "cached").
    log_path : str or None
        The compiler log, when there is one.
    error : str or None
        ``"<ExceptionType>: <message>"`` ("failed"), or the unsupported reason ("unsupported").
    """

    spec: Any
    status: str
    key: Optional[str] = None
    seconds: Optional[float] = None
    entry_dir: Optional[str] = None
    log_path: Optional[str] = None
    error: Optional[str] = None

    @property
    def name(self) -> str:
        """The spec's readable name."""
        return self.spec.name()

    def as_dict(self) -> Dict[str, Any]:
        """The JSON-friendly fields (no spec): status, key, seconds, entry_dir, log_path, error."""
        return {
            "status": self.status,
            "key": self.key,
            "seconds": self.seconds,
            "entry_dir": self.entry_dir,
            "log_path": self.log_path,
            "error": self.error,
        }


@dataclasses.dataclass
class PrewarmReport:
    """The outcome of :func:`prewarm`: one :class:`PrewarmResult` per distinct spec, in input order."""

    results: List[PrewarmResult]
    jobs: int
    wall_seconds: float

    def by_status(self, status: str) -> List[PrewarmResult]:
        """The results with ``status`` (one of ``"built"``, ``"cached"``, ``"failed"``, ``"unsupported"``)."""
        if status not in STATUSES:
            raise ValueError(f"unknown status {status!r}; one of {STATUSES}")
        return [r for r in self.results if r.status == status]

    @property
    def ok(self) -> bool:
        """True when nothing failed (unsupported specs are not failures: they are never attempted)."""
        return not self.by_status("failed")


# progress(result, building): called in the calling process after each spec is settled; ``building`` is how
# many builds are still running at that moment.
ProgressCallback = Callable[[PrewarmResult, int], None]


def _log_path_of(exc: BaseException) -> Optional[str]:
    """The compiler log an engine error points at (JITBuildError.log_path, or a ``/....log`` in its text)."""
    for attr in ("log_path", "log"):
        v = getattr(exc, attr, None)
        if v:
            return str(v)
    m = re.search(r"(/[^\s'\"]+\.log)\b", str(exc))
    return m.group(1) if m else None


def build_one(spec: Any, shared: Optional[bool] = None) -> PrewarmResult:
    """Build ``spec`` into the cache unless a valid entry is there; never raises (failures are results).

    Runs in a worker process (it is pickled by reference) or in the calling process. ``shared``: see
    :func:`flashinfer.jit.ensure_built`.
    """
    t0 = time.perf_counter()
    try:
        rep = ensure_built(spec, shared=shared)
    except Exception as e:  # reported, never raised across the process boundary
        return PrewarmResult(
            spec,
            "failed",
            seconds=time.perf_counter() - t0,
            log_path=_log_path_of(e),
            error=f"{type(e).__name__}: {e}",
        )
    return PrewarmResult(
        spec,
        rep.status,
        key=rep.key,
        seconds=float(rep.seconds or 0.0),
        entry_dir=str(rep.entry_dir) if rep.entry_dir else None,
        log_path=str(rep.log_path) if rep.log_path else None,
    )


def _unsupported_reason(spec: Any) -> Optional[str]:
    try:
        return spec.unsupported_reason()
    except Exception as e:  # a buggy reason() must not stop the other builds
        return f"unsupported_reason() raised {type(e).__name__}: {e}"


def _valid_keys() -> set:
    try:
        return {e.key for e in cache.list_entries(check_current=False) if e.valid}
    except Exception:  # an unreadable cache: every spec goes to a worker, which reports the real error
        return set()


def _mp_context():
    # forkserver/spawn, never fork: the caller may hold CUDA state or threads that a forked child inherits.
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")


def prewarm(
    specs: Iterable[Any],
    jobs: Optional[int] = None,
    progress: Optional[ProgressCallback] = None,
    shared: Optional[bool] = None,
) -> PrewarmReport:
    """Build every supported spec of ``specs`` into the JIT cache, ``jobs`` at a time.

    Parameters
    ----------
    specs : iterable of Spec
        The modules to build; duplicates are built once. Specs whose ``unsupported_reason()`` is not None
        are reported as ``"unsupported"`` and not attempted.
    jobs : int, optional
        Worker processes (default ``os.cpu_count()``). ``1`` builds in the calling process (simplest to
        debug); more use a process pool (forkserver, else spawn), so each spec must be picklable and its
        family importable by the workers.
    progress : callable, optional
        ``progress(result, building)`` is called in the calling process as each spec is settled (cached ones
        first), with the number of builds still running.
    shared : bool, optional
        New entries readable by every user (0755 directories and libraries, 0644 files), for a cache one user
        (e.g. root, in an image) prepares for others; default ``FLASHINFER_JIT_CACHE_SHARED``.

    Returns
    -------
    PrewarmReport
        One result per distinct spec, in input order; ``report.ok`` is False when a build failed. Build
        errors are results, not exceptions.

    Raises
    ------
    KeyboardInterrupt
        Propagated after cancelling the builds not yet started (running ones finish in their workers).
    """
    jobs = jobs if jobs and jobs > 0 else (os.cpu_count() or 1)
    t0 = time.perf_counter()
    unique = list(dict.fromkeys(specs))
    results: Dict[Any, PrewarmResult] = {}

    def settle(res: PrewarmResult, building: int) -> None:
        results[res.spec] = res
        if progress is not None:
            progress(res, building)

    valid = _valid_keys()
    to_build: List[Any] = []
    for spec in unique:
        reason = _unsupported_reason(spec)
        if reason is not None:
            settle(PrewarmResult(spec, "unsupported", error=reason), 0)
            continue
        try:
            key = cache.cache_key(spec)
        except Exception:  # the build reports it
            key = None
        if key is not None and key in valid:
            settle(build_one(spec, shared), 0)  # a valid entry: ensure_built verifies it and returns "cached"
        else:
            to_build.append(spec)

    if jobs == 1 or len(to_build) <= 1:
        for n, spec in enumerate(to_build):
            settle(build_one(spec, shared), len(to_build) - n - 1)
    else:
        workers = min(jobs, len(to_build))
        pool = cf.ProcessPoolExecutor(max_workers=workers, mp_context=_mp_context())
        try:
            futures = {pool.submit(build_one, spec, shared): spec for spec in to_build}
            pending = set(futures)
            while pending:
                done, pending = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
                for fut in done:
                    try:
                        res = fut.result()
                        res.spec = futures[fut]  # the caller's object, not the worker's copy
                    except Exception as e:  # the worker died (BrokenProcessPool, pickling, OOM kill...)
                        res = PrewarmResult(
                            futures[fut], "failed", error=f"worker process failed: {type(e).__name__}: {e}"
                        )
                    settle(res, min(len(pending), workers))
        except KeyboardInterrupt:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown(wait=True)

    return PrewarmReport([results[s] for s in unique], jobs, time.perf_counter() - t0)
