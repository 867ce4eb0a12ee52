"""make bench-tiling: what SDXL_VAE_TILING does to the VAE's memory and pixels, on the CPU
(issue 20).

The full-size SDXL VAE (random weights, the published configuration: bench-fullsize's
folder, built once) decodes the same seeded latents at each size, untiled and tiled,
through the service's own LatentCodec, each in a child process of its own so that every
peak is that decode's alone. Reported per size and mode: seconds, the peak of the process's
own memory (RssAnon, sampled) above what it held before the decode, and the pixel difference
between the tiled and the untiled image.

With random weights the pixels are not a picture: the difference shows how far the blending
of overlapping tiles moves them, which a trained VAE's smooth images move less. The memory
figures do not depend on the weights.

`--smoke` runs the same on the tiny preset's VAE (seconds): tests/unit/bench/test_bench_tiling.py.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from bench.fullsize import DEFAULT_MODELS, AnonPeaks, anon_gib, build_models
from bench.runs import current_commit, run_module
from tests.service_process import REPO

RESULTS = REPO / "bench" / "results" / "vae-tiling-cpu.json"
SIZES = (1024, 1536, 2048)
SMOKE_SIZES = (64, 128)
SEED = 5


def decode_child(models: Path, size: int, tiled: bool, dtype_name: str, out: Path) -> None:
    import torch
    from diffusers import AutoencoderKL

    from sdxl_service.choices import Switch
    from sdxl_service.engine.latents import LatentCodec

    torch.set_grad_enabled(False)
    dtype = getattr(torch, dtype_name)
    vae = AutoencoderKL.from_pretrained(
        models / "base", subfolder="vae", variant="fp16", dtype=dtype, use_safetensors=True
    ).eval()
    tiling = Switch.ON if tiled else Switch.OFF
    codec = LatentCodec(vae, device="cpu", dtype=dtype, tiling=tiling)
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    generator = torch.Generator().manual_seed(SEED)
    latents = torch.randn(1, 4, size // scale, size // scale, generator=generator, dtype=dtype)
    held = anon_gib(os.getpid()) or 0.0
    with AnonPeaks(lambda: {"decode": os.getpid()}, every=0.05) as anon:
        started = time.perf_counter()
        [image] = codec.decode(latents)
        seconds = time.perf_counter() - started
    image.save(out.with_suffix(".png"))
    record = {
        "seconds": round(seconds, 2),
        "peak_above_held_gib": round(anon.peaks["decode"] - held, 2),
        "tiled": codec.tiles(size, size),
    }
    out.write_text(json.dumps(record))


def run_decode(models: Path, workdir: Path, size: int, tiled: bool, dtype: str) -> dict[str, Any]:
    out = workdir / f"decode-{size}-{'tiled' if tiled else 'untiled'}.json"
    child = ["--child", str(out), "--models", str(models), "--size", str(size), "--dtype", dtype]
    child += ["--tiled"] if tiled else []
    run_module("bench.vae_tiling", child, what=f"decode {size} tiled={tiled}", timeout=1800)
    record = json.loads(out.read_text())
    record["image"] = np.asarray(Image.open(out.with_suffix(".png")).convert("RGB"))
    return record


def markdown(record: dict[str, Any]) -> str:
    lines = [
        f"Measured {record['date']} on {record['machine']} (`make bench-tiling`, commit "
        f"{record['commit']}): the full-size SDXL VAE with random weights, {record['dtype']}, "
        "decoding the same seeded latents untiled and tiled (`SDXL_VAE_TILING=on`: tiles of "
        "1024 px overlapping by a quarter) through the service's LatentCodec, each decode in a "
        "process of its own. Memory: the peak of the process's own memory (RssAnon, sampled "
        "every 50 ms) above what it held with the VAE loaded. Random weights: the pixel "
        "difference shows what the tile blending moves, not what a trained VAE's image shows.",
        "",
        "| size | untiled s | tiled s | untiled peak GiB | tiled peak GiB "
        "| pixels max | pixels mean |",
        "|---|---|---|---|---|---|---|",
    ]
    for size, row in record["sizes"].items():
        lines.append(
            f"| {size} | {row['untiled']['seconds']} | {row['tiled']['seconds']} "
            f"| {row['untiled']['peak_above_held_gib']} | {row['tiled']['peak_above_held_gib']} "
            f"| {row['pixel_max']} | {row['pixel_mean']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=Path, default=None)
    parser.add_argument("--workdir", type=Path, default=REPO / ".cache" / "bench-tiling")
    parser.add_argument(
        "--dtype",
        default=None,
        help="bfloat16 (default, as the service decodes on a CPU "
        "with bf16 instructions), float32 with --smoke",
    )
    parser.add_argument("--smoke", action="store_true", help="the tiny preset's VAE")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--tiled", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.dtype = args.dtype or ("float32" if args.smoke else "bfloat16")
    if args.child:
        decode_child(args.models, args.size, args.tiled, args.dtype, args.child)
        return 0
    args.workdir.mkdir(parents=True, exist_ok=True)
    models = args.models or (args.workdir / "models-tiny" if args.smoke else DEFAULT_MODELS)
    build_models(models, smoke=args.smoke)
    sizes: dict[str, Any] = {}
    for size in SMOKE_SIZES if args.smoke else SIZES:
        untiled, tiled = (run_decode(models, args.workdir, size, t, args.dtype) for t in (0, 1))
        difference = np.abs(untiled.pop("image").astype(int) - tiled.pop("image").astype(int))
        sizes[f"{size}x{size}"] = {
            "untiled": untiled,
            "tiled": tiled,
            "pixel_max": int(difference.max()),
            "pixel_mean": round(float(difference.mean()), 3),
        }
        print(f"{size}: {sizes[f'{size}x{size}']}", flush=True)
    record = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, no GPU",
        "commit": current_commit(),
        "smoke": args.smoke,
        "dtype": args.dtype,
        "sizes": sizes,
    }
    out = args.out or (args.workdir / "tiling-smoke.json" if args.smoke else RESULTS)
    out.write_text(json.dumps(record, indent=2) + "\n")
    text = markdown(record)
    print(text, flush=True)
    if not args.smoke:
        from bench.performance_doc import write_section

        write_section("vae-tiling", "VAE tiling on the CPU", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
