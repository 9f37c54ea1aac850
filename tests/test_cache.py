"""CPU tests of the cache's security checks, prune, and export/import (tiny real probe modules).

Tests may run as root, where chmod never causes a permission failure: the checks read mode bits and
owners, so the tests set mode bits (and, as root, chown to a foreign uid) rather than expect EACCES.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from flashinfer import jit
from flashinfer.jit import archive
from flashinfer.jit import cache as jcache
from flashinfer.jit import loader
from flashinfer.jit.probe import ProbeSpec

REPO = Path(__file__).resolve().parents[1]
SPECS = [ProbeSpec(constant=1, dtype="f32"), ProbeSpec(constant=2, dtype="f32")]


@pytest.fixture(scope="module")
def cache_a(tmp_path_factory):
    """Cache A: the two probe specs, prewarmed once by the real CLI (two worker processes)."""
    root = tmp_path_factory.mktemp("cache_a") / "cache"
    env = dict(os.environ, FLASHINFER_JIT_CACHE=str(root), TORCH_CUDA_ARCH_LIST="9.0",
               CUDA_HOME=os.environ.get("CUDA_HOME", "/usr/local/cuda"))
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-m", "flashinfer", "prewarm", "--preset", "probe", "--axis", "dtype=f32",
                        "--jobs", "2"], env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert r.returncode == 0, r.stdout + r.stderr
    return root


@pytest.fixture
def env_a(cache_a, tmp_path, monkeypatch):
    """A private copy of cache A as this process's cache (tests may damage it)."""
    root = tmp_path / "a"
    shutil.copytree(cache_a, root, symlinks=True)
    monkeypatch.setenv("FLASHINFER_JIT_CACHE", str(root))
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    monkeypatch.delenv("FLASHINFER_JIT_CACHE_TRUSTED_OWNERS", raising=False)
    loader._forget()
    yield root
    loader._forget()


def _key(spec):
    return jit.cache_key(spec)


def _cli(*argv):
    from flashinfer import cli

    return cli.main(list(argv))


# ------------------------------------------------------------------ security


def test_new_cache_dirs_are_private(tmp_path, monkeypatch):
    monkeypatch.setenv("FLASHINFER_JIT_CACHE", str(tmp_path / "new" / "cache"))
    old = os.umask(0o002)  # a permissive umask must not leak group write into the cache
    try:
        root = jit.cache_root()
    finally:
        os.umask(old)
    assert stat.S_IMODE(root.stat().st_mode) == 0o700


def test_built_entry_files_not_writable_by_others(env_a):
    for spec in SPECS:
        edir = env_a / _key(spec)
        for p in (edir, edir / jcache.lib_name(_key(spec)), edir / jcache.MANIFEST):
            assert not p.stat().st_mode & 0o022, p


def test_world_writable_root_is_refused(env_a, capsys):
    os.chmod(env_a, 0o777)
    with pytest.raises(jit.JITCacheInsecureError) as ei:
        jit.load(SPECS[0])
    msg = str(ei.value)
    assert str(env_a) in msg and "writable by group and others" in msg and "chmod" in msg and "FLASHINFER_JIT_CACHE" in msg
    # group-writable alone is refused too
    os.chmod(env_a, 0o770)
    with pytest.raises(jit.JITCacheInsecureError, match="writable by group"):
        jit.load(SPECS[0])
    # the CLI refuses to prune it, with the same message and no traceback
    assert _cli("cache", "prune") == 1
    assert "writable by group" in capsys.readouterr().err
    os.chmod(env_a, 0o700)
    assert jit.load(SPECS[0]).status == "cached"


@pytest.mark.parametrize("what", ["so", "manifest", "entry_dir"])
def test_entry_writable_by_others_is_refused_not_rebuilt(env_a, what):
    key = _key(SPECS[0])
    edir = env_a / key
    target = {"so": edir / jcache.lib_name(key), "manifest": edir / jcache.MANIFEST, "entry_dir": edir}[what]
    os.chmod(target, stat.S_IMODE(target.stat().st_mode) | stat.S_IWOTH)
    before = (edir / jcache.lib_name(key)).stat().st_mtime_ns
    with pytest.raises(jit.JITCacheInsecureError) as ei:
        jit.load(SPECS[0])
    assert str(target) in str(ei.value) and "chmod" in str(ei.value)
    assert (edir / jcache.lib_name(key)).stat().st_mtime_ns == before  # nothing rebuilt behind our back
    info = next(e for e in jit.list_entries() if e.key == key)
    assert not info.valid and info.reason.startswith("insecure: ")
    # the other entry is unaffected; clearing invalid entries removes the bad one, which then rebuilds
    assert jit.load(SPECS[1]).status == "cached"
    assert _cli("cache", "clear", "--invalid", "--yes") == 0
    assert jit.load(SPECS[0]).status == "built"


def test_tampered_library_is_rebuilt(env_a):
    key = _key(SPECS[0])
    so = env_a / key / jcache.lib_name(key)
    data = bytearray(so.read_bytes())
    data[100] ^= 0xFF
    so.write_bytes(bytes(data))
    assert "sha256 mismatch" in jcache.check_entry(key)[2]
    m = jit.load(SPECS[0])
    assert m.status == "built" and m.fn("flashinfer_probe_constant")() == 1.0


def test_tampered_library_with_jit_disabled_raises(env_a, monkeypatch):
    key = _key(SPECS[0])
    so = env_a / key / jcache.lib_name(key)
    so.write_bytes(so.read_bytes() + b"x")
    monkeypatch.setenv("FLASHINFER_DISABLE_JIT", "1")
    with pytest.raises(jit.JITDisabledError, match="sha256 mismatch"):
        jit.load(SPECS[0])


def test_foreign_owner_is_refused_unless_trusted(env_a, monkeypatch):
    key = _key(SPECS[0])
    so = env_a / key / jcache.lib_name(key)
    if os.geteuid() == 0:
        os.chown(so, 4242, -1)  # as root: really hand the library to another uid
        foreign = 4242
    else:  # not root: pretend to be someone else; our files are then foreign (and not root's)
        foreign = os.geteuid()
        real = os.geteuid()
        monkeypatch.setattr(os, "geteuid", lambda: real + 10000)
    with pytest.raises(jit.JITCacheInsecureError) as ei:
        jit.load(SPECS[0])
    assert f"uid {foreign}" in str(ei.value) and "chown" in str(ei.value) and jcache.TRUSTED_OWNERS_ENV in str(ei.value)
    monkeypatch.setenv(jcache.TRUSTED_OWNERS_ENV, f"{foreign}")
    assert jit.load(SPECS[0]).status == "cached"


def test_trusted_owners_env_parsing(monkeypatch):
    monkeypatch.setenv(jcache.TRUSTED_OWNERS_ENV, "root, 1234")
    assert {0, 1234, os.geteuid()} <= jcache.trusted_uids()
    monkeypatch.setenv(jcache.TRUSTED_OWNERS_ENV, "no_such_user_xyz")
    with pytest.raises(jit.JITEnvironmentError, match="unknown user"):  # fail closed, naming the variable
        jcache.trusted_uids()


def test_warm_path_does_one_stat_per_item(env_a, monkeypatch):
    """The warm check: stat(root), then fstat of the descriptors it opens anyway (entry dir, manifest,
    library: opened once, without following links, and checked on the descriptor)."""
    key = _key(SPECS[0])
    calls = []
    for name in ("stat", "lstat", "fstat"):
        real = getattr(os, name)
        monkeypatch.setattr(os, name, (lambda real, name: lambda *a, **k: (calls.append(name), real(*a, **k))[1])(real, name))
    so, man, reason = jcache.check_entry(key, env_a)
    assert so is not None, reason
    assert sorted(calls) == ["fstat", "fstat", "fstat", "stat"], calls


# ------------------------------------------------------------------ prune


def test_prune_removes_other_versions_and_invalid_keeps_current(env_a, capsys):
    k1, k2 = _key(SPECS[0]), _key(SPECS[1])
    # an entry built by another torch: rewrite its manifest's versions (the key stays, as it would)
    m = json.loads((env_a / k1 / jcache.MANIFEST).read_text())
    m["versions"]["torch"] = "1.0.0"
    jcache.write_json_atomic(env_a / k1 / jcache.MANIFEST, m)
    # a leftover without manifest (interrupted foreign build)
    junk = env_a / "probe_f32_c9-0123456789abcdef"
    junk.mkdir(mode=0o700)
    assert _cli("cache", "prune", "--dry-run") == 0
    out = capsys.readouterr().out
    assert f"would remove {k1}: built for another version: torch '1.0.0'" in out
    assert "probe_f32_c9-0123456789abcdef: invalid" in out and k2 not in out
    assert (env_a / k1).exists()
    assert _cli("cache", "prune") == 0
    assert "removed 2 entries" in capsys.readouterr().out
    assert sorted(e.key for e in jit.list_entries()) == [k2]


# ------------------------------------------------------------------ export / import


def test_export_import_round_trip_loads_without_building(env_a, tmp_path, monkeypatch, capsys):
    arc = tmp_path / "warm.tar.gz"
    assert _cli("cache", "export", str(arc), "--family", "probe") == 0
    assert "exported 2 entries" in capsys.readouterr().out
    with tarfile.open(arc) as t:
        names = t.getnames()
    assert archive.INDEX in names and all(f"{_key(s)}/manifest.json" in names for s in SPECS)
    assert not any(n.endswith(".o") or "build.ninja" in n for n in names)

    b = tmp_path / "b"
    monkeypatch.setenv("FLASHINFER_JIT_CACHE", str(b))
    assert _cli("cache", "import", str(arc)) == 0
    out = capsys.readouterr().out
    assert "imported 2, already present 0, refused 0" in out
    assert stat.S_IMODE(b.stat().st_mode) == 0o700
    assert not list((b / "tmp").iterdir())
    # B is usable with JIT disabled: nothing is (or could be) built
    monkeypatch.setenv("FLASHINFER_DISABLE_JIT", "1")
    loader._forget()
    for spec in SPECS:
        m = jit.load(spec)
        assert m.status == "cached" and m.entry_dir.parent == b
        assert m.fn("flashinfer_probe_constant")() == float(spec.constant)
    # importing again keeps the valid entries (never overwrites them)
    before = (b / _key(SPECS[0]) / jcache.MANIFEST).read_bytes()
    assert _cli("cache", "import", str(arc)) == 0
    assert "imported 0, already present 2" in capsys.readouterr().out
    assert (b / _key(SPECS[0]) / jcache.MANIFEST).read_bytes() == before
    assert _cli("cache", "verify") == 0


def test_import_replaces_invalid_entry_and_refuses_bad_one(env_a, tmp_path, monkeypatch, capsys):
    arc = tmp_path / "x.tar"
    archive.export_cache(arc)
    # Re-pack with entry 1's library corrupted: that entry is refused, entry 2 imported.
    k1, k2 = _key(SPECS[0]), _key(SPECS[1])
    bad = tmp_path / "bad.tar"
    with tarfile.open(arc) as src, tarfile.open(bad, "w") as dst:
        for m in src.getmembers():
            data = src.extractfile(m).read() if m.isfile() else None
            if m.name == f"{k1}/{jcache.lib_name(k1)}":
                data = data[:-1] + bytes([data[-1] ^ 1])
            dst.addfile(m, io.BytesIO(data) if data is not None else None)
    b = tmp_path / "b"
    monkeypatch.setenv("FLASHINFER_JIT_CACHE", str(b))
    # B already holds an invalid (manifest-less) dir for k2: import replaces it
    (b / k2).mkdir(parents=True, mode=0o700)
    os.chmod(b, 0o700)
    assert _cli("cache", "import", str(bad)) == 1
    out = capsys.readouterr().out
    assert f"REFUSED  {k1}: " in out and "sha256 mismatch" in out
    assert f"imported {k2} (replaced an invalid entry)" in out
    assert not (b / k1).exists() and jcache.check_entry(k2, b)[0] is not None


def _evil_archive(path: Path, kind: str) -> None:
    with tarfile.open(path, "w") as t:
        ti = tarfile.TarInfo("probe_f32_c1-0123456789abcdef")
        ti.type = tarfile.DIRTYPE
        t.addfile(ti)
        if kind == "dotdot":
            data = b"pwned"
            ti = tarfile.TarInfo("probe_f32_c1-0123456789abcdef/../../x")
            ti.size = len(data)
            t.addfile(ti, io.BytesIO(data))
        elif kind == "absolute":
            ti = tarfile.TarInfo("/tmp/flashinfer_evil_x")
            ti.size = 1
            t.addfile(ti, io.BytesIO(b"x"))
        elif kind == "symlink":
            ti = tarfile.TarInfo("probe_f32_c1-0123456789abcdef/libx.so")
            ti.type = tarfile.SYMTYPE
            ti.linkname = "/etc/passwd"
            t.addfile(ti)
        elif kind == "hardlink":
            ti = tarfile.TarInfo("probe_f32_c1-0123456789abcdef/libx.so")
            ti.type = tarfile.LNKTYPE
            ti.linkname = "/etc/passwd"
            t.addfile(ti)
        elif kind == "device":
            ti = tarfile.TarInfo("probe_f32_c1-0123456789abcdef/null")
            ti.type = tarfile.CHRTYPE
            ti.devmajor, ti.devminor = 1, 3
            t.addfile(ti)
        elif kind == "nested":
            ti = tarfile.TarInfo("probe_f32_c1-0123456789abcdef/sub/x.so")
            ti.size = 1
            t.addfile(ti, io.BytesIO(b"x"))


@pytest.mark.parametrize("kind,match", [("dotdot", "path traversal"), ("absolute", "absolute"),
                                        ("symlink", "symbolic link"), ("hardlink", "hard link"),
                                        ("device", "not a regular file"), ("nested", "not <key>/")])
def test_import_refuses_unsafe_archives(tmp_path, monkeypatch, capsys, kind, match):
    arc = tmp_path / "evil.tar"
    _evil_archive(arc, kind)
    b = tmp_path / "b"
    monkeypatch.setenv("FLASHINFER_JIT_CACHE", str(b))
    with pytest.raises(archive.ArchiveError, match=match):
        archive.import_cache(arc, b)
    assert _cli("cache", "import", str(arc)) == 1
    err = capsys.readouterr().err
    assert "ArchiveError" in err and "refusing the whole archive" in err or "not <key>/" in err
    assert not (tmp_path / "x").exists() and not Path("/tmp/flashinfer_evil_x").exists()
    assert not b.exists() or not [p for p in b.iterdir() if p.name not in jcache.RESERVED]


def test_import_refuses_into_insecure_root(env_a, tmp_path, monkeypatch):
    arc = tmp_path / "x.tar"
    archive.export_cache(arc)
    b = tmp_path / "b"
    b.mkdir(mode=0o700)
    os.chmod(b, 0o777)
    with pytest.raises(jit.JITCacheInsecureError):
        archive.import_cache(arc, b)
