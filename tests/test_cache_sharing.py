"""CPU tests of caches shared between users, containers and read-only images (issue 10, items 3-10):
temp-dir liveness across PID namespaces, loading without a CUDA toolkit, read-only and shared caches,
symbolic links and FIFOs in entries, disk-full failures, archive import caps, strict environment parsing.

Real probe builds (a few seconds each) where a build is the point; everything else works on copies of
one golden build. Tests may run as root: where a permission failure is the point, they run the reader in
a child process as uid 65534 (nobody) when root, and make the cache read-only (chmod a-w) otherwise.
"""

from __future__ import annotations

import errno
import functools
import io
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import pytest

from flashinfer import jit
from flashinfer.jit import archive
from flashinfer.jit import cache as jcache
from flashinfer.jit import env as jenv
from flashinfer.jit import loader as jloader
from flashinfer.jit.probe import ProbeSpec

REPO = Path(__file__).resolve().parents[1]
_SWITCHES = ("FLASHINFER_DISABLE_JIT", "FLASHINFER_JIT_VERBOSE", "FLASHINFER_JIT_LOCK_TIMEOUT",
             "FLASHINFER_JIT_CACHE_SHARED", "FLASHINFER_JIT_CACHE_TRUSTED_OWNERS", "FLASHINFER_NVCC_THREADS",
             "FLASHINFER_JIT_IMPORT_MAX_FILE_BYTES", "FLASHINFER_JIT_IMPORT_MAX_TOTAL_BYTES", "FLASHINFER_JIT_RECORD")


@pytest.fixture(autouse=True)
def _jit_env(tmp_path, monkeypatch):
    monkeypatch.setenv("FLASHINFER_JIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    for var in _SWITCHES:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(jenv, "_cuda_home_memo", {})
    jloader._forget()
    yield
    jloader._forget()


def _build_in(root: Path, spec, shared: bool = False):
    """Build ``spec`` into ``root`` in this process (environment restored afterwards)."""
    old = os.environ.get("FLASHINFER_JIT_CACHE")
    os.environ["FLASHINFER_JIT_CACHE"] = str(root)
    try:
        return jit.ensure_built(spec, shared=shared)
    finally:
        if old is None:
            os.environ.pop("FLASHINFER_JIT_CACHE", None)
        else:
            os.environ["FLASHINFER_JIT_CACHE"] = old


@pytest.fixture(scope="module")
def golden(tmp_path_factory):
    """A private cache holding a real build of ProbeSpec() (tests copy it)."""
    root = tmp_path_factory.mktemp("golden") / "cache"
    old = os.environ.get("TORCH_CUDA_ARCH_LIST")
    os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"
    try:
        rep = _build_in(root, ProbeSpec())
    finally:
        if old is None:
            os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = old
    assert rep.status == "built"
    return root, rep.key


@pytest.fixture
def cache_copy(golden, tmp_path, monkeypatch):
    root, key = golden
    dst = tmp_path / "copy"
    shutil.copytree(root, dst, symlinks=True)
    monkeypatch.setenv("FLASHINFER_JIT_CACHE", str(dst))
    return dst, key


def _lib(root: Path, key: str) -> Path:
    return root / key / jcache.lib_name(key)


def _hide_toolkit(monkeypatch, tmp_path) -> Path:
    """No toolkit anywhere: CUDA_HOME unset, no nvcc on PATH, no /usr/local/cuda; cuda.h must not be read."""
    empty = tmp_path / "no_toolkit"
    empty.mkdir(exist_ok=True)
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.setattr(jenv, "DEFAULT_CUDA_HOME", empty / "cuda")
    monkeypatch.setattr(jenv, "_cuda_version_of", lambda home: pytest.fail(f"read cuda.h of {home}"))
    return empty


# --------------------------------------------------------------------------------------------------
# 3. temp cleanup decides liveness by the builder's lock, never by a pid
# --------------------------------------------------------------------------------------------------


LOCK_FILE = ".builder.lock"  # jcache.BUILDER_LOCK, spelled out: the name is a protocol between versions
_HOST = __import__("socket").gethostname().replace(".", "_") or "host"


def _invisible_pid() -> int:
    """A pid no process in this namespace can have (above pid_max): what another container's pid looks like."""
    try:
        return int(Path("/proc/sys/kernel/pid_max").read_text()) + 12345
    except OSError:
        return 4_194_304 + 12345


def test_cleanup_keeps_live_build_of_a_pid_not_visible_here(tmp_path):
    root = tmp_path / "shared_cache"
    host = _HOST  # same hostname: two containers started from one image
    d = jcache.tmp_root(root) / f"probe_f32_c1-0123456789abcdef.{host}.{_invisible_pid()}.abcd0123"
    (d / "sub").mkdir(parents=True)
    (d / "sub" / "probe.cuda.o").write_text("x")
    (d / LOCK_FILE).write_text("")
    # The other container's builder: a separate process holding the lock.
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import fcntl, os, sys, time\n"
         f"fd = os.open({str(d / LOCK_FILE)!r}, os.O_RDWR)\n"
         "fcntl.flock(fd, fcntl.LOCK_EX)\nprint('locked', flush=True)\ntime.sleep(120)\n"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert jit.cleanup_tmp(root) == 0
        assert (d / "sub" / "probe.cuda.o").exists()  # its pid is invisible here, but it lives
    finally:
        holder.kill()
        holder.wait()
    assert jit.cleanup_tmp(root) == 1  # the lock died with its holder
    assert not d.exists()


def test_cleanup_without_lock_file_goes_by_age(tmp_path):
    root = tmp_path / "c"
    host = _HOST
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    fresh = jcache.tmp_root(root) / f"k-0123456789abcdef.{host}.{dead.pid}.aaaa0000"
    old = jcache.tmp_root(root) / f"k-0123456789abcdef.otherhost.{_invisible_pid()}.bbbb0000"
    trash = jcache.tmp_root(root) / f"trash-k-0123456789abcdef.{host}.{dead.pid}.cccc0000"
    for d in (fresh, old, trash):
        (d / "x").mkdir(parents=True)
    two_days = time.time() - 2 * 86400
    os.utime(old, (two_days, two_days))
    # A dir without lock file (being created or published right now, or from another version) stays
    # while fresh, whatever its pid; old ones and trash go.
    assert jit.cleanup_tmp(root) == 2
    assert fresh.exists() and not old.exists() and not trash.exists()


def test_own_build_dir_is_locked_while_building(tmp_path):
    root = tmp_path / "c"
    d = jcache.new_tmp_dir("probe_f32_c1-0123456789abcdef", root)
    try:
        assert (d / jcache.BUILDER_LOCK).is_file()
        assert jit.cleanup_tmp(root, max_age_s=0) == 0 and d.exists()  # live even when "old"
    finally:
        jcache.release_tmp_dir(d, remove=False)
    assert not (d / jcache.BUILDER_LOCK).exists()  # publishing drops the lock file with the lock
    jcache.release_tmp_dir(d, remove=True)


# --------------------------------------------------------------------------------------------------
# 4. a prewarmed or imported cache loads without a CUDA toolkit
# --------------------------------------------------------------------------------------------------


def test_prewarmed_cache_loads_in_a_process_without_toolkit(cache_copy, tmp_path):
    """A fresh process with CUDA_HOME at an empty dir, no nvcc on PATH and FLASHINFER_DISABLE_JIT=1."""
    root, key = cache_copy
    empty = tmp_path / "empty_cuda"
    empty.mkdir()
    code = (
        "import json, os\n"
        "from flashinfer import jit\n"
        "from flashinfer.jit import env\n"
        "env._cuda_version_of = lambda home: (_ for _ in ()).throw(AssertionError('read cuda.h'))\n"
        "m = jit.load(jit.ProbeSpec())\n"
        "print(json.dumps({'status': m.status, 'key': m.key, 'c': m.fn('flashinfer_probe_constant')(),\n"
        "                  'cuda_home': os.environ.get('CUDA_HOME')}))\n"
    )
    envv = {k: v for k, v in os.environ.items() if k not in ("CUDA_PATH",)}
    envv.update(FLASHINFER_JIT_CACHE=str(root), CUDA_HOME=str(empty), FLASHINFER_DISABLE_JIT="1",
                PATH=os.path.dirname(sys.executable), PYTHONPATH=str(REPO), TORCH_CUDA_ARCH_LIST="9.0")
    r = subprocess.run([sys.executable, "-c", code], env=envv, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert r.returncode == 0, r.stdout + r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out == {"status": "cached", "key": key, "c": 1.0, "cuda_home": str(empty)}


def test_no_toolkit_with_jit_enabled_loads_cached_and_explains_a_miss(cache_copy, tmp_path, monkeypatch):
    root, key = cache_copy
    _hide_toolkit(monkeypatch, tmp_path)
    m = jit.load(ProbeSpec())
    assert m.status == "cached" and m.key == key and m.fn("flashinfer_probe_constant")() == 1.0
    with pytest.raises(jit.CUDAToolkitNotFoundError) as ei:
        jit.load(ProbeSpec(constant=7))
    msg = str(ei.value)
    assert "probe_f32_c7" in msg and "not in the JIT cache" in msg and "CUDA toolkit not found" in msg


def test_toolkit_free_selection_ranks_and_refuses_other_environments(cache_copy, tmp_path, monkeypatch):
    root, key = cache_copy
    # The same spec built by an older toolkit (another key), and newer: torch's CUDA major wins.
    import torch

    major = int(torch.version.cuda.split(".")[0])
    for digest, tk, created in (("00000000000000aa", (major - 1) * 1000 + 800, 2e9),
                                ("00000000000000bb", major * 1000 + 900, 1e9)):
        k2 = f"{ProbeSpec().name()}-{digest}"
        shutil.copytree(root / key, root / k2)
        os.rename(root / k2 / jcache.lib_name(key), root / k2 / jcache.lib_name(k2))
        man = json.loads((root / k2 / jcache.MANIFEST).read_text())
        man.update(key=k2, so=jcache.lib_name(k2), created=created)
        man["versions"]["cuda_toolkit"] = tk
        jcache.write_json_atomic(root / k2 / jcache.MANIFEST, man)
    monkeypatch.setenv("FLASHINFER_DISABLE_JIT", "1")
    m = jit.load(ProbeSpec())
    assert m.key == f"{ProbeSpec().name()}-00000000000000bb"  # same major as torch, newest toolkit
    # Other target archs: never selected; the error says so.
    jloader._forget()
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0")
    with pytest.raises(jit.JITDisabledError, match="built for another environment"):
        jit.load(ProbeSpec())


# --------------------------------------------------------------------------------------------------
# 5. read-only caches and caches shared with other users
# --------------------------------------------------------------------------------------------------


def _modes(root: Path):
    return {str(p.relative_to(root)): stat.S_IMODE(p.lstat().st_mode) for p in [root, *root.rglob("*")]}


@pytest.fixture(scope="module")
def shared_root(tmp_path_factory):
    """A cache built with shared=True in a directory every user can reach (not under pytest's 0700 tmp)."""
    base = Path(tempfile.mkdtemp(prefix="fi_shared_"))
    os.chmod(base, 0o755)
    old = os.environ.get("TORCH_CUDA_ARCH_LIST")
    os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"
    try:
        rep = _build_in(base / "cache", ProbeSpec(), shared=True)
    finally:
        if old is None:
            os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = old
    yield base, rep.key
    subprocess.run(["chmod", "-R", "u+w", str(base)], check=False)
    shutil.rmtree(base, ignore_errors=True)


def test_shared_build_is_readable_by_everyone_and_writable_by_nobody_else(shared_root):
    base, key = shared_root
    root = base / "cache"
    modes = _modes(root)
    assert modes["."] == 0o755 and modes[key] == 0o755 and modes["logs"] == 0o755
    assert modes[f"{key}/{jcache.MANIFEST}"] == 0o644 and modes[f"{key}/{jcache.lib_name(key)}"] == 0o755
    assert modes[f"logs/{key}.log"] == 0o644 and modes[f"{key}/build.log"] == 0o644
    assert not any(m & 0o022 for m in modes.values()), modes
    assert json.loads((root / key / jcache.MANIFEST).read_text())["shared"] is True


def test_private_build_by_default(golden):
    root, key = golden
    assert stat.S_IMODE(root.stat().st_mode) == 0o700


_READER = r"""
import json, os, sys, io, contextlib
from flashinfer import cli, jit
from flashinfer.jit.probe import ProbeSpec
out = {}
def run(name, *argv):
    o, e = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(o), contextlib.redirect_stderr(e):
        rc = cli.main(list(argv))
    out[name] = {"rc": rc, "out": o.getvalue(), "err": e.getvalue()}
run("list", "cache", "list")
run("verify", "cache", "verify")
run("export", "cache", "export", os.path.join(sys.argv[1], "x.tar.gz"))
run("prewarm", "prewarm", "--families", "probe", "--axis", "constant=1", "--axis", "dtype=f32", "--jobs", "1")
m = jit.load(ProbeSpec())
out["load"] = [m.status, m.fn("flashinfer_probe_constant")()]
try:
    jit.load(ProbeSpec(constant=5))
    out["miss"] = "loaded?!"
except Exception as e:
    out["miss"] = f"{type(e).__name__}: {e}"
os.environ["FLASHINFER_DISABLE_JIT"] = "1"
from flashinfer.jit import loader
loader._forget()
out["load_disabled"] = jit.load(ProbeSpec()).status
print(json.dumps(out))
"""


@functools.lru_cache(maxsize=None)
def _other_user_can_run_python() -> bool:
    """Root, and uid 65534 can run this interpreter and import this checkout's flashinfer.jit."""
    if os.geteuid() != 0:
        return False
    envv = {k: v for k, v in os.environ.items() if not k.startswith("FLASHINFER_")}
    envv.update(PYTHONPATH=str(REPO), HOME="/tmp", PYTHONDONTWRITEBYTECODE="1")
    try:
        r = subprocess.run([sys.executable, "-c", "import flashinfer.jit"], user=65534, group=65534,
                           extra_groups=[], env=envv, capture_output=True, timeout=120, cwd="/", check=False)
    except OSError:
        return False
    return r.returncode == 0


def _can_mount_read_only() -> bool:
    if os.geteuid() != 0 or not shutil.which("unshare"):
        return False
    r = subprocess.run(["unshare", "-m", "sh", "-c", "mount --bind -o ro / /mnt 2>/dev/null || exit 1"],
                       capture_output=True, timeout=60)
    return r.returncode == 0


def _reader_mode() -> str:
    """How to make the cache unwritable for the reader: another user (root-owned 0755 cache), a read-only
    bind mount (root, where that user cannot run this interpreter), or chmod a-w (not root)."""
    if os.geteuid() != 0:
        return "chmod"
    if _other_user_can_run_python():
        return "other_user"
    if _can_mount_read_only():
        return "ro_mount"
    pytest.skip("root, but neither another user can run this interpreter nor a read-only mount is possible")


def _run_reader(root: Path, scratch: Path, mode: str):
    envv = {k: v for k, v in os.environ.items() if not k.startswith("FLASHINFER_")}
    envv.update(FLASHINFER_JIT_CACHE=str(root), PYTHONPATH=str(REPO), TORCH_CUDA_ARCH_LIST="9.0",
                HOME=str(scratch), PYTHONDONTWRITEBYTECODE="1",
                CUDA_HOME=os.environ.get("CUDA_HOME", "/usr/local/cuda"))
    argv = [sys.executable, "-c", _READER, str(scratch)]
    kw = {}
    if mode == "other_user":
        kw = dict(user=65534, group=65534, extra_groups=[])
    elif mode == "ro_mount":
        import shlex

        argv = ["unshare", "-m", "sh", "-c",
                f"mount --bind {shlex.quote(str(root))} {shlex.quote(str(root))} && "
                f"mount -o remount,bind,ro {shlex.quote(str(root))} && exec " + " ".join(map(shlex.quote, argv))]
    r = subprocess.run(argv, env=envv, capture_output=True, text=True, timeout=300, cwd=str(scratch), **kw)
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_read_only_commands_work_on_a_cache_this_user_cannot_write(shared_root):
    """A root-owned 0755 cache read by another user, a read-only mount, or a cache made read-only: list,
    verify, export, an all-cached prewarm and loads work and write nothing; a miss says why."""
    base, key = shared_root
    root = base / "cache"
    mode = _reader_mode()
    scratch = Path(tempfile.mkdtemp(prefix="fi_reader_"))
    os.chmod(scratch, 0o777)
    if mode == "chmod":
        subprocess.run(["chmod", "-R", "a-w", str(root)], check=True)
    before = {p: (p.lstat().st_mtime_ns, p.lstat().st_mode) for p in [root, *root.rglob("*")]}
    try:
        out = _run_reader(root, scratch, mode)
    finally:
        if mode == "chmod":
            subprocess.run(["chmod", "-R", "u+w", str(root)], check=True)
    after = {p: (p.lstat().st_mtime_ns, p.lstat().st_mode) for p in [root, *root.rglob("*")]}
    shutil.rmtree(scratch, ignore_errors=True)
    for name in ("list", "verify", "export", "prewarm"):
        assert out[name]["rc"] == 0, (mode, name, out[name])
        assert "not writable" not in out[name]["out"] + out[name]["err"]
    assert key.rsplit("-", 1)[1] in out["list"]["out"] and "1 of 1 entries valid" in out["verify"]["out"]
    assert "exported 1 entries" in out["export"]["out"] and "already cached" in out["prewarm"]["out"]
    assert out["load"] == ["cached", 1.0] and out["load_disabled"] == "cached"
    why = "read-only file system" if mode == "ro_mount" else "permission denied"
    assert out["miss"].startswith("JITCacheError") and why in out["miss"].lower(), (mode, out["miss"])
    assert after == before  # nothing written, not even a lock or log


def test_unreadable_entry_says_permission_denied(cache_copy, monkeypatch):
    """What another user sees in a private (0700) cache: the reason names the cause and the fix."""
    root, key = cache_copy
    real_open = os.open

    def deny_entry_dir(path, flags, *a, **k):
        if str(path) == str(root / key):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_open(path, flags, *a, **k)

    monkeypatch.setattr(os, "open", deny_entry_dir)
    so, _, reason = jcache.check_entry(key, root)
    assert so is None and "permission denied" in reason and "chmod -R go+rX" in reason
    assert "FLASHINFER_JIT_CACHE_SHARED=1" in reason


@pytest.mark.skipif(not _other_user_can_run_python(), reason="needs root and an interpreter another user can run")
def test_private_root_cache_read_by_another_user_says_permission_denied(golden, tmp_path):
    root, key = golden
    base = Path(tempfile.mkdtemp(prefix="fi_private_"))
    os.chmod(base, 0o755)
    try:
        shutil.copytree(root, base / "cache", symlinks=True)
        os.chmod(base / "cache", 0o755)  # the root is listable, the entry (0700, root's) is not
        os.chmod(base / "cache" / key, 0o700)
        code = ("from flashinfer import cli; import sys; sys.exit(cli.main(['cache', 'verify']))")
        envv = {k: v for k, v in os.environ.items() if not k.startswith("FLASHINFER_")}
        envv.update(FLASHINFER_JIT_CACHE=str(base / "cache"), PYTHONPATH=str(REPO), HOME=str(base),
                    PYTHONDONTWRITEBYTECODE="1")
        r = subprocess.run([sys.executable, "-c", code], env=envv, capture_output=True, text=True, timeout=300,
                           cwd=str(base), user=65534, group=65534, extra_groups=[])
        assert r.returncode == 1, r.stdout + r.stderr
        assert "permission denied" in r.stdout and "FLASHINFER_JIT_CACHE_SHARED=1" in r.stdout
        assert "not writable" not in r.stdout + r.stderr
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_unwritable_cache_error_says_why(tmp_path, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    monkeypatch.setattr(os, "access", lambda p, mode: False)  # as root nothing is unwritable: pretend
    with pytest.raises(jit.JITCacheError) as ei:
        jenv.ensure_dir(ro)
    msg = str(ei.value)
    assert "cannot write" in msg and "permission denied" in msg and str(ro) in msg and "mode 0755" in msg
    assert jenv.ensure_dir(ro, writable=False) == ro  # reading needs no write access
    assert jenv.why_not_writable(ro, OSError(errno.EROFS, "Read-only file system")) == "read-only file system"


# --------------------------------------------------------------------------------------------------
# 6. symbolic links in place of the manifest or library; loading exactly what was checked
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("what", ["library", "manifest"])
def test_symlinked_library_or_manifest_is_refused(cache_copy, tmp_path, what):
    root, key = cache_copy
    target = _lib(root, key) if what == "library" else root / key / jcache.MANIFEST
    real = tmp_path / f"elsewhere_{target.name}"
    shutil.copy2(target, real)  # same bytes, same (trusted) owner: only the link is wrong
    target.unlink()
    target.symlink_to(real)
    so, _, reason = jcache.check_entry(key, root)
    assert so is None and reason.startswith("insecure: ") and "symbolic link" in reason and str(target) in reason
    with pytest.raises(jit.JITCacheInsecureError, match="symbolic link"):
        jit.load(ProbeSpec())
    assert target.is_symlink()  # refused, not silently rebuilt


def _foreign_library() -> str:
    for line in Path("/proc/self/maps").read_text().splitlines():
        path = line.split()[-1]
        if "/libm.so" in path or "/libm-" in path:
            return path
    pytest.skip("no libm mapped to stand in for foreign code")


def test_library_swapped_after_the_check_is_not_loaded(cache_copy, monkeypatch):
    """The path is replaced by other code between verification and dlopen: the verified file is loaded."""
    root, key = cache_copy
    so = _lib(root, key)
    foreign = _foreign_library()
    real_ensure = jloader._ensure

    def ensure_then_swap(*a, **k):
        result = real_ensure(*a, **k)
        swap = so.with_name(".swap")
        shutil.copy(foreign, swap)
        os.replace(swap, so)
        return result

    monkeypatch.setattr(jloader, "_ensure", ensure_then_swap)
    m = jit.load(ProbeSpec())
    assert m.fn("flashinfer_probe_constant")() == 1.0  # our code, not libm
    fd = int(m.lib._name.rsplit("/", 1)[1])
    assert m.lib._name == f"/proc/self/fd/{fd}" and os.fstat(fd).st_nlink == 0  # the replaced inode
    assert fd in jloader._lib_fds


def test_loaded_descriptors_are_distinct_per_module(golden, tmp_path, monkeypatch):
    """glibc keys loaded libraries by path string: each module keeps its /proc/self/fd/N open, so a later
    module never gets N (and with it the earlier module's handle)."""
    root, key = golden
    roots = []
    for i in range(2):
        dst = tmp_path / f"c{i}"
        shutil.copytree(root, dst)
        roots.append(dst)
    names = []
    for dst in roots:
        monkeypatch.setenv("FLASHINFER_JIT_CACHE", str(dst))
        jloader._forget()
        m = jit.load(ProbeSpec())
        names.append(m.lib._name)
    assert names[0] != names[1]


# --------------------------------------------------------------------------------------------------
# 7. a FIFO (or device) in place of the manifest or library never blocks
# --------------------------------------------------------------------------------------------------


class _Hung(Exception):
    pass


@pytest.fixture
def alarm():
    def on_alarm(signum, frame):
        raise _Hung("blocked on a FIFO")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(30)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


@pytest.mark.parametrize("what", ["library", "manifest"])
def test_fifo_in_place_of_an_entry_file_never_blocks(cache_copy, alarm, capsys, what):
    root, key = cache_copy
    target = _lib(root, key) if what == "library" else root / key / jcache.MANIFEST
    target.unlink()
    os.mkfifo(target, 0o600)
    so, _, reason = jcache.check_entry(key, root)
    assert so is None and "FIFO" in reason and str(target) in reason
    with pytest.raises(jit.JITCacheInsecureError, match="FIFO"):
        jit.load(ProbeSpec())
    from flashinfer import cli

    assert cli.main(["cache", "verify"]) == 1
    assert "FIFO" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------------
# 8. disk full and other failures: clear errors, nothing left behind
# --------------------------------------------------------------------------------------------------


def _enospc(*a, **k):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_manifest_write_failure_is_a_cache_error_without_temp_file(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "fsync", _enospc)
    with pytest.raises(jit.JITCacheError, match="No space left on device") as ei:
        jcache.write_json_atomic(tmp_path / "manifest.json", {"a": 1})
    assert str(tmp_path / "manifest.json") in str(ei.value)
    assert list(tmp_path.iterdir()) == []


def test_build_with_disk_full_at_the_manifest_publishes_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "fsync", _enospc)
    s = ProbeSpec(constant=11)
    with pytest.raises(jit.JITCacheError, match="No space left on device"):
        jit.load(s)
    root = Path(os.environ["FLASHINFER_JIT_CACHE"])
    assert not (root / jit.cache_key(s)).exists()
    assert [p.name for p in (root / "tmp").iterdir() if not p.name.startswith("trash-")] == []
    monkeypatch.undo()
    monkeypatch.setenv("FLASHINFER_JIT_CACHE", str(root))
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    assert jit.load(s).status == "built"  # nothing half-written stands in the way


def test_link_error_quotes_the_linker_not_collect2(tmp_path, monkeypatch):
    monkeypatch.setattr(jenv, "BASE_LINK_FLAGS", jenv.BASE_LINK_FLAGS + ("-lflashinfer_no_such_lib_xyz",))
    with pytest.raises(jit.JITBuildError) as ei:
        jit.load(ProbeSpec(constant=12))
    e = ei.value
    assert "cannot find -lflashinfer_no_such_lib_xyz" in e.first_error, e.first_error
    assert e.first_error in str(e) and "collect2" not in e.first_error
    root = Path(os.environ["FLASHINFER_JIT_CACHE"])
    assert [p.name for p in (root / "tmp").iterdir()] == []


@pytest.mark.parametrize("log,want", [
    ("[2/2] c++ x.o -shared -o x.so\n/usr/bin/ld: cannot find -lc10_cuda: No such file or directory\n"
     "collect2: error: ld returned 1 exit status\nninja: build stopped: subcommand failed.\n",
     "/usr/bin/ld: cannot find -lc10_cuda: No such file or directory"),
    ("/usr/bin/ld: final link failed: No space left on device\ncollect2: error: ld returned 1 exit status\n",
     "/usr/bin/ld: final link failed: No space left on device"),
    ("FAILED: x.cuda.o\nnvcc fatal   : Could not write file: No space left on device\n",
     "nvcc fatal   : Could not write file: No space left on device"),
    ("x.o: In function `f':\nx.cu:(.text+0x1): undefined reference to `g'\ncollect2: error: ld returned 1 exit status\n",
     "x.cu:(.text+0x1): undefined reference to `g'"),
    ("ninja: build stopped: subcommand failed.\ncollect2: error: ld returned 1 exit status\n",
     "collect2: error: ld returned 1 exit status"),
    ("x.cu(5): error: identifier \"y\" is undefined\n/usr/bin/ld: cannot find -lfoo\n",
     'x.cu(5): error: identifier "y" is undefined'),
])
def test_first_error_line_is_the_meaningful_one(log, want):
    assert jit.first_error_line(log) == want


# --------------------------------------------------------------------------------------------------
# 9. archive import: only listed files, per-file and total caps
# --------------------------------------------------------------------------------------------------


def _export(root: Path, tmp_path: Path) -> Path:
    arc = tmp_path / "export.tar"
    archive.export_cache(arc, root=root)
    return arc


def _repack(src: Path, dst: Path, extra: dict) -> None:
    """Copy ``src`` into ``dst`` (gzip when .gz) adding members {name: size of zeros}."""
    with tarfile.open(src) as s, tarfile.open(dst, "w:gz" if dst.name.endswith(".gz") else "w") as d:
        for m in s.getmembers():
            d.addfile(m, s.extractfile(m) if m.isfile() else None)
        for name, size in extra.items():
            ti = tarfile.TarInfo(name)
            ti.size = size
            d.addfile(ti, _Zeros(size))


class _Zeros(io.RawIOBase):
    def __init__(self, n: int) -> None:
        self.left = n

    def readinto(self, b) -> int:
        k = min(len(b), self.left)
        b[:k] = bytes(k)
        self.left -= k
        return k

    def readable(self) -> bool:
        return True


def test_import_takes_only_files_the_manifest_lists(cache_copy, tmp_path):
    root, key = cache_copy
    arc = tmp_path / "with_payload.tar.gz"
    _repack(_export(root, tmp_path), arc, {f"{key}/payload.bin": 32 << 20})  # 32 MiB of zeros, ~32 KiB gzipped
    assert arc.stat().st_size < 1 << 20
    dst = tmp_path / "b"
    rep = archive.import_cache(arc, dst)
    assert not (dst / key / "payload.bin").exists()
    assert rep.imported == [key] and rep.skipped_files == [f"{key}/payload.bin"]
    assert sorted(p.name for p in (dst / key).iterdir()) == sorted(
        ["build.log", jcache.MANIFEST, jcache.lib_name(key), "probe.cu"])
    assert jcache.check_entry(key, dst)[0] is not None


def test_import_per_file_cap_refuses_before_writing(cache_copy, tmp_path, monkeypatch):
    root, key = cache_copy
    arc = tmp_path / "big.tar.gz"
    _repack(_export(root, tmp_path), arc, {f"{key}/payload.bin": 8 << 20})
    dst = tmp_path / "b"
    with pytest.raises(archive.ArchiveError, match="per-file cap of 1048576 bytes.*FLASHINFER_JIT_IMPORT_MAX_FILE_BYTES"):
        archive.import_cache(arc, dst, max_file_bytes=1 << 20)
    monkeypatch.setenv("FLASHINFER_JIT_IMPORT_MAX_FILE_BYTES", "1M")
    with pytest.raises(archive.ArchiveError, match="per-file cap"):
        archive.import_cache(arc, dst)
    assert not dst.exists()


def _sparse_tar(path: Path, members: dict) -> None:
    """A plain tar whose members' data are holes (members of GiBs cost no disk and no time)."""
    with open(path, "wb") as f:
        for name, size in members.items():
            ti = tarfile.TarInfo(name)
            ti.size = size
            f.write(ti.tobuf(tarfile.GNU_FORMAT))
            f.seek((size + 511) // 512 * 512, os.SEEK_CUR)
        f.write(b"\0" * 1024)


def test_import_refuses_huge_member_and_total_cheaply(tmp_path):
    key = "probe_f32_c1-0123456789abcdef"
    huge = tmp_path / "huge.tar"
    _sparse_tar(huge, {f"{key}/{jcache.MANIFEST}": 100, f"{key}/lib.so": 3 << 30})
    t0 = time.perf_counter()
    with pytest.raises(archive.ArchiveError, match="per-file cap of 268435456 bytes"):
        archive.import_cache(huge, tmp_path / "b")  # default cap: 256 MiB
    many = tmp_path / "many.tar"
    _sparse_tar(many, {f"{key}/{jcache.MANIFEST}": 100, f"{key}/a.cu": 200 << 20, f"{key}/b.cu": 200 << 20})
    with pytest.raises(archive.ArchiveError, match="total cap of 314572800 bytes"):
        archive.import_cache(many, tmp_path / "b", max_total_bytes=300 << 20)
    assert time.perf_counter() - t0 < 10 and not (tmp_path / "b").exists()


# --------------------------------------------------------------------------------------------------
# 10. strict environment parsing
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["abc", "-1", "inf", "nan", "-inf", "1e400", "10s"])
def test_lock_timeout_rejects_bad_values(monkeypatch, value):
    monkeypatch.setenv("FLASHINFER_JIT_LOCK_TIMEOUT", value)
    with pytest.raises(ValueError) as ei:
        jenv.lock_timeout()
    assert type(ei.value).__name__ == "JITEnvironmentError"
    msg = str(ei.value)
    assert "FLASHINFER_JIT_LOCK_TIMEOUT" in msg and repr(value) in msg and "finite number of seconds >= 0" in msg


def test_lock_timeout_accepts_seconds(monkeypatch):
    assert jenv.lock_timeout() == 600.0
    for text, want in (("2.5", 2.5), (" 0 ", 0.0), ("", 600.0), ("1e3", 1000.0)):
        monkeypatch.setenv("FLASHINFER_JIT_LOCK_TIMEOUT", text)
        assert jenv.lock_timeout() == want


def test_lock_timeout_error_reaches_the_loader(monkeypatch):
    monkeypatch.setenv("FLASHINFER_JIT_LOCK_TIMEOUT", "abc")
    monkeypatch.setattr(jloader, "build_into", lambda *a, **k: pytest.fail("waited/built with a bad timeout"))
    with pytest.raises(ValueError, match="FLASHINFER_JIT_LOCK_TIMEOUT"):
        jit.ensure_built(ProbeSpec(constant=13))


@pytest.mark.parametrize("name", ["FLASHINFER_DISABLE_JIT", "FLASHINFER_JIT_VERBOSE", "FLASHINFER_JIT_CACHE_SHARED"])
def test_boolean_variables_are_strict(monkeypatch, name):
    read = getattr(jenv, {"FLASHINFER_DISABLE_JIT": "jit_disabled", "FLASHINFER_JIT_VERBOSE": "jit_verbose",
                          "FLASHINFER_JIT_CACHE_SHARED": "shared_cache"}[name])
    for text, want in (("1", True), ("TRUE", True), ("Yes", True), ("on", True), ("0", False), ("false", False),
                       ("NO", False), ("Off", False), ("", False)):
        monkeypatch.setenv(name, text)
        assert read() is want, text
    for text in ("2", "enable", "y", "disabled", "-1"):
        monkeypatch.setenv(name, text)
        with pytest.raises(ValueError) as ei:
            read()
        assert type(ei.value).__name__ == "JITEnvironmentError"
        assert name in str(ei.value) and repr(text) in str(ei.value) and "0/false/no/off" in str(ei.value)


def test_bad_disable_jit_never_silently_builds(monkeypatch):
    monkeypatch.setenv("FLASHINFER_DISABLE_JIT", "2")
    monkeypatch.setattr(jloader, "build_into", lambda *a, **k: pytest.fail("built with FLASHINFER_DISABLE_JIT=2"))
    with pytest.raises(ValueError, match="FLASHINFER_DISABLE_JIT='2'"):
        jit.load(ProbeSpec(constant=14))


def test_cuda_home_at_an_empty_dir_is_an_error_not_a_fallback(tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("CUDA_HOME", str(empty))
    with pytest.raises(jit.CUDAToolkitNotFoundError) as ei:
        jit.find_cuda_home()  # /usr/local/cuda and nvcc on PATH exist here: no silent fallback to them
    msg = str(ei.value)
    assert f"CUDA_HOME={str(empty)!r}" in msg and "bin/nvcc" in msg and "include/cuda.h" in msg
    assert os.environ["CUDA_HOME"] == str(empty)
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "missing"))
    with pytest.raises(jit.CUDAToolkitNotFoundError, match="does not exist"):
        jit.find_cuda_home()
    with pytest.raises(jit.CUDAToolkitNotFoundError, match="CUDA_HOME="):
        jit.ensure_built(ProbeSpec(constant=15))


def test_toolkit_lookup_never_writes_the_environment(monkeypatch):
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    before = dict(os.environ)
    home = jit.find_cuda_home()
    assert (home / "bin" / "nvcc").is_file()
    assert dict(os.environ) == before


@pytest.mark.parametrize("name,value,accepted", [
    ("FLASHINFER_NVCC_THREADS", "x", "an integer >= 0"),
    ("FLASHINFER_NVCC_THREADS", "-2", "an integer >= 0"),
    ("FLASHINFER_JIT_IMPORT_MAX_FILE_BYTES", "lots", "a positive size in bytes"),
    ("FLASHINFER_JIT_IMPORT_MAX_TOTAL_BYTES", "0", "a positive size in bytes"),
    ("FLASHINFER_JIT_CACHE_TRUSTED_OWNERS", "no_such_user_xyz", "user names or numeric uids"),
])
def test_other_variables_are_strict(monkeypatch, name, value, accepted):
    read = {"FLASHINFER_NVCC_THREADS": lambda: jenv.nvcc_threads(),
            "FLASHINFER_JIT_IMPORT_MAX_FILE_BYTES": lambda: jenv.import_max_file_bytes(),
            "FLASHINFER_JIT_IMPORT_MAX_TOTAL_BYTES": lambda: jenv.import_max_total_bytes(),
            "FLASHINFER_JIT_CACHE_TRUSTED_OWNERS": lambda: jcache.trusted_uids()}[name]
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError) as ei:
        read()
    assert type(ei.value).__name__ == "JITEnvironmentError"
    assert name in str(ei.value) and accepted in str(ei.value)


def test_sizes_parse_with_binary_units():
    assert [jenv.parse_bytes(t) for t in ("4096", "512K", "256M", "16G", "1T", "2GiB", "3mb")] == \
        [4096, 512 << 10, 256 << 20, 16 << 30, 1 << 40, 2 << 30, 3 << 20]
    assert [jenv.parse_bytes(t) for t in ("", "0", "-1", "1.5G", "12Q")] == [None] * 5
