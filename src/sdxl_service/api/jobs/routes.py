"""The /v1/images/jobs routes: a submission's body read, everything else in serving.py.

A generation is submitted as JSON (the body of POST /images/generations), an
edit or a variation as multipart with `kind` set to `edit` or `variation` (the
form of its own endpoint); `webhook_url` and `metadata` go beside the other
fields (in a form, `metadata` is a JSON text field).
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.datastructures import FormData

from ..errors import APIError, excerpt, invalid_value
from ..forms import read_form
from ..responses import public_base_url
from ..schemas import ImageEditRequest, ImageGenerationRequest, ImageRequest, ImageVariationRequest
from .records import JobKind
from .serving import (
    DEFAULT_PAGE,
    MAX_METADATA_KEY_CHARS,
    MAX_METADATA_PAIRS,
    MAX_METADATA_VALUE_CHARS,
    JobsServing,
    JobSubmission,
)

JOBS_PATH = "/images/jobs"
_FORM_KINDS: dict[str, tuple[type[ImageRequest], bool]] = {
    JobKind.EDIT.value: (ImageEditRequest, True),
    JobKind.VARIATION.value: (ImageVariationRequest, False),
}


async def _jobs(request: Request) -> JobsServing:
    # async, as app.py's _serving: not a thread hand-off per request.
    get_jobs = getattr(request.app.state, "get_jobs", None)
    jobs = get_jobs() if get_jobs is not None else None
    if jobs is None:
        raise APIError(404, "Image jobs are not enabled on this server.", code="not_found")
    return jobs  # type: ignore[no-any-return]


Jobs = Annotated[JobsServing, Depends(_jobs)]


def _api_key(request: Request) -> str | None:
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    return key.strip() or None if scheme.lower() == "bearer" else None


def _metadata(value: Any) -> dict[str, str] | None:
    if value is None:
        return None
    if isinstance(value, str):
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
                f"metadata keys are at most {MAX_METADATA_KEY_CHARS} characters and its values "
                f"strings; '{excerpt(key)}' is not.",
            )
        if len(item) > MAX_METADATA_VALUE_CHARS:
            raise invalid_value(
                "metadata", f"metadata values are at most {MAX_METADATA_VALUE_CHARS} characters."
            )
    return value


def _webhook_url(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value or None
    raise invalid_value("webhook_url", "webhook_url must be a URL (a string).")


def _kind(value: Any, *, form: bool) -> JobKind:
    accepted = ("edit", "variation") if form else ("generation",)
    if value is None:
        value = "generation" if not form else None
    if value not in accepted:
        how = "multipart" if form else "JSON"
        raise invalid_value(
            "kind",
            f"A {how} job's kind is one of {', '.join(accepted)}; got '{excerpt(str(value))}'"
            + (" (a generation is sent as JSON)." if form else " (edits are sent as multipart)."),
        )
    return JobKind(value)


async def _submission(request: Request, jobs: JobsServing) -> JobSubmission:
    base_url = public_base_url(request, jobs.settings)
    api_key = _api_key(request)
    content_type = request.headers.get("content-type", "")
    if content_type.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        seen: dict[str, Any] = {}

        def pick(form: FormData) -> tuple[type[ImageRequest], bool]:
            seen.update({key: form.get(key) for key in ("kind", "webhook_url", "metadata")})
            return _FORM_KINDS[_kind(form.get("kind"), form=True).value]

        form = await read_form(request, pick)
        return JobSubmission(
            kind=JobKind(seen["kind"]),
            request=form.fields,
            image=form.image,
            mask=form.mask,
            webhook_url=_webhook_url(seen["webhook_url"]),
            metadata=_metadata(seen["metadata"]),
            base_url=base_url,
            api_key=api_key,
        )
    try:
        body = json.loads(await request.body())
    except ValueError:
        raise APIError(400, "The request body is not valid JSON.", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, "The request body must be a JSON object.", code="invalid_request_body")
    kind = _kind(body.get("kind"), form=False)
    webhook_url = _webhook_url(body.get("webhook_url"))
    metadata = _metadata(body.get("metadata"))
    fields = {
        key: value for key, value in body.items() if key not in ("kind", "webhook_url", "metadata")
    }
    try:
        req = ImageGenerationRequest.model_validate(fields)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from None
    return JobSubmission(
        kind=kind,
        request=req,
        webhook_url=webhook_url,
        metadata=metadata,
        base_url=base_url,
        api_key=api_key,
    )


def _answer(body: dict[str, Any]) -> JSONResponse:
    return JSONResponse(body)


router = APIRouter()


@router.post(JOBS_PATH, status_code=202)
async def create_job(request: Request, jobs: Jobs) -> JSONResponse:
    submission = await _submission(request, jobs)
    job = await jobs.submit(submission)
    # Absolute, as the client sees /v1 (behind proxies too): where to poll.
    location = f"{submission.base_url}{JOBS_PATH}/{job['id']}"
    return JSONResponse(job, status_code=202, headers={"Location": location})


@router.get(JOBS_PATH)
async def list_jobs(
    request: Request,
    jobs: Jobs,
    after: str | None = None,
    limit: Annotated[int, Query()] = DEFAULT_PAGE,
) -> JSONResponse:
    return JSONResponse(await jobs.list(_api_key(request), after, limit))


@router.get(JOBS_PATH + "/{job_id}")
async def get_job(job_id: str, request: Request, jobs: Jobs) -> JSONResponse:
    return _answer(await jobs.get(job_id, _api_key(request)))


@router.post(JOBS_PATH + "/{job_id}/cancel")
async def cancel_job(job_id: str, request: Request, jobs: Jobs) -> JSONResponse:
    return _answer(await jobs.cancel(job_id, _api_key(request)))


@router.delete(JOBS_PATH + "/{job_id}")
async def delete_job(job_id: str, request: Request, jobs: Jobs) -> JSONResponse:
    return JSONResponse(await jobs.delete(job_id, _api_key(request)))
