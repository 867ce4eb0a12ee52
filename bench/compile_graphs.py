"""The graphs torch.compile traces for the UNets and ControlNets over a sequence of batches (CPU,
tiny preset): what SDXL_COMPILE will compile on a GPU, batch by batch.

The modules are compiled as optimisations.py compiles them (whole, fullgraph=True, `dynamic`
unset), with SDXL_COMPILE's dynamo settings, but through a backend that only counts: the
guards, and so the graphs, are dynamo's whatever the backend; inductor's max-autotune would
take minutes per graph. `--dynamic false` shows what dynamic=False would do.

`--inductor` instead compiles one ControlNet through the service's own path (SDXL_COMPILE with
force_compile, compile mode `default`) and compares its render with the eager one's.

    python -m bench.compile_graphs [--dynamic false | --inductor]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch._dynamo.testing import CompileCounter

from sdxl_service.choices import RefinerMode, RenderKind
from sdxl_service.contract.render_request import ControlNetParams
from sdxl_service.engine import Engine, optimisations
from sdxl_service.engine.config import EngineConfig
from sdxl_service.engine.controlnets import ControlNetModels
from sdxl_service.engine.optimisations import optimise_module
from sdxl_service.engine.render_batch import ImageTask, RenderBatch
from sdxl_service.engine.tiny import ensure_tiny_pair
from tests.controlnet_files import save_controlnets
from tests.jobs import make_params
from tests.unit.conftest import make_tiny_settings
from tests.unit.engine.test_controlnet_parity import ours_latents

EDGES = ControlNetParams(name="edges", scale=0.9, start=0.1, end=0.9)
DEPTH = ControlNetParams(name="depth")
UNION = ControlNetParams(name="union", mode=3)
# (label, kind, size, images, units)
SEQUENCE: list[tuple[str, RenderKind, int, int, tuple[ControlNetParams, ...]]] = [
    ("no unit", RenderKind.TEXT_TO_IMAGE, 64, 2, ()),
    ("no unit, again", RenderKind.TEXT_TO_IMAGE, 64, 2, ()),
    ("edges, scale 0.9 from 0.1 to 0.9", RenderKind.TEXT_TO_IMAGE, 64, 2, (EDGES,)),
    ("edges, again", RenderKind.TEXT_TO_IMAGE, 64, 2, (EDGES,)),
    (
        "edges, scale 0.5",
        RenderKind.TEXT_TO_IMAGE,
        64,
        2,
        (EDGES.model_copy(update={"scale": 0.5}),),
    ),
    (
        "edges, scale 1.0",
        RenderKind.TEXT_TO_IMAGE,
        64,
        2,
        (EDGES.model_copy(update={"scale": 1.0}),),
    ),
    ("edges, 1 image", RenderKind.TEXT_TO_IMAGE, 64, 1, (EDGES,)),
    ("edges + depth", RenderKind.TEXT_TO_IMAGE, 64, 2, (EDGES, DEPTH)),
    ("edges twice", RenderKind.TEXT_TO_IMAGE, 64, 2, (EDGES, EDGES)),
    ("union, mode 3", RenderKind.TEXT_TO_IMAGE, 64, 2, (UNION,)),
    ("union, mode 1", RenderKind.TEXT_TO_IMAGE, 64, 2, (UNION.model_copy(update={"mode": 1}),)),
    (
        "union, modes 1 + 3",
        RenderKind.TEXT_TO_IMAGE,
        64,
        2,
        (UNION.model_copy(update={"mode": 1}), UNION),
    ),
    ("edges, image-to-image", RenderKind.IMAGE_TO_IMAGE, 64, 2, (EDGES,)),
    ("edges, 96x96", RenderKind.TEXT_TO_IMAGE, 96, 2, (EDGES,)),
    ("edges, 128x128", RenderKind.TEXT_TO_IMAGE, 128, 2, (EDGES,)),
    ("no unit, 96x96", RenderKind.TEXT_TO_IMAGE, 96, 2, ()),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dynamic", choices=["unset", "false"], default="unset")
    parser.add_argument("--inductor", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    optimisations._configure_compiler()
    folder = Path(tempfile.mkdtemp(prefix="compile-graphs-"))
    base_dir, _ = ensure_tiny_pair(folder / "cache")
    controlnet_dir = save_controlnets(folder / "controlnets", base_dir)
    settings = make_tiny_settings(
        folder / "cache", controlnet_dir=controlnet_dir, channels_last=True
    )
    engine = Engine.load(EngineConfig.of(settings))
    if args.inductor:
        inductor(engine, controlnet_dir, settings.model_copy(update={"compile": True}))
        return
    dynamic = None if args.dynamic == "unset" else False
    counters = {"base UNet": CompileCounter(), "refiner UNet": CompileCounter()}
    modules = {"base UNet": engine.base.unet, "refiner UNet": engine.refiner.unet}
    for name in ("edges", "depth", "union"):
        counters[name] = CompileCounter()
        modules[name] = engine.controlnets.models([name], engine.base.unet)[0].model
    for name, module in modules.items():
        module.compile(backend=counters[name], fullgraph=True, dynamic=dynamic)
    seen = dict.fromkeys(counters, 0)
    for label, kind, size, images, units in SEQUENCE:
        edit = kind is not RenderKind.TEXT_TO_IMAGE
        picture = np.random.default_rng(0).integers(0, 256, (size, size, 3), np.uint8).tobytes()
        p = make_params(
            kind=kind,
            width=size,
            height=size,
            num_inference_steps=10,
            refiner=RefinerMode.ENSEMBLE,
            strength=0.75 if edit else 1.0,
            controlnets=units,
        )
        tasks = [
            ImageTask(
                prompt="a red fox",
                seed=seed,
                init_image=picture if edit else None,
                control_images=tuple(picture for _ in units),
            )
            for seed in range(images)
        ]
        with torch.inference_mode():
            engine.render(RenderBatch(params=p, tasks=tasks))
        new = {name: c.frame_count - seen[name] for name, c in counters.items()}
        seen = {name: c.frame_count for name, c in counters.items()}
        added = ", ".join(f"{name} +{n}" for name, n in new.items() if n) or "none"
        print(f"{label:36s} new graphs: {added}", flush=True)
    print("graphs:", seen, "total", sum(seen.values()))


def inductor(engine: Engine, controlnet_dir: Path, settings: object) -> None:
    p = make_params(
        width=64,
        height=64,
        num_inference_steps=10,
        refiner=RefinerMode.ENSEMBLE,
        controlnets=(EDGES,),
    )
    picture = np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8).tobytes()
    tasks = [ImageTask(prompt="a red fox", seed=seed, control_images=(picture,)) for seed in (7, 8)]
    with torch.inference_mode():
        eager = ours_latents(engine, p, tasks)
        engine.controlnets = ControlNetModels(
            controlnet_dir,
            device="cpu",
            dtype=torch.float32,
            capacity=3,
            optimise=partial(
                optimise_module,
                config=EngineConfig.of(settings),
                device="cpu",
                dtype=torch.float32,
                force_compile=True,
                compile_mode="default",
            ),
        )
        for label in ("first", "second"):
            started = time.perf_counter()
            compiled = ours_latents(engine, p, tasks)
            seconds = time.perf_counter() - started
            difference = (compiled - eager).abs().max().item()
            print(f"{label} compiled render: {seconds:.1f} s, latents differ by {difference:.2e}")


if __name__ == "__main__":
    main()
