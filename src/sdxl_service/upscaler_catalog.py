"""The upscaler models in SDXL_UPSCALER_DIR: which files there are (no torch).

An upscaler is `<name>.safetensors` or `<name>.pth` (ESRGAN, Real-ESRGAN, SwinIR, HAT, DAT,
... as spandrel knows them). This module only lists the files, so the HTTP process can name
and check them without torch; the render worker loads them with spandrel
(engine/upscalers.py) and describes each (its architecture and scale, or why it cannot be
used), which GET /v1/models shows. The folder is read again whenever it changes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from .choices import HiresUpscaler
from .folder_catalog import NAME_PATTERN, FolderCatalog

# `.pth` is a pickle: spandrel reads it with its restricted unpickler, never plain torch.load.
# `.pt` and `.ckpt` are left out (spandrel tries TorchScript on `.pt`, which runs code).
UPSCALER_FORMATS = {".safetensors": "safetensors", ".pth": "pth"}
_NAME = re.compile(NAME_PATTERN)


@dataclass(frozen=True, kw_only=True)
class UpscalerFile:
    name: str
    path: Path
    format: str  # "safetensors" or "pth"

    def describe(self) -> dict[str, object]:
        return {"name": self.name, "format": self.format}


def is_builtin(name: str) -> bool:
    """`latent` and `lanczos` are the hires fix's own upscalers, whatever files the folder has."""
    return name in HiresUpscaler._value2member_map_


class UpscalerCatalog(FolderCatalog[UpscalerFile]):
    """The upscaler files of one folder by name (the file name without its extension); with
    both `<name>.safetensors` and `<name>.pth`, the safetensors file."""

    def _candidates(self) -> dict[str, Path]:
        found: dict[str, Path] = {}
        if self.folder is None or not self.folder.is_dir():
            return found
        for path in sorted(self.folder.iterdir(), key=lambda p: p.name):
            suffix = path.suffix.lower()
            if suffix not in UPSCALER_FORMATS or not path.is_file():
                continue
            name = path.stem
            if not _NAME.match(name) or is_builtin(name):
                continue
            if name in found and found[name].suffix.lower() == ".safetensors":
                continue
            found[name] = path
        return found

    def _read(self, name: str, path: Path) -> UpscalerFile:
        return UpscalerFile(name=name, path=path, format=UPSCALER_FORMATS[path.suffix.lower()])
