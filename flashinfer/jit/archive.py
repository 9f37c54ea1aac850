"""Exporting cache entries to one tar archive and importing them, validated, into another cache.

Archive layout (plain tar, gzip-compressed when the name ends in ``.gz``/``.tgz``)::

    flashinfer-cache.json          index: format, exporting versions, keys (informational)
    <key>/manifest.json            the entry's manifest
    <key>/lib<ident>.so            its library (the manifest's "so", checked against "so_sha256")
    <key>/build.log, <key>/*.cu    the build log and rendered sources, when present (for debugging)

Import never trusts the archive. Before anything is written, every member name is checked: relative,
no ``..`` component, no empty or hidden top-level name, at most ``<key>/<file>`` deep, and only regular
files and directories (symbolic and hard links, devices and FIFOs refuse the whole archive). Each entry
is then extracted (plain reads of the member data, never ``tarfile.extract``) into a private temp dir
under ``<root>/tmp``, validated exactly as a load validates an entry (manifest parses, is for the
directory's key and this recipe, library sha256 matches), and published under the key's file lock with
the same atomic rename as a build. A valid existing entry is never overwritten; an invalid one is
replaced.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import tarfile
import time
from pathlib import Path, PurePosixPath
from typing import Callable, Dict, List, Optional, Tuple

from . import cache, env
from .errors import JITCacheError
from .locks import file_lock

INDEX = "flashinfer-cache.json"
FORMAT = 1
_KEY_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*-[0-9a-f]{16}$")
_FILE_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+-]*$")
MAX_MEMBER_BYTES = 4 << 30  # a member larger than this is not a kernel library


class ArchiveError(JITCacheError):
    """The archive is malformed or unsafe (path traversal, links, devices...): nothing was imported."""


@dataclasses.dataclass
class ExportReport:
    archive: str
    keys: List[str]
    skipped_invalid: List[Tuple[str, str]]  # (key, reason)
    bytes: int


@dataclasses.dataclass
class ImportReport:
    archive: str
    imported: List[str] = dataclasses.field(default_factory=list)
    replaced: List[str] = dataclasses.field(default_factory=list)  # imported over an invalid entry
    already_present: List[str] = dataclasses.field(default_factory=list)  # a valid entry exists: kept
    invalid: List[Tuple[str, str]] = dataclasses.field(default_factory=list)  # (key, reason): not imported
    not_current: List[str] = dataclasses.field(default_factory=list)  # imported, but for another environment

    @property
    def ok(self) -> bool:
        return not self.invalid


def _tar_mode(path: Path, write: bool) -> str:
    name = path.name.lower()
    gz = name.endswith(".gz") or name.endswith(".tgz")
    if write:
        return "w:gz" if gz else "w"
    return "r:*"


def export_cache(archive: Path, predicate: Optional[Callable[[cache.EntryInfo], bool]] = None,
                 root: Optional[Path] = None) -> ExportReport:
    """Write the valid entries for which ``predicate`` holds (all when None) to ``archive``.

    Only the files an entry needs (manifest, library) plus its build log and rendered sources go in;
    objects and ninja files stay behind. The archive is written to a temp name and renamed into place.
    """
    root = root or env.cache_root_path()
    entries = cache.list_entries(root, check_current=predicate is not None)
    keys: List[str] = []
    skipped: List[Tuple[str, str]] = []
    archive = Path(archive).absolute()
    archive.parent.mkdir(parents=True, exist_ok=True)
    tmp = archive.with_name(f".{archive.name}.{os.getpid()}.tmp")
    total = 0
    try:
        with tarfile.open(tmp, _tar_mode(archive, True), format=tarfile.PAX_FORMAT) as tar:
            chosen = []
            for info in entries:
                if predicate is not None and not predicate(info):
                    continue
                if not info.valid:
                    skipped.append((info.key, info.reason))
                    continue
                chosen.append(info)
            index = {"format": FORMAT, "created": time.time(), "versions": env.versions(),
                     "keys": [i.key for i in chosen]}
            _add_bytes(tar, INDEX, json.dumps(index, indent=2, sort_keys=True, default=repr).encode())
            for info in chosen:
                edir = cache.entry_dir(info.key, root)
                so, man, reason = cache.check_entry(info.key, root)  # again, right before reading it
                if so is None:
                    skipped.append((info.key, reason))
                    continue
                names = [cache.MANIFEST, so.name]
                for extra in ["build.log", *(man.get("sources") or [])]:
                    if isinstance(extra, str) and _FILE_RE.match(extra) and (edir / extra).is_file():
                        names.append(extra)
                tar.addfile(_dir_info(info.key))
                for n in dict.fromkeys(names):
                    data = (edir / n).read_bytes()
                    if n == so.name and hashlib.sha256(data).hexdigest() != man.get("so_sha256"):
                        raise JITCacheError(f"{so} changed while being exported; run the export again")
                    _add_bytes(tar, f"{info.key}/{n}", data, 0o755 if n == so.name else 0o644)
                    total += len(data)
                keys.append(info.key)
        os.replace(tmp, archive)
    finally:
        if tmp.exists():
            tmp.unlink()
    return ExportReport(str(archive), keys, skipped, total)


def _dir_info(name: str) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type = tarfile.DIRTYPE
    ti.mode = 0o700
    ti.mtime = int(time.time())
    return ti


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes, mode: int = 0o644) -> None:
    import io

    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    ti.mode = mode
    ti.mtime = int(time.time())
    tar.addfile(ti, io.BytesIO(data))


def _check_members(members: List[tarfile.TarInfo], archive: Path) -> Dict[str, List[tarfile.TarInfo]]:
    """Refuse unsafe members; return {key: [file members]} (the index is dropped)."""
    entries: Dict[str, List[tarfile.TarInfo]] = {}
    for m in members:
        name = m.name
        where = f"{archive}: member {name!r}"
        if not name or name.startswith("/") or "\\" in name or "\x00" in name:
            raise ArchiveError(f"{where}: absolute or malformed path; refusing the whole archive")
        parts = [p for p in PurePosixPath(name).parts if p != "."]
        if any(p == ".." for p in parts):
            raise ArchiveError(f"{where}: path traversal ('..'); refusing the whole archive")
        if m.issym() or m.islnk():
            raise ArchiveError(f"{where}: a {'symbolic' if m.issym() else 'hard'} link (to {m.linkname!r}); "
                               "refusing the whole archive")
        if not (m.isfile() or m.isdir()):
            raise ArchiveError(f"{where}: not a regular file or directory (device, FIFO...); refusing the whole archive")
        if m.isfile() and m.size > MAX_MEMBER_BYTES:
            raise ArchiveError(f"{where}: {m.size} bytes is too large for a cache entry file")
        if parts == [INDEX] and m.isfile():
            continue
        if not parts or len(parts) > 2 or (m.isdir() and len(parts) != 1) or (m.isfile() and len(parts) != 2):
            raise ArchiveError(f"{where}: not <key>/ or <key>/<file> (not a flashinfer cache export)")
        key = parts[0]
        if not _KEY_RE.match(key) or key in cache.RESERVED:
            raise ArchiveError(f"{where}: {key!r} is not a cache key")
        if m.isfile() and not _FILE_RE.match(parts[1]):
            raise ArchiveError(f"{where}: unexpected file name {parts[1]!r}")
        lst = entries.setdefault(key, [])
        if m.isfile():
            if any(PurePosixPath(x.name).parts[-1] == parts[1] for x in lst):
                raise ArchiveError(f"{where}: duplicate member")
            lst.append(m)
    return entries


def import_cache(archive: Path, root: Optional[Path] = None) -> ImportReport:
    """Import every entry of ``archive`` into the cache (see the module docstring for the checks)."""
    archive = Path(archive)
    root = root or env.cache_root_path()
    report = ImportReport(str(archive))
    try:
        tar = tarfile.open(archive, _tar_mode(archive, False))
    except (OSError, tarfile.TarError) as e:
        raise ArchiveError(f"cannot read archive {archive}: {e}") from e
    with tar:
        try:
            members = tar.getmembers()
        except (OSError, tarfile.TarError, EOFError) as e:
            raise ArchiveError(f"cannot read archive {archive}: {e}") from e
        entries = _check_members(members, archive)
        if not entries:
            return report
        env.ensure_dir(root)
        bad_root = cache.check_root_secure(root)
        if bad_root:
            raise cache.JITCacheInsecureError(f"refusing to import into the JIT cache: {bad_root}")
        env.ensure_dir(cache.tmp_root(root))
        cache.cleanup_tmp(root)
        for key in sorted(entries):
            files = entries[key]
            if not any(PurePosixPath(m.name).parts[-1] == cache.MANIFEST for m in files):
                report.invalid.append((key, "no manifest.json in the archive"))
                continue
            if cache.check_entry(key, root)[0] is not None:
                report.already_present.append(key)
                continue
            tmp = cache.new_tmp_dir(key, root)
            try:
                # Manifest last, as in a build (the whole dir becomes visible at once anyway).
                ordered = sorted(files, key=lambda m: PurePosixPath(m.name).parts[-1] == cache.MANIFEST)
                for m in ordered:
                    fname = PurePosixPath(m.name).parts[-1]
                    src = tar.extractfile(m)
                    if src is None:
                        raise ArchiveError(f"{archive}: member {m.name!r} has no data")
                    fd = os.open(tmp / fname, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0),
                                 0o600)
                    with os.fdopen(fd, "wb") as out:
                        shutil.copyfileobj(src, out, 1 << 20)
                    os.chmod(tmp / fname, 0o755 if fname.endswith(".so") else 0o644)
                so, man, reason = cache.validate_entry_dir(tmp, key, secure=True)
                if so is None:
                    report.invalid.append((key, reason))
                    continue
                # Paths in the manifest were the exporting machine's: point them at this entry.
                edir = cache.entry_dir(key, root)
                man["log_path"] = str(edir / "build.log") if (tmp / "build.log").is_file() else None
                man["imported"] = {"archive": str(archive.absolute()), "at": time.time()}
                cache.write_json_atomic(tmp / cache.MANIFEST, man)
                with file_lock(key, root):
                    existing, _, _ = cache.check_entry(key, root)
                    if existing is not None:  # someone built or imported it meanwhile
                        report.already_present.append(key)
                        continue
                    was_there = edir.exists()
                    cache.discard_dir(edir, root)
                    os.rename(tmp, edir)
                    tmp = None
                (report.replaced if was_there else report.imported).append(key)
                if not _is_current(man, key):
                    report.not_current.append(key)
            finally:
                if tmp is not None:
                    shutil.rmtree(tmp, ignore_errors=True)
    return report


def _is_current(man: Dict, key: str) -> bool:
    try:
        from .spec import Spec

        return cache.cache_key(Spec.from_json(man["spec"])) == key
    except Exception:
        return False
