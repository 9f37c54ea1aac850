"""The JIT engine: specs -> cache keys -> rendered CUDA -> torch.utils.cpp_extension.load (ninja, nvcc)
-> cached shared libraries with a C ABI -> ctypes.

Public API (see the repository contract):
``load(spec) -> JITModule``, ``ensure_built(spec) -> BuildReport``, ``cache_key(spec)``, ``render(spec)``,
``cache_root()``, ``templates_dir()``, ``arch_flags(spec)``, ``find_cuda_home()``, ``list_entries()``,
``clear_cache(predicate=None)``, ``prewarm(specs, jobs=None, progress=None) -> PrewarmReport`` (build many
modules in parallel worker processes), and the errors ``JITBuildError``, ``CUDAToolkitNotFoundError``,
``JITCacheError``, ``JITDisabledError``, ``JITEnvironmentError`` (a bad value of an environment variable).
"""

from . import probe as probe
from .build import BuildReport, first_error_line
from .cache import EntryInfo, cache_key, check_entry, cleanup_tmp, clear_cache, entry_info, list_entries, prune_cache
from .env import (
    RECIPE_VERSION,
    arch_flags,
    cache_root,
    cuda_toolkit_version,
    find_cuda_home,
    templates_dir,
    versions,
)
from .errors import (
    CUDAToolkitNotFoundError,
    JITBuildError,
    JITCacheError,
    JITCacheInsecureError,
    JITDisabledError,
    JITEnvironmentError,
)
from .loader import JITModule, ensure_built, load, loaded_modules
from .parallel_build import PrewarmReport, PrewarmResult, prewarm
from .probe import ProbeSpec
from .spec import ERROR_STRING_SYMBOL, Spec, register_family, spec_families
from .templating import render, templates_digest

__all__ = [
    "BuildReport",
    "CUDAToolkitNotFoundError",
    "ERROR_STRING_SYMBOL",
    "EntryInfo",
    "JITBuildError",
    "JITCacheError",
    "JITCacheInsecureError",
    "JITDisabledError",
    "JITEnvironmentError",
    "JITModule",
    "PrewarmReport",
    "PrewarmResult",
    "ProbeSpec",
    "RECIPE_VERSION",
    "Spec",
    "arch_flags",
    "cache_key",
    "cache_root",
    "check_entry",
    "cleanup_tmp",
    "clear_cache",
    "cuda_toolkit_version",
    "ensure_built",
    "entry_info",
    "find_cuda_home",
    "first_error_line",
    "list_entries",
    "load",
    "loaded_modules",
    "prewarm",
    "prune_cache",
    "register_family",
    "render",
    "spec_families",
    "templates_dir",
    "templates_digest",
    "versions",
]
