"""The API side of LoRAs: the folder's catalog, and what a request asks for."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from sdxl_service.api.errors import APIError
from sdxl_service.api.lora_requests import lora_set, take_inline_loras
from sdxl_service.api.request_kinds import GENERATION
from sdxl_service.api.schemas import ImageGenerationRequest
from sdxl_service.lora_catalog import LoraCatalog
from sdxl_service.settings import SERVICE_ID, Settings

WEIGHT = np.zeros((4, 8), dtype=np.float32)


def kohya(path: Path, text_encoders: bool = True) -> None:
    tensors = {"lora_unet_down_blocks_0_attn1_to_q.lora_down.weight": WEIGHT}
    if text_encoders:
        tensors["lora_te1_text_model_encoder_layers_0_q_proj.lora_down.weight"] = WEIGHT
        tensors["lora_te2_text_model_encoder_layers_0_q_proj.lora_down.weight"] = WEIGHT
    save_file(tensors, str(path))


def diffusers_folder(folder: Path) -> None:
    folder.mkdir()
    save_file(
        {"unet.down_blocks.0.attn1.to_q.lora_A.weight": WEIGHT},
        str(folder / "pytorch_lora_weights.safetensors"),
    )


@pytest.fixture
def catalog(tmp_path: Path) -> LoraCatalog:
    kohya(tmp_path / "pixel-art.safetensors")
    diffusers_folder(tmp_path / "ink")
    (tmp_path / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    (tmp_path / "notes.txt").write_text("not a LoRA")
    return LoraCatalog(tmp_path)


def test_the_catalog_lists_both_formats_and_what_they_touch(catalog: LoraCatalog) -> None:
    found = {name: lora.describe() for name, lora in catalog.available().items()}
    assert found == {
        "pixel-art": {
            "name": "pixel-art",
            "format": "kohya",
            "components": ["unet", "text_encoder", "text_encoder_2"],
        },
        "ink": {"name": "ink", "format": "diffusers", "components": ["unet"]},
    }


def test_a_damaged_file_is_known_but_not_available(catalog: LoraCatalog) -> None:
    broken = catalog.find("broken")
    assert broken is not None and broken.problem and "broken" not in catalog.available()


def test_files_added_while_running_are_found(catalog: LoraCatalog) -> None:
    assert catalog.find("late") is None
    kohya(catalog.folder / "late.safetensors", text_encoders=False)
    late = catalog.find("late")
    assert late is not None and late.components == ("unet",)


def test_inline_tags_leave_the_prompt_as_if_they_were_never_there() -> None:
    assert take_inline_loras("a cat <lora:pixel-art:0.8> on a mat") == (
        "a cat on a mat",
        [("pixel-art", 0.8)],
    )
    assert take_inline_loras("<LORA:ink>a fox") == ("a fox", [("ink", 1.0)])
    assert take_inline_loras("plain (text:1.2)") == ("plain (text:1.2)", [])


def test_the_same_lora_asked_twice_adds_up_and_the_set_is_sorted(catalog: LoraCatalog) -> None:
    loras = lora_set([("pixel-art", 0.5), ("ink", 1.0), ("pixel-art", 0.25)], catalog.snapshot(), 4)
    assert [(lora.name, lora.scale) for lora in loras] == [("ink", 1.0), ("pixel-art", 0.75)]


@pytest.mark.parametrize(
    ("asked", "code"),
    [
        ([("missing", 1.0)], "lora_not_found"),
        ([("../etc/passwd", 1.0)], "invalid_value"),
        ([("a/b", 1.0)], "invalid_value"),
        ([("..", 1.0)], "invalid_value"),
        ([("ink", 2.5)], "invalid_value"),
        ([("ink", -2.1)], "invalid_value"),
        ([("broken", 1.0)], "invalid_lora"),
        ([("ink", 1.0), ("pixel-art", 1.0), ("x1", 1.0)], "invalid_value"),  # over the limit of 2
    ],
)
def test_bad_loras_are_400_naming_loras_and_no_path(
    catalog: LoraCatalog, asked: list[tuple[str, float]], code: str
) -> None:
    with pytest.raises(APIError) as caught:
        lora_set(asked, catalog.snapshot(), max_loras=2)
    assert (caught.value.status, caught.value.param, caught.value.code) == (400, "loras", code)
    assert str(catalog.folder) not in caught.value.message


def test_a_request_combines_its_list_its_tags_and_its_model(catalog: LoraCatalog) -> None:
    request = ImageGenerationRequest.model_validate(
        {
            "prompt": "a fox <lora:ink:0.5>",
            "model": f"{SERVICE_ID}:pixel-art",
            "loras": [{"name": "ink", "scale": 0.25}],
        }
    )
    job = GENERATION.resolve(request, None, Settings(), 1024, catalog).job
    assert job.prompt == "a fox"
    assert [(lora.name, lora.scale) for lora in job.params.loras] == [
        ("ink", 0.75),
        ("pixel-art", 1.0),
    ]


def test_a_model_naming_no_lora_is_404(catalog: LoraCatalog) -> None:
    request = ImageGenerationRequest(prompt="x", model=f"{SERVICE_ID}:missing")
    with pytest.raises(APIError) as caught:
        GENERATION.resolve(request, None, Settings(), 1024, catalog)
    assert (caught.value.status, caught.value.code) == (404, "model_not_found")


def test_requests_without_loras_render_as_before(catalog: LoraCatalog) -> None:
    job = GENERATION.resolve(
        ImageGenerationRequest(prompt="a fox"), None, Settings(), 1024, catalog
    ).job
    assert job.params.loras == () and job.prompt == "a fox"


@pytest.mark.parametrize(
    ("key", "kind"),
    [
        ("lora_unet_down_blocks_0_attn1_to_q.hada_w1_a", "LoHa"),
        ("lora_unet_down_blocks_0_attn1_to_q.lokr_w1", "LoKr"),
    ],
)
def test_lycoris_loha_and_lokr_files_are_a_400_saying_the_format_is_not_supported(
    catalog: LoraCatalog, key: str, kind: str
) -> None:
    save_file(
        {key: WEIGHT, "lora_unet_down_blocks_0_attn1_to_q.alpha": WEIGHT},
        str(catalog.folder / "lyco.safetensors"),
    )
    with pytest.raises(APIError) as caught:
        lora_set([("lyco", 1.0)], catalog.snapshot(), max_loras=2)
    error = caught.value
    assert (error.status, error.param, error.code) == (400, "loras", "invalid_lora")
    assert f"LyCORIS {kind} file" in error.message and "not support" in error.message
    assert "lyco" not in catalog.available() and "pixel-art" in catalog.available()


# --- sidecar defaults ----------------------------------------------------------------------

LIGHTNING = {"steps": 4, "guidance_scale": 0, "scheduler": "euler_trailing"}


def lightning(catalog: LoraCatalog, defaults: object = LIGHTNING) -> None:
    kohya(catalog.folder / "lightning.safetensors")  # type: ignore[operator]
    (catalog.folder / "lightning.json").write_text(json.dumps(defaults))  # type: ignore[operator]


def params_of(catalog: LoraCatalog, **fields: object):
    req = ImageGenerationRequest.model_validate({"prompt": "a fox", **fields})
    return GENERATION.resolve(req, None, Settings(steps=30), 1024, catalog).job.params


def test_a_loras_sidecar_gives_its_sampler_steps_and_guidance(catalog: LoraCatalog) -> None:
    lightning(catalog)
    for fields in (
        {"loras": [{"name": "lightning"}]},
        {"prompt": "a fox <lora:lightning:1>"},
        {"model": f"{SERVICE_ID}:lightning"},
    ):
        params = params_of(catalog, **fields)
        assert (params.num_inference_steps, params.guidance_scale, params.scheduler) == (
            4,
            0,
            "euler_trailing",
        )
    # The request's own fields first; without the LoRA, the server's defaults.
    assert (
        params_of(catalog, loras=[{"name": "lightning"}], num_inference_steps=8).num_inference_steps
        == 8
    )
    assert params_of(catalog).num_inference_steps == 30
    # The card shows them by the request's names, whichever spelling the file used.
    card = catalog.find("lightning").describe()  # type: ignore[union-attr]
    assert card["defaults"] == {
        "num_inference_steps": 4,
        "guidance_scale": 0,
        "scheduler": "euler_trailing",
    }


def test_a_sidecar_takes_the_requests_own_field_names(catalog: LoraCatalog) -> None:
    lightning(catalog, {"num_inference_steps": 3, "guidance_scale": 2.0, "clip_skip": 2})
    params = params_of(catalog, loras=[{"name": "lightning"}])
    assert (params.num_inference_steps, params.guidance_scale, params.clip_skip) == (3, 2.0, 2)


def test_a_bad_sidecar_value_is_named_in_the_requests_vocabulary(catalog: LoraCatalog) -> None:
    lightning(catalog, {"steps": 0})
    with pytest.raises(APIError) as caught:
        params_of(catalog, loras=[{"name": "lightning"}])
    message = caught.value.message
    assert "num_inference_steps:" in message
    assert "steps:" not in message.replace("num_inference_steps:", "")


def test_a_bad_loras_sidecar_is_a_400_naming_loras(catalog: LoraCatalog) -> None:
    lightning(catalog, {"steps": 4, "sampler": "euler"})
    with pytest.raises(APIError) as caught:
        params_of(catalog, loras=[{"name": "lightning"}])
    assert (caught.value.status, caught.value.param, caught.value.code) == (
        400,
        "loras",
        "invalid_lora",
    )
    assert "lightning.json" in caught.value.message and "sampler" in caught.value.message


def test_a_sidecar_written_while_running_is_read(catalog: LoraCatalog) -> None:
    kohya(catalog.folder / "lightning.safetensors")  # type: ignore[operator]
    assert params_of(catalog, loras=[{"name": "lightning"}]).num_inference_steps == 30
    lightning(catalog)
    assert params_of(catalog, loras=[{"name": "lightning"}]).num_inference_steps == 4
