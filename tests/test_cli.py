"""CPU tests of the command line (python -m flashinfer): matrix expansion, sharding, dry-run, the
cache commands on a temporary cache, and one real parallel prewarm of the tiny probe family."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, ClassVar, Dict, Tuple

import pytest

from flashinfer import cli
from flashinfer._families import load_families
from flashinfer.cli import matrix
from flashinfer.cli.doctor import demo_reference
from flashinfer.cli.errors import UsageError
from flashinfer.jit.spec import Spec, spec_families

REPO = Path(__file__).resolve().parents[1]


# A stand-in family with decode-like axes: exercises the flag -> axis mapping without compiling.
@dataclasses.dataclass(frozen=True)
class CliFakeSpec(Spec):
    family: ClassVar[str] = "clitest"
    template: ClassVar[str] = "clitest_does_not_exist.cu.jinja"
    exports: ClassVar[Dict[str, Tuple[Any, Tuple[Any, ...]]]] = {}

    head_dim: int = 64
    dtype_q: str = "bf16"
    dtype_kv: str = "bf16"
    dtype_o: str = "bf16"
    kv_layout: str = "NHD"
    use_window: bool = False

    def name(self) -> str:
        return (
            f"clitest_q-{self.dtype_q}_kv-{self.dtype_kv}_o-{self.dtype_o}_d{self.head_dim}_"
            f"{self.kv_layout.lower()}_window-{'on' if self.use_window else 'off'}"
        )

    def render_vars(self):
        return dataclasses.asdict(self)

    def unsupported_reason(self):
        if self.dtype_q != self.dtype_kv:
            return "mixed q/kv dtypes are not supported"
        if self.head_dim == 256 and self.use_window:
            return "sliding window needs head_dim <= 128"
        return None

    @classmethod
    def axes(cls):
        return {
            "head_dim": (64, 128, 256),
            "dtype_q": ("bf16", "f16"),
            "dtype_kv": ("bf16", "f16"),
            "dtype_o": ("bf16", "f16"),
            "kv_layout": ("NHD", "HND"),
            "use_window": (False, True),
        }


@pytest.fixture(autouse=True)
def _clitest_family(monkeypatch):
    """Register the stand-in family for each test only: the registry is global, and other test modules
    iterate over every registered family."""
    from flashinfer.jit import spec as spec_module

    monkeypatch.setitem(spec_module._FAMILIES, "clitest", CliFakeSpec)
    assert "clitest" in spec_families()


def _matrix(argv):
    args = cli.build_parser().parse_args(["prewarm", *argv])
    families = load_families()
    per_family, typed = matrix.resolve_selection(args, families)
    return matrix.expand_matrix(per_family, families, typed)


def _run_cli(argv, env=None, timeout=600):
    e = dict(os.environ)
    e.update(env or {})
    e["PYTHONPATH"] = str(REPO) + os.pathsep + e.get("PYTHONPATH", "")
    return subprocess.run(
        [sys.executable, "-m", "flashinfer", *argv], cwd=REPO, env=e, capture_output=True, text=True, timeout=timeout
    )


# ------------------------------------------------------------------ matrix expansion and filtering


def test_parse_axis_values_types_and_errors():
    assert matrix.parse_axis_values("f", "use_window", "on,off", (False, True)) == (True, False)
    assert matrix.parse_axis_values("f", "use_window", "true, 0", (False, True)) == (True, False)
    assert matrix.parse_axis_values("f", "head_dim", "128,64,128", (64, 128, 256)) == (128, 64)
    assert matrix.parse_axis_values("f", "kv_layout", "nhd", ("NHD", "HND")) == ("NHD",)
    assert matrix.parse_axis_values("f", "kv_layout", "all", ("NHD", "HND")) == ("NHD", "HND")
    with pytest.raises(UsageError, match="96.*head_dim.*64,128,256"):
        matrix.parse_axis_values("f", "head_dim", "96", (64, 128, 256))
    with pytest.raises(UsageError, match="empty"):
        matrix.parse_axis_values("f", "head_dim", ",", (64,))


def test_full_family_matrix_and_unsupported_filtering():
    items = _matrix(["--families", "clitest"])
    assert len(items) == 3 * 2 * 2 * 2 * 2 * 2
    assert [it.name for it in items] == sorted(it.name for it in items)
    for it in items:
        assert it.reason == it.spec.unsupported_reason()
    # q == kv (2 x 2 for o) x 2 layouts: d64/d128 with window on/off, d256 window off only
    assert sum(it.reason is None for it in items) == 2 * 4 * 2 * 2 + 1 * 4 * 2 * 1


def test_dtypes_flag_ties_q_kv_o_and_axis_flags_filter():
    items = _matrix(
        ["--families", "clitest", "--dtypes", "bf16,f16", "--head-dims", "128", "--layouts", "NHD", "--window", "off"]
    )
    assert sorted((it.spec.dtype_q, it.spec.dtype_kv, it.spec.dtype_o) for it in items) == [
        ("bf16", "bf16", "bf16"),
        ("f16", "f16", "f16"),
    ]
    assert all(it.spec.head_dim == 128 and it.spec.kv_layout == "NHD" and not it.spec.use_window for it in items)


def test_per_tensor_dtype_flag_overrides_the_tie():
    items = _matrix(
        [
            "--families",
            "clitest",
            "--dtypes",
            "bf16",
            "--dtype-kv",
            "f16,bf16",
            "--head-dims",
            "64",
            "--layouts",
            "HND",
            "--window",
            "on",
        ]
    )
    combos = {(it.spec.dtype_q, it.spec.dtype_kv, it.spec.dtype_o): it.reason for it in items}
    assert set(combos) == {("bf16", "f16", "bf16"), ("bf16", "bf16", "bf16")}
    assert combos[("bf16", "f16", "bf16")] == "mixed q/kv dtypes are not supported"
    assert combos[("bf16", "bf16", "bf16")] is None


def test_generic_axis_flag_and_errors():
    items = _matrix(
        [
            "--families",
            "clitest",
            "--axis",
            "head_dim=256",
            "--axis",
            "use_window=on",
            "--dtypes",
            "f16",
            "--layouts",
            "NHD",
        ]
    )
    assert len(items) == 1 and items[0].reason == "sliding window needs head_dim <= 128"
    with pytest.raises(UsageError, match="--pos-encodings does not apply"):
        _matrix(["--families", "clitest", "--pos-encodings", "ROPE_LLAMA"])
    with pytest.raises(UsageError, match="unknown spec family 'nope'"):
        _matrix(["--families", "nope"])
    with pytest.raises(UsageError, match="not a supported value"):
        _matrix(["--families", "clitest", "--layouts", "NDH"])


def test_preset_values_are_overridden_by_flags(monkeypatch):
    monkeypatch.setitem(
        matrix.PRESETS,
        "fake",
        {
            "help": "t",
            "families": {"clitest": {"dtypes": "bf16", "head_dims": "128", "layouts": "NHD", "window": "off"}},
        },
    )
    assert [it.name for it in _matrix(["--preset", "fake"])] == ["clitest_q-bf16_kv-bf16_o-bf16_d128_nhd_window-off"]
    items = _matrix(["--preset", "fake", "--head-dims", "64,256"])
    assert sorted(it.spec.head_dim for it in items) == [64, 256]


def test_presets_reference_known_axes_and_families():
    families = load_families()
    for name, preset in matrix.PRESETS.items():
        if "*" in preset.get("families", {}):
            continue  # a "*" setting may not apply to every family (by design); see test_serving_presets_*
        for fam, groups in matrix.preset_groups(name, families).items():
            for group in groups:
                items = matrix.expand_matrix({fam: dict(group)}, families)
                assert any(it.reason is None for it in items), f"preset {name} builds nothing for {fam}: {group}"


def test_llama_and_test_presets_for_decode():
    families = load_families()
    if "decode_single" not in families:
        pytest.skip("flashinfer.decode (family decode_single) is not available")
    llama = [it for it in _matrix(["--preset", "llama"]) if it.reason is None]
    assert {it.family for it in llama} == set(families) - {"probe"}
    assert all(it.spec.head_dim == 128 for it in llama if hasattr(it.spec, "head_dim"))
    single = [it.spec for it in llama if it.family == "decode_single"]
    assert len(single) == 1
    s = single[0]
    assert (
        s.head_dim,
        s.dtype_q,
        s.dtype_kv,
        s.dtype_o,
        s.kv_layout,
        s.pos_encoding_mode,
        s.use_window,
        s.use_logits_soft_cap,
    ) == (128, "bf16", "bf16", "bf16", "NHD", "NONE", False, False)
    every = _matrix(["--preset", "all"])  # every family but the probe (the stand-in included)
    assert len(every) == sum(len(cls.expand()) for fam, cls in families.items() if fam != "probe")
    test = _matrix(["--preset", "test"])
    # every supported spec with a 16-bit KV cache, and a selection of fp8 ones (test_decode.FP8_SPECS)
    single = {it.name for it in test if it.family == "decode_single" and it.reason is None}
    every16 = {
        s.name() for s in families["decode_single"].expand(dtype_kv=("bf16", "f16")) if s.unsupported_reason() is None
    }
    assert {n for n in single if "_kv-e" not in n} == every16
    assert 0 < len(single - every16) <= 20


def test_fp8_is_a_kv_dtype_value_of_the_matrix():
    """fp8 KV (e4m3/e5m2) is a value of the dtype_kv axis: --dtype-kv selects it; the decode families and
    page_append build it, the others list it as unsupported with a reason; the fp8 preset is its serving set."""
    families = load_families()
    if "decode_single" not in families:
        pytest.skip("flashinfer.decode (family decode_single) is not available")
    items = _matrix(
        ["--families", "decode_batch_paged,prefill_batch", "--dtypes", "bf16", "--dtype-kv", "e4m3,e5m2"]
        + ["--head-dims", "128", "--layouts", "NHD", "--pos-encodings", "NONE", "--softcap", "off"]
        + ["--window", "off", "--axis", "mask_mode=causal", "--axis", "use_fp16_qk_reduction=off"]
    )
    decode = {it.name: it.reason for it in items if it.family == "decode_batch_paged"}
    assert decode == {
        "decode_batch_paged_q-bf16_kv-e4m3_o-bf16_d128_nhd_pos-none_softcap-off": None,
        "decode_batch_paged_q-bf16_kv-e5m2_o-bf16_d128_nhd_pos-none_softcap-off": None,
    }
    prefill = {it.name: it.reason for it in items if it.family == "prefill_batch"}
    assert {n for n, r in prefill.items() if r is None} == {
        f"prefill_batch_{st}_q-bf16_kv-{kv}_o-bf16_d128_mask-causal_pos-none_window-off_softcap-off_fp16qk-off_fa2"
        for st in ("paged", "ragged")
        for kv in ("e4m3", "e5m2")
    }
    # fa3: single prefill only; fa3_ws: 16-bit K/V only
    assert all(
        ("single-request" in r) if n.endswith("_fa3") else ("no fp8" in r) for n, r in prefill.items() if r is not None
    ), prefill
    shared = _matrix(["--families", "cascade_shared", "--head-dims", "128", "--dtypes", "bf16", "--dtype-kv", "e4m3"])
    assert [(it.name, it.reason) for it in shared] == [("cascade_shared_q-bf16_kv-e4m3_o-bf16_d128", None)]
    with pytest.raises(UsageError, match="not a supported value of axis 'dtype_q'"):
        _matrix(["--families", "decode_single", "--dtypes", "e4m3"])  # fp8 is a KV dtype only
    fp8 = _matrix(["--preset", "fp8"])
    assert sorted(it.name for it in fp8) == [
        "cascade_shared_q-bf16_kv-e4m3_o-bf16_d128",
        "decode_batch_paged_q-bf16_kv-e4m3_o-bf16_d128_nhd_pos-none_softcap-off",
        "decode_single_q-bf16_kv-e4m3_o-bf16_d128_nhd_pos-none_window-off_softcap-off",
        "page_append_kv-e4m3_d128",
        *(
            f"prefill_batch_{st}_q-bf16_kv-e4m3_o-bf16_d128_mask-{m}_pos-none_window-off_softcap-off_fp16qk-off_fa2"
            for st in ("paged", "ragged")
            for m in ("causal", "none")
        ),
        "prefill_single_q-bf16_kv-e4m3_o-bf16_d128_mask-causal_pos-none_window-off_softcap-off_fp16qk-off_fa2",
        "prefill_single_q-bf16_kv-e4m3_o-bf16_d128_mask-causal_pos-none_window-off_softcap-off_fp16qk-off_fa3",
        "prefill_single_q-bf16_kv-e4m3_o-bf16_d128_mask-causal_pos-none_window-off_softcap-off_fp16qk-off_fa3_ws",
    ]
    assert all(it.reason is None for it in fp8)


def _supported_names(preset):
    return {it.name for it in _matrix(["--preset", preset]) if it.reason is None}


def test_serving_presets_cover_every_family():
    families = load_families()
    kernels = set(families) - {"probe", "clitest"}
    for name in ("llama", "fp16", "gemma", "default"):
        got = {it.family for it in _matrix(["--preset", name]) if it.reason is None}
        # cascade_shared (a cascade's shared level on Hopper wgmma) is head_dim 128 only: gemma's 256 has none
        expected = kernels - ({"cascade_shared"} if name == "gemma" else set())
        assert expected <= got, (name, expected - got)
    fp16 = [it.spec for it in _matrix(["--preset", "fp16"]) if it.reason is None and hasattr(it.spec, "head_dim")]
    assert {s.head_dim for s in fp16} == {64, 128, 256} and {s.dtype_q for s in fp16 if hasattr(s, "dtype_q")} == {
        "f16"
    }


def test_test_preset_is_what_the_gpu_tests_parametrize():
    """--preset test = the GPU tests' modules: a superset of every statically parametrized spec list, and
    (per family) much smaller than the full matrix where the tests use a subset (prefill)."""
    sys.path.insert(0, str(REPO / "tests"))
    try:
        import importlib

        mods = {m: importlib.import_module(m) for m in ("test_decode", "test_prefill", "test_batch_decode")}
    except ImportError as e:
        pytest.skip(f"a GPU test module is not importable here: {e}")
    finally:
        sys.path.pop(0)
    test = _supported_names("test")
    static = (
        list(getattr(mods["test_decode"], "SUPPORTED", []))
        + list(getattr(mods["test_decode"], "FP8_SPECS", []))
        + list(getattr(mods["test_batch_decode"], "FP8_BATCH_SPECS", []))
        + list(getattr(mods["test_prefill"], "SINGLE_SPECS", []))
        + list(getattr(mods["test_prefill"], "WS_FP8_SPECS", []))
    )
    for fn in ("test_batch_decode_spec_matrix",):
        marks = getattr(getattr(mods["test_batch_decode"], fn, None), "pytestmark", [])
        for mk in marks:
            if mk.name == "parametrize" and mk.args[0] == "spec":
                static += list(mk.args[1])
    assert static, "no statically parametrized specs found"
    missing = sorted(s.name() for s in static if s.name() not in test)
    assert not missing, f"--preset test lacks specs the GPU tests parametrize: {missing[:10]}"
    every = {it.name: it for it in _matrix(["--preset", "all"]) if it.reason is None}
    n_prefill = sum(1 for n in test if n.startswith("prefill_"))
    assert n_prefill < 200 < sum(1 for n in every if n.startswith("prefill_"))
    assert test <= set(every)


def test_config_toml(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FLASHINFER_JIT_CACHE", str(tmp_path / "cache"))
    cfg = tmp_path / "m.toml"
    cfg.write_text("""
[[matrix]]
family = "clitest"
head_dims = [64, 128]
dtypes = "bf16"
kv_layout = "NHD"
use_window = false

[[specs]]
family = "clitest"
head_dim = 256
dtype_q = "f16"
dtype_kv = "f16"
dtype_o = "f16"
kv_layout = "HND"
use_window = false
""")
    assert cli.main(["prewarm", "--config", str(cfg), "--dry-run", "--json", str(tmp_path / "r.json")]) == 0
    capsys.readouterr()
    names = sorted(i["name"] for i in json.loads((tmp_path / "r.json").read_text())["items"])
    assert names == [
        "clitest_q-bf16_kv-bf16_o-bf16_d128_nhd_window-off",
        "clitest_q-bf16_kv-bf16_o-bf16_d64_nhd_window-off",
        "clitest_q-f16_kv-f16_o-f16_d256_hnd_window-off",
    ]
    cfg.write_text("[[bogus]]\nx = 1\n")
    assert cli.main(["prewarm", "--config", str(cfg), "--dry-run"]) == 2


def test_record_env_then_config_jsonl(tmp_path, monkeypatch, capsys):
    """FLASHINFER_JIT_RECORD=FILE lists the specs a process loads; prewarm --config FILE selects exactly them."""
    from flashinfer import jit
    from flashinfer.jit import loader
    from flashinfer.jit.probe import ProbeSpec

    monkeypatch.setenv("FLASHINFER_JIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    rec = tmp_path / "used.jsonl"
    monkeypatch.setenv("FLASHINFER_JIT_RECORD", str(rec))
    loader._forget()
    spec = ProbeSpec(constant=2, dtype="i32")
    jit.load(spec)
    jit.load(spec)  # memoized: recorded once
    loader._forget()
    lines = rec.read_text().splitlines()
    assert [json.loads(x) for x in lines] == [spec.to_json()]
    assert cli.main(["prewarm", "--config", str(rec), "--dry-run", "--json", str(tmp_path / "r.json")]) == 0
    capsys.readouterr()
    items = json.loads((tmp_path / "r.json").read_text())["items"]
    assert [i["name"] for i in items] == [spec.name()] and items[0]["cached"] is True


# ------------------------------------------------------------------ sharding


@pytest.mark.parametrize("n", [1, 2, 3, 5, 7])
def test_shards_cover_every_spec_exactly_once(n):
    items = _matrix(["--families", "clitest"])
    seen = []
    for i in range(1, n + 1):
        part = matrix.shard_items(list(reversed(items)), (i, n))  # input order must not matter
        assert part == matrix.shard_items(items, (i, n))
        seen.extend(it.name for it in part)
    assert sorted(seen) == sorted(it.name for it in items)
    assert len(seen) == len(set(seen))


def test_parse_shard():
    assert matrix.parse_shard("2/4") == (2, 4)
    assert matrix.parse_shard(None) is None
    for bad in ("0/4", "5/4", "1/0", "a/b", "3"):
        with pytest.raises(UsageError):
            matrix.parse_shard(bad)


# ------------------------------------------------------------------ dry run


def test_dry_run_lists_keys_cached_state_and_dropped(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FLASHINFER_JIT_CACHE", str(tmp_path / "cache"))
    rc = cli.main(
        [
            "prewarm",
            "--families",
            "clitest",
            "--head-dims",
            "256",
            "--dtypes",
            "bf16",
            "--layouts",
            "NHD",
            "--dry-run",
            "--json",
            str(tmp_path / "r.json"),
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0
    assert "2 combinations, 1 to prewarm, 1 dropped" in out
    assert "to build  clitest_q-bf16_kv-bf16_o-bf16_d256_nhd_window-off-" in out
    assert "clitest_q-bf16_kv-bf16_o-bf16_d256_nhd_window-on: sliding window needs head_dim <= 128" in out
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["dry_run"] is True and len(rep["items"]) == 2
    supported = [i for i in rep["items"] if i["reason"] is None]
    assert supported[0]["key"].startswith(supported[0]["name"] + "-") and supported[0]["cached"] is False


def test_dry_run_sharded_union_is_the_matrix(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FLASHINFER_JIT_CACHE", str(tmp_path / "cache"))
    names = []
    for i in (1, 2, 3):
        assert (
            cli.main(
                [
                    "prewarm",
                    "--families",
                    "clitest",
                    "--dry-run",
                    "--shard",
                    f"{i}/3",
                    "--json",
                    str(tmp_path / f"s{i}.json"),
                ]
            )
            == 0
        )
        names += [it["name"] for it in json.loads((tmp_path / f"s{i}.json").read_text())["items"]]
    capsys.readouterr()
    assert sorted(names) == sorted(it.name for it in _matrix(["--families", "clitest"]))


def test_usage_errors_exit_2(capsys):
    assert cli.main(["prewarm", "--families", "clitest", "--head-dims", "96", "--dry-run"]) == 2
    assert "not a supported value" in capsys.readouterr().err
    assert cli.main(["prewarm", "--families", "clitest", "--shard", "0/2", "--dry-run"]) == 2


def test_failed_build_is_reported_and_exits_1(tmp_path, monkeypatch, capsys):
    # The stand-in family's template does not exist: the build must fail, be summarised, exit 1.
    monkeypatch.setenv("FLASHINFER_JIT_CACHE", str(tmp_path / "cache"))
    rc = cli.main(
        [
            "prewarm",
            "--families",
            "clitest",
            "--head-dims",
            "64",
            "--dtypes",
            "bf16",
            "--layouts",
            "NHD",
            "--window",
            "off",
            "--jobs",
            "1",
            "--json",
            str(tmp_path / "r.json"),
        ]
    )
    cap = capsys.readouterr()
    assert rc == 1
    assert "failed" in cap.out and "clitest_q-bf16_kv-bf16_o-bf16_d64_nhd_window-off" in cap.out
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["counts"]["failed"] == 1 and rep["items"][0]["status"] == "failed" and rep["items"][0]["error"]


# ------------------------------------------------------------------ real prewarm + cache commands


@pytest.fixture(scope="module")
def probe_cache(tmp_path_factory):
    """ONE real parallel prewarm of the probe family into a fresh cache (shared by the cache tests)."""
    try:
        import flashinfer.jit.probe  # noqa: F401
    except ImportError as e:
        pytest.skip(f"flashinfer.jit.probe is not available yet: {e}")
    root = tmp_path_factory.mktemp("fi_cache")
    env = {
        "FLASHINFER_JIT_CACHE": str(root),
        "CUDA_HOME": os.environ.get("CUDA_HOME", "/usr/local/cuda"),
        "TORCH_CUDA_ARCH_LIST": os.environ.get("TORCH_CUDA_ARCH_LIST", "9.0"),
    }
    report = root.parent / "probe_prewarm.json"
    # Two modules (dtype f32, constants 1 and 2) on two worker processes.
    r = _run_cli(["prewarm", "--preset", "probe", "--axis", "dtype=f32", "--jobs", "2", "--json", str(report)], env=env)
    return {"root": root, "env": env, "run": r, "report": json.loads(report.read_text()) if report.exists() else None}


def test_real_prewarm_of_probe_family(probe_cache):
    r = probe_cache["run"]
    assert r.returncode == 0, r.stdout + r.stderr
    rep = probe_cache["report"]
    n = rep["counts"]["total"] - rep["counts"]["skipped"]
    assert n >= 1 and rep["counts"]["built"] == n and rep["counts"]["failed"] == 0
    assert rep["jobs"] == 2
    assert "prewarm summary" in r.stdout and "built" in r.stdout
    assert f"[{n}/{n}]" in r.stderr  # progress line
    for item in rep["items"]:
        if item["status"] == "built":
            assert Path(item["entry_dir"]).is_dir() and item["seconds"] > 0

    # Second run: everything already cached, nothing compiled.
    again = _run_cli(
        [
            "prewarm",
            "--preset",
            "probe",
            "--axis",
            "dtype=f32",
            "--jobs",
            "2",
            "--json",
            str(probe_cache["root"].parent / "again.json"),
        ],
        env=probe_cache["env"],
    )
    assert again.returncode == 0, again.stdout + again.stderr
    rep2 = json.loads((probe_cache["root"].parent / "again.json").read_text())
    assert rep2["counts"]["cached"] == n and rep2["counts"]["built"] == 0

    dry = _run_cli(["prewarm", "--preset", "probe", "--axis", "dtype=f32", "--dry-run"], env=probe_cache["env"])
    assert dry.returncode == 0 and f"{n} of {n} already cached" in dry.stdout, dry.stdout + dry.stderr


def test_two_concurrent_prewarms_build_each_module_once(tmp_path):
    """Two prewarms of one matrix racing on one cache: together they build every module exactly once (the
    per-key locks), and both succeed."""
    root = tmp_path / "cache"
    env = dict(
        os.environ,
        FLASHINFER_JIT_CACHE=str(root),
        CUDA_HOME=os.environ.get("CUDA_HOME", "/usr/local/cuda"),
        TORCH_CUDA_ARCH_LIST=os.environ.get("TORCH_CUDA_ARCH_LIST", "9.0"),
    )
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    reports = [tmp_path / "a.json", tmp_path / "b.json"]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "flashinfer", "prewarm", "--preset", "probe", "--jobs", "2", "--json", str(r)],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in reports
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, out + err
    reps = [json.loads(r.read_text()) for r in reports]
    n = reps[0]["counts"]["total"] - reps[0]["counts"]["skipped"]
    assert n >= 2
    built = [item["key"] for rep in reps for item in rep["items"] if item["status"] == "built"]
    assert sorted(built) == sorted(set(built)) and len(built) == n, (reps[0]["counts"], reps[1]["counts"])
    for rep in reps:
        assert rep["counts"]["built"] + rep["counts"]["cached"] == n and rep["counts"]["failed"] == 0


def test_cache_list_verify_clear(probe_cache):
    assert probe_cache["run"].returncode == 0
    env = probe_cache["env"]
    names = [i["name"] for i in probe_cache["report"]["items"] if i["status"] == "built"]

    ls = _run_cli(["cache", "list"], env=env)
    assert ls.returncode == 0, ls.stderr
    assert str(probe_cache["root"]) in ls.stdout
    for name in names:
        assert name in ls.stdout
    js = json.loads(_run_cli(["cache", "list", "--json"], env=env).stdout)
    assert sorted(e["name"] for e in js) == sorted(names) and all(e["valid"] for e in js)
    assert all(e["size"] and e["size"] > 0 for e in js)

    assert _run_cli(["cache", "verify"], env=env).returncode == 0

    # Under other target archs the same entries are stale (another key): listed as such, kept by --stale here.
    other_arch = json.loads(_run_cli(["cache", "list", "--json"], env={**env, "TORCH_CUDA_ARCH_LIST": "8.0"}).stdout)
    assert [e["current"] for e in other_arch] == [False] * len(names)
    assert all(e["current"] is True for e in js)
    st = _run_cli(["cache", "clear", "--stale", "--yes"], env=env)
    assert st.returncode == 0 and "no stale entries" in st.stdout, st.stdout + st.stderr

    # Corrupt one entry's library: verify must fail and name it.
    key = js[0]["key"]
    so = next((probe_cache["root"] / key).rglob("*.so"))
    so.write_bytes(so.read_bytes() + b"corrupt")
    bad = _run_cli(["cache", "verify"], env=env)
    assert bad.returncode == 1 and key in bad.stdout, bad.stdout

    # Clearing without --yes and without a terminal refuses; --family of another family removes nothing.
    assert _run_cli(["cache", "clear"], env=env).returncode == 1
    other = _run_cli(["cache", "clear", "--family", "clitest_none", "--yes"], env=env)
    assert other.returncode == 0
    assert len(json.loads(_run_cli(["cache", "list", "--json"], env=env).stdout)) == len(names)

    cl = _run_cli(["cache", "clear", "--family", "probe", "--yes"], env=env)
    assert cl.returncode == 0 and f"removed {len(names)}" in cl.stdout, cl.stdout + cl.stderr
    assert json.loads(_run_cli(["cache", "list", "--json"], env=env).stdout) == []
    assert _run_cli(["cache", "verify"], env=env).returncode == 0


def test_module_entry_point_help():
    r = _run_cli(["--help"])
    assert r.returncode == 0 and "prewarm" in r.stdout and "cache" in r.stdout
    r = _run_cli(["cache", "--help"])
    for action in ("list", "verify", "clear", "prune", "export", "import"):
        assert action in r.stdout
    r = _run_cli(["prewarm", "--help"])
    assert r.returncode == 0
    for flag in (
        "--families",
        "--head-dims",
        "--dtypes",
        "--layouts",
        "--pos-encodings",
        "--window",
        "--softcap",
        "--preset",
        "--jobs",
        "--dry-run",
        "--shard",
        "--json",
    ):
        assert flag in r.stdout


# ------------------------------------------------------------------ demo


def test_demo_reference_matches_per_head_softmax():
    import torch

    hq, hkv, d, n = 8, 2, 16, 37
    q, k, v = torch.randn(hq, d), torch.randn(n, hkv, d), torch.randn(n, hkv, d)
    got = demo_reference(q, k, v, 0.25)
    for h in range(hq):
        kv = h // (hq // hkv)  # FlashInfer's GQA mapping: consecutive query heads share a kv head
        p = torch.softmax((k[:, kv] @ q[h]) * 0.25, dim=0)
        torch.testing.assert_close(got[h], p @ v[:, kv])


def test_demo_without_gpu_builds_and_says_so(tmp_path):
    try:
        import flashinfer.decode  # noqa: F401
    except ImportError as e:
        pytest.skip(f"flashinfer.decode is not available yet: {e}")
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: see test_demo_on_gpu")
    env = {"FLASHINFER_JIT_CACHE": str(tmp_path / "cache"), "TORCH_CUDA_ARCH_LIST": "9.0"}
    r = _run_cli(["demo"], env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "compiled in" in r.stdout and "No CUDA GPU found" in r.stdout
    r = _run_cli(["demo"], env=env)
    assert r.returncode == 0 and "build:  cached" in r.stdout, r.stdout + r.stderr


@pytest.mark.gpu
def test_demo_on_gpu():
    r = _run_cli(["demo", "--kv-len", "8192", "--iters", "20", "--warmup", "3"])
    assert r.returncode == 0, r.stdout + r.stderr
    assert "-> OK" in r.stdout and "TB/s" in r.stdout


def test_disabled_jit_hint_is_a_valid_prewarm_command(tmp_path, monkeypatch):
    """The engine's JITDisabledError names a prewarm command; it must select exactly that spec."""
    import shlex

    from flashinfer import jit
    from flashinfer.jit.probe import ProbeSpec

    monkeypatch.setenv("FLASHINFER_JIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("FLASHINFER_DISABLE_JIT", "1")
    spec = ProbeSpec(constant=2, dtype="i32")
    with pytest.raises(jit.JITDisabledError) as ei:
        jit.load(spec)
    cmd = str(ei.value).split("`")[1]
    argv = shlex.split(cmd)
    assert argv[:4] == ["python", "-m", "flashinfer", "prewarm"]
    items = _matrix(argv[4:])
    assert [it.spec for it in items] == [spec]


def test_unusable_cache_root_is_a_clean_error(tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("FLASHINFER_JIT_CACHE", str(blocker / "cache"))
    rc = cli.main(["prewarm", "--preset", "probe", "--jobs", "1"])
    err = capsys.readouterr().err
    assert rc == 1 and "JITCacheError" in err and str(blocker / "cache") in err and "Traceback" not in err


def test_config_file_of_specs_and_settings(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FLASHINFER_JIT_CACHE", str(tmp_path / "cache"))
    one = CliFakeSpec(head_dim=128, dtype_q="f16", dtype_kv="f16", dtype_o="f16", kv_layout="HND", use_window=True)
    cfg = tmp_path / "matrix.json"
    cfg.write_text(
        json.dumps(
            [
                one.to_json(),
                {
                    "family": "clitest",
                    "settings": {"dtypes": "bf16", "head_dims": "64", "layouts": "NHD", "window": "all"},
                },
            ]
        )
    )
    assert cli.main(["prewarm", "--config", str(cfg), "--dry-run", "--json", str(tmp_path / "r.json")]) == 0
    capsys.readouterr()
    names = sorted(i["name"] for i in json.loads((tmp_path / "r.json").read_text())["items"])
    assert names == sorted(
        [
            one.name(),
            "clitest_q-bf16_kv-bf16_o-bf16_d64_nhd_window-off",
            "clitest_q-bf16_kv-bf16_o-bf16_d64_nhd_window-on",
        ]
    )
    cfg.write_text(json.dumps([{"family": "clitest", "head_dim": 96, "bogus": 1}]))
    assert cli.main(["prewarm", "--config", str(cfg), "--dry-run"]) == 2


# ------------------------------------------------------------------ the tests' matrix file and config reading


def test_test_preset_reads_the_tests_matrix_file():
    """--preset test is tests/prewarm_test.toml (the file the tests own), not a list in production code."""
    assert matrix.PRESETS["test"]["config"] == "tests/prewarm_test.toml"
    assert (REPO / "tests" / "prewarm_test.toml").is_file()
    by_preset = {it.name for it in _matrix(["--preset", "test"])}
    args = cli.build_parser().parse_args(["prewarm", "--config", str(REPO / "tests" / "prewarm_test.toml")])
    assert by_preset == {it.name for it in matrix.select(args)}
    assert {it.family for it in _matrix(["--preset", "test"])} == set(load_families()) - {"probe", "clitest"}


def test_preset_file_missing_is_a_usage_error(monkeypatch, tmp_path):
    monkeypatch.setattr(matrix, "_CHECKOUT", tmp_path)
    with pytest.raises(UsageError, match="--config FILE"):
        _matrix(["--preset", "test"])


def test_config_key_that_applies_to_no_axis_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("FLASHINFER_JIT_CACHE", str(tmp_path / "cache"))
    cfg = tmp_path / "m.toml"
    cfg.write_text('[[matrix]]\nfamily = "clitest"\nmask_mode = "causal"\n')
    with pytest.raises(UsageError, match="mask_mode does not apply to this family"):
        matrix.items_from_config(str(cfg), load_families())
    # bare axis names, lists and booleans are accepted in JSON settings too
    cfg = tmp_path / "m.json"
    cfg.write_text(
        json.dumps(
            [
                {
                    "family": "clitest",
                    "settings": {"head_dim": [64], "dtypes": "f16", "kv_layout": "HND", "use_window": True},
                }
            ]
        )
    )
    items = matrix.items_from_config(str(cfg), load_families())
    assert [it.name for it in items] == ["clitest_q-f16_kv-f16_o-f16_d64_hnd_window-on"]


def test_toml_without_tomllib_or_tomli_is_a_clear_error_and_json_still_works(tmp_path, monkeypatch):
    """Python 3.9/3.10 without tomli: only reading a TOML file fails, with a message saying what to do."""
    monkeypatch.setitem(sys.modules, "tomllib", None)  # import raises ImportError
    monkeypatch.setitem(sys.modules, "tomli", None)
    cfg = tmp_path / "m.toml"
    cfg.write_text('[[matrix]]\nfamily = "clitest"\n')
    with pytest.raises(UsageError, match="Python >= 3.11 or the tomli package"):
        matrix.items_from_config(str(cfg), load_families())
    js = tmp_path / "m.json"
    js.write_text(
        json.dumps(
            {"family": "clitest", "settings": {"head_dims": "64", "dtypes": "bf16", "layouts": "NHD", "window": "off"}}
        )
    )
    assert len(matrix.items_from_config(str(js), load_families())) == 1


def test_cli_uses_the_family_registry_only():
    """No hard-coded family list and no swallowed ImportError in the CLI: families come from _families."""
    import ast

    for path in sorted((REPO / "flashinfer" / "cli").glob("*.py")):
        text = path.read_text()
        for fam_module in ("flashinfer.decode", "flashinfer.prefill", "flashinfer.page"):
            assert fam_module not in text, f"{path.name} names {fam_module}: use flashinfer._families"
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ExceptHandler) and isinstance(node.type, ast.Name):
                assert node.type.id not in ("ImportError", "ModuleNotFoundError") or path.name == "config.py", (
                    f"{path.name}:{node.lineno} catches {node.type.id}"
                )


# ------------------------------------------------------------------ the engine's prewarm API


def test_prewarm_api_reports_failed_unsupported_and_deduplicates(tmp_path, monkeypatch):
    from flashinfer import jit

    monkeypatch.setenv("FLASHINFER_JIT_CACHE", str(tmp_path / "cache"))
    broken = CliFakeSpec(head_dim=64)  # its template does not exist: the build fails
    unsupported = CliFakeSpec(head_dim=64, dtype_kv="f16")
    seen = []
    rep = jit.prewarm(
        [broken, unsupported, broken], jobs=1, progress=lambda r, building: seen.append((r.name, r.status))
    )
    assert [(r.spec, r.status) for r in rep.results] == [(broken, "failed"), (unsupported, "unsupported")]
    assert rep.results[1].error == "mixed q/kv dtypes are not supported" and rep.results[1].key is None
    assert "clitest_does_not_exist.cu.jinja" in rep.results[0].error and not rep.ok
    assert sorted(seen) == sorted((r.name, r.status) for r in rep.results)
    assert (
        rep.jobs == 1
        and rep.by_status("built") == []
        and set(rep.results[0].as_dict()) == {"status", "key", "seconds", "entry_dir", "log_path", "error"}
    )
    with pytest.raises(ValueError, match="unknown status"):
        rep.by_status("done")


def test_prewarm_shared_and_import_caps_flags(tmp_path, monkeypatch):
    """--shared reaches the engine (new entries 0755/0644); a malformed --max-file-bytes is a usage error."""
    import stat

    monkeypatch.setenv("FLASHINFER_JIT_CACHE", str(tmp_path / "cache"))
    from flashinfer.cli import main

    assert (
        main(
            ["prewarm", "--families", "probe", "--axis", "constant=1", "--axis", "dtype=f32", "--jobs", "1", "--shared"]
        )
        == 0
    )
    entries = [p for p in (tmp_path / "cache").iterdir() if p.name.startswith("probe_")]
    assert entries, "prewarm built nothing"
    for p in entries[0].iterdir():
        mode = stat.S_IMODE(p.stat().st_mode)
        assert mode & 0o044 == 0o044, (p, oct(mode))  # readable by group and others
    assert main(["cache", "import", str(tmp_path / "none.tar.gz"), "--max-file-bytes", "lots"]) == 2
