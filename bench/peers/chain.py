"""The chain's domain work, shared by the faust and Quix versions so that only the framework
differs: the same message Structs (``schemas/``, decoded with msgspec), the same model file
and ONNX Runtime session options (intra-op threads 1, spinning off) and the same Redis
writes (pipelined ``SET`` with TTL, then one ``PUBLISH`` per batch naming its ids on the
default tenant's channel, as ours announces a batch) as ours.

Written the way a user of these libraries would: each record validated on its own; inference
once per batch where the framework hands over a batch (faust ``take``), else per record.
Invalid records are dropped (the benchmark sends none).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import msgspec
import numpy as np
import onnxruntime as ort

from schemas.keys import DEFAULT_TENANT, ResultKeys, ready_message
from schemas.messages import RequestV1, ResultV1, StoredV1, Tensor, ValidatedRequestV1

LABELS = [str(d) for d in range(10)]
INPUT_SHAPE = [64]
INPUT_MIN, INPUT_MAX = 0.0, 16.0
TTL_S = 86_400
OUTPUTS = ["label", "probabilities"]

_requests = msgspec.msgpack.Decoder(RequestV1)
_validated = msgspec.msgpack.Decoder(ValidatedRequestV1)
_results = msgspec.msgpack.Decoder(ResultV1)
_encoder = msgspec.msgpack.Encoder()


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--stage", choices=["validate", "infer", "persist"], required=True)
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--guarantee", default="exactly-once")
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--batch-timeout", type=float, default=0.05)
    return parser.parse_args()


def topics(prefix: str, stage: str) -> tuple[str, str]:
    """(input, output) topic of ``stage``."""
    return {
        "validate": (f"{prefix}inference.requests", f"{prefix}inference.validated"),
        "infer": (f"{prefix}inference.validated", f"{prefix}inference.results"),
        "persist": (f"{prefix}inference.results", f"{prefix}inference.stored"),
    }[stage]


def load_session(path: str) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return ort.InferenceSession(path, sess_options=options, providers=["CPUExecutionProvider"])


def validate(value: bytes) -> bytes | None:
    """The encoded ValidatedRequestV1, or None when the request is invalid."""
    try:
        request = _requests.decode(value)
    except (msgspec.ValidationError, msgspec.DecodeError):
        return None
    tensor = request.inputs.get("input")
    if request.model != "digits" or tensor is None or len(request.inputs) != 1:
        return None
    if tensor.dtype != "float32" or tensor.shape != INPUT_SHAPE or len(tensor.data) != 256:
        return None
    array = np.frombuffer(tensor.data, dtype="<f4")
    if not np.isfinite(array).all() or array.min() < INPUT_MIN or array.max() > INPUT_MAX:
        return None
    now = time.time()
    if request.deadline is not None and request.deadline < now:
        return None
    return _encoder.encode(
        ValidatedRequestV1(
            id=request.id,
            model=request.model,
            model_version=request.model_version or "1",
            inputs=request.inputs,
            created_at=request.created_at,
            validated_at=now,
            deadline=request.deadline,
            attributes=request.attributes,
        )
    )


def infer(session: ort.InferenceSession, values: list[bytes]) -> list[bytes]:
    """One ``session.run`` over ``values``; the encoded ResultV1 of each."""
    requests = [_validated.decode(v) for v in values]
    batch = np.stack([np.frombuffer(r.inputs["input"].data, dtype="<f4") for r in requests])
    labels, probabilities = session.run(OUTPUTS, {"input": batch})
    inferred_at = time.time()
    return [
        _encoder.encode(_result(r, labels[i], probabilities[i], inferred_at))
        for i, r in enumerate(requests)
    ]


def _result(request: Any, label: Any, scores: Any, inferred_at: float) -> ResultV1:
    return ResultV1(
        id=request.id,
        model=request.model,
        model_version=request.model_version,
        status="ok",
        outputs={"label": _tensor(label), "probabilities": _tensor(scores)},
        created_at=request.created_at,
        label=LABELS[int(np.argmax(scores))],
        scores=dict(zip(LABELS, scores.tolist(), strict=True)),
        timings={"validated": request.validated_at, "inferred": inferred_at},
        attributes=request.attributes,
    )


def _tensor(array: Any) -> Tensor:
    arr = np.ascontiguousarray(array)
    return Tensor(dtype=arr.dtype.name, shape=list(arr.shape), data=arr.tobytes())


def store_commands(prefix: str, values: list[bytes]) -> tuple[list[tuple[str, bytes]], list[Any]]:
    """((key, value) to SET, decoded results) for a batch of results."""
    results = [_results.decode(v) for v in values]
    return [(f"{prefix}result:{r.id}", v) for r, v in zip(results, values, strict=True)], results


def notification(prefix: str, results: list[Any]) -> tuple[str, bytes]:
    """(channel, message) announcing a stored batch, as ours does (``schemas/keys.py``)."""
    return ResultKeys(prefix=prefix).channel(DEFAULT_TENANT), ready_message(r.id for r in results)


def notices(prefix: str, results: list[Any]) -> list[bytes]:
    """Encoded StoredV1 notices, stamped now (after Redis acknowledged)."""
    stored_at = time.time()
    return [
        _encoder.encode(
            StoredV1(
                id=r.id,
                model=r.model,
                model_version=r.model_version,
                key=f"{prefix}result:{r.id}",
                created_at=r.created_at,
                stored_at=stored_at,
                label=r.label,
            )
        )
        for r in results
    ]
