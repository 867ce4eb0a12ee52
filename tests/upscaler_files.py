"""Tiny upscaler models with random weights, saved as the files SDXL_UPSCALER_DIR holds.

Built with spandrel's own architecture classes (ESRGAN's RRDBNet, Real-ESRGAN Compact's
SRVGGNetCompact), so spandrel detects them as it would the real ones; a few channels and
blocks keep them fast on a CPU.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from sdxl_service.engine.upscalers import spandrel_module


def _save(module: torch.nn.Module, path: Path) -> Path:
    state = {key: value.contiguous() for key, value in module.state_dict().items()}
    if path.suffix == ".pth":
        torch.save(state, path)
    else:
        save_file(state, path)
    return path


def esrgan(path: Path, *, scale: int = 2, seed: int = 0) -> Path:
    """A tiny ESRGAN (RRDBNet, the old architecture's keys): 8 filters, one block."""
    spandrel_module()
    from spandrel.architectures.ESRGAN import ESRGAN

    torch.manual_seed(seed)
    return _save(ESRGAN(in_nc=3, out_nc=3, num_filters=8, num_blocks=1, scale=scale), path)


def compact(path: Path, *, scale: int = 4, seed: int = 1) -> Path:
    """A tiny Real-ESRGAN Compact (SRVGGNetCompact): 8 features, two convolutions."""
    spandrel_module()
    from spandrel.architectures.Compact import Compact

    torch.manual_seed(seed)
    model = Compact(num_in_ch=3, num_out_ch=3, num_feat=8, num_conv=2, upscale=scale)
    return _save(model, path)


def unknown(path: Path) -> Path:
    """A .safetensors file whose tensors are no architecture spandrel knows."""
    save_file({"weights.of.something": torch.zeros(3, 5)}, path)
    return path
