"""The one registry of kernel families: spec family name -> the module that defines (and registers) its spec.

The CLI, the manifest reader and the tests import families through :func:`load_families`; a new op family adds
one line here. Importing a listed module must succeed: a broken family is an error, never silently skipped.
"""

from __future__ import annotations

import importlib
from typing import Dict, Type

FAMILY_MODULES: Dict[str, str] = {
    "decode_single": "flashinfer.decode",
    "decode_batch_paged": "flashinfer.decode",
    "prefill_single": "flashinfer.prefill",
    "prefill_batch": "flashinfer.prefill",
    "page_append": "flashinfer.page",
    "merge_state": "flashinfer.cascade",
    "cascade_shared": "flashinfer.cascade",
    "rope": "flashinfer.rope",
    "norm": "flashinfer.norm",
    "activation": "flashinfer.activation",
    "sampling": "flashinfer.sampling",
    "probe": "flashinfer.jit.probe",
}

# Families that exist to test the engine, not kernels users call (a "*" preset leaves them out).
NOT_KERNELS = ("probe",)


def load_families() -> Dict[str, Type]:
    """Import every registered family's module and return {family: spec class}."""
    from .jit.spec import spec_families

    for module in sorted(set(FAMILY_MODULES.values())):
        importlib.import_module(module)
    families = spec_families()
    missing = sorted(set(FAMILY_MODULES) - set(families))
    if missing:
        raise RuntimeError(
            f"families {missing} are listed in flashinfer/_families.py but their modules register no spec"
        )
    return families
