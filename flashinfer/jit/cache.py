"""The on-disk cache: keys, entries, manifests, verification, listing and clearing.

Layout under the cache root::

    <root>/<key>/            one published entry: rendered sources, build.ninja and objects (from
                             torch.utils.cpp_extension.load), lib<ident>.so, build.log,
                             manifest.json (written last; an entry without a valid one is never loaded)
    <root>/tmp/<key>.<host>.<pid>.<rand>/   private build dirs (renamed to <root>/<key> when complete);
                             each holds .builder.lock, flock()ed by its builder while it lives
    <root>/locks/<key>.lock  per-key file locks
    <root>/logs/<key>.log    full compiler log of the latest build of <key>

Reading never needs write access: listing, verifying, exporting and loading work on a read-only cache
(a read-only mount, or another user's cache with mode 0755). Every file of an entry is opened once,
without following symbolic links and without blocking (a FIFO or device in place of a file is refused,
never waited on), checked on its descriptor (fstat: regular file, owner, mode; sha256 of the bytes read
through it), and the library is loaded through that same descriptor (``/proc/self/fd/N``), so what is
loaded is exactly what was checked.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import shutil
import socket
import stat
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from . import env
from .errors import JITCacheError, JITCacheInsecureError
from .locks import file_lock, lock_path  # noqa: F401 (lock_path: part of the cache layout API)
from .templating import templates_digest

MANIFEST = "manifest.json"
RESERVED = {"tmp", "locks", "logs"}
TMP_MAX_AGE_S = 24 * 3600
BUILDER_LOCK = ".builder.lock"
MAX_MANIFEST_BYTES = 1 << 20  # a manifest is a few KiB; a larger one is not ours


# --------------------------------------------------------------------------------------------------
# Keys
# --------------------------------------------------------------------------------------------------


def key_inputs(spec) -> Dict[str, Any]:
    """Everything that goes into the digest of ``spec``'s key (no rendering, no subprocesses)."""
    return {
        "spec": spec.to_json(),
        "template": spec.template,
        "render_vars": spec.template_vars(),
        "templates_sha256": templates_digest(),
        "flags": env.describe_flags(spec),
        **env.versions(),
    }


def _digest(inputs: Dict[str, Any]) -> str:
    blob = json.dumps(inputs, sort_keys=True, default=repr, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def cache_key(spec) -> str:
    """``<spec.name()>-<16 hex digest>``. Needs the CUDA toolkit (its version is part of the key)."""
    return f"{spec.name()}-{_digest(key_inputs(spec))[:16]}"


def selector_inputs(spec) -> Dict[str, Any]:
    """What decides whether an entry serves ``spec`` on a host *without* a CUDA toolkit: the key's
    inputs minus how the binary was produced (toolkit version, host compilers). Spec, kernel sources,
    nvcc flags (target archs included), link flags, recipe, flashinfer, torch and torch-CUDA versions
    stay. Recorded in every manifest as its digest ("select")."""
    return {
        "spec": spec.to_json(),
        "template": spec.template,
        "render_vars": spec.template_vars(),
        "templates_sha256": templates_digest(),
        "flags": {"nvcc": env.nvcc_flags(spec), "link": env.link_flags(spec)},
        **env.versions(toolkit=False),
    }


def selector_digest(spec) -> str:
    """sha256 of :func:`selector_inputs` (no toolkit, no subprocesses)."""
    return _digest(selector_inputs(spec))


def lib_name(key: str) -> str:
    """File name of an entry's shared library."""
    return "lib" + key.replace("-", "_") + ".so"


# --------------------------------------------------------------------------------------------------
# Paths
# --------------------------------------------------------------------------------------------------


def entry_dir(key: str, root: Optional[Path] = None) -> Path:
    return (root or env.cache_root_path()) / key


def log_path(key: str, root: Optional[Path] = None) -> Path:
    return (root or env.cache_root_path()) / "logs" / f"{key}.log"


def tmp_root(root: Optional[Path] = None) -> Path:
    return (root or env.cache_root_path()) / "tmp"


def _host() -> str:
    return socket.gethostname().replace(".", "_") or "host"


# --------------------------------------------------------------------------------------------------
# Private build dirs and their liveness
# --------------------------------------------------------------------------------------------------
#
# A build (or import) works in tmp/<key>.<host>.<pid>.<rand>/. Whether its builder still lives is
# decided by a lock, never by the pid in the name: a pid says nothing across PID namespaces (two
# containers sharing a cache see different pids, and the same hostname) or hosts. The builder creates
# .builder.lock inside the dir and holds flock(LOCK_EX) on it until the dir is published or removed; the
# kernel drops the lock when the builder dies, however it dies, and flock works across containers on
# one kernel and over NFS. A cleaner that can take the lock knows the builder is gone; a dir without
# the lock file (being created or published at this instant, or left by another version) is removed
# only when older than TMP_MAX_AGE_S. The lock file is created under a private name, locked, then
# renamed into place, so a cleaner never finds it unlocked while its builder lives.

_tmp_locks: Dict[str, int] = {}


def new_tmp_dir(key: str, root: Path) -> Path:
    """Create a private build dir ``tmp/<key>.<host>.<pid>.<rand>`` holding this process's builder lock
    (release it with :func:`release_tmp_dir`)."""
    import fcntl

    rand = uuid.uuid4().hex[:8]
    d = tmp_root(root) / f"{key}.{_host()}.{os.getpid()}.{rand}"
    d.mkdir(mode=0o700, parents=True)
    private = d / f".builder.{rand}.tmp"
    fd = os.open(private, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # nobody else knows the name yet: never blocks
        os.rename(private, d / BUILDER_LOCK)
    except BaseException:
        os.close(fd)
        shutil.rmtree(d, ignore_errors=True)
        raise
    _tmp_locks[str(d)] = fd
    return d


def release_tmp_dir(path: Path, remove: bool) -> None:
    """Give up the builder lock of ``path``: ``remove`` deletes the dir first (still locked, so no
    cleaner races the deletion); otherwise the lock file is unlinked (the dir is about to be renamed into
    the cache; until then a cleaner sees a fresh dir without lock file, which it leaves alone)."""
    fd = _tmp_locks.pop(str(path), None)
    try:
        if remove:
            shutil.rmtree(path, ignore_errors=True)
        else:
            try:
                os.unlink(path / BUILDER_LOCK)
            except OSError:
                pass
    finally:
        if fd is not None:
            os.close(fd)


def _take_dead_builders_lock(path: Path) -> Tuple[str, Optional[int]]:
    """("live", None) when a builder holds ``path``'s lock, ("dead", fd) when we could take it (we now
    hold it), ("unknown", None) when there is no usable lock file."""
    import fcntl

    try:
        fd = os.open(path / BUILDER_LOCK, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return "unknown", None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            return "unknown", None
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return "live", None
    except OSError:
        os.close(fd)
        return "unknown", None
    return "dead", fd


def cleanup_tmp(root: Optional[Path] = None, max_age_s: float = TMP_MAX_AGE_S) -> int:
    """Remove leftover temp dirs: those whose builder's lock is free (builder gone, in any container or
    on any host), trash of interrupted removals, and those without a lock file older than ``max_age_s``.
    Returns how many were removed. Never touches a dir whose builder lives."""
    troot = tmp_root(root)
    try:
        names = os.listdir(troot)
    except OSError:
        return 0
    now = time.time()
    removed = 0
    for name in names:
        path = troot / name
        try:
            st = os.lstat(path)
        except OSError:
            continue
        old = now - st.st_mtime > max_age_s
        if not stat.S_ISDIR(st.st_mode):
            if old:
                try:
                    os.unlink(path)
                    removed += 1
                except OSError:
                    pass
            continue
        if name.startswith("trash-"):  # renamed away by discard_dir: nobody's work, only not yet deleted
            shutil.rmtree(path, ignore_errors=True)
            removed += 1
            continue
        state, fd = _take_dead_builders_lock(path)
        if state == "live":
            continue
        if state == "dead" or old:
            try:
                shutil.rmtree(path, ignore_errors=True)
            finally:
                if fd is not None:
                    os.close(fd)
            removed += 1
    return removed


def discard_dir(path: Path, root: Path) -> None:
    """Remove a directory: first move it out of the way atomically (into tmp/), then delete it."""
    if not os.path.lexists(path):
        return
    trash = tmp_root(root) / f"trash-{path.name}.{_host()}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    try:
        trash.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.rename(path, trash)
    except OSError:
        trash = path
    if os.path.islink(trash):
        os.unlink(trash)
    else:
        shutil.rmtree(trash, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# Security: who may have written what we are about to load
# --------------------------------------------------------------------------------------------------
#
# A cache entry is native code that gets mapped into the process. We load it only when nobody but a
# trusted owner can have written it: the cache root, the entry dir, its manifest and its library must
# each be owned by a trusted uid and not be writable by group or others. Trusted uids: this process's
# effective uid, root (uid 0: root can change this process anyway, so a root-owned file adds no attack
# surface; it is what a cache baked into a container image looks like), and the uids or user names in
# FLASHINFER_JIT_CACHE_TRUSTED_OWNERS (comma list; e.g. the build user of a shared read-only cache).
# The check reads mode bits and owners (fstat on the descriptors we read through anyway), so it holds
# for root too, where a permission failure never happens.

TRUSTED_OWNERS_ENV = env.TRUSTED_OWNERS_ENV
_WRITE_OTHERS = stat.S_IWGRP | stat.S_IWOTH


def trusted_uids() -> frozenset:
    """{euid, 0} plus FLASHINFER_JIT_CACHE_TRUSTED_OWNERS (parsed strictly by ``env``)."""
    return frozenset({os.geteuid(), 0}) | env.trusted_owner_uids()


def _owner_name(uid: int) -> str:
    return env._owner_desc(uid)


def insecure_reason(st: os.stat_result, path: Path, what: str) -> Optional[str]:
    """Why ``path`` (whose stat is ``st``) must not be trusted, with how to fix it; None when it is fine."""
    if st.st_uid not in trusted_uids():
        return (
            f"{what} {path} is owned by {_owner_name(st.st_uid)}, not by this user "
            f"({_owner_name(os.geteuid())}) or root: code in it could have been written by that user. "
            f"Fix: `chown -R {os.geteuid()} {path}`, or point FLASHINFER_JIT_CACHE at a cache of your own, "
            f"or trust that owner explicitly with {TRUSTED_OWNERS_ENV}={st.st_uid}"
        )
    if st.st_mode & _WRITE_OTHERS and not (stat.S_ISLNK(st.st_mode)):
        who = " and ".join(w for w, bit in (("group", stat.S_IWGRP), ("others", stat.S_IWOTH)) if st.st_mode & bit)
        return (
            f"{what} {path} is writable by {who} (mode {stat.S_IMODE(st.st_mode):04o}): anyone with that "
            f"access could replace code this process loads. Fix: `chmod -R go-w {path}`, or point "
            f"FLASHINFER_JIT_CACHE at a private directory (created with mode 0700)"
        )
    return None


def check_root_secure(root: Path) -> Optional[str]:
    """None if the cache root is safe to load from (or does not exist yet), else why not (one stat)."""
    try:
        st = os.stat(root)
    except OSError:
        return None
    return insecure_reason(st, root, "JIT cache root")


def harden(path: Path) -> None:
    """Clear group/other write bits of a file or dir we created (a umask of 002 would leave them)."""
    try:
        mode = stat.S_IMODE(os.lstat(path).st_mode)
        if mode & _WRITE_OTHERS:
            os.chmod(path, mode & ~_WRITE_OTHERS)
    except OSError:
        pass


def make_shared_tree(path: Path) -> None:
    """Make a tree this process wrote readable by everyone: dirs 0755, libraries and other executables
    0755, files 0644 (shared caches, e.g. built by root for the unprivileged users of an image). Never
    adds write access; symbolic links are left alone."""
    for dirpath, dirnames, filenames in os.walk(path):
        env.make_shared_dir(Path(dirpath))
        for fn in filenames:
            p = os.path.join(dirpath, fn)
            try:
                st = os.lstat(p)
                if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
                    continue
                exe = fn.endswith(".so") or st.st_mode & stat.S_IXUSR
                mode = 0o755 if exe else 0o644
                if stat.S_IMODE(st.st_mode) != mode:
                    os.chmod(p, mode)
            except OSError:
                pass


# --------------------------------------------------------------------------------------------------
# Reading entry files: once, through a descriptor, never following links, never blocking
# --------------------------------------------------------------------------------------------------

_O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC | getattr(os, "O_PATH", 0)
_O_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | getattr(os, "O_NOCTTY", 0)
_KIND = {stat.S_IFIFO: "a FIFO", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
         stat.S_IFSOCK: "a socket", stat.S_IFDIR: "a directory", stat.S_IFLNK: "a symbolic link"}

_SHARED_HINT = ("ask the cache's owner to make it readable (`chmod -R go+rX`), or to build it readable by "
                "everyone (`FLASHINFER_JIT_CACHE_SHARED=1 python -m flashinfer prewarm ...`)")


def _unreadable(path: Path, what: str, e: OSError) -> str:
    if e.errno in (errno.EACCES, errno.EPERM):
        try:
            st = os.lstat(path)
            detail = f" (owned by {_owner_name(st.st_uid)}, mode {stat.S_IMODE(st.st_mode):04o}; this process " \
                     f"runs as {_owner_name(os.geteuid())})"
        except OSError:
            detail = ""
        return f"{what} {path} unreadable: permission denied{detail}; {_SHARED_HINT}"
    return f"{what} {path} unreadable ({e.strerror or e})"


def open_regular(name: str, dir_fd: Optional[int], path: Path, what: str, secure: bool
                 ) -> Tuple[Optional[int], str]:
    """Open ``name`` (relative to ``dir_fd``; ``path`` names it in messages) read-only without following a
    symbolic link and without blocking; (fd, "") for a regular file that passes the owner/mode check
    (``secure``), else (None, reason): "missing", "insecure: ..." (a link, FIFO, device...) or why it is
    unreadable."""
    try:
        fd = os.open(name, _O_FILE, dir_fd=dir_fd)
    except FileNotFoundError:
        return None, "missing"
    except OSError as e:
        if e.errno == errno.ELOOP:
            return None, f"insecure: {what} {path} is a symbolic link (entry files must be regular files)"
        return None, _unreadable(path, what, e)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = _KIND.get(stat.S_IFMT(st.st_mode), "not a regular file")
            raise _Refused(f"insecure: {what} {path} is {kind}, not a regular file")
        if secure:
            bad = insecure_reason(st, path, what)
            if bad:
                raise _Refused("insecure: " + bad)
    except _Refused as r:
        os.close(fd)
        return None, str(r)
    except OSError as e:
        os.close(fd)
        return None, _unreadable(path, what, e)
    return fd, ""


class _Refused(Exception):
    pass


def read_fd(fd: int, limit: Optional[int] = None) -> bytes:
    """All bytes from ``fd``'s current offset (ValueError past ``limit``)."""
    chunks = []
    total = 0
    while True:
        b = os.read(fd, 1 << 20)
        if not b:
            break
        total += len(b)
        if limit is not None and total > limit:
            raise ValueError(f"larger than {limit} bytes")
        chunks.append(b)
    return b"".join(chunks)


def sha256_fd(fd: int) -> str:
    h = hashlib.sha256()
    os.lseek(fd, 0, os.SEEK_SET)
    while True:
        b = os.read(fd, 1 << 20)
        if not b:
            break
        h.update(b)
    os.lseek(fd, 0, os.SEEK_SET)
    return h.hexdigest()


def sha256_file(path: Path) -> str:
    fd, reason = open_regular(os.fspath(path), None, Path(path), "file", secure=False)
    if fd is None:
        raise OSError(errno.EINVAL, reason, str(path))
    try:
        return sha256_fd(fd)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------------
# Manifests and validation
# --------------------------------------------------------------------------------------------------


def write_json_atomic(path: Path, data: Dict[str, Any]) -> None:
    """Write ``data`` to ``path`` atomically (temp file, fsync, rename; mode 0644). Any failure (disk
    full, permission, read-only file system) raises JITCacheError and leaves no temp file behind."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    text = json.dumps(data, indent=2, sort_keys=True, default=repr) + "\n"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            os.fchmod(fd, 0o644)  # whatever the umask: readable, writable by the owner only
            view = memoryview(text.encode())
            while view:
                n = os.write(fd, view)
                view = view[n:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise JITCacheError(
            f"writing {path} failed: {e.strerror or e} ({env.why_not_writable(path.parent, e)}); nothing was "
            f"published. Free space or fix the permissions of the JIT cache, then retry."
        ) from e


def _parse_manifest(data: bytes) -> Tuple[Optional[Dict[str, Any]], str]:
    try:
        man = json.loads(data)
    except ValueError as e:
        return None, f"manifest.json unreadable ({e.__class__.__name__}: {e})"
    if not isinstance(man, dict):
        return None, "manifest.json is not an object"
    return man, ""


OTHER_ENVIRONMENT = "built for another environment (archs, flags or versions)"


@dataclasses.dataclass
class VerifiedEntry:
    """An entry that passed verification, with open descriptors of its directory and library: load and
    read through them (:meth:`load_path`, :meth:`read_file`), so that a file swapped after the check is
    never used. :meth:`close` releases both; :meth:`take_lib_fd` hands the library's descriptor over."""

    key: str
    path: Path  # the entry dir
    so: Path  # the library's path (for messages; load through load_path())
    manifest: Dict[str, Any]
    dir_fd: int
    lib_fd: Optional[int]

    def load_path(self) -> str:
        """The library as a path that names the verified descriptor (``/proc/self/fd/N``)."""
        if self.lib_fd is not None and os.path.isdir("/proc/self/fd"):
            return f"/proc/self/fd/{self.lib_fd}"
        return str(self.so)  # pragma: no cover  (non-Linux: no /proc)

    def read_file(self, name: str, limit: Optional[int] = None) -> Optional[bytes]:
        """Bytes of another regular file of the entry (not following links; None if absent/unusable)."""
        fd, _ = open_regular(name, self.dir_fd, self.path / name, "entry file", secure=False)
        if fd is None:
            return None
        try:
            return read_fd(fd, limit)
        finally:
            os.close(fd)

    def take_lib_fd(self) -> int:
        fd, self.lib_fd = self.lib_fd, None
        assert fd is not None
        return fd

    def close(self) -> None:
        for attr in ("lib_fd", "dir_fd"):
            fd = getattr(self, attr)
            if fd is not None:
                setattr(self, attr, None)
                try:
                    os.close(fd)
                except OSError:
                    pass

    def __enter__(self) -> "VerifiedEntry":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def verify_entry_dir(edir: Path, key: str, secure: bool = True, select: Optional[str] = None
                     ) -> Tuple[Optional[VerifiedEntry], Optional[Dict[str, Any]], str]:
    """Verify ``edir`` as the entry of ``key``: (VerifiedEntry, manifest, "") or (None, manifest|None,
    reason). The dir is opened without following links, the manifest and library through it
    (:func:`open_regular`); ``secure`` adds the owner/mode checks; ``select``: also require the
    manifest's toolkit-free selector digest to be this one (reason :data:`OTHER_ENVIRONMENT` if not)."""
    try:
        dfd = os.open(edir, _O_DIR)
    except FileNotFoundError:
        return None, None, "not built"
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            try:
                if stat.S_ISLNK(os.lstat(edir).st_mode):
                    return None, None, f"insecure: JIT cache entry {edir} is a symbolic link (entries are plain directories)"
            except OSError:
                pass
            return None, None, f"JIT cache entry {edir} is not a directory"
        return None, None, _unreadable(edir, "JIT cache entry", e)
    ok = False
    try:
        if secure:
            bad = insecure_reason(os.fstat(dfd), edir, "JIT cache entry")
            if bad:
                return None, None, "insecure: " + bad
        mfd, reason = open_regular(MANIFEST, dfd, edir / MANIFEST, "JIT cache manifest", secure)
        if mfd is None:
            if reason == "missing":
                return None, None, "manifest.json missing (interrupted or foreign build)"
            return None, None, reason
        try:
            data = read_fd(mfd, MAX_MANIFEST_BYTES)
        except ValueError as e:
            return None, None, f"manifest.json unreadable ({e})"
        except OSError as e:
            return None, None, _unreadable(edir / MANIFEST, "JIT cache manifest", e)
        finally:
            os.close(mfd)
        man, reason = _parse_manifest(data)
        if man is None:
            return None, None, reason
        if man.get("key") != key:
            return None, man, f"manifest is for key {man.get('key')!r}, not {key!r}"
        if str(man.get("recipe")) != env.RECIPE_VERSION:
            return None, man, f"manifest recipe {man.get('recipe')!r} != {env.RECIPE_VERSION!r}"
        if select is not None and man.get("select") != select:
            return None, man, OTHER_ENVIRONMENT
        so_name = man.get("so")
        want = man.get("so_sha256")
        if not isinstance(so_name, str) or not isinstance(want, str) or "/" in so_name or so_name.startswith("."):
            return None, man, "manifest lacks so/so_sha256"
        so = edir / so_name
        lfd, reason = open_regular(so_name, dfd, so, "JIT cache library", secure)
        if lfd is None:
            if reason == "missing":
                return None, man, f"{so_name} unreadable (No such file or directory)"
            return None, man, reason
        try:
            got = sha256_fd(lfd)
        except OSError as e:
            os.close(lfd)
            return None, man, _unreadable(so, "JIT cache library", e)
        if got != want:
            os.close(lfd)
            return None, man, f"{so_name} sha256 mismatch (corrupted or replaced)"
        ok = True
        return VerifiedEntry(key, edir, so, man, dfd, lfd), man, ""
    finally:
        if not ok:
            os.close(dfd)


def validate_entry_dir(edir: Path, key: str, secure: bool = True) -> Tuple[Optional[Path], Optional[Dict[str, Any]], str]:
    """Validate the entry directory ``edir`` as the entry of ``key`` (see :func:`check_entry`)."""
    ent, man, reason = verify_entry_dir(edir, key, secure=secure)
    if ent is None:
        return None, man, reason
    ent.close()
    return ent.so, man, ""


def _insecure_error(key: str, reason: str) -> JITCacheInsecureError:
    return JITCacheInsecureError(
        f"refusing to load JIT cache entry {key}: {reason[len('insecure: '):]}; or remove the entry "
        f"(`python -m flashinfer cache clear --invalid --yes`) so that it is rebuilt."
    )


def open_entry(key: str, root: Optional[Path] = None, raise_insecure: bool = False
               ) -> Tuple[Optional[VerifiedEntry], Optional[Dict[str, Any]], str]:
    """Like :func:`check_entry`, but a valid entry comes back as a :class:`VerifiedEntry` holding open
    descriptors (the caller closes it)."""
    root = root or env.cache_root_path()
    bad_root = check_root_secure(root)
    if bad_root:
        if raise_insecure:
            raise JITCacheInsecureError(f"refusing to load from the JIT cache: {bad_root}.")
        return None, None, "insecure: " + bad_root
    ent, man, reason = verify_entry_dir(entry_dir(key, root), key, secure=True)
    if ent is None and raise_insecure and reason.startswith("insecure: "):
        raise _insecure_error(key, reason)
    return ent, man, reason


def check_entry(key: str, root: Optional[Path] = None, raise_insecure: bool = False
                ) -> Tuple[Optional[Path], Optional[Dict[str, Any]], str]:
    """Validate the entry of ``key``: (path of its .so, manifest, "") if loadable, else (None, manifest|None, reason).

    Loadable means: the cache root, the entry dir, manifest.json and the library are owned by a trusted
    user and not writable by group/others (see :func:`insecure_reason`); the entry dir, manifest and
    library are a real directory and regular files (never followed symbolic links, never a FIFO or
    device, which are refused without blocking); manifest.json parses, is for this key and this recipe,
    names a library whose sha256 matches. Never looks at timestamps and never writes. Cost: one stat of
    the root, fstat of the entry dir and of the two files it reads.

    A reason starting with ``"insecure: "`` means the entry must not be loaded *nor silently rebuilt*:
    with ``raise_insecure`` (the loader) that raises :class:`JITCacheInsecureError` instead.
    """
    ent, man, reason = open_entry(key, root, raise_insecure)
    if ent is None:
        return None, man, reason
    ent.close()
    return ent.so, man, ""


def _toolkit_major(v: Any) -> Optional[int]:
    try:
        return int(v) // 1000
    except (TypeError, ValueError):
        return None


def select_entry(spec, root: Optional[Path] = None, raise_insecure: bool = False
                 ) -> Tuple[Optional[VerifiedEntry], str]:
    """Find a valid entry for ``spec`` without the CUDA toolkit (FLASHINFER_DISABLE_JIT, or no toolkit
    on this host): among the entries named ``<spec.name()>-<digest>``, those whose manifest's "select"
    equals :func:`selector_digest` (same spec, sources, flags, archs, recipe, flashinfer, torch, torch
    CUDA; any toolkit). When several toolkits built one (a shared cache), the one whose toolkit major
    version is torch's CUDA major wins, then the newest toolkit, then the newest build.

    Returns (VerifiedEntry, "") or (None, reason). Costs one listdir of the root and one verification per
    candidate of that spec name (usually one)."""
    root = root or env.cache_root_path()
    bad_root = check_root_secure(root)
    if bad_root:
        if raise_insecure:
            raise JITCacheInsecureError(f"refusing to load from the JIT cache: {bad_root}.")
        return None, "insecure: " + bad_root
    prefix = spec.name() + "-"
    try:
        names = sorted(n for n in os.listdir(root) if n.startswith(prefix) and len(n) == len(prefix) + 16)
    except FileNotFoundError:
        return None, "not built"
    except OSError as e:
        return None, _unreadable(root, "JIT cache root", e)
    if not names:
        return None, "not built"
    want = selector_digest(spec)
    found: List[VerifiedEntry] = []
    problems: List[str] = []
    insecure: List[Tuple[str, str]] = []
    other = 0
    for key in names:
        ent, man, reason = verify_entry_dir(root / key, key, secure=True, select=want)
        if ent is not None:
            found.append(ent)
        elif reason == OTHER_ENVIRONMENT:
            other += 1
        elif reason.startswith("insecure: "):
            insecure.append((key, reason))
        elif man is None or man.get("select") == want:  # unreadable, or ours but broken
            problems.append(f"{key}: {reason}")
        else:
            other += 1
    if not found:
        if insecure and raise_insecure:
            raise _insecure_error(*insecure[0])
        parts = problems + [f"{k}: {r}" for k, r in insecure]
        if other:
            parts.append(f"{other} entr{'y' if other == 1 else 'ies'} of {spec.name()} built for another "
                         f"environment (target archs, flags, flashinfer/torch versions)")
        return None, "; ".join(parts) or "not built"
    import torch

    try:
        torch_major: Optional[int] = int(str(torch.version.cuda).split(".")[0])
    except ValueError:
        torch_major = None

    def rank(e: VerifiedEntry):
        v = (e.manifest.get("versions") or {}).get("cuda_toolkit")
        created = e.manifest.get("created")
        return (_toolkit_major(v) == torch_major, v if isinstance(v, int) else -1,
                created if isinstance(created, (int, float)) else 0.0, e.key)

    found.sort(key=rank)
    best = found.pop()
    for e in found:
        e.close()
    return best, ""


# --------------------------------------------------------------------------------------------------
# Listing and clearing (CLI)
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class EntryInfo:
    key: str
    spec: Optional[Dict[str, Any]]  # spec json from the manifest (None when unreadable)
    size: int  # bytes on disk
    build_seconds: Optional[float]
    created: Optional[float]  # unix time
    valid: bool
    reason: str  # "" when valid
    path: str = ""
    log_path: Optional[str] = None
    current: Optional[bool] = None  # does this environment compute the same key for the spec? None: unknown
    versions: Optional[Dict[str, Any]] = None  # the manifest's versions (recipe, flashinfer, torch, CUDA)
    templates_sha256: Optional[str] = None  # digest of templates/ the entry was built from (manifest)

    @property
    def name(self) -> str:
        return self.key.rsplit("-", 1)[0]


def _dir_size(path: Path) -> int:
    total = 0
    for dirpath, _, filenames in os.walk(path):
        for fn in filenames:
            try:
                total += os.lstat(os.path.join(dirpath, fn)).st_size
            except OSError:
                pass
    return total


def entry_info(key: str, root: Optional[Path] = None, check_current: bool = True) -> EntryInfo:
    root = root or env.cache_root_path()
    edir = entry_dir(key, root)
    so, man, reason = check_entry(key, root)
    created = None
    if man is not None and isinstance(man.get("created"), (int, float)):
        created = float(man["created"])
    else:
        try:
            created = os.lstat(edir).st_mtime
        except OSError:
            pass
    spec_json = man.get("spec") if man is not None and isinstance(man.get("spec"), dict) else None
    current = None
    if check_current and spec_json is not None:
        from .errors import CUDAToolkitNotFoundError
        from .spec import Spec

        try:
            spec = Spec.from_json(spec_json)
            try:
                current = cache_key(spec) == key
            except CUDAToolkitNotFoundError:  # no toolkit here: would a load select it?
                current = man.get("select") == selector_digest(spec)
        except Exception:
            current = None
    lp = man.get("log_path") if man is not None else None
    if lp is None and os.path.lexists(log_path(key, root)):
        lp = str(log_path(key, root))
    return EntryInfo(
        key=key,
        spec=spec_json,
        size=_dir_size(edir),
        build_seconds=(float(man["build_seconds"]) if man is not None and isinstance(man.get("build_seconds"), (int, float)) else None),
        created=created,
        valid=so is not None,
        reason=reason,
        path=str(edir),
        log_path=lp,
        current=current,
        versions=(man.get("versions") if man is not None and isinstance(man.get("versions"), dict) else None),
        templates_sha256=(man.get("templates_sha256") if man is not None else None),
    )


def list_entries(root: Optional[Path] = None, check_current: bool = True) -> List[EntryInfo]:
    """Every entry dir under the cache root (valid or not), sorted by key."""
    root = root or env.cache_root_path()
    try:
        names = sorted(os.listdir(root))
    except FileNotFoundError:
        return []
    except OSError as e:
        raise JITCacheError(f"cannot list the JIT cache: {_unreadable(root, 'JIT cache root', e)}") from e
    out = []
    for name in names:
        if name in RESERVED or name.startswith("."):
            continue
        if not (root / name).is_dir():
            continue
        out.append(entry_info(name, root, check_current=check_current))
    return out


def clear_cache(predicate: Optional[Callable[[EntryInfo], bool]] = None, root: Optional[Path] = None) -> int:
    """Remove entries for which ``predicate(EntryInfo)`` is true (all when None); returns how many.

    Each removal holds the entry's lock, so a build publishing that key is not cut in half. Also removes
    the logs of removed entries and leftover temp dirs of dead builds (all temp dirs of dead builds
    when predicate is None).
    """
    root = root or env.cache_root_path()
    if not root.is_dir():
        return 0
    env.ensure_dir(root)
    removed = 0
    for info in list_entries(root, check_current=predicate is not None):
        if predicate is not None and not predicate(info):
            continue
        with file_lock(info.key, root):
            discard_dir(entry_dir(info.key, root), root)
            try:
                log_path(info.key, root).unlink()
            except OSError:
                pass
        removed += 1
    cleanup_tmp(root)
    return removed


# --------------------------------------------------------------------------------------------------
# Pruning
# --------------------------------------------------------------------------------------------------

# The version fields a manifest records (env.versions()): an entry built under different ones can never
# be loaded by this installation (they are part of every key).
PRUNE_FIELDS = ("recipe", "flashinfer", "torch", "torch_cuda", "cuda_toolkit")


def prune_reason(info: EntryInfo, current_versions: Optional[Dict[str, Any]] = None) -> Optional[str]:
    """Why ``cache prune`` removes this entry, or None to keep it.

    Removed: entries built for another recipe / flashinfer / torch / torch CUDA / toolkit version or
    from other kernel sources (templates/ digest; never loadable by this installation), entries whose family is no longer known, and entries that fail
    verification (corrupted, interrupted, insecure: they would be rebuilt anyway). Kept: valid entries of
    this installation, including those for other target archs or flags (a shared cache may serve
    several GPU types), and those whose spec this environment cannot judge.
    """
    cur = current_versions if current_versions is not None else env.versions()
    if info.versions is not None:
        diff = [f"{k} {info.versions.get(k)!r} != {cur.get(k)!r}" for k in PRUNE_FIELDS
                if k in info.versions and str(info.versions.get(k)) != str(cur.get(k))]
        if diff:
            return "built for another version: " + ", ".join(diff)
    if isinstance(info.templates_sha256, str) and info.templates_sha256 != templates_digest():
        return "built from other kernel sources (templates/ changed since)"
    if info.spec is not None:
        from .spec import spec_families

        fam = info.spec.get("family")
        if fam not in spec_families():
            return f"unknown spec family {fam!r}"
    if not info.valid:
        return f"invalid: {info.reason}"
    return None


def prune_cache(root: Optional[Path] = None, dry_run: bool = False) -> List[Tuple[EntryInfo, str]]:
    """Remove the entries :func:`prune_reason` names (each under its key's lock); returns [(entry, reason)]."""
    root = root or env.cache_root_path()
    bad_root = check_root_secure(root)
    if bad_root:  # every entry would look invalid: fix the root first rather than delete the lot
        raise JITCacheInsecureError(f"not pruning: {bad_root}")
    cur = env.versions()
    victims = []
    for info in list_entries(root, check_current=False):
        why = prune_reason(info, cur)
        if why:
            victims.append((info, why))
    if victims and not dry_run:
        keys = {i.key for i, _ in victims}
        clear_cache(lambda e: e.key in keys, root)
    return victims
