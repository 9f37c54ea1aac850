"""The on-disk cache: keys, entries, manifests, verification, listing and clearing.

Layout under the cache root::

    <root>/<key>/            one published entry: rendered sources, build.ninja and objects (from
                             torch.utils.cpp_extension.load), lib<ident>.so, build.log,
                             manifest.json (written last; an entry without a valid one is never loaded)
    <root>/tmp/<key>.<host>.<pid>.<rand>/   private build dirs (renamed to <root>/<key> when complete)
    <root>/locks/<key>.lock  per-key file locks
    <root>/logs/<key>.log    full compiler log of the latest build of <key>
"""

from __future__ import annotations

import dataclasses
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
from .errors import JITCacheInsecureError
from .locks import file_lock, lock_path  # noqa: F401 (lock_path: part of the cache layout API)
from .templating import templates_digest

MANIFEST = "manifest.json"
RESERVED = {"tmp", "locks", "logs"}
TMP_MAX_AGE_S = 24 * 3600


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


def cache_key(spec) -> str:
    """``<spec.name()>-<16 hex digest>``."""
    blob = json.dumps(key_inputs(spec), sort_keys=True, default=repr, separators=(",", ":"))
    return f"{spec.name()}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"


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


def new_tmp_dir(key: str, root: Path) -> Path:
    """Create a private build dir ``tmp/<key>.<host>.<pid>.<rand>``."""
    host = socket.gethostname().replace(".", "_") or "host"
    d = tmp_root(root) / f"{key}.{host}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    d.mkdir(mode=0o700, parents=True)
    return d


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cleanup_tmp(root: Optional[Path] = None, max_age_s: float = TMP_MAX_AGE_S) -> int:
    """Remove leftover temp dirs: those of dead processes on this host, and any older than a day."""
    troot = tmp_root(root)
    try:
        names = os.listdir(troot)
    except OSError:
        return 0
    host = socket.gethostname().replace(".", "_") or "host"
    now = time.time()
    removed = 0
    for name in names:
        path = troot / name
        parts = name.rsplit(".", 3)
        dead = False
        if len(parts) == 4 and parts[1] == host and parts[2].isdigit():
            pid = int(parts[2])
            dead = pid != os.getpid() and not _pid_alive(pid)
        try:
            old = now - path.lstat().st_mtime > max_age_s
        except OSError:
            continue
        if dead or old:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                try:
                    path.unlink()
                except OSError:
                    pass
            removed += 1
    return removed


def discard_dir(path: Path, root: Path) -> None:
    """Remove a directory: first move it out of the way atomically (into tmp/), then delete it."""
    if not path.exists():
        return
    trash = tmp_root(root) / f"trash-{path.name}.{socket.gethostname().replace('.', '_') or 'host'}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    try:
        trash.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.rename(path, trash)
    except OSError:
        trash = path
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
# The check reads mode bits and owners (one stat per item, fstat on files we open anyway), so it holds
# for root too, where a permission failure never happens.

TRUSTED_OWNERS_ENV = "FLASHINFER_JIT_CACHE_TRUSTED_OWNERS"
_WRITE_OTHERS = stat.S_IWGRP | stat.S_IWOTH


def trusted_uids() -> frozenset:
    """{euid, 0} plus FLASHINFER_JIT_CACHE_TRUSTED_OWNERS (uids or user names; unknown names are an error)."""
    text = os.environ.get(TRUSTED_OWNERS_ENV, "")
    memo = _trusted_memo.get(text)
    if memo is not None and memo[0] == os.geteuid():
        return memo[1]
    uids = {os.geteuid(), 0}
    for tok in text.replace(";", ",").split(","):
        tok = tok.strip()
        if not tok:
            continue
        if tok.isdigit():
            uids.add(int(tok))
            continue
        try:
            import pwd

            uids.add(pwd.getpwnam(tok).pw_uid)
        except (KeyError, ImportError):
            raise JITCacheInsecureError(
                f"{TRUSTED_OWNERS_ENV}={text!r}: unknown user {tok!r} (give user names or numeric uids)"
            ) from None
    out = frozenset(uids)
    _trusted_memo[text] = (os.geteuid(), out)
    return out


_trusted_memo: Dict[str, Tuple[int, frozenset]] = {}


def _owner_name(uid: int) -> str:
    try:
        import pwd

        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except (KeyError, ImportError):
        return f"uid {uid}"


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


# --------------------------------------------------------------------------------------------------
# Manifests and validation
# --------------------------------------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            chunk = f.read(1 << 20)
            if not chunk:
                break
            h.update(chunk)
    return h.hexdigest()


def write_json_atomic(path: Path, data: Dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    os.fchmod(fd, 0o644)  # whatever the umask: readable, writable by the owner only
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True, default=repr)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_manifest(edir: Path, secure: bool = False) -> Tuple[Optional[Dict[str, Any]], str]:
    """(manifest, "") or (None, reason). ``secure``: also check the manifest's owner and mode (fstat)."""
    try:
        with open(edir / MANIFEST, "rb") as f:
            if secure:
                bad = insecure_reason(os.fstat(f.fileno()), edir / MANIFEST, "JIT cache manifest")
                if bad:
                    return None, "insecure: " + bad
            data = json.loads(f.read())
    except FileNotFoundError:
        if not edir.exists():
            return None, "not built"
        return None, "manifest.json missing (interrupted or foreign build)"
    except (OSError, ValueError) as e:
        return None, f"manifest.json unreadable ({e.__class__.__name__}: {e})"
    if not isinstance(data, dict):
        return None, "manifest.json is not an object"
    return data, ""


def validate_entry_dir(edir: Path, key: str, secure: bool = True) -> Tuple[Optional[Path], Optional[Dict[str, Any]], str]:
    """Validate the entry directory ``edir`` as the entry of ``key`` (see :func:`check_entry`)."""
    if secure:
        try:
            st = os.lstat(edir)
        except FileNotFoundError:
            return None, None, "not built"
        except OSError as e:
            return None, None, f"entry dir unreadable ({e.strerror or e})"
        if stat.S_ISLNK(st.st_mode):
            return None, None, f"insecure: JIT cache entry {edir} is a symbolic link (entries are plain directories)"
        bad = insecure_reason(st, edir, "JIT cache entry")
        if bad:
            return None, None, "insecure: " + bad
    man, reason = read_manifest(edir, secure=secure)
    if man is None:
        return None, None, reason
    if man.get("key") != key:
        return None, man, f"manifest is for key {man.get('key')!r}, not {key!r}"
    if str(man.get("recipe")) != env.RECIPE_VERSION:
        return None, man, f"manifest recipe {man.get('recipe')!r} != {env.RECIPE_VERSION!r}"
    so_name = man.get("so")
    want = man.get("so_sha256")
    if not isinstance(so_name, str) or not isinstance(want, str) or "/" in so_name or so_name.startswith("."):
        return None, man, "manifest lacks so/so_sha256"
    so = edir / so_name
    h = hashlib.sha256()
    try:
        with open(so, "rb") as f:
            if secure:
                fst = os.fstat(f.fileno())
                if not stat.S_ISREG(fst.st_mode):
                    return None, man, f"insecure: {so} is not a regular file"
                bad = insecure_reason(fst, so, "JIT cache library")
                if bad:
                    return None, man, "insecure: " + bad
            while True:
                chunk = f.read(1 << 20)
                if not chunk:
                    break
                h.update(chunk)
    except OSError as e:
        return None, man, f"{so_name} unreadable ({e.strerror or e})"
    if h.hexdigest() != want:
        return None, man, f"{so_name} sha256 mismatch (corrupted or replaced)"
    return so, man, ""


def check_entry(key: str, root: Optional[Path] = None, raise_insecure: bool = False
                ) -> Tuple[Optional[Path], Optional[Dict[str, Any]], str]:
    """Validate the entry of ``key``: (path of its .so, manifest, "") if loadable, else (None, manifest|None, reason).

    Loadable means: the cache root, the entry dir, manifest.json and the library are owned by a trusted
    user and not writable by group/others (see :func:`insecure_reason`); manifest.json parses, is for
    this key and this recipe, names a .so that exists and whose sha256 matches. Never looks at
    timestamps. Cost: one stat of the root, one of the entry dir, fstat of the two files it reads.

    A reason starting with ``"insecure: "`` means the entry must not be loaded *nor silently rebuilt*:
    with ``raise_insecure`` (the loader) that raises :class:`JITCacheInsecureError` instead.
    """
    root = root or env.cache_root_path()
    bad_root = check_root_secure(root)
    if bad_root:
        if raise_insecure:
            raise JITCacheInsecureError(f"refusing to load from the JIT cache: {bad_root}.")
        return None, None, "insecure: " + bad_root
    so, man, reason = validate_entry_dir(entry_dir(key, root), key, secure=True)
    if so is None and raise_insecure and reason.startswith("insecure: "):
        raise JITCacheInsecureError(
            f"refusing to load JIT cache entry {key}: {reason[len('insecure: '):]}; or remove the entry "
            f"(`python -m flashinfer cache clear --invalid --yes`) so that it is rebuilt."
        )
    return so, man, reason


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
            created = edir.stat().st_mtime
        except OSError:
            pass
    spec_json = man.get("spec") if man is not None and isinstance(man.get("spec"), dict) else None
    current = None
    if check_current and spec_json is not None:
        try:
            from .spec import Spec

            current = cache_key(Spec.from_json(spec_json)) == key
        except Exception:
            current = None
    lp = man.get("log_path") if man is not None else None
    if lp is None and log_path(key, root).exists():
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
    except OSError:
        return []
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
