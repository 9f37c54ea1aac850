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
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from . import env
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
        "render_vars": spec.render_vars(),
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


def lock_path(key: str, root: Optional[Path] = None) -> Path:
    return (root or env.cache_root_path()) / "locks" / f"{key}.lock"


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
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True, default=repr)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_manifest(edir: Path) -> Tuple[Optional[Dict[str, Any]], str]:
    """(manifest, "") or (None, reason)."""
    try:
        with open(edir / MANIFEST, "rb") as f:
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


def check_entry(key: str, root: Optional[Path] = None) -> Tuple[Optional[Path], Optional[Dict[str, Any]], str]:
    """Validate the entry of ``key``: (path of its .so, manifest, "") if loadable, else (None, manifest|None, reason).

    Loadable means: manifest.json parses, is for this key and this recipe, names a .so that exists and
    whose sha256 matches. Never looks at timestamps.
    """
    edir = entry_dir(key, root)
    man, reason = read_manifest(edir)
    if man is None:
        return None, None, reason
    if man.get("key") != key:
        return None, man, f"manifest is for key {man.get('key')!r}, not {key!r}"
    if str(man.get("recipe")) != env.RECIPE_VERSION:
        return None, man, f"manifest recipe {man.get('recipe')!r} != {env.RECIPE_VERSION!r}"
    so_name = man.get("so")
    want = man.get("so_sha256")
    if not isinstance(so_name, str) or not isinstance(want, str) or "/" in so_name:
        return None, man, "manifest lacks so/so_sha256"
    so = edir / so_name
    try:
        got = sha256_file(so)
    except OSError as e:
        return None, man, f"{so_name} unreadable ({e.strerror or e})"
    if got != want:
        return None, man, f"{so_name} sha256 mismatch (corrupted or replaced)"
    return so, man, ""


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
    from .loader import _file_lock  # local import: loader imports cache

    root = root or env.cache_root_path()
    if not root.is_dir():
        return 0
    env.ensure_dir(root)
    removed = 0
    for info in list_entries(root, check_current=predicate is not None):
        if predicate is not None and not predicate(info):
            continue
        with _file_lock(info.key, root):
            discard_dir(entry_dir(info.key, root), root)
            try:
                log_path(info.key, root).unlink()
            except OSError:
                pass
        removed += 1
    cleanup_tmp(root)
    return removed
