"""The render call is written once: service.py's render API takes exactly RenderCall's fields."""

from __future__ import annotations

import json

from pydantic import BaseModel

import service
from sdxl_service.contract.render_call import RENDER_ROUTE, RenderCall
from sdxl_service.contract.render_request import RenderRequest
from tests import jobs


def fields_of(model: type[BaseModel]) -> dict[str, tuple[object, object]]:
    return {
        name: (field.annotation, None if field.is_required() else field.default)
        for name, field in model.model_fields.items()
    }


def test_the_render_api_takes_the_fields_of_a_render_call_on_its_route() -> None:
    api = service.RenderService.apis["render"]
    assert api.route == RENDER_ROUTE
    # BentoML's input model, built from the signature in service.py.
    assert fields_of(api.input_spec) == fields_of(RenderCall)
    assert fields_of(RenderCall) == {"job": (RenderRequest, None), "only_if_idle": (bool, False)}


def test_a_render_call_is_the_json_object_bentoml_reads_as_arguments() -> None:
    job = jobs.make_job("call")
    body = json.loads(RenderCall(job=job, only_if_idle=True).model_dump_json())
    assert set(body) == {"job", "only_if_idle"}
    assert body["only_if_idle"] is True
    assert RenderRequest.model_validate(body["job"]) == job
