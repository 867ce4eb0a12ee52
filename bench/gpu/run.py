"""The whole GPU run, part by part, each time-boxed; bench/gpu/run.sh starts it.

    python bench/gpu/run.py OUTDIR [--smoke] [--budget-s 450]

1. engine: bench/gpu_bench.py alone, fp16 with the service's default switches,
   1024x1024, 30 steps at batch 1, 2, 4, 8, then one image at SDXL_MAX_PIXELS'
   side (1536); it also saves the random-weight pair for part 2.
2. http: `bentoml serve` of this repository loading that pair from disk through
   the real `from_pretrained` path (SDXL_PRESET=sdxl, SDXL_BASE_MODEL and
   SDXL_REFINER_MODEL set to the folders): time to /readyz, latency at
   concurrency 1, images/s at 4 and 8 with batching, the service's overhead over
   the engine alone, /livez while saturated, peak GPU memory (nvidia-smi).
3. controls: bench/gpu_controls.py, what a full-size (random-weight) ControlNet
   served from a folder adds: its load's GPU memory, s/image and peak memory with
   0, 1 and 2 units eager; the 2-unit render with the ControlNet compiled WITH
   CUDA graphs (errors, or its pixels against eager); then SDXL_COMPILE's 1- and
   2-unit renders (compile time, steady s/image). Its own time box
   (CONTROLS_BUDGET_S), taken from the matrix's share.
4. matrix: bench/gpu_bench.py --matrix at batch 1 (SDPA, channels_last, fused
   QKV, VAE in bf16, compiled repeated blocks), each compared with the
   unoptimised run's pixels, on what is left of the budget.

The order is what matters most first: the engine's numbers (the README's
hardware rows), the service over HTTP, what a ControlNet adds (the README's
ControlNet estimates; eager rows before the compiled ones), then the matrix,
whose compile row is the part most likely to be cut off. Every result is
appended to OUTDIR/results.jsonl as it comes, and OUTDIR/results.json and
results.md are rewritten after each part, so a run cut off anywhere leaves what
it measured. `--smoke` runs every part on the CPU with the tiny configs in about
a minute and a half (time box: 150 s): a check, not a measurement.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO), str(REPO / "src")]

import httpx  # noqa: E402

from bench import gpu_bench, gpu_controls  # noqa: E402
from bench.run_cpu import batch_counters, percentile  # noqa: E402
from tests.service_process import start_service, stop_service  # noqa: E402

BENCH = REPO / "bench" / "gpu_bench.py"
CONTROLS = REPO / "bench" / "gpu_controls.py"
PROMPT = "a photograph of an astronaut riding a horse on the moon, 35mm, golden hour"
LIVEZ_PROBES = 200
# Seconds of the budget each part may use at most (GPU run); the matrix gets the rest.
ENGINE_BUDGET_S = 140
HTTP_ENDS_AT_S = 320
# The ControlNet part's own box, after the HTTP part: the matrix then has what is left of
# 480 s less the install (tens of seconds: its first eager rows, or a "skipped" row).
CONTROLS_BUDGET_S = 120


class Workload:
    """Sizes, steps and batches of the run: the full one or the smoke one."""

    def __init__(self, smoke: bool) -> None:
        self.smoke = smoke
        self.size = 64 if smoke else 1024
        self.max_size = 96 if smoke else 1536  # SDXL_MAX_PIXELS = 1536 * 1536
        self.steps = 2 if smoke else 30
        self.engine_batches = "1,2" if smoke else "1,2,4,8"
        self.concurrency = (1, 2) if smoke else (1, 4, 8)
        self.latency_requests = 2 if smoke else 3
        self.saturating_clients = 4 if smoke else 16
        self.livez_probes = 20 if smoke else LIVEZ_PROBES

    def bench_args(self) -> list[str]:
        common = ["--size", str(self.size), "--steps", str(self.steps)]
        # fp16 on the GPU; the CPU has no fast half-precision kernels.
        return (
            [*common, "--smoke", "--dtype", "fp32"] if self.smoke else [*common, "--dtype", "fp16"]
        )


class Recorder:
    """results.jsonl as it comes; results.json and results.md after each part."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.document: dict[str, Any] = {"started": now()}
        out.mkdir(parents=True, exist_ok=True)

    def event(self, part: str, **fields: Any) -> None:
        line = {"part": part, "at": now(), **fields}
        with (self.out / "results.jsonl").open("a") as log:
            log.write(json.dumps(line) + "\n")
        print(f"[{part}] {json.dumps(fields)[:300]}", file=sys.stderr, flush=True)

    def section(self, part: str, value: Any) -> None:
        self.document[part] = value
        self.document["written"] = now()
        (self.out / "results.json").write_text(json.dumps(self.document, indent=2) + "\n")
        (self.out / "results.md").write_text(markdown(self.document) + "\n")


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class Budget:
    def __init__(self, seconds: float) -> None:
        self.started = time.monotonic()
        self.seconds = seconds

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def left(self) -> float:
        return self.seconds - self.elapsed()


# --- environment ---------------------------------------------------------------


def nvidia_smi(query: str) -> list[str]:
    if not shutil.which("nvidia-smi"):
        return []
    completed = subprocess.run(
        ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader,nounits"],
        capture_output=True,
        text=True,
        timeout=20,
    )
    return [line.strip() for line in completed.stdout.splitlines() if line.strip()]


def environment(out: Path) -> dict[str, Any]:
    import torch  # its import only: CUDA is started by the parts' own processes

    versions = {}
    for name in ("torch", "diffusers", "transformers", "accelerate", "huggingface-hub", "bentoml"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    gpus = nvidia_smi("name,driver_version,memory.total")
    pip_check = out / "pip-check.txt"
    return {
        "gpus": gpus,  # "name, driver, MiB"
        "card": gpus[0].split(",")[0] if gpus else None,
        "driver": gpus[0].split(",")[1].strip() if gpus else None,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "python": platform.python_version(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "versions": versions,
        "pip_check": pip_check.read_text().strip() if pip_check.is_file() else None,
    }


# --- the gpu_bench parts -----------------------------------------------------------


def run_bench(command: list[str], timeout: float, log: Path, script: Path = BENCH) -> str:
    """gpu_bench.py (or `script`) in its own process group, killed whole (compile child
    included) at the timeout; returns how it ended."""
    with log.open("w") as sink:
        process = subprocess.Popen(
            [sys.executable, str(script), *command],
            cwd=REPO,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            return f"exit {process.wait(timeout=max(timeout, 1))}"
        except subprocess.TimeoutExpired:
            return f"killed after {timeout:.0f} s"
        finally:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def bench_runs(path: Path) -> list[dict[str, Any]]:
    with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
        return list(json.loads(path.read_text())["runs"])
    return []


def engine_part(
    workload: Workload, budget: Budget, out: Path, weights: Path, recorder: Recorder
) -> list[dict[str, Any]]:
    own = min(ENGINE_BUDGET_S, budget.left() - 30) if not workload.smoke else budget.left()
    command = [
        *workload.bench_args(),
        "--batch",
        workload.engine_batches,
        "--max-size",
        str(workload.max_size),
        # The service's defaults (Settings): SDPA, channels_last, VAE dtype auto.
        "--sdpa",
        "--channels-last",
        "--save-pretrained",
        str(weights),
        "--budget-s",
        str(int(own)),
        "--out",
        str(out / "engine.json"),
    ]
    ended = run_bench(command, own + 45, out / "engine.log")
    runs = bench_runs(out / "engine.json")
    for run in runs:
        recorder.event("engine", **run)
    recorder.event("engine", ended=ended, weights_saved=(weights / "COMPLETE").is_file())
    return runs


def controls_part(
    workload: Workload, budget: Budget, out: Path, recorder: Recorder
) -> list[dict[str, Any]]:
    # The smoke run leaves the matrix its 40 s; the GPU run its share less this box.
    own = min(CONTROLS_BUDGET_S, budget.left() - (40 if workload.smoke else 10))
    if own < 30:
        recorder.event("controls", status=f"skipped: {max(own, 0):.0f} s left")
        return []
    command = [
        "--size",
        str(workload.size),
        "--steps",
        str(workload.steps),
        "--budget-s",
        str(int(own)),
        "--out",
        str(out / "controls.json"),
    ]
    command += ["--smoke"] if workload.smoke else ["--dtype", "fp16"]
    # Killed at its box whatever it does (a compile included): its rows are written as they come.
    ended = run_bench(command, own, out / "controls.log", CONTROLS)
    runs = bench_runs(out / "controls.json")
    for run in runs:
        recorder.event("controls", **run)
    recorder.event("controls", ended=ended)
    return runs


def matrix_part(workload: Workload, budget: Budget, out: Path, recorder: Recorder) -> list[dict]:
    own = budget.left() - 10
    if own < 30:
        recorder.event("matrix", status=f"skipped: {max(own, 0):.0f} s left")
        return []
    command = [
        *workload.bench_args(),
        "--matrix",
        "--batch",
        "1",
        "--budget-s",
        str(int(own)),
        "--out",
        str(out / "matrix.json"),
    ]
    if workload.smoke:
        command += ["--min-child-s", "5"]
    ended = run_bench(command, own + 5, out / "matrix.log")
    runs = bench_runs(out / "matrix.json")
    for run in runs:
        recorder.event("matrix", **run)
    recorder.event("matrix", ended=ended)
    return runs


# --- the HTTP part -------------------------------------------------------------------


class GpuMemoryPeak:
    """The largest memory.used nvidia-smi reports while running (MiB; None without it)."""

    def __init__(self, interval_s: float = 0.5) -> None:
        self.peak_mib: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, args=(interval_s,), daemon=True)

    def _poll(self, interval_s: float) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(Exception):
                used = [int(float(v)) for v in nvidia_smi("memory.used")]
                if used:
                    self.peak_mib = max(self.peak_mib or 0, *used)
            self._stop.wait(interval_s)

    @contextlib.contextmanager
    def running(self) -> Iterator[GpuMemoryPeak]:
        if shutil.which("nvidia-smi"):
            self._thread.start()
        try:
            yield self
        finally:
            self._stop.set()


def job(workload: Workload, i: int, **overrides: Any) -> dict[str, Any]:
    return {
        "prompt": f"{PROMPT} {i}",
        "size": f"{workload.size}x{workload.size}",
        "num_inference_steps": workload.steps,
        "n": 1,
        "seed": i,
        "response_format": "b64_json",
        **overrides,
    }


def post(client: httpx.Client, api: str, body: dict[str, Any]) -> float:
    started = time.perf_counter()
    response = client.post(f"{api}/images/generations", json=body)
    response.raise_for_status()
    if not response.json()["data"][0].get("b64_json"):
        raise RuntimeError("no image in the response")
    return time.perf_counter() - started


def closed_loop(
    api: str, root: str, workload: Workload, concurrency: int, requests: int, timeout: float
) -> dict[str, Any]:
    batches_before, images_before = batch_counters(root)
    started = time.perf_counter()
    with (
        httpx.Client(timeout=timeout, limits=httpx.Limits(max_connections=concurrency)) as client,
        ThreadPoolExecutor(concurrency) as pool,
    ):
        latencies = list(pool.map(lambda i: post(client, api, job(workload, i)), range(requests)))
    seconds = time.perf_counter() - started
    batches_after, images_after = batch_counters(root)
    return {
        "concurrency": concurrency,
        "requests": requests,
        "images_per_s": round(requests / seconds, 3),
        "latency_p50_s": round(statistics.median(latencies), 3),
        "latency_max_s": round(max(latencies), 3),
        "images_per_call": round(
            (images_after - images_before) / max(1.0, batches_after - batches_before), 2
        ),
    }


def livez_while_saturated(api: str, root: str, workload: Workload) -> dict[str, Any]:
    """/livez and /readyz latencies while clients keep the pipeline's queue full."""
    stop = threading.Event()
    # Short jobs, so that stopping the load waits for little work in flight.
    small = {"size": "512x512" if not workload.smoke else "64x64", "num_inference_steps": 8}

    def load(i: int) -> None:
        with httpx.Client(timeout=300) as client:
            while not stop.is_set():
                with contextlib.suppress(httpx.HTTPError):
                    client.post(f"{api}/images/generations", json=job(workload, i, **small))

    workers = [
        threading.Thread(target=load, args=(i,), daemon=True)
        for i in range(workload.saturating_clients)
    ]
    for worker in workers:
        worker.start()
    result: dict[str, Any] = {"clients": len(workers)}
    try:
        # Saturated: images waiting in the queue (the service's own gauge).
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not queue_images(root):
            time.sleep(0.05)
        result["queue_images_at_start"] = queue_images(root)
        with httpx.Client(timeout=10) as client:
            for path in ("/livez", "/readyz"):
                times, failures = [], 0
                for _ in range(workload.livez_probes):
                    started = time.perf_counter()
                    try:
                        client.get(f"{root}{path}").raise_for_status()
                    except httpx.HTTPError:
                        failures += 1
                    times.append(time.perf_counter() - started)
                    time.sleep(0.01)
                result[path] = {
                    "p50_ms": round(1000 * percentile(times, 50), 1),
                    "p99_ms": round(1000 * percentile(times, 99), 1),
                    "max_ms": round(1000 * max(times), 1),
                    "failed": failures,
                }
    finally:
        stop.set()
        for worker in workers:
            worker.join(timeout=120)
    return result


def queue_images(root: str) -> float:
    text = httpx.get(f"{root}/metrics", timeout=30).text
    for line in text.splitlines():
        if line.startswith("sdxl_queue_images"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def http_part(
    workload: Workload,
    budget: Budget,
    out: Path,
    weights: Path,
    engine_runs: list[dict[str, Any]],
    recorder: Recorder,
) -> dict[str, Any]:
    result: dict[str, Any] = {}
    if not (weights / "COMPLETE").is_file():
        result["status"] = f"skipped: no saved weights in {weights} (see engine.log)"
        recorder.event("http", **result)
        return result
    # The matrix gets what the HTTP part leaves of the budget.
    ends_at = budget.seconds - 30 if workload.smoke else HTTP_ENDS_AT_S

    def time_left() -> float:
        return ends_at - budget.elapsed()

    env = {
        "SDXL_PRESET": "sdxl",
        "SDXL_BASE_MODEL": str(weights / "base"),
        "SDXL_REFINER_MODEL": str(weights / "refiner"),
        "SDXL_STEPS": str(workload.steps),
        "SDXL_MAX_BATCH_IMAGES": "8",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }
    with GpuMemoryPeak().running() as memory:
        started = time.monotonic()
        try:
            service = start_service(out / "service", env)
        except Exception as error:
            result["status"] = f"error: {type(error).__name__}: {str(error)[-1500:]}"
            recorder.event("http", **result)
            return result
        try:
            result["ready_s"] = round(time.monotonic() - started, 1)
            recorder.event("http", ready_s=result["ready_s"])
            timeout = max(time_left(), 30)
            with httpx.Client(timeout=timeout) as client:
                latencies = [
                    post(client, service.api, job(workload, i))
                    for i in range(workload.latency_requests)
                ]
            result["c1_latency_s"] = [round(s, 3) for s in latencies]
            result["c1_latency_p50_s"] = round(statistics.median(latencies), 3)
            recorder.event("http", c1_latency_s=result["c1_latency_s"])
            engine = engine_seconds_per_image(engine_runs, workload.size)
            if engine is not None:
                result["engine_s_per_image"] = engine
                result["overhead_ms"] = round(1000 * (result["c1_latency_p50_s"] - engine), 1)
                recorder.event("http", overhead_ms=result["overhead_ms"], engine_s=engine)

            result["throughput"] = []
            for concurrency in workload.concurrency[1:]:
                requests = 2 * concurrency
                # A batch of c images takes about c single images (less with batching).
                estimate = 2 * concurrency * result["c1_latency_p50_s"] * 1.2
                if estimate > time_left():
                    result["throughput"].append(
                        {"concurrency": concurrency, "status": "skipped: time budget"}
                    )
                    continue
                row = closed_loop(
                    service.api, service.root, workload, concurrency, requests, timeout
                )
                result["throughput"].append(row)
                recorder.event("http", **row)
            if time_left() > 20:
                result["liveness"] = livez_while_saturated(service.api, service.root, workload)
                recorder.event("http", liveness=result["liveness"])
            result["status"] = "ok"
        except Exception as error:
            result["status"] = f"error: {type(error).__name__}: {str(error)[:500]}"
            result["log_tail"] = service.log_tail(3000)
            recorder.event("http", status=result["status"])
        finally:
            result["gpu_memory_peak_mib"] = memory.peak_mib
            stop_service(service)
    recorder.event("http", gpu_memory_peak_mib=memory.peak_mib, status=result["status"])
    return result


def engine_seconds_per_image(runs: list[dict[str, Any]], size: int) -> float | None:
    for run in runs:
        if run.get("status") == "ok" and run.get("batch") == 1 and run.get("size") == size:
            return float(run["seconds_per_image"])
    return None


# --- report ------------------------------------------------------------------------


def markdown(document: dict[str, Any]) -> str:
    env = document.get("env", {})
    lines = [
        f"GPU run {document.get('started')}: {env.get('card') or 'no GPU'}, "
        f"driver {env.get('driver')}, torch {env.get('torch')} (CUDA {env.get('torch_cuda')}), "
        f"Python {env.get('python')}; {document.get('workload', '')}",
        "",
    ]
    if document.get("engine"):
        lines += ["Engine alone:", "", gpu_bench.markdown_table(document["engine"]), ""]
    http = document.get("http")
    if http:
        lines += ["Through HTTP (`bentoml serve`, weights from disk):", ""]
        lines += ["| measure | result |", "|---|---|"]
        rows: list[tuple[str, Any]] = [
            ("status", http.get("status")),
            ("start to /readyz", f"{http.get('ready_s')} s"),
            ("latency c=1 p50", f"{http.get('c1_latency_p50_s')} s"),
            ("engine alone, batch 1", f"{http.get('engine_s_per_image')} s"),
            ("service overhead (c=1 p50 - engine)", f"{http.get('overhead_ms')} ms"),
            ("peak GPU memory (nvidia-smi)", f"{http.get('gpu_memory_peak_mib')} MiB"),
        ]
        for row in http.get("throughput", []):
            rows.append(
                (
                    f"c={row['concurrency']}",
                    row.get("status")
                    or f"{row['images_per_s']} images/s, {row['images_per_call']} images "
                    f"per call, latency p50 {row['latency_p50_s']} s",
                )
            )
        liveness = http.get("liveness") or {}
        for path in ("/livez", "/readyz"):
            if path in liveness:
                probe = liveness[path]
                rows.append(
                    (
                        f"{path} while saturated ({liveness['clients']} clients)",
                        f"p50 {probe['p50_ms']} ms, p99 {probe['p99_ms']} ms, "
                        f"max {probe['max_ms']} ms, {probe['failed']} failed",
                    )
                )
        lines += [f"| {name} | {value} |" for name, value in rows]
        lines.append("")
    if document.get("controls"):
        lines += [
            "What a ControlNet adds (full-size random weights, batch 1; "
            "max abs diff: against eager with the same units, eager rows against 0 units):",
            "",
            gpu_controls.markdown_table(document["controls"]),
            "",
        ]
    if document.get("matrix"):
        lines += [
            "Optimisation matrix (batch 1):",
            "",
            gpu_bench.markdown_table(document["matrix"]),
        ]
    return "\n".join(lines)


# --- entry point -------------------------------------------------------------------


def interrupt(signum: int, _frame: Any) -> None:
    # SIGTERM (`timeout`) unwinds like Ctrl-C: the service and the children are stopped.
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny configs: a check")
    parser.add_argument("--budget-s", type=float, default=None, help="for all parts (450)")
    parser.add_argument("--weights", type=Path, help="where the random pair is saved (temp)")
    args = parser.parse_args(argv)

    signal.signal(signal.SIGTERM, interrupt)
    budget = Budget(args.budget_s or (150 if args.smoke else 450))
    workload = Workload(args.smoke)
    recorder = Recorder(args.out)
    recorder.section(
        "workload",
        f"{workload.size}x{workload.size}, {workload.steps} steps, ensemble 0.8, guidance 5",
    )
    recorder.section("env", environment(args.out))
    recorder.event("env", **recorder.document["env"])

    scratch = Path(tempfile.mkdtemp(prefix="sdxl-gpu-run-"))
    weights = args.weights or scratch / "weights"
    parts: list[tuple[str, Callable[[], Any]]] = [
        ("engine", lambda: engine_part(workload, budget, args.out, weights, recorder)),
        (
            "http",
            lambda: http_part(
                workload, budget, args.out, weights, recorder.document.get("engine", []), recorder
            ),
        ),
        ("controls", lambda: controls_part(workload, budget, args.out, recorder)),
        ("matrix", lambda: matrix_part(workload, budget, args.out, recorder)),
    ]
    try:
        for name, part in parts:
            recorder.event(name, status="starting", seconds_left=round(budget.left()))
            try:
                recorder.section(name, part())
            except Exception as error:  # the next part still runs
                recorder.event(name, status=f"error: {type(error).__name__}: {error}")
    finally:
        if args.weights is None:
            shutil.rmtree(scratch, ignore_errors=True)
        recorder.event("done", elapsed_s=round(budget.elapsed(), 1))
    print(markdown(recorder.document))
    ok = any(run.get("status") == "ok" for run in recorder.document.get("engine", []))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
