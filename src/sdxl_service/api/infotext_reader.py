"""An image's AUTOMATIC1111 infotext read back: from the file, into its fields, into a request.

What A1111's "PNG Info" tab does (modules/images.py `read_info_from_image`,
modules/infotext_utils.py `parse_generation_parameters`), for `POST /v1/images/infotext`:

- the text is a PNG's `parameters` chunk, else EXIF UserComment (JPEG, WebP: the 8-byte
  character-code prefix piexif reads, UTF-16 big-endian for A1111's own "UNICODE"; any other
  prefix as UTF-8, as A1111 falls back), else a GIF's comment;
- its last line holds the `key: value` pairs when it yields at least three, values in double
  quotes being JSON strings; the lines before are the prompt, from `Negative prompt:` on the
  negative prompt;
- the fields become a body for `POST /v1/images/generations` by this service's names (A1111's
  sampler and schedule type names by choices.py's table, the hires fix, the refiner, the
  model when this server has it); the fields it has no equivalent for are listed, not dropped.

Pillow only, no torch: it runs in the HTTP process, off the event loop.
"""

from __future__ import annotations

import io
import json
import re
import warnings
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ValidationError

from ..choices import (
    SAMPLERS,
    SCHEDULE_TYPES,
    RefinerMode,
    SchedulerName,
    ScheduleType,
    schedule_type_of,
    scheduler_of,
)
from .infotext import HIRES_UPSCALERS, PNG_KEY
from .schemas import ImageGenerationRequest
from .uploads import MAX_UPLOAD_PIXELS

# A1111's `re_param`, with the key bounded (no label of A1111 or its extensions is near 64
# characters) and without its leading `\s*`: both cost time quadratic in the line's length on
# a line of spaces or of one long word (a second per 20 KB); the pairs found are the same.
RE_PARAM = re.compile(r'(\w[\w \-/]{0,63}):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
RE_SIZE = re.compile(r"^(\d+)x(\d+)$")
_EXIF_IFD = 0x8769
_USER_COMMENT = 0x9286
# EXIF UserComment's character codes (its first 8 bytes), as piexif.helper.UserComment reads.
_USER_COMMENT_CODES = {
    b"ASCII\0\0\0": "ascii",
    b"JIS\0\0\0\0\0": "shift_jis",
    b"UNICODE\0": "utf-16-be",
}
# Fields that say what was used but need nothing in a request: the prompt names its LoRAs
# (`<lora:name:w>`) and embeddings itself; hashes and versions are for finding the files.
INFORMATIONAL = frozenset({"Version", "Model hash", "Lora hashes", "TI hashes", "Refiner"})


def read_infotext(data: bytes) -> str | None:
    """The infotext of an image file (None: it has none); ValueError when it is no image
    Pillow reads."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ValueError(
            f"the image has more than the {MAX_UPLOAD_PIXELS} pixels accepted"
        ) from None
    except UnidentifiedImageError:
        raise ValueError("not an image this server can read (PNG, JPEG, WEBP, ...)") from None
    except Exception as exc:  # Pillow raises all sorts for a corrupt file (uploads.py)
        raise ValueError(f"not an image this server can read ({exc})") from None
    with image:
        if image.width * image.height > MAX_UPLOAD_PIXELS:
            raise ValueError(f"the image has more than the {MAX_UPLOAD_PIXELS} pixels accepted")
        text = _text_of(image)
        if text is None and image.format == "PNG":
            # Text chunks after the pixels are read only with them.
            try:
                image.load()
            except Exception as exc:
                raise ValueError(f"not an image this server can read ({exc})") from None
            text = _text_of(image)
    return text


def _text_of(image: Image.Image) -> str | None:
    found = image.info.get(PNG_KEY)
    if isinstance(found, str):
        return found
    try:
        comment = image.getexif().get_ifd(_EXIF_IFD).get(_USER_COMMENT)
    except Exception:  # a broken EXIF block is no infotext, as A1111 takes it
        comment = None
    if isinstance(comment, str):
        return comment or None
    if isinstance(comment, bytes) and comment:
        encoding = _USER_COMMENT_CODES.get(comment[:8])
        if encoding is None:
            return comment.decode("utf-8", errors="ignore") or None
        return comment[8:].decode(encoding, errors="replace") or None
    gif_comment = image.info.get("comment")
    if isinstance(gif_comment, bytes) and gif_comment:
        return gif_comment.decode("utf-8", errors="replace")
    return None


def parse_infotext(text: str) -> dict[str, str]:
    """`parse_generation_parameters`' reading: `Prompt`, `Negative prompt`, then each key of
    the last line as written (quoted values unquoted; no defaults added, `Size` not split)."""
    *lines, last = text.strip().split("\n")
    if len(RE_PARAM.findall(last)) < 3:
        lines.append(last)
        last = ""
    prompt: list[str] = []
    negative: list[str] = []
    in_negative = False
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[16:].strip()
        (negative if in_negative else prompt).append(line)
    found = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for key, value in RE_PARAM.findall(last):
        found[key] = _unquote(value)
    return found


def _unquote(value: str) -> str:
    """A1111's `unquote`: a value in double quotes is a JSON string; kept as written when
    it is not one."""
    if len(value) < 2 or value[0] != '"' or value[-1] != '"':
        return value
    try:
        return str(json.loads(value))
    except ValueError:
        return value


@dataclass(frozen=True)
class Catalogue:
    """What this server can render with, by the names an infotext's `Model` gives."""

    # The default model as the infotext names it (infotext.model_name of its source).
    default_model: str
    # The models of SDXL_MODELS_DIR, by their names.
    models: Collection[str] = ()
    # The upscaler models of SDXL_UPSCALER_DIR, by their names (a hires fix's upscaler).
    upscalers: Collection[str] = ()


class InfotextAnswer(BaseModel):
    """POST /images/infotext's answer."""

    infotext: str | None
    parameters: dict[str, str]
    request: dict[str, Any]
    unused: list[str]


def infotext_answer(data: bytes, catalogue: Catalogue) -> InfotextAnswer:
    """The infotext of an image file, its fields, the generation request they make and the
    fields left out of it; ValueError when it is no image."""
    text = read_infotext(data)
    if text is None or not text.strip():
        return InfotextAnswer(infotext=text, parameters={}, request={}, unused=[])
    parameters = parse_infotext(text)
    request, unused = generation_request(parameters, catalogue)
    return InfotextAnswer(infotext=text, parameters=parameters, request=request, unused=unused)


def generation_request(
    parameters: dict[str, str], catalogue: Catalogue
) -> tuple[dict[str, Any], list[str]]:
    """A body for POST /images/generations from an infotext's fields, and the fields (their
    A1111 labels) it has nothing for, in the infotext's order."""
    request: dict[str, Any] = {"prompt": parameters.get("Prompt", "")}
    used = {"Prompt", "Negative prompt", *INFORMATIONAL}
    if parameters.get("Negative prompt"):
        request["negative_prompt"] = parameters["Negative prompt"]
    simple: dict[str, tuple[str, Callable[[str], Any]]] = {
        "Steps": ("num_inference_steps", int),
        "CFG scale": ("guidance_scale", float),
        "Seed": ("seed", int),
        "Clip skip": ("clip_skip", int),
    }
    for label, (name, convert) in simple.items():
        if label in parameters:
            try:
                request[name] = convert(parameters[label])
                used.add(label)
            except ValueError:
                pass
    used |= _scheduler(parameters, request)
    used |= _size_and_hires(parameters, request, catalogue)
    used |= _refiner(parameters, request)
    model = parameters.get("Model")
    if model is not None and (model == catalogue.default_model or model in catalogue.models):
        used.add("Model")
        if model != catalogue.default_model:
            request["model"] = model
    unused = [label for label in parameters if label not in used]
    # A value the request refuses (Steps: 500) is left out too, its label listed.
    for name, label in _refused(request):
        request.pop(name, None)
        unused.append(label)
    return request, unused


def _scheduler(parameters: dict[str, str], request: dict[str, Any]) -> set[str]:
    """`scheduler` (and `schedule_type` where no scheduler has it as its own) from A1111's
    Sampler and Schedule type."""
    if "Sampler" not in parameters:
        return set()
    scheduler = scheduler_of(parameters["Sampler"])
    if not isinstance(scheduler, SchedulerName):
        return set()
    used = {"Sampler"}
    label = parameters.get("Schedule type", "Automatic")
    schedule = schedule_type_of(label)
    sampler, own = SAMPLERS[scheduler]
    if isinstance(schedule, ScheduleType) and schedule not in (ScheduleType.AUTOMATIC, own):
        # "DPM++ 2M" + "Karras" is dpmpp_2m_karras, a scheduler of its own.
        named = [name for name, pair in SAMPLERS.items() if pair == (sampler, schedule)]
        if named:
            scheduler = named[0]
        elif schedule in SCHEDULE_TYPES[scheduler]:
            request["schedule_type"] = schedule.value
        else:
            schedule = None
    if isinstance(schedule, ScheduleType):
        used.add("Schedule type")
    request["scheduler"] = scheduler.value
    return used


def _size_and_hires(
    parameters: dict[str, str], request: dict[str, Any], catalogue: Catalogue
) -> set[str]:
    """`size`, and the hires fix: A1111's Size is the first pass's, `Hires upscale` (or
    `Hires resize`) takes it to the answer's."""
    size = RE_SIZE.match(parameters.get("Size", ""))
    if size is None:
        return set()
    width, height = int(size[1]), int(size[2])
    used = {"Size"}
    resize = RE_SIZE.match(parameters.get("Hires resize", ""))
    hires: dict[str, Any] = {}
    final: tuple[int, int] = (width, height)
    try:
        if resize is not None and int(resize[1]) and width:
            final = int(resize[1]), int(resize[2])
            hires["scale"] = float(parameters.get("Hires upscale", final[0] / width))
            used |= {"Hires resize", "Hires upscale"}
        elif "Hires upscale" in parameters:
            hires["scale"] = float(parameters["Hires upscale"])
            # Sizes here are multiples of 8; the service's first pass is the answer's size
            # over the scale, rounded to 8, so this is the size that makes `Size` again.
            scale = hires["scale"]
            final = (round(width * scale / 8) * 8, round(height * scale / 8) * 8)
            used.add("Hires upscale")
        if hires:
            steps = int(parameters.get("Hires steps", "0"))
            if steps:
                hires["steps"] = steps
            used.add("Hires steps")
            if "Denoising strength" in parameters:
                hires["denoising_strength"] = float(parameters["Denoising strength"])
                used.add("Denoising strength")
            # Latent, Lanczos, or an upscaler model this server has; another (A1111's
            # "Latent (nearest-exact)", "R-ESRGAN 4x+" without its file) is listed unused and
            # the hires fix takes this server's default.
            upscaler = parameters.get("Hires upscaler")
            by_name = {name: kind.value for kind, name in HIRES_UPSCALERS.items()}
            if upscaler in by_name:
                hires["upscaler"] = by_name[upscaler]
                used.add("Hires upscaler")
            elif upscaler in catalogue.upscalers:
                hires["upscaler"] = upscaler
                used.add("Hires upscaler")
    except ValueError:
        return used
    if hires:
        request["hires"] = hires
    request["size"] = f"{final[0]}x{final[1]}"
    return used


def _refiner(parameters: dict[str, str], request: dict[str, Any]) -> set[str]:
    """A1111's refiner switches models part way through the steps: this service's ensemble,
    `Refiner switch at` its high_noise_frac. No `Refiner`: none was used."""
    if "Refiner" not in parameters:
        request["refiner"] = RefinerMode.NONE.value
        return set()
    request["refiner"] = RefinerMode.ENSEMBLE.value
    try:
        request["high_noise_frac"] = float(parameters["Refiner switch at"])
    except (KeyError, ValueError):
        return set()
    return {"Refiner switch at"}


# Each request field built above and the A1111 label it came from.
_LABELS = {
    "num_inference_steps": "Steps",
    "guidance_scale": "CFG scale",
    "seed": "Seed",
    "clip_skip": "Clip skip",
    "scheduler": "Sampler",
    "schedule_type": "Schedule type",
    "size": "Size",
    "hires": "Hires upscale",
    "high_noise_frac": "Refiner switch at",
    "model": "Model",
}


def _refused(request: dict[str, Any]) -> list[tuple[str, str]]:
    """The request's fields the generation schema refuses (the prompt aside: an empty one is
    the client's to fill), by name and A1111 label."""
    try:
        ImageGenerationRequest.model_validate(request)
    except ValidationError as exc:
        names = {str(error["loc"][0]) for error in exc.errors() if error["loc"]}
        return [(name, _LABELS[name]) for name in sorted(names) if name in _LABELS]
    return []
