"""AUTOMATIC1111's inpainting options: the mask blurred, and "Only masked" (crop, paste back).

A masked edit may blur its mask (`mask_blur`, A1111's "Mask blur") and render only the
mask's region (`inpaint_area` "only_masked", A1111's "Inpaint area: Only masked", with
`inpaint_padding`, its "Masked area padding"): the mask's bounding box grown by the padding
and widened to the render size's aspect ratio is cropped from the picture, rendered at the
full render size, then scaled back and pasted in.

diffusers has both (`VaeImageProcessor.blur`, and the inpaint pipeline's `padding_mask_crop`:
`get_crop_region`, `preprocess(..., crops_coords, resize_mode="fill")`, `apply_overlay`);
they run here, in the HTTP process, with PIL, as diffusers runs them, so the render worker
renders a plain inpaint at the render size and each request of a batch has its own region.
The functions below marked `Copied from` are diffusers 0.42.1's, which the HTTP process
cannot import (it imports torch); tests/unit/api/test_inpaint_options.py checks them
against diffusers' own on the same inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image, ImageFilter, ImageOps

InpaintArea = Literal["whole", "only_masked"]
# A1111's defaults for its UI (mask blur 4 there); a request without the fields keeps today's
# pixels: no blur, the whole picture.
DEFAULT_PADDING = 32
# diffusers' VaeImageProcessor resamples with Lanczos (its `resample` default).
RESAMPLE = Image.Resampling.LANCZOS

Region = tuple[int, int, int, int]  # left, top, right, bottom


@dataclass(frozen=True)
class InpaintOptions:
    """A masked edit's options: the mask's blur radius (0: none) and, for "Only masked",
    the padding around the mask's region (None: the whole picture)."""

    mask_blur: int = 0
    padding: int | None = None


@dataclass(frozen=True)
class InpaintInput:
    """What a masked edit renders: the picture and mask at the render size, and where the
    rendered image goes back (None: over the whole picture)."""

    picture: Image.Image
    mask: Image.Image
    region: Region | None = None


def blur(mask: Image.Image, radius: int) -> Image.Image:
    """diffusers' `VaeImageProcessor.blur`: PIL's Gaussian blur, `radius` its sigma."""
    if radius == 0:
        return mask
    return mask.filter(ImageFilter.GaussianBlur(radius))


def only_masked(
    picture: Image.Image, mask: Image.Image, width: int, height: int, padding: int
) -> InpaintInput | None:
    """The region of `mask` (blurred already) as the inpaint pipeline renders it with
    `padding_mask_crop=padding` at `width` x `height`; None when the mask is blank (A1111
    then inpaints the whole picture)."""
    if mask.getbbox() is None:
        return None
    region = crop_region(mask, width, height, padding)
    cropped = resize_and_fill(picture.crop(region), width, height)
    # The mask processor converts to grayscale after the fill (which makes an RGB image).
    cropped_mask = resize_and_fill(mask.crop(region), width, height).convert("L")
    return InpaintInput(cropped, cropped_mask, region)


def paste_back(
    mask: Image.Image, picture: Image.Image, image: Image.Image, region: Region | None
) -> Image.Image:
    """The rendered `image` over the kept `picture` through `mask`: the pixels diffusers'
    `apply_overlay` gives, in less time. A mask of 0 and 255 alone over the whole picture
    (every edit without `mask_blur` or "Only masked") is the plain composite (1024x1024:
    3 ms, not 19). "Only masked" blends within its region alone: outside it the mask is 0
    (the region holds every masked pixel), where the overlay gives the picture's pixels
    exactly (a 2048x2048 picture: ~20 ms, not 240)."""
    if region is None:
        if not any(mask.histogram()[1:255]):
            return Image.composite(image, picture, mask)
        return apply_overlay(mask, picture, image)
    left, top, right, bottom = region
    fitted = resize_and_crop(image, right - left, bottom - top)
    pasted = picture.convert("RGB")
    pasted.paste(apply_overlay(mask.crop(region), picture.crop(region), fitted), (left, top))
    return pasted


# Copied from diffusers.image_processor.VaeImageProcessor.get_crop_region (the masked rows and
# columns found with numpy, not a Python loop over them: the same bounds)
def crop_region(mask_image: Image.Image, width: int, height: int, pad: int = 0) -> Region:
    """The rectangle holding every masked pixel, grown by `pad` and widened to the aspect
    ratio of `width` x `height` (within the image)."""
    mask = np.asarray(mask_image.convert("L"))
    h, w = mask.shape
    columns = np.flatnonzero(mask.any(axis=0))
    rows = np.flatnonzero(mask.any(axis=1))
    crop_left, crop_right = int(columns[0]), w - 1 - int(columns[-1])
    crop_top, crop_bottom = int(rows[0]), h - 1 - int(rows[-1])

    x1, y1, x2, y2 = (
        int(max(crop_left - pad, 0)),
        int(max(crop_top - pad, 0)),
        int(min(w - crop_right + pad, w)),
        int(min(h - crop_bottom + pad, h)),
    )

    ratio_crop_region = (x2 - x1) / (y2 - y1)
    ratio_processing = width / height

    if ratio_crop_region > ratio_processing:
        desired_height = (x2 - x1) / ratio_processing
        desired_height_diff = int(desired_height - (y2 - y1))
        y1 -= desired_height_diff // 2
        y2 += desired_height_diff - desired_height_diff // 2
        if y2 >= mask_image.height:
            diff = y2 - mask_image.height
            y2 -= diff
            y1 -= diff
        if y1 < 0:
            y2 -= y1
            y1 -= y1
        if y2 >= mask_image.height:
            y2 = mask_image.height
    else:
        desired_width = (y2 - y1) * ratio_processing
        desired_width_diff = int(desired_width - (x2 - x1))
        x1 -= desired_width_diff // 2
        x2 += desired_width_diff - desired_width_diff // 2
        if x2 >= mask_image.width:
            diff = x2 - mask_image.width
            x2 -= diff
            x1 -= diff
        if x1 < 0:
            x2 -= x1
            x1 -= x1
        if x2 >= mask_image.width:
            x2 = mask_image.width

    return x1, y1, x2, y2


# Copied from diffusers.image_processor.VaeImageProcessor._resize_and_fill
def resize_and_fill(image: Image.Image, width: int, height: int) -> Image.Image:
    """`image` fitted inside `width` x `height` (aspect ratio kept), centred, the sides it
    leaves filled by stretching its edge rows or columns."""
    ratio = width / height
    src_ratio = image.width / image.height

    src_w = width if ratio < src_ratio else image.width * height // image.height
    src_h = height if ratio >= src_ratio else image.height * width // image.width

    resized = image.resize((src_w, src_h), resample=RESAMPLE)
    res = Image.new("RGB", (width, height))
    res.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))

    if ratio < src_ratio:
        fill_height = height // 2 - src_h // 2
        if fill_height > 0:
            res.paste(resized.resize((width, fill_height), box=(0, 0, width, 0)), box=(0, 0))
            res.paste(
                resized.resize(
                    (width, fill_height), box=(0, resized.height, width, resized.height)
                ),
                box=(0, fill_height + src_h),
            )
    elif ratio > src_ratio:
        fill_width = width // 2 - src_w // 2
        if fill_width > 0:
            res.paste(resized.resize((fill_width, height), box=(0, 0, 0, height)), box=(0, 0))
            res.paste(
                resized.resize((fill_width, height), box=(resized.width, 0, resized.width, height)),
                box=(fill_width + src_w, 0),
            )

    return res


# Copied from diffusers.image_processor.VaeImageProcessor._resize_and_crop
def resize_and_crop(image: Image.Image, width: int, height: int) -> Image.Image:
    """`image` covering `width` x `height` (aspect ratio kept), centred, the excess cut."""
    ratio = width / height
    src_ratio = image.width / image.height

    src_w = width if ratio > src_ratio else image.width * height // image.height
    src_h = height if ratio <= src_ratio else image.height * width // image.width

    resized = image.resize((src_w, src_h), resample=RESAMPLE)
    res = Image.new("RGB", (width, height))
    res.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    return res


# Copied from diffusers.image_processor.VaeImageProcessor.apply_overlay
def apply_overlay(
    mask: Image.Image,
    init_image: Image.Image,
    image: Image.Image,
    crop_coords: Region | None = None,
) -> Image.Image:
    """`image` (at `init_image`'s size, or rendered for the region `crop_coords`) where
    `mask` repaints, `init_image` where it keeps; a grey mask blends the two. With a mask of
    0 and 255 alone it equals `Image.composite(image, init_image, mask)`."""
    width, height = init_image.width, init_image.height

    init_image_masked = Image.new("RGBa", (width, height))
    init_image_masked.paste(
        init_image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L"))
    )

    init_image_masked = init_image_masked.convert("RGBA")

    if crop_coords is not None:
        x, y, x2, y2 = crop_coords
        w = x2 - x
        h = y2 - y
        base_image = Image.new("RGBA", (width, height))
        image = resize_and_crop(image, w, h)
        base_image.paste(image, (x, y))
        image = base_image.convert("RGB")

    image = image.convert("RGBA")
    image.alpha_composite(init_image_masked)
    return image.convert("RGB")
