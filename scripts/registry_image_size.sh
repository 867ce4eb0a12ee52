#!/usr/bin/env bash
# Record a built image in the Prem registry manifest:
# dockerImages.gpu.image = IMAGE, dockerImages.gpu.size = its size in bytes.
#
#   scripts/registry_image_size.sh IMAGE [MANIFEST]
#
# The size comes from `docker inspect -f '{{.Size}}' IMAGE` (the number the
# Prem daemon compares with free disk). IMAGE_SIZE=<bytes> skips docker: for a
# size read on another machine, and for the tests, which have no docker engine.
set -euo pipefail

usage() {
    echo "usage: $0 IMAGE [MANIFEST]   (IMAGE_SIZE=<bytes> to skip docker inspect)" >&2
    exit 2
}

[[ $# -ge 1 && $# -le 2 ]] || usage
image=$1
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
manifest=${2:-$root/registry/diffuser-stable-diffusion-xl-with-refiner/manifest.json}
[[ -f $manifest ]] || { echo "no manifest at $manifest" >&2; exit 1; }

# The manifest pins an exact tag; "latest" or no tag would let the daemon pull
# something other than what was measured.
if [[ ! $image =~ :[A-Za-z0-9_][A-Za-z0-9_.-]*$ || $image == *:latest ]]; then
    echo "IMAGE must carry a pinned tag (not :latest): $image" >&2
    exit 2
fi

if [[ -n ${IMAGE_SIZE:-} ]]; then
    size=$IMAGE_SIZE
else
    command -v docker >/dev/null || { echo "docker not found; set IMAGE_SIZE" >&2; exit 1; }
    size=$(docker inspect -f '{{.Size}}' "$image")
fi
if [[ ! $size =~ ^[1-9][0-9]*$ ]]; then
    echo "image size must be a positive number of bytes, got '$size'" >&2
    exit 1
fi

python=${PYTHON:-}
if [[ -z $python ]]; then
    if [[ -x $root/.venv/bin/python ]]; then python=$root/.venv/bin/python; else python=python3; fi
fi

# Python rather than jq: it is always here, keeps the key order and rewrites the
# file atomically (a half-written manifest must never be committed).
"$python" - "$manifest" "$image" "$size" <<'PY'
import json
import os
import sys
import tempfile

path, image, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
with open(path) as f:
    manifest = json.load(f)
gpu = manifest.setdefault("dockerImages", {}).setdefault("gpu", {})
gpu["size"] = size
gpu["image"] = image
folder = os.path.dirname(os.path.abspath(path))
fd, tmp = tempfile.mkstemp(dir=folder, prefix=".manifest.", suffix=".json")
with os.fdopen(fd, "w") as f:
    json.dump(manifest, f, indent=2, ensure_ascii=False)
    f.write("\n")
os.chmod(tmp, 0o644)
os.replace(tmp, path)
print(f"{path}: dockerImages.gpu = {image} ({size} bytes, {size / 1e9:.1f} GB)")
PY
