"""How many render workers to start, and which GPU each one renders on.

`SDXL_GPUS` picks GPUs (all visible ones, the first N, or a list of indices),
`SDXL_WORKERS` the number of render worker processes (default: one per picked
GPU, 1 without a GPU). BentoML starts the workers (`workers=`, `resources=`);
each one finds its GPU from its worker index (`bentoml.server_context`).

The picked GPUs are pinned with `CUDA_VISIBLE_DEVICES` in the process that
imports the service first (the one `bentoml serve` starts the workers from), so
every worker sees the same devices numbered 0..N-1 and BentoML's own GPU
allocation (which would hand out the first N GPUs, not the ones picked) stays
off. Torch-free: the HTTP process plans too.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping
from dataclasses import dataclass

CUDA_VISIBLE_DEVICES = "CUDA_VISIBLE_DEVICES"


class GpuSelectionError(ValueError):
    """SDXL_GPUS names GPUs the machine does not have."""


@dataclass(frozen=True)
class WorkerPlan:
    gpus: tuple[int, ...]  # visible device indices, in the order workers take them
    workers: int

    @property
    def gpu_resources(self) -> int:
        # What the render service declares to BentoML (and to BentoCloud's
        # scheduler): one GPU at least, as before several workers existed.
        return max(1, len(self.gpus))

    def device_for(self, worker_index: int) -> str | None:
        """`cuda:K` for BentoML's 1-based worker index; None without a GPU.

        More workers than GPUs share them round-robin.
        """
        if not self.gpus:
            return None
        return f"cuda:{self.gpus[(worker_index - 1) % len(self.gpus)]}"


def visible_gpus(environ: MutableMapping[str, str]) -> list[int]:
    """Indices of the GPUs this process may use."""
    pinned = environ.get(CUDA_VISIBLE_DEVICES)
    if pinned is not None:
        entries = [entry.strip() for entry in pinned.split(",") if entry.strip()]
        # Indices or UUIDs (GPU-..., MIG-...); "-1" or any invalid entry hides
        # every device from that entry on, as CUDA reads the variable.
        usable = []
        for entry in entries:
            if not (entry.isdigit() or entry.startswith(("GPU-", "MIG-"))):
                break
            usable.append(entry)
        return list(range(len(usable)))
    from bentoml._internal.resource import system_resources  # NVML, as BentoML counts them

    return list(system_resources().get("nvidia.com/gpu", []))


def select_gpus(gpus_setting: str, visible: list[int]) -> list[int]:
    """SDXL_GPUS applied to the visible GPUs."""
    value = gpus_setting.strip().lower()
    if value == "all":
        return list(visible)
    if "," not in value:
        count = int(value)
        if count > len(visible):
            raise GpuSelectionError(
                f"SDXL_GPUS={count}: only {len(visible)} GPU(s) are visible to this process"
            )
        return visible[:count]
    wanted = [int(part) for part in value.split(",")]
    missing = sorted(set(wanted) - set(visible))
    if missing:
        raise GpuSelectionError(
            f"SDXL_GPUS={gpus_setting}: no GPU {', '.join(map(str, missing))} "
            f"(visible: {', '.join(map(str, visible)) or 'none'})"
        )
    return list(dict.fromkeys(wanted))


def plan_workers(
    gpus_setting: str, workers_setting: int | None, environ: MutableMapping[str, str]
) -> WorkerPlan:
    """The plan, pinning the picked GPUs in `environ` when nothing pinned them yet.

    Once pinned, `SDXL_GPUS` becomes "all" in `environ` so that the processes
    started from this one (which inherit both) plan the same devices.
    """
    visible = visible_gpus(environ)
    selected = select_gpus(gpus_setting, visible)
    if selected and CUDA_VISIBLE_DEVICES not in environ:
        environ[CUDA_VISIBLE_DEVICES] = ",".join(map(str, selected))
        environ["SDXL_GPUS"] = "all"
        selected = list(range(len(selected)))
    workers = workers_setting or max(1, len(selected))
    return WorkerPlan(gpus=tuple(selected), workers=workers)


def plan_from_environment() -> WorkerPlan:
    from ..settings import get_settings

    settings = get_settings()
    return plan_workers(settings.gpus, settings.workers, os.environ)
