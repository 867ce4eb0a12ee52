"""How an image was made, in AUTOMATIC1111's infotext format, and where it goes in the file.

The text is what A1111 writes to a PNG's `parameters` chunk (and to EXIF UserComment in
JPEG and WebP), so that its "PNG Info" tab, ComfyUI's import and the many tools that
read that format get the prompt, the seed and the settings back:

    a red fox in the snow
    Negative prompt: blurry
    Steps: 30, Sampler: Euler, CFG scale: 5.0, Seed: 7, Size: 1024x1024, Model: ..., Version: ...

Values with a comma, a colon or a newline are quoted as A1111 quotes them (JSON strings).
The chunk is written into the PNG that OpenCV encoded (OpenCV writes no text chunks, and
re-encoding with Pillow would cost ~3x the encode, api/encoding.py).
"""

from __future__ import annotations

import functools
import json
import struct
import zlib
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import PurePath

from PIL import Image

from ..choices import SAMPLERS as SAMPLER_TABLE
from ..choices import (
    HiresUpscaler,
    RefinerMode,
    RenderKind,
    SchedulerName,
    ScheduleType,
    sampler_names,
)
from ..contract.render_request import RenderRequest
from ..generation_params import infotext_fields

PNG_KEY = "parameters"
# AUTOMATIC1111's names of its upscalers.
HIRES_UPSCALERS = {HiresUpscaler.LATENT: "Latent", HiresUpscaler.LANCZOS: "Lanczos"}
# A1111's sampler names and schedule types: the table the request's `scheduler` reads too.
SAMPLERS = SAMPLER_TABLE
_EXIF_IFD = 0x8769
_USER_COMMENT = 0x9286


@functools.cache
def service_version() -> str:
    # Once per process: reading the installed metadata costs a directory scan.
    try:
        return f"sdxl-service {metadata.version('sdxl-service')}"
    except metadata.PackageNotFoundError:  # the bento copies src/ without installing it
        return "sdxl-service"


@dataclass(frozen=True, kw_only=True)
class ControlNetUnitText:
    """One ControlNet unit as sd-webui-controlnet's infotext writes it (`serialize_unit`):
    `ControlNet 0: "Module: canny, Model: edges, Weight: 1, Resize Mode: Crop and Resize, ..."`.
    Its hidden sliders (a `none` module's resolution and thresholds, -1 there) are left out
    as it leaves them out; the model is named without A1111's ` [hash]`."""

    module: str
    model: str
    weight: float
    guidance_start: float
    guidance_end: float
    processor_res: int | None = None
    threshold_a: float | None = None
    threshold_b: float | None = None
    # The extension's "Hr Option" of a render with the hires fix ("Both": the unit acts in
    # both passes); None without it, where the field is left out as before.
    hr_option: str | None = None

    def text(self) -> str:
        fields: dict[str, object] = {
            "Module": self.module,
            "Model": self.model,
            "Weight": f"{self.weight:g}",
            "Resize Mode": "Crop and Resize",
            "Low Vram": False,
        }
        if self.processor_res is not None:
            fields["Processor Res"] = self.processor_res
        if self.threshold_a is not None:
            fields["Threshold A"] = f"{self.threshold_a:g}"
        if self.threshold_b is not None:
            fields["Threshold B"] = f"{self.threshold_b:g}"
        fields |= {
            "Guidance Start": f"{self.guidance_start:g}",
            "Guidance End": f"{self.guidance_end:g}",
            # The map is made at the render size (api/control_maps.py); diffusers has no
            # guess mode here: the extension's Pixel Perfect and Balanced.
            "Pixel Perfect": True,
            "Control Mode": "Balanced",
        }
        if self.hr_option is not None:
            fields["Hr Option"] = self.hr_option
        return ", ".join(f"{key}: {value}" for key, value in fields.items())


@dataclass(frozen=True)
class Provenance:
    """What an image's infotext says beyond its job: the models, LoRA and embedding hashes,
    the version."""

    base_model: str
    refiner_model: str
    lora_hashes: dict[str, str] = field(default_factory=dict)
    # Each IP-Adapter's ControlNet-extension module by name (ip_adapter_units).
    ip_adapter_modules: dict[str, str] = field(default_factory=dict)
    # The textual-inversion embeddings the prompts name, by name: their short hashes.
    ti_hashes: dict[str, str] = field(default_factory=dict)
    version: str = field(default_factory=service_version)
    controlnets: tuple[ControlNetUnitText, ...] = ()
    # A masked edit's options (api/inpaint_options.py): its mask blur, and the padding of
    # "Only masked" (None: the whole picture was inpainted).
    mask_blur: int | None = None
    masked_area_padding: int | None = None


def quote(value: object) -> str:
    """A1111's `quote`: as is, unless a comma, colon or newline would break the line."""
    text = str(value)
    if not any(mark in text for mark in ",:\n"):
        return text
    return json.dumps(text, ensure_ascii=False)


def exact(number: float) -> str:
    """`number` short where that reads back as the same float (0.5), else in full."""
    short = f"{number:g}"
    return short if float(short) == number else repr(number)


def model_name(source: str) -> str:
    """A checkpoint's name as A1111 shows it: the file or folder name, no weights extension
    (a hub id keeps its dots: stable-diffusion-xl-base-1.0)."""
    name = PurePath(source.rstrip("/")).name or source
    for extension in (".safetensors", ".ckpt"):
        name = name.removesuffix(extension)
    return name


def infotext(
    job: RenderRequest, provenance: Provenance, *, seed: int, width: int, height: int
) -> str:
    """The infotext of one image of `job` (its own seed, the answered size)."""
    params = job.params
    sampler, schedule = sampler_names(
        SchedulerName(params.scheduler), ScheduleType(params.schedule_type)
    )
    fields: dict[str, object] = {"Steps": params.num_inference_steps, "Sampler": sampler}
    if schedule:
        fields["Schedule type"] = schedule
    final = width, height
    if params.hires is not None:
        # AUTOMATIC1111's Size is the first pass's; "Hires upscale" takes it to the final.
        width, height = params.hires.first_width, params.hires.first_height
    fields |= {
        "CFG scale": params.guidance_scale,
        "Seed": seed,
        "Size": f"{width}x{height}",
        "Model": model_name(provenance.base_model),
    }
    # The parameters whose declaration names an A1111 label (generation_params.py).
    fields |= infotext_fields(params)
    if params.kind is not RenderKind.TEXT_TO_IMAGE:
        fields["Denoising strength"] = params.strength
    if params.hires is not None:
        fields["Denoising strength"] = params.hires.denoising_strength
        fields["Hires upscale"] = params.hires.scale
        fields["Hires steps"] = params.hires.steps
        # The first pass is the final size over the scale, rounded to 8: several final sizes
        # share one, so a final size the scale does not make again is written, as A1111 writes
        # a hires fix asked by its size.
        scale = params.hires.scale
        if final != (round(width * scale / 8) * 8, round(height * scale / 8) * 8):
            fields["Hires resize"] = f"{final[0]}x{final[1]}"
        # An upscaler model by its name, as AUTOMATIC1111 writes its models'.
        fields["Hires upscaler"] = (
            params.hires.upscaler_model or HIRES_UPSCALERS[params.hires.upscaler]
        )
    if provenance.mask_blur is not None:
        fields["Mask blur"] = provenance.mask_blur
    if provenance.masked_area_padding is not None:
        fields["Inpaint area"] = "Only masked"
        fields["Masked area padding"] = provenance.masked_area_padding
    if params.refiner is not RefinerMode.NONE:
        fields["Refiner"] = model_name(provenance.refiner_model)
        fields["Refiner switch at"] = params.high_noise_frac
    for index, unit in enumerate(provenance.controlnets):
        fields[f"ControlNet {index}"] = unit.text()
    # After the ControlNet units, numbered on from them, as the extension numbers its units.
    fields |= ip_adapter_units(job, provenance, first=len(provenance.controlnets))
    if provenance.lora_hashes:
        hashes = provenance.lora_hashes.items()
        fields["Lora hashes"] = ", ".join(f"{name}: {digest}" for name, digest in hashes)
    if provenance.ti_hashes:
        # As A1111's sd_hijack_clip writes them: the prompt's first, then the negative's.
        hashes = provenance.ti_hashes.items()
        fields["TI hashes"] = ", ".join(f"{name}: {digest}" for name, digest in hashes)
    fields["Version"] = provenance.version
    # A1111's prompt holds its LoRAs as `<lora:name:weight>` tags: the request's LoRAs (its
    # tags were taken out of job.prompt) go back there, so the text alone asks for them again.
    tags = [f"<lora:{lora.name}:{exact(lora.scale)}>" for lora in params.loras]
    lines = [" ".join(part for part in (job.prompt, *tags) if part)]
    if job.negative_prompt:
        lines.append(f"Negative prompt: {job.negative_prompt}")
    lines.append(", ".join(f"{key}: {quote(value)}" for key, value in fields.items()))
    return "\n".join(lines)


# The fields of a unit the ControlNet extension writes (ControlNetUnit.infotext_fields), with
# the values an IP-Adapter unit has: the picture fitted as "Crop and Resize", no thresholds.
_UNIT_DEFAULTS = (
    ("Resize Mode", "Crop and Resize"),
    ("Processor Res", "512"),
    ("Threshold A", "0.5"),
    ("Threshold B", "0.5"),
    ("Guidance Start", "0.0"),
    ("Guidance End", "1.0"),
    ("Pixel Perfect", "False"),
    ("Control Mode", "Balanced"),
)


def ip_adapter_units(job: RenderRequest, provenance: Provenance, *, first: int) -> dict[str, str]:
    """Each IP-Adapter as AUTOMATIC1111's ControlNet extension writes an IP-Adapter unit:
    `ControlNet <i>: "Module: ip-adapter_clip_g, Model: <name>, Weight: 0.6, ..."`, numbered
    from `first` (after the request's ControlNet units)."""
    units = {}
    for index, adapter in enumerate(job.params.ip_adapters, start=first):
        module = provenance.ip_adapter_modules.get(adapter.name, "ip-adapter_clip_g")
        values = [("Module", module), ("Model", adapter.name), ("Weight", str(adapter.scale))]
        text = ", ".join(f"{key}: {value}" for key, value in [*values, *_UNIT_DEFAULTS])
        units[f"ControlNet {index}"] = text
    return units


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_with_text(png: bytes, text: str, key: str = PNG_KEY) -> bytes:
    """`png` with a text chunk after its header: tEXt when Latin-1 holds it, else iTXt
    (UTF-8), as Pillow's PngInfo.add_text chooses (and so A1111's files)."""
    if not png.startswith(b"\x89PNG\r\n\x1a\n") or png[12:16] != b"IHDR":
        raise ValueError("not a PNG that starts with its IHDR chunk")
    header_end = 8 + 8 + struct.unpack(">I", png[8:12])[0] + 4
    try:
        chunk = _png_chunk(b"tEXt", key.encode("latin-1") + b"\0" + text.encode("latin-1"))
    except UnicodeEncodeError:
        data = key.encode("latin-1") + b"\0\0\0\0\0" + text.encode("utf-8")
        chunk = _png_chunk(b"iTXt", data)
    return png[:header_end] + chunk + png[header_end:]


def exif_with_text(text: str) -> bytes:
    """EXIF holding `text` as UserComment, in the UNICODE form A1111 writes (piexif's
    `UserComment.dump(text, encoding="unicode")`: UTF-16, big-endian)."""
    exif = Image.Exif()
    exif.get_ifd(_EXIF_IFD)[_USER_COMMENT] = b"UNICODE\0" + text.encode("utf-16-be")
    return exif.tobytes()
