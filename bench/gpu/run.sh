#!/usr/bin/env bash
# Run THERE, on the GPU machine (no network), after `bash bench/gpu/prepare.sh` here:
#
#   bash bench/gpu/run.sh OUTDIR            # the whole run, about 8 minutes
#   bash bench/gpu/run.sh --smoke OUTDIR    # every part on the CPU, tiny configs
#
# Makes a virtual environment that sees the machine's own torch, transformers and
# accelerate (--system-site-packages), installs bench/gpu/wheels/ into it offline,
# then runs bench/gpu/run.py: engine alone, the service through HTTP, what a
# ControlNet and an IP-Adapter add (bench/gpu_controls.py), the optimisation
# matrix, each time-boxed. OUTDIR gets results.jsonl (as it comes),
# results.json, results.md, and each part's log.
#
#   SDXL_GPU_BENCH_PYTHON=.venv/bin/python   use this interpreter as it is (no venv,
#                                            no wheels): the tests' smoke run
#   SDXL_GPU_BENCH_BUDGET_S=480              seconds for everything, install included
#   SDXL_GPU_BENCH_WHEELS, SDXL_GPU_BENCH_VENV, SDXL_GPU_BENCH_BASE_PYTHON (python3)
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
STARTED=$SECONDS
SMOKE=()
OUT=""
for arg in "$@"; do
    case "$arg" in
        --smoke) SMOKE=(--smoke) ;;
        -*) echo "usage: $0 [--smoke] OUTDIR" >&2; exit 2 ;;
        *) OUT="$arg" ;;
    esac
done
if [[ -z $OUT ]]; then
    echo "usage: $0 [--smoke] OUTDIR" >&2
    exit 2
fi
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
if [[ ${#SMOKE[@]} -gt 0 ]]; then
    BUDGET_S="${SDXL_GPU_BENCH_BUDGET_S:-150}"
else
    BUDGET_S="${SDXL_GPU_BENCH_BUDGET_S:-480}"
fi

if [[ -n ${SDXL_GPU_BENCH_PYTHON:-} ]]; then
    PY="$SDXL_GPU_BENCH_PYTHON"
else
    WHEELS="${SDXL_GPU_BENCH_WHEELS:-$REPO/bench/gpu/wheels}"
    VENV="${SDXL_GPU_BENCH_VENV:-${TMPDIR:-/tmp}/sdxl-gpu-bench-venv}"
    BASE_PYTHON="${SDXL_GPU_BENCH_BASE_PYTHON:-python3}"
    if [[ ! -f $WHEELS/needed.txt ]]; then
        echo "run.sh: no $WHEELS/needed.txt: run 'bash bench/gpu/prepare.sh' where PyPI is reachable" >&2
        exit 2
    fi
    rm -rf "$VENV"
    # Without ensurepip (no python3-venv), the venv still reaches the machine's pip.
    "$BASE_PYTHON" -m venv --system-site-packages "$VENV" 2>"$OUT/venv.log" \
        || { rm -rf "$VENV"; "$BASE_PYTHON" -m venv --system-site-packages --without-pip "$VENV"; } \
        || { echo "run.sh: cannot create a venv with $BASE_PYTHON" >&2; exit 2; }
    PY="$VENV/bin/python"
    PIP=("$PY" -m pip install --quiet --disable-pip-version-check --no-index --find-links "$WHEELS")
    # pip resolves the dependencies: the machine's packages count where they satisfy,
    # a fallback wheel replaces one that does not (in the venv only).
    if ! "${PIP[@]}" -r "$WHEELS/needed.txt" >"$OUT/pip-install.log" 2>&1; then
        echo "run.sh: resolving install failed (see pip-install.log); installing without deps" >&2
        "${PIP[@]}" --no-deps -r "$WHEELS/needed.txt" >>"$OUT/pip-install.log" 2>&1
        # Fallbacks only for what the machine lacks altogether.
        "$PY" - "$WHEELS/fallback.txt" >"$OUT/fallback-missing.txt" <<'EOF'
import sys
from importlib import metadata
for line in open(sys.argv[1]).read().split():
    try:
        metadata.version(line.split("==")[0])
    except metadata.PackageNotFoundError:
        print(line)
EOF
        if [[ -s $OUT/fallback-missing.txt ]]; then
            "${PIP[@]}" --no-deps -r "$OUT/fallback-missing.txt" >>"$OUT/pip-install.log" 2>&1
        fi
    fi
    "$PY" -m pip check >"$OUT/pip-check.txt" 2>&1 || true
    PYTHONPATH="$REPO/src" "$PY" -c \
        "import diffusers, bentoml, fastapi, pydantic_settings, multipart, psutil, sdxl_service" \
        >"$OUT/imports.txt" 2>&1 || echo "run.sh: an import fails, see imports.txt" >&2
    echo "run.sh: venv $VENV ready after $((SECONDS - STARTED)) s" >&2
fi

LEFT=$((BUDGET_S - (SECONDS - STARTED)))
cd "$REPO"
# run.py keeps to its budget; the timeout is the backstop (SIGTERM stops the
# service it started; SIGKILL 30 s later).
PYTHONPATH="$REPO/src${PYTHONPATH:+:$PYTHONPATH}" timeout --kill-after=30 $((LEFT + 20)) \
    "$PY" "$REPO/bench/gpu/run.py" "$OUT" --budget-s "$LEFT" "${SMOKE[@]}"
status=$?
echo "run.sh: exit $status after $((SECONDS - STARTED)) s; results in $OUT" >&2
exit $status
