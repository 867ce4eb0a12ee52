"""The models of SDXL_MODELS_DIR: folders, single files, sidecars, and files added later."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from sdxl_service import model_catalog
from sdxl_service.choices import RefinerMode, SchedulerName
from sdxl_service.engine import checkpoint_layout
from sdxl_service.model_catalog import ModelCatalog, read_header

W = np.zeros((2, 2), dtype=np.float32)


def checkpoint(path: Path, *prefixes: str) -> Path:
    save_file({f"{prefix}w": W for prefix in prefixes}, str(path))
    return path


def base_file(path: Path) -> Path:
    return checkpoint(
        path,
        model_catalog.UNET,
        model_catalog.CLIP_L,
        model_catalog.BIGG_OF_BASE,
        "first_stage_model.",
    )


@pytest.fixture
def models(tmp_path: Path, tiny_pair: tuple[Path, Path]) -> Path:
    folder = tmp_path / "models"
    folder.mkdir()
    shutil.copytree(tiny_pair[0], folder / "tiny-folder")
    shutil.copytree(tiny_pair[1], folder / "tiny-refiner")
    base_file(folder / "my-file.safetensors")
    checkpoint(
        folder / "refiner-file.safetensors", model_catalog.UNET, model_catalog.BIGG_OF_REFINER
    )
    checkpoint(folder / "a-lora.safetensors", "lora_unet_down_blocks_0.lora_down.")
    checkpoint(folder / "sd15.safetensors", model_catalog.UNET, "cond_stage_model.")
    (folder / "old.ckpt").write_bytes(b"pickle")
    (folder / "notes.txt").write_text("not a model")
    (folder / "no-index").mkdir()
    return folder


def test_the_prefixes_are_the_single_file_loaders() -> None:
    for name in ("UNET", "CLIP_L", "BIGG_OF_BASE", "BIGG_OF_REFINER"):
        assert getattr(model_catalog, name) == getattr(checkpoint_layout, name)


def test_folders_and_files_are_models_named_without_extension(models: Path) -> None:
    entries = ModelCatalog(models).entries()
    assert sorted(entries) == [
        "a-lora",
        "my-file",
        "old",
        "refiner-file",
        "sd15",
        "tiny-folder",
        "tiny-refiner",
    ]
    folder, file = entries["tiny-folder"], entries["my-file"]
    assert (folder.format, folder.layout, folder.problem) == ("diffusers", "base", None)
    assert (file.format, file.layout, file.problem) == ("single_file", "base", None)
    assert folder.pairs_with_refiner and file.pairs_with_refiner
    assert file.size_bytes == (models / "my-file.safetensors").stat().st_size
    weights = sum(p.stat().st_size for p in (models / "tiny-folder").rglob("*") if p.is_file())
    assert folder.size_bytes == weights > 0
    assert folder.describe() == {
        "format": "diffusers",
        "layout": "base",
        "kind": "text_to_image",
        "size_bytes": weights,
        "pairs_with_refiner": True,
        "defaults": {},
    }


def test_an_inpainting_checkpoint_is_a_base_of_its_own_kind(
    tmp_path: Path, tiny_pair: tuple[Path, Path]
) -> None:
    """A 9-channel UNet, told from the folder's unet/config.json or the file's header alone,
    whatever the pipeline class or the file name."""
    folder = tmp_path / "models"
    folder.mkdir()
    shutil.copytree(tiny_pair[0], folder / "inpaint-folder")
    unet_config = folder / "inpaint-folder" / "unet" / "config.json"
    unet_config.write_text(json.dumps(json.loads(unet_config.read_text()) | {"in_channels": 9}))
    index = folder / "inpaint-folder" / "model_index.json"
    index.write_text(
        json.dumps(
            json.loads(index.read_text()) | {"_class_name": "StableDiffusionXLInpaintPipeline"}
        )
    )
    tensors = {
        f"{prefix}w": W
        for prefix in (model_catalog.CLIP_L, model_catalog.BIGG_OF_BASE, "first_stage_model.")
    }
    unet = {
        model_catalog.UNET_OUT: np.zeros((4, 320, 3, 3), np.float32),
        model_catalog.UNET_IN: np.zeros((320, 9, 3, 3), np.float32),
    }
    save_file(tensors | unet, str(folder / "inpaint-file.safetensors"))
    unet[model_catalog.UNET_IN] = np.zeros((320, 4, 3, 3), np.float32)
    save_file(tensors | unet, str(folder / "plain-file.safetensors"))
    entries = ModelCatalog(folder).entries()
    kinds = {name: (entry.layout, entry.kind, entry.problem) for name, entry in entries.items()}
    assert kinds == {
        "inpaint-folder": ("base", "inpainting", None),
        "inpaint-file": ("base", "inpainting", None),
        "plain-file": ("base", "text_to_image", None),
    }
    assert entries["inpaint-file"].describe()["kind"] == "inpainting"


@pytest.mark.parametrize(
    ("name", "says"),
    [
        ("tiny-refiner", "refiner checkpoint"),
        ("refiner-file", "refiner checkpoint"),
        ("a-lora", "it is a LoRA"),
        ("sd15", "Stable Diffusion 1.x/2.x"),
        ("old", "pickles"),
    ],
)
def test_what_cannot_render_says_why(models: Path, name: str, says: str) -> None:
    entry = ModelCatalog(models).find(name)
    assert entry is not None and entry.problem is not None
    assert says in entry.problem and f"model '{name}'" in entry.problem
    assert str(models) not in entry.problem  # names, never paths
    assert not entry.pairs_with_refiner


def test_a_truncated_file_is_refused(models: Path) -> None:
    data = (models / "my-file.safetensors").read_bytes()
    (models / "cut.safetensors").write_bytes(data[:-4])
    (models / "junk.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError, match="truncated"):
        read_header(models / "cut.safetensors")
    catalog = ModelCatalog(models)
    for name in ("cut", "junk"):
        problem = catalog.find(name).problem  # type: ignore[union-attr]
        assert problem is not None and "not an SDXL checkpoint" in problem


def test_a_sidecar_gives_defaults(models: Path) -> None:
    (models / "my-file.json").write_text(
        json.dumps(
            {
                "steps": 4,
                "guidance_scale": 0,
                "scheduler": "euler_trailing",
                "refiner": "none",
                "clip_skip": 2,
                "high_noise_frac": 0.7,
            }
        )
    )
    entry = ModelCatalog(models).find("my-file")
    assert entry is not None and entry.problem is None
    defaults = entry.defaults
    assert (defaults.num_inference_steps, defaults.guidance_scale, defaults.clip_skip) == (
        4,
        0.0,
        2,
    )
    assert defaults.scheduler is SchedulerName.EULER_TRAILING
    assert defaults.refiner is RefinerMode.NONE and defaults.high_noise_frac == 0.7
    assert entry.describe()["defaults"]["scheduler"] == "euler_trailing"


@pytest.mark.parametrize(
    ("sidecar", "says"),
    [
        ('{"steps": 0}', "steps"),
        ('{"scheduler": "fast"}', "scheduler"),
        ('{"stepz": 4}', "stepz"),
        ('{"steps": 4', "not valid JSON"),
        ("[1, 2]", "invalid"),
    ],
)
def test_a_bad_sidecar_is_the_models_problem(models: Path, sidecar: str, says: str) -> None:
    (models / "tiny-folder.json").write_text(sidecar)
    entry = ModelCatalog(models).find("tiny-folder")
    assert entry is not None and entry.problem is not None
    assert "tiny-folder.json" in entry.problem and says in entry.problem


def test_a_new_file_is_found_without_a_restart(models: Path) -> None:
    catalog = ModelCatalog(models)
    assert catalog.find("late") is None
    base_file(models / "late.safetensors")
    assert catalog.find("late") is not None and catalog.find("late").problem is None  # type: ignore[union-attr]
    # A sidecar written later, and a file replaced in place, are read again too.
    (models / "late.json").write_text('{"steps": 9}')
    assert catalog.find("late").defaults.num_inference_steps == 9  # type: ignore[union-attr]
    (models / "late.json").write_text('{"steps": 0}')
    stamp = os.stat(models / "late.json")
    os.utime(models / "late.json", ns=(stamp.st_atime_ns, stamp.st_mtime_ns + 10**9))
    assert catalog.find("late").problem is not None  # type: ignore[union-attr]
    (models / "late.safetensors").unlink()
    assert catalog.find("late") is None


def test_no_folder_no_models(tmp_path: Path) -> None:
    assert ModelCatalog(None).entries() == {}
    assert ModelCatalog(tmp_path / "missing").entries() == {}
    assert ModelCatalog(tmp_path).find("../etc") is None
