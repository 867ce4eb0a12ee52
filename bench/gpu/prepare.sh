#!/usr/bin/env bash
# Run HERE (with PyPI), before the GPU run: downloads the wheels the GPU machine
# lacks into bench/gpu/wheels/ (git-ignored; it travels with the working tree).
#
#   bash bench/gpu/prepare.sh                  # CPython 3.12 wheels for the GPU machine
#   bash bench/gpu/prepare.sh --dry-run        # print the lists, download nothing
#   bash bench/gpu/prepare.sh --python-version 3.11 --dest /tmp/wheels-311
#                                              # the same set for a local offline check
#
# The list is bench/gpu/wheel_set.py's: our runtime dependency closure minus what
# the GPU machine has (torch, transformers, accelerate, ... are never downloaded),
# at the versions of this repository's .venv. needed.txt is installed there;
# fallback.txt's wheels only where the machine's own version does not satisfy.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PYTHON="${PYTHON:-$REPO/.venv/bin/python}"
PYTHON_VERSION=3.12
DEST="$REPO/bench/gpu/wheels"
DRY_RUN=0
LIMIT_MIB=60

while [[ $# -gt 0 ]]; do
    case "$1" in
        --dry-run) DRY_RUN=1 ;;
        --python-version) PYTHON_VERSION="$2"; shift ;;
        --dest) DEST="$2"; shift ;;
        *) echo "usage: $0 [--dry-run] [--python-version X.Y] [--dest DIR]" >&2; exit 2 ;;
    esac
    shift
done

needed="$("$PYTHON" "$REPO/bench/gpu/wheel_set.py" needed)"
fallback="$("$PYTHON" "$REPO/bench/gpu/wheel_set.py" fallback)"
if [[ $DRY_RUN == 1 ]]; then
    echo "# needed (installed on the GPU machine)"
    echo "$needed"
    echo "# fallback (installed only where the machine's own version does not satisfy)"
    echo "$fallback"
    exit 0
fi

# The GPU machine's glibc is at least 2.28 (torch's CUDA 13 wheels need it); pip
# takes the platform tags literally, so every manylinux tag up to 2.28 is listed.
platforms=()
for tag in manylinux_2_28 manylinux_2_27 manylinux_2_26 manylinux_2_24 manylinux_2_17 \
    manylinux2014 manylinux_2_12 manylinux2010 manylinux_2_5 manylinux1 linux; do
    platforms+=(--platform "${tag}_x86_64")
done

rm -rf "$DEST"
mkdir -p "$DEST"
echo "$needed" >"$DEST/needed.txt"
echo "$fallback" >"$DEST/fallback.txt"
"$PYTHON" -m pip download --quiet --disable-pip-version-check --no-deps \
    --only-binary=:all: --implementation cp --python-version "$PYTHON_VERSION" \
    "${platforms[@]}" --dest "$DEST" -r "$DEST/needed.txt" -r "$DEST/fallback.txt"

if ls "$DEST" | grep -Ei '^(torch|transformers|accelerate|triton|nvidia_)' | grep -viq '^nvidia_ml_py'; then
    echo "prepare.sh: torch/transformers/accelerate must never be downloaded" >&2
    exit 1
fi
count="$(ls "$DEST"/*.whl | wc -l)"
expected="$(cat "$DEST/needed.txt" "$DEST/fallback.txt" | grep -c .)"
bytes="$(du -cb "$DEST"/*.whl | tail -1 | cut -f1)"
mib="$(awk "BEGIN {printf \"%.1f\", $bytes / 1048576}")"
echo "prepare.sh: $count wheels ($expected asked for), $mib MiB in $DEST (limit $LIMIT_MIB MiB)"
if [[ $count -ne $expected ]]; then
    echo "prepare.sh: expected $expected wheels" >&2
    exit 1
fi
if (( bytes > LIMIT_MIB * 1048576 )); then
    echo "prepare.sh: over $LIMIT_MIB MiB" >&2
    exit 1
fi
