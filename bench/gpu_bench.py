"""GPU benchmark: full-size SDXL base + refiner (random weights) through the service's Engine.

Builds both architectures from bench/configs/*.json (the published configs)
directly on the GPU, so nothing is downloaded, and renders 1024x1024 images,
30 steps in ensemble at high_noise_frac 0.8 (SDXL's Euler schedule splits them
23 base + 7 refiner in diffusers), at n=1 and batched, in fp16 and bf16.

    python bench/gpu_bench.py --matrix          # baseline, then each optimisation added
    python bench/gpu_bench.py --dtype bf16 --channels-last --fuse-qkv --batch 1,8

`--matrix` compares every run's pixels with the unoptimised run of the same
dtype (same random weights, same seeds) and runs torch.compile last, in a
child process killed when the time budget (--budget-s) runs out. Results go to
bench/results/gpu-<card>.json (rewritten after every run) and a markdown
table to stdout. Exits 2 at once without CUDA. `--smoke` runs the same code on
the CPU with the tiny configs: a check of the script, not a measurement.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

# The budget counts from here: after torch's import, before CUDA start-up and the builds.
STARTED = time.monotonic()

REPO = Path(__file__).resolve().parent.parent
# Run as a script (`make bench-gpu`) without the package installed.
sys.path.insert(0, str(REPO / "src"))

CONFIGS_DIR = REPO / "bench" / "configs"
RESULTS_DIR = REPO / "bench" / "results"
SMOKE_RESULTS = REPO / "bench" / "out" / "cpu-smoke.json"
COMPONENTS = ("base_unet", "refiner_unet", "vae", "text_encoder", "text_encoder_2")
NO_CUDA_EXIT = 2
WEIGHTS_SEED = 0
WARMUP_STEPS = 3  # with high_noise_frac 0.8: 2 base steps + 1 refiner step, both UNets warm
PROMPTS = (
    "a photograph of an astronaut riding a horse on the moon, 35mm, golden hour",
    "an isometric illustration of a tiny cozy library inside a glass bottle",
    "macro shot of a dew-covered spider web at dawn, shallow depth of field",
    "oil painting of a lighthouse in a storm, dramatic waves, by the sea",
)
NEGATIVE_PROMPT = "blurry, low quality, watermark"
SCHEDULER = "euler"  # SDXL 1.0's own
DTYPE_NAMES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}


@dataclass(frozen=True)
class BenchConfig:
    """One column of the matrix: the optimisation switches handed to the Engine."""

    name: str
    attention: str = "eager"
    channels_last: bool = False
    fuse_qkv: bool = False
    compile: bool = False
    vae_dtype: str = "auto"

    def settings(self, device: str, dtype: str) -> Any:
        from sdxl_service.choices import Preset
        from sdxl_service.settings import Settings

        return Settings(
            preset=Preset.SDXL,
            device=device,
            dtype=DTYPE_NAMES[dtype],
            attention=self.attention,
            channels_last=self.channels_last,
            fuse_qkv=self.fuse_qkv,
            compile=self.compile,
            vae_dtype=self.vae_dtype,
        )


def matrix_configs(dtype: str) -> list[BenchConfig]:
    """The unoptimised run, then one optimisation added at a time (compile last)."""
    eager = BenchConfig("eager")
    steps = [
        eager,
        replace(eager, name="+sdpa", attention="sdpa"),
        replace(eager, name="+channels_last", attention="sdpa", channels_last=True),
    ]
    steps.append(replace(steps[-1], name="+fuse_qkv", fuse_qkv=True))
    if dtype == "fp16":
        # fp16 runs decode in fp32 (the stock VAE overflows in fp16); bf16 does not overflow.
        steps.append(replace(steps[-1], name="+vae_bf16", vae_dtype="bf16"))
    steps.append(replace(steps[-1], name="+compile", compile=True))
    return steps


# --- building the pair -------------------------------------------------------


def load_configs(directory: Path = CONFIGS_DIR) -> dict[str, dict[str, Any]]:
    return {name: json.loads((directory / f"{name}.json").read_text()) for name in COMPONENTS}


def build_pair(configs: dict[str, dict[str, Any]], *, device: str, dtype: torch.dtype):
    """Random-weight base + refiner built on `device`; the same weights for the same seed."""
    from sdxl_service.engine.components import assemble_pipelines, build_modules

    torch.manual_seed(WEIGHTS_SEED)  # seeds CUDA too: every build draws the same weights
    with torch.device(device):
        modules = build_modules(configs, dtype=dtype)
    return assemble_pipelines(modules)


def free_device_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --- measuring ---------------------------------------------------------------


def make_batch(args: argparse.Namespace, n: int, steps: int) -> Any:
    from sdxl_service.choices import RefinerMode
    from sdxl_service.jobs import ImageTask, RenderBatch, RenderParams

    params = RenderParams(
        width=args.size,
        height=args.size,
        steps=steps,
        guidance_scale=5.0,
        high_noise_frac=args.high_noise_frac,
        refiner=RefinerMode.ENSEMBLE,
        scheduler=SCHEDULER,
    )
    tasks = [
        ImageTask(prompt=PROMPTS[i % len(PROMPTS)], negative_prompt=NEGATIVE_PROMPT, seed=1000 + i)
        for i in range(n)
    ]
    return RenderBatch(params=params, tasks=tasks)


def workload_split(args: argparse.Namespace) -> tuple[int, int]:
    """(base, refiner) steps of the workload, as the engine splits them."""
    from sdxl_service.engine.components import scheduler_config
    from sdxl_service.engine.handover import ensemble_split

    return ensemble_split(args.steps, args.high_noise_frac, SCHEDULER, scheduler_config())


def synchronize(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


class Deadline:
    def __init__(self, budget_s: float) -> None:
        self.at = STARTED + budget_s

    def left(self) -> float:
        return self.at - time.monotonic()


def run_config(
    config: BenchConfig,
    dtype: str,
    args: argparse.Namespace,
    deadline: Deadline,
    configs: dict[str, dict[str, Any]],
) -> tuple[list[dict[str, Any]], dict[tuple[int, int], np.ndarray]]:
    """Build, optimise, warm up and time one config; return run records and the images."""
    from sdxl_service.choices import Preset
    from sdxl_service.engine import Engine

    device = args.device
    records: list[dict[str, Any]] = []
    images: dict[tuple[int, int], np.ndarray] = {}
    common = {"config": config.name, "dtype": dtype, "switches": asdict(config)}

    free_device_memory()
    started = time.monotonic()
    base, refiner = build_pair(configs, device=device, dtype=getattr(torch, DTYPE_NAMES[dtype]))
    stage_seconds: dict[str, float] = {}
    engine = Engine(
        base,
        refiner,
        config.settings(device, dtype),
        preset=Preset.SDXL,
        device=device,
        dtype=getattr(torch, DTYPE_NAMES[dtype]),
        base_source="random weights: bench/configs/base_unet.json",
        refiner_source="random weights: bench/configs/refiner_unet.json",
        stage_observer=lambda stage, s: stage_seconds.__setitem__(
            stage, stage_seconds.get(stage, 0.0) + s
        ),
        compile_mode=args.compile_mode,
    )
    synchronize(device)
    build_s = time.monotonic() - started
    weights_gib = torch.cuda.memory_allocated() / 2**30 if torch.cuda.is_available() else None
    common["optimisations"] = engine.optimisations

    seconds_per_image: float | None = None
    warm_batches: set[int] = set()
    for n in args.batch:
        # Compiled graphs are specialised to the batch size: warm up each one.
        needs_warmup = not warm_batches or (config.compile and n not in warm_batches)
        first_warmup = records[0].get("warmup_s", 0.0) if records else 0.0
        warmup_estimate = first_warmup if needs_warmup else 0.0
        estimate = warmup_estimate + n * (seconds_per_image or 0.0) * 1.3
        if seconds_per_image is not None and estimate > deadline.left():
            records.append({**common, "batch": n, "status": "skipped: time budget"})
            continue
        record: dict[str, Any] = {**common, "batch": n, "build_s": round(build_s, 2)}
        try:
            warmup_s = 0.0
            if needs_warmup:
                synchronize(device)
                t0 = time.monotonic()
                engine.render(make_batch(args, n, WARMUP_STEPS))
                synchronize(device)
                warmup_s = time.monotonic() - t0
                warm_batches.add(n)
            record["warmup_s"] = round(warmup_s, 2)

            stage_seconds.clear()
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            synchronize(device)
            t0 = time.monotonic()
            rendered = engine.render(make_batch(args, n, args.steps))
            synchronize(device)
            seconds = time.monotonic() - t0
        except Exception as error:  # OOM included: recorded, and the matrix goes on
            record.update(status="error", error=f"{type(error).__name__}: {error}"[:500])
            records.append(record)
            free_device_memory()
            continue
        if n == 1 or seconds_per_image is None:
            seconds_per_image = seconds / n
        for index, image in enumerate(rendered):
            images[(n, index)] = np.asarray(image)
        record.update(
            status="ok",
            seconds=round(seconds, 3),
            seconds_per_image=round(seconds / n, 3),
            images_per_s=round(n / seconds, 3),
            stage_seconds={stage: round(s, 3) for stage, s in stage_seconds.items()},
            weights_gib=round(weights_gib, 2) if weights_gib is not None else None,
            peak_gib=(
                round(torch.cuda.max_memory_allocated() / 2**30, 2)
                if torch.cuda.is_available()
                else None
            ),
        )
        records.append(record)

    del engine, base, refiner
    free_device_memory()
    return records, images


def compare(
    images: dict[tuple[int, int], np.ndarray], reference: dict[tuple[int, int], np.ndarray]
) -> dict[tuple[int, int], dict[str, Any]]:
    """Per image: max |difference| in 8-bit levels and PSNR (None when identical)."""
    out: dict[tuple[int, int], dict[str, Any]] = {}
    for key, image in images.items():
        if key not in reference:
            continue
        difference = image.astype(np.float64) - reference[key].astype(np.float64)
        mse = float(np.mean(difference**2))
        out[key] = {
            "max_abs_diff": int(np.abs(difference).max()),
            "psnr_db": None if mse == 0 else round(10 * math.log10(255.0**2 / mse), 2),
        }
    return out


def attach_comparison(
    records: list[dict[str, Any]],
    images: dict[tuple[int, int], np.ndarray],
    reference: dict[tuple[int, int], np.ndarray],
    reference_name: str,
) -> None:
    per_image = compare(images, reference)
    for record in records:
        if record.get("status") != "ok":
            continue
        batch_stats = [v for (n, _), v in per_image.items() if n == record["batch"]]
        if not batch_stats:
            continue
        psnrs = [s["psnr_db"] for s in batch_stats if s["psnr_db"] is not None]
        record["compared_with"] = reference_name
        record["max_abs_diff"] = max(s["max_abs_diff"] for s in batch_stats)
        record["min_psnr_db"] = min(psnrs) if psnrs else None  # None: identical pixels


# --- the compile child -------------------------------------------------------


def run_in_child(
    config: BenchConfig, dtype: str, args: argparse.Namespace, deadline: Deadline
) -> tuple[list[dict[str, Any]], dict[tuple[int, int], np.ndarray]]:
    """Run one config in a child process killed at the deadline (torch.compile can take minutes)."""
    common = {"config": config.name, "dtype": dtype, "switches": asdict(config)}
    timeout = deadline.left() - 5
    if timeout < args.min_child_s:
        return [{**common, "status": f"skipped: {max(timeout, 0):.0f} s left of the budget"}], {}
    with tempfile.TemporaryDirectory(prefix="gpu-bench-") as scratch:
        out, pictures = Path(scratch) / "child.json", Path(scratch) / "images.npz"
        command = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--dtype",
            dtype,
            "--batch",
            ",".join(map(str, args.batch)),
            "--size",
            str(args.size),
            "--steps",
            str(args.steps),
            "--high-noise-frac",
            str(args.high_noise_frac),
            "--compile-mode",
            args.compile_mode,
            "--vae-dtype",
            config.vae_dtype,
            "--budget-s",
            str(int(timeout - 2)),
            "--out",
            str(out),
            "--images-out",
            str(pictures),
            "--eager" if config.attention == "eager" else "--sdpa",
        ]
        command += ["--channels-last"] * config.channels_last + ["--fuse-qkv"] * config.fuse_qkv
        command += ["--compile"] * config.compile + ["--smoke"] * args.smoke
        started = time.monotonic()
        try:
            completed = subprocess.run(command, timeout=timeout, capture_output=True, text=True)
        except subprocess.TimeoutExpired:
            waited = time.monotonic() - started
            return [{**common, "status": f"timeout: killed after {waited:.0f} s"}], {}
        if completed.returncode != 0 or not out.is_file():
            tail = (completed.stderr or completed.stdout)[-800:]
            return [{**common, "status": "error", "error": tail}], {}
        records = json.loads(out.read_text())["runs"]
        with np.load(pictures) as saved:
            images = {
                tuple(int(part) for part in key.split("_")): saved[key] for key in saved.files
            }
        for record in records:
            record["config"] = config.name
        return records, images


# --- reporting ---------------------------------------------------------------


def card_name(args: argparse.Namespace) -> str:
    if args.smoke:
        return f"cpu-smoke ({platform.processor() or platform.machine()})"
    return torch.cuda.get_device_name()


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def results_path(args: argparse.Namespace) -> Path:
    if args.out:
        return Path(args.out)
    if args.smoke:
        return SMOKE_RESULTS
    return RESULTS_DIR / f"gpu-{slug(card_name(args))}.json"


def write_results(path: Path, args: argparse.Namespace, runs: list[dict[str, Any]]) -> None:
    import diffusers

    base_steps, refiner_steps = workload_split(args)
    document = {
        "card": card_name(args),
        "device": args.device,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "diffusers": diffusers.__version__,
        "written": datetime.now(UTC).isoformat(timespec="seconds"),
        "elapsed_s": round(time.monotonic() - STARTED, 1),
        "workload": {
            "size": args.size,
            "steps": args.steps,
            "base_steps": base_steps,
            "refiner_steps": refiner_steps,
            "high_noise_frac": args.high_noise_frac,
            "scheduler": SCHEDULER,
            "guidance_scale": 5.0,
            "batches": args.batch,
            "weights": "random, from bench/configs/*.json" if not args.smoke else "tiny configs",
            "compile_mode": args.compile_mode,
        },
        "runs": runs,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2) + "\n")


def markdown_table(runs: list[dict[str, Any]]) -> str:
    header = (
        "| config | dtype | batch | s/image | images/s | base s | refiner s | decode s "
        "| peak GiB | max abs diff | min PSNR dB | status |"
    )
    lines = [header, "|" + "---|" * 12]

    def cell(value: Any) -> str:
        return "" if value is None else str(value)

    for run in runs:
        stages = run.get("stage_seconds", {})
        psnr = run.get("min_psnr_db")
        if psnr is None and run.get("max_abs_diff") == 0:
            psnr = "identical"
        lines.append(
            "| "
            + " | ".join(
                cell(v)
                for v in (
                    run["config"],
                    run["dtype"],
                    run.get("batch"),
                    run.get("seconds_per_image"),
                    run.get("images_per_s"),
                    stages.get("base"),
                    stages.get("refiner"),
                    stages.get("decode"),
                    run.get("peak_gib"),
                    run.get("max_abs_diff"),
                    psnr,
                    run.get("status"),
                )
            )
            + " |"
        )
    return "\n".join(lines)


def progress(message: str) -> None:
    print(f"[{time.monotonic() - STARTED:6.1f} s] {message}", file=sys.stderr, flush=True)


# --- entry point -------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--matrix", action="store_true", help="eager, then one optimisation added at a time"
    )
    parser.add_argument("--dtype", default="fp16,bf16", help="comma list of fp16, bf16, fp32")
    parser.add_argument("--batch", default=None, help="comma list of batch sizes")
    parser.add_argument("--size", type=int, default=None, help="square side in pixels")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--high-noise-frac", type=float, default=0.8)
    attention = parser.add_mutually_exclusive_group()
    attention.add_argument("--sdpa", dest="attention", action="store_const", const="sdpa")
    attention.add_argument("--eager", dest="attention", action="store_const", const="eager")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--fuse-qkv", action="store_true")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--compile-mode", default="max-autotune")
    parser.add_argument("--vae-dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    parser.add_argument(
        "--budget-s",
        type=float,
        default=450,
        help="seconds for the whole run, builds and warmups included (not torch's "
        "import); a --compile run outside --matrix is not cut off",
    )
    parser.add_argument("--min-child-s", type=float, default=60, help=argparse.SUPPRESS)
    parser.add_argument("--out", help="results JSON (default bench/results/gpu-<card>.json)")
    parser.add_argument(
        "--smoke", action="store_true", help="CPU + tiny configs: checks the script"
    )
    parser.add_argument("--images-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    args.attention = args.attention or "sdpa"
    args.device = "cpu" if args.smoke else "cuda"
    default_batch = "1,2" if args.smoke else ("1,4" if args.matrix else "1,4,8")
    args.batch = [int(part) for part in (args.batch or default_batch).split(",")]
    args.size = args.size or (64 if args.smoke else 1024)
    args.steps = args.steps or (4 if args.smoke else 30)
    args.dtype = [part.strip() for part in args.dtype.split(",")]
    if args.smoke and args.dtype == ["fp16", "bf16"]:
        args.dtype = ["fp32"]  # CPU half-precision kernels say nothing about a GPU
    for dtype in args.dtype:
        if dtype not in DTYPE_NAMES:
            parser.error(f"unknown dtype {dtype!r}; use fp16, bf16 or fp32")
    return args


def single_config(args: argparse.Namespace) -> BenchConfig:
    switches = [
        args.attention,
        "channels_last" if args.channels_last else "",
        "fuse_qkv" if args.fuse_qkv else "",
        f"vae_{args.vae_dtype}" if args.vae_dtype != "auto" else "",
        "compile" if args.compile else "",
    ]
    return BenchConfig(
        name="+".join(s for s in switches if s),
        attention=args.attention,
        channels_last=args.channels_last,
        fuse_qkv=args.fuse_qkv,
        compile=args.compile,
        vae_dtype=args.vae_dtype,
    )


def run_matrix(
    args: argparse.Namespace,
    deadline: Deadline,
    configs: dict[str, dict[str, Any]],
    path: Path,
) -> list[dict[str, Any]]:
    """Every dtype's in-process rows first; then compile, in a child, on what is left."""
    runs: list[dict[str, Any]] = []
    references: dict[str, dict[tuple[int, int], np.ndarray]] = {}
    compiled: list[tuple[BenchConfig, str]] = []
    for dtype in args.dtype:
        for config in matrix_configs(dtype):
            if config.compile:
                compiled.append((config, dtype))
                continue
            progress(f"{config.name} {dtype} ({deadline.left():.0f} s of budget left)")
            if deadline.left() < 30:
                records = [
                    {"config": config.name, "dtype": dtype, "status": "skipped: time budget"}
                ]
                images: dict[tuple[int, int], np.ndarray] = {}
            else:
                records, images = run_config(config, dtype, args, deadline, configs)
            if dtype not in references:
                # The first (unoptimised) row is the reference of its dtype; it is
                # itself compared with the first dtype's, which shows what the dtype costs.
                if references:
                    first = next(iter(references))
                    attach_comparison(records, images, references[first], f"eager {first}")
                references[dtype] = images
            else:
                attach_comparison(records, images, references[dtype], f"eager {dtype}")
            runs += records
            write_results(path, args, runs)

    # Compiling both UNets with max-autotune takes minutes: only the first dtype's
    # row runs, with whatever remains of the budget.
    for config, dtype in compiled[:1]:
        progress(f"{config.name} {dtype} in a child ({deadline.left():.0f} s of budget left)")
        records, images = run_in_child(config, dtype, args, deadline)
        attach_comparison(records, images, references.get(dtype, {}), f"eager {dtype}")
        runs += records
        write_results(path, args, runs)
    return runs


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print(
            "gpu_bench.py needs a CUDA GPU, and torch.cuda.is_available() is False "
            f"(torch {torch.__version__}, CUDA build: {torch.version.cuda}). "
            "Run it on a GPU machine, or pass --smoke to check the script on the CPU.",
            file=sys.stderr,
        )
        return NO_CUDA_EXIT

    from sdxl_service.tiny import tiny_configs

    configs = tiny_configs() if args.smoke else load_configs()
    deadline = Deadline(args.budget_s)
    path = results_path(args)
    runs: list[dict[str, Any]] = []

    if not args.matrix:
        all_images: dict[str, np.ndarray] = {}
        for dtype in args.dtype:
            config = single_config(args)
            progress(f"{config.name} {dtype}: building and running")
            records, images = run_config(config, dtype, args, deadline, configs)
            runs += records
            all_images.update({f"{n}_{i}": image for (n, i), image in images.items()})
            write_results(path, args, runs)
        if args.images_out:
            np.savez(args.images_out, **all_images)
    else:
        runs = run_matrix(args, deadline, configs, path)

    print(markdown_table(runs))
    progress(f"results: {path}")
    return 0 if any(run.get("status") == "ok" for run in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
