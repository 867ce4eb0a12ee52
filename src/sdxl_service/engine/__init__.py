"""diffusers alone: loads the SDXL base + refiner pair and renders batches of images.

Imported only inside the render process (and by tests and the benchmarks). The
modules: `config` (what the engine is told), `devices` (the auto settings,
dtypes), `loading` (the pipelines), `optimisations`, `components` (modules built
from configs, random weights), `tiny` (the random-weight tiny preset), `prompts`
and `prompt_syntax`, `schedulers`, `loras`, `previews`, `latents` (the VAE
side), `inpainting` (the inpaint pipeline given latents), `handover`
(base/refiner step split), `safety` (the opt-in safety checker) and `engine` (the
`Engine` that runs them).

Lazy: importing a submodule for a type (`engine.prompt_syntax`, say) does not
import torch; only `Engine` itself does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .engine import Engine, StageObserver

__all__ = ["Engine", "StageObserver"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import engine

        return getattr(engine, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
