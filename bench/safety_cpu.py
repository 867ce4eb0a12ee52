"""make bench-safety (and make bench): the safety checker's time per image on the CPU.

What SDXL_SAFETY_CHECKER adds to each rendered batch: `SafetyChecker.flags` (the image
processor's resize to 224x224 and normalisation, then one batched forward) over 1024x1024
images, the size SDXL renders. Both kinds the service loads, at the size of the models named in
docs/CONFIGURATION.md, built from their published configurations with random weights (no
download; the time depends on the architecture, not on the weights):

- diffusers' StableDiffusionSafetyChecker, CompVis/stable-diffusion-safety-checker's CLIP
  ViT-L/14 vision tower (24 layers, width 1024, 224 px, patches of 14) and its 17 + 3 concepts;
- a transformers image classifier as Falconsai/nsfw_image_detection is: ViT-B/16 (12 layers,
  width 768, 224 px, patches of 16), two labels.

Batches of 1 and 4; the median of `--repeat` calls after one warm-up call, divided by the batch.
`--smoke` runs the same on tiny models (seconds): tests/unit/bench/test_bench_safety.py.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from typing import Any

import numpy as np
import torch
from PIL import Image

from bench.performance_doc import write_section
from bench.runs import current_commit
from tests.service_process import REPO

RESULTS = REPO / "bench" / "results" / "safety-cpu.json"
IMAGE_SIDE = 1024
BATCHES = (1, 4)

CLIP_L14_VISION = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_attention_heads": 16,
    "num_hidden_layers": 24,
    "image_size": 224,
    "patch_size": 14,
}
VIT_B16 = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "image_size": 224,
    "patch_size": 16,
}
TINY = {
    "hidden_size": 32,
    "intermediate_size": 37,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "image_size": 32,
    "patch_size": 8,
}


def checkers(smoke: bool) -> dict[str, Any]:
    """The two kinds of SafetyChecker, as the service builds them after loading."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import (
        CLIPConfig,
        CLIPImageProcessorPil,
        ViTConfig,
        ViTForImageClassification,
        ViTImageProcessorPil,
    )

    from sdxl_service.engine.safety import SafetyChecker

    torch.manual_seed(0)
    vision = TINY if smoke else CLIP_L14_VISION
    side = vision["image_size"]
    clip = StableDiffusionSafetyChecker(
        CLIPConfig(vision_config=vision, projection_dim=16 if smoke else 768)
    )
    clip_processor = CLIPImageProcessorPil(
        size={"shortest_edge": side}, crop_size={"height": side, "width": side}
    )
    vit_config = TINY if smoke else VIT_B16
    vit = ViTForImageClassification(
        ViTConfig(**vit_config, num_labels=2, id2label={0: "normal", 1: "nsfw"})
    )
    vit_side = vit_config["image_size"]
    vit_processor = ViTImageProcessorPil(size={"height": vit_side, "width": vit_side})
    return {
        "StableDiffusionSafetyChecker (CLIP ViT-L/14)": SafetyChecker(
            clip, clip_processor, source="bench", diffusers_checker=True
        ),
        "image classifier (ViT-B/16, 2 labels)": SafetyChecker(
            vit,
            vit_processor,
            source="bench",
            diffusers_checker=False,
            flagged_labels=frozenset({1}),
            label_names=("normal", "nsfw"),
        ),
    }


def images(n: int, side: int) -> list[Image.Image]:
    rng = np.random.default_rng(7)
    return [
        Image.fromarray(rng.integers(0, 256, (side, side, 3), np.uint8), "RGB") for _ in range(n)
    ]


def measure(smoke: bool, repeat: int) -> dict[str, Any]:
    side = 64 if smoke else IMAGE_SIDE
    rows = []
    for name, checker in checkers(smoke).items():
        params = sum(p.numel() for p in checker.model.parameters())
        for batch in BATCHES:
            pictures = images(batch, side)
            checker.flags(pictures)  # warm-up
            times = []
            for _ in range(repeat):
                started = time.perf_counter()
                checker.flags(pictures)
                times.append(time.perf_counter() - started)
            per_image = 1000 * statistics.median(times) / batch
            rows.append(
                {"checker": name, "parameters_m": params / 1e6, "batch": batch, "ms": per_image}
            )
            print(f"{name}, batch {batch}: {per_image:.0f} ms per image", flush=True)
    return {
        "date": time.strftime("%Y-%m-%d"),
        "commit": current_commit(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, no GPU",
        "torch_threads": torch.get_num_threads(),
        "image_side": side,
        "repeat": repeat,
        "rows": rows,
    }


def markdown(results: dict[str, Any]) -> str:
    lines = [
        f"{results['date']}, commit {results['commit']}, {results['machine']} "
        f"({results['torch_threads']} torch threads); {results['image_side']}x"
        f"{results['image_side']} images, median of {results['repeat']} calls after a warm-up; "
        "random weights at the published sizes (`make bench-safety`).",
        "",
        "| checker | parameters | batch | ms per image |",
        "|---|---|---|---|",
    ]
    for row in results["rows"]:
        lines.append(
            f"| {row['checker']} | {row['parameters_m']:.0f} M | {row['batch']} | {row['ms']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="tiny models; writes nothing")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    results = measure(args.smoke, 1 if args.smoke else args.repeat)
    section = markdown(results)
    print(section)
    if args.smoke:
        return
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    write_section("safety-bench", "Safety checker (CPU)", section)


if __name__ == "__main__":
    main()
