"""Builders shared by unit and integration tests."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import yaml

from schemas import Codec, RequestV1, tensor_from_array
from stages.records import Record

REPO = Path(__file__).resolve().parent.parent
MODELS = REPO / "models"
REQUESTS = Codec(RequestV1)


CANCER = MODELS / "breast_cancer"


def cancer_policy() -> tuple[list[str], float]:
    """What ``models/breast_cancer/model.yaml`` configures its processors with: the named
    features in the model's input order, and the decision threshold."""
    contract = yaml.safe_load((CANCER / "model.yaml").read_text())
    features: list[str] = contract["processors"]["validate"][0]["config"]["features"]
    threshold: float = contract["processors"]["infer"][0]["config"]["threshold"]
    return features, threshold


def holdout() -> tuple[np.ndarray, np.ndarray]:
    data = np.load(MODELS / "digits" / "holdout.npz")
    return data["X"].astype(np.float32), data["y"]


def digits_request(x: np.ndarray, *, request_id: str | None = None, **fields: Any) -> RequestV1:
    return RequestV1(
        id=request_id or uuid.uuid4().hex,
        model=fields.pop("model", "digits"),
        inputs=fields.pop("inputs", {"input": tensor_from_array(x)}),
        created_at=fields.pop("created_at", time.time()),
        **fields,
    )


def encode_raw(payload: dict[str, Any]) -> bytes:
    """MessagePack of an arbitrary dict: for records the Structs would refuse to build."""
    return msgspec.msgpack.encode(payload)


def record(value: bytes, *, offset: int = 0, topic: str = "t", partition: int = 0) -> Record:
    return Record(topic=topic, partition=partition, offset=offset, key=b"k", value=value)
