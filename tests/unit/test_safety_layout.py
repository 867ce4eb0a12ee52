"""safety_layout.py: what a SDXL_SAFETY_CHECKER folder holds, from its JSON files alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sdxl_service.safety_layout import (
    SafetyCheckerLayout,
    SafetyLayoutError,
    folder_layout,
    is_hub_id,
)


def write_folder(root: Path, config: dict, *, subfolders: bool = False) -> Path:
    model = root / "safety_checker" if subfolders else root
    processor = root / "feature_extractor" if subfolders else root
    model.mkdir(parents=True, exist_ok=True)
    processor.mkdir(parents=True, exist_ok=True)
    (model / "config.json").write_text(json.dumps(config))
    (model / "model.safetensors").write_bytes(b"")
    (processor / "preprocessor_config.json").write_text("{}")
    return root


DIFFUSERS = {"architectures": ["StableDiffusionSafetyChecker"], "model_type": "clip"}
CLASSIFIER = {"architectures": ["ViTForImageClassification"], "id2label": {"1": "nsfw", "0": "ok"}}


def test_the_repository_and_the_pipeline_layouts(tmp_path: Path) -> None:
    root = folder_layout(write_folder(tmp_path / "repo", DIFFUSERS))
    assert root == SafetyCheckerLayout(None, None, True, ())
    pipeline = folder_layout(write_folder(tmp_path / "pipe", DIFFUSERS, subfolders=True))
    assert pipeline == SafetyCheckerLayout("safety_checker", "feature_extractor", True, ())


def test_a_classifiers_labels_in_index_order_and_which_fit(tmp_path: Path) -> None:
    layout = folder_layout(write_folder(tmp_path, CLASSIFIER))
    assert layout.labels == ("ok", "nsfw") and not layout.diffusers_checker
    assert layout.label_problem(["nsfw"]) is None
    assert layout.label_problem([]) is not None
    assert "no label 'porn'; its labels are 'ok', 'nsfw'" in str(layout.label_problem(["porn"]))
    # diffusers' checker decides by its own thresholds: the labels do not matter.
    assert SafetyCheckerLayout(None, None, True, ()).label_problem(["porn"]) is None


@pytest.mark.parametrize(
    ("config", "says"),
    [
        ({"architectures": ["ViTModel"]}, "names no labels"),
        ({"id2label": {"first": "nsfw"}}, "malformed id2label"),
    ],
)
def test_a_config_that_is_no_classifier_is_refused(tmp_path: Path, config: dict, says: str) -> None:
    with pytest.raises(SafetyLayoutError, match=says):
        folder_layout(write_folder(tmp_path, config))


def test_a_folder_without_its_image_processor_is_refused(tmp_path: Path) -> None:
    write_folder(tmp_path, CLASSIFIER)
    (tmp_path / "preprocessor_config.json").unlink()
    with pytest.raises(SafetyLayoutError, match=r"no preprocessor_config\.json"):
        folder_layout(tmp_path)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("CompVis/stable-diffusion-safety-checker", True),
        ("Falconsai/nsfw_image_detection", True),
        ("just-a-name", False),
        ("/abs/path", False),
        ("a/b/c", False),
    ],
)
def test_hub_ids_are_owner_slash_name(value: str, expected: bool) -> None:
    assert is_hub_id(value) is expected
