"""The Prem registry entry: manifest against its schema and the service's real config."""

from __future__ import annotations

import copy
import json
import tomllib
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from sdxl_service.settings import DEFAULT_PORT, SERVICE_ID

REPO = Path(__file__).resolve().parents[3]
APP = REPO / "registry" / "diffuser-stable-diffusion-xl-with-refiner"
SCHEMA_PATH = REPO / "registry" / "schema" / "manifest.schema.json"
SVG = "{http://www.w3.org/2000/svg}"

# The entry the registry held for version 1.0.3 of the old image
# (../shared/reference/prem-registry.md): the schema must accept it as it was.
OLD_ENTRY = {
    "id": "stable-diffusion-xl-with-refiner",
    "name": "Stable Diffusion XL With Refiner",
    "description": "Stable Diffusion XL is a sophisticated text-to-image diffusion model.",
    "documentation": "",
    "beta": True,
    "icon": "",
    "modelInfo": {"memoryRequirements": 21662, "secondsPerImage": 7},
    "interfaces": ["diffuser"],
    "dockerImages": {
        "gpu": {
            "size": 47738283226,
            "image": "ghcr.io/premai-io/diffuser-stable-diffusion-xl-with-refiner-gpu:1.0.3",
        }
    },
    "defaultPort": 8000,
    "defaultExternalPort": 9225,
}


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    return json.loads(SCHEMA_PATH.read_text())


@pytest.fixture(scope="module")
def manifest() -> dict[str, Any]:
    return json.loads((APP / "manifest.json").read_text())


def _validator(schema: dict[str, Any]) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(schema)


def test_schema_is_a_valid_json_schema(schema: dict[str, Any]) -> None:
    jsonschema.Draft202012Validator.check_schema(schema)


def test_manifest_validates(schema: dict[str, Any], manifest: dict[str, Any]) -> None:
    _validator(schema).validate(manifest)


def test_old_registry_entry_validates(schema: dict[str, Any]) -> None:
    _validator(schema).validate(OLD_ENTRY)


@pytest.mark.parametrize(
    "breakage",
    [
        lambda m: m.pop("id"),
        lambda m: m.update(defaultPort="9225"),
        lambda m: m.update(defaultPort=70000),
        lambda m: m["modelInfo"].update(memoryRequirements="24gb"),
        lambda m: m["modelInfo"].update(memoryRequirements=21.5),
        lambda m: m["dockerImages"]["gpu"].update(size="47 GB"),
        lambda m: m["dockerImages"]["gpu"].update(image="ghcr.io/premai-io/x-gpu:latest"),
        lambda m: m["dockerImages"]["gpu"].update(image="ghcr.io/premai-io/x-gpu"),
        lambda m: m["dockerImages"].update(tpu={"size": 1, "image": "a/b:1"}),
        lambda m: m.update(interfaces=[]),
        lambda m: m.update(defaultPorts=9225),
        lambda m: m.update(envVariables=["no equals sign"]),
    ],
)
def test_schema_rejects_broken_entries(schema: dict[str, Any], breakage) -> None:
    broken = copy.deepcopy(OLD_ENTRY)
    breakage(broken)
    assert list(_validator(schema).iter_errors(broken))


def test_identity(manifest: dict[str, Any]) -> None:
    assert manifest["id"] == SERVICE_ID == "stable-diffusion-xl-with-refiner"
    assert manifest["interfaces"] == ["diffuser"]
    # The registry folder is named <interface>-<id>.
    assert APP.name == f"{manifest['interfaces'][0]}-{manifest['id']}"
    assert manifest["beta"] is True


def test_ports_are_the_containers_real_port(manifest: dict[str, Any]) -> None:
    # service.py serves on settings.DEFAULT_PORT (`http={"port": DEFAULT_PORT}`),
    # and the bento container runs `bentoml serve`, which uses it.
    assert manifest["defaultPort"] == DEFAULT_PORT
    assert manifest["defaultExternalPort"] == 9225


def test_nothing_in_the_image_moves_the_port() -> None:
    bentofile = REPO / "bentofile.yaml"
    if not bentofile.exists():
        pytest.skip("no bentofile.yaml yet")
    envs = {e["name"] for e in yaml.safe_load(bentofile.read_text()).get("envs", [])}
    # Either would make the container listen elsewhere than defaultPort.
    assert not envs & {"BENTOML_PORT", "PORT"}


def test_weights_land_on_the_apps_volume(manifest: dict[str, Any]) -> None:
    bentofile = REPO / "bentofile.yaml"
    if not bentofile.exists():
        pytest.skip("no bentofile.yaml yet")
    envs = {e["name"]: e.get("value") for e in yaml.safe_load(bentofile.read_text())["envs"]}
    volume = manifest["volumePath"].rstrip("/") + "/"
    assert envs["HF_HOME"].startswith(volume)


def test_generated_fields_are_left_empty(manifest: dict[str, Any]) -> None:
    # The registry's generator fills them from README.md and logo.svg.
    assert manifest["documentation"] == ""
    assert manifest["icon"] == ""


def test_memory_requirement_is_mib_that_fits_a_24_gib_card(manifest: dict[str, Any]) -> None:
    memory = manifest["modelInfo"]["memoryRequirements"]
    assert isinstance(memory, int)
    # Above the ~15 GB one 1024x1024 image peaks at; below what a 24 GiB card has free.
    assert 15 * 1000**3 / 2**20 < memory <= 23 * 1024


def test_image_is_pinned_to_the_project_version(manifest: dict[str, Any]) -> None:
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    gpu = manifest["dockerImages"]["gpu"]
    assert gpu["image"].endswith(f"-gpu:{version}")
    assert isinstance(gpu["size"], int) and gpu["size"] > 0
    assert set(manifest["dockerImages"]) == {"gpu"}


def test_logo_is_our_own_256px_svg() -> None:
    root = ET.parse(APP / "logo.svg").getroot()
    assert root.tag == f"{SVG}svg"
    assert (root.get("width"), root.get("height")) == ("256", "256")
    assert root.get("viewBox") == "0 0 256 256"
    # A drawing, not an embedded raster or a link to someone else's artwork.
    assert not root.findall(f".//{SVG}image")
    assert "xlink:href" not in (APP / "logo.svg").read_text()


def test_readme_covers_the_registry_page() -> None:
    readme = (APP / "README.md").read_text()
    for heading in ("Description", "Hardware Requirements", "Example Usage", "License"):
        assert f" {heading}\n" in readme, heading
    assert "24 GiB" in readme
    assert "from openai import OpenAI" in readme and "extra_body" in readme
    assert "openai.Image.create" in readme
    assert "curl " in readme
    assert "Open RAIL++-M" in readme
    for parameter in ("negative_prompt", "seed", "num_inference_steps", "high_noise_frac"):
        assert f"`{parameter}`" in readme
