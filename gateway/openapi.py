"""`/openapi.json`, generated from the route table and the pydantic models the handlers validate with."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from common.protocol import RequestLimits
from gateway.config import GatewayConfig
from gateway.routes import Reply, Route

REF = "#/components/schemas/{model}"
_PARAM = re.compile(r"{(\w+)}")
_PARAM_SCHEMAS: dict[str, dict[str, Any]] = {
    "job_id": {"type": "string", "description": "the id returned when the job was submitted"},
    "index": {"type": "integer", "minimum": 0, "description": "the image's position, from 0"},
}


def build_openapi(routes: Iterable[Route], config: GatewayConfig | None = None) -> dict[str, Any]:
    """An OpenAPI 3.1 document for `routes`, as a gateway with `config` serves them: its field bounds and,
    when it has API keys, the bearer scheme on the routes that need one."""
    config = config or GatewayConfig()
    routes = tuple(routes)
    refs, definitions = models_json_schema(_models(routes), ref_template=REF)
    schemas = definitions.get("$defs", {})
    _apply_limits(schemas, config.limits)
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        operation = _operation(route, refs)
        if config.auth_enabled and route.access.kind is not None:
            public = route.access.public and config.public_demo
            operation["security"] = [{"bearerAuth": []}, *([{}] if public else [])]
        paths.setdefault(route.path, {})[route.method.lower()] = operation
    components: dict[str, Any] = {"schemas": schemas}
    if config.auth_enabled:
        components["securitySchemes"] = {
            "bearerAuth": {"type": "http", "scheme": "bearer", "description": "an API key (`sdxl-serve keys new`)"}
        }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "sdxl-serve",
            "version": _version(),
            "description": "SDXL text-to-image serving: a job API, server-sent progress events and an "
            "OpenAI-compatible Images endpoint.",
        },
        "paths": paths,
        "components": components,
    }


def _apply_limits(schemas: dict[str, Any], limits: RequestLimits) -> None:
    """The gateway's own bounds (within the protocol's, which the models state) on every request body: each
    keyword the limits tighten, where the field's schema states it."""
    bounds = limits.schema_bounds()
    for schema in schemas.values():
        for name, keywords in bounds.items():
            field = schema.get("properties", {}).get(name, {})
            if keywords.keys() <= field.keys():
                field.update(keywords)


Refs = Mapping[tuple[Any, JsonSchemaMode], Any]


def _models(routes: tuple[Route, ...]) -> list[tuple[type[BaseModel], JsonSchemaMode]]:
    found: dict[tuple[type[BaseModel], JsonSchemaMode], None] = {}
    for route in routes:
        if route.body is not None:
            found[(route.body, "validation")] = None
        for reply in route.replies.values():
            for model in (reply.model, *reply.one_of):
                if model is not None:
                    found[(model, "serialization")] = None
        if route.errors:
            found[(route.error_model, "serialization")] = None
    return list(found)


def _operation(route: Route, refs: Refs) -> dict[str, Any]:
    operation: dict[str, Any] = {
        "summary": route.summary,
        "operationId": f"{route.method.lower()}_{route.handler.__name__}",
        "tags": [route.tag],
        "responses": {str(status): _response(reply, refs) for status, reply in route.replies.items()},
    }
    parameters = [
        {"name": name, "in": "path", "required": True, "schema": _PARAM_SCHEMAS[name]}
        for name in _PARAM.findall(route.path)
    ]
    parameters += [
        {
            "name": name,
            "in": "header",
            "required": False,
            "description": text,
            "schema": {"type": "string", "minLength": 1, "maxLength": 255},
        }
        for name, text in route.headers.items()
    ]
    if parameters:
        operation["parameters"] = parameters
    if route.body is not None:
        operation["requestBody"] = _request_body(route, refs)
    error = {"schema": refs[(route.error_model, "serialization")]} if route.errors else None
    for status, text in route.errors.items():
        operation["responses"][str(status)] = {"description": text, "content": {"application/json": error}}
    return operation


def _request_body(route: Route, refs: Refs) -> dict[str, Any]:
    """JSON; on a route that takes input images, also multipart: the same fields as form fields, the images as files."""
    assert route.body is not None
    schema = refs[(route.body, "validation")]
    content: dict[str, Any] = {"application/json": {"schema": schema}}
    if route.access.images:
        files = {name: {"contentType": "image/png, image/jpeg, image/webp"} for name in ("image", "mask")}
        content["multipart/form-data"] = {"schema": schema, "encoding": files}
    return {"required": True, "content": content}


def _response(reply: Reply, refs: Refs) -> dict[str, Any]:
    if not reply.media_types:  # a redirect: no body
        return {"description": reply.description}
    if reply.model is not None:
        schema: dict[str, Any] = refs[(reply.model, "serialization")]
    elif reply.one_of:
        schema = {"oneOf": [refs[(m, "serialization")] for m in reply.one_of]}
    elif reply.media_types[0].startswith("image/"):
        schema = {"type": "string", "format": "binary"}
    elif reply.media_types[0] == "application/json":
        schema = {"type": "object"}
    else:
        schema = {"type": "string"}
    return {"description": reply.description, "content": {media: {"schema": schema} for media in reply.media_types}}


def _version() -> str:
    try:
        return version("sdxl-serve")
    except PackageNotFoundError:
        return "0+unknown"
