"""Reading a matrix file (``prewarm --config FILE``, and the file behind ``--preset test``).

A file is a list of elements, each either a full spec (``Spec.to_json()``: ``{"family": F, <field>: value,
...}``) or a group of settings ``{"family": F, "settings": {key: "v1,v2"}}``, keyed like a preset (a prewarm
flag's name such as ``head_dims``, or an axis name). Three spellings:

- JSON: a list of elements (or one element);
- JSON lines: one element a line (what ``FLASHINFER_JIT_RECORD=FILE`` writes);
- TOML (``*.toml``): ``[[matrix]]`` tables (``family`` plus settings; a value may be a list, a boolean, a
  number or a comma string) and ``[[specs]]`` tables (full specs).

TOML needs Python >= 3.11 (``tomllib``) or the ``tomli`` package; JSON always works.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List

from .errors import UsageError


def _toml_loads(text: str, path: str) -> Dict[str, Any]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python < 3.11
        try:
            import tomli as tomllib
        except ModuleNotFoundError:
            raise UsageError(
                f"--config {path}: reading TOML needs Python >= 3.11 or the tomli package "
                "(pip install tomli); or write the matrix as JSON"
            ) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"--config {path}: {e}") from None


def _from_toml(data: Dict[str, Any], path: str) -> List[Dict[str, Any]]:
    unknown = set(data) - {"specs", "matrix"}
    if unknown:
        raise UsageError(f"--config {path}: unknown tables {sorted(unknown)} (expected [[matrix]] and/or [[specs]])")
    out: List[Dict[str, Any]] = list(data.get("specs", []))
    for m in data.get("matrix", []):
        if not isinstance(m, dict) or "family" not in m:
            raise UsageError(f"--config {path}: each [[matrix]] needs a family: {m!r}")
        settings = {k.replace("-", "_"): v for k, v in m.items() if k != "family"}
        out.append({"family": m["family"], "settings": settings})
    return out


def read_config(path: str) -> List[Dict[str, Any]]:
    """The elements of the matrix file ``path`` (see the module docstring); UsageError when unreadable."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise UsageError(f"--config {path}: {e}") from None
    if path.endswith(".toml"):
        data: Any = _from_toml(_toml_loads(text, path), path)
    else:
        try:
            data = json.loads(text)
        except ValueError:
            try:
                data = [json.loads(ln) for ln in text.splitlines() if ln.strip()]
            except ValueError as e:
                raise UsageError(f"--config {path}: neither JSON, JSON lines nor TOML (.toml): {e}") from None
    if isinstance(data, dict):  # one element (e.g. JSON lines with a single line)
        data = [data]
    if not isinstance(data, list):
        raise UsageError(f"--config {path}: expected a list of specs or {{family, settings}} objects")
    for el in data:
        if not isinstance(el, dict) or "family" not in el:
            raise UsageError(f"--config {path}: each element needs a 'family': {el!r}")
    return data
