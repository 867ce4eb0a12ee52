"""A ControlNet loaded by the engine takes the speed-ups the UNets take (optimisations.py), and
renders what the unoptimised one renders.

The tiny ControlNets of tests/controlnet_files.py (a ControlNetModel folder and a Union single
file), in engines that differ only in SDXL_ATTENTION, SDXL_CHANNELS_LAST and SDXL_FUSE_QKV;
renders are compared by their final latents (CPU, float32).
"""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch
import torch._dynamo
from diffusers import ControlNetModel, ControlNetUnionModel
from diffusers.models.attention_processor import (
    Attention,
    AttnProcessor,
    AttnProcessor2_0,
    FusedAttnProcessor2_0,
)
from torch._dynamo.testing import CompileCounter

from sdxl_service.choices import RefinerMode, RenderKind
from sdxl_service.contract.render_request import ControlNetParams
from sdxl_service.engine import Engine, optimisations
from sdxl_service.engine.config import EngineConfig
from sdxl_service.engine.controlnets import ControlNetModels
from sdxl_service.engine.optimisations import RECOMPILE_LIMIT, optimise_module
from tests.controlnet_files import save_controlnets

from .test_controlnet_parity import controlnet, ours_latents, params, tasks

UNITS = {
    "edges": ControlNetParams(name="edges", scale=0.9, start=0.1, end=0.9),
    "union": ControlNetParams(name="union", scale=1.0, mode=3),
}
KINDS = {"edges": ControlNetModel, "union": ControlNetUnionModel}
# float32 on the CPU: fused projections, another memory layout and eager attention sum in
# another order (measured: at most 3e-5, on latents up to 27 in size); a ControlNet left out
# moves them by more than 1.0 (test_controlnet_parity).
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def controlnet_dir(tmp_path_factory: pytest.TempPathFactory, tiny_pair: tuple[Path, Path]) -> Path:
    return save_controlnets(tmp_path_factory.mktemp("controlnets"), tiny_pair[0])


@pytest.fixture(scope="module")
def load(tiny_settings_factory: Any, controlnet_dir: Path) -> Any:
    return lambda **settings: Engine.load(
        EngineConfig.of(tiny_settings_factory(controlnet_dir=controlnet_dir, **settings))
    )


@pytest.fixture(scope="module")
def plain(load: Any) -> Engine:
    return load()


@pytest.fixture(scope="module")
def fast(load: Any) -> Engine:
    return load(channels_last=True, fuse_qkv=True)


def render(engine: Engine, name: str) -> torch.Tensor:
    p = params(RenderKind.TEXT_TO_IMAGE, RefinerMode.ENSEMBLE, UNITS[name])
    with torch.inference_mode():
        return ours_latents(engine, p, tasks(p))


def attention_layers(model: Any) -> list[Any]:
    return [module for module in model.modules() if isinstance(module, Attention)]


@pytest.mark.parametrize("name", sorted(UNITS))
def test_channels_last_and_fused_qkv_controlnet_renders_the_same(
    plain: Engine, fast: Engine, name: str
) -> None:
    model = controlnet(fast, name)
    assert type(model) is KINDS[name]
    assert model.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert set(map(type, model.attn_processors.values())) == {FusedAttnProcessor2_0}
    layers = attention_layers(model)
    assert layers and all(
        hasattr(layer, "to_kv" if layer.is_cross_attention else "to_qkv") for layer in layers
    )
    unoptimised = controlnet(plain, name)
    assert not unoptimised.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert set(map(type, unoptimised.attn_processors.values())) == {AttnProcessor2_0}
    assert not any(hasattr(layer, "to_qkv") for layer in attention_layers(unoptimised))

    torch.testing.assert_close(render(fast, name), render(plain, name), rtol=0, atol=TOLERANCE)


def test_eager_attention_controlnet_renders_the_same_and_compile_waits_for_a_gpu(
    plain: Engine, load: Any, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="sdxl_service.engine.optimisations"):
        eager = load(attention="eager", compile=True)
        model = controlnet(eager, "edges")
    assert set(map(type, model.attn_processors.values())) == {AttnProcessor}
    # SDXL_COMPILE on the CPU: the warning at start, and again as the ControlNet loads.
    assert model._compiled_call_impl is None
    assert sum("not compiling" in record.message for record in caplog.records) == 2

    torch.testing.assert_close(
        render(eager, "edges"), render(plain, "edges"), rtol=0, atol=TOLERANCE
    )


def test_a_failed_optimisation_leaves_nothing_loaded_and_the_next_batch_loads_again(
    tiny_settings_factory: Any, controlnet_dir: Path, plain: Engine
) -> None:
    config = EngineConfig.of(tiny_settings_factory(channels_last=True))
    optimise = partial(optimise_module, config=config, device="cpu", dtype=torch.float32)
    seen: list[Any] = []

    def out_of_memory_once(model: Any) -> None:
        seen.append(model)
        if len(seen) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory (as a full GPU would say)")
        optimise(model)

    models = ControlNetModels(
        controlnet_dir, device="cpu", dtype=torch.float32, capacity=3, optimise=out_of_memory_once
    )
    with pytest.raises(torch.OutOfMemoryError):
        models.models(["edges"], plain.base.unet)
    assert models.loaded() == []
    assert {parameter.device.type for parameter in seen[0].parameters()} == {"meta"}

    model = models.models(["edges"], plain.base.unet)[0].model
    assert model is seen[1]
    assert model.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert models.loaded() == ["edges"]


# Tracing 9 graphs: 40 to 55 s on the 2 shared cores of the dev machine.
@pytest.mark.slow
def test_compiled_controlnet_batches_stay_within_the_recompile_limit(
    load: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SDXL_COMPILE's dynamo settings hold the graphs that ControlNet batches add: the UNets and
    ControlNets share one compiled frame, and with fullgraph=True one graph past the limit is
    an error. A backend that only counts stands in for inductor (minutes on 2 cores): the
    guards, and so the graphs, are dynamo's whatever the backend."""
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 8)  # torch's default
    optimisations._configure_compiler()
    engine = load(channels_last=True)
    counter = CompileCounter()
    # The base alone (the refiner adds graphs of its own, not needed to pass 8).
    for module in (engine.base.unet, controlnet(engine, "edges"), controlnet(engine, "depth")):
        module.compile(backend=counter, fullgraph=True)
    edges, depth = UNITS["edges"], ControlNetParams(name="depth")
    try:
        for units, images in (((), 2), ((edges,), 2), ((edges,), 1), ((edges, depth), 2)):
            p = params(RenderKind.TEXT_TO_IMAGE, RefinerMode.NONE, *units)
            with torch.inference_mode():
                ours_latents(engine, p, tasks(p)[:images])
    finally:
        torch._dynamo.reset()
    # Past torch's default of 8: the last batch would have failed with it.
    assert 8 < counter.frame_count <= RECOMPILE_LIMIT


def test_controlnets_compile_without_cuda_graphs_and_keep_the_rest_of_the_mode() -> None:
    # Two units of one ControlNet call one compiled function twice before their outputs are
    # summed: a CUDA graph's replay would reuse the first call's output memory.
    assert optimisations.without_cuda_graphs("max-autotune") == "max-autotune-no-cudagraphs"
    assert optimisations.without_cuda_graphs("reduce-overhead") == "default"
    assert optimisations.without_cuda_graphs("default") == "default"
