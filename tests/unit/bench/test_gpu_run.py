"""bench/gpu/: the wheel list for the GPU machine, the saved pair, and run.sh's smoke mode."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import gpu_bench
from bench.gpu import wheel_set
from sdxl_service.engine.loading import load_pipelines
from sdxl_service.engine.tiny import build_tiny_pipelines

REPO = Path(__file__).resolve().parents[3]


def test_wheel_list_leaves_out_what_the_gpu_machine_has() -> None:
    needed, fallback = wheel_set.wheel_sets()
    downloaded = set(needed) | set(fallback)
    for present in ("torch", "transformers", "accelerate", "huggingface-hub", "safetensors"):
        assert present not in downloaded
    for present in ("numpy", "pillow", "opencv-python-headless", "httpx", "tokenizers"):
        assert present not in downloaded
    assert not any(name.startswith(("nvidia-cu", "triton")) for name in downloaded)
    assert "boto3" not in downloaded  # S3 files only
    # Same pins as pyproject.toml; the service's own stack is all there.
    assert needed["diffusers"] == "0.42.1"
    assert needed["bentoml"] == "1.4.40"
    for name in ("fastapi", "starlette", "pydantic-settings", "python-multipart", "uvicorn"):
        assert name in needed, name
    assert "nvidia-ml-py" in needed  # bentoml's, not CUDA's
    # Installed only where the machine's own version does not satisfy.
    assert {"pydantic", "typing-extensions", "anyio"} <= set(fallback)


def test_prepare_dry_run_lists_the_wheels_without_downloading(tmp_path: Path) -> None:
    completed = subprocess.run(
        ["bash", "bench/gpu/prepare.sh", "--dry-run", "--dest", str(tmp_path / "w")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env={**os.environ, "PYTHON": sys.executable},
    )
    assert completed.returncode == 0, completed.stderr
    assert "diffusers==0.42.1" in completed.stdout.splitlines()
    assert not any(line.startswith("torch") for line in completed.stdout.splitlines())
    assert not (tmp_path / "w").exists()


def test_saved_pair_loads_through_from_pretrained_with_the_fp16_variant(tmp_path: Path) -> None:
    base, refiner = build_tiny_pipelines()
    gpu_bench.save_pair(base, refiner, tmp_path / "pair", smoke=False)
    assert (tmp_path / "pair" / "COMPLETE").is_file()
    unet_files = {p.name for p in (tmp_path / "pair" / "base" / "unet").iterdir()}
    assert unet_files == {"config.json", "diffusion_pytorch_model.fp16.safetensors"}

    loaded, loaded_refiner = load_pipelines(
        str(tmp_path / "pair" / "base"),
        str(tmp_path / "pair" / "refiner"),
        dtype=torch.float32,
        variant="fp16",
    )
    assert loaded_refiner.vae is loaded.vae
    for name, parameter in base.unet.state_dict().items():
        assert torch.equal(loaded.unet.state_dict()[name], parameter), name


@pytest.mark.slow
def test_smoke_run_exercises_every_part_and_writes_results(tmp_path: Path) -> None:
    out = tmp_path / "out"
    completed = subprocess.run(
        ["bash", "bench/gpu/run.sh", "--smoke", str(out)],
        capture_output=True,
        text=True,
        timeout=400,
        cwd=REPO,
        # The test's interpreter as it is (no venv, no wheels); a generous budget,
        # so that a loaded machine still runs every part.
        env={
            **os.environ,
            "SDXL_GPU_BENCH_PYTHON": sys.executable,
            "SDXL_GPU_BENCH_BUDGET_S": "300",
        },
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())

    assert results["env"]["torch"] == torch.__version__
    engine = results["engine"]
    assert {(r["batch"], r["size"]) for r in engine} == {(1, 64), (2, 64), (1, 96)}
    assert all(r["status"] == "ok" for r in engine), engine
    assert all(
        r["switches"]["channels_last"] and r["switches"]["attention"] == "sdpa" for r in engine
    )

    http = results["http"]
    assert http["status"] == "ok", http
    assert http["ready_s"] > 0 and len(http["c1_latency_s"]) == 2
    assert http["engine_s_per_image"] == next(
        r["seconds_per_image"] for r in engine if r["batch"] == 1
    )
    assert "overhead_ms" in http
    assert [row["concurrency"] for row in http["throughput"]] == [2]
    assert http["throughput"][0]["images_per_s"] > 0
    assert http["liveness"]["/livez"]["failed"] == 0

    controls = {(r["config"], r.get("units"), r.get("call")): r for r in results["controls"]}
    assert controls[("load", None, None)]["parameters"] > 0
    for units in (0, 1, 2):
        assert controls[("eager", units, None)]["status"] == "ok"
        assert controls[("eager", units, None)]["seconds_per_image"] > 0
    # Units change the picture: the ControlNet's zero-initialised layers were given weights.
    assert controls[("eager", 1, None)]["max_abs_diff_vs_0_units"] > 0
    assert controls[("eager", 2, None)]["max_abs_diff_vs_0_units"] > 0
    assert controls[("cuda_graphs", 2, None)]["status"].startswith("skipped: CUDA graphs")
    adapter = controls[("ip_adapter", 0, None)]
    assert adapter["status"] == "ok" and adapter["max_abs_diff_vs_0_units"] > 0
    # On the CPU the engine declines to compile: the same pixels as eager.
    for units in (1, 2):
        steady = controls[("compiled", units, "steady")]
        assert steady["optimisations"]["compile"] is False
        assert steady["max_abs_diff_vs_eager"] == 0

    matrix = results["matrix"]
    assert [r["config"] for r in matrix] == [
        "eager",
        "+sdpa",
        "+channels_last",
        "+fuse_qkv",
        "+compile",
    ]
    assert all(r["status"] == "ok" for r in matrix), matrix
    assert all(r["max_abs_diff"] <= 2 for r in matrix[1:])

    events = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert {e["part"] for e in events} == {"env", "engine", "http", "controls", "matrix", "done"}
    report = (out / "results.md").read_text()
    assert "Engine alone:" in report and "Through HTTP" in report and "matrix" in report
    assert "What a ControlNet adds" in report
