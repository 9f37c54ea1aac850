"""``prewarm``: select a matrix (flags, a preset or ``--config``), shard it, and build it with
:func:`flashinfer.jit.prewarm`; or, with ``--dry-run``, list what would be built."""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, Dict, List, Optional, Tuple

from .. import jit
from .format import Progress, first_line, fmt_secs, write_json
from .matrix import MatrixItem, add_matrix_args, parse_shard, select, shard_items


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the ``prewarm`` command."""
    pw = sub.add_parser(
        "prewarm",
        help="build a matrix of kernel modules into the JIT cache, in parallel",
        description="Expand a configuration matrix, drop unsupported combinations, and build "
        "the rest in parallel worker processes sharing the cache and its locks.",
    )
    add_matrix_args(pw)
    pw.add_argument(
        "-j",
        "--jobs",
        type=int,
        default=None,
        help=f"parallel worker processes (default: os.cpu_count() = {os.cpu_count()})",
    )
    pw.add_argument(
        "--dry-run",
        action="store_true",
        help="print the expanded matrix with cache keys (and which are cached) and the dropped combinations",
    )
    pw.add_argument("--shard", metavar="I/N", help="build only shard I of N (1-based; deterministic by spec name)")
    pw.add_argument("--json", metavar="PATH", help="write a JSON report")
    pw.add_argument(
        "--shared",
        action="store_true",
        help="make new entries readable by every user (0755 dirs and libraries, 0644 files): a cache one user "
        "(e.g. root building an image) prepares for others; same as FLASHINFER_JIT_CACHE_SHARED=1",
    )
    pw.add_argument("-v", "--verbose", action="store_true", help="also list cached and skipped modules in the summary")
    pw.set_defaults(func=cmd_prewarm)


def _safe_key(spec: Any) -> Tuple[Optional[str], Optional[str]]:
    try:
        return jit.cache_key(spec), None
    except Exception as e:  # e.g. no toolkit: the dry run still lists the matrix, with a warning
        return None, f"{type(e).__name__}: {e}"


def _valid_keys() -> set:
    try:
        return {e.key for e in jit.list_entries(check_current=False) if e.valid}
    except Exception:  # an unreadable cache: nothing counts as cached
        return set()


def _dry_run(
    args: argparse.Namespace,
    mine: List[MatrixItem],
    supported: List[MatrixItem],
    dropped: List[MatrixItem],
    shard: Optional[Tuple[int, int]],
    shard_txt: str,
) -> int:
    out = sys.stdout
    valid = _valid_keys()
    keys = {it.name: _safe_key(it.spec) for it in mine}
    out.write(f"cache root: {jit.cache_root()}\n")
    out.write(
        f"matrix{shard_txt}: {len(mine)} combinations, {len(supported)} to prewarm, "
        f"{len(dropped)} dropped as unsupported\n"
    )
    n_cached = 0
    key_err = None
    for it in supported:
        key, err = keys[it.name]
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
        write_json(
            args.json,
            {
                "dry_run": True,
                "shard": list(shard) if shard else None,
                "items": [
                    {
                        "name": it.name,
                        "family": it.family,
                        "spec": it.spec.to_json(),
                        "key": keys[it.name][0],
                        "reason": it.reason,
                        "cached": keys[it.name][0] in valid,
                    }
                    for it in mine
                ],
            },
        )
    return 0


def cmd_prewarm(args: argparse.Namespace) -> int:
    """Build (or with --dry-run list) the selected shard of the matrix; exit 1 if a build failed."""
    shard = parse_shard(args.shard)
    mine = shard_items(select(args), shard)
    supported = [it for it in mine if it.reason is None]
    dropped = [it for it in mine if it.reason is not None]
    shard_txt = f" (shard {shard[0]}/{shard[1]})" if shard else ""
    if args.dry_run:
        return _dry_run(args, mine, supported, dropped, shard, shard_txt)

    jobs = args.jobs if args.jobs and args.jobs > 0 else (os.cpu_count() or 1)
    sys.stderr.write(
        f"prewarm{shard_txt}: {len(supported)} modules ({len(dropped)} unsupported skipped), "
        f"{jobs} jobs, cache {jit.cache_root()}\n"
    )
    progress = Progress(len(supported))

    def on_settled(res: jit.PrewarmResult, building: int) -> None:
        progress.update(res.name, res.status, res.seconds, building)
        if res.status == "failed":
            progress.note(f"FAILED {res.name}: {first_line(res.error or '')}  (log: {res.log_path or '-'})")

    t0 = time.perf_counter()
    try:
        report = jit.prewarm([it.spec for it in supported], jobs=jobs, progress=on_settled,
                             shared=True if args.shared else None)
    except KeyboardInterrupt:
        sys.stderr.write("\ninterrupted\n")
        return 130
    wall = time.perf_counter() - t0
    results: Dict[str, jit.PrewarmResult] = {r.name: r for r in report.results}
    _print_summary(args, mine, supported, dropped, results, shard_txt, wall, jobs)
    failed = report.by_status("failed")
    if args.json:
        built, cached = report.by_status("built"), report.by_status("cached")
        slowest = max(built, key=lambda r: r.seconds or 0.0, default=None)
        write_json(
            args.json,
            {
                "dry_run": False,
                "shard": list(shard) if shard else None,
                "jobs": jobs,
                "wall_seconds": wall,
                "cache_root": str(jit.cache_root()),
                "counts": {
                    "built": len(built),
                    "cached": len(cached),
                    "skipped": len(dropped),
                    "failed": len(failed),
                    "total": len(mine),
                },
                "slowest": {"name": slowest.name, "seconds": slowest.seconds} if slowest else None,
                "items": [
                    {
                        "name": it.name,
                        "family": it.family,
                        "spec": it.spec.to_json(),
                        **(results[it.name].as_dict() if it.name in results else {"status": "skipped"}),
                        **({"reason": it.reason} if it.reason else {}),
                    }
                    for it in mine
                ],
            },
        )
    return 1 if failed else 0


def _print_summary(
    args: argparse.Namespace,
    mine: List[MatrixItem],
    supported: List[MatrixItem],
    dropped: List[MatrixItem],
    results: Dict[str, jit.PrewarmResult],
    shard_txt: str,
    wall: float,
    jobs: int,
) -> None:
    out = sys.stdout
    by = {
        s: [results[it.name] for it in supported if results[it.name].status == s] for s in ("built", "cached", "failed")
    }
    out.write(f"\nprewarm summary{shard_txt}\n")
    rows = by["built"] + by["failed"] + (by["cached"] if args.verbose else [])
    if rows:
        out.write(f"  {'STATUS':<8} {'COMPILE':>8}  MODULE\n")
        for r in rows:
            secs = fmt_secs(r.seconds) if r.status != "cached" else "-"
            out.write(f"  {r.status:<8} {secs:>8}  {r.name}\n")
            if r.status == "failed":
                out.write(f"  {'':<8} {'':>8}  error: {first_line(r.error or '')}\n")
                out.write(f"  {'':<8} {'':>8}  log:   {r.log_path or '(none)'}\n")
    if dropped and args.verbose:
        out.write("  skipped (unsupported):\n")
        for it in dropped:
            out.write(f"    {it.name}: {it.reason}\n")
    slowest = max(by["built"], key=lambda r: r.seconds or 0.0, default=None)
    total_compile = sum(r.seconds or 0.0 for r in by["built"])
    slow_txt = (
        f"   compile {fmt_secs(total_compile)} in total, slowest {fmt_secs(slowest.seconds)} {slowest.name}"
        if slowest
        else ""
    )
    out.write(f"  {'built':<16}{len(by['built']):>5}{slow_txt}\n")
    out.write(f"  {'already cached':<16}{len(by['cached']):>5}\n")
    out.write(f"  {'skipped':<16}{len(dropped):>5}   unsupported combinations (--dry-run lists why)\n")
    out.write(f"  {'failed':<16}{len(by['failed']):>5}\n")
    out.write(f"  {'total':<16}{len(mine):>5}   wall {fmt_secs(wall)} with {jobs} jobs\n")
    out.flush()
