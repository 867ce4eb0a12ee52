"""The ControlNet folder read without torch: folders and single files, Union or not, and the
SD 1.5 / SD 2 ones listed with their problem."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from sdxl_service.controlnet_catalog import ControlNetCatalog


def state(*, union: bool = False, cross: int = 2048, sdxl: bool = True) -> dict:
    tensors = {
        "controlnet_cond_embedding.conv_in.weight": np.zeros((4, 3, 3, 3), np.float16),
        "mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight": np.zeros(
            (8, cross), np.float16
        ),
    }
    if sdxl:
        tensors["add_embedding.linear_1.weight"] = np.zeros((4, 4), np.float16)
    if union:
        tensors["task_embedding"] = np.zeros((6, 320), np.float16)
    return tensors


def folder_model(folder: Path, name: str, weights: str, **config: object) -> None:
    (folder / name).mkdir()
    base = {"_class_name": "ControlNetModel", "cross_attention_dim": 2048}
    (folder / name / "config.json").write_text(
        json.dumps({**base, "addition_embed_type": "text_time", **config})
    )
    (folder / name / weights).write_bytes(b"x")


def test_folders_and_single_files_are_read_for_what_they_are(tmp_path: Path) -> None:
    folder_model(tmp_path, "canny", "diffusion_pytorch_model.fp16.safetensors")
    folder_model(
        tmp_path,
        "promax",
        "diffusion_pytorch_model.safetensors",
        _class_name="ControlNetUnionModel",
        num_control_type=8,
    )
    save_file(state(), str(tmp_path / "depth.safetensors"))
    save_file(state(union=True), str(tmp_path / "union.safetensors"))
    (tmp_path / "notes.txt").write_text("not a model")
    entries = ControlNetCatalog(tmp_path).snapshot()
    assert sorted(entries) == ["canny", "depth", "promax", "union"]
    assert all(entry.problem is None for entry in entries.values())
    assert entries["canny"].weights.name == "diffusion_pytorch_model.fp16.safetensors"
    assert (entries["canny"].format, entries["canny"].union) == ("diffusers", False)
    assert (entries["promax"].union, entries["promax"].control_types) == (True, 8)
    assert (entries["depth"].format, entries["depth"].union) == ("safetensors", False)
    assert (entries["union"].union, entries["union"].control_types) == (True, 6)


def test_sd15_and_unreadable_controlnets_are_listed_with_their_problem(tmp_path: Path) -> None:
    folder_model(
        tmp_path,
        "sd15",
        "diffusion_pytorch_model.safetensors",
        cross_attention_dim=768,
        addition_embed_type=None,
    )
    folder_model(tmp_path, "no-weights", "readme.md")
    folder_model(tmp_path, "a-unet", "diffusion_pytorch_model.safetensors", _class_name="UNet")
    save_file(state(cross=768, sdxl=False), str(tmp_path / "sd15-file.safetensors"))
    original = {"control_model.input_blocks.0.0.weight": np.zeros((2, 2), np.float16)}
    save_file(original, str(tmp_path / "original.safetensors"))
    (tmp_path / "damaged.safetensors").write_bytes(b"\x00" * 16)
    problems = {
        name: entry.problem for name, entry in ControlNetCatalog(tmp_path).snapshot().items()
    }
    assert "cross-attention dim 768" in str(problems["sd15"])
    assert "cross-attention dim 768" in str(problems["sd15-file"])
    assert "diffusion_pytorch_model.safetensors" in str(problems["no-weights"])
    assert "not a ControlNetModel" in str(problems["a-unet"])
    assert "diffusers' layout" in str(problems["original"])
    assert "not a readable safetensors file" in str(problems["damaged"])


def test_no_folder_lists_nothing(tmp_path: Path) -> None:
    assert ControlNetCatalog(None).snapshot() == {}
    assert ControlNetCatalog(tmp_path / "absent").snapshot() == {}
    assert ControlNetCatalog(tmp_path).find("../etc") is None
