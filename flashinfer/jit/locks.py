"""Locks of the JIT cache: one inter-process file lock and one in-process thread lock per cache key.

Whoever writes an entry (a build publishing it, an archive import, a removal) holds that key's file lock,
``<root>/locks/<key>.lock``; threads of one process first serialise on the key's thread lock, so a process
asks the file lock once per key at a time. This module sits below the loader and the cache (it needs only
``env`` and ``errors``), so both can take a lock without importing each other.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Dict, Hashable, Optional

from . import env
from .errors import JITCacheError

LOCKS_DIR = "locks"

_thread_locks: Dict[Hashable, threading.Lock] = {}
_thread_locks_guard = threading.Lock()


def lock_path(key: str, root: Optional[Path] = None) -> Path:
    """``<root>/locks/<key>.lock``: the file lock of cache key ``key``."""
    return (root or env.cache_root_path()) / LOCKS_DIR / f"{key}.lock"


class file_lock:  # lower case: used like a function, ``with file_lock(key, root):``
    """Hold the file lock of ``key`` under ``root`` (FLASHINFER_JIT_LOCK_TIMEOUT seconds at most).

    Raises
    ------
    JITCacheError
        When the lock is not acquired in time; the message names the lock file and how to proceed.
    """

    def __init__(self, key: str, root: Path) -> None:
        self.path = lock_path(key, root)
        self.timeout = env.lock_timeout()
        self.lock = None

    def __enter__(self) -> file_lock:
        import filelock

        env.ensure_dir(self.path.parent, "JIT lock directory")
        self.lock = filelock.FileLock(str(self.path), timeout=self.timeout)
        try:
            self.lock.acquire()
        except filelock.Timeout as e:
            raise JITCacheError(
                f"timed out after {self.timeout:g} s waiting for the JIT cache lock {self.path} "
                f"(another process is building this module, or is stuck). Raise "
                f"FLASHINFER_JIT_LOCK_TIMEOUT, or stop the process holding it (e.g. `fuser {self.path}`)."
            ) from e
        return self

    def __exit__(self, *exc: object) -> None:
        self.lock.release()


def thread_lock(key: Hashable) -> threading.Lock:
    """The process-wide thread lock of ``key`` (a cache key or a spec; created on first use, kept for the
    process's life)."""
    with _thread_locks_guard:
        lk = _thread_locks.get(key)
        if lk is None:
            lk = _thread_locks[key] = threading.Lock()
        return lk
