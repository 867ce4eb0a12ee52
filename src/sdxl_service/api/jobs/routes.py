"""The /v1/images/jobs routes: a submission's body read, everything else in serving.py.

A generation is submitted as JSON (the body of POST /images/generations), the multipart
kinds of request_kinds.py (edit, variation, upscale) as the form of their own endpoint with
`kind` set; `webhook_url` and `metadata` go beside the other fields (submissions.py).
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
from ..request_kinds import KINDS, RequestKind
from ..responses import public_base_url
from ..schemas import ImageRequest
from .answers import ImageJob, ImageJobDeleted, ImageJobList
from .serving import DEFAULT_PAGE, JobsServing, JobSubmission
from .submissions import SUBMISSIONS, job_fields, openapi_request_body

JOBS_PATH = "/images/jobs"
# The submission's models (submissions.py) in the OpenAPI document: the body is read by hand,
# JSON or multipart as its kind says, so FastAPI cannot see it from a parameter.
SUBMISSION_BODY, SUBMISSION_SCHEMAS = openapi_request_body()


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


def _kind(value: Any, *, form: bool) -> RequestKind:
    accepted = [name for name, kind in KINDS.items() if kind.multipart == form]
    if value is None and not form and len(accepted) == 1:
        value = accepted[0]
    if value not in accepted:
        how = "multipart" if form else "JSON"
        raise invalid_value(
            "kind",
            f"A {how} job's kind is one of {', '.join(accepted)}; got '{excerpt(str(value))}'"
            + (" (a generation is sent as JSON)." if form else " (edits are sent as multipart)."),
        )
    return KINDS[value]


async def _submission(request: Request, jobs: JobsServing) -> JobSubmission:
    base_url = public_base_url(request, jobs.settings)
    api_key = _api_key(request)
    content_type = request.headers.get("content-type", "")
    if content_type.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        picked: list[RequestKind] = []

        def pick(form: FormData) -> tuple[type[ImageRequest], bool]:
            kind = _kind(form.get("kind"), form=True)
            picked.append(kind)
            return SUBMISSIONS[kind.name], kind.takes_mask

        form = await read_form(request, pick)
        webhook_url, metadata = job_fields(form.fields)
        return JobSubmission(
            kind=picked[0].name,
            request=form.fields,
            image=form.image,
            mask=form.mask,
            webhook_url=webhook_url,
            metadata=metadata,
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
    try:
        req = SUBMISSIONS[kind.name].model_validate(body)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from None
    webhook_url, metadata = job_fields(req)
    return JobSubmission(
        kind=kind.name,
        request=req,
        webhook_url=webhook_url,
        metadata=metadata,
        base_url=base_url,
        api_key=api_key,
    )


def _answer(body: dict[str, Any]) -> JSONResponse:
    return JSONResponse(body)


# The answers go out as serving.py makes them (JSONResponse); each route's response_model
# (answers.py) describes them in the OpenAPI document, and the tests hold real answers to it.
router = APIRouter()


@router.post(
    JOBS_PATH,
    status_code=202,
    response_model=ImageJob,
    openapi_extra={"requestBody": SUBMISSION_BODY},
)
async def create_job(request: Request, jobs: Jobs) -> JSONResponse:
    submission = await _submission(request, jobs)
    job = await jobs.submit(submission)
    # Absolute, as the client sees /v1 (behind proxies too): where to poll.
    location = f"{submission.base_url}{JOBS_PATH}/{job['id']}"
    return JSONResponse(job, status_code=202, headers={"Location": location})


@router.get(JOBS_PATH, response_model=ImageJobList)
async def list_jobs(
    request: Request,
    jobs: Jobs,
    after: str | None = None,
    limit: Annotated[int, Query()] = DEFAULT_PAGE,
) -> JSONResponse:
    return JSONResponse(await jobs.list(_api_key(request), after, limit))


@router.get(JOBS_PATH + "/{job_id}", response_model=ImageJob)
async def get_job(job_id: str, request: Request, jobs: Jobs) -> JSONResponse:
    return _answer(await jobs.get(job_id, _api_key(request)))


@router.post(JOBS_PATH + "/{job_id}/cancel", response_model=ImageJob)
async def cancel_job(job_id: str, request: Request, jobs: Jobs) -> JSONResponse:
    return _answer(await jobs.cancel(job_id, _api_key(request)))


@router.delete(JOBS_PATH + "/{job_id}", response_model=ImageJobDeleted)
async def delete_job(job_id: str, request: Request, jobs: Jobs) -> JSONResponse:
    return JSONResponse(await jobs.delete(job_id, _api_key(request)))
