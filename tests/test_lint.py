"""Lint in CI: .ci/run installs the pinned tools and runs scripts/lint.sh (ruff and clang-format) before the
tests, and a lint failure fails the run; scripts/lint.sh finds, and with --fix repairs, what it should."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pytest

REPO = Path(__file__).resolve().parents[1]


def _code_lines(path: Path):
    """The shell lines of ``path`` that are not comments."""
    return [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.strip().startswith("#")]


def test_ci_runs_the_lint_script_before_the_tests_and_fails_on_it():
    lines = _code_lines(REPO / ".ci" / "run")
    lint = [
        i
        for i, ln in enumerate(lines)
        if re.search(r"\bscripts/lint\.sh\b", ln) and "--fix" not in ln and not ln.startswith(("stamp ", "echo "))
    ]
    tests = [i for i, ln in enumerate(lines) if "-m pytest" in ln]
    assert lint, ".ci/run must run scripts/lint.sh"
    assert tests and lint[0] < tests[0], ".ci/run must lint before the tests"
    assert any(re.search(r"pip install .*\.\[[^]]*\blint\b", ln) for ln in lines), ".ci/run must install the lint extra"
    after = lines[lint[0] + 1]
    assert re.fullmatch(r"LINT_RC=\$\?", after), "the lint status must be kept"
    assert any("LINT_RC" in ln and "RC=1" in ln for ln in lines[tests[0] :]), "a lint failure must fail the run"


def test_lint_tools_are_pinned_and_configured():
    text = (REPO / "pyproject.toml").read_text()
    lint_extra = re.search(r"^lint = \[(.*)\]$", text, re.M)
    assert lint_extra and re.search(r'"ruff==[\d.]+"', lint_extra.group(1))
    assert re.search(r'"clang-format==[\d.]+"', lint_extra.group(1))
    assert "[tool.ruff]" in text and "line-length = 120" in text and 'target-version = "py39"' in text
    assert "BasedOnStyle" in (REPO / ".clang-format").read_text()
    script = (REPO / "scripts" / "lint.sh").read_text()
    assert os.access(REPO / "scripts" / "lint.sh", os.X_OK)
    for step in ("check --fix", "format --check", "--dry-run --Werror", "-i --style=file"):
        assert step in script, step


def _tool(name: str, env_var: str) -> Optional[str]:
    if os.environ.get(env_var):
        return os.environ[env_var]
    beside = Path(sys.executable).parent / name  # the venv's, where .ci/run installed the lint extra
    return str(beside) if beside.is_file() else shutil.which(name)


def test_lint_script_finds_and_fixes(tmp_path):
    tools = {"RUFF": _tool("ruff", "RUFF"), "CLANG_FORMAT": _tool("clang-format", "CLANG_FORMAT")}
    if not all(tools.values()):
        pytest.skip(f"lint tools not installed ({tools}): pip install -e '.[lint]'")
    for f in ("pyproject.toml", ".clang-format", "scripts/lint.sh"):
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / f, tmp_path / f)
    pkg = tmp_path / "flashinfer"
    pkg.mkdir()
    (pkg / "mod.py").write_text("import sys, os\nx=[1,\n 2]\n")  # unsorted imports, unused, unformatted
    hdr = tmp_path / "templates" / "include" / "flashinfer" / "x.cuh"
    hdr.parent.mkdir(parents=True)
    hdr.write_text("#pragma once\nint  f( int a ){return a+1;}\n")
    env = {**os.environ, **tools}

    def lint(*args):
        return subprocess.run(
            ["bash", str(tmp_path / "scripts" / "lint.sh"), *args], capture_output=True, text=True, env=env, timeout=300
        )

    r = lint()
    assert r.returncode == 1, r.stdout + r.stderr
    for what in ("ruff check", "ruff format", "clang-format"):
        assert f"FAILED: {what}" in r.stdout, (what, r.stdout)

    (pkg / "mod.py").write_text("import sys, os\nx=[1,\n 2]\nprint(sys.argv, os.sep, x)\n")  # only fixable issues
    r = lint("--fix")
    assert r.returncode == 0 and "lint: all clean" in r.stdout, r.stdout + r.stderr
    assert (pkg / "mod.py").read_text() == "import os\nimport sys\n\nx = [1, 2]\nprint(sys.argv, os.sep, x)\n"
    assert hdr.read_text() == "#pragma once\nint f(int a) { return a + 1; }\n"
    assert lint().returncode == 0

    (pkg / "mod.py").write_text("print(undefined_name)\n")  # not fixable: --fix still fails, naming it
    r = lint("--fix")
    assert r.returncode == 1 and "F821" in r.stdout, r.stdout + r.stderr


def _sanitize_collect(script: Path, out: Path, families: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, "SANITIZE_COLLECT_ONLY": "1", "SANITIZE_OUT": str(out), "PYTHON": sys.executable}
    if families:
        env["SANITIZE_FAMILIES"] = families
    return subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env, timeout=900)


def test_sanitizer_subsets_select_every_test_they_name(tmp_path):
    """Every -k expression of scripts/sanitize.sh, and each of its or-branches, selects a test of today's suite (a
    renamed parametrisation once dropped every 16-bit fa3_ws test from the sanitizer's subsets unnoticed)."""
    r = _sanitize_collect(REPO / "scripts" / "sanitize.sh", tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    counts = dict(re.findall(r"^== (\w+ \w+): (\d+) tests$", r.stdout, re.M))
    assert len(counts) >= 20 and all(int(n) > 0 for n in counts.values()), counts
    assert "test_single_prefill_fa3_ws[q127-kv129-4-causal-bf16-d128]" in r.stdout


def test_sanitizer_subset_check_flags_a_branch_that_selects_nothing(tmp_path):
    script = (REPO / "scripts" / "sanitize.sh").read_text()
    term = "test_rmsnorm_matches_reference[False-64-dtype0]"
    assert script.count(term) == 2
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "sanitize.sh").write_text(script.replace(term, "test_rmsnorm_matches_reference[renamed]"))
    (tmp_path / "tests").symlink_to(REPO / "tests")
    shutil.copy2(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    r = _sanitize_collect(tmp_path / "scripts" / "sanitize.sh", tmp_path / "out", families="norm")
    assert r.returncode == 1, r.stdout + r.stderr
    assert r.stdout.count("# TERM SELECTS NOTHING: test_rmsnorm_matches_reference[renamed]") == 2, r.stdout
    assert "test_fused_add_rmsnorm_matches_reference[False-1032-dtype1]" in r.stdout  # the rest still selected
