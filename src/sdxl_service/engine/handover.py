"""How the denoising steps of a render are split between the base and the refiner.

The numbers are diffusers' own: the ensemble cuts the schedule at
`denoising_end`/`denoising_start`, img2img runs the last `int(steps * strength)`
steps of it. Computing them here lets the engine decide which stages run, and
the GPU bench report the split it measured, without running a UNet.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..choices import RefinerMode, ScheduleType
from ..contract.render_request import RenderParams
from .schedulers import make_scheduler


def ensemble_split(
    steps: int,
    high_noise_frac: float,
    scheduler: str,
    scheduler_config: Mapping[str, Any],
    *,
    strength: float = 1.0,
    schedule_type: str = ScheduleType.AUTOMATIC,
) -> tuple[int, int]:
    """(base, refiner) denoising steps of an ensemble render handing over at `high_noise_frac`.

    An edit (`strength` < 1) runs the last int(steps * strength) steps of the
    schedule (diffusers' img2img `get_timesteps`); the base takes those at or
    above the `denoising_end` cut-off, the refiner the rest. A base count of 0
    means the refiner makes the edit alone. Counts are UNet calls: a second-order
    scheduler (Heun, DPM2) makes two a step, and diffusers' refiner then starts on the
    second of a pair the cut-off splits (its img2img `get_timesteps`).
    """
    schedule = make_scheduler(scheduler, scheduler_config, schedule_type)
    schedule.set_timesteps(steps)
    skipped = steps - min(int(steps * strength), steps)
    train_steps = schedule.config.num_train_timesteps
    cutoff = round(train_steps - high_noise_frac * train_steps)
    timesteps = schedule.timesteps[skipped * schedule.order :]
    base, refiner = int((timesteps >= cutoff).sum()), int((timesteps < cutoff).sum())
    if schedule.order == 2 and refiner % 2 == 0 and refiner < len(timesteps):
        refiner += 1
    return base, refiner


def sequential_strength(steps: int, high_noise_frac: float) -> float:
    """img2img strength for the sequential refiner: diffusers' `1 - high_noise_frac`.

    The refiner re-noises the finished base image and runs the last
    int(steps * strength) steps of the schedule, as diffusers' refiner recipe
    with `num_inference_steps=steps` does — float error included:
    30 * (1 - 0.8) = 5.999..., so 5 steps. Where that is none (diffusers would
    raise), the strength of one step instead.
    """
    strength = 1.0 - high_noise_frac
    if int(steps * strength) >= 1:
        return strength
    return min(1.0, 1.5 / steps)


def refiner_handover(params: RenderParams, *, base_runs: bool) -> dict[str, Any] | None:
    """The arguments that start the refiner where the base left off; None: no refiner pass."""
    mode = RefinerMode(params.refiner)
    if mode is RefinerMode.NONE:
        return None
    if not base_runs:
        return {"strength": params.strength}
    if mode is RefinerMode.ENSEMBLE:
        return {"denoising_start": params.high_noise_frac}
    # An edit's refiner pass re-noises no more than the edit itself did.
    share = sequential_strength(params.num_inference_steps, params.high_noise_frac)
    return {"strength": min(params.strength, share)}
