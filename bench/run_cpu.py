"""`make bench`: the CPU benchmarks on the tiny preset, measured side by side in one run.

Prints a table, writes bench/results/cpu.json and the CPU section of
docs/PERFORMANCE.md. This machine is shared and noisy: compare the ratios
within one run, not absolute numbers across runs.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import re
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

from bench.performance_doc import write_section
from sdxl_service.settings import Settings
from tests.service_process import REPO, start_service, stop_service

RESULTS = REPO / "bench" / "results" / "cpu.json"
SMALL_JOB = {"prompt": "bench", "size": "64x64", "num_inference_steps": 4, "refiner": "ensemble"}
PROBE_TIMEOUT_S = 10.0
# Closed-loop throughput: clients run this long before counting starts, then
# are counted for the window (bench_throughput).
THROUGHPUT_SETTLE_S = 1.5
THROUGHPUT_WINDOW_S = 6.0
TARGETS = {
    "overhead_p50_ms": 10.0,
    "throughput_ratio_c8_c1": 3.0,
    "png_b64_1024_ms": 40.0,
    "livez_p99_ms": 50.0,
}


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def timed(fn: Callable[[], Any], repeat: int) -> list[float]:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


# ---- encoding ---------------------------------------------------------------


def photo_like(size: int = 1024) -> Image.Image:
    """Smooth gradients with fine texture: closer to a photo than pure noise."""
    y, x = np.mgrid[0:size, 0:size] / size
    rng = np.random.default_rng(0)
    channels = [
        128 + 100 * np.sin(6 * x + 3 * y),
        128 + 100 * np.cos(5 * y - 2 * x * y),
        128 + 80 * np.sin(9 * x * y),
    ]
    rgb = np.stack(channels, axis=-1) + rng.normal(0, 6, (size, size, 3))
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))


def noise(size: int = 1024) -> Image.Image:
    rng = np.random.default_rng(1)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def pillow_encoder(**options: Any) -> Callable[[Image.Image], bytes]:
    def encode(image: Image.Image) -> bytes:
        buffer = io.BytesIO()
        image.save(buffer, **options)
        return buffer.getvalue()

    return encode


def bench_encoding(repeat: int) -> list[dict[str, Any]]:
    """The service's encoders beside Pillow's defaults, each with base64."""
    from sdxl_service.api.encoding import encode_image, to_base64

    cases: list[tuple[str, Callable[[Image.Image], bytes]]] = [
        ("service png (OpenCV, up filter, huffman)", lambda im: encode_image(im, "png")),
        ("Pillow png level 1", pillow_encoder(format="PNG", compress_level=1)),
        ("Pillow png level 6 (default)", pillow_encoder(format="PNG")),
        ("service jpeg q95", lambda im: encode_image(im, "jpeg")),
        ("service webp q95 (method 0)", lambda im: encode_image(im, "webp")),
        ("Pillow webp q95 (method 4)", pillow_encoder(format="WEBP", quality=95)),
    ]
    rows = []
    for content, image in (("photo-like", photo_like()), ("noise", noise())):
        for name, encoder in cases:

            def encode(image: Image.Image = image, encoder=encoder) -> str:
                return to_base64(encoder(image))

            times = timed(encode, repeat)
            rows.append(
                {
                    "content": content,
                    "encoding": name,
                    "ms_p50": 1000 * statistics.median(times),
                    "kib_base64": len(encode()) / 1024,
                }
            )
    return rows


# ---- service overhead ---------------------------------------------------------


def direct_engine_render(cache_dir: Path) -> Callable[[], Any]:
    """The same work the service does for SMALL_JOB, sizes included, in-process."""
    from sdxl_service.api.sizing import render_size
    from sdxl_service.choices import Preset, RefinerMode, SchedulerName
    from sdxl_service.contract.render_request import RenderParams
    from sdxl_service.engine import Engine
    from sdxl_service.engine.config import EngineConfig
    from sdxl_service.engine.render_batch import ImageTask, RenderBatch
    from sdxl_service.settings import Settings

    settings = Settings(preset=Preset.TINY, cache_dir=cache_dir)
    engine = Engine.load(EngineConfig.of(settings))
    width, height = render_size(
        64, 64, engine.native_resolution, render_native=True, max_pixels=settings.max_pixels
    )
    params = RenderParams(
        width=width,
        height=height,
        num_inference_steps=4,
        guidance_scale=settings.guidance_scale,
        high_noise_frac=0.8,
        refiner=RefinerMode.ENSEMBLE,
        scheduler=SchedulerName.EULER,
    )
    batch = RenderBatch(params=params, tasks=[ImageTask(prompt="bench", seed=1)])
    engine.render(batch)  # warm-up
    return lambda: engine.render(batch)


def overhead(api: str, render: Callable[[], Any], repeat: int) -> dict[str, float]:
    """HTTP end to end vs the engine alone, interleaved so that drift in this
    shared machine's load hits both alike; overhead = paired differences."""
    with httpx.Client(timeout=120) as client:
        body = {**SMALL_JOB, "seed": 1}

        def post() -> None:
            client.post(f"{api}/images/generations", json=body).raise_for_status()

        post()
        engine_times, http_times = [], []
        for _ in range(repeat):
            engine_times += timed(render, 1)
            http_times += timed(post, 1)
    differences = [h - e for h, e in zip(http_times, engine_times, strict=True)]
    return {
        "engine_p50_ms": 1000 * percentile(engine_times, 50),
        "http_p50_ms": 1000 * percentile(http_times, 50),
        "overhead_p50_ms": 1000 * percentile(differences, 50),
        "overhead_p95_ms": 1000 * percentile(differences, 95),
    }


# ---- throughput and liveness -------------------------------------------------------


def batch_counters(root: str) -> tuple[float, float]:
    """(batches, images) so far, from the service's sdxl_batch_images histogram."""
    text = httpx.get(f"{root}/metrics", timeout=30).text

    def total(name: str) -> float:
        return sum(float(v) for v in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))

    return total("sdxl_batch_images_count"), total("sdxl_batch_images_sum")


def throughput(
    root: str, concurrency: int, seconds: float, settle_s: float = THROUGHPUT_SETTLE_S
) -> tuple[float, float, float, float]:
    """Closed-loop clients in their steady state: (images per second, mean
    images per pipeline call, pipeline calls, images), over `seconds`.

    Each client sends its next request as soon as its last one is answered,
    for `settle_s + seconds`; only the last `seconds` count, so neither the
    clients' start (all at once, unlike a running service) nor their end
    (the last requests drain in ever smaller batches) weighs on the result.
    """
    settled = threading.Event()
    done_at: list[float] = []
    stop_at = time.perf_counter() + settle_s + seconds

    def client(i: int) -> None:
        with httpx.Client(timeout=300) as http:
            n = 0
            while time.perf_counter() < stop_at:
                body = {**SMALL_JOB, "seed": 1000 * i + n, "prompt": f"bench {i}"}
                http.post(f"{root}/v1/images/generations", json=body).raise_for_status()
                n += 1
                if settled.is_set():
                    done_at.append(time.perf_counter())

    with ThreadPoolExecutor(concurrency) as pool:
        clients = [pool.submit(client, i) for i in range(concurrency)]
        time.sleep(settle_s)
        batches_before, images_before = batch_counters(root)
        window_start = time.perf_counter()
        settled.set()
        time.sleep(max(0.0, stop_at - time.perf_counter()))
        batches, images = batch_counters(root)
        in_window = sum(1 for t in done_at if t <= stop_at)
        for future in clients:
            future.result()
    calls, rendered = batches - batches_before, images - images_before
    rate = in_window / (stop_at - window_start)
    return rate, rendered / max(1.0, calls), calls, rendered


# The batching policy before issue 12, with its default 10 ms: a batch that is
# not full waits for company until its oldest image has waited batch_wait_ms,
# whatever the recent demand. It is the current policy told that a full batch
# is always coming.
FIXED_WAIT_POLICY = """

_demand_policy = next_batch


def next_batch(queue, *, max_images, wait_s, now, demand):  # type: ignore[no-redef]
    fixed = Demand(key=queue[0].batch_key, images=max_images) if queue else demand
    return _demand_policy(queue, max_images=max_images, wait_s=wait_s, now=now, demand=fixed)
"""


def fixed_wait_overlay(work: Path) -> dict[str, str]:
    """Env for a service whose batches use the fixed wait of old, the rest of
    the code being this tree's: a copy of the package first on PYTHONPATH."""
    package = REPO / "src" / "sdxl_service"
    overlay = work / "fixed-wait-src"
    shutil.rmtree(overlay, ignore_errors=True)
    shutil.copytree(package, overlay / "sdxl_service")
    policy = overlay / "sdxl_service" / "render" / "batch_policy.py"
    policy.write_text(policy.read_text() + FIXED_WAIT_POLICY)
    return {"PYTHONPATH": os.pathsep.join([str(overlay), os.environ.get("PYTHONPATH", "")])}


def throughput_modes(work: Path) -> list[tuple[str, dict[str, str]]]:
    """(mode, service env): the batching policy, the fixed wait of old, no batching."""
    fixed = {"SDXL_MAX_BATCH_IMAGES": "8", "SDXL_BATCH_WAIT_MS": "10", **fixed_wait_overlay(work)}
    return [
        ("on", {"SDXL_MAX_BATCH_IMAGES": "8"}),
        ("fixed", fixed),
        ("off", {"SDXL_MAX_BATCH_IMAGES": "1"}),
    ]


def liveness_while_saturated(root: str, probes: int) -> dict[str, float]:
    stop = threading.Event()

    def load(i: int) -> None:
        with httpx.Client(timeout=300) as client:
            while not stop.is_set():
                body = {**SMALL_JOB, "seed": i, "size": "512x512", "num_inference_steps": 8}
                with contextlib.suppress(httpx.HTTPError):
                    client.post(f"{root}/v1/images/generations", json=body)

    workers = [threading.Thread(target=load, args=(i,), daemon=True) for i in range(16)]
    for worker in workers:
        worker.start()
    time.sleep(2.0)
    result: dict[str, float] = {}
    try:
        with httpx.Client(timeout=PROBE_TIMEOUT_S) as client:
            for path in ("/livez", "/readyz", "/v1", "/v1/models"):
                times, failures = [], 0
                for _ in range(probes):
                    start = time.perf_counter()
                    try:
                        client.get(f"{root}{path}").raise_for_status()
                    except httpx.HTTPError:
                        failures += 1  # counted as a probe that took the whole timeout
                    times.append(time.perf_counter() - start)
                    time.sleep(0.01)
                result[f"{path} p50 ms"] = 1000 * percentile(times, 50)
                result[f"{path} p99 ms"] = 1000 * percentile(times, 99)
                result[f"{path} max ms"] = 1000 * max(times)
                result[f"{path} failed probes"] = failures
    finally:
        stop.set()
        for worker in workers:
            worker.join(timeout=120)
    return result


# ---- report ------------------------------------------------------------------


def markdown(results: dict[str, Any]) -> str:
    t, lv = results["throughput"], results["liveness"]
    on, off = results["overhead"]["on"], results["overhead"]["off"]
    rows = [
        (
            f"service overhead p50, no batch wait (paired; HTTP p50 {off['http_p50_ms']:.1f} ms,"
            f" engine p50 {off['engine_p50_ms']:.1f} ms)",
            f"{off['overhead_p50_ms']:.1f} ms",
            f"< {TARGETS['overhead_p50_ms']:.0f} ms",
        ),
        ("service overhead p95, no batch wait", f"{off['overhead_p95_ms']:.1f} ms", ""),
        (
            "service overhead p50, batching on (a lone client never waits for company;"
            f" SDXL_BATCH_WAIT_MS={Settings().batch_wait_ms})",
            f"{on['overhead_p50_ms']:.1f} ms",
            "",
        ),
        (
            "throughput c=8 / c=1, batching on",
            f"{t['ratio_c8_c1']:.2f}x",
            f">= {TARGETS['throughput_ratio_c8_c1']:.0f}x",
        ),
        (
            "PNG + base64, 1024x1024 photo-like (service encoder)",
            f"{results['png_b64_1024_ms']:.1f} ms",
            f"< {TARGETS['png_b64_1024_ms']:.0f} ms",
        ),
        (
            "/livez p99 while saturated",
            f"{lv['/livez p99 ms']:.1f} ms",
            f"< {TARGETS['livez_p99_ms']:.0f} ms",
        ),
    ]
    lines = [
        f"Measured {results['date']} on {results['machine']} (tiny preset, `make bench`).",
        "",
        "| measure | result | target |",
        "|---|---|---|",
        *(f"| {name} | {value} | {target} |" for name, value, target in rows),
        "",
        f"Throughput (images/s, 64x64, 4 steps, n=1 per request; closed-loop clients counted"
        f" for {t['window_s']:.0f} s after {THROUGHPUT_SETTLE_S} s of settling; median of"
        f" {t['rounds']} interleaved rounds, the three services side by side):",
        "",
        "| concurrency | batching on | images per call (on) | fixed 10 ms wait (old policy) "
        "| images per call (fixed) | batching off | on / off |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in t["concurrency"]:
        on, fixed, off = (t[mode][str(c)] for mode in ("on", "fixed", "off"))
        batch, fixed_batch = t["mean_batch"]["on"][str(c)], t["mean_batch"]["fixed"][str(c)]
        lines.append(
            f"| {c} | {on:.2f} | {batch:.1f} | {fixed:.2f} | {fixed_batch:.1f} | {off:.2f}"
            f" | {on / off:.2f}x |"
        )
    lines += [
        "",
        f"c=8 / c=1: {t['ratio_c8_c1']:.2f}x with the batching policy,"
        f" {t['fixed_ratio_c8_c1']:.2f}x with the fixed wait.",
    ]
    lines += [
        "",
        "Liveness while 16 clients keep the pipeline saturated:",
        "",
        "| probe | ms |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v:.1f} |" for k, v in lv.items() if "failed" not in k]
    failed = {k: v for k, v in lv.items() if "failed" in k and v}
    lines += ["", f"Failed probes (timeout {PROBE_TIMEOUT_S:.0f} s): {failed or 'none'}."]
    lines += ["", "Encoding a 1024x1024 image and base64 (median ms, size of the base64):", ""]
    lines += ["| content | encoding | ms | KiB |", "|---|---|---|---|"]
    lines += [
        f"| {r['content']} | {r['encoding']} | {r['ms_p50']:.1f} | {r['kib_base64']:.0f} |"
        for r in results["encoding"]
    ]
    return "\n".join(lines)


def bench_throughput(
    work: Path,
    results: dict[str, Any] | None,
    quick: bool,
    render: Callable[[], Any] | None = None,
    repeat: int = 0,
    modes: list[str] | None = None,
) -> dict[str, Any]:
    """Closed-loop throughput per batching mode, one service each, in one run.

    The services run side by side and the measurements interleave (rounds of
    every concurrency on every mode), so the load of this shared machine
    drifts over all modes alike; the median round counts. With `results`, the
    service overhead and liveness are measured on the same services.
    """
    concurrency = [1, 4, 8, 16]
    rounds = 1 if quick else 3
    seconds = 2.0 if quick else THROUGHPUT_WINDOW_S
    chosen = [(m, env) for m, env in throughput_modes(work) if modes is None or m in modes]
    services: dict[str, Any] = {}
    rates: dict[str, dict[str, list[float]]] = {
        m: {str(c): [] for c in concurrency} for m, _ in chosen
    }
    calls = {m: {str(c): [0.0, 0.0] for c in concurrency} for m, _ in chosen}  # batches, images
    try:
        for mode, env in chosen:
            print(f"service, batching {mode} ...", flush=True)
            services[mode] = start_service(work / f"batching-{mode}", env)
            # Warm the pipeline's batched shapes.
            throughput(services[mode].root, 8, 2.0, settle_s=0.5)
        if results is not None and render is not None:
            for mode in ("on", "off"):
                print(f"service overhead, batching {mode} ...", flush=True)
                results["overhead"][mode] = overhead(services[mode].api, render, repeat)
        for round_ in range(rounds):
            for c in concurrency:
                for mode in services:
                    root = services[mode].root
                    rate, mean_batch, n_calls, n_images = throughput(root, c, seconds)
                    rates[mode][str(c)].append(rate)
                    calls[mode][str(c)][0] += n_calls
                    calls[mode][str(c)][1] += n_images
                    print(
                        f"  round {round_ + 1}, c={c}, {mode}: {rate:.2f} images/s,"
                        f" {mean_batch:.1f} images per call",
                        flush=True,
                    )
        if results is not None:
            print("liveness while saturated ...", flush=True)
            results["liveness"] = liveness_while_saturated(
                services["on"].root, 50 if quick else 200
            )
    finally:
        for service in services.values():
            stop_service(service)
    tput: dict[str, Any] = {
        "concurrency": concurrency,
        "rounds": rounds,
        "window_s": seconds,
        "mean_batch": {},
    }
    for mode in services:
        tput[mode] = {c: statistics.median(values) for c, values in rates[mode].items()}
        tput["mean_batch"][mode] = {c: i / max(1.0, b) for c, (b, i) in calls[mode].items()}
    for mode, key in (("on", "ratio_c8_c1"), ("fixed", "fixed_ratio_c8_c1")):
        if mode in tput:
            tput[key] = tput[mode]["8"] / tput[mode]["1"]
            print(f"c=8 / c=1, batching {mode}: {tput[key]:.2f}x", flush=True)
    for c in concurrency:
        row = ", ".join(
            f"{m} {tput[m][str(c)]:.2f}/s ({tput['mean_batch'][m][str(c)]:.1f} per call)"
            for m in services
        )
        print(f"c={c}: {row}", flush=True)
    return tput


def write_doc(section: str) -> None:
    write_section("cpu-bench", "CPU benchmark (tiny preset)", section)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (a smoke run)")
    parser.add_argument(
        "--throughput-only",
        action="store_true",
        help="only the throughput of each batching mode; prints, writes nothing",
    )
    parser.add_argument("--modes", default="on,fixed,off", help="with --throughput-only")
    args = parser.parse_args()
    if args.throughput_only:
        work = Path(tempfile.mkdtemp(prefix="sdxl-bench-"))
        bench_throughput(work, None, args.quick, modes=args.modes.split(","))
        return
    repeat = 5 if args.quick else 30
    work = Path(tempfile.mkdtemp(prefix="sdxl-bench-"))
    cache_dir = REPO / ".cache" / "sdxl-service"
    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, no GPU",
    }

    print("encoding ...", flush=True)
    results["encoding"] = bench_encoding(3 if args.quick else 20)
    results["png_b64_1024_ms"] = next(
        r["ms_p50"]
        for r in results["encoding"]
        if r["content"] == "photo-like" and r["encoding"].startswith("service png")
    )

    print("direct engine ...", flush=True)
    render = direct_engine_render(cache_dir)

    results["overhead"] = {}
    results["throughput"] = bench_throughput(work, results, args.quick, render, repeat)

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    section = markdown(results)
    print(section)
    if not args.quick:
        write_doc(section)


if __name__ == "__main__":
    main()
