"""make bench-fullsize's whole path (build, serve, render, stock diffusers, report) on the tiny
configurations: the full-size run is too heavy for the suite, its code is not."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import fullsize

pytestmark = pytest.mark.integration


def test_the_fullsize_bench_runs_end_to_end_on_the_tiny_configs(tmp_path: Path) -> None:
    out = tmp_path / "smoke.json"
    assert (
        fullsize.main(["--smoke", "--workdir", str(tmp_path), "--size", "64", "--out", str(out)])
        == 0
    )
    record = json.loads(out.read_text())
    # The folders hold fp16 variant files alone, and the service loaded them in float32.
    models = tmp_path / "models-tiny"
    files = sorted(p.name for p in (models / "base" / "unet").glob("*.safetensors"))
    assert files == ["diffusion_pytorch_model.fp16.safetensors"]
    assert record["dtype"] == "float32" and record["build"]["built"] is True
    # The refiner's own text_encoder_2 and VAE are on disk, not held.
    assert 0 < record["held_weights_gib"] < record["weights_gib"]
    assert set(record["comparison"]) == set(fullsize.CASES)
    for case, row in record["comparison"].items():
        # The service's images are stock diffusers' recipes, pixel for pixel (float32).
        assert row["pixel_max"] <= 1, (case, row)
        assert row["service_render_s"] > 0 and row["stock_s"] > 0
        assert row["service_first_s"] > 0 and row["stock_first_s"] > 0
        # Each round of a case is the same request: the same pixels, both sides.
        assert row["same_pixels_each_round"] is True
    memory = record["service"]["memory_gib"]
    assert set(memory) == {"http", "render_worker"}
    assert set(memory["render_worker"]) == {"peak", "anon_now", "file_now", "peak_anon"}
    # Sampled from start to stop: never below what the worker holds at the end.
    worker = memory["render_worker"]
    assert worker["anon_now"] <= worker["peak_anon"] + 0.01 <= worker["peak"] + 0.02
    stock = record["stock"]
    assert stock["memory_gib"]["anon_now"] <= stock["memory_gib"]["peak_anon"] + 0.01
    # The HTTP process holds no model: it stays small whatever the weights.
    assert 0 < memory["http"]["peak"] < 1.0
    # Start counted as the service's is: process start to loaded, imports included.
    assert record["service"]["ready_s"] > 0 and 0 < stock["load_s"] < stock["start_s"]
