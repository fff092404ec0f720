"""bench/gpu_check.sh and bench/gpu_check.py on a machine without a GPU: argument parsing, the "no GPU"
exit that touches nothing, the timing table's dry run (tiny sizes on CPU) and its results files, and
the test-suite summary folded into them."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest

from tiny_runs import ROOT

SCRIPT = ROOT / "bench" / "gpu_check.sh"
BENCH = ROOT / "bench" / "gpu_check.py"
NO_GPU = {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}  # a GPU machine running this suite too


def _sh(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **NO_GPU, "PYTHON": sys.executable, **(env or {})})


def _load_bench():
    if "gpu_check" not in sys.modules:  # bench/ is no package: load the script as a module, once
        spec = importlib.util.spec_from_file_location("gpu_check", BENCH)
        module = importlib.util.module_from_spec(spec)
        sys.modules["gpu_check"] = module  # its dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules["gpu_check"]


# --------------------------------------------------------------------------- gpu_check.sh


def test_help_names_both_modes_and_exits_0():
    r = _sh("--help")
    assert r.returncode == 0 and r.stderr == ""
    for flag in ("--download DIR", "--wheels DIR", "--out DIR", "--quick", "--python-version", "no CUDA GPU here"):
        assert flag in r.stdout, flag


@pytest.mark.parametrize("args, message", [
    (["--bogus"], "gpu_check.sh: unknown argument '--bogus' (see --help)"),
    (["--out"], "gpu_check.sh: --out needs a value (see --help)"),
    (["--wheels", "--quick"], "gpu_check.sh: --wheels needs a value (see --help)"),
    (["--download"], "gpu_check.sh: --download needs a value (see --help)"),
    (["--jobs", "0"], "gpu_check.sh: --jobs needs a positive integer, got '0'"),
])
def test_bad_arguments_fail_with_one_line(args, message):
    r = _sh(*args)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip() == message


def test_without_a_gpu_it_says_so_exits_0_and_creates_nothing(tmp_path):
    out, wheels = tmp_path / "out", tmp_path / "wheels"
    # With and without --out: the default output directory is under TMPDIR.
    for args in (["--out", str(out), "--wheels", str(wheels), "--quick"], []):
        r = _sh(*args, env={"TMPDIR": str(tmp_path)})
        assert r.returncode == 0, r.stderr
        assert r.stdout == "no CUDA GPU here: nothing run\n" and r.stderr == ""
    assert list(tmp_path.iterdir()) == []  # no output directory, venv, log or wheel directory


def test_an_interpreter_without_torch_counts_as_no_gpu(tmp_path):
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\nexit 1\n")  # `import torch` fails
    fake.chmod(0o755)
    r = _sh("--out", str(tmp_path / "out"), env={"PYTHON": str(fake)})
    assert r.returncode == 0 and r.stdout == "no CUDA GPU here: nothing run\n"
    assert not (tmp_path / "out").exists()


def test_the_script_parses_and_is_shellcheck_clean():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0
    if shutil.which("shellcheck"):  # Debian's shellcheck, where installed
        r = subprocess.run(["shellcheck", str(SCRIPT)], capture_output=True, text=True)
        assert r.returncode == 0, r.stdout


# --------------------------------------------------------------------------- gpu_check.py


def test_the_timing_table_refuses_to_run_without_a_gpu(tmp_path):
    r = subprocess.run([sys.executable, str(BENCH), "--out", str(tmp_path / "out")], capture_output=True, text=True,
                       timeout=120, env={**os.environ, **NO_GPU})
    assert r.returncode == 2
    assert r.stderr.strip().startswith("gpu_check.py needs a CUDA GPU (torch.cuda.is_available() is False)")
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check")
    r = subprocess.run([sys.executable, str(BENCH), "--dry-run", "--out", str(out / "results"), "--work", str(out)],
                       capture_output=True, text=True, timeout=300, env={**os.environ, **NO_GPU})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    return out / "results"


def test_dry_run_results_json_has_the_schema(dry_run):
    results = json.loads((dry_run / "results.json").read_text())
    for key, kind in (("gpu", str), ("torch", str), ("rows", list)):
        assert isinstance(results[key], kind), key
    assert results["cuda"] is None or isinstance(results["cuda"], str)
    assert isinstance(results["megatron_core"], str) and results["megatron_core"][0].isdigit()
    assert results["tests"] is None and results["dry_run"] is True
    rows = results["rows"]
    assert all("error" not in row for row in rows), [row for row in rows if "error" in row]
    for row in rows:
        assert isinstance(row["name"], str) and row["name"]
        assert isinstance(row["ms"], float) and row["ms"] > 0, row
        assert isinstance(row["ratio"], float) and row["ratio"] > 0, row
        assert row["peak_mib"] is None  # CUDA memory only
    names = [row["name"] for row in rows]
    # Four loss rows per vocabulary, Megatron's CE the yardstick of each; three training steps.
    for vocab in (1024, 1536):
        loss = [row for row in rows if row.get("vocab") == vocab and row["part"] == "loss"]
        assert [row["ratio_to"] for row in loss] == ["Megatron CE"] * 4
        assert loss[0]["name"].startswith("Megatron vocab_parallel_cross_entropy") and loss[0]["ratio"] == 1.0
    assert [n for n in names if n.startswith("train step")] == [
        "train step: plain LM (student alone)",
        "train step: online KD (student + bf16 teacher)",
        "train step: offline KD (top-p 0.95 / top-k 50 store)",
    ]
    plain, online, offline = rows[-3:]
    assert plain["ratio_to"] == "FLOP ideal 6·N_s" and online["ratio_to"] == "FLOP ideal 6·N_s + 2·N_t"
    # The FLOP ideal of the online step: 6·N_s + 2·N_t per token, against 6·N_s for the student alone.
    assert online["ideal_vs_plain"] == pytest.approx((6 * online["n_student"] + 2 * online["n_teacher"])
                                                     / (6 * online["n_student"]), abs=1e-3)
    assert offline["ratio"] == pytest.approx(offline["ms"] / plain["ms"], rel=1e-2)
    assert _load_bench().schema_problems(results) == []


def test_dry_run_results_md_is_the_table(dry_run):
    results = json.loads((dry_run / "results.json").read_text())
    md = (dry_run / "results.md").read_text()
    assert "| check | ms | ratio | ratio to | peak MiB | notes |" in md
    table = [line for line in md.splitlines() if line.startswith("| ") and not line.startswith("| check")]
    assert len(table) == len(results["rows"])
    assert all(line.startswith(f"| {row['name']} |") for line, row in zip(table, results["rows"]))
    assert "dry run" in md and "Tests: not run." in md


def _junit(path, tests: int, failures: int, errors: int, skipped: int, failed_case: str | None = None) -> None:
    case = f'<testcase classname="tests.x" name="{failed_case}"><failure message="boom"/></testcase>' if failed_case else ""
    path.write_text(f'<?xml version="1.0"?><testsuites><testsuite name="pytest" tests="{tests}" failures="{failures}" '
                    f'errors="{errors}" skipped="{skipped}" time="1.0">{case}</testsuite></testsuites>')


def test_test_summary_sums_the_shards_and_marks_a_timeout(tmp_path):
    bench = _load_bench()
    _junit(tmp_path / "junit-0.xml", tests=10, failures=1, errors=0, skipped=2, failed_case="test_a")
    _junit(tmp_path / "junit-1.xml", tests=5, failures=0, errors=1, skipped=0)
    for shard, rc in ((0, 1), (1, 124), (2, 137)):  # shard 2 was killed before writing its report
        (tmp_path / f"shard-{shard}.rc").write_text(f"{rc}\n")
    t = bench.tests_summary(tmp_path, 42.04)
    assert (t["passed"], t["failed"], t["skipped"], t["seconds"]) == (11, 3, 2, 42.0)
    assert t["timed_out"] and "tests.x::test_a" in t["failures"]
    assert any(f.startswith("shard-2: no JUnit report") for f in t["failures"])


def test_record_tests_keeps_the_rows_and_writes_the_summary(tmp_path, dry_run):
    out = tmp_path / "out"
    shutil.copytree(dry_run, out)
    (tmp_path / "tests").mkdir()
    _junit(tmp_path / "tests" / "junit-0.xml", tests=4, failures=0, errors=0, skipped=1)
    (tmp_path / "tests" / "shard-0.rc").write_text("0\n")
    r = subprocess.run([sys.executable, str(BENCH), "--out", str(out), "--record-tests", str(tmp_path / "tests"),
                        "--tests-seconds", "7"], capture_output=True, text=True, timeout=120, env={**os.environ, **NO_GPU})
    assert r.returncode == 0, r.stderr
    before = json.loads((dry_run / "results.json").read_text())
    after = json.loads((out / "results.json").read_text())
    assert after["rows"] == before["rows"]
    assert {k: after["tests"][k] for k in ("passed", "failed", "skipped", "seconds")} == {
        "passed": 3, "failed": 0, "skipped": 1, "seconds": 7.0}
    assert "Tests: 3 passed, 0 failed, 1 skipped in 7 s." in (out / "results.md").read_text()


def test_test_shards_cover_every_test_file_once_gpu_tests_first():
    bench = _load_bench()
    shards = bench.shard_test_files(3)
    files = [f for shard in shards for f in shard]
    expected = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").rglob("test_*.py"))
    assert sorted(files) == expected and len(shards) == 3
    assert shards[0][0] == "tests/megatron/test_gpu.py"
    quick = [f for shard in bench.shard_test_files(2, quick=True) for f in shard]
    assert quick[0] == "tests/megatron/test_gpu.py" and "tests/losses" in quick


def test_gpu_tests_skip_with_the_reason_without_a_gpu():
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                        "tests/megatron/test_gpu.py"], capture_output=True, text=True, timeout=300, cwd=ROOT,
                       env={**os.environ, **NO_GPU})
    assert r.returncode == 0, r.stdout[-3000:]
    assert "4 skipped" in r.stdout and "passed" not in r.stdout
    skipped = [line for line in r.stdout.splitlines() if line.startswith("SKIPPED")]
    assert skipped and all("needs a CUDA GPU" in line or "needs Transformer Engine" in line for line in skipped)
