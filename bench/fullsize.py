"""make bench-fullsize: SDXL at its published size through the service, on the CPU, in bf16,
side by side with stock diffusers on the same folders and seeds (issue 19).

1. Builds once (cached, reused) a random-weight base and refiner with the published
   configurations (bench/configs), saved in diffusers layout as fp16 variant files alone:
   the kind of folder the service could not load off CUDA.
2. Serves them with `bentoml serve` (SDXL_PRESET=sdxl, SDXL_DEVICE=cpu, SDXL_DTYPE=bf16,
   SDXL_RENDER_NATIVE=false) and times start to /readyz; renders 256x256 images with few
   steps: ensemble, base only, and one edit (img2img, base only); reads each process's peak
   resident memory (VmHWM) before stopping it. The HTTP process must hold no model.
3. Stops it (every process, by pid), then runs stock diffusers' recipes on the same folders
   and seeds in a child process of its own, timed the same way.
4. Writes bench/results/fullsize-cpu.json and the "Full size on the CPU" table of
   docs/PERFORMANCE.md.
5. The single-file case (bench/fullsize_single_file.py): the base as one original-layout
   checkpoint, loaded by the service's loader and by stock `from_single_file`;
   bench/results/single-file-cpu.json and the "Single-file load" table. Alone:
   `--single-file-only`.

`--smoke` does all of it on the tiny preset's configurations in float32 (seconds): the
test suite runs that (tests/integration/test_bench_fullsize.py).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import os
import platform
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil
from PIL import Image

from bench.runs import current_commit, run_module
from tests.service_process import REPO, running_service

RESULTS = REPO / "bench" / "results" / "fullsize-cpu.json"
DEFAULT_MODELS = Path.home() / ".cache" / "sdxl-service" / "bench-fullsize"
PROMPT = "a lighthouse on a cliff at dusk, oil painting"
SEED = 11
GUIDANCE = 5.0
HIGH_NOISE_FRAC = 0.8
STRENGTH = 0.6
# One request per case, in this order, through the service and through stock diffusers.
CASES = ("ensemble", "base_only", "edit")
# Every case twice, the same way on both sides: the first request of a shape pays oneDNN's
# first calls for it (nothing warms a CPU up ahead, SDXL_WARMUP=auto), the second shows the
# steady state. The ratio is the second's.
ROUNDS = 2
GIB = 1024**3


# --- the models ---------------------------------------------------------------------------


def build_models(folder: Path, *, smoke: bool) -> dict[str, Any]:
    """The pair in `folder` (base/, refiner/), built unless a complete one is there: in a
    child process, so that its ~12 GiB are given back before the service loads."""
    if (folder / "COMPLETE").is_file():
        return {"built": False, "seconds": 0.0}
    started = time.perf_counter()
    command = [sys.executable, "-m", "bench.fullsize", "--build-only", "--models", str(folder)]
    subprocess.run([*command, *(["--smoke"] if smoke else [])], cwd=REPO, check=True)
    return {"built": True, "seconds": round(time.perf_counter() - started, 1)}


def build_child(folder: Path, *, smoke: bool) -> None:
    import torch

    from bench.gpu_bench import build_pair, load_configs, save_pair
    from sdxl_service.engine.tiny import tiny_configs

    started = time.perf_counter()
    configs = tiny_configs() if smoke else load_configs()
    # Built in bf16 (the fp32 pair would not fit 24 GiB beside anything), saved as fp16.
    base, refiner = build_pair(configs, device="cpu", dtype=torch.bfloat16)
    for module in {id(m): m for p in (base, refiner) for m in p.components.values()}.values():
        if isinstance(module, torch.nn.Module):
            module.half()
    folder.parent.mkdir(parents=True, exist_ok=True)
    save_pair(base, refiner, folder, smoke=False)
    print(f"built {folder} in {time.perf_counter() - started:.0f} s", flush=True)


def weights_gib(folder: Path) -> float:
    return round(sum(p.stat().st_size for p in folder.rglob("*.safetensors")) / GIB, 4)


def held_weights_gib(folder: Path) -> float:
    """The weights a process holds once loaded: the refiner takes the base's text_encoder_2
    and VAE (the service and stock diffusers' recipe alike), so its own are not loaded; in
    bf16 or fp16, as many bytes as the fp16 files."""
    shared = (folder / "refiner" / "text_encoder_2", folder / "refiner" / "vae")
    files = [p for p in folder.rglob("*.safetensors") if not p.parent.is_relative_to(shared[0])]
    held = [p for p in files if not p.parent.is_relative_to(shared[1])]
    return round(sum(p.stat().st_size for p in held) / GIB, 4)


# --- the service ----------------------------------------------------------------------------


def picture_png(size: int) -> bytes:
    """The edit's input: a smooth gradient, the same bytes for both sides."""
    ramp = np.linspace(0, 255, size, dtype=np.uint8)
    red, green = np.tile(ramp, (size, 1)), np.tile(ramp[:, None], (1, size))
    rgb = np.stack([red, green, np.full((size, size), 128, np.uint8)], axis=-1)
    buffer = io.BytesIO()
    Image.fromarray(rgb.astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def decoded(answer: dict[str, Any]) -> np.ndarray:
    [item] = answer["data"]
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))).convert("RGB"))


def render_seconds(response: httpx.Response) -> float:
    """The render's own seconds (the engine's call for its batch), from Server-Timing."""
    for part in response.headers.get("server-timing", "").split(","):
        name, _, rest = part.strip().partition(";")
        if name == "render":
            return float(rest.removeprefix("dur=")) / 1000
    raise ValueError(f"no render time in {response.headers.get('server-timing')!r}")


def service_requests(api: str, size: int, steps: int) -> dict[str, dict[str, Any]]:
    common = {
        "prompt": PROMPT,
        "size": f"{size}x{size}",
        "num_inference_steps": steps,
        "guidance_scale": GUIDANCE,
        "high_noise_frac": HIGH_NOISE_FRAC,
        "scheduler": "euler",
        "seed": SEED,
        "response_format": "b64_json",
    }
    out: dict[str, dict[str, Any]] = {}
    with httpx.Client(base_url=api, timeout=1800) as http:
        for case in [case for _ in range(ROUNDS) for case in CASES]:
            started = time.perf_counter()
            if case == "edit":
                fields = {**common, "refiner": "none", "strength": STRENGTH}
                response = http.post(
                    "/images/edits",
                    data={k: str(v) for k, v in fields.items()},
                    files={"image": ("picture.png", picture_png(size), "image/png")},
                )
            else:
                refiner = "ensemble" if case == "ensemble" else "none"
                response = http.post("/images/generations", json={**common, "refiner": refiner})
            wall = time.perf_counter() - started
            response.raise_for_status()
            record_round(out, case, wall, render_seconds(response), decoded(response.json()))
    return out


def record_round(
    out: dict[str, dict[str, Any]], case: str, wall: float, render: float, image: np.ndarray
) -> None:
    """The case's times of this round beside the earlier ones; the image of the last, and
    whether every round gave the same pixels (same seed)."""
    seen = out.setdefault(case, {"first_render_s": round(render, 2), "same_pixels": True})
    if "image" in seen:
        seen["same_pixels"] = bool(seen["same_pixels"] and np.array_equal(seen["image"], image))
    seen.update(wall_s=round(wall, 2), render_s=round(render, 2), image=image)


def memory_gib(pid: int) -> dict[str, float]:
    """The process's peak resident memory (VmHWM: exact, whenever it happened; it counts the
    weights files' pages mapped while loading), and what it holds now: its own memory
    (RssAnon) and mapped files (RssFile, page cache the kernel can take back)."""
    fields = {"VmHWM": "peak", "RssAnon": "anon_now", "RssFile": "file_now"}
    found = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key = line.split(":")[0]
        if key in fields:
            found[fields[key]] = round(int(line.split()[1]) * 1024 / GIB, 2)
    return found


def anon_gib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024 / GIB
    except OSError:  # gone
        pass
    return None


class AnonPeaks:
    """The largest own memory (RssAnon) seen per process, sampled every `every` seconds from
    start to stop: VmHWM also counts the weight files' pages mapped while loading, page cache
    the kernel can take back rather than a second copy of the weights, so it cannot tell
    which of the two a loader's peak is."""

    def __init__(self, processes: Callable[[], dict[str, int]], every: float = 0.2) -> None:
        self.peaks: dict[str, float] = {}
        self._processes = processes
        self._every = every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="anon-peaks", daemon=True)

    def __enter__(self) -> AnonPeaks:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        # Once more at the end: a span shorter than `every` still has its sample.
        self._sample()

    def _run(self) -> None:
        while not self._stop.wait(self._every):
            self._sample()

    def _sample(self) -> None:
        for role, pid in self._processes().items():
            seen = anon_gib(pid)
            if seen is not None and seen > self.peaks.get(role, 0.0):
                self.peaks[role] = seen

    def rounded(self) -> dict[str, float]:
        return {role: round(peak, 2) for role, peak in self.peaks.items()}


def read_through(folder: Path) -> float:
    """Reads every weights file once, so that the service and stock diffusers both load from
    the page cache (seconds taken): otherwise whichever runs first pays the disk."""
    started = time.perf_counter()
    for path in sorted(folder.rglob("*.safetensors")):
        with path.open("rb") as file:
            while file.read(64 * 1024 * 1024):
                pass
    return round(time.perf_counter() - started, 1)


def processes_with_home(home: Path) -> dict[str, int]:
    """The render worker and HTTP process of the server started with this BENTOML_HOME,
    found while it starts (before it answers, when its pids are not known yet)."""
    roles = {}
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            command = process.cmdline()
            if "--service-name" in command and process.environ().get("BENTOML_HOME") == str(home):
                name = command[command.index("--service-name") + 1]
                roles["render_worker" if name == "sdxl-renderer" else "http"] = process.pid
    return roles


def service_processes(root_pid: int) -> dict[str, int]:
    """pid of the HTTP process and of the render worker (BentoML's service names)."""
    roles = {}
    for process in psutil.Process(root_pid).children(recursive=True):
        command = process.cmdline()
        if "--service-name" in command:
            name = command[command.index("--service-name") + 1]
            roles["render_worker" if name == "sdxl-renderer" else "http"] = process.pid
    return roles


def run_service(models: Path, workdir: Path, size: int, steps: int, dtype: str) -> dict[str, Any]:
    env = {
        "SDXL_PRESET": "sdxl",
        "SDXL_BASE_MODEL": str(models / "base"),
        "SDXL_REFINER_MODEL": str(models / "refiner"),
        "SDXL_DEVICE": "cpu",
        "SDXL_DTYPE": dtype,
        "SDXL_VARIANT": "fp16",
        "SDXL_RENDER_NATIVE": "false",
        "SDXL_MIN_SIDE": "64",
        "SDXL_PLAYGROUND": "false",
        "HF_HUB_OFFLINE": "1",
    }
    page_cache_s = read_through(models)
    # Found by scanning while it starts: every 2 s, not each sample (a process scan reads
    # every process's environment).
    found: dict[str, Any] = {"at": 0.0, "roles": {}}

    def roles() -> dict[str, int]:
        if time.monotonic() - found["at"] > 2.0:
            found.update(at=time.monotonic(), roles=processes_with_home(workdir / "bentoml"))
        return dict(found["roles"])

    started = time.perf_counter()
    with AnonPeaks(roles) as anon, running_service(workdir, env) as service:
        ready_s = time.perf_counter() - started
        results = service_requests(service.api, size, steps)
        pids = service_processes(service.process.pid)
        memory = {role: memory_gib(pid) for role, pid in pids.items()}
        models_seen = httpx.get(f"{service.api}/models", timeout=30).json()
    for role, peak in anon.rounded().items():
        memory.setdefault(role, {})["peak_anon"] = peak
    return {
        "ready_s": round(ready_s, 1),
        "page_cache_s": page_cache_s,
        "memory_gib": memory,
        "cases": results,
        "models": [m["id"] for m in models_seen["data"]],
    }


# --- stock diffusers, in a process of its own ------------------------------------------


def stock_child(models: Path, size: int, steps: int, dtype_name: str, out: Path) -> None:
    """diffusers' documented recipes, nothing of this service imported."""
    import torch
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    torch.set_grad_enabled(False)
    dtype = getattr(torch, dtype_name)
    anon = AnonPeaks(lambda: {"stock": os.getpid()}).__enter__()
    started = time.perf_counter()
    options = {"dtype": dtype, "variant": "fp16", "use_safetensors": True, "add_watermarker": False}
    base = StableDiffusionXLPipeline.from_pretrained(models / "base", **options)
    refiner = StableDiffusionXLImg2ImgPipeline.from_pretrained(
        models / "refiner", text_encoder_2=base.text_encoder_2, vae=base.vae, **options
    )
    base_img2img = StableDiffusionXLImg2ImgPipeline(**base.components, add_watermarker=False)
    load_s = time.perf_counter() - started
    loaded_at = time.time()
    for pipeline in (base, refiner, base_img2img):
        pipeline.set_progress_bar_config(disable=True)

    def generator() -> torch.Generator:
        return torch.Generator("cpu").manual_seed(SEED)

    common = {"prompt": PROMPT, "num_inference_steps": steps, "guidance_scale": GUIDANCE}
    cases: dict[str, Any] = {}
    for case in [case for _ in range(ROUNDS) for case in CASES]:
        began = time.perf_counter()
        if case == "ensemble":
            latents = base(
                **common,
                width=size,
                height=size,
                denoising_end=HIGH_NOISE_FRAC,
                generator=generator(),
                output_type="latent",
            ).images
            image = refiner(
                **common, image=latents, denoising_start=HIGH_NOISE_FRAC, generator=generator()
            ).images[0]
        elif case == "base_only":
            image = base(**common, width=size, height=size, generator=generator()).images[0]
        else:
            picture = Image.open(io.BytesIO(picture_png(size))).convert("RGB")
            image = base_img2img(
                **common, image=picture, strength=STRENGTH, generator=generator()
            ).images[0]
        seconds = time.perf_counter() - began
        record_round(cases, case, seconds, seconds, np.asarray(image.convert("RGB")))
    for case, seen in cases.items():
        path = out.with_name(f"stock-{case}.png")
        Image.fromarray(seen.pop("image")).save(path)
        seen["png"] = str(path)
    anon.__exit__()
    memory = {**memory_gib(os.getpid()), "peak_anon": anon.rounded()["stock"]}
    record = {"load_s": round(load_s, 1), "loaded_at": loaded_at, "memory_gib": memory}
    record["cases"] = cases
    out.write_text(json.dumps(record))


def run_stock(models: Path, workdir: Path, size: int, steps: int, dtype: str) -> dict[str, Any]:
    out = workdir / "stock.json"
    page_cache_s = read_through(models)
    spawned_at = time.time()
    child = ["--stock-child", str(out), "--models", str(models), "--size", str(size)]
    child += ["--steps", str(steps), "--dtype", dtype]
    run_module("bench.fullsize", child, what="stock diffusers", timeout=3600)
    record = json.loads(out.read_text())
    # Process start to pipelines loaded, imports included: what /readyz's time includes.
    record["start_s"] = round(record.pop("loaded_at") - spawned_at, 1)
    record["page_cache_s"] = page_cache_s
    for case in record["cases"].values():
        case["image"] = np.asarray(Image.open(case.pop("png")).convert("RGB"))
    return record


# --- the report -------------------------------------------------------------------------------


def compare(service: dict[str, Any], stock: dict[str, Any]) -> dict[str, Any]:
    rows = {}
    for case in CASES:
        ours, theirs = service["cases"][case], stock["cases"][case]
        difference = np.abs(ours.pop("image").astype(int) - theirs.pop("image").astype(int))
        rows[case] = {
            "service_render_s": ours["render_s"],
            "service_wall_s": ours["wall_s"],
            "stock_s": theirs["render_s"],
            "render_ratio": round(ours["render_s"] / theirs["render_s"], 3),
            "service_first_s": ours["first_render_s"],
            "stock_first_s": theirs["first_render_s"],
            "first_ratio": round(ours["first_render_s"] / theirs["first_render_s"], 3),
            "same_pixels_each_round": ours["same_pixels"] and theirs["same_pixels"],
            "pixel_max": int(difference.max()),
            "pixel_mean": round(float(difference.mean()), 3),
        }
    return rows


def markdown(record: dict[str, Any]) -> str:
    s, k = record["service"], record["stock"]
    lines = [
        f"Measured {record['date']} on {record['machine']} (`make bench-fullsize`, commit "
        f"{record['commit']}): random weights with the published configurations "
        f"({record['weights_gib']:.2f} GiB of fp16 variant files alone), {record['dtype']}, "
        f"{record['size']}x{record['size']}, {record['steps']} steps, guidance {GUIDANCE}, "
        f"euler, seed {SEED}; the refiner from {HIGH_NOISE_FRAC}; the edit base-only at "
        f"strength {STRENGTH}. Each case {ROUNDS} times in turn (the ratio is the last round's), "
        "the service first, then stock diffusers, each after reading the weights once (both "
        "load from the page cache).",
        "",
        "| case | service render s | service HTTP s | stock diffusers s | ratio "
        "| first request: service / stock s (ratio) | pixels max | pixels mean |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for case, row in record["comparison"].items():
        lines.append(
            f"| {case} | {row['service_render_s']} | {row['service_wall_s']} | {row['stock_s']} "
            f"| {row['render_ratio']} | {row['service_first_s']} / {row['stock_first_s']} "
            f"({row['first_ratio']}) | {row['pixel_max']} | {row['pixel_mean']} |"
        )
    held = record["held_weights_gib"]
    worker, http, theirs = (
        s["memory_gib"]["render_worker"],
        s["memory_gib"]["http"],
        k["memory_gib"],
    )
    lines += [
        "",
        "| start and memory (GiB) | service | stock diffusers |",
        "|---|---|---|",
        f"| start to ready (s), weights in the page cache | {s['ready_s']} (`bentoml serve` "
        f"to /readyz) | {k['start_s']} (process start to loaded; from_pretrained alone "
        f"{k['load_s']}) |",
        f"| render worker: peak RSS (VmHWM, mapped weight files included) | {worker['peak']} "
        f"| {theirs['peak']} |",
        f"| render worker: peak own memory (RssAnon, sampled every 0.2 s) "
        f"| {worker['peak_anon']} | {theirs['peak_anon']} |",
        f"| the same over the {held:.2f} GiB of weights held "
        f"| {worker['peak_anon'] / held:.3f} | {theirs['peak_anon'] / held:.3f} |",
        f"| render worker after the renders: own memory (RssAnon) | {worker['anon_now']} "
        f"| {theirs['anon_now']} |",
        f"| render worker after the renders: mapped files (RssFile) | {worker['file_now']} "
        f"| {theirs['file_now']} |",
        f"| HTTP process: peak RSS | {http['peak']} | |",
    ]
    return "\n".join(lines)


def write_doc(text: str) -> None:
    from bench.performance_doc import write_section

    write_section("fullsize-bench", "Full size on the CPU", text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=Path, default=None)
    parser.add_argument("--workdir", type=Path, default=REPO / ".cache" / "bench-fullsize")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--dtype", default=None, help="bfloat16 (default), float32 with --smoke")
    parser.add_argument("--smoke", action="store_true", help="the tiny configurations")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--single-file-only", action="store_true", help="the single-file load case alone"
    )
    parser.add_argument("--stock-child", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    dtype = args.dtype or ("float32" if args.smoke else "bfloat16")
    if args.build_only:
        build_child(args.models, smoke=args.smoke)
        return 0
    if args.stock_child:
        stock_child(args.models, args.size, args.steps, dtype, args.stock_child)
        return 0
    models = args.models or (args.workdir / "models-tiny" if args.smoke else DEFAULT_MODELS)
    args.workdir.mkdir(parents=True, exist_ok=True)
    print(f"models in {models}", flush=True)
    build = build_models(models, smoke=args.smoke)
    print(f"built: {build}", flush=True)
    if args.single_file_only:
        single_file(models, args, dtype)
        return 0
    print("serving", flush=True)
    service = run_service(models, args.workdir / "service", args.size, args.steps, dtype)
    print(f"service ready in {service['ready_s']} s; stock diffusers", flush=True)
    stock = run_stock(models, args.workdir, args.size, args.steps, dtype)
    record = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, no GPU",
        "commit": current_commit(),
        "smoke": args.smoke,
        "dtype": dtype,
        "size": args.size,
        "steps": args.steps,
        "weights_gib": weights_gib(models),
        "held_weights_gib": held_weights_gib(models),
        "build": build,
        "service": service,
        "stock": stock,
        "comparison": compare(service, stock),
    }
    out = args.out or (args.workdir / "fullsize-smoke.json" if args.smoke else RESULTS)
    out.write_text(json.dumps(record, indent=2) + "\n")
    text = markdown(record)
    print(text, flush=True)
    if not args.smoke:
        write_doc(text)
    single_file(models, args, dtype)
    return 0


def single_file(models: Path, args: argparse.Namespace, dtype: str) -> dict[str, Any]:
    """The single-file case: its record beside the others' (`--out`'s name, -single-file)."""
    from bench.fullsize_single_file import RESULTS as SINGLE_FILE_RESULTS
    from bench.fullsize_single_file import markdown as single_file_markdown
    from bench.fullsize_single_file import run_single_file

    print("single-file load: the service, then stock diffusers", flush=True)
    record = run_single_file(
        models,
        args.workdir / "single-file",
        size=args.size,
        steps=args.steps,
        dtype=dtype,
        smoke=args.smoke,
    )
    if args.out is not None:
        out = args.out.with_name(f"{args.out.stem}-single-file.json")
    else:
        out = args.workdir / "single-file-smoke.json" if args.smoke else SINGLE_FILE_RESULTS
    out.write_text(json.dumps(record, indent=2) + "\n")
    text = single_file_markdown(record)
    print(text, flush=True)
    if not args.smoke:
        from bench.performance_doc import write_section

        write_section("single-file-bench", "Single-file load", text)
    return record


if __name__ == "__main__":
    raise SystemExit(main())
