"""Configuration specs: one frozen dataclass per kernel family, naming itself.

A spec holds every compile-time choice of one module. It knows its template, the Jinja variables it
renders with, the launchers the built library exports (declared once each, as :class:`~flashinfer.jit.abi.Launcher`),
and a readable, complete name. The engine (``flashinfer.jit.core``) turns a spec into a cache key by adding a digest of
everything else that changes the binary.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Dict, Iterable, Tuple, Type

from .abi import ERROR_STRING, Launcher, packed_entries, prototypes

# Every module exports this to turn a returned cudaError_t into text.
ERROR_STRING_SYMBOL = ERROR_STRING.symbol

_FAMILIES: Dict[str, Type[Spec]] = {}


def register_family(cls: Type[Spec]) -> Type[Spec]:
    """Class decorator: make a spec family known to the CLI, the manifest reader and the tests."""
    if cls.family in _FAMILIES and _FAMILIES[cls.family] is not cls:
        raise ValueError(f"spec family {cls.family!r} registered twice")
    _FAMILIES[cls.family] = cls
    return cls


def spec_families() -> Dict[str, Type[Spec]]:
    """All registered families, by name (importing flashinfer registers the built-in ones)."""
    return dict(_FAMILIES)


@dataclasses.dataclass(frozen=True)
class Spec:
    """Base class of all configuration specs.

        Subclasses are frozen dataclasses decorated with :func:`register_family`; they set ``family``
        (short family name, also the first part of :meth:`name`), ``template`` (path of the ``.cu.jinja``
        template relative to ``templates/``) and ``launchers`` (its ``extern "C"`` functions, each declared once; the
    template stamps their prototypes as ``{{ abi.<symbol> }}`` and includes ``module_exports.jinja``).
    """

    family: ClassVar[str] = ""
    template: ClassVar[str] = ""
    launchers: ClassVar[Tuple[Launcher, ...]] = ()

    def name(self) -> str:
        """Readable, complete, filesystem-safe name of this configuration (``[a-z0-9_-]``)."""
        raise NotImplementedError

    def render_vars(self) -> Dict[str, Any]:
        """Variables the template is rendered with (rendered under StrictUndefined)."""
        raise NotImplementedError

    def template_vars(self) -> Dict[str, Any]:
        """``render_vars()`` plus ``abi``: {symbol: C prototype} of every launcher (the template's declarations),
        and ``abi_packed``: the C source of their packed entry points (``module_exports.jinja`` stamps it)."""
        return {**self.render_vars(), "abi": prototypes(self.launchers), "abi_packed": packed_entries(self.launchers)}

    def extra_cuda_cflags(self) -> Tuple[str, ...]:
        """Extra nvcc flags this spec needs (part of the cache key)."""
        return ()

    def needs_sm90a(self) -> bool:
        """True when the kernel uses sm_90a-only instructions (wgmma, setmaxnreg)."""
        return False

    def unsupported_reason(self) -> str | None:
        """None when this combination is supported; else why not (used by prewarm's filtering)."""
        return None

    def to_json(self) -> Dict[str, Any]:
        return {"family": self.family, **dataclasses.asdict(self)}

    @staticmethod
    def from_json(data: Dict[str, Any]) -> Spec:
        data = dict(data)
        family = data.pop("family")
        try:
            cls = _FAMILIES[family]
        except KeyError:
            raise ValueError(f"unknown spec family {family!r}; known: {sorted(_FAMILIES)}") from None
        return cls(**data)

    @classmethod
    def axes(cls) -> Dict[str, Tuple[Any, ...]]:
        """Supported values of every field, for prewarm's matrix expansion (first value is default)."""
        raise NotImplementedError

    @classmethod
    def expand(cls, **choices: Iterable[Any]) -> list[Spec]:
        """Cartesian product over the axes; an axis not given takes all its supported values."""
        import itertools

        axes = cls.axes()
        unknown = set(choices) - set(axes)
        if unknown:
            raise ValueError(f"{cls.family}: unknown axes {sorted(unknown)}; known: {sorted(axes)}")
        names = list(axes)
        values = [tuple(choices[n]) if n in choices else axes[n] for n in names]
        return [cls(**dict(zip(names, combo))) for combo in itertools.product(*values)]
