"""Where and in what precision the models run: the `auto` settings resolved, dtypes by name."""

from __future__ import annotations

import ctypes
import gc
import logging
from typing import Any

import torch

from ..choices import DType, Preset
from .config import EngineConfig

logger = logging.getLogger(__name__)


def torch_dtype(dtype: DType) -> torch.dtype:
    """The torch dtype of a setting's DType (settings.py already took the aliases)."""
    if dtype is DType.AUTO:
        raise ValueError("`auto` has no torch dtype: resolve it first")
    return getattr(torch, dtype.value)  # type: ignore[no-any-return]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def cast_module(module: Any, dtype: torch.dtype) -> Any:
    """`module` in `dtype`, in place.

    Not `ModelMixin.to(dtype)`: diffusers 0.42 warns there about float32-only
    submodules even when a model declares none.
    """
    casts = {torch.float32: "float", torch.float16: "half", torch.bfloat16: "bfloat16"}
    if dtype not in casts:
        raise ValueError(f"cannot cast a module to {dtype}")
    return getattr(module, casts[dtype])()


def resolve_preset(config: EngineConfig) -> Preset:
    if config.preset is not Preset.AUTO:
        return Preset(config.preset)
    if torch.cuda.is_available():
        return Preset.SDXL
    logger.warning(
        "!!! No CUDA GPU found: SDXL_PRESET=auto falls back to the TINY preset, a random-weight "
        "SDXL pair whose images are noise. Set SDXL_PRESET=sdxl to load the real models anyway. !!!"
    )
    return Preset.TINY


def resolve_device(config: EngineConfig) -> str:
    if config.device != "auto":
        return config.device
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


# CPU flags (Linux /proc/cpuinfo) of bfloat16 arithmetic in hardware: AVX512-BF16, AMX
# (x86), BF16 (Arm). oneDNN also runs bf16 on plain AVX-512, by conversion: a 2048^2 matmul
# took 0.60 s in bf16 against 0.12 s in float32 on such a CPU (2 cores, AVX-512, no BF16).
_BF16_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}


def cpu_has_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU does bfloat16 arithmetic in hardware."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as file:
                cpuinfo = file.read()
        except OSError:
            return False
    for line in cpuinfo.splitlines():
        name, _, value = line.partition(":")
        if name.strip().lower() in ("flags", "features") and _BF16_FLAGS & set(value.split()):
            return True
    return False


def resolve_dtype(config: EngineConfig, device: str, preset: Preset = Preset.SDXL) -> torch.dtype:
    """`auto`: float16 on CUDA. On a CPU, SDXL itself in bfloat16 where the CPU has bf16
    instructions (half the memory: the float32 pair needs ~23 GiB), else float32 (bf16 by
    conversion runs ~5x slower). The tiny preset (and MPS) in float32, where the stock
    recipes are matched bit for bit."""
    if config.dtype != DType.AUTO:
        return torch_dtype(config.dtype)
    if device.startswith("cuda"):
        return torch.float16
    if device == "cpu" and preset is Preset.SDXL and cpu_has_bf16():
        return torch.bfloat16
    return torch.float32


def resolve_vae_dtype(config: EngineConfig, dtype: torch.dtype, vae: Any) -> torch.dtype:
    """The dtype the VAE decodes in.

    `auto` follows the pipeline dtype, except fp16 with a VAE that declares
    `force_upcast` (the stock SDXL VAE, which overflows to NaN in fp16): that
    one decodes in float32, as diffusers does, but is kept there instead of
    being cast up and down around every decode.
    """
    if config.vae_dtype != DType.AUTO:
        return torch_dtype(config.vae_dtype)
    if dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
        return torch.float32
    return dtype


def is_cuda(device: str | torch.device) -> bool:
    return torch.device(device).type == "cuda"


def synchronize(device: str | torch.device) -> None:
    kind = torch.device(device).type
    if kind == "cuda":
        torch.cuda.synchronize(device)
    elif kind == "mps":
        torch.mps.synchronize()


def give_back_freed_host_memory() -> bool:
    """Returns the free pages of the C heap to the system (glibc's malloc_trim); False where
    there is no glibc.

    Tensors freed after loading (a VAE cast to its dtype, the UNets' and VAE's weights laid
    out again channels-last, a model unloaded) go back to glibc's heap, not to the system:
    each large free raises glibc's threshold for giving memory its own mapping (up to
    32 MiB), so the weights that follow land on the heap, and what is freed there stays
    counted in the process. Channels-last left 0.45 GiB so with the full-size pair on the
    CPU (11.44 against 10.99 GiB held, for 10.67 GiB of weights).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    trim = getattr(libc, "malloc_trim", None)
    if trim is None:
        return False
    trim(0)
    return True


def free_memory(device: str) -> None:
    """What unreferenced tensors held, given back: after an out-of-memory render, a model
    unloaded."""
    gc.collect()
    if is_cuda(device):
        torch.cuda.empty_cache()
    give_back_freed_host_memory()
