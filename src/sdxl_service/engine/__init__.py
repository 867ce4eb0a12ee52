"""Loads the SDXL base + refiner pair and renders batches of images.

Imported only inside the GPU process (and by tests and the GPU bench). The
modules: `devices` (the auto settings, dtypes), `loading` (the pipelines),
`optimisations`, `components` (modules built from configs, random weights),
`prompts`, `latents` (the VAE side), `inpainting` (the inpaint pipeline given
latents), `handover` (base/refiner step split) and `engine` (the `Engine` that
runs them).
"""

from .engine import Engine, StageObserver

__all__ = ["Engine", "StageObserver"]
