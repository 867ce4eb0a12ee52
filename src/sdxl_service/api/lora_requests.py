"""The LoRAs a request asks for: its `loras` list, AUTOMATIC1111's inline
`<lora:name:scale>` tags in the prompt, and a `model` of `<service>:<name>`.

All three add up (the same name twice sums its scales). The result is a
sorted tuple of `LoraWeight`s, the render's batch key: requests with the same
set share a pipeline call.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from ..contract.render_request import LoraWeight
from ..folder_catalog import is_valid_name
from ..lora_catalog import LoraFile
from .errors import excerpt, invalid_value

MIN_SCALE, MAX_SCALE = -2.0, 2.0
_INLINE = re.compile(r"<lora:([^:>]*)(?::([^>]*))?>", re.IGNORECASE)
_SPACES = re.compile(r"\s+")


def take_inline_loras(prompt: str) -> tuple[str, list[tuple[str, float]]]:
    """The prompt without its `<lora:name:scale>` tags, and those tags.

    Whitespace left by a removed tag is collapsed, so the text encoders see
    exactly what the prompt says without the tags.
    """
    found: list[tuple[str, float]] = []
    for match in _INLINE.finditer(prompt):
        name, scale = match.group(1).strip(), (match.group(2) or "1").strip()
        try:
            found.append((name, float(scale)))
        except ValueError:
            message = f"<lora:{excerpt(name)}:{excerpt(scale)}> has no number for its scale."
            raise invalid_value("prompt", message) from None
    if not found:
        return prompt, []
    return _SPACES.sub(" ", _INLINE.sub(" ", prompt)).strip(), found


def lora_set(
    asked: Iterable[tuple[str, float]], folder: Mapping[str, LoraFile], max_loras: int
) -> tuple[LoraWeight, ...]:
    """The checked, merged, sorted LoRAs of a request; 400 naming `loras` otherwise.
    `folder`: the LoRA folder as the request sees it (read once per request)."""
    scales: dict[str, float] = {}
    for name, scale in asked:
        if not is_valid_name(name):
            raise invalid_value(
                "loras",
                f"'{excerpt(name)}' is not a LoRA name: letters, digits, '.', '_', '+' and '-', "
                "starting with a letter or digit.",
            )
        scales[name] = scales.get(name, 0.0) + scale
    if len(scales) > max_loras:
        raise invalid_value("loras", f"At most {max_loras} LoRAs per request, got {len(scales)}.")
    for name, scale in scales.items():
        if not MIN_SCALE <= scale <= MAX_SCALE:
            raise invalid_value(
                "loras", f"The scale of LoRA '{name}' is {scale:g}; it must be between -2 and 2."
            )
        found = folder.get(name)
        if found is None:
            raise invalid_value(
                "loras",
                f"There is no LoRA '{name}'; GET /v1/models lists the available ones.",
                code="lora_not_found",
            )
        if found.problem is not None:
            raise invalid_value(
                "loras", f"LoRA '{name}' cannot be used: {found.problem}.", code="invalid_lora"
            )
    return tuple(LoraWeight(name=name, scale=scale) for name, scale in sorted(scales.items()))
