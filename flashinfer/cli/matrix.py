"""The prewarm matrix: flags and presets -> per-family axis choices -> specs (supported and dropped) -> shards.

Generic over spec families: it only uses the registry (:func:`flashinfer._families.load_families`), each
family's ``axes()``/``expand()`` and ``unsupported_reason()``. A flag maps onto axis names and applies to every
selected family that has the axis; ``--axis NAME=V1,V2`` (settings key ``axis:NAME``) reaches any axis.

Settings are ``{flag dest or "axis:<name>": "v1,v2"}``; a family's settings may be a list of such groups,
whose matrices are unioned.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .._families import NOT_KERNELS, load_families
from .config import read_config
from .errors import UsageError
from .format import fmt_value

Settings = Dict[str, str]


@dataclasses.dataclass(frozen=True)
class AxisFlag:
    """A prewarm flag that sets one or more axes."""

    option: str  # command-line option
    dest: str  # argparse dest, also the settings key of presets and config files
    axes: Tuple[str, ...]  # axis names it sets (in every selected family that has them)
    help: str
    tie: bool = False  # its axes take the same value together (q = kv = o)


AXIS_FLAGS: Tuple[AxisFlag, ...] = (
    AxisFlag("--head-dims", "head_dims", ("head_dim",), "head dimensions, e.g. 64,128"),
    AxisFlag(
        "--dtypes",
        "dtypes",
        ("dtype_q", "dtype_kv", "dtype_o", "dtype"),
        "data types, e.g. bf16,f16; each applies to q, kv and output alike (q = kv = o), and to the element type "
        "of the single-dtype families (rope, norm, activation)",
        tie=True,
    ),
    AxisFlag("--dtype-q", "dtype_q", ("dtype_q",), "query dtype only (overrides --dtypes for q)"),
    AxisFlag(
        "--dtype-kv",
        "dtype_kv",
        ("dtype_kv",),
        "kv-cache dtype only (overrides --dtypes for kv): bf16, f16, or fp8 e4m3/e5m2 (read by the decode and "
        "prefill families and page_append; the others list fp8 specs as unsupported)",
    ),
    AxisFlag("--dtype-o", "dtype_o", ("dtype_o",), "output dtype only (overrides --dtypes for o)"),
    AxisFlag("--layouts", "layouts", ("kv_layout",), "kv layouts: NHD,HND"),
    AxisFlag("--pos-encodings", "pos_encodings", ("pos_encoding_mode",), "NONE,ROPE_LLAMA,ALIBI"),
    AxisFlag("--window", "window", ("use_window",), "sliding window: on,off"),
    AxisFlag("--softcap", "softcap", ("use_logits_soft_cap",), "logits soft cap: on,off"),
)
_FLAG_DESTS = {f.dest for f in AXIS_FLAGS}

# The checkout this package runs from (tests/ is not installed with the package).
_CHECKOUT = Path(__file__).resolve().parents[2]

# A preset is either {"families": {family: settings or [settings, ...]}} or {"config": file of the checkout}.
# Family "*" = every registered kernel family (not the probe). Flags given on the command line override the
# preset's value for the same flag (in every group); axes not mentioned take all supported values; a setting
# for an axis a family lacks is ignored (so one "*" preset serves every family).
_NO_EXTRAS = {"window": "off", "softcap": "off", "axis:use_fp16_qk_reduction": "off"}

PRESETS: Dict[str, Dict[str, Any]] = {
    "test": {
        "help": "exactly what the GPU test suite loads: the matrix file the tests own, tests/prewarm_test.toml "
        "(source checkouts only)",
        "config": "tests/prewarm_test.toml",
    },
    "all": {
        "help": "the full supported matrix of every kernel family (not the probe): large",
        "families": {"*": {}},
    },
    "llama": {
        "help": "Llama-style serving (GQA): every kernel family at bf16, head_dim 128, NHD, no RoPE fusion/"
        "window/soft cap; causal prefill (+ custom masks for tree speculation)",
        "families": {
            "*": {
                "dtypes": "bf16",
                "head_dims": "128",
                "layouts": "NHD",
                "pos_encodings": "NONE",
                "axis:mask_mode": "causal,custom",
                **_NO_EXTRAS,
            }
        },
    },
    "fp16": {
        "help": "fp16 models: every kernel family at f16, head_dim 64/128/256, NHD, no extras, causal prefill "
        "(fp32 and fp16 QK accumulation)",
        "families": {
            "*": {
                "dtypes": "f16",
                "head_dims": "64,128,256",
                "layouts": "NHD",
                "pos_encodings": "NONE",
                "axis:mask_mode": "causal",
                "window": "off",
                "softcap": "off",
            }
        },
    },
    "gemma": {
        "help": "Gemma-2-style: bf16, head_dim 256, logits soft cap, global and sliding-window layers, NHD, "
        "causal prefill",
        "families": {
            "*": {
                "dtypes": "bf16",
                "head_dims": "256",
                "layouts": "NHD",
                "pos_encodings": "NONE",
                "axis:mask_mode": "causal",
                "window": "on,off",
                "softcap": "on",
                "axis:use_fp16_qk_reduction": "off",
            }
        },
    },
    "default": {
        "help": "common serving configs of every kernel family: bf16/f16 (q=kv=o), all head dims, NHD, "
        "pos NONE/ROPE_LLAMA, no window/soft cap, causal prefill",
        "families": {
            "*": {
                "dtypes": "bf16,f16",
                "layouts": "NHD",
                "pos_encodings": "NONE,ROPE_LLAMA",
                "axis:mask_mode": "causal",
                "window": "off",
                "softcap": "off",
                "axis:use_fp16_qk_reduction": "off",
            }
        },
    },
    "fp8": {
        "help": "fp8 KV-cache serving (e.g. vLLM kv_cache_dtype='fp8', SGLang fp8_e4m3): decode on CUDA cores, page "
        "append, causal single prefill (fa2 and the Hopper fa3 and fa3_ws), batch prefill (ragged and paged, causal, "
        "and no mask for tensor-core decode), a cascade's shared level on Hopper, with e4m3 KV, bf16 q and output, "
        "head_dim 128, NHD, no RoPE fusion/window/soft cap",
        "families": {
            **{
                fam: {
                    "dtype_q": "bf16",
                    "dtype_kv": "e4m3",
                    "dtype_o": "bf16",
                    "head_dims": "128",
                    "layouts": "NHD",
                    "pos_encodings": "NONE",
                    **_NO_EXTRAS,
                }
                for fam in ("decode_single", "decode_batch_paged", "page_append")
            },
            "prefill_single": {
                "dtype_q": "bf16",
                "dtype_kv": "e4m3",
                "dtype_o": "bf16",
                "head_dims": "128",
                "pos_encodings": "NONE",
                "axis:mask_mode": "causal",
                "axis:backend": "fa2,fa3,fa3_ws",  # (auto: fa3_ws, fa3 for expanded views, fa2 for short queries)
                **_NO_EXTRAS,
            },
            "prefill_batch": {
                "dtype_q": "bf16",
                "dtype_kv": "e4m3",
                "dtype_o": "bf16",
                "head_dims": "128",
                "pos_encodings": "NONE",
                "axis:mask_mode": "causal,none",
                "axis:backend": "fa2",  # (fa3 is single-request prefill only)
                **_NO_EXTRAS,
            },
            "cascade_shared": {"dtype_q": "bf16", "dtype_kv": "e4m3", "dtype_o": "bf16", "head_dims": "128"},
        },
    },
    "probe": {
        "help": "the tiny probe module (a fast real build, for CI and doctor)",
        "families": {"probe": {}},
    },
}

_TRUE = {"on", "true", "1", "yes", "y"}
_FALSE = {"off", "false", "0", "no", "n"}


def _match_value(token: str, supported: Sequence[Any]) -> Tuple[bool, Any]:
    t = token.strip().lower()
    for s in supported:
        if isinstance(s, bool):
            if (s and t in _TRUE) or (not s and t in _FALSE):
                return True, s
        elif str(s).lower() == t:
            return True, s
    return False, None


def parse_axis_values(family: str, axis: str, text: str, supported: Sequence[Any]) -> Tuple[Any, ...]:
    """``'bf16,f16'`` -> ``('bf16', 'f16')``, typed like the axis's supported values; ``all`` = every value."""
    out: List[Any] = []
    for tok in str(text).split(","):
        tok = tok.strip()
        if not tok:
            continue
        if tok.lower() == "all":
            vals = list(supported)
        else:
            ok, v = _match_value(tok, supported)
            if not ok:
                raise UsageError(
                    f"{family}: {tok!r} is not a supported value of axis {axis!r}; "
                    f"choose from {','.join(fmt_value(s) for s in supported)} (or 'all')"
                )
            vals = [v]
        for v in vals:
            if v not in out:
                out.append(v)
    if not out:
        raise UsageError(f"{family}: empty value list for axis {axis!r}")
    return tuple(out)


def _setting_text(v: Any) -> Optional[str]:
    """A value as the comma list a flag takes: [64, 128] -> "64,128", False -> "off"."""
    if v is None:
        return None
    if isinstance(v, (list, tuple)):
        return ",".join(fmt_value(x) for x in v)
    return fmt_value(v)


def normalize_settings(settings: Dict[str, Any]) -> Settings:
    """Settings as a file may write them (keys: a flag dest, ``axis:NAME`` or a bare axis name; values: a
    comma string, a list, a boolean or a number) as flag-style settings."""
    return {
        (k if k in _FLAG_DESTS or k.startswith("axis:") else "axis:" + k): _setting_text(v) for k, v in settings.items()
    }


@dataclasses.dataclass
class MatrixItem:
    """One combination of the matrix: its spec, name, and why it is dropped (None when supported)."""

    spec: Any
    name: str
    reason: Optional[str]

    @property
    def family(self) -> str:
        return self.spec.family


def _remove_from_ties(ties: List[List[str]], axis: str) -> None:
    for group in ties:
        if axis in group:
            group.remove(axis)


def family_choices(cls: type, settings: Settings) -> Tuple[Dict[str, Tuple[Any, ...]], List[List[str]], set]:
    """Map settings onto one family's axes.

    Returns (choices for ``cls.expand``, groups of axes that must be equal, the setting keys that applied).
    Tied flags are applied first, so a per-axis flag (``--dtype-kv``) takes its axis out of the tie.
    """
    axes = cls.axes()
    choices: Dict[str, Tuple[Any, ...]] = {}
    ties: List[List[str]] = []
    applied: set = set()
    ordered = [f for f in AXIS_FLAGS if f.tie] + [f for f in AXIS_FLAGS if not f.tie]
    for flag in ordered:
        if settings.get(flag.dest) is None:
            continue
        present = [a for a in flag.axes if a in axes]
        if not present:
            continue
        applied.add(flag.dest)
        for a in present:
            choices[a] = parse_axis_values(cls.family, a, settings[flag.dest], axes[a])
            _remove_from_ties(ties, a)
        if flag.tie and len(present) > 1:
            ties.append(list(present))
    for key, text in settings.items():
        if not key.startswith("axis:") or text is None:
            continue
        a = key[len("axis:") :]
        if a not in axes:
            continue
        applied.add(key)
        choices[a] = parse_axis_values(cls.family, a, text, axes[a])
        _remove_from_ties(ties, a)
    return choices, [g for g in ties if len(g) > 1], applied


def expand_family(cls: type, settings: Settings) -> Tuple[List[Any], set]:
    """The specs of one settings group of family ``cls``, and the setting keys that applied."""
    choices, ties, applied = family_choices(cls, settings)
    specs = cls.expand(**choices)
    if ties:
        specs = [s for s in specs if all(len({getattr(s, a) for a in g}) == 1 for g in ties)]
    return specs, applied


def unsupported_reason(spec: Any) -> Optional[str]:
    """``spec.unsupported_reason()``; a reason() that raises drops the spec (with why) instead of the run."""
    try:
        return spec.unsupported_reason()
    except Exception as e:
        return f"unsupported_reason() raised {type(e).__name__}: {e}"


def _flag_text(key: str) -> str:
    return next((f.option for f in AXIS_FLAGS if f.dest == key), "--axis " + key[len("axis:") :])


def expand_matrix(
    per_family: Dict[str, Any],
    families: Optional[Dict[str, type]] = None,
    cli_settings: Optional[Settings] = None,
    strict: bool = False,
) -> List[MatrixItem]:
    """Expand ``{family: settings or [settings, ...]}`` into sorted, de-duplicated MatrixItems.

    ``cli_settings`` are the flags the user typed: one that applies to none of the families is an error.
    With ``strict``, so is any key of a group that does not apply to its family (a typo in a file).
    """
    families = families if families is not None else load_families()
    items: Dict[str, MatrixItem] = {}
    applied_any: set = set()
    for fam, settings in per_family.items():
        if fam not in families:
            raise UsageError(f"unknown spec family {fam!r}; known: {', '.join(sorted(families)) or '(none)'}")
        groups = settings if isinstance(settings, (list, tuple)) else [settings]
        for group in groups:
            specs, applied = expand_family(families[fam], group)
            applied_any |= applied
            unused = sorted(k for k, v in group.items() if v is not None and k not in applied)
            if strict and unused:
                raise UsageError(
                    f"{fam}: {', '.join(_flag_text(k) for k in unused)} does not apply to this family "
                    f"(its axes: {', '.join(families[fam].axes())})"
                )
            for spec in specs:
                name = spec.name()
                if name not in items:
                    items[name] = MatrixItem(spec=spec, name=name, reason=unsupported_reason(spec))
    for key in cli_settings or {}:
        if key not in applied_any:
            raise UsageError(f"{_flag_text(key)} does not apply to any selected family ({', '.join(per_family)})")
    return [items[n] for n in sorted(items)]


def parse_shard(text: Optional[str]) -> Optional[Tuple[int, int]]:
    """``'2/4'`` -> ``(2, 4)`` (1-based); None when not given."""
    if not text:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not m:
        raise UsageError(f"--shard must look like i/n (1-based, e.g. 1/4), got {text!r}")
    i, n = int(m.group(1)), int(m.group(2))
    if n < 1 or not 1 <= i <= n:
        raise UsageError(f"--shard {text}: need 1 <= i <= n (shards are numbered 1..n)")
    return i, n


def shard_items(items: Sequence[MatrixItem], shard: Optional[Tuple[int, int]]) -> List[MatrixItem]:
    """Deterministic split: sort by spec name (the readable part of the cache key, the same on every runner),
    then deal round-robin. Every item lands in exactly one of the n shards."""
    ordered = sorted(items, key=lambda it: it.name)
    if shard is None:
        return ordered
    i, n = shard
    return [it for j, it in enumerate(ordered) if j % n == i - 1]


def preset_groups(name: str, families: Dict[str, type]) -> Dict[str, List[Settings]]:
    """``{family: [settings, ...]}`` of preset ``name`` (families this registry lacks are left out)."""
    if name not in PRESETS:
        raise UsageError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    preset = PRESETS[name]
    if "config" in preset:
        path = _CHECKOUT / preset["config"]
        if not path.is_file():
            raise UsageError(
                f"--preset {name} reads {preset['config']} of a source checkout, and {path} does not exist; "
                "give the matrix file with --config FILE instead"
            )
        return _groups_from_file(str(path), families)
    out: Dict[str, List[Settings]] = {}
    for f, s in preset["families"].items():
        if f != "*" and f not in families:
            continue
        for fam in sorted(x for x in families if x not in NOT_KERNELS) if f == "*" else [f]:
            groups = s if isinstance(s, (list, tuple)) else [s]
            out.setdefault(fam, [dict(g) for g in groups])
    return out


def _groups_from_file(path: str, families: Dict[str, type]) -> Dict[str, List[Settings]]:
    """A matrix file of settings groups only (a preset's), as ``{family: [settings, ...]}``."""
    out: Dict[str, List[Settings]] = {}
    for el in read_config(path):
        if "settings" not in el:
            raise UsageError(f"{path}: a preset's file holds [[matrix]] settings groups, not full specs: {el!r}")
        group = normalize_settings(el["settings"])
        expand_matrix({el["family"]: group}, families, strict=True)  # a typo is an error, not a skip
        out.setdefault(el["family"], []).append(group)
    return out


def items_from_config(path: str, families: Dict[str, type]) -> List[MatrixItem]:
    """``--config FILE``: the full specs and the expanded settings groups of a matrix file, sorted by name."""
    from ..jit.spec import Spec

    items: Dict[str, MatrixItem] = {}
    for el in read_config(path):
        if "settings" in el:
            group = normalize_settings(dict(el["settings"]))
            for it in expand_matrix({el["family"]: group}, families, strict=True):
                items.setdefault(it.name, it)
        else:
            try:
                spec = Spec.from_json(el)
            except (TypeError, ValueError) as e:
                raise UsageError(f"--config {path}: bad spec {el!r}: {e}") from None
            items.setdefault(spec.name(), MatrixItem(spec=spec, name=spec.name(), reason=unsupported_reason(spec)))
    return [items[n] for n in sorted(items)]


def resolve_selection(args: argparse.Namespace, families: Dict[str, type]) -> Tuple[Dict[str, Any], Settings]:
    """From parsed prewarm args: (``{family: [settings, ...]}``, the settings typed on the command line)."""
    typed: Settings = {}
    for flag in AXIS_FLAGS:
        v = getattr(args, flag.dest, None)
        if v is not None:
            typed[flag.dest] = v
    for item in getattr(args, "axis", None) or []:
        if "=" not in item:
            raise UsageError(f"--axis expects NAME=V1,V2, got {item!r}")
        k, v = item.split("=", 1)
        typed["axis:" + k.strip()] = v
    preset_name = args.preset
    fams_arg = [f.strip() for f in (args.families or "").split(",") if f.strip()]
    if preset_name is None and not fams_arg:
        preset_name = "default"
    base = preset_groups(preset_name, families) if preset_name is not None else {}
    if fams_arg:
        for f in fams_arg:
            if f not in families:
                raise UsageError(f"unknown spec family {f!r}; known: {', '.join(sorted(families)) or '(none)'}")
        base = {f: base.get(f, [{}]) for f in fams_arg}
    per_family = {f: [{**g, **typed} for g in groups] for f, groups in base.items()}
    return per_family, typed


def select(args: argparse.Namespace) -> List[MatrixItem]:
    """The whole matrix that parsed prewarm args select (``--config`` or flags/preset), before sharding."""
    families = load_families()
    if getattr(args, "config", None):
        return items_from_config(args.config, families)
    per_family, typed = resolve_selection(args, families)
    return expand_matrix(per_family, families, typed)


def add_matrix_args(p: argparse.ArgumentParser) -> None:
    """The matrix selection flags of ``prewarm``."""
    g = p.add_argument_group("matrix (comma lists; 'all' = every supported value; an axis not given takes all values)")
    g.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        help="start from a named matrix: "
        + "; ".join(f"{k}: {v['help']}" for k, v in PRESETS.items())
        + " (default: 'default' when --families is not given either)",
    )
    g.add_argument("--families", help="spec families, e.g. decode_single (default: the preset's)")
    for f in AXIS_FLAGS:
        g.add_argument(f.option, dest=f.dest, metavar="LIST", help=f.help)
    g.add_argument(
        "--axis",
        action="append",
        metavar="NAME=LIST",
        help="any axis of any family by its field name, e.g. --axis head_dim=64,128 (repeatable)",
    )
    g.add_argument(
        "--config",
        metavar="FILE",
        help="instead of the flags: TOML ([[matrix]] family + flag/axis keys, [[specs]] full specs; needs Python "
        ">= 3.11 or tomli), a JSON list or JSON lines of specs (Spec.to_json(), e.g. FLASHINFER_JIT_RECORD output) "
        "or {family, settings} objects",
    )
