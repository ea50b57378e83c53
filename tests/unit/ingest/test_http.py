"""HTTP pieces that need no broker: API keys and tenants, reserved attributes, the mapping of
the service's outcomes to HTTP, result rendering, the OpenAPI document."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi import FastAPI
from pydantic import SecretStr
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from ingest.app import HttpConfig, create_app
from ingest.delivery import Delivery
from ingest.metrics import IngestMetrics
from ingest.middleware import ApiKeyGuard, tenant_of
from ingest.payloads import RequestDecoder, Submission
from ingest.rendering import result_json
from ingest.service import KafkaUnavailable, Overloaded
from ingest.waiters import Stored
from schemas import Codec, ResultV1, tensor_from_array
from streaminfer.ingest_app import create_app as create_app_from_settings
from streaminfer.settings import IngestSettings, Settings

PIXELS = [float(i % 16) for i in range(64)]


def guarded_app(keys: dict[str, str]) -> ApiKeyGuard:
    async def whose(request: Request) -> PlainTextResponse:
        return PlainTextResponse(tenant_of(request))

    async def alive(_request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    inner = Starlette(routes=[Route("/data", whose), Route("/healthz", alive)])
    return ApiKeyGuard(inner, keys=keys, default_tenant="trusted", open_paths=["/healthz"])


def get(app: Any, path: str, headers: dict[str, str] | None = None) -> httpx.Response:
    async def fetch() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.get(path, headers=headers)

    return asyncio.run(fetch())


def test_api_keys_401_without_403_wrong_and_the_right_key_names_its_tenant() -> None:
    app = guarded_app({"k1": "acme", "k2": "globex"})
    missing = get(app, "/data")
    assert missing.status_code == 401
    assert missing.headers["www-authenticate"] == "Bearer"
    assert missing.json()["error"] == "unauthenticated"
    assert get(app, "/data", {"X-API-Key": "nope"}).status_code == 403
    assert get(app, "/data", {"Authorization": "Bearer nope"}).status_code == 403
    assert get(app, "/data", {"X-API-Key": "k2"}).text == "globex"
    assert get(app, "/data", {"Authorization": "Bearer k1"}).text == "acme"
    assert get(app, "/healthz").status_code == 200


def test_without_keys_every_request_is_the_default_tenants() -> None:
    assert get(guarded_app({}), "/data").text == "trusted"
    assert get(guarded_app({}), "/data", {"X-API-Key": "anything"}).text == "trusted"


def test_api_key_config_takes_tenant_pairs_and_bare_keys() -> None:
    raw = "acme=k1, acme=k2 ,globex=k3,bare-key,padded==,x=y=,not a name=k4"
    ingest = IngestSettings(api_keys=SecretStr(raw))
    assert ingest.api_key_tenants("main") == {
        "k1": "acme",
        "k2": "acme",
        "k3": "globex",
        "bare-key": "main",
        "padded==": "main",  # base64 padding, not a tenant separator
        "y=": "x",
        "not a name=k4": "main",
    }
    assert IngestSettings().api_key_tenants("main") == {}
    with pytest.raises(ValueError, match="two tenants"):
        IngestSettings(api_keys=SecretStr("a=k,b=k")).api_key_tenants("main")


def test_default_tenant_setting_must_be_a_tenant_name() -> None:
    assert Settings().kafka.default_tenant == "default"
    with pytest.raises(ValueError):
        Settings(kafka={"default_tenant": "a:b"})  # type: ignore[arg-type]


class FakeService:
    """The routes' view of :class:`IngestService`, recording the tenant of every call."""

    def __init__(self) -> None:
        self.decoder = RequestDecoder(catalog=None, max_batch=10, message_max_bytes=1_000_000)
        self.calls: list[tuple[str, str, list[str]]] = []
        self.stored: dict[tuple[str, str], bytes] = {}
        self.failure: Exception | None = None
        self.producer = self

    def queue_depth(self) -> int:
        return 0

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def submit(self, submissions: list[Submission], *, tenant: str) -> list[str]:
        ids = [s.request.id for s in submissions]
        self.calls.append(("submit", tenant, ids))
        if self.failure is not None:
            raise self.failure
        return ids

    async def predict(self, submission: Submission, *, tenant: str, timeout_s: float) -> Stored:
        self.calls.append(("predict", tenant, [submission.request.id]))
        return Stored(self.stored[(tenant, submission.request.id)])

    async def result(self, tenant: str, request_id: str) -> bytes | None:
        self.calls.append(("result", tenant, [request_id]))
        return self.stored.get((tenant, request_id))


def http_config(**changes: Any) -> HttpConfig:
    fields: dict[str, Any] = {
        "max_body_bytes": 1 << 20,
        "predict_timeout_s": 2.0,
        "predict_max_timeout_s": 30.0,
        "busy_retry_after_s": 1,
        "unavailable_retry_after_s": 5,
        "default_tenant": "trusted",
        "api_keys": {"ka": "acme", "kb": "globex"},
        **changes,
    }
    return HttpConfig(**fields)


@pytest.fixture()
def service() -> FakeService:
    return FakeService()


class Client:
    """Calls the app in process, inside its lifespan (which builds the factory's service)."""

    def __init__(self, app: FastAPI) -> None:
        self._app = app

    def post(self, path: str, **kwargs: Any) -> httpx.Response:
        return self._call("POST", path, **kwargs)

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return self._call("GET", path, **kwargs)

    def _call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        async def call() -> httpx.Response:
            async with self._app.router.lifespan_context(self._app):
                transport = httpx.ASGITransport(app=self._app)
                async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
                    return await http.request(method, path, **kwargs)

        return asyncio.run(call())


@pytest.fixture()
def client(service: FakeService) -> Client:
    def factory(_metrics: IngestMetrics) -> Any:
        return service

    return Client(create_app(http_config(), service_factory=factory))


def body(request_id: str, **fields: Any) -> dict[str, Any]:
    return {"id": request_id, "model": "digits", "inputs": {"input": PIXELS}, **fields}


def test_the_tenant_comes_from_the_key_never_from_the_body(
    client: Client, service: FakeService
) -> None:
    forged = body("r1", tenant="globex", attributes={"tenant": "globex"})
    sent = client.post("/v1/requests", json=forged, headers={"X-API-Key": "ka"})
    assert sent.status_code == 202, sent.text
    service.stored[("acme", "r1")] = Codec(ResultV1).encode(result("r1"))
    assert client.get("/v1/results/r1", headers={"X-API-Key": "ka"}).status_code == 200
    other = client.get("/v1/results/r1", headers={"X-API-Key": "kb"})
    assert other.status_code == 404 and other.json()["error"] == "not_found"
    predicted = client.post("/v1/predict", json=body("r1"), headers={"X-API-Key": "ka"})
    assert predicted.json()["id"] == "r1"
    assert service.calls == [
        ("submit", "acme", ["r1"]),
        ("result", "acme", ["r1"]),
        ("result", "globex", ["r1"]),
        ("predict", "acme", ["r1"]),
    ]


def test_reserved_attributes_are_422_with_their_paths(client: Client, service: FakeService) -> None:
    batch = [
        body("ok-1", attributes={"customer": "c1"}),
        body("bad-1", attributes={"row": "²", "file": "x.csv", "streaminfer.tenant": "globex"}),
    ]
    response = client.post("/v1/requests", json=batch, headers={"X-API-Key": "ka"})
    assert response.status_code == 422, response.text
    errors = [(e["path"], e["reason"]) for e in response.json()["errors"]]
    assert errors == [
        ("$[1].attributes.file", "malformed"),
        ("$[1].attributes.row", "malformed"),
        ("$[1].attributes.streaminfer.tenant", "malformed"),
    ]
    single = body("bad-2", attributes={"backfill_id": "b"})
    response = client.post("/v1/predict", json=single, headers={"X-API-Key": "ka"})
    assert [e["path"] for e in response.json()["errors"]] == ["$.attributes.backfill_id"]
    assert service.calls == []  # nothing of either body was produced


@pytest.mark.parametrize(
    ("failure", "status", "retry_after"),
    [
        (Overloaded("2 record(s) did not fit", Delivery(["a"], {"b": "q", "c": "q"})), 429, "1"),
        (KafkaUnavailable("Kafka did not acknowledge", Delivery([], {"b": "x"})), 503, "5"),
    ],
)
def test_records_kafka_did_not_take_are_named_in_429_and_503(
    client: Client, service: FakeService, failure: Exception, status: int, retry_after: str
) -> None:
    service.failure = failure
    response = client.post(
        "/v1/requests", json=[body("a"), body("b"), body("c")], headers={"X-API-Key": "ka"}
    )
    assert response.status_code == status
    assert response.headers["retry-after"] == retry_after
    answer = response.json()
    expected_failed = sorted(failure.failed)  # type: ignore[attr-defined]
    assert (answer["acknowledged"], answer["failed"]) == (
        failure.acknowledged,  # type: ignore[attr-defined]
        expected_failed,
    )


def result(request_id: str) -> ResultV1:
    probabilities = np.array([0.25, 0.75], dtype=np.float32)
    return ResultV1(
        id=request_id,
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


def test_results_render_tensors_as_value_lists() -> None:
    document = result_json(Codec(ResultV1).encode(result("r1")))
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
    app = create_app_from_settings(Settings(ingest=IngestSettings(api_keys=SecretStr("a=k1"))))
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
    settings = Settings(ingest=IngestSettings(api_keys=SecretStr("k1"), public_docs=True))
    app = create_app_from_settings(settings)
    assert get(app, "/openapi.json").status_code == 200
    assert get(app, "/v1/results/x").status_code == 401
    assert get(app, "/metrics").status_code == 401


# -- the hot routes (ingest/hot.py) answer exactly as FastAPI's own stack -----------------


class FastApiOnly:
    """The same app with its hot path bypassed: FastAPI's stack answers every route."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await FastAPI.__call__(self.app, scope, receive, send)


def both_answers(
    service: FakeService, method: str, path: str, **kwargs: Any
) -> list[tuple[int, list[tuple[str, str]], bytes]]:
    """(status, headers, body) from the hot path and from FastAPI's stack, one app each."""
    answers = []
    for bypass in (False, True):
        app = create_app(http_config(), service_factory=lambda _m: service)  # type: ignore[arg-type,return-value]

        async def call(app: FastAPI = app, bypass: bool = bypass) -> httpx.Response:
            async with app.router.lifespan_context(app):
                asgi = FastApiOnly(app) if bypass else app
                transport = httpx.ASGITransport(app=asgi, raise_app_exceptions=False)
                async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
                    return await http.request(method, path, **kwargs)

        response = asyncio.run(call())
        answers.append(
            (response.status_code, list(response.headers.multi_items()), response.content)
        )
    return answers


KA = {"X-API-Key": "ka"}


@pytest.mark.parametrize(
    ("path", "kwargs", "status"),
    [
        ("/v1/requests", {"json": body("h1"), "headers": KA}, 202),
        ("/v1/requests", {"json": [body("h1"), body("h2", key="k")], "headers": KA}, 202),
        ("/v1/requests", {"json": [body("h1"), {"inputs": 3}], "headers": KA}, 422),
        ("/v1/requests", {"content": b"{", "headers": KA}, 422),
        ("/v1/requests", {"json": [body("x")] * 11, "headers": KA}, 413),
        ("/v1/requests", {"content": b"x" * (1 << 21), "headers": KA}, 413),
        ("/v1/requests", {"content": b"{}", "headers": {**KA, "content-type": "text/csv"}}, 415),
        ("/v1/requests", {"json": body("h1")}, 401),
        ("/v1/requests", {"json": body("h1"), "headers": {"Authorization": "Bearer no"}}, 403),
        ("/v1/predict", {"json": body("p1"), "headers": KA}, 200),
        ("/v1/predict?timeout=1.5", {"json": body("p1"), "headers": KA}, 200),
        (
            "/v1/predict",
            {"json": body("p1"), "headers": {**KA, "accept": "application/msgpack"}},
            200,
        ),
        ("/v1/predict", {"json": [body("p1")], "headers": KA}, 422),
        ("/v1/predict?timeout=abc", {"json": body("p1"), "headers": KA}, 422),
        ("/v1/predict?timeout=0", {"json": body("p1"), "headers": KA}, 422),
        ("/v1/predict?timeout=31", {"json": body("p1"), "headers": KA}, 422),
        ("/v1/predict", {"json": body("p1")}, 401),
    ],
)
def test_hot_routes_answer_as_fastapi_does(
    service: FakeService, path: str, kwargs: dict[str, Any], status: int
) -> None:
    service.stored[("acme", "p1")] = Codec(ResultV1).encode(result("p1"))
    hot, fastapi_only = both_answers(service, "POST", path, **kwargs)
    assert hot[0] == status, hot[2]
    assert hot == fastapi_only


@pytest.mark.parametrize(
    "failure",
    [
        Overloaded("2 record(s) did not fit", Delivery(["a"], {"b": "q"})),
        KafkaUnavailable("Kafka did not acknowledge", Delivery([], {"a": "x", "b": "x"})),
        RuntimeError("a bug"),  # 500, plain text, as Starlette's ServerErrorMiddleware
    ],
)
def test_hot_route_failures_answer_as_fastapi_does(
    service: FakeService, failure: Exception
) -> None:
    service.failure = failure
    hot, fastapi_only = both_answers(
        service, "POST", "/v1/requests", json=[body("a"), body("b")], headers=KA
    )
    assert hot[0] in (429, 503, 500)
    assert hot == fastapi_only


def test_hot_requests_are_counted_under_their_route(service: FakeService) -> None:
    app = create_app(http_config(api_keys={}), service_factory=lambda _m: service)  # type: ignore[arg-type,return-value]

    async def calls() -> str:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
                await http.post("/v1/requests", json=body("m1"))
                await http.post("/v1/requests", content=b"[")
                return (await http.get("/metrics")).text

    metrics = asyncio.run(calls())
    for status in ("202", "422"):
        line = (
            'streaminfer_http_requests_total{method="POST",route="/v1/requests",'
            f'status="{status}"}} 1.0'
        )
        assert line in metrics
    assert "streaminfer_http_requests_in_flight 1.0" in metrics  # the /metrics request itself
