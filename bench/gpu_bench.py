"""GPU benchmark: full-size SDXL base + refiner (random weights) through the service's Engine.

Builds both architectures from bench/configs/*.json (the published configs)
directly on the GPU, so nothing is downloaded, and renders 1024x1024 images,
30 steps in ensemble at high_noise_frac 0.8 (SDXL's Euler schedule splits them
23 base + 7 refiner in diffusers), at n=1 and batched, in fp16 and bf16.

    python bench/gpu_bench.py --matrix          # baseline, then each optimisation added
    python bench/gpu_bench.py --dtype bf16 --channels-last --fuse-qkv --batch 1,8
    python bench/gpu_bench.py --dtype fp16 --batch 1,2,4,8 --max-size 1536 \
        --save-pretrained /tmp/weights          # also: the pair saved for `bentoml serve`

`--matrix` compares every run's pixels with the unoptimised run of the same
dtype (same random weights, same seeds) and runs torch.compile last, in a
child process killed when the time budget (--budget-s) runs out. By default
that row compiles the UNets' repeated transformer blocks (diffusers'
`compile_repeated_blocks`, about a minute); `--matrix-compile full` compiles
whole UNets and the VAE decoder as SDXL_COMPILE does (max-autotune: minutes).
Results go to bench/results/gpu-<card>.json (rewritten after every render) and
a markdown table to stdout. Exits 2 at once without CUDA. `--smoke` runs the
same code on the CPU with the tiny configs: a check of the script, not a
measurement. bench/gpu/run.sh runs this script as parts of the whole GPU run.

Outside --matrix, a last row set measures live previews at batch 1 and
--size: partial_images=3 decoded by each of --previews (approx, vae, taesd;
taesd is a random-weight madebyollin/taesdxl architecture) against no
previews, in interleaved rounds, with each decoder's time relative to it.
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
from collections.abc import Callable
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
# What a config's `compile` switches on: the service's SDXL_COMPILE (whole UNets
# and the VAE decoder, --compile-mode), or only the UNets' repeated transformer
# blocks, compiled once per shape and reused by every block alike (fullgraph).
COMPILE_FULL, COMPILE_BLOCKS = "full", "blocks"
PREVIEW_DECODERS = ("approx", "vae", "taesd")
PARTIAL_IMAGES = 3  # issue 10's bar: at most 10 % longer per image than without previews


@dataclass(frozen=True)
class BenchConfig:
    """One column of the matrix: the optimisation switches handed to the Engine."""

    name: str
    attention: str = "eager"
    channels_last: bool = False
    fuse_qkv: bool = False
    compile: str = ""  # "", COMPILE_FULL or COMPILE_BLOCKS
    vae_dtype: str = "auto"

    def settings(self, device: str, dtype: str) -> Any:
        """The engine's config of this run (the service's settings, with the run's switches)."""
        from sdxl_service.choices import Preset
        from sdxl_service.engine.config import EngineConfig
        from sdxl_service.settings import Settings

        return EngineConfig.of(
            Settings(
                preset=Preset.SDXL,
                device=device,
                dtype=DTYPE_NAMES[dtype],
                attention=self.attention,
                channels_last=self.channels_last,
                fuse_qkv=self.fuse_qkv,
                compile=self.compile == COMPILE_FULL,
                vae_dtype=self.vae_dtype,
            )
        )


def matrix_configs(dtype: str, compile_kind: str = COMPILE_BLOCKS) -> list[BenchConfig]:
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
    steps.append(replace(steps[-1], name="+compile", compile=compile_kind))
    return steps


# --- building the pair -------------------------------------------------------


def load_configs(directory: Path = CONFIGS_DIR) -> dict[str, dict[str, Any]]:
    return {name: json.loads((directory / f"{name}.json").read_text()) for name in COMPONENTS}


def build_pair(
    configs: dict[str, dict[str, Any]], *, device: str, dtype: torch.dtype
) -> tuple[Any, Any]:
    """Random-weight base + refiner built on `device`; the same weights for the same seed."""
    from sdxl_service.engine.components import assemble_pipelines, build_modules

    torch.manual_seed(WEIGHTS_SEED)  # seeds CUDA too: every build draws the same weights
    with torch.device(device):
        modules = build_modules(configs, dtype=dtype)
    return assemble_pipelines(modules)


def save_pair(base: Any, refiner: Any, folder: Path, *, smoke: bool) -> None:
    """The pair in diffusers layout with fp16-variant files, as the SDXL repos ship it,
    for `bentoml serve` to load through the same `from_pretrained` path as real weights.

    Saved before any optimisation (channels_last weights are not contiguous).
    The smoke run also writes the default (variant-less) files, which the
    service loads on a CPU; a GPU run in fp16 asks for the variant.
    """
    from sdxl_service.engine.tiny import write_clip_tokenizer_files

    staging = folder.with_name(folder.name + ".partial")
    for name, pipeline in (("base", base), ("refiner", refiner)):
        pipeline.save_pretrained(staging / name, variant="fp16")
        if smoke:
            pipeline.save_pretrained(staging / name)
    # SDXL's tokenizer folders: vocab.json + merges.txt, as the tiny preset writes them.
    write_clip_tokenizer_files(staging / "base" / "tokenizer")
    write_clip_tokenizer_files(staging / "base" / "tokenizer_2", pad_token="!")
    write_clip_tokenizer_files(staging / "refiner" / "tokenizer_2", pad_token="!")
    (staging / "COMPLETE").write_text("random weights from bench/configs\n")
    staging.rename(folder)


def compile_repeated_blocks(base: Any, refiner: Any, device: str) -> str | bool:
    """Compile both UNets' repeated transformer blocks (a CUDA device only, as the Engine)."""
    if torch.device(device).type != "cuda":
        return False
    for unet in (base.unet, refiner.unet):
        unet.compile_repeated_blocks(fullgraph=True)
    return f"{COMPILE_BLOCKS}: UNet {', '.join(base.unet._repeated_blocks)}"


def free_device_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --- measuring ---------------------------------------------------------------


def make_batch(args: argparse.Namespace, n: int, steps: int, size: int | None = None) -> Any:
    from sdxl_service.choices import RefinerMode
    from sdxl_service.contract.render_request import RenderParams
    from sdxl_service.engine.render_batch import ImageTask, RenderBatch

    params = RenderParams(
        width=size or args.size,
        height=size or args.size,
        num_inference_steps=steps,
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
    emit: Callable[[list[dict[str, Any]]], None] | None = None,
) -> tuple[list[dict[str, Any]], dict[tuple[int, int], np.ndarray]]:
    """Build, optimise, warm up and time one config; return run records and the images.

    `emit` is called with the records so far after each of them, so that a run
    killed halfway leaves what it measured.
    """
    from sdxl_service.choices import Preset
    from sdxl_service.engine import Engine

    device = args.device
    records: list[dict[str, Any]] = []
    images: dict[tuple[int, int], np.ndarray] = {}
    common = {"config": config.name, "dtype": dtype, "switches": asdict(config)}

    free_device_memory()
    started = time.monotonic()
    base, refiner = build_pair(configs, device=device, dtype=getattr(torch, DTYPE_NAMES[dtype]))
    if args.save_pretrained and not Path(args.save_pretrained).is_dir():
        progress(f"saving the pair to {args.save_pretrained}")
        save_pair(base, refiner, Path(args.save_pretrained), smoke=args.smoke)
        progress("saved")
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
    if config.compile == COMPILE_BLOCKS:
        engine.optimisations["compile"] = compile_repeated_blocks(base, refiner, device)
    synchronize(device)
    build_s = time.monotonic() - started
    weights_gib = torch.cuda.memory_allocated() / 2**30 if torch.cuda.is_available() else None
    common["optimisations"] = engine.optimisations

    seconds_per_image: float | None = None
    warm: set[tuple[int, int]] = set()
    # The batches at the workload's size, then one image at --max-size.
    shapes = [(n, args.size) for n in args.batch]
    if args.max_size and args.max_size != args.size:
        shapes.append((1, args.max_size))
    for n, size in shapes:
        # Compiled graphs are specialised to the shape: warm up each one; eager
        # runs once, and again at a new size (cuDNN picks its kernels per shape).
        needs_warmup = (
            not warm
            or size not in {s for _, s in warm}
            or (config.compile and (n, size) not in warm)
        )
        first_warmup = records[0].get("warmup_s", 0.0) if records else 0.0
        warmup_estimate = first_warmup if needs_warmup else 0.0
        scale = n * (size / args.size) ** 2
        estimate = warmup_estimate + scale * (seconds_per_image or 0.0) * 1.3
        record: dict[str, Any] = {**common, "batch": n, "size": size}
        if seconds_per_image is not None and estimate > deadline.left():
            records.append({**record, "status": "skipped: time budget"})
            if emit:
                emit(records)
            continue
        record["build_s"] = round(build_s, 2)
        try:
            warmup_s = 0.0
            if needs_warmup:
                synchronize(device)
                t0 = time.monotonic()
                engine.render(make_batch(args, n, WARMUP_STEPS, size))
                synchronize(device)
                warmup_s = time.monotonic() - t0
                warm.add((n, size))
            record["warmup_s"] = round(warmup_s, 2)

            stage_seconds.clear()
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            synchronize(device)
            t0 = time.monotonic()
            rendered = engine.render(make_batch(args, n, args.steps, size))
            synchronize(device)
            seconds = time.monotonic() - t0
        except Exception as error:  # OOM included: recorded, and the matrix goes on
            record.update(status="error", error=f"{type(error).__name__}: {error}"[:500])
            records.append(record)
            if emit:
                emit(records)
            free_device_memory()
            continue
        if size == args.size and (n == 1 or seconds_per_image is None):
            seconds_per_image = seconds / n
        if size == args.size:
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
            # Closer to what nvidia-smi shows: the allocator's cache included.
            peak_reserved_gib=(
                round(torch.cuda.max_memory_reserved() / 2**30, 2)
                if torch.cuda.is_available()
                else None
            ),
        )
        records.append(record)
        if emit:
            emit(records)

    if args.previews:
        run_previews(engine, args, deadline, common, records, emit, seconds_per_image)

    del engine, base, refiner
    free_device_memory()
    return records, images


# --- live previews -------------------------------------------------------------


def preview_taesd(args: argparse.Namespace, dtype: torch.dtype) -> Any:
    """Random weights in madebyollin/taesdxl's architecture (the tiny preset's in --smoke)."""
    from sdxl_service.engine.components import build_taesd
    from sdxl_service.engine.tiny import taesd_config

    torch.manual_seed(WEIGHTS_SEED)
    with torch.device(args.device):
        return build_taesd(taesd_config() if args.smoke else None, dtype=dtype).eval()


def run_previews(
    engine: Any,
    args: argparse.Namespace,
    deadline: Deadline,
    common: dict[str, Any],
    records: list[dict[str, Any]],
    emit: Callable[[list[dict[str, Any]]], None] | None,
    seconds_per_image: float | None,
) -> None:
    """Batch 1 at --size with partial_images=3 per decoder and without, in interleaved rounds.

    Appends one record per variant: median seconds, the median of its per-round
    ratio to no previews, and whether the final image is the no-preview one.
    """
    variants = ["none", *args.previews]
    name = common["config"]
    engine_config = engine.config
    if "taesd" in args.previews:
        engine.preview_decoders.use_taesd(preview_taesd(args, engine.dtype))

    def batch_for(variant: str, steps: int) -> Any:
        batch = make_batch(args, 1, steps)
        if variant == "none":
            return batch
        # Kept, not encoded: encoding is the HTTP process's work.
        return replace(
            batch, on_preview=lambda *_: None, preview_counts=(PARTIAL_IMAGES,) * len(batch.tasks)
        )

    def render(variant: str, steps: int) -> tuple[float, np.ndarray]:
        decoder = engine_config.preview_decoder if variant == "none" else variant
        engine.config = engine_config.model_copy(update={"preview_decoder": decoder})
        synchronize(args.device)
        t0 = time.monotonic()
        [image] = engine.render(batch_for(variant, steps))
        synchronize(args.device)
        return time.monotonic() - t0, np.asarray(image)

    def finish(extra: list[dict[str, Any]]) -> None:
        engine.config = engine_config
        records.extend(extra)
        if emit:
            emit(records)

    per_round = len(variants) * (seconds_per_image or 0.0) * 1.3
    rounds = args.preview_repeats
    if per_round:
        rounds = min(rounds, int((deadline.left() - per_round / 4) // per_round))
    if rounds < 1:
        finish(
            [
                {
                    **common,
                    "config": f"{name} previews={v}",
                    "batch": 1,
                    "size": args.size,
                    "previews": v,
                    "status": "skipped: time budget",
                }
                for v in variants
            ]
        )
        return
    seconds: dict[str, list[float]] = {v: [] for v in variants}
    finals: dict[str, np.ndarray] = {}
    try:
        for variant in variants:  # warm-up: each decoder's kernels at this size
            render(variant, WARMUP_STEPS)
        for round_ in range(rounds):
            shift = round_ % len(variants)
            for variant in variants[shift:] + variants[:shift]:
                elapsed, finals[variant] = render(variant, args.steps)
                seconds[variant].append(elapsed)
    except Exception as error:  # OOM included: recorded, and the run goes on
        failed = f"{type(error).__name__}: {error}"[:500]
        finish(
            [
                {
                    **common,
                    "config": f"{name} previews={v}",
                    "batch": 1,
                    "size": args.size,
                    "previews": v,
                    "status": "error",
                    "error": failed,
                }
                for v in variants
            ]
        )
        free_device_memory()
        return
    extra = []
    for variant in variants:
        median = float(np.median(seconds[variant]))
        ratios = [s / b for s, b in zip(seconds[variant], seconds["none"], strict=True)]
        difference = np.abs(finals[variant].astype(np.int16) - finals["none"].astype(np.int16))
        extra.append(
            {
                **common,
                "config": f"{name} previews={variant}",
                "batch": 1,
                "size": args.size,
                "previews": variant,
                "partial_images": 0 if variant == "none" else PARTIAL_IMAGES,
                "status": "ok",
                "rounds": rounds,
                "seconds": round(median, 3),
                "seconds_per_image": round(median, 3),
                "images_per_s": round(1 / median, 3),
                "seconds_all": [round(s, 3) for s in seconds[variant]],
                "preview_ratio": round(float(np.median(ratios)), 3),
                "final_max_abs_diff_vs_none": int(difference.max()),
            }
        )
    finish(extra)


def previews_table(runs: list[dict[str, Any]]) -> str:
    """The preview rows: time per image and its ratio to no previews (bar: 1.10)."""
    rows = [run for run in runs if run.get("previews") and run.get("status") == "ok"]
    if not rows:
        return ""
    lines = [
        "| config | dtype | size | decoder | s/image | x no previews | final diff |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in rows:
        lines.append(
            f"| {run['config'].rsplit(' previews=', 1)[0]} | {run['dtype']} | {run['size']} "
            f"| {run['previews']} | {run['seconds_per_image']} | {run['preview_ratio']:.3f} "
            f"| {run['final_max_abs_diff_vs_none']} |"
        )
    return "\n".join(lines)


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
    size: int,
) -> None:
    per_image = compare(images, reference)
    for record in records:
        # Images are kept at the workload's size only (not the --max-size row).
        if record.get("status") != "ok" or record.get("size") != size:
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
            "--max-size",
            str(args.max_size or 0),
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
        command += ["--compile"] * (config.compile == COMPILE_FULL)
        command += ["--compile-blocks"] * (config.compile == COMPILE_BLOCKS)
        command += ["--smoke"] * args.smoke
        command += ["--previews", "none"]
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
                (int(key.split("_")[0]), int(key.split("_")[1])): saved[key] for key in saved.files
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
            "max_size": args.max_size or None,
            "weights": "random, from bench/configs/*.json" if not args.smoke else "tiny configs",
            "compile_mode": args.compile_mode,
        },
        "runs": runs,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2) + "\n")


def markdown_table(runs: list[dict[str, Any]]) -> str:
    header = (
        "| config | dtype | size | batch | s/image | images/s | base s | refiner s | decode s "
        "| peak GiB | max abs diff | min PSNR dB | status |"
    )
    lines = [header, "|" + "---|" * 13]

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
                    run.get("size"),
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
    parser.add_argument("--compile", action="store_true", help="as SDXL_COMPILE: whole UNets")
    parser.add_argument(
        "--compile-blocks", action="store_true", help="the UNets' repeated blocks only"
    )
    parser.add_argument("--compile-mode", default="max-autotune", help="for --compile")
    parser.add_argument(
        "--matrix-compile",
        default=COMPILE_BLOCKS,
        choices=[COMPILE_BLOCKS, COMPILE_FULL],
        help="what the matrix's +compile row compiles",
    )
    parser.add_argument(
        "--max-size", type=int, default=0, help="then one image at this square side (0: none)"
    )
    parser.add_argument(
        "--save-pretrained",
        help="save the (unoptimised) pair here first, diffusers layout, fp16 variant",
    )
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
    parser.add_argument(
        "--previews",
        default=None,
        help="comma list of preview decoders measured at batch 1 (default: "
        f"{','.join(PREVIEW_DECODERS)}; 'none' under --matrix)",
    )
    parser.add_argument(
        "--preview-repeats", type=int, default=None, help="interleaved rounds of the preview rows"
    )
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
    previews = args.previews if args.previews is not None else "" if args.matrix else "all"
    previews = ",".join(PREVIEW_DECODERS) if previews == "all" else previews
    args.previews = [p.strip() for p in previews.split(",") if p.strip() not in ("", "none")]
    for decoder in args.previews:
        if decoder not in PREVIEW_DECODERS:
            parser.error(f"unknown preview decoder {decoder!r}; use {', '.join(PREVIEW_DECODERS)}")
    args.preview_repeats = args.preview_repeats or (1 if args.smoke else 3)
    return args


def single_config(args: argparse.Namespace) -> BenchConfig:
    switches = [
        args.attention,
        "channels_last" if args.channels_last else "",
        "fuse_qkv" if args.fuse_qkv else "",
        f"vae_{args.vae_dtype}" if args.vae_dtype != "auto" else "",
        "compile" if args.compile else "",
        "compile_blocks" if args.compile_blocks else "",
    ]
    return BenchConfig(
        name="+".join(s for s in switches if s),
        attention=args.attention,
        channels_last=args.channels_last,
        fuse_qkv=args.fuse_qkv,
        compile=COMPILE_FULL if args.compile else COMPILE_BLOCKS if args.compile_blocks else "",
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
        for config in matrix_configs(dtype, args.matrix_compile):
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
                    attach_comparison(
                        records, images, references[first], f"eager {first}", args.size
                    )
                references[dtype] = images
            else:
                attach_comparison(records, images, references[dtype], f"eager {dtype}", args.size)
            runs += records
            write_results(path, args, runs)

    # Compiling both UNets with max-autotune takes minutes: only the first dtype's
    # row runs, with whatever remains of the budget.
    for config, dtype in compiled[:1]:
        progress(f"{config.name} {dtype} in a child ({deadline.left():.0f} s of budget left)")
        records, images = run_in_child(config, dtype, args, deadline)
        attach_comparison(records, images, references.get(dtype, {}), f"eager {dtype}", args.size)
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

    from sdxl_service.engine.tiny import tiny_configs

    configs = tiny_configs() if args.smoke else load_configs()
    deadline = Deadline(args.budget_s)
    path = results_path(args)
    runs: list[dict[str, Any]] = []

    if not args.matrix:
        all_images: dict[str, np.ndarray] = {}
        for dtype in args.dtype:
            config = single_config(args)
            progress(f"{config.name} {dtype}: building and running")
            done = list(runs)

            def emit(records: list[dict[str, Any]], done: list[dict[str, Any]] = done) -> None:
                write_results(path, args, done + records)

            records, images = run_config(config, dtype, args, deadline, configs, emit)
            runs += records
            all_images.update({f"{n}_{i}": image for (n, i), image in images.items()})
            write_results(path, args, runs)
        if args.images_out:
            # numpy's stubs type **kwds as savez's bool option.
            np.savez(args.images_out, **all_images)  # type: ignore[arg-type]
    else:
        runs = run_matrix(args, deadline, configs, path)

    print(markdown_table(runs))
    if previews_table(runs):
        print("\nLive previews (partial_images=3, batch 1):\n")
        print(previews_table(runs))
    progress(f"results: {path}")
    return 0 if any(run.get("status") == "ok" for run in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
