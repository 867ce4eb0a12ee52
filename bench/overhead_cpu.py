"""`make bench-overhead`: what the service adds to one render, on the CPU, tiny preset.

Starts the real service (`bentoml serve`, tests/service_process.py) and, in the
same process, the same tiny engine; then alternates the two on the same work,
a 256x256 n=1 text-to-image request: the engine's `render` of the batch the
service itself would build for it (api/request_rules.py resolves the request here
too, render size included), and a raw httpx POST /v1/images/generations
(b64_json) to the service. Samples come in pairs, their order alternating, so
drift in this shared machine's load falls on both alike. Overhead is reported
three ways: percentiles of the paired differences (HTTP minus engine of the same
pair), HTTP's percentile minus the engine's, and per request: its HTTP time
minus the render the service made for it (the answer's Server-Timing). The
first two carry the engine's own spread from run to run (tens of ms at p95 on
this machine); the third does not, but cannot see a render that the service
itself slows down, which the mean engine stages in the breakdown show.
Last, the same run measures the floor under all of it: a BentoML app with
nothing to do (bench/floor_app.py), directly and through a second service.

The breakdown comes from the service's own stage histograms (/metrics): the
mean per request of its pipeline stages (base, refiner, decode), its queue
wait and its encoding, so what is left is the hop between the two services
and the HTTP work. Writes bench/results/overhead-cpu.json and the section of
docs/PERFORMANCE.md between the overhead-bench markers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from bench.performance_doc import write_section
from bench.runs import current_commit
from tests.decoded import server_timing
from tests.service_process import REPO, running_service

RESULTS = REPO / "bench" / "results" / "overhead-cpu.json"
CACHE_DIR = REPO / ".cache" / "sdxl-service"
# The request measured; num_inference_steps pins the work whatever SDXL_STEPS says.
REQUEST = {
    "prompt": "bench",
    "size": "256x256",
    "n": 1,
    "num_inference_steps": 4,
    "seed": 1,
    "response_format": "b64_json",
}
TARGETS_MS = {"p50": 5.0, "p95": 20.0}
FLOOR_SAMPLES = 200
# The service's stage histograms: the engine's pipeline stages, then the rest.
ENGINE_STAGES = ("vae_encode", "base", "refiner", "decode")
SERVICE_STAGES = ("queue_wait", "encode")


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def engine_render() -> tuple[Callable[[], Any], dict[str, Any]]:
    """The tiny engine in this process, rendering what the service renders for REQUEST."""
    from sdxl_service.api.request_kinds import GENERATION
    from sdxl_service.api.schemas import ImageGenerationRequest
    from sdxl_service.choices import Preset
    from sdxl_service.engine import Engine
    from sdxl_service.engine.config import EngineConfig
    from sdxl_service.engine.render_batch import RenderBatch, image_tasks
    from sdxl_service.lora_catalog import LoraCatalog
    from sdxl_service.settings import Settings

    settings = Settings(preset=Preset.TINY, cache_dir=CACHE_DIR)
    engine = Engine.load(EngineConfig.of(settings))
    request = ImageGenerationRequest.model_validate(REQUEST)
    resolved = GENERATION.resolve(
        request, None, settings, engine.native_resolution, LoraCatalog(settings.lora_folder)
    )
    job = resolved.job
    batch = RenderBatch(params=job.params, tasks=image_tasks(job))
    engine.render(batch)  # warm-up
    params = job.params
    work = {
        "answered": f"{resolved.width}x{resolved.height}",
        "rendered": f"{params.width}x{params.height}",
        "native": engine.native_resolution,
        "steps": params.num_inference_steps,
        "refiner": str(params.refiner),
        "scheduler": str(params.scheduler),
    }
    return lambda: engine.render(batch), work


def stage_totals(root: str) -> dict[str, tuple[float, float]]:
    """(sum of seconds, count) per stage of sdxl_stage_seconds, all processes together."""
    text = httpx.get(f"{root}/metrics", timeout=30).text
    totals: dict[str, tuple[float, float]] = {}
    pattern = r'^sdxl_stage_seconds_(sum|count)\{[^}]*stage="([^"]+)"[^}]*\} (\S+)$'
    for kind, stage, value in re.findall(pattern, text, re.M):
        seconds, count = totals.get(stage, (0.0, 0.0))
        if kind == "sum":
            seconds += float(value)
        else:
            count += float(value)
        totals[stage] = (seconds, count)
    return totals


def measure(root: str, render: Callable[[], Any], samples: int, warmup: int) -> dict[str, Any]:
    """Interleaved pairs (engine, HTTP), order alternating; warm-up pairs dropped."""
    api = f"{root}/v1/images/generations"
    engine_s: list[float] = []
    http_s: list[float] = []
    render_s: list[float] = []  # each HTTP sample's own render, from its Server-Timing
    with httpx.Client(timeout=120) as client:

        def post() -> float:
            """Seconds until the whole answer is in; parsing it is the client's work."""
            started = time.perf_counter()
            response = client.post(api, json=REQUEST)
            elapsed = time.perf_counter() - started
            response.raise_for_status()
            assert response.json()["data"][0]["b64_json"]
            render_s.append(server_timing(response.headers["server-timing"])["render"] / 1000.0)
            return elapsed

        def engine() -> float:
            started = time.perf_counter()
            render()
            return time.perf_counter() - started

        for _ in range(warmup):
            engine()
            post()
        before = stage_totals(root)
        render_s.clear()
        for i in range(samples):
            if i % 2:
                http_s.append(post())
                engine_s.append(engine())
            else:
                engine_s.append(engine())
                http_s.append(post())
        after = stage_totals(root)
    result = summarize(engine_s, http_s, before, after, samples)
    # What the service adds to the very render it made for the request: free
    # of the engine's run-to-run spread, which dominates the paired p95.
    own = [1000.0 * (h - r) for h, r in zip(http_s, render_s, strict=True)]
    result["overhead_per_request"] = {
        "p50_ms": round(percentile(own, 50), 2),
        "p95_ms": round(percentile(own, 95), 2),
    }
    return result


def framework_floor(samples: int) -> dict[str, dict[str, float]]:
    """p50/p95 ms of BentoML's own request paths with no work (bench/floor_app.py):
    one API, and one API calling a second service."""
    work = Path(tempfile.mkdtemp(prefix="sdxl-floor-"))
    floor: dict[str, dict[str, float]] = {}
    with (
        running_service(work, target="bench.floor_app:Outer") as app,
        httpx.Client(base_url=app.root, timeout=30) as client,
    ):
        for route in ("direct", "hop"):
            times = []
            for i in range(samples + 20):  # the first 20 warm up
                started = time.perf_counter()
                client.post(f"/{route}", json={"x": i}).raise_for_status()
                times.append(time.perf_counter() - started)
            ms = [1000.0 * t for t in times[20:]]
            floor[route] = {"p50_ms": percentile(ms, 50), "p95_ms": percentile(ms, 95)}
    return floor


def summarize(
    engine_s: list[float],
    http_s: list[float],
    before: dict[str, tuple[float, float]],
    after: dict[str, tuple[float, float]],
    samples: int,
) -> dict[str, Any]:
    ms = 1000.0
    diffs = [h - e for h, e in zip(http_s, engine_s, strict=True)]
    result: dict[str, Any] = {"samples": samples}
    for name, values in (("engine", engine_s), ("http", http_s)):
        result[name] = {
            "p50_ms": round(ms * percentile(values, 50), 2),
            "p95_ms": round(ms * percentile(values, 95), 2),
            "mean_ms": round(ms * float(np.mean(values)), 2),
        }
    result["overhead_paired"] = {
        "p50_ms": round(ms * percentile(diffs, 50), 2),
        "p95_ms": round(ms * percentile(diffs, 95), 2),
    }
    result["overhead_of_percentiles"] = {
        q: round(result["http"][q] - result["engine"][q], 2) for q in ("p50_ms", "p95_ms")
    }
    # Mean ms per request of each stage the service timed during the samples.
    stages = {}
    for stage in (*ENGINE_STAGES, *SERVICE_STAGES):
        seconds = after.get(stage, (0.0, 0.0))[0] - before.get(stage, (0.0, 0.0))[0]
        if seconds > 0:
            stages[stage] = round(ms * seconds / samples, 2)
    engine_in_service = sum(stages.get(s, 0.0) for s in ENGINE_STAGES)
    timed_by_service = engine_in_service + sum(stages.get(s, 0.0) for s in SERVICE_STAGES)
    result["breakdown_mean_ms"] = {
        "http_total": result["http"]["mean_ms"],
        "engine_alone": result["engine"]["mean_ms"],
        "stages_in_service": stages,
        "engine_stages_in_service": round(engine_in_service, 2),
        # HTTP in and out, validation, the hop between the two services.
        "rest": round(result["http"]["mean_ms"] - timed_by_service, 2),
    }
    return result


def markdown(results: dict[str, Any]) -> str:
    m = results["measured"]
    work = results["work"]
    paired, of_p = m["overhead_paired"], m["overhead_of_percentiles"]
    own = m["overhead_per_request"]
    b = m["breakdown_mean_ms"]
    rows = [
        ("engine alone", m["engine"]["p50_ms"], m["engine"]["p95_ms"], ""),
        ("service over HTTP", m["http"]["p50_ms"], m["http"]["p95_ms"], ""),
        ("overhead, paired differences", paired["p50_ms"], paired["p95_ms"], "< 5 / < 20"),
        ("overhead, HTTP p minus engine p", of_p["p50_ms"], of_p["p95_ms"], ""),
        ("overhead, per request: HTTP minus its own render", own["p50_ms"], own["p95_ms"], ""),
    ]
    floor = results.get("floor")
    if floor:
        direct, hop = floor["direct"], floor["hop"]
        rows += [
            ("floor: a BentoML API doing nothing", direct["p50_ms"], direct["p95_ms"], ""),
            ("floor: the same, calling a second service", hop["p50_ms"], hop["p95_ms"], ""),
        ]
    lines = [
        f"Measured {results['date']} on {results['machine']} (`make bench-overhead`, "
        f"commit {results['commit']}): {m['samples']} interleaved pairs after "
        f"{results['warmup']} warm-up pairs; a {work['answered']} n=1 request "
        f"(rendered at {work['rendered']}, {work['steps']} steps, {work['refiner']}, "
        f"{work['scheduler']}), b64_json PNG.",
        "",
        "| measure | p50 ms | p95 ms | target |",
        "|---|---|---|---|",
        *(f"| {name} | {p50:.1f} | {p95:.1f} | {target} |" for name, p50, p95, target in rows),
        "",
        "Where the service's time goes (mean ms per request, from its stage histograms):",
        "",
        "| part | mean ms |",
        "|---|---|",
        f"| HTTP end to end | {b['http_total']:.1f} |",
        f"| engine alone (this process) | {b['engine_alone']:.1f} |",
        *(f"| service stage: {k} | {v:.1f} |" for k, v in b["stages_in_service"].items()),
        f"| rest: HTTP, validation, the hop between the services | {b['rest']:.1f} |",
    ]
    return "\n".join(lines)


def write_doc(section: str) -> None:
    write_section("overhead-bench", "Service overhead (CPU, tiny preset, 256x256)", section)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--samples", type=int, default=200, help="measured pairs")
    parser.add_argument("--warmup", type=int, default=5, help="pairs dropped first")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    print("engine ...", flush=True)
    render, work = engine_render()
    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, no GPU",
        "commit": current_commit(),
        "warmup": args.warmup,
        "request": REQUEST,
        "work": work,
        "targets_ms": TARGETS_MS,
    }
    print("service ...", flush=True)
    with running_service(Path(tempfile.mkdtemp(prefix="sdxl-overhead-"))) as service:
        results["measured"] = measure(service.root, render, args.samples, args.warmup)
    print("framework floor ...", flush=True)
    results["floor"] = framework_floor(FLOOR_SAMPLES)
    section = markdown(results)
    print(json.dumps(results["measured"], indent=2))
    print(section)
    if not args.no_write:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(results, indent=2) + "\n")
        write_doc(section)


if __name__ == "__main__":
    main()
