"""Command line: ``python -m flashinfer {prewarm,cache,demo,doctor}``.

prewarm  expand a configuration matrix (one flag per axis, or a preset), drop unsupported combinations,
         build the rest in parallel worker processes that share the JIT cache and its per-key locks.
cache    list / verify / clear / prune / export / import entries of the JIT cache.
demo     build the bf16 d128 NHD decode module and, with a GPU, run and check it.
doctor   print the toolkit, arch flags, cache root and versions the JIT engine would use.

The matrix code is generic over spec families: it only uses ``spec_families()``, each family's
``axes()``/``expand()`` and ``unsupported_reason()``. CLI flags map onto axis names (a flag applies to
every selected family that has the axis); ``--axis NAME=V1,V2`` reaches any axis of any family.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import dataclasses
import json
import multiprocessing
import os
import re
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

__all__ = ["main", "build_parser", "expand_matrix", "shard_items", "MatrixItem", "PRESETS", "AXIS_FLAGS"]


class UsageError(Exception):
    """Bad command-line input: printed and exit status 2."""


# --------------------------------------------------------------------------------------------------
# Engine / family access (imported lazily so `--help` stays fast and errors are reported cleanly)
# --------------------------------------------------------------------------------------------------

_FAMILY_MODULES = ("flashinfer.decode", "flashinfer.batch_decode", "flashinfer.page", "flashinfer.prefill",
                   "flashinfer.sampling", "flashinfer.jit.probe")
_NOT_KERNELS = ("probe",)  # families that a "*" preset leaves out


def _load_families() -> Dict[str, type]:
    """Import the modules that register the built-in families, then return all registered ones."""
    import importlib

    for mod in _FAMILY_MODULES:
        try:
            importlib.import_module(mod)
        except ImportError:
            pass  # that family is simply not available (e.g. a partial checkout)
    from flashinfer.jit.spec import spec_families

    return spec_families()


def _jit():
    import flashinfer.jit as jit

    return jit


# --------------------------------------------------------------------------------------------------
# Matrix: flags -> axes, presets, expansion, sharding
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class AxisFlag:
    option: str  # command-line option
    dest: str  # argparse dest, also the key used in PRESETS
    axes: Tuple[str, ...]  # axis names it sets (in every selected family that has them)
    help: str
    tie: bool = False  # several axes take the same value together (q = kv = o)


AXIS_FLAGS: Tuple[AxisFlag, ...] = (
    AxisFlag("--head-dims", "head_dims", ("head_dim",), "head dimensions, e.g. 64,128"),
    AxisFlag(
        "--dtypes",
        "dtypes",
        ("dtype_q", "dtype_kv", "dtype_o"),
        "data types, e.g. bf16,f16; each applies to q, kv and output alike (q = kv = o)",
        tie=True,
    ),
    AxisFlag("--dtype-q", "dtype_q", ("dtype_q",), "query dtype only (overrides --dtypes for q)"),
    AxisFlag("--dtype-kv", "dtype_kv", ("dtype_kv",), "kv-cache dtype only (overrides --dtypes for kv)"),
    AxisFlag("--dtype-o", "dtype_o", ("dtype_o",), "output dtype only (overrides --dtypes for o)"),
    AxisFlag("--layouts", "layouts", ("kv_layout",), "kv layouts: NHD,HND"),
    AxisFlag("--pos-encodings", "pos_encodings", ("pos_encoding_mode",), "NONE,ROPE_LLAMA,ALIBI"),
    AxisFlag("--window", "window", ("use_window",), "sliding window: on,off"),
    AxisFlag("--softcap", "softcap", ("use_logits_soft_cap",), "logits soft cap: on,off"),
)

# A preset is {family: settings or [settings, ...]}, settings = {flag dest or "axis:<name>": comma list};
# a list is the union of its groups' matrices. Family "*" = every registered kernel family except the
# probe. Flags given on the command line override the preset's value for the same flag (in every group);
# axes not mentioned take all supported values; a setting for an axis a family lacks is ignored.
_NO_EXTRAS = {"window": "off", "softcap": "off", "axis:use_fp16_qk_reduction": "off"}

# `--preset test`: exactly the modules the GPU tests (tests/test_*.py) load, read off their parametrization
# (tests/test_cli.py checks the statically parametrized lists against this; on a GPU machine
# `FLASHINFER_JIT_RECORD=FILE pytest -m gpu` records what they really load, see README). The full
# supported matrix (1194 modules today) is `--preset all`.
_TEST_PRESET: Dict[str, Any] = {
    # test_decode.py: SUPPORTED = the whole supported matrix of the family.
    "decode_single": {},
    # test_batch_decode.py: the spec matrix at NHD; window/layout/graph tests at bf16 d128 HND.
    "decode_batch_paged": [
        {"layouts": "NHD"},
        {"layouts": "HND", "head_dims": "128", "dtypes": "bf16", "softcap": "off"},
    ],
    # test_page.py: d128 at f16 and bf16, d64 f16 (stream / error tests).
    "page_append": [{"head_dims": "128"}, {"head_dims": "64", "dtypes": "f16"}],
    # test_prefill.py: SINGLE_SPECS, plus the window-edge test (d64 f16 none/causal, window on).
    "prefill_single": [
        {"window": "off", "softcap": "off", "axis:use_fp16_qk_reduction": "off"},
        {"head_dims": "128", "dtypes": "bf16", "axis:use_fp16_qk_reduction": "off"},
        {"head_dims": "128", "dtypes": "f16", "axis:mask_mode": "none,causal", "pos_encodings": "NONE",
         "window": "off", "softcap": "off", "axis:use_fp16_qk_reduction": "on"},
        {"head_dims": "64", "dtypes": "f16", "axis:mask_mode": "none,causal", "pos_encodings": "NONE",
         "window": "on", "softcap": "off", "axis:use_fp16_qk_reduction": "off"},
    ],
    # test_prefill.py: the batch matrix (case -> d64 bf16, d128 f16, d256 bf16; both storages, all masks),
    # the options test (paged bf16 d128 causal, window + soft cap, every pos), graph/bad-input tests (bf16 d128).
    "prefill_batch": [
        {"head_dims": "64", "dtypes": "bf16", "pos_encodings": "NONE", **_NO_EXTRAS},
        {"head_dims": "128", "dtypes": "f16", "pos_encodings": "NONE", **_NO_EXTRAS},
        {"head_dims": "256", "dtypes": "bf16", "pos_encodings": "NONE", **_NO_EXTRAS},
        {"head_dims": "128", "dtypes": "bf16", "axis:kv_storage": "paged", "axis:mask_mode": "causal",
         "window": "on", "softcap": "on", "axis:use_fp16_qk_reduction": "off"},
        {"head_dims": "128", "dtypes": "bf16", "axis:kv_storage": "paged", "axis:mask_mode": "causal",
         "pos_encodings": "NONE", **_NO_EXTRAS},
        {"head_dims": "128", "dtypes": "bf16", "axis:kv_storage": "ragged", "axis:mask_mode": "none",
         "pos_encodings": "NONE", **_NO_EXTRAS},
        # batch decode with use_tensor_cores=True runs through the paged prefill kernel (no mask)
        {"head_dims": "128", "dtypes": "bf16", "axis:kv_storage": "paged", "axis:mask_mode": "none",
         "axis:use_fp16_qk_reduction": "off"},
    ],
    # test_sampling.py: float32 rows everywhere, float16/bfloat16 logits and probabilities in the dtype tests.
    "sampling": {},
}

PRESETS: Dict[str, Dict[str, Any]] = {
    "test": {
        "help": "exactly what the GPU test suite loads (its parametrization, per family; not the probe)",
        "families": _TEST_PRESET,
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
    "probe": {
        "help": "the tiny probe module (a fast real build, for CI and doctor)",
        "families": {"probe": {}},
    },
}

_TRUE = {"on", "true", "1", "yes", "y"}
_FALSE = {"off", "false", "0", "no", "n"}


def _fmt_value(v: Any) -> str:
    if isinstance(v, bool):
        return "on" if v else "off"
    return str(v)


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
    """'bf16,f16' -> ('bf16', 'f16') typed like the axis's supported values; 'all' = every value."""
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
                    f"choose from {','.join(_fmt_value(s) for s in supported)} (or 'all')"
                )
            vals = [v]
        for v in vals:
            if v not in out:
                out.append(v)
    if not out:
        raise UsageError(f"{family}: empty value list for axis {axis!r}")
    return tuple(out)


@dataclasses.dataclass
class MatrixItem:
    spec: Any
    name: str
    reason: Optional[str]  # None = supported; else why it is dropped

    @property
    def family(self) -> str:
        return self.spec.family


def family_choices(cls: type, settings: Dict[str, str]) -> Tuple[Dict[str, Tuple[Any, ...]], List[List[str]], set]:
    """Map flag settings ({dest or 'axis:<name>': comma list}) onto one family's axes.

    Returns (choices for cls.expand, groups of axes that must be equal, the setting keys that applied).
    Tied flags are applied first, so a per-axis flag (--dtype-kv) takes its axis out of the tie.
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
            for group in ties:
                if a in group:
                    group.remove(a)
        if flag.tie and len(present) > 1:
            ties.append(list(present))
    for key, text in settings.items():
        if not key.startswith("axis:") or text is None:
            continue
        a = key[len("axis:"):]
        if a not in axes:
            continue
        applied.add(key)
        choices[a] = parse_axis_values(cls.family, a, text, axes[a])
        for group in ties:
            if a in group:
                group.remove(a)
    return choices, [g for g in ties if len(g) > 1], applied


def expand_family(cls: type, settings: Dict[str, str]) -> Tuple[List[Any], set]:
    choices, ties, applied = family_choices(cls, settings)
    specs = cls.expand(**choices)
    if ties:
        specs = [s for s in specs if all(len({getattr(s, a) for a in g}) == 1 for g in ties)]
    return specs, applied


def _reason(spec: Any) -> Optional[str]:
    try:
        return spec.unsupported_reason()
    except Exception as e:  # a buggy reason() must not kill the whole prewarm
        return f"unsupported_reason() raised {type(e).__name__}: {e}"


def expand_matrix(per_family: Dict[str, Dict[str, str]], families: Optional[Dict[str, type]] = None,
                  cli_settings: Optional[Dict[str, str]] = None) -> List[MatrixItem]:
    """Expand {family: settings} into sorted, de-duplicated MatrixItems (supported and dropped).

    ``cli_settings`` are the flags the user typed; one that applies to none of the families is an error.
    """
    families = families if families is not None else _load_families()
    items: Dict[str, MatrixItem] = {}
    applied_any: set = set()
    for fam, settings in per_family.items():
        if fam not in families:
            raise UsageError(f"unknown spec family {fam!r}; known: {', '.join(sorted(families)) or '(none)'}")
        groups = settings if isinstance(settings, (list, tuple)) else [settings]
        specs = []
        for group in groups:
            got, applied = expand_family(families[fam], group)
            applied_any |= applied
            specs.extend(got)
        for spec in specs:
            name = spec.name()
            if name not in items:
                items[name] = MatrixItem(spec=spec, name=name, reason=_reason(spec))
    for key in (cli_settings or {}):
        if key not in applied_any:
            flag = next((f.option for f in AXIS_FLAGS if f.dest == key), "--axis " + key[len("axis:"):])
            raise UsageError(f"{flag} does not apply to any selected family ({', '.join(per_family)})")
    return [items[n] for n in sorted(items)]


def parse_shard(text: Optional[str]) -> Optional[Tuple[int, int]]:
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
    """Deterministic split: sort by spec name (the readable part of the cache key, the same on every
    runner), then deal round-robin. Every item lands in exactly one of the n shards."""
    ordered = sorted(items, key=lambda it: it.name)
    if shard is None:
        return ordered
    i, n = shard
    return [it for j, it in enumerate(ordered) if j % n == i - 1]


def resolve_selection(args: argparse.Namespace, families: Dict[str, type]) -> Tuple[Dict[str, Dict[str, str]], Dict[str, str]]:
    """From parsed args: ({family: settings}, the settings typed on the command line)."""
    cli: Dict[str, str] = {}
    for flag in AXIS_FLAGS:
        v = getattr(args, flag.dest, None)
        if v is not None:
            cli[flag.dest] = v
    for item in getattr(args, "axis", None) or []:
        if "=" not in item:
            raise UsageError(f"--axis expects NAME=V1,V2, got {item!r}")
        k, v = item.split("=", 1)
        cli["axis:" + k.strip()] = v
    preset_name = args.preset
    fams_arg = [f.strip() for f in (args.families or "").split(",") if f.strip()]
    if preset_name is None and not fams_arg:
        preset_name = "default"
    base: Dict[str, Dict[str, str]] = {}
    if preset_name is not None:
        if preset_name not in PRESETS:
            raise UsageError(f"unknown preset {preset_name!r}; choose from {', '.join(PRESETS)}")
        for f, s in PRESETS[preset_name]["families"].items():
            if f != "*" and f not in families:
                continue  # a family this checkout does not have
            for fam in (sorted(x for x in families if x not in _NOT_KERNELS) if f == "*" else [f]):
                groups = s if isinstance(s, (list, tuple)) else [s]
                base.setdefault(fam, [dict(g) for g in groups])
    if fams_arg:
        for f in fams_arg:
            if f not in families:
                raise UsageError(f"unknown spec family {f!r}; known: {', '.join(sorted(families)) or '(none)'}")
        base = {f: base.get(f, [{}]) for f in fams_arg}
    per_family = {f: [{**g, **cli} for g in groups] for f, groups in base.items()}
    return per_family, cli


# --------------------------------------------------------------------------------------------------
# Formatting helpers
# --------------------------------------------------------------------------------------------------


def _fmt_secs(s: Optional[float]) -> str:
    if s is None:
        return "-"
    if s < 60:
        return f"{s:.1f}s"
    m, sec = divmod(int(round(s)), 60)
    if m < 60:
        return f"{m}m{sec:02d}s"
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m"


def _fmt_size(n: Optional[int]) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024.0
    return str(n)


def _log_path_of(exc: BaseException) -> Optional[str]:
    for attr in ("log_path", "log", "logfile"):
        v = getattr(exc, attr, None)
        if v:
            return str(v)
    m = re.search(r"(/[^\s'\"]+\.log)\b", str(exc))
    return m.group(1) if m else None


def _first_line(text: str, limit: int = 300) -> str:
    line = next((ln for ln in str(text).splitlines() if ln.strip()), "")
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _safe_key(jit, spec) -> Tuple[Optional[str], Optional[str]]:
    try:
        return jit.cache_key(spec), None
    except Exception as e:
        return None, f"{type(e).__name__}: {e}"


def _valid_keys(jit) -> set:
    try:
        return {e.key for e in jit.list_entries() if _entry_attr(e, "valid", False)}
    except Exception:
        return set()


# --------------------------------------------------------------------------------------------------
# prewarm
# --------------------------------------------------------------------------------------------------


def _build_worker(spec) -> Dict[str, Any]:
    """Runs in a worker process: build one module (not loaded here). Returns a plain dict."""
    t0 = time.perf_counter()
    try:
        from flashinfer import jit

        rep = jit.ensure_built(spec)
        return {
            "status": rep.status,
            "key": rep.key,
            "seconds": float(rep.seconds or 0.0),
            "entry_dir": str(rep.entry_dir) if getattr(rep, "entry_dir", None) else None,
            "log_path": str(rep.log_path) if getattr(rep, "log_path", None) else None,
            "error": None,
        }
    except Exception as e:  # reported, never raised across the process boundary
        return {
            "status": "failed",
            "key": None,
            "seconds": time.perf_counter() - t0,
            "entry_dir": None,
            "log_path": _log_path_of(e),
            "error": f"{type(e).__name__}: {e}",
        }


class _Progress:
    def __init__(self, total: int, stream=None):
        self.total = total
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.t0 = time.perf_counter()
        self.done = 0
        self.compiled = 0  # finished builds (not cache hits): the ETA is extrapolated from these
        self._last_len = 0

    def update(self, name: str, status: str, seconds: Optional[float], inflight: int) -> None:
        self.done += 1
        now = time.perf_counter()
        if status == "cached":
            self.t_cached = now  # cache hits are (nearly) free: start the build clock after them
        else:
            self.compiled += 1
        elapsed = now - self.t0
        t_build = now - getattr(self, "t_cached", self.t0)
        eta = t_build / self.compiled * (self.total - self.done) if self.compiled else None
        sec = f" {_fmt_secs(seconds)}" if status in ("built", "failed") else ""
        line = (
            f"[{self.done}/{self.total}] {100 * self.done // max(self.total, 1):3d}% "
            f"elapsed {_fmt_secs(elapsed)} ETA {'0s' if self.done >= self.total else ('?' if eta is None else _fmt_secs(eta))} "
            f"| {inflight} building | {status}{sec}: {name}"
        )
        if self.tty:
            width = shutil.get_terminal_size((120, 20)).columns - 1
            line = line[:width]
            pad = max(0, self._last_len - len(line))
            self.stream.write("\r" + line + " " * pad)
            self._last_len = len(line)
            if self.done == self.total:
                self.stream.write("\n")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def note(self, text: str) -> None:
        if self.tty and self._last_len:
            self.stream.write("\n")
            self._last_len = 0
        self.stream.write(text + "\n")
        self.stream.flush()


def _mp_context():
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")


def run_builds(items: List[MatrixItem], jobs: int, progress: _Progress) -> Dict[str, Dict[str, Any]]:
    """Build every supported item; return {name: result dict}. Cached entries are confirmed in this
    process (cheap); the rest go to a pool of worker processes."""
    jit = _jit()
    results: Dict[str, Dict[str, Any]] = {}
    valid = _valid_keys(jit)
    to_build: List[MatrixItem] = []
    for it in items:
        key, _ = _safe_key(jit, it.spec)
        if key is not None and key in valid:
            res = _build_worker(it.spec)  # valid entry: ensure_built returns "cached" without compiling
            results[it.name] = res
            progress.update(it.name, res["status"], res["seconds"], 0)
        else:
            to_build.append(it)
    if not to_build:
        return results
    workers = max(1, min(jobs, len(to_build)))
    if jobs == 1:  # in this process: simplest to debug; any other count uses worker processes
        for n, it in enumerate(to_build):
            res = _build_worker(it.spec)
            results[it.name] = res
            progress.update(it.name, res["status"], res["seconds"], len(to_build) - n - 1)
            if res["status"] == "failed":
                progress.note(f"FAILED {it.name}: {_first_line(res['error'])}  (log: {res['log_path'] or '-'})")
        return results
    pool = cf.ProcessPoolExecutor(max_workers=workers, mp_context=_mp_context())
    try:
        futs = {pool.submit(_build_worker, it.spec): it for it in to_build}
        pending = set(futs)
        while pending:
            done, pending = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
            for fut in done:
                it = futs[fut]
                try:
                    res = fut.result()
                except Exception as e:  # worker died (BrokenProcessPool, pickling, OOM kill...)
                    res = {"status": "failed", "key": None, "seconds": None, "entry_dir": None,
                           "log_path": None, "error": f"worker process failed: {type(e).__name__}: {e}"}
                results[it.name] = res
                progress.update(it.name, res["status"], res["seconds"], min(len(pending), workers))
                if res["status"] == "failed":
                    progress.note(f"FAILED {it.name}: {_first_line(res['error'])}  (log: {res['log_path'] or '-'})")
    except KeyboardInterrupt:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    return results


def _selection(args) -> Tuple[List[MatrixItem], List[MatrixItem], List[MatrixItem], Optional[Tuple[int, int]]]:
    families = _load_families()
    shard = parse_shard(args.shard)
    if getattr(args, "config", None):
        per_family_items = _items_from_config(args.config, families)
    else:
        per_family, cli = resolve_selection(args, families)
        per_family_items = expand_matrix(per_family, families, cli)
    mine = shard_items(per_family_items, shard)
    supported = [it for it in mine if it.reason is None]
    dropped = [it for it in mine if it.reason is not None]
    return mine, supported, dropped, shard


def _read_config(path: str) -> List[Any]:
    """The elements of a --config file: JSON list, JSON lines (e.g. FLASHINFER_JIT_RECORD output) or TOML."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise UsageError(f"--config {path}: {e}") from None
    if path.endswith(".toml"):
        import tomllib

        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise UsageError(f"--config {path}: {e}") from None
        unknown = set(data) - {"specs", "matrix"}
        if unknown:
            raise UsageError(f"--config {path}: unknown tables {sorted(unknown)} (expected [[matrix]] and/or [[specs]])")
        out: List[Any] = list(data.get("specs", []))
        for m in data.get("matrix", []):
            if not isinstance(m, dict) or "family" not in m:
                raise UsageError(f"--config {path}: each [[matrix]] needs a family: {m!r}")
            settings = {}
            for k, v in m.items():
                if k == "family":
                    continue
                if isinstance(v, list):
                    v = ",".join(_fmt_value(x) for x in v)
                elif isinstance(v, bool):
                    v = _fmt_value(v)
                dest = k.replace("-", "_")
                settings[dest if any(f.dest == dest for f in AXIS_FLAGS) or k.startswith("axis:") else "axis:" + k] = str(v)
            out.append({"family": m["family"], "settings": settings})
        return out
    try:
        data = json.loads(text)
    except ValueError:
        try:
            data = [json.loads(ln) for ln in text.splitlines() if ln.strip()]
        except ValueError as e:
            raise UsageError(f"--config {path}: neither JSON, JSON lines nor TOML (.toml): {e}") from None
    if isinstance(data, dict):  # JSON lines with a single line
        data = [data]
    if not isinstance(data, list):
        raise UsageError(f"--config {path}: expected a JSON list")
    return data


def _items_from_config(path: str, families: Dict[str, type]) -> List[MatrixItem]:
    """--config FILE: a list whose elements are either a full spec (``Spec.to_json()``) or
    ``{"family": F, "settings": {flag dest or "axis:<name>": "v1,v2"}}`` (same keys as presets).
    JSON (a list), JSON lines (one element a line), or TOML (``.toml``): ``[[matrix]]`` tables with
    ``family`` and flag names or axis names as keys (``head_dims = [64, 128]``, ``dtypes = "bf16"``,
    ``mask_mode = "causal"``), and ``[[specs]]`` tables holding full specs."""
    from flashinfer.jit.spec import Spec

    data = _read_config(path)
    items: Dict[str, MatrixItem] = {}
    for el in data:
        if not isinstance(el, dict) or "family" not in el:
            raise UsageError(f"--config {path}: each element needs a 'family': {el!r}")
        if "settings" in el:
            for it in expand_matrix({el["family"]: dict(el["settings"])}, families):
                items.setdefault(it.name, it)
        else:
            try:
                spec = Spec.from_json(el)
            except (TypeError, ValueError) as e:
                raise UsageError(f"--config {path}: bad spec {el!r}: {e}") from None
            items.setdefault(spec.name(), MatrixItem(spec=spec, name=spec.name(), reason=_reason(spec)))
    return [items[n] for n in sorted(items)]


def cmd_prewarm(args) -> int:
    mine, supported, dropped, shard = _selection(args)
    shard_txt = f" (shard {shard[0]}/{shard[1]})" if shard else ""
    jit = _jit()
    out = sys.stdout

    if args.dry_run:
        valid = _valid_keys(jit)
        out.write(f"cache root: {jit.cache_root()}\n")
        out.write(f"matrix{shard_txt}: {len(mine)} combinations, {len(supported)} to prewarm, "
                  f"{len(dropped)} dropped as unsupported\n")
        n_cached = 0
        key_err = None
        for it in supported:
            key, err = _safe_key(jit, it.spec)
            key_err = key_err or err
            state = "cached" if key in valid else "to build"
            n_cached += state == "cached"
            out.write(f"  {state:<9} {key or it.name + '-?'}\n")
        if dropped:
            out.write(f"dropped ({len(dropped)}, unsupported):\n")
            for it in dropped:
                out.write(f"  {it.name}: {it.reason}\n")
        out.write(f"{n_cached} of {len(supported)} already cached, {len(supported) - n_cached} to build\n")
        if key_err:
            out.write(f"warning: could not compute cache keys: {key_err}\n")
        if args.json:
            _write_json(args.json, {
                "dry_run": True, "shard": list(shard) if shard else None,
                "items": [{"name": it.name, "family": it.family, "spec": it.spec.to_json(),
                           "key": _safe_key(jit, it.spec)[0], "reason": it.reason,
                           "cached": _safe_key(jit, it.spec)[0] in valid} for it in mine],
            })
        return 0

    jobs = args.jobs if args.jobs and args.jobs > 0 else (os.cpu_count() or 1)
    sys.stderr.write(f"prewarm{shard_txt}: {len(supported)} modules ({len(dropped)} unsupported skipped), "
                     f"{jobs} jobs, cache {jit.cache_root()}\n")
    t0 = time.perf_counter()
    progress = _Progress(len(supported))
    try:
        results = run_builds(supported, jobs, progress) if supported else {}
    except KeyboardInterrupt:
        sys.stderr.write("\ninterrupted\n")
        return 130
    wall = time.perf_counter() - t0

    built = [(it, results[it.name]) for it in supported if results[it.name]["status"] == "built"]
    cached = [(it, results[it.name]) for it in supported if results[it.name]["status"] == "cached"]
    failed = [(it, results[it.name]) for it in supported if results[it.name]["status"] == "failed"]

    out.write(f"\nprewarm summary{shard_txt}\n")
    rows = built + failed + (cached if args.verbose else [])
    if rows:
        out.write(f"  {'STATUS':<8} {'COMPILE':>8}  MODULE\n")
        for it, r in rows:
            out.write(f"  {r['status']:<8} {_fmt_secs(r['seconds']) if r['status'] != 'cached' else '-':>8}  {it.name}\n")
            if r["status"] == "failed":
                out.write(f"  {'':<8} {'':>8}  error: {_first_line(r['error'])}\n")
                out.write(f"  {'':<8} {'':>8}  log:   {r['log_path'] or '(none)'}\n")
    if dropped and args.verbose:
        out.write("  skipped (unsupported):\n")
        for it in dropped:
            out.write(f"    {it.name}: {it.reason}\n")
    slowest = max(built, key=lambda p: p[1]["seconds"] or 0.0, default=None)
    total_compile = sum(r["seconds"] or 0.0 for _, r in built)
    out.write(f"  {'built':<16}{len(built):>5}"
              + (f"   compile {_fmt_secs(total_compile)} in total, slowest {_fmt_secs(slowest[1]['seconds'])} "
                 f"{slowest[0].name}" if slowest else "") + "\n")
    out.write(f"  {'already cached':<16}{len(cached):>5}\n")
    out.write(f"  {'skipped':<16}{len(dropped):>5}   unsupported combinations (--dry-run lists why)\n")
    out.write(f"  {'failed':<16}{len(failed):>5}\n")
    out.write(f"  {'total':<16}{len(mine):>5}   wall {_fmt_secs(wall)} with {jobs} jobs\n")
    out.flush()
    if args.json:
        _write_json(args.json, {
            "dry_run": False, "shard": list(shard) if shard else None, "jobs": jobs,
            "wall_seconds": wall, "cache_root": str(jit.cache_root()),
            "counts": {"built": len(built), "cached": len(cached), "skipped": len(dropped),
                       "failed": len(failed), "total": len(mine)},
            "slowest": {"name": slowest[0].name, "seconds": slowest[1]["seconds"]} if slowest else None,
            "items": [{"name": it.name, "family": it.family, "spec": it.spec.to_json(),
                       **results.get(it.name, {"status": "skipped"}),
                       **({"reason": it.reason} if it.reason else {})} for it in mine],
        })
    return 1 if failed else 0


def _write_json(path: str, data: Any) -> None:
    p = Path(path)
    if p.parent and not p.parent.exists():
        p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(data, indent=2, default=str) + "\n")


# --------------------------------------------------------------------------------------------------
# cache
# --------------------------------------------------------------------------------------------------


def _entry_attr(e: Any, name: str, default: Any = None) -> Any:
    aliases = {
        "spec": ("spec", "spec_json"),
        "size": ("size", "size_bytes", "bytes"),
        "build_seconds": ("build_seconds", "seconds", "build_s"),
        "created": ("created", "created_at", "created_time", "mtime"),
        "valid": ("valid", "ok"),
        "reason": ("reason", "problem", "error"),
        "path": ("path", "entry_dir", "dir"),
    }
    for a in aliases.get(name, (name,)):
        if isinstance(e, dict) and a in e:
            return e[a]
        if hasattr(e, a):
            return getattr(e, a)
    return default


def _entry_spec_json(e: Any) -> Optional[Dict[str, Any]]:
    s = _entry_attr(e, "spec")
    if isinstance(s, str):
        try:
            s = json.loads(s)
        except ValueError:
            return None
    return s if isinstance(s, dict) else None


def _entry_family(e: Any) -> Optional[str]:
    s = _entry_spec_json(e)
    if s and "family" in s:
        return s["family"]
    key = str(e.key)
    for fam in sorted(_load_families(), key=len, reverse=True):
        if key.startswith(fam + "_") or key.startswith(fam + "-"):
            return fam
    return None


def _entry_name(e: Any) -> str:
    key = str(e.key)
    return key.rsplit("-", 1)[0] if re.search(r"-[0-9a-f]{16}$", key) else key


def _created_ts(v: Any) -> Optional[float]:
    if v is None:
        return None
    if isinstance(v, (int, float)):
        return float(v)
    if hasattr(v, "timestamp"):
        return v.timestamp()
    try:
        from datetime import datetime

        return datetime.fromisoformat(str(v)).timestamp()
    except ValueError:
        return None


def _entries(family: Optional[str]) -> List[Any]:
    entries = list(_jit().list_entries())
    if family:
        entries = [e for e in entries if _entry_family(e) == family]
    return sorted(entries, key=lambda e: str(e.key))


def _fmt_current(e: Any) -> str:
    cur = _entry_attr(e, "current")
    return "?" if cur is None else ("yes" if cur else "stale")


def cmd_cache_list(args) -> int:
    jit = _jit()
    entries = _entries(args.family)
    if args.json:
        rows = [{"key": str(e.key), "name": _entry_name(e), "family": _entry_family(e),
                 "size": _entry_attr(e, "size"), "build_seconds": _entry_attr(e, "build_seconds"),
                 "created": _created_ts(_entry_attr(e, "created")), "valid": bool(_entry_attr(e, "valid")),
                 "reason": _entry_attr(e, "reason"), "current": _entry_attr(e, "current")} for e in entries]
        print(json.dumps(rows, indent=2, default=str))
        return 0
    print(f"cache root: {jit.cache_root()}")
    if not entries:
        print("(no entries)")
        return 0
    now = time.time()
    print(f"{'VALID':<6} {'CURRENT':<8}{'SIZE':>10} {'BUILD':>7} {'AGE':>7}  {'DIGEST':<16}  NAME")
    total = 0
    for e in entries:
        size = _entry_attr(e, "size")
        total += size or 0
        ts = _created_ts(_entry_attr(e, "created"))
        valid = bool(_entry_attr(e, "valid"))
        digest = str(e.key)[len(_entry_name(e)) + 1:] or "-"
        print(f"{'yes' if valid else 'NO':<6} {_fmt_current(e):<8}{_fmt_size(size):>10} {_fmt_secs(_entry_attr(e, 'build_seconds')):>7} "
              f"{_fmt_secs(now - ts) if ts else '-':>7}  {digest:<16}  {_entry_name(e)}")
        if not valid:
            print(f"{'':<6} {'':<8}{'':>10} {'':>7} {'':>7}  {'':<16}  reason: {_entry_attr(e, 'reason') or 'invalid'}")
    n_bad = sum(1 for e in entries if not _entry_attr(e, "valid"))
    n_stale = sum(1 for e in entries if _entry_attr(e, "current") is False)
    print(f"{len(entries)} entries, {_fmt_size(total)}, {n_bad} invalid, {n_stale} stale "
          "(stale: built for another toolkit/torch/flags/sources; never loaded here)")
    return 0


def cmd_cache_verify(args) -> int:
    jit = _jit()
    entries = _entries(args.family)
    bad = [e for e in entries if not _entry_attr(e, "valid")]
    for e in bad:
        print(f"BAD  {e.key}: {_entry_attr(e, 'reason') or 'invalid'}")
    print(f"{len(entries) - len(bad)} of {len(entries)} entries valid under {jit.cache_root()}")
    if bad:
        print("rebuild on next use, or remove them: python -m flashinfer cache clear --invalid --yes")
    return 1 if bad else 0


def cmd_cache_clear(args) -> int:
    jit = _jit()
    entries = _entries(args.family)
    if args.invalid or args.stale:
        entries = [e for e in entries if (args.invalid and not _entry_attr(e, "valid"))
                   or (args.stale and _entry_attr(e, "current") is False)]
    everything = args.family is None and not args.invalid and not args.stale
    what = ("invalid " if args.invalid else "") + ("stale " if args.stale else "") \
        + (f"{args.family} " if args.family else "") + "entries"
    if not entries and not everything:
        print(f"no {what} under {jit.cache_root()}")
        return 0
    if not args.yes:
        if not sys.stdin.isatty():
            print(f"refusing to remove {len(entries)} {what} under {jit.cache_root()} without --yes", file=sys.stderr)
            return 1
        ans = input(f"remove {len(entries)} {what} under {jit.cache_root()}? [y/N] ")
        if ans.strip().lower() not in ("y", "yes"):
            print("nothing removed")
            return 1
    keys = {str(e.key) for e in entries}
    if everything:
        n = jit.clear_cache()
    else:
        n = jit.clear_cache(lambda e: str(e.key) in keys)
    print(f"removed {n} entries from {jit.cache_root()}")
    return 0


def cmd_cache_prune(args) -> int:
    from flashinfer.jit import cache as jcache

    jit = _jit()
    root = jit.cache_root()
    victims = jcache.prune_cache(root, dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    for info, why in victims:
        print(f"{verb} {info.key}: {why}")
    kept = len(jcache.list_entries(root, check_current=False)) if not args.dry_run else None
    freed = sum(info.size or 0 for info, _ in victims)
    print(f"{verb} {len(victims)} entries ({_fmt_size(freed)}) from {root}"
          + (f"; {kept} kept" if kept is not None else ""))
    return 0


def _entry_filter(args) -> Optional[Any]:
    fams = {f.strip() for f in (args.family or "").split(",") if f.strip()}
    keys = set(args.key or [])
    if not fams and not keys and not args.current:
        return None

    def pred(e) -> bool:
        if fams and _entry_family(e) not in fams:
            return False
        if keys and str(e.key) not in keys and _entry_name(e) not in keys:
            return False
        if args.current and _entry_attr(e, "current") is not True:
            return False
        return True

    return pred


def cmd_cache_export(args) -> int:
    from flashinfer.jit import archive

    jit = _jit()
    t0 = time.perf_counter()
    rep = archive.export_cache(Path(args.archive), _entry_filter(args), jit.cache_root())
    for key, why in rep.skipped_invalid:
        print(f"skipped invalid entry {key}: {why}")
    size = Path(rep.archive).stat().st_size
    print(f"exported {len(rep.keys)} entries ({_fmt_size(rep.bytes)} of files, archive {_fmt_size(size)}) "
          f"from {jit.cache_root()} to {rep.archive} in {_fmt_secs(time.perf_counter() - t0)}; "
          f"{len(rep.skipped_invalid)} invalid skipped")
    return 0


def cmd_cache_import(args) -> int:
    from flashinfer.jit import archive

    jit = _jit()
    root = jit.cache_root()
    t0 = time.perf_counter()
    rep = archive.import_cache(Path(args.archive), root)
    for key in rep.imported + rep.replaced:
        print(f"imported {key}" + (" (replaced an invalid entry)" if key in rep.replaced else "")
              + (" (not loadable in this environment: other archs/flags/versions)" if key in rep.not_current else ""))
    for key in rep.already_present:
        print(f"kept     {key} (a valid entry is already there)")
    for key, why in rep.invalid:
        print(f"REFUSED  {key}: {why}")
    print(f"imported {len(rep.imported) + len(rep.replaced)}, already present {len(rep.already_present)}, "
          f"refused {len(rep.invalid)} (invalid), {len(rep.not_current)} of the imported for another environment; "
          f"into {root} in {_fmt_secs(time.perf_counter() - t0)}")
    return 0 if rep.ok else 1


# --------------------------------------------------------------------------------------------------
# demo / doctor
# --------------------------------------------------------------------------------------------------


def _demo_reference(q, k, v, sm_scale: float):
    """float32 softmax attention, one query token; q [Hq, D], k/v [L, Hkv, D] (NHD); GQA by grouping."""
    import torch

    hq, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    qf = q.float().view(hkv, g, d)
    s = torch.einsum("kgd,lkd->kgl", qf, k.float()) * sm_scale
    p = torch.softmax(s, dim=-1)
    return torch.einsum("kgl,lkd->kgd", p, v.float()).reshape(hq, d)


def cmd_demo(args) -> int:
    import torch

    jit = _jit()
    try:
        from flashinfer.decode import SingleDecodeSpec
    except ImportError as e:
        print(f"error: the decode module is not available: {e}", file=sys.stderr)
        return 1
    spec = SingleDecodeSpec(head_dim=128, dtype_q="bf16", dtype_kv="bf16", dtype_o="bf16", kv_layout="NHD",
                            pos_encoding_mode="NONE", use_window=False, use_logits_soft_cap=False)
    print(f"module: {spec.name()}")
    print(f"cache:  {jit.cache_root()}")
    t0 = time.perf_counter()
    try:
        rep = jit.ensure_built(spec)
    except Exception as e:
        print(f"build failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    if rep.status == "cached":
        print(f"build:  cached ({rep.key}, checked in {time.perf_counter() - t0:.2f}s)")
    else:
        print(f"build:  compiled in {rep.seconds:.1f}s ({rep.key})")

    if not torch.cuda.is_available():
        print("No CUDA GPU found (torch.cuda.is_available() is False): the module is built and cached, "
              "but the kernel could not be run here.")
        return 0

    import flashinfer

    hq, hkv, d, kv_len = 32, 8, 128, args.kv_len
    dev = torch.device("cuda", torch.cuda.current_device())
    gen = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(hq, d, device=dev, dtype=torch.bfloat16, generator=gen)
    k = torch.randn(kv_len, hkv, d, device=dev, dtype=torch.bfloat16, generator=gen)
    v = torch.randn(kv_len, hkv, d, device=dev, dtype=torch.bfloat16, generator=gen)
    sm_scale = 1.0 / d ** 0.5
    o = flashinfer.single_decode_with_kv_cache(q, k, v, kv_layout="NHD")
    ref = _demo_reference(q, k, v, sm_scale)
    err = (o.float() - ref).abs().max().item()
    tol = 1e-2 + 1e-2 * ref.abs().max().item()
    print(f"device: {torch.cuda.get_device_name(dev)}")
    print(f"shape:  q [{hq}, {d}], k/v [{kv_len}, {hkv}, {d}] bf16 NHD")
    print(f"check:  max |out - fp32 reference| = {err:.3e} (tolerance {tol:.1e}) -> {'OK' if err <= tol else 'MISMATCH'}")

    for _ in range(args.warmup):
        flashinfer.single_decode_with_kv_cache(q, k, v, kv_layout="NHD", out=o)
    times = []
    for _ in range(args.iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        flashinfer.single_decode_with_kv_cache(q, k, v, kv_layout="NHD", out=o)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    t = statistics.median(times)
    nbytes = sum(x.numel() * x.element_size() for x in (q, k, v, o))
    print(f"time:   {t * 1e6:.1f} us (median of {args.iters}, CUDA events)")
    print(f"bw:     {nbytes / t / 1e12:.2f} TB/s ({nbytes / 2**20:.1f} MiB of q, k, v, o)")
    return 0 if err <= tol else 1


def cmd_doctor(args) -> int:
    import platform

    import flashinfer

    def line(label, value):
        print(f"{label:<22} {value}")

    line("flashinfer", f"{getattr(flashinfer, '__version__', '?')} ({Path(flashinfer.__file__).parent})")
    line("python", f"{platform.python_version()} ({sys.executable})")
    try:
        import torch

        line("torch", f"{torch.__version__} (CUDA {torch.version.cuda})")
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        gpus = ", ".join(f"{i}: {torch.cuda.get_device_name(i)} (sm_{''.join(map(str, torch.cuda.get_device_capability(i)))})"
                         for i in range(n))
        line("GPUs", gpus or "none visible (torch.cuda.is_available() is False)")
    except Exception as e:  # pragma: no cover
        line("torch", f"import failed: {e}")
    ok = True
    try:
        jit = _jit()
    except Exception as e:
        line("jit engine", f"import failed: {type(e).__name__}: {e}")
        return 1
    try:
        home = jit.find_cuda_home()
        line("CUDA toolkit", str(home))
        nvcc = Path(home) / "bin" / "nvcc"
        try:
            import subprocess

            outp = subprocess.run([str(nvcc), "--version"], capture_output=True, text=True, timeout=30).stdout
            rel = re.search(r"release ([\d.]+), (V[\w.]+)", outp)
            line("nvcc", f"{nvcc} ({rel.group(1)}, {rel.group(2)})" if rel else str(nvcc))
        except Exception as e:
            line("nvcc", f"{nvcc}: {e}")
    except Exception as e:
        ok = False
        line("CUDA toolkit", f"NOT FOUND: {e}")
    families = _load_families()
    line("spec families", ", ".join(f"{f} ({len(c.expand())})" for f, c in sorted(families.items())) or "(none)")
    sample = None
    for fam in ("decode_single", "probe"):
        if fam in families:
            sample = families[fam].expand()[0]
            break
    if sample is not None:
        try:
            line("arch flags", " ".join(jit.arch_flags(sample)))
        except Exception as e:
            line("arch flags", f"error: {e}")
    line("templates", str(jit.templates_dir()))
    line("cache root", str(jit.cache_root()))
    try:
        entries = list(jit.list_entries())
        line("cache entries", f"{len(entries)} ({sum(1 for e in entries if not _entry_attr(e, 'valid'))} invalid)")
    except Exception as e:
        line("cache entries", f"error: {e}")
    for var in ("FLASHINFER_JIT_CACHE", "FLASHINFER_JIT_CACHE_TRUSTED_OWNERS", "FLASHINFER_DISABLE_JIT",
                "FLASHINFER_JIT_RECORD", "FLASHINFER_JIT_VERBOSE",
                "FLASHINFER_JIT_LOCK_TIMEOUT", "FLASHINFER_NVCC_THREADS", "TORCH_CUDA_ARCH_LIST",
                "CUDA_HOME", "CUDA_PATH", "MAX_JOBS"):
        line(var, os.environ.get(var, "(unset)"))
    return 0 if ok else 1


# --------------------------------------------------------------------------------------------------
# parser / main
# --------------------------------------------------------------------------------------------------


def _add_matrix_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("matrix (comma lists; 'all' = every supported value; an axis not given takes all values)")
    g.add_argument("--preset", choices=sorted(PRESETS),
                   help="start from a named matrix: " + "; ".join(f"{k}: {v['help']}" for k, v in PRESETS.items())
                   + " (default: 'default' when --families is not given either)")
    g.add_argument("--families", help="spec families, e.g. decode_single (default: the preset's)")
    for f in AXIS_FLAGS:
        g.add_argument(f.option, dest=f.dest, metavar="LIST", help=f.help)
    g.add_argument("--axis", action="append", metavar="NAME=LIST",
                   help="any axis of any family by its field name, e.g. --axis head_dim=64,128 (repeatable)")
    g.add_argument("--config", metavar="FILE",
                   help="instead of the flags: TOML ([[matrix]] family + axis/flag keys, [[specs]] full specs), "
                        "a JSON list or JSON lines of specs (Spec.to_json(), e.g. FLASHINFER_JIT_RECORD output) "
                        "or {family, settings} objects")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m flashinfer", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    pw = sub.add_parser("prewarm", help="build a matrix of kernel modules into the JIT cache, in parallel",
                        description="Expand a configuration matrix, drop unsupported combinations, and build "
                                    "the rest in parallel worker processes sharing the cache and its locks.")
    _add_matrix_args(pw)
    pw.add_argument("-j", "--jobs", type=int, default=None,
                    help=f"parallel worker processes (default: os.cpu_count() = {os.cpu_count()})")
    pw.add_argument("--dry-run", action="store_true",
                    help="print the expanded matrix with cache keys (and which are cached) and the dropped combinations")
    pw.add_argument("--shard", metavar="I/N", help="build only shard I of N (1-based; deterministic by spec name)")
    pw.add_argument("--json", metavar="PATH", help="write a JSON report")
    pw.add_argument("-v", "--verbose", action="store_true", help="also list cached and skipped modules in the summary")
    pw.set_defaults(func=cmd_prewarm)

    ca = sub.add_parser("cache", help="list, verify, clear, prune, export or import JIT cache entries")
    csub = ca.add_subparsers(dest="cache_command", metavar="ACTION")
    csub.required = True
    cl = csub.add_parser("list", help="list entries: spec name, key digest, size, build seconds, age, valid, current")
    cl.add_argument("--family")
    cl.add_argument("--json", action="store_true", help="print JSON instead of a table")
    cl.set_defaults(func=cmd_cache_list)
    cv = csub.add_parser("verify", help="check every entry (manifest, checksum); exit 1 on a bad one")
    cv.add_argument("--family")
    cv.set_defaults(func=cmd_cache_verify)
    cc = csub.add_parser("clear", help="remove entries (all, one family's, or only invalid ones)")
    cc.add_argument("--family")
    cc.add_argument("--invalid", action="store_true", help="only entries that fail verification")
    cc.add_argument("--stale", action="store_true",
                    help="only entries built for another environment (toolkit, torch, flags, sources): never loaded here")
    cc.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")
    cc.set_defaults(func=cmd_cache_clear)
    cp = csub.add_parser("prune", help="remove entries this installation can never load (built for another "
                                       "recipe/flashinfer/torch/CUDA version, unknown family) and invalid ones")
    cp.add_argument("--dry-run", action="store_true", help="only list what would be removed")
    cp.set_defaults(func=cmd_cache_prune)
    ce = csub.add_parser("export", help="write valid entries to one tar archive (.tar, .tar.gz/.tgz) for `cache import`")
    ce.add_argument("archive", metavar="ARCHIVE")
    ce.add_argument("--family", help="only these families (comma list)")
    ce.add_argument("--key", action="append", help="only this key or spec name (repeatable)")
    ce.add_argument("--current", action="store_true",
                    help="only entries this environment would load (same archs, flags, versions)")
    ce.set_defaults(func=cmd_cache_export)
    ci = csub.add_parser("import", help="validate and add the entries of an archive made by `cache export`; "
                                       "exit 1 if any entry was refused")
    ci.add_argument("archive", metavar="ARCHIVE")
    ci.set_defaults(func=cmd_cache_import)

    de = sub.add_parser("demo", help="build the bf16 d128 NHD decode module; with a GPU, run, check and time it")
    de.add_argument("--kv-len", type=int, default=32768)
    de.add_argument("--iters", type=int, default=100)
    de.add_argument("--warmup", type=int, default=10)
    de.set_defaults(func=cmd_demo)

    do = sub.add_parser("doctor", help="print toolkit, arch flags, cache root and versions")
    do.set_defaults(func=cmd_doctor)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UsageError as e:
        sys.stderr.write(f"{parser.prog}: error: {e}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130
    except Exception as e:
        # The engine's own errors (unwritable cache, no toolkit, lock timeout...) already say what is
        # wrong and how to fix it: print them without a traceback. Anything else is a bug: re-raise.
        if type(e).__module__.startswith("flashinfer.jit"):
            sys.stderr.write(f"{parser.prog}: error: {type(e).__name__}: {e}\n")
            return 1
        raise


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
