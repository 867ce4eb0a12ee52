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
    # The single-file case ran after the others, its record beside theirs.
    single = json.loads((tmp_path / "smoke-single-file.json").read_text())
    assert set(single["service"]["memory_gib"]) == set(single["stock"]["memory_gib"])


def test_the_single_file_case_runs_alone_on_the_tiny_configs(tmp_path: Path) -> None:
    out = tmp_path / "alone.json"
    arguments = ["--smoke", "--single-file-only", "--workdir", str(tmp_path), "--size", "64"]
    assert fullsize.main([*arguments, "--out", str(out)]) == 0
    # Alone: no service served, no stock pipelines from folders, only this case's record.
    assert not out.exists() and not (tmp_path / "service").exists()
    record = json.loads((tmp_path / "alone-single-file.json").read_text())
    # Written once beside the models, in the original layout, fp16.
    path = Path(record["file"]["path"])
    assert path.parent == tmp_path / "models-tiny-single-file" and record["file"]["written"]
    header = json.loads(path.read_bytes()[8 : 8 + int.from_bytes(path.read_bytes()[:8], "little")])
    assert any(key.startswith("model.diffusion_model.") for key in header)
    assert any(key.startswith("conditioner.embedders.1.model.") for key in header)
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"F16"}
    for side in ("service", "stock"):
        seen = record[side]
        # Both took the same configs, and loaded in the dtype asked.
        config = Path(seen["config"])
        assert json.loads((config / "unet" / "config.json").read_text()) == json.loads(
            (Path(record["service"]["config"]) / "unet" / "config.json").read_text()
        )
        assert seen["dtypes"] == ["float32"]
        memory = seen["memory_gib"]
        assert 0 < memory["imported_anon"] <= memory["load_peak_anon"] + 0.01
        assert memory["load_peak_anon"] <= memory["peak_anon"] + 0.01
        assert memory["load_peak_anon"] <= memory["load_peak"] + 0.02 <= memory["peak"] + 0.04
        assert seen["load_s"] > 0 and seen["render_s"] > 0 and len(seen["pixels_sha256"]) == 16
    # The render worker's whole start, the refiner folder beside the file's base.
    worker = record["worker"]["memory_gib"]
    assert record["worker"]["dtypes"] == ["float32"] and record["worker"]["load_s"] > 0
    assert 0 < worker["loaded_anon"] <= worker["load_peak_anon"] + 0.01
    assert worker["load_peak_anon"] <= worker["load_peak"] + 0.02
    comparison = record["comparison"]
    assert comparison["load_peak_ratio"] > 0 and comparison["load_peak_anon_ratio"] > 0
    # Stock's pixels are compared, not asserted: on the tiny configs its OpenCLIP text encoder
    # is not the file's (diffusers tells the two encoders apart by width, equal there).
    assert 0 <= comparison["pixel_max"] <= 255
