"""Tensors as humans write them in JSON: nested number lists instead of base64 buffers.

Accepted forms of one input (besides the wire form ``{dtype, shape, data}``):

- ``{"dtype": "float32", "shape": [8, 8], "values": [...]}``: ``values`` is a nested or flat
  list of numbers; ``shape`` is optional (default: the nesting of ``values``) and, when given,
  ``values`` are reshaped to it (C order); ``dtype`` is optional (default below).
- ``[...]``: a nested list of numbers alone.

The default dtype is the one the model declares for that input (``float32`` when the model or
input is unknown: validation will then say what is wrong). Values must be numbers (or
booleans for ``bool``): strings are refused, floats are never truncated to integers and
integers must fit the dtype.
"""

from __future__ import annotations

import math
from typing import Any, Final, get_args

import numpy as np
import numpy.typing as npt

from schemas import Tensor, tensor_from_array
from schemas.messages import DType

DEFAULT_DTYPE: Final = "float32"
_DTYPES: Final = frozenset(get_args(DType))


class TensorValueError(ValueError):
    """A tensor given as values cannot be built; ``path`` is relative to the tensor."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(message)
        self.path = path
        self.message = message


def is_values_form(raw: object) -> bool:
    """True when ``raw`` is one of the list forms above (not the wire form)."""
    return isinstance(raw, list) or (isinstance(raw, dict) and "values" in raw)


def tensor_from_values(raw: list[Any] | dict[str, Any], *, default_dtype: str) -> Tensor:
    """The wire :class:`Tensor` for a list-form input; :class:`TensorValueError` if invalid."""
    if isinstance(raw, list):
        return tensor_from_array(_numbers(raw, default_dtype, path=""))
    if "data" in raw:
        raise TensorValueError("", "give either `data` (base64) or `values`, not both")
    unknown = sorted(str(k) for k in set(raw) - {"dtype", "shape", "values"})
    if unknown:
        raise TensorValueError("", f"unknown tensor fields {unknown}")
    dtype = raw.get("dtype", default_dtype)
    if dtype not in _DTYPES:
        raise TensorValueError(".dtype", f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    array = _numbers(raw["values"], dtype, path=".values")
    if "shape" in raw:
        array = _reshape(array, raw["shape"])
    return tensor_from_array(array)


def _numbers(values: object, dtype: str, *, path: str) -> npt.NDArray[np.generic]:
    if not isinstance(values, list):
        raise TensorValueError(path, "values must be a (nested) list of numbers")
    try:
        inferred = np.asarray(values)
    except ValueError:  # ragged, or nested deeper than numpy's dimension limit
        raise TensorValueError(
            path, "nested lists must have equal lengths (and few levels)"
        ) from None
    target = np.dtype(dtype)
    if inferred.size == 0:
        return inferred.astype(target)
    if inferred.dtype.kind not in "biuf":
        raise TensorValueError(path, "values must be numbers (nested lists of equal length)")
    if not np.can_cast(inferred.dtype, target, casting="same_kind"):
        raise TensorValueError(path, f"{inferred.dtype.name} values cannot be {dtype}")
    converted = inferred.astype(target)
    if target.kind in "biu" and not np.array_equal(converted, inferred):
        raise TensorValueError(path, f"values do not fit in {dtype}")
    return converted


def _reshape(array: npt.NDArray[np.generic], shape: object) -> npt.NDArray[np.generic]:
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise TensorValueError(".shape", "shape must be a list of non-negative integers")
    if math.prod(shape) != array.size:
        raise TensorValueError(
            ".shape", f"shape {shape} needs {math.prod(shape)} values, got {array.size}"
        )
    try:
        return array.reshape(shape)
    except ValueError as exc:  # e.g. [0, 2**62]: no values, but numpy cannot index it
        raise TensorValueError(".shape", f"shape {shape} is not possible: {exc}") from None
