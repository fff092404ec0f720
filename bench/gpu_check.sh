#!/usr/bin/env bash
# GPU readiness in one command: megadistill's test suite on a CUDA machine (NCCL, Transformer Engine
# where importable, bf16), then the timing table of bench/gpu_check.py; results.json and results.md
# in the output directory. Designed to finish within 10 minutes on one H100 (each part has a time
# limit; a part cut short is reported as such). On a machine without a CUDA GPU it says so and exits 0.
#
# It uses the CUDA torch already installed (as in NVIDIA's containers) and never installs torch.
# GPU machines often have no package index: what else is missing (megatron-core, DeepSpeed, the
# test dependencies) comes from a wheel directory that --download fills on a machine with one.
set -euo pipefail

usage() {
    cat <<'EOF'
usage: bash bench/gpu_check.sh [--wheels DIR] [--out DIR] [--quick] [--jobs N]
       bash bench/gpu_check.sh --download DIR [--python-version X.Y] [--mcore VERSION]

Run (the default), on a machine with a CUDA GPU:
  --wheels DIR   install what is missing from the wheels in DIR only (pip --no-index);
                 without it, pip's configured index is used
  --out DIR      results.json, results.md, logs and the check's venv
                 (default: ${TMPDIR:-/tmp}/megadistill-gpu-check)
  --quick        the GPU tests and a core subset, one vocabulary, fewer repetitions
  --jobs N       test-suite processes in parallel (default: CPU cores / 3, 1 to 6)
Without a CUDA GPU it prints "no CUDA GPU here: nothing run" and exits 0, touching nothing.

Download, on a machine with internet, for a GPU machine without it:
  --download DIR        fill DIR with wheels: this project's, DeepSpeed's (built here from its
                        source release, pure Python), megatron-core and every other dependency
                        of the run and of the tests, except torch and its CUDA libraries
  --python-version X.Y  the GPU machine's Python (default 3.12, NVIDIA's containers)
  --mcore VERSION       the megatron-core release to fetch (default 0.19.2)

The environment variable PYTHON names the interpreter (default python3).
EOF
}

die() {
    echo "gpu_check.sh: $*" >&2
    exit 2
}

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}
download="" wheels="" out="" quick=0 jobs="" pyversion=3.12 mcore=0.19.2

value() {  # value FLAG "$@" -> the flag's argument, or a one-line error
    if [ $# -lt 3 ] || [ -z "$3" ] || [ "${3#--}" != "$3" ]; then
        die "$2 needs a value (see --help)"
    fi
    printf '%s' "$3"
}

while [ $# -gt 0 ]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --download) download=$(value x "$@"); shift 2 ;;
        --wheels) wheels=$(value x "$@"); shift 2 ;;
        --out) out=$(value x "$@"); shift 2 ;;
        --jobs) jobs=$(value x "$@"); shift 2 ;;
        --python-version) pyversion=$(value x "$@"); shift 2 ;;
        --mcore) mcore=$(value x "$@"); shift 2 ;;
        --quick) quick=1; shift ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
done
if [ -n "$jobs" ] && ! [[ "$jobs" =~ ^[1-9][0-9]*$ ]]; then
    die "--jobs needs a positive integer, got '$jobs'"
fi

# --------------------------------------------------------------------------- --download DIR

download_wheels() {
    local dir report
    mkdir -p "$1"
    dir=$(cd "$1" && pwd)
    tmp=$(mktemp -d)  # global: the EXIT trap runs after this function has returned
    trap 'rm -rf "$tmp"' EXIT
    local target=(--only-binary=:all: --python-version "$pyversion" --implementation cp
                  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64)

    echo "gpu_check.sh: [1/4] this project's wheel -> $dir"
    "$PYTHON" -m pip wheel --quiet --no-deps -w "$dir" "$ROOT"
    local project  # the newest megadistill wheel there: the one just built
    project=$(find "$dir" -maxdepth 1 -name 'megadistill-*.whl' -printf '%T@ %p\n' | sort -rn | head -n 1 | cut -d' ' -f2-)
    [ -n "$project" ] || die "pip wheel left no megadistill wheel in $dir"

    # PyPI has DeepSpeed only as a source release. Built without its ops (DS_BUILD_OPS=0), the wheel
    # is pure Python: the ops DeepSpeed needs compile just in time on the GPU machine.
    echo "gpu_check.sh: [2/4] DeepSpeed: PyPI has only its source; building a pure-Python wheel here (DS_BUILD_OPS=0)"
    DS_BUILD_OPS=0 "$PYTHON" -m pip wheel --quiet --no-deps -w "$dir" "deepspeed>=0.16"

    echo "gpu_check.sh: [3/4] resolving for CPython $pyversion on manylinux x86_64 (torch and its CUDA libraries left out)"
    report="$tmp/report.json"
    "$PYTHON" -m pip install --quiet --dry-run --ignore-installed --report "$report" --target "$tmp/target" \
        "${target[@]}" --find-links "$dir" "megadistill[dev] @ file://$project" "megatron-core==$mcore"
    local wanted
    wanted=$("$PYTHON" - "$report" "$dir" <<'EOF'
import json, re, sys
report, here = sys.argv[1], sys.argv[2]
for item in json.load(open(report))["install"]:
    name = re.sub(r"[-_.]+", "-", item["metadata"]["name"]).lower()
    # torch and what only a CUDA torch brings: the GPU machine's own build is used, never replaced.
    if name in ("torch", "triton", "pytorch-triton") or name.startswith(("nvidia-", "cuda-")):
        continue
    if item["download_info"]["url"].startswith("file://" + here):
        continue  # built above
    print(f"{name}=={item['metadata']['version']}")
EOF
)
    local reqs=()
    mapfile -t reqs <<<"$wanted"
    echo "gpu_check.sh: [4/4] downloading ${#reqs[@]} wheels"
    "$PYTHON" -m pip download --quiet --no-deps "${target[@]}" -d "$dir" "${reqs[@]}"
    echo "gpu_check.sh: $(find "$dir" -maxdepth 1 -name '*.whl' | wc -l) wheels in $dir ($(du -sh "$dir" | cut -f1));" \
        "copy it to the GPU machine and run: bash bench/gpu_check.sh --wheels $dir"
}

if [ -n "$download" ]; then
    download_wheels "$download"
    exit 0
fi

# --------------------------------------------------------------------------- the check

# First, before anything is created: is there a GPU at all?
if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1; then
    echo "no CUDA GPU here: nothing run"
    exit 0
fi

# Time limits (seconds), each part's worst case with its 15 s grace after SIGINT: install 120 +
# timing table 165 + tests 285 = 570 s, under 10 minutes on one H100 (typically much less).
if [ "$quick" = 1 ]; then
    install_limit=120 bench_limit=100 tests_limit=150
else
    install_limit=120 bench_limit=150 tests_limit=270
fi
if [ -z "$jobs" ]; then
    jobs=$(( $(nproc) / 3 ))  # a test runs up to 4 ranks of one thread each
    [ "$jobs" -ge 1 ] || jobs=1
    [ "$jobs" -le 6 ] || jobs=6
fi
out=${out:-${TMPDIR:-/tmp}/megadistill-gpu-check}
mkdir -p "$out"
out=$(cd "$out" && pwd)
began=$SECONDS
rm -f "$out/results.json" "$out/results.md"  # this check's results only, never a former one's
echo "gpu_check.sh: results in $out"

# A venv over the system's packages: the installed CUDA torch (and Transformer Engine, apex, ...) stay
# as they are; only what is missing goes into the venv.
venv="$out/venv"
if [ ! -x "$venv/bin/python" ]; then
    "$PYTHON" -m venv --system-site-packages "$venv" 2>/dev/null \
        || "$PYTHON" -m venv --system-site-packages --without-pip "$venv"
fi
vpy="$venv/bin/python"
"$vpy" -m pip --version >/dev/null 2>&1 || die "no pip in $venv or in $PYTHON's packages"

# pip may add packages, never touch torch: it is held at the installed build.
"$vpy" -c 'import torch; print(f"torch=={torch.__version__}")' >"$out/constraints.txt"
pip_source=(--constraint "$out/constraints.txt")
if [ -n "$wheels" ]; then
    [ -d "$wheels" ] || die "--wheels: no directory $wheels"
    pip_source+=(--no-index --find-links "$(cd "$wheels" && pwd)")
fi
missing=$("$vpy" - "$ROOT/pyproject.toml" <<'EOF'
# The project's requirements (runtime and dev) that this environment does not meet, torch excepted.
import importlib.metadata as md, sys
try:
    import tomllib
except ImportError:  # Python < 3.11
    from pip._vendor import tomli as tomllib
try:
    from packaging.requirements import Requirement
except ImportError:
    from pip._vendor.packaging.requirements import Requirement
project = tomllib.load(open(sys.argv[1], "rb"))["project"]
for line in project["dependencies"] + project.get("optional-dependencies", {}).get("dev", []):
    req = Requirement(line)
    try:
        have = md.version(req.name)
    except md.PackageNotFoundError:
        have = None
    if req.name == "torch":
        if have and not req.specifier.contains(have, prereleases=True):
            print(f"gpu_check.sh: torch {have} is outside this project's range {req.specifier}; using it anyway",
                  file=sys.stderr)
        continue
    if have is None or not req.specifier.contains(have, prereleases=True):
        print(line)
EOF
)
if [ -n "$missing" ]; then
    reqs=()
    mapfile -t reqs <<<"$missing"
    echo "gpu_check.sh: installing into the venv (limit ${install_limit} s): ${reqs[*]}"
    set +e
    timeout "$install_limit" "$vpy" -m pip install "${pip_source[@]}" "${reqs[@]}" >"$out/install.log" 2>&1
    rc=$?
    set -e
    if [ "$rc" != 0 ]; then
        tail -n 15 "$out/install.log" >&2
        die "could not install ${reqs[*]} (exit status $rc, $out/install.log): on a machine with internet" \
            "run 'bash bench/gpu_check.sh --download DIR', then pass --wheels DIR here"
    fi
fi
if [ -n "$wheels" ] && compgen -G "$wheels/megadistill-*.whl" >/dev/null; then
    "$vpy" -m pip install --quiet --no-deps --force-reinstall "${pip_source[@]}" megadistill  # the CLI, for users
fi
# What runs is this checkout, first on the path: the tests and the bench test this tree.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

status=0
bench_args=(--out "$out")
[ "$quick" = 1 ] && bench_args+=(--quick)
echo "gpu_check.sh: timing table (limit ${bench_limit} s)"
set +e
OMP_NUM_THREADS=8 timeout --signal=INT --kill-after=15 "$bench_limit" \
    "$vpy" "$ROOT/bench/gpu_check.py" "${bench_args[@]}" >"$out/bench.log" 2>&1
rc=$?
set -e
[ "$rc" = 0 ] || { status=1; echo "gpu_check.sh: timing table exit status $rc (see $out/bench.log)"; }

echo "gpu_check.sh: test suite, $jobs processes (limit ${tests_limit} s)"
rm -rf "$out/tests"
mkdir -p "$out/tests"
shard_args=(--shard-tests "$jobs")
[ "$quick" = 1 ] && shard_args+=(--quick-tests)
shards=()
mapfile -t shards < <("$vpy" "$ROOT/bench/gpu_check.py" "${shard_args[@]}")
tests_began=$SECONDS
pids=()
for i in "${!shards[@]}"; do
    read -r -a files <<<"${shards[$i]}"
    (
        cd "$ROOT"
        set +e
        OMP_NUM_THREADS=1 timeout --signal=INT --kill-after=15 "$tests_limit" \
            "$vpy" -m pytest -q -p no:cacheprovider -m "gpu or not gpu" --junitxml="$out/tests/junit-$i.xml" \
            "${files[@]}" >"$out/tests/shard-$i.log" 2>&1
        echo $? >"$out/tests/shard-$i.rc"
    ) &
    pids+=($!)
done
for pid in "${pids[@]}"; do
    wait "$pid" || true
done
"$vpy" "$ROOT/bench/gpu_check.py" --out "$out" --record-tests "$out/tests" \
    --tests-seconds "$((SECONDS - tests_began))" || status=1

echo
cat "$out/results.md"
echo "gpu_check.sh: done in $((SECONDS - began)) s; $out/results.json, $out/results.md; logs: $out/bench.log, $out/tests/"
exit "$status"
