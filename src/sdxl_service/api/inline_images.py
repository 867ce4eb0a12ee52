"""Pictures given inside a JSON request (a ControlNet's control image, an IP-Adapter's
images): base64 or a `data:` URL, decoded as an upload is (api/uploads.py).

Never a URL to fetch: a server that fetches what a client names can be made to reach its own
network (server-side request forgery), so any `scheme://` is refused before anything is read.
InvalidUpload names the parameter (`controlnets[0].image`, `ip_adapters[1].images[2]`).
"""

from __future__ import annotations

import base64
import binascii
import re

from PIL import Image

from .uploads import InvalidUpload, open_image, to_rgb

# `data:[<mediatype>][;base64],<data>`; only base64 payloads carry pictures in practice.
_DATA_URL = re.compile(r"^data:(?P<type>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^,;]*)*?);base64,", re.I)
_FETCHABLE = re.compile(r"^[a-z][a-z0-9+.-]*://", re.I)


def inline_image_bytes(value: str, param: str) -> bytes:
    """The file bytes of a base64 string or `data:...;base64,` URL; InvalidUpload otherwise."""
    text = value.strip()
    if not text:
        raise InvalidUpload(param, f"Invalid '{param}': empty; give base64 or a data: URL.")
    if _FETCHABLE.match(text):
        raise InvalidUpload(
            param,
            f"Invalid '{param}': URLs are not fetched; give the picture as base64 or a "
            "data: URL (data:image/png;base64,...).",
        )
    if text[:5].lower() == "data:":
        match = _DATA_URL.match(text)
        if match is None:
            raise InvalidUpload(
                param, f"Invalid '{param}': a data: URL must be base64 (data:image/png;base64,...)."
            )
        text = text[match.end() :]
    try:
        # Whitespace (line-wrapped base64) is dropped; any other non-alphabet byte refuses.
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidUpload(param, f"Invalid '{param}': not valid base64.") from None


def decode_inline_image(value: str, param: str) -> Image.Image:
    """The RGB picture a base64 string or data: URL holds (EXIF orientation applied)."""
    data = inline_image_bytes(value, param)
    try:
        return to_rgb(open_image(data))
    except ValueError as exc:
        raise InvalidUpload(param, f"Invalid '{param}': {exc}.") from None
