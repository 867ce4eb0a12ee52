"""Which wheels the GPU run needs beyond what the GPU machine already has.

The GPU machine has Python 3.12 with torch, transformers, accelerate,
huggingface_hub, safetensors, numpy, pillow, opencv, prometheus-client and
httpx, and no network. Everything else that the service imports (diffusers,
bentoml and its tree, fastapi, pydantic-settings, ...) travels as wheels.

The list is computed offline from this repository's virtual environment: the
dependency closure of pyproject's runtime dependencies, minus the closure of
what the GPU machine has, at the versions installed here (the ones the tests
pass with). Packages in both closures that are small travel as fallbacks: pip
installs one only if the GPU machine's own version does not satisfy a
requirement.

    python bench/gpu/wheel_set.py needed      # name==version, one a line
    python bench/gpu/wheel_set.py fallback
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[2]

# Installed on the GPU machine; used there as they are (the venv sees them through
# --system-site-packages), never downloaded.
ON_GPU_MACHINE = frozenset(
    {
        "torch",
        "transformers",
        "accelerate",
        "huggingface-hub",
        "safetensors",
        "numpy",
        "pillow",
        "opencv-python-headless",
        "prometheus-client",
        "httpx",
    }
)
# Runtime dependencies the GPU run never imports: boto3 serves SDXL_FILES_URL=s3://
# only (and is ~14 MiB with botocore), scipy the LMS sampler only (~35 MiB).
NOT_NEEDED = frozenset({"boto3", "scipy"})
# Never downloaded, even as a fallback: torch's own stack (torchvision is built for one
# torch; spandrel loads its upscalers without it, engine/upscalers.py) and the large
# compiled dependencies of the machine's transformers (a wrong one would break them).
NEVER_DOWNLOADED = re.compile(
    r"^(torch|torchvision|triton|nvidia-(?!ml-py$).*|cuda-.*|transformers|accelerate|tokenizers|hf-xet|numpy|pillow"
    r"|opencv-.*|safetensors|regex|sympy|mpmath|networkx|setuptools)$"
)

# The GPU machine: CPython 3.12 on x86_64 Linux.
TARGET_ENVIRONMENT = {
    "python_version": "3.12",
    "python_full_version": "3.12.0",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "os_name": "posix",
}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def runtime_requirements(pyproject: Path = REPO / "pyproject.toml") -> list[Requirement]:
    project = tomllib.loads(pyproject.read_text())["project"]
    return [Requirement(line) for line in project["dependencies"]]


def _applies(requirement: Requirement, extras: frozenset[str]) -> bool:
    if requirement.marker is None:
        return True
    return any(
        requirement.marker.evaluate({**TARGET_ENVIRONMENT, "extra": extra})
        for extra in (extras or {""})
    )


def closure(
    roots: list[Requirement], provided: frozenset[str] = frozenset()
) -> dict[str, str | None]:
    """name -> installed version (None if not installed here) of `roots` and all they need.

    What a `provided` package needs is not followed: the GPU machine's copy comes
    with its own dependencies, which need not be those of the version here.
    """
    found: dict[str, str | None] = {}
    pending = [(canonical(r.name), frozenset(r.extras)) for r in roots]
    seen: set[tuple[str, frozenset[str]]] = set()
    while pending:
        name, extras = pending.pop()
        if (name, extras) in seen:
            continue
        seen.add((name, extras))
        try:
            distribution = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            found.setdefault(name, None)
            continue
        found[name] = distribution.version
        if name in provided:
            continue
        for line in distribution.requires or []:
            requirement = Requirement(line)
            if _applies(requirement, extras):
                pending.append((canonical(requirement.name), frozenset(requirement.extras)))
    return found


def wheel_sets() -> tuple[dict[str, str | None], dict[str, str | None]]:
    """(needed, fallback): name -> version to download."""
    requirements = runtime_requirements()
    ours = [
        r for r in requirements if canonical(r.name) not in ON_GPU_MACHINE | NOT_NEEDED | {"torch"}
    ]
    machine = [Requirement(name) for name in sorted(ON_GPU_MACHINE)]
    ours_closure = closure(ours, provided=ON_GPU_MACHINE)
    machine_closure = closure(machine)
    downloadable = {
        name: version
        for name, version in ours_closure.items()
        if name not in ON_GPU_MACHINE and not NEVER_DOWNLOADED.match(name)
    }
    needed = {n: v for n, v in downloadable.items() if n not in machine_closure}
    fallback = {n: v for n, v in downloadable.items() if n in machine_closure}
    return dict(sorted(needed.items())), dict(sorted(fallback.items()))


def pins(versions: dict[str, str | None]) -> list[str]:
    return [name if version is None else f"{name}=={version}" for name, version in versions.items()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("which", choices=["needed", "fallback"])
    args = parser.parse_args(argv)
    needed, fallback = wheel_sets()
    print("\n".join(pins(needed if args.which == "needed" else fallback)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
