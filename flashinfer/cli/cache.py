"""``cache {list,verify,clear,prune,export,import}``: the JIT cache's entries, seen and managed from the shell."""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path
from typing import Callable, List, Optional

from .. import jit
from .._families import load_families
from ..jit import archive
from ..jit import cache as jcache
from ..jit.cache import EntryInfo
from .errors import UsageError
from .format import fmt_secs, fmt_size


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the ``cache`` command and its actions."""
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
    cc.add_argument(
        "--stale",
        action="store_true",
        help="only entries built for another environment (toolkit, torch, flags, sources): never loaded here",
    )
    cc.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")
    cc.set_defaults(func=cmd_cache_clear)
    cp = csub.add_parser(
        "prune",
        help="remove entries this installation can never load (built for another "
        "recipe/flashinfer/torch/CUDA version, unknown family) and invalid ones",
    )
    cp.add_argument("--dry-run", action="store_true", help="only list what would be removed")
    cp.set_defaults(func=cmd_cache_prune)
    ce = csub.add_parser(
        "export", help="write valid entries to one tar archive (.tar, .tar.gz/.tgz) for `cache import`"
    )
    ce.add_argument("archive", metavar="ARCHIVE")
    ce.add_argument("--family", help="only these families (comma list)")
    ce.add_argument("--key", action="append", help="only this key or spec name (repeatable)")
    ce.add_argument(
        "--current", action="store_true", help="only entries this environment would load (same archs, flags, versions)"
    )
    ce.set_defaults(func=cmd_cache_export)
    ci = csub.add_parser(
        "import",
        help="validate and add the entries of an archive made by `cache export`; exit 1 if any entry was refused",
    )
    ci.add_argument("archive", metavar="ARCHIVE")
    ci.add_argument("--shared", action="store_true", help="imported entries readable by every user (0755/0644)")
    ci.add_argument("--max-file-bytes", metavar="SIZE",
                    help="largest file imported (e.g. 512M; default FLASHINFER_JIT_IMPORT_MAX_FILE_BYTES or 256M)")
    ci.add_argument("--max-total-bytes", metavar="SIZE",
                    help="most bytes imported in all (default FLASHINFER_JIT_IMPORT_MAX_TOTAL_BYTES or 16G)")
    ci.set_defaults(func=cmd_cache_import)


def entry_family(e: EntryInfo) -> Optional[str]:
    """The entry's family: from its manifest's spec, else the longest registered family its key starts with."""
    if isinstance(e.spec, dict) and "family" in e.spec:
        return e.spec["family"]
    key = str(e.key)
    for fam in sorted(load_families(), key=len, reverse=True):
        if key.startswith(fam + "_") or key.startswith(fam + "-"):
            return fam
    return None


def entry_name(e: EntryInfo) -> str:
    """The spec name part of the key (the key itself when it has no digest)."""
    key = str(e.key)
    return key.rsplit("-", 1)[0] if re.search(r"-[0-9a-f]{16}$", key) else key


def _entries(family: Optional[str]) -> List[EntryInfo]:
    entries = list(jit.list_entries())
    if family:
        entries = [e for e in entries if entry_family(e) == family]
    return sorted(entries, key=lambda e: str(e.key))


def _fmt_current(e: EntryInfo) -> str:
    return "?" if e.current is None else ("yes" if e.current else "stale")


def cmd_cache_list(args: argparse.Namespace) -> int:
    """A table (or JSON) of the entries."""
    entries = _entries(args.family)
    if args.json:
        rows = [
            {
                "key": str(e.key),
                "name": entry_name(e),
                "family": entry_family(e),
                "size": e.size,
                "build_seconds": e.build_seconds,
                "created": e.created,
                "valid": bool(e.valid),
                "reason": e.reason,
                "current": e.current,
            }
            for e in entries
        ]
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
        total += e.size or 0
        digest = str(e.key)[len(entry_name(e)) + 1 :] or "-"
        age = fmt_secs(now - e.created) if e.created else "-"
        print(
            f"{'yes' if e.valid else 'NO':<6} {_fmt_current(e):<8}{fmt_size(e.size):>10} "
            f"{fmt_secs(e.build_seconds):>7} {age:>7}  {digest:<16}  {entry_name(e)}"
        )
        if not e.valid:
            print(f"{'':<6} {'':<8}{'':>10} {'':>7} {'':>7}  {'':<16}  reason: {e.reason or 'invalid'}")
    n_bad = sum(1 for e in entries if not e.valid)
    n_stale = sum(1 for e in entries if e.current is False)
    print(
        f"{len(entries)} entries, {fmt_size(total)}, {n_bad} invalid, {n_stale} stale "
        "(stale: built for another toolkit/torch/flags/sources; never loaded here)"
    )
    return 0


def cmd_cache_verify(args: argparse.Namespace) -> int:
    """Check every entry; exit 1 naming the bad ones."""
    entries = _entries(args.family)
    bad = [e for e in entries if not e.valid]
    for e in bad:
        print(f"BAD  {e.key}: {e.reason or 'invalid'}")
    print(f"{len(entries) - len(bad)} of {len(entries)} entries valid under {jit.cache_root()}")
    if bad:
        print("rebuild on next use, or remove them: python -m flashinfer cache clear --invalid --yes")
    return 1 if bad else 0


def cmd_cache_clear(args: argparse.Namespace) -> int:
    """Remove entries (all, a family's, invalid or stale ones), after confirmation or with --yes."""
    entries = _entries(args.family)
    if args.invalid or args.stale:
        entries = [e for e in entries if (args.invalid and not e.valid) or (args.stale and e.current is False)]
    everything = args.family is None and not args.invalid and not args.stale
    what = (
        ("invalid " if args.invalid else "")
        + ("stale " if args.stale else "")
        + (f"{args.family} " if args.family else "")
        + "entries"
    )
    root = jit.cache_root()
    if not entries and not everything:
        print(f"no {what} under {root}")
        return 0
    if not args.yes:
        if not sys.stdin.isatty():
            print(f"refusing to remove {len(entries)} {what} under {root} without --yes", file=sys.stderr)
            return 1
        ans = input(f"remove {len(entries)} {what} under {root}? [y/N] ")
        if ans.strip().lower() not in ("y", "yes"):
            print("nothing removed")
            return 1
    keys = {str(e.key) for e in entries}
    n = jit.clear_cache() if everything else jit.clear_cache(lambda e: str(e.key) in keys)
    print(f"removed {n} entries from {root}")
    return 0


def cmd_cache_prune(args: argparse.Namespace) -> int:
    """Remove (or with --dry-run list) the entries this installation can never load."""
    load_families()  # an entry of a family that is merely not imported yet is not "unknown"
    root = jit.cache_root()
    victims = jcache.prune_cache(root, dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    for info, why in victims:
        print(f"{verb} {info.key}: {why}")
    kept = len(jcache.list_entries(root, check_current=False)) if not args.dry_run else None
    freed = sum(info.size or 0 for info, _ in victims)
    print(
        f"{verb} {len(victims)} entries ({fmt_size(freed)}) from {root}"
        + (f"; {kept} kept" if kept is not None else "")
    )
    return 0


def _entry_filter(args: argparse.Namespace) -> Optional[Callable[[EntryInfo], bool]]:
    fams = {f.strip() for f in (args.family or "").split(",") if f.strip()}
    keys = set(args.key or [])
    if not fams and not keys and not args.current:
        return None

    def pred(e: EntryInfo) -> bool:
        if fams and entry_family(e) not in fams:
            return False
        if keys and str(e.key) not in keys and entry_name(e) not in keys:
            return False
        return not (args.current and e.current is not True)

    return pred


def cmd_cache_export(args: argparse.Namespace) -> int:
    """Write the selected valid entries to one tar archive."""
    root = jit.cache_root()
    t0 = time.perf_counter()
    rep = archive.export_cache(Path(args.archive), _entry_filter(args), root)
    for key, why in rep.skipped_invalid:
        print(f"skipped invalid entry {key}: {why}")
    size = Path(rep.archive).stat().st_size
    print(
        f"exported {len(rep.keys)} entries ({fmt_size(rep.bytes)} of files, archive {fmt_size(size)}) "
        f"from {root} to {rep.archive} in {fmt_secs(time.perf_counter() - t0)}; "
        f"{len(rep.skipped_invalid)} invalid skipped"
    )
    return 0


def cmd_cache_import(args: argparse.Namespace) -> int:
    """Validate and add the entries of an archive; exit 1 if any was refused."""
    root = jit.cache_root()
    t0 = time.perf_counter()
    from ..jit.env import parse_bytes

    caps = {}
    for opt, value in (("--max-file-bytes", args.max_file_bytes), ("--max-total-bytes", args.max_total_bytes)):
        if value is not None and parse_bytes(value) is None:
            raise UsageError(f"{opt} {value!r}: expected a positive size such as 4096, 512M, 16G")
        caps[opt] = parse_bytes(value) if value is not None else None
    max_file, max_total = caps["--max-file-bytes"], caps["--max-total-bytes"]
    rep = archive.import_cache(Path(args.archive), root, max_file_bytes=max_file, max_total_bytes=max_total,
                               shared=True if args.shared else None)
    for item in rep.skipped_files:
        print(f"skipped  {item}: not listed in its manifest")
    for key in rep.imported + rep.replaced:
        print(
            f"imported {key}"
            + (" (replaced an invalid entry)" if key in rep.replaced else "")
            + (" (not loadable in this environment: other archs/flags/versions)" if key in rep.not_current else "")
        )
    for key in rep.already_present:
        print(f"kept     {key} (a valid entry is already there)")
    for key, why in rep.invalid:
        print(f"REFUSED  {key}: {why}")
    print(
        f"imported {len(rep.imported) + len(rep.replaced)}, already present {len(rep.already_present)}, "
        f"refused {len(rep.invalid)} (invalid), {len(rep.not_current)} of the imported for another environment; "
        f"into {root} in {fmt_secs(time.perf_counter() - t0)}"
    )
    return 0 if rep.ok else 1
