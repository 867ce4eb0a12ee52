"""make bench-fullsize's single-file case (issue 25): the full-size random base as one
original-layout checkpoint, loaded by the service's loader and by stock diffusers'
`from_single_file`, each in a child process of its own, one after the other.

1. Writes once (cached, reused) the bench's base folder as one `.safetensors` in the original
   (A1111 / `convert_diffusers_to_original_sdxl.py`) layout, with the repository's own writer
   of that layout (tests/single_files.py), in a child process that streams the tensors to the
   file one at a time.
2. The service: `loading.load_base_pipeline`, what the render worker runs for a single-file
   base (SDXL_BASE_MODEL or a file of SDXL_MODELS_DIR), then one base-only render of the
   loaded pipeline.
3. Stock diffusers: `StableDiffusionXLPipeline.from_single_file(path, config=<the folder the
   service took its configs from>, torch_dtype=..., local_files_only=True)`, the same render.
   The folder is copied for it with its tokenizers as files (vocab.json, merges.txt), as the
   SDXL repos ship them: the package keeps CLIP's BPE gzipped once for both
   (sdxl_configs/clip_bpe), which transformers' `from_pretrained` does not read.
4. Memory as the fullsize bench reads it: peak RSS (VmHWM, the file's mapped pages included)
   when the load returns, and the peak of the process's own memory (RssAnon, sampled every
   50 ms) while it loads; pixels compared.
5. The render worker's whole start, `Engine.load` with this file as SDXL_BASE_MODEL and the
   bench's refiner folder (fp16 files) as SDXL_REFINER_MODEL, memory alone: the base, then
   the refiner's UNet beside it, then the engine's optimisations.

`python -m bench.fullsize --single-file-only` runs this case alone (a few minutes);
`make bench-fullsize` runs it after the others.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import platform
import shutil
import struct
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from bench.runs import current_commit, run_module
from tests.service_process import REPO

RESULTS = REPO / "bench" / "results" / "single-file-cpu.json"
FILE_NAME = "sd_xl_base.safetensors"
SIDES = ("service", "stock", "worker")
# Load peaks are short (a module's tensors cast, then the file's pages dropped): sampled often.
SAMPLE_EVERY = 0.05
GIB = 1024**3


# --- the checkpoint -------------------------------------------------------------------------

_DTYPES = {
    "float16": "F16",
    "bfloat16": "BF16",
    "float32": "F32",
    "float64": "F64",
    "int64": "I64",
    "int32": "I32",
    "uint8": "U8",
    "bool": "BOOL",
}


def save_streaming(tensors: dict[str, Any], path: Path) -> Path:
    """`tensors` as a safetensors file, written one tensor at a time.

    safetensors' `save_file` wants tensors of their own storage (the tests' writer clones
    every one: a second copy of the whole checkpoint) and builds the file in memory; the
    weights loaded from the fp16 files are mapped pages, read once while they are written.
    """
    import torch

    order = sorted(tensors)
    header: dict[str, Any] = {}
    offset = 0
    for key in order:
        tensor = tensors[key]
        size = tensor.numel() * tensor.element_size()
        dtype = _DTYPES[str(tensor.dtype).removeprefix("torch.")]
        header[key] = {
            "dtype": dtype,
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with path.open("wb") as file:
        file.write(struct.pack("<Q", len(raw)))
        file.write(raw)
        for key in order:
            flat = tensors[key].detach().contiguous().reshape(-1)
            file.write(memoryview(flat.view(torch.uint8).numpy()))
    return path


def write_child(models: Path, path: Path) -> None:
    """The base folder's fp16 files as one original-layout checkpoint (fp16, as Civitai's)."""
    import torch
    from diffusers import StableDiffusionXLPipeline

    from tests.single_files import pipeline_to_original

    started = time.perf_counter()
    base = StableDiffusionXLPipeline.from_pretrained(
        models / "base",
        variant="fp16",
        dtype=torch.float16,
        use_safetensors=True,
        add_watermarker=False,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    save_streaming(pipeline_to_original(base, refiner=False), partial)
    partial.rename(path)
    print(f"wrote {path} in {time.perf_counter() - started:.0f} s", flush=True)


def single_file_of(models: Path) -> Path:
    """Where the base's single file is kept: beside the folders, not in them (the fullsize
    bench counts and reads every .safetensors under them)."""
    return models.with_name(models.name + "-single-file") / FILE_NAME


def ensure_single_file(models: Path) -> dict[str, Any]:
    path = single_file_of(models)
    if path.is_file():
        return {"path": str(path), "written": False, "seconds": 0.0}
    started = time.perf_counter()
    run_module(
        "bench.fullsize_single_file",
        ["--write", str(path), "--models", str(models)],
        what="writing the single file",
        timeout=3600,
    )
    return {"path": str(path), "written": True, "seconds": round(time.perf_counter() - started, 1)}


# --- the two loads, each in a process of its own ----------------------------------------------


def pixels_sha256(image: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(image).tobytes()).hexdigest()[:16]


def load_child(
    side: str,
    path: Path,
    *,
    config: Path | None,
    cache_dir: Path,
    size: int,
    steps: int,
    dtype_name: str,
    out: Path,
) -> None:
    """One side's load and render; what it measured in `out` (JSON) and the image beside it."""
    import torch
    from diffusers import StableDiffusionXLPipeline

    from bench.fullsize import GUIDANCE, PROMPT, SEED, AnonPeaks, memory_gib

    torch.set_grad_enabled(False)
    dtype = getattr(torch, dtype_name)
    if side == "service":
        from sdxl_service.engine.checkpoint_layout import read_checkpoint_layout
        from sdxl_service.engine.loading import load_base_pipeline
        from sdxl_service.engine.single_file import config_folder

        layout = read_checkpoint_layout(path, "SDXL_BASE_MODEL", kind="base")
        # The folder the service takes its configs and tokenizers from: stock is given it too.
        config = config_folder(layout.architecture, "base", cache_dir)
    pid = os.getpid()
    imported = memory_gib(pid)
    anon = AnonPeaks(lambda: {side: pid}, every=SAMPLE_EVERY).__enter__()
    started = time.perf_counter()
    if side == "service":
        pipeline = load_base_pipeline(str(path), dtype=dtype, variant=None, cache_dir=cache_dir)
    else:
        pipeline = StableDiffusionXLPipeline.from_single_file(
            str(path),
            config=str(config),
            torch_dtype=dtype,
            local_files_only=True,
            add_watermarker=False,
        )
    load_s = time.perf_counter() - started
    anon._sample()
    load_peak_anon = round(anon.peaks.get(side, 0.0), 2)
    loaded = memory_gib(pid)
    pipeline.set_progress_bar_config(disable=True)
    began = time.perf_counter()
    image = pipeline(
        prompt=PROMPT,
        num_inference_steps=steps,
        guidance_scale=GUIDANCE,
        width=size,
        height=size,
        generator=torch.Generator("cpu").manual_seed(SEED),
    ).images[0]
    render_s = time.perf_counter() - began
    anon.__exit__()
    pixels = np.asarray(image.convert("RGB"))
    png = out.with_suffix(".png")
    Image.fromarray(pixels).save(png)
    dtypes = sorted(
        {
            str(p.dtype).removeprefix("torch.")
            for name in ("unet", "vae", "text_encoder", "text_encoder_2")
            for p in getattr(pipeline, name).parameters()
        }
    )
    record = {
        "config": str(config),
        "load_s": round(load_s, 1),
        "render_s": round(render_s, 1),
        "dtypes": dtypes,
        "memory_gib": {
            "imported_anon": imported["anon_now"],
            "load_peak": loaded["peak"],
            "load_peak_anon": load_peak_anon,
            "loaded_anon": loaded["anon_now"],
            "loaded_file": loaded["file_now"],
            "peak": memory_gib(pid)["peak"],
            "peak_anon": anon.rounded()[side],
        },
        "png": str(png),
        "pixels_sha256": pixels_sha256(pixels),
    }
    out.write_text(json.dumps(record, indent=2) + "\n")


def worker_child(path: Path, *, refiner: Path, cache_dir: Path, dtype_name: str, out: Path) -> None:
    """The render worker's start (Engine.load, as `bentoml serve` runs it) with the single-file
    base and the refiner folder: its memory, no render."""
    os.environ.update(
        SDXL_PRESET="sdxl",
        SDXL_BASE_MODEL=str(path),
        SDXL_REFINER_MODEL=str(refiner),
        SDXL_DEVICE="cpu",
        SDXL_DTYPE=dtype_name,
        SDXL_VARIANT="fp16",
        SDXL_CACHE_DIR=str(cache_dir),
        HF_HUB_OFFLINE="1",
    )
    import torch

    from bench.fullsize import AnonPeaks, memory_gib
    from sdxl_service.engine import Engine
    from sdxl_service.engine.config import EngineConfig
    from sdxl_service.settings import load_settings

    torch.set_grad_enabled(False)
    config = EngineConfig.of(load_settings())
    pid = os.getpid()
    imported = memory_gib(pid)
    with AnonPeaks(lambda: {"worker": pid}, every=SAMPLE_EVERY) as anon:
        started = time.perf_counter()
        engine = Engine.load(config)
        load_s = time.perf_counter() - started
    loaded = memory_gib(pid)
    record = {
        "load_s": round(load_s, 1),
        "dtypes": sorted(
            {str(p.dtype).removeprefix("torch.") for p in engine.base.unet.parameters()}
        ),
        "memory_gib": {
            "imported_anon": imported["anon_now"],
            "load_peak": loaded["peak"],
            "load_peak_anon": anon.rounded()["worker"],
            "loaded_anon": loaded["anon_now"],
            "loaded_file": loaded["file_now"],
        },
    }
    out.write_text(json.dumps(record, indent=2) + "\n")


def stock_config(config: Path, workdir: Path) -> Path:
    """The service's configs folder for stock diffusers: the same configs, byte for byte, with
    each tokenizer's vocab.json and merges.txt where the package keeps them gzipped."""
    from sdxl_service.engine.clip_tokenizer import CLIP_BPE

    target = workdir / "stock-config"
    shutil.rmtree(target, ignore_errors=True)
    # The configs alone: a folder with weights (the tiny preset's) lends none to a single file.
    shutil.copytree(config, target, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    for name in ("tokenizer", "tokenizer_2"):
        folder = target / name
        if folder.is_dir() and not (folder / "vocab.json").is_file():
            for file_name in ("vocab.json", "merges.txt"):
                packed = (CLIP_BPE / f"{file_name}.gz").read_bytes()
                (folder / file_name).write_bytes(gzip.decompress(packed))
    return target


def run_side(
    side: str,
    path: Path,
    workdir: Path,
    *,
    config: str | None,
    size: int,
    steps: int,
    dtype: str,
    refiner: Path | None = None,
) -> dict[str, Any]:
    from bench.fullsize import read_through

    out = workdir / f"single-file-{side}.json"
    page_cache_s = read_through(path.parent)
    if refiner is not None:
        page_cache_s += read_through(refiner)
    child = ["--side", side, "--file", str(path), "--out", str(out), "--size", str(size)]
    child += ["--steps", str(steps), "--dtype", dtype, "--cache-dir", str(workdir / "cache")]
    child += ["--config", config] if config else []
    child += ["--refiner", str(refiner)] if refiner else []
    run_module("bench.fullsize_single_file", child, what=f"the {side}'s load", timeout=3600)
    record: dict[str, Any] = json.loads(out.read_text())
    record["page_cache_s"] = page_cache_s
    return record


def run_single_file(
    models: Path, workdir: Path, *, size: int, steps: int, dtype: str, smoke: bool
) -> dict[str, Any]:
    """The loads one after the other (the service, stock diffusers, the render worker) and
    what they compare to."""
    written = ensure_single_file(models)
    path = Path(written["path"])
    workdir.mkdir(parents=True, exist_ok=True)
    service = run_side("service", path, workdir, config=None, size=size, steps=steps, dtype=dtype)
    config = stock_config(Path(service["config"]), workdir)
    stock = run_side(
        "stock", path, workdir, config=str(config), size=size, steps=steps, dtype=dtype
    )
    worker = run_side(
        "worker",
        path,
        workdir,
        config=None,
        size=size,
        steps=steps,
        dtype=dtype,
        refiner=models / "refiner",
    )
    ours, theirs = (
        np.asarray(Image.open(side["png"]).convert("RGB")).astype(int) for side in (service, stock)
    )
    difference = np.abs(ours - theirs)
    s, k = service["memory_gib"], stock["memory_gib"]
    return {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, no GPU",
        "commit": current_commit(),
        "smoke": smoke,
        "dtype": dtype,
        "size": size,
        "steps": steps,
        "file": written,
        "file_gib": round(path.stat().st_size / GIB, 2),
        "service": service,
        "stock": stock,
        "worker": worker,
        "comparison": {
            "load_peak_ratio": round(s["load_peak"] / k["load_peak"], 3),
            "load_peak_anon_ratio": round(s["load_peak_anon"] / k["load_peak_anon"], 3),
            "load_s_ratio": round(service["load_s"] / stock["load_s"], 3),
            "pixel_max": int(difference.max()),
            "pixel_mean": round(float(difference.mean()), 3),
        },
    }


def markdown(record: dict[str, Any]) -> str:
    s, k = record["service"], record["stock"]
    sm, km, c = s["memory_gib"], k["memory_gib"], record["comparison"]
    w = record["worker"]
    wm = w["memory_gib"]
    lines = [
        f"Measured {record['date']} on {record['machine']} (`python -m bench.fullsize "
        f"--single-file-only`, commit {record['commit']}): the fullsize bench's random base "
        f"as one original-layout checkpoint ({record['file_gib']:.2f} GiB, fp16), loaded in "
        f"{record['dtype']} by the service's loader (`load_base_pipeline`, what the render "
        "worker runs for a single-file base) and by stock diffusers' `from_single_file` with "
        "the same configs (the service's folder, its tokenizers as files), each in a process "
        "of its own after reading the file once "
        f"(page cache); then one base-only {record['size']}x{record['size']} render, "
        f"{record['steps']} steps, each.",
        "",
        "| GiB | service | stock diffusers | ratio |",
        "|---|---|---|---|",
        f"| peak RSS when loaded (VmHWM, the file's mapped pages included) | {sm['load_peak']} "
        f"| {km['load_peak']} | {c['load_peak_ratio']} |",
        f"| peak own memory while loading (RssAnon, sampled every {SAMPLE_EVERY} s) "
        f"| {sm['load_peak_anon']} | {km['load_peak_anon']} | {c['load_peak_anon_ratio']} |",
        f"| own memory once loaded (RssAnon) | {sm['loaded_anon']} | {km['loaded_anon']} | |",
        f"| after imports, before loading (RssAnon) | {sm['imported_anon']} "
        f"| {km['imported_anon']} | |",
        f"| load seconds | {s['load_s']} | {k['load_s']} | {c['load_s_ratio']} |",
        "",
        f"Pixels of the two renders: max difference {c['pixel_max']}, mean {c['pixel_mean']}.",
        "",
        "The render worker's whole start (`Engine.load`: this file as SDXL_BASE_MODEL, the "
        "bench's refiner folder, its fp16 files, as SDXL_REFINER_MODEL; no render), "
        f"{w['load_s']} s: peak RSS (VmHWM) {wm['load_peak']} GiB, peak own memory (RssAnon) "
        f"{wm['load_peak_anon']} GiB, {wm['loaded_anon']} GiB held once loaded.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", type=Path, default=None)
    parser.add_argument("--models", type=Path, default=None)
    parser.add_argument("--side", choices=SIDES, default=None)
    parser.add_argument("--file", type=Path, default=None)
    parser.add_argument("--config", type=Path, default=None)
    parser.add_argument("--refiner", type=Path, default=None)
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args(argv)
    if args.write:
        write_child(args.models, args.write)
    elif args.side == "worker":
        worker_child(
            args.file,
            refiner=args.refiner,
            cache_dir=args.cache_dir,
            dtype_name=args.dtype,
            out=args.out,
        )
    elif args.side:
        load_child(
            args.side,
            args.file,
            config=args.config,
            cache_dir=args.cache_dir,
            size=args.size,
            steps=args.steps,
            dtype_name=args.dtype,
            out=args.out,
        )
    else:
        parser.error("the children only: run `python -m bench.fullsize --single-file-only`")
    return 0


if __name__ == "__main__":
    sys.exit(main())
