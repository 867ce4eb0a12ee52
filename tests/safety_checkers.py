"""Tiny safety checkers saved by the tests, with verdicts the tests decide.

`diffusers_checker`: diffusers' StableDiffusionSafetyChecker on a tiny random CLIP vision
model, every concept embedding set to the direction from the other images' embeddings to the
one it must flag, and the concept thresholds halfway between that image's similarity and the
closest other image's, so it flags that image and none of the others. `vit_classifier`: a
tiny ViT with the labels `normal` and `nsfw`, whose classifier bias alone decides (its
weights are zero): it flags every image, or none.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

CLIP_VISION = {
    "hidden_size": 32,
    "intermediate_size": 37,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "image_size": 32,
    "patch_size": 8,
}
PROCESSOR = {"size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32}}


def diffusers_checker(
    folder: Path, flagged: Image.Image, others: Sequence[Image.Image], *, pipeline_layout: bool
) -> Path:
    """A StableDiffusionSafetyChecker that flags `flagged` and none of `others`: saved at
    the folder's root with its preprocessor_config.json (the CompVis repository's layout), or
    as a pipeline's safety_checker/ and feature_extractor/."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessorPil

    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_attention_heads": 4,
            "num_hidden_layers": 2,
            "vocab_size": 99,
        },
        vision_config=CLIP_VISION,
        projection_dim=16,
    )
    checker = StableDiffusionSafetyChecker(config).eval()
    processor = CLIPImageProcessorPil(**PROCESSOR)
    with torch.no_grad():
        pixels = processor([flagged, *others], return_tensors="pt").pixel_values
        embeds = checker.visual_projection(checker.vision_model(pixels)[1])
        embeds = torch.nn.functional.normalize(embeds)
        # The concept: the direction from the others' mean to the flagged image's embedding
        # (a random tiny CLIP sees noise images as alike: their embeddings nearly coincide).
        concept = embeds[0] - embeds[1:].mean(dim=0) if others else embeds[0]
        concept = torch.nn.functional.normalize(concept, dim=0)
        flagged_score = float(embeds[0] @ concept)
        others_score = float((embeds[1:] @ concept).max()) if others else -1.0
        # diffusers rounds each score to 3 decimals before comparing it with 0.
        assert flagged_score - others_score > 0.01, "the images are too alike to tell apart"
        checker.concept_embeds.copy_(concept.expand_as(checker.concept_embeds))
        checker.concept_embeds_weights.fill_((flagged_score + others_score) / 2)
        # Never reached (a cosine is at most 1): no "special care" adjustment.
        checker.special_care_embeds_weights.fill_(2.0)
    model_dir = folder / "safety_checker" if pipeline_layout else folder
    processor_dir = folder / "feature_extractor" if pipeline_layout else folder
    checker.save_pretrained(model_dir, safe_serialization=True)
    processor.save_pretrained(processor_dir)
    return folder


def vit_classifier(folder: Path, *, flags_everything: bool) -> Path:
    """A tiny ViT image classifier (`normal`, `nsfw`) whose verdict is its bias alone."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessorPil

    config = ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        image_size=32,
        patch_size=8,
        num_labels=2,
        id2label={0: "normal", 1: "nsfw"},
        label2id={"normal": 0, "nsfw": 1},
    )
    model = ViTForImageClassification(config).eval()
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.copy_(torch.tensor([0.0, 1.0] if flags_everything else [1.0, 0.0]))
    model.save_pretrained(folder, safe_serialization=True)
    ViTImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder
