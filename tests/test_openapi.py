"""`/openapi.json`: a valid OpenAPI 3.1 document that describes exactly the routes the gateway serves."""

from __future__ import annotations

from typing import Any

from aiohttp.test_utils import TestClient
from openapi_spec_validator import validate

from gateway.routes import ROUTES
from gateway.schemas import GenerateRequest, JobState

Client = TestClient[Any, Any]


async def fetch(client: Client) -> dict[str, Any]:
    response = await client.get("/openapi.json")
    assert response.status == 200 and response.content_type == "application/json"
    document: dict[str, Any] = await response.json()
    return document


async def test_the_document_is_valid_openapi(client: Client) -> None:
    document = await fetch(client)
    validate(document)  # raises on any violation of the OpenAPI 3.1 schema
    assert document["openapi"] == "3.1.0"


async def test_every_served_route_is_documented_and_nothing_else(client: Client) -> None:
    document = await fetch(client)
    documented = {(method.upper(), path) for path, item in document["paths"].items() for method in item}
    app = client.app
    assert app is not None
    served = {
        (route.method, route.resource.canonical)
        for route in app.router.routes()
        if route.resource is not None and not route.resource.canonical.startswith("/static") and route.method != "HEAD"
    }
    assert served == documented
    assert len(ROUTES) == len(documented)


async def test_schemas_are_the_ones_the_code_validates_with(client: Client) -> None:
    document = await fetch(client)
    schemas = document["components"]["schemas"]
    body = document["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/GenerateRequest"}
    expected = GenerateRequest.model_json_schema(ref_template="#/components/schemas/{model}")
    for name, nested in expected.pop("$defs", {}).items():  # nested models (the webhook) are components too
        assert schemas[name] == nested
    assert schemas["GenerateRequest"] == expected
    assert set(schemas["GenerateRequest"]["properties"]) == set(GenerateRequest.model_fields)
    assert "n" in schemas["GenerateRequest"]["properties"]  # images per request
    assert set(schemas["JobState"]["properties"]) == set(JobState.model_fields)
    assert schemas["GenerateRequest"]["additionalProperties"] is False  # unknown fields are refused


async def test_errors_and_headers_are_described(client: Client) -> None:
    post = (await fetch(client))["paths"]["/v1/jobs"]["post"]
    assert {"400", "202", "422", "503"} <= set(post["responses"])
    error = post["responses"]["400"]["content"]["application/json"]["schema"]
    assert error == {"$ref": "#/components/schemas/ErrorResponse"}
    assert [p["name"] for p in post["parameters"]] == ["Idempotency-Key"]
    events = (await fetch(client))["paths"]["/v1/jobs/{job_id}/events"]["get"]
    stream = events["responses"]["200"]["content"]["text/event-stream"]["schema"]
    assert {ref["$ref"].rpartition("/")[2] for ref in stream["oneOf"]} == {
        "QueuedEvent",
        "StartedEvent",
        "ProgressEvent",
        "SucceededEvent",
        "FailedEvent",
        "CancelledEvent",
        "ClosedEvent",
    }
