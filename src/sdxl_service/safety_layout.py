"""What a SDXL_SAFETY_CHECKER folder holds, read from its JSON files alone (no torch).

The settings check a folder with it when the service starts (a missing file or a label the
model does not have stops the start, naming the variable); the render worker's
engine/safety.py loads the classifier from the same layout.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DIFFUSERS_CHECKER = "StableDiffusionSafetyChecker"
# owner/name, as the hub spells a repository.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


class SafetyLayoutError(ValueError):
    """The folder is not a classifier this service can load (the message says what is missing)."""


@dataclass(frozen=True)
class SafetyCheckerLayout:
    """Where the model and its image processor are, and which kind of classifier it is."""

    model_subfolder: str | None
    processor_subfolder: str | None
    diffusers_checker: bool
    # An image-classification model's labels, by index; () for diffusers' checker.
    labels: tuple[str, ...]

    @classmethod
    def of_config(
        cls,
        config: dict[str, Any],
        model_subfolder: str | None = None,
        processor_subfolder: str | None = None,
    ) -> SafetyCheckerLayout:
        if DIFFUSERS_CHECKER in (config.get("architectures") or []):
            return cls(model_subfolder, processor_subfolder, True, ())
        id2label = config.get("id2label") or {}
        try:
            labels = tuple(str(id2label[key]) for key in sorted(id2label, key=int))
        except (TypeError, ValueError) as error:
            raise SafetyLayoutError(f"its config.json has a malformed id2label: {error}") from None
        if not labels:
            raise SafetyLayoutError(
                f"its config.json names no labels (id2label) and is no {DIFFUSERS_CHECKER}"
            )
        return cls(model_subfolder, processor_subfolder, False, labels)

    def label_problem(self, flagged: Sequence[str]) -> str | None:
        """Why SDXL_SAFETY_LABELS does not fit this classifier; None when it does."""
        if self.diffusers_checker:
            return None
        if not flagged:
            return "no label given: an image-classification model needs the labels that flag"
        unknown = [label for label in flagged if label not in self.labels]
        if unknown:
            return (
                f"the classifier has no label {', '.join(map(repr, unknown))}; its labels are "
                f"{', '.join(map(repr, self.labels))}"
            )
        return None


def is_hub_id(value: str) -> bool:
    return _HUB_ID.fullmatch(value) is not None


def folder_layout(folder: Path) -> SafetyCheckerLayout:
    """The layout of a classifier's folder: config.json and preprocessor_config.json at its
    root (a model repository's layout), or a diffusers pipeline's safety_checker/ and
    feature_extractor/; its weights as .safetensors."""
    model: str | None = None
    processor: str | None = None
    if (folder / "safety_checker" / "config.json").is_file():
        model, processor = "safety_checker", "feature_extractor"
    model_dir = folder / model if model else folder
    processor_dir = folder / processor if processor else folder
    if not (model_dir / "config.json").is_file():
        raise SafetyLayoutError(f"{folder} has no config.json (nor safety_checker/config.json)")
    if not (processor_dir / "preprocessor_config.json").is_file():
        raise SafetyLayoutError(
            f"{processor_dir} has no preprocessor_config.json (the classifier's image processor)"
        )
    if not any(model_dir.glob("*.safetensors")):
        raise SafetyLayoutError(
            f"{model_dir} has no .safetensors weights; pickled weights (.bin) are refused "
            "because loading one runs the code inside it: convert them to .safetensors"
        )
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError) as error:
        raise SafetyLayoutError(f"{model_dir / 'config.json'}: {error}") from None
    if not isinstance(config, dict):
        raise SafetyLayoutError(f"{model_dir / 'config.json'} is not a JSON object")
    return SafetyCheckerLayout.of_config(config, model, processor)
