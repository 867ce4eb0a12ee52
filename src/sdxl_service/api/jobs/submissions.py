"""What POST /v1/images/jobs takes, one pydantic model per kind of request (request_kinds.py):
the kind's own request model and the job's fields (`kind`, `webhook_url`, `metadata`).

A generation comes as JSON, the multipart kinds (edit, variation, upscale) as the form of their
own endpoint with `kind` set; `metadata` is then a JSON text field. The models validate the
submission and describe it in the OpenAPI document (`openapi_request_body`), so a schema-driven
client or fuzzer sees every field.
"""

from __future__ import annotations

import json
from typing import Any, Literal, cast

from pydantic import BaseModel, Field, create_model, field_validator

from ..errors import excerpt, invalid_value
from ..request_kinds import KINDS, RequestKind
from ..schemas import ImageRequest

# OpenAI's bounds on `metadata` (batches, vector stores, ...).
MAX_METADATA_PAIRS = 16
MAX_METADATA_KEY_CHARS = 64
MAX_METADATA_VALUE_CHARS = 512
MAX_URL_CHARS = 2048
# Fields of a submission that are the job's, not the render's.
JOB_FIELDS = ("kind", "webhook_url", "metadata")


class JobFields(BaseModel):
    """The job's own fields beside the request's. Their checks raise the API's 400 naming the
    field (an APIError passes through pydantic unchanged)."""

    webhook_url: str | None = Field(
        default=None,
        max_length=MAX_URL_CHARS,
        description="Where the job's end is posted (Standard Webhooks); needs SDXL_WEBHOOK_SECRET.",
    )
    metadata: dict[str, str] | None = Field(
        default=None,
        description=f"Up to {MAX_METADATA_PAIRS} string pairs, kept with the job and answered.",
    )

    @field_validator("webhook_url", mode="before")
    @classmethod
    def _webhook_url(cls, value: Any) -> Any:
        if value is None or isinstance(value, str):
            return value or None
        raise invalid_value("webhook_url", "webhook_url must be a URL (a string).")

    @field_validator("metadata", mode="before")
    @classmethod
    def _metadata(cls, value: Any) -> Any:
        if value is None:
            return None
        if isinstance(value, str):  # a form's text field
            try:
                value = json.loads(value)
            except ValueError:
                raise invalid_value("metadata", "metadata must be a JSON object.") from None
        if not isinstance(value, dict):
            raise invalid_value("metadata", "metadata must be an object of string values.")
        if len(value) > MAX_METADATA_PAIRS:
            raise invalid_value("metadata", f"metadata holds at most {MAX_METADATA_PAIRS} pairs.")
        for key, item in value.items():
            if len(key) > MAX_METADATA_KEY_CHARS or not isinstance(item, str):
                raise invalid_value(
                    "metadata",
                    f"metadata keys are at most {MAX_METADATA_KEY_CHARS} characters and its "
                    f"values strings; '{excerpt(key)}' is not.",
                )
            if len(item) > MAX_METADATA_VALUE_CHARS:
                raise invalid_value(
                    "metadata",
                    f"metadata values are at most {MAX_METADATA_VALUE_CHARS} characters.",
                )
        return value


def _submission_model(kind: RequestKind) -> type[ImageRequest]:
    # JSON has one kind, so `kind` may be left out there; a form must say which it is.
    default: Any = kind.name if not kind.multipart else ...
    name_type: Any = Literal[kind.name]
    model = create_model(
        f"{kind.name.capitalize()}JobSubmission",
        __base__=(kind.request, JobFields),
        __doc__=f"An image job of kind {kind.name}: POST /v1{kind.path}'s fields and the job's.",
        kind=(name_type, Field(default=default)),
    )
    return cast("type[ImageRequest]", model)


SUBMISSIONS: dict[str, type[ImageRequest]] = {
    name: _submission_model(kind) for name, kind in KINDS.items()
}


def job_fields(submission: ImageRequest) -> tuple[str | None, dict[str, str] | None]:
    """A validated submission's webhook_url and metadata."""
    assert isinstance(submission, JobFields)
    return submission.webhook_url, submission.metadata


def _schema(model: type[BaseModel], *, form: bool) -> dict[str, Any]:
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    if form:
        properties = schema.setdefault("properties", {})
        properties["image"] = {"type": "string", "format": "binary"}
        properties["metadata"] = {"type": "string", "description": "metadata as a JSON object"}
        schema.setdefault("required", []).append("image")
    return schema


def openapi_request_body() -> tuple[dict[str, Any], dict[str, Any]]:
    """The submission's OpenAPI requestBody, and the component schemas it refers to."""
    components: dict[str, Any] = {}
    content: dict[str, Any] = {}
    forms = []
    for name, kind in KINDS.items():
        schema = _schema(SUBMISSIONS[name], form=kind.multipart)
        components.update(schema.pop("$defs", {}))
        components[schema["title"]] = schema
        ref = {"$ref": f"#/components/schemas/{schema['title']}"}
        if kind.multipart:
            forms.append(ref)
        else:
            content["application/json"] = {"schema": ref}
    content["multipart/form-data"] = {"schema": {"oneOf": forms}}
    return {"required": True, "content": content}, components
