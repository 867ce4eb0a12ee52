"""GPU benchmark: what a ControlNet adds to a render, through the service's own Engine.

A full-size random-weight SDXL ControlNet is made from the random base UNet's config
(`ControlNetModel.from_unet`, as the tests make their tiny ones; nothing downloaded), saved
in diffusers layout to a folder and served from it as SDXL_CONTROLNET_DIR would (the Engine's
ControlNetModels: its loader, its optimisations, its pipelines). Rows, in this order (the
bounded eager rows first, then the compiles, which may take the rest of the box), each written
to --out as it comes (a run killed at its time box keeps what it measured):

1. eager, the service's defaults (SDPA, channels_last): 0, 1 and 2 units (two units of the
   same ControlNet, each with its own control image) at --size, --steps, batch 1; GPU memory
   the ControlNet's load adds (torch.cuda.memory_allocated before/after) and each render's peak;
2. ip_adapter: one `ip-adapter_sdxl` (h94's layout, random weights: the adapter's 351 M
   parameters, 70 cross-attention layers, beside a ViT-bigG-shaped CLIPVisionModelWithProjection
   of 1.84 B) at scale 0.6, eager, the ControlNet unloaded first: what its load adds (memory
   allocated before and after its first render) and s/image; unloaded after;
3. cuda_graphs: the ControlNet (loaded again) compiled in place WITH CUDA graphs (mode
   max-autotune, which the service never uses for a ControlNet: engine/optimisations.py
   `without_cuda_graphs`), the 2-unit render twice (compile, then steady) and its pixels'
   max abs diff from the eager 2-unit render, or the error: docs/PERFORMANCE.md's question;
4. compiled: SDXL_COMPILE as the service does it (whole UNets and the VAE decoder
   max-autotune, the ControlNet max-autotune-no-cudagraphs, forced on CUDA as the matrix
   does): the 1- and 2-unit renders, first-batch (compile) time and steady s/image. Compiling
   both UNets takes minutes: the row most likely cut off, so last.

`--smoke` runs the same code on
the CPU with the tiny configs (no compile there: the engine declines, and the CUDA-graph row
says it was skipped). `--build-only DIR` builds the ControlNet, saves it to DIR and prints its
parameter count (the full-size construction checked on a CPU, in --dtype).

    python bench/gpu_controls.py --out /tmp/controls.json --budget-s 110
    python bench/gpu_controls.py --smoke --out /tmp/controls.json
    python bench/gpu_controls.py --build-only /tmp/cn --device cpu --dtype bf16
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

STARTED = time.monotonic()
REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "src")]

from bench import gpu_bench  # noqa: E402

CONTROLNET = "bench"
# diffusers zero-initialises a ControlNet's output convolutions and its control image's last
# convolution: at zero two units would add nothing, and a CUDA graph that overwrote the first
# unit's residuals with the second's could not show in the pixels. Small random weights
# there instead (std 0.01: residuals a fraction of the UNet's own activations, no fp16
# overflow at full size).
ZERO_INITIALISED = ("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding")
ZERO_INIT_STD = 0.01
FULL_SIZE_PARAMETERS = 1_251_014_160  # ControlNetModel.from_unet(SDXL base UNet)
IP_ADAPTER = "ip-adapter_sdxl"
# h94/IP-Adapter's sdxl_models/image_encoder: OpenCLIP ViT-bigG/14's vision tower (its
# config.json); the smoke's is tests/ip_adapter_files.py's tiny stand-in.
BIG_G_ENCODER = {
    "hidden_size": 1664,
    "intermediate_size": 8192,
    "num_attention_heads": 16,
    "num_hidden_layers": 48,
    "patch_size": 14,
    "image_size": 224,
    "projection_dim": 1280,
    "hidden_act": "gelu",
}
TINY_ENCODER = {
    "hidden_size": 48,
    "intermediate_size": 37,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "patch_size": 8,
    "image_size": 32,
    "projection_dim": 40,
}
IP_ADAPTER_IMAGE_SIDE = 512  # the reference picture (the encoder's processor resizes it)


def build_controlnet(unet: Any, *, device: str, dtype: torch.dtype) -> Any:
    """A ControlNet of `unet`'s layout on `device` in `dtype`: the UNet's weights where the
    two share them (from_unet), small random ones where diffusers puts zeros."""
    from diffusers import ControlNetModel

    generator = torch.Generator(device).manual_seed(gpu_bench.WEIGHTS_SEED)
    with torch.device(device), default_dtype(dtype):
        model = ControlNetModel.from_unet(unet)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.startswith(ZERO_INITIALISED) and not parameter.any():
                noise = torch.randn(
                    parameter.shape, generator=generator, device=device, dtype=torch.float32
                )
                parameter.copy_(noise * ZERO_INIT_STD)
    return model.eval()


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Modules built in `dtype` from the start: at full size a float32 copy first is 5 GB
    more (10 GB for the UNet --build-only makes)."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def save_controlnet(model: Any, folder: Path) -> Path:
    """`model` in diffusers layout (config.json and diffusion_pytorch_model.safetensors), the
    folder SDXL_CONTROLNET_DIR lists as a model named after it."""
    model.save_pretrained(folder / CONTROLNET)
    return folder


def ip_adapter_weights(
    unet: Any, projection_dim: int, *, device: str, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """`ip-adapter_sdxl`'s state dict as h94's file holds it, random: `image_proj` (the pooled
    image embedding to 4 tokens of the UNet's cross-attention width) and the key and value
    projections of each cross-attention layer, numbered as the original (1, 3, 5, ...: every
    attn2). Shapes are what diffusers' `_convert_ip_adapter_*_to_diffusers` loads (the Engine
    loads it with strict shapes)."""
    generator = torch.Generator(device).manual_seed(gpu_bench.WEIGHTS_SEED + 1)
    dim = int(unet.config.cross_attention_dim)

    def rand(*shape: int, std: float = 0.02) -> torch.Tensor:
        noise = torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
        return (noise * std).to(dtype)

    weights = {
        "image_proj.proj.weight": rand(4 * dim, projection_dim),
        "image_proj.proj.bias": rand(4 * dim),
        "image_proj.norm.weight": 1 + rand(dim),
        "image_proj.norm.bias": rand(dim),
    }
    key_id = 1
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        hidden = unet.get_submodule(name.removesuffix(".processor")).to_k.out_features
        weights[f"ip_adapter.{key_id}.to_k_ip.weight"] = rand(hidden, dim)
        weights[f"ip_adapter.{key_id}.to_v_ip.weight"] = rand(hidden, dim)
        key_id += 2
    return weights


def save_ip_adapter(
    unet: Any, folder: Path, *, smoke: bool, device: str, dtype: torch.dtype
) -> dict[str, int]:
    """h94's layout: `sdxl_models/ip-adapter_sdxl.safetensors` beside
    `sdxl_models/image_encoder/` (random weights, ViT-bigG's shapes); the parameter counts."""
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    widths = TINY_ENCODER if smoke else BIG_G_ENCODER
    torch.manual_seed(gpu_bench.WEIGHTS_SEED + 2)
    with torch.device(device), default_dtype(dtype):
        encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**widths))
    models = folder / "sdxl_models"
    encoder.save_pretrained(models / "image_encoder", safe_serialization=True)
    counts = {"encoder_parameters": parameters(encoder)}
    del encoder
    weights = ip_adapter_weights(unet, int(widths["projection_dim"]), device=device, dtype=dtype)
    save_file(
        {k: v.contiguous().cpu() for k, v in weights.items()},
        models / f"{IP_ADAPTER}.safetensors",
    )
    counts["adapter_parameters"] = sum(v.numel() for v in weights.values())
    return counts


def reference_picture(seed: int) -> Any:
    from sdxl_service.contract.render_request import RgbPicture

    side = IP_ADAPTER_IMAGE_SIDE
    rgb = np.random.default_rng(seed).integers(0, 256, (side, side, 3), np.uint8).tobytes()
    return RgbPicture(width=side, height=side, rgb=rgb)


def ip_adapter_batch(args: argparse.Namespace, steps: int) -> Any:
    from sdxl_service.contract.render_request import IpAdapterWeight

    batch = gpu_bench.make_batch(args, 1, steps)
    params = batch.params.model_copy(
        update={"ip_adapters": (IpAdapterWeight(name=IP_ADAPTER, scale=0.6),)}
    )
    pictures = ((reference_picture(7),),)
    tasks = [replace(task, ip_adapter_images=pictures) for task in batch.tasks]
    return replace(batch, params=params, tasks=tasks)


def parameters(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


def control_picture(size: int, seed: int) -> bytes:
    """A blocky RGB picture (as an edge or depth map is), size x size, different per seed."""
    side = max(size // 64, 1)
    blocks = np.random.default_rng(seed).integers(0, 256, (side, side, 1), np.uint8)
    repeat = size // side
    picture = np.repeat(np.repeat(np.repeat(blocks, repeat, 0), repeat, 1), 3, 2)
    return np.ascontiguousarray(picture[:size, :size]).tobytes()


def control_batch(args: argparse.Namespace, units: int, steps: int) -> Any:
    from sdxl_service.contract.render_request import ControlNetParams

    batch = gpu_bench.make_batch(args, 1, steps)
    controls = tuple(ControlNetParams(name=CONTROLNET, scale=0.8) for _ in range(units))
    params = batch.params.model_copy(update={"controlnets": controls})
    tasks = [
        replace(task, control_images=tuple(control_picture(args.size, u) for u in range(units)))
        for task in batch.tasks
    ]
    return replace(batch, params=params, tasks=tasks)


def gib(value: int) -> float:
    return round(value / 2**30, 3)


def allocated() -> int | None:
    return torch.cuda.memory_allocated() if torch.cuda.is_available() else None


class Rows:
    """The records so far, rewritten to --out after each."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.records: list[dict[str, Any]] = []

    def add(self, record: dict[str, Any]) -> dict[str, Any]:
        self.records.append(record)
        self.write()
        gpu_bench.progress(json.dumps(record)[:300])
        return record

    def write(self) -> None:
        import diffusers

        document = {
            "card": gpu_bench.card_name(self.args),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "diffusers": diffusers.__version__,
            "written": datetime.now(UTC).isoformat(timespec="seconds"),
            "elapsed_s": round(time.monotonic() - STARTED, 1),
            "workload": {
                "size": self.args.size,
                "steps": self.args.steps,
                "batch": 1,
                "high_noise_frac": self.args.high_noise_frac,
                "controlnet": "random weights, ControlNetModel.from_unet(base UNet)",
            },
            "runs": self.records,
        }
        out = Path(self.args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(document, indent=2) + "\n")


def engine_config(
    args: argparse.Namespace, folder: Path, *, compile: bool, ip_folder: Path | None = None
) -> Any:
    from sdxl_service.choices import Preset
    from sdxl_service.engine.config import EngineConfig
    from sdxl_service.settings import Settings

    return EngineConfig.of(
        Settings(
            preset=Preset.SDXL,
            device=args.device,
            dtype=gpu_bench.DTYPE_NAMES[args.dtype],
            attention="sdpa",
            channels_last=True,
            compile=compile,
            controlnet_dir=folder,
            ip_adapter_dir=ip_folder,
        )
    )


def make_engine(args: argparse.Namespace, base: Any, refiner: Any, config: Any) -> Any:
    from sdxl_service.choices import Preset
    from sdxl_service.engine import Engine

    return Engine(
        base,
        refiner,
        config,
        preset=Preset.SDXL,
        device=args.device,
        dtype=getattr(torch, gpu_bench.DTYPE_NAMES[args.dtype]),
        base_source="random weights: bench/configs/base_unet.json",
        refiner_source="random weights: bench/configs/refiner_unet.json",
        # Forced on CUDA as the matrix does; the CPU (smoke) declines as the service does.
        force_compile=torch.device(args.device).type == "cuda",
    )


def timed_render(engine: Any, batch: Any, device: str) -> tuple[float, np.ndarray]:
    gpu_bench.synchronize(device)
    started = time.monotonic()
    [image] = engine.render(batch)
    gpu_bench.synchronize(device)
    return time.monotonic() - started, np.asarray(image)


def measure(
    engine: Any,
    args: argparse.Namespace,
    units: int,
    common: dict[str, Any],
    *,
    warm: bool = False,
) -> tuple[dict[str, Any], np.ndarray | None]:
    """A warm-up at WARMUP_STEPS (unless `warm`), then the timed render; its peak memory."""
    record: dict[str, Any] = {**common, "units": units}
    try:
        # The smoke's renders are shorter than a warm-up: it checks the code, not cuDNN's picks.
        if not warm and not args.smoke:
            record["warmup_s"] = round(
                timed_render(
                    engine, control_batch(args, units, gpu_bench.WARMUP_STEPS), args.device
                )[0],
                2,
            )
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        seconds, image = timed_render(engine, control_batch(args, units, args.steps), args.device)
    except Exception as error:  # OOM included: recorded, and the next row goes on
        record.update(status="error", error=f"{type(error).__name__}: {error}"[:800])
        gpu_bench.free_device_memory()
        return record, None
    record.update(
        status="ok",
        seconds_per_image=round(seconds, 3),
        allocated_gib=gib(allocated()) if allocated() is not None else None,
        peak_gib=gib(torch.cuda.max_memory_allocated()) if torch.cuda.is_available() else None,
    )
    return record, image


def difference(image: np.ndarray | None, reference: np.ndarray | None) -> int | None:
    if image is None or reference is None:
        return None
    return int(np.abs(image.astype(np.int16) - reference.astype(np.int16)).max())


def eager_rows(
    args: argparse.Namespace, engine: Any, rows: Rows, deadline: gpu_bench.Deadline
) -> dict[int, np.ndarray]:
    """0, 1 and 2 units eager, and the memory the ControlNet's load adds."""
    images: dict[int, np.ndarray] = {}
    common = {"config": "eager", "dtype": args.dtype, "optimisations": engine.optimisations}
    record, image = measure(engine, args, 0, common)
    rows.add(record)
    if image is not None:
        images[0] = image

    gpu_bench.free_device_memory()
    before = allocated()
    started = time.monotonic()
    [loaded] = engine.controlnets.models([CONTROLNET], engine.base.unet)
    gpu_bench.synchronize(args.device)
    after = allocated()
    rows.add(
        {
            "config": "load",
            "dtype": args.dtype,
            "status": "ok",
            "load_s": round(time.monotonic() - started, 2),
            "parameters": parameters(loaded.model),
            "added_gib": gib(after - before) if after is not None and before is not None else None,
            "allocated_gib": gib(after) if after is not None else None,
        }
    )
    for units in (1, 2):
        if deadline.left() < 10:
            rows.add({**common, "units": units, "status": "skipped: time budget"})
            continue
        record, image = measure(engine, args, units, common)
        if image is not None:
            images[units] = image
            record["max_abs_diff_vs_0_units"] = difference(image, images.get(0))
        rows.add(record)
    return images


def cuda_graph_rows(
    args: argparse.Namespace, engine: Any, rows: Rows, eager: dict[int, np.ndarray]
) -> None:
    """The loaded ControlNet compiled in place with CUDA graphs; the 2-unit render twice."""
    from sdxl_service.engine import optimisations

    common = {"config": "cuda_graphs", "dtype": args.dtype, "compile_mode": args.graph_mode}
    if torch.device(args.device).type != "cuda":
        rows.add({**common, "units": 2, "status": "skipped: CUDA graphs need a CUDA device"})
        return
    [loaded] = engine.controlnets.models([CONTROLNET], engine.base.unet)
    # The service's compiler settings; the mode deliberately NOT without_cuda_graphs's.
    optimisations._configure_compiler()
    loaded.model.compile(mode=args.graph_mode, fullgraph=True)
    for attempt, warm in (("first", True), ("steady", True)):
        record, image = measure(engine, args, 2, {**common, "call": attempt}, warm=warm)
        record["max_abs_diff_vs_eager"] = difference(image, eager.get(2))
        record["max_abs_diff_vs_eager_1_unit"] = difference(image, eager.get(1))
        rows.add(record)
        if record["status"] != "ok":
            return


def ip_adapter_rows(
    args: argparse.Namespace,
    engine: Any,
    rows: Rows,
    eager: dict[int, np.ndarray],
    counts: dict[str, int],
) -> None:
    """One `ip-adapter_sdxl` at scale 0.6, eager: what its load adds (the warm-up loads it:
    memory allocated before and after, the batch's tensors gone), and s/image."""
    common = {"config": "ip_adapter", "dtype": args.dtype, **counts}
    gpu_bench.free_device_memory()
    before = allocated()
    record: dict[str, Any] = {**common, "units": 0}
    try:
        started = time.monotonic()
        timed_render(engine, ip_adapter_batch(args, gpu_bench.WARMUP_STEPS), args.device)
        record["warmup_s"] = round(time.monotonic() - started, 2)
        gpu_bench.free_device_memory()
        after = allocated()
        if after is not None and before is not None:
            record["added_gib"] = gib(after - before)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        seconds, image = timed_render(engine, ip_adapter_batch(args, args.steps), args.device)
    except Exception as error:
        record.update(status="error", error=f"{type(error).__name__}: {error}"[:800])
        rows.add(record)
        return
    record.update(
        status="ok",
        seconds_per_image=round(seconds, 3),
        peak_gib=gib(torch.cuda.max_memory_allocated()) if torch.cuda.is_available() else None,
        max_abs_diff_vs_0_units=difference(image, eager.get(0)),
    )
    rows.add(record)


def compiled_rows(
    args: argparse.Namespace,
    base: Any,
    refiner: Any,
    folder: Path,
    rows: Rows,
    eager: dict[int, np.ndarray],
) -> None:
    """SDXL_COMPILE as the service runs it: a fresh Engine over the same modules."""
    engine = make_engine(args, base, refiner, engine_config(args, folder, compile=True))
    common = {"config": "compiled", "dtype": args.dtype, "optimisations": engine.optimisations}
    for units in (1, 2):
        # The first call compiles (the UNets, the VAE decoder, the ControlNet as it loads).
        record, image = measure(engine, args, units, {**common, "call": "first"}, warm=True)
        rows.add(record)
        if image is None:
            return
        record, image = measure(engine, args, units, {**common, "call": "steady"}, warm=True)
        record["max_abs_diff_vs_eager"] = difference(image, eager.get(units))
        rows.add(record)


def run(args: argparse.Namespace) -> int:
    from sdxl_service.engine.tiny import tiny_configs

    deadline = gpu_bench.Deadline(args.budget_s)
    rows = Rows(args)
    configs = tiny_configs() if args.smoke else gpu_bench.load_configs()
    dtype = getattr(torch, gpu_bench.DTYPE_NAMES[args.dtype])
    started = time.monotonic()
    base, refiner = gpu_bench.build_pair(configs, device=args.device, dtype=dtype)
    with tempfile.TemporaryDirectory(prefix="gpu-controls-") as scratch:
        folder = save_controlnet(
            build_controlnet(base.unet, device=args.device, dtype=dtype), Path(scratch) / "cn"
        )
        ip_folder = Path(scratch) / "ip"
        counts = save_ip_adapter(
            base.unet, ip_folder, smoke=args.smoke, device=args.device, dtype=dtype
        )
        gpu_bench.free_device_memory()
        engine = make_engine(
            args, base, refiner, engine_config(args, folder, compile=False, ip_folder=ip_folder)
        )
        rows.add(
            {
                "config": "build",
                "dtype": args.dtype,
                "status": "ok",
                "build_s": round(time.monotonic() - started, 2),
                "allocated_gib": gib(allocated()) if allocated() is not None else None,
            }
        )
        eager = eager_rows(args, engine, rows, deadline)
        if deadline.left() > 15:
            # Eager only, before any compile (an adapter loads and renders in seconds; a
            # compile with max-autotune may take the rest of the box). Without the
            # ControlNet: the adapter's own memory.
            engine.controlnets._resident.evict(keep=(), capacity=0)
            ip_adapter_rows(args, engine, rows, eager, counts)
            engine.ip_adapters._resident.evict(keep=(), capacity=0)
        else:
            rows.add({"config": "ip_adapter", "status": "skipped: time budget"})
        if deadline.left() > 20:
            cuda_graph_rows(args, engine, rows, eager)
        # The CUDA-graph ControlNet goes; the compiled Engine loads its own.
        engine.controlnets._resident.evict(keep=(), capacity=0)
        del engine
        gpu_bench.free_device_memory()
        if deadline.left() > 20:
            compiled_rows(args, base, refiner, folder, rows, eager)
        else:
            rows.add({"config": "compiled", "status": "skipped: time budget"})
    return 0 if any(r.get("status") == "ok" and r.get("units") for r in rows.records) else 1


def build_only(args: argparse.Namespace) -> int:
    """The full-size ControlNet alone (its UNet on the meta device first: no pair built)."""
    from diffusers import UNet2DConditionModel

    configs = gpu_bench.load_configs()
    dtype = getattr(torch, gpu_bench.DTYPE_NAMES[args.dtype])
    started = time.monotonic()
    torch.manual_seed(gpu_bench.WEIGHTS_SEED)
    with torch.device(args.device), default_dtype(dtype):
        unet = UNet2DConditionModel.from_config(configs["base_unet"])
    model = build_controlnet(unet, device=args.device, dtype=dtype)
    del unet
    gc.collect()
    save_controlnet(model, Path(args.build_only))
    count = parameters(model)
    print(
        json.dumps(
            {
                "parameters": count,
                "expected": FULL_SIZE_PARAMETERS,
                "dtype": str(next(model.parameters()).dtype),
                "seconds": round(time.monotonic() - started, 1),
                "folder": str(Path(args.build_only) / CONTROLNET),
            }
        )
    )
    return 0 if count == FULL_SIZE_PARAMETERS else 1


def markdown_table(runs: list[dict[str, Any]]) -> str:
    lines = [
        "| config | call | units | s/image | warm-up s | peak GiB | added GiB | max abs diff "
        "| status |",
        "|" + "---|" * 9,
    ]
    for run in runs:
        diff = run.get("max_abs_diff_vs_eager", run.get("max_abs_diff_vs_0_units"))
        cells = (
            run.get("config"),
            run.get("call"),
            run.get("units"),
            run.get("seconds_per_image") or run.get("load_s") or run.get("build_s"),
            run.get("warmup_s"),
            run.get("peak_gib"),
            run.get("added_gib"),
            diff,
            (run.get("status") or "") + (f": {run['error'][:200]}" if run.get("error") else ""),
        )
        lines.append("| " + " | ".join("" if c is None else str(c) for c in cells) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--smoke", action="store_true", help="CPU + tiny configs: checks the script"
    )
    parser.add_argument("--dtype", default=None, choices=sorted(gpu_bench.DTYPE_NAMES))
    parser.add_argument("--size", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--high-noise-frac", type=float, default=0.8)
    parser.add_argument("--budget-s", type=float, default=110)
    parser.add_argument(
        "--graph-mode", default="max-autotune", help="the CUDA-graph row's compile mode"
    )
    parser.add_argument("--device", default=None, help="cuda (default), or cpu for --build-only")
    parser.add_argument("--build-only", help="build the full-size ControlNet, save it here, stop")
    parser.add_argument("--out", default=str(REPO / "bench" / "out" / "controls.json"))
    args = parser.parse_args(argv)
    args.device = args.device or ("cpu" if args.smoke else "cuda")
    args.dtype = args.dtype or ("fp32" if args.smoke else "fp16")
    args.size = args.size or (64 if args.smoke else 1024)
    args.steps = args.steps or (2 if args.smoke else 30)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.build_only:
        return build_only(args)
    if not args.smoke and not torch.cuda.is_available():
        print("gpu_controls.py needs a CUDA GPU (or --smoke, or --build-only)", file=sys.stderr)
        return gpu_bench.NO_CUDA_EXIT
    status = run(args)
    print(markdown_table(json.loads(Path(args.out).read_text())["runs"]))
    return status


if __name__ == "__main__":
    sys.exit(main())
