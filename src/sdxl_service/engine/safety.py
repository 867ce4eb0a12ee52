"""The opt-in safety checker (SDXL_SAFETY_CHECKER): which decoded images are flagged.

Two kinds of classifier, told apart by the `architectures` of their config.json:

- diffusers' `StableDiffusionSafetyChecker` (the CompVis/stable-diffusion-safety-checker
  layout: config.json and preprocessor_config.json at the root, or a pipeline folder's
  `safety_checker/` and `feature_extractor/`): its verdict is diffusers' own
  `has_nsfw_concepts`, from the same call diffusers' pipelines make;
- any transformers image-classification model (say Falconsai/nsfw_image_detection): an image
  is flagged when its top label is one of SDXL_SAFETY_LABELS, the answer the
  image-classification pipeline would give first.

One batched call per rendered batch, on the engine's device. Weights are read from
`.safetensors` only, as every model of this service: nothing pickled is executed. The image
processor runs with transformers' PIL backend, so a verdict does not depend on whether
torchvision is installed.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..safety_layout import (
    DIFFUSERS_CHECKER,
    SafetyCheckerLayout,
    SafetyLayoutError,
    folder_layout,
)

logger = logging.getLogger(__name__)

VARIABLE = "SDXL_SAFETY_CHECKER"
LABELS_VARIABLE = "SDXL_SAFETY_LABELS"


class _WithheldNotBlackedOut(logging.Filter):
    """diffusers' checker warns that "a black image will be returned instead": here the image
    is withheld, not blacked out, and `flags` logs what it flagged in its own words."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "A black image will be returned instead" not in record.getMessage()


class UnusableSafetyChecker(ValueError):
    """The classifier cannot be loaded or used as configured; the message names the variable."""


class SafetyChecker:
    """Flags images with one batched classifier call (`flags`); loaded by `load`."""

    def __init__(
        self,
        model: Any,
        processor: Any,
        *,
        source: str,
        diffusers_checker: bool,
        flagged_labels: frozenset[int] = frozenset(),
        label_names: Sequence[str] = (),
    ) -> None:
        self.model = model.eval()
        self.processor = processor
        self.source = source
        self.diffusers_checker = diffusers_checker
        self.flagged_labels = flagged_labels
        self.label_names = tuple(label_names)

    @classmethod
    def load(
        cls,
        source: str,
        labels: Sequence[str],
        *,
        device: str,
        dtype: torch.dtype,
    ) -> SafetyChecker:
        """The classifier of `source` (a folder, or a hub id from the cache) on `device`;
        UnusableSafetyChecker naming the variable when it cannot be, or when one of `labels`
        (those that flag) is not one of its labels."""
        from transformers import AutoImageProcessor, AutoModelForImageClassification

        layout = _layout(source)
        problem = layout.label_problem(labels)
        if problem is not None:
            raise UnusableSafetyChecker(f"{LABELS_VARIABLE}={','.join(labels)!r}: {problem}")
        options: dict[str, Any] = {"dtype": dtype, "use_safetensors": True}
        processor_options = _subfolder(layout.processor_subfolder)
        model_options = {**options, **_subfolder(layout.model_subfolder)}
        model: Any
        try:
            processor = AutoImageProcessor.from_pretrained(
                source, backend="pil", **processor_options
            )
            if layout.diffusers_checker:
                from diffusers.pipelines.stable_diffusion.safety_checker import (
                    StableDiffusionSafetyChecker,
                )

                model = StableDiffusionSafetyChecker.from_pretrained(source, **model_options)
                logging.getLogger(StableDiffusionSafetyChecker.__module__).addFilter(
                    _WithheldNotBlackedOut()
                )
            else:
                model = AutoModelForImageClassification.from_pretrained(source, **model_options)
        except Exception as error:  # damaged weights, a mismatched config, a missing file...
            raise UnusableSafetyChecker(
                f"{VARIABLE}={source!r} cannot be loaded as an image classifier: {error}"
            ) from error
        checker = cls(
            model.to(device),
            processor,
            source=source,
            diffusers_checker=layout.diffusers_checker,
            flagged_labels=frozenset(
                index for index, name in enumerate(layout.labels) if name in labels
            ),
            label_names=layout.labels,
        )
        logger.info("safety checker loaded: %s", checker.describe())
        return checker

    def describe(self) -> dict[str, Any]:
        info: dict[str, Any] = {
            "source": self.source,
            "kind": DIFFUSERS_CHECKER if self.diffusers_checker else "image-classification",
        }
        if not self.diffusers_checker:
            info["flagged_labels"] = [self.label_names[i] for i in sorted(self.flagged_labels)]
        return info

    @torch.inference_mode()
    def flags(self, images: Sequence[Image.Image]) -> list[bool]:
        """Whether each image is flagged, in order: one call for all of them."""
        if not images:
            return []
        device, dtype = self.model.device, self.model.dtype
        pixel_values = self.processor(list(images), return_tensors="pt").pixel_values
        pixel_values = pixel_values.to(device=device, dtype=dtype)
        if self.diffusers_checker:
            # diffusers blacks out the flagged ones of `images`; stand-ins take that, the
            # pixels never go through the checker twice.
            stand_ins = [np.zeros((1, 1, 3)) for _ in images]
            _, has_nsfw_concepts = self.model(clip_input=pixel_values, images=stand_ins)
            flagged = [bool(flag) for flag in has_nsfw_concepts]
        else:
            top = self.model(pixel_values=pixel_values).logits.argmax(dim=-1).tolist()
            flagged = [label in self.flagged_labels for label in top]
        if any(flagged):
            logger.info("the safety checker flagged %d of %d images", sum(flagged), len(flagged))
        return flagged


def _subfolder(name: str | None) -> dict[str, Any]:
    return {} if name is None else {"subfolder": name}


def _layout(source: str) -> SafetyCheckerLayout:
    """A folder's layout (safety_layout.py), or a hub id's from its config.json."""
    folder = Path(source)
    try:
        if folder.is_dir():
            return folder_layout(folder)
        return SafetyCheckerLayout.of_config(_hub_config(source))
    except SafetyLayoutError as error:
        raise UnusableSafetyChecker(f"{VARIABLE}={source!r}: {error}") from None


def _hub_config(repo_id: str) -> dict[str, Any]:
    from huggingface_hub import hf_hub_download

    try:
        path = hf_hub_download(repo_id, "config.json")
        loaded: dict[str, Any] = json.loads(Path(path).read_text())
    except Exception as error:  # offline and not cached, unknown repo, no permission
        raise UnusableSafetyChecker(
            f"{VARIABLE}={repo_id!r} is no folder, and its config.json cannot be had from the "
            f"hub or its cache: {error}"
        ) from error
    return loaded
