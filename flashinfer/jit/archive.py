"""Exporting cache entries to one tar archive and importing them, validated, into another cache.

Archive layout (plain tar, gzip-compressed when the name ends in ``.gz``/``.tgz``)::

    flashinfer-cache.json          index: format, exporting versions, keys (informational)
    <key>/manifest.json            the entry's manifest
    <key>/lib<ident>.so            its library (the manifest's "so", checked against "so_sha256")
    <key>/build.log, <key>/*.cu    the build log and rendered sources (the manifest's "sources"), when present

Import never trusts the archive. While the member headers are read, before anything is written, every
member is checked: relative, no ``..`` component, no empty or hidden top-level name, at most
``<key>/<file>`` deep, and only regular files and directories (symbolic and hard links, devices and FIFOs
refuse the whole archive); no file larger than the per-file cap (``max_file_bytes``, default
FLASHINFER_JIT_IMPORT_MAX_FILE_BYTES or 256 MiB), files adding up to no more than the total cap
(``max_total_bytes``, default FLASHINFER_JIT_IMPORT_MAX_TOTAL_BYTES or 16 GiB) and at most
:data:`MAX_MEMBERS` members; a member over a cap refuses the archive as soon as its header is read,
before its data is decompressed. Each entry's manifest is read first (at most 1 MiB): only the files it
lists (itself, its library, its sources, and ``build.log``) are imported, anything else is skipped and
reported. The archive's files must also fit in the free space of the cache's file system. Each entry is
then extracted (plain reads of the member data, never ``tarfile.extract``) into a private temp dir under
``<root>/tmp``, validated exactly as a load validates an entry (manifest parses, is for the directory's
key and this recipe, library sha256 matches), and published under the key's file lock with the same
atomic rename as a build. A valid existing entry is never overwritten; an invalid one is replaced.

Export only reads the cache (it works on a read-only cache): each entry is verified and its files are
read through the verified descriptors.
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
MAX_MEMBERS = 100_000  # an export of the full supported matrix has about 6,000
EXTRA_FILES = ("build.log",)  # imported besides what the manifest names (so, sources)


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
    skipped_files: List[str] = dataclasses.field(default_factory=list)  # "<key>/<file>" its manifest does not list

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
            index = {"format": FORMAT, "created": time.time(), "versions": _exporter_versions(),
                     "keys": [i.key for i in chosen]}
            _add_bytes(tar, INDEX, json.dumps(index, indent=2, sort_keys=True, default=repr).encode())
            for info in chosen:
                # again, right before reading it; then read only through the verified descriptors
                ent, man, reason = cache.open_entry(info.key, root)
                if ent is None:
                    skipped.append((info.key, reason))
                    continue
                with ent:
                    so_bytes = cache.read_fd(ent.lib_fd)
                    if hashlib.sha256(so_bytes).hexdigest() != man.get("so_sha256"):
                        raise JITCacheError(f"{ent.so} changed while being exported; run the export again")
                    files = [(cache.MANIFEST, json.dumps(man, indent=2, sort_keys=True).encode() + b"\n", 0o644),
                             (ent.so.name, so_bytes, 0o755)]
                    have = {f[0] for f in files}
                    for extra in [*EXTRA_FILES, *(man.get("sources") or [])]:
                        if isinstance(extra, str) and _FILE_RE.match(extra) and extra not in have:
                            data = ent.read_file(extra)
                            if data is not None:
                                files.append((extra, data, 0o644))
                                have.add(extra)
                tar.addfile(_dir_info(info.key))
                for n, data, mode in files:
                    _add_bytes(tar, f"{info.key}/{n}", data, mode)
                    total += len(data)
                keys.append(info.key)
        os.replace(tmp, archive)
    finally:
        if tmp.exists():
            tmp.unlink()
    return ExportReport(str(archive), keys, skipped, total)


def _exporter_versions() -> Dict[str, object]:
    """The exporting installation's versions (informational; the toolkit's only when there is one)."""
    from .errors import CUDAToolkitNotFoundError

    v = env.versions(toolkit=False)
    try:
        v["cuda_toolkit"] = env.cuda_toolkit_version()
    except CUDAToolkitNotFoundError:
        v["cuda_toolkit"] = None
    return v


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


def _scan_members(tar: tarfile.TarFile, archive: Path, max_file: int, max_total: int) -> List[tarfile.TarInfo]:
    """Read the member headers one by one, refusing the archive as soon as a header breaks a cap (before
    that member's data is read or decompressed)."""
    members: List[tarfile.TarInfo] = []
    total = 0
    while True:
        try:
            m = tar.next()
        except (OSError, tarfile.TarError, EOFError) as e:
            raise ArchiveError(f"cannot read archive {archive}: {e}") from e
        if m is None:
            return members
        if len(members) >= MAX_MEMBERS:
            raise ArchiveError(f"{archive}: more than {MAX_MEMBERS} members; not a flashinfer cache export")
        if m.isfile():
            if m.size > max_file:
                raise ArchiveError(
                    f"{archive}: member {m.name!r} is {m.size} bytes, over the per-file cap of {max_file} bytes "
                    f"(raise it with FLASHINFER_JIT_IMPORT_MAX_FILE_BYTES or max_file_bytes=); nothing imported")
            total += m.size
            if total > max_total:
                raise ArchiveError(
                    f"{archive}: its files add up to more than the total cap of {max_total} bytes (raise it "
                    f"with FLASHINFER_JIT_IMPORT_MAX_TOTAL_BYTES or max_total_bytes=); nothing imported")
        members.append(m)


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


def _basename(m: tarfile.TarInfo) -> str:
    return PurePosixPath(m.name).parts[-1]


def _listed_files(man: Dict) -> set:
    """The files of an entry its manifest accounts for: itself, its library, its sources, the build log."""
    names = {cache.MANIFEST, *EXTRA_FILES}
    if isinstance(man.get("so"), str):
        names.add(man["so"])
    srcs = man.get("sources")
    if isinstance(srcs, list):
        names.update(x for x in srcs if isinstance(x, str))
    return names


def _free_bytes(root: Path) -> Optional[int]:
    probe = root
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    try:
        return shutil.disk_usage(probe).free
    except OSError:
        return None


def import_cache(archive: Path, root: Optional[Path] = None, *, max_file_bytes: Optional[int] = None,
                 max_total_bytes: Optional[int] = None, shared: Optional[bool] = None) -> ImportReport:
    """Import every entry of ``archive`` into the cache (see the module docstring for the checks).

    ``max_file_bytes`` / ``max_total_bytes``: the caps (defaults FLASHINFER_JIT_IMPORT_MAX_FILE_BYTES,
    256 MiB, and FLASHINFER_JIT_IMPORT_MAX_TOTAL_BYTES, 16 GiB). ``shared`` (default
    FLASHINFER_JIT_CACHE_SHARED): imported entries readable by every user (0755 dirs and library, 0644
    files). Raises ArchiveError for an unsafe or oversized archive (nothing imported)."""
    archive = Path(archive)
    root = root or env.cache_root_path()
    max_file = env.import_max_file_bytes() if max_file_bytes is None else int(max_file_bytes)
    max_total = env.import_max_total_bytes() if max_total_bytes is None else int(max_total_bytes)
    shared = env.shared_cache() if shared is None else shared
    report = ImportReport(str(archive))
    try:
        tar = tarfile.open(archive, _tar_mode(archive, False))
    except (OSError, tarfile.TarError) as e:
        raise ArchiveError(f"cannot read archive {archive}: {e}") from e
    with tar:
        entries = _check_members(_scan_members(tar, archive, max_file, max_total), archive)
        if not entries:
            return report

        # Pass 1: each entry's manifest decides which of its files are imported.
        plans: Dict[str, Tuple[List[tarfile.TarInfo], Dict]] = {}
        for key in sorted(entries):
            files = entries[key]
            mm = next((m for m in files if _basename(m) == cache.MANIFEST), None)
            if mm is None:
                report.invalid.append((key, "no manifest.json in the archive"))
                continue
            if mm.size > cache.MAX_MANIFEST_BYTES:
                report.invalid.append((key, f"manifest.json is {mm.size} bytes (at most {cache.MAX_MANIFEST_BYTES})"))
                continue
            src = tar.extractfile(mm)
            man, reason = cache._parse_manifest(src.read() if src is not None else b"")
            if man is None:
                report.invalid.append((key, reason))
                continue
            listed = _listed_files(man)
            plans[key] = ([m for m in files if _basename(m) in listed], man)
            report.skipped_files += [f"{key}/{_basename(m)}" for m in files if _basename(m) not in listed]
        need = sum(m.size for files, _ in plans.values() for m in files)
        free = _free_bytes(root)
        if free is not None and need > free:
            raise ArchiveError(f"{archive}: its entries need {need} bytes, but the file system of {root} has "
                               f"{free} bytes free (No space left on device); nothing imported")
        if not plans:
            return report

        env.ensure_dir(root, shared=shared)
        bad_root = cache.check_root_secure(root)
        if bad_root:
            raise cache.JITCacheInsecureError(f"refusing to import into the JIT cache: {bad_root}")
        env.ensure_dir(cache.tmp_root(root))
        cache.cleanup_tmp(root)
        for key, (files, _) in plans.items():
            if cache.check_entry(key, root)[0] is not None:
                report.already_present.append(key)
                continue
            tmp: Optional[Path] = None
            try:
                tmp = cache.new_tmp_dir(key, root)
                # Manifest last, as in a build (the whole dir becomes visible at once anyway).
                ordered = sorted(files, key=lambda m: _basename(m) == cache.MANIFEST)
                for m in ordered:
                    fname = _basename(m)
                    src = tar.extractfile(m)
                    if src is None:
                        raise ArchiveError(f"{archive}: member {m.name!r} has no data")
                    fd = os.open(tmp / fname, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
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
                if shared:
                    cache.make_shared_tree(tmp)
                with file_lock(key, root):
                    existing, _, _ = cache.check_entry(key, root)
                    if existing is not None:  # someone built or imported it meanwhile
                        report.already_present.append(key)
                        continue
                    was_there = os.path.lexists(edir)
                    cache.discard_dir(edir, root)
                    cache.release_tmp_dir(tmp, remove=False)
                    os.rename(tmp, edir)
                    tmp = None
                (report.replaced if was_there else report.imported).append(key)
                if not _is_current(man, key):
                    report.not_current.append(key)
            except OSError as e:
                raise JITCacheError(f"importing {key} from {archive} into {root} failed: {e.strerror or e} "
                                    f"({env.why_not_writable(root, e)}); that entry was not imported") from e
            finally:
                if tmp is not None:
                    cache.release_tmp_dir(tmp, remove=True)
    return report


def _is_current(man: Dict, key: str) -> bool:
    try:
        from .spec import Spec

        return cache.cache_key(Spec.from_json(man["spec"])) == key
    except Exception:
        return False
