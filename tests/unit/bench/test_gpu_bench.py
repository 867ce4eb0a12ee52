"""bench/gpu_bench.py on a CPU machine: published configs, fail-fast, and the script's plumbing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import gpu_bench
from sdxl_service.engine.components import (
    assemble_pipelines,
    build_clip_tokenizer,
    build_modules,
    scheduler_config,
)
from sdxl_service.engine.handover import ensemble_split

REPO = Path(__file__).resolve().parents[3]
BENCH = REPO / "bench" / "gpu_bench.py"

# Published parameter counts (sdxl-architecture.md for the UNets and the VAE;
# CLIP ViT-L/14 text model and OpenCLIP ViT-bigG/14 text model with projection).
PUBLISHED_PARAMETERS = {
    "base_unet": 2_567_463_684,
    "refiner_unet": 2_259_526_660,
    "vae": 83_653_863,
    "text_encoder": 123_060_480,
    "text_encoder_2": 694_659_840,
}


def test_configs_build_the_published_sdxl_architectures() -> None:
    configs = gpu_bench.load_configs()
    with torch.device("meta"):
        modules = build_modules(configs, dtype=torch.float16)
    counts = {name: sum(p.numel() for p in module.parameters()) for name, module in modules.items()}
    assert counts == PUBLISHED_PARAMETERS
    assert all(p.dtype == torch.float16 for p in modules["base_unet"].parameters())

    base, refiner = assemble_pipelines(modules)
    text_1, text_2 = modules["text_encoder"].config, modules["text_encoder_2"].config
    assert base.unet.config.cross_attention_dim == text_1.hidden_size + text_2.hidden_size == 2048
    assert refiner.unet.config.cross_attention_dim == text_2.hidden_size == 1280
    assert refiner.text_encoder_2 is base.text_encoder_2 and refiner.vae is base.vae
    assert base.unet.config.sample_size * base.vae_scale_factor == 1024
    # The offline tokenizer's ids are all valid rows of SDXL's 49408-entry embeddings.
    tokenizer = build_clip_tokenizer()
    assert max(tokenizer.get_vocab().values()) < text_1.vocab_size == text_2.vocab_size == 49408


def test_default_workload_is_1024px_30_steps_at_high_noise_frac_0_8() -> None:
    args = gpu_bench.parse_args(["--matrix"])
    assert (args.size, args.steps, args.high_noise_frac) == (1024, 30, 0.8)
    assert args.dtype == ["fp16", "bf16"]
    # Not 24 + 6: SDXL's Euler schedule ("leading", 33 apart: 958, 925, ..., 1) has
    # 23 timesteps at or above diffusers' cut-off of 1000 * (1 - 0.8) = 200.
    assert gpu_bench.workload_split(args) == (23, 7)


def test_reported_split_is_what_the_engine_runs(tiny_engine) -> None:
    from sdxl_service.choices import RefinerMode
    from sdxl_service.contract.render_request import RenderParams
    from sdxl_service.engine.render_batch import ImageTask, RenderBatch

    calls = {"base": 0, "refiner": 0}
    hooks = [
        tiny_engine.base.unet.register_forward_hook(
            lambda *_: calls.__setitem__("base", calls["base"] + 1)
        ),
        tiny_engine.refiner.unet.register_forward_hook(
            lambda *_: calls.__setitem__("refiner", calls["refiner"] + 1)
        ),
    ]
    try:
        params = RenderParams(
            width=64,
            height=64,
            num_inference_steps=30,
            guidance_scale=5.0,
            high_noise_frac=0.8,
            refiner=RefinerMode.ENSEMBLE,
            scheduler="euler",
        )
        tiny_engine.render(RenderBatch(params=params, tasks=[ImageTask(prompt="x", seed=0)]))
    finally:
        for hook in hooks:
            hook.remove()
    assert (calls["base"], calls["refiner"]) == ensemble_split(30, 0.8, "euler", scheduler_config())


def test_matrix_adds_one_optimisation_at_a_time_and_compiles_last() -> None:
    fp16 = gpu_bench.matrix_configs("fp16")
    assert [c.name for c in fp16] == [
        "eager",
        "+sdpa",
        "+channels_last",
        "+fuse_qkv",
        "+vae_bf16",
        "+compile",
    ]
    assert fp16[0] == gpu_bench.BenchConfig("eager")  # nothing switched on
    final = fp16[-1]
    assert (final.attention, final.channels_last, final.fuse_qkv) == ("sdpa", True, True)
    # Repeated blocks by default (about a minute); SDXL_COMPILE's whole UNets on request.
    assert (final.vae_dtype, final.compile) == ("bf16", gpu_bench.COMPILE_BLOCKS)
    assert (
        gpu_bench.matrix_configs("fp16", gpu_bench.COMPILE_FULL)[-1]
        .settings("cuda", "fp16")
        .compile
    )
    assert not final.settings("cuda", "fp16").compile
    assert "+vae_bf16" not in [c.name for c in gpu_bench.matrix_configs("bf16")]


def test_without_cuda_it_exits_2_at_once_with_a_clear_message() -> None:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    completed = subprocess.run(
        [sys.executable, str(BENCH), "--matrix"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        cwd=REPO,
    )
    assert completed.returncode == 2
    assert "needs a CUDA GPU" in completed.stderr
    assert "torch.cuda.is_available() is False" in completed.stderr
    assert completed.stdout == ""


@pytest.mark.slow
def test_smoke_matrix_runs_the_whole_script_on_the_cpu(tmp_path: Path) -> None:
    out = tmp_path / "smoke.json"
    completed = subprocess.run(
        [sys.executable, str(BENCH), "--smoke", "--matrix", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert "| config | dtype | size | batch | s/image |" in completed.stdout

    results = json.loads(out.read_text())
    runs = results["runs"]
    assert {run["config"] for run in runs} == {
        "eager",
        "+sdpa",
        "+channels_last",
        "+fuse_qkv",
        "+compile",
    }
    assert all(run["status"] == "ok" for run in runs), runs
    assert {(run["batch"], run["size"]) for run in runs} == {(1, 64), (2, 64)}
    # The compile row comes back from its child process, compared like the others;
    # on the CPU the engine declines to compile and says so.
    compiled = [run for run in runs if run["config"] == "+compile"]
    assert compiled and all(run["optimisations"]["compile"] is False for run in compiled)
    for run in runs:
        assert run["seconds_per_image"] > 0
        if run["config"] != "eager":
            assert run["compared_with"] == "eager fp32"
            assert run["max_abs_diff"] <= 2  # same weights and seeds: only rounding differs


def test_preview_rows_run_outside_the_matrix_with_every_decoder() -> None:
    assert gpu_bench.parse_args([]).previews == ["approx", "vae", "taesd"]
    assert gpu_bench.parse_args(["--smoke"]).preview_repeats == 1
    assert gpu_bench.parse_args([]).preview_repeats == 3
    assert gpu_bench.parse_args(["--matrix"]).previews == []
    assert gpu_bench.parse_args(["--previews", "none"]).previews == []
    assert gpu_bench.parse_args(["--previews", "taesd"]).previews == ["taesd"]
    with pytest.raises(SystemExit):
        gpu_bench.parse_args(["--previews", "sharp"])


def test_preview_taesd_is_taesdxls_architecture() -> None:
    args = gpu_bench.parse_args([])
    args.device = "meta"
    taesd = gpu_bench.preview_taesd(args, torch.float16)
    # madebyollin/taesdxl: 1.2 M decoder parameters (its taesdxl_decoder.safetensors is
    # 4.9 MB of float32), SDXL's latent API.
    assert sum(p.numel() for p in taesd.decoder.parameters()) == 1_222_531
    assert taesd.config.latent_channels == 4 and taesd.config.scaling_factor == 1.0
    assert next(taesd.parameters()).dtype == torch.float16
