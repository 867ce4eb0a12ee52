"""Upscaler models through spandrel: detected, tiled, cached, halved on out of memory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from sdxl_service.engine import upscalers as upscalers_module
from sdxl_service.engine.upscalers import (
    TILE_OVERLAP,
    UnusableUpscaler,
    UpscalerModels,
    load_upscaler,
    picture_tensor,
    tensor_picture,
    upscale_tensor,
)
from tests import upscaler_files


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("upscalers")
    upscaler_files.esrgan(folder / "tiny-esrgan.safetensors", scale=2)
    upscaler_files.compact(folder / "tiny-compact.safetensors", scale=4)
    upscaler_files.compact(folder / "tiny-compact-pth.pth", scale=2, seed=3)
    upscaler_files.unknown(folder / "mystery.safetensors")
    (folder / "notes.txt").write_text("not a model")
    return folder


def picture(width: int, height: int, seed: int = 5) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


def spandrel_whole(path: Path, image: Image.Image) -> Image.Image:
    """spandrel's model applied to the whole picture at once, untiled."""
    model = load_upscaler(path)
    with torch.inference_mode():
        return tensor_picture(model(picture_tensor(image, "cpu", torch.float32)).float())


def test_spandrel_describes_each_file_and_names_what_it_does_not_know(folder: Path) -> None:
    described = UpscalerModels(folder).describe()
    assert described["tiny-esrgan"] == {
        "name": "tiny-esrgan",
        "format": "safetensors",
        "architecture": "ESRGAN",
        "scale": 2,
        "purpose": "SR",
    }
    assert described["tiny-compact"]["architecture"] == "RealESRGAN Compact"
    assert described["tiny-compact"]["scale"] == 4
    assert (described["tiny-compact-pth"]["format"], described["tiny-compact-pth"]["scale"]) == (
        "pth",
        2,
    )
    assert "spandrel does not know" in str(described["mystery"]["problem"])
    assert "notes" not in described
    # Problems name files, never their folder.
    assert str(folder) not in str(described["mystery"]["problem"])


def test_a_file_spandrel_does_not_know_is_refused(folder: Path) -> None:
    with pytest.raises(UnusableUpscaler, match="spandrel does not know"):
        UpscalerModels(folder).model("mystery")
    with pytest.raises(UnusableUpscaler, match="no upscaler"):
        UpscalerModels(folder).model("absent")


@pytest.mark.parametrize(
    ("name", "scale"), [("tiny-esrgan", 2), ("tiny-compact", 4), ("tiny-compact-pth", 2)]
)
def test_the_tiled_upscale_equals_spandrel_on_the_whole_picture(
    folder: Path, name: str, scale: int
) -> None:
    # Tiles of 32 px over 100x72: 4x3 tiles, each reaching TILE_OVERLAP further.
    models = UpscalerModels(folder, tile=32)
    source = picture(100, 72)
    ours = models.upscale(name, source, 100 * scale, 72 * scale)
    path = next(folder.glob(f"{name}.*"))
    theirs = spandrel_whole(path, source)
    assert ours.size == theirs.size == (100 * scale, 72 * scale)
    difference = np.abs(np.asarray(ours, np.int16) - np.asarray(theirs, np.int16))
    assert difference.max() <= 1  # float rounding of different tile shapes, at most


def test_the_model_scale_then_lanczos_to_the_exact_size(folder: Path) -> None:
    source = picture(40, 30)
    models = UpscalerModels(folder)
    ours = models.upscale("tiny-compact", source, 100, 76)  # 4x is 160x120: Lanczos down
    expected = spandrel_whole(folder / "tiny-compact.safetensors", source).resize(
        (100, 76), Image.Resampling.LANCZOS
    )
    assert ours.size == (100, 76)
    assert np.array_equal(np.asarray(ours), np.asarray(expected))


def test_each_model_is_loaded_once_and_the_least_recently_used_unloaded(
    folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loads: list[str] = []
    real = upscalers_module.load_upscaler

    def counting(path: Path, device: Any = "cpu") -> Any:
        loads.append(path.stem)
        return real(path, device)

    monkeypatch.setattr(upscalers_module, "load_upscaler", counting)
    models = UpscalerModels(folder, cache=2)
    first = models.model("tiny-esrgan")
    assert models.model("tiny-esrgan") is first
    models.model("tiny-compact")
    models.model("tiny-compact-pth")  # past the cache of 2: tiny-esrgan goes
    models.model("tiny-esrgan")
    assert loads == ["tiny-esrgan", "tiny-compact", "tiny-compact-pth", "tiny-esrgan"]


class RunsOutOfMemory:
    """An upscaler of scale 2 (nearest) that runs out of memory past `limit` input pixels a
    side, as a CUDA card would on a large tile."""

    scale = 2
    supports_half = False

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.sides: list[int] = []

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        side = max(image.shape[-2:])
        self.sides.append(side)
        if side > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return image.repeat_interleave(2, dim=-2).repeat_interleave(2, dim=-1)


def test_the_tile_is_halved_on_out_of_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = RunsOutOfMemory(limit=128 + 2 * TILE_OVERLAP)
    models = UpscalerModels(None, tile=512)
    monkeypatch.setattr(models, "model", lambda name: fake)
    source = picture(300, 260)
    result = models.upscale("fake", source, 600, 520)
    # 512 and 256 ran out; tiles of 128 (192 with their overlap) fit.
    assert max(fake.sides[:1]) > fake.limit
    assert max(fake.sides[-1:]) <= fake.limit
    assert np.array_equal(
        np.asarray(result), np.asarray(source.resize((600, 520), Image.Resampling.NEAREST))
    )


def test_out_of_memory_at_the_smallest_tile_is_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    models = UpscalerModels(None, tile=128)
    monkeypatch.setattr(models, "model", lambda name: RunsOutOfMemory(limit=10))
    with pytest.raises(torch.OutOfMemoryError):
        models.upscale("fake", picture(200, 200), 400, 400)


def test_tiles_cover_a_picture_whose_sides_are_no_multiple_of_the_tile() -> None:
    fake = RunsOutOfMemory(limit=10_000)
    image = picture_tensor(picture(70, 45), "cpu", torch.float32)
    out = upscale_tensor(fake, image, 32)
    assert out.shape == (1, 3, 90, 140)
    expected = image.repeat_interleave(2, dim=-2).repeat_interleave(2, dim=-1)
    assert torch.equal(out, expected)
