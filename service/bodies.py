"""Reading a job-creating POST: a JSON body, or a multipart form with an `image` file and
the other fields as form fields (`sigma_search` as a method name or a JSON object).

Both end in the same pydantic model, so both are validated by the same rules and refused
with the same 422 body. Form values are read as JSON where they parse (`n=1000`,
`memory=true`, `sigma_search={"method":"ddrs"}`) and kept as text otherwise (`model=digits`).
"""

from __future__ import annotations

import json
from typing import Any, TypeVar

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile

from service.errors import APIError, InvalidRequest

M = TypeVar("M", bound=BaseModel)

_TEXT_FIELDS = frozenset({"model", "bound"})
_MAX_FIELD_BYTES = 64 * 1024


def validate(model: type[M], data: Any) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(include_url=False, include_input=False)) from None


def parse_json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except RecursionError:
        raise InvalidRequest("the JSON body is nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise InvalidRequest(f"the body is not valid JSON: {exc}") from None


def _form_value(key: str, raw: str) -> Any:
    if key in _TEXT_FIELDS or (key == "sigma_search" and not raw.lstrip().startswith("{")):
        return raw
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        return raw  # the model's validation names the field and what it expects


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def read_job_body(request: Request, json_model: type[M], form_model: type[BaseModel],
                        file_field: str = "image") -> tuple[BaseModel, bytes | None]:
    """(validated request, uploaded file bytes or None): `json_model` for a JSON body (with
    its input), `form_model` for a multipart form (its `file_field` file is the input)."""
    media = _media_type(request)
    if media == "application/json" or media.endswith("+json"):
        return validate(json_model, parse_json(await request.body())), None
    if media != "multipart/form-data":
        raise APIError(415, "unsupported_media_type",
                       f"send application/json, or multipart/form-data with an '{file_field}' file")
    form = await request.form(max_files=1, max_fields=32, max_part_size=_MAX_FIELD_BYTES)
    try:
        fields: dict[str, Any] = {}
        upload: bytes | None = None
        for key, value in form.multi_items():
            if key in fields or (key == file_field and upload is not None):
                raise InvalidRequest(f"{key}: given more than once")
            if key == file_field:
                if not isinstance(value, UploadFile):
                    raise InvalidRequest(f"{file_field}: must be a file part")
                upload = await value.read()
            elif isinstance(value, UploadFile):
                raise InvalidRequest(f"{key}: must be a form field, not a file")
            else:
                fields[key] = _form_value(key, value)
    finally:
        await form.close()
    params = validate(form_model, fields)
    if upload is None:
        raise InvalidRequest(f"{file_field}: a multipart request needs a file part named '{file_field}'")
    return params, upload


def request_body_doc(json_model: type[BaseModel], form_model: type[BaseModel],
                     file_field: str = "image") -> dict[str, Any]:
    """`openapi_extra` documenting both bodies of a route that reads them itself; the
    schemas are added to the components by `service.main`."""
    form = {"allOf": [{"$ref": f"#/components/schemas/{form_model.__name__}"}],
            "properties": {file_field: {"type": "string", "format": "binary"}}}
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"$ref": f"#/components/schemas/{json_model.__name__}"}},
        "multipart/form-data": {"schema": form},
    }}}
