"""`make bench-previews`: what live previews cost a render, per decoder, on the CPU (tiny preset).

The engine alone (no HTTP), rendering the CPU bench's job (4 steps, ensemble,
Euler) at 64x64 (as `make bench`) and 256x256, batch 1 and 4, with every
image asking for 3 previews (`partial_images=3`) decoded by each
SDXL_PREVIEW_DECODER, and without previews. The variants are interleaved in
rounds (their order rotating from round to round), so that the machine's
noise falls on all of them alike; each is reported as its median and as the
median of its per-round ratio to the render without previews.

Issue 10's bar: with partial_images=3 an image may take at most 10 % longer.
Writes bench/results/previews-cpu.json, prints a markdown table and, unless
--quick, rewrites the section of docs/PERFORMANCE.md between its markers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.performance_doc import write_section

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))

RESULTS = REPO / "bench" / "results" / "previews-cpu.json"
CACHE_DIR = REPO / ".cache" / "sdxl-service"
DECODERS = ("approx", "vae", "taesd")
NONE = "none"
PARTIAL_IMAGES = 3
STEPS = 4  # make bench's job
MAX_OVERHEAD = 0.10  # issue 10: at most 10 % longer with partial_images=3


@dataclass(frozen=True)
class Workload:
    size: int
    batch: int

    @property
    def name(self) -> str:
        return f"{self.size}x{self.size} batch {self.batch}"

    def params(self) -> Any:
        """make bench's job at this size: ensemble, Euler, STEPS steps."""
        from sdxl_service.choices import RefinerMode, SchedulerName
        from sdxl_service.contract.render_request import RenderParams

        return RenderParams(
            width=self.size,
            height=self.size,
            num_inference_steps=STEPS,
            guidance_scale=5.0,
            high_noise_frac=0.8,
            refiner=RefinerMode.ENSEMBLE,
            scheduler=SchedulerName.EULER,
        )


def make_batch(workload: Workload, previews: bool, sink: list[Any]) -> Any:
    from sdxl_service.engine.render_batch import ImageTask, RenderBatch

    params = workload.params()
    tasks = [ImageTask(prompt="bench", seed=1 + i) for i in range(workload.batch)]
    if not previews:
        return RenderBatch(params=params, tasks=tasks)
    # The previews are kept, not encoded: encoding is the HTTP process's work.
    return RenderBatch(
        params=params,
        tasks=tasks,
        on_preview=lambda task, index, image: sink.append(image),
        preview_counts=(PARTIAL_IMAGES,) * len(tasks),
    )


def measure(engine: Any, workloads: list[Workload], repeats: int) -> list[dict[str, Any]]:
    """Per workload and variant: median seconds per image and the ratio to no previews."""
    engine_config = engine.config
    engine.preview_decoders.prepare("taesd")  # loaded before timing, as at startup
    variants = [NONE, *DECODERS]
    rows: list[dict[str, Any]] = []
    for workload in workloads:
        sink: list[Any] = []

        def render(variant: str, workload: Workload = workload, sink: list[Any] = sink) -> float:
            decoder = DECODERS[0] if variant == NONE else variant
            engine.config = engine_config.model_copy(update={"preview_decoder": decoder})
            batch = make_batch(workload, variant != NONE, sink)
            started = time.perf_counter()
            engine.render(batch)
            seconds = time.perf_counter() - started
            sink.clear()
            return seconds

        for variant in variants:  # warm-up: first calls at a new shape are slower
            render(variant)
        seconds: dict[str, list[float]] = {variant: [] for variant in variants}
        for round_ in range(repeats):
            shift = round_ % len(variants)
            for variant in variants[shift:] + variants[:shift]:
                seconds[variant].append(render(variant))
        engine.config = engine_config
        base = seconds[NONE]
        for variant in variants:
            paired = [s / b for s, b in zip(seconds[variant], base, strict=True)]
            median = statistics.median(seconds[variant])
            rows.append(
                {
                    "workload": workload.name,
                    "size": workload.size,
                    "batch": workload.batch,
                    "decoder": variant,
                    "partial_images": 0 if variant == NONE else PARTIAL_IMAGES,
                    "median_s": round(median, 4),
                    "median_s_per_image": round(median / workload.batch, 4),
                    "ratio": round(statistics.median(paired), 3),
                    "ratio_of_medians": round(median / statistics.median(base), 3),
                    "seconds": [round(s, 4) for s in seconds[variant]],
                }
            )
        done = {row["decoder"]: row["ratio"] for row in rows if row["workload"] == workload.name}
        print(f"{workload.name}: {done}", file=sys.stderr, flush=True)
    return rows


def decode_costs(engine: Any, workloads: list[Workload], repeats: int) -> dict[str, Any]:
    """Milliseconds of one decoder call (one preview step: every image of the batch), alone."""
    import torch

    costs: dict[str, Any] = {}
    for workload in workloads:
        params = workload.params()
        side = workload.size // 8
        latents = torch.randn(workload.batch, 4, side, side, generator=torch.Generator())
        costs[workload.name] = {}
        for decoder in DECODERS:
            decode = engine.preview_decoders.decoder(decoder, params)
            with torch.inference_mode():
                decode(latents)
                seconds = []
                for _ in range(repeats):
                    started = time.perf_counter()
                    decode(latents)
                    seconds.append(time.perf_counter() - started)
            costs[workload.name][decoder] = round(1000 * statistics.median(seconds), 2)
    return costs


def verdict(rows: list[dict[str, Any]], max_overhead: float = MAX_OVERHEAD) -> dict[str, Any]:
    """Per decoder its worst ratio over the workloads; the fastest one within the bar."""
    worst = {
        decoder: max(row["ratio"] for row in rows if row["decoder"] == decoder)
        for decoder in DECODERS
        if any(row["decoder"] == decoder for row in rows)
    }
    mean = {
        decoder: statistics.mean(row["ratio"] for row in rows if row["decoder"] == decoder)
        for decoder in worst
    }
    meets = [decoder for decoder in worst if worst[decoder] <= 1 + max_overhead]
    fastest = min(meets, key=lambda decoder: (mean[decoder], worst[decoder]), default=None)
    return {
        "max_overhead": max_overhead,
        "worst_ratio": worst,
        "mean_ratio": {decoder: round(value, 3) for decoder, value in mean.items()},
        "meets": meets,
        "fastest_within": fastest,
    }


def markdown(document: dict[str, Any]) -> str:
    rows, result = document["rows"], document["verdict"]
    workloads = list(dict.fromkeys(row["workload"] for row in rows))
    header = "| decoder | " + " | ".join(workloads) + " | worst |"
    lines = [
        f"Measured {document['date']} on {document['machine']} "
        f"(`make bench-previews`: engine alone, tiny preset, {STEPS} steps ensemble, "
        f"{PARTIAL_IMAGES} previews per image, {document['repeats']} interleaved rounds, "
        f"torch {document['torch_threads']} threads).",
        "",
        "Median seconds per render without previews, then each decoder's time relative "
        "to it (median of the per-round ratios):",
        "",
        header,
        "|" + "---|" * (len(workloads) + 2),
    ]
    by = {(row["workload"], row["decoder"]): row for row in rows}
    lines.append(
        "| none (s per render) | "
        + " | ".join(f"{by[(w, NONE)]['median_s']:.3f} s" for w in workloads)
        + " | |"
    )
    for decoder in DECODERS:
        if (workloads[0], decoder) not in by:
            continue
        cells = [f"{by[(w, decoder)]['ratio']:.2f}x" for w in workloads]
        worst = result["worst_ratio"][decoder]
        mark = "" if worst <= 1 + result["max_overhead"] else " (over 10 %)"
        lines.append(f"| {decoder} | " + " | ".join(cells) + f" | {worst:.2f}x{mark} |")
    costs = document.get("decode_ms")
    if costs:
        lines += [
            "",
            "One decoder call alone (one preview step of the whole batch), median ms:",
            "",
            header.replace(" worst |", ""),
            "|" + "---|" * (len(workloads) + 1),
        ]
        for decoder in DECODERS:
            cells = [f"{costs[w][decoder]:.1f}" for w in workloads]
            lines.append(f"| {decoder} | " + " | ".join(cells) + " |")
    fastest = result["fastest_within"]
    lines += [
        "",
        f"Within 10 % everywhere: {', '.join(result['meets']) or 'none'}; "
        f"the fastest of them: **{fastest or 'none'}**.",
    ]
    return "\n".join(lines)


def write_doc(section: str) -> None:
    write_section("preview-bench", "Live previews: decoder cost (CPU, tiny preset)", section)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="64,256", help="comma list of square sides")
    parser.add_argument("--batches", default="1,4", help="comma list of batch sizes")
    parser.add_argument("--repeats", type=int, default=15, help="interleaved rounds")
    parser.add_argument("--quick", action="store_true", help="2 rounds, no docs: a smoke run")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results JSON")
    parser.add_argument("--cache-dir", type=Path, default=CACHE_DIR, help="SDXL_CACHE_DIR")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats = min(args.repeats, 2)
    args.sizes = [int(part) for part in args.sizes.split(",")]
    args.batches = [int(part) for part in args.batches.split(",")]
    return args


def main(argv: list[str] | None = None) -> int:
    import torch

    from sdxl_service.choices import Preset
    from sdxl_service.engine import Engine
    from sdxl_service.engine.config import EngineConfig
    from sdxl_service.settings import Settings

    args = parse_args(argv)
    # The service's own settings for the tiny preset on the CPU, nothing tuned.
    settings = Settings(preset=Preset.TINY, device="cpu", cache_dir=args.cache_dir)
    engine = Engine.load(EngineConfig.of(settings))
    workloads = [Workload(size, batch) for size in args.sizes for batch in args.batches]
    rows = measure(engine, workloads, args.repeats)
    costs = decode_costs(engine, workloads, max(5, args.repeats))
    document = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, no GPU",
        "torch_threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "steps": STEPS,
        "partial_images": PARTIAL_IMAGES,
        "rows": rows,
        "verdict": verdict(rows),
        "decode_ms": costs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(document, indent=2) + "\n")
    section = markdown(document)
    print(section)
    if not args.quick:
        write_doc(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
