"""Noise schedulers by the names the API accepts.

Each name is a diffusers scheduler class plus the settings that make it the
sampler people know by that name; it is built from a model's own scheduler
config so the training noise schedule (betas, spacing, offset) is kept.

All of these are first-order in diffusers' sense (`scheduler.order == 1`), so
splitting the timesteps at `denoising_end`/`denoising_start` hands the refiner
exactly the steps the base skipped. The multistep solvers restart at the split
with a first-order step, because the refiner's scheduler has no history of the
base's model outputs; that is diffusers' documented behaviour for the ensemble.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..choices import SchedulerName


@dataclass(frozen=True)
class SchedulerRecipe:
    class_name: str  # attribute of the `diffusers` package
    overrides: Mapping[str, Any] = field(default_factory=dict)


SCHEDULERS: dict[SchedulerName, SchedulerRecipe] = {
    # SDXL 1.0's own scheduler.
    SchedulerName.EULER: SchedulerRecipe("EulerDiscreteScheduler"),
    SchedulerName.EULER_A: SchedulerRecipe("EulerAncestralDiscreteScheduler"),
    SchedulerName.DPMPP_2M: SchedulerRecipe(
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": False},
    ),
    SchedulerName.DPMPP_2M_KARRAS: SchedulerRecipe(
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    SchedulerName.DDIM: SchedulerRecipe("DDIMScheduler"),
    SchedulerName.UNIPC: SchedulerRecipe("UniPCMultistepScheduler"),
    # As SDXL-Lightning's and Hyper-SD's model cards set it up: the last timestep is the
    # noisiest (SDXL's own "leading" spacing starts a 4-step run well below it).
    SchedulerName.EULER_TRAILING: SchedulerRecipe(
        "EulerDiscreteScheduler", {"timestep_spacing": "trailing"}
    ),
    SchedulerName.LCM: SchedulerRecipe("LCMScheduler"),
    SchedulerName.TCD: SchedulerRecipe("TCDScheduler"),
}


def make_scheduler(name: str, config: Mapping[str, Any]) -> Any:
    """A fresh scheduler `name` built from a model's scheduler `config`.

    Fresh on every call because schedulers carry per-run state (step index,
    solver history); sharing one between calls would leak it.
    """
    try:
        recipe = SCHEDULERS[SchedulerName(name)]
    except ValueError:
        names = ", ".join(SchedulerName)
        raise ValueError(f"unknown scheduler {name!r}; valid names: {names}") from None

    import diffusers

    scheduler_class = getattr(diffusers, recipe.class_name)
    return scheduler_class.from_config(dict(config), **recipe.overrides)
