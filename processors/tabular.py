"""Processors for tabular models: features by name in, a decision threshold out."""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

import numpy as np
import numpy.typing as npt

from schemas.messages import Tensor
from schemas.tensors import TensorError, tensor_to_array
from stages.plugins import AnyRequest, Arrays, Batch, Processed, Processor

_NUMERIC_KINDS = "biuf"
_SCALAR_SIZES = {"float32": 4, "float64": 8, "int32": 4, "int64": 8}  # the fast path's dtypes
_MAX_LISTED = 5  # names quoted in an error message


class FeatureError(ValueError):
    """This request's features cannot make the model's input."""


@lru_cache(maxsize=4096)  # the same few names in every request; bounded against hostile ones
def feature_key(name: str) -> str:
    """How feature names compare: case, spaces, hyphens and underscores do not matter
    (``"Mean Radius"``, ``"mean-radius"`` and ``"mean_radius"`` are one feature)."""
    return re.sub(r"[\s_\-]+", "_", name.strip().lower())


class NamedFeatures(Processor):
    """Parse hook: the model input ``input`` (``[len(features)]``, ``dtype``) built from the
    request's features given by name, in the order of ``features``.

    Config: ``features`` (list of names, required), ``input`` (default ``input``),
    ``dtype`` (default ``float32``). Each feature is looked up in the request's ``inputs``
    (a scalar tensor: shape ``[]`` or ``[1]``, any numeric dtype) and then in its
    ``attributes`` (a decimal string). A request may instead carry the model input itself
    (``inputs: {input: [...]}``), which is passed through. Per-request errors: a missing
    feature, an unknown or repeated feature name, a value that is not one number.
    """

    def load(self, config: Mapping[str, Any]) -> None:
        features = config.get("features")
        if not isinstance(features, list) or not features:
            raise ValueError("config.features must be a non-empty list of feature names")
        self.features = [str(f) for f in features]
        self.keys = [feature_key(f) for f in self.features]
        if len(set(self.keys)) != len(self.keys):
            raise ValueError("config.features names a feature twice")
        self.index = {key: i for i, key in enumerate(self.keys)}
        self.input = str(config.get("input", "input"))
        self.dtype = np.dtype(str(config.get("dtype", "float32")))

    def parse(self, batch: Batch) -> Processed:
        values = np.zeros((len(batch), len(self.features)), dtype=self.dtype)
        errors: dict[int, str] = {}
        fast: dict[str, tuple[list[int], list[bytes]]] = defaultdict(lambda: ([], []))
        for row, request in enumerate(batch.requests):
            plain = self._plain(request)
            if plain is not None:
                rows, buffers = fast[plain[0]]
                rows.append(row)
                buffers.append(plain[1])
                continue
            try:
                values[row] = self._row(request)
            except FeatureError as exc:
                errors[row] = str(exc)
        for dtype, (rows, buffers) in fast.items():  # one frombuffer per dtype for the batch
            joined = np.frombuffer(b"".join(buffers), dtype=np.dtype(dtype).newbyteorder("<"))
            values[rows] = joined.reshape(len(rows), len(self.features))
        return Processed(arrays={self.input: values}, errors=errors)

    def _plain(self, request: AnyRequest) -> tuple[str, bytes] | None:
        """The common case, without a numpy call: every feature under its configured name,
        nothing else, all scalars of one numeric dtype. Its dtype and joined buffers."""
        inputs = request.inputs
        if len(inputs) != len(self.features):
            return None
        tensors = [inputs.get(name) for name in self.features]
        first = tensors[0]
        if first is None or first.dtype not in _SCALAR_SIZES:
            return None
        size = _SCALAR_SIZES[first.dtype]
        for t in tensors:
            if t is None or t.dtype != first.dtype or len(t.data) != size or len(t.shape) > 1:
                return None
            if t.shape and t.shape[0] != 1:
                return None
        return first.dtype, b"".join(t.data for t in tensors if t is not None)

    def _row(self, request: AnyRequest) -> npt.NDArray[Any] | list[float]:
        inputs = request.inputs
        if set(inputs) == {self.input}:  # the vector itself, as the model takes it
            return self._vector(inputs[self.input])
        named = {feature_key(k): v for k, v in inputs.items()}
        if len(named) != len(inputs):
            raise FeatureError("a feature is given twice (names differing only in case or _)")
        unknown = sorted(k for k in inputs if feature_key(k) not in self.index)
        if unknown:
            raise FeatureError(
                f"unknown features {_listed(unknown)}; known: {_listed(self.features)}"
            )
        # Attributes only when inputs do not give every feature (the common case is either).
        short = len(named) < len(self.keys)
        attributes = {feature_key(k): v for k, v in request.attributes.items()} if short else {}
        row: list[float] = []
        missing: list[str] = []
        for feature, key in zip(self.features, self.keys, strict=True):
            if key in named:
                row.append(_scalar(named[key], feature))
            elif key in attributes:
                row.append(_number(attributes[key], feature))
            else:
                missing.append(feature)
        if missing:
            raise FeatureError(f"missing {len(missing)} features: {_listed(missing)}")
        return row

    def _vector(self, tensor: Tensor) -> npt.NDArray[Any]:
        array = _array(tensor, self.input)
        if array.size != len(self.features):
            raise FeatureError(
                f"input {self.input!r} must hold {len(self.features)} values, got {array.size}"
            )
        return array.reshape(-1)


class DecisionThreshold(Processor):
    """Postprocess hook: the label is ``positive`` when its score reaches ``threshold``,
    else the best-scoring other label.

    Config: ``scores`` (the output holding one score per label, e.g. ``probabilities``),
    ``labels`` (the label of each score column), ``positive`` (one of them), ``threshold``
    (0..1). The outputs and scores are returned unchanged; only the label changes.
    """

    def load(self, config: Mapping[str, Any]) -> None:
        self.scores = str(config["scores"])
        self.labels = [str(label) for label in config["labels"]]
        positive = str(config["positive"])
        if len(self.labels) < 2 or positive not in self.labels:
            raise ValueError(f"config.positive {positive!r} must be one of >= 2 labels")
        self.positive = self.labels.index(positive)
        self.threshold = float(config["threshold"])
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"config.threshold must be within 0..1, got {self.threshold}")

    def postprocess(self, batch: Batch, outputs: Arrays) -> Processed:
        scores = outputs[self.scores]
        if scores.ndim != 2 or scores.shape[1] != len(self.labels):
            raise ValueError(
                f"{self.scores} has shape {scores.shape}, want [N, {len(self.labels)}]"
            )
        others = scores.astype(np.float64, copy=True)
        others[:, self.positive] = -np.inf
        chosen = np.where(
            scores[:, self.positive] >= self.threshold, self.positive, np.argmax(others, axis=1)
        )
        return Processed(arrays=outputs, labels=[self.labels[i] for i in chosen.tolist()])


def _array(tensor: Tensor, name: str) -> npt.NDArray[Any]:
    try:
        array = tensor_to_array(tensor)
    except TensorError as exc:
        raise FeatureError(f"{name!r}: {exc}") from None
    if array.dtype.kind not in _NUMERIC_KINDS:
        raise FeatureError(f"{name!r} must be numeric, got {tensor.dtype}")
    return array


def _scalar(tensor: Tensor, name: str) -> float:
    array = _array(tensor, name)
    if array.size != 1:
        raise FeatureError(f"feature {name!r} must be one number, got shape {list(array.shape)}")
    return float(array.reshape(-1)[0])


def _number(text: str, name: str) -> float:
    try:
        return float(text)  # NaN and infinity parse: validate's checks refuse them next
    except ValueError:
        raise FeatureError(f"attribute {name!r} is not a number: {text[:40]!r}") from None


def _listed(names: Sequence[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:_MAX_LISTED])
    more = len(names) - _MAX_LISTED
    return f"[{shown}{f', ... {more} more' if more > 0 else ''}]"
