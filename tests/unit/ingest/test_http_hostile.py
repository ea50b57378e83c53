"""No body makes the HTTP API answer 5xx.

Property test over what a hostile or careless client can send to ``/v1/requests`` and
``/v1/predict``: deep nesting, extreme shapes, huge and odd numbers, sizes near the limits,
wrong types, random bytes. The app is the real one (routes, middleware, error handlers, the
real decoder and model check); only the service behind it is a stub that accepts whatever
the decoder let through. So this claims nothing about the pipeline: only that decoding and
validating client bytes never fail with a server error.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import httpx
import msgspec
import pytest
from fastapi import FastAPI
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ingest.app import HttpConfig, create_app
from ingest.payloads import RequestDecoder, Submission
from ingest.waiters import Stored
from schemas import Codec, ResultV1
from schemas.models import ModelCatalog
from tests.helpers import MODELS

MESSAGE_MAX_BYTES = 40_000  # small, so that near-limit bodies are cheap to generate
BODY_MAX_BYTES = 64 * 1024
RESULTS = Codec(ResultV1)


class AcceptingService:
    """Stands in for Kafka and Redis: every decoded request is "produced" and answered."""

    def __init__(self, decoder: RequestDecoder) -> None:
        self.decoder = decoder
        self.producer = SimpleNamespace(queue_depth=lambda: 0)

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def submit(self, submissions: list[Submission], **_: Any) -> list[str]:
        return [s.request.id for s in submissions]

    async def predict(self, submission: Submission, **_: Any) -> Stored:
        request = submission.request
        result = ResultV1(
            id=request.id,
            model=request.model,
            model_version="1",
            status="ok",
            outputs={},
            created_at=request.created_at,
        )
        return Stored(RESULTS.encode(result))


def hostile_app(*, check_models: bool) -> FastAPI:
    decoder = RequestDecoder(
        catalog=ModelCatalog(MODELS) if check_models else None,
        max_batch=5,
        message_max_bytes=MESSAGE_MAX_BYTES,
    )
    config = HttpConfig(
        max_body_bytes=BODY_MAX_BYTES,
        predict_timeout_s=1.0,
        predict_max_timeout_s=2.0,
        busy_retry_after_s=1,
        unavailable_retry_after_s=1,
        default_tenant="default",
    )
    service = AcceptingService(decoder)
    app = create_app(config, service_factory=lambda _metrics: service)  # type: ignore[arg-type,return-value]
    app.state.service = service  # what the lifespan would do; the transport runs none
    return app


class Client:
    """Posts to the app in-process (httpx's ASGI transport; no lifespan, no sockets)."""

    def __init__(self, app: FastAPI) -> None:
        self._app = app

    def post(self, path: str, **kwargs: Any) -> httpx.Response:
        async def post() -> httpx.Response:
            transport = httpx.ASGITransport(app=self._app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                return await client.post(path, **kwargs)

        return asyncio.run(post())


@pytest.fixture(scope="module", params=[True, False], ids=["models", "schema-only"])
def client(request: pytest.FixtureRequest) -> Client:
    return Client(hostile_app(check_models=request.param))


# -- strategies ------------------------------------------------------------------------------

huge_ints = st.sampled_from(
    [2**31, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1, 2**64, 2**70, -(2**63) - 1]
)
numbers = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    huge_ints,
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, -1, 1e308, -1e308, 5e-324, 1.7e9, 1.7e12, 1.7e18]),
)
scalars = st.one_of(st.none(), st.booleans(), numbers, st.text(max_size=20), st.binary(max_size=20))
anything = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
dims = st.one_of(
    st.integers(min_value=0, max_value=8), huge_ints, st.integers(min_value=-3, max_value=-1)
)
shapes = st.lists(dims, max_size=6)
dtypes = st.sampled_from(
    ["float32", "float64", "float16", "int8", "uint8", "int64", "bool", "complex64", ""]
)
tensors = st.one_of(
    st.lists(numbers, max_size=70),
    st.fixed_dictionaries(
        {
            "values": st.one_of(
                st.lists(numbers, max_size=70), st.lists(st.lists(numbers, max_size=3), max_size=3)
            )
        },
        optional={"shape": shapes, "dtype": dtypes},
    ),
    st.fixed_dictionaries(
        {"dtype": dtypes, "shape": shapes, "data": st.binary(max_size=300)},
    ),
    anything,
)
pixels = st.just([float(i % 16) for i in range(64)])
times = st.one_of(st.none(), numbers, st.just(1.7e9), anything)
requests = st.fixed_dictionaries(
    {},
    optional={
        "id": st.one_of(st.text(max_size=300), anything),
        "key": st.one_of(st.text(max_size=300), anything),
        "model": st.one_of(st.just("digits"), st.text(max_size=200), anything),
        "model_version": st.one_of(st.just("1"), st.text(max_size=10), anything),
        "inputs": st.one_of(
            st.fixed_dictionaries({"input": st.one_of(pixels, tensors)}),
            st.dictionaries(st.text(max_size=10), tensors, max_size=3),
            anything,
        ),
        "created_at": times,
        "deadline": times,
        "attributes": st.one_of(
            st.dictionaries(st.text(max_size=10), st.text(max_size=10)), anything
        ),
    },
)


def _deep(depth: int, opener: bytes, closer: bytes) -> bytes:
    return opener * depth + closer * depth


@st.composite
def deep_bodies(draw: st.DrawFn) -> tuple[bytes, str]:
    depth = draw(st.integers(min_value=200, max_value=20_000))
    if draw(st.booleans()):
        nested = _deep(depth, b"[", b"]")
        where = draw(st.sampled_from(["top", "input", "attributes", "batch"]))
        body = {
            "top": nested,
            "input": b'{"model": "digits", "inputs": {"input": ' + nested + b"}}",
            "attributes": b'{"model": "digits", "inputs": {}, "attributes": ' + nested + b"}",
            "batch": b"[" + nested + b"]",
        }[where]
        return body, "application/json"
    return b"\x91" * depth + b"\xc0", "application/msgpack"


@st.composite
def near_limit_bodies(draw: st.DrawFn) -> tuple[bytes, str]:
    """A digits request padded to within a few hundred bytes of the record limit."""
    size = draw(
        st.integers(min_value=MESSAGE_MAX_BYTES - 25_000, max_value=MESSAGE_MAX_BYTES + 200)
    )
    body = {"model": "digits", "inputs": {"input": [float(i % 16) for i in range(64)]}}
    body["attributes"] = {"pad": "p" * size}
    count = draw(st.integers(min_value=1, max_value=3))
    as_batch = draw(st.booleans())
    return _encode([body] * count if as_batch else body, draw(st.sampled_from(["json", "msgpack"])))


def _encode(value: object, form: str) -> tuple[bytes, str]:
    if form == "json":
        try:
            return msgspec.json.encode(value), "application/json"
        except (TypeError, ValueError, OverflowError):
            form = "msgpack"  # bytes values and huge ints have no JSON form here
    try:
        return msgspec.msgpack.encode(value), "application/msgpack"
    except (TypeError, ValueError, OverflowError):
        return b"\xc1", "application/msgpack"


@st.composite
def encoded_requests(draw: st.DrawFn) -> tuple[bytes, str]:
    batch = draw(st.one_of(requests, st.lists(requests, max_size=7), anything))
    return _encode(batch, draw(st.sampled_from(["json", "msgpack"])))


def _digits(input_json: bytes, extra: bytes = b"") -> bytes:
    return b'{"model": "digits", "inputs": {"input": ' + input_json + b"}" + extra + b"}"


textual_json = st.sampled_from(
    [
        _digits(b"[1e400]"),
        _digits(b"[1]", b', "created_at": -1e400'),
        _digits(b'{"shape": [0, 4611686018427387904], "values": []}'),
        _digits(b'{"shape": [0, 99999999999999999999999], "values": []}'),
        _digits(b'{"dtype": "float32", "shape": [4611686018427387904, 4], "data": ""}'),
        _digits(b"[" + b"[]," * 5000 + b"[]]"),
        _digits(b"[" + b"123456789012345678901234567890," * 64 + b"1]"),
        b"[" + b"[]," * 30_000 + b"[]]",
        b"\xff\xfe",
        b"",
        b"null",
    ]
)
bodies = st.one_of(
    encoded_requests(),
    deep_bodies(),
    near_limit_bodies(),
    st.tuples(textual_json, st.just("application/json")),
    st.tuples(
        st.binary(max_size=200), st.sampled_from(["application/json", "application/msgpack"])
    ),
)

HYPOTHESIS = settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _check(response: httpx.Response) -> None:
    assert response.status_code < 500, response.text[:500]
    if response.status_code in (413, 422) and "errors" in response.json():
        assert all(e["path"].startswith("$") for e in response.json()["errors"])


@HYPOTHESIS
@given(body=bodies)
def test_no_body_makes_submit_answer_5xx(client: Client, body: tuple[bytes, str]) -> None:
    content, content_type = body
    _check(client.post("/v1/requests", content=content, headers={"content-type": content_type}))


@HYPOTHESIS
@given(body=bodies)
def test_no_body_makes_predict_answer_5xx(client: Client, body: tuple[bytes, str]) -> None:
    content, content_type = body
    _check(client.post("/v1/predict", content=content, headers={"content-type": content_type}))


def test_the_stub_accepts_a_good_request(client: Client) -> None:
    """The properties above are not vacuous: a good body gets through to the stub."""
    body = {"model": "digits", "inputs": {"input": [float(i % 16) for i in range(64)]}}
    accepted = client.post("/v1/requests", json=[body, body])
    assert accepted.status_code == 202, accepted.text
    assert len(accepted.json()["ids"]) == 2
    predicted = client.post("/v1/predict", json=body)
    assert predicted.status_code == 200, predicted.text
