"""The IP-Adapter folder read from file headers alone: kinds, encoders, and what is refused."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

from sdxl_service.ip_adapter_catalog import IpAdapterCatalog
from tests.ip_adapter_files import (
    BIG_G,
    PLUS_TOKENS,
    VIT_H,
    adapter_weights,
    build_folder,
    save_adapter,
)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_folder(tmp_path_factory.mktemp("ip-adapters"))


def test_h94_layout_is_read_with_kinds_and_encoders(folder: Path) -> None:
    entries = IpAdapterCatalog(folder).snapshot()
    assert sorted(IpAdapterCatalog(folder).available()) == [
        "ip-adapter-plus_sdxl",
        "ip-adapter-plus_sdxl_vit-h",
        "ip-adapter_sdxl",
        "ip-adapter_sdxl_vit-h",
    ]
    plain, plus = entries["ip-adapter_sdxl"], entries["ip-adapter-plus_sdxl_vit-h"]
    assert (plain.kind, plain.tokens, plain.uses_hidden_states) == ("ip-adapter", 4, False)
    assert plain.encoder == folder / "sdxl_models" / "image_encoder"
    assert (plus.kind, plus.tokens, plus.uses_hidden_states) == ("plus", PLUS_TOKENS, True)
    # vit-h in the name: the ViT-H encoder of models/, whatever lies beside the file.
    assert plus.encoder == folder / "models" / "image_encoder"
    assert plain.describe()["kind"] == "ip-adapter"


def test_sd15_adapter_is_listed_with_its_problem(folder: Path) -> None:
    entry = IpAdapterCatalog(folder).find("ip-adapter_sd15")
    assert entry is not None and entry.problem is not None
    assert "SD 1.5" in entry.problem


def test_an_adapter_without_its_encoder_is_refused(tmp_path: Path) -> None:
    save_adapter(
        tmp_path / "sdxl_models" / "lonely.safetensors", adapter_weights("ip-adapter", BIG_G, 1)
    )
    entry = IpAdapterCatalog(tmp_path).find("lonely")
    assert entry is not None and entry.problem is not None
    assert "image encoder" in entry.problem and "missing" in entry.problem


def test_a_vit_h_adapter_without_vit_h_in_its_name_does_not_fit_the_big_g_encoder(
    folder: Path, tmp_path: Path
) -> None:
    shutil.copytree(folder, tmp_path / "ip", dirs_exist_ok=True)
    save_adapter(
        tmp_path / "ip" / "sdxl_models" / "renamed.safetensors",
        adapter_weights("ip-adapter", VIT_H, 2),
    )
    entry = IpAdapterCatalog(tmp_path / "ip").find("renamed")
    assert entry is not None and entry.problem is not None and "vit-h" in entry.problem


def test_files_that_are_no_adapter_are_refused(folder: Path, tmp_path: Path) -> None:
    shutil.copytree(folder / "sdxl_models" / "image_encoder", tmp_path / "image_encoder")
    (tmp_path / "damaged.safetensors").write_bytes(b"not a safetensors file")
    save_adapter(
        tmp_path / "lora.safetensors",
        {"unet.x.lora_A.weight": adapter_weights("ip-adapter", BIG_G, 3)["image_proj.norm.bias"]},
    )
    faceid = adapter_weights("ip-adapter", BIG_G, 4)
    faceid["image_proj.perceiver_resampler.proj_in.weight"] = faceid.pop("image_proj.proj.weight")
    save_adapter(tmp_path / "faceid.safetensors", faceid)
    entries = IpAdapterCatalog(tmp_path).snapshot()
    assert "readable" in str(entries["damaged"].problem)
    assert "no IP-Adapter weights" in str(entries["lora"].problem)
    assert "FaceID" in str(entries["faceid"].problem)
    assert IpAdapterCatalog(tmp_path).available() == {}


def test_a_new_file_is_found_without_a_restart(folder: Path, tmp_path: Path) -> None:
    shutil.copytree(folder, tmp_path / "ip")
    catalog = IpAdapterCatalog(tmp_path / "ip")
    assert catalog.find("added") is None
    source = tmp_path / "ip" / "sdxl_models" / "ip-adapter_sdxl.safetensors"
    shutil.copy(source, tmp_path / "ip" / "sdxl_models" / "added.safetensors")
    assert catalog.find("added") is not None


def test_names_that_are_no_file_name_are_not_looked_up(folder: Path) -> None:
    catalog = IpAdapterCatalog(folder)
    assert catalog.find("../models/ip-adapter_sd15") is None
    assert catalog.find("image_encoder") is None
    assert IpAdapterCatalog(None).snapshot() == {}


def test_the_catalog_imports_no_torch() -> None:
    code = "import sys, sdxl_service.ip_adapter_catalog; sys.exit('torch' in sys.modules)"
    assert os.spawnv(os.P_WAIT, sys.executable, [sys.executable, "-c", code]) == 0
