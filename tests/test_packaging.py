"""Packaging: pyproject lists every package, and a real (non-editable) install ships the templates as
flashinfer/_templates/, where the engine finds them when not running from a checkout."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

try:
    import tomllib  # Python >= 3.11
except ModuleNotFoundError:
    tomllib = pytest.importorskip("tomli")  # the test extra installs it on older Pythons


def _pyproject():
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def test_pyproject_lists_every_package_dir():
    listed = set(_pyproject()["tool"]["setuptools"]["packages"])
    on_disk = {
        ".".join(p.relative_to(REPO).parts)
        for p in (REPO / "flashinfer").rglob("*")
        if p.is_dir() and p.name != "__pycache__" and any(p.glob("*.py"))
    } | {"flashinfer"}
    missing = on_disk - listed
    assert not missing, f"add {sorted(missing)} to [tool.setuptools] packages in pyproject.toml"
    assert "flashinfer._templates" in listed
    assert _pyproject()["tool"]["setuptools"]["package-dir"]["flashinfer._templates"] == "templates"


def test_pyproject_metadata():
    data = _pyproject()
    proj = data["project"]
    assert proj["name"] == "flashinfer" and "version" in proj["dynamic"]
    assert data["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "flashinfer._version.__version__"}
    deps = {d.split()[0].split("=")[0].split(">")[0].split("<")[0].lower() for d in proj["dependencies"]}
    # numpy: torch warns "Failed to initialize NumPy" on every import without it.
    assert deps == {"torch", "jinja2", "ninja", "filelock", "numpy"}
    extras = proj["optional-dependencies"]
    assert extras["test"] == ["pytest", "tomli>=1.1; python_version < '3.11'"]
    assert {d.split("==")[0] for d in extras["lint"]} == {"ruff", "clang-format"}
    assert data["project"]["scripts"] == {"flashinfer": "flashinfer.cli:main"}
    ini = data["tool"]["pytest"]["ini_options"]
    assert ini["testpaths"] == ["tests"] and any(m.startswith("gpu:") for m in ini["markers"])


def test_non_editable_install_ships_templates(tmp_path):
    import importlib.util

    # Like the GPU box (no network): build with this environment's setuptools when it has one; else
    # let pip provide the build backend from the configured index.
    build_args = ["--no-build-isolation", "--no-index"] if importlib.util.find_spec("setuptools") else []
    # Build from a copy so the checkout gets no build/ or *.egg-info droppings.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(REPO / "flashinfer", src / "flashinfer", ignore=ignore)
    shutil.copytree(REPO / "templates", src / "templates", ignore=ignore)
    target = tmp_path / "site"
    r = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--disable-pip-version-check",
         *build_args, "--target", str(target), str(src)],
        capture_output=True, text=True, timeout=600,
    )
    assert r.returncode == 0, r.stdout + r.stderr

    installed = target / "flashinfer" / "_templates"
    want = sorted(p.relative_to(REPO / "templates").as_posix() for p in (REPO / "templates").rglob("*")
                  if p.is_file() and (p.name.endswith(".jinja") or p.suffix in (".cuh", ".h")))
    got = sorted(p.relative_to(installed).as_posix() for p in installed.rglob("*") if p.is_file()
                 and p.name != "__init__.py" and "__pycache__" not in p.parts)
    assert want and got == want
    assert any(g.startswith("include/flashinfer/") and g.endswith(".cuh") for g in got) or not any(
        w.endswith(".cuh") for w in want)
    assert (target / "flashinfer" / "cli" / "__init__.py").is_file() and (target / "flashinfer" / "__main__.py").is_file()
    assert (target / "flashinfer" / "jit" / "parallel_build.py").is_file()
    assert not (target / "templates").exists() and not (target / "tests").exists()

    # The installed package (no checkout around it) finds its templates there, and a cache outside it.
    env = {k: v for k, v in os.environ.items() if k not in ("FLASHINFER_JIT_CACHE", "PYTHONPATH")}
    env.update(PYTHONPATH=str(target), XDG_CACHE_HOME=str(tmp_path / "xdg"))
    r = subprocess.run(
        [sys.executable, "-c", "import flashinfer, flashinfer.jit as j; print(flashinfer.__file__); "
         "print(j.templates_dir()); print(j.cache_root())"],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300,
    )
    assert r.returncode == 0, r.stderr
    mod_file, tdir, root = r.stdout.split()[-3:]
    assert Path(mod_file).resolve().is_relative_to(target.resolve())
    assert Path(tdir).resolve() == installed.resolve()
    assert Path(root).resolve() == (tmp_path / "xdg" / "flashinfer" / "jit").resolve()
