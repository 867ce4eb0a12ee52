"""The multipart forms of POST /images/edits and /images/variations.

Read here, not through FastAPI's declared form parameters, because OpenAI
clients send the picture as `image` or `image[]`, which those cannot express.
The routes get plain values: the validated text fields and the file bytes.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager as AsyncContextManager
from dataclasses import dataclass
from typing import Generic, TypeVar

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.datastructures import FormData, UploadFile

from .errors import APIError, invalid_value, missing_parameter
from .schemas import ImageRequest
from .uploads import ACCEPTED_FORMATS, SIGNATURE_BYTES, looks_like_image

# Parts accepted per request: `image` (or `image[]`) and `mask`, with room for
# clients that send more images (refused with a clear 400).
MAX_FORM_FILES = 16
MAX_FORM_FIELDS = 64
# Text fields (the files are bounded by SDXL_MAX_BODY_BYTES): a `controlnets` field carries
# its control images in base64, so as much as a body may hold (the body limit, enforced
# before the form is read, bounds it; the schema bounds each text field's length).
MAX_FIELD_BYTES = 64 * 1024 * 1024
FILE_FIELDS = ("image", "image[]", "mask")
# A form with no file comes url-encoded, or with no body at all: parsed, to
# answer "missing image" rather than "wrong content type".
FORM_CONTENT_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")

# `name[key]`: one member of an object field.
_NESTED_FIELD = re.compile(r"^(?P<name>[a-z_]+)\[(?P<key>[a-z_]+)\]$")

RequestModel = TypeVar("RequestModel", bound=ImageRequest)


@dataclass(frozen=True, kw_only=True)
class ImageForm(Generic[RequestModel]):
    fields: RequestModel
    image: bytes
    mask: bytes | None = None


async def read_image_form(
    request: Request, model: type[RequestModel], *, takes_mask: bool
) -> ImageForm[RequestModel]:
    """The form's fields as `model` and its files; 400s name the parameter."""
    return await read_form(request, lambda _: (model, takes_mask))


async def read_form(
    request: Request, pick: Callable[[FormData], tuple[type[RequestModel], bool]]
) -> ImageForm[RequestModel]:
    """As `read_image_form`, with the model (and whether a mask is read) chosen by
    `pick` from the form itself (an image job's `kind` field)."""
    # The context deletes the form's spooled files on exit.
    async with _form_parts(request) as form:
        model, takes_mask = pick(form)
        fields = _validate_fields(model, form)
        image = await _one_file(form, "image", "image[]")
        mask = await _one_file(form, "mask") if takes_mask and "mask" in form else None
    return ImageForm(fields=fields, image=image, mask=mask)


async def read_image_file(request: Request) -> bytes:
    """The `image` file of a form that takes nothing else (POST /images/infotext)."""
    async with _form_parts(request) as form:
        return await _one_file(form, "image", "image[]")


def _form_parts(request: Request) -> AsyncContextManager[FormData]:
    """The request's form, read within the limits; 400 for a body that is not a form."""
    content_type = request.headers.get("content-type", "")
    if content_type and not content_type.startswith(FORM_CONTENT_TYPES):
        raise APIError(
            400,
            f"POST {request.url.path} takes multipart/form-data, with the image as a file "
            f"part; got content-type '{content_type[:100]}'.",
            code="invalid_content_type",
        )
    return request.form(
        max_files=MAX_FORM_FILES, max_fields=MAX_FORM_FIELDS, max_part_size=MAX_FIELD_BYTES
    )


def _validate_fields(model: type[RequestModel], form: FormData) -> RequestModel:
    """The form's text fields as `model`; errors come out as for JSON bodies."""
    fields: dict[str, object] = {}
    for key, value in form.multi_items():
        if not isinstance(value, str) or key in FILE_FIELDS:
            continue
        nested = _NESTED_FIELD.match(key)
        if nested is None:
            fields[key] = value
            continue
        # An object as the openai client sends one in a form (`outpaint[left]=16`: its
        # extra_body serialized with brackets); a JSON text field of the name wins.
        parent = fields.setdefault(nested["name"], {})
        if isinstance(parent, dict):
            parent[nested["key"]] = value
    try:
        return model.model_validate(fields)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from None


async def _one_file(form: FormData, *names: str) -> bytes:
    """The bytes of the one file sent under any of `names` (`image` or `image[]`)."""
    param = names[0]
    parts = [value for key, value in form.multi_items() if key in names]
    if not parts:
        raise missing_parameter(param)
    if len(parts) > 1:
        raise invalid_value(param, f"One {param} per request, got {len(parts)}.")
    upload = parts[0]
    if not isinstance(upload, UploadFile):
        raise invalid_value(param, f"'{param}' must be a file part (with a filename), not text.")
    head = await upload.read(SIGNATURE_BYTES)
    if not head:
        raise invalid_value(param, f"Invalid {param}: the file is empty.")
    if not looks_like_image(head):
        raise invalid_value(param, f"Invalid {param}: not a {ACCEPTED_FORMATS} image.")
    return head + await upload.read()
