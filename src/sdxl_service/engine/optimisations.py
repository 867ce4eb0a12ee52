"""The speed-ups the settings switch on: attention, VAE dtype, memory format, fused QKV, compile.

They cover the modules a step runs: the base's and refiner's UNets (and each SDXL_MODELS_DIR
model's as it loads), the VAE, and each ControlNet as it loads (it runs beside the UNet at
every step of a ControlNet render, about half the UNet's cost).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from ..choices import Attention
from .config import EngineConfig
from .devices import (
    cast_module,
    dtype_name,
    give_back_freed_host_memory,
    is_cuda,
    resolve_vae_dtype,
)

logger = logging.getLogger(__name__)

COMPILE_MODE = "max-autotune"


def apply_optimisations(
    base: Any,
    refiner: Any,
    config: EngineConfig,
    *,
    device: str,
    dtype: torch.dtype,
    force_compile: bool = False,
    compile_mode: str = COMPILE_MODE,
) -> dict[str, Any]:
    """Switch on the optimisations `settings` asks for; return what is on.

    The one place the service and the GPU bench configure the models. Call it
    once, on unoptimised pipelines already on `device`.
    """
    return optimise_modules(
        [base.unet, refiner.unet],
        base.vae,
        config,
        device=device,
        dtype=dtype,
        force_compile=force_compile,
        compile_mode=compile_mode,
    )


def optimise_module(
    module: Any,
    config: EngineConfig,
    *,
    device: str,
    dtype: torch.dtype,
    force_compile: bool = False,
    compile_mode: str = COMPILE_MODE,
) -> dict[str, Any]:
    """optimise_modules over one more module run at every step, as it loads: a ControlNet
    (the attention layers and convolutions of a UNet's down and middle blocks), compiled
    without CUDA graphs (`without_cuda_graphs`)."""
    return optimise_modules(
        [module],
        None,
        config,
        device=device,
        dtype=dtype,
        force_compile=force_compile,
        compile_mode=without_cuda_graphs(compile_mode),
    )


def without_cuda_graphs(compile_mode: str) -> str:
    """`compile_mode` less its CUDA graphs. diffusers' MultiControlNetModel calls one compiled
    ControlNet once per unit and sums their outputs after the last call; a CUDA graph's replay
    reuses its output memory (torch's docs on `cudagraph_mark_step_begin`), so two units of one
    model would meet the second's residuals where the first's were (or torch's error for it).
    Not yet checked on a GPU: this keeps the kernels' tuning and drops only the graphs."""
    return {"max-autotune": "max-autotune-no-cudagraphs", "reduce-overhead": "default"}.get(
        compile_mode, compile_mode
    )


def optimise_modules(
    unets: list[Any],
    vae: Any | None,
    config: EngineConfig,
    *,
    device: str,
    dtype: torch.dtype,
    force_compile: bool = False,
    compile_mode: str = COMPILE_MODE,
) -> dict[str, Any]:
    """apply_optimisations over these UNets and this VAE: also a model of SDXL_MODELS_DIR's own
    UNet (and VAE, None when it shares the default's), as it loads, and a ControlNet
    (`optimise_module`), which takes what a UNet does."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    applied: dict[str, Any] = {}
    modules = [*unets] if vae is None else [*unets, vae]

    processor_class = AttnProcessor2_0 if config.attention == Attention.SDPA else AttnProcessor
    for module in modules:
        module.set_attn_processor(processor_class())
    applied["attention"] = str(config.attention)

    if vae is not None:
        vae_dtype = resolve_vae_dtype(config, dtype, vae)
        if vae.dtype != vae_dtype:
            cast_module(vae, vae_dtype)
        applied["vae_dtype"] = dtype_name(vae_dtype)

    if config.channels_last:
        for module in modules:
            module.to(memory_format=torch.channels_last)
    applied["channels_last"] = config.channels_last

    if config.fuse_qkv:
        if config.attention == Attention.EAGER:
            logger.warning(
                "fuse_qkv runs the fused projections through SDPA; attention=eager ignored"
            )
            applied["attention"] = "sdpa"
        # Module by module: the VAE is shared, and pipeline.fuse_qkv_projections
        # on both pipelines would fuse it twice.
        for module in modules:
            _fuse_qkv(module)
    applied["fuse_qkv"] = config.fuse_qkv
    # The weights the steps above replaced (cast, laid out again, fused).
    give_back_freed_host_memory()

    compiled = False
    if config.compile:
        if is_cuda(device) or force_compile:
            _configure_compiler()
            # In place (`Module.compile`), so the pipelines keep their own module
            # types and configs.
            for unet in unets:
                unet.compile(mode=compile_mode, fullgraph=True)
            if vae is not None:
                vae.decoder.compile(mode=compile_mode, fullgraph=True)
            compiled = True
        else:
            logger.warning("SDXL_COMPILE is on but the device is %s: not compiling", device)
    applied["compile"] = compile_mode if compiled else False
    return applied


def _fuse_qkv(module: Any) -> None:
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention import AttentionMixin

    if type(module).fuse_qkv_projections is AttentionMixin.fuse_qkv_projections:
        # ControlNetModel and ControlNetUnionModel (diffusers 0.42.1) have only the mixin's,
        # which fuses the newer `AttentionModuleMixin` layers and leaves their
        # `attention_processor.Attention` ones as they are, without a word. The UNet's own
        # (the VAE's is a marked copy of it) fuses those and sets the fused processor; a
        # ControlNet has the attributes it reads (attn_processors, set_attn_processor).
        UNet2DConditionModel.fuse_qkv_projections(module)
    else:
        module.fuse_qkv_projections()


# Graphs dynamo may keep for one compiled frame. The UNets' and ControlNetModels' forward are
# one frame (diffusers' `apply_lora_scale` wrapper), so torch's default of 8 counts all their
# graphs together, and with fullgraph=True the 9th is an error (FailOnRecompileLimitHit), not
# a fallback to eager: measured (tiny preset, a counting backend), the last of the batches
# no unit, one ControlNet, it with 1 image, it and another failed. A graph per input
# signature: each UNet without and with ControlNet residuals, each ControlNet with its scale
# non-zero and zero (outside its guidance window), each edit layout, each first and then
# dynamic shape; 20 in a sequence of 3 sizes, 2 batch sizes, text-to-image and
# image-to-image, 3 ControlNets (docs/PERFORMANCE.md).
RECOMPILE_LIMIT = 64


def _configure_compiler() -> None:
    import torch._dynamo.config as dynamo_config

    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, RECOMPILE_LIMIT)
    # The inductor settings diffusers' "accelerate inference of text-to-image
    # diffusion models" guide uses for SDXL. Coordinate-descent tuning lengthens
    # the (already minutes-long) max-autotune compile; not measured here yet.
    import torch._inductor.config as inductor_config

    inductor_config.conv_1x1_as_mm = True
    inductor_config.coordinate_descent_tuning = True
    inductor_config.epilogue_fusion = False
    inductor_config.coordinate_descent_check_all_directions = True
