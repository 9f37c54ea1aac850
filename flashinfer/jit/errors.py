"""Error types of the JIT engine."""

from __future__ import annotations

from typing import Optional


class JITBuildError(RuntimeError):
    """Building a module failed.

    The message names the spec, the cache key, the path of the full compiler log and quotes the first
    compiler error line. The same facts are available as attributes.
    """

    def __init__(
        self,
        message: str,
        *,
        spec_name: Optional[str] = None,
        key: Optional[str] = None,
        log_path: Optional[str] = None,
        first_error: Optional[str] = None,
    ) -> None:
        super().__init__(message)
        self.spec_name = spec_name
        self.key = key
        self.log_path = log_path
        self.first_error = first_error


class CUDAToolkitNotFoundError(JITBuildError):
    """No usable CUDA toolkit (nvcc + headers) was found; the message lists every place looked at."""


class JITCacheError(RuntimeError):
    """The cache is unusable for what was asked: its directory cannot be created or written (the message
    says "permission denied", "read-only file system" or "no space left on device" when that is the
    cause), writing an entry failed, or a cache lock timed out."""


class JITDisabledError(RuntimeError):
    """FLASHINFER_DISABLE_JIT is set and the requested module is not in the cache."""


class JITCacheInsecureError(JITCacheError):
    """The cache root or an entry could have been written by someone else (owned by another user, or
    writable by group/others): refusing to load code from it. The message says how to fix it."""


class JITEnvironmentError(ValueError):
    """An environment variable the JIT engine reads has a value it does not accept. The message names
    the variable, the value and the accepted values; nothing falls back to a default silently."""
