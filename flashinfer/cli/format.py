"""Text the commands print: values, durations, sizes, the prewarm progress line, JSON reports."""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Optional, TextIO


def fmt_value(v: Any) -> str:
    """An axis value as typed on the command line (booleans are ``on``/``off``)."""
    if isinstance(v, bool):
        return "on" if v else "off"
    return str(v)


def fmt_secs(s: Optional[float]) -> str:
    """``12.3s``, ``4m05s``, ``2h07m``; ``-`` when unknown."""
    if s is None:
        return "-"
    if s < 60:
        return f"{s:.1f}s"
    m, sec = divmod(int(round(s)), 60)
    if m < 60:
        return f"{m}m{sec:02d}s"
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m"


def fmt_size(n: Optional[float]) -> str:
    """``512B``, ``1.5KiB``, ``3.2MiB``, ``1.0GiB``; ``-`` when unknown."""
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024.0
    return str(n)


def first_line(text: str, limit: int = 300) -> str:
    """The first non-blank line of ``text``, cut to ``limit`` characters."""
    line = next((ln for ln in str(text).splitlines() if ln.strip()), "")
    return line if len(line) <= limit else line[: limit - 3] + "..."


def write_json(path: str, data: Any) -> None:
    """Write ``data`` as indented JSON to ``path``, creating its directory."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(data, indent=2, default=str) + "\n")


class Progress:
    """One line per settled module: ``[done/total] pct elapsed ETA | building | status: name``.

    On a terminal the line is rewritten in place; elsewhere (CI logs) each update is its own line. The ETA
    is extrapolated from compiled modules only: cache hits are nearly free and would make it optimistic.
    """

    def __init__(self, total: int, stream: Optional[TextIO] = None) -> None:
        self.total = total
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.t0 = time.perf_counter()
        self.t_last_cached = self.t0  # the build clock starts after the (cheap) cache hits
        self.done = 0
        self.compiled = 0
        self._last_len = 0

    def update(self, name: str, status: str, seconds: Optional[float], building: int) -> None:
        """Record that module ``name`` settled with ``status`` after ``seconds``; ``building`` still run."""
        self.done += 1
        now = time.perf_counter()
        if status == "cached":
            self.t_last_cached = now
        else:
            self.compiled += 1
        elapsed = now - self.t0
        eta = (now - self.t_last_cached) / self.compiled * (self.total - self.done) if self.compiled else None
        eta_txt = "0s" if self.done >= self.total else ("?" if eta is None else fmt_secs(eta))
        sec = f" {fmt_secs(seconds)}" if status in ("built", "failed") else ""
        line = (
            f"[{self.done}/{self.total}] {100 * self.done // max(self.total, 1):3d}% "
            f"elapsed {fmt_secs(elapsed)} ETA {eta_txt} | {building} building | {status}{sec}: {name}"
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
        """Print ``text`` on its own line (below an in-place progress line)."""
        if self.tty and self._last_len:
            self.stream.write("\n")
            self._last_len = 0
        self.stream.write(text + "\n")
        self.stream.flush()
