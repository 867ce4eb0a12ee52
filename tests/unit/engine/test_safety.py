"""engine/safety.py on tiny classifiers the tests save (tests/safety_checkers.py): diffusers'
StableDiffusionSafetyChecker in both layouts, with diffusers' own verdict, and a transformers
image classifier with SDXL_SAFETY_LABELS; what cannot load names the variable."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdxl_service.engine.safety import SafetyChecker, UnusableSafetyChecker
from tests import safety_checkers


def noise(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (48, 64, 3), np.uint8), "RGB")


BAD, GOOD, OTHER = noise(1), noise(2), noise(3)


def load(folder: Path, labels: tuple[str, ...] = ("nsfw",)) -> SafetyChecker:
    return SafetyChecker.load(str(folder), labels, device="cpu", dtype=torch.float32)


@pytest.mark.parametrize("pipeline_layout", [False, True], ids=["repository", "pipeline"])
def test_the_diffusers_checker_flags_the_image_it_knows_and_no_other(
    tmp_path: Path, pipeline_layout: bool, caplog: pytest.LogCaptureFixture
) -> None:
    safety_checkers.diffusers_checker(tmp_path, BAD, [GOOD, OTHER], pipeline_layout=pipeline_layout)
    checker = load(tmp_path)
    with caplog.at_level(logging.INFO):
        assert checker.flags([GOOD, BAD, OTHER, BAD]) == [False, True, False, True]
    # Withheld, not blacked out as diffusers' own warning would say.
    assert "flagged 2 of 4 images" in caplog.text and "black image" not in caplog.text
    assert checker.describe() == {"source": str(tmp_path), "kind": "StableDiffusionSafetyChecker"}


def test_the_verdict_is_the_one_diffusers_pipelines_get(tmp_path: Path) -> None:
    """As StableDiffusionPipeline.run_safety_checker calls it: the feature extractor's
    pixel values and the images themselves."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPImageProcessorPil

    safety_checkers.diffusers_checker(tmp_path, BAD, [GOOD], pipeline_layout=True)
    stock = StableDiffusionSafetyChecker.from_pretrained(tmp_path / "safety_checker")
    extractor = CLIPImageProcessorPil.from_pretrained(tmp_path / "feature_extractor")
    images = [GOOD, BAD, OTHER]
    clip_input = extractor(images, return_tensors="pt").pixel_values
    arrays = [np.asarray(image, dtype=np.float32) / 255 for image in images]
    _, has_nsfw_concepts = stock(images=arrays, clip_input=clip_input)
    assert load(tmp_path).flags(images) == has_nsfw_concepts


@pytest.mark.parametrize("flags_everything", [True, False])
def test_an_image_classifier_flags_by_its_top_label(tmp_path: Path, flags_everything) -> None:
    safety_checkers.vit_classifier(tmp_path, flags_everything=flags_everything)
    checker = load(tmp_path)
    assert checker.flags([GOOD, BAD]) == [flags_everything] * 2
    assert checker.describe()["flagged_labels"] == ["nsfw"]
    # The other label named as the flagging one turns the verdict round.
    assert load(tmp_path, ("normal",)).flags([GOOD]) == [not flags_everything]


def test_no_images_no_call(tmp_path: Path) -> None:
    safety_checkers.vit_classifier(tmp_path, flags_everything=True)
    assert load(tmp_path).flags([]) == []


def test_a_label_the_classifier_lacks_names_sdxl_safety_labels(tmp_path: Path) -> None:
    safety_checkers.vit_classifier(tmp_path, flags_everything=True)
    with pytest.raises(UnusableSafetyChecker, match=r"SDXL_SAFETY_LABELS='porn'.*'normal', 'nsfw'"):
        load(tmp_path, ("porn",))


def test_damaged_weights_name_sdxl_safety_checker(tmp_path: Path) -> None:
    safety_checkers.vit_classifier(tmp_path, flags_everything=True)
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(UnusableSafetyChecker, match=rf"^SDXL_SAFETY_CHECKER='{tmp_path}' cannot"):
        load(tmp_path)


def test_pickled_weights_are_refused(tmp_path: Path) -> None:
    safety_checkers.vit_classifier(tmp_path, flags_everything=True)
    (tmp_path / "model.safetensors").rename(tmp_path / "pytorch_model.bin")
    with pytest.raises(UnusableSafetyChecker, match=r"no \.safetensors weights"):
        load(tmp_path)


def test_a_hub_id_neither_cached_nor_reachable_names_the_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(UnusableSafetyChecker, match=r"^SDXL_SAFETY_CHECKER='nobody/no-checker'"):
        SafetyChecker.load("nobody/no-checker", ("nsfw",), device="cpu", dtype=torch.float32)
