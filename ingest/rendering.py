"""Results for humans: ``ResultV1`` as JSON with tensors as ``{dtype, shape, values}``.

The stored value is MessagePack ``ResultV1`` with tensors as raw buffers; over JSON each
output becomes nested number lists (``values``), e.g.
``{"probabilities": {"dtype": "float32", "shape": [10], "values": [0.01, ...]}}``. Every
other field is as in the schema (``schemas/jsonschema/inference.result.v1.json``).
"""

from __future__ import annotations

from typing import Any

import msgspec

from schemas import Codec, ResultV1, Tensor, tensor_to_array

_RESULTS = Codec(ResultV1)


def tensor_json(tensor: Tensor) -> dict[str, Any]:
    return {
        "dtype": tensor.dtype,
        "shape": list(tensor.shape),
        "values": tensor_to_array(tensor).tolist(),
    }


def result_json(value: bytes) -> dict[str, Any]:
    """The JSON document for a stored result (MessagePack ``ResultV1`` bytes)."""
    result = _RESULTS.decode(value)
    document: dict[str, Any] = msgspec.to_builtins(result)
    document["outputs"] = {name: tensor_json(t) for name, t in result.outputs.items()}
    return document
