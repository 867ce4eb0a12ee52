"""Images uploaded to edits and variations: decoding, checks, and the mask.

The helpers raise ValueError with a reason a client can act on;
`decode_edit_source` raises `InvalidUpload`, which names the parameter too (the
serving layer turns it into the 400). Runs in the HTTP service, off the event
loop (decoding a large photo takes a while).
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError

# A 48-megapixel phone photo fits; a small file that claims more pixels would
# take gigabytes once decoded (PIL's own bomb check starts at 89 M).
MAX_UPLOAD_PIXELS = 50_000_000
# OpenAI: pixels with alpha 0 are repainted. Soft brush edges count by which
# side of half-transparent they are on, as diffusers binarizes masks at 0.5.
REPAINT_BELOW_ALPHA = 128
# Transparent parts of an image edited without a mask are flattened onto white.
FLATTEN_BACKGROUND = (255, 255, 255)


# The first bytes of the formats accepted: a file that starts otherwise is
# refused before it is read into memory or handed to a decoder.
_SIGNATURES = (
    b"\x89PNG\r\n\x1a\n",
    b"\xff\xd8\xff",  # JPEG
    b"GIF87a",
    b"GIF89a",
    b"BM",
    b"II*\x00",  # TIFF, little-endian
    b"MM\x00*",  # TIFF, big-endian
)
SIGNATURE_BYTES = 16
ACCEPTED_FORMATS = "PNG, JPEG, WEBP, GIF, BMP or TIFF"


def looks_like_image(head: bytes) -> bool:
    """Whether a file starting with `head` can be one of the accepted formats."""
    is_webp = head[:4] == b"RIFF" and head[8:12] == b"WEBP"
    return is_webp or head.startswith(_SIGNATURES)


class InvalidUpload(ValueError):
    """An uploaded file that cannot be used, and the form field it came in."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class EditSource:
    """The uploaded picture of an edit or variation, and the region to repaint."""

    image: Image.Image  # RGB, as uploaded
    mask: Image.Image | None = None  # L, 255 where the picture is repainted


def decode_edit_source(image_data: bytes, mask_data: bytes | None) -> EditSource:
    """The picture (flattened to RGB) and its repaint mask; InvalidUpload names the bad one."""
    try:
        picture = open_image(image_data)
    except ValueError as exc:
        raise InvalidUpload("image", f"Invalid image: {exc}.") from None
    mask = None
    if mask_data is not None:
        try:
            mask = repaint_mask(open_image(mask_data), picture.size)
        except ValueError as exc:
            raise InvalidUpload("mask", f"Invalid mask: {exc}.") from None
    return EditSource(to_rgb(picture), mask)


def open_image(data: bytes) -> Image.Image:
    """Decodes an uploaded image (PNG, JPEG, WEBP, ...: whatever Pillow reads).

    The first frame of an animation; EXIF orientation applied, so a phone
    photo is edited the way up it is shown.
    """
    if not data:
        raise ValueError("the file is empty")
    too_large = f"the image has more than the {MAX_UPLOAD_PIXELS} pixels accepted"
    # Corrupt files make Pillow raise all sorts (OSError, SyntaxError,
    # struct.error, EOFError, ValueError ...): all mean the same here.
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ValueError(too_large) from None
    except UnidentifiedImageError:
        raise ValueError("not an image this server can read (PNG, JPEG, WEBP, ...)") from None
    except Exception as exc:
        raise ValueError(f"not an image this server can read ({exc})") from None
    if image.width * image.height > MAX_UPLOAD_PIXELS:
        raise ValueError(f"{too_large} ({image.width}x{image.height})")
    try:
        image.load()
        return ImageOps.exif_transpose(image)
    except Exception as exc:
        raise ValueError(f"not an image this server can read ({exc})") from None


def has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info


def to_rgb(image: Image.Image) -> Image.Image:
    if not has_alpha(image):
        return image.convert("RGB")
    background = Image.new("RGBA", image.size, (*FLATTEN_BACKGROUND, 255))
    return Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")


def repaint_mask(mask: Image.Image, image_size: tuple[int, int]) -> Image.Image:
    """OpenAI mask (transparent = repaint) -> L image, 255 where the image is repainted."""
    if mask.size != image_size:
        raise ValueError(
            f"the mask is {mask.width}x{mask.height} but the image is "
            f"{image_size[0]}x{image_size[1]}; they must be the same size"
        )
    if not has_alpha(mask):
        raise ValueError(
            "the mask has no alpha channel; its fully transparent pixels (alpha 0) mark "
            "the region to repaint, so it must be a PNG with transparency"
        )
    alpha = mask.convert("RGBA").getchannel("A")
    repaint = alpha.point(lambda value: 255 if value < REPAINT_BELOW_ALPHA else 0)
    if repaint.getextrema() == (0, 0):
        raise ValueError(
            "the mask has no transparent pixels, so there is nothing to repaint; "
            "make the region to edit fully transparent"
        )
    return repaint
