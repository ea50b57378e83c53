"""HTTP pieces that need no broker: API keys, result rendering, the OpenAPI document."""

from __future__ import annotations

import asyncio

import httpx
import numpy as np
from pydantic import SecretStr
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from ingest.app import create_app
from ingest.middleware import ApiKeyGuard
from ingest.rendering import result_json
from schemas import Codec, ResultV1, tensor_from_array
from streaminfer.settings import IngestSettings, Settings


def guarded_app() -> ApiKeyGuard:
    async def hello(_request: object) -> PlainTextResponse:
        return PlainTextResponse("hello")

    inner = Starlette(routes=[Route("/data", hello), Route("/healthz", hello)])
    return ApiKeyGuard(inner, keys=["k1", "k2"], open_paths=["/healthz"])


def status_of(app: ApiKeyGuard, path: str, headers: dict[str, str] | None = None) -> httpx.Response:
    async def get() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.get(path, headers=headers)

    return asyncio.run(get())


def test_api_keys_401_without_403_wrong_200_right() -> None:
    app = guarded_app()
    missing = status_of(app, "/data")
    assert missing.status_code == 401
    assert missing.headers["www-authenticate"] == "Bearer"
    assert missing.json()["error"] == "unauthenticated"
    assert status_of(app, "/data", {"X-API-Key": "nope"}).status_code == 403
    assert status_of(app, "/data", {"Authorization": "Bearer nope"}).status_code == 403
    assert status_of(app, "/data", {"X-API-Key": "k2"}).text == "hello"
    assert status_of(app, "/data", {"Authorization": "Bearer k1"}).text == "hello"
    assert status_of(app, "/healthz").status_code == 200


def test_results_render_tensors_as_value_lists() -> None:
    probabilities = np.array([0.25, 0.75], dtype=np.float32)
    result = ResultV1(
        id="r1",
        model="digits",
        model_version="1",
        status="ok",
        outputs={
            "probabilities": tensor_from_array(probabilities),
            "label": tensor_from_array(np.int64(1)),
        },
        created_at=1.0,
        label="1",
        scores={"0": 0.25, "1": 0.75},
    )
    document = result_json(Codec(ResultV1).encode(result))
    assert document["outputs"]["probabilities"] == {
        "dtype": "float32",
        "shape": [2],
        "values": [0.25, 0.75],
    }
    assert document["outputs"]["label"] == {"dtype": "int64", "shape": [], "values": 1}
    assert (document["id"], document["label"], document["scores"]) == (
        "r1",
        "1",
        {"0": 0.25, "1": 0.75},
    )


def test_openapi_describes_the_bodies_and_the_key_schemes() -> None:
    app = create_app(Settings(ingest=IngestSettings(api_keys=SecretStr("k1"))))
    document = app.openapi()
    schemas = document["components"]["schemas"]
    assert {"SubmitRequest", "RequestV1", "Tensor", "TensorValues", "ResultJson", "Error"} <= set(
        schemas
    )
    submit = document["paths"]["/v1/requests"]["post"]
    assert set(submit["requestBody"]["content"]) == {"application/json", "application/msgpack"}
    assert {"202", "413", "422", "429", "503"} <= set(submit["responses"])
    assert "ApiKey" in document["components"]["securitySchemes"]
    assert document["paths"]["/healthz"]["get"]["security"] == []
    timeout = document["paths"]["/v1/predict"]["post"]["parameters"][0]
    assert timeout["name"] == "timeout"


def test_docs_can_be_public_while_the_api_needs_a_key() -> None:
    app = create_app(Settings(ingest=IngestSettings(api_keys=SecretStr("k1"), public_docs=True)))

    async def get(path: str) -> int:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return (await client.get(path)).status_code

    assert asyncio.run(get("/openapi.json")) == 200
    assert asyncio.run(get("/v1/results/x")) == 401
    assert asyncio.run(get("/metrics")) == 401
